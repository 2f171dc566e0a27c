"""What runs a detector: its torch model, or its exported graphs on onnxruntime or OpenVINO.

An exported detector bundle (:mod:`leukoscope.inference.detector_export`) holds two ONNX
graphs. The *dense* part (``model.onnx``): backbone, feature pyramid and the RPN head's
convolutions, for an image batch of any size. The *box* part (``box_head.onnx``): RoIAlign
over given regions of each feature level, the box head and the class layer, for any number
of regions (torchvision's RoIAlign is single-threaded; onnxruntime's and OpenVINO's use every
thread given). Those two are where the time goes, and neither has per-image caps. What has
caps or chooses regions runs between them in numpy (:mod:`leukoscope.inference.rcnn_glue`),
with the caps scaled to the tile as on the torch path (:func:`scaled_cap`), so an exported
detector finds the same cells on a 640x480 field and on a 2048 px tile (up to float
rounding), and analysing with exported models imports neither torch nor torchvision.

``auto`` picks the fastest installed backend the bundle has a graph for
(:data:`AUTO_ORDER`), else torch (:mod:`leukoscope.inference.detector_torch`).
"""

from __future__ import annotations

import importlib.util
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from leukoscope.bundle import ONNX_FILE, BundleError, BundleInfo, check_export_matches
from leukoscope.inference import rcnn_glue
from leukoscope.inference.int8_cpu import warn_if_full_range
from leukoscope.inference.rcnn_glue import RcnnSettings
from leukoscope.pretrained import export_advice

DETECTOR_BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
#: What ``auto`` tries first for an exported detector (measured on the shipped detector, docs/benchmarks.md).
AUTO_ORDER = ("onnxruntime", "openvino")
#: The extra that installs each graph runtime (pyproject.toml).
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}
#: The per-image caps on proposals and detections are set for a field of this many pixels (640x480).
REFERENCE_FIELD_PIXELS = 640 * 480

#: One detector's output for one image: boxes (n, 4) xyxy in the image's pixels, scores (n,), model
#: labels (n,) (1..K; 0 is the background), best first.
RawDetections = tuple[np.ndarray, np.ndarray, np.ndarray]


def installed(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


def scaled_cap(cap: int, pixels: int) -> int:
    """A per-image cap for an image of ``pixels``: scaled with the area above a 640x480 field
    (a 2048 px tile holds ten times as many cells)."""
    return int(math.ceil(cap * max(1.0, pixels / REFERENCE_FIELD_PIXELS)))


def image_array(image: Any) -> np.ndarray:
    """A PIL image, an (H, W, 3) array or a (3, H, W) torch tensor -> an (H, W, 3) array (a view when it can)."""
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "numpy"):  # a torch tensor, channels first
        return image.detach().cpu().numpy().transpose(1, 2, 0)
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


class DetectorRunner:
    """Runs a detector's network and the steps around it on a batch of images (:class:`RawDetections`
    each). ``pixels``: the largest image's area, which scales the per-image caps (:func:`scaled_cap`)."""

    backend = ""
    model: Any = None
    """The torch model (training-side callers read it); None when graphs run the network."""

    @property
    def detection_cap(self) -> int | None:
        """The cap on detections per image as set for a 640x480 field; None without one."""
        raise NotImplementedError

    def run(self, images: Sequence[Any], pixels: int) -> list[RawDetections]:
        raise NotImplementedError


class GraphRunner:
    """Runs one exported graph on numpy arrays (inputs in the graph's order); ``backend`` names what runs it."""

    backend = ""

    def __call__(self, *inputs: np.ndarray) -> Sequence[np.ndarray]:
        raise NotImplementedError


class OnnxGraph(GraphRunner):
    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:  # else onnxruntime's default (all cores)
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        # numpy runs the rest of the detector right after the graph: onnxruntime's workers must not
        # spin-wait for more work meanwhile, taking the cores it needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise BundleError(f"{path}: cannot load the exported graph: {str(exc)[:300]}") from None
        self.input_names = [node.name for node in self.session.get_inputs()]

    def __call__(self, *inputs: np.ndarray) -> Sequence[np.ndarray]:
        return self.session.run(None, dict(zip(self.input_names, inputs)))


class OpenVinoGraph(GraphRunner):
    """The same ONNX graph compiled by OpenVINO for the CPU, in float32: its default on CPUs with
    bfloat16 units is bfloat16, which moves the feature maps by whole units (measured) and so the boxes."""

    backend = "openvino"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import openvino as ov

        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types for bad files
            raise BundleError(f"{path}: OpenVINO cannot compile the exported graph: {str(exc)[:300]}") from None
        self.request = self.compiled.create_infer_request()

    def __call__(self, *inputs: np.ndarray) -> Sequence[np.ndarray]:
        results = self.request.infer(dict(enumerate(inputs)))
        # copies: the request reuses its output buffers on the next call
        return [np.array(results[output]) for output in self.compiled.outputs]


@dataclass
class ExportedGraphs:
    """The graphs of an exported detector bundle, ready to run, and the model settings the steps
    between them need."""

    dense: GraphRunner
    box: GraphRunner
    levels: list[str]
    settings: RcnnSettings

    @property
    def backend(self) -> str:
        return self.dense.backend


