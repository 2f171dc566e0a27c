from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from leukoscope.data.annotations import (AnnotatedImage, AnnotationError, BoxAnnotation, attach_labels, points_to_boxes,
                                         read_points, read_wbc_types, write_points)
from leukoscope.data.voc import detect_layout, parse_voc_xml, read_voc_dataset, write_voc_xml
from leukoscope.data.manifest import DatasetError
from tests.conftest import shared_dataset

CLASSES = ["WBC", "RBC", "Platelets"]


def _voc(objects: str, size: str = "<size><width>100</width><height>80</height><depth>3</depth></size>") -> str:
    return f"<annotation>\n<filename>a.jpg</filename>\n{size}\n{objects}\n</annotation>\n"


def _obj(name: str, box: tuple[float, float, float, float]) -> str:
    x0, y0, x1, y1 = box
    return (f"<object>\n<name>{name}</name>\n<bndbox>\n<xmin>{x0}</xmin>\n<ymin>{y0}</ymin>\n"
            f"<xmax>{x1}</xmax>\n<ymax>{y1}</ymax>\n</bndbox>\n</object>")


def _write(tmp_path: Path, text: str, name: str = "a.xml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_roundtrip_write_then_parse(tmp_path: Path) -> None:
    image = AnnotatedImage(tmp_path / "x.png", 100, 80, [BoxAnnotation("WBC", 10, 12, 50, 60),
                                                          BoxAnnotation("RBC", 0, 0, 100, 80, truncated=True)])
    path = write_voc_xml(image, tmp_path / "x.xml")
    back = parse_voc_xml(path, classes=CLASSES)
    assert (back.width, back.height) == (100, 80)
    assert [b.label for b in back.boxes] == ["WBC", "RBC"]
    assert back.boxes[0].as_xyxy() == [10, 12, 50, 60]
    assert back.boxes[1].truncated
    assert back.image_path.name == "x.png"


def test_malformed_xml_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "<annotation>\n<object>\n<name>WBC</name>\n</annotation>\n")
    with pytest.raises(AnnotationError) as err:
        parse_voc_xml(path)
    assert str(path) in str(err.value) and "malformed XML" in str(err.value)
    assert err.value.line == 4


def test_not_voc_root(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="expected <annotation>"):
        parse_voc_xml(_write(tmp_path, "<coco></coco>"))


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="empty"):
        parse_voc_xml(_write(tmp_path, ""))


def test_unknown_class_suggests_closest(tmp_path: Path) -> None:
    path = _write(tmp_path, _voc(_obj("WBC", (1, 1, 20, 20)) + "\n" + _obj("Platelet", (30, 30, 40, 40))))
    with pytest.raises(AnnotationError) as err:
        parse_voc_xml(path, classes=CLASSES)
    message = str(err.value)
    assert "unknown class 'Platelet'" in message and "did you mean 'Platelets'" in message
    assert err.value.line is not None and f"{path}:{err.value.line}" in message


def test_case_insensitive_names_and_aliases(tmp_path: Path) -> None:
    path = _write(tmp_path, _voc(_obj("wbc", (1, 1, 20, 20)) + _obj("Platelet", (30, 30, 40, 40))))
    image = parse_voc_xml(path, classes=CLASSES, aliases={"Platelet": "Platelets"})
    assert [b.label for b in image.boxes] == ["WBC", "Platelets"]


def test_box_outside_image_is_an_error_slight_overshoot_is_clipped(tmp_path: Path) -> None:
    path = _write(tmp_path, _voc(_obj("WBC", (50, 10, 160, 40))))
    with pytest.raises(AnnotationError, match="outside the 100x80 image"):
        parse_voc_xml(path, classes=CLASSES)
    clipped = parse_voc_xml(_write(tmp_path, _voc(_obj("WBC", (-1, 10, 101, 80))), "b.xml"), classes=CLASSES)
    assert clipped.boxes[0].as_xyxy() == [0, 10, 100, 80]


