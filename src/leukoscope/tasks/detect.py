"""Detection: train a cell detector from a config, and evaluate a detector bundle on a VOC folder.

The run directory is the shared one (:mod:`leukoscope.engine.run_dir`); the
bundle says ``task: detect``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

import torch

from leukoscope.bundle import BundleInfo, save_bundle
from leukoscope.data.annotations import (AnnotatedImage, DetectionDataset, SplitRequired, issues_note,
                                         left_out_blood_classes, unannotated_note)
from leukoscope.data.manifest import DatasetError
from leukoscope.data.voc import read_voc_dataset
from leukoscope.data.fingerprints import (LEARNED_PARTS, describe_overlap, digest_overlap, inherit_training_digests,
                                         read_training_digests, write_training_digests)
from leukoscope.engine.config import ConfigError
from leukoscope.engine.detection_config import DetectionExperimentConfig, resolve_detection_init
from leukoscope.engine.detection_data import (image_array, measure_seconds_per_image, predict_images,
                                              prepare_detection_data, to_ground_truth)
from leukoscope.engine.detection_trainer import fit_detector
from leukoscope.engine.finetune import starting_weights
from leukoscope.engine.run_dir import (SPLIT_FILE, RunResult, absolute_paths, finish_run, new_run_dir, open_run,
                                      resumed_split)
from leukoscope.engine.runtime import count_parameters, resolve_device, seed_everything
from leukoscope.evaluation.detection import Predicted, choose_threshold, coco_metrics, evaluate_detections
from leukoscope.evaluation.report import format_value
from leukoscope.inference.detector import CellDetector
from leukoscope.io import load_image
from leukoscope.models import create_model, model_entry
from leukoscope.models.registry import wrong_option_type
from leukoscope.pretrained import resolve_bundle
from leukoscope.progress import progress_bar, say
from leukoscope.scale import source_scale

log = logging.getLogger(__name__)


def check_frozen_backbone(config: DetectionExperimentConfig) -> None:
    """Refuse ``model.freeze_backbone`` without trained weights to freeze: it trained the heads on a random
    backbone, without a word."""
    if config.model.freeze_backbone and not (config.model.init or config.model.weights
                                             or config.model.backbone_weights):
        raise ConfigError("model.freeze_backbone=true keeps the backbone's weights as they start, and without "
                          "model.backbone_weights, model.weights or model.init they are random: give the "
                          "trained weights to freeze, or leave model.freeze_backbone false")


def check_option_types(config: DetectionExperimentConfig) -> None:
    """Refuse a ``model.options`` value of the wrong type (``{input_scale: big}``) before any image is read: the
    builder failed on it only after the data were prepared. An unknown model is said by :func:`build_detector`."""
    try:
        message = wrong_option_type(config.model.name, dict(config.model.options))
    except ValueError:
        return
    if message:
        raise ConfigError(message)


def build_detector(config: DetectionExperimentConfig, classes: int | list[str]) -> torch.nn.Module:
    """The detector of ``config`` for ``classes`` (names; or their number, without ``model.init``)."""
    entry = model_entry(config.model.name)
    if entry.kind != "detector":
        raise ConfigError(f"model.name {config.model.name!r} is a {entry.kind}, not a detector")
    options = dict(config.model.options)
    num_classes = classes if isinstance(classes, int) else len(classes)
    if config.model.init:  # fine-tuning a detector bundle: its weights, with or without its class layer
        if isinstance(classes, int):
            raise ConfigError("model.init needs the data's class names to compare them with the bundle's")
        options["weights"] = starting_weights(config.model.init, classes, "detect")
    if config.model.weights:
        options["weights"] = config.model.weights
    if config.model.backbone_weights:
        options["backbone_weights"] = config.model.backbone_weights
    if config.model.freeze_backbone:
        check_frozen_backbone(config)
        options["freeze_backbone"] = True
    try:
        return create_model(config.model.name, num_classes=num_classes, **options)
    except (TypeError, ValueError) as exc:  # unknown or ill-formed options, or weights that do not fit
        # the settings given, by their own keys: a wrong backbone_weights file was said to be "model.options"
        given = [f"model.options.{key}" for key in config.model.options] + [
            key for key, value in (("model.init", config.model.init), ("model.weights", config.model.weights),
                                   ("model.backbone_weights", config.model.backbone_weights)) if value]
        raise ConfigError(f"{config.model.name} with {', '.join(given) or 'its defaults'}: {exc}") from None


def training_scale(setting: float | str | None, images: list) -> float | None:
    """The training images' pixel size: as configured, or estimated from up to 40 of them (read
    one at a time: none is kept at full size once its estimate is made)."""
    if setting is None or isinstance(setting, (int, float)):
        return None if setting is None else float(setting)
    step = max(1, len(images) // 40)

    def fields():
        for image in images[::step][:40]:
            with load_image(image.image_path) as pil:
                yield pil

    scale = source_scale(fields())
    say(f"training images' scale: {f'{scale.um_per_px:.4f} um/px' if scale.known else 'not estimated'} "
        f"({scale.note})")
    return scale.um_per_px


def run_detection_experiment(
    config: DetectionExperimentConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> RunResult:
    """Train, pick the threshold, evaluate on the test split, write the bundle and report."""
    config = resolve_detection_init(absolute_paths(config, ["data.path", "model.weights", "model.backbone_weights",
                                                            "model.init", "output_root"]))
    check_frozen_backbone(config)  # before a run folder exists or any image is read
    check_option_types(config)
    label = config.name or config.model.name
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config.output_root, label)
    saved = resumed_split(run_dir) if resume else run_dir / SPLIT_FILE  # missing on resume: refused, not remade
    with open_run(run_dir, config, resume=resume):
        splits = prepare_detection_data(config.data)
        if resume:
            check_same_split(json.loads(saved.read_text()), splits.describe())
        saved.write_text(json.dumps(splits.describe(), indent=1))
        classes = splits.classes
        seed_everything(config.train.seed)  # model initialisation is part of the seeded run
        model = build_detector(config, list(classes))
        n_params = count_parameters(model)
        sizes = {k: len(v) for k, v in splits.parts.items()}
        say(f"[bold]{label}[/bold]: {config.model.name} ({n_params / 1e6:.2f} M parameters), "
            f"classes {classes}, images {sizes}")
        result = fit_detector(model, splits, config.train, run_dir=run_dir, resume=resume,
                              show_progress=show_progress)
        say(f"training finished: {result.stopped_because}; kept epoch {result.best_epoch}")
        device = resolve_device(config.train.device)
        info = BundleInfo(model_name=config.model.name, classes=list(classes), task="detect",
                          model_options=dict(config.model.options), score_threshold=config.predict.score_threshold,
                          um_per_px=training_scale(config.data.um_per_px, splits.parts["train"]))
        detector = CellDetector(model, info, device)
        notes = list(splits.notes)
        if config.predict.choose_threshold and "val" in splits.parts:
            val = list(splits.parts["val"])
            predictions = predict_images(detector, val, show_progress=show_progress, description="validation")
            info.score_threshold = choose_threshold(predictions, [to_ground_truth(i, classes) for i in val], classes)
            detector.score_threshold = info.score_threshold
            notes.append(f"Operating threshold {info.score_threshold:.2f} chosen on the validation split "
                         f"(best mean F1 over classes).")
        eval_name = "test" if "test" in splits.parts else "val" if "val" in splits.parts else "train"
        if eval_name != "test":
            notes.append(f"No test split: the numbers below are on the {eval_name} split, which took part "
                         f"in training or model selection.")
        target = list(splits.parts[eval_name])
        base = resolve_bundle(config.model.init) if config.model.init else None
        base_record = read_training_digests(base) if base is not None else None
        learned_by_base = digest_overlap(base_record, [i.image_path for i in target]) if base_record else {}
        if learned_by_base:  # e.g. CBC's smears are BCCD's: a test part the base learned from flatters the score
            message = (f"the {eval_name} split holds images that {config.model.init}, which this detector was "
                       f"fine-tuned from, learned from ({describe_overlap(learned_by_base)}): its {eval_name} score "
                       f"overstates it on new images")
            log.warning(message)
            notes.append(f"Warning: {message}.")
        predictions = predict_images(detector, target, show_progress=show_progress,
                                     description=f"scoring {eval_name}")
        extra = {
            "evaluated_on": eval_name, "split_sizes": sizes, "best_epoch": result.best_epoch,
            "stopped_because": result.stopped_because, "train_minutes": result.train_seconds / 60,
            "parameters": n_params, "seconds_per_image": measure_seconds_per_image(detector, target[0]),
            "model": config.model.name, "history": result.history,
            "annotation_issues": [issue.as_dict() for issue in splits.issues],  # the report shows the first few
            "unannotated_images": [str(path) for path in splits.unannotated],
        }
        metrics = evaluate_detections(
            predictions, [to_ground_truth(i, classes) for i in target], classes, run_dir,
            score_threshold=info.score_threshold, images=lambda i: image_array(target[i]),
            history=result.history, title=f"{label}: {config.model.name} on {eval_name}",
            notes=notes, config=config.to_dict(), extra=extra,
        )
        info.metrics = {**recorded_test_scores(metrics), **{
            k: metrics.get(k) for k in ("evaluated_on", "seconds_per_image", "train_minutes", "best_epoch")}}
        info.provenance = {"run_dir": str(run_dir.resolve()), "dataset": config.data.path,
                           "config": config.to_dict()}
        bundle_dir = save_bundle(run_dir / "bundle", model, info)
        write_training_digests(bundle_dir, {part: [image.image_path for image in splits.parts.get(part, [])]
                                            for part in LEARNED_PARTS})
        if base is not None:  # what the starting bundle learned from is this one's training data too
            inherit_training_digests(bundle_dir, base)
        say(f"{eval_name}: mAP {metrics['map']:.4f}, mAP@0.5 {metrics['map_50']:.4f} "
            f"({metrics['n_images']} images); report: {run_dir / 'report.html'}")
        (run_dir / "history.json").write_text(json.dumps(result.history, indent=1))
        finish_run(run_dir, keep_checkpoint=config.train.keep_checkpoint)
        return RunResult(run_dir, bundle_dir, metrics, result)


def check_same_split(saved: dict[str, list[str]], now: dict[str, list[str]]) -> None:
    """A resumed run's split, cut again from its folder, must be the one it trained on (``split.json``): an
    image added or removed moves others between the parts, and images trained on would be tested on."""
    part_of = {path: part for part, paths in saved.items() for path in paths}
    moved = sum(1 for part, paths in now.items() for path in paths if part_of.get(path, part) != part)
    added = sum(1 for paths in now.values() for path in paths if path not in part_of)
    gone = len(part_of) - sum(1 for paths in now.values() for path in paths if path in part_of)
    if moved or added or gone:
        raise ConfigError(f"the data changed since this run started ({moved} image(s) now in another part, {added} "
                          f"new, {gone} gone), or the split rule did (since 2026-12-07 a field's near copies go to one "
                          f"part, and images without annotations or with a box of an unknown class are left out): "
                          f"resuming would test on images it trained on; restore the data or start a new run")


def recorded_test_scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a detector bundle records of an evaluation on its test images (the quality gate of
    ``analyze`` and the model card read it)."""
    scores = {k: metrics.get(k) for k in ("map", "map_50", "map_75", "wbc_count_exact", "n_images")}
    scores["ap_50_per_class"] = {name: row["ap_50"] for name, row in metrics["per_class"].items()}
    scores["objects_per_class"] = {name: row.get("n_true") for name, row in metrics["per_class"].items()}
    return scores


