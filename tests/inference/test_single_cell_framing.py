"""A single-cell image for a classifier of a physical window (the shipped one: 24 um) is framed as
its training crops were: that many micrometres around the image's centre, at the given scale, the
image's own (its red cells) or its run's; an image without a scale is classified whole and says so."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from leukoscope.bundle import BundleInfo
from leukoscope.cli import app
from leukoscope.inference.predictor import CellClassifier
from leukoscope.preprocessing import Preprocessing
from tests.conftest import shared_dataset
from tests.detection.smear_fakes import _Constant
from tests.test_scale import smear_field

BLANK = Image.new("RGB", (200, 150), (230, 220, 220))  # no red cells: no scale of its own


def cell_photo(seed: int) -> Image.Image:
    """Red cells 20 px across (0.375 um/px) around a violet white cell at the centre, as a cell's photograph
    (the window read then holds nuclear stain: leukoscope.cell_presence)."""
    pixels = np.asarray(smear_field(20.0, size=(320, 240), seed=seed, n_red=10, wbc=False)).copy()
    rows, cols = np.ogrid[:240, :320]
    pixels[(rows - 120) ** 2 + (cols - 160) ** 2 <= 16 ** 2] = (120, 80, 170)
    return Image.fromarray(pixels)


def windowed_classifier(window_um: float | None = 24.0) -> CellClassifier:
    info = BundleInfo("constant", ["a", "b"], Preprocessing(16, [0.5] * 3, [0.25] * 3, cell_window_um=window_um))
    return CellClassifier(_Constant(2, 0), info)


def test_an_image_is_cut_at_the_window_around_its_centre_at_its_scale() -> None:
    classifier = windowed_classifier()
    field = smear_field(20.0)  # red cells 20 px: 0.375 um/px, so 24 um is 64 px
    framed, scale = classifier.frame(field)
    assert scale.source == "estimated" and scale.um_per_px == pytest.approx(0.375, rel=0.08)
    assert framed.size[0] == framed.size[1] == pytest.approx(24 / scale.um_per_px, abs=1)
    assert framed.tobytes() == field.crop((320 - framed.size[0] // 2, 240 - framed.size[1] // 2,
                                           320 + (framed.size[0] + 1) // 2, 240 + (framed.size[1] + 1) // 2)).tobytes()
    given, stated = classifier.frame(field, 0.1)
    assert stated.source == "given" and given.size == (240, 240)
    # larger than the image: the rest filled with its background (not mirrored copies of its cell)
    tight = BLANK.copy()
    tight.paste((20, 20, 90), (90, 65, 110, 85))  # one dark "cell" at the centre
    padded = classifier.frame(tight, 0.05)[0]
    assert padded.size == (480, 480) and padded.getpixel((5, 5)) == (230, 220, 220)
    assert padded.getpixel((240, 240)) == (20, 20, 90)
    dark = np.asarray(padded)[..., 2] == 90
    assert dark.sum() == 20 * 20  # the cell once
    whole, unknown = classifier.frame(BLANK)
    assert unknown.source == "unknown" and whole is BLANK
    lent, run = classifier.frame(BLANK, run_um_per_px=0.2)
    assert run.source == "run" and lent.size == (120, 120)
    # a run's scale also overrules an own estimate far off it (more than 1.5 times) on 5 red cells or fewer,
    # never one on more, nor a given scale
    weak = smear_field(20.0, n_red=4, seed=9)
    overruled = classifier.frame(weak, run_um_per_px=0.1)[1]
    assert overruled.source == "run" and "from 4 red cells, is more than 1.5 times off" in overruled.note
    assert classifier.frame(field, run_um_per_px=0.1)[1].source == "estimated"
    assert classifier.frame(weak, 0.375, run_um_per_px=0.1)[1].source == "given"
    # a classifier without a window takes any image as it is
    plain = windowed_classifier(None)
    assert plain.frame(field) == (field, None)


def test_predict_records_the_scale_each_image_was_framed_at(tmp_path: Path) -> None:
    classifier = windowed_classifier()
    smear_field(20.0).save(tmp_path / "cell.png")
    BLANK.save(tmp_path / "blank.png")
    paths = [tmp_path / "cell.png", tmp_path / "blank.png"]
    framed = classifier.predict_paths(paths, frame=True)
    assert [p.scale.source for p in framed] == ["estimated", "unknown"]
    rows = [p.as_row() for p in framed]
    assert rows[0]["scale_source"] == "estimated" and 0.3 < rows[0]["um_per_px"] < 0.45
    assert rows[1]["scale_source"] == "unknown" and rows[1]["um_per_px"] is None  # empty in a CSV, null in JSON
    as_given = classifier.predict_paths(paths)  # the Python API's default: crops already framed
    assert all(p.scale is None and "scale_source" not in p.as_row() for p in as_given)
    # a predictions file has the scale's columns whatever the mode (an --as-given CSV had none: a script broke)
    from leukoscope.inference.predict_files import write_predictions

    header = {mode: write_predictions(rows_of, tmp_path / f"{mode}.csv").read_text().splitlines()[0].split(",")
              for mode, rows_of in (("framed", framed), ("as_given", as_given))}
    assert header["framed"] == header["as_given"] and {"um_per_px", "scale_source"} <= set(header["as_given"])


def test_a_tiff_cells_resolution_tags_are_its_scale_unless_its_red_cells_or_the_user_say_otherwise(
        tmp_path: Path) -> None:
    """As `analyze` reads a TIFF field's record: `predict` had estimated every cell image's scale, tags or not."""
    pytest.importorskip("tiffslide")
    classifier = windowed_classifier()
    BLANK.save(tmp_path / "blank.tif", resolution=1e4 / 0.2, resolution_unit="cm")  # no red cell to doubt it
    cell = smear_field(20.0, seed=1)  # red cells 20 px across: 0.375 um/px
    cell.save(tmp_path / "agrees.tif", resolution=1e4 / 0.36, resolution_unit="cm")
    cell.save(tmp_path / "contradicted.tif", resolution=1e4 / 0.1, resolution_unit="cm")
    paths = [tmp_path / name for name in ("blank.tif", "agrees.tif", "contradicted.tif")]
    blank, agrees, contradicted = (p.scale for p in classifier.predict_paths(paths, frame=True))
    assert (blank.source, blank.um_per_px) == ("recorded", pytest.approx(0.2))
    assert (agrees.source, agrees.um_per_px) == ("recorded", pytest.approx(0.36))
    assert contradicted.source == "estimated" and "the file records 0.1 um/px" in contradicted.note
    stated = classifier.predict_paths(paths[:1], frame=True, um_per_px=0.3)[0].scale
    assert (stated.source, stated.um_per_px) == ("given", 0.3)


def test_predict_cli_options_and_the_message_for_images_without_a_scale(tmp_path: Path) -> None:
    runner = CliRunner()
    BLANK.save(tmp_path / "blank.png")
    both = runner.invoke(app, ["predict", str(tmp_path / "blank.png"), "--bundle", "pretrained:wbc-classifier",
                               "--um-per-px", "0.1", "--as-given", "--out", str(tmp_path / "p.csv")])
    assert both.exit_code == 2 and "give one" in both.output
    wrong = runner.invoke(app, ["predict", str(tmp_path / "blank.png"), "--bundle", "pretrained:wbc-classifier",
                                "--um-per-px", "0", "--out", str(tmp_path / "p.csv")])
    assert wrong.exit_code == 2 and "between 0.005 and 5" in wrong.output and not (tmp_path / "p.csv").exists()
    whole = runner.invoke(app, ["predict", str(tmp_path / "blank.png"), "--bundle", "pretrained:wbc-classifier",
                                "--out", str(tmp_path / "p.csv")])
    assert whole.exit_code == 0, whole.output
    assert "1 of 1 images had no scale" in " ".join(whole.output.split())
    (row,) = csv.DictReader((tmp_path / "p.csv").open())
    assert row["scale_source"] == "unknown"


def test_predict_doubts_a_stated_scale_the_images_red_cells_contradict(tmp_path: Path) -> None:
    """Five single-cell images at 0.375 um/px stated as 0.8 (a field at 0.3 for CBC's 0.08 was called blast at
    0.99 with nothing said, where `analyze` warns): the console and every row say so, in single-cell words."""
    folder = tmp_path / "cells"
    folder.mkdir()
    for seed in range(5):
        cell_photo(seed).save(folder / f"cell{seed}.png")
    runner = CliRunner()
    out = tmp_path / "p.csv"
    wrong = runner.invoke(app, ["predict", str(folder), "--bundle", "pretrained:wbc-classifier", "--um-per-px", "0.8",
                                "--out", str(out)])
    assert wrong.exit_code == 0, wrong.output
    said = " ".join(wrong.output.split())
    assert "the stated scale of these single-cell images, 0.8 um/px, is 2.1 times coarser than their red cells" in said
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and all(row["warnings"].startswith("the stated scale of these single-cell images")
                                  and "its class may be wrong" in row["warnings"] for row in rows)
    right = runner.invoke(app, ["predict", str(folder), "--bundle", "pretrained:wbc-classifier", "--um-per-px",
                                "0.375", "--out", str(out), "--overwrite"])
    assert right.exit_code == 0 and "stated scale" not in right.output
    assert all(row["warnings"] == "" for row in csv.DictReader(out.open()))


def test_pbc_cells_are_typed_when_framed_as_the_classifier_learned_them(tmp_path: Path) -> None:
    """pbc's photographs show about 37 um of smear; the shipped classifier learned 24 um windows. Whole,
    its cells look small and were called platelet or erythroblast; framed at pbc's scale, typed right."""
    pbc = shared_dataset("pbc")
    images = [sorted((pbc / kind).glob("*.jpg"))[0] for kind in ("neutrophil", "lymphocyte", "monocyte",
                                                                  "eosinophil")]
    runner = CliRunner()
    calls = {}
    for way, options in (("framed", ["--um-per-px", "0.104"]), ("whole", ["--as-given"])):
        out = tmp_path / f"{way}.csv"
        result = runner.invoke(app, ["predict", *map(str, images), "--bundle", "pretrained:wbc-classifier",
                                     "--out", str(out), *options])
        assert result.exit_code == 0, result.output
        calls[way] = [row["top_class"] for row in csv.DictReader(out.open())]
    assert calls["framed"] == ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
    assert calls["whole"] != calls["framed"]


