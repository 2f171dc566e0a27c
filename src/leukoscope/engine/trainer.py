"""The classification training loop: one epoch at a time, checkpointed, resumable.

Keeps the best weights by the monitored validation score, stops early when the
score stops improving or the time budget runs out, and writes a checkpoint after
every epoch so that ``resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader

from leukoscope.data.dataset import TensorImageDataset
from leukoscope.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from leukoscope.engine.config import TrainConfig
from leukoscope.engine.optim import TrainingClock, build_optimizer, build_scheduler
from leukoscope.engine.runtime import resolve_device, seed_everything
from leukoscope.preprocessing import Preprocessing, batched_logits
from leukoscope.progress import progress_bar, say
from leukoscope.transforms import augmentation

log = logging.getLogger(__name__)


def keep_frozen_batchnorm_in_eval(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are frozen into eval mode.

    ``requires_grad=False`` alone does not freeze a BatchNorm: in train mode it keeps
    updating its running statistics, which drifts a loaded backbone away from the
    weights it was trained with (system D trains the head only)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                module.eval()


def class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (n / (k * count)); classes absent from training get 0."""
    counts = np.bincount(targets, minlength=num_classes).astype(float)
    weights = np.where(counts > 0, len(targets) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def score_logits(logits: np.ndarray, targets: list[int], loss_fn: nn.Module) -> dict[str, float]:
    y = np.asarray(targets)
    predicted = logits.argmax(1)
    loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(y)).item())
    return {
        "loss": loss,
        "accuracy": float((predicted == y).mean()),
        "macro_f1": float(f1_score(y, predicted, average="macro", zero_division=0)),
    }


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_score: float
    train_seconds: float
    stopped_because: str
    best_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


def _monitor_value(cfg: TrainConfig, row: dict[str, Any]) -> float:
    key = {"val_accuracy": "val_accuracy", "val_macro_f1": "val_macro_f1", "val_loss": "val_loss"}[cfg.monitor]
    value = row.get(key)
    if value is None:  # no validation set: fall back to training accuracy
        return row["train_accuracy"]
    return -value if cfg.monitor == "val_loss" else value


def _selection_key(cfg: TrainConfig, row: dict[str, Any]) -> tuple[float, float]:
    """The monitored score, ties broken by the lower loss: on a small validation set
    many epochs tie on accuracy, and the first of them is often mid-schedule."""
    return _monitor_value(cfg, row), -row.get("val_loss", row["train_loss"])


