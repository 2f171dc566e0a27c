"""The models that ship inside the package (src/leukoscope/pretrained), as a user gets them
right after install: they load, stay within the size budget, have their cards, and
`leukoscope analyze` runs on a field with no model flags. Skipped while none is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from leukoscope.cli import app
from leukoscope.pretrained import DEFAULT_CLASSIFIER, DEFAULT_DETECTOR, list_pretrained, pretrained_path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "leukoscope" / "pretrained"
CBC_TESTING = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cbc" / "Testing"
SHIPPED = {p.name for p in PACKAGE_DIR.iterdir() if (p / "bundle.json").exists()} if PACKAGE_DIR.is_dir() else set()
needs_models = pytest.mark.skipif({DEFAULT_DETECTOR, DEFAULT_CLASSIFIER} - SHIPPED != set(),
                                  reason="the shipped models are not installed in this checkout")


@pytest.fixture(autouse=True)
def package_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEUKOSCOPE_PRETRAINED_DIR", raising=False)


def test_shipped_weights_stay_within_30_mb() -> None:
    weights = [f for f in PACKAGE_DIR.rglob("*") if f.suffix in {".safetensors", ".skops"}]
    assert sum(f.stat().st_size for f in weights) <= 30 * 1024 * 1024


@needs_models
def test_each_shipped_model_loads_and_has_its_card() -> None:
    from leukoscope.bundle import load_bundle

    listed = {m.name: m for m in list_pretrained()}
    assert {DEFAULT_DETECTOR, DEFAULT_CLASSIFIER} <= set(listed)
    for name in (DEFAULT_DETECTOR, DEFAULT_CLASSIFIER):
        card = (pretrained_path(name) / "MODEL_CARD.md").read_text()
        for section in ("Training data", "In-domain test", "Left-out sources", "Intended use", "Known failure modes"):
            assert section in card, f"{name}'s card lacks {section!r}"
        model, info = load_bundle(pretrained_path(name))
        assert info.um_per_px or info.task == "classify"
    classifier = listed[DEFAULT_CLASSIFIER]
    assert "blast" in classifier.classes and "erythroblast" in classifier.classes
    assert "research use" in (pretrained_path(DEFAULT_CLASSIFIER) / "MODEL_CARD.md").read_text()


@needs_models
@pytest.mark.skipif(not CBC_TESTING.is_dir(), reason="needs ../shared/datasets/cbc")
def test_analyze_with_no_model_flags_counts_the_white_cell_of_a_real_field(tmp_path: Path) -> None:
    field = CBC_TESTING / "Images" / "BloodImage_00340.jpg"  # one white cell (its annotation)
    result = CliRunner().invoke(app, ["analyze", str(field), "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "smear-detector" in result.output and "wbc-classifier" in result.output
    report = json.loads((tmp_path / "BloodImage_00340.json").read_text())
    assert report["differential"]["total"] == 1
    assert report["scale"]["source"] in {"estimated", "unknown"}
    assert (tmp_path / "BloodImage_00340.annotated.png").exists()


@needs_models
@pytest.mark.skipif(not CBC_TESTING.is_dir(), reason="needs ../shared/datasets/cbc")
def test_the_shipped_detector_records_the_scores_it_gets_with_its_own_settings(tmp_path: Path) -> None:
    """The quality gate and the card read the bundle's recorded test scores: they must be what the
    detector scores as it ships (its inference options included, e.g. roi_sampling_ratio)."""
    from leukoscope.bundle import read_bundle_info

    info = read_bundle_info(pretrained_path(DEFAULT_DETECTOR))
    result = CliRunner().invoke(app, ["evaluate", "--bundle", f"pretrained:{DEFAULT_DETECTOR}", "--data",
                                      str(CBC_TESTING.parent), "--split", "Testing", "--out", str(tmp_path),
                                      "--backend", "torch"])
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "metrics.json").read_text())
    assert measured["n_images"] == info.metrics["n_images"] == 60
    assert measured["map_50"] == pytest.approx(info.metrics["map_50"], abs=1e-4)
    assert measured["map"] == pytest.approx(info.metrics["map"], abs=1e-4)
    for name, ap in info.metrics["ap_50_per_class"].items():
        assert measured["per_class"][name]["ap_50"] == pytest.approx(ap, abs=1e-4)