def test_skip_mode_drops_bad_objects_and_reports_them(tmp_path: Path) -> None:
    text = _voc(_obj("WBC", (1, 1, 20, 20)) + _obj("RBC", (5, 5, 5, 5)) + _obj("Blob", (1, 1, 9, 9))
                + "<object><name>RBC</name><bndbox><xmin>x</xmin><ymin>1</ymin><xmax>3</xmax><ymax>4</ymax>"
                  "</bndbox></object>")
    issues: list = []
    image = parse_voc_xml(_write(tmp_path, text), classes=CLASSES, on_error="skip", issues=issues)
    assert [b.label for b in image.boxes] == ["WBC"]
    messages = [issue.message for issue in issues]
    assert any("has no area" in m for m in messages)
    assert any("unknown class 'Blob'" in m for m in messages)
    assert any("not a number" in m for m in messages)
    assert all(issue.line for issue in issues)


def _image(path: Path, size=(100, 80)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (230, 210, 220)).save(path)


def test_bccd_layout_with_imagesets(tmp_path: Path) -> None:
    for stem in ("im1", "im2", "im3"):
        _image(tmp_path / "JPEGImages" / f"{stem}.jpg")
        (tmp_path / "Annotations").mkdir(exist_ok=True)
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(
            _voc(_obj("WBC", (1, 1, 30, 30))).replace("a.jpg", f"{stem}.jpg"))
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("im1\nim2\n")
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("im3\n")
    assert detect_layout(tmp_path).kind == "bccd"
    train = read_voc_dataset(tmp_path, "train", classes=CLASSES)
    assert [i.image_path.name for i in train] == ["im1.jpg", "im2.jpg"]
    assert read_voc_dataset(tmp_path, "Testing", classes=CLASSES)[0].image_path.name == "im3.jpg"
    with pytest.raises(DatasetError, match="no split 'val'"):
        read_voc_dataset(tmp_path, "val")
    assert len(read_voc_dataset(tmp_path)) == 3


def test_boxes_are_checked_against_the_image_as_decoded(tmp_path: Path) -> None:
    """<size> was believed: a camera's portrait JPEG (EXIF orientation 6) decodes turned, its boxes then miss
    their cells; a <size> unlike the image's, or none at all, left boxes outside the image unchecked."""
    def example(stem: str, size: tuple[int, int], xml_size: str, box=(1, 1, 30, 30), orientation=None) -> None:
        path = tmp_path / "JPEGImages" / f"{stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", size, (230, 210, 220))
        exif = image.getexif()
        if orientation:
            exif[0x0112] = orientation
        image.save(path, exif=exif)
        (tmp_path / "Annotations").mkdir(exist_ok=True)
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(_voc(_obj("WBC", box), xml_size).replace("a.jpg",
                                                                                                        path.name))

    size = "<size><width>100</width><height>80</height><depth>3</depth></size>"
    example("upright", (100, 80), size)
    example("turned", (100, 80), size, orientation=6)  # decodes 80x100
    example("resized", (200, 160), size)
    example("unsized", (100, 80), "", box=(60, 10, 140, 50))  # past the right edge of a 100 px image
    example("unsized_ok", (100, 80), "", box=(60, 10, 90, 50))
    example("zero_sized", (100, 80), "<size><width>0</width><height>0</height><depth>3</depth></size>",
            box=(60, 10, 90, 50))  # some exporters write 0x0: read as no <size> (the file was skipped)
    with pytest.raises(AnnotationError, match=r"<size> says 100x80, but \w+.jpg decodes to"):
        read_voc_dataset(tmp_path, classes=CLASSES)
    kept = read_voc_dataset(tmp_path, classes=CLASSES, on_error="skip")
    # "unsized": its one box lies past the image it decodes to; its cell would be trained as background
    assert sorted(i.image_path.stem for i in kept) == ["unsized_ok", "upright", "zero_sized"]
    assert {i.image_path.stem: len(i.boxes) for i in kept} == {"unsized_ok": 1, "upright": 1, "zero_sized": 1}
    unsized_ok = next(i for i in kept if i.image_path.stem == "unsized_ok")
    assert (unsized_ok.width, unsized_ok.height) == (100, 80)
    messages = " ".join(issue.message for issue in kept.issues)
    assert "decodes to 200x160: its boxes" in messages and "outside the 100x80 image" in messages
    assert "decodes to 80x100 (its EXIF orientation turns it)" in messages


