"""Detector bundles and :class:`CellDetector`, the one detection path used by
evaluation, smear analysis, the CLI and the service.

A detector bundle has the same layout as a classifier bundle (``bundle.json``
+ ``model.safetensors``, no pickle); its ``bundle.json`` says ``"task":
"detection"`` so that tools can tell the two apart
(:func:`is_detection_bundle`).
"""

from __future__ import annotations

import json
import math
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from leukoscope.inference.bundle import (BUNDLE_FILE, WEIGHTS_FILE, BundleError, contiguous_state, provenance_now,
                                         read_bundle_json,
                                         write_bundle_files)
from leukoscope.models import create_model

DETECTION_TASK = "detection"
#: The per-image caps on proposals and detections are set for a field of this many pixels (640x480).
REFERENCE_FIELD_PIXELS = 640 * 480
DETECTOR_FORMAT_VERSION = 1
#: Builder options that point at files used only to initialise training.
_TRAINING_ONLY_OPTIONS = ("weights", "backbone_weights", "freeze_backbone", "scale_jitter")


@dataclass
class DetectorBundleInfo:
    model_name: str
    classes: list[str]
    model_options: dict[str, Any] = field(default_factory=dict)
    score_threshold: float = 0.5
    """Operating threshold: detections below it are not counted."""
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    task: str = DETECTION_TASK
    format_version: int = DETECTOR_FORMAT_VERSION

    @property
    def input_scale(self) -> float:
        return float(self.model_options.get("input_scale", 0.5))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any], source: Path) -> "DetectorBundleInfo":
        if payload.get("task") != DETECTION_TASK:
            raise BundleError(f"{source}: not a detector bundle (task {payload.get('task')!r}); "
                              f"use it with `leukoscope predict` / CellClassifier")
        if payload.get("format_version") != DETECTOR_FORMAT_VERSION:
            raise BundleError(f"{source}: detector bundle format {payload.get('format_version')!r} is not supported "
                              f"(expected {DETECTOR_FORMAT_VERSION})")
        try:
            return cls(**payload)
        except TypeError as exc:
            raise BundleError(f"{source}: bundle.json is incomplete or has unknown fields: {exc}") from None


def is_detection_bundle(directory: str | Path) -> bool:
    path = Path(directory) / BUNDLE_FILE
    try:
        return json.loads(path.read_text()).get("task") == DETECTION_TASK
    except (OSError, ValueError, AttributeError):
        return False


def inference_options(options: dict[str, Any], model_name: str | None = None) -> dict[str, Any]:
    """The builder options a bundle needs: training-only ones dropped and, when
    ``model_name`` is given, every default written out, so that a later change of
    a default cannot silently change (or break) an existing bundle."""
    resolved: dict[str, Any] = {}
    if model_name is not None:
        import inspect

        from leukoscope.models import model_entry

        for name, parameter in inspect.signature(model_entry(model_name).builder).parameters.items():
            if name != "num_classes" and parameter.default is not inspect.Parameter.empty:
                resolved[name] = parameter.default
    resolved.update(options)
    return json.loads(json.dumps({k: v for k, v in resolved.items() if k not in _TRAINING_ONLY_OPTIONS}))


def save_detector_bundle(directory: str | Path, model: nn.Module, info: DetectorBundleInfo) -> Path:
    info.model_options = inference_options(info.model_options, info.model_name)
    info.provenance = {**provenance_now(), **info.provenance}
    state = contiguous_state(model)
    return write_bundle_files(Path(directory), state, info.to_json(),
                              {"model_name": info.model_name, "task": DETECTION_TASK})


def read_detector_info(directory: str | Path) -> DetectorBundleInfo:
    payload, path = read_bundle_json(directory)
    return DetectorBundleInfo.from_json(payload, path)


def load_detector_bundle(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, DetectorBundleInfo]:
    directory = Path(directory)
    info = read_detector_info(directory)
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
        raise BundleError(f"{weights}: weights do not match {info.model_name}: {str(exc)[:300]}") from None
    return model.to(device).eval(), info


