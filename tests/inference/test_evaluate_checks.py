"""`leukoscope evaluate` checks each scored image as `predict` does: OOD score, unfamiliar, warnings."""

from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from leukoscope.cli import app
from leukoscope.inference.predictor import CellClassifier
from leukoscope.pretrained import resolve_bundle
from leukoscope.inference.quality import lead_clause
from leukoscope.tasks.image_checks import checks_summary
from tests.conftest import shared_dataset
from tests.inference.test_single_cell_framing import BLANK, cell_photo


def test_the_summary_scores_the_doubted_images_apart() -> None:
    correct = [True, True, False, False, True]
    warnings = [(), ("Too small to show a cell: 10 x 10 px",), (), ("Too small to show a cell: 8 x 8 px",), ()]
    summary = checks_summary(correct, warnings, np.array([False, False, True, False, False]), 2.5)
    assert (summary["unfamiliar"], summary["warned"], summary["trusted"]) == (1, 2, 2)
    assert summary["warnings"] == {"Too small to show a cell": 2}
    assert summary["accuracy_trusted"] == 1.0 and summary["accuracy_doubted"] == pytest.approx(1 / 3)
    assert "1 of 5 images unlike the training images (OOD score above 2.5), 2 with a warning" in summary["note"]
    assert "accuracy 1.000 on the other 2, 0.333 on those 3" in summary["note"]
    plain = checks_summary(correct, [()] * 5, None, None)
    assert plain["unfamiliar"] is None and plain["accuracy_doubted"] is None and plain["trusted"] == 5
    assert "no OOD statistics" in plain["note"] and "accuracy" not in plain["note"]
    assert lead_clause("Too small to show a cell: 10 x 10 px") == "Too small to show a cell"


def test_evaluate_writes_each_images_ood_score_and_warnings_as_predict_gives_them(tmp_path: Path) -> None:
    """The same columns as predict's file for the same images; metrics.json says how each group scored."""
    data = tmp_path / "lab"
    (data / "lymphocyte").mkdir(parents=True)
    for seed in range(3):
        cell_photo(seed).save(data / "lymphocyte" / f"cell{seed}.png")
    BLANK.save(data / "lymphocyte" / "blank.png")  # no white cell at its centre, no scale
    Image.new("RGB", (20, 20), (200, 120, 180)).save(data / "lymphocyte" / "tiny.png")
    Image.fromarray(np.asarray(cell_photo(5).convert("L").convert("RGB"))).save(data / "lymphocyte" / "grey.png")
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data", str(data),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {Path(row["source"]).name: row for row in csv.DictReader((out / "scored_images.csv").open())}
    predicted = {Path(p.source).name: p for p in CellClassifier.from_bundle("pretrained:wbc-classifier")
                 .predict_paths(sorted((data / "lymphocyte").iterdir()), frame=True)}
    assert set(rows) == set(predicted)
    for name, row in rows.items():
        assert float(row["ood_score"]) == pytest.approx(predicted[name].ood_score, abs=1e-3), name
        assert row["unfamiliar"] == str(predicted[name].unfamiliar)
        assert row["warnings"] == " | ".join(predicted[name].warnings), name
    assert "Too small to show a cell" in rows["tiny.png"]["warnings"]
    assert rows["grey.png"]["warnings"] and rows["blank.png"]["warnings"]
    checks = json.loads((out / "metrics.json").read_text())["image_checks"]
    doubted = [row for row in rows.values() if row["warnings"] or row["unfamiliar"] == "True"]
    assert checks["images"] == 6 and checks["trusted"] == 6 - len(doubted) and checks["warned"] >= 3
    assert checks["accuracy_doubted"] == pytest.approx(np.mean([row["correct"] == "True" for row in doubted]))
    assert checks["note"] in html.unescape((out / "report.html").read_text())


