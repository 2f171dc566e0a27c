"""The detection training loop: one epoch at a time on the shared scaffold
(optimizer, schedule, checkpoint, run log), keeping the best weights by validation mAP."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from leukoscope.bundle import BundleInfo
from leukoscope.data.box_augment import detection_augmentation
from leukoscope.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from leukoscope.engine.detection_config import DetectionTrainConfig
from leukoscope.engine.detection_data import (DetectionSplits, DetectionTorchDataset, collate_detection_batch,
                                              predict_images, to_ground_truth)
from leukoscope.engine.optim import TrainingClock, build_optimizer, build_scheduler
from leukoscope.engine.runtime import resolve_device, seed_everything
from leukoscope.evaluation.detection import coco_metrics
from leukoscope.inference.detector import CellDetector
from leukoscope.progress import progress_bar, say


@dataclass
class DetectionFitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_score: float | None
    train_seconds: float
    stopped_because: str


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
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum)
    clock = TrainingClock(cfg.epochs * steps_per_epoch, cfg.max_minutes)
    # Linear warm-up over the first steps, then cosine decay to 2% of the base rate.
    scheduler = build_scheduler(optimizer, cfg.scheduler, clock, warmup_steps=cfg.warmup_iters, floor=0.02)

    history: list[dict[str, Any]] = []
    best_score: float | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] = {}
    start_epoch, elapsed_before = 1, 0.0
    checkpoint_path = run_dir / CHECKPOINT_FILE if run_dir else None
    if resume:
        if checkpoint_path is None:
            raise FileNotFoundError("cannot resume without a run directory")
        progress = load_checkpoint(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                   generator=generator)
        history, best_score, best_epoch = progress["history"], progress["best_score"], progress["best_epoch"]
        best_state = progress["best_state"]
        start_epoch, elapsed_before = progress["epoch"] + 1, progress["elapsed"]
        say(f"resuming at epoch {start_epoch} (best so far {best_score} at epoch {best_epoch})")

    # The steps really taken (an epoch may be partial).
    clock.resume_from(elapsed_before, scheduler.last_epoch if scheduler is not None else 0)
    stopped_because = "completed all epochs"
    out_of_time = False
    info = BundleInfo(model_name="training", classes=list(classes), task="detect")
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        if per_epoch < len(dataset):
            indices = torch.randperm(len(dataset), generator=generator)[:per_epoch].tolist()
            subset: Dataset = torch.utils.data.Subset(dataset, indices)
        else:
            subset = dataset
        loader = DataLoader(subset, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                            collate_fn=collate_detection_batch, num_workers=0)
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
                if scheduler is not None:
                    scheduler.step()
                loss_sum += loss.item() * len(images)
                seen += len(images)
                for key, value in losses.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + value.item() * len(images)
                update(info=f"loss {loss_sum / seen:.3f}")
                if clock.out_of_time:
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
        say(f"epoch {epoch:>3}/{cfg.epochs} loss {row['train_loss']:.3f}{val_text}"
                      f" [{row['elapsed_s'] / 60:.1f} min]{' *' if improved and val_images else ''}")
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler,
                            generator=generator,
                            progress={"history": history, "best_score": best_score, "best_epoch": best_epoch,
                                      "best_state": best_state, "epoch": epoch, "elapsed": row["elapsed_s"]})
        if out_of_time:
            stopped_because = f"time budget of {cfg.max_minutes} min reached (epoch {epoch} may be partial)"
            break
    if best_state:
        model.load_state_dict(best_state)
    return DetectionFitResult(history, best_epoch, best_score, clock.elapsed_s, stopped_because)
