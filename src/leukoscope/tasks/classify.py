"""Classification: train (one run from a config) and evaluate (a bundle on labelled images).

A run: data -> :class:`~leukoscope.engine.learner.Learner` (a CNN or a classical
pipeline) -> fit -> evaluate on the test split -> out-of-distribution statistics
(:mod:`leukoscope.tasks.ood`) -> bundle -> report, in the run directory of
:mod:`leukoscope.engine.run_dir`.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from rich.markup import escape

from leukoscope.bundle import BundleInfo, read_bundle_info, save_bundle
from leukoscope.cell_presence import CENTRES_CHECKED, TRAINING_CENTRES, centres_record
from leukoscope.cell_window import frame_single_cell
from leukoscope.data.manifest import DatasetError, Manifest
from leukoscope.data.dataset import decode_manifest, oblong_images, odd_sizes
from leukoscope.data.fingerprints import (LEARNED_PARTS, SOURCES_SUFFIX, describe_overlap, digest_overlap, file_digest,
                                         inherit_training_digests, read_training_digests, record_crop_sources,
                                         write_training_digests)
from leukoscope.data.readers import read_dataset
from leukoscope.data.splits import (FEW_IMAGES, GROUP_MEANING, Split, count_groups, few_images_note,
                                    parts_not_asked_for, warn_of_copies_labelled_otherwise)
from leukoscope.engine.config import ExperimentConfig, peek_init, resolve_init, save_config
from leukoscope.engine.data_prep import PreparedData, as_split, prepare_data
from leukoscope.engine.learner import Learner, check_learner_config, create_learner
from leukoscope.engine.run_dir import (CONFIG_FILE, SPLIT_FILE, RunResult, absolute_paths, finish_run, new_run_dir,
                                      open_run, resumed_split)
from leukoscope.engine.loop import FitResult
from leukoscope.models.embedding import default_stages
from leukoscope.tasks.ood import calibrate_run
from leukoscope.tasks.image_checks import NO_OOD_STATISTICS, ImageChecks, checks_summary
from leukoscope.tasks.trained_labels import labels_as_trained
from leukoscope.evaluation import evaluate_logits, headline_metrics
from leukoscope.evaluation.calibration import softmax
from leukoscope.evaluation.metrics import called_absent_note, collapsed_note
from leukoscope.inference.predictor import CellClassifier
from leukoscope.inference.runtime import no_embedding_output
from leukoscope.inference.slide.reader import recorded_um_per_px
from leukoscope.io import ImageDecodeError, load_image
from leukoscope.preprocessing import Preprocessing
from leukoscope.progress import counter_callback, progress_bar, say
from leukoscope.pretrained import resolve_bundle
from leukoscope.scale import FieldScale, lent_run_scale

log = logging.getLogger(__name__)


def run_name(config: ExperimentConfig) -> str:
    """The run's folder name: the config's ``name``, else the model's."""
    return config.name or config.model.name


def preprocessing_of(config: ExperimentConfig) -> Preprocessing:
    """The preprocessing a run trains with and its bundle keeps: ImageNet statistics, or those of
    the bundle ``model.init`` fine-tunes (whose weights expect them)."""
    statistics = {}
    if config.model.init:
        given = peek_init(config.model.init, "classify").preprocessing or {}
        statistics = {key: list(given[key]) for key in ("mean", "std") if given.get(key)}
    return Preprocessing(image_size=config.model.image_size, segmentation=config.data.segmentation,
                         cell_window_um=config.data.cell_window_um, colour=config.data.colour,
                         standardize=config.data.standardize, stain=config.data.stain, views=config.predict.views,
                         **statistics)


def with_absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """The config with its paths made absolute, so that ``--resume`` works from any folder; with
    ``model.init``, completed from that bundle (:func:`~leukoscope.engine.config.resolve_init`)."""
    return resolve_init(absolute_paths(config, ["data.path", "data.split_file", "model.weights", "model.init",
                                                "output_root"]))