def test_a_folder_lends_its_scale_and_explain_maps_the_framed_cell(tmp_path: Path, monkeypatch) -> None:
    """predict on a folder: images without a scale of their own are framed at the folder's (as analyze's
    fields are); the CSV keeps its columns whatever the first row; --explain explains the image the
    classifier saw (the framed one), not the upload."""
    from leukoscope.inference import predict_files

    folder = tmp_path / "cells"
    folder.mkdir()
    for seed in range(5):
        smear_field(20.0, size=(320, 240), seed=seed, n_red=10).save(folder / f"cell{seed}.png")
    BLANK.save(folder / "blank.png")
    (folder / "broken.png").write_bytes(b"not an image")
    seen: list[tuple[int, int]] = []
    real = predict_files._as_classified

    def recording(classifier, image, prediction):
        framed = real(classifier, image, prediction)
        seen.append(framed.size)
        return framed

    monkeypatch.setattr(predict_files, "_as_classified", recording)
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(app, ["predict", str(folder), "--bundle", "pretrained:wbc-classifier", "--out",
                                      str(out), "--explain", str(tmp_path / "maps")])
    assert result.exit_code == 3, result.output  # broken.png: a partial run
    said = " ".join(result.output.split())  # in the words of cells, not of fields
    assert "scale: an image with too few isolated red cells of its own" in said and "is framed at" in said
    assert "(median of 5 of 6 images" in said and " field" not in said
    # these "cells" are smear fields, their white cell off the centre: named, and said in their rows
    assert "6 image(s) show no white cell at their centre" in said and "blank.png, cell0.png" in said
    rows = {Path(row["source"]).name: row for row in csv.DictReader(out.open())}
    assert list(next(iter(rows.values())))[-1] == "error"  # the error column last, whatever row comes first
    assert rows["blank.png"]["scale_source"] == "run" and rows["cell0.png"]["scale_source"] == "estimated"
    assert float(rows["blank.png"]["um_per_px"]) == pytest.approx(0.375, rel=0.08)
    assert rows["broken.png"]["error"] and rows["broken.png"]["scale_source"] == ""
    # every map was made from the 24 um window at its image's scale: 64 px here, not the 320x240 upload
    assert len(seen) == 6 and all(size[0] == size[1] == pytest.approx(64, abs=3) for size in seen)


