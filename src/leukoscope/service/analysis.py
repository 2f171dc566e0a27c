"""The service's view of the models: the same CellClassifier (and SmearAnalyzer)
the CLI and the Python API use, loaded once, run in a small thread pool.

Each inference thread gets its own copy of the model: Grad-CAM registers forward
hooks on the model's layers, and two threads sharing one model would record each
other's activations.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

from PIL import Image, ImageDraw

from leukoscope.inference.differential import Differential
from leukoscope.inference.predictor import CellClassifier, Prediction
from leukoscope.labels import UNCERTAIN, blast_classes_in, checked_blast_classes
from leukoscope.scale import SCALE_OPTION, FieldScale

log = logging.getLogger(__name__)

#: Heatmap overlays are drawn at most this large (px, longer side); never larger than the
#: image itself (no point upscaling a 96 px cell), never smaller than the model's input.
DISPLAY_SIZE = 256
#: Cells of one field explained per Grad-CAM pass (memory stays bounded on a crowded field).
OVERLAY_BATCH = 32
#: The upload's field (form and API) for the microscope's scale, and how the service's messages name it where
#: the CLI's say ``--um-per-px`` (:func:`in_service_words`).
SCALE_FIELD = "um_per_px"
SCALE_FIELD_WORDS = f"the upload's {SCALE_FIELD}"


def in_service_words(warning: str) -> str:
    """A warning of the analysis as the service's users act on it: they state the scale on the upload, not with
    the CLI's option."""
    return warning.replace(SCALE_OPTION, SCALE_FIELD_WORDS)


def explained(image: Image.Image, heatmap: Any, model_size: int, flat: bool) -> Image.Image:
    """The picture a reviewer sees: the heatmap over the cell as the model saw it (letterboxed), at the
    cell's size (the page shows it beside the cell), and across it a note when the map is flat (``flat``:
    :attr:`leukoscope.inference.explain.GradCamMaps.flat`, judged on the raw map; it points at nothing, and
    its scaled colours would otherwise read as evidence)."""
    from leukoscope.inference.explain import mark_flat, overlay_heatmap
    from leukoscope.pixels import letterbox

    overlay = overlay_heatmap(letterbox(image, overlay_size(image, model_size)), heatmap)
    return mark_flat(overlay) if flat else overlay


def overlay_size(image: Image.Image, model_size: int) -> int:
    return max(model_size, min(DISPLAY_SIZE, max(image.size)))


class SmearBackend(Protocol):
    """What the service needs from a smear analyser (``leukoscope.inference.smear``)."""

    def analyse(self, image: Image.Image, run_um_per_px: float | None = None,
                um_per_px: float | None = None) -> Any: ...

    # ``run_um_per_px``: the scale of the case's fields together, for a field whose red cells give none;
    # given only to a backend whose ``borrows_case_scale`` is true (the service then finds the case's scale
    # from the fields' red cells before analysing them). ``um_per_px``: the scale the uploader stated for
    # the case's images (each field then analysed at it; its red cells may doubt it in a warning).
    # ``recorded_um_per_px`` (optional keyword): the scale the field's file records (a TIFF's resolution tags),
    # given only to a backend whose ``analyse`` takes it (``Analyzer.takes_recorded_scale``).
    # Optional: ``cell_crops(image, result) -> list[Image]`` gives the crops its classifier saw
    # (at the field's scale), else ``crop_cell(image, box) -> Image`` one cell's;
    # ``warnings`` (list of str) says why its counts cannot be trusted (quality gates).


@dataclass
class CellOutcome:
    prediction: Prediction
    box: list[int] | None = None
    detection_score: float | None = None
    crop: Image.Image | None = None  # smear fields: the cell cut out of the field
    overlay: Image.Image | None = None  # Grad-CAM on the cell


@dataclass
class ImageOutcome:
    cells: list[CellOutcome]
    annotated: Image.Image | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """Quality warnings of a smear field (unverified detector, detection cap reached): while
    any stands, the case's differential must carry it and raise no leukemia flag."""
    scale: dict[str, Any] | None = None
    """A smear field's scale as analysed (``SmearResult.scale``: micrometres per pixel, where it came
    from, a note when it could not be estimated); None for single cells or a backend without it."""


