"""The out-of-distribution gate of smear analysis: cells unlike the classifier's training
images carry their score and flag, and a field (or slide) with more than 30% of them gets
"review: images unlike the training data" instead of a leukemia flag, in every output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoscope.evaluation.ood import OodStats
from leukoscope.inference.differential import LEUKEMIA_WORDING
from leukoscope.inference.predictor import CellClassifier
from leukoscope.inference.quality import UNFAMILIAR_WORDING, unfamiliar_warning
from leukoscope.inference.smear import SmearAnalyzer
from tests.detection.smear_fakes import VERIFIED, FixedDetector, constant_classifier, grid_boxes

FIELD = Image.new("RGB", (640, 480), (230, 210, 220))
CLASSES = ["blast", "lymphocyte"]
#: The constant model's logits are (4, -4): energy -logsumexp = -4.000335.
ENERGY = -np.logaddexp(4.0, -4.0)


def blast_classifier(threshold: float | None) -> CellClassifier:
    """Calls every cell a blast; with ``threshold`` the energy score flags every cell (below the
    constant model's energy) or none (above it)."""
    classifier = constant_classifier(CLASSES, "blast")
    classifier.ood = None if threshold is None else OodStats("energy", {"energy": threshold})
    return classifier


def has_wording(texts: list[str]) -> bool:
    return any(UNFAMILIAR_WORDING in text.lower() for text in texts)


def test_the_share_rule() -> None:
    assert unfamiliar_warning([]) is None
    assert unfamiliar_warning([True] * 3 + [False] * 7) is None  # 30% is not more than 30%
    warning = unfamiliar_warning([True] * 4 + [False] * 6)
    assert warning.lower().startswith(UNFAMILIAR_WORDING) and "4 of 10 cells classified (40%" in warning
    assert unfamiliar_warning([True]) and not unfamiliar_warning([True, False], max_share=0.5)
    # cells of classes that are not white cells are counted too, and the words say so (beside a white-cell total)
    from leukoscope.inference.quality import classified_unit

    unit = classified_unit(["blast", "erythroblast", "lymphocyte", "platelet"])
    # "erythroblast and platelet included" read as "such cells were found", on fields with neither
    assert "4 of 10 classified cells, counting any called erythroblast or platelet (40%" in unfamiliar_warning(
        [True] * 4 + [False] * 6, unit=unit)
    assert classified_unit(["blast", "lymphocyte"]) == "cells classified"


def test_a_field_of_unfamiliar_cells_is_flagged_for_review_not_leukemia() -> None:
    boxes = grid_boxes(120)
    result = SmearAnalyzer(FixedDetector(boxes, metrics=VERIFIED), blast_classifier(ENERGY - 1)).analyze(FIELD)
    assert all(cell.unfamiliar and cell.ood_score == pytest.approx(ENERGY) for cell in result.cells)
    d = result.differential
    assert d.blast_percentage == 100.0 and d.blast_percentage_meaningful  # the count is there ...
    assert not d.acute_leukemia_flag and not any(LEUKEMIA_WORDING in flag for flag in d.flags)  # ... no flag
    assert len(result.warnings) == 1 and has_wording(result.warnings) and "120 of 120" in result.warnings[0]
    assert d.flags[0] == f"WARNING: {result.warnings[0]}"
    # control: the same cells, familiar, raise the leukemia flag; and so do cells of a bundle without statistics
    for threshold in (ENERGY + 1, None):
        control = SmearAnalyzer(FixedDetector(boxes, metrics=VERIFIED), blast_classifier(threshold)).analyze(FIELD)
        assert control.warnings == [] and control.differential.acute_leukemia_flag
        assert not any(cell.unfamiliar for cell in control.cells)
    assert all(cell.ood_score is None for cell in control.cells)
    with pytest.raises(ValueError, match="unfamiliar_share"):
        SmearAnalyzer(FixedDetector(boxes, metrics=VERIFIED), unfamiliar_share=1.0)


def test_every_output_says_review(tmp_path: Path) -> None:
    paths = []
    for name in ("a.png", "b.png"):
        FIELD.save(tmp_path / name)
        paths.append(tmp_path / name)
    analyzer = SmearAnalyzer(FixedDetector(grid_boxes(60), metrics=VERIFIED), blast_classifier(ENERGY - 1))
    summary = analyzer.analyze_paths(paths, tmp_path / "out")
    pooled = summary.pooled
    assert pooled.total == 120 and not pooled.acute_leukemia_flag and has_wording(pooled.warnings)
    assert "120 of 120" in pooled.warnings[0]
    out = tmp_path / "out"
    field = json.loads((out / "a.json").read_text())
    assert has_wording(field["warnings"]) and has_wording(field["differential"]["flags"])
    assert all(cell["unfamiliar"] is True and cell["ood_score"] == pytest.approx(ENERGY, abs=1e-4)
               for cell in field["cells"])
    cells = list(csv.DictReader(open(out / "a.cells.csv")))
    assert len(cells) == 60 and {row["unfamiliar"] for row in cells} == {"True"}
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert all(has_wording([row["flags"]]) for row in rows) and rows[-1]["image"] == "TOTAL"
    assert has_wording(json.loads((out / "summary.json").read_text())["warnings"])
    for path in out.iterdir():
        if path.suffix in (".json", ".csv"):
            assert LEUKEMIA_WORDING not in path.read_text()
    banner = np.asarray(Image.open(out / "a.annotated.png").convert("RGB"))[:40]
    assert (banner == (200, 0, 0)).all(axis=-1).sum() > 500  # the warning is drawn, white on red


def test_one_unusual_field_does_not_stop_the_slide_but_carries_its_own_warning(tmp_path: Path) -> None:
    """The slide's rule is the fields' rule on all its cells: 20 unfamiliar of 120 is 17%."""
    familiar, unusual = (SmearAnalyzer(FixedDetector(grid_boxes(n), metrics=VERIFIED), blast_classifier(t))
                         for n, t in ((100, ENERGY + 1), (20, ENERGY - 1)))
    results = [familiar.analyze(FIELD, "a.png"), unusual.analyze(FIELD, "b.png")]
    from leukoscope.inference.smear_output import FolderSummary

    summary = FolderSummary(results, familiar.rules, ["WBC"])
    assert summary.warnings == [] and summary.pooled.acute_leukemia_flag
    assert has_wording(results[1].warnings) and not results[0].warnings
