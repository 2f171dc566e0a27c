"""Fixtures for detection tests: tiny synthetic smears, a detector bundle and a classifier bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leukoscope.data.synthetic import SYNTHETIC_CLASSES
from leukoscope.data.synthetic_smears import SmearSpec, make_synthetic_smears

TINY = SmearSpec(width=160, height=120, cell_size=48, wbc_per_image=(1, 2), rbc_per_image=(3, 6),
                 platelets_per_image=(1, 2), seed=3)
CLASSES = ["WBC", "RBC", "Platelets"]


@pytest.fixture(scope="session")
def smear_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("smears")
    make_synthetic_smears(root, 10, TINY)
    return root


@pytest.fixture(scope="session")
def detector_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained fasterrcnn_abas bundle that keeps every box (score_thresh 0): exercises the
    whole pipeline on real model code; its detections are random, not meaningful."""
    from leukoscope.bundle import BundleInfo, save_bundle
    from leukoscope.models import create_model

    torch.manual_seed(0)
    options = {"input_scale": 0.5, "score_thresh": 0.0, "detections_per_img": 12}
    model = create_model("fasterrcnn_abas", num_classes=len(CLASSES), **options)
    info = BundleInfo("fasterrcnn_abas", list(CLASSES), task="detect", model_options=options, score_threshold=0.0)
    return save_bundle(tmp_path_factory.mktemp("detector") / "bundle", model, info)


@pytest.fixture(scope="session")
def classifier_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained abas_cnn cell classifier bundle over the synthetic cell types."""
    from leukoscope.bundle import BundleInfo, save_bundle
    from leukoscope.preprocessing import Preprocessing
    from leukoscope.models import create_model
    from leukoscope.pixels import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    model = create_model("abas_cnn", num_classes=len(SYNTHETIC_CLASSES))
    info = BundleInfo("abas_cnn", list(SYNTHETIC_CLASSES), Preprocessing(48, list(IMAGENET_MEAN), list(IMAGENET_STD)),
                      uncertain_threshold=0.3)
    return save_bundle(tmp_path_factory.mktemp("classifier") / "bundle", model, info)
