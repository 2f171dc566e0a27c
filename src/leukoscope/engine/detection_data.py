"""Detection data: a Pascal VOC folder cut into train / val / test, as torch samples
and as ground truth for scoring; batched prediction over annotated images."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from leukoscope.data.annotations import (AnnotatedImage, AnnotationIssue, DetectionDataset, SplitRequired,
                                         issues_note, unannotated_note)
from leukoscope.data.box_augment import DetectionAugment
from leukoscope.data.duplicates import duplicate_groups
from leukoscope.data.manifest import DatasetError
from leukoscope.data.voc import read_voc_dataset
from leukoscope.engine.config import ConfigError
from leukoscope.engine.detection_config import DetectionDataConfig
from leukoscope.evaluation.detection import GroundTruth, Predicted
from leukoscope.inference.detector import CellDetector
from leukoscope.io import load_image
from leukoscope.progress import name_some, progress_bar


@dataclass
class DetectionSplits:
    parts: dict[str, DetectionDataset]
    classes: list[str]
    notes: list[str] = field(default_factory=list)
    issues: list[AnnotationIssue] = field(default_factory=list)
    """Every annotation problem skipped while reading (the notes show the first few)."""
    unannotated: list[Path] = field(default_factory=list)
    """Images left out because no annotation file names them."""

    def describe(self) -> dict[str, Any]:
        return {name: [str(image.image_path) for image in part] for name, part in self.parts.items()}


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def prepare_detection_data(cfg: DetectionDataConfig) -> DetectionSplits:
    """Read the VOC folder and cut it into train / val / test as ``cfg`` says."""
    if not cfg.path:
        raise ConfigError("data.path is not set (a Pascal VOC folder)")
    read = dict(classes=cfg.classes, aliases=cfg.aliases, ignore_classes=cfg.ignore_classes, on_error=cfg.on_error)
    notes: list[str] = []
    if cfg.train is None:
        try:
            whole = read_voc_dataset(cfg.path, None, **read)
        except SplitRequired as exc:  # the reader cannot know the settings that name the splits
            raise ConfigError(f"{exc.root} has the splits {', '.join(exc.splits)}: name the ones to use, e.g. "
                              f"{split_settings(exc)}") from None
        classes = cfg.classes or whole.classes
        ratios = list(cfg.ratios) + [0.0] * (3 - len(cfg.ratios))
        dealt = _deal_fields(whole, ratios, cfg.split_seed)
        parts = {name: whole.subset(dealt[name]) for name in ("train", "val", "test") if dealt[name]}
        issues, unannotated = whole.issues, whole.unannotated
    else:
        train = read_voc_dataset(cfg.path, cfg.train, **read)
        classes = cfg.classes or train.classes
        read["classes"] = classes
        parts = {"train": train}
        for name, split in (("val", cfg.val), ("test", cfg.test)):
            if split is not None:
                parts[name] = read_voc_dataset(cfg.path, split, **read)
        issues = [issue for part in parts.values() for issue in part.issues]
        unannotated = [path for part in parts.values() for path in part.unannotated]
    for part in parts.values():
        part.classes = list(classes)
    if "train" not in parts:
        raise DatasetError(f"{cfg.path}: no training image")
    # Honest evaluation: an image may not be both trained on and tested on.
    train_digests = {_digest(image.image_path) for image in parts["train"]}
    for name in ("val", "test"):
        if name in parts:
            shared = sum(_digest(image.image_path) in train_digests for image in parts[name])
            if shared and name == "test":
                raise DatasetError(f"{shared} test image(s) are byte-identical to training images; "
                                   f"choose disjoint splits")
            if shared:
                notes.append(f"{shared} of {len(parts[name])} validation images are byte-identical to training "
                             f"images (CBC's Validation is a copy of part of Training): validation scores are "
                             f"optimistic and only used to pick the epoch and threshold.")
    if cfg.train is not None and "test" in parts:  # the user's own parts: near copies are said, not refused
        near = _near_copies(parts["test"], parts["train"])
        if near:
            notes.append(f"{len(near)} of {len(parts['test'])} test images are near copies of training images "
                         f"(re-encoded, resized or turned: {name_some(near)}): test scores are optimistic.")
    if unannotated:
        notes.append(unannotated_note(unannotated))
    if issues:
        notes.append(issues_note(issues))
    return DetectionSplits(parts, list(classes), notes, list(issues), list(unannotated))


def split_settings(exc: SplitRequired) -> str:
    """The ``data.train=... data.test=...`` settings that name the splits of ``exc``'s folder (CBC: Training to
    train on, Testing to test on; Validation to choose the epoch and threshold)."""
    roles = exc.roles()
    if "train" not in roles:
        return f"data.train={exc.splits[0]} (and data.test=... with another)"
    text = " ".join(f"data.{role}={'+'.join(roles[role])}" for role in ("train", "test") if role in roles)
    if "val" in roles:
        text += f" (and data.val={'+'.join(roles['val'])} to choose the epoch and threshold on)"
    return text


def _deal_fields(whole: DetectionDataset, ratios: Sequence[float], seed: int) -> dict[str, list[int]]:
    """Indices of ``whole`` per part, dealt at random (``seed``) in groups of near-identical fields (re-encoded,
    resized or turned copies: :func:`leukoscope.data.duplicates.duplicate_groups`): a copy of a test field in
    training had passed, and its test AP is what lets `analyze` raise a leukemia flag. A folder without copies
    is dealt as a plain permutation of its fields dealt it before (one with copies is dealt anew)."""
    groups = duplicate_groups([image.image_path for image in whole])
    wanted = {"val": int(round(ratios[1] * len(whole))), "test": int(round(ratios[2] * len(whole)))}
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups.tolist()):
        members.setdefault(group, []).append(index)
    dealt: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for group in np.random.default_rng(seed).permutation(np.unique(groups)).tolist():
        part = next((name for name in ("val", "test") if len(dealt[name]) < wanted[name]), "train")
        dealt[part] += members[group]
    return dealt


def _near_copies(test: DetectionDataset, train: DetectionDataset) -> list[str]:
    """Names of the ``test`` fields near-identical to a ``train`` field (pHash, turned copies included)."""
    paths = [image.image_path for image in test] + [image.image_path for image in train]
    groups = duplicate_groups(paths)
    in_train = set(groups[len(test):].tolist())
    return [path.name for path, group in zip(paths[:len(test)], groups[:len(test)]) if group in in_train]


def to_ground_truth(image: AnnotatedImage, classes: Sequence[str]) -> GroundTruth:
    index = {name: k for k, name in enumerate(classes)}
    boxes = np.array([box.as_xyxy() for box in image.boxes if box.label in index], dtype=np.float64).reshape(-1, 4)
    labels = np.array([index[box.label] for box in image.boxes if box.label in index], dtype=np.int64)
    width, height = image.width, image.height
    if width is None or height is None:
        with load_image(image.image_path) as pil:
            width, height = pil.size
    return GroundTruth(boxes, labels, width, height, image.image_path.name)


def image_array(image: AnnotatedImage) -> np.ndarray:
    return np.asarray(load_image(image.image_path))


class DetectionTorchDataset(Dataset):
    """(uint8 image tensor (3, H, W), target dict with 1-based labels) pairs, decoded lazily."""

    def __init__(self, images: Sequence[AnnotatedImage], classes: Sequence[str],
                 augment: DetectionAugment | None = None) -> None:
        self.images = list(images)
        self.index = {name: k for k, name in enumerate(classes)}
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        item = self.images[i]
        pixels = torch.from_numpy(np.array(load_image(item.image_path), dtype=np.uint8)).permute(2, 0, 1).contiguous()
        boxes = torch.tensor([b.as_xyxy() for b in item.boxes if b.label in self.index],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.index[b.label] + 1 for b in item.boxes if b.label in self.index],
                              dtype=torch.int64)
        if self.augment is not None:
            pixels, boxes = self.augment(pixels, boxes)
        return pixels, {"boxes": boxes, "labels": labels}


def collate_detection_batch(batch):
    return tuple(zip(*batch))


def predict_images(detector: CellDetector, images: Sequence[AnnotatedImage], *, batch_size: int = 2,
                   show_progress: bool = False, description: str = "predicting") -> list[Predicted]:
    """Every detection the model keeps (score >= its own score_thresh), for mAP."""
    out: list[Predicted] = []
    with progress_bar(len(images), description, enabled=show_progress) as update:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            results = detector.detect([load_image(image.image_path) for image in chunk], threshold=0.0,
                                      batch_size=batch_size)
            out += [Predicted(r.boxes, r.scores, r.labels) for r in results]
            update(advance=len(chunk))
    return out


def measure_seconds_per_image(detector: CellDetector, image: AnnotatedImage, repeats: int = 5) -> float:
    """Median wall-clock seconds to detect in one image (after a warm-up)."""
    pil = load_image(image.image_path)
    detector.detect([pil])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        detector.detect([pil])
        times.append(time.perf_counter() - start)
    return float(np.median(times))
