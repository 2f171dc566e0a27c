"""Hand-built stand-ins for smear-analysis tests: detectors that return known boxes
(with or without recorded test metrics, with or without a per-image cap) and a real
:class:`CellClassifier` over a model that always answers one class."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from leukoscope.bundle import BundleInfo
from leukoscope.inference.detector import CellDetector, DetectionResult
from leukoscope.preprocessing import Preprocessing
from leukoscope.inference.predictor import CellClassifier

#: What a trained detector records in its bundle.json (tasks/detect.py), here a good one.
VERIFIED = {"evaluated_on": "test", "map_50": 0.95, "ap_50_per_class": {"WBC": 0.97}}
PBC_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def float_pixels(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tile as a fake detector reads it, (3, H, W) floats in [0, 1]: SmearAnalyzer passes (H, W, 3)
    uint8 arrays, tests (3, H, W) float tensors."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return image.float() / 255.0 if image.dtype == torch.uint8 else image


class DarkBlobDetector(CellDetector):
    """A fixed rule in place of a network (for the tiling arithmetic only): one box
    around the dark pixels of the tile, cut at the tile edge like a real detector."""

    def __init__(self, metrics: dict[str, Any] | None = None) -> None:
        self.classes = ["WBC"]
        self.detection_cap = None
        self.score_threshold = 0.5
        self.info = BundleInfo("rule", ["WBC"], task="detect", metrics=dict(metrics or {}))

    def detect(self, images, *, threshold=None, batch_size=4):
        out = []
        for image in map(float_pixels, images):
            dark = (image.mean(0) < 0.3).numpy()
            ys, xs = np.nonzero(dark)
            if len(xs):
                box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], float)
                out.append(DetectionResult(box, np.array([0.9]), np.array([0]), self.classes))
            else:
                out.append(DetectionResult(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), self.classes))
        return out


class FixedDetector(DarkBlobDetector):
    """Returns the same WBC boxes for every image; ``cap``: its cap on detections per image
    (set for a 640x480 field, as real detectors' are)."""

    def __init__(self, boxes, scores=None, *, metrics: dict[str, Any] | None = None, cap: int | None = None) -> None:
        super().__init__(metrics)
        self.boxes = np.array(boxes, float).reshape(-1, 4)
        self.scores = np.array(scores if scores is not None else [0.9] * len(self.boxes), float)
        self.detection_cap = cap

    def detect(self, images, *, threshold=None, batch_size=4):
        return [DetectionResult(self.boxes, self.scores, np.zeros(len(self.scores), int), self.classes)]


def grid_boxes(n: int, width: int = 640, height: int = 480, size: int = 30) -> list[list[float]]:
    """``n`` separate square boxes laid out row by row in a ``width`` x ``height`` field."""
    per_row = width // (size + 4)
    boxes = [[(k % per_row) * (size + 4), (k // per_row) * (size + 4)] for k in range(n)]
    assert boxes[-1][1] + size <= height, "too many boxes for the field"
    return [[x, y, x + size, y + size] for x, y in boxes]


class _Constant(nn.Module):
    def __init__(self, n_classes: int, answer: int) -> None:
        super().__init__()
        logits = torch.full((n_classes,), -4.0)
        logits[answer] = 4.0
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def constant_classifier(classes: Sequence[str], answer: str) -> CellClassifier:
    """A real CellClassifier whose model calls every cell ``answer`` (confidence ~0.99)."""
    info = BundleInfo("constant", list(classes), Preprocessing(16, [0.5] * 3, [0.25] * 3), uncertain_threshold=0.5)
    return CellClassifier(_Constant(len(classes), list(classes).index(answer)), info)