def trained_class_names(info: BundleInfo) -> dict[str, Any]:
    """The class aliases and the classes left out on purpose that the bundle's training read its data with: a
    box so named is read as it was in training, not as an unknown class (which leaves its image out)."""
    data = ((info.provenance or {}).get("config") or {}).get("data") or {}
    aliases = {str(k): str(v) for k, v in (data.get("aliases") or {}).items()}
    ignore = [str(name) for name in data.get("ignore_classes") or []]
    # an alias to a class the detector does not have and that is not left out would be refused: not carried
    # (leukoscope.data.annotations.left_out_blood_classes: those the detector's classes leave out)
    left_out = {c.casefold() for c in left_out_blood_classes(info.classes)}
    kept = {k: v for k, v in aliases.items() if v in info.classes or v in ignore or v.casefold() in left_out}
    return {"aliases": kept, "ignore_classes": ignore}


def read_scored_data(data: str | Path, split: str | None, info: BundleInfo,
                     on_error: Literal["skip", "fail"]) -> DetectionDataset:
    """The VOC data a detector is scored on, read with its classes and its training's class names."""
    try:
        return read_voc_dataset(data, split, classes=info.classes, on_error=on_error, **trained_class_names(info))
    except SplitRequired as exc:  # the reader cannot know the option that names the split
        raise DatasetError(f"{exc.root} has the splits {', '.join(exc.splits)}: choose the one to score on with "
                           f"--split, e.g. --split {exc.roles().get('test', exc.splits)[0]}") from None


