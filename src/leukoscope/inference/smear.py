"""Whole-smear analysis: detect every white cell, classify it, count, flag.

What a commercial analyzer does for one field (or a folder of fields of one
slide): locate the white cells, pre-classify each, keep low-confidence cells in
an "uncertain" bin for the technologist, and report the differential (counts,
counts per 100 WBC) with the blast percentage and its 95% Wilson interval.

Large fields (2592x1944 and beyond) are cut into overlapping tiles at the
detector's pixel scale; boxes cut by an inner tile edge are dropped when the
neighbouring tile saw the whole cell, and duplicates in the overlaps are merged.

    analyzer = SmearAnalyzer.from_bundles("runs/det/bundle", "runs/cls/bundle")
    result = analyzer.analyze("field.jpg")
    result.differential.blast_percentage, result.differential.flags
    result.write("out/")          # annotated PNG, per-cell CSV, JSON

Decision support for trained staff, not a diagnosis.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import box_iou

from leukoscope.inference.detector import CellDetector, DetectionResult
from leukoscope.io import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image

log = logging.getLogger(__name__)

UNCERTAIN = "uncertain"
DISCLAIMER = "Decision support for trained staff, not a diagnosis."
#: Classifier class names counted as blasts when ``blast_classes`` is not given
#: (case-insensitive): any name containing "blast", C-NMC's "all", and the
#: Taleqani B-ALL subtypes (early pre-B, pre-B and pro-B lymphoblasts).
DEFAULT_BLAST_NAMES = frozenset({"all", "malignant", "early", "pre", "pro", "pre-b", "pro-b", "early pre-b"})
#: Detector classes that are white cells when ``wbc_classes`` is not given.
DEFAULT_WBC_NAMES = frozenset({"wbc", "leukocyte", "leukocytes", "white", "white_cell", "white cell"})
_NOT_WBC = frozenset({"rbc", "platelets", "platelet", "erythrocyte", "red", "thrombocyte"})
Z_95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (as fractions in [0, 1]).

    5 blasts in 100 cells: (0.0215, 0.1118). Undefined for ``total == 0`` (ValueError).
    """
    if total <= 0:
        raise ValueError("the Wilson interval needs at least one counted cell")
    if not 0 <= successes <= total:
        raise ValueError(f"successes must be between 0 and {total}, got {successes}")
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def default_blast_classes(classes: Iterable[str]) -> list[str]:
    return [c for c in classes if "blast" in c.lower() or c.lower() in DEFAULT_BLAST_NAMES]


def default_wbc_classes(classes: Sequence[str]) -> list[str]:
    named = [c for c in classes if c.lower() in DEFAULT_WBC_NAMES]
    return named or [c for c in classes if c.lower() not in _NOT_WBC]


