"""Smoke test of bench/ood.py: train on generated pbc-like cells, score generated stand-ins of the
left-out sources (taleqani fields, C-NMC BMPs, VOC smears with WBC boxes), end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoscope.bundle import read_bundle_info
from leukoscope.data.synthetic_smears import make_synthetic_smears
from tests.bench.conftest import TINY_SMEAR, ScriptRun, run_script

pytestmark = pytest.mark.slow


def _cnmc(root: Path) -> Path:
    """C-NMC's layout: {all,hem}/UID_*.bmp, cells on black."""
    rng = np.random.default_rng(0)
    for label in ("all", "hem"):
        (root / label).mkdir(parents=True)
        for index in range(3):
            pixels = np.zeros((48, 48, 3), np.uint8)
            pixels[12:36, 12:36] = rng.integers(60, 200, 3)
            Image.fromarray(pixels).save(root / label / f"UID_{index}_1_1_{label}.bmp")
    return root


def _table(run: ScriptRun) -> dict[str, list[str]]:
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.lines if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows[1:]}


def test_ood_benchmark(cell_folders: Path, taleqani_fields: Path, tmp_path: Path) -> None:
    make_synthetic_smears(tmp_path / "bccd", 3, TINY_SMEAR)
    run = run_script("ood.py", "--data", cell_folders, "--taleqani", taleqani_fields, "--cnmc", _cnmc(tmp_path / "cnmc"),
                     "--bccd", tmp_path / "bccd", "--model", "abas_cnn", "--image-size", "32", "--epochs", "1",
                     "--batch-size", "16", "--out", tmp_path / "out")
    table = _table(run)
    inside_name = f"{cell_folders.name} test (in-distribution)"
    assert list(table) == [inside_name, "all-taleqani images", "cnmc-mini cells", "BCCD WBC crops"]
    inside = table[inside_name]
    assert inside[1:4] == ["-", "-", "-"]  # no AUROC of the in-distribution cells against themselves
    assert table["cnmc-mini cells"][0] == "6" and int(table["BCCD WBC crops"][0]) >= 3
    for name, row in table.items():
        if name != inside_name:
            assert all(0.0 <= float(value) <= 1.0 for value in row[1:4])  # AUROC mahalanobis, energy, raw
        assert all(value.endswith("%") for value in row[4:7])
    results = json.loads((tmp_path / "out" / "ood-results.json").read_text())
    assert [row["source"] for row in results["rows"]] == list(table)
    assert read_bundle_info(run.last_path).ood["method"] == results["ood"]["method"]


def test_ood_benchmark_takes_a_bundle_and_skips_absent_sources(pbc_run: ScriptRun, cell_folders: Path,
                                                               tmp_path: Path) -> None:
    run = run_script("ood.py", "--bundle", pbc_run.last_path, "--data", cell_folders, "--taleqani", tmp_path / "no",
                     "--cnmc", tmp_path / "no", "--bccd", tmp_path / "no", "--out", tmp_path / "out")
    assert run.line_starting("skipped BCCD WBC crops: ")
    assert list(_table(run)) == [f"{cell_folders.name} test (in-distribution)"]
    assert run.last_path == pbc_run.last_path


def test_ood_benchmark_needs_the_dataset(tmp_path: Path) -> None:
    run = run_script("ood.py", "--data", tmp_path / "absent", expect=1)
    assert "needs the real dataset" in run.stderr
