"""Trained tiny classifier bundles and their ONNX exports, shared by the export tests."""

from __future__ import annotations

from pathlib import Path

import pytest
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