def test_without_a_class_list_two_spellings_of_one_class_are_refused(tmp_path: Path) -> None:
    for stem, name in (("im1", "WBC"), ("im2", "wbc"), ("im3", "RBC")):
        _image(tmp_path / "JPEGImages" / f"{stem}.jpg")
        (tmp_path / "Annotations").mkdir(exist_ok=True)
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(_voc(_obj(name, (1, 1, 30, 30))).replace("a.jpg",
                                                                                                       f"{stem}.jpg"))
    (tmp_path / "Annotations" / "im4.xml").write_text(_voc(_obj("WBC", (1, 1, 30, 30))).replace("a.jpg", "im4.jpg"))
    _image(tmp_path / "JPEGImages" / "im4.jpg")
    with pytest.raises(DatasetError, match="differ only in case \\(WBC / wbc\\)") as err:
        read_voc_dataset(tmp_path)
    # the files to correct are named, the rarer spelling first
    assert str(err.value).endswith("correct the annotations: 'wbc' in 1 file(s): Annotations/im2.xml; "
                                   "'WBC' in 2 file(s): Annotations/im1.xml, Annotations/im4.xml")
    assert read_voc_dataset(tmp_path, classes=["RBC", "WBC"]).classes == ["RBC", "WBC"]  # listed: wbc is WBC


def test_an_image_with_an_unusable_object_is_left_out_a_point_box_is_not(tmp_path: Path) -> None:
    """Dropping one object kept its image: the cell it marked was trained as background and scored as a false
    alarm. A box of no area (CBC has two) marks no cell: its image stays. A box of an unknown or misspelt class
    (Platelet, Leukocyte for WBC) may mark a cell of a class read: its image is left out, like one outside the
    image."""
    for stem, objects in (("outside", _obj("WBC", (1, 1, 30, 30)) + _obj("RBC", (70, 60, 160, 120))),
                          ("point", _obj("WBC", (1, 1, 30, 30)) + _obj("RBC", (50, 50, 50, 50))),
                          ("other", _obj("WBC", (1, 1, 30, 30)) + _obj("Platelet", (40, 40, 60, 60))),
                          ("leukocyte", _obj("Leukocyte", (1, 1, 30, 30)) + _obj("RBC", (40, 40, 60, 60))),
                          ("clean", _obj("WBC", (1, 1, 30, 30)))):
        _image(tmp_path / "JPEGImages" / f"{stem}.jpg")
        (tmp_path / "Annotations").mkdir(exist_ok=True)
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(_voc(objects).replace("a.jpg", f"{stem}.jpg"))
    kept = read_voc_dataset(tmp_path, classes=CLASSES, on_error="skip")
    assert sorted(i.image_path.stem for i in kept) == ["clean", "point"]
    assert any("did you mean 'Platelets'" in i.message for i in kept.issues)  # still reported
    for stem in ("outside", "other", "leukocyte"):
        assert any(f"{stem}.xml" in i.source and "1 object(s) above could not be used" in i.message
                   for i in kept.issues), stem
    # an alias reads the other spelling as its class
    aliased = read_voc_dataset(tmp_path, classes=CLASSES, aliases={"Platelet": "Platelets", "Leukocyte": "WBC"},
                               on_error="skip")
    assert sorted(i.image_path.stem for i in aliased) == ["clean", "leukocyte", "other", "point"]


