"""Readers: class folders, C-NMC subject ids, CSV manifests."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from leukoscope.data.manifest import DatasetError, Manifest, Sample
from leukoscope.data.readers import cnmc_subject, read_class_folders, read_csv_manifest, read_dataset

# -- class folders -----------------------------------------------------------


def test_synthetic_root(synthetic_root: Path) -> None:
    manifest = read_class_folders(synthetic_root)
    assert manifest.classes == ["blast", "lymphocyte", "monocyte", "neutrophil"]
    assert len(manifest) == 96
    assert manifest.class_counts() == {c: 24 for c in manifest.classes}
    assert manifest.root == synthetic_root
    assert not manifest.has_subjects
    for sample in manifest:
        assert sample.path.parent.name == sample.label
        assert sample.path.is_file()


def test_class_folders_sorted_nested_hidden_and_non_images(tmp_path: Path, cell_writer) -> None:
    root = tmp_path / "data"
    cell_writer(root / "zeta" / "z1.png")
    cell_writer(root / "alpha" / "a1.jpg", format="JPEG")
    cell_writer(root / "alpha" / "slide2" / "deeper" / "a2.png")  # nested: still class alpha
    cell_writer(root / "Beta" / "b1.bmp")
    cell_writer(root / "alpha" / ".a_hidden.png")  # hidden file
    cell_writer(root / "alpha" / ".thumbnails" / "a1_thumb.png")  # inside a hidden folder
    cell_writer(root / ".cache" / "c1.png")  # hidden class folder
    (root / "alpha" / "notes.txt").write_text("not an image")
    (root / "alpha" / "table.csv").write_text("a,b\n")
    cell_writer(root / "alpha" / "anim.gif", format="GIF")  # not a supported suffix
    (root / "empty_class").mkdir()
    (root / "README.md").write_text("loose non-image file at the root")

    manifest = read_class_folders(root)
    assert manifest.classes == ["Beta", "alpha", "zeta"]  # sorted (code point order), empty class dropped
    names = sorted((s.label, s.path.name) for s in manifest)
    assert names == [("Beta", "b1.bmp"), ("alpha", "a1.jpg"), ("alpha", "a2.png"), ("zeta", "z1.png")]
    assert manifest.class_counts() == {"Beta": 1, "alpha": 2, "zeta": 1}


def test_a_linked_sub_folder_is_read_and_a_link_loop_ends(tmp_path: Path, cell_writer) -> None:
    """Path.rglob does not enter symlinked folders: a class's linked sub-folder was left out without a word."""
    root = tmp_path / "data"
    cell_writer(root / "alpha" / "a1.png")
    cell_writer(root / "beta" / "b1.png")
    cell_writer(tmp_path / "store" / "more" / "a2.png")
    (root / "alpha" / "linked").symlink_to(tmp_path / "store" / "more", target_is_directory=True)
    (root / "beta" / "loop").symlink_to(root / "beta", target_is_directory=True)  # a link to its own folder
    manifest = read_class_folders(root)
    assert sorted((s.label, s.path.name) for s in manifest) == [("alpha", "a1.png"), ("alpha", "a2.png"),
                                                                 ("beta", "b1.png")]


def test_samples_are_in_a_stable_order(synthetic_root: Path) -> None:
    first = read_class_folders(synthetic_root)
    second = read_class_folders(synthetic_root)
    assert [s.path for s in first] == [s.path for s in second]
    assert [s.path for s in first] == sorted(s.path for s in first)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="empty"):
        read_class_folders(tmp_path)


def test_folder_with_only_loose_images(tmp_path: Path, cell_writer) -> None:
    cell_writer(tmp_path / "one.png")
    cell_writer(tmp_path / "two.png", seed=1)
    with pytest.raises(DatasetError, match="sub-folder"):
        read_class_folders(tmp_path)


