"""Classify cell or field images with a bundle: the one prediction path used by
the CLI, the Python API and the web service.

A bundle with out-of-distribution statistics (format 3, :mod:`leukoscope.evaluation.ood`)
also scores how unlike its training images each image is: ``ood_score`` and
``unfamiliar`` (score above the bundle's threshold; on an int8 graph, the threshold its
export carried over, ``export.ood_thresholds``). The class label is left as it
is; what to do with unfamiliar images (a field's warning) is the caller's rule.

The network itself runs on a :mod:`~leukoscope.inference.runtime`: the bundle's torch
model, or its exported graph on onnxruntime or OpenVINO; preprocessing, temperature,
the uncertain threshold and the OOD score stay here, the same for all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from PIL import Image
from scipy.special import softmax

from leukoscope.bundle import BundleError, BundleInfo, load_ood_arrays, read_bundle_info
from leukoscope.cell_window import frame_single_cell
from leukoscope.evaluation.ood import OodStats
from leukoscope.cell_presence import TRAINING_CENTRES, checks_centres, lacks_white_cell, several_white_cells
from leukoscope.inference.quality import (GRAYSCALE_CELL_WARNING, NO_WHITE_CELL_WARNING, several_cells_warning,
                                          tiny_cell_warning, unscaled_cell_warning)
from leukoscope.inference.runtime import Runtime, TorchRuntime, load_runtime
from leukoscope.inference.slide.reader import recorded_um_per_px
from leukoscope.io import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from leukoscope.light import LightRange, cell_light_warning
from leukoscope.labels import UNCERTAIN
from leukoscope.pixels import is_grayscale
from leukoscope.preprocessing import stack_pixels
from leukoscope.pretrained import resolve_bundle
from leukoscope.scale import FieldScale

if TYPE_CHECKING:
    import torch

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
    ood_score: float | None = None
    """How unlike the training images this one is (higher: less alike); None without OOD statistics."""
    unfamiliar: bool = False
    """``ood_score`` above the bundle's threshold (about 5% of in-distribution images by construction)."""
    scale: FieldScale | None = None
    """A single-cell image framed for a classifier of a physical window (:meth:`CellClassifier.frame`): the
    scale its window was cut at ('unknown': classified whole); None when the image was taken as given."""
    warnings: tuple[str, ...] = ()
    """Why this image's class is not to be trusted (:func:`single_cell_warnings`: too small to show a cell,
    classified whole for want of a scale, no colour, no white cell at its centre, several white cells, a light
    none of the training images had); the ``warnings`` column."""

    def as_row(self) -> dict[str, object]:
        """The row of a predictions file. An unreadable image has no label, class, confidence or uncertainty:
        they are None (empty in a CSV, null in JSON; "error", 0.0 and False read as an answer), ``error`` says why."""
        unread = self.error is not None
        row: dict[str, object] = {
            "source": self.source,
            "label": None if unread else self.label,
            "top_class": None if unread else self.top_class,
            "confidence": None if unread else round(self.confidence, 6),
            "uncertain": None if unread else self.uncertain,
        }
        row.update({f"p_{name}": round(p, 6) for name, p in self.probabilities.items()})
        # None (empty in a CSV, null in JSON), not False, without statistics: "not checked" is not "familiar".
        row["ood_score"] = None if self.ood_score is None else round(self.ood_score, 4)
        row["unfamiliar"] = None if self.ood_score is None else self.unfamiliar
        if self.scale is not None:
            row["um_per_px"] = None if self.scale.um_per_px is None else round(self.scale.um_per_px, 5)
            row["scale_source"] = self.scale.source
        row["warnings"] = " | ".join(self.warnings)
        row["error"] = self.error or ""
        return row


def single_cell_warnings(image: Image.Image, scale: FieldScale | None, window_um: float | None,
                         seen: Image.Image | None = None, check_centre: bool = True,
                         light: LightRange | None = None) -> tuple[str, ...]:
    """The warnings of one single-cell ``image`` (as given, before framing) classified at ``scale``
    (:meth:`CellClassifier.frame`'s; None: taken as given) from ``seen`` (the window it was framed to; None:
    the image): `predict`'s ``warnings`` column and the web service's single-cell cases say the same.
    ``check_centre``: whether a centre without a white cell is doubted (:attr:`CellClassifier.checks_centres`:
    not for a classifier of whole fields); ``light``: the classifier's training images' light
    (:attr:`CellClassifier.light_range`), against which the window's background is read."""
    unscaled = scale is not None and not scale.known and window_um is not None
    tiny = tiny_cell_warning(*image.size)
    # the field check of `analyze` (is_grayscale), said of the cell: its class rests on the stain's colour
    grey = is_grayscale(image)
    # a grey image has no violet to look for; a tiny one is doubted already
    empty = check_centre and not grey and not tiny and lacks_white_cell(image if seen is None else seen)
    many: list[str] = []  # a smear field sent as a cell: one cell counted of many (its scale tells its size)
    if not grey and scale is not None and scale.um_per_px is not None and window_um is not None:
        um = scale.um_per_px
        nuclei = several_white_cells(image, um, window_um)
        if nuclei is not None:
            many.append(several_cells_warning(nuclei, image.width * um, image.height * um))
    # a grey image says so already: its light has no colour to compare
    unlit = None if grey else cell_light_warning(image if seen is None else seen, light)
    return tuple(([unscaled_cell_warning(window_um)] if unscaled else []) + ([tiny] if tiny else [])
                 + ([GRAYSCALE_CELL_WARNING] if grey else []) + ([NO_WHITE_CELL_WARNING] if empty else []) + many
                 + ([unlit] if unlit else []))