# --------------------------------------------------------------------------- differential
@dataclass
class Differential:
    """Counts of the white cells of one field or a set of fields."""

    total: int
    counts: dict[str, int]
    """Per class, plus ``uncertain`` (cells below the classifier's confidence threshold)."""
    per_100: dict[str, float]
    blast_classes: list[str]
    blasts: int | None
    blast_percentage: float | None
    blast_ci95: tuple[float, float] | None
    """Wilson 95% interval of the blast percentage, in percent."""
    uncertain: int
    blast_percentage_if_uncertain_are_blasts: float | None
    flags: list[str] = field(default_factory=list)

    @classmethod
    def from_labels(cls, labels: Sequence[str], classes: Sequence[str], blast_classes: Sequence[str] | None,
                    *, blast_flag_percent: float = 20.0, min_cells: int = 100,
                    uncertain_flag_share: float = 0.1) -> "Differential":
        """Count ``labels`` (class names or ``"uncertain"``). Blasts are counted only
        when ``blast_classes`` is a list (an empty list means "no blast class known")."""
        counts = {name: 0 for name in classes}
        counts[UNCERTAIN] = 0
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        total = len(labels)
        per_100 = {name: (100.0 * n / total if total else 0.0) for name, n in counts.items()}
        uncertain = counts[UNCERTAIN]
        blasts = percentage = interval = worst = None
        if blast_classes:
            blasts = sum(counts.get(name, 0) for name in blast_classes)
            if total:
                percentage = 100.0 * blasts / total
                low, high = wilson_interval(blasts, total)
                interval = (100.0 * low, 100.0 * high)
                worst = 100.0 * (blasts + uncertain) / total
        differential = cls(total, counts, per_100, list(blast_classes or []), blasts, percentage, interval,
                           uncertain, worst)
        differential.flags = differential._flags(blast_flag_percent, min_cells, uncertain_flag_share)
        return differential

    def _flags(self, threshold: float, min_cells: int, uncertain_share: float) -> list[str]:
        flags: list[str] = []
        if self.total == 0:
            return ["No white cell found: check focus, stain and that the image is a smear field."]
        if self.blast_percentage is not None and self.blast_ci95 is not None:
            low, high = self.blast_ci95
            ci = f"95% CI {low:.1f}-{high:.1f}%"
            if self.blast_percentage >= threshold:
                flags.append(f"BLASTS >= {threshold:g}% ({self.blast_percentage:.1f}%, {ci}): consistent with "
                             f"acute leukemia; needs review by a hematologist.")
            elif self.blasts:
                flags.append(f"Blasts seen ({self.blasts} of {self.total}, {self.blast_percentage:.1f}%, {ci}): "
                             f"blasts are not expected in peripheral blood; review.")
                if high >= threshold:
                    flags.append(f"The 95% interval of the blast percentage reaches {threshold:g}%: count more cells.")
            if (self.blast_percentage < threshold and self.blast_percentage_if_uncertain_are_blasts is not None
                    and self.blast_percentage_if_uncertain_are_blasts >= threshold):
                flags.append(f"If the {self.uncertain} uncertain cell(s) were blasts the blast percentage would be "
                             f"{self.blast_percentage_if_uncertain_are_blasts:.1f}%: review them.")
        if self.uncertain and self.uncertain / self.total >= uncertain_share:
            flags.append(f"{self.uncertain} of {self.total} cells ({100 * self.uncertain / self.total:.0f}%) are "
                         f"uncertain: classify them by eye.")
        if self.total < min_cells:
            flags.append(f"Only {self.total} white cell(s) counted; a differential needs at least {min_cells} "
                         f"(analyse more fields of the slide).")
        return flags

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["blast_ci95"] = list(self.blast_ci95) if self.blast_ci95 else None
        return payload


# --------------------------------------------------------------------------- tiling and merging
def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Overlapping tiles (x0, y0, x1, y1) covering the image, evenly spread; one tile if it fits.

    Along each axis: the fewest tiles of at most ``tile`` pixels that overlap by at
    least ``overlap``, each only as long as that needs (a 2592 px side in two tiles
    of 2048 would overlap by 1504 px, 58% more pixels than the image; two tiles of
    1456 overlap by the 320 asked for). Tiles may therefore be rectangular.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap ({overlap}) must be >= 0 and smaller than the tile size ({tile})")

    def spans(length: int) -> list[tuple[int, int]]:
        if length <= tile:
            return [(0, length)]
        n = math.ceil((length - overlap) / (tile - overlap))
        size = min(tile, math.ceil((length + (n - 1) * overlap) / n))
        return [(start, start + size) for start in (round(i * (length - size) / (n - 1)) for i in range(n))]

    return [(x0, y0, x1, y1) for y0, y1 in spans(height) for x0, x1 in spans(width)]


def merge_tile_detections(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, cut: np.ndarray,
    iou_threshold: float = 0.5, containment: float = 0.6,
) -> np.ndarray:
    """Indices to keep of detections gathered from overlapping tiles.

    ``cut`` marks boxes touching an inner tile edge (the cell may be cut off).
    Whole boxes are preferred to cut ones, then higher scores; a box is dropped
    when a kept box of the same class overlaps it by IoU > ``iou_threshold`` or,
    for a cut box, covers more than ``containment`` of its area.
    """
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=int)
    order = np.lexsort((-scores, cut.astype(int)))  # whole boxes first, then by score
    b = torch.as_tensor(boxes, dtype=torch.float64)
    iou = box_iou(b, b).numpy()
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).numpy()
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    kept: list[int] = []
    for i in order:
        duplicate = False
        for j in kept:
            if labels[j] != labels[i]:
                continue
            if iou[i, j] > iou_threshold:
                duplicate = True
                break
            if cut[i] and area[i] > 0 and inter[i, j] / area[i] > containment:
                duplicate = True
                break
        if not duplicate:
            kept.append(int(i))
    return np.array(sorted(kept), dtype=int)


