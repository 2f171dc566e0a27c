"""What runs a Faster R-CNN detector's dense part: torch, onnxruntime or OpenVINO.

An exported detector bundle (:mod:`leukoscope.inference.detector_export`) holds the
*dense* part of the network as an ONNX graph: backbone, feature pyramid and the RPN
head's convolutions, for an image batch of any size. That part is where the time goes
(about half of a 640x480 field on a CPU) and it has no per-image caps. Everything that
has caps or data-dependent shapes stays in torch, in the model's own modules: the
normalising and scaling transform, anchors, proposal selection (top-n, NMS), RoIAlign,
the box head, the final NMS and the detections-per-image cap.
:meth:`~leukoscope.inference.detector.CellDetector._limits_for` scales those caps with
the tile area exactly as on the torch path, so an exported detector finds the same
cells on a 640x480 field and on a 2048 px tile (up to the float rounding of the dense
part): exact by construction, where a whole-model graph would freeze the caps of the
image size it was exported at.

``auto`` picks the fastest installed backend the bundle has a graph for
(:data:`AUTO_ORDER`), else torch.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.rpn import concat_box_prediction_layers

from leukoscope.bundle import ONNX_FILE, BundleError, BundleInfo

DETECTOR_BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
#: What ``auto`` tries first for an exported detector (measured on the shipped detector, docs/benchmarks.md).
AUTO_ORDER = ("onnxruntime", "openvino")
#: The extra that installs each graph runtime (pyproject.toml).
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}


def installed(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


class DenseStage(nn.Module):
    """Backbone + feature pyramid + RPN head of a torchvision Faster R-CNN: the exported graph.
    Outputs, flat: the feature maps of every level, then the objectness and box deltas per level."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not (hasattr(model, "rpn") and hasattr(model, "roi_heads") and hasattr(model, "backbone")):
            raise BundleError(f"{type(model).__name__} is not a two-stage (Faster R-CNN) detector: only those "
                              f"are exported so far")
        self.backbone = model.backbone
        self.head = model.rpn.head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(images)
        maps = [features] if isinstance(features, torch.Tensor) else list(features.values())
        objectness, deltas = self.head(maps)
        return (*maps, *objectness, *deltas)


def level_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The feature level names the box head's RoIAlign reads (``"0"`` for a single-map backbone)."""
    with torch.no_grad():
        features = model.backbone(example)
    return ["0"] if isinstance(features, torch.Tensor) else list(features.keys())


class DenseRunner:
    """Runs the dense part on a padded, normalised batch ``(N, 3, H, W)``; ``backend`` names what runs it."""

    backend = ""

    def __call__(self, images: torch.Tensor) -> Sequence[torch.Tensor]:
        raise NotImplementedError


class OnnxDense(DenseRunner):
    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:  # else onnxruntime's default (all cores)
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        # torch runs the rest of the detector right after the graph: onnxruntime's workers must not
        # spin-wait for more work meanwhile, taking the cores torch's threads need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise BundleError(f"{path}: cannot load the exported graph: {str(exc)[:300]}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> Sequence[torch.Tensor]:
        outputs = self.session.run(None, {self.input_name: images.numpy()})
        return [torch.from_numpy(output) for output in outputs]


class OpenVinoDense(DenseRunner):
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

    def __call__(self, images: torch.Tensor) -> Sequence[torch.Tensor]:
        results = self.request.infer({0: images.numpy()})
        # copies: the request reuses its output buffers on the next call
        return [torch.from_numpy(np.array(results[output])) for output in self.compiled.outputs]


def hybrid_forward(model: nn.Module, dense: DenseRunner, levels: Sequence[str],
                   images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Detections of a torchvision Faster R-CNN (eval mode) whose dense part ``dense`` runs: the
    steps of ``GeneralizedRCNN.forward`` and ``RegionProposalNetwork.forward`` around it, in the
    model's own modules (so with the caps currently set on them)."""
    original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    image_list, _ = model.transform(images)
    outputs = dense(image_list.tensors)
    n = len(levels)
    if len(outputs) != 3 * n:
        raise BundleError(f"the exported graph gives {len(outputs)} outputs, the detector expects {3 * n}")
    features = OrderedDict(zip(levels, outputs[:n]))
    objectness, deltas = list(outputs[n:2 * n]), list(outputs[2 * n:])
    rpn = model.rpn
    maps = list(features.values())
    anchors = rpn.anchor_generator(image_list, maps)
    per_level = [int(o[0].numel()) for o in objectness]
    flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(flat_deltas, anchors).view(len(anchors), -1, 4)
    boxes, _ = rpn.filter_proposals(proposals, flat_objectness, image_list.image_sizes, per_level)
    detections, _ = model.roi_heads(features, boxes, image_list.image_sizes)
    return model.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def exported_detector(info: BundleInfo) -> bool:
    return info.export is not None and info.export.get("format") == "onnx" and info.export.get("part") == "dense"


def choose_detector_backend(backend: str, info: BundleInfo, directory: str | Path) -> str:
    """``torch``, ``onnxruntime`` or ``openvino`` for ``backend`` (one of :data:`DETECTOR_BACKENDS`) and
    this detector bundle; a clear error when the bundle or the install cannot run the one asked for."""
    if backend not in DETECTOR_BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(DETECTOR_BACKENDS)})")
    exported = exported_detector(info)
    if backend == "auto":
        return next((name for name in AUTO_ORDER if exported and installed(name)), "torch")
    if backend != "torch":
        if not exported:
            raise BundleError(f"{directory} has no exported detector graph: run `leukoscope export --bundle "
                              f"{directory} --format onnx` first, or use --backend torch")
        if not installed(backend):
            raise BundleError(f"--backend {backend} needs {backend}: pip install 'leukoscope[{_EXTRA[backend]}]'")
    return backend


def load_dense(directory: str | Path, info: BundleInfo, backend: str, threads: int | None = None) -> DenseRunner:
    """The graph runner of an exported detector bundle (``backend``: onnxruntime or openvino)."""
    assert info.export is not None
    path = Path(directory) / str(info.export.get("file", ONNX_FILE))
    if not path.is_file():
        raise BundleError(f"{directory}: bundle.json records an exported graph but {path.name} is missing")
    return OnnxDense(path, threads) if backend == "onnxruntime" else OpenVinoDense(path, threads)
