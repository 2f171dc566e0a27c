"""The models that ship inside the package (src/leukoscope/pretrained), as a user gets them
right after install: they load, stay within the size budget, have their cards, and
`leukoscope analyze` runs on a field with no model flags. Skipped while none is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from leukoscope.cli import app
from leukoscope.pretrained import DEFAULT_CLASSIFIER, DEFAULT_DETECTOR, list_pretrained, pretrained_path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "leukoscope" / "pretrained"
CBC_TESTING = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cbc" / "Testing"
SHIPPED = {p.name for p in PACKAGE_DIR.iterdir() if (p / "bundle.json").exists()} if PACKAGE_DIR.is_dir() else set()
needs_models = pytest.mark.skipif({DEFAULT_DETECTOR, DEFAULT_CLASSIFIER} - SHIPPED != set(),
                                  reason="the shipped models are not installed in this checkout")


@pytest.fixture(autouse=True)
def package_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEUKOSCOPE_PRETRAINED_DIR", raising=False)


def test_shipped_weights_stay_within_30_mb() -> None:
    weights = [f for f in PACKAGE_DIR.rglob("*") if f.suffix in {".safetensors", ".skops"}]
    assert sum(f.stat().st_size for f in weights) <= 30 * 1024 * 1024


@pytest.mark.skipif(not CBC_TESTING.is_dir(), reason="needs ../shared/datasets/cbc")
def test_a_field_framed_in_black_is_analysed_as_the_field_itself(tmp_path: Path) -> None:
    """An eyepiece camera's round field of view, or a black frame: the detector had found no white cell in either
    (4 of 5 reviewed fields), and the red cells no scale; the black is painted as the smear's background first."""
    from PIL import Image, ImageDraw

    field = Image.open(CBC_TESTING / "Images" / "BloodImage_00340.jpg").convert("RGB")
    fields = tmp_path / "fields"
    fields.mkdir()
    frame = Image.new("RGB", (field.width + 40, field.height + 40), (0, 0, 0))
    frame.paste(field, (20, 20))
    frame.save(fields / "framed.png")
    view = Image.new("L", field.size, 0)
    ImageDraw.Draw(view).ellipse((320 - 380, 240 - 380, 320 + 380, 240 + 380), fill=255)  # only the corners cut
    Image.composite(field, Image.new("RGB", field.size, (0, 0, 0)), view).save(fields / "eyepiece.png")
    result = CliRunner().invoke(app, ["analyze", str(fields), "--out", str(tmp_path / "out"), "--quiet",
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    for name in ("framed", "eyepiece"):
        report = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert report["differential"]["total"] == 1, name
        assert report["scale"]["source"] == "estimated" and abs(report["scale"]["um_per_px"] - 0.077) < 0.004, name


@needs_models
def test_each_shipped_model_loads_and_has_its_card() -> None:
    from leukoscope.bundle import load_bundle

    listed = {m.name: m for m in list_pretrained()}
    assert {DEFAULT_DETECTOR, DEFAULT_CLASSIFIER} <= set(listed)
    for name in (DEFAULT_DETECTOR, DEFAULT_CLASSIFIER):
        card = (pretrained_path(name) / "MODEL_CARD.md").read_text()
        for section in ("Training data", "In-domain test", "Left-out sources", "Intended use", "Known failure modes"):
            assert section in card, f"{name}'s card lacks {section!r}"
        model, info = load_bundle(pretrained_path(name))
        assert info.um_per_px or info.task == "classify"
    classifier = listed[DEFAULT_CLASSIFIER]
    assert "blast" in classifier.classes and "erythroblast" in classifier.classes
    assert "research use" in (pretrained_path(DEFAULT_CLASSIFIER) / "MODEL_CARD.md").read_text()


@needs_models
@pytest.mark.skipif(not CBC_TESTING.is_dir(), reason="needs ../shared/datasets/cbc")
def test_analyze_with_no_model_flags_counts_the_white_cell_of_a_real_field(tmp_path: Path) -> None:
    field = CBC_TESTING / "Images" / "BloodImage_00340.jpg"  # one white cell (its annotation)
    result = CliRunner().invoke(app, ["analyze", str(field), "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "smear-detector" in result.output and "wbc-classifier" in result.output
    report = json.loads((tmp_path / "BloodImage_00340.json").read_text())
    assert report["differential"]["total"] == 1
    assert report["scale"]["source"] in {"estimated", "unknown"}
    assert (tmp_path / "BloodImage_00340.annotated.png").exists()


@needs_models
@pytest.mark.skipif(not CBC_TESTING.is_dir(), reason="needs ../shared/datasets/cbc")
def test_the_shipped_detector_records_the_scores_it_gets_with_its_own_settings(tmp_path: Path) -> None:
    """The quality gate and the card read the bundle's recorded test scores: they must be what the
    detector scores as it ships (its inference options included, e.g. roi_sampling_ratio)."""
    from leukoscope.bundle import read_bundle_info

    info = read_bundle_info(pretrained_path(DEFAULT_DETECTOR))
    result = CliRunner().invoke(app, ["evaluate", "--bundle", f"pretrained:{DEFAULT_DETECTOR}", "--data",
                                      str(CBC_TESTING.parent), "--split", "Testing", "--out", str(tmp_path),
                                      "--backend", "torch", "--as-given"])  # as training scored it: as they are
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "metrics.json").read_text())
    assert measured["n_images"] == info.metrics["n_images"] == 60
    assert measured["map_50"] == pytest.approx(info.metrics["map_50"], abs=1e-4)
    assert measured["map"] == pytest.approx(info.metrics["map"], abs=1e-4)
    for name, ap in info.metrics["ap_50_per_class"].items():
        assert measured["per_class"][name]["ap_50"] == pytest.approx(ap, abs=1e-4)


@needs_models
@pytest.mark.skipif(not CBC_TESTING.is_dir(), reason="needs ../shared/datasets/cbc")
def test_analyze_writes_each_cell_by_class_for_a_lab_to_sort_and_fine_tune_on(tmp_path: Path) -> None:
    """A lab fine-tuning on its own cells had no way to cut them as the classifier sees them (24 um around each
    cell, at the field's scale): `analyze --cells` writes them by class, named by field, ready to be sorted."""
    from PIL import Image

    from leukoscope.data.readers import read_dataset

    fields = [CBC_TESTING / "Images" / name for name in ("BloodImage_00340.jpg", "BloodImage_00345.jpg")]
    cells = tmp_path / "cells"
    result = CliRunner().invoke(app, ["analyze", *map(str, fields), "--out", str(tmp_path / "out"), "--cells",
                                      str(cells), "--quiet"])
    assert result.exit_code == 0, result.output
    written = sorted(cells.rglob("*.png"))
    reports = [json.loads((tmp_path / "out" / f"{f.stem}.json").read_text()) for f in fields]
    assert len(written) == sum(len(report["cells"]) for report in reports) >= 2
    assert {p.parent.name for p in written} <= {*reports[0]["differential"]["counts"], "uncertain"}
    for report, stem in zip(reports, ("BloodImage_00340", "BloodImage_00345")):
        um = report["scale"]["analysed_at_um_per_px"]
        for cell in report["cells"]:
            crop = cells / cell["label"] / f"field-{stem}-cell-{cell['cell_id']}.png"
            assert abs(Image.open(crop).size[0] - 24 / um) <= 2  # the classifier's 24 um window
    assert f"cells: {len(written)} written to {cells}/<class>/" in " ".join(result.output.split())
    # the command to fine-tune names the classifier that named the cells (it said "<classifier>")
    assert f"train --init pretrained:wbc-classifier --data {cells}" in "".join(result.output.split("\n"))
    # read back as a dataset, a field's cells are one subject (never on both sides of a split)
    assert {s.subject for s in read_dataset(cells)} == {"field BloodImage_00340", "field BloodImage_00345"}
    on_ray = CliRunner().invoke(app, ["analyze", str(fields[0]), "--engine", "ray", "--cells", str(tmp_path / "c2"),
                                      "--out", str(tmp_path / "o2")])
    assert on_ray.exit_code == 2 and "use it with --engine local" in on_ray.output
    # cells sorted since would be written again under the class predicted: a folder of cells is not reused
    again = CliRunner().invoke(app, ["analyze", str(fields[0]), "--cells", str(cells), "--out", str(tmp_path / "o3")])
    assert again.exit_code == 2 and "is not empty" in again.output


@needs_models
@pytest.mark.skipif(not CBC_TESTING.is_dir(), reason="needs ../shared/datasets/cbc")
def test_evaluate_scores_a_detector_on_fields_of_another_magnification_as_analyze_sees_them(tmp_path: Path) -> None:
    """Fields of a microscope at twice CBC's magnification were scored as they came (mAP@0.5 0.56 in a review),
    while `analyze` brought them to the detector's scale and counted right: evaluate now does what analyze does
    (--as-given: as they are)."""
    from PIL import Image

    from leukoscope.data.voc import read_voc_dataset

    data = read_voc_dataset(CBC_TESTING.parent, "Testing", classes=["WBC", "RBC", "Platelets"], on_error="skip")
    (tmp_path / "x2" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "x2" / "Annotations").mkdir()
    for image in list(data)[:6]:
        with Image.open(image.image_path) as field:
            field.resize((field.width * 2, field.height * 2), Image.Resampling.BICUBIC).save(
                tmp_path / "x2" / "JPEGImages" / f"{image.image_path.stem}.png")
            width, height = field.width * 2, field.height * 2
        objects = "".join(f"<object><name>{box.label}</name><bndbox><xmin>{2 * box.xmin:g}</xmin><ymin>"
                          f"{2 * box.ymin:g}</ymin><xmax>{2 * box.xmax:g}</xmax><ymax>{2 * box.ymax:g}</ymax>"
                          f"</bndbox></object>" for box in image.boxes)
        (tmp_path / "x2" / "Annotations" / f"{image.image_path.stem}.xml").write_text(
            f"<annotation><filename>{image.image_path.stem}.png</filename><size><width>{width}</width><height>"
            f"{height}</height><depth>3</depth></size>{objects}</annotation>")
    scores = {}
    for name, extra in (("analyze", []), ("given", ["--as-given"])):
        result = CliRunner().invoke(app, ["evaluate", "--bundle", f"pretrained:{DEFAULT_DETECTOR}", "--data",
                                          str(tmp_path / "x2"), "--out", str(tmp_path / name), "--backend", "torch",
                                          *extra])
        assert result.exit_code == 0, result.output
        scores[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    at_scale = scores["analyze"]["scales"]
    assert at_scale["resampled"] == 6 and 0.4 < at_scale["factor_range"][0] <= at_scale["factor_range"][1] < 0.6
    assert scores["given"]["scales"] is None
    assert scores["analyze"]["map_50"] > scores["given"]["map_50"] + 0.2
    assert scores["analyze"]["per_class"]["WBC"]["ap_50"] > 0.9
