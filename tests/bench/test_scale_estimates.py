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