def evaluate_detector_bundle(
    bundle: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    split: str | None = None,
    on_error: Literal["skip", "fail"] = "skip",
    score_threshold: float | None = None,
    device: str = "cpu",
    show_progress: bool = True,
    backend: str = "torch",
    threads: int | None = None,
    at_scale: bool = True,
    um_per_px: float | None = None,
) -> dict[str, Any]:
    """Score a detector bundle on a VOC folder (any layout; ``split`` picks one part); ``backend``:
    what runs it (:meth:`CellDetector.from_bundle`). ``at_scale`` (a detector that records its training
    scale): each field is scored as `analyze` detects in it, brought to that scale (``um_per_px``, else its
    red cells' estimate, else the fields' together) and tiled, the boxes brought back; else as it is."""
    detector = CellDetector.from_bundle(bundle, device, score_threshold, backend=backend, threads=threads)
    classes = detector.classes
    dataset = read_scored_data(data, split, detector.info, on_error)
    images = list(dataset)
    notes = [f"Detector {Path(bundle).resolve()} scored on {Path(data).resolve()}"
             + (f" (split {split})" if split else "") + "."]
    scales = None
    if at_scale and getattr(detector.info, "um_per_px", None):
        predictions, scales = predict_at_scale(detector, images, um_per_px, show_progress=show_progress)
        notes.append(scales["note"])
    else:
        predictions = predict_images(detector, images, show_progress=show_progress, description="detecting")
    if dataset.unannotated:
        notes.append(unannotated_note(dataset.unannotated))
    if dataset.issues:
        notes.append(issues_note(dataset.issues))
    record = read_training_digests(resolve_bundle(bundle))
    learned = digest_overlap(record, [image.image_path for image in images]) if record is not None else {}
    if learned:  # a warning, not a refusal: a detector's score is read with its split (--split) in mind
        message = f"{data} holds {describe_overlap(learned)}: a score on them says nothing about new images"
        log.warning(message)
        notes.append(f"Warning: {message}.")
    trained_on = detector.info.provenance.get("dataset")
    if trained_on:
        notes.append(f"The detector was trained on {trained_on}; BCCD and CBC show the same smears, so never "
                     f"score a detector trained on one of them on the other.")
    precision = str((detector.info.export or {}).get("precision", "float32")) if detector.backend != "torch" \
        else "float32"
    if detector.backend != "torch":
        notes.append(f"Network run on {detector.backend} (the bundle's exported {precision} graphs).")
    return evaluate_detections(
        predictions, [to_ground_truth(i, classes) for i in images], classes, Path(out_dir),
        score_threshold=detector.score_threshold, images=lambda i: image_array(images[i]),
        title=f"{detector.info.model_name} on {Path(data).name}" + (f" ({split})" if split else ""),
        notes=notes,
        extra={"bundle": str(Path(bundle).resolve()), "data": str(Path(data).resolve()), "split": split,
               "seconds_per_image": measure_seconds_per_image(detector, images[0]), "backend": detector.backend,
               "precision": precision, "training_overlap": learned,
               "annotation_issues": [i.as_dict() for i in dataset.issues],
               "unannotated_images": [str(path) for path in dataset.unannotated], "scales": scales},
    )


