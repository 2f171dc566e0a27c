"""Exported graphs agree with their torch models, and the runtimes behind CellClassifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukoscope.bundle import (ONNX_FILE, BundleError, load_bundle, load_ood_arrays, read_bundle_info,
                               save_bundle)
from leukoscope.inference import runtime
from leukoscope.inference.export import check_exportable, export_onnx
from leukoscope.inference.export_check import compare_backends
from leukoscope.inference.predictor import CellClassifier
from tests.export.conftest import ARCHITECTURES, PROBABILITY_TOLERANCE, assert_graph_matches_torch

pytest.importorskip("onnxruntime")


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_exported_graph_agrees_with_torch(name: str, exported: dict[str, Path], synthetic_root: Path) -> None:
    bundle = exported[name]
    torch_classifier = CellClassifier.from_bundle(bundle, backend="torch")
    onnx_classifier = CellClassifier.from_bundle(bundle, backend="onnxruntime", threads=1)
    assert (torch_classifier.backend, onnx_classifier.backend) == ("torch", "onnxruntime")
    assert onnx_classifier.model is None and onnx_classifier.ood is not None
    images = [Image.open(p).convert("RGB") for p in sorted((synthetic_root / "blast").glob("*.png"))[:6]]
    images += _images(5)
    assert_graph_matches_torch(torch_classifier, onnx_classifier, images)


def test_exported_bundle_records_its_graph(exported: dict[str, Path], trained: dict[str, Path]) -> None:
    bundle = exported["abas_cnn"]
    payload = json.loads((bundle / "bundle.json").read_text())
    record = payload["export"]
    assert payload["format_version"] == 4 and (bundle / ONNX_FILE).is_file()
    assert record["format"] == "onnx" and record["file"] == ONNX_FILE and record["opset"] == 17
    assert record["inputs"][0]["name"] == "input" and record["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert [o["name"] for o in record["outputs"]] == ["logits", "embedding"]
    assert record["outputs"][0]["shape"] == ["batch", 4]
    # everything else is the source bundle's, and the source is left as it was
    source = json.loads((trained["abas_cnn"] / "bundle.json").read_text())
    assert {k: v for k, v in payload.items() if k not in ("export", "format_version")} == \
        {k: v for k, v in source.items() if k != "format_version"}
    assert "export" not in source and not (trained["abas_cnn"] / ONNX_FILE).exists()
    assert (bundle / "model.safetensors").read_bytes() == (trained["abas_cnn"] / "model.safetensors").read_bytes()


def test_auto_prefers_onnxruntime_and_falls_back_to_torch(exported: dict[str, Path], trained: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)  # openvino comes first (test_openvino.py)
    assert CellClassifier.from_bundle(exported["abas_cnn"], backend="auto").backend == "onnxruntime"
    assert CellClassifier.from_bundle(trained["abas_cnn"], backend="auto").backend == "torch"
    monkeypatch.setattr(runtime, "onnxruntime_available", lambda: False)
    assert CellClassifier.from_bundle(exported["abas_cnn"], backend="auto").backend == "torch"
    with pytest.raises(BundleError, match=r"pip install 'leukoscope\[onnx\]'"):
        CellClassifier.from_bundle(exported["abas_cnn"], backend="onnxruntime")


def test_auto_on_a_gpu_is_torch(exported: dict[str, Path]) -> None:
    """The exported graphs run on the CPU: auto picked one and then refused the GPU it was asked to run on."""
    from leukoscope.bundle import read_bundle_info

    info = read_bundle_info(exported["abas_cnn"])
    assert runtime.choose_backend("auto", info, exported["abas_cnn"]) != "torch"  # an exported bundle, on the CPU
    assert runtime.choose_backend("auto", info, exported["abas_cnn"], "cuda") == "torch"
    assert runtime.choose_backend("auto", info, exported["abas_cnn"], "cuda:1") == "torch"


def test_torch_bundle_on_onnxruntime_says_to_export_first(trained: dict[str, Path]) -> None:
    with pytest.raises(BundleError, match="has no ONNX graph: run `leukoscope export"):
        CellClassifier.from_bundle(trained["abas_cnn"], backend="onnxruntime")
    with pytest.raises(ValueError, match="unknown backend"):
        CellClassifier.from_bundle(trained["abas_cnn"], backend="tensorrt")


def test_unsupported_bundle_kinds_are_refused(tmp_path: Path) -> None:
    detector = tmp_path / "detector"
    detector.mkdir()
    (detector / "bundle.json").write_text(json.dumps({"model_name": "fcos_resnet50_fpn", "classes": ["wbc"],
                                                      "task": "detect", "format_version": 2}))
    with pytest.raises(BundleError, match="is an FCOS detector: export supports Faster R-CNN detectors only"):
        check_exportable(detector)
    classical = tmp_path / "classical"
    classical.mkdir()
    (classical / "bundle.json").write_text(json.dumps({
        "model_name": "svm_rbf", "classes": ["a", "b"], "framework": "sklearn", "format_version": 2,
        "preprocessing": {"image_size": 48}}))
    with pytest.raises(BundleError, match=r"classical \(scikit-learn\) model: export to ONNX supports torch CNN"):
        export_onnx(classical, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        check_exportable(classical, "tflite")


def test_new_weights_drop_a_stale_graph(exported: dict[str, Path], tmp_path: Path) -> None:
    bundle = export_onnx(exported["mobilenet_v3_small"], tmp_path / "again")  # an exported bundle re-exports
    model, info = load_bundle(bundle)
    save_bundle(bundle, model, info, load_ood_arrays(bundle, info))  # e.g. retrained into the same folder
    assert read_bundle_info(bundle).export is None and not (bundle / ONNX_FILE).exists()
    assert json.loads((bundle / "bundle.json").read_text())["format_version"] == 3  # it keeps its OOD entry


def test_weights_changed_behind_a_graph_are_refused_on_the_graph_backends(exported: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    bundle = Path(shutil.copytree(exported["abas_cnn"], tmp_path / "edited"))  # graph and all, as a user might
    assert CellClassifier.from_bundle(bundle, backend="onnxruntime").backend == "onnxruntime"
    state = load_file(bundle / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, bundle / "model.safetensors")
    for backend in ("onnxruntime", "auto"):
        with pytest.raises(BundleError, match="has changed since its graph was exported"):
            CellClassifier.from_bundle(bundle, backend=backend)
    assert CellClassifier.from_bundle(bundle, backend="torch").backend == "torch"  # the new weights still run


def test_parity_report_on_labelled_and_unlabelled_images(exported: dict[str, Path], synthetic_root: Path,
                                                         tmp_path: Path) -> None:
    report = compare_backends(exported["mobilenet_v3_small"], synthetic_root, threads=1)
    assert report.images == report.labelled == 96 and report.agreement == 1.0
    assert report.max_abs_diff < PROBABILITY_TOLERANCE and report.accuracy_torch == report.accuracy_export
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, image in enumerate(_images(3)):
        image.save(loose / f"{i}.png")
    unlabelled = compare_backends(exported["mobilenet_v3_small"], loose, threads=1)
    assert unlabelled.images == 3 and unlabelled.labelled == 0 and unlabelled.accuracy_export is None
    assert "accuracy not computed" in unlabelled.lines()[-1]


def test_torch_runtime_is_the_default_path(trained: dict[str, Path]) -> None:
    """Built from a model, as before runtimes existed, a classifier runs it on torch."""
    model, info = load_bundle(trained["abas_cnn"])
    classifier = CellClassifier(model, info)
    assert classifier.backend == "torch" and classifier.model is model
    assert classifier.probabilities(_images(2)).shape == (2, 4)
    assert torch.is_tensor(classifier.preprocess(_images(1)[0]))


def test_a_copy_of_an_exported_bundle_does_not_claim_its_graph(exported: dict[str, Path], tmp_path: Path) -> None:
    from leukoscope.bundle import copy_bundle

    source = exported["abas_cnn"]
    assert read_bundle_info(source).export is not None
    copy = copy_bundle(source, tmp_path / "copy")
    assert not (copy / ONNX_FILE).exists()
    info = read_bundle_info(copy)
    assert info.export is None and info.format_version < 4
    assert runtime.choose_backend("auto", info, copy) == "torch"


def test_a_gray_group_norm_classifier_exports_and_agrees(synthetic_root: Path, tmp_path: Path) -> None:
    # The input style (luminance, per-image standardisation) is applied before the graph, as for torch.
    from tests.export.conftest import invoke

    result = invoke("train", "--data", synthetic_root, "--model", "mobilenet_v2", "--quiet", f"output_root={tmp_path}",
                    "model.image_size=32", "train.epochs=1", "train.threads=1", "data.colour=gray",
                    "data.standardize=true", "model.options={norm: group}")
    assert result.exit_code == 0, result.output
    bundle = export_onnx(Path(result.stdout.strip().splitlines()[-1]), tmp_path / "onnx")
    assert load_bundle(bundle)[1].preprocessing.colour == "gray"
    images = [Image.open(p).convert("RGB") for p in sorted((synthetic_root / "blast").glob("*.png"))[:4]] + _images(3)
    assert_graph_matches_torch(CellClassifier.from_bundle(bundle, backend="torch"),
                               CellClassifier.from_bundle(bundle, backend="onnxruntime", threads=1), images)


def test_an_export_killed_before_its_graph_leaves_no_bundle(trained: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy's bundle.json was written before the graph: an export killed by SIGTERM or SIGKILL (no clean-up
    runs) left a folder that loaded as the float torch model under the export's name."""
    from leukoscope.inference import export as export_module

    def killed(_graph):
        raise SystemExit("killed")  # stands for a kill: the inner step, without export_bundle's clean-up

    monkeypatch.setattr(export_module, "check_graph", killed)
    out = tmp_path / "half"
    with pytest.raises(SystemExit):
        export_module._export_bundle(trained["abas_cnn"], out, "onnx", opset=17, calibration=None,
                                     frame_calibration=False, um_per_px=None, show_progress=False)
    assert any(out.iterdir()) and not (out / "bundle.json").exists()
    with pytest.raises(BundleError):
        read_bundle_info(out)


def test_an_export_into_another_folder_with_files_is_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    """The CLI refused it, the Python API mixed the export's files with the folder's."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        export_onnx(trained["abas_cnn"], out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_sigterm_during_an_export_is_taken_as_ctrl_c() -> None:
    """Its handler, called as the interpreter calls it (no real signal: other libraries of the test process,
    Ray's among them, keep their own handlers), raises KeyboardInterrupt, and the previous handler is back
    afterwards."""
    import signal

    from leukoscope.cli._common import terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with terminate_as_interrupt():
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler) and handler is not before
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGTERM, None)
    assert signal.getsignal(signal.SIGTERM) == before
