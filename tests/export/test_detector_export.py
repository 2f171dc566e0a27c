"""Exported detectors (two ONNX graphs, the steps between them in numpy) find what the torch model finds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from leukoscope.bundle import BundleError, copy_bundle, read_bundle_info
from leukoscope.data.synthetic_smears import SmearSpec, render_smear
from leukoscope.evaluation.detection import Predicted
from leukoscope.inference import detector_runtime
from leukoscope.inference.detector import CellDetector, DetectionResult
from leukoscope.inference.detector_export import rcnn_settings
from leukoscope.tasks.detect import match_same_detections
from tests.conftest import fresh_python
from tests.export.conftest import invoke

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

GRAPH_BACKENDS = ["onnxruntime"] + (["openvino"] if detector_runtime.installed("openvino") else [])
#: A 640x480 field (the caps as set) and a 1600x1200 one (caps x6.25: more boxes than the base cap of 100).
SMALL = SmearSpec(width=640, height=480, cell_size=120, rbc_per_image=(40, 60), platelets_per_image=(5, 10), seed=1)
LARGE = SmearSpec(width=1600, height=1200, cell_size=120, wbc_per_image=(4, 8), rbc_per_image=(400, 500),
                  platelets_per_image=(30, 60), seed=2)


@pytest.fixture(scope="module")
def exported_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped detector (real weights: real cells, real score gaps), exported."""
    from leukoscope.inference.export import export_onnx

    return export_onnx("pretrained:smear-detector", tmp_path_factory.mktemp("det") / "exported")


def _field(spec: SmearSpec) -> np.ndarray:
    return render_smear(np.random.default_rng(spec.seed), spec)[0]


def _predicted(result: DetectionResult) -> Predicted:
    return Predicted(result.boxes, result.scores, result.labels)


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_exported_detector_finds_the_same_cells_on_small_and_large_fields(exported_detector: Path,
                                                                         backend: str) -> None:
    torch.set_num_threads(1)
    reference = CellDetector.from_bundle(exported_detector, backend="torch")
    graph = CellDetector.from_bundle(exported_detector, backend=backend, threads=1)
    assert (reference.backend, graph.backend) == ("torch", backend)
    for spec, least in ((SMALL, 20), (LARGE, 101)):  # LARGE: above the 640x480 cap, so the scaled caps ran
        field = _field(spec)
        a, b = reference.detect([field], threshold=0.0)[0], graph.detect([field], threshold=0.0)[0]
        assert len(a) >= least
        pairs, unmatched = match_same_detections(_predicted(a), _predicted(b))
        assert unmatched == 0 and len(pairs) == len(a)
        assert max(np.abs(a.boxes[i] - b.boxes[j]).max() for i, j in pairs) < 0.01
        assert max(abs(a.scores[i] - b.scores[j]) for i, j in pairs) < 1e-4


def test_a_padded_batch_of_differently_sized_fields_matches_torch(exported_detector: Path) -> None:
    """Two sizes in one batch: the transform pads them to one; the graph takes any batch and size."""
    fields = [_field(SMALL), _field(SmearSpec(width=500, height=420, seed=5))]
    a, b = (CellDetector.from_bundle(exported_detector, backend=name).detect(fields, threshold=0.0, batch_size=2)
            for name in ("torch", "onnxruntime"))
    for reference, graph in zip(a, b):
        assert len(reference) > 0
        assert match_same_detections(_predicted(reference), _predicted(graph), tolerance=0.01)[1] == 0


