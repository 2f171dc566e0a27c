"""torchvision classifiers with a new head for ``num_classes``.

``weights`` may be None (random init, the default: works offline), a local file
(ImageNet weights downloaded once elsewhere, or a leukoscope checkpoint), or a
torchvision weight name such as ``"DEFAULT"`` / ``"IMAGENET1K_V1"`` (downloads
through torchvision's own cache; needs internet the first time).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Literal

import torchvision
from torch import nn

from leukoscope.models.registry import register_model
from leukoscope.models.weights import WeightsError, load_backbone_weights, with_named_weights

# name -> (attribute path of the final Linear layer, prefixes that make up the head)
_HEADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mobilenet_v2": ("classifier.1", ("classifier.",)),
    "mobilenet_v3_small": ("classifier.3", ("classifier.",)),
    "resnet18": ("fc", ("fc.",)),
    "resnet50": ("fc", ("fc.",)),
    "vgg16": ("classifier.6", ("classifier.",)),
    "vgg19": ("classifier.6", ("classifier.",)),
    "densenet121": ("classifier", ("classifier",)),
    "efficientnet_b0": ("classifier.1", ("classifier.",)),
    "googlenet": ("fc", ("fc.", "aux")),
    "alexnet": ("classifier.6", ("classifier.",)),
}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


# Architectures whose torchvision builder takes ``norm_layer``.
_NORM_LAYER_ARCHS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet50", "efficientnet_b0")
GROUP_NORM_GROUPS = 8


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm of 8 groups (fewer when ``channels`` does not divide): the statistics come from
    each image alone, not from a batch of one lab's images (robustness across labs)."""
    return nn.GroupNorm(math.gcd(GROUP_NORM_GROUPS, channels), channels)


def _is_weight_name(weights: object) -> bool:
    return isinstance(weights, str) and not Path(weights).suffix and not Path(weights).exists()


def build_torchvision_classifier(
    arch: str,
    num_classes: int,
    weights: str | Path | None = None,
    freeze_backbone: bool = False,
    norm: Literal["batch", "group"] = "batch",
) -> nn.Module:
    head_path, head_prefixes = _HEADS[arch]
    extra: dict = {"aux_logits": False, "init_weights": weights is None} if arch == "googlenet" else {}
    if norm == "group":
        if arch not in _NORM_LAYER_ARCHS:
            raise ValueError(f"norm 'group' needs an architecture that takes a norm layer: {', '.join(_NORM_LAYER_ARCHS)}")
        if _is_weight_name(weights):
            raise ValueError(f"torchvision's {weights!r} weights are for BatchNorm; norm 'group' trains from "
                             f"random weights or a GroupNorm checkpoint")
        extra["norm_layer"] = group_norm
    elif norm != "batch":
        raise ValueError(f"unknown norm {norm!r} (expected 'batch' or 'group')")
    if _is_weight_name(weights):
        try:
            tv_weights = torchvision.models.get_model_weights(arch)[str(weights)]
        except KeyError:
            raise WeightsError(
                f"{weights!r} is neither a file nor a torchvision weight name for {arch}"
            ) from None
        model = with_named_weights(lambda: torchvision.models.get_model(
            arch, weights=tv_weights, **({"aux_logits": False} if arch == "googlenet" else {})), tv_weights)
        weights = None
    else:
        model = torchvision.models.get_model(arch, weights=None, **extra)
    old_head = model.get_submodule(head_path)
    _set_submodule(model, head_path, nn.Linear(old_head.in_features, num_classes))
    if weights is not None:
        load_backbone_weights(model, weights, head_prefixes=head_prefixes, class_layer_only=True)
    if freeze_backbone:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(head_path + ".")
    return model


def _register(arch: str) -> Callable[..., nn.Module]:
    def builder(num_classes: int, weights: str | Path | None = None, freeze_backbone: bool = False,
                norm: Literal["batch", "group"] = "batch") -> nn.Module:
        return build_torchvision_classifier(arch, num_classes, weights, freeze_backbone, norm)

    builder.__doc__ = f"torchvision {arch} with a new head for the data's classes."
    return register_model(arch)(builder)


for _arch in _HEADS:
    _register(_arch)