def test_evaluate_frames_images_as_predict_does_and_says_how(tmp_path: Path) -> None:
    """evaluate scores each single-cell image as predict classifies it (framed at its scale), and says how
    many were framed at which scale and how many had none and were scored whole."""
    data = tmp_path / "lab"
    (data / "lymphocyte").mkdir(parents=True)
    smear_field(20.0).save(data / "lymphocyte" / "cell.png")
    BLANK.save(data / "lymphocyte" / "blank.png")
    runner = CliRunner()
    both = runner.invoke(app, ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data", str(data),
                               "--um-per-px", "0.1", "--as-given", "--out", str(tmp_path / "e")])
    assert both.exit_code == 2 and "give one" in both.output
    result = runner.invoke(app, ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data", str(data),
                                 "--out", str(tmp_path / "framed")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "1 of 2 images framed on 24 um around their centre (scale: 1 estimated)" in said
    assert "1 had no scale" in said
    framing = json.loads((tmp_path / "framed" / "metrics.json").read_text())["framing"]
    assert (framing["framed"], framing["whole"], framing["scale_sources"]) == (1, 1, {"estimated": 1})
    assert framing["note"] in (tmp_path / "framed" / "report.html").read_text()
    given = runner.invoke(app, ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data", str(data),
                                "--out", str(tmp_path / "given"), "--as-given"])
    assert given.exit_code == 0, given.output
    assert json.loads((tmp_path / "given" / "metrics.json").read_text())["framing"] is None