def test_classes_left_out_on_purpose_are_no_problem_unknown_ones_are(tmp_path: Path) -> None:
    """Reading a subset of the classes (WBC only) leaves the other classes of the data out on purpose: RBC and
    Platelets, and those listed in ignore_classes; their images stay and nothing is reported. An unknown name is
    still a problem that leaves its image out."""
    for stem, objects in (("rbc", _obj("WBC", (1, 1, 30, 30)) + _obj("rbc", (70, 60, 160, 120))),
                          ("platelet", _obj("WBC", (1, 1, 30, 30)) + _obj("Platelet", (40, 40, 60, 60))),
                          ("blast", _obj("WBC", (1, 1, 30, 30)) + _obj("Blast", (40, 40, 60, 60))),
                          ("leukocyte", _obj("Leukocyte", (1, 1, 30, 30))),
                          ("clean", _obj("WBC", (1, 1, 30, 30)))):
        _image(tmp_path / "JPEGImages" / f"{stem}.jpg")
        (tmp_path / "Annotations").mkdir(exist_ok=True)
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(_voc(objects).replace("a.jpg", f"{stem}.jpg"))
    only_wbc = read_voc_dataset(tmp_path, classes=["WBC"], on_error="skip")
    assert sorted(i.image_path.stem for i in only_wbc) == ["clean", "rbc"]  # the RBC outside the image is not read
    assert all(b.label == "WBC" for i in only_wbc for b in i.boxes)
    assert sorted(Path(i.source).stem for i in only_wbc.issues) == ["blast", "blast", "leukocyte", "leukocyte",
                                                                    "platelet", "platelet"]
    assert any("unknown class 'Platelet' (did you mean 'Platelets'?); known classes: WBC (left out on purpose: "
               "Platelets, RBC)" in i.message for i in only_wbc.issues)
    chosen = read_voc_dataset(tmp_path, classes=["WBC"], aliases={"Platelet": "Platelets"}, ignore_classes=["Blast"],
                              on_error="skip")
    assert sorted(i.image_path.stem for i in chosen) == ["blast", "clean", "platelet", "rbc"]
    assert [Path(i.source).stem for i in chosen.issues] == ["leukocyte", "leukocyte"]
    with pytest.raises(AnnotationError, match="unknown class 'Leukocyte'"):  # on_error=fail stops on it alone
        read_voc_dataset(tmp_path, classes=["WBC"], aliases={"Platelet": "Platelets"}, ignore_classes=["Blast"])
    with pytest.raises(DatasetError, match="'Cell' is not one of"):
        read_voc_dataset(tmp_path, classes=["WBC"], aliases={"Leukocyte": "Cell"})
    # classes of other names leave no blood-cell class out: a WBC box beside Leukocyte ones may be a misspelling,
    # whose cell would be learned as background (it was skipped without a word, even under on_error=fail)
    with pytest.raises(AnnotationError, match="unknown class 'WBC'"):
        read_voc_dataset(tmp_path, classes=["Leukocyte", "RBC"])
    own_names = read_voc_dataset(tmp_path, classes=["Leukocyte", "RBC"], on_error="skip")
    assert [i.image_path.stem for i in own_names] == ["leukocyte"]
    # white-cell types beside CBC's boxes (a detector of [WBC, Blast], as bundles before this rule were trained):
    # the red cells and platelets stay left out
    typed = read_voc_dataset(tmp_path, classes=["WBC", "Blast"], on_error="skip")
    assert sorted(i.image_path.stem for i in typed) == ["blast", "clean", "rbc"]


def test_two_annotation_files_naming_one_image_are_refused(tmp_path: Path) -> None:
    """A stale <filename> (im2.xml naming im3.jpg) put im3 in the data twice, each copy with part of its boxes:
    each taught the other's cells as background."""
    for stem in ("im1", "im2", "im3"):
        _image(tmp_path / "JPEGImages" / f"{stem}.jpg")
        (tmp_path / "Annotations").mkdir(exist_ok=True)
        named = "im3" if stem == "im2" else stem
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(
            _voc(_obj("WBC", (1, 1, 30, 30))).replace("a.jpg", f"{named}.jpg"))
    with pytest.raises(AnnotationError, match="names the image im3.jpg, which im2.xml annotates too"):
        read_voc_dataset(tmp_path, classes=CLASSES)
    kept = read_voc_dataset(tmp_path, classes=CLASSES, on_error="skip")
    # which of the two is right cannot be told (the stale one may sort first): neither is used
    assert [i.image_path.name for i in kept] == ["im1.jpg"] and len(kept.issues) == 2
    assert all("im2.xml, im3.xml all name the image im3.jpg" in issue.message for issue in kept.issues)


