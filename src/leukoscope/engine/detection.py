"""Detector training: config, data, training loop, evaluation and bundle.

Run directory layout (as for classification)::

    runs/<name>-<timestamp>/
      config.yaml      the resolved config
      split.json       which images were used for train / val / test
      checkpoint.pt    last epoch, for --resume
      bundle/          the trained detector (bundle.json says task: detection)
      metrics.json, figures/, report.html
      train.log

The config is its own YAML schema (sections ``data``, ``model``, ``train``,
``predict``), validated like the classification one: unknown keys fail with
the closest valid key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader, Dataset

from leukoscope.data.annotations import AnnotatedImage, DetectionDataset, read_voc_dataset
from leukoscope.data.box_augment import DETECTION_AUGMENTATIONS, DetectionAugment, detection_augmentation
from leukoscope.data.manifest import DatasetError
from leukoscope.engine.config import ConfigError, build_config, read_config_file, save_config
from leukoscope.engine.experiment import new_run_dir
from leukoscope.engine.trainer import TrainingClock, resolve_device, seed_everything
from leukoscope.evaluation.detection import (
    GroundTruth,
    Predicted,
    choose_threshold,
    coco_metrics,
    evaluate_detections,
)
from leukoscope.inference.detector import CellDetector, DetectorBundleInfo, save_detector_bundle
from leukoscope.io import load_image
from leukoscope.models import create_model, model_entry
from leukoscope.progress import console, progress_bar

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


# --------------------------------------------------------------------------- config
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DetectionDataConfig(_Section):
    path: str | None = None
    """A Pascal VOC folder (bccd, cbc or flat layout)."""
    train: str | list[str] | None = None
    """Split(s) to train on, e.g. ``Training+Validation`` or ``trainval``; None: the whole folder, cut by ``ratios``."""
    val: str | list[str] | None = None
    """Split(s) to choose the best epoch and the score threshold on; None: no validation (keep the last epoch)."""
    test: str | list[str] | None = None
    """Split(s) the final metrics are computed on."""
    ratios: list[float] = Field(default_factory=lambda: [0.8, 0.1, 0.1])
    """train/val/test shares when ``train`` is None (folders without splits)."""
    split_seed: int = 0
    classes: list[str] | None = None
    """Object classes, in order; default: every name found in the training annotations."""
    aliases: dict[str, str] = Field(default_factory=dict)
    """Other spellings of class names, e.g. ``{Platelet: Platelets}``."""
    on_error: Literal["skip", "fail"] = "skip"
    """Bad objects/files (unknown class, box outside the image...): skip and report, or stop."""


class DetectorModelConfig(_Section):
    name: str = "fasterrcnn_mobilenet_v3_fpn"
    weights: str | None = None
    """A local state dict of the whole detector to start from."""
    backbone_weights: str | None = None
    """Classifier weights for the backbone (for fasterrcnn_abas: an abas_cnn bundle folder or its model.safetensors)."""
    freeze_backbone: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    """Builder options: input_scale, anchor_sizes, score_thresh, detections_per_img, ..."""


class DetectionTrainConfig(_Section):
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    epochs: int = 30
    batch_size: int = 4
    scheduler: Literal["none", "cosine"] = "cosine"
    warmup_iters: int = 50
    grad_clip: float | None = 10.0
    augmentation: str = "default"
    monitor: Literal["val_map", "val_map_50"] = "val_map_50"
    eval_every: int = 1
    max_minutes: float | None = Field(None, gt=0)
    """Stop after this many minutes (checked after every batch); the best weights so far are kept.
    The cosine schedule follows this budget when it ends before the epochs do."""
    max_images_per_epoch: int | None = None
    """Use a random subset of the training images each epoch (quick runs)."""
    seed: int = 0
    device: str = "auto"
    threads: int | None = None

    @field_validator("augmentation")
    @classmethod
    def _preset(cls, value: str) -> str:
        if value not in DETECTION_AUGMENTATIONS:
            raise ValueError(f"unknown detection augmentation {value!r}; choose from {list(DETECTION_AUGMENTATIONS)}")
        return value

    @field_validator("epochs", "batch_size", "eval_every")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


class DetectionPredictConfig(_Section):
    score_threshold: float = 0.5
    """Operating threshold: detections below it are not counted."""
    choose_threshold: bool = True
    """With a validation split, replace ``score_threshold`` by the one with the best mean F1 there."""


class DetectionExperimentConfig(_Section):
    task: Literal["detection"] = "detection"
    name: str = "detector"
    description: str = ""
    output_root: str = "runs"
    data: DetectionDataConfig = Field(default_factory=DetectionDataConfig)
    model: DetectorModelConfig = Field(default_factory=DetectorModelConfig)
    train: DetectionTrainConfig = Field(default_factory=DetectionTrainConfig)
    predict: DetectionPredictConfig = Field(default_factory=DetectionPredictConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_detection_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DetectionExperimentConfig:
    """Read a detection YAML (or the defaults) and apply ``key=value`` overrides.

    Relative ``data.path``, ``model.weights`` and ``model.backbone_weights`` are
    resolved against the file's folder.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_config_file(path, [("data", "path"), ("model", "weights"), ("model", "backbone_weights")])
    return build_config(DetectionExperimentConfig, raw, overrides, str(path) if path is not None else "defaults")


