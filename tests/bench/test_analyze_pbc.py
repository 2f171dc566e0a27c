"""bench/analyze_pbc.py: pbc's images through smear analysis, the centre cell's call against its label."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.conftest import run_script


def test_pbc_images_are_scored_both_ways_for_fields_without_a_scale(zoo_datasets: Path, tmp_path: Path) -> None:
    run = run_script("analyze_pbc.py", "--data", zoo_datasets / "pbc", "--images", "6")
    rows = [json.loads(line) for line in run.lines]
    predicted, rows = rows[:2], rows[2:]
    assert [row["predict"] for row in predicted] == ["whole image (--as-given)", "framed: own scale, else the run's"]
    assert predicted[0]["scale_sources"] == {} and sum(predicted[1]["scale_sources"].values()) == 6
    assert all(row["images"] == 6 and 0.0 <= row["right"] <= 1.0 for row in predicted)
    assert [row["fields without a scale"] for row in rows] == ["run's scale", "detector's scale"]
    for row in rows:
        assert row["images"] == 6 and 0.0 <= row["right"] <= row["cell_found"] <= 1.0
        assert 0.0 <= row["unfamiliar"] <= row["cell_found"]
    assert rows[1]["run_um_per_px"] is None and rows[1]["fields_at_run_scale"] == 0
    assert "run scale:" in run.stderr
    # --split: the pbc images of a classifier's test part (others ignored), labelled by the split
    stems = sorted(p.stem for p in (zoo_datasets / "pbc").glob("*/*.jpg"))[:3]
    split = {"splits": {"test": [{"subject": f"pbc-{stem}", "label": stem.rsplit("_", 1)[0], "path": "x"}
                                 for stem in stems] + [{"subject": "taleqani-x", "label": "blast", "path": "y"}]}}
    (tmp_path / "split.json").write_text(json.dumps(split))
    chosen = run_script("analyze_pbc.py", "--data", zoo_datasets / "pbc", "--split", tmp_path / "split.json")
    assert all(json.loads(line)["images"] == 3 for line in chosen.lines)
    split["splits"]["test"].append({"subject": "pbc-gone", "label": "ig", "path": "z"})
    (tmp_path / "split.json").write_text(json.dumps(split))
    missing = run_script("analyze_pbc.py", "--data", zoo_datasets / "pbc", "--split", tmp_path / "split.json",
                         expect=1)
    assert "1 images of the split are not in" in missing.stderr