def test_exported_detector_bundle_is_a_valid_bundle(exported_detector: Path, tmp_path: Path) -> None:
    info = read_bundle_info(exported_detector, task="detect")
    assert info.format_version == 4 and info.export is not None
    assert info.export["part"] == "dense" and info.export["levels"] == ["0", "1", "2", "pool"]
    assert len(info.export["outputs"]) == 12  # features, objectness, deltas of 4 levels
    assert (exported_detector / "model.onnx").is_file() and (exported_detector / "box_head.onnx").is_file()
    assert info.export["box_file"] == "box_head.onnx"
    assert info.export["box_inputs"] == ["features_0", "features_1", "features_2", "regions_0", "regions_1", "regions_2"]
    shipped = read_bundle_info("pretrained:smear-detector")
    assert (info.classes, info.model_options, info.score_threshold) == (shipped.classes, shipped.model_options,
                                                                         shipped.score_threshold)
    import onnx

    onnx.checker.check_model(str(exported_detector / "model.onnx"))
    onnx.checker.check_model(str(exported_detector / "box_head.onnx"))
    copy = copy_bundle(exported_detector, tmp_path / "copy")  # a copy without the graph does not claim it
    assert read_bundle_info(copy).export is None
    assert not (copy / "model.onnx").exists() and not (copy / "box_head.onnx").exists()
    assert CellDetector.from_bundle(copy, backend="auto").backend == "torch"
    assert CellDetector.from_bundle(exported_detector, backend="auto").backend == detector_runtime.AUTO_ORDER[0]
    info = read_bundle_info(exported_detector)  # auto on a GPU: torch (the graphs run on the CPU)
    assert detector_runtime.choose_detector_backend("auto", info, exported_detector, "cuda") == "torch"


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_exports_without_recorded_settings_read_them_off_the_model(exported_detector: Path, backend: str,
                                                                 tmp_path: Path) -> None:
    """The numpy steps between the graphs take the model's settings from bundle.json; a bundle exported
    before they were recorded gets them from its torch model (and finds the same cells); one exported
    before the box graph existed is refused with what to do."""
    field = _field(LARGE)
    recorded = CellDetector.from_bundle(exported_detector, backend=backend, threads=1)
    info = json.loads((exported_detector / "bundle.json").read_text())
    model = CellDetector.from_bundle(exported_detector, backend="torch").model
    assert recorded.runner.settings == rcnn_settings(model)
    assert info["export"]["rcnn"]["detections_per_img"] == recorded.detection_cap == 100
    older = tmp_path / "older"
    older.mkdir()
    for name in ("model.safetensors", "model.onnx", "box_head.onnx"):
        (older / name).write_bytes((exported_detector / name).read_bytes())
    del info["export"]["rcnn"]
    (older / "bundle.json").write_text(json.dumps(info))
    read_off = CellDetector.from_bundle(older, backend=backend, threads=1)
    assert read_off.runner.settings == recorded.runner.settings
    other = json.loads(json.dumps(info))  # settings written by another version
    other["export"]["rcnn"] = {**recorded.runner.settings.to_record(), "anchor_offset": 0.5}
    (older / "bundle.json").write_text(json.dumps(other))
    with pytest.raises(BundleError, match="export.rcnn is not what this leukoscope reads"):
        CellDetector.from_bundle(older, backend=backend)
    (older / "bundle.json").write_text(json.dumps(info))
    a, b = recorded.detect([field], threshold=0.0)[0], read_off.detect([field], threshold=0.0)[0]
    assert len(a) > 100 and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
    for key in ("box_file", "box_inputs", "box_outputs"):
        del info["export"][key]
    (older / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match="exported before detectors had a box graph: run `leukoscope export"):
        CellDetector.from_bundle(older, backend=backend)


def test_detectors_need_opset_16_for_the_box_graph(tmp_path: Path) -> None:
    from leukoscope.inference.export import export_onnx

    with pytest.raises(BundleError, match="opset >= 16"):
        export_onnx("pretrained:smear-detector", tmp_path / "old", opset=15)
    assert not (tmp_path / "old").exists()


def test_single_map_detectors_export_too(tmp_path: Path) -> None:
    """System A's Faster R-CNN: one feature map, no pyramid (named "0" as torchvision names it)."""
    from leukoscope.bundle import BundleInfo, save_bundle
    from leukoscope.inference.export import export_onnx
    from leukoscope.models import create_model

    torch.manual_seed(0)
    options = {"input_scale": 0.5, "score_thresh": 0.2, "detections_per_img": 30}
    model = create_model("fasterrcnn_abas", num_classes=3, **options)
    info = BundleInfo("fasterrcnn_abas", ["WBC", "RBC", "Platelets"], task="detect", model_options=options,
                      score_threshold=0.2)
    bundle = export_onnx(save_bundle(tmp_path / "abas", model, info), tmp_path / "abas")  # in place
    assert read_bundle_info(bundle).export["levels"] == ["0"]
    field = _field(SMALL)
    a = CellDetector.from_bundle(bundle).detect([field], threshold=0.0)[0]
    b = CellDetector.from_bundle(bundle, backend="onnxruntime").detect([field], threshold=0.0)[0]
    pairs, unmatched = match_same_detections(_predicted(a), _predicted(b), tolerance=0.01)
    assert len(a) > 0 and unmatched == 0