def differential(labels: Sequence[str], classes: Sequence[str], blast_classes: Sequence[str],
                 warnings: Sequence[str] = ()) -> dict[str, Any]:
    """The differential of a case, by the same rules as ``leukoscope analyze`` (one
    implementation: :class:`leukoscope.inference.differential.Differential`): counts and
    counts per 100 cells (uncertain cells in their own bin), the blast percentage with its
    95% Wilson interval, and the flags a reviewer should see; with ``warnings`` (a case's:
    :func:`leukoscope.service.cases.named_warnings`) they come first and there is no leukemia flag."""
    return Differential.from_labels(list(labels), list(classes), list(blast_classes), warnings=warnings).to_json()


class Analyzer:
    """Loads the bundles once; ``await analyzer.run(kind, images)`` classifies off the event loop."""

    def __init__(self, classifier: CellClassifier, *, smear: SmearBackend | None = None, gradcam: bool = True,
                 threads: int = 2, blast_classes: Sequence[str] | None = None, name: str = "",
                 models: dict[str, dict[str, Any]] | None = None) -> None:
        self.base = classifier
        self.smear = smear
        self.gradcam = gradcam
        self.classes = list(classifier.classes)
        self.blast_classes = (checked_blast_classes(blast_classes, self.classes) if blast_classes is not None
                              else blast_classes_in(self.classes))
        self.model_name = name or classifier.info.model_name
        #: What each case's results depend on, recorded with the case: per role (classifier, detector),
        #: the bundle, what ran it and its identity (weights digest, options; a classifier's temperature and OOD
        #: flag digest; precision of an int8 graph).
        self.models = dict(models or {})
        self.threads = threads
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="leukoscope-infer")

    @functools.cached_property
    def heatmap_note(self) -> str | None:
        """What the case page says of its Grad-CAM maps when they are coarse
        (:func:`leukoscope.inference.explain.coarse_map_warning`); None without maps or when they are fine."""
        model = getattr(self.base, "model", None)
        if not self.gradcam or model is None or self.base.info.framework != "torch":
            return None
        from leukoscope.inference.explain import coarse_map_warning

        try:
            return coarse_map_warning(model, self.base.image_size)
        except ValueError:  # a model Grad-CAM cannot explain has no maps to speak of
            return None

    @classmethod
    def from_bundles(cls, bundle: str | Path, detector: str | Path | None = None, *,
                     uncertain_threshold: float | None = None, gradcam: bool = True, threads: int = 2,
                     smear_options: dict[str, Any] | None = None, backend: str = "torch",
                     backend_threads: int | None = None, blast_classes: Sequence[str] | None = None) -> "Analyzer":
        """``backend``: what runs the classifier's network (:mod:`leukoscope.inference.runtime`); on
        another than torch, the torch model is loaded too when ``gradcam`` is on (Grad-CAM needs it).
        ``blast_classes``: the classes counted as blasts (default: those named blast), for single cells and
        smear fields alike."""
        classifier = CellClassifier.from_bundle(bundle, uncertain_threshold=uncertain_threshold, backend=backend,
                                                threads=backend_threads)
        if gradcam and classifier.model is None and classifier.info.framework == "torch":
            from leukoscope.bundle import load_bundle
            from leukoscope.pretrained import resolve_bundle

            classifier.model, _ = load_bundle(resolve_bundle(bundle), classifier.device, task="classify")
        smear = None
        models = {"classifier": _identity(bundle, classifier.info.model_name, classifier.backend)}
        if detector is not None:
            options = {**(smear_options or {}), **({"blast_classes": blast_classes} if blast_classes else {})}
            smear = load_smear_backend(detector, classifier, **options)
            found = getattr(smear, "detector", None)
            if found is not None:
                models["detector"] = _identity(detector, found.info.model_name, found.backend)
        name = f"{classifier.info.model_name} ({_bundle_name(bundle)})"
        return cls(classifier, smear=smear, gradcam=gradcam, threads=threads, name=name, models=models,
                   blast_classes=blast_classes or None)

    @property
    def has_detector(self) -> bool:
        return self.smear is not None

    def borrows_case_scale(self, kind: str) -> bool:
        """Whether an image of ``kind`` without a scale of its own may take its case's: a classifier of a
        physical window frames single cells at a scale; smear analysis scales every field (unless the
        server states the scale)."""
        if kind == "smear":
            return bool(getattr(self.smear, "borrows_case_scale", False))
        return self.base.window_um is not None

    def takes_stated_scale(self, kind: str) -> bool:
        """Whether an uploader's stated scale changes how images of ``kind`` are analysed: a classifier of a
        physical window frames single cells at it; a smear backend takes it when its ``analyse`` has a
        ``um_per_px`` keyword (one written before it would fail on it)."""
        if kind != "smear":
            return self.base.window_um is not None
        return self._smear_takes("um_per_px")

    def takes_recorded_scale(self) -> bool:
        """Whether the smear backend's ``analyse`` takes the scale a field's file records
        (``recorded_um_per_px``): the service's own adapter does; one written before it would fail on it."""
        return self._smear_takes("recorded_um_per_px")

    def _smear_takes(self, keyword: str) -> bool:
        """Whether the smear backend's ``analyse`` accepts ``keyword`` (by name or through ``**kwargs``)."""
        parameters = inspect.signature(self.smear.analyse).parameters if self.smear is not None else {}
        return keyword in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())

    @property
    def warnings(self) -> list[str]:
        """Why this server's smear counts cannot be trusted (the detector's quality gate)."""
        return list(getattr(self.smear, "warnings", None) or [])

    @property
    def threshold(self) -> float:
        return self.base.threshold

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ thread-side work

    def _classifier(self) -> CellClassifier:
        """This thread's own copy of the classifier (made once per thread)."""
        local = getattr(self._local, "classifier", None)
        if local is None:
            local = copy.copy(self.base)
            # None: another backend runs the network and Grad-CAM is off (no torch model loaded)
            local.model = copy.deepcopy(self.base.model).eval() if self.base.model is not None else None
            self._local.classifier = local
        return local

    def _overlays(self, classifier: CellClassifier, images: Sequence[Image.Image],
                  top_classes: Sequence[str]) -> list[Image.Image | None]:
        """Grad-CAM overlays of ``images``, each for its own top class: one forward and one
        backward pass per :data:`OVERLAY_BATCH` images, not one per cell (with test-time views, per
        :data:`~leukoscope.inference.explain.VIEWS_BATCH` images and views)."""
        if not self.gradcam or not images or getattr(classifier.info, "framework", "torch") != "torch":
            return [None] * len(images)  # classical (scikit-learn) bundles have no convolution to explain
        import torch

        from leukoscope.inference.explain import grad_cam_maps

        overlays: list[Image.Image | None] = []
        for start in range(0, len(images), OVERLAY_BATCH):
            batch = images[start:start + OVERLAY_BATCH]
            inputs = torch.stack([classifier.preprocess(image) for image in batch]).to(classifier.device)
            indices = [classifier.classes.index(name) for name in top_classes[start:start + OVERLAY_BATCH]]
            try:
                with torch.enable_grad():
                    maps = grad_cam_maps(classifier.model, inputs, indices, views=classifier.info.preprocessing.views)
            except ValueError as exc:  # a model Grad-CAM cannot explain: show the result without a heatmap
                log.warning("no Grad-CAM for %s: %s", self.model_name, exc)
                return [None] * len(images)
            overlays += [explained(image, heatmap, classifier.image_size, bool(flat))
                         for image, heatmap, flat in zip(batch, maps.heatmaps, maps.flat)]
        return overlays

    def _predict_and_explain(self, classifier: CellClassifier, image: Image.Image,
                             source: str) -> tuple[Prediction, Image.Image | None]:
        """Prediction and Grad-CAM overlay from one forward pass: Grad-CAM's own forward
        (which needs gradients) also yields the logits, so the model runs once, not twice. A bundle
        with test-time views is calibrated on their average: its prediction comes from every view
        (:meth:`CellClassifier.predict_images`), the overlay from every view's map (:meth:`_overlays`). So does a
        classifier that runs an exported graph: its answer (and the out-of-distribution thresholds fitted on the
        graph's scores) is the graph's, the overlay the torch model's map of the graph's class."""
        if not self.gradcam or getattr(classifier.info, "framework", "torch") != "torch":
            return classifier.predict_images([image], [source])[0], None
        if classifier.info.preprocessing.views > 1 or classifier.backend != "torch":
            prediction = classifier.predict_images([image], [source])[0]
            return prediction, self._overlays(classifier, [image], [prediction.top_class])[0]
        import numpy as np
        import torch

        from leukoscope.inference.explain import grad_cam_maps
        from leukoscope.models.embedding import capture_embeddings

        captured: list[torch.Tensor] = []
        handle = classifier.model.register_forward_hook(lambda _m, _i, output: captured.append(output.detach()))
        inputs = classifier.preprocess(image).unsqueeze(0).to(classifier.device)
        try:
            with torch.enable_grad(), ExitStack() as stack:
                # The OOD score's embedding comes from the same forward pass as the heatmap.
                embedded = (stack.enter_context(capture_embeddings(classifier.model))
                            if classifier.ood is not None and classifier.ood.needs_embeddings else None)
                maps = grad_cam_maps(classifier.model, inputs)  # explains the predicted (top) class
        except ValueError as exc:
            log.warning("no Grad-CAM for %s: %s", self.model_name, exc)
            return classifier.predict_images([image], [source])[0], None
        finally:
            handle.remove()
        raw = captured[-1].float().cpu()
        probabilities = torch.softmax(raw / classifier.info.temperature, dim=1).numpy()[0].astype(np.float64)
        scores = classifier.ood_scores(raw.numpy(), embedded[-1].numpy() if embedded else None)
        prediction = classifier._to_prediction(source, probabilities, None if scores is None else scores[0])
        return prediction, explained(image, maps.heatmaps[0], classifier.image_size, bool(maps.flat[0]))

    def analyse_cell(self, image: Image.Image, run_um_per_px: float | None = None,
                     um_per_px: float | None = None, recorded_um_per_px: float | None = None) -> ImageOutcome:
        """One cell per upload. A classifier of a physical window sees that many micrometres around the
        image's centre at the scale the uploader stated (``um_per_px``), else the one its file records
        (``recorded_um_per_px``: a TIFF's resolution tags), else the one its red cells give, else
        the case's (``run_um_per_px``;
        :meth:`CellClassifier.frame`, as `leukoscope predict`); the crop is kept (the reviewed-labels export
        then holds what the model saw). Without a scale the image is classified whole, and a warning keeps
        the case from any leukemia flag (the image's own reason is in its ``scale`` note)."""
        classifier = self._classifier()
        framed, scale = classifier.frame(image, um_per_px, run_um_per_px=run_um_per_px,
                                         recorded_um_per_px=recorded_um_per_px)
        prediction, overlay = self._predict_and_explain(classifier, framed, "upload")
        warnings = classifier.warnings_of(image, scale, framed)
        prediction = replace(prediction, scale=scale, warnings=warnings)
        if scale is None:
            return ImageOutcome([CellOutcome(prediction, overlay=overlay)], warnings=list(warnings))
        return ImageOutcome([CellOutcome(prediction, crop=framed if scale.known else None, overlay=overlay)],
                            warnings=list(warnings), scale=scale.to_json())

    def analyse_smear(self, image: Image.Image, run_um_per_px: float | None = None,
                      um_per_px: float | None = None, recorded_um_per_px: float | None = None) -> ImageOutcome:
        """One smear field per upload, by the smear backend; ``recorded_um_per_px`` (the scale its file records)
        goes to a backend whose ``analyse`` takes it (:meth:`takes_recorded_scale`)."""
        if self.smear is None:
            raise RuntimeError("no detector bundle loaded")
        classifier = self._classifier()
        # the keywords only when there is a scale to give: a backend written before them keeps working
        given = (("run_um_per_px", run_um_per_px), ("um_per_px", um_per_px),
                 ("recorded_um_per_px", recorded_um_per_px if self.takes_recorded_scale() else None))
        scales = {name: value for name, value in given if value is not None}
        result = self.smear.analyse(image, **scales)
        _reword(result)  # before its picture is drawn: the band of warnings names the upload's scale, not the CLI's
        crop_cell = getattr(self.smear, "crop_cell", None)
        cell_crops = getattr(self.smear, "cell_crops", None)
        # The crops the classifier saw (the analyzer's window or margin around its own, unrounded
        # box, at the scale the field was analysed at), so that the stored image, its Grad-CAM
        # and the exported training data match the prediction.
        crops = cell_crops(image, result) if cell_crops else None
        cells: list[CellOutcome] = []
        for index, cell in enumerate(_result_cells(result)):
            box = _box(cell, image.size)
            if crops is not None:
                crop = crops[index]
            else:
                crop = crop_cell(image, _get(cell, "box", "bbox")) if crop_cell else image.crop(tuple(box))
            prediction = _prediction(cell, classifier, f"cell_{index}")
            if prediction is None:  # the backend detected but did not classify
                prediction = classifier.predict_images([crop], [f"cell_{index}"])[0]
            score = getattr(cell, "score", None) or getattr(cell, "detection_score", None)
            cells.append(CellOutcome(prediction, box=box, detection_score=float(score) if score is not None else None,
                                     crop=crop))
        overlays = self._overlays(classifier, [cell.crop for cell in cells],
                                  [cell.prediction.top_class for cell in cells])
        for cell, overlay in zip(cells, overlays):
            cell.overlay = overlay
        warnings = _result_warnings(result) or self.warnings
        return ImageOutcome(cells, annotated=_annotated(image, result, cells), warnings=warnings,
                            scale=_get(result, "scale"))

    def _warm(self, barrier: threading.Barrier) -> None:
        classifier = self._classifier()
        probe = Image.new("RGB", (classifier.image_size, classifier.image_size), (220, 200, 210))
        outcome = self.analyse_cell(probe)
        assert outcome.cells
        barrier.wait(timeout=60)

    def warm_up(self) -> None:
        """Give every inference thread its model copy and run it once (first request fast)."""
        barrier = threading.Barrier(self.threads)
        futures = [self._executor.submit(self._warm, barrier) for _ in range(self.threads)]
        for future in futures:
            future.result()

    # ------------------------------------------------------------ event-loop side

    async def run(self, kind: str, images: Sequence[Image.Image], run_um_per_px: float | None = None,
                  um_per_px: float | None = None,
                  recorded_um_per_px: Sequence[float | None] | None = None) -> list[ImageOutcome]:
        """``run_um_per_px``: the scale of the case's images together (:func:`leukoscope.scale.run_scale_of`),
        for a smear field or a single-cell image whose own red cells give none (or a weak one far off it).
        ``um_per_px``: the scale the uploader stated, used for every image. ``recorded_um_per_px``: the scale
        each image's file records (a TIFF's resolution tags; None where none), checked by its red cells."""
        loop = asyncio.get_running_loop()
        work = functools.partial(self.analyse_smear if kind == "smear" else self.analyse_cell,
                                 run_um_per_px=run_um_per_px, um_per_px=um_per_px)
        recorded = list(recorded_um_per_px) if recorded_um_per_px is not None else [None] * len(images)
        if len(recorded) != len(images):
            raise ValueError(f"{len(recorded)} recorded scales for {len(images)} images")
        return list(await asyncio.gather(*(loop.run_in_executor(
            self._executor, functools.partial(work, recorded_um_per_px=record), image)
            for image, record in zip(images, recorded))))


