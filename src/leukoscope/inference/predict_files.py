"""Batch prediction over files and folders, with CSV/JSON output and Grad-CAM overlays."""

from __future__ import annotations

import hashlib
import csv
import json
import re
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from rich.markup import escape

from leukoscope.data.manifest import DatasetError
from leukoscope.inference.quality import lead_clause
from leukoscope.inference.slide.reader import SLIDE_ONLY_SUFFIXES
from leukoscope.io import (IMAGE_SUFFIX_NAMES, IMAGE_SUFFIXES, files_below, is_image_file, is_system_name,
                           load_image)
from leukoscope.progress import console, name_some, progress_bar, say

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch loads only once there is something to predict: input checks stay fast
    import torch

    from leukoscope.inference.predictor import CellClassifier, Prediction


def collect_images(inputs: Sequence[str | Path], *, slides: bool = False) -> list[Path]:
    """Expand folders (recursively) into image files; keep explicit files as given. A file reached twice
    (named and inside a named folder, or a folder given twice) is kept once, where first reached: a
    field counted twice would weigh twice in the pooled differential. ``slides``: whole-slide files of a folder
    (``.svs``, ``.ndpi``, ...) are found too (`analyze` reads them as slides; they were "not an image"). A CSV
    file (a manifest) is refused: the commands take images, not lists of them."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # A link to an image that is gone (an unmounted share) stays in, to be reported as unreadable with
            # the other failures: left out, it shrank the run without a word.
            below = files_below(item)
            found = [p for p in below if is_image_file(p) or _broken_image_link(p)
                     or (slides and p.suffix.lower() in SLIDE_ONLY_SUFFIXES)]
            if not found:
                raise DatasetError(f"{item}: folder has no images ({' '.join(IMAGE_SUFFIX_NAMES)})")
            paths += found
            taken = set(found)
            _say_left_out(item, [p for p in below if p not in taken
                                 and not any(is_system_name(part) for part in p.relative_to(item).parts)])
        elif item.suffix.lower() == ".csv" and item.is_file():
            # read as an image, a manifest was "not a recognised image" and a predictions file was written of it
            raise DatasetError(f"{item}: a CSV file, not an image: give images or folders of images (a manifest's "
                               f"images are scored against its labels by `leukoscope evaluate --data {item}`)")
        elif item.exists():
            paths.append(item)
        else:
            raise DatasetError(f"{item}: no such file or folder")
    first = {}
    for path in paths:
        first.setdefault(path.resolve(), path)
    unique = list(first.values())
    if len(unique) < len(paths):
        reached = Counter(path.resolve() for path in paths)
        repeated = sorted(first[resolved].name for resolved, n in reached.items() if n > 1)
        log.warning("%d file(s) given more than once are used once: %s", len(paths) - len(unique),
                    name_some(repeated))
    return unique


def byte_copies(paths: Sequence[Path]) -> dict[Path, Path]:
    """Each file of ``paths`` byte-identical to one before it, with that one (said in a warning): the same field
    saved under two names was counted twice in a pooled differential, so `analyze` leaves the copies out. Files are
    compared by size, then (same size) by their ends, then (same ends) whole: uncompressed fields of one camera
    are all of one size."""
    copies: dict[Path, Path] = {}
    # empty files are alike but no copies: each is reported unreadable (one had vanished as a copy of another)
    for alike in _alike([same for same in _alike([list(paths)], _size) if _size(same[0]) > 0], _ends):
        first: dict[str, Path] = {}
        for path in alike:
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:  # unreadable: reported with the other failures
                continue
            original = first.setdefault(digest, path)
            if original != path:
                copies[path] = original
    if copies:
        log.warning("%d file(s) are byte-identical copies of others and are used once: %s", len(copies),
                    name_some([copy_of(copy, original) for copy, original in copies.items()]))
    return copies


def copy_of(copy: Path, original: Path) -> str:
    """``copy (= original)``, by name in one folder, else by path: "field.jpg (= field.jpg)" said neither which
    was left out nor which was used."""
    if copy.parent == original.parent:
        return f"{copy.name} (= {original.name})"
    return f"{copy} (= {original})"


def _alike(groups: list[list[Path]], key: Callable[[Path], Any]) -> list[list[Path]]:
    """The groups of two or more files of ``groups`` that ``key`` (a path's size, its ends) does not tell apart;
    a file ``key`` cannot read is left out (reported with the other failures)."""
    found: list[list[Path]] = []
    for group in groups:
        by_key: dict[Any, list[Path]] = {}
        for path in group:
            try:
                by_key.setdefault(key(path), []).append(path)
            except OSError:
                continue
        found += [same for same in by_key.values() if len(same) > 1]
    return found


def _size(path: Path) -> int:
    return path.stat().st_size


def _ends(path: Path, size: int = 1 << 16) -> str:
    """The digest of a file's first and last ``size`` bytes: what tells most same-size images apart without
    reading them whole."""
    with path.open("rb") as handle:
        digest = hashlib.sha256(handle.read(size))
        handle.seek(max(0, handle.seek(0, 2) - size))
        digest.update(handle.read(size))
        return digest.hexdigest()


def _say_left_out(folder: Path, left: Sequence[Path]) -> None:
    """A warning naming the files of ``folder`` not taken as images (a .webp, .gif or a file without an
    extension was skipped without a word, the run's count of images the only trace)."""
    if left:
        log.warning("%s: %d file(s) left out, not named as BMP, JPEG, PNG or TIFF images: %s", folder, len(left),
                    name_some(sorted(str(p.relative_to(folder)) for p in left)))


def _broken_image_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists() and path.suffix.lower() in IMAGE_SUFFIXES


#: The columns of a predictions file before and after the classes' probabilities (``p_<class>``).
LEADING_COLUMNS = ("source", "label", "top_class", "confidence", "uncertain")
TRAILING_COLUMNS = ("ood_score", "unfamiliar", "um_per_px", "scale_source", "warnings", "error")


def write_predictions(predictions: Sequence[Prediction], out: Path, classes: Sequence[str] = ()) -> Path:
    """``predictions`` as CSV or JSON, every row with the same columns in one order whatever the rows (an
    unreadable first file put ``ood_score`` before the probabilities; in JSON an unreadable image's row lacked
    the ``p_`` keys), every class's ``p_`` column even when no image was read (``classes``: the classifier's), the
    scale's whatever the mode. A value a row does not have is empty in a CSV, null in JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [p.as_row() for p in predictions]
    fields = _columns(rows, classes)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps([{key: row.get(key) for key in fields} for row in rows], indent=1))
    elif out.suffix.lower() == ".csv":
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"{out}: output must end in .csv or .json")
    return out


def _columns(rows: Sequence[dict[str, object]], classes: Sequence[str]) -> list[str]:
    found = dict.fromkeys(key for row in rows for key in row)
    probabilities = dict.fromkeys([f"p_{name}" for name in classes] + [k for k in found if k.startswith("p_")])
    known = set(LEADING_COLUMNS) | set(TRAILING_COLUMNS) | set(probabilities)
    # the scale's columns too: a script reading um_per_px broke on an --as-given file, or one of a classifier
    # without a physical window (empty there: the image was taken whole)
    always = ("ood_score", "unfamiliar", "um_per_px", "scale_source", "warnings", "error")
    return [*LEADING_COLUMNS, *probabilities, *(k for k in found if k not in known),
            *(k for k in TRAILING_COLUMNS if k in found or k in always)]


#: The name of a heatmap :func:`save_explanations` writes: its row in the predictions file, the image, the label.
HEATMAP_NAME = re.compile(r"[0-9]{5,}_.+\.png")


def earlier_heatmaps(folder: Path) -> list[Path]:
    """The heatmaps an earlier ``predict --explain`` wrote into ``folder`` (by their names; nothing else)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and HEATMAP_NAME.fullmatch(p.name))


#: Images per Grad-CAM pass: one forward and one backward pass explain the whole batch.
EXPLAIN_BATCH = 32


def save_explanations(classifier: CellClassifier, predictions: Sequence[Prediction], out_dir: Path,
                      model: torch.nn.Module | None = None, batch_size: int = EXPLAIN_BATCH,
                      show_progress: bool = True) -> list[Path]:
    """One Grad-CAM overlay PNG per readable image, for the predicted (top) class, with
    a colour bar; flat (uninformative) maps carry a note and are named in a warning. Each picture says
    what its row in the predictions file says (:func:`heatmap_status`: the label, uncertain or not, unfamiliar,
    its warnings briefly) and is named by the label, and carries the coarse-map caveat when it applies
    (:func:`~leukoscope.inference.explain.coarse_map_warning`): a picture passed on alone keeps them.

    ``model``: the torch model to explain (default: the classifier's own; another backend
    has none, so the caller loads it). Grad-CAM runs once per batch of ``batch_size``
    images, each explaining its own top class (:func:`grad_cam` takes one class per image)."""
    import torch

    from leukoscope.inference.explain import coarse_map_warning, grad_cam_maps, heatmap_figure, overlay_heatmap
    from leukoscope.pixels import letterbox

    model = classifier.model if model is None else model
    if model is None:
        raise ValueError("Grad-CAM needs the torch model of the bundle")
    out_dir.mkdir(parents=True, exist_ok=True)
    coarse = coarse_map_warning(model, classifier.image_size) if any(p.error is None for p in predictions) else None
    written = []
    flat: list[str] = []
    # each overlay numbered by its row in the predictions file (error rows included), so a heatmap is found by it
    rows = [(row, p) for row, p in enumerate(predictions) if p.error is None]
    readable = [p for _, p in rows]
    with progress_bar(len(readable), "Grad-CAM", enabled=show_progress) as update:
        for start in range(0, len(readable), batch_size):
            batch = readable[start:start + batch_size]
            # the image the answer came from: framed at the scale its prediction records
            images = [_as_classified(classifier, load_image(prediction.source), prediction) for prediction in batch]
            inputs = torch.stack([classifier.preprocess(image) for image in images]).to(classifier.device)
            maps = grad_cam_maps(model, inputs, [classifier.classes.index(p.top_class) for p in batch],
                                 views=classifier.info.preprocessing.views)  # as the answer: every view's map
            for offset, (prediction, image, heatmap, is_flat) in enumerate(
                    zip(batch, images, maps.heatmaps, maps.flat)):
                shown = letterbox(image, max(classifier.image_size, 256))
                row = rows[start + offset][0]
                # named by the label, as the row: an uncertain cell's file does not claim its top class
                path = out_dir / f"{row:05d}_{Path(prediction.source).stem}_{prediction.label}.png"
                status, alert, notes = heatmap_status(prediction)
                # compress_level 1: still lossless; zlib's default level took a third of the time
                heatmap_figure(overlay_heatmap(shown, heatmap), heatmap, prediction.top_class, flat=bool(is_flat),
                               status=status, alert=alert, notes=[*notes, *([coarse] if coarse else [])]).save(
                    path, compress_level=1)
                if is_flat:
                    flat.append(path.name)
                written.append(path)
                update()
    if coarse:
        console.print(f"[yellow]warning:[/yellow] {escape(coarse)}", soft_wrap=True)
    if flat:
        console.print(f"[yellow]warning:[/yellow] {len(flat)} of {len(written)} Grad-CAM maps are flat (the model "
                      f"found no localised evidence; saved with a note): {escape(name_some(flat))}", soft_wrap=True)
    return written


def heatmap_status(prediction: Prediction) -> tuple[str, bool, list[str]]:
    """What a Grad-CAM picture says of its prediction, as its row in the predictions file: the label with its
    confidence ("uncertain (top: platelet 0.42)" below the threshold), unfamiliar, and each warning by its lead
    clause (the full text is in the ``warnings`` column); and whether that is a reason for doubt (drawn red)."""
    if prediction.uncertain:
        text = f"{prediction.label} (top: {prediction.top_class} {prediction.confidence:.2f})"
    else:
        text = f"{prediction.label} {prediction.confidence:.2f}"
    if prediction.unfamiliar:
        text = f"! {text}, unfamiliar"
    # "No scale for a single-cell image: classified whole, ..." -> its lead clause
    notes = [f"warning: {lead_clause(warning)} (warnings column)" for warning in prediction.warnings]
    return text, bool(prediction.uncertain or prediction.unfamiliar or notes), notes


def _as_classified(classifier: CellClassifier, image, prediction: Prediction):
    """``image`` as the classifier saw it for ``prediction``: its window cut again at the recorded scale."""
    from leukoscope.cell_window import centre_window

    scale = prediction.scale
    if scale is None or not scale.known or classifier.window_um is None:
        return image
    return centre_window(image, float(scale.um_per_px), classifier.window_um)


def predict_to_file(
    bundle: str | Path,
    paths: Sequence[Path],
    out: Path,
    *,
    threshold: float | None = None,
    explain_dir: Path | None = None,
    batch_size: int = 32,
    backend: str = "torch",
    threads: int | None = None,
    frame: bool = True,
    um_per_px: float | None = None,
    run_um_per_px: float | None = None,
    run_warnings: Sequence[str] = (),
    show_progress: bool = True,
    replace_heatmaps: bool = False,
) -> list[Prediction]:
    """Classify ``paths`` with ``bundle`` on ``backend`` (:mod:`leukoscope.inference.runtime`) and write
    ``out``; with ``explain_dir``, Grad-CAM overlays. Grad-CAM needs the torch model: on another
    backend it is loaded for that alone (only when asked), and explains the class the backend predicted.
    ``frame`` / ``um_per_px`` / ``run_um_per_px``: :meth:`CellClassifier.predict_paths`'s (single-cell images
    framed for a classifier of a physical window). ``run_warnings``: said of every image read (the images'
    red cells doubting a stated scale: :func:`leukoscope.scale.stated_run_doubt`), first in its warnings.
    ``replace_heatmaps``: remove the heatmaps an earlier run left in ``explain_dir`` before these are written."""
    import torch

    from leukoscope.bundle import load_bundle
    from leukoscope.inference.predictor import CellClassifier
    from leukoscope.pretrained import resolve_bundle

    if out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"{out}: output must end in .csv or .json")
    classifier = CellClassifier.from_bundle(bundle, uncertain_threshold=threshold, backend=backend, threads=threads)
    if classifier.backend != "torch":  # an int8 graph answers a little differently: said, not picked silently
        precision = (classifier.info.export or {}).get("precision", "float32")
        say(f"classifier on {classifier.backend} (the bundle's exported {precision} graph)")
    if explain_dir is not None and classifier.info.framework != "torch":
        raise ValueError(f"Grad-CAM (--explain) is not available for {classifier.info.model_name}: it is a "
                         "classical model on hand-made features, with no convolutional layers to explain; "
                         "run without --explain")
    with progress_bar(len(paths), "predicting", enabled=show_progress) as update:
        predictions = classifier.predict_paths(paths, batch_size=batch_size, progress=update,
                                               frame=frame, um_per_px=um_per_px, run_um_per_px=run_um_per_px)
    if run_warnings:
        predictions = [p if p.error else replace(p, warnings=(*run_warnings, *p.warnings)) for p in predictions]
    write_predictions(predictions, out, classifier.classes)
    if explain_dir is not None:
        if replace_heatmaps:  # only now, every check passed: a refused run keeps the earlier maps
            for path in earlier_heatmaps(explain_dir):
                path.unlink()
        model = classifier.model
        if model is None:  # onnxruntime / openvino: the torch model for Grad-CAM only
            model, _ = load_bundle(resolve_bundle(bundle), classifier.device, task="classify")
        with torch.enable_grad():
            save_explanations(classifier, predictions, explain_dir, model=model, show_progress=show_progress)
    return predictions
