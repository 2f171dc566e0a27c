from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from leukoscope.bundle import BUNDLE_FORMAT_VERSION, BundleError, BundleInfo, load_bundle, read_bundle_info, save_bundle
from leukoscope.inference.detector import CellDetector
from leukoscope.inference.predictor import CellClassifier
from leukoscope.models import create_model
from leukoscope.preprocessing import Preprocessing


def _bundle(tmp_path: Path, name: str = "b", **info) -> Path:
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", 3)
    return save_bundle(tmp_path / name, model, BundleInfo(
        "mobilenet_v3_small", ["a", "b", "c"], Preprocessing(32, [0.5] * 3, [0.25] * 3), **info))


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    directory = _bundle(tmp_path)
    model, info = load_bundle(directory)
    torch.manual_seed(0)
    original = create_model("mobilenet_v3_small", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), original(x), atol=1e-6)
    assert info.classes == ["a", "b", "c"] and info.provenance["torch"] == torch.__version__


def test_missing_and_broken_bundles_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not a leukoscope bundle"):
        load_bundle(tmp_path / "empty")
    directory = _bundle(tmp_path)
    (directory / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(BundleError, match="cannot read weights"):
        load_bundle(directory)
    payload = json.loads((directory / "bundle.json").read_text())
    payload["format_version"] = 99
    (directory / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match="format 99"):
        load_bundle(directory)


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    directory = _bundle(tmp_path)
    payload = json.loads((directory / "bundle.json").read_text())
    payload["model_name"] = "resnet18"
    (directory / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match="do not match resnet18"):
        load_bundle(directory)


def test_classifier_threshold_and_temperature(tmp_path: Path) -> None:
    directory = _bundle(tmp_path, temperature=1e-3, uncertain_threshold=0.9)
    sharp = CellClassifier.from_bundle(directory)
    image = Image.new("RGB", (50, 40), (120, 60, 150))
    p = sharp.predict_images([image])[0]
    # a tiny temperature makes the softmax nearly one-hot, so the threshold is passed
    assert p.confidence > 0.99 and not p.uncertain and p.label == p.top_class
    # a huge temperature flattens the same logits towards uniform: below 0.9, same argmax
    flat = CellClassifier.from_bundle(_bundle(tmp_path, "flat", temperature=1e3, uncertain_threshold=0.9))
    q = flat.predict_images([image])[0]
    assert q.confidence == pytest.approx(1 / 3, abs=0.01)
    assert q.label == "uncertain" and q.top_class == p.top_class
    with pytest.raises(ValueError, match="threshold"):
        CellClassifier.from_bundle(directory, uncertain_threshold=1.5)


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bundles-v1"


def _with_version_1_json(directory: Path, kind: str) -> Path:
    """A bundle folder whose bundle.json is one leukoscope 0.1 wrote before the one-pipeline
    layout (format 1: no task for a classifier, ``detection`` for a detector; kept in
    tests/fixtures), beside weights of the same architecture."""
    (directory / "bundle.json").write_text((FIXTURES / f"{kind}.json").read_text())
    return directory


def test_version_1_bundles_still_load(tmp_path: Path) -> None:
    classifier = _with_version_1_json(_bundle(tmp_path, "old-classifier"), "classifier")
    assert json.loads((classifier / "bundle.json").read_text())["format_version"] == 1
    model, info = load_bundle(classifier, task="classify")
    assert info.task == "classify" and info.format_version == BUNDLE_FORMAT_VERSION
    assert info.temperature == 1.5 and info.metrics == {"accuracy": 0.9}
    assert CellClassifier(model, info).classes == ["a", "b", "c"]
    torch.manual_seed(0)
    options = {"input_scale": 0.5, "detections_per_img": 5}
    detector = save_bundle(tmp_path / "old-detector", create_model("fasterrcnn_abas", 3, **options),
                           BundleInfo("fasterrcnn_abas", ["WBC", "RBC", "Platelets"], task="detect",
                                      model_options=options))
    _with_version_1_json(detector, "detector")
    loaded = CellDetector.from_bundle(detector)
    assert loaded.classes == ["WBC", "RBC", "Platelets"] and loaded.score_threshold == 0.4
    assert loaded.info.task == "detect" and loaded.info.input_scale == 0.5


def test_a_newer_format_names_its_version(tmp_path: Path) -> None:
    directory = _bundle(tmp_path)
    payload = json.loads((directory / "bundle.json").read_text())
    payload["format_version"] = BUNDLE_FORMAT_VERSION + 1
    (directory / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match=f"format {BUNDLE_FORMAT_VERSION + 1} is not supported.*upgrade leukoscope"):
        read_bundle_info(directory)


def test_a_bundle_of_another_task_is_named(tmp_path: Path) -> None:
    classifier = _bundle(tmp_path)
    with pytest.raises(BundleError, match="is a cell classifier.*needs a cell detector bundle"):
        CellDetector.from_bundle(classifier)
    detector = save_bundle(tmp_path / "detector", create_model("fasterrcnn_abas", 3, input_scale=0.5),
                           BundleInfo("fasterrcnn_abas", ["WBC", "RBC", "Platelets"], task="detect"))
    with pytest.raises(BundleError, match="is a cell detector.*needs a cell classifier bundle"):
        CellClassifier.from_bundle(detector)
    json_text = (detector / "bundle.json").read_text()
    assert '"preprocessing"' not in json_text and '"task": "detect"' in json_text
