"""What runs a Faster R-CNN detector's graphs: torch, onnxruntime or OpenVINO.

An exported detector bundle (:mod:`leukoscope.inference.detector_export`) holds two ONNX
graphs. The *dense* part (``model.onnx``): backbone, feature pyramid and the RPN head's
convolutions, for an image batch of any size. The *box* part (``box_head.onnx``, bundles
exported since it was added): RoIAlign over given regions of each feature level, the box
head and the class layer, for any number of regions (torchvision's RoIAlign is
single-threaded; onnxruntime's and OpenVINO's use every thread given). Those two are where
the time goes, and neither has per-image caps. Everything that has caps or chooses
regions stays in torch, in the model's own modules: the normalising and scaling
transform, anchors, proposal selection (top-n, NMS), which feature level pools each
proposal, the final NMS and the detections-per-image cap.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import roi_align
# torchvision's own helpers of MultiScaleRoIAlign: the box graph must pool exactly as it does
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from leukoscope.bundle import ONNX_FILE, BundleError, BundleInfo, check_export_matches

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


class BoxStage(nn.Module):
    """RoIAlign + box head + class layer of a torchvision Faster R-CNN: the exported box graph.

    Inputs, flat: the feature maps of the levels the box pooler reads, then per level the
    regions it pools there, ``(n, 5)`` rows of (image index, x1, y1, x2, y2) already multiplied
    by that level's scale (a power of two, so exact; the graph's RoIAlign then uses scale 1 and
    fits any image size). Outputs: class logits and box regression of the regions, level by
    level in input order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        pool = model.roi_heads.box_roi_pool
        self.levels = len(pool.featmap_names)
        self.output_size = pool.output_size
        self.sampling_ratio = pool.sampling_ratio
        self.head = model.roi_heads.box_head
        self.predictor = model.roi_heads.box_predictor

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, regions = inputs[:self.levels], inputs[self.levels:]
        pooled = torch.cat([roi_align(level_map, level_regions, self.output_size, 1.0, self.sampling_ratio, False)
                            for level_map, level_regions in zip(maps, regions)])
        return self.predictor(self.head(pooled))


class GraphRunner:
    """Runs one exported graph on torch tensors (inputs in the graph's order); ``backend`` names what runs it."""

    backend = ""

    def __call__(self, *inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        raise NotImplementedError


class OnnxGraph(GraphRunner):
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
        self.input_names = [node.name for node in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        outputs = self.session.run(None, {name: x.numpy() for name, x in zip(self.input_names, inputs)})
        return [torch.from_numpy(output) for output in outputs]


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

    def __call__(self, *inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        results = self.request.infer({k: x.numpy() for k, x in enumerate(inputs)})
        # copies: the request reuses its output buffers on the next call
        return [torch.from_numpy(np.array(results[output])) for output in self.compiled.outputs]


@dataclass
class ExportedGraphs:
    """The graphs of an exported detector bundle, ready to run: ``box`` is None for bundles
    exported before the box graph existed (torch then runs RoIAlign and the box head)."""

    dense: GraphRunner
    levels: list[str]
    box: GraphRunner | None = None

    @property
    def backend(self) -> str:
        return self.dense.backend


def box_detections(model: nn.Module, box: GraphRunner, features: dict[str, torch.Tensor],
                   proposals: list[torch.Tensor], image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """``model.roi_heads(features, proposals, image_sizes)`` (eval mode) with the box graph ``box``
    pooling and classifying: the pooler's own level choice and scales, then its own postprocessing."""
    heads = model.roi_heads
    pool = heads.box_roi_pool
    maps = [features[name] for name in pool.featmap_names]
    if pool.scales is None or pool.map_levels is None:  # as MultiScaleRoIAlign.forward sets them up
        pool.scales, pool.map_levels = _setup_scales(maps, image_sizes, pool.canonical_scale, pool.canonical_level)
    regions = _convert_to_roi_format(proposals)
    levels = (pool.map_levels(proposals) if len(maps) > 1
              else torch.zeros(len(regions), dtype=torch.int64))
    members = [torch.where(levels == k)[0] for k in range(len(maps))]
    scaled = []
    for k, index in enumerate(members):
        level_regions = regions[index]
        level_regions[:, 1:] *= pool.scales[k]
        scaled.append(level_regions)
    logits, regression = box(*maps, *scaled)
    order = torch.cat(members)  # the graph's rows are level by level: back to the proposals' order
    class_logits = torch.empty_like(logits)
    class_logits[order] = logits
    box_regression = torch.empty_like(regression)
    box_regression[order] = regression
    boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
    return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]


def hybrid_forward(model: nn.Module, graphs: ExportedGraphs,
                   images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Detections of a torchvision Faster R-CNN (eval mode) whose dense part (and box part, when
    exported) ``graphs`` run: the steps of ``GeneralizedRCNN.forward`` and
    ``RegionProposalNetwork.forward`` around them, in the model's own modules (so with the caps
    currently set on them)."""
    original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    image_list, _ = model.transform(images)
    outputs = graphs.dense(image_list.tensors)
    n = len(graphs.levels)
    if len(outputs) != 3 * n:
        raise BundleError(f"the exported graph gives {len(outputs)} outputs, the detector expects {3 * n}")
    features = OrderedDict(zip(graphs.levels, outputs[:n]))
    objectness, deltas = list(outputs[n:2 * n]), list(outputs[2 * n:])
    rpn = model.rpn
    maps = list(features.values())
    anchors = rpn.anchor_generator(image_list, maps)
    per_level = [int(o[0].numel()) for o in objectness]
    flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(flat_deltas, anchors).view(len(anchors), -1, 4)
    boxes, _ = rpn.filter_proposals(proposals, flat_objectness, image_list.image_sizes, per_level)
    if graphs.box is None:
        detections, _ = model.roi_heads(features, boxes, image_list.image_sizes)
    else:
        detections = box_detections(model, graphs.box, features, boxes, image_list.image_sizes)
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


def load_graphs(directory: str | Path, info: BundleInfo, backend: str, threads: int | None = None) -> ExportedGraphs:
    """The graph runners of an exported detector bundle (``backend``: onnxruntime or openvino)."""
    assert info.export is not None
    check_export_matches(directory, info)
    runner = OnnxGraph if backend == "onnxruntime" else OpenVinoGraph

    def graph(name: str) -> GraphRunner:
        path = Path(directory) / name
        if not path.is_file():
            raise BundleError(f"{directory}: bundle.json records an exported graph but {path.name} is missing")
        return runner(path, threads)

    box_file = info.export.get("box_file")
    return ExportedGraphs(graph(str(info.export.get("file", ONNX_FILE))), list(info.export.get("levels", [])),
                          graph(str(box_file)) if box_file else None)