# ---------------------------------------------------------------- smear adapter


def load_smear_backend(detector: str | Path, classifier: CellClassifier, **options: Any) -> SmearBackend:
    """:class:`leukoscope.inference.smear.SmearAnalyzer` over the detector bundle and the
    already loaded classifier (the same pipeline as ``leukoscope analyze``)."""
    from leukoscope.inference.smear import SmearAnalyzer

    return _MethodAdapter(SmearAnalyzer(detector, classifier, **options), "analyze")


def _bundle_name(bundle: str | Path) -> str:
    """A bundle as users see it: ``pretrained:NAME``, or its folder's name (never a server path)."""
    if str(bundle).startswith("pretrained:"):
        return str(bundle)
    where = Path(bundle).resolve()
    return where.parent.name if where.name == "bundle" else where.name


def _identity(bundle: str | Path, model_name: str, backend: str) -> dict[str, Any]:
    from leukoscope.bundle import model_identity

    return {"bundle": _bundle_name(bundle), "model": model_name, "backend": backend,
            **model_identity(bundle, backend)}


class _MethodAdapter:
    def __init__(self, target: Any, method: str) -> None:
        self._call = getattr(target, method)
        # SmearAnalyzer: a field without a scale of its own takes ``run_um_per_px``, unless one is stated
        self.borrows_case_scale = getattr(target, "um_per_px", None) is None
        # a scale the server states for every field wins over a file's record, as over its red cells
        self.takes_records = self.borrows_case_scale
        self.detector = getattr(target, "detector", None)
        for name in ("crop_cell", "cell_crops"):
            if hasattr(target, name):
                setattr(self, name, getattr(target, name))
        self.warnings = list(getattr(target, "warnings", None) or [])

    def analyse(self, image: Image.Image, run_um_per_px: float | None = None, um_per_px: float | None = None,
                recorded_um_per_px: float | None = None) -> Any:
        # a file's record is the field's scale as analyze reads a TIFF's (checked by its red cells); a stated one wins
        scale = (FieldScale.recorded(recorded_um_per_px)
                 if recorded_um_per_px is not None and um_per_px is None and self.takes_records else None)
        return self._call(image, run_um_per_px=run_um_per_px, um_per_px=um_per_px, scale=scale)


