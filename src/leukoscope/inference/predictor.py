"""Classify cell or field images with a bundle: the one prediction path used by
the CLI, the Python API and the web service."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from leukoscope.bundle import BundleInfo, load_bundle
from leukoscope.io import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from leukoscope.labels import UNCERTAIN
from leukoscope.preprocessing import batched_logits, stack_pixels

log = logging.getLogger(__name__)

@dataclass
class Prediction:
    """One image's result. ``label`` is ``"uncertain"`` below the confidence threshold;
    ``top_class`` is always the most probable class."""

    source: str
    label: str
    top_class: str
    confidence: float
    probabilities: dict[str, float]
    uncertain: bool
    error: str | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)

    def as_row(self) -> dict[str, object]:
        row: dict[str, object] = {
            "source": self.source,
            "label": self.label,
            "top_class": self.top_class,
            "confidence": round(self.confidence, 6),
            "uncertain": self.uncertain,
        }
        row.update({f"p_{name}": round(p, 6) for name, p in self.probabilities.items()})
        row["error"] = self.error or ""
        return row


class CellClassifier:
    """A bundle ready to classify PIL images or files.

    >>> classifier = CellClassifier.from_bundle("runs/demo/bundle")   # doctest: +SKIP
    >>> classifier.predict_paths(["cell.jpg"])[0].label                 # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, info: BundleInfo, device: str | torch.device = "cpu",
                 uncertain_threshold: float | None = None) -> None:
        if info.task != "classify" or info.preprocessing is None:
            raise ValueError(f"{info.model_name} is a {info.task} model, not a cell classifier")
        self.model = model.eval()
        self.info = info
        self.preprocessing = info.preprocessing
        self.device = torch.device(device)
        self.classes = list(info.classes)
        self.threshold = info.uncertain_threshold if uncertain_threshold is None else uncertain_threshold
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"uncertain threshold must be in [0, 1], got {self.threshold}")

    @classmethod
    def from_bundle(cls, directory: str | Path, device: str = "cpu",
                    uncertain_threshold: float | None = None) -> "CellClassifier":
        model, info = load_bundle(directory, device, task="classify")
        return cls(model, info, device, uncertain_threshold)

    @property
    def image_size(self) -> int:
        return self.info.preprocessing.image_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB -> the model's (3, S, S) input through the bundle's preprocessing, exactly as in
        training (uint8, not normalised, for a classical model, which computes its features from it)."""
        return self.preprocessing.model_input(self.preprocessing.pixels(image), self.info.framework)

    def _to_prediction(self, source: str, probs: np.ndarray) -> Prediction:
        top = int(probs.argmax())
        confidence = float(probs[top])
        uncertain = confidence < self.threshold
        return Prediction(
            source=source,
            label=UNCERTAIN if uncertain else self.classes[top],
            top_class=self.classes[top],
            confidence=confidence,
            probabilities={name: float(p) for name, p in zip(self.classes, probs)},
            uncertain=uncertain,
        )

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Calibrated class probabilities (temperature-scaled softmax), shape (N, classes)."""
        if not images:
            return np.zeros((0, len(self.classes)))
        logits = batched_logits(self.model, stack_pixels(images, self.preprocessing), self.preprocessing,
                                self.device) / self.info.temperature
        return torch.softmax(torch.from_numpy(logits), dim=1).numpy()

    def predict_images(self, images: Sequence[Image.Image], sources: Sequence[str] | None = None) -> list[Prediction]:
        sources = list(sources) if sources is not None else [f"image_{i}" for i in range(len(images))]
        return [self._to_prediction(s, p) for s, p in zip(sources, self.probabilities(images))]

    def predict_paths(
        self,
        paths: Iterable[str | Path],
        *,
        batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        progress=None,
    ) -> list[Prediction]:
        """Predict every file; unreadable files give a row with ``error`` set, never a crash."""
        paths = [Path(p) for p in paths]
        results: list[Prediction | None] = [None] * len(paths)
        pending: list[tuple[int, Image.Image]] = []

        def flush() -> None:
            predictions = self.predict_images([img for _, img in pending], [str(paths[i]) for i, _ in pending])
            for (i, _), prediction in zip(pending, predictions):
                results[i] = prediction
            if progress:
                progress(advance=len(pending))
            pending.clear()

        for index, path in enumerate(paths):
            try:
                pending.append((index, load_image(path, max_pixels=max_pixels)))
            except ImageDecodeError as exc:
                log.warning("cannot read %s: %s", path, exc)
                results[index] = Prediction(str(path), "error", "", 0.0, {}, False, error=str(exc))
                if progress:
                    progress(advance=1)
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
        return [r for r in results if r is not None]
