"""Smoke test of bench/detector_export_speed.py on an untrained detector (exported by the script itself)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukoscope.bundle import BundleInfo, save_bundle
from leukoscope.data.synthetic_smears import SmearSpec, render_smear
from leukoscope.models import create_model
from tests.bench.conftest import run_script

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_detector_export_speed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    options = {"input_scale": 0.5, "score_thresh": 0.2}
    bundle = save_bundle(tmp_path / "bundle", create_model("fasterrcnn_abas", num_classes=3, **options),
                         BundleInfo("fasterrcnn_abas", ["WBC", "RBC", "Platelets"], task="detect",
                                    model_options=options))
    fields = tmp_path / "fields"
    fields.mkdir()
    for seed in range(2):
        Image.fromarray(render_smear(np.random.default_rng(seed), SmearSpec(seed=seed))[0]).save(fields / f"{seed}.png")
    run = run_script("detector_export_speed.py", "--images", fields, "--bundle", bundle, "--rounds", "1",
                     "--threads", "1")
    measured = json.loads(run.lines[-1])
    assert measured["fields"] == 2 and measured["size"] == "320x240" and measured["threads"] == 1
    assert measured["torch_s_per_field"] > 0 and measured["onnxruntime_s_per_field"] > 0
    assert measured["torch_ratio_to_torch"] == 1.0
    assert run.line_starting("onnxruntime: ") and not (bundle / "model.onnx").exists()  # exported elsewhere
    bad = run_script("detector_export_speed.py", "--images", fields, "--bundle", bundle, "--rounds", "0", expect=1)
    assert "must be at least 1" in bad.stderr
    # --compare: another export of it (here the same float graphs) in the same turns
    from leukoscope.inference.export import export_onnx

    other = export_onnx(bundle, tmp_path / "other")
    compared = json.loads(run_script("detector_export_speed.py", "--images", fields, "--bundle", bundle, "--rounds",
                                     "1", "--threads", "1", "--compare", other).lines[-1])
    assert compared["compare_onnxruntime_s_per_field"] > 0 and "compare_onnxruntime_ratio_to_torch" in compared
    unexported = run_script("detector_export_speed.py", "--images", fields, "--bundle", bundle, "--compare", bundle,
                            "--threads", "1", expect=1)
    assert "--compare: " in unexported.stderr and "has no exported detector graph" in unexported.stderr
