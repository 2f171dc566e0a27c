"""Find cells in images with a detector bundle: :class:`CellDetector`, the one
detection path used by evaluation, smear analysis, the CLI and the service.

Detector bundles are read and written by :mod:`leukoscope.bundle` (``task: detect``).
An exported bundle (``leukoscope export``) can run its network's dense part on
onnxruntime or OpenVINO (``backend=``; :mod:`leukoscope.inference.detector_runtime`).
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from leukoscope.bundle import BundleInfo, load_bundle, read_bundle_info
from leukoscope.inference.detector_runtime import ExportedGraphs, choose_detector_backend, hybrid_forward, load_graphs
from leukoscope.pretrained import resolve_bundle

#: The per-image caps on proposals and detections are set for a field of this many pixels (640x480).
REFERENCE_FIELD_PIXELS = 640 * 480


def scaled_cap(cap: int, pixels: int) -> int:
    """A per-image cap for an image of ``pixels``: scaled with the area above a 640x480 field
    (a 2048 px tile holds ten times as many cells)."""
    return int(math.ceil(cap * max(1.0, pixels / REFERENCE_FIELD_PIXELS)))


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


def to_model_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """(3, H, W): uint8 stays uint8 (the model's transform makes it float), any other type becomes float."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        # one copy, channels first in memory (the transform's scaling runs 1.2x faster on it, same
        # pixels); a read-only array (a decoded image's buffer) is copied all the same
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return image if image.dtype == torch.uint8 else image.float()


class CellDetector:
    """A detector bundle ready to find cells in images of any size (scaled by the
    bundle's ``input_scale``; large fields are tiled by
    :class:`~leukoscope.inference.smear.SmearAnalyzer`)."""

    def __init__(self, model: nn.Module, info: BundleInfo, device: str | torch.device = "cpu",
                 score_threshold: float | None = None, graphs: ExportedGraphs | None = None) -> None:
        self.model = model.eval()
        self.info = info
        self.device = torch.device(device)
        # An exported bundle's graphs run the dense part (backbone, FPN, RPN head) and the box part
        # (RoIAlign, box head); the model's own modules run the rest
        # (leukoscope.inference.detector_runtime). None: the torch model runs all.
        self.graphs = graphs
        # One model may serve several threads (the web service): its per-image caps are
        # changed for large tiles while it runs, so calls into the model take turns.
        self._model_lock = threading.Lock()
        self.classes = list(info.classes)
        self.score_threshold = info.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score threshold must be in [0, 1], got {self.score_threshold}")

    @classmethod
    def from_bundle(cls, directory: str | Path, device: str = "cpu", score_threshold: float | None = None,
                    *, backend: str = "torch", threads: int | None = None) -> "CellDetector":
        """``backend``: ``torch``, ``onnxruntime`` or ``openvino`` (an exported bundle, ``leukoscope
        export``) or ``auto`` (the fastest installed one the bundle has a graph for, else torch);
        ``threads``: the graph runtime's threads."""
        directory = resolve_bundle(directory)
        chosen = choose_detector_backend(backend, read_bundle_info(directory, task="detect"), directory)
        if chosen != "torch" and str(device) != "cpu":
            raise ValueError(f"the {chosen} backend runs on the CPU; device {device!r} needs --backend torch")
        model, info = load_bundle(directory, device, task="detect")
        graphs = None if chosen == "torch" else load_graphs(directory, info, chosen, threads)
        return cls(model, info, device, score_threshold, graphs)

    @property
    def backend(self) -> str:
        """What runs the dense part of the network: ``torch``, ``onnxruntime`` or ``openvino``."""
        return "torch" if self.graphs is None else self.graphs.backend

    @contextmanager
    def _limits_for(self, pixels: int):
        """Scale the per-image caps (proposals, detections) with the image area: they are
        set for a 640x480 field, and a 2048 px tile holds ten times as many cells."""
        saved: list[tuple[Any, str, Any]] = []

        def scale(owner: Any, key: str, index: str | None = None) -> None:
            if index is None:
                saved.append((owner, key, getattr(owner, key)))
                setattr(owner, key, scaled_cap(getattr(owner, key), pixels))
            else:
                table = getattr(owner, key)
                saved.append((table, index, table[index]))
                table[index] = scaled_cap(table[index], pixels)

        if pixels > REFERENCE_FIELD_PIXELS:
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
            batch = [to_model_tensor(image).to(self.device) for image in images[start:start + batch_size]]
            with self._model_lock, self._limits_for(max(int(image.shape[-1] * image.shape[-2]) for image in batch)):
                outputs = (self.model(batch) if self.graphs is None
                           else hybrid_forward(self.model, self.graphs, batch))
            for output in outputs:
                result = DetectionResult(
                    output["boxes"].float().cpu().numpy().reshape(-1, 4),
                    output["scores"].float().cpu().numpy(),
                    output["labels"].cpu().numpy().astype(int) - 1,  # model label 0 is the background
                    self.classes,
                )
                results.append(result.above(threshold))
        return results