def run_experiment(
    config: ExperimentConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    prepared: PreparedData | None = None,
    show_progress: bool = True,
) -> RunResult:
    """Train and evaluate one model as ``config`` describes; returns where everything went."""
    config = with_absolute_paths(config)
    preprocessing = preprocessing_of(config)
    check_learner_config(config, preprocessing)  # before a run folder exists or any image is decoded
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config.output_root, run_name(config))
    own_split = run_dir / SPLIT_FILE
    if resume:
        # A resumed run goes on with its own split: the shared split file it was copied from may have been
        # remade since (new images), which would move images its checkpoint trained on into val and test.
        own_split = resumed_split(run_dir)  # missing: refused, not replaced by another split
        config = config.model_copy(update={"data": config.data.model_copy(update={"split_file": str(own_split)})})
    if prepared is not None and prepared.decoded_as not in (None, preprocessing.decoded_as()):
        raise ValueError(f"the data were decoded as {prepared.decoded_as} (image size, resize, segmentation, stain); "
                         f"this run's model takes {preprocessing.decoded_as()}")
    with open_run(run_dir, config, resume=resume):
        if config.model.init and preprocessing.cell_window_um:  # under --quiet too (no progress bars, not no warnings)
            say(f"[yellow]note:[/yellow] {config.model.init} learned cells cut {preprocessing.cell_window_um:g} um "
                f"wide, and the new bundle keeps that window for `analyze`: the training images are taken as they "
                f"are, so they should be cells cut the same way (the service's reviewed-labels export is, and so are "
                f"the crops of `leukoscope analyze --cells`)")
        if prepared is None:
            prepared = prepare_data(config.data, preprocessing, Path(config.output_root), show_progress=show_progress,
                                    resume=resume)
        used = as_split(config.data, prepared.split)
        if used is not config.data:  # a reused split file's ratios and seed, not those asked for (never used)
            config = config.model_copy(update={"data": used})
            save_config(config, run_dir / CONFIG_FILE)
        reports = prepared.load_reports.values()
        # A lab's own set, one microscope: its cells should come alike. Not so for crops cut at a physical window
        # (the note above): from fields at two magnifications they differ in pixels, rightly (290 px and 52 px);
        # those are square, and a whole field among them is not.
        odd = (oblong_images([name for report in reports for name in report.oblong],
                             sum(report.loaded for report in reports)) if preprocessing.cell_window_um
               else odd_sizes([side for report in reports for side in report.sides]))
        if config.model.init and odd:
            say(f"[yellow]warning:[/yellow] {odd}")
        few = few_images_note(prepared.split, prepared.decoded_counts())  # of the images it can learn from
        if few and few not in prepared.said:  # its scores would say little; said once for search's many runs
            say(f"[yellow]warning:[/yellow] {escape(few)}")
            prepared.said.add(few)
        if not resume and prepared.split_file.resolve() != own_split.resolve():  # a resumed run's is its own
            shutil.copyfile(prepared.split_file, own_split)
        classes = prepared.classes
        learner = create_learner(config, classes, preprocessing)
        sizes = {name: len(prepared.parts[name].targets) if name in prepared.parts else 0
                 for name in ("train", "val", "test")}
        say(f"[bold]{run_dir.name}[/bold]: {learner.describe()}, classes {classes}, "
            f"train {sizes['train']} / val {sizes['val']} / test {sizes['test']} images")
        init_overlap = init_training_overlap(config.model.init, prepared.split) if config.model.init else None
        if init_overlap and init_overlap["parts"]:  # said before training, which may take hours; the score says it too
            say(f"[yellow]warning:[/yellow] {escape(init_overlap['note'])}")
        result = learner.fit(prepared, run_dir=run_dir, resume=resume, show_progress=show_progress)
        metrics = evaluate_run(learner, prepared, config, run_dir, result, init_overlap=init_overlap)
        ood_entry, ood_arrays = None, None
        ood = calibrate_run(learner, prepared, seed=config.train.seed, stages=default_stages(config.model.name))
        if ood is not None:
            ood_entry, ood_arrays = ood.to_parts()
        bundle_dir = save_bundle(
            run_dir / "bundle",
            learner.model,
            BundleInfo(
                model_name=config.model.name,
                classes=classes,
                preprocessing=preprocessing,
                model_options=learner.model_options,
                temperature=float(metrics.get("calibration", {}).get("temperature", 1.0)),
                uncertain_threshold=config.predict.uncertain_threshold,
                metrics=headline_metrics(metrics),
                provenance={"run_dir": str(run_dir.resolve()), "split_file": str(prepared.split_file.resolve()),
                            "dataset": config.data.path, "config": config.to_dict(),
                            TRAINING_CENTRES: training_centres(prepared, config.train.seed)},
                ood=ood_entry,
            ),
            ood_arrays=ood_arrays,
        )
        learned = prepared.split.assignments  # as read for this run (a shared split file is moved to the data)
        write_training_digests(bundle_dir, {part: [s.path for s in learned.get(part, [])] for part in LEARNED_PARTS})
        # cells cut by `analyze --cells` or the service's export name their fields: `analyze` of those fields says so
        record_crop_sources(bundle_dir, {part: [s.path for s in learned.get(part, [])] for part in LEARNED_PARTS})
        if config.model.init:  # what the starting bundle learned from is this one's training data too
            inherit_training_digests(bundle_dir, resolve_bundle(config.model.init))
        finish_run(run_dir, keep_checkpoint=config.train.keep_checkpoint)
        return RunResult(run_dir, bundle_dir, metrics, result)