def _reword(result: Any) -> None:
    """A SmearResult's warnings and flags in the service's words (:func:`in_service_words`); other results as
    they are."""
    differential = getattr(result, "differential", None)
    if isinstance(differential, Differential):
        differential.warnings = [in_service_words(warning) for warning in differential.warnings]
        differential.flags = [in_service_words(flag) for flag in differential.flags]


def _result_cells(result: Any) -> list[Any]:
    if isinstance(result, dict):
        return list(result.get("cells", []))
    cells = getattr(result, "cells", result)
    return list(cells)


def _result_warnings(result: Any) -> list[str]:
    """A field's own warnings (the detector's and, if it hit its cap, the field's)."""
    warnings = result.get("warnings") if isinstance(result, dict) else getattr(result, "warnings", None)
    return [str(w) for w in warnings or []]


def _get(cell: Any, *names: str) -> Any:
    for name in names:
        if isinstance(cell, dict) and name in cell:
            return cell[name]
        if hasattr(cell, name):
            return getattr(cell, name)
    return None


def _box(cell: Any, size: tuple[int, int]) -> list[int]:
    box = _get(cell, "box", "bbox")
    if box is None:
        raise ValueError("smear analyser returned a cell without a box")
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = size
    x0, x1 = sorted((max(0.0, min(width, x0)), max(0.0, min(width, x1))))
    y0, y1 = sorted((max(0.0, min(height, y0)), max(0.0, min(height, y1))))
    return [int(math.floor(x0)), int(math.floor(y0)), max(int(math.ceil(x1)), int(x0) + 1),
            max(int(math.ceil(y1)), int(y0) + 1)]


