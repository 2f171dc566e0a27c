"""Loading weights from local files into a model whose head may differ."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the model."""


@dataclass(frozen=True)
class WithoutHead:
    """A weights file to load without its head's class layers (a classifier's last layer; a detector's box
    predictor), which the model keeps at their initial values: a trained bundle fine-tuned on other classes
    (``model.init``) passes its ``model.safetensors`` this way as the builder's ``weights``."""

    path: Path

    def __str__(self) -> str:
        return f"{self.path} (without its head)"


def with_named_weights(build: Callable[[], nn.Module], weights: Any) -> nn.Module:
    """``build()`` of a torchvision model with its named ``weights`` (a ``WeightsEnum`` member), which
    torchvision downloads once into torch's cache: a failed download or a damaged cached file is a
    :class:`WeightsError` saying what to do, not a traceback."""
    from urllib.error import URLError

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return build()
    except (URLError, ConnectionError, TimeoutError) as exc:
        raise WeightsError(f"cannot download {weights.url} ({exc}; no network?): download it where there is one and "
                           f"pass the file as the weights (model.weights=PATH)") from None
    except Exception as exc:  # noqa: BLE001 - torch.load's errors for a damaged file are of many types
        if not cached.is_file():
            raise
        raise WeightsError(f"{cached}: torchvision's cached {weights} weights cannot be read ({exc}); delete the "
                           f"file to download it again, or pass a good copy as the weights (model.weights=PATH)") \
            from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a PyTorch ``.pt/.pth`` state dict (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable"
        raise WeightsError(f"{path}: cannot read weights: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: does not hold a state dict")
    return state


def class_layer(model: nn.Module, head_prefixes: tuple[str, ...]) -> str:
    """The name of the layer that names the classes: the last linear (or 1x1 convolution) in the head (a head
    may hold hidden layers before it: abas_cnn's, VGG's, MobileNetV3's)."""
    layers = [name for name, module in model.named_modules()
              if (name + ".").startswith(head_prefixes) and isinstance(module, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise WeightsError(f"no class layer under {', '.join(head_prefixes)} in {type(model).__name__}")
    return layers[-1]


def load_backbone_weights(model: nn.Module, path: str | Path | WithoutHead,
                          head_prefixes: tuple[str, ...], *, class_layer_only: bool = False) -> list[str]:
    """Load ``path`` into ``model``, skipping head tensors whose shape differs
    (e.g. ImageNet's 1000-class head), and for a :class:`WithoutHead` every head tensor (``class_layer_only``:
    the head's last layer, :func:`class_layer`); any other mismatch is an error.

    Returns the names of the tensors left at their initial values.
    """
    if isinstance(path, WithoutHead):
        path = path.path
        # a classifier head's hidden layers are learned features, not class names: only its last layer is new
        dropped = (class_layer(model, head_prefixes) + ".",) if class_layer_only else head_prefixes
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(dropped)}
    else:
        state = read_state_dict(path)
    own = model.state_dict()
    usable = {}
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            usable[key] = value
        elif key in own and not key.startswith(head_prefixes):
            raise WeightsError(
                f"{path}: tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in usable]
    body_missing = [k for k in missing if not k.startswith(head_prefixes) and not k.endswith("num_batches_tracked")]
    if body_missing:
        raise WeightsError(
            f"{path}: does not fit this architecture ({len(body_missing)} tensors missing, e.g. {body_missing[:3]})"
        )
    model.load_state_dict(usable, strict=False)
    return missing
