"""Optimizers and learning-rate schedules for every trainer, following a :class:`TrainingClock`."""

from __future__ import annotations

import math
import time
from typing import Iterable

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "onecycle")


def build_optimizer(parameters: Iterable[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """``adam``, ``adamw`` or ``sgd`` (with momentum) over the trainable ``parameters``."""
    trainable = [p for p in parameters if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {list(OPTIMIZERS)}")


class TrainingClock:
    """Fraction of the training done: by steps, or by the time budget if that runs out first.

    Schedules follow this fraction, so a run cut short by ``max_minutes`` still
    finishes its learning-rate annealing instead of stopping at a high rate.
    Without a time budget the fraction depends on steps only (deterministic).
    """

    def __init__(self, total_steps: int, max_minutes: float | None) -> None:
        self.total_steps = max(total_steps, 1)
        self.budget_s = max_minutes * 60 if max_minutes else None
        self.start = time.monotonic()
        self.step = 0
        #: The last epoch's length, where the loop stops before an epoch that would overrun the budget (the
        #: classifier's, which sets it): the schedule then counts on the budget less one epoch, else a cut run
        #: ended part-annealed. A loop that trains until the budget runs out (the detector's) leaves it 0.
        self.reserve_s = 0.0

    def resume_from(self, elapsed_s: float, step: int) -> None:
        self.start, self.step = time.monotonic() - elapsed_s, step

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    @property
    def out_of_time(self) -> bool:
        return bool(self.budget_s) and self.elapsed_s >= self.budget_s

    def fraction(self) -> float:
        done = self.step / self.total_steps
        if self.budget_s:
            usable = max(self.budget_s - self.reserve_s, 0.1 * self.budget_s)
            done = max(done, self.elapsed_s / usable)
        return min(done, 1.0)


def lr_factor(schedule: str, fraction: float, *, warmup: float = 0.2, floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``fraction`` of training.

    ``cosine``: cosine decay from 1 to ``floor``. ``onecycle``: linear warm-up from 4%
    over the first ``warmup`` of training, then cosine decay to 0 (the shape of
    torch's OneCycleLR). ``none``: 1.
    """
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * fraction))
    if schedule == "onecycle":
        if fraction < warmup:
            return 0.04 + 0.96 * fraction / warmup
        return 0.5 * (1 + math.cos(math.pi * (fraction - warmup) / (1 - warmup)))
    if schedule == "none":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, clock: TrainingClock, *,
                    warmup_steps: int = 0, floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A per-step scheduler: linear warm-up over ``warmup_steps`` steps times the
    ``schedule``'s shape at the clock's fraction; None when it would be constant."""
    if schedule == "none" and warmup_steps <= 0:
        return None
    lr_factor(schedule, 0.0)  # refuse an unknown name now, not at the first step

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return warm * lr_factor(schedule, clock.fraction(), floor=floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