def training_centres(prepared: PreparedData, seed: int) -> dict[str, int]:
    """How many of a seeded sample of the training images show no white cell at their centre
    (:func:`leukoscope.cell_presence.centres_record`): `predict` checks an image's centre for a classifier of
    single cells, not for one of whole fields (3 of 20 all-taleqani fields were doubted that way). Read once per
    preparation of the data (:attr:`PreparedData.training_centres`)."""
    if prepared.training_centres is None:
        prepared.training_centres = _training_centres(prepared, seed)
    return prepared.training_centres


def _training_centres(prepared: PreparedData, seed: int) -> dict[str, int]:
    paths = [sample.path for sample in prepared.split.assignments.get("train", [])]
    if len(paths) > CENTRES_CHECKED:
        paths = [paths[i] for i in sorted(np.random.default_rng(seed).choice(len(paths), CENTRES_CHECKED,
                                                                               replace=False))]

    def readable() -> Iterator[Image.Image]:
        for path in paths:
            try:
                yield load_image(path)
            except ImageDecodeError:  # skipped by training as well (or the run had stopped)
                continue

    return centres_record(readable())


def evaluate_run(learner: Learner, prepared: PreparedData, config: ExperimentConfig, run_dir: Path,
                 result: FitResult, init_overlap: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score the best model on the test split (validation when there is no test split); ``init_overlap``
    (:func:`init_training_overlap`) is kept in the metrics and said in the report."""
    eval_name = "test" if "test" in prepared.parts else "val" if "val" in prepared.parts else "train"
    target = prepared.parts[eval_name]
    logits = learner.logits(target.images)
    val = prepared.parts.get("val") if eval_name != "val" else None
    val_logits = learner.logits(val.images) if val is not None else None
    extra = learner.report_extra()
    notes = list(extra.pop("notes"))
    if eval_name != "test":
        notes.append(f"No test split: the figures below are on the {eval_name} split, "
                     f"which {'took part in training' if eval_name == 'train' else 'was used to choose the model'}.")
    if eval_name == "train":  # said where it is seen, not only in the report: a bundle is made all the same
        asked = {"val", "test"} <= set(parts_not_asked_for(prepared.split.info.get("ratios")))
        why, advice = (("the split's ratios give them none", "give them a share (e.g. ratios 0.8,0.1,0.1)") if asked
                       else (f"too few images, or subjects and cases, to split: {sum(prepared.split.sizes().values())} "
                             f"images in {count_groups(prepared.split)} split group(s), {GROUP_MEANING}, each kept "
                             f"in one part", "add images of more cases"))
        say(f"[yellow]warning:[/yellow] no validation or test images ({why}): the figures below are the training "
            f"images' own and say nothing of new images, and the bundle is not calibrated; {advice}, or evaluate "
            f"it on images it never saw")
    few = len(target.targets) < FEW_IMAGES
    if few:
        notes.append(f"The {eval_name} figures are on {len(target.targets)} image(s): too few to say how the model "
                     f"does on new images.")
    if init_overlap and init_overlap["note"]:
        notes.append(f"{'Warning: ' if init_overlap['parts'] else ''}{init_overlap['note']}.")
    skipped = prepared.skipped()
    if skipped:
        notes.append(f"{len(skipped)} unreadable image(s) were skipped: "
                     + "; ".join(f"{s['path']} ({s['error']})" for s in skipped[:10]))
    extra.update({
        "evaluated_on": eval_name,
        "split_sizes": prepared.split.sizes(),
        "split_file": str(prepared.split_file),
        "split_info": {k: v for k, v in prepared.split.info.items() if k != "groups"},
        "skipped_images": skipped,
        "best_epoch": result.best_epoch,
        "stopped_because": result.stopped_because,
        "train_minutes": result.train_seconds / 60,
        "images_per_second": learner.images_per_second(target.images),
        "history": result.history,
    })
    if init_overlap is not None:
        extra["init_training_overlap"] = init_overlap
    metrics = evaluate_logits(
        np.asarray(target.targets),
        logits,
        prepared.classes,
        run_dir,
        val_logits=val_logits,
        val_true=np.asarray(val.targets) if val is not None else None,
        history=result.history if len(result.history) > 1 else None,  # one point is no curve
        config=config.to_dict(),
        title=f"{run_name(config)}: {config.model.name}",
        notes=notes,
        extra=extra,
    )
    known = (init_overlap or {}).get("parts", {}).get(eval_name)
    seen = f"; not new to {escape(init_overlap['bundle'])}: see the warning above" if known else ""
    small = f": too few (under {FEW_IMAGES}) for the score to say much" if few else ""
    say(f"{eval_name} accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro']['f1']:.4f} "
        f"({metrics['n']} image{'' if metrics['n'] == 1 else 's'}{small}{seen}); report: {run_dir / 'report.html'}")
    if called_absent_note(metrics):
        log.warning("%s", called_absent_note(metrics))
    if metrics.get("one_class_called") is not None:  # its accuracy and ROC-AUC above read like a working model's
        say(f"[yellow]warning:[/yellow] {escape(collapsed_note('the model', metrics['one_class_called']))}")
    (run_dir / "history.json").write_text(json.dumps(result.history, indent=1))
    return metrics


# --------------------------------------------------------------------------- evaluate a bundle
def training_overlap(info: BundleInfo, manifest: Manifest,
                     directory: Path | None = None) -> tuple[dict[str, int], str | None]:
    """How many images of ``manifest`` the bundle trained or chose its epoch on, per part (``train``,
    ``val``; ``train sources``, ``val sources``: the images its training crops were cut from), and a note
    when nothing can be checked. By content where its folder (``directory``) records the digests
    (:mod:`leukoscope.data.fingerprints`: copies and renamed files too), and by path in its recorded split
    where that can be read; a part counts the larger of the two."""
    records = read_training_digests(directory) if directory is not None else None
    overlap = digest_overlap(records, [s.path for s in manifest]) if records else {}
    by_path, note = _split_overlap(info, manifest)
    for part, n in by_path.items():
        overlap[part] = max(overlap.get(part, 0), n)
    return overlap, None if records else note


#: The parts of a run checked against what the bundle it starts from (``model.init``) learned: those it is scored on.
SCORED_PARTS = ("val", "test")


def init_training_overlap(init: str, split: Split) -> dict[str, Any]:
    """What of a run's val and test parts the bundle it starts from (``init``) learned from, by
    :func:`training_overlap` as `evaluate` checks it, as metrics.json keeps it: ``bundle``, ``parts`` (part ->
    overlap; parts with none left out) and ``note`` (the warning when any, or why nothing could be checked).
    Fine-tuning on data that a shipped model learned from is legitimate; a score on those images is not one of
    new images (the new bundle inherits the record: `evaluate` refuses them)."""
    directory = resolve_bundle(init)
    info = read_bundle_info(directory, task="classify")
    parts: dict[str, dict[str, int]] = {}
    unknown = None
    for part in SCORED_PARTS:
        samples = split.assignments.get(part) or []
        if samples:
            overlap, unknown = training_overlap(info, Manifest(list(samples), list(split.classes)), directory)
            if overlap:
                parts[part] = overlap
    note = (f"{init}, which this run starts from, cannot be checked for images of this run's val and test parts "
            f"({unknown})" if unknown else None)
    if parts:
        where = " and ".join(f"{part} part ({describe_overlap(overlap)})" for part, overlap in parts.items())
        scored = "test" if split.assignments.get("test") else "val"
        harm = (f"this run's {scored} score is not one of new images (`leukoscope evaluate` refuses such images)"
                if scored in parts else "this run's epoch and temperature are chosen on images the starting model knew")
        note = (f"{init}, which this run starts from, was trained (or chose its epoch) on images of this run's "
                f"{where}: {harm}")
    return {"bundle": init, "parts": parts, "note": note}


def _split_overlap(info: BundleInfo, manifest: Manifest) -> tuple[dict[str, int], str | None]:
    """:func:`training_overlap` by the paths of the bundle's recorded split."""
    split_file = info.split_file
    if split_file is None:
        return {}, "the bundle records no training split: the data may include images it was trained on"
    if not split_file.is_file():
        return {}, f"the bundle's training split {split_file} is gone: the data may include its training images"
    try:
        split = Split.load(split_file, data_root=manifest.root)  # a copy of its training data moved elsewhere too
    except DatasetError as exc:
        return {}, f"the bundle's training split cannot be read ({exc}): the data may include its training images"
    paths = {s.path.resolve() for s in manifest}
    overlap = {part: sum(1 for s in samples if Path(s.path).resolve() in paths)
               for part, samples in split.assignments.items() if part != "test"}
    return {part: n for part, n in overlap.items() if n}, None


def evaluate_bundle(
    bundle: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    split_file: str | Path | None = None,
    subset: str = "test",
    on_corrupt: str = "skip",
    device: str = "cpu",
    allow_training_data: bool = False,
    show_progress: bool = True,
    backend: str = "torch",
    threads: int | None = None,
    frame: bool = False,
    um_per_px: float | None = None,
    as_trained: bool = True,
) -> dict:
    """Write metrics.json, figures, report.html and scored_images.csv for a classifier ``bundle`` on ``data`` into
    ``out_dir``; ``backend`` runs the network (:func:`leukoscope.inference.runtime.load_runtime`). Each image is
    checked as ``predict`` checks it (OOD score, warnings: :mod:`leukoscope.tasks.image_checks`).

    ``frame``: each image is a single-cell image framed as ``leukoscope predict`` frames it for a classifier
    of a physical window (:func:`leukoscope.cell_window.frame_single_cell`: at ``um_per_px``, else the scale a
    TIFF's resolution tags record, else each image's own scale, else the images' scale together); without it,
    or for a classifier without a window, images are scored as they are (crops already cut at the window, as
    training's). The metrics' ``framing`` says how many were framed, at which scales, and how many were scored
    whole.

    ``as_trained``: the data's labels are mapped by the ``data.class_map`` the bundle's run was trained with,
    and images of classes its ``data.classes`` left out are left out (:func:`labels_as_trained`), as training
    read its own data; without it the labels are scored as written.

    Refuses (unless ``allow_training_data``) data that overlaps the bundle's own
    training or validation part: such a score says nothing about new images.
    ``backend``: what runs the network (:mod:`leukoscope.inference.runtime`; an exported
    bundle's graph on onnxruntime or OpenVINO, e.g. to score its int8 version).
    """
    # the classifier predict runs: its OOD statistics (an int8 graph's thresholds), light and centre checks
    directory = resolve_bundle(bundle)
    classifier = CellClassifier.from_bundle(directory, device, backend=backend, threads=threads)
    info, runtime = classifier.info, classifier.runtime
    manifest = read_dataset(data, require_labels=True, check_files=True)
    if split_file is not None:
        part = Split.load(split_file, data_root=manifest.root).manifest(subset)
        wanted = {s.path.resolve() for s in part}
        manifest = manifest.filter([s.path.resolve() in wanted for s in manifest])
        if len(manifest) == 0:
            raise DatasetError(f"no image of {data} is in the {subset!r} part of {split_file}")
    relabelled: list[str] = []
    if as_trained:  # a bundle trained on Early/Pre/Pro mapped to Malignant knows no label of its own data
        manifest, relabelled = labels_as_trained(manifest, info, data)
        for line in relabelled:
            say(f"note: {escape(line)}")
    manifest = manifest.with_classes(info.classes)  # fails clearly on classes the model does not know
    manifest.targets  # noqa: B018 - a row without a label fails now, not after every image is scored
    # copies under two labels: one of each pair is scored against a wrong label (split and train say so too)
    warn_of_copies_labelled_otherwise(manifest, [_digest_or_path(sample.path) for sample in manifest])
    overlap, unknown = training_overlap(info, manifest, directory)
    notes = [f"Bundle {Path(bundle).resolve()} scored on {Path(data).resolve()}"
             + (f" ({subset} part of {split_file})" if split_file else "") + "."]
    notes.extend(f"{line[:1].upper()}{line[1:]}." for line in relabelled)
    if unknown:
        log.warning(unknown)
        notes.append(f"Warning: {unknown}.")
    if overlap:
        message = f"{data} holds {describe_overlap(overlap)}: a score on them says nothing about new images"
        if not allow_training_data:
            own = any(not part.endswith(SOURCES_SUFFIX) for part in overlap)
            # the remedy for what was asked: a non-test part of the split already given wants --subset test
            # the bundle's split (its recorded file, or the run folder's copy of it), not another dataset's
            own_split = (split_file is not None and info.split_file is not None and info.split_file.is_file()
                         and Path(split_file).read_bytes() == info.split_file.read_bytes())
            if own_split and subset != "test":
                advice = f"its test part is scored with --subset test (the {subset!r} part is its training's), or "
            elif own and info.split_file is not None and info.split_file.is_file():
                advice = f"evaluate its test part with --split-file {info.split_file}, or "
            else:
                advice = ""
            raise DatasetError(f"{message}; {advice}pass --allow-training-data to score them anyway")
        log.warning(message)
        notes.append(f"Warning: {message}.")
    preprocessing = info.preprocessing
    checks = ImageChecks(classifier)
    framed = None
    to_pixels: Callable[..., Any] = partial(_checked_pixels, preprocessing, checks)
    if frame and preprocessing.cell_window_um is not None:
        to_pixels, framed = _framed_pixels(preprocessing, manifest, um_per_px, checks)
    with progress_bar(len(manifest), "decoding", enabled=show_progress) as update:
        pixels, kept, report = decode_manifest(manifest, to_pixels, on_corrupt=on_corrupt,
                                               progress=counter_callback(update), skip_with="--on-corrupt skip",
                                               with_path=framed is not None)
    framing = framed.summary() if framed is not None else None
    if framing is not None:
        notes.append(framing["note"])
        if framing["whole"]:
            log.warning(framing["note"])
    ood = classifier.ood
    # an exported graph without an embedding output cannot give a Mahalanobis score: none rather than a made-up one
    scorable = ood is not None and (not ood.needs_embeddings or getattr(runtime, "has_embeddings", True))
    unscored_because = NO_OOD_STATISTICS
    if ood is not None and not scorable:
        unscored_because = no_embedding_output(runtime.backend)
        log.warning(unscored_because)
    raw, embeddings = _scored(runtime, pixels, show_progress, embeddings=scorable and ood.needs_embeddings)
    ood_scores = classifier.ood_scores(raw, embeddings) if scorable else None
    logits = raw / info.temperature
    unfamiliar = None if ood_scores is None else ood.unfamiliar(ood_scores)
    image_checks = checks_summary(logits.argmax(axis=1) == np.asarray(kept.targets), checks.warnings, unfamiliar,
                                  ood.threshold if scorable else None, unscored_because)
    notes.append(image_checks["note"])
    if runtime.backend != "torch":
        precision = (info.export or {}).get("precision", "float32")
        notes.append(f"Network run on {runtime.backend} (the bundle's exported {precision} graph).")
    if info.temperature != 1.0:
        notes.append(f"Logits divided by the bundle's temperature {info.temperature:.3f} (fitted on validation).")
    if report.skipped:
        notes.append(f"{len(report.skipped)} unreadable image(s) skipped: "
                     + "; ".join(f"{s['path']} ({s['error']})" for s in report.skipped[:10]))
    metrics = evaluate_logits(
        np.asarray(kept.targets), logits, info.classes, Path(out_dir),
        title=f"{info.model_name} on {Path(data).name}", notes=notes,
        extra={"bundle": str(Path(bundle).resolve()), "data": str(Path(data).resolve()),
               "skipped_images": report.skipped, "training_overlap": overlap, "backend": runtime.backend,
               "framing": framing, "labels_as_trained": relabelled, "image_checks": image_checks},
        applied_temperature=info.temperature,  # the logits above are divided by it: the figure names it
    )
    write_scored_images(Path(out_dir) / SCORED_IMAGES_FILE, kept, logits, info.classes, ood_scores=ood_scores,
                        unfamiliar=unfamiliar, warnings=checks.warnings)
    return metrics


def _digest_or_path(path: Path) -> str:
    """The file's digest; its path when it cannot be read (decoding then says why, and skips it)."""
    try:
        return file_digest(path)
    except OSError:
        return f"unread:{path}"


#: Each scored image's true class, call and probabilities, beside metrics.json: the errors, image by image (not
#: "predictions.csv": predict's file of that name has the call in its ``label`` column).
SCORED_IMAGES_FILE = "scored_images.csv"


def write_scored_images(path: Path, manifest: Manifest, logits: np.ndarray, classes: Sequence[str], *,
                        ood_scores: np.ndarray | None = None, unfamiliar: np.ndarray | None = None,
                        warnings: Sequence[Sequence[str]] | None = None) -> Path:
    """One row per scored image: ``source``, ``true_label``, ``predicted``, ``confidence``, ``correct`` and
    ``p_<class>``, the probabilities the metrics were computed from (a researcher had to run predict again to
    see which images were wrong, and predict frames and thresholds as its own options say), then predict's
    ``ood_score``, ``unfamiliar`` (empty without OOD statistics: not checked is not familiar) and ``warnings``
    (" | " between them)."""
    probs = softmax(logits)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "true_label", "predicted", "confidence", "correct",
                         *(f"p_{c}" for c in classes), "ood_score", "unfamiliar", "warnings"])
        for index, (sample, target, row) in enumerate(zip(manifest.samples, manifest.targets, probs)):
            best = int(row.argmax())
            checked = ["", ""] if ood_scores is None else [round(float(ood_scores[index]), 4),
                                                           bool(unfamiliar[index]) if unfamiliar is not None else ""]
            writer.writerow([str(sample.path), classes[target], classes[best], round(float(row[best]), 6),
                             best == target, *(round(float(p), 6) for p in row), *checked,
                             " | ".join(warnings[index]) if warnings is not None else ""])
    return path