def test_cbc_layout_keeps_duplicates_once_and_skips_missing_images(tmp_path: Path, caplog) -> None:
    for split, stems in (("Training", ["a", "b"]), ("Validation", ["a"]), ("Testing", ["c"])):
        for stem in stems:
            _image(tmp_path / split / "Images" / f"{stem}.jpg")
            (tmp_path / split / "Annotations").mkdir(parents=True, exist_ok=True)
            (tmp_path / split / "Annotations" / f"{stem}.xml").write_text(
                _voc(_obj("RBC", (1, 1, 30, 30))).replace("a.jpg", f"{stem}.jpg"))
    (tmp_path / "Testing" / "Annotations" / "ghost.xml").write_text(_voc("").replace("a.jpg", "ghost.jpg"))
    assert detect_layout(tmp_path).kind == "cbc"
    with caplog.at_level("WARNING", logger="leukoscope.data.annotations"):
        both = read_voc_dataset(tmp_path, "Training+Validation", classes=CLASSES)
    assert sorted(i.image_path.name for i in both) == ["a.jpg", "b.jpg"]
    # said without --verbose: a run of CBC's 360 files read as 300 gave no reason
    assert "1 image(s) appear in more than one of" in caplog.text
    with pytest.raises(AnnotationError, match="ghost.jpg not found"):
        read_voc_dataset(tmp_path, "test", classes=CLASSES)
    test = read_voc_dataset(tmp_path, "test", classes=CLASSES, on_error="skip")
    assert len(test) == 1 and "not found" in test.issues[0].message


def test_an_image_without_an_annotation_file_is_named_and_left_out(tmp_path: Path) -> None:
    """An image whose XML was lost was dropped without a word ("on 3 images", no issue): it is not read as a field
    without cells (its cells would be trained as background), so it is left out and named. A BCCD split is its
    list: an image outside the list is not in the split."""
    for split, stems in (("Training", ["a", "b"]), ("Testing", ["c", "d"])):
        for stem in stems:
            _image(tmp_path / split / "Images" / f"{stem}.jpg")
            (tmp_path / split / "Annotations").mkdir(parents=True, exist_ok=True)
            (tmp_path / split / "Annotations" / f"{stem}.xml").write_text(
                _voc(_obj("RBC", (1, 1, 30, 30))).replace("a.jpg", f"{stem}.jpg"))
    (tmp_path / "Testing" / "Annotations" / "d.xml").unlink()
    with pytest.raises(AnnotationError, match=r"d.jpg: no annotation file names this image \(no d.xml\)"):
        read_voc_dataset(tmp_path, "test", classes=CLASSES)
    test = read_voc_dataset(tmp_path, "test", classes=CLASSES, on_error="skip")
    assert [i.image_path.name for i in test] == ["c.jpg"]
    assert [p.name for p in test.unannotated] == ["d.jpg"]
    assert [Path(i.source).name for i in test.issues] == ["d.jpg"] and "left out" in test.issues[0].message
    assert read_voc_dataset(tmp_path, "Training", classes=CLASSES).unannotated == []
    # a field without cells has an XML file without <object>: it is kept, with no box
    (tmp_path / "Testing" / "Annotations" / "d.xml").write_text(_voc("").replace("a.jpg", "d.jpg"))
    empty = read_voc_dataset(tmp_path, "test", classes=CLASSES)
    assert [len(i.boxes) for i in empty] == [1, 0] and not empty.issues
    bccd = tmp_path / "bccd"
    for stem in ("im1", "im2"):
        _image(bccd / "JPEGImages" / f"{stem}.jpg")
        (bccd / "Annotations").mkdir(exist_ok=True)
        (bccd / "Annotations" / f"{stem}.xml").write_text(_voc(_obj("WBC", (1, 1, 30, 30))).replace("a.jpg",
                                                                                                   f"{stem}.jpg"))
    _image(bccd / "JPEGImages" / "im3.jpg")
    (bccd / "ImageSets" / "Main").mkdir(parents=True)
    (bccd / "ImageSets" / "Main" / "train.txt").write_text("im1\n")
    assert not read_voc_dataset(bccd, "train", classes=CLASSES).issues
    whole = read_voc_dataset(bccd, classes=CLASSES, on_error="skip")
    assert len(whole) == 2 and [p.name for p in whole.unannotated] == ["im3.jpg"]