def test_class_folders_without_images(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        read_class_folders(tmp_path)


@pytest.mark.parametrize("layout", ["splits", "flat"])
def test_a_detection_folder_is_not_read_as_classes(tmp_path: Path, layout: str) -> None:
    """cbc's Training / Testing / Validation were trained as three "classes" (bccd's JPEGImages as one)."""
    from PIL import Image

    for split in (["Training", "Testing"] if layout == "splits" else [""]):
        images = tmp_path / split / ("Images" if split else "JPEGImages")
        images.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(images / "a.png")
        (tmp_path / split / "Annotations").mkdir()
        (tmp_path / split / "Annotations" / "a.xml").write_text("<annotation/>")
    with pytest.raises(DatasetError, match="a Pascal VOC detection folder .*leukoscope train-detector"):
        read_dataset(tmp_path)
    # without box files, a folder named Annotations does not make it a detection folder
    (tmp_path / "Annotations").mkdir(exist_ok=True)
    for xml in tmp_path.rglob("*.xml"):
        xml.unlink()
    if layout == "splits":  # Training / Testing are then the parts of a dataset shipped split, not classes
        with pytest.raises(DatasetError, match="Testing, Training look like the parts of a dataset already split"):
            read_dataset(tmp_path)
    else:
        assert read_dataset(tmp_path).classes


def test_nonexistent_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_class_folders(tmp_path / "missing")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    path.write_bytes(b"PK")
    with pytest.raises(DatasetError, match="not a folder"):
        read_class_folders(path)


# -- C-NMC names -------------------------------------------------------------


@pytest.mark.parametrize(
    "name,subject",
    [
        ("UID_13_3_1_all.bmp", "13"),
        ("UID_H10_1_1_hem.bmp", "H10"),
        ("UID_h3_2_1_hem.bmp", "H3"),  # the real data has a lower-case h
        ("uid_7_1_1_all.bmp", "7"),
        ("UID_1_10_12_all.bmp", "1"),
        ("WBC-Malignant-Pro-001.jpg", None),
        ("UID_.bmp", None),
        ("UID_X5_1_1_all.bmp", None),
        ("UID_13.bmp", None),
        ("my_UID_13_3_1_all.bmp", None),
        ("cell_0001.png", None),
    ],
)
def test_cnmc_subject(name: str, subject: str | None) -> None:
    assert cnmc_subject(name) == subject


def test_subjects_parsed_from_class_folders(tmp_path: Path, cell_writer) -> None:
    cell_writer(tmp_path / "all" / "UID_13_3_1_all.bmp")
    cell_writer(tmp_path / "all" / "UID_13_4_1_all.bmp", seed=1)
    cell_writer(tmp_path / "hem" / "UID_H10_1_1_hem.bmp", seed=2)
    cell_writer(tmp_path / "hem" / "other.bmp", seed=3)
    manifest = read_class_folders(tmp_path)
    assert {s.path.name: s.subject for s in manifest} == {
        "UID_13_3_1_all.bmp": "13",
        "UID_13_4_1_all.bmp": "13",
        "UID_H10_1_1_hem.bmp": "H10",
        "other.bmp": None,
    }
    assert manifest.has_subjects
    assert not read_class_folders(tmp_path, parse_subjects=False).has_subjects


def test_the_service_exports_cells_are_grouped_by_case(tmp_path: Path, cell_writer) -> None:
    """The reviewed-labels export's folder layout names each cell ``case-<id>-cell-<n>.png``: its cells are one
    patient's, and a split that put some in training and others in test would score the model on a patient it
    learned (only the CSV layout carried the case before)."""
    case = "0123456789abcdef0123456789abcdef"
    cell_writer(tmp_path / "lymphocyte" / f"case-{case}-cell-3.png")
    cell_writer(tmp_path / "monocyte" / f"case-{case}-cell-4.png", seed=1)
    cell_writer(tmp_path / "monocyte" / "field-f7-cell-5.png", seed=2)  # `analyze --cells`: its field
    cell_writer(tmp_path / "monocyte" / "sample-cell-6.png", seed=3)  # a name of one's own: no subject read into it
    manifest = read_dataset(tmp_path)
    assert {s.path.name: s.subject for s in manifest} == {f"case-{case}-cell-3.png": case,
                                                          f"case-{case}-cell-4.png": case,
                                                          "field-f7-cell-5.png": "field f7", "sample-cell-6.png": None}


def two_cells_each(root: Path, cell_writer, names: dict[str, str]) -> None:
    """Two distinct cells in each class folder, named by the folder's pattern ({} is 0, then 1)."""
    for number, (folder, pattern) in enumerate(names.items()):
        for index in range(2):
            cell_writer(root / folder / pattern.format(index), seed=10 * number + index)


def test_cells_left_uncertain_are_not_trained_on_as_a_class(tmp_path: Path, cell_writer) -> None:
    """`analyze --cells` puts the cells its classifier could not call in uncertain/, to be sorted by eye."""
    from leukoscope.engine.config import DataConfig
    from leukoscope.engine.data_prep import load_manifest

    two_cells_each(tmp_path, cell_writer, {"lymphocyte": "field-f1-cell-{}.png", "monocyte": "field-f1-cell-{}4.png",
                                           "uncertain": "field-f1-cell-{}2.png"})
    with pytest.raises(DatasetError, match="a class 'uncertain' holds cells a classifier could not call"):
        load_manifest(DataConfig(path=str(tmp_path)))
    kept = load_manifest(DataConfig(path=str(tmp_path), classes=["lymphocyte", "monocyte"]))  # left out: fine
    assert kept.classes == ["lymphocyte", "monocyte"] and len(kept) == 4


def test_labels_that_differ_only_in_case_are_refused_unless_mapped(tmp_path: Path, cell_writer) -> None:
    """A lab's "Neutrophil" folder merged with an export's "neutrophil" made two classes of one cell type;
    training refuses them, unless data.class_map makes them one."""
    from leukoscope.engine.config import DataConfig
    from leukoscope.engine.data_prep import load_manifest

    two_cells_each(tmp_path, cell_writer, {"Neutrophil": "a{}.png", "neutrophil": "b{}.png", "lymphocyte": "c{}.png"})
    with pytest.raises(DatasetError, match="labels 'Neutrophil' and 'neutrophil' differ only in case.*class_map"):
        load_manifest(DataConfig(path=str(tmp_path)))
    mapped = load_manifest(DataConfig(path=str(tmp_path), class_map={"Neutrophil": "neutrophil"}))
    assert mapped.classes == ["lymphocyte", "neutrophil"] and len(mapped) == 6
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nNeutrophil/a0.png,EOSINOPHIL\nneutrophil/b0.png,eosinophil\n"
                        "lymphocyte/c0.png,lymphocyte\n")
    with pytest.raises(DatasetError, match="'EOSINOPHIL' and 'eosinophil' differ only in case"):
        load_manifest(DataConfig(path=str(manifest)))