class GraphDetector(DetectorRunner):
    """An exported Faster R-CNN: the dense and box graphs on onnxruntime or OpenVINO, the steps
    between them in numpy (:mod:`leukoscope.inference.rcnn_glue`)."""

    def __init__(self, graphs: ExportedGraphs) -> None:
        self.graphs = graphs
        # An OpenVINO infer request serves one call at a time; the web service has several threads.
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:  # type: ignore[override]
        return self.graphs.backend

    @property
    def settings(self) -> RcnnSettings:
        return self.graphs.settings

    @property
    def detection_cap(self) -> int | None:
        return self.settings.detections_per_img

    def run(self, images: Sequence[Any], pixels: int) -> list[RawDetections]:
        settings = self.settings
        arrays = [image_array(image) for image in images]
        originals = [(int(a.shape[0]), int(a.shape[1])) for a in arrays]
        batch, sizes = rcnn_glue.model_batch(arrays, settings)
        n = len(self.graphs.levels)
        with self._lock:
            outputs = list(self.graphs.dense(batch))
            if len(outputs) != 3 * n:
                raise BundleError(f"the exported graph gives {len(outputs)} outputs, the detector expects {3 * n}")
            maps, objectness, deltas = outputs[:n], outputs[n:2 * n], outputs[2 * n:]
            anchors = rcnn_glue.grid_anchors(settings, [m.shape[-2:] for m in maps], batch.shape[-2:])
            proposals = rcnn_glue.proposals(objectness, deltas, anchors, sizes, settings,
                                            scaled_cap(settings.rpn_pre_nms_top_n, pixels),
                                            scaled_cap(settings.rpn_post_nms_top_n, pixels))
            pooled = [maps[k] for k in settings.pooled_levels]
            logits, regression = rcnn_glue.box_outputs(self.graphs.box, pooled, proposals, sizes, settings)
        found = rcnn_glue.detections(logits, regression, proposals, sizes, settings,
                                     scaled_cap(settings.detections_per_img, pixels))
        return [(rcnn_glue.to_image_pixels(boxes, size, original), scores, labels)
                for (boxes, scores, labels), size, original in zip(found, sizes, originals)]


def exported_detector(info: BundleInfo) -> bool:
    return info.export is not None and info.export.get("format") == "onnx" and info.export.get("part") == "dense"


def choose_detector_backend(backend: str, info: BundleInfo, directory: str | Path, device: str = "cpu") -> str:
    """``torch``, ``onnxruntime`` or ``openvino`` for ``backend`` (one of :data:`DETECTOR_BACKENDS`) and
    this detector bundle; a clear error when the bundle or the install cannot run the one asked for.
    ``auto`` on a GPU ``device`` is torch (the exported graphs run on the CPU)."""
    if backend not in DETECTOR_BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(DETECTOR_BACKENDS)})")
    exported = exported_detector(info)
    if backend == "auto" and str(device) != "cpu":
        return "torch"
    if backend == "auto":
        return next((name for name in AUTO_ORDER if exported and installed(name)), "torch")
    if backend != "torch":
        if not exported:
            raise BundleError(f"{directory} has no exported detector graph: {export_advice(directory, 'onnx')}, "
                              f"or use --backend torch")
        if not installed(backend):
            raise BundleError(f"--backend {backend} needs {backend}: pip install 'leukoscope[{_EXTRA[backend]}]'")
    return backend


def load_graphs(directory: str | Path, info: BundleInfo, backend: str, threads: int | None = None) -> ExportedGraphs:
    """The graphs of an exported detector bundle (``backend``: onnxruntime or openvino) and its settings."""
    assert info.export is not None
    check_export_matches(directory, info)
    warn_if_full_range(directory, info.export)
    box_file = info.export.get("box_file")
    if not box_file:
        raise BundleError(f"{directory} was exported before detectors had a box graph: run `leukoscope export "
                          f"--bundle ... --format onnx` on its source bundle again, or use --backend torch")
    runner = OnnxGraph if backend == "onnxruntime" else OpenVinoGraph

    def graph(name: str) -> GraphRunner:
        path = Path(directory) / name
        if not path.is_file():
            raise BundleError(f"{directory}: bundle.json records an exported graph but {path.name} is missing")
        return runner(path, threads)

    record = info.export.get("rcnn")
    if record is not None:
        try:
            settings = RcnnSettings.from_record(record)
        except TypeError as exc:  # written by another leukoscope version
            raise BundleError(f"{directory}: bundle.json's export.rcnn is not what this leukoscope reads ({exc}): "
                              f"run `leukoscope export` on its source bundle again") from None
    else:  # exported before the settings were recorded: read them off the torch model (needs torch)
        from leukoscope.bundle import load_bundle
        from leukoscope.inference.detector_export import rcnn_settings

        settings = rcnn_settings(load_bundle(directory, "cpu", task="detect")[0])
    return ExportedGraphs(graph(str(info.export.get("file", ONNX_FILE))), graph(str(box_file)),
                          list(info.export.get("levels", [])), settings)
