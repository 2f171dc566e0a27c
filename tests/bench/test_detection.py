"""Smoke tests of the detection and smear benchmarks: detect_cbc.py, smear_speed.py and
mil_taleqani.py, each end to end on tiny generated fields laid out like CBC / all-taleqani."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from leukoscope.data.voc import read_voc_dataset
from leukoscope.inference.detector import CellDetector
from leukoscope.inference.predictor import CellClassifier
from leukoscope.io import load_image
from tests.bench.conftest import ScriptRun, run_script

# Each test trains, evaluates or serves a model for seconds: -m 'not slow' leaves them out locally (CI runs them).
pytestmark = pytest.mark.slow

NUMBER = r"(\d+\.\d+)"


def test_detect_cbc(detector_run: ScriptRun, cbc_folder: Path) -> None:
    run = detector_run
    assert re.fullmatch(r"model fasterrcnn_abas; trained \d+\.\d min \(.+\)", run.lines[0]), run.lines[0]
    overall = re.fullmatch(rf"mAP@\[\.5:\.95\] {NUMBER}   mAP@0\.5 {NUMBER} \(target >= 0\.92\)", run.lines[1])
    assert overall and all(0.0 <= float(v) <= 1.0 for v in overall.groups()), run.lines[1]
    for name in ("WBC", "Platelets", "RBC"):  # every class has boxes in the test fields, so each has an AP
        ap = float(run.line_starting(f"AP@0.5 {name} ").split()[2])
        assert 0.0 <= ap <= 1.0
    assert re.fullmatch(r"WBC count exactly right in \d+\.\d% of test images \(target >= 95%\)", run.lines[5])
    assert run.line_starting("detection time per 640x480 field: ")
    report = Path(run.line_starting("report: ").split(": ", 1)[1])
    assert report.is_file() and report.parent == run.last_path.parent

    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test" and set(metrics["per_class"]) == {"WBC", "RBC", "Platelets"}
    assert metrics["n_images"] == 4  # Testing
    split = json.loads((report.parent / "split.json").read_text())
    # Training + Validation, whose images are copies of Training ones and so are kept once
    assert sorted(Path(path).parent.parent.name for path in split["train"]) == ["Training"] * 8
    detector = CellDetector.from_bundle(run.last_path)
    field = load_image(next((cbc_folder / "Testing" / "Images").iterdir()))
    [result] = detector.detect([field])
    assert set(result.counts()) == {"WBC", "RBC", "Platelets"} and result.boxes.shape == (len(result), 4)


def test_detect_cbc_without_the_dataset(tmp_path: Path) -> None:
    run = run_script("detect_cbc.py", "--data", tmp_path / "absent", expect=2)
    assert "is absent: nothing to benchmark" in run.stderr


def test_smear_speed(detector_run: ScriptRun, cbc_folder: Path) -> None:
    run = run_script("smear_speed.py", "--detector", detector_run.last_path, "--data", cbc_folder, "--repeats", "1",
                     "--threads", "1", "--mosaic", "320x240")
    measured = json.loads(run.lines[-2])
    assert run.last_path == detector_run.last_path
    test = read_voc_dataset(cbc_folder, "Testing", classes=["WBC", "RBC", "Platelets"])
    assert measured["wbc_true"] == sum(box.label == "WBC" for image in test.images[:16] for box in image.boxes)
    assert measured["tiles"] >= 1 and measured["repeats"] == 1 and measured["threads"] == 1
    for key in ("detect_640x480_s", "analyze_320x240_s", "analyze_320x240_cpu_s", "classify_true_wbc_s",
                "analyze_320x240_with_true_wbc_count_s"):
        assert measured[key] >= 0.0, key
    assert run.line_starting(f"full analysis, 320x240 field ({measured['tiles']} tiles, {measured['wbc_found']} WBC")
    bad = run_script("smear_speed.py", "--detector", detector_run.last_path, "--mosaic", "big", expect=2)
    assert "--mosaic needs WIDTHxHEIGHT" in bad.stderr


def test_folder_speed(detector_run: ScriptRun, cbc_folder: Path, tmp_path: Path) -> None:
    bad = run_script("folder_speed.py", "--old-src", tmp_path, "--data", cbc_folder, expect=2)
    assert "holds no leukoscope package" in bad.stderr
    run = run_script("folder_speed.py", "--detector", detector_run.last_path, "--classifier", "none", "--data",
                     cbc_folder, "--fields", "2", "--repeats", "1", "--threads", "1", "--field-size", "320x240",
                     "--backend", "auto", "--torch-too")
    measured = json.loads(run.lines[-1])
    new = measured["new"]
    assert "old" not in measured and measured["fields"] == 2 and measured["field_size"] == "320x240"
    assert len(measured["new_torch"]["folder_wall_s"]) == 1 and run.line_starting("new_torch: detection 640x480 ")
    assert new["tiles"] == 1 and len(new["folder_wall_s"]) == 1 and new["folder_s_per_field"] > 0
    assert new["folder_cpu_s_per_field"] > 0 and new["detect_640x480_s"] > 0 and new["startup_s"] > 0
    assert len(new["one_field_wall_s"]) == 1 and "folder_s_per_further_field" in new  # the 2nd field's cost
    assert {"decode", "detection", "png encode", "csv + json"} <= set(new["stages_s"])
    assert run.line_starting("new: detection 640x480 ")


def test_mil_taleqani(taleqani_fields: Path, tmp_path: Path) -> None:
    run = run_script("mil_taleqani.py", "--data", taleqani_fields, "--out", tmp_path, "--binary", "--cell-size", "32",
                     "--field-size", "32", "--epochs", "1", "--batch-size", "16")
    metrics = json.loads((tmp_path / "mil_metrics.json").read_text())
    fields = sum(1 for folder in taleqani_fields.iterdir() for _ in folder.iterdir())
    assert sum(metrics["fields"].values()) == fields
    assert run.lines[0] == (f"fields {metrics['fields']}, cells {metrics['cells']}, fields without a located cell: "
                            f"{metrics['fields_without_cells']}")
    for prefix, key in (("cell-level test accuracy", "cell_level_test_accuracy_inherited_labels"),
                        ("field accuracy from its cells:", "field_accuracy_from_cells"),
                        ("whole-image classifier accuracy:", "whole_image_accuracy")):
        assert f"{metrics[key]:.4f}" in run.line_starting(prefix) and 0.0 <= metrics[key] <= 1.0
    cells = CellClassifier.from_bundle(run.last_path)
    assert cells.classes == ["Benign", "Malignant"]  # --binary: Early, Pre and Pro are one class
    assert cells.image_size == 32