def test_cnmc_tree_read_one_level_too_high_is_refused(tmp_path: Path, cell_writer) -> None:
    # training_data/fold_0/{all,hem}: pointing at training_data would make the folds the classes
    cell_writer(tmp_path / "fold_0" / "all" / "UID_13_3_1_all.bmp")
    cell_writer(tmp_path / "fold_0" / "hem" / "UID_H10_1_1_hem.bmp", seed=1)
    cell_writer(tmp_path / "fold_1" / "all" / "UID_14_3_1_all.bmp", seed=2)
    with pytest.raises(DatasetError, match=r"'fold_0' holds C-NMC images named both '_all' and '_hem'"):
        read_class_folders(tmp_path)
    assert read_class_folders(tmp_path / "fold_0").classes == ["all", "hem"]



@pytest.mark.parametrize("parts", [("TRAIN", "TEST"), ("train", "val", "test"), ("Training", "Validation")])
def test_a_dataset_shipped_split_is_refused(tmp_path: Path, cell_writer, parts: tuple[str, ...]) -> None:
    """Kaggle's TRAIN/<class>/..., TEST/<class>/...: read as class folders, a model learned to tell the training
    folder from the test folder."""
    for part in parts:
        two_cells_each(tmp_path / part, cell_writer, {"lymphocyte": f"{part}-l{{}}.png",
                                                      "neutrophil": f"{part}-n{{}}.png"})
    with pytest.raises(DatasetError, match=rf"sub-folders .*{parts[0]}.* look like the parts of a dataset already "
                                           rf"split, each holding the class folders \(lymphocyte, neutrophil\).*"
                                           rf"point --data at one of them.*--split-file\)\.$"):  # no word of patients
        read_class_folders(tmp_path)
    assert read_class_folders(tmp_path / parts[0]).classes == ["lymphocyte", "neutrophil"]


def test_parts_of_any_name_holding_the_same_class_folders_are_refused(tmp_path: Path, cell_writer) -> None:
    for part in ("hospital_a", "hospital_b"):
        two_cells_each(tmp_path / part, cell_writer, {"lymphocyte": f"{part}-l{{}}.png",
                                                      "monocyte": f"{part}-m{{}}.png"})
    with pytest.raises(DatasetError, match="hospital_a, hospital_b look like the parts of a dataset already split"
                                           ".*not classes but each class's patients or slides, give a CSV manifest"):
        read_class_folders(tmp_path)


