"""torchvision classifiers with a new head for ``num_classes``.

``weights`` may be None (random init, the default: works offline), a local file
(ImageNet weights downloaded once elsewhere, or a leukoscope checkpoint), or a
torchvision weight name such as ``"DEFAULT"`` / ``"IMAGENET1K_V1"`` (downloads
through torchvision's own cache; needs internet the first time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torchvision
from torch import nn

from leukoscope.models.registry import register_model
from leukoscope.models.weights import WeightsError, load_backbone_weights

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


def _is_weight_name(weights: object) -> bool:
    return isinstance(weights, str) and not Path(weights).suffix and not Path(weights).exists()


def build_torchvision_classifier(
    arch: str,
    num_classes: int,
    weights: str | Path | None = None,
    freeze_backbone: bool = False,
) -> nn.Module:
    head_path, head_prefixes = _HEADS[arch]
    extra = {"aux_logits": False, "init_weights": weights is None} if arch == "googlenet" else {}
    if _is_weight_name(weights):
        try:
            tv_weights = torchvision.models.get_model_weights(arch)[str(weights)]
        except KeyError:
            raise WeightsError(
                f"{weights!r} is neither a file nor a torchvision weight name for {arch}"
            ) from None
        model = torchvision.models.get_model(arch, weights=tv_weights, **({"aux_logits": False} if arch == "googlenet" else {}))
        weights = None
    else:
        model = torchvision.models.get_model(arch, weights=None, **extra)
    old_head = model.get_submodule(head_path)
    _set_submodule(model, head_path, nn.Linear(old_head.in_features, num_classes))
    if weights is not None:
        load_backbone_weights(model, weights, head_prefixes=head_prefixes)
    if freeze_backbone:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(head_path + ".")
    return model


def _register(arch: str) -> Callable[..., nn.Module]:
    def builder(num_classes: int, weights: str | Path | None = None, freeze_backbone: bool = False) -> nn.Module:
        return build_torchvision_classifier(arch, num_classes, weights, freeze_backbone)

    builder.__doc__ = f"torchvision {arch} with a new {{num_classes}}-way head."
    return register_model(arch)(builder)


for _arch in _HEADS:
    _register(_arch)
