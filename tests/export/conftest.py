"""Trained tiny classifier bundles and their ONNX exports, shared by the export tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from leukoscope.cli import app

runner = CliRunner()
#: A small custom CNN (system A's, whose adaptive pool needs the exact replacement) and a torchvision one.
ARCHITECTURES = ("abas_cnn", "mobilenet_v3_small")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One bundle per architecture: 32 px, one epoch on the synthetic cells (with OOD statistics)."""
    out = tmp_path_factory.mktemp("export-runs")
    bundles = {}
    for name in ARCHITECTURES:
        result = invoke("train", "--data", synthetic_root, "--model", name, "--quiet", f"output_root={out}",
                        f"name={name}", "model.image_size=32", "train.epochs=1", "train.lr=0.003", "train.threads=1")
        assert result.exit_code == 0, result.output
        bundles[name] = Path(result.stdout.strip().splitlines()[-1])
    return bundles


@pytest.fixture(scope="session")
def exported(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("onnx")
    from leukoscope.inference.export import export_onnx

    out = tmp_path_factory.mktemp("exported")
    return {name: export_onnx(bundle, out / name) for name, bundle in trained.items()}


#: Float graphs differ from torch by float rounding only (measured: ~1e-6; OpenVINO held at f32).
PROBABILITY_TOLERANCE = 1e-4


def assert_graph_matches_torch(torch_classifier, graph_classifier, images) -> None:
    """The exported graph's probabilities, top classes and OOD scores on one image and on all of them
    (the batch axis is dynamic), and its logits and embeddings, match the torch model's. (Embeddings,
    not OOD scores, are compared: one-epoch models' Mahalanobis statistics are degenerate, precision
    entries up to ~1e17, so their scores move with float rounding even between two batches on torch.)"""
    for batch in (images[:1], images):
        p_torch, _ = torch_classifier.outputs(batch)
        p_graph, scores = graph_classifier.outputs(batch)
        assert np.abs(p_torch - p_graph).max() < PROBABILITY_TOLERANCE
        assert (p_torch.argmax(1) == p_graph.argmax(1)).all()
        assert scores is not None and scores.shape == (len(batch),)
    pixels = torch.stack([torch_classifier.preprocessing.pixels(image) for image in images])
    logits_torch, embedded_torch = torch_classifier.runtime.outputs(pixels, embeddings=True)
    logits_graph, embedded_graph = graph_classifier.runtime.outputs(pixels, embeddings=True)
    assert np.allclose(logits_graph, logits_torch, atol=1e-4) and np.allclose(embedded_graph, embedded_torch, atol=1e-4)
