from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukoscope.bundle import (BUNDLE_FORMAT_VERSION, OOD_FILE, BundleError, BundleInfo, load_bundle, read_bundle_info,
                               record_metrics, save_bundle, save_ood)
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


def test_recorded_scores_are_replaced_and_the_rest_of_the_bundle_kept(tmp_path: Path) -> None:
    directory = _bundle(tmp_path, metrics={"map_50": 0.9, "best_epoch": 12})
    weights = (directory / "model.safetensors").read_bytes()
    before = read_bundle_info(directory)
    info = record_metrics(directory, {"map_50": 0.8, "map": 0.5})
    again = read_bundle_info(directory)
    assert again.metrics == info.metrics == {"map_50": 0.8, "map": 0.5, "best_epoch": 12}
    assert again.classes == before.classes and again.preprocessing == before.preprocessing
    assert again.format_version == before.format_version
    assert (directory / "model.safetensors").read_bytes() == weights
    assert not list(directory.glob("*.tmp"))


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


@pytest.mark.parametrize(("key", "value", "said"), [
    ("temperature", 0, "temperature must be a number above 0, got 0"),
    ("temperature", "0.8", "temperature must be a number above 0, got '0.8'"),
    ("uncertain_threshold", "0.5", "uncertain_threshold must be a number in \\[0, 1\\]"),
    ("uncertain_threshold", 1.5, "uncertain_threshold must be a number in \\[0, 1\\], got 1.5"),
    ("ood", [], "ood must be a mapping, got list"), ("export", "model.onnx", "export must be a mapping, got str")])
def test_a_hand_edited_bundle_json_is_refused_in_one_line(tmp_path: Path, key: str, value, said: str) -> None:
    """A temperature of 0 gave NaN confidences; quoted numbers and a wrong kind of entry, tracebacks later."""
    directory = _bundle(tmp_path)
    payload = json.loads((directory / "bundle.json").read_text())
    payload[key] = value
    (directory / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match=said):
        read_bundle_info(directory)


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


# ------------------------------------------------------------------ out-of-distribution statistics
def _ood_parts(dimensions: int = 1024, threshold: float = 1e9) -> tuple[dict, dict]:
    """OOD statistics for mobilenet_v3_small's 1024-wide embedding (huge threshold: nothing flagged)."""
    from leukoscope.evaluation.ood import OodStats

    rng = np.random.default_rng(0)
    stats = OodStats("mahalanobis", {"mahalanobis": threshold, "energy": 0.0}, [rng.normal(size=(3, dimensions))],
                     [np.eye(dimensions)], details={"fit_images": 30})
    return stats.to_parts()


def test_a_bundle_without_ood_statistics_is_format_2_as_before(tmp_path: Path) -> None:
    directory = _bundle(tmp_path)
    payload = json.loads((directory / "bundle.json").read_text())
    assert payload["format_version"] == 2 and "ood" not in payload  # what leukoscope before format 3 reads
    assert not (directory / OOD_FILE).exists()
    classifier = CellClassifier.from_bundle(directory)
    assert classifier.ood is None
    prediction = classifier.predict_images([Image.new("RGB", (40, 40), (200, 100, 150))])[0]
    assert prediction.ood_score is None and not prediction.unfamiliar
    row = prediction.as_row()
    assert row["ood_score"] is None and row["unfamiliar"] is None  # not checked (null in JSON), not "familiar"


def test_ood_statistics_round_trip_and_make_format_3(tmp_path: Path) -> None:
    entry, arrays = _ood_parts()
    torch.manual_seed(0)
    directory = save_bundle(tmp_path / "b", create_model("mobilenet_v3_small", 3), BundleInfo(
        "mobilenet_v3_small", ["a", "b", "c"], Preprocessing(32, [0.5] * 3, [0.25] * 3), ood=entry),
        ood_arrays=arrays)
    payload = json.loads((directory / "bundle.json").read_text())
    assert payload["format_version"] == 3 and payload["ood"]["method"] == "mahalanobis"
    assert payload["ood"]["file"] == OOD_FILE and (directory / OOD_FILE).is_file()
    classifier = CellClassifier.from_bundle(directory)
    assert classifier.ood.threshold == 1e9 and classifier.ood.details["fit_images"] == 30
    assert np.allclose(classifier.ood.means[0], arrays["means"]) and classifier.ood.precisions[0].shape == (1024, 1024)
    image = Image.new("RGB", (40, 40), (200, 100, 150))
    prediction = classifier.predict_images([image])[0]
    assert prediction.ood_score is not None and prediction.ood_score > 0 and not prediction.unfamiliar
    classifier.ood.thresholds["mahalanobis"] = 0.0  # every image now lies beyond the threshold
    assert classifier.predict_images([image])[0].unfamiliar
    # the probabilities do not change with the OOD statistics
    plain = CellClassifier(*load_bundle(directory))
    assert plain.probabilities([image]) == pytest.approx(classifier.probabilities([image]))
    with pytest.raises(ValueError, match="needs its arrays"):
        save_bundle(tmp_path / "c", create_model("mobilenet_v3_small", 3), BundleInfo(
            "mobilenet_v3_small", ["a", "b", "c"], Preprocessing(32), ood=entry))


