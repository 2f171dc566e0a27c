"""What smear analysis found in one field: its white cells and their differential."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from leukoscope.inference.detector import DetectionResult
from leukoscope.inference.differential import Differential
from leukoscope.labels import DISCLAIMER


@dataclass
class Cell:
    """One white cell: where it is, what the detector and the classifier said."""

    cell_id: int
    box: tuple[float, float, float, float]
    detector_class: str
    detector_score: float
    label: str
    """The class counted in the differential (``uncertain`` below the classifier threshold)."""
    top_class: str
    confidence: float
    uncertain: bool
    probabilities: dict[str, float] = field(default_factory=dict)
    ood_score: float | None = None
    """The classifier's out-of-distribution score for this crop; None without OOD statistics."""
    unfamiliar: bool = False
    """``ood_score`` above the classifier bundle's threshold: unlike its training images."""

    @property
    def detection_score(self) -> float:
        return self.detector_score

    def as_row(self, classes: Sequence[str]) -> dict[str, Any]:
        x0, y0, x1, y1 = self.box
        row: dict[str, Any] = {
            "cell_id": self.cell_id, "x0": round(x0, 1), "y0": round(y0, 1), "x1": round(x1, 1), "y1": round(y1, 1),
            "detector_class": self.detector_class, "detector_score": round(self.detector_score, 4),
            "label": self.label, "top_class": self.top_class, "confidence": round(self.confidence, 4),
            "uncertain": self.uncertain,
        }
        row.update({f"p_{name}": round(self.probabilities.get(name, 0.0), 4) for name in classes})
        row["ood_score"] = "" if self.ood_score is None else round(self.ood_score, 4)
        row["unfamiliar"] = "" if self.ood_score is None else self.unfamiliar
        return row


@dataclass
class SmearResult:
    source: str
    width: int
    height: int
    cells: list[Cell]
    object_counts: dict[str, int]
    """Every detected object by detector class (WBC, RBC, Platelets...)."""
    differential: Differential
    detections: DetectionResult | None = field(default=None, repr=False)
    cell_classes: list[str] = field(default_factory=list)
    tiles: int = 1
    seconds: float = 0.0
    error: str | None = None
    capped_tiles: int = 0
    """Tiles where the detector returned as many boxes as its cap allows (a quality warning)."""
    scale: dict[str, Any] | None = None
    """The field's pixel size, where it came from, and the scale analysis ran at (:mod:`leukoscope.scale`)."""
    possible_white_cells: list[dict[str, Any]] = field(default_factory=list)
    """White-cell boxes scored under the detector's threshold, not counted (``box``, ``detector_score``;
    :meth:`leukoscope.inference.smear.SmearAnalyzer.possible_white_cells`)."""

    @property
    def warnings(self) -> list[str]:
        return self.differential.warnings

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source, "width": self.width, "height": self.height, "tiles": self.tiles,
            "capped_tiles": self.capped_tiles, "seconds": round(self.seconds, 3),
            "object_counts": self.object_counts, "warnings": self.warnings, "scale": self.scale,
            "possible_white_cells": self.possible_white_cells,
            "differential": self.differential.to_json(), "error": self.error, "disclaimer": DISCLAIMER,
        }
