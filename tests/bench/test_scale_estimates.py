"""bench/scale_estimates.py: per source, the fields whose red-cell scale estimate is far off the rest."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.conftest import run_script


def test_each_source_gets_a_row_of_estimates_and_misreadings(zoo_datasets: Path) -> None:
    run = run_script("scale_estimates.py", "--data", zoo_datasets, "--fields", "4")
    rows = {row["source"]: row for row in map(json.loads, run.lines)}
    assert set(rows) == {"bccd", "cbc", "all-taleqani", "pbc"}
    for row in rows.values():
        assert row["fields"] == 4 and 0 <= row["estimated"] <= 4
        if row["estimated"]:
            assert row["median_um_per_px"] > 0 and row["off"] == len(row["off_um_per_px"]) <= row["estimated"]
    assert run_script("scale_estimates.py", "--data", zoo_datasets, "--ratio", "1", expect=2).stderr


def test_all_taleqani_by_class_has_a_row_per_class_folder(zoo_datasets: Path) -> None:
    classes = sorted(p.name for p in (zoo_datasets / "all-taleqani").iterdir() if p.is_dir())
    run = run_script("scale_estimates.py", "--data", zoo_datasets, "--fields", "2", "--by-class")
    rows = {row["source"]: row for row in map(json.loads, run.lines)}
    assert set(rows) == {"bccd", "cbc", "pbc", *(f"all-taleqani/{name}" for name in classes)} and len(classes) >= 2
    for name in classes:
        assert rows[f"all-taleqani/{name}"]["fields"] == min(2, len(list((zoo_datasets / "all-taleqani" / name).iterdir())))