def test_ood_statistics_are_added_to_and_dropped_from_an_existing_bundle(tmp_path: Path) -> None:
    directory = _bundle(tmp_path)
    info = save_ood(directory, *_ood_parts())
    assert info.format_version == 3 and read_bundle_info(directory).ood["file"] == OOD_FILE
    assert CellClassifier.from_bundle(directory).ood is not None
    # the file named by bundle.json is required
    (directory / OOD_FILE).unlink()
    with pytest.raises(BundleError, match=f"{OOD_FILE} is missing"):
        CellClassifier.from_bundle(directory)
    (directory / OOD_FILE).write_bytes(b"\x00" * 8)
    with pytest.raises(BundleError, match="cannot read the OOD statistics"):
        CellClassifier.from_bundle(directory)
    # a new model saved into the folder without statistics leaves no stale file behind
    _bundle(tmp_path)
    assert not (directory / OOD_FILE).exists() and read_bundle_info(directory).format_version == 2


def test_a_format_3_bundle_is_refused_clearly_by_a_reader_of_format_2(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What older leukoscope (formats 1-2) says about a bundle with OOD statistics: upgrade."""
    import leukoscope.bundle as bundle_module

    directory = _bundle(tmp_path)
    save_ood(directory, *_ood_parts())
    monkeypatch.setattr(bundle_module, "READABLE_VERSIONS", (1, 2))
    monkeypatch.setattr(bundle_module, "BUNDLE_FORMAT_VERSION", 2)
    with pytest.raises(BundleError, match="format 3 is not supported.*upgrade leukoscope"):
        read_bundle_info(directory)


def test_a_shipped_classifier_with_ood_statistics_loads_by_its_pretrained_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from leukoscope.pretrained import ENV_VARIABLE

    directory = _bundle(tmp_path / "shipped", "wbc-classifier")
    save_ood(directory, *_ood_parts())
    monkeypatch.setenv(ENV_VARIABLE, str(tmp_path / "shipped"))
    monkeypatch.chdir(tmp_path)  # no ./pretrained:wbc-classifier folder to be found by accident
    classifier = CellClassifier.from_bundle("pretrained:wbc-classifier")
    assert classifier.ood is not None and classifier.ood.details["fit_images"] == 30


def test_input_style_is_kept_and_older_bundles_read_as_colour(tmp_path: Path) -> None:
    styled = save_bundle(tmp_path / "gray", create_model("mobilenet_v3_small", 3), BundleInfo(
        "mobilenet_v3_small", ["a", "b", "c"], Preprocessing(32, colour="gray", standardize=True)))
    preprocessing = load_bundle(styled)[1].preprocessing
    assert (preprocessing.colour, preprocessing.standardize) == ("gray", True)
    # Only a bundle with an input style says format 5; others keep their format and JSON, so
    # leukoscope before format 5 reads them, and asks for an upgrade on a styled one.
    assert json.loads((styled / "bundle.json").read_text())["format_version"] == 5
    plain = _bundle(tmp_path, "plain")
    payload = json.loads((plain / "bundle.json").read_text())
    assert payload["format_version"] == 2
    assert not {"colour", "standardize"} & set(payload["preprocessing"])
    preprocessing = load_bundle(plain)[1].preprocessing
    assert (preprocessing.colour, preprocessing.standardize) == ("rgb", False)
    payload["preprocessing"]["colour"] = "sepia"
    (plain / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match="unknown colour 'sepia'"):
        load_bundle(plain)