# --------------------------------------------------------------------------- results
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

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source, "width": self.width, "height": self.height, "tiles": self.tiles,
            "seconds": round(self.seconds, 3), "object_counts": self.object_counts,
            "differential": self.differential.to_json(), "error": self.error, "disclaimer": DISCLAIMER,
        }

    def write(self, out_dir: str | Path, stem: str | None = None, image: Image.Image | None = None) -> dict[str, Path]:
        """Write ``<stem>.annotated.png``, ``<stem>.cells.csv`` and ``<stem>.json`` into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = stem or Path(self.source).stem
        paths = {"json": out_dir / f"{stem}.json", "cells": out_dir / f"{stem}.cells.csv"}
        payload = self.summary()
        payload["cells"] = [cell.as_row(self.cell_classes) for cell in self.cells]
        paths["json"].write_text(json.dumps(payload, indent=2))
        columns = list(Cell(0, (0, 0, 0, 0), "", 0, "", "", 0, False).as_row(self.cell_classes))
        with open(paths["cells"], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for cell in self.cells:
                writer.writerow(cell.as_row(self.cell_classes))
        if self.error is None:
            if image is None:
                image = load_image(self.source)
            paths["annotated"] = annotate(image, self).save_png(out_dir / f"{stem}.annotated.png")
        return paths


class _Annotated:
    def __init__(self, image: Image.Image) -> None:
        self.image = image

    def save_png(self, path: Path) -> Path:
        self.image.save(path, format="PNG")
        return path


_COLOURS = {UNCERTAIN: (230, 140, 0), "blast": (213, 0, 0), "other": (0, 90, 200), "RBC": (200, 120, 120),
            "Platelets": (120, 60, 160)}
_CELL_PALETTE = [(0, 114, 178), (0, 158, 115), (204, 121, 167), (86, 180, 233), (240, 228, 66), (0, 0, 0)]


def annotate(image: Image.Image, result: SmearResult) -> _Annotated:
    """Boxes on a copy of the image: white cells coloured by class with label and confidence,
    blasts red, uncertain orange; other objects thin."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    scale = max(1, round(max(canvas.size) / 700))
    try:
        font = ImageFont.load_default(size=11 * scale)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        font = ImageFont.load_default()
    if result.detections is not None:
        wbc_boxes = {tuple(np.round(cell.box, 2)) for cell in result.cells}
        for det in result.detections.detections():
            if tuple(np.round(det.box, 2)) in wbc_boxes:
                continue
            colour = _COLOURS.get(det.label, (150, 150, 150))
            draw.rectangle(det.box, outline=colour, width=scale)
    blast = set(result.differential.blast_classes)
    for cell in result.cells:
        if cell.uncertain:
            colour = _COLOURS[UNCERTAIN]
        elif cell.label in blast:
            colour = _COLOURS["blast"]
        else:
            index = result.cell_classes.index(cell.label) if cell.label in result.cell_classes else 0
            colour = _CELL_PALETTE[index % len(_CELL_PALETTE)]
        draw.rectangle(cell.box, outline=colour, width=3 * scale)
        text = f"{cell.cell_id}: {cell.label if not cell.uncertain else '? ' + cell.top_class} {cell.confidence:.2f}"
        x, y = cell.box[0], max(0, cell.box[1] - 14 * scale)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    d = result.differential
    lines = [f"WBC {d.total}" + (f", blasts {d.blast_percentage:.1f}% (95% CI {d.blast_ci95[0]:.1f}-"
                                 f"{d.blast_ci95[1]:.1f}%)" if d.blast_percentage is not None else ""),
             DISCLAIMER]
    y = 4
    for line in lines:
        left, top, right, bottom = draw.textbbox((4, y), line, font=font)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(255, 255, 255))
        draw.text((4, y), line, fill=(0, 0, 0), font=font)
        y = bottom + 4
    return _Annotated(canvas)


