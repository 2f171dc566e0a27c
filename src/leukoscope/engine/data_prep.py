"""From a data config to decoded train/val/test tensors, via a saved, checked split."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leukoscope.data.dataset import LoadReport
from leukoscope.data.manifest import DatasetError, Manifest, Sample
from leukoscope.data.readers import check_spellings, read_dataset, refuse_uncertain_class
from leukoscope.data.splits import (Split, check_split, check_training_part, configured_split, make_split,
                                     split_matching)
from leukoscope.engine.config import DataConfig
from leukoscope.preprocessing import Preprocessing
from leukoscope.progress import counter_callback, name_some, progress_bar, say

log = logging.getLogger(__name__)


@dataclass
class DecodedSplit:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    targets: list[int]
    manifest: Manifest


@dataclass
class PreparedData:
    classes: list[str]
    split: Split
    split_file: Path
    parts: dict[str, DecodedSplit]
    load_reports: dict[str, LoadReport] = field(default_factory=dict)
    decoded_as: tuple[Any, ...] | None = None
    """:meth:`Preprocessing.decoded_as` of the preprocessing the parts were decoded with."""
    said: set[str] = field(default_factory=set)
    """Warnings about these data already said: `search` and `compare` train many runs on one preparation."""
    training_centres: dict[str, int] | None = None
    """:func:`leukoscope.tasks.classify.training_centres` of these data once read (each run of a search would
    decode the same 300 images again)."""

    def skipped(self) -> list[dict[str, str]]:
        return [item for report in self.load_reports.values() for item in report.skipped]

    def decoded_counts(self) -> dict[str, dict[str, int]]:
        """For each part, how many images of each class were decoded (undecodable files are skipped)."""
        return {name: part.manifest.class_counts() for name, part in self.parts.items()}


def load_manifest(data: DataConfig) -> Manifest:
    """Read the dataset and apply ``class_map`` / ``classes``."""
    if not data.path:
        raise DatasetError("no dataset given: set data.path (a class-folder tree or a CSV manifest)")
    manifest = read_dataset(data.path, require_labels=True, check_files=True)
    samples = list(manifest.samples)
    if data.class_map:
        unknown = sorted(set(data.class_map) - set(manifest.classes))
        if unknown:
            raise DatasetError(f"data.class_map names classes {unknown} not in the data (found {manifest.classes})")
        samples = [Sample(s.path, data.class_map.get(s.label, s.label), s.subject) for s in samples]
    classes = sorted({s.label for s in samples if s.label is not None})
    if data.classes:
        missing = sorted(set(data.classes) - set(classes))
        if missing:
            raise DatasetError(f"data.classes names {missing}, which have no images (found {classes})")
        samples = [s for s in samples if s.label in data.classes]
        classes = list(data.classes)
    # the classes it will learn (after class_map and data.classes)
    check_spellings(data.path, classes, "give them one spelling, or map one to the other with data.class_map")
    refuse_uncertain_class(data.path, classes)
    result = Manifest(samples, classes, manifest.root)
    result.require_trainable()
    return result


def default_split_file(data: DataConfig, output_root: Path, manifest: Manifest) -> Path:
    """One split file per dataset and split settings, shared by every run on it."""
    settings = {
        "path": str(Path(data.path).resolve()) if data.path else None,
        "classes": manifest.classes,
        "class_map": data.class_map,
        "ratios": data.ratios,
        "seed": data.split_seed,
        "near_duplicates": data.near_duplicates,
        "phash_distance": data.phash_distance,
    }
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = Path(data.path).stem if data.path else "data"
    return output_root / "splits" / f"{name}-{key}.json"


def split_settings(split: Split) -> dict[str, Any]:
    """The ``data.ratios`` / ``data.split_seed`` a split was made with, those its file records (a hand-made
    split may record neither)."""
    settings: dict[str, Any] = {}
    ratios, seed = split.info.get("ratios"), split.info.get("seed")
    if isinstance(ratios, list) and len(ratios) in (2, 3) and all(isinstance(r, (int, float)) for r in ratios):
        settings["ratios"] = [float(r) for r in ratios]
    if isinstance(seed, int) and not isinstance(seed, bool):
        settings["split_seed"] = seed
    return settings


def as_split(data: DataConfig, split: Split) -> DataConfig:
    """``data`` with the ratios and seed ``split`` was made with: what a run records in its config.yaml and
    bundle (an existing split file decides the parts, whatever ratios the config asked for)."""
    settings = {key: value for key, value in split_settings(split).items() if getattr(data, key) != value}
    return data.model_copy(update=settings) if settings else data


def _warn_of_other_settings(data: DataConfig, split: Split, split_file: Path) -> None:
    """Ratios or a seed set in the config or on the command line that the reused split was not made with
    would be silently ignored (the run's config.yaml recorded them, the split had others)."""
    differ = [f"data.{key}={getattr(data, key)} (the split's: {value})"
              for key, value in split_settings(split).items()
              if key in data.model_fields_set and getattr(data, key) != value]
    if differ:
        log.warning("%s was made with other settings than %s: its parts are used as they are, and the run "
                    "records the split's; to split by the settings given, make a new split file (`leukoscope "
                    "split --ratios ... --seed ...`, or another --split-file)", split_file, " and ".join(differ))


def _as_configured(split: Split, data: DataConfig, manifest: Manifest) -> Split:
    """The saved ``split`` as it is when it describes the run's data (the run's own); else, with data.class_map
    and data.classes set, that split of the data as they are (`leukoscope split`) seen through them: it was
    refused as "relabelled; make a new split or restore the data", though nothing had changed."""
    try:
        split_matching(split, manifest)
        return split
    except DatasetError:
        if not (data.class_map or data.classes):
            return split  # the caller's check says what differs
    configured = configured_split(split, data.class_map, data.classes)
    if set(configured.classes) == set(manifest.classes):
        configured.classes = list(manifest.classes)  # the data's order (data.classes may give another)
    try:
        split_matching(configured, manifest)
    except DatasetError:
        return split  # not a split of these data either: the caller's check says what differs
    say(f"[dim]the split's classes {split.classes} seen through data.class_map / data.classes: "
        f"{configured.classes}[/dim]")
    return configured


def obtain_split(data: DataConfig, manifest: Manifest, split_file: Path, *, show_progress: bool = True,
                 resume: bool = False) -> Split:
    """Reuse ``split_file`` when it exists (after checking it still fits the data), else make and save it.
    ``resume``: ``split_file`` is the split of a run being resumed, which must go on with it."""
    if split_file.exists():
        split = _as_configured(Split.load(split_file, data_root=manifest.root), data, manifest)
        try:
            split_matching(split, manifest)
        except DatasetError as exc:
            raise DatasetError(f"{exc} ({_remedy(split_file, resume)})") from None
        check_split(split)
        if split.classes != manifest.classes:
            raise DatasetError(f"{split_file}: split classes {split.classes} differ from the data's {manifest.classes}")
        check_training_part(split, split_file)  # a hand-made or edited file: a class may have lost its images
        say(f"[dim]reusing split {split_file}[/dim]")
        _warn_of_other_settings(data, split, split_file)
        return split
    with progress_bar(len(manifest), "hashing images for duplicates", enabled=show_progress) as update:
        split = make_split(
            manifest,
            ratios=data.ratios,
            seed=data.split_seed,
            near_duplicates=data.near_duplicates,
            max_distance=data.phash_distance,
            progress=counter_callback(update),
        )
    check_training_part(split, data.path)  # before it is saved: the next run would reuse it
    split.info["dataset"] = str(Path(data.path).resolve()) if data.path else None
    split.save(split_file)
    say(f"[dim]saved split {split_file} {split.sizes()}[/dim]")
    return split


def _remedy(split_file: Path, resume: bool) -> str:
    """What to do about a saved split that no longer fits the data."""
    if resume:  # a new split would test the checkpoint on images it trained on
        return (f"the split is {split_file}, which this run trained on and a resumed run continues on: restore "
                f"the data it was made from, or start a new run")
    # the file to delete, by name: training made it, the user never named it
    return f"the split is {split_file}: delete it and the next run makes a new one"


def prepare_data(
    data: DataConfig, preprocessing: Preprocessing, output_root: Path, *, show_progress: bool = True,
    resume: bool = False,
) -> PreparedData:
    """The saved split of ``data`` and every part decoded once through ``preprocessing`` (the bundle's);
    ``resume``: ``data.split_file`` is a resumed run's own split (:func:`obtain_split`)."""
    manifest = load_manifest(data)
    split_file = Path(data.split_file) if data.split_file else default_split_file(data, output_root, manifest)
    split = obtain_split(data, manifest, split_file, show_progress=show_progress, resume=resume)
    parts: dict[str, DecodedSplit] = {}
    reports: dict[str, LoadReport] = {}
    for name in split.assignments:
        part = split.manifest(name)
        if len(part) == 0:
            continue
        with progress_bar(len(part), f"decoding {name}", enabled=show_progress) as update:
            images, kept, report = preprocessing.decode(
                part, on_corrupt=data.on_corrupt, max_pixels=data.max_pixels, progress=counter_callback(update))
        parts[name] = DecodedSplit(images, kept.targets, kept)
        reports[name] = report
    if "train" not in parts:  # every training image unreadable (the split's own are checked when it is read)
        raise DatasetError(f"{split_file}: none of the training images could be read")
    refuse_undecoded_classes(split, parts["train"], reports["train"], data.path or split_file)
    return PreparedData(list(manifest.classes), split, split_file, parts, reports, preprocessing.decoded_as())


def refuse_undecoded_classes(split: Split, train: DecodedSplit, report: LoadReport, source: str | Path) -> None:
    """Refuse a class none of whose training images could be decoded: the split gives it some (so the split's
    own check passed), yet the model would have an output for it that never saw one of its cells."""
    decoded = train.manifest.class_counts()
    empty = [name for name in split.classes if not decoded.get(name)]
    if not empty:
        return
    label_of = {str(sample.path): sample.label for sample in split.assignments.get("train", [])}
    files: dict[str, list[str]] = {name: [] for name in empty}
    for item in report.skipped:
        files.get(label_of.get(item["path"]), []).append(Path(item["path"]).name)
    unreadable = ", ".join(f"{name!r} (unreadable: {name_some(files[name], 3)})" for name in empty)
    raise DatasetError(f"{source}: class(es) {unreadable} have no training image that can be decoded: a model "
                       f"could not learn them, yet its bundle would list them; replace those files with readable "
                       f"images, or leave the class out (data.classes)")