def test_classes_with_sub_folders_of_their_own_are_not_taken_for_split_parts(tmp_path: Path, cell_writer) -> None:
    """A class's patients or slides in sub-folders (named with numbers), the same under every class; sub-folders
    under one class only; a class holding images beside its sub-folders: all are classes' images, as before."""
    for label in ("lymphocyte", "neutrophil"):
        two_cells_each(tmp_path / "patients" / label, cell_writer, {"P01": f"{label}-a{{}}.png",
                                                                    "P02": f"{label}-b{{}}.png"})
    assert read_class_folders(tmp_path / "patients").classes == ["lymphocyte", "neutrophil"]
    two_cells_each(tmp_path / "mixed", cell_writer, {"lymphocyte/raw": "l{}.png", "lymphocyte/cropped": "c{}.png",
                                                     "neutrophil": "n{}.png"})
    two_cells_each(tmp_path / "mixed" / "monocyte", cell_writer, {"raw": "m{}.png", "cropped": "k{}.png"})
    cell_writer(tmp_path / "mixed" / "monocyte" / "direct.png", seed=99)
    assert read_class_folders(tmp_path / "mixed").classes == ["lymphocyte", "monocyte", "neutrophil"]
    # classes holding the same sites (or stains) without digits: the top folders are the cell classes
    for label in ("blast", "lymphocyte"):
        two_cells_each(tmp_path / "sites" / label, cell_writer, {"hospital_a": f"{label}-a{{}}.png",
                                                                 "hospital_b": f"{label}-b{{}}.png"})
    assert read_class_folders(tmp_path / "sites").classes == ["blast", "lymphocyte"]


def test_files_of_class_folders_left_unread_are_named_in_one_warning(tmp_path: Path, cell_writer, caplog) -> None:
    """Other suffixes and links to files that are gone were dropped without a word; a system's own files (hidden,
    Thumbs.db, desktop.ini, __MACOSX) stay unsaid. JPEGs named .jfif / .jpe (Windows' browser saves) are read."""
    two_cells_each(tmp_path, cell_writer, {"lymphocyte": "l{}.png", "neutrophil": "n{}.png"})
    cell_writer(tmp_path / "lymphocyte" / "saved.jfif", seed=50, format="JPEG")
    cell_writer(tmp_path / "lymphocyte" / "saved.jpe", seed=51, format="JPEG")
    cell_writer(tmp_path / "lymphocyte" / "extra.webp", seed=52, format="WEBP")
    cell_writer(tmp_path / "neutrophil" / "anim.gif", seed=53, format="GIF")
    (tmp_path / "neutrophil" / "n9.png").symlink_to(tmp_path / "unmounted" / "n9.png")
    for quiet in ("Thumbs.db", "desktop.ini", "._l0.png", ".DS_Store"):
        (tmp_path / "lymphocyte" / quiet).write_bytes(b"\0")
    cell_writer(tmp_path / "lymphocyte" / "__MACOSX" / "l0.png", seed=54)
    with caplog.at_level("WARNING"):
        manifest = read_class_folders(tmp_path)
    assert sorted(s.path.name for s in manifest if s.label == "lymphocyte") == ["l0.png", "l1.png", "saved.jfif",
                                                                                "saved.jpe"]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert "3 file(s) in class folders are not read: 2 not named as an image (.gif .webp)" in said[0]
    assert "lymphocyte/extra.webp" in said[0] and "1 link(s) to a file that is gone: neutrophil/n9.png" in said[0]
    assert "Thumbs" not in said[0] and "MACOSX" not in said[0] and "desktop" not in said[0]


