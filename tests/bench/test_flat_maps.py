"""Smoke test of bench/flat_maps.py: the shipped classifier's maps of two generated cells, none flat."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.conftest import run_script
from tests.inference.test_single_cell_framing import cell_photo


def test_flat_maps_reports_each_bundles_contrast(tmp_path: Path) -> None:
    for k, name in enumerate(("lymphocyte", "neutrophil")):
        (tmp_path / "pbc" / name).mkdir(parents=True)
        cell_photo(k).save(tmp_path / "pbc" / name / f"{name}.png")
    run = run_script("flat_maps.py", "--data", tmp_path / "pbc", "--bundle", "pretrained:wbc-classifier",
                     "--per-class", "1")
    result = json.loads(run.lines[-1])
    assert result["cells"] == 2 and result["views"] == 8 and result["threshold"] == 0.05
    assert 0 <= result["min"] <= result["median"] <= result["max"] and result["flat"] in (0, 1, 2)
    assert "no cell photographs" in run_script("flat_maps.py", "--data", tmp_path / "none", "--bundle", "x",
                                               expect=2).stderr
