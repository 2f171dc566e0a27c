"""Find cells in images with a detector bundle: :class:`CellDetector`, the one
detection path used by evaluation, smear analysis, the CLI and the service.

Detector bundles are read and written by :mod:`leukoscope.bundle` (``task: detect``).
What runs the detector is a runner (:mod:`leukoscope.inference.detector_runtime`): the
torch model (:mod:`leukoscope.inference.detector_torch`), or an exported bundle's graphs
(``leukoscope export``) on onnxruntime or OpenVINO, which needs no torch (``backend=``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from leukoscope.bundle import BundleInfo, read_bundle_info
from leukoscope.inference.detector_runtime import (DetectorRunner, GraphDetector, choose_detector_backend, load_graphs,
                                                   scaled_cap)
from leukoscope.pretrained import resolve_bundle

if TYPE_CHECKING:
    import torch

__all__ = ["CellDetector", "Detection", "DetectionResult", "scaled_cap"]


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


class CellDetector:
    """A detector bundle ready to find cells in images of any size (scaled by the
    bundle's ``input_scale``; large fields are tiled by
    :class:`~leukoscope.inference.smear.SmearAnalyzer`)."""

    def __init__(self, model: "torch.nn.Module | DetectorRunner", info: BundleInfo, device: "str | torch.device" = "cpu",
                 score_threshold: float | None = None) -> None:
        """``model``: the bundle's torch model (run on ``device``), or a runner that runs it
        (:mod:`leukoscope.inference.detector_runtime`)."""
        if not isinstance(model, DetectorRunner):
            from leukoscope.inference.detector_torch import TorchDetector

            model = TorchDetector(model, device)
        self.runner = model
        self.model = model.model
        """The torch model; None when exported graphs run the network (``backend`` onnxruntime or openvino)."""
        self.info = info
        self.detection_cap = model.detection_cap
        """The cap on detections per image, as set for a 640x480 field (None: no cap)."""
        self.classes = list(info.classes)
        self.score_threshold = info.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score threshold must be in [0, 1], got {self.score_threshold}")

    @classmethod
    def from_bundle(cls, directory: str | Path, device: str = "cpu", score_threshold: float | None = None,
                    *, backend: str = "torch", threads: int | None = None) -> "CellDetector":
        """``backend``: ``torch``, ``onnxruntime`` or ``openvino`` (an exported bundle, ``leukoscope
        export``) or ``auto`` (the fastest installed one the bundle has a graph for, else torch);
        ``threads``: the backend's CPU threads (torch's are process-wide). The graph backends import
        neither torch nor torchvision."""
        directory = resolve_bundle(directory)
        info = read_bundle_info(directory, task="detect")
        chosen = choose_detector_backend(backend, info, directory, str(device))
        if chosen == "torch":
            from leukoscope.bundle import load_bundle
            from leukoscope.inference.runtime import use_threads

            use_threads(threads)
            model, info = load_bundle(directory, device, task="detect")
            return cls(model, info, device, score_threshold)
        if str(device) != "cpu":
            raise ValueError(f"the {chosen} backend runs on the CPU; device {device!r} needs --backend torch")
        return cls(GraphDetector(load_graphs(directory, info, chosen, threads)), info, device, score_threshold)

    @property
    def backend(self) -> str:
        """What runs the network: ``torch``, ``onnxruntime`` or ``openvino``."""
        return self.runner.backend

    def detect(self, images: Sequence[Any], *, threshold: float | None = None,
               batch_size: int = 4) -> list[DetectionResult]:
        """Detections per image with score >= ``threshold`` (default: the operating threshold).
        ``images``: PIL images, (H, W, 3) arrays (uint8, or floats in [0, 1]) or (3, H, W) torch tensors."""
        threshold = self.score_threshold if threshold is None else threshold
        results: list[DetectionResult] = []
        for batch in same_size_batches(images, batch_size):
            height, width = image_size(batch[0])
            for boxes, scores, labels in self.runner.run(batch, height * width):
                # model label 0 is the background
                result = DetectionResult(boxes.reshape(-1, 4), scores, labels.astype(int) - 1, self.classes)
                results.append(result.above(threshold))
        return results


def same_size_batches(images: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    """``images`` in order, in batches of at most ``batch_size`` of one size each: the per-image caps scale with
    the image's area (:meth:`TorchDetector._limits_for`), so an image batched with a larger one got the larger
    one's caps, and its detections depended on its neighbours."""
    batches: list[Sequence[Any]] = []
    start = 0
    while start < len(images):
        size = image_size(images[start])
        end = start + 1
        while end < len(images) and end - start < batch_size and image_size(images[end]) == size:
            end += 1
        batches.append(images[start:end])
        start = end
    return batches


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, an (H, W, 3) array or a (3, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.size[1], image.size[0]
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    return int(image.shape[-2]), int(image.shape[-1])