def predict_at_scale(detector: CellDetector, images: Sequence[AnnotatedImage], um_per_px: float | None, *,
                     show_progress: bool = False) -> tuple[list[Predicted], dict[str, Any]]:
    """Every detection the model keeps in each field (for mAP), found as `analyze` finds them: the field
    brought to the detector's training scale and tiled (:meth:`SmearAnalyzer.detect_field`), the boxes in
    the field's own pixels; and how the fields were scaled. A lab's fields at another magnification had
    been scored as they came (six CBC fields at 2x: mAP@0.5 0.45, 0.95 so) while `analyze` resampled them."""
    from leukoscope.inference.smear import SmearAnalyzer
    from leukoscope.scale import lent_run_scale

    quality = logging.getLogger("leukoscope.inference.smear")  # its "no leukemia flag" words: not evaluate's
    level = quality.level
    quality.setLevel(logging.ERROR)
    try:
        analyzer = SmearAnalyzer(detector, None, um_per_px=um_per_px)
    finally:
        quality.setLevel(level)
    run = lent_run_scale([image.image_path for image in images], um_per_px)
    out: list[Predicted] = []
    sources: Counter[str] = Counter()
    factors: list[float] = []
    with progress_bar(len(images), "detecting", enabled=show_progress) as update:
        for image in images:
            field = analyzer.prepare(load_image(image.image_path), run_um_per_px=run)
            found = analyzer.detect_field(field, threshold=0.0).detections
            out.append(Predicted(found.boxes, found.scores, found.labels))
            sources[field.scale.source] += 1
            factors.append(field.factor)
            update(advance=1)
    resampled = sum(factor != 1.0 for factor in factors)
    note = (f"Fields scored as `analyze` detects in them, at the detector's training scale "
            f"({detector.info.um_per_px:.4f} um/px): {resampled} of {len(images)} resampled (factors "
            f"{min(factors):.2f}-{max(factors):.2f}); scales {dict(sorted(sources.items()))}"
            + (f", the fields' own {run:.4f} um/px lent to those without one" if run is not None else "")
            + (" (`--as-given`: the fields as they are)." if resampled else "."))
    return out, {"trained_um_per_px": detector.info.um_per_px, "sources": dict(sources), "resampled": resampled,
                 "factor_range": [min(factors), max(factors)], "run_um_per_px": run, "note": note}


