"""Smoke test of bench/archive_speed.py: the local engine and the plain loop on a few tiny fields with
untrained models (the Ray engine's own test starts the Ray cluster that CI pays for once)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leukoscope.bundle import BundleInfo, save_bundle
from leukoscope.models import create_model
from leukoscope.preprocessing import Preprocessing
from tests.bench.conftest import run_script


def test_archive_speed_local(cbc_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    options = {"input_scale": 0.5, "score_thresh": 0.0, "detections_per_img": 12}
    detector = save_bundle(tmp_path / "detector", create_model("fasterrcnn_abas", num_classes=3, **options),
                           BundleInfo("fasterrcnn_abas", ["WBC", "RBC", "Platelets"], task="detect",
                                      model_options=options, score_threshold=0.0))
    classifier = save_bundle(tmp_path / "classifier", create_model("abas_cnn", num_classes=2),
                             BundleInfo("abas_cnn", ["blast", "lymphocyte"], Preprocessing(32)))
    run = run_script("archive_speed.py", "--data", cbc_folder / "Testing" / "Images", "--fields", "3",
                     "--repeats", "1", "--engines", "local", "--detector", detector, "--classifier", classifier,
                     "--backend", "auto")
    measured = json.loads(run.lines[-1])
    assert measured["backend"] == "auto"
    assert measured["fields"] == 3 and set(measured["medians"]) == {"local engine (per-field files)",
                                                                    "plain loop (no files)"}
    assert all(rates["end_to_end"] > 0 and rates["marginal"] > 0 for rates in measured["medians"].values())
    bad = run_script("archive_speed.py", "--engines", "spark", expect=2)
    assert "unknown ['spark']" in bad.stderr
