"""Smoke test of bench/export_speed.py on an untrained 32 px bundle (exported by the script itself)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leukoscope.bundle import BundleInfo, save_bundle
from leukoscope.models import create_model
from leukoscope.preprocessing import Preprocessing
from tests.bench.conftest import run_script

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_export_speed(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "bundle", create_model("mobilenet_v3_small", 3),
                         BundleInfo("mobilenet_v3_small", ["a", "b", "c"], Preprocessing(32)))
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(calibration / f"{i}.png")
    run = run_script("export_speed.py", "--bundle", bundle, "--batch", "4", "--repeats", "1", "--rounds", "1",
                     "--threads", "1", "--calibration", calibration)
    measured = json.loads(run.lines[-1])
    assert measured["batch"] == 4 and measured["image_size"] == 32 and measured["threads"] == 1
    speeds = measured["images_per_s"]
    assert speeds["torch"] > 0 and speeds["onnxruntime onnx"] > 0 and speeds["onnxruntime onnx-int8"] > 0
    if "openvino openvino" in speeds:  # where OpenVINO is installed
        assert speeds["openvino openvino-int8"] > 0 and speeds["openvino onnx-int8 (ONNX graph)"] > 0
    assert measured["speedup_vs_torch"]["torch"] == 1.0
    assert run.line_starting("onnxruntime onnx: ") and not (bundle / "model.onnx").exists()  # exported elsewhere
    bad = run_script("export_speed.py", "--bundle", bundle, "--batch", "0", expect=1)
    assert "must be at least 1" in bad.stderr