# --------------------------------------------------------------------------- analyzer
class SmearAnalyzer:
    """Detect -> crop -> classify -> differential, for fields of any size.

    ``classifier`` (a :class:`~leukoscope.inference.predictor.CellClassifier`) types
    each white cell; without one, cells keep the detector's class (and blasts are
    only counted if the detector itself has blast classes).
    ``tile_size``/``overlap`` are in image pixels; the overlap should exceed the
    largest white cell (about 300 px in 640x480 BCCD fields). ``wbc_containment``:
    a white-cell box covered more than this share by a higher-scored white-cell
    box is a duplicate (1 turns this off).
    """

    def __init__(
        self,
        detector: CellDetector | str | Path,
        classifier: Any | str | Path | None = None,
        *,
        tile_size: int = 2048,
        overlap: int = 320,
        wbc_classes: Sequence[str] | None = None,
        blast_classes: Sequence[str] | None = None,
        detector_threshold: float | None = None,
        uncertain_threshold: float | None = None,
        crop_margin: float = 0.1,
        merge_iou: float = 0.5,
        wbc_containment: float = 0.7,
        blast_flag_percent: float = 20.0,
        min_cells: int = 100,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: str = "cpu",
    ) -> None:
        if isinstance(detector, (str, Path)):
            detector = CellDetector.from_bundle(detector, device)
        if isinstance(classifier, (str, Path)):
            from leukoscope.inference.predictor import CellClassifier

            classifier = CellClassifier.from_bundle(classifier, device)
        self.detector = detector
        self.classifier = classifier
        if detector_threshold is not None:
            detector.score_threshold = float(detector_threshold)
        if classifier is not None and uncertain_threshold is not None:
            if not 0.0 <= uncertain_threshold <= 1.0:
                raise ValueError(f"uncertain threshold must be in [0, 1], got {uncertain_threshold}")
            classifier.threshold = float(uncertain_threshold)
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap ({overlap}) must be >= 0 and smaller than tile_size ({tile_size})")
        unknown = [c for c in (wbc_classes or []) if c not in detector.classes]
        if unknown:
            raise ValueError(f"wbc classes {unknown} are not detector classes {detector.classes}")
        self.wbc_classes = list(wbc_classes) if wbc_classes else default_wbc_classes(detector.classes)
        self.cell_classes = list(classifier.classes) if classifier is not None else list(self.wbc_classes)
        if blast_classes is not None:
            unknown = [c for c in blast_classes if c not in self.cell_classes]
            if unknown:
                raise ValueError(f"blast classes {unknown} are not among the cell classes {self.cell_classes}")
            self.blast_classes = list(blast_classes)
        else:
            self.blast_classes = default_blast_classes(self.cell_classes)
        self.crop_margin = crop_margin
        self.merge_iou = merge_iou
        self.wbc_containment = wbc_containment
        self.blast_flag_percent = blast_flag_percent
        self.min_cells = min_cells
        self.max_pixels = max_pixels

    @classmethod
    def from_bundles(cls, detector_bundle: str | Path, classifier_bundle: str | Path | None = None, *,
                     device: str = "cpu", **options: Any) -> "SmearAnalyzer":
        return cls(detector_bundle, classifier_bundle, device=device, **options)

    # -- detection over tiles ------------------------------------------------
    def detect(self, image: Image.Image) -> tuple[DetectionResult, int]:
        """Detections (score >= the detector's threshold) in image coordinates, merged across tiles."""
        pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        width, height = image.size
        tiles = tile_grid(width, height, self.tile_size, self.overlap)
        all_boxes, all_scores, all_labels, all_cut = [], [], [], []
        edge = 4.0
        for x0, y0, x1, y1 in tiles:
            result = self.detector.detect([pixels[:, y0:y1, x0:x1].float() / 255.0])[0]
            boxes = result.boxes.astype(np.float64) + np.array([x0, y0, x0, y0], dtype=np.float64)
            cut = np.zeros(len(boxes), dtype=bool)
            if x0 > 0:
                cut |= boxes[:, 0] <= x0 + edge
            if y0 > 0:
                cut |= boxes[:, 1] <= y0 + edge
            if x1 < width:
                cut |= boxes[:, 2] >= x1 - edge
            if y1 < height:
                cut |= boxes[:, 3] >= y1 - edge
            all_boxes.append(boxes)
            all_scores.append(result.scores)
            all_labels.append(result.labels)
            all_cut.append(cut)
        boxes = np.concatenate(all_boxes).reshape(-1, 4)
        scores = np.concatenate(all_scores)
        labels = np.concatenate(all_labels).astype(int)
        if len(tiles) > 1:
            keep = merge_tile_detections(boxes, scores, labels, np.concatenate(all_cut), self.merge_iou)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return DetectionResult(boxes, scores, labels, self.detector.classes), len(tiles)

    def crop_cell(self, image: Image.Image, box: Sequence[float]) -> Image.Image:
        """The crop the cell classifier sees: the box plus ``crop_margin`` on each side."""
        x0, y0, x1, y1 = box
        mx, my = (x1 - x0) * self.crop_margin, (y1 - y0) * self.crop_margin
        width, height = image.size
        return image.crop((max(0, int(x0 - mx)), max(0, int(y0 - my)), min(width, int(math.ceil(x1 + mx))),
                           min(height, int(math.ceil(y1 + my)))))

    # -- one field ------------------------------------------------------------
    def analyze(self, image: Image.Image | str | Path, source: str | None = None) -> SmearResult:
        start = time.perf_counter()
        if not isinstance(image, Image.Image):
            source = source or str(image)
            image = load_image(image, max_pixels=self.max_pixels)
        source = source or "<image>"
        image = image.convert("RGB")
        detections, n_tiles = self.detect(image)
        wbc_index = {self.detector.classes.index(c) for c in self.wbc_classes}
        is_wbc = np.array([int(label) in wbc_index for label in detections.labels], dtype=bool)
        if is_wbc.sum() > 1 and self.wbc_containment < 1:
            # White cells do not overlap much: a white-cell box lying mostly inside a
            # higher-scored one is the same cell found twice, and would be counted twice.
            wbc = np.where(is_wbc)[0]
            keep = merge_tile_detections(detections.boxes[wbc], detections.scores[wbc],
                                         np.zeros(len(wbc), dtype=int), np.ones(len(wbc), dtype=bool),
                                         self.merge_iou, self.wbc_containment)
            drop = np.setdiff1d(wbc, wbc[keep])
            if len(drop):
                kept = np.setdiff1d(np.arange(len(detections)), drop)
                detections = DetectionResult(detections.boxes[kept], detections.scores[kept],
                                             detections.labels[kept], detections.classes)
                is_wbc = is_wbc[kept]
        order = np.where(is_wbc)[0]
        # Reading order: top to bottom, then left to right, so cell ids are stable.
        order = order[np.lexsort((detections.boxes[order, 0], detections.boxes[order, 1]))] if len(order) else order
        cells: list[Cell] = []
        if len(order) and self.classifier is not None:
            crops = [self.crop_cell(image, detections.boxes[i]) for i in order]
            predictions = []
            for chunk in range(0, len(crops), 32):
                predictions += self.classifier.predict_images(crops[chunk:chunk + 32])
            for number, (i, prediction) in enumerate(zip(order, predictions), 1):
                cells.append(Cell(number, tuple(float(v) for v in detections.boxes[i]),
                                  self.detector.classes[int(detections.labels[i])], float(detections.scores[i]),
                                  prediction.label, prediction.top_class, prediction.confidence,
                                  prediction.uncertain, dict(prediction.probabilities)))
        else:
            for number, i in enumerate(order, 1):
                name = self.detector.classes[int(detections.labels[i])]
                cells.append(Cell(number, tuple(float(v) for v in detections.boxes[i]), name,
                                  float(detections.scores[i]), name, name, float(detections.scores[i]), False))
        differential = Differential.from_labels(
            [cell.label for cell in cells], self.cell_classes, self.blast_classes,
            blast_flag_percent=self.blast_flag_percent, min_cells=self.min_cells)
        return SmearResult(source, image.size[0], image.size[1], cells, detections.counts(), differential,
                           detections, list(self.cell_classes), n_tiles, time.perf_counter() - start)

    # -- many fields ----------------------------------------------------------
    def analyze_paths(self, paths: Sequence[str | Path], out_dir: str | Path, *,
                      progress: Callable[..., None] | None = None) -> "FolderSummary":
        """Analyse every file, write its outputs and the folder's ``summary.csv`` / ``summary.json``.

        An unreadable file gives a row with ``error`` set, never a crash.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        results: list[SmearResult] = []
        used: set[str] = set()
        for path in paths:
            path = Path(path)
            stem = _unique_stem(path, used)
            try:
                image = load_image(path, max_pixels=self.max_pixels)
                result = self.analyze(image, source=str(path))
                result.write(out_dir, stem, image)
            except ImageDecodeError as exc:
                log.warning("cannot read %s: %s", path, exc)
                result = SmearResult(str(path), 0, 0, [], {}, Differential.from_labels(
                    [], self.cell_classes, self.blast_classes, min_cells=self.min_cells), error=str(exc))
                result.write(out_dir, stem)
            results.append(result)
            if progress is not None:
                progress(advance=1, info=f"{path.name}: {result.differential.total} WBC")
        summary = FolderSummary(results, self)
        summary.write(out_dir)
        return summary


def _unique_stem(path: Path, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem) or "image"
    stem, k = base, 1
    while stem in used:
        k += 1
        stem = f"{base}-{k}"
    used.add(stem)
    return stem


@dataclass
class FolderSummary:
    results: list[SmearResult]
    analyzer: SmearAnalyzer

    @property
    def pooled(self) -> Differential:
        """The differential of all fields together (the slide)."""
        labels = [cell.label for result in self.results for cell in result.cells]
        a = self.analyzer
        return Differential.from_labels(labels, a.cell_classes, a.blast_classes,
                                        blast_flag_percent=a.blast_flag_percent, min_cells=a.min_cells)

    def rows(self) -> list[dict[str, Any]]:
        classes = self.analyzer.cell_classes
        object_classes = self.analyzer.detector.classes
        rows = []

        def row_for(name: str, d: Differential, objects: dict[str, int], seconds: float | str, error: str) -> dict:
            row: dict[str, Any] = {"image": name, "wbc": d.total}
            row.update({f"n_{c}": d.counts.get(c, 0) for c in classes})
            row["n_uncertain"] = d.uncertain
            row.update({f"objects_{c}": objects.get(c, 0) for c in object_classes})
            row["blasts"] = "" if d.blasts is None else d.blasts
            row["blast_percent"] = "" if d.blast_percentage is None else round(d.blast_percentage, 2)
            row["blast_ci95_low"] = "" if d.blast_ci95 is None else round(d.blast_ci95[0], 2)
            row["blast_ci95_high"] = "" if d.blast_ci95 is None else round(d.blast_ci95[1], 2)
            row["flags"] = " | ".join(d.flags)
            row["seconds"] = seconds
            row["error"] = error
            return row

        for result in self.results:
            rows.append(row_for(result.source, result.differential, result.object_counts,
                                round(result.seconds, 3), result.error or ""))
        totals: dict[str, int] = {}
        for result in self.results:
            for name, n in result.object_counts.items():
                totals[name] = totals.get(name, 0) + n
        rows.append(row_for("TOTAL", self.pooled, totals, round(sum(r.seconds for r in self.results), 3), ""))
        return rows

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        rows = self.rows()
        csv_path = out_dir / "summary.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        json_path = out_dir / "summary.json"
        json_path.write_text(json.dumps({
            "disclaimer": DISCLAIMER,
            "images": len(self.results),
            "failed": sum(1 for r in self.results if r.error),
            "detector": self.analyzer.detector.info.model_name,
            "classifier": getattr(getattr(self.analyzer.classifier, "info", None), "model_name", None),
            "blast_classes": self.analyzer.blast_classes,
            "pooled_differential": self.pooled.to_json(),
            "fields": [r.summary() for r in self.results],
        }, indent=2))
        return csv_path, json_path
