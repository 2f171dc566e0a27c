"""Cell detectors in the model registry (``kind="detector"``).

- ``fasterrcnn_abas``: Faster R-CNN on system A's small custom CNN (the conv
  stack of :class:`~leukoscope.models.seed_cnns.AbasCNN`, 128 channels, stride
  16), optionally initialised from an ``abas_cnn`` classifier (``backbone_weights``:
  a leukoscope bundle folder or its ``model.safetensors``), as the paper did.
- ``fasterrcnn_mobilenet_v3_fpn``: Faster R-CNN, MobileNetV3-Large + FPN on
  strides 8/16/32 (torchvision's own variant only uses stride 32, too coarse
  for platelets). The fast default.
- ``fasterrcnn_resnet50_fpn``: Faster R-CNN, ResNet50 + FPN (P2-P6).
- ``fcos_resnet50_fpn``: FCOS, a single-stage anchor-free detector, ResNet50 + FPN.

Conventions shared by every builder:

- ``num_classes`` is the number of object classes (cell types), *without* the
  background; model labels are ``1..num_classes`` in the order of the bundle's
  ``classes``.
- Images are scaled by a fixed ``input_scale`` (model pixels per image pixel)
  instead of torchvision's resize-to-``min_size``: a microscope's pixel size is a
  physical constant, so a 640x480 field and a 2592x1944 field from the same
  camera are seen at the same cell size. 0.5 makes 640x480 fields 320x240 (cells
  of 20-150 px), four times cheaper on a CPU.
- ``anchor_sizes`` are given in *image* pixels (scaled with ``input_scale``),
  matched to blood cells: platelets 25-70 px, red cells 65-140 px, white cells
  95-290 px in 640x480 BCCD/CBC fields.
- ``roi_batch_size``: proposals sampled per image to train the box head (256;
  fewer is faster on a CPU, whose RoIAlign backward is single-threaded).
- ``roi_sampling_ratio`` (two-stage detectors): bilinear samples per side of each of
  RoIAlign's 7x7 bins (torchvision's 2). Pooling runs once per proposal: with the box head it
  took ~44% of the shipped detector's time on a CPU; at input scale 0.5 most bins are under a feature
  pixel wide, so one sample (1) gives the shipped detector the same accuracy at a quarter
  of the pooling work (docs/benchmarks.md, "Detector speed, third round").
- ``weights=None`` and random backbones by default (works offline).
  ``backbone_weights`` takes a local file (or a torchvision weight name, which
  needs internet); ``weights`` a local state dict of the whole detector (a
  :class:`~leukoscope.models.weights.WithoutHead` one: all but the class layer, to
  fine-tune a trained detector on other classes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from leukoscope.models.proposals import PrefixNmsRPN
from leukoscope.models.registry import register_model
from leukoscope.models.seed_cnns import AbasCNN
from leukoscope.models.weights import (WeightsError, WithoutHead, load_backbone_weights, read_state_dict,
                                       with_named_weights)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEFAULT_INPUT_SCALE = 0.5
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


class FixedScaleTransform(GeneralizedRCNNTransform):
    """Normalise and scale every image by ``scale`` (times a random factor in
    ``jitter`` while training); boxes follow. Replaces min_size/max_size resizing.

    Images come as floats in [0, 1] or as uint8 (made float here). Unlike torchvision, which
    normalises and then resizes, this scales first and normalises the scaled image: the same
    pixels (to 1e-6), with a quarter of the normalising work at ``scale`` 0.5 (0.09 -> 0.04 s
    for a 1456x1944 tile)."""

    def __init__(self, scale: float = 1.0, jitter: tuple[float, float] = (1.0, 1.0),
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 size_divisible: int = 32) -> None:
        if not 0.05 <= scale <= 4.0:
            raise ValueError(f"input_scale must be between 0.05 and 4, got {scale}")
        super().__init__(min_size=1, max_size=1, image_mean=list(image_mean), image_std=list(image_std),
                         size_divisible=size_divisible)
        self.scale = float(scale)
        self.jitter = (float(jitter[0]), float(jitter[1]))

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image  # torchvision's forward calls this before resize: done in resize, after scaling

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):
        if image.dtype == torch.uint8:
            image = image.float().div_(255.0)
        elif not image.is_floating_point():
            raise TypeError(f"a detector takes float images in [0, 1] or uint8 images, not {image.dtype}")
        h, w = image.shape[-2:]
        factor = self.scale
        if self.training and self.jitter != (1.0, 1.0):
            factor *= float(torch.empty(1).uniform_(*self.jitter))
        new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
        if (new_h, new_w) != (h, w):
            image = nn.functional.interpolate(image[None], size=(new_h, new_w), mode="bilinear",
                                              align_corners=False, antialias=factor < 1)[0]
        if target is not None and "boxes" in target:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), (new_h, new_w))
        return super().normalize(image), target

    def extra_repr(self) -> str:
        return f"scale={self.scale}, jitter={self.jitter}"


def _anchor_generator(sizes: Sequence[Sequence[float]], scale: float,
                      ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS) -> AnchorGenerator:
    scaled = tuple(tuple(max(4, round(s * scale)) for s in level) for level in sizes)
    return AnchorGenerator(scaled, (tuple(ratios),) * len(scaled))


def _check_levels(anchor_sizes: Sequence[Sequence[float]], levels: int, name: str) -> list[list[float]]:
    sizes = [list(level) if isinstance(level, (list, tuple)) else [level] for level in anchor_sizes]
    if len(sizes) != levels:
        raise ValueError(f"{name}: anchor_sizes needs {levels} feature levels, got {len(sizes)}")
    if len({len(level) for level in sizes}) != 1:
        raise ValueError(f"{name}: every level of anchor_sizes needs the same number of sizes")
    return sizes


def _is_weight_name(value: object) -> bool:
    return isinstance(value, str) and not Path(value).suffix and not Path(value).exists()


def _classifier_state(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of a classifier: a leukoscope bundle folder, or a weights file."""
    path = Path(path)
    if path.is_dir():
        info = path / "bundle.json"
        if not info.is_file():
            raise WeightsError(f"{path}: a folder given as backbone weights must be a leukoscope bundle")
        path = path / "model.safetensors"
    return read_state_dict(path)