class CellClassifier:
    """A bundle ready to classify PIL images or files.

    >>> classifier = CellClassifier.from_bundle("runs/demo/bundle")   # doctest: +SKIP
    >>> classifier.predict_paths(["cell.jpg"])[0].label                 # doctest: +SKIP
    """

    def __init__(self, model: "torch.nn.Module | Runtime", info: BundleInfo, device: "str | torch.device" = "cpu",
                 uncertain_threshold: float | None = None, ood: OodStats | None = None) -> None:
        """``model``: the bundle's torch (or classical) model, or a runtime that runs it."""
        if info.task != "classify" or info.preprocessing is None:
            raise ValueError(f"{info.model_name} is a {info.task} model, not a cell classifier")
        self.runtime = model if isinstance(model, Runtime) else TorchRuntime(model.eval(), info.preprocessing, device)
        self.model = self.runtime.model
        """The torch model (Grad-CAM, the service's hooks); None on the onnxruntime and openvino backends
        (callers that need Grad-CAM there load it: predict_files, the service's Analyzer)."""
        self.info = info
        self.preprocessing = info.preprocessing
        self.device = device
        self.classes = list(info.classes)
        self.threshold = info.uncertain_threshold if uncertain_threshold is None else uncertain_threshold
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"uncertain threshold must be in [0, 1], got {self.threshold}")
        self.ood = ood

    @property
    def ood(self) -> OodStats | None:
        """The OOD statistics the flag scores against (None: no flag)."""
        return self._ood

    @ood.setter
    def ood(self, stats: OodStats | None) -> None:
        # The light range is parsed once here, not per image (``predict``) or per field (``analyze``).
        self._ood = stats
        self._light_range = None if stats is None else LightRange.from_json(stats.details.get("light"))

    @classmethod
    def from_bundle(cls, directory: str | Path, device: str = "cpu", uncertain_threshold: float | None = None,
                    *, backend: str = "torch", threads: int | None = None) -> "CellClassifier":
        """``backend``: ``torch``, ``onnxruntime`` or ``openvino`` (an exported bundle) or ``auto`` (the
        fastest installed one that can run the bundle's graph, else torch:
        :func:`~leukoscope.inference.runtime.choose_backend`); ``threads``: their intra-op threads."""
        directory = resolve_bundle(directory)
        info = read_bundle_info(directory, task="classify")
        runtime = load_runtime(directory, info, backend, device, threads)
        ood = load_ood_stats(directory, info)
        graph_thresholds = (info.export or {}).get("ood_thresholds")
        if ood is not None and runtime.backend != "torch" and graph_thresholds:
            # An int8 graph's scores sit higher than the float model's: its export carried the thresholds over.
            ood = replace(ood, thresholds={**ood.thresholds, **{k: float(v) for k, v in graph_thresholds.items()}})
        return cls(runtime, info, device, uncertain_threshold, ood=ood)

    @property
    def backend(self) -> str:
        """What runs the network: ``torch``, ``onnxruntime`` or ``openvino``."""
        return self.runtime.backend

    @property
    def image_size(self) -> int:
        return self.info.preprocessing.image_size

    def preprocess(self, image: Image.Image) -> "torch.Tensor":
        """PIL RGB -> the model's (3, S, S) input through the bundle's preprocessing, exactly as in
        training (uint8, not normalised, for a classical model, which computes its features from it)."""
        return self.preprocessing.model_input(self.preprocessing.pixels(image), self.info.framework)

    @property
    def checks_centres(self) -> bool:
        """Whether an image without a white cell at its centre is doubted: not by a classifier of whole fields,
        whose training images often had none there (:func:`leukoscope.cell_presence.checks_centres`)."""
        return checks_centres(self.info.provenance.get(TRAINING_CENTRES))

    @property
    def light_range(self) -> LightRange | None:
        """The light of its training images (:mod:`leukoscope.light`), where its OOD statistics record it."""
        return self._light_range

    def warnings_of(self, image: Image.Image, scale: FieldScale | None,
                    seen: Image.Image | None = None) -> tuple[str, ...]:
        """:func:`single_cell_warnings` of ``image`` classified by this classifier at ``scale`` from ``seen``: the
        one call `predict`, `evaluate` and the web service make."""
        return single_cell_warnings(image, scale, self.window_um, seen, check_centre=self.checks_centres,
                                    light=self.light_range)

    @property
    def window_um(self) -> float | None:
        """The physical window the classifier was trained on (``preprocessing.cell_window_um``), if any."""
        return self.preprocessing.cell_window_um

    def frame(self, image: Image.Image, um_per_px: float | None = None, *, run_um_per_px: float | None = None,
              recorded_um_per_px: float | None = None) -> tuple[Image.Image, FieldScale | None]:
        """A single-cell image as the classifier was trained to see it: with a physical window, that many
        micrometres around the image's centre at ``um_per_px`` or, not given, the scale its red cells give
        (:func:`leukoscope.scale.field_scale`), or the run's (``run_um_per_px``: the images' scale together,
        :func:`leukoscope.scale.run_scale`) when they give none or one far off it, as in smear analysis; an
        image without any is returned whole with an 'unknown' scale (the cell then looks bigger or smaller
        than any it learned). ``recorded_um_per_px``: the scale its file records (a TIFF's resolution tags,
        :func:`leukoscope.inference.slide.reader.recorded_um_per_px`), used before its red cells' unless it is
        stated. A classifier without a window takes the image as it is (scale None)."""
        if self.window_um is None:
            return image, None
        return frame_single_cell(image, self.window_um, um_per_px, run_um_per_px=run_um_per_px,
                                 recorded_um_per_px=recorded_um_per_px)

    def _to_prediction(self, source: str, probs: np.ndarray, ood_score: float | None = None) -> Prediction:
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
            ood_score=None if ood_score is None else float(ood_score),
            unfamiliar=bool(self.ood is not None and ood_score is not None and ood_score > self.ood.threshold),
        )

    def ood_scores(self, logits: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray | None:
        """OOD scores of uncalibrated ``logits`` (and embeddings); None without statistics."""
        return None if self.ood is None else self.ood.scores(logits, embeddings)

    def outputs(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities ``(N, classes)`` and OOD scores ``(N,)`` (None without
        statistics) from one forward pass."""
        if not images:
            return np.zeros((0, len(self.classes))), None if self.ood is None else np.zeros(0)
        pixels = stack_pixels(images, self.preprocessing)
        logits, embeddings = self.runtime.outputs(pixels, embeddings=self.ood is not None and self.ood.needs_embeddings)
        probabilities = softmax(logits / self.info.temperature, axis=1)
        return probabilities, self.ood_scores(logits, embeddings)

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Calibrated class probabilities (temperature-scaled softmax), shape (N, classes)."""
        return self.outputs(images)[0]

    def predict_images(self, images: Sequence[Image.Image], sources: Sequence[str] | None = None) -> list[Prediction]:
        sources = list(sources) if sources is not None else [f"image_{i}" for i in range(len(images))]
        probabilities, scores = self.outputs(images)
        return [self._to_prediction(s, p, None if scores is None else scores[i])
                for i, (s, p) in enumerate(zip(sources, probabilities))]

    def predict_paths(
        self,
        paths: Iterable[str | Path],
        *,
        batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        progress=None,
        frame: bool = False,
        um_per_px: float | None = None,
        run_um_per_px: float | None = None,
    ) -> list[Prediction]:
        """Predict every file; unreadable files give a row with ``error`` set, never a crash.

        ``frame``: each file is a single-cell image to be framed for the classifier's window
        (:meth:`frame`, at ``um_per_px`` when given, else the one a TIFF's resolution tags record, else their
        own or ``run_um_per_px``; each prediction records its ``scale``); without it
        the files are taken as they are (crops already cut at the window, as training's)."""
        paths = [Path(p) for p in paths]
        results: list[Prediction | None] = [None] * len(paths)
        pending: list[tuple[int, Image.Image]] = []
        scales: dict[int, FieldScale | None] = {}
        warned: dict[int, tuple[str, ...]] = {}

        def flush() -> None:
            predictions = self.predict_images([img for _, img in pending], [str(paths[i]) for i, _ in pending])
            for (i, _), prediction in zip(pending, predictions):
                scale = scales.pop(i, None)
                results[i] = replace(prediction, scale=scale, warnings=warned.pop(i))
            if progress:
                progress(advance=len(pending))
            pending.clear()

        for index, path in enumerate(paths):
            try:
                image = load_image(path, max_pixels=max_pixels)
                recorded = recorded_um_per_px(path) if frame and um_per_px is None else None
                framed, scales[index] = (self.frame(image, um_per_px, run_um_per_px=run_um_per_px,
                                                    recorded_um_per_px=recorded) if frame else (image, None))
                warned[index] = self.warnings_of(image, scales[index], framed)
                pending.append((index, framed))
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


def load_ood_stats(directory: str | Path, info: BundleInfo) -> OodStats | None:
    """The bundle's OOD statistics; None for a bundle without them (format 2 and older)."""
    arrays = load_ood_arrays(directory, info)
    if arrays is None:
        return None
    try:
        stats = OodStats.from_parts(info.ood, arrays)
        LightRange.from_json(stats.details.get("light"))  # a malformed range fails here, not at the first field
        return stats
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{directory}: the ood entry of bundle.json is incomplete: {exc}") from None
