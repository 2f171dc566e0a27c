"""Smoke tests of the classification benchmarks: taleqani.py / pbc.py (classification.py),
compare.py, segmentation_effect.py and gradcam_check.py, each end to end on a tiny generated dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leukoscope.data.splits import Split
from leukoscope.inference.predictor import CellClassifier
from leukoscope.io import load_image
from tests.bench.conftest import TALEQANI_CLASSES, ScriptRun, run_script

# Each test trains, evaluates or serves a model for seconds: -m 'not slow' leaves them out locally (CI runs them).
pytestmark = pytest.mark.slow


def _table_rows(run: ScriptRun) -> list[list[str]]:
    """The cells of every Markdown table row the script printed, header and rule excluded."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.lines if line.startswith("| ")]
    return [row for row in rows if row[0] not in ("model", "")]


def _check_bundle(bundle: Path, classes: list[str], image: Path) -> None:
    """The printed bundle loads and predicts one of its classes for a real image."""
    assert bundle.is_dir(), bundle
    classifier = CellClassifier.from_bundle(bundle)
    assert sorted(classifier.classes) == sorted(classes)
    prediction = classifier.predict_images([load_image(image)])[0]
    assert prediction.top_class in classes and 0.0 <= prediction.confidence <= 1.0


@pytest.mark.parametrize(("run_fixture", "data_fixture"), [("taleqani_run", "taleqani_fields"),
                                                            ("pbc_run", "cell_folders")])
def test_classification_benchmark(run_fixture: str, data_fixture: str, request: pytest.FixtureRequest) -> None:
    run: ScriptRun = request.getfixturevalue(run_fixture)
    data: Path = request.getfixturevalue(data_fixture)
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())

    [row] = _table_rows(run)
    model, test_acc, macro_f1, val_acc, epochs = row[:5]
    assert model == "abas_cnn" and epochs == "1"
    assert all(0.0 <= float(value) <= 1.0 for value in (test_acc, macro_f1, val_acc))
    split_file = Path(run.line_starting("split: ").split()[1])
    sizes = Split.load(split_file).sizes()
    assert sum(sizes.values()) == sum(len(list((data / c).iterdir())) for c in classes) and sizes["test"] > 0
    assert run.lines[-2].endswith(": abas_cnn")

    results = json.loads(next(run.last_path.parents[1].glob("*-results.json")).read_text())
    assert [r["model"] for r in results["rows"]] == ["abas_cnn"]
    assert results["rows"][0]["bundle"] == str(run.last_path)
    assert Path(results["rows"][0]["report"]).is_file()
    _check_bundle(run.last_path, classes, next((data / classes[0]).iterdir()))


def test_taleqani_refuses_a_missing_dataset(tmp_path: Path) -> None:
    run = run_script("taleqani.py", "--data", tmp_path / "absent", "--out", tmp_path / "out", expect=1)
    assert "needs the real dataset" in run.stderr and not (tmp_path / "out").exists()


def test_compare(taleqani_fields: Path, tmp_path: Path) -> None:
    run = run_script("compare.py", "--data", taleqani_fields, "--models", "naive_bayes,abas_cnn",
                     "--image-size", "32", "--cnn-epochs", "1", "--out", tmp_path)
    rows = _table_rows(run)
    assert [row[0].split()[0] for row in rows] == ["naive_bayes", "abas_cnn"]
    assert all(0.0 <= float(row[1]) <= 1.0 for row in rows)  # accuracy
    outputs = Path(run.line_starting("outputs: ").split(": ", 1)[1])
    for suffix in ("md", "csv", "json", "html", "png"):
        assert (outputs / f"compare.{suffix}").is_file(), suffix
    chosen = run.line_starting("chosen by ").rsplit(": ", 1)[1]
    assert chosen in ("naive_bayes", "abas_cnn")
    _check_bundle(run.last_path, list(TALEQANI_CLASSES), next((taleqani_fields / "Pro").iterdir()))


def test_segmentation_effect(taleqani_fields: Path, tmp_path: Path) -> None:
    run = run_script("segmentation_effect.py", "--data", taleqani_fields, "--model", "abas_cnn", "--epochs", "1",
                     "--image-size", "32", "--augmentation", "default", "--n-cam", "2", "--out", tmp_path)
    labels = [row[0].split()[0] for row in _table_rows(run)]  # "abas_cnn (1 ep)": epochs run
    # the comparison table, then the Grad-CAM table (the classical rows of --classic, covered by
    # test_compare, are left out: each row trains and reports once more)
    assert labels == ["abas_cnn", "abas_cnn+seg"] * 2
    outputs = Path(run.line_starting("outputs: ").split()[1])
    study = json.loads((outputs / "gradcam.json").read_text())
    assert set(study) == {"abas_cnn", "abas_cnn+seg"}
    for item in study.values():
        assert item["images"] == 2 and 0.0 < item["mean_mask_area"] < 1.0  # --n-cam of the test part's 2 or more
    assert (outputs / "gradcam.png").stat().st_size > 0
    _check_bundle(run.last_path, list(TALEQANI_CLASSES), next((taleqani_fields / "Early").iterdir()))


def test_gradcam_check(taleqani_run: ScriptRun, tmp_path: Path) -> None:
    split_file = taleqani_run.line_starting("split: ").split()[1]
    figure = tmp_path / "cam.png"
    run = run_script("gradcam_check.py", "--bundle", taleqani_run.last_path, "--split-file", split_file,
                     "--subset", "train", "--limit", "6", "--figure", figure, "--occlude", "0.8,0.8,1,1")
    assert run.line_starting("images: 6 (train of ")
    for prefix in ("accuracy original:", "accuracy cells removed:", "accuracy background removed:",
                   "accuracy region 0.8,0.8,1,1 painted out:", "accuracy only region 0.8,0.8,1,1 kept:"):
        assert 0.0 <= float(run.line_starting(prefix).rsplit(":", 1)[1]) <= 1.0
    assert run.line_starting("Grad-CAM energy inside cells: ")
    assert run.lines[-1] == f"figure: {figure}" and figure.stat().st_size > 0
    whole = run_script("gradcam_check.py", "--bundle", taleqani_run.last_path, "--split-file", split_file,
                       "--occlude", "0,0,1,1", expect=2)
    assert "not the whole image" in whole.stderr