def _load_prefixed(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, source: str) -> int:
    """Load ``state[prefix + key]`` into ``module[key]``; every tensor of ``module`` must be found."""
    own = module.state_dict()
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = [k for k in own if k not in picked and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{source}: no backbone weights for {len(missing)} tensors (e.g. {missing[:3]}); "
                           f"is it a checkpoint of the same architecture?")
    for key, value in picked.items():
        if key in own and own[key].shape != value.shape:
            raise WeightsError(f"{source}: tensor {prefix}{key} has shape {tuple(value.shape)}, "
                               f"the backbone expects {tuple(own[key].shape)}")
    module.load_state_dict({k: v for k, v in picked.items() if k in own}, strict=False)
    return len(picked)


def _class_layers(model: nn.Module) -> tuple[str, ...]:
    """The tensors whose shape depends on the classes: Faster R-CNN's box predictor, FCOS's class logits."""
    return ("head.classification_head.cls_logits.",) if isinstance(model, FCOS) else ("roi_heads.box_predictor.",)


def _finish(model: nn.Module, *, input_scale: float, scale_jitter: Sequence[float],
            weights: str | Path | WithoutHead | None,
            freeze_backbone: bool, backbone: nn.Module) -> nn.Module:
    model.transform = FixedScaleTransform(input_scale, tuple(scale_jitter))
    if isinstance(model, FasterRCNN):  # the same proposals, found faster (models/proposals.py)
        PrefixNmsRPN.adopt(model.rpn)
    if isinstance(weights, WithoutHead):  # a trained detector fine-tuned on other classes: a new class layer
        load_backbone_weights(model, weights, head_prefixes=_class_layers(model))
    elif weights is not None:
        state = read_state_dict(weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{weights}: does not fit this detector: {str(exc)[:300]}") from None
    if freeze_backbone:
        for parameter in backbone.parameters():
            parameter.requires_grad = False
    return model


def _roi_pool(levels: Sequence[str], sampling_ratio: int) -> MultiScaleRoIAlign:
    if type(sampling_ratio) is not int or sampling_ratio < 0:  # noqa: E721 - bool is an int, and not one here
        raise ValueError(f"roi_sampling_ratio must be a whole number >= 0 (0: adaptive), got {sampling_ratio!r}")
    return MultiScaleRoIAlign(list(levels), output_size=7, sampling_ratio=sampling_ratio)


def _rcnn_options(num_classes: int, score_thresh: float, detections_per_img: int, nms_thresh: float,
                  roi_batch_size: int = 256, **extra: Any) -> dict[str, Any]:
    options = dict(
        num_classes=num_classes + 1,
        min_size=1, max_size=1,  # replaced by FixedScaleTransform
        box_score_thresh=score_thresh,
        box_nms_thresh=nms_thresh,
        box_detections_per_img=detections_per_img,
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=200,
        rpn_batch_size_per_image=256,
        box_batch_size_per_image=roi_batch_size,
    )
    options.update(extra)
    return options


# --------------------------------------------------------------------------- system A
class _AbasBackbone(nn.Module):
    """AbasCNN's conv stack as a detection backbone (128 channels, stride 16)."""

    out_channels = AbasCNN.out_channels

    def __init__(self) -> None:
        super().__init__()
        self.features = AbasCNN(num_classes=2).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model("fasterrcnn_abas", kind="detector")
def fasterrcnn_abas(
    num_classes: int,
    weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
    freeze_backbone: bool = False,
    input_scale: float = DEFAULT_INPUT_SCALE,
    scale_jitter: Sequence[float] = (1.0, 1.0),
    anchor_sizes: Sequence[Sequence[float]] = ((24, 40, 64, 96, 128, 176, 256, 352),),
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    representation_size: int = 512,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    roi_batch_size: int = 256,
    roi_sampling_ratio: int = 2,
) -> FasterRCNN:
    """System A: Faster R-CNN on the paper's custom 4-conv CNN (backbone_weights: an abas_cnn bundle)."""
    backbone = _AbasBackbone()
    if backbone_weights is not None:
        state = _classifier_state(backbone_weights)
        _load_prefixed(backbone.features, state, "features.", str(backbone_weights))
    sizes = _check_levels(anchor_sizes, 1, "fasterrcnn_abas")
    options = _rcnn_options(num_classes, score_thresh, detections_per_img, nms_thresh, roi_batch_size)
    options.pop("num_classes")
    model = FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=_anchor_generator(sizes, input_scale, aspect_ratios),
        box_roi_pool=_roi_pool(["0"], roi_sampling_ratio),
        box_head=TwoMLPHead(backbone.out_channels * 49, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        **options,
    )
    return _finish(model, input_scale=input_scale, scale_jitter=scale_jitter, weights=weights,
                   freeze_backbone=freeze_backbone, backbone=backbone)


# --------------------------------------------------------------------------- torchvision backbones
def _norm_layer(pretrained: bool):
    # From scratch the BatchNorm statistics must be learnt; a pretrained body keeps them frozen.
    return FrozenBatchNorm2d if pretrained else nn.BatchNorm2d


def _torchvision_body(arch: str, backbone_weights: str | Path | None) -> tuple[nn.Module, bool]:
    """A torchvision classifier to take the backbone from, with local or named weights."""
    pretrained = backbone_weights is not None
    builder = getattr(torchvision.models, arch)
    if _is_weight_name(backbone_weights):
        try:
            named = torchvision.models.get_model_weights(arch)[str(backbone_weights)]
        except KeyError:
            raise WeightsError(f"{backbone_weights!r} is neither a file nor a torchvision weight name for {arch}") from None
        return with_named_weights(lambda: builder(weights=named, norm_layer=_norm_layer(True)), named), True
    body = builder(weights=None, norm_layer=_norm_layer(pretrained))
    if backbone_weights is not None:
        state = _classifier_state(backbone_weights)
        if any(k.startswith("backbone.") for k in state):  # a wrapped leukoscope checkpoint
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        head = ("fc.",) if arch.startswith("resnet") else ("classifier.",)
        own = body.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in usable and not k.startswith(head) and "num_batches" not in k]
        if missing:
            raise WeightsError(f"{backbone_weights}: not a {arch} checkpoint ({len(missing)} tensors missing, "
                               f"e.g. {missing[:3]})")
        body.load_state_dict(usable, strict=False)
    return body, pretrained


