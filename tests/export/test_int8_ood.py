"""An int8 graph's out-of-distribution flag: its thresholds are carried over from the float model's scores.

int8 moves the embeddings, so the float model's threshold would flag another share of images on the int8
graph (the shipped classifier's in-domain test cells: 13% instead of 4%; docs/benchmarks.md, "The flag on
an int8 graph"). The shipped classifier is used here because a one-epoch model's statistics are degenerate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoscope.bundle import BundleError, model_identity, ood_digest, read_bundle_info
from leukoscope.data.synthetic import SyntheticSpec, make_synthetic_dataset
from leukoscope.inference.predictor import CellClassifier
from leukoscope.pretrained import resolve_bundle

pytest.importorskip("onnxruntime")

#: How far the int8 graph's flagged share may stay from the float model's with the carried threshold.
SHARE_TOLERANCE = 0.1


def _images(root: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(root.rglob("*.png"))]


@pytest.fixture(scope="module")
def int8_with_median_threshold(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The shipped classifier with its Mahalanobis threshold at the median float score of the check cells
    (every generated cell is unfamiliar to it, so its own threshold flags them all and shows nothing),
    exported as int8 calibrated on other generated cells; (float bundle, int8 bundle, float scores)."""
    from leukoscope.inference.export import export_bundle

    root = tmp_path_factory.mktemp("int8-ood")
    source = Path(shutil.copytree(resolve_bundle("pretrained:wbc-classifier"), root / "float"))
    _, scores = CellClassifier.from_bundle(source).outputs(_images(synthetic_root))
    payload = json.loads((source / "bundle.json").read_text())
    payload["ood"]["thresholds"]["mahalanobis"] = float(np.median(scores))
    (source / "bundle.json").write_text(json.dumps(payload))
    calibration = make_synthetic_dataset(root / "calibration", SyntheticSpec(image_size=64, images_per_class=8, seed=2))
    return source, export_bundle(source, root / "int8", "onnx", calibration=calibration), scores


def test_an_int8_graph_flags_the_share_the_float_model_flags(int8_with_median_threshold, synthetic_root: Path) -> None:
    source, int8, float_scores = int8_with_median_threshold
    float_threshold = read_bundle_info(source).ood["thresholds"]["mahalanobis"]
    record = read_bundle_info(int8).export
    fit = record["ood_threshold_fit"]
    assert record["calibration_images"] == 32 and set(fit) == {"mahalanobis", "energy"}
    assert fit["mahalanobis"]["slope"] > 0 and fit["mahalanobis"]["correlation"] > 0.9
    assert record["ood_sha256"] == ood_digest(source, read_bundle_info(source))
    graph = CellClassifier.from_bundle(int8, backend="onnxruntime", threads=1)
    assert graph.ood.threshold == pytest.approx(record["ood_thresholds"]["mahalanobis"])
    assert graph.ood.threshold != pytest.approx(float_threshold)
    # torch runs the float weights the bundle keeps: the float threshold
    assert CellClassifier.from_bundle(int8).ood.threshold == pytest.approx(float_threshold)
    # what the graph's results depend on names the carried thresholds; torch's does not
    assert model_identity(int8, "onnxruntime")["ood_thresholds"] == record["ood_thresholds"]
    assert "ood_thresholds" not in model_identity(int8, "torch")
    _, int8_scores = graph.outputs(_images(synthetic_root))
    float_share = float(np.mean(float_scores > float_threshold))
    carried, uncarried = (float(np.mean(int8_scores > t)) for t in (graph.ood.threshold, float_threshold))
    assert abs(carried - float_share) <= SHARE_TOLERANCE
    assert abs(carried - float_share) < abs(uncarried - float_share)  # the float threshold is off on int8


def test_statistics_refitted_behind_an_int8_graph_are_refused_on_the_graph(int8_with_median_threshold,
                                                                           tmp_path: Path) -> None:
    _, int8, _ = int8_with_median_threshold
    bundle = Path(shutil.copytree(int8, tmp_path / "refitted"))
    payload = json.loads((bundle / "bundle.json").read_text())
    payload["ood"]["thresholds"]["mahalanobis"] += 1.0  # what calibrate-ood's refit does to the entry
    (bundle / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match="OOD statistics have been refitted.*run `leukoscope export`"):
        CellClassifier.from_bundle(bundle, backend="onnxruntime")
    assert CellClassifier.from_bundle(bundle).ood.threshold == pytest.approx(
        payload["ood"]["thresholds"]["mahalanobis"])


def test_an_int8_graph_without_thresholds_for_its_statistics_is_refused(int8_with_median_threshold,
                                                                        tmp_path: Path) -> None:
    """An int8 export of before the thresholds were carried over (or statistics added since) would flag
    with the float thresholds: three times the cells it was set for."""
    _, int8, _ = int8_with_median_threshold
    bundle = Path(shutil.copytree(int8, tmp_path / "old"))
    payload = json.loads((bundle / "bundle.json").read_text())
    for key in ("ood_thresholds", "ood_threshold_fit", "ood_sha256"):
        payload["export"].pop(key)
    (bundle / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match="no OOD thresholds of its own.*run `leukoscope export`"):
        CellClassifier.from_bundle(bundle, backend="onnxruntime")
    assert CellClassifier.from_bundle(bundle).ood is not None  # torch runs the float weights, as before


