"""The detection training loop: one epoch at a time on the shared scaffold
(optimizer, schedule, checkpoint, run log), keeping the best weights by validation mAP."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from leukoscope.bundle import BundleInfo
from leukoscope.data.box_augment import detection_augmentation
from leukoscope.engine.checkpoint import CHECKPOINT_FILE
from leukoscope.engine.loop import EpochLoop, FitResult
from leukoscope.engine.detection_config import DetectionTrainConfig
from leukoscope.engine.detection_data import (DetectionSplits, DetectionTorchDataset, collate_detection_batch,
                                              predict_images, to_ground_truth)
from leukoscope.engine.optim import TrainingClock, build_optimizer, build_scheduler
from leukoscope.engine.runtime import deterministic_kernels, resolve_device, seed_everything
from leukoscope.evaluation.detection import coco_metrics
from leukoscope.inference.detector import CellDetector
from leukoscope.inference.detector_torch import forget_pooling_scales, pooling_modules
from leukoscope.progress import progress_bar


def fit_detector(
    model: torch.nn.Module,
    splits: DetectionSplits,
    cfg: DetectionTrainConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> FitResult:
    """Train in place; keeps the best weights by validation mAP (the last ones without validation)."""
    generator = seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model.to(device)
    classes = splits.classes
    train_images = list(splits.parts["train"])
    val_images = list(splits.parts["val"]) if "val" in splits.parts else []
    dataset = DetectionTorchDataset(train_images, classes, detection_augmentation(cfg.augmentation))
    per_epoch = min(len(dataset), cfg.max_images_per_epoch or len(dataset))
    steps_per_epoch = max(1, math.ceil(per_epoch / cfg.batch_size))
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum)
    clock = TrainingClock(cfg.epochs * steps_per_epoch, cfg.max_minutes)
    # Linear warm-up over the first steps, then cosine decay to 2% of the base rate.
    scheduler = build_scheduler(optimizer, cfg.scheduler, clock, warmup_steps=cfg.warmup_iters, floor=0.02)

    loop = _DetectionLoop(model, optimizer, scheduler, clock, generator, cfg=cfg, dataset=dataset,
                          per_epoch=per_epoch, val_images=val_images, classes=classes, device=device,
                          checkpoint_path=run_dir / CHECKPOINT_FILE if run_dir else None,
                          show_progress=show_progress)
    with deterministic_kernels(device, cfg.deterministic):
        result = loop.run(resume=resume)
    return FitResult(result.history, result.best_epoch, loop.score_of(result.best_row), result.train_seconds,
                     result.stopped_because, result.best_state)


class _DetectionLoop(EpochLoop):
    """The detector's summed losses on augmented fields (a random subset per epoch with
    ``max_images_per_epoch``); validation mAP every ``eval_every`` epochs; without a
    validation split the last epoch is kept."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 clock: TrainingClock, generator: torch.Generator, *, cfg: DetectionTrainConfig,
                 dataset: DetectionTorchDataset, per_epoch: int, val_images: list, classes: list[str],
                 device: torch.device, checkpoint_path: Path | None, show_progress: bool) -> None:
        super().__init__(model, optimizer, scheduler, clock, generator, epochs=cfg.epochs,
                         max_minutes=cfg.max_minutes, checkpoint_path=checkpoint_path)
        self.cfg, self.dataset, self.per_epoch, self.device = cfg, dataset, per_epoch, device
        self.val_images, self.classes, self.show_progress = val_images, classes, show_progress
        self.val_truth = [to_ground_truth(image, classes) for image in val_images]
        self.info = BundleInfo(model_name="training", classes=list(classes), task="detect")

    def train_epoch(self, epoch: int) -> tuple[dict[str, Any], bool]:
        cfg, model, optimizer, device = self.cfg, self.model, self.optimizer, self.device
        model.train()
        if self.per_epoch < len(self.dataset):
            indices = torch.randperm(len(self.dataset), generator=self.generator)[:self.per_epoch].tolist()
            subset: Dataset = torch.utils.data.Subset(self.dataset, indices)
        else:
            subset = self.dataset
        loader = DataLoader(subset, batch_size=cfg.batch_size, shuffle=True, generator=self.generator,
                            collate_fn=collate_detection_batch, num_workers=0)
        loss_sum, seen, cut_short = 0.0, 0, False
        parts_sum: dict[str, float] = {}
        poolers = pooling_modules(model)
        with progress_bar(len(loader), f"epoch {epoch}/{cfg.epochs}", enabled=self.show_progress) as update:
            for images, targets in loader:
                inputs = [image.to(device).float() / 255.0 for image in images]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                forget_pooling_scales(poolers)  # fields of several sizes: each batch's own scales
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
                self.clock.step += 1
                if self.scheduler is not None:
                    self.scheduler.step()
                loss_sum += loss.item() * len(images)
                seen += len(images)
                for key, value in losses.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + value.item() * len(images)
                update(info=f"loss {loss_sum / seen:.3f}")
                if self.clock.out_of_time:
                    cut_short = True
                    break
        row: dict[str, Any] = {"train_loss": loss_sum / max(seen, 1), "images": seen,
                               "lr": optimizer.param_groups[0]["lr"]}
        row.update({f"train_{k}": v / max(seen, 1) for k, v in parts_sum.items()})
        return row, cut_short

    def validate(self, epoch: int, row: dict[str, Any], cut_short: bool) -> None:
        cfg = self.cfg
        if self.val_images and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs or cut_short):
            detector = CellDetector(self.model, self.info, self.device)
            predictions = predict_images(detector, self.val_images, show_progress=False)
            scores = coco_metrics(predictions, self.val_truth, self.classes)
            row["val_map"], row["val_map_50"] = scores["map"], scores["map_50"]

    def selection_key(self, row: dict[str, Any]) -> tuple[float, ...] | None:
        if not self.val_images:
            return (float(row["epoch"]),)  # without validation the last epoch is the one kept
        return (row[self.cfg.monitor],) if self.cfg.monitor in row else None  # None: not scored this epoch

    def score_of(self, row: dict[str, Any] | None) -> float | None:
        return row.get(self.cfg.monitor) if row is not None and self.val_images else None

    def describe(self, epoch: int, row: dict[str, Any], improved: bool) -> str:
        val_text = f" val mAP {row['val_map']:.4f} mAP@0.5 {row['val_map_50']:.4f}" if "val_map" in row else ""
        return (f"epoch {epoch:>3}/{self.cfg.epochs} loss {row['train_loss']:.3f}{val_text}"
                f" [{row['elapsed_s'] / 60:.1f} min]{' *' if improved and self.val_images else ''}")