def test_backend_errors_are_clear(exported_detector: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = copy_bundle(exported_detector, tmp_path / "plain")
    with pytest.raises(BundleError, match="has no exported detector graph: run `leukoscope export --bundle"):
        CellDetector.from_bundle(plain, backend="onnxruntime")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        CellDetector.from_bundle(exported_detector, backend="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        CellDetector.from_bundle(exported_detector, "cuda", backend="onnxruntime")
    real = detector_runtime.installed
    monkeypatch.setattr(detector_runtime, "installed", lambda name: name != "onnxruntime" and real(name))
    with pytest.raises(BundleError, match=r"--backend onnxruntime needs onnxruntime: pip install 'leukoscope\[onnx\]'"):
        CellDetector.from_bundle(exported_detector, backend="onnxruntime")
    expected = "openvino" if real("openvino") else "torch"  # auto: the next installed one
    assert CellDetector.from_bundle(exported_detector, backend="auto").backend == expected
    (exported_detector / "model.onnx").rename(tmp_path / "moved.onnx")
    try:
        monkeypatch.setattr(detector_runtime, "installed", real)
        with pytest.raises(BundleError, match="records an exported graph but model.onnx is missing"):
            CellDetector.from_bundle(exported_detector, backend="onnxruntime")
    finally:
        (tmp_path / "moved.onnx").rename(exported_detector / "model.onnx")


def test_a_detector_whose_weights_changed_behind_its_graph_is_refused(exported_detector: Path,
                                                                      tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    bundle = Path(shutil.copytree(exported_detector, tmp_path / "edited"))
    state = load_file(bundle / "model.safetensors")
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, bundle / "model.safetensors")
    with pytest.raises(BundleError, match="model.safetensors has changed since its graph was exported"):
        CellDetector.from_bundle(bundle, backend="onnxruntime")
    assert CellDetector.from_bundle(bundle, backend="torch").backend == "torch"
    # an option the graph was built with (the box graph pools at the export's sampling ratio)
    options = Path(shutil.copytree(exported_detector, tmp_path / "options"))
    payload = json.loads((options / "bundle.json").read_text())
    assert payload["export"]["model_options"] == payload["model_options"]
    ratio = 3 - payload["model_options"].get("roi_sampling_ratio", 2)  # 1 <-> 2
    payload["model_options"]["roi_sampling_ratio"] = ratio
    (options / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match="its model_options have changed since its graph was exported"):
        CellDetector.from_bundle(options, backend="onnxruntime")
    assert CellDetector.from_bundle(options, backend="torch").model.roi_heads.box_roi_pool.sampling_ratio == ratio


def test_analyze_gives_the_same_differential_on_onnxruntime(exported_detector: Path, tmp_path: Path) -> None:
    from PIL import Image

    from leukoscope.bundle import BundleInfo, save_bundle
    from leukoscope.data.synthetic import SYNTHETIC_CLASSES
    from leukoscope.inference.export import export_onnx
    from leukoscope.models import create_model
    from leukoscope.preprocessing import Preprocessing
    from leukoscope.pixels import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    info = BundleInfo("abas_cnn", list(SYNTHETIC_CLASSES), Preprocessing(48, list(IMAGENET_MEAN), list(IMAGENET_STD)))
    classifier = export_onnx(save_bundle(tmp_path / "cls", create_model("abas_cnn", num_classes=len(SYNTHETIC_CLASSES)),
                                         info), tmp_path / "cls")
    fields = tmp_path / "fields"
    fields.mkdir()
    for seed in (1, 7):  # white cells of 160 px, which the shipped detector finds in these fields
        spec = SmearSpec(width=640, height=480, cell_size=160, wbc_per_image=(3, 4), seed=seed)
        Image.fromarray(_field(spec)).save(fields / f"field{seed}.png")
    summaries = {}
    for backend in ("torch", "onnxruntime"):
        result = invoke("analyze", fields, "--detector", exported_detector, "--classifier", classifier, "--out",
                        tmp_path / backend, "--backend", backend, "--threads", "1", "--um-per-px", "0.0827",
                        "--detector-threshold", "0.3", "--quiet")
        assert result.exit_code == 0, result.output
        summaries[backend] = json.loads((tmp_path / backend / "summary.json").read_text())
    assert summaries["torch"]["pooled_differential"]["total"] > 0
    assert summaries["onnxruntime"]["pooled_differential"]["counts"] == summaries["torch"]["pooled_differential"]["counts"]
    assert summaries["onnxruntime"]["pooled_differential"]["total"] == summaries["torch"]["pooled_differential"]["total"]
    bad = invoke("analyze", fields, "--backend", "tensorrt")
    assert bad.exit_code == 2 and "--backend must be one of auto, torch, onnxruntime, openvino" in bad.output


def test_export_cli_checks_parity_on_a_voc_folder(tmp_path: Path) -> None:
    from leukoscope.data.synthetic_smears import make_synthetic_smears

    data = tmp_path / "voc"
    make_synthetic_smears(data, 3, SmearSpec(width=640, height=480, cell_size=160, wbc_per_image=(2, 3), seed=4))
    out = tmp_path / "exported"
    result = invoke("export", "--bundle", "pretrained:smear-detector", "--out", out, "--check", data,
                    "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "input (batch, 3, height, width: the dense part)" in result.output
    assert "parity on 3 images (onnxruntime vs torch)" in result.output and " 0 unmatched" in result.output
    assert "(change +0.0000)" in result.output
    assert read_bundle_info(out).export["part"] == "dense"
    # evaluate runs the exported graph when asked, and scores what torch scores
    maps = {}
    for backend in ("torch", "onnxruntime"):
        scored = invoke("evaluate", "--bundle", out, "--data", data, "--backend", backend, "--threads", "1",
                        "--out", tmp_path / f"eval-{backend}")
        assert scored.exit_code == 0, scored.output
        maps[backend] = json.loads((tmp_path / f"eval-{backend}" / "metrics.json").read_text())["map_50"]
    assert maps["onnxruntime"] == pytest.approx(maps["torch"], abs=1e-4)
    wrong = invoke("export", "--bundle", "pretrained:smear-detector", "--out", tmp_path / "x", "--split", "Testing")
    assert wrong.exit_code == 2 and "--split names a split of --check DATA" in wrong.output


def test_the_service_loads_its_detector_on_the_configured_backend(exported_detector: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    from leukoscope.service import app as service_app
    from leukoscope.service.analysis import Analyzer, load_smear_backend
    from leukoscope.service.settings import ServiceSettings

    settings = ServiceSettings.from_env({"LEUKOSCOPE_DETECTOR_BACKEND": "onnxruntime"}, data_dir=tmp_path / "data",
                                        bundle="pretrained:wbc-classifier", detector=exported_detector)
    assert settings.detector_backend == "onnxruntime"
    assert ServiceSettings.from_env({}).detector_backend == "torch"
    with pytest.raises(ValueError, match="detector_backend"):
        ServiceSettings.from_env({"LEUKOSCOPE_DETECTOR_BACKEND": "tensorrt"})
    seen: dict = {}

    class Loaded:
        classes = ["blast", "lymphocyte"]

        def warm_up(self) -> None:
            pass

        def close(self) -> None:
            pass

    def from_bundles(bundle, detector, **options):
        seen.update(options)
        return Loaded()

    monkeypatch.setattr(Analyzer, "from_bundles", staticmethod(from_bundles))
    service_app.build_state(settings)
    assert seen["smear_options"] == {"backend": "onnxruntime", "threads": settings.torch_threads}
    # and those options load the detector on that backend
    from leukoscope.inference.predictor import CellClassifier

    smear = load_smear_backend(exported_detector, CellClassifier.from_bundle("pretrained:wbc-classifier"),
                               **seen["smear_options"])
    assert smear._call.__self__.detector.backend == "onnxruntime"


@pytest.fixture(scope="module")
def int8_detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The shipped detector exported as int8 by the CLI, calibrated on 16 generated fields (other seeds than
    the fields it is then checked on); and the CLI's output, which includes the parity check."""
    from PIL import Image

    from leukoscope.data.synthetic_smears import make_synthetic_smears

    root = tmp_path_factory.mktemp("det-int8")
    calibration = root / "fields"
    calibration.mkdir()
    for seed in range(100, 116):
        spec = SmearSpec(width=640, height=480, cell_size=160, wbc_per_image=(2, 3), seed=seed)
        Image.fromarray(_field(spec)).save(calibration / f"field{seed}.jpg", quality=92)
    check = root / "voc"
    make_synthetic_smears(check, 3, SmearSpec(width=640, height=480, cell_size=160, wbc_per_image=(2, 3), seed=4))
    out = root / "int8"
    result = invoke("export", "--bundle", "pretrained:smear-detector", "--int8", "--calibration", calibration,
                    "--check", check, "--threads", "1", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_an_int8_detector_is_quantized_in_both_graphs_and_says_so(int8_detector: tuple[Path, str]) -> None:
    import onnx

    bundle, output = int8_detector
    record = read_bundle_info(bundle, task="detect").export
    assert record["precision"] == "int8" and record["calibration_images"] == 16 and record["part"] == "dense"
    assert "metrics are the float model's" in record["metrics_note"]
    assert "dense graph static" in record["quantizer"] and "box graph dynamic" in record["quantizer"]
    dense = onnx.load(str(bundle / "model.onnx")).graph
    assert any(node.op_type == "DequantizeLinear" for node in dense.node)
    assert any(init.data_type == onnx.TensorProto.INT8 for init in dense.initializer)
    box = onnx.load(str(bundle / "box_head.onnx")).graph
    assert any(node.op_type == "MatMulInteger" for node in box.node)
    assert not any(node.op_type == "Gemm" for node in box.node)  # every fully connected layer is int8
    assert "int8, calibrated on 16 images" in output
    # the parity check reports each class's AP, the one a screening tool lives by included
    assert "AP@0.5 by class, torch -> onnxruntime: WBC " in output and "Platelets" in output
    assert "(int8: boxes and scores move, so judge it by the AP below)" in output


def test_a_full_range_int8_detector_is_warned_of_on_a_cpu_without_vnni(int8_detector: tuple[Path, str],
                                                                      tmp_path: Path, monkeypatch, caplog) -> None:
    """Its weights in a 7-bit range since 2026-12-07; one exported before (full range) warns where its sums
    overflow (leukoscope.inference.int8_cpu)."""
    import shutil

    from leukoscope.inference import int8_cpu

    bundle, _ = int8_detector
    assert read_bundle_info(bundle, task="detect").export["weight_bits"] == 7
    old = Path(shutil.copytree(bundle, tmp_path / "full-range"))
    payload = json.loads((old / "bundle.json").read_text())
    payload["export"].pop("weight_bits")
    (old / "bundle.json").write_text(json.dumps(payload))
    monkeypatch.setattr(int8_cpu, "cpu_lacks_vnni", lambda: True)
    for loaded, warned in ((bundle, 0), (old, 1)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="leukoscope.inference.int8_cpu"):
            CellDetector.from_bundle(loaded, backend="onnxruntime", threads=1)
        assert sum("full 8-bit range" in r.getMessage() for r in caplog.records) == warned


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_an_int8_detector_finds_the_white_cells_the_float_one_finds(int8_detector: tuple[Path, str],
                                                                    backend: str) -> None:
    """Each white cell one finds at the operating threshold, the other finds at a slightly lower one: a box
    overlapping it by IoU >= 0.5 (the criterion of AP@0.5), most by far more. int8 moves boxes (by up to
    ~10% of a generated cell) and scores a little, so a cell scored right at the threshold may fall on
    either side of it."""
    from torchvision.ops import box_iou

    bundle, _ = int8_detector
    detectors = (CellDetector.from_bundle(bundle, backend="torch"),
                 CellDetector.from_bundle(bundle, backend=backend, threads=1))
    wbc = detectors[0].classes.index("WBC")
    threshold = detectors[0].score_threshold
    overlaps = []
    for seed in (1, 7, 11, 13):
        field = _field(SmearSpec(width=640, height=480, cell_size=160, wbc_per_image=(3, 4), seed=seed))
        for first, second in (detectors, detectors[::-1]):
            a = first.detect([field], threshold=threshold)[0]
            b = second.detect([field], threshold=threshold - 0.1)[0]
            a_boxes, b_boxes = (torch.from_numpy(r.boxes[r.labels == wbc]) for r in (a, b))
            assert len(a_boxes) and len(b_boxes)
            overlaps += box_iou(a_boxes, b_boxes).max(dim=1).values.tolist()
    assert len(overlaps) >= 16 and min(overlaps) >= 0.5, overlaps
    assert np.median(overlaps) >= 0.85, overlaps
    assert min(overlaps) < 0.999  # not the float graph


def test_int8_detector_export_needs_enough_fields_and_the_onnx_format(tmp_path: Path) -> None:
    from PIL import Image

    few = tmp_path / "few"
    few.mkdir()
    for seed in range(3):
        Image.fromarray(_field(SmearSpec(width=320, height=240, seed=seed))).save(few / f"f{seed}.png")
    too_few = invoke("export", "--bundle", "pretrained:smear-detector", "--int8", "--calibration", few,
                     "--out", tmp_path / "a")
    assert too_few.exit_code == 2 and "int8 calibration needs at least 16 fields like the ones" in too_few.output
    assert not (tmp_path / "a").exists()
    # enough files, too few readable: found out during calibration, after the copy; no bundle is left behind
    broken = tmp_path / "broken"
    broken.mkdir()
    for k in range(16):
        (broken / f"f{k:02d}.jpg").write_bytes(b"not an image")
    for path in sorted(few.iterdir())[:2]:
        (broken / path.name).write_bytes(path.read_bytes())
    failed = invoke("export", "--bundle", "pretrained:smear-detector", "--int8", "--calibration", broken,
                    "--out", tmp_path / "c")
    assert failed.exit_code == 2 and "only 2 of the 18 calibration images could be read" in failed.output
    assert not (tmp_path / "c").exists()
    (tmp_path / "d").mkdir()  # an empty --out the user made stays, empty
    assert invoke("export", "--bundle", "pretrained:smear-detector", "--int8", "--calibration", broken,
                  "--out", tmp_path / "d").exit_code == 2
    assert (tmp_path / "d").is_dir() and not any((tmp_path / "d").iterdir())
    # a VOC dataset's root holds every split, the scored one too
    from leukoscope.data.synthetic_smears import make_synthetic_smears

    make_synthetic_smears(tmp_path / "voc", 2, SmearSpec(width=320, height=240, seed=3))
    voc = invoke("export", "--bundle", "pretrained:smear-detector", "--int8", "--calibration", tmp_path / "voc",
                 "--out", tmp_path / "e")
    assert voc.exit_code == 2 and "is a VOC dataset" in voc.output and not (tmp_path / "e").exists()
    # ...but one split of a dataset kept as split folders (cbc/Training) is what to calibrate on: it was
    # refused with the same message and suggested folders that do not exist
    from leukoscope.inference.quantize import detector_calibration_paths

    for split in ("Training", "Testing"):
        make_synthetic_smears(tmp_path / "splits" / split, 16, SmearSpec(width=320, height=240, seed=4))
    paths = detector_calibration_paths(tmp_path / "splits" / "Training")
    assert len(paths) == 16 and all(path.parent == tmp_path / "splits" / "Training" / "JPEGImages" for path in paths)
    import os

    from leukoscope.bundle import BundleError

    here = os.getcwd()
    os.chdir(tmp_path)  # a whole dataset given by a relative path (as the README's ../shared/... are) is refused too
    try:
        with pytest.raises(BundleError, match="is a VOC dataset"):
            detector_calibration_paths("voc")
    finally:
        os.chdir(here)
    ir = invoke("export", "--bundle", "pretrained:smear-detector", "--format", "openvino", "--int8", "--calibration",
                few, "--out", tmp_path / "b")
    assert ir.exit_code == 2 and "it exports as ONNX graphs only (--format onnx)" in ir.output


def test_evaluate_says_which_precision_ran(int8_detector: tuple[Path, str], tmp_path: Path) -> None:
    bundle, _ = int8_detector
    voc = bundle.parent / "voc"  # the fixture's --check images
    for backend, precision in (("onnxruntime", "int8"), ("torch", "float32")):
        result = invoke("evaluate", "--bundle", bundle, "--data", voc, "--backend", backend, "--threads", "1",
                        "--out", tmp_path / backend)
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / backend / "metrics.json").read_text())
        assert (metrics["backend"], metrics["precision"]) == (backend, precision)
    assert "exported int8 graphs" in (tmp_path / "onnxruntime" / "report.html").read_text()


def _modules_after_analyze(args: list[str]) -> list[str]:
    """Which of torch and torchvision a `leukoscope analyze` with ``args`` imported (in a fresh process)."""
    code = ("import json, sys; from leukoscope.cli import app; "
            f"app({args!r}, standalone_mode=False); "
            "print(json.dumps(sorted(m for m in ('torch', 'torchvision') if m in sys.modules)))")
    return json.loads(fresh_python(code))


def test_analysing_with_exported_models_imports_neither_torch_nor_torchvision(exported_detector: Path,
                                                                            exported: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """Importing torch and torchvision is most of a short folder run's start-up (docs/benchmarks.md):
    with both models exported, `analyze` runs without them, OOD score included; with --backend torch
    the same run imports them (the control)."""
    from PIL import Image

    field = tmp_path / "field.png"  # white cells of 160 px, which the shipped detector finds
    Image.fromarray(_field(SmearSpec(width=640, height=480, cell_size=160, wbc_per_image=(3, 4), seed=1))).save(field)
    classifier = next(iter(exported.values()))
    assert read_bundle_info(classifier).ood is not None  # the graph's embedding output feeds the OOD score
    runs = {}
    for backend in ("onnxruntime", "torch"):
        out = tmp_path / backend
        runs[backend] = _modules_after_analyze(["analyze", str(field), "--detector", str(exported_detector),
                                                "--classifier", str(classifier), "--out", str(out), "--backend",
                                                backend, "--threads", "1", "--um-per-px", "0.0827",
                                                "--detector-threshold", "0.3", "--quiet"])
        assert (out / "field.json").is_file() and (out / "summary.json").is_file()
    assert runs == {"onnxruntime": [], "torch": ["torch", "torchvision"]}
    cells = {backend: (tmp_path / backend / "field.cells.csv").read_text().splitlines() for backend in runs}
    assert len(cells["torch"]) > 1 and len(cells["onnxruntime"]) == len(cells["torch"])
    assert "ood_score" in cells["onnxruntime"][0]


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_the_graphs_find_the_torch_models_cells_on_real_fields(exported_detector: Path, backend: str) -> None:
    """CBC test fields, and a 2592x1944 mosaic of sixteen of them (one image, its caps scaled x16):
    every detection of the torch model, box for box, down to the weakest (threshold 0)."""
    from PIL import Image

    from tests.conftest import shared_dataset

    paths = sorted((shared_dataset("cbc") / "Testing" / "Images").glob("*.jpg"))[:16]
    fields = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    mosaic = np.full((1944, 2592, 3), 230, dtype=np.uint8)
    for k, field in enumerate(fields):
        y, x = (k // 4) * 480, (k % 4) * 640
        mosaic[y:y + 480, x:x + 640] = field[:480, :640]
    reference = CellDetector.from_bundle(exported_detector, backend="torch")
    graph = CellDetector.from_bundle(exported_detector, backend=backend, threads=1)
    for image in (*fields[:3], mosaic):
        a, b = reference.detect([image], threshold=0.0)[0], graph.detect([image], threshold=0.0)[0]
        pairs, unmatched = match_same_detections(_predicted(a), _predicted(b), tolerance=0.01)
        assert len(a) >= 10 and unmatched == 0 and len(pairs) == len(a) == len(b)
        assert max(np.abs(a.boxes[i] - b.boxes[j]).max() for i, j in pairs) < 0.01
        assert max(abs(a.scores[i] - b.scores[j]) for i, j in pairs) < 1e-4
    assert reference.detection_cap is not None and len(a) > reference.detection_cap  # the scaled caps ran
