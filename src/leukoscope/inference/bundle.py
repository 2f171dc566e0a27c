"""Model bundles: a trained model as a self-describing directory.

```
bundle/
  bundle.json        architecture, classes, preprocessing, calibration, metrics, provenance
  model.safetensors  weights (no pickle: safe to load from an untrusted source)
```

Classical models (``framework: "sklearn"``) keep ``model.skops`` instead of the
safetensors file, plus their ``feature_spec``; see :mod:`leukoscope.classic.bundle`.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import leukoscope
from leukoscope.models import create_model

BUNDLE_FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"


class BundleError(ValueError):
    """A bundle directory is missing, incomplete or from an unknown format."""


@dataclass
class Preprocessing:
    image_size: int
    mean: list[float]
    std: list[float]
    resize: str = "letterbox"
    segmentation: str | None = None


@dataclass
class BundleInfo:
    model_name: str
    classes: list[str]
    preprocessing: Preprocessing
    model_options: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    uncertain_threshold: float = 0.5
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = BUNDLE_FORMAT_VERSION
    framework: str = "torch"
    """``torch`` (model.safetensors) or ``sklearn`` (model.skops, a classical pipeline)."""
    feature_spec: dict[str, Any] | None = None
    """Hand-made features of a classical model (:class:`leukoscope.classic.FeatureSpec`)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any], source: Path) -> "BundleInfo":
        version = payload.get("format_version")
        if version != BUNDLE_FORMAT_VERSION:
            raise BundleError(f"{source}: bundle format {version!r} is not supported (expected {BUNDLE_FORMAT_VERSION})")
        try:
            payload = dict(payload)
            payload["preprocessing"] = Preprocessing(**payload["preprocessing"])
            return cls(**payload)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{source}: bundle.json is incomplete or has unknown fields: {exc}") from None


def contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone to be safe.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def provenance_now() -> dict[str, str]:
    """When and with which versions a bundle was written."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "leukoscope": leukoscope.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_bundle_files(directory: Path, state: dict[str, torch.Tensor], info_json: dict[str, Any],
                       metadata: dict[str, str]) -> Path:
    """Write weights and ``bundle.json`` through temporary files, each replaced atomically,
    the JSON last: a folder with a ``bundle.json`` always has its weights."""
    directory.mkdir(parents=True, exist_ok=True)
    weights_tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(weights_tmp), metadata=metadata)
    json_tmp = directory / (BUNDLE_FILE + ".tmp")
    json_tmp.write_text(json.dumps(info_json, indent=2, default=str))
    weights_tmp.replace(directory / WEIGHTS_FILE)
    json_tmp.replace(directory / BUNDLE_FILE)
    return directory


def read_bundle_json(directory: str | Path) -> tuple[dict[str, Any], Path]:
    """The parsed ``bundle.json`` of ``directory`` and its path, or a clear :class:`BundleError`."""
    directory = Path(directory)
    path = directory / BUNDLE_FILE
    if not directory.is_dir():
        raise BundleError(f"{directory}: bundle folder does not exist")
    if not path.is_file():
        raise BundleError(f"{directory}: not a leukoscope bundle (no {BUNDLE_FILE})")
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON: {exc}") from None


def save_bundle(directory: str | Path, model: nn.Module, info: BundleInfo) -> Path:
    """Write ``model`` and ``info`` into ``directory`` (created; files replaced atomically)."""
    info.provenance = {**provenance_now(), **info.provenance}
    return write_bundle_files(Path(directory), contiguous_state(model), info.to_json(),
                              {"model_name": info.model_name})


def read_bundle_info(directory: str | Path) -> BundleInfo:
    payload, path = read_bundle_json(directory)
    return BundleInfo.from_json(payload, path)


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, BundleInfo]:
    """Rebuild the model of a bundle with its trained weights, in eval mode
    (a :class:`leukoscope.classic.models.ClassicModel` for a classical bundle)."""
    directory = Path(directory)
    info = read_bundle_info(directory)
    if info.framework == "sklearn":
        from leukoscope.classic.bundle import load_classic_model

        return load_classic_model(directory, info), info
    if info.framework != "torch":
        raise BundleError(f"{directory}: unknown model framework {info.framework!r} (expected torch or sklearn)")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{directory}: weights file {WEIGHTS_FILE} is missing")
    model = create_model(info.model_name, num_classes=len(info.classes), **info.model_options)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated file
        raise BundleError(f"{weights}: cannot read weights: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{weights}: weights do not match {info.model_name}: {exc}") from None
    return model.to(device).eval(), info