@dataclass
class Detection:
    """One detected object, in pixels of the image it was found in."""

    label: str
    score: float
    box: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass
class DetectionResult:
    """Arrays for one image: ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,) 0-based class index."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    classes: Sequence[str]

    def above(self, threshold: float) -> "DetectionResult":
        keep = self.scores >= threshold
        return DetectionResult(self.boxes[keep], self.scores[keep], self.labels[keep], self.classes)

    def detections(self) -> list[Detection]:
        return [Detection(self.classes[int(label)], float(score), tuple(float(v) for v in box))
                for box, score, label in zip(self.boxes, self.scores, self.labels)]

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == k).sum()) for k, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.scores)


def _to_float_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if not image.flags.writeable:
            image = image.copy()
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    return image.float()


class CellDetector:
    """A detector bundle ready to find cells in images of any size (scaled by the
    bundle's ``input_scale``; large fields are tiled by
    :class:`~leukoscope.inference.smear.SmearAnalyzer`)."""

    def __init__(self, model: nn.Module, info: DetectorBundleInfo, device: str | torch.device = "cpu",
                 score_threshold: float | None = None) -> None:
        self.model = model.eval()
        self.info = info
        self.device = torch.device(device)
        # One model may serve several threads (the web service): its per-image caps are
        # changed for large tiles while it runs, so calls into the model take turns.
        self._model_lock = threading.Lock()
        self.classes = list(info.classes)
        self.score_threshold = info.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score threshold must be in [0, 1], got {self.score_threshold}")

    @classmethod
    def from_bundle(cls, directory: str | Path, device: str = "cpu",
                    score_threshold: float | None = None) -> "CellDetector":
        model, info = load_detector_bundle(directory, device)
        return cls(model, info, device, score_threshold)

    @contextmanager
    def _limits_for(self, pixels: int):
        """Scale the per-image caps (proposals, detections) with the image area: they are
        set for a 640x480 field, and a 2048 px tile holds ten times as many cells."""
        factor = max(1.0, pixels / REFERENCE_FIELD_PIXELS)
        saved: list[tuple[Any, str, Any]] = []

        def scale(owner: Any, key: str, index: str | None = None) -> None:
            if index is None:
                saved.append((owner, key, getattr(owner, key)))
                setattr(owner, key, int(math.ceil(getattr(owner, key) * factor)))
            else:
                table = getattr(owner, key)
                saved.append((table, index, table[index]))
                table[index] = int(math.ceil(table[index] * factor))

        if factor > 1.0:
            model = self.model
            if hasattr(model, "rpn"):
                scale(model.rpn, "_pre_nms_top_n", "testing")
                scale(model.rpn, "_post_nms_top_n", "testing")
            if hasattr(model, "roi_heads"):
                scale(model.roi_heads, "detections_per_img")
            elif hasattr(model, "detections_per_img"):
                scale(model, "detections_per_img")
                if hasattr(model, "topk_candidates"):
                    scale(model, "topk_candidates")
        try:
            yield
        finally:
            for owner, key, value in reversed(saved):
                if isinstance(owner, dict):
                    owner[key] = value
                else:
                    setattr(owner, key, value)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image | np.ndarray | torch.Tensor], *,
               threshold: float | None = None, batch_size: int = 4) -> list[DetectionResult]:
        """Detections per image with score >= ``threshold`` (default: the operating threshold)."""
        threshold = self.score_threshold if threshold is None else threshold
        results: list[DetectionResult] = []
        for start in range(0, len(images), batch_size):
            batch = [_to_float_tensor(image).to(self.device) for image in images[start:start + batch_size]]
            with self._model_lock, self._limits_for(max(int(image.shape[-1] * image.shape[-2]) for image in batch)):
                outputs = self.model(batch)
            for output in outputs:
                result = DetectionResult(
                    output["boxes"].float().cpu().numpy().reshape(-1, 4),
                    output["scores"].float().cpu().numpy(),
                    output["labels"].cpu().numpy().astype(int) - 1,  # model label 0 is the background
                    self.classes,
                )
                results.append(result.above(threshold))
        return results