def test_evaluate_as_given_keeps_each_warning_with_its_image_past_an_unreadable_one(tmp_path: Path) -> None:
    """Warnings are recorded as images decode: a file skipped as unreadable must not shift them onto the next
    image. A bundle without OOD statistics flags none and says so."""
    bundle = tmp_path / "no-ood"
    shutil.copytree(resolve_bundle("pretrained:wbc-classifier"), bundle)
    record = json.loads((bundle / "bundle.json").read_text())
    del record["ood"]
    (bundle / "bundle.json").write_text(json.dumps(record))
    data = tmp_path / "lab" / "lymphocyte"
    data.mkdir(parents=True)
    cell_photo(0).crop((96, 56, 224, 184)).save(data / "a_cell.png")
    (data / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    Image.new("RGB", (20, 20), (200, 120, 180)).save(data / "c_tiny.png")
    cell_photo(1).crop((96, 56, 224, 184)).save(data / "d_cell.png")
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["evaluate", "--bundle", str(bundle), "--data", str(tmp_path / "lab"),
                                      "--as-given", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {Path(row["source"]).name: row for row in csv.DictReader((out / "scored_images.csv").open())}
    assert set(rows) == {"a_cell.png", "c_tiny.png", "d_cell.png"}
    assert "Too small to show a cell" in rows["c_tiny.png"]["warnings"]
    assert "Too small" not in rows["a_cell.png"]["warnings"] + rows["d_cell.png"]["warnings"]
    assert not any(row["ood_score"] or row["unfamiliar"] for row in rows.values())
    checks = json.loads((out / "metrics.json").read_text())["image_checks"]
    assert checks["unfamiliar"] is None and checks["ood_unscored_because"] == "no OOD statistics in the bundle"
    assert checks["images"] == 3 and checks["warnings"].get("Too small to show a cell") == 1


def test_real_cells_the_checks_trust_are_scored_apart_from_the_doubted_ones(tmp_path: Path) -> None:
    """pbc photographs framed at pbc's scale (familiar to the shipped classifier) beside an image without a white
    cell: the trusted/doubted accuracies are those of the CSV's rows, and the rows are predict's CLI's."""
    pbc = shared_dataset("pbc")
    data = tmp_path / "lab"
    for kind in ("neutrophil", "lymphocyte"):
        (data / kind).mkdir(parents=True)
        for path in sorted((pbc / kind).glob("*.jpg"))[:2]:
            shutil.copy(path, data / kind / path.name)
    BLANK.save(data / "lymphocyte" / "blank.png")
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data", str(data),
                                      "--um-per-px", "0.104", "--allow-training-data", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "scored_images.csv").open()))
    doubted = [row["warnings"] != "" or row["unfamiliar"] == "True" for row in rows]
    correct = [row["correct"] == "True" for row in rows]
    checks = json.loads((out / "metrics.json").read_text())["image_checks"]
    assert 0 < checks["trusted"] < len(rows) and checks["trusted"] == doubted.count(False)
    assert checks["accuracy_trusted"] == pytest.approx(np.mean([c for c, d in zip(correct, doubted) if not d]))
    assert checks["accuracy_doubted"] == pytest.approx(np.mean([c for c, d in zip(correct, doubted) if d]))
    predicted = tmp_path / "predicted.csv"
    sources = [row["source"] for row in rows]
    said = CliRunner().invoke(app, ["predict", *sources, "--bundle", "pretrained:wbc-classifier", "--um-per-px",
                                    "0.104", "--out", str(predicted)])
    assert said.exit_code == 0, said.output
    by_source = {row["source"]: row for row in csv.DictReader(predicted.open())}
    for row in rows:
        theirs = by_source[row["source"]]
        assert (row["unfamiliar"], row["warnings"]) == (theirs["unfamiliar"], theirs["warnings"]), row["source"]
        assert float(row["ood_score"]) == pytest.approx(float(theirs["ood_score"]), abs=1e-3)