def test_class_names_in_two_unicode_forms_are_one_class(tmp_path: Path, cell_writer, caplog) -> None:
    """macOS names folders decomposed ("e" + a combining accent); typed labels are composed: one class was two,
    and the messages named two names that print alike."""
    composed, decomposed = (unicodedata.normalize(form, "éosinophile") for form in ("NFC", "NFD"))
    two_cells_each(tmp_path / "mac", cell_writer, {decomposed: "e{}.png", "neutrophil": "n{}.png"})
    assert read_class_folders(tmp_path / "mac").classes == ["neutrophil", composed]  # sorted as composed
    two_cells_each(tmp_path / "both", cell_writer, {decomposed: "d{}.png", composed: "c{}.png",
                                                    "neutrophil": "n{}.png"})
    with caplog.at_level("WARNING"):
        both = read_class_folders(tmp_path / "both")
    assert both.class_counts() == {"neutrophil": 2, composed: 4}
    assert "'e\\u0301osinophile' and 'éosinophile' have one name written in two Unicode forms" in caplog.text
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(f"path,label\nmac/{decomposed}/e0.png,{decomposed}\nmac/neutrophil/n0.png,neutrophil\n",
                        encoding="utf-8")
    assert read_csv_manifest(csv_path).labels == [composed, "neutrophil"]


def test_a_clash_of_spaces_is_not_called_one_of_case(tmp_path: Path) -> None:
    from leukoscope.data.readers import check_spellings

    with pytest.raises(DatasetError, match="'lymphocyte' and 'lymphocyte ' differ only in surrounding spaces and "
                                           "would be two classes; give them one spelling$"):
        check_spellings(tmp_path, ["lymphocyte", "lymphocyte "])
    with pytest.raises(DatasetError, match="differ only in case and surrounding spaces"):
        check_spellings(tmp_path, ["Lymphocyte", "lymphocyte "])
    with pytest.raises(DatasetError, match=r"'e\\u0301osinophile' differ only in Unicode form"):
        check_spellings(tmp_path, ["éosinophile", unicodedata.normalize("NFD", "éosinophile")])


# -- CSV manifests -----------------------------------------------------------


def test_csv_manifest_relative_and_absolute_paths(tmp_path: Path, cell_writer) -> None:
    images = tmp_path / "images"
    a = cell_writer(images / "a.png")
    b = cell_writer(images / "b.png", seed=1)
    elsewhere = cell_writer(tmp_path / "elsewhere" / "c.png", seed=2)
    csv_path = tmp_path / "lists" / "train.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(
        "Path , Label, Subject\n"  # header is case- and space-insensitive
        "../images/a.png,blast,P1\n"
        f"{elsewhere},normal,\n"
        " ../images/b.png , normal ,P2\n"
    )
    manifest = read_csv_manifest(csv_path)
    assert [s.path.resolve() for s in manifest] == [a.resolve(), elsewhere.resolve(), b.resolve()]
    assert manifest.labels == ["blast", "normal", "normal"]
    assert [s.subject for s in manifest] == ["P1", None, "P2"]
    assert manifest.classes == ["blast", "normal"]
    assert manifest.root == csv_path.parent
    # relative paths are resolved against the CSV's folder, not the working directory
    assert all(s.path.exists() for s in manifest)