# --------------------------------------------------------------------------- export parity
@dataclass
class DetectorParity:
    """How an exported detector's detections compare with its torch model's on the same images."""

    images: int
    backend: str
    detections: tuple[int, int]
    """Detections (any score the model keeps) of torch and of ``backend``."""
    unmatched: int
    """Detections of either without a partner of the same class within 1 px in the other."""
    max_box_diff: float
    """Largest coordinate difference (pixels) of matched detections."""
    max_score_diff: float
    map_50: tuple[float, float]
    map: tuple[float, float]
    class_ap_50: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    """AP@0.5 of each class, torch and ``backend`` (an int8 graph may move one class more than the mean)."""
    precision: str = "float32"
    """The exported graph's (``export.precision``): an int8 graph is not expected to match torch box for box."""

    def lines(self) -> list[str]:
        matched = (f"{self.unmatched} unmatched; largest box difference {self.max_box_diff:.2e} px, largest score "
                   f"difference {self.max_score_diff:.2e}")
        if self.precision != "float32":
            matched = (f"{self.unmatched} without a partner within 1 px ({self.precision}: boxes and scores move, "
                       f"so judge it by the AP below)")
        return [f"parity on {self.images} images ({self.backend} vs torch): {self.detections[0]} vs "
                f"{self.detections[1]} detections, {matched}",
                f"mAP@0.5 torch {self.map_50[0]:.4f}, {self.backend} {self.map_50[1]:.4f} "
                f"(change {self.map_50[1] - self.map_50[0]:+.4f}); mAP@[.5:.95] torch {self.map[0]:.4f}, "
                f"{self.backend} {self.map[1]:.4f}"] + ([
            "AP@0.5 by class, torch -> " + self.backend + ": " + ", ".join(
                f"{name} {format_value(a)} -> {format_value(b)}" for name, (a, b) in self.class_ap_50.items())]
            if self.class_ap_50 else [])