def test_evaluate_and_int8_calibration_frame_a_tiff_at_its_recorded_scale(tmp_path: Path) -> None:
    """As predict frames it: evaluate (and the int8 export's calibration images) had estimated every image's
    scale from its red cells, a TIFF's resolution tags ignored."""
    pytest.importorskip("tiffslide")
    from leukoscope.cell_window import single_cell_framer
    from leukoscope.inference.quantize import _Reader

    data = tmp_path / "lab"
    (data / "lymphocyte").mkdir(parents=True)
    BLANK.save(data / "lymphocyte" / "blank.tif", resolution=1e4 / 0.2, resolution_unit="cm")  # no red cell
    smear_field(20.0).save(data / "lymphocyte" / "cell.png")
    result = CliRunner().invoke(app, ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data", str(data),
                                      "--out", str(tmp_path / "framed")])
    assert result.exit_code == 0, result.output
    framing = json.loads((tmp_path / "framed" / "metrics.json").read_text())["framing"]
    assert (framing["framed"], framing["whole"]) == (2, 0)
    assert framing["scale_sources"] == {"estimated": 1, "recorded": 1}
    stated = CliRunner().invoke(app, ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data", str(data),
                                      "--um-per-px", "0.3", "--out", str(tmp_path / "stated")])
    assert stated.exit_code == 0, stated.output
    assert json.loads((tmp_path / "stated" / "metrics.json").read_text())["framing"]["scale_sources"] == {"given": 2}

    frame = single_cell_framer(24.0, [data / "lymphocyte" / "blank.tif"])
    seen: list[tuple[int, int]] = []
    reader = _Reader([data / "lymphocyte" / "blank.tif"], Preprocessing(16), "input", None,
                     lambda image, recorded: seen.append(frame(image, recorded).size) or image)
    assert reader.get_next() is not None
    assert seen == [(120, 120)]  # 24 um at the recorded 0.2 um/px; unframed (no red cells) it stayed 200x150