def is_detection_config(path: str | Path) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and raw.get("task") == "detection"


# --------------------------------------------------------------------------- data
@dataclass
class DetectionSplits:
    parts: dict[str, DetectionDataset]
    classes: list[str]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {name: [str(image.image_path) for image in part] for name, part in self.parts.items()}


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def prepare_detection_data(cfg: DetectionDataConfig) -> DetectionSplits:
    """Read the VOC folder and cut it into train / val / test as ``cfg`` says."""
    if not cfg.path:
        raise ConfigError("data.path is not set (a Pascal VOC folder)")
    read = dict(classes=cfg.classes, aliases=cfg.aliases, on_error=cfg.on_error)
    notes: list[str] = []
    if cfg.train is None:
        whole = read_voc_dataset(cfg.path, None, **read)
        classes = cfg.classes or whole.classes
        rng = np.random.default_rng(cfg.split_seed)
        order = rng.permutation(len(whole))
        ratios = list(cfg.ratios) + [0.0] * (3 - len(cfg.ratios))
        n_val = int(round(ratios[1] * len(whole)))
        n_test = int(round(ratios[2] * len(whole)))
        parts = {"train": whole.subset(order[n_val + n_test:]), "val": whole.subset(order[:n_val]),
                 "test": whole.subset(order[n_val:n_val + n_test])}
        parts = {k: v for k, v in parts.items() if len(v)}
        issues = whole.issues
    else:
        train = read_voc_dataset(cfg.path, cfg.train, **read)
        classes = cfg.classes or train.classes
        read["classes"] = classes
        parts = {"train": train}
        for name, split in (("val", cfg.val), ("test", cfg.test)):
            if split is not None:
                parts[name] = read_voc_dataset(cfg.path, split, **read)
        issues = [issue for part in parts.values() for issue in part.issues]
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
    if issues:
        notes.append(f"{len(issues)} annotation problem(s) skipped: " + "; ".join(str(i) for i in issues[:5])
                     + (" ..." if len(issues) > 5 else ""))
    return DetectionSplits(parts, list(classes), notes)


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


def _collate(batch):
    return tuple(zip(*batch))


# --------------------------------------------------------------------------- prediction helpers
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


# --------------------------------------------------------------------------- training loop
@dataclass
class DetectionFitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_score: float | None
    train_seconds: float
    stopped_because: str