def match_same_detections(a: Predicted, b: Predicted, tolerance: float = 1.0) -> tuple[list[tuple[int, int]], int]:
    """Pairs (i, j) of detections of ``a`` and ``b`` with the same class whose boxes differ by at most
    ``tolerance`` px in every coordinate, each used once (closest first: two near-equal scores may
    swap places between backends, so the order alone does not pair them); and the count left over."""
    if len(a.scores) == 0 or len(b.scores) == 0:
        return [], len(a.scores) + len(b.scores)
    distance = np.abs(a.boxes[:, None, :] - b.boxes[None, :, :]).max(axis=2)
    distance[a.labels[:, None] != b.labels[None, :]] = np.inf
    pairs: list[tuple[int, int]] = []
    used_a: set[int] = set()
    used_b: set[int] = set()
    for flat in np.argsort(distance, axis=None, kind="stable"):
        i, j = (int(k) for k in np.unravel_index(flat, distance.shape))
        if distance[i, j] > tolerance:
            break
        if i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    return pairs, len(a.scores) + len(b.scores) - 2 * len(pairs)


def compare_detector_backends(bundle: str | Path, data: str | Path, *, split: str | None = None,
                              backend: str = "auto", threads: int | None = None,
                              on_error: Literal["skip", "fail"] = "skip",
                              show_progress: bool = True) -> DetectorParity:
    """Detect on a VOC folder with the torch model and the exported graph of ``bundle`` on ``backend``
    (``auto``: the installed graph runtime ``auto`` picks; an error when that is torch)."""
    exported = CellDetector.from_bundle(bundle, backend=backend, threads=threads)
    if exported.backend == "torch":
        raise ValueError(f"{bundle}: no installed runtime can run its graph, so there is nothing to compare torch "
                         f"with: pip install 'leukoscope[onnx]' (or [openvino])")
    backend = exported.backend
    detectors = [CellDetector.from_bundle(bundle, backend="torch", threads=threads), exported]
    classes = detectors[0].classes
    images = list(read_scored_data(data, split, detectors[0].info, on_error))
    if not images:
        raise ValueError(f"{data}: no annotated images" + (f" in split {split}" if split else ""))
    truths = [to_ground_truth(image, classes) for image in images]
    runs = [predict_images(detector, images, show_progress=show_progress, description=f"detecting ({name})")
            for detector, name in zip(detectors, ("torch", backend))]
    box_diff = score_diff = 0.0
    unmatched = 0
    for a, b in zip(*runs):
        pairs, left = match_same_detections(a, b)
        unmatched += left
        for i, j in pairs:
            box_diff = max(box_diff, float(np.abs(a.boxes[i] - b.boxes[j]).max()))
            score_diff = max(score_diff, float(abs(a.scores[i] - b.scores[j])))
    scores = [coco_metrics(run, truths, classes) for run in runs]
    counts = (sum(len(p.scores) for p in runs[0]), sum(len(p.scores) for p in runs[1]))
    class_ap = {name: (scores[0]["per_class"][name]["ap_50"], scores[1]["per_class"][name]["ap_50"])
                for name in classes if name in scores[0]["per_class"]}
    precision = str((exported.info.export or {}).get("precision", "float32"))
    return DetectorParity(len(images), backend, counts, unmatched, box_diff, score_diff,
                          (scores[0]["map_50"], scores[1]["map_50"]), (scores[0]["map"], scores[1]["map"]), class_ap,
                          precision)
