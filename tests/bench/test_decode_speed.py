"""Smoke test of bench/decode_speed.py on a small generated field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.bench.conftest import run_script


def test_decode_speed_times_each_way_of_loading(tmp_path: Path) -> None:
    field = tmp_path / "field.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(field)
    run = run_script("decode_speed.py", "--image", field, "--size", "120x90", "--repeats", "2")
    measured = json.loads(run.lines[-1])
    assert measured["size"] == [120, 90] and measured["repeats"] == 2
    assert set(measured["median_ms"]) == {"jpeg", "png", "png_without_row_check", "png_row_check_alone"}
    assert all(value > 0 for value in measured["median_ms"].values())
    missing = run_script("decode_speed.py", "--image", tmp_path / "none.jpg", expect=2)
    assert "is not a file" in missing.stderr
    assert "WIDTHxHEIGHT" in run_script("decode_speed.py", "--image", field, "--size", "big", expect=2).stderr
    assert json.loads(run_script("decode_speed.py", "--image", field, "--size", "as-is", "--repeats", "1")
                      .lines[-1])["size"] == [80, 60]
