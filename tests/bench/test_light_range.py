"""bench/light_range.py: a bundle's light range from a split of its sources, written into its ood entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from leukoscope.bundle import BundleInfo, read_bundle_info, save_bundle
from leukoscope.light import LightRange
from leukoscope.models import create_model
from leukoscope.preprocessing import Preprocessing
from tests.bench.conftest import run_script


def _bundle(tmp_path: Path, **settings) -> Path:
    bundle = save_bundle(tmp_path / "bundle", create_model("mobilenet_v3_small", 2),
                         BundleInfo("mobilenet_v3_small", ["a", "b"], Preprocessing(32, **settings)))
    payload = json.loads((bundle / "bundle.json").read_text())
    payload["ood"] = {"method": "energy", "thresholds": {"energy": 0.0}}
    (bundle / "bundle.json").write_text(json.dumps(payload, indent=2))
    return bundle


def _split(tmp_path: Path) -> Path:
    rows = []
    for k in range(12):  # warm slides, a dark cell on each
        pixels = np.full((40, 40, 3), (250, 226, 204), np.uint8)
        pixels[15:25, 15:25] = (90, 50, 130)
        Image.fromarray(pixels).save(tmp_path / f"c{k}.png")
        rows.append({"path": str(tmp_path / f"c{k}.png"), "label": "a", "subject": f"s{k}"})
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"format_version": 1, "classes": ["a", "b"], "info": {},
                                "splits": {"train": rows, "val": [], "test": []}}))
    return path


def test_the_range_is_written_into_the_bundle(tmp_path: Path) -> None:
    bundle, split = _bundle(tmp_path), _split(tmp_path)
    dry = run_script("light_range.py", "--bundle", bundle, "--split", split, "--dry-run")
    assert "light" not in read_bundle_info(bundle).ood
    run = run_script("light_range.py", "--bundle", bundle, "--split", split)
    assert run.stdout == dry.stdout
    light = LightRange.from_json(read_bundle_info(bundle).ood["light"])
    assert light.images == 12 and light.contains(np.array([250.0, 226.0, 204.0]))
    assert not light.contains(np.array([200.0, 226.0, 255.0]))  # a bluish camera


def test_a_bundle_that_normalises_each_image_is_refused(tmp_path: Path) -> None:
    run = run_script("light_range.py", "--bundle", _bundle(tmp_path, stain="white_balance"), "--split",
                     _split(tmp_path), expect=2)
    assert "normalises each image itself" in run.stderr