def test_evaluate_says_the_scale_a_folder_lent(tmp_path: Path) -> None:
    """Images without red cells of their own are framed at the scale of the images together, and the
    report says which scale that was."""
    data = tmp_path / "lab" / "lymphocyte"
    data.mkdir(parents=True)
    for seed in range(5):
        smear_field(20.0, size=(320, 240), seed=seed, n_red=10).save(data / f"cell{seed}.png")
    BLANK.save(data / "blank.png")
    result = CliRunner().invoke(app, ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data",
                                      str(tmp_path / "lab"), "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    framing = json.loads((tmp_path / "ev" / "metrics.json").read_text())["framing"]
    assert framing["scale_sources"] == {"estimated": 5, "run": 1}
    assert framing["run_um_per_px"] == pytest.approx(0.375, rel=0.08)
    said = " ".join(result.output.split())
    assert f"1 without a scale of their own framed at the images' scale together, {framing['run_um_per_px']:.4f}" \
        in said


def test_evaluate_and_predict_agree_on_pbc_cells(tmp_path: Path) -> None:
    """The same pbc photographs scored by evaluate and classified by predict: the same accuracy (evaluate
    took them whole before: 0.29 against predict's 0.88 on 24 of them)."""
    pbc = shared_dataset("pbc")
    kinds = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
    data = tmp_path / "lab"
    for kind in kinds:
        (data / kind).mkdir(parents=True)
        for image in sorted((pbc / kind).glob("*.jpg"))[:6]:  # enough for the images' scale together
            (data / kind / image.name).symlink_to(image)
    runner = CliRunner()
    refused = runner.invoke(app, ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data", str(data),
                                  "--out", str(tmp_path / "ev")])
    assert refused.exit_code == 2 and "source images of its train crops" in " ".join(refused.output.split())
    scored = runner.invoke(app, ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data", str(data),
                                 "--out", str(tmp_path / "ev"), "--allow-training-data"])  # pbc is its training source
    assert scored.exit_code == 0, scored.output
    accuracy = json.loads((tmp_path / "ev" / "metrics.json").read_text())["accuracy"]
    out = tmp_path / "p.csv"
    predicted = runner.invoke(app, ["predict", str(data), "--bundle", "pretrained:wbc-classifier", "--out", str(out)])
    assert predicted.exit_code == 0, predicted.output
    rows = list(csv.DictReader(out.open()))
    assert accuracy == pytest.approx(np.mean([Path(r["source"]).parent.name == r["top_class"] for r in rows]))
    assert accuracy >= 0.75


def test_evaluate_takes_a_bundles_own_crops_as_they_are(tmp_path: Path) -> None:
    """The test part of a bundle's own dataset holds crops already cut at its window: evaluate scores them as
    they are (as its training did), not framed again at an estimate of their scale."""
    import shutil

    from leukoscope.pretrained import resolve_bundle

    data = tmp_path / "lab"
    (data / "lymphocyte").mkdir(parents=True)
    smear_field(20.0).save(data / "lymphocyte" / "cell.png")
    bundle = tmp_path / "bundle"
    shutil.copytree(resolve_bundle("pretrained:wbc-classifier"), bundle)
    record = json.loads((bundle / "bundle.json").read_text())
    record["provenance"]["dataset"] = str(data)  # as if trained on this folder
    (bundle / "bundle.json").write_text(json.dumps(record))
    result = CliRunner().invoke(app, ["evaluate", "--bundle", str(bundle), "--data", str(data),
                                      "--out", str(tmp_path / "own"), "--allow-training-data"])
    assert result.exit_code == 0, result.output
    assert "the bundle's own dataset: its images are scored as they are" in " ".join(result.output.split())
    assert json.loads((tmp_path / "own" / "metrics.json").read_text())["framing"] is None
