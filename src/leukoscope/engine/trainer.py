"""The classification training loop: one epoch at a time, checkpointed, resumable.

Keeps the best weights by the monitored validation score, stops early when the
score stops improving or the time budget runs out, and writes a checkpoint after
every epoch so that ``resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from leukoscope.data.dataset import TensorImageDataset
from leukoscope.engine.checkpoint import CHECKPOINT_FILE
from leukoscope.engine.loop import EpochLoop, FitResult
from leukoscope.engine.config import TrainConfig
from leukoscope.engine.optim import TrainingClock, build_optimizer, build_scheduler
from leukoscope.engine.runtime import deterministic_kernels, resolve_device, seed_everything
from leukoscope.evaluation.metrics import macro_f1
from leukoscope.preprocessing import Preprocessing, batched_logits
from leukoscope.progress import progress_bar
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
        "macro_f1": macro_f1(y, predicted),
    }


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
    dataset = TensorImageDataset(train_images, train_targets, augmentation(cfg.augmentation), preprocessing.model_input)
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

    if run_dir is not None and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
    loop = _ClassificationLoop(model, optimizer, scheduler, clock, generator, cfg=cfg, loader=loader,
                               loss_fn=loss_fn, eval_loss=eval_loss, device=device, preprocessing=preprocessing,
                               val=(val_images, val_targets) if val_images is not None and val_targets else None,
                               checkpoint_path=run_dir / CHECKPOINT_FILE if run_dir else None,
                               show_progress=show_progress)
    with deterministic_kernels(device, cfg.deterministic):
        result = loop.run(resume=resume)
    return FitResult(result.history, result.best_epoch, loop.score_of(result.best_row), result.train_seconds,
                     result.stopped_because, result.best_state)


class _ClassificationLoop(EpochLoop):
    """Cross-entropy on augmented uint8 batches; validation accuracy, macro-F1 and loss every epoch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, clock: TrainingClock,
                 generator: torch.Generator, *, cfg: TrainConfig, loader: DataLoader, loss_fn: nn.Module,
                 eval_loss: nn.Module, device: torch.device, preprocessing: Preprocessing,
                 val: tuple[torch.Tensor, list[int]] | None, checkpoint_path: Path | None,
                 show_progress: bool) -> None:
        super().__init__(model, optimizer, scheduler, clock, generator, epochs=cfg.epochs,
                         max_minutes=cfg.max_minutes, checkpoint_path=checkpoint_path,
                         patience=cfg.early_stopping_patience)
        self.cfg, self.loader, self.loss_fn, self.eval_loss = cfg, loader, loss_fn, eval_loss
        self.device, self.preprocessing, self.val, self.show_progress = device, preprocessing, val, show_progress
        self.one_view = replace(preprocessing, views=1)

    def stop_before(self, epoch: int, last_epoch_s: float) -> str | None:
        # Stop before an epoch that would overrun the budget (a resumed run that has
        # spent its budget only finishes: evaluation, bundle, report).
        clock = self.clock
        # the schedule counts on the budget less one epoch: the last epoch to run ends within it of the budget
        clock.reserve_s = last_epoch_s
        if clock.budget_s and epoch > 1 and clock.elapsed_s + last_epoch_s > clock.budget_s:
            return f"time budget of {self.cfg.max_minutes} min reached (another epoch would exceed it)"
        return None

    def train_epoch(self, epoch: int) -> tuple[dict[str, Any], bool]:
        model, optimizer, device = self.model, self.optimizer, self.device
        model.train()
        keep_frozen_batchnorm_in_eval(model)
        seen = correct = 0
        loss_sum = 0.0
        with progress_bar(len(self.loader), f"epoch {epoch}/{self.cfg.epochs}", enabled=self.show_progress) as update:
            for inputs, targets in self.loader:
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad(set_to_none=True)
                logits = model(inputs)
                loss = self.loss_fn(logits, targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training diverged at epoch {epoch} (loss {loss.item()}); lower train.lr (now {self.cfg.lr})"
                    )
                loss.backward()
                optimizer.step()
                self.clock.step += 1
                if self.scheduler is not None:
                    self.scheduler.step()
                seen += len(targets)
                correct += int((logits.argmax(1) == targets).sum())
                loss_sum += loss.item() * len(targets)
                update(info=f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
        return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                "lr": optimizer.param_groups[0]["lr"]}, False

    def validate(self, epoch: int, row: dict[str, Any], cut_short: bool) -> None:
        if self.val is not None:
            images, targets = self.val
            # Each epoch's validation reads a cell once: test-time views would multiply its cost by up to 8.
            # The run's final scores, temperature and OOD flag use the bundle's views (the learner's outputs).
            logits = batched_logits(self.model, images, self.one_view, self.device)
            row.update({f"val_{k}": v for k, v in score_logits(logits, targets, self.eval_loss).items()})

    def selection_key(self, row: dict[str, Any]) -> tuple[float, float]:
        return _selection_key(self.cfg, row)

    def describe(self, epoch: int, row: dict[str, Any], improved: bool) -> str:
        val_text = (
            f" val_loss {row['val_loss']:.3f} val_acc {row['val_accuracy']:.4f} val_f1 {row['val_macro_f1']:.4f}"
            if "val_loss" in row else ""
        )
        return (f"epoch {epoch:>3}/{self.cfg.epochs} loss {row['train_loss']:.3f} acc {row['train_accuracy']:.4f}"
                f"{val_text} [{row['elapsed_s'] / 60:.1f} min]{' *' if improved else ''}")

