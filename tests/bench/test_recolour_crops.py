"""bench/recolour_crops.py: a share of one source's training crops in another's colours; val/test untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.bench.conftest import run_script


def test_only_the_sources_training_crops_are_recoloured_in_the_donors_colours(tmp_path: Path) -> None:
    rows = {"train": [], "val": [], "test": []}
    for part, count in (("train", 6), ("val", 2), ("test", 2)):
        for source, colour in (("pbc", (240, 200, 210)), ("taleqani", (170, 160, 220))):
            for k in range(count):
                path = tmp_path / "crops" / f"{source}-{part}-{k}.png"
                path.parent.mkdir(exist_ok=True)
                pixels = np.full((24, 24, 3), colour, np.uint8)
                pixels[8:16, 8:16] = (90, 40, 120) if source == "pbc" else (60, 50, 150)  # a "nucleus"
                Image.fromarray(pixels).save(path)
                rows[part].append({"path": str(path), "label": "a" if k % 2 else "b",
                                   "subject": f"{source}-{part}{k}", "group": len(rows[part])})
    (tmp_path / "split.json").write_text(json.dumps({"format_version": 1, "classes": ["a", "b"], "info": {},
                                                     "splits": rows}))
    run = run_script("recolour_crops.py", "--split", tmp_path / "split.json", "--out", tmp_path / "out",
                     "--share", "1")
    assert json.loads(run.lines[-1])["recoloured"] == 6
    split = json.loads((tmp_path / "out" / "split.json").read_text())["splits"]
    moved = [row for row in split["train"] if "/recoloured/" in row["path"]]
    assert len(moved) == 6 and all(row["subject"].startswith("pbc-") for row in moved)
    for part in ("val", "test"):  # untouched, so in-domain scores stay comparable
        assert split[part] == rows[part]
    background = np.asarray(Image.open(moved[0]["path"]))[0, 0].astype(int)
    assert np.abs(background - (170, 160, 220)).max() < 25  # the pink pbc crop now in the lavender lab's colours
    manifest = (tmp_path / "out" / "train.csv").read_text().splitlines()
    assert manifest[0] == "path,label,subject" and len(manifest) == 1 + 20
    refused = run_script("recolour_crops.py", "--split", tmp_path / "split.json", "--out", tmp_path / "x",
                         "--colours-of", "bccd", expect=2)
    assert "needs crops of both" in refused.stderr