def fit(
    model: nn.Module,
    train_images: torch.Tensor,
    train_targets: list[int],
    val_images: torch.Tensor | None,
    val_targets: list[int] | None,
    cfg: TrainConfig,
    *,
    num_classes: int,
    preprocessing: Preprocessing,
    run_dir: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> FitResult:
    """Train ``model`` in place on uint8 images (normalised by ``preprocessing``, the
    bundle's); returns history and the best weights by ``cfg.monitor``."""
    generator = seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model.to(device)
    dataset = TensorImageDataset(train_images, train_targets, augmentation(cfg.augmentation), preprocessing.normalize)
    # drop_last avoids a size-1 batch, which BatchNorm cannot train on.
    drop_last = len(dataset) > cfg.batch_size and len(dataset) % cfg.batch_size == 1
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=drop_last)
    weights = class_weights(train_targets, num_classes) if cfg.class_weighted_loss else None
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                  label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum)
    clock = TrainingClock(cfg.epochs * len(loader), cfg.max_minutes)
    scheduler = build_scheduler(optimizer, cfg.scheduler, clock)

    history: list[dict[str, Any]] = []
    best_score, best_epoch, stale = -math.inf, 0, 0
    best_state: dict[str, torch.Tensor] = {}
    start_epoch, elapsed_before = 1, 0.0
    checkpoint_path = run_dir / CHECKPOINT_FILE if run_dir else None
    if run_dir is not None and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        if checkpoint_path is None:
            raise FileNotFoundError("cannot resume without a run directory")
        progress = load_checkpoint(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                   generator=generator)
        history, best_score, best_epoch = progress["history"], progress["best_score"], progress["best_epoch"]
        stale, best_state = progress["stale"], progress["best_state"]
        start_epoch, elapsed_before = progress["epoch"] + 1, progress["elapsed"]
        say(f"resuming at epoch {start_epoch} (best so far {best_score:.4f} at epoch {best_epoch})")

    clock.resume_from(elapsed_before, (start_epoch - 1) * len(loader))
    best_key = next((_selection_key(cfg, h) for h in history if h["epoch"] == best_epoch), (-math.inf, -math.inf))
    stopped_because = "completed all epochs"
    # Duration of the last epoch run (also after a resume), to stop before one that would overrun the budget.
    elapsed_marks = [0.0] + [h["elapsed_s"] for h in history]
    last_epoch_s = elapsed_marks[-1] - elapsed_marks[-2] if history else 0.0
    for epoch in range(start_epoch, cfg.epochs + 1):
        # Stop before an epoch that would overrun the budget (a resumed run that has
        # spent its budget only finishes: evaluation, bundle, report).
        if clock.budget_s and epoch > 1 and clock.elapsed_s + last_epoch_s > clock.budget_s:
            stopped_because = f"time budget of {cfg.max_minutes} min reached (another epoch would exceed it)"
            break
        epoch_start = clock.elapsed_s
        model.train()
        keep_frozen_batchnorm_in_eval(model)
        seen = correct = 0
        loss_sum = 0.0
        with progress_bar(len(loader), f"epoch {epoch}/{cfg.epochs}", enabled=show_progress) as update:
            for inputs, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad(set_to_none=True)
                logits = model(inputs)
                loss = loss_fn(logits, targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training diverged at epoch {epoch} (loss {loss.item()}); lower train.lr (now {cfg.lr})"
                    )
                loss.backward()
                optimizer.step()
                clock.step += 1
                if scheduler is not None:
                    scheduler.step()
                seen += len(targets)
                correct += int((logits.argmax(1) == targets).sum())
                loss_sum += loss.item() * len(targets)
                update(info=f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if val_images is not None and val_targets:
            scores = score_logits(batched_logits(model, val_images, preprocessing, device), val_targets, eval_loss)
            row.update({f"val_{k}": v for k, v in scores.items()})
        row["elapsed_s"] = clock.elapsed_s
        last_epoch_s = row["elapsed_s"] - epoch_start
        history.append(row)
        score = _monitor_value(cfg, row)
        key = _selection_key(cfg, row)
        improved = key > best_key
        if improved:
            best_key, best_score, best_epoch, stale = key, score, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        val_text = (
            f" val_loss {row['val_loss']:.3f} val_acc {row['val_accuracy']:.4f} val_f1 {row['val_macro_f1']:.4f}"
            if "val_loss" in row else ""
        )
        say(
            f"epoch {epoch:>3}/{cfg.epochs} loss {row['train_loss']:.3f} acc {row['train_accuracy']:.4f}{val_text}"
            f" [{row['elapsed_s'] / 60:.1f} min]{' *' if improved else ''}"
        )
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler,
                            generator=generator,
                            progress={"history": history, "best_score": best_score, "best_epoch": best_epoch,
                                      "best_state": best_state, "stale": stale, "epoch": epoch,
                                      "elapsed": row["elapsed_s"]})
        if cfg.early_stopping_patience is not None and stale >= cfg.early_stopping_patience:
            stopped_because = f"early stopping: no improvement for {stale} epochs"
            break
        if clock.out_of_time:
            stopped_because = f"time budget of {cfg.max_minutes} min reached"
            break
    model.load_state_dict(best_state)
    return FitResult(history, best_epoch, best_score, clock.elapsed_s, stopped_because, best_state)