def test_points_file(tmp_path: Path) -> None:
    path = tmp_path / "im.xyc"
    path.write_text("10 20\n\n# comment\n30.5\t40\n")
    points = read_points(path, image_size=(100, 100))
    assert [(p.x, p.y) for p in points] == [(10, 20), (30.5, 40)]
    assert read_points(write_points(points, tmp_path / "copy.xyc")) == points
    (tmp_path / "empty.xyc").write_text("")
    assert read_points(tmp_path / "empty.xyc") == []
    (tmp_path / "bad.xyc").write_text("1 2\n3 four\n")
    with pytest.raises(AnnotationError) as err:
        read_points(tmp_path / "bad.xyc")
    assert err.value.line == 2
    (tmp_path / "out.xyc").write_text("500 20\n")
    with pytest.raises(AnnotationError, match="outside"):
        read_points(tmp_path / "out.xyc", image_size=(100, 100))
    boxes = points_to_boxes(points, 20, image_size=(100, 100))
    assert boxes[0].as_xyxy() == [0, 10, 20, 30]


def test_wbc_types(tmp_path: Path) -> None:
    path = tmp_path / "types.csv"
    path.write_text('image,wbc_type\nBloodImage_00001.jpg,NEUTROPHIL\nBloodImage_00002.jpg,"neutrophil, EOSINOPHIL"\n')
    types = read_wbc_types(path)
    assert types == {"BloodImage_00001": ["NEUTROPHIL"], "BloodImage_00002": ["NEUTROPHIL", "EOSINOPHIL"]}
    path.write_text("image,wbc_type\na.jpg,NEUTROPHIIL\n")
    with pytest.raises(AnnotationError) as err:
        read_wbc_types(path)
    assert err.value.line == 2 and "did you mean 'NEUTROPHIL'" in str(err.value)
    path.write_text("")
    with pytest.raises(AnnotationError, match="empty"):
        read_wbc_types(path)


@pytest.mark.shared
def test_real_cbc_and_bccd() -> None:
    cbc = shared_dataset("cbc")
    test = read_voc_dataset(cbc, "Testing", classes=CLASSES, on_error="skip")
    assert len(test) == 60
    assert len(test.issues) == 1 and "has no area" in test.issues[0].message  # BloodImage_00343: a 0x0 RBC box
    train = read_voc_dataset(cbc, "Training+Validation", classes=CLASSES, on_error="skip")
    assert len(train) == 300  # the 60 Validation images are copies of Training images
    assert {i.image_path.name for i in train}.isdisjoint({i.image_path.name for i in test})
    bccd = shared_dataset("bccd")
    bccd_test = read_voc_dataset(bccd, "test", classes=CLASSES, on_error="skip")
    assert len(bccd_test) == 72 and bccd_test.class_counts()["WBC"] > 60
    types = read_wbc_types(bccd / "wbc_types.csv")
    labelled = attach_labels(bccd_test, types)
    assert sum(1 for image in labelled if image.labels) > 60


def test_a_file_or_a_missing_folder_is_not_a_voc_dataset(tmp_path: Path) -> None:
    manifest = tmp_path / "cells.csv"
    manifest.write_text("path,label\n")
    with pytest.raises(DatasetError, match="cells.csv: is a file; a detector's data are a Pascal VOC folder"):
        detect_layout(manifest)
    with pytest.raises(DatasetError, match="dataset folder does not exist"):
        detect_layout(tmp_path / "nowhere")