def _optimizer(model: torch.nn.Module, cfg: DetectionTrainConfig) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_lambda(cfg: DetectionTrainConfig, clock: TrainingClock):
    """Linear warm-up over the first steps, then cosine decay to 2% following the
    clock's fraction of training done (steps, or the time budget if it ends first)."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters > 0 else 1.0
        if cfg.scheduler == "cosine":
            return warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * clock.fraction())))
        return warm

    return factor


def fit_detector(
    model: torch.nn.Module,
    splits: DetectionSplits,
    cfg: DetectionTrainConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> DetectionFitResult:
    """Train in place; keeps the best weights by validation mAP (the last ones without validation)."""
    generator = seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model.to(device)
    classes = splits.classes
    train_images = list(splits.parts["train"])
    val_images = list(splits.parts["val"]) if "val" in splits.parts else []
    val_truth = [to_ground_truth(image, classes) for image in val_images]
    dataset = DetectionTorchDataset(train_images, classes, detection_augmentation(cfg.augmentation))
    per_epoch = min(len(dataset), cfg.max_images_per_epoch or len(dataset))
    steps_per_epoch = max(1, math.ceil(per_epoch / cfg.batch_size))
    optimizer = _optimizer(model, cfg)
    clock = TrainingClock(cfg.epochs * steps_per_epoch, cfg.max_minutes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, clock))

    history: list[dict[str, Any]] = []
    best_score: float | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] = {}
    start_epoch, elapsed_before = 1, 0.0
    checkpoint_path = run_dir / CHECKPOINT_FILE if run_dir else None
    if resume:
        if checkpoint_path is None or not checkpoint_path.exists():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT_FILE} in {run_dir}")
        # on the CPU: the random-number states must stay CPU tensors (load_state_dict moves the rest)
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best_score, best_epoch = state["history"], state["best_score"], state["best_epoch"]
        best_state = state["best_state"]
        start_epoch, elapsed_before = state["epoch"] + 1, state["elapsed"]
        console.print(f"resuming at epoch {start_epoch} (best so far {best_score} at epoch {best_epoch})")

    clock.resume_from(elapsed_before, scheduler.last_epoch)  # steps really taken (an epoch may be partial)
    stopped_because = "completed all epochs"
    out_of_time = False
    info = DetectorBundleInfo(model_name="training", classes=list(classes))
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        if per_epoch < len(dataset):
            indices = torch.randperm(len(dataset), generator=generator)[:per_epoch].tolist()
            subset: Dataset = torch.utils.data.Subset(dataset, indices)
        else:
            subset = dataset
        loader = DataLoader(subset, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                            collate_fn=_collate, num_workers=0)
        loss_sum, seen = 0.0, 0
        parts_sum: dict[str, float] = {}
        with progress_bar(len(loader), f"epoch {epoch}/{cfg.epochs}", enabled=show_progress) as update:
            for images, targets in loader:
                inputs = [image.to(device).float() / 255.0 for image in images]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                losses = model(inputs, targets)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training diverged at epoch {epoch} (loss {loss.item()}); lower train.lr (now {cfg.lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                clock.step += 1
                scheduler.step()
                loss_sum += loss.item() * len(images)
                seen += len(images)
                for key, value in losses.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + value.item() * len(images)
                update(info=f"loss {loss_sum / seen:.3f}")
                if clock.budget_s and clock.elapsed_s >= clock.budget_s:
                    out_of_time = True
                    break
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "images": seen,
                               "lr": optimizer.param_groups[0]["lr"]}
        row.update({f"train_{k}": v / max(seen, 1) for k, v in parts_sum.items()})
        evaluate_now = val_images and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs or out_of_time)
        improved = False
        if evaluate_now:
            detector = CellDetector(model, info, device)
            predictions = predict_images(detector, val_images, show_progress=False)
            scores = coco_metrics(predictions, val_truth, classes)
            row["val_map"], row["val_map_50"] = scores["map"], scores["map_50"]
            score = row[cfg.monitor]
            improved = best_score is None or score > best_score
        elif not val_images:
            improved = True  # without validation the last epoch is the one kept
            score = None
        if improved:
            best_score, best_epoch = (score if val_images else None), epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        row["elapsed_s"] = clock.elapsed_s
        history.append(row)
        val_text = f" val mAP {row['val_map']:.4f} mAP@0.5 {row['val_map_50']:.4f}" if "val_map" in row else ""
        console.print(f"epoch {epoch:>3}/{cfg.epochs} loss {row['train_loss']:.3f}{val_text}"
                      f" [{row['elapsed_s'] / 60:.1f} min]{' *' if improved and val_images else ''}")
        if checkpoint_path is not None:
            tmp = checkpoint_path.with_suffix(".tmp")
            torch.save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "history": history, "best_score": best_score,
                "best_epoch": best_epoch, "best_state": best_state, "epoch": epoch, "elapsed": row["elapsed_s"],
            }, tmp)
            tmp.replace(checkpoint_path)
        if out_of_time:
            stopped_because = f"time budget of {cfg.max_minutes} min reached (epoch {epoch} may be partial)"
            break
    if best_state:
        model.load_state_dict(best_state)
    return DetectionFitResult(history, best_epoch, best_score, clock.elapsed_s, stopped_because)


# --------------------------------------------------------------------------- experiment
@dataclass
class DetectionRunResult:
    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]
    fit: DetectionFitResult


def _attach_file_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("leukoscope").addHandler(handler)
    logging.getLogger("leukoscope").setLevel(logging.INFO)
    return handler


def build_detector(config: DetectionExperimentConfig, num_classes: int) -> torch.nn.Module:
    entry = model_entry(config.model.name)
    if entry.kind != "detector":
        raise ConfigError(f"model.name {config.model.name!r} is a {entry.kind}, not a detector")
    options = dict(config.model.options)
    if config.model.weights:
        options["weights"] = config.model.weights
    if config.model.backbone_weights:
        options["backbone_weights"] = config.model.backbone_weights
    if config.model.freeze_backbone:
        options["freeze_backbone"] = True
    try:
        return create_model(config.model.name, num_classes=num_classes, **options)
    except (TypeError, ValueError) as exc:  # unknown or ill-formed options
        raise ConfigError(f"model.options for {config.model.name}: {exc}") from None


def run_detection_experiment(
    config: DetectionExperimentConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> DetectionRunResult:
    """Train, pick the threshold, evaluate on the test split, write the bundle and report."""
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config.output_root, config.name)
    if resume and not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"cannot resume: {run_dir} is not a run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _attach_file_log(run_dir)
    try:
        save_config(config, run_dir / "config.yaml")
        splits = prepare_detection_data(config.data)
        (run_dir / "split.json").write_text(json.dumps(splits.describe(), indent=1))
        classes = splits.classes
        model = build_detector(config, len(classes))
        n_params = sum(p.numel() for p in model.parameters())
        sizes = {k: len(v) for k, v in splits.parts.items()}
        console.print(f"[bold]{config.name}[/bold]: {config.model.name} ({n_params / 1e6:.2f} M parameters), "
                      f"classes {classes}, images {sizes}")
        result = fit_detector(model, splits, config.train, run_dir=run_dir, resume=resume,
                              show_progress=show_progress)
        console.print(f"training finished: {result.stopped_because}; kept epoch {result.best_epoch}")
        device = resolve_device(config.train.device)
        info = DetectorBundleInfo(model_name=config.model.name, classes=list(classes),
                                  model_options=dict(config.model.options),
                                  score_threshold=config.predict.score_threshold)
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
        predictions = predict_images(detector, target, show_progress=show_progress, description=f"scoring {eval_name}")
        extra = {
            "evaluated_on": eval_name, "split_sizes": sizes, "best_epoch": result.best_epoch,
            "stopped_because": result.stopped_because, "train_minutes": result.train_seconds / 60,
            "parameters": n_params, "seconds_per_image": measure_seconds_per_image(detector, target[0]),
            "model": config.model.name, "history": result.history,
        }
        metrics = evaluate_detections(
            predictions, [to_ground_truth(i, classes) for i in target], classes, run_dir,
            score_threshold=info.score_threshold, images=lambda i: image_array(target[i]),
            history=result.history, title=f"{config.name}: {config.model.name} on {eval_name}",
            notes=notes, config=config.to_dict(), extra=extra,
        )
        info.metrics = {k: metrics.get(k) for k in ("map", "map_50", "map_75", "wbc_count_exact", "n_images",
                                                     "evaluated_on", "seconds_per_image", "train_minutes",
                                                     "best_epoch")}
        info.metrics["ap_50_per_class"] = {name: v["ap_50"] for name, v in metrics["per_class"].items()}
        info.provenance = {"run_dir": str(run_dir.resolve()), "dataset": config.data.path,
                           "config": config.to_dict()}
        bundle_dir = save_detector_bundle(run_dir / "bundle", model, info)
        console.print(f"{eval_name}: mAP {metrics['map']:.4f}, mAP@0.5 {metrics['map_50']:.4f} "
                      f"({metrics['n_images']} images); report: {run_dir / 'report.html'}")
        (run_dir / "history.json").write_text(json.dumps(result.history, indent=1))
        return DetectionRunResult(run_dir, bundle_dir, metrics, result)
    finally:
        logging.getLogger("leukoscope").removeHandler(handler)
        handler.close()


# --------------------------------------------------------------------------- scoring a bundle
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
) -> dict[str, Any]:
    """Score a detector bundle on a VOC folder (any layout; ``split`` picks one part)."""
    detector = CellDetector.from_bundle(bundle, device, score_threshold)
    classes = detector.classes
    dataset = read_voc_dataset(data, split, classes=classes, on_error=on_error)
    images = list(dataset)
    predictions = predict_images(detector, images, show_progress=show_progress, description="detecting")
    notes = [f"Detector {Path(bundle).resolve()} scored on {Path(data).resolve()}"
             + (f" (split {split})" if split else "") + "."]
    if dataset.issues:
        notes.append(f"{len(dataset.issues)} annotation problem(s) skipped: "
                     + "; ".join(str(i) for i in dataset.issues[:5]) + (" ..." if len(dataset.issues) > 5 else ""))
    trained_on = detector.info.provenance.get("dataset")
    if trained_on:
        notes.append(f"The detector was trained on {trained_on}; BCCD and CBC show the same smears, so never "
                     f"score a detector trained on one of them on the other.")
    return evaluate_detections(
        predictions, [to_ground_truth(i, classes) for i in images], classes, Path(out_dir),
        score_threshold=detector.score_threshold, images=lambda i: image_array(images[i]),
        title=f"{detector.info.model_name} on {Path(data).name}" + (f" ({split})" if split else ""),
        notes=notes,
        extra={"bundle": str(Path(bundle).resolve()), "data": str(Path(data).resolve()), "split": split,
               "seconds_per_image": measure_seconds_per_image(detector, images[0]),
               "annotation_issues": [i.as_dict() for i in dataset.issues]},
    )
