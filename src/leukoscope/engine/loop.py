"""The epoch loop every trainer runs, with the task's step and score as hooks.

:class:`EpochLoop` resumes from the checkpoint, runs one epoch at a time, keeps the
weights of the best epoch by the task's selection key, writes a checkpoint after
every epoch, and stops when the epochs are done, the time budget is spent or (with a
patience) the score stops improving. A task's trainer subclasses it with
:meth:`~EpochLoop.train_epoch` (one pass over its data), :meth:`~EpochLoop.validate`
and :meth:`~EpochLoop.selection_key`; classification (:mod:`leukoscope.engine.trainer`)
and detection (:mod:`leukoscope.engine.detection_trainer`) are two such subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leukoscope.bundle import BUNDLE_FILE
from leukoscope.engine.checkpoint import check_resume_epochs, load_checkpoint, save_checkpoint
from leukoscope.engine.optim import TrainingClock
from leukoscope.progress import say


@dataclass
class FitResult:
    """What a trainer returns: the history, the kept epoch and its score, and why it stopped."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_score: float | None
    train_seconds: float
    stopped_because: str
    best_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


@dataclass
class LoopResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_row: dict[str, Any] | None
    train_seconds: float
    stopped_because: str
    best_state: dict[str, torch.Tensor]


class EpochLoop(ABC):
    """Epochs 1..``epochs`` of ``model`` with ``optimizer`` / ``scheduler`` following ``clock``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 clock: TrainingClock, generator: torch.Generator, *, epochs: int, max_minutes: float | None,
                 checkpoint_path: Path | None, patience: int | None = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.clock, self.generator = clock, generator
        self.epochs, self.max_minutes, self.patience = epochs, max_minutes, patience
        self.checkpoint_path = checkpoint_path

    # -- the task's hooks -----------------------------------------------------------------
    @abstractmethod
    def train_epoch(self, epoch: int) -> tuple[dict[str, Any], bool]:
        """One pass over the training data: the epoch's row (losses, ...) and whether the
        time budget cut it short."""

    @abstractmethod
    def validate(self, epoch: int, row: dict[str, Any], cut_short: bool) -> None:
        """Add the validation scores of this epoch to ``row`` (or nothing, on an epoch not scored)."""

    @abstractmethod
    def selection_key(self, row: dict[str, Any]) -> tuple[float, ...] | None:
        """Larger is better; None: this epoch cannot be compared (it was not scored)."""

    @abstractmethod
    def describe(self, epoch: int, row: dict[str, Any], improved: bool) -> str:
        """The line printed (and logged) after the epoch."""

    def stop_before(self, epoch: int, last_epoch_s: float) -> str | None:
        """A reason not to start ``epoch`` (default: the time budget spent: a resumed run out of time trained a
        batch more before its first check)."""
        return f"time budget of {self.max_minutes} min reached" if self.clock.out_of_time else None

    def resumed(self, progress: dict[str, Any]) -> None:
        """Say where a resumed run continues."""
        best = progress.get("best_score")
        shown = f"{best:.4f}" if isinstance(best, float) else str(best)
        say(f"resuming at epoch {progress['epoch'] + 1} (best so far {shown} at epoch {progress['best_epoch']})")

    # -- the loop ---------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> LoopResult:
        history: list[dict[str, Any]] = []
        best_epoch, best_state, stale = 0, {}, 0
        start_epoch, elapsed_before, steps_before = 1, 0.0, 0
        if resume:
            if self.checkpoint_path is None:
                raise FileNotFoundError("cannot resume without a run directory")
            progress = load_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer,
                                       scheduler=self.scheduler, generator=self.generator)
            history, best_epoch, best_state = progress["history"], progress["best_epoch"], progress["best_state"]
            stale = progress.get("stale", 0)
            start_epoch, elapsed_before = progress["epoch"] + 1, progress["elapsed"]
            check_resume_epochs(progress["epoch"], self.epochs)
            steps_before = progress.get("steps", self.scheduler.last_epoch if self.scheduler is not None else 0)
            self.resumed(progress)
        # The steps really taken (an epoch cut short by the budget may be partial).
        self.clock.resume_from(elapsed_before, steps_before)
        best_row = next((row for row in history if row["epoch"] == best_epoch), None)
        best_key = self.selection_key(best_row) if best_row is not None else None
        stopped_because = "completed all epochs"
        marks = [0.0] + [row["elapsed_s"] for row in history]
        last_epoch_s = marks[-1] - marks[-2] if history else 0.0
        if history and self.patience is not None and stale >= self.patience:
            # a run that had stopped early and was cut after its loop (evaluation, the bundle): it stays stopped
            start_epoch = self.epochs + 1
            stopped_because = f"early stopping: no improvement for {stale} epochs"
        trained = False
        for epoch in range(start_epoch, self.epochs + 1):
            reason = self.stop_before(epoch, last_epoch_s)
            if reason:
                stopped_because = reason
                break
            trained = True
            epoch_start = self.clock.elapsed_s
            row, cut_short = self.train_epoch(epoch)
            row = {"epoch": epoch, **row}
            self.validate(epoch, row, cut_short)
            row["elapsed_s"] = self.clock.elapsed_s
            last_epoch_s = row["elapsed_s"] - epoch_start
            history.append(row)
            key = self.selection_key(row)
            improved = key is not None and (best_key is None or key > best_key)
            if improved:
                best_key, best_epoch, best_row, stale = key, epoch, row, 0
                best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            elif key is not None:
                stale += 1
            say(self.describe(epoch, row, improved))
            if self.checkpoint_path is not None:
                save_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler, generator=self.generator,
                                progress={"history": history, "best_score": self.score_of(best_row),
                                          "best_epoch": best_epoch, "best_state": best_state, "stale": stale,
                                          "epoch": epoch, "elapsed": row["elapsed_s"], "steps": self.clock.step})
            if self.patience is not None and stale >= self.patience:
                stopped_because = f"early stopping: no improvement for {stale} epochs"
                break
            if cut_short:
                stopped_because = f"time budget of {self.max_minutes} min reached (epoch {epoch} may be partial)"
                break
            if self.clock.out_of_time:
                stopped_because = f"time budget of {self.max_minutes} min reached"
                break
        if resume and not trained and (self.checkpoint_path.parent / "bundle" / BUNDLE_FILE).is_file():
            # a finished run kept with its checkpoint (all its epochs, stopped early, out of time): going on
            # trained nothing and wrote its metrics, report and bundle again
            # (a run stopped early stays stopped: its patience is not among what a resume may change)
            way = ("start a new run" if stopped_because.startswith("early stopping") else
                   f"raise train.epochs (now {self.epochs}) or train.max_minutes to train on, or start a new run")
            raise ValueError(f"cannot resume: {self.checkpoint_path.parent} is finished ({stopped_because}) and its "
                             f"bundle is written, so it would train nothing; {way}")
        if best_state:
            self.model.load_state_dict(best_state)
        return LoopResult(history, best_epoch, best_row, self.clock.elapsed_s, stopped_because, best_state)

    def score_of(self, row: dict[str, Any] | None) -> float | None:
        """The number reported as the best score (the first element of the selection key)."""
        key = self.selection_key(row) if row is not None else None
        return float(key[0]) if key is not None else None