def test_csv_without_label_column_gives_unlabelled_samples(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path\nx.png\ny.png\n")
    manifest = read_csv_manifest(csv_path)
    assert manifest.labels == [None, None]
    assert manifest.classes == []
    with pytest.raises(DatasetError, match="no label"):
        manifest.targets


def test_csv_missing_path_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("file,label\nx.png,blast\n")
    with pytest.raises(DatasetError, match="'path' column") as info:
        read_csv_manifest(csv_path)
    assert "file" in str(info.value) and "separated by" not in str(info.value)
    # a spreadsheet's semicolon "CSV" read as one column "path;label": the separator is named
    csv_path.write_text("path;label\nx.png;blast\n")
    with pytest.raises(DatasetError, match="its columns look separated by ';'; a manifest's are separated by commas"):
        read_csv_manifest(csv_path)


def test_csv_empty_file(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("")
    with pytest.raises(DatasetError, match="'path' column"):
        read_csv_manifest(csv_path)


def test_csv_header_only(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label\n")
    with pytest.raises(DatasetError, match="no rows"):
        read_csv_manifest(csv_path)


def test_csv_blank_and_empty_cell_rows_are_skipped(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    # blank lines, and the ",," rows spreadsheets leave behind
    csv_path.write_text("path,label,subject\nx.png,blast,\n\n,,\ny.png,normal,\n , , \n")
    manifest = read_csv_manifest(csv_path)
    assert [s.path.name for s in manifest] == ["x.png", "y.png"]


def test_csv_row_with_label_but_no_path_names_the_line(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label\nx.png,blast\n\n,normal\n")
    with pytest.raises(DatasetError, match=r"m\.csv:4: empty path"):
        read_csv_manifest(csv_path)


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes("path,label\nx.png,blast\n".encode("utf-8-sig"))
    manifest = read_csv_manifest(csv_path)
    assert manifest.labels == ["blast"]



def test_csv_in_utf16_is_read(tmp_path: Path) -> None:
    """A spreadsheet's "Unicode Text" is UTF-16 with a byte-order mark: it failed with a bare codec message."""
    csv_path = tmp_path / "unicode.csv"
    csv_path.write_text("path,label\r\nx.png,éosinophile\r\n", encoding="utf-16")
    assert read_csv_manifest(csv_path).labels == ["éosinophile"]
    csv_path.write_text("path\tlabel\r\nx.png\tblast\r\n", encoding="utf-16")
    with pytest.raises(DatasetError, match="separated by '\\\\t'.*save it as 'CSV UTF-8 \\(Comma delimited\\)'"):
        read_csv_manifest(csv_path)


def test_csv_in_another_encoding_is_refused_naming_the_file_line_and_fix(tmp_path: Path) -> None:
    """Windows' "CSV (Comma delimited)" is Windows-1252: the error said "'utf-8' codec can't decode byte 0xe9"."""
    csv_path = tmp_path / "windows.csv"
    csv_path.write_bytes("path,label\r\nx.png,blast\r\nélan.png,blast\r\n".encode("cp1252"))
    with pytest.raises(DatasetError, match=r"windows\.csv: line 3 is not UTF-8 text \(byte 0xe9.*save it as "
                                           r"'CSV UTF-8 \(Comma delimited\)'"):
        read_csv_manifest(csv_path)


def test_subject_ids_typed_two_ways_are_named(tmp_path: Path, caplog) -> None:
    """"P04" / "p04 " / a spreadsheet's "1" / "01" / "1.0": one patient, split as one (subject_key), and said."""
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label,subject\na.png,x,P04\nb.png,x,p04 \nc.png,y,1\nd.png,y,01\ne.png,y,1.0\n"
                        "f.png,x,P05\ng.png,y,10\n")
    with caplog.at_level("WARNING"):
        manifest = read_csv_manifest(csv_path)
    assert [s.subject for s in manifest] == ["P04", "p04", "1", "01", "1.0", "P05", "10"]  # as written
    assert "2 subject id(s) are written in more than one way" in caplog.text
    assert "'P04' / 'p04'" in caplog.text and "'01' / '1' / '1.0'" in caplog.text and "P05" not in caplog.text

def test_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_csv_manifest(tmp_path / "missing.csv")


def test_csv_rows_naming_missing_files_are_refused_counted_and_named(tmp_path: Path, cell_writer) -> None:
    """split and train failed on the first missing file with a bare "[Errno 2] No such file or directory"
    (no manifest, no row, no count); evaluate skipped them. Now one refusal names the manifest and the rows."""
    cell_writer(tmp_path / "a.png")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label\na.png,blast\n" + "".join(f"/nope/missing{i}.jpg,normal\n" for i in range(7)))
    with pytest.raises(DatasetError) as info:
        read_dataset(csv_path, require_labels=True, check_files=True)
    message = str(info.value)
    assert message.startswith(f"{csv_path}: 7 of its 8 rows name files that do not exist (line 3: /nope/missing0.jpg")
    assert "line 7: /nope/missing4.jpg and 2 more" in message and "missing5" not in message
    assert f"read from the manifest's folder, {tmp_path.resolve()}) or remove those rows" in message
    assert len(read_csv_manifest(csv_path)) == 8  # not checked unless asked (unlabelled lists, tests)


def test_csv_listing_a_file_twice_with_another_label_is_refused(tmp_path: Path, cell_writer) -> None:
    """The same file as Benign and as Early: both rows landed in the training part, without a word."""
    for name in ("a.png", "b.png"):
        cell_writer(tmp_path / "img" / name)
    csv_path = tmp_path / "m.csv"
    # the same file spelled two ways (relative, absolute) is still the same file
    csv_path.write_text(f"path,label\nimg/a.png,Benign\nimg/b.png,Benign\n{tmp_path / 'img' / 'a.png'},Early\n")
    with pytest.raises(DatasetError) as info:
        read_csv_manifest(csv_path)
    assert str(info.value) == (f"{csv_path}: 1 file(s) are listed more than once with different labels or subjects: "
                               f"{tmp_path / 'img' / 'a.png'} (line 2: label 'Benign'; line 4: label 'Early'); "
                               f"keep one row per file, with its right label")
    csv_path.write_text("path,label,subject\nimg/a.png,Benign,P1\nimg/a.png,Benign,P2\n")
    with pytest.raises(DatasetError, match="line 2: label 'Benign', subject 'P1'; line 3: label 'Benign', subject"):
        read_csv_manifest(csv_path)


def test_csv_repeated_rows_are_read_once_with_a_warning(tmp_path: Path, cell_writer, caplog) -> None:
    """20 repeated rows were counted twice (train 67 images, val and test without a Benign)."""
    for name in ("a.png", "b.png"):
        cell_writer(tmp_path / name)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label\na.png,blast\nb.png,normal\na.png,blast\n./a.png,blast\nb.png,normal\n")
    with caplog.at_level("WARNING"):
        manifest = read_csv_manifest(csv_path)
    assert [(s.path.name, s.label) for s in manifest] == [("a.png", "blast"), ("b.png", "normal")]
    assert (f"{csv_path}: 3 row(s) repeat an earlier row (the same file, label and subject) and are read once: "
            "line 4 repeats line 2, line 5 repeats line 2, line 6 repeats line 3") in caplog.text


def test_csv_round_trip_through_save_csv(tmp_path: Path, cell_writer) -> None:
    inside = cell_writer(tmp_path / "data" / "ALL" / "UID_1_1_1_all.bmp")
    outside = cell_writer(tmp_path / "other" / "hémato cell.png", seed=1)  # non-ASCII, space
    unlabelled = cell_writer(tmp_path / "data" / "unknown.png", seed=2)
    original = Manifest(
        [Sample(inside, "ALL", "1"), Sample(outside, "HEM", None), Sample(unlabelled, None, "9")],
        classes=["ALL", "HEM"],
    )
    csv_path = original.save_csv(tmp_path / "data" / "manifest.csv")
    text = csv_path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "path,label,subject"
    assert "ALL/UID_1_1_1_all.bmp" in text  # relative to the CSV's folder
    assert str(outside.resolve()) in text  # outside it: absolute

    loaded = read_csv_manifest(csv_path)
    assert [s.path.resolve() for s in loaded] == [s.path.resolve() for s in original]
    assert loaded.labels == original.labels
    assert [s.subject for s in loaded] == [s.subject for s in original]
    assert loaded.classes == original.classes
    assert all(s.path.exists() for s in loaded)


def test_read_dataset_dispatches_on_suffix(tmp_path: Path, synthetic_root: Path) -> None:
    assert len(read_dataset(synthetic_root)) == 96
    csv_path = read_class_folders(synthetic_root).save_csv(tmp_path / "all.CSV")
    loaded = read_dataset(csv_path)
    assert len(loaded) == 96
    assert loaded.classes == ["blast", "lymphocyte", "monocyte", "neutrophil"]


# -- real data ---------------------------------------------------------------


@pytest.mark.shared
def test_cnmc_mini(cnmc_mini: Path) -> None:
    manifest = read_class_folders(cnmc_mini)
    assert len(manifest) == 54
    assert manifest.classes == ["all", "hem"]
    assert manifest.class_counts() == {"all": 27, "hem": 27}
    subjects = {s.subject for s in manifest}
    assert None not in subjects
    assert len(subjects) == 26
    # healthy subjects are H-prefixed and only in hem; patients only in all
    for sample in manifest:
        assert sample.subject.startswith("H") == (sample.label == "hem"), sample.path.name
        assert sample.path.suffix == ".bmp"


def test_csv_without_label_column_is_refused_where_labels_are_needed(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,subject\nx.png,P1\ny.png,P2\n")
    with pytest.raises(DatasetError) as error:
        read_dataset(csv_path, require_labels=True)
    message = str(error.value)
    assert "no 'label' column" in message and "columns found: path, subject" in message
    assert read_dataset(csv_path).labels == [None, None]  # prediction-style reading still works


def test_missing_dataset_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="manifest file does not exist"):
        read_dataset(tmp_path / "nope.csv")
    with pytest.raises(DatasetError, match="folder does not exist"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        read_dataset(tmp_path / "file.txt")