#: Images per progress step while a network scores a dataset (each a few seconds on a CPU with 8 views); a
#: multiple of the network's batch (64), so that chunks make the same batches, and scores, as one call.
SCORE_CHUNK = 256


def _scored(runtime: Any, pixels: np.ndarray, show_progress: bool,
            embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The network's logits of ``pixels`` (and embeddings, when asked), a chunk at a time under a progress bar
    (a large set with test-time views is minutes of work)."""
    if not len(pixels):
        return runtime.outputs(pixels, embeddings=embeddings)
    logits, embedded = [], []
    with progress_bar(len(pixels), "scoring", enabled=show_progress) as update:
        for start in range(0, len(pixels), SCORE_CHUNK):
            chunk = pixels[start:start + SCORE_CHUNK]
            chunk_logits, chunk_embeddings = runtime.outputs(chunk, embeddings=embeddings)
            logits.append(chunk_logits)
            embedded.append(chunk_embeddings)
            update(advance=len(chunk))
    return np.concatenate(logits), np.concatenate(embedded) if embeddings else None


@dataclass
class _Framing:
    """How a run's single-cell images were framed for a classifier's window (one scale per image)."""

    window_um: float
    run_um_per_px: float | None
    scales: list[FieldScale] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        sources = Counter(scale.source for scale in self.scales if scale.known)
        framed, whole = sum(sources.values()), sum(1 for scale in self.scales if not scale.known)
        note = (f"{framed} of {len(self.scales)} images framed on {self.window_um:g} um around their centre "
                f"(scale: {', '.join(f'{n} {source}' for source, n in sorted(sources.items())) or 'none'})")
        if sources.get("run") and self.run_um_per_px is not None:
            note += (f"; {sources['run']} without a scale of their own framed at the images' scale together, "
                     f"{self.run_um_per_px:.4f} um/px")
        if whole:
            note += (f"; {whole} had no scale (too few isolated red cells) and were scored whole, although the "
                     f"classifier expects {self.window_um:g} um around the cell: pass --um-per-px, or --as-given "
                     f"for crops already cut at that window")
        return {"window_um": self.window_um, "framed": framed, "whole": whole, "scale_sources": dict(sources),
                "run_um_per_px": self.run_um_per_px, "note": note + "."}


def _checked_pixels(preprocessing: Preprocessing, checks: ImageChecks, image: Image.Image) -> Any:
    """``preprocessing.pixels`` of an image taken as given, checked as ``predict --as-given`` checks it."""
    checks.record(image)
    return preprocessing.pixels(image)


def _framed_pixels(preprocessing: Preprocessing, manifest: Manifest, um_per_px: float | None,
                   checks: ImageChecks) -> tuple[Callable[[Image.Image, Path], Any], _Framing]:
    """``preprocessing.pixels`` of each image (and its path) framed for the classifier's window, as ``predict``
    frames it (a TIFF's recorded scale before its red cells'), and the record of how; each image's warnings go
    to ``checks``."""
    run = lent_run_scale([sample.path for sample in manifest], um_per_px)
    framing = _Framing(float(preprocessing.cell_window_um), run)

    def to_pixels(image: Image.Image, path: Path):
        recorded = recorded_um_per_px(path) if um_per_px is None else None
        framed, scale = frame_single_cell(image, framing.window_um, um_per_px, run_um_per_px=run,
                                          recorded_um_per_px=recorded)
        framing.scales.append(scale)
        checks.record(image, scale, framed)
        return preprocessing.pixels(framed)

    return to_pixels, framing