def test_the_service_answers_a_single_cell_with_the_graph_it_records(int8_with_median_threshold, synthetic_root: Path,
                                                                     tmp_path: Path) -> None:
    """A one-view bundle on an exported graph, Grad-CAM on: the service's single-cell answer came from the torch
    model's Grad-CAM pass, judged by the int8 graph's flag thresholds and recorded as the graph's."""
    from leukoscope.service.analysis import Analyzer

    _, int8, _ = int8_with_median_threshold
    bundle = Path(shutil.copytree(int8, tmp_path / "one-view"))
    payload = json.loads((bundle / "bundle.json").read_text())
    payload["preprocessing"]["views"] = 1
    (bundle / "bundle.json").write_text(json.dumps(payload))
    image = _images(synthetic_root)[0]
    graph = CellClassifier.from_bundle(bundle, backend="onnxruntime", threads=1).predict_images([image])[0]
    on_torch = CellClassifier.from_bundle(bundle).predict_images([image])[0]
    assert abs(graph.ood_score - on_torch.ood_score) > 1e-3  # int8 scores differ: the check below can tell them apart
    analyzer = Analyzer.from_bundles(bundle, backend="onnxruntime", backend_threads=1, threads=1, gradcam=True)
    try:
        cell = analyzer.analyse_cell(image).cells[0]
        assert analyzer.models["classifier"]["precision"] == "int8"
    finally:
        analyzer.close()
    assert cell.overlay is not None  # still explained, by the torch model's map of the graph's class
    assert cell.prediction.ood_score == pytest.approx(graph.ood_score)
    assert cell.prediction.probabilities == pytest.approx(graph.probabilities)


def test_int8_weights_keep_a_7_bit_range(int8_with_median_threshold) -> None:
    """Full-range int8 weights overflow onnxruntime's int16 sums on CPUs without VNNI (the graph's OOD scores
    correlated 0.53 with the float model's on one; docs/benchmarks.md, "int8 on a CPU without VNNI")."""
    import onnx
    from onnx import numpy_helper

    _, int8, _ = int8_with_median_threshold
    graph = onnx.load(str(int8 / read_bundle_info(int8).export["file"]))
    weights = [numpy_helper.to_array(t) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64


def test_a_full_range_int8_graph_is_warned_of_on_a_cpu_without_vnni(int8_with_median_threshold, tmp_path: Path,
                                                                    monkeypatch, caplog) -> None:
    """An int8 bundle exported before the 7-bit range still loads, with a warning where its sums overflow."""
    from leukoscope.inference import int8_cpu

    _, int8, _ = int8_with_median_threshold
    assert read_bundle_info(int8).export["weight_bits"] == 7
    old = Path(shutil.copytree(int8, tmp_path / "full-range"))
    payload = json.loads((old / "bundle.json").read_text())
    payload["export"].pop("weight_bits")  # as every int8 export before 2026-12-07 wrote it
    (old / "bundle.json").write_text(json.dumps(payload))
    for lacks_vnni, bundle, warned in ((True, old, True), (False, old, False), (True, int8, False)):
        monkeypatch.setattr(int8_cpu, "cpu_lacks_vnni", lambda lacks=lacks_vnni: lacks)
        caplog.clear()
        with caplog.at_level("WARNING", logger="leukoscope.inference.int8_cpu"):
            CellClassifier.from_bundle(bundle, backend="onnxruntime", threads=1)
        said = [r.getMessage() for r in caplog.records if "full 8-bit range" in r.getMessage()]
        assert len(said) == warned, (lacks_vnni, bundle.name, said)
        assert all(str(old) in message and "leukoscope export --int8" in message for message in said)
    # an archive resumed on the re-exported graph does not take the full-range one's results for its own
    assert model_identity(old, "onnxruntime") != model_identity(int8, "onnxruntime")
    assert model_identity(old, "torch") == model_identity(int8, "torch")


def test_vnni_is_read_from_the_cpus_flags(tmp_path: Path, monkeypatch) -> None:
    from leukoscope.inference import int8_cpu

    monkeypatch.setattr(int8_cpu.platform, "machine", lambda: "x86_64")
    lacks = int8_cpu.cpu_lacks_vnni.__wrapped__
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    vnni = tmp_path / "vnni"
    vnni.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni\n")
    assert lacks(avx2) is True and lacks(vnni) is False
    assert lacks(tmp_path / "missing") is False  # flags unknown: no warning on a guess
    monkeypatch.setattr(int8_cpu.platform, "machine", lambda: "aarch64")
    assert lacks(avx2) is False
    record = {"precision": "int8"}
    assert "full 8-bit range" in int8_cpu.full_range_warning("b", record, lacks_vnni=True)
    assert int8_cpu.full_range_warning("b", {**record, "weight_bits": 7}, lacks_vnni=True) is None
    assert int8_cpu.full_range_warning("b", {"precision": "float32"}, lacks_vnni=True) is None
    assert int8_cpu.full_range_warning("b", record, lacks_vnni=False) is None
    assert "full 8-bit range" in int8_cpu.full_range_warning("b", {**record, "weight_bits": None}, lacks_vnni=True)
