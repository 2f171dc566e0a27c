"""Export a cell detector bundle's network as ONNX graphs: ``leukoscope export`` on a detector.

The exported bundle is a copy of the source bundle plus two graphs, recorded in
``bundle.json``'s ``export`` entry (format 4) with ``"part": "dense"``:

- ``model.onnx``: the backbone, feature pyramid and RPN head of a torchvision Faster R-CNN
  (:class:`DenseStage`): input the model's
  normalised, scaled and padded batch ``(batch, 3, H, W)`` (H, W any multiple of the
  transform's 32), outputs the feature maps of every level and the RPN's objectness and
  box deltas per level;
- ``box_head.onnx`` (``box_file``): RoIAlign, box head and class layer
  (:class:`BoxStage`): inputs the feature maps the
  box pooler reads and the regions pooled on each, outputs class logits and box regression.

With ``--int8 --calibration FIELDS`` both graphs are int8 (``"precision": "int8"``):
the dense graph calibrated on the fields, the box graph's fully connected layers dynamically
(:func:`~leukoscope.inference.quantize.quantize_detector_graphs`).

The rest of the detector (the transform, proposal selection, which level pools each proposal,
NMS, the per-image caps that grow with the tile area) runs in numpy between the graphs, with the
model's settings recorded here (``"rcnn"``, :func:`rcnn_settings`): why, in
:mod:`leukoscope.inference.detector_runtime` and :mod:`leukoscope.inference.rcnn_glue`.

Exporter: torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``, as for
classifiers (:mod:`leukoscope.inference.export`). FCOS detectors are refused (one stage:
its caps sit inside what would be the graph's head).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import roi_align

from leukoscope.bundle import (BOX_ONNX_FILE, ONNX_FILE, BundleError, copy_bundle, load_bundle,
                               save_export, weights_digest)
from leukoscope.inference.export import check_graph
from leukoscope.inference.rcnn_glue import RcnnSettings
from leukoscope.pretrained import resolve_bundle

INPUT_NAME = "images"
BOX_OUTPUTS = ("class_logits", "box_regression")
#: Height and width of the example batch the graph is traced with (both axes are dynamic).
EXAMPLE_SIZE = (256, 320)
#: The box graph's RoIAlign needs the opset-16 operator (torchvision's "output_half_pixel" mode).
MIN_BOX_OPSET = 16


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


def rcnn_settings(model: nn.Module) -> RcnnSettings:
    """What :mod:`leukoscope.inference.rcnn_glue` needs of ``model`` (a leukoscope Faster R-CNN), read
    off its modules as they are set for a 640x480 field."""
    from leukoscope.models.detectors import FixedScaleTransform

    transform, rpn, heads = model.transform, model.rpn, model.roi_heads
    if not isinstance(transform, FixedScaleTransform):
        raise BundleError(f"{type(transform).__name__}: only detectors with leukoscope's fixed-scale transform "
                          f"are exported")
    if rpn.box_coder.bbox_xform_clip != heads.box_coder.bbox_xform_clip:
        raise BundleError("the RPN and the box head clip box deltas differently: not supported by the export")
    pool = heads.box_roi_pool
    levels = level_names(model, torch.zeros(1, 3, 64, 64))
    return RcnnSettings(
        input_scale=float(transform.scale), image_mean=tuple(float(v) for v in transform.image_mean),
        image_std=tuple(float(v) for v in transform.image_std), size_divisible=int(transform.size_divisible),
        cell_anchors=tuple(tuple(tuple(float(v) for v in row) for row in cell.tolist())
                           for cell in rpn.anchor_generator.cell_anchors),
        rpn_pre_nms_top_n=int(rpn._pre_nms_top_n["testing"]), rpn_post_nms_top_n=int(rpn._post_nms_top_n["testing"]),
        rpn_nms_thresh=float(rpn.nms_thresh), rpn_score_thresh=float(rpn.score_thresh),
        rpn_min_size=float(rpn.min_size), rpn_box_weights=tuple(float(w) for w in rpn.box_coder.weights),
        box_score_thresh=float(heads.score_thresh), box_nms_thresh=float(heads.nms_thresh),
        detections_per_img=int(heads.detections_per_img),
        box_weights=tuple(float(w) for w in heads.box_coder.weights),
        bbox_xform_clip=float(rpn.box_coder.bbox_xform_clip),
        pooled_levels=tuple(levels.index(name) for name in pool.featmap_names),
        canonical_scale=int(pool.canonical_scale), canonical_level=int(pool.canonical_level))


def export_detector_onnx(bundle: str | Path, out: str | Path, *, opset: int, calibration: str | Path | None = None,
                         show_progress: bool = False) -> Path:
    """Write the exported bundle of detector ``bundle`` into ``out`` (which may be ``bundle`` itself:
    then only ``model.onnx``, ``box_head.onnx`` and the ``export`` entry are added); returns ``out``.
    ``calibration``: a folder of fields to quantize the graphs to int8 with
    (:func:`~leukoscope.inference.quantize.quantize_detector_graphs`); None: float32."""
    if opset < MIN_BOX_OPSET:
        raise BundleError(f"a detector's box graph needs ONNX opset >= {MIN_BOX_OPSET} (RoIAlign), got {opset}")
    paths = None
    if calibration is not None:
        from leukoscope.inference.quantize import detector_calibration_paths

        paths = detector_calibration_paths(calibration)  # a bad folder fails at once
    source = resolve_bundle(bundle)
    model, info = load_bundle(source, "cpu", task="detect")
    model.eval()
    if info.framework != "torch":
        raise BundleError(f"{source} is not a torch detector: it cannot be exported")
    stage = DenseStage(model).eval()
    example = torch.zeros(1, 3, *EXAMPLE_SIZE)
    levels = level_names(model, example)
    names = [f"{kind}_{level}" for kind in ("features", "objectness", "deltas") for level in levels]
    with torch.no_grad():
        shapes = stage(example)
    out = Path(out)
    in_place = out.resolve() == source.resolve()
    if not in_place:
        copy_bundle(source, out, with_info=False)  # bundle.json comes last, with the graphs' record
    graph_tmp = out / (ONNX_FILE + ".tmp")
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
            **{name: {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} for name in names}}
    box_tmp = out / (BOX_ONNX_FILE + ".tmp")
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice: chosen on purpose
        warnings.simplefilter("ignore")
        torch.onnx.export(stage, (example,), str(graph_tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=names, dynamic_axes=axes)
        box_inputs = export_box_graph(model, dict(zip(levels, shapes)), box_tmp, opset)
    check_graph(graph_tmp)
    check_graph(box_tmp)
    record = detector_record(info.model_name, levels, names, shapes, opset, source, info.model_options)
    settings = rcnn_settings(model)
    record["rcnn"] = settings.to_record()
    if paths is not None:
        from leukoscope.inference.detector import CellDetector
        from leukoscope.inference.quantize import quantize_detector_graphs
        from leukoscope.progress import progress_bar

        quantized = [tmp.with_suffix(".int8.tmp") for tmp in (graph_tmp, box_tmp)]  # copy_bundle skips *.tmp
        try:
            with progress_bar(len(paths), "calibrating int8", enabled=show_progress) as update:
                record.update(quantize_detector_graphs(graph_tmp, quantized[0], box_tmp, quantized[1], paths,
                                                       CellDetector(model, info), settings, INPUT_NAME, update))
        except BaseException:
            for path in quantized:
                path.unlink(missing_ok=True)
            raise
        finally:
            graph_tmp.unlink(missing_ok=True)
            box_tmp.unlink(missing_ok=True)
        quantized[0].replace(graph_tmp)
        quantized[1].replace(box_tmp)
        record["calibration_data"] = str(calibration)
    graph_tmp.replace(out / ONNX_FILE)
    box_tmp.replace(out / BOX_ONNX_FILE)
    record.update(box_file=BOX_ONNX_FILE, box_inputs=box_inputs, box_outputs=list(BOX_OUTPUTS))
    save_export(out, record, None if in_place else info)
    return out


def export_box_graph(model: torch.nn.Module, features: dict[str, torch.Tensor], path: Path, opset: int) -> list[str]:
    """Write the :class:`BoxStage` graph of ``model`` to ``path``, traced on ``features`` (the dense
    part's example maps, by level name) with one region per level; returns its input names."""
    stage = BoxStage(model).eval()
    pooled = list(model.roi_heads.box_roi_pool.featmap_names)
    maps = [features[name] for name in pooled]
    regions = [torch.tensor([[0.0, 1.0, 1.0, 4.0, 4.0]]) for _ in pooled]
    map_names = [f"features_{name}" for name in pooled]
    region_names = [f"regions_{name}" for name in pooled]
    axes = {**{name: {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} for name in map_names},
            **{name: {0: f"{name}_count"} for name in region_names},
            **{name: {0: "regions"} for name in BOX_OUTPUTS}}
    torch.onnx.export(stage, (*maps, *regions), str(path), dynamo=False, opset_version=opset,
                      input_names=map_names + region_names, output_names=list(BOX_OUTPUTS), dynamic_axes=axes)
    return map_names + region_names


def detector_record(model_name: str, levels: list[str], names: list[str], example: tuple[torch.Tensor, ...],
                    opset: int, source: Path, model_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``export`` entry of a detector's ``bundle.json``: what the graph takes and gives."""
    return {
        "format": "onnx",
        "file": ONNX_FILE,
        "part": "dense",
        "precision": "float32",
        "opset": opset,
        "exporter": f"torch.onnx (TorchScript) {torch.__version__}",
        "inputs": [{"name": INPUT_NAME, "shape": ["batch", 3, "height", "width"], "dtype": "float32",
                    "preprocessing": "the model's transform: RGB in [0, 1] scaled by input_scale, mean/std "
                                     "normalised, padded to a multiple of 32"}],
        "outputs": [{"name": name, "shape": ["batch", int(tensor.shape[1]), "h", "w"], "dtype": "float32"}
                    for name, tensor in zip(names, example)],
        "levels": levels,
        "model_name": model_name,
        # What the graph was made from: a bundle whose weights or options change no longer matches it.
        "weights_sha256": weights_digest(source),
        "model_options": dict(model_options or {}),
    }
