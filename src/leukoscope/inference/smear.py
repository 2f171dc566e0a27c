"""Whole-smear analysis: detect every white cell, classify it, count, flag.

What a commercial analyzer does for one field (or a folder of fields of one
slide): locate the white cells, pre-classify each, keep low-confidence cells in
an "uncertain" bin for the technologist, and report the differential (counts,
counts per 100 WBC) with the blast percentage and its 95% Wilson interval, unless
a quality gate (:mod:`leukoscope.inference.quality`) says the count cannot be trusted.

    analyzer = SmearAnalyzer.from_bundles("runs/det/bundle", "runs/cls/bundle")
    result = analyzer.analyze("field.jpg")
    result.differential.blast_percentage, result.differential.flags, result.warnings
    write_field(result, "out/")     # annotated PNG, per-cell CSV, JSON (leukoscope.inference.smear_output)

The parts live in their own modules: the count in ``differential``, tiles in
``tiling``, the picture in ``drawing``, the files in ``smear_output``.
Decision support for trained staff, not a diagnosis.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from leukoscope import __version__
from leukoscope.inference.detector import CellDetector, DetectionResult
from leukoscope.inference.detector_runtime import scaled_cap
from leukoscope.inference.differential import CountRules
from leukoscope.inference.quality import (DEFAULT_MIN_DETECTOR_AP, DEFAULT_UNFAMILIAR_SHARE, GRAYSCALE_WARNING,
                                          UNSCALED_FIELD_WORDING, cap_warning, classified_unit, detector_warnings,
                                          tiny_field_warning, unfamiliar_warning, unframed_warning,
                                          possible_cells_note, weak_scale_warning)
from leukoscope.inference.folder import analyze_folder
from leukoscope.inference.nuclei import MIN_NUCLEAR_SHARE, without_nucleus
from leukoscope.inference.slide.reader import recorded_um_per_px
from leukoscope.inference.smear_output import FolderSummary
from leukoscope.inference.smear_result import Cell, SmearResult
from leukoscope.inference.tiling import merge_tile_detections, tile_grid
from leukoscope.cell_window import crop_cell
from leukoscope.field_of_view import filled_field
from leukoscope.io import DEFAULT_MAX_PIXELS, PAGES_INFO, load_image
from leukoscope.labels import blast_classes_in, checked_blast_classes
from leukoscope.light import LightRange, field_white, light_warning
from leukoscope.pixels import is_grayscale
from leukoscope.scale import (FIELD_RUN_MAX_RATIO, RUN_SCALE_MIN_ESTIMATES, SCALE_OPTION, WEAK_ESTIMATE_RED_CELLS,
                              FieldScale, checked_record, checked_um_per_px, disagrees_with_run, field_scale,
                              run_scale, stated_run_doubt, stated_scale_doubt)

log = logging.getLogger(__name__)

#: Detector classes that are white cells when ``wbc_classes`` is not given (compared by :func:`class_key`).
DEFAULT_WBC_NAMES = frozenset({"wbc", "leukocyte", "white", "white cell"})
_NOT_WBC = frozenset({"rbc", "platelet", "erythrocyte", "red", "red cell", "thrombocyte"})


def class_key(name: str) -> str:
    """A detector class name as the white-cell rule compares it: lower case, words split at spaces, ``_`` and
    ``-``, plurals and "blood" left out ("WBCs", "white_blood_cell" and "White blood cells" are one name)."""
    words = [word for word in re.split(r"[\s_\-]+", name.lower().strip()) if word and word != "blood"]
    return " ".join(word[:-1] if len(word) > 3 and word.endswith("s") else word for word in words)


#: Tiles are at most this many pixels on a side as the detector's network sees them: tile size
#: follows the detector's ``input_scale`` (1: 2048 field pixels; the shipped detector's 0.5: 4096).
#: One tile where the field fits: tiles overlap, and each costs its own proposals (docs/benchmarks.md).
TILE_MODEL_PIXELS = 2048
#: White-cell boxes scored from this up to the detector's threshold are said as possible white cells (not counted):
#: none in 140 CBC and BCCD fields, 12 of 60 all-taleqani Benign fields (another lab), and the neutrophil of a CBC
#: field darkened to 0.6 (0.41).
POSSIBLE_CELL_FLOOR = 0.3


def unscaled_warning(assumed_um_per_px: float, why: str) -> str:
    """The warning of a field analysed without a scale of its own or its run's, at the detector's (``why``:
    the estimate's note)."""
    return (f"{UNSCALED_FIELD_WORDING} ({why}): analysed at {assumed_um_per_px:.4f} um/px, the detector's "
            f"training scale; white cells may be missed or mistyped: state the microscope's scale ({SCALE_OPTION})")


def _without(detections: DetectionResult, is_wbc: np.ndarray, drop: np.ndarray) -> tuple[DetectionResult, np.ndarray]:
    """``detections`` and their white-cell mask without the detections at indices ``drop``."""
    if not len(drop):
        return detections, is_wbc
    kept = np.setdiff1d(np.arange(len(detections)), drop)
    return (DetectionResult(detections.boxes[kept], detections.scores[kept], detections.labels[kept],
                            detections.classes), is_wbc[kept])


def _inside_any(box: np.ndarray, others: np.ndarray, share: float = 0.3) -> bool:
    """Whether more than ``share`` of ``box`` lies inside one of the boxes ``others``."""
    if not len(others):
        return False
    width = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    area = max(float((box[2] - box[0]) * (box[3] - box[1])), 1e-9)
    return bool((width * height > share * area).any())


def _checked_run_scale(um_per_px: float | None) -> float | None:
    return None if um_per_px is None else checked_um_per_px(um_per_px, "run_um_per_px")


def default_tile_size(detector: Any) -> int:
    """:data:`TILE_MODEL_PIXELS` in the pixels the detector is given (divided by its bundle's
    ``input_scale``; a detector without bundle information is taken to see its input unscaled)."""
    info = getattr(detector, "info", None)
    scale = float(getattr(info, "input_scale", 1.0) or 1.0) if info is not None else 1.0
    return max(64, int(round(TILE_MODEL_PIXELS / scale)))


def default_wbc_classes(classes: Sequence[str]) -> list[str]:
    named = [c for c in classes if class_key(c) in DEFAULT_WBC_NAMES]
    return named or [c for c in classes if class_key(c) not in _NOT_WBC]


@dataclass
class PreparedField:
    """A field ready for the models (:meth:`SmearAnalyzer.prepare`)."""

    image: Image.Image
    """The field in RGB, as given."""
    scale: FieldScale
    working_um_per_px: float | None
    """The pixel size analysis works at (see :meth:`SmearAnalyzer.field_scale`)."""
    factor: float
    """How much ``detector_image`` is resampled from ``image`` (1: not at all)."""
    detector_image: Image.Image
    tiles: list[tuple[tuple[int, int, int, int], np.ndarray]]
    """:meth:`SmearAnalyzer.detector_tiles` of ``detector_image``."""
    seconds: float = 0.0
    """Time spent preparing it (part of the field's analysis time)."""
    scale_doubt: str | None = None
    """Why the scale the user stated looks wrong for this field (:func:`leukoscope.scale.stated_scale_doubt`), or
    why its own estimate may be (:func:`leukoscope.inference.quality.weak_scale_warning`)."""
    run_warnings: tuple[str, ...] = ()
    """Warnings about its run as a whole that hold for the field too (the stated scale the run's red cells
    contradict, :func:`leukoscope.scale.stated_run_doubt`): its own count is no surer than the run's."""

    @cached_property
    def white(self) -> np.ndarray | None:
        """The colour of its background's light (:func:`leukoscope.light.field_white`), read once: a slide's
        tile asks for its warnings twice (the tile read with its margin, then its core)."""
        return field_white(self.image)


@dataclass
class FieldDetections:
    """Detections of one field in image coordinates, merged across its tiles."""

    detections: DetectionResult
    tiles: int
    capped_tiles: int
    """Tiles where the detector returned as many boxes as its cap allows."""
    below: DetectionResult | None = None
    """The boxes scored under the threshold, from :meth:`SmearAnalyzer.detect`'s ``floor`` (None: not asked)."""


def _bundle_record(model: Any, backend: str) -> dict[str, Any] | None:
    """What a run's outputs record of a model given as a bundle (None: passed in already loaded): where it is
    (``pretrained:NAME`` for a shipped one), what ran it (``backend``: the one it was loaded on, not the one
    asked for) and what its results depend on (:func:`leukoscope.bundle.model_identity`: the weights' digest,
    options, temperature, flag; a classical model's pipeline file digest in place of the weights')."""
    if not isinstance(model, (str, Path)):
        return None
    import hashlib

    from leukoscope.bundle import SKLEARN_FILE, model_identity
    from leukoscope.pretrained import is_pretrained_spec, resolve_bundle, shipped_spec

    folder = resolve_bundle(model)
    where = str(model) if is_pretrained_spec(model) else shipped_spec(folder) or str(folder.resolve())
    record = {"bundle": where, "backend": backend, **model_identity(folder, backend)}
    if record.get("weights_sha256") is None and (folder / SKLEARN_FILE).is_file():
        record["model_sha256"] = hashlib.sha256((folder / SKLEARN_FILE).read_bytes()).hexdigest()
    return record


class SmearAnalyzer:
    """Detect -> crop -> classify -> differential, for fields of any size.

    ``classifier`` (a :class:`~leukoscope.inference.predictor.CellClassifier`) types
    each white cell; without one, cells keep the detector's class (and blasts are
    only counted if the detector itself has blast classes).
    ``tile_size``/``overlap`` are in the pixels the detector is given (the field's own, or those
    of the field resampled to the detector's training scale, below); the overlap should
    exceed the largest white cell (about 300 px in 640x480 BCCD fields). The default tile is
    :data:`TILE_MODEL_PIXELS` as the network sees them (the detector scales its input by its
    ``input_scale``): 4096 field pixels for the shipped detector, so a 2592x1944 field is one
    tile. ``wbc_containment``:
    a white-cell box covered more than this share by a higher-scored white-cell
    box is a duplicate, as is one holding that share of two higher-scored ones (two
    touching cells in one box) or of one that is the same cell boxed tighter
    (:func:`~leukoscope.inference.tiling.merge_tile_detections`) (1 turns this off).
    ``min_nuclear_share``: a white-cell box with fewer violet (nuclear) pixels holds no nucleus,
    a red cell or a clump of them, and is dropped where the field's stain shows nuclei violet
    (:mod:`leukoscope.inference.nuclei`; 0 turns this off).

    Blast classes default to the classes named in :data:`leukoscope.labels.BLAST_CLASS_NAMES`
    (exact names: an erythroblast is not a blast). Quality gates: a detector whose bundle
    records no test AP@0.5 for white cells, or one below ``min_detector_ap``, and a field
    where the detector hit its per-image cap, get a warning and never a leukemia flag; so does a
    field where more than ``unfamiliar_share`` of the cells are unlike the classifier's training
    images (when its bundle has OOD statistics: :mod:`leukoscope.inference.quality`).

    One physical scale (:mod:`leukoscope.scale`): each field's pixel size is ``um_per_px``
    when stated, else estimated from its red cells. A detector that records the pixel size
    of its training images sees the field resampled to it; a classifier trained on a
    physical window (``cell_window_um``) gets crops of that many micrometres. A field whose
    scale cannot be estimated is analysed at ``run_um_per_px`` when given (the run's scale:
    :func:`leukoscope.scale.run_scale` of a sample of a folder's fields, or a resumed archive's
    recorded one), else assumed to be at the detector's scale, and says which.
    """

    def __init__(
        self,
        detector: CellDetector | str | Path,
        classifier: Any | str | Path | None = None,
        *,
        tile_size: int | None = None,
        overlap: int = 320,
        wbc_classes: Sequence[str] | None = None,
        blast_classes: Sequence[str] | None = None,
        detector_threshold: float | None = None,
        uncertain_threshold: float | None = None,
        crop_margin: float = 0.1,
        merge_iou: float = 0.5,
        wbc_containment: float = 0.7,
        min_nuclear_share: float = MIN_NUCLEAR_SHARE,
        blast_flag_percent: float = 20.0,
        min_cells: int = 100,
        min_detector_ap: float = DEFAULT_MIN_DETECTOR_AP,
        unfamiliar_share: float = DEFAULT_UNFAMILIAR_SHARE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        um_per_px: float | None = None,
        run_um_per_px: float | None = None,
        device: str = "cpu",
        backend: str = "torch",
        threads: int | None = None,
    ) -> None:
        # backend/threads: what runs each model given as a bundle (auto: an exported graph when the
        # bundle has one); a model passed in already loaded keeps its own.
        for name, value in (("detector threshold", detector_threshold), ("uncertain threshold", uncertain_threshold)):
            if value is not None and not 0.0 <= value <= 1.0:  # before any model loads
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        given = {"detector": detector, "classifier": classifier}  # recorded once loaded, with what runs them
        if isinstance(detector, (str, Path)):
            detector = CellDetector.from_bundle(detector, device, backend=backend, threads=threads)
        if isinstance(classifier, (str, Path)):
            from leukoscope.inference.predictor import CellClassifier

            classifier = CellClassifier.from_bundle(classifier, device, backend=backend, threads=threads)
        self.detector = detector
        self.classifier = classifier
        self._given = given
        if detector_threshold is not None:
            detector.score_threshold = float(detector_threshold)
        if classifier is not None and uncertain_threshold is not None:
            classifier.threshold = float(uncertain_threshold)
        self.tile_size = int(tile_size) if tile_size is not None else default_tile_size(detector)
        self.overlap = int(overlap)
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap ({overlap}) must be >= 0 and smaller than tile_size ({self.tile_size})")
        unknown = [c for c in (wbc_classes or []) if c not in detector.classes]
        if unknown:
            raise ValueError(f"wbc classes {unknown} are not detector classes {detector.classes}")
        self.wbc_classes = list(wbc_classes) if wbc_classes else default_wbc_classes(detector.classes)
        cell_classes = list(classifier.classes) if classifier is not None else list(self.wbc_classes)
        if blast_classes is not None:
            blast_classes = checked_blast_classes(blast_classes, cell_classes)
        else:
            blast_classes = blast_classes_in(cell_classes)
            if classifier is not None and not blast_classes:
                # Said once, not silently: with no blast class there is no blast count at all.
                log.warning("none of the classifier's classes %s is a blast class by name (see "
                            "leukoscope.labels.BLAST_CLASS_NAMES): no blast percentage will be reported; "
                            "name them with --blast-class (analyze, serve)", cell_classes)
        if min_cells < 1:
            raise ValueError(f"min_cells must be at least 1, got {min_cells}")
        self.rules = CountRules(tuple(cell_classes), tuple(blast_classes), blast_flag_percent, int(min_cells))
        if not 0.0 <= min_detector_ap <= 1.0:
            raise ValueError(f"min_detector_ap must be in [0, 1], got {min_detector_ap}")
        if not 0.0 <= unfamiliar_share < 1.0:
            raise ValueError(f"unfamiliar_share must be in [0, 1), got {unfamiliar_share}")
        self.unfamiliar_share = float(unfamiliar_share)
        self.warnings = detector_warnings(getattr(detector.info, "metrics", None) or {}, self.wbc_classes,
                                          min_detector_ap)
        for warning in self.warnings:
            log.warning("%s No leukemia flag will be raised.", warning)
        self.detection_cap = getattr(detector, "detection_cap", None)
        self.crop_margin = crop_margin
        self.merge_iou = merge_iou
        self.wbc_containment = wbc_containment
        if not 0.0 <= min_nuclear_share < 1.0:
            raise ValueError(f"min_nuclear_share must be in [0, 1), got {min_nuclear_share}")
        self.min_nuclear_share = float(min_nuclear_share)
        self.max_pixels = max_pixels
        self.um_per_px = FieldScale.given(um_per_px).um_per_px if um_per_px is not None else None
        self.run_um_per_px = _checked_run_scale(run_um_per_px)
        preprocessing = getattr(getattr(classifier, "info", None), "preprocessing", None)
        self.window_um = getattr(preprocessing, "cell_window_um", None)

    @property
    def cell_classes(self) -> list[str]:
        return list(self.rules.classes)

    @cached_property
    def provenance(self) -> dict[str, Any]:
        """What made this analyzer's results, for a run's ``summary.json``: leukoscope's version and each model
        given as a bundle as it runs (:func:`_bundle_record`; read when first asked: the weights are hashed)."""
        loaded = {"detector": self.detector, "classifier": self.classifier}
        records = {role: _bundle_record(self._given[role], getattr(model, "backend", "torch"))
                   for role, model in loaded.items()}
        return {"leukoscope": __version__, **records}

    @property
    def model_names(self) -> dict[str, str | None]:
        """The ``detector`` and ``classifier`` architectures' names (None: no classifier)."""
        return {"detector": self.detector.info.model_name,
                "classifier": getattr(getattr(self.classifier, "info", None), "model_name", None)}

    @property
    def blast_classes(self) -> list[str]:
        return list(self.rules.blast_classes)

    @classmethod
    def from_bundles(cls, detector_bundle: str | Path, classifier_bundle: str | Path | None = None, *,
                     device: str = "cpu", **options: Any) -> "SmearAnalyzer":
        return cls(detector_bundle, classifier_bundle, device=device, **options)

    # -- detection over tiles ------------------------------------------------
    def detector_tiles(self, image: Image.Image) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
        """The tiles the detector sees (:func:`tile_grid`) with their (H, W, 3) uint8 pixels: views of one
        array (the detector makes each tile float when it runs it, so a field waiting in a queue is not
        held four times over as floats)."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = np.asarray(rgb, dtype=np.uint8)
        return [((x0, y0, x1, y1), pixels[y0:y1, x0:x1])
                for x0, y0, x1, y1 in tile_grid(image.size[0], image.size[1], self.tile_size, self.overlap)]

    def detect(self, image: Image.Image, tiles: list[tuple[tuple[int, int, int, int], np.ndarray]] | None = None,
               *, threshold: float | None = None, floor: float | None = None,
               on_tile: Callable[[int, int], None] | None = None) -> FieldDetections:
        """Detections (score >= the detector's threshold, or ``threshold``) in image coordinates, merged across
        tiles, and how many tiles filled the detector's cap (boxes are kept best-first, so below the cap
        every box above the threshold was kept; at the cap some may have been dropped).
        ``floor``: also the boxes scored from ``floor`` up to the threshold (:attr:`FieldDetections.below`),
        merged among themselves, never in place of one above it.
        ``tiles``: :meth:`detector_tiles` of ``image`` when already made (a folder run makes them ahead).
        ``on_tile(done, total)``: called after each tile (a 100 Mpx field runs a minute: its progress)."""
        width, height = image.size
        tiles = self.detector_tiles(image) if tiles is None else tiles
        # what the detector returns at the threshold it is asked for is counted as it comes; with a floor, the
        # boxes under the operating threshold are set apart
        operating = (self.detector.score_threshold if threshold is None else threshold) if floor is not None else 0.0
        lowest = threshold if floor is None else min(floor, operating)
        all_boxes, all_scores, all_labels, all_cut = [], [], [], []
        edge = 4.0
        capped = 0
        for done, ((x0, y0, x1, y1), pixels) in enumerate(tiles, 1):
            result = self.detector.detect([pixels], threshold=lowest)[0]  # uint8: float only while it runs
            if self.detection_cap is not None and int((result.scores >= operating).sum()) >= scaled_cap(
                    self.detection_cap, (x1 - x0) * (y1 - y0)):
                capped += 1
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
            if on_tile is not None:
                on_tile(done, len(tiles))
        boxes = np.concatenate(all_boxes).reshape(-1, 4)
        scores = np.concatenate(all_scores)
        labels = np.concatenate(all_labels).astype(int)
        cut = np.concatenate(all_cut)
        above = scores >= operating
        found = self._merged(boxes[above], scores[above], labels[above], cut[above], len(tiles))
        below = None
        if floor is not None:
            below = self._merged(boxes[~above], scores[~above], labels[~above], cut[~above], len(tiles))
        return FieldDetections(found, len(tiles), capped, below)

    def _merged(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, cut: np.ndarray,
                tiles: int) -> DetectionResult:
        """Detections of overlapping tiles, each cell once (:func:`merge_tile_detections`)."""
        if tiles > 1:
            keep = merge_tile_detections(boxes, scores, labels, cut, self.merge_iou)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return DetectionResult(boxes, scores, labels, self.detector.classes)

    def crop_cell(self, image: Image.Image, box: Sequence[float], um_per_px: float | None = None) -> Image.Image:
        """The crop the cell classifier sees (:func:`leukoscope.cell_window.crop_cell`): its
        physical window at the field's scale, or the box plus ``crop_margin`` on each side."""
        return crop_cell(image, box, um_per_px=um_per_px, window_um=self.window_um, margin=self.crop_margin)

    def cell_crops(self, image: Image.Image, result: SmearResult) -> list[Image.Image]:
        """The crops the classifier saw for ``result``'s cells (``image``: the field :meth:`analyze`
        was given): each cell's window at the scale that field was analysed at. Stored crops, their
        Grad-CAM and exported training data must come from here, not from :meth:`crop_cell` alone."""
        um_per_px = (result.scale or {}).get("analysed_at_um_per_px")
        image = image if image.mode == "RGB" else image.convert("RGB")
        return [self.crop_cell(image, cell.box, um_per_px) for cell in result.cells]

    def field_scale(self, image: Image.Image, known: FieldScale | None = None, *,
                    run_um_per_px: float | None = None) -> tuple[FieldScale, float | None, float]:
        """The field's scale (the run's when the field's own cannot be estimated and the run has one),
        the pixel size analysis works at (the detector's training scale when there is no scale), and
        the factor the field is resampled by for the detector (1: already at its scale within 15%, or
        no scale to go by). ``known``: this
        image's own scale when the caller knows it (a slide tile read at a coarser level: the
        slide's, or the user's, level-0 pixel size times the level's downsample); it comes
        first, then the analyzer's ``um_per_px``, then the red-cell estimate. ``run_um_per_px``: the
        run's scale for this field alone, in place of the analyzer's (one analyzer serves many runs:
        the web service's cases); None: the analyzer's own, if it has one."""
        scale = known if known is not None else field_scale(image, self.um_per_px)
        run = _checked_run_scale(run_um_per_px) if run_um_per_px is not None else self.run_um_per_px
        if not scale.known and run is not None:
            scale = FieldScale(run, "run", 0, f"{scale.note}: analysed at the run's scale (the median "
                               f"estimate of a sample of its fields)")
        elif disagrees_with_run(scale, run):
            scale = FieldScale(run, "run", 0, f"its own estimate, {scale.um_per_px:.4f} um/px from {scale.red_cells} "
                               f"red cells, is more than {FIELD_RUN_MAX_RATIO:g} times off the run's scale: "
                               f"analysed at the run's (the median estimate of a sample of its fields)")
        trained_at = getattr(self.detector.info, "um_per_px", None)
        working = scale.um_per_px if scale.known else trained_at
        factor = 1.0
        if scale.known and trained_at:
            factor = float(scale.um_per_px) / float(trained_at)
            if abs(math.log(factor)) < math.log(1.15):
                factor = 1.0
            # Never upsample past the pixel limit a decoded image may have.
            limit = math.sqrt(self.max_pixels / max(1, image.size[0] * image.size[1]))
            factor = min(factor, limit)
        return scale, working, factor

    # -- one field ------------------------------------------------------------
    def prepare(self, image: Image.Image, *, scale: FieldScale | None = None, um_per_px: float | None = None,
                run_um_per_px: float | None = None, run_warnings: Sequence[str] = ()) -> PreparedField:
        """The work on a field before the models run: RGB, its scale (:meth:`field_scale`) and the
        copy the detector sees. No model is touched, so a folder run does it for the next field in a
        worker thread while this one is detected (:mod:`leukoscope.inference.folder`). ``um_per_px``: the
        scale a user stated for this field, in place of the analyzer's (the web service's per-upload scale);
        its red cells may doubt it, as they doubt the analyzer's. ``run_warnings``: its run's
        (:attr:`PreparedField.run_warnings`)."""
        start = time.perf_counter()
        image = image if image.mode == "RGB" else image.convert("RGB")
        # The detector sees the black outside an eyepiece camera's field of view painted as background: framed by
        # black, it had found no white cell at all (the pictures keep the field as it is).
        lit = filled_field(image)
        stated_um_per_px = um_per_px if um_per_px is not None else self.um_per_px
        stated = scale is None and stated_um_per_px is not None
        if stated:
            scale = FieldScale.given(stated_um_per_px)
        elif scale is not None and scale.source == "recorded":  # a file's record, checked by its red cells
            scale = checked_record(image, float(scale.um_per_px))
        scale, working_um_per_px, factor = self.field_scale(image, scale, run_um_per_px=run_um_per_px)
        doubt = stated_scale_doubt(image, stated_um_per_px) if stated else None
        run = _checked_run_scale(run_um_per_px) if run_um_per_px is not None else self.run_um_per_px
        if scale.source == "estimated" and scale.red_cells <= WEAK_ESTIMATE_RED_CELLS and run is None:
            doubt = weak_scale_warning(float(scale.um_per_px), scale.red_cells)  # (a run's scale would have checked it)
        detector_image = lit
        if factor != 1.0:
            size = (max(1, round(image.size[0] * factor)), max(1, round(image.size[1] * factor)))
            detector_image = lit.resize(size, Image.Resampling.BILINEAR)
        return PreparedField(image, scale, working_um_per_px, factor, detector_image,
                             self.detector_tiles(detector_image), time.perf_counter() - start, doubt,
                             tuple(run_warnings))

    def recorded_scale(self, path: str | Path) -> FieldScale | None:
        """The pixel size a field's file records (a one-level TIFF's resolution tags, read as a slide's are:
        microscope cameras write them), unless the analyzer has a stated one, which wins; None: none recorded."""
        if self.um_per_px is not None:
            return None
        recorded = recorded_um_per_px(path)
        if recorded is None:
            return None
        return FieldScale.recorded(recorded)

    def analyze(self, image: Image.Image | str | Path, source: str | None = None, *,
                scale: FieldScale | None = None, um_per_px: float | None = None,
                run_um_per_px: float | None = None, run_warnings: Sequence[str] = ()) -> SmearResult:
        """One field. ``scale``: its pixel size when known from elsewhere (a slide file's record;
        see :meth:`field_scale`); else stated (``um_per_px``, or the analyzer's), recorded in the file
        (:meth:`recorded_scale`, when ``image`` is a path) or estimated from its red
        cells, else the run's (``run_um_per_px``, or the analyzer's). ``run_warnings``: its run's
        (:meth:`prepare`)."""
        start = time.perf_counter()
        if not isinstance(image, Image.Image):
            source = source or str(image)
            if scale is None and um_per_px is None:
                scale = self.recorded_scale(image)
            image = load_image(image, max_pixels=self.max_pixels)
        result = self.analyze_prepared(self.prepare(image, scale=scale, um_per_px=um_per_px,
                                                    run_um_per_px=run_um_per_px, run_warnings=run_warnings), source)
        result.seconds = time.perf_counter() - start
        return result

    def detect_field(self, field: PreparedField, *, threshold: float | None = None, floor: float | None = None,
                     on_tile: Callable[[int, int], None] | None = None) -> FieldDetections:
        """:meth:`detect` on the copy of the field the detector sees (at its training scale), the boxes brought
        back to the field's own pixels: what `analyze` counts, and what `evaluate` scores a detector on."""
        found = self.detect(field.detector_image, field.tiles, threshold=threshold, floor=floor, on_tile=on_tile)
        if field.factor != 1.0:
            size = field.detector_image.size
            # Back by each side's own ratio (sizes are rounded), so that boxes stay inside the field.
            back = np.array([field.image.size[0] / size[0], field.image.size[1] / size[1]] * 2)
            found.detections = DetectionResult(found.detections.boxes * back, found.detections.scores,
                                               found.detections.labels, found.detections.classes)
            if found.below is not None:
                found.below = DetectionResult(found.below.boxes * back, found.below.scores, found.below.labels,
                                              found.below.classes)
        return found

    def possible_white_cells(self, image: Image.Image, below: DetectionResult | None,
                             counted: np.ndarray) -> list[dict[str, Any]]:
        """White-cell boxes the detector scored under its threshold (from :data:`POSSIBLE_CELL_FLOOR`) that hold
        nuclear stain and are no part of a counted cell (``counted``: their boxes): not counted, but said, so that
        a field where a clear neutrophil scored 0.41 (a darker exposure, a slightly other magnification) does not
        read "no white cell found" and nothing more."""
        if below is None or not len(below):
            return []
        wbc_index = {self.detector.classes.index(c) for c in self.wbc_classes}
        candidates = np.array([i for i in range(len(below)) if int(below.labels[i]) in wbc_index
                               and not _inside_any(below.boxes[i], counted)], dtype=int)
        if len(candidates) > 1:  # one faint cell boxed twice is one possible cell, as counted cells are merged
            candidates = candidates[merge_tile_detections(
                below.boxes[candidates], below.scores[candidates], np.zeros(len(candidates), dtype=int),
                np.ones(len(candidates), dtype=bool), self.merge_iou, self.wbc_containment, around=2)]
        candidates = candidates.tolist()
        if candidates and self.min_nuclear_share > 0:
            empty = without_nucleus(image, below.boxes[candidates], self.min_nuclear_share)
            candidates = [i for i, no_nucleus in zip(candidates, empty) if not no_nucleus]
        return [{"box": [round(float(v), 1) for v in below.boxes[i]],
                 "detector_score": round(float(below.scores[i]), 4)} for i in candidates]

    def unfamiliar_cells_warning(self, cells: Sequence[Cell]) -> str | None:
        """The warning of a field whose ``cells`` are too often unlike the classifier's training images."""
        return unfamiliar_warning([cell.unfamiliar for cell in cells], self.unfamiliar_share,
                                  classified_unit(self.rules.classes))

    @property
    def light_range(self) -> LightRange | None:
        """The light of the classifier's training images (:attr:`CellClassifier.light_range`), where its bundle
        records it."""
        return getattr(self.classifier, "light_range", None)

    def light_warning(self, field: PreparedField) -> str | None:
        """The warning of a field whose background's colour is outside :attr:`light_range`."""
        if self.light_range is None:
            return None
        white = field.white
        return None if white is None or self.light_range.contains(white) else light_warning(white)

    def field_warnings(self, field: PreparedField, cells: Sequence[Cell], capped_tiles: int = 0,
                       tiles: int = 1) -> list[str]:
        """The warnings of ``field`` whose counted cells are ``cells`` (``capped_tiles`` of its ``tiles`` at the
        detector's cap); also of part of its cells (a slide tile's core, cut from the tile read with a margin)."""
        scale, working_um_per_px = field.scale, field.working_um_per_px
        warnings = list(self.warnings)
        if capped_tiles:
            warnings.append(cap_warning(capped_tiles, tiles))
        unfamiliar = self.unfamiliar_cells_warning(cells)
        if unfamiliar:
            warnings.append(unfamiliar)
        unlit = self.light_warning(field) if cells and self.classifier is not None else None
        if unlit:
            warnings.append(unlit)
        if field.scale_doubt:
            warnings.append(field.scale_doubt)
        warnings += field.run_warnings
        if not scale.known and working_um_per_px is not None:
            # The models work at a scale and the field's is a guess: the field says so itself.
            warnings.append(unscaled_warning(working_um_per_px, scale.note))
        elif not scale.known and self.window_um is not None and cells and self.classifier is not None:
            # No scale and none to assume (the detector records none): the classifier, which expects a window
            # in micrometres, gets each cell cut by its box instead.
            warnings.append(unframed_warning(self.window_um, scale.note))
        if not cells and is_grayscale(field.image):
            warnings.append(GRAYSCALE_WARNING)
        tiny = tiny_field_warning(*field.image.size)
        if tiny:
            warnings.append(tiny)
        pages = field.image.info.get(PAGES_INFO)
        if pages:  # said on the console only, and lost with it
            warnings.append(f"the file has {pages} pages; only the first was analysed (save each page as a field, "
                            f"or a pyramid as a slide)")
        return warnings

    def analyze_prepared(self, field: PreparedField, source: str | None = None, *,
                         on_tile: Callable[[int, int], None] | None = None) -> SmearResult:
        """Detection, crops, classification and the differential of a field from :meth:`prepare`
        (its ``seconds`` include the preparation). ``on_tile``: :meth:`detect`'s."""
        start = time.perf_counter() - field.seconds
        source = source or "<image>"
        image, scale, working_um_per_px, factor = field.image, field.scale, field.working_um_per_px, field.factor
        found = self.detect_field(field, on_tile=on_tile, floor=POSSIBLE_CELL_FLOOR)
        detections = found.detections
        wbc_index = {self.detector.classes.index(c) for c in self.wbc_classes}
        is_wbc = np.array([int(label) in wbc_index for label in detections.labels], dtype=bool)
        if is_wbc.sum() > 1 and self.wbc_containment < 1:
            # White cells do not overlap much: a white-cell box lying mostly inside a
            # higher-scored one is the same cell found twice, and would be counted twice.
            wbc = np.where(is_wbc)[0]
            keep = merge_tile_detections(detections.boxes[wbc], detections.scores[wbc],
                                         np.zeros(len(wbc), dtype=int), np.ones(len(wbc), dtype=bool),
                                         self.merge_iou, self.wbc_containment, around=2)
            detections, is_wbc = _without(detections, is_wbc, np.setdiff1d(wbc, wbc[keep]))
        if is_wbc.any() and self.min_nuclear_share > 0:
            # A white cell has a nucleus: a box without violet stain is a red cell or a clump of them.
            wbc = np.where(is_wbc)[0]
            empty = without_nucleus(image, detections.boxes[wbc], self.min_nuclear_share)
            detections, is_wbc = _without(detections, is_wbc, wbc[empty])
        order = np.where(is_wbc)[0]
        # Reading order: top to bottom, then left to right, so cell ids are stable.
        order = order[np.lexsort((detections.boxes[order, 0], detections.boxes[order, 1]))] if len(order) else order
        cells: list[Cell] = []
        if len(order) and self.classifier is not None:
            crops = [self.crop_cell(image, detections.boxes[i], working_um_per_px) for i in order]
            predictions = []
            for chunk in range(0, len(crops), 32):
                predictions += self.classifier.predict_images(crops[chunk:chunk + 32])
            for number, (i, prediction) in enumerate(zip(order, predictions), 1):
                cells.append(Cell(number, tuple(float(v) for v in detections.boxes[i]),
                                  self.detector.classes[int(detections.labels[i])], float(detections.scores[i]),
                                  prediction.label, prediction.top_class, prediction.confidence,
                                  prediction.uncertain, dict(prediction.probabilities),
                                  prediction.ood_score, prediction.unfamiliar))
        else:
            for number, i in enumerate(order, 1):
                name = self.detector.classes[int(detections.labels[i])]
                score = float(detections.scores[i])  # the detector's class and score stand for the classifier's
                cells.append(Cell(number, tuple(float(v) for v in detections.boxes[i]), name, score, name, name, score,
                                  False, {name: score}))
        warnings = self.field_warnings(field, cells, found.capped_tiles, found.tiles)
        differential = self.rules.count([cell.label for cell in cells], warnings)
        possible = self.possible_white_cells(image, found.below, np.array([cell.box for cell in cells]).reshape(-1, 4))
        if possible:  # a note for the reader, not a warning: the count stands for what the detector was sure of
            differential.flags.append(possible_cells_note([p["detector_score"] for p in possible],
                                                          self.detector.score_threshold))
        scale_record = {**scale.to_json(), "analysed_at_um_per_px": working_um_per_px,
                        "detector_resample": round(factor, 4)}
        if not scale.known:
            scale_record["note"] = (f"scale not estimated ({scale.note}); assumed {working_um_per_px:.4f} um/px, the "
                                    f"detector's training scale" if working_um_per_px else
                                    f"scale not estimated ({scale.note}); cells cropped by their boxes")
        return SmearResult(source, image.size[0], image.size[1], cells, detections.counts(), differential,
                           detections, self.cell_classes, found.tiles, time.perf_counter() - start,
                           capped_tiles=found.capped_tiles, scale=scale_record, possible_white_cells=possible)

    # -- many fields ----------------------------------------------------------
    def failed_result(self, source: str, error: str) -> SmearResult:
        """The row of a field that could not be read: no cells, a flag that says it was not analysed,
        ``error`` set (every engine writes it instead of stopping)."""
        log.warning("cannot read %s: %s", source, error)
        return SmearResult(source, 0, 0, [], {}, self.rules.not_analysed(f"the file could not be read ({error})"),
                           cell_classes=self.cell_classes, error=error)

    def analyze_paths(self, paths: Sequence[str | Path], out_dir: str | Path, *,
                      progress: Callable[..., None] | None = None, estimate_run_scale: bool = True,
                      run_warnings: Sequence[str] = (), cells_dir: str | Path | None = None) -> FolderSummary:
        """Analyse every file, write its outputs and the folder's ``summary.csv`` / ``summary.json``
        (the pipelined engine, :func:`leukoscope.inference.folder.analyze_folder`).

        An unreadable file gives a row with ``error`` set, never a crash; rows keep the input order.
        ``progress(advance=1, info=..., cells=N)`` is called once per field written (and ``progress(advance=0,
        info=...)`` after each tile of a field of many: :func:`~leukoscope.inference.folder.analyze_folder`).
        Fields without a scale of their own take the run's: the analyzer's ``run_um_per_px`` when set, else (with
        ``estimate_run_scale``, as ``leukoscope analyze`` does) :func:`leukoscope.scale.run_scale` of
        ``paths`` when there are enough of them and they agree. When the analyzer has a stated
        ``um_per_px``, the run's scale only checks it (:func:`leukoscope.scale.stated_run_doubt`: a warning of
        the summary's). ``run_warnings``: the caller's own about the run (the CLI estimates before it calls).
        ``cells_dir``: each white cell also written there by class, cut as the classifier saw it
        (:func:`leukoscope.inference.smear_output.write_cells`: cells to sort and fine-tune on).
        """
        paths, run, warnings = list(paths), None, list(run_warnings)
        if estimate_run_scale and self.um_per_px is not None:
            doubt = stated_run_doubt(paths, self.um_per_px, max_pixels=self.max_pixels)
            warnings += [doubt] if doubt else []
        elif estimate_run_scale and self.run_um_per_px is None and len(paths) >= RUN_SCALE_MIN_ESTIMATES:
            scale = run_scale(paths, max_pixels=self.max_pixels)
            run = scale.um_per_px if scale.known else None
        return analyze_folder(self, paths, out_dir, progress=progress, run_um_per_px=run, run_warnings=warnings,
                              cells_dir=cells_dir)