def _prediction(cell: Any, classifier: CellClassifier, source: str) -> Prediction | None:
    inner = _get(cell, "prediction")
    if isinstance(inner, Prediction):
        return inner
    probabilities = _get(cell, "probabilities")
    top_class = _get(cell, "top_class", "class_name", "label")
    confidence = _get(cell, "confidence")
    if probabilities is None or top_class is None or confidence is None:
        return None
    uncertain = _get(cell, "uncertain")
    if uncertain is None:
        uncertain = float(confidence) < classifier.threshold
    ood_score = _get(cell, "ood_score")
    return Prediction(source=source, label=UNCERTAIN if uncertain else str(top_class), top_class=str(top_class),
                      confidence=float(confidence),
                      probabilities={str(k): float(v) for k, v in dict(probabilities).items()},
                      uncertain=bool(uncertain), ood_score=None if ood_score is None else float(ood_score),
                      unfamiliar=bool(_get(cell, "unfamiliar")))


def _annotated(image: Image.Image, result: Any, cells: Sequence[CellOutcome]) -> Image.Image:
    """The smear module's own annotation (as ``leukoscope analyze`` draws it) when the
    backend is the SmearAnalyzer; otherwise boxes drawn here."""
    from leukoscope.inference.drawing import annotate as smear_annotate
    from leukoscope.inference.smear_result import SmearResult

    if isinstance(result, SmearResult):
        return smear_annotate(image, result)
    return annotate(image, cells)


def annotate(image: Image.Image, cells: Sequence[CellOutcome]) -> Image.Image:
    """The field with every detected cell boxed and numbered (orange: uncertain)."""
    annotated = image.convert("RGB").copy()
    draw = ImageDraw.Draw(annotated)
    width = max(2, round(max(image.size) / 400))
    for index, cell in enumerate(cells, start=1):
        if cell.box is None:
            continue
        colour = (255, 140, 0) if cell.prediction.uncertain else (0, 200, 60)
        draw.rectangle(cell.box, outline=colour, width=width)
        label = f"{index} {cell.prediction.label}"
        x0, y0 = cell.box[0], max(0, cell.box[1] - 12)
        draw.rectangle([x0, y0, x0 + 7 * len(label), y0 + 12], fill=colour)
        draw.text((x0 + 2, y0), label, fill=(0, 0, 0))
    return annotated
