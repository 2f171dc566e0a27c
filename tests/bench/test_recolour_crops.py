"""bench/recolour_crops.py: a share of one source's training crops in another's colours; val/test untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.bench.conftest import run_script


def _split(tmp_path: Path) -> dict[str, list[dict]]:
    """Pink pbc crops and lavender taleqani crops, written to ``split.json``."""
    rows: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
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
    return rows


def test_only_the_sources_training_crops_are_recoloured_in_the_donors_colours(tmp_path: Path) -> None:
    rows = _split(tmp_path)
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


def test_both_sources_take_the_others_colours_or_drawn_ones(tmp_path: Path) -> None:
    rows = _split(tmp_path)
    run_script("recolour_crops.py", "--split", tmp_path / "split.json", "--out", tmp_path / "other",
               "--share", "1", "--source", "pbc,taleqani", "--colours-of", "other", "--targets", "1")  # one each
    split = json.loads((tmp_path / "other" / "split.json").read_text())["splits"]
    assert all("/recoloured/" in row["path"] for row in split["train"]) and split["val"] == rows["val"]
    for row in split["train"]:  # each lab's crop now in the other lab's colours
        corner = np.asarray(Image.open(row["path"]))[0, 0].astype(int)
        other = (170, 160, 220) if row["subject"].startswith("pbc-") else (240, 200, 210)
        assert np.abs(corner - other).max() < 25, (row["subject"], corner)
    run = run_script("recolour_crops.py", "--split", tmp_path / "split.json", "--out", tmp_path / "rand",
                     "--share", "1", "--source", "pbc,taleqani", "--colours-of", "randstain", "--seed", "3")
    assert json.loads(run.lines[-1])["recoloured"] == 12
    corners = {tuple(np.asarray(Image.open(row["path"]))[0, 0])
               for row in json.loads((tmp_path / "rand" / "split.json").read_text())["splits"]["train"]}
    assert len(corners) > 6  # a fresh draw per crop, not one of the two labs' colours