@register_model("fasterrcnn_mobilenet_v3_fpn", kind="detector")
def fasterrcnn_mobilenet_v3_fpn(
    num_classes: int,
    weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
    freeze_backbone: bool = False,
    input_scale: float = DEFAULT_INPUT_SCALE,
    scale_jitter: Sequence[float] = (1.0, 1.0),
    anchor_sizes: Sequence[Sequence[float]] = ((24, 40, 64), (96, 128, 176), (224, 288, 384)),
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    roi_batch_size: int = 256,
    roi_sampling_ratio: int = 2,
    fpn_channels: int = 128,
    representation_size: int = 1024,
) -> FasterRCNN:
    """Faster R-CNN, MobileNetV3-Large + FPN (strides 8/16/32): fast on a CPU.

    ``representation_size``: width of the box head's two fully connected layers
    (torchvision's 1024 holds 7.5 of the 11.2 M parameters; 256 makes a 5.4 M model,
    small enough to ship)."""
    body, _ = _torchvision_body("mobilenet_v3_large", backbone_weights)
    # The last block of each stride: 6 (stride 8, 40 ch), 12 (16, 112 ch), 16 (32, 960 ch).
    # 128 FPN channels instead of torchvision's 256: the 3x3 FPN and RPN convolutions on
    # the stride-8 map dominate the CPU time, and cost 4x less.
    backbone = BackboneWithFPN(body.features, {"6": "0", "12": "1", "16": "2"}, [40, 112, 960], fpn_channels,
                               extra_blocks=LastLevelMaxPool())
    sizes = _check_levels(anchor_sizes, 3, "fasterrcnn_mobilenet_v3_fpn")
    generator = _anchor_generator(sizes + [sizes[-1]], input_scale, aspect_ratios)  # 'pool' level reuses the last
    model = FasterRCNN(
        backbone,
        rpn_anchor_generator=generator,
        box_roi_pool=_roi_pool(["0", "1", "2"], roi_sampling_ratio),
        **_rcnn_options(num_classes, score_thresh, detections_per_img, nms_thresh, roi_batch_size),
    )
    if representation_size != 1024:
        # Replaced after construction so that the default model draws its random weights
        # in the same order as before the option existed (seeded runs reproduce).
        model.roi_heads.box_head = TwoMLPHead(fpn_channels * 49, representation_size)
        model.roi_heads.box_predictor = FastRCNNPredictor(representation_size, num_classes + 1)
    return _finish(model, input_scale=input_scale, scale_jitter=scale_jitter, weights=weights,
                   freeze_backbone=freeze_backbone, backbone=backbone.body)


@register_model("fasterrcnn_resnet50_fpn", kind="detector")
def fasterrcnn_resnet50_fpn(
    num_classes: int,
    weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
    freeze_backbone: bool = False,
    input_scale: float = DEFAULT_INPUT_SCALE,
    scale_jitter: Sequence[float] = (1.0, 1.0),
    anchor_sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    trainable_backbone_layers: int | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    roi_batch_size: int = 256,
    roi_sampling_ratio: int = 2,
) -> FasterRCNN:
    """Faster R-CNN, ResNet50 + FPN (P2-P6), as torchvision's but with cell-sized anchors."""
    body, pretrained = _torchvision_body("resnet50", backbone_weights)
    layers = trainable_backbone_layers if trainable_backbone_layers is not None else (3 if pretrained else 5)
    backbone = _resnet_fpn_extractor(body, layers)
    sizes = _check_levels(anchor_sizes, 5, "fasterrcnn_resnet50_fpn")
    model = FasterRCNN(
        backbone,
        rpn_anchor_generator=_anchor_generator(sizes, input_scale, aspect_ratios),
        box_roi_pool=_roi_pool(["0", "1", "2", "3"], roi_sampling_ratio),  # torchvision's levels
        **_rcnn_options(num_classes, score_thresh, detections_per_img, nms_thresh, roi_batch_size),
    )
    return _finish(model, input_scale=input_scale, scale_jitter=scale_jitter, weights=weights,
                   freeze_backbone=freeze_backbone, backbone=backbone.body)


@register_model("fcos_resnet50_fpn", kind="detector")
def fcos_resnet50_fpn(
    num_classes: int,
    weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
    freeze_backbone: bool = False,
    input_scale: float = DEFAULT_INPUT_SCALE,
    scale_jitter: Sequence[float] = (1.0, 1.0),
    trainable_backbone_layers: int | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> FCOS:
    """FCOS (single-stage, anchor-free), ResNet50 + FPN P3-P7."""
    body, pretrained = _torchvision_body("resnet50", backbone_weights)
    layers = trainable_backbone_layers if trainable_backbone_layers is not None else (3 if pretrained else 5)
    backbone = _resnet_fpn_extractor(body, layers, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    model = _CellFCOS(
        backbone,
        num_classes=num_classes + 1,
        min_size=1, max_size=1,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=500,
    )
    return _finish(model, input_scale=input_scale, scale_jitter=scale_jitter, weights=weights,
                   freeze_backbone=freeze_backbone, backbone=backbone.body)


class _CellFCOS(FCOS):
    """FCOS scores every class channel, including the unused background channel 0
    (labels are 1..num_classes as for Faster R-CNN): never report it."""

    def postprocess_detections(self, head_outputs, anchors, image_sizes):
        detections = super().postprocess_detections(head_outputs, anchors, image_sizes)
        for detection in detections:
            keep = detection["labels"] > 0
            for key in ("boxes", "scores", "labels"):
                detection[key] = detection[key][keep]
        return detections


def create_detector(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build a registered detector for ``num_classes`` object classes (background not counted)."""
    from leukoscope.models.registry import model_entry

    entry = model_entry(name)
    if entry.kind != "detector":
        raise ValueError(f"{name!r} is a {entry.kind}, not a detector; detectors: "
                         f"{', '.join(list_detectors())}")
    if num_classes < 1:
        raise ValueError(f"a detector needs at least one object class, got num_classes={num_classes}")
    return entry.builder(num_classes=num_classes, **options)


def list_detectors() -> list[str]:
    from leukoscope.models.registry import list_models

    return list_models("detector")


def describe_options(options: dict[str, Any]) -> str:
    return json.dumps(options, default=str)
