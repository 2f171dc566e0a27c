"""The run directory every trainer writes, the same for every task::

    runs/<name>-<time>/
      config.yaml      the resolved config (absolute data paths: `--resume` works from anywhere)
      split.json       the split used
      checkpoint.pt    last epoch, for --resume (removed when the run completes, unless kept)
      bundle/          the trained model (leukoscope.bundle)
      metrics.json, history.json, figures/, report.html
      train.log        every line the run printed
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, TypeVar

from pydantic import BaseModel

from leukoscope.bundle import BUNDLE_FILE
from leukoscope.engine.checkpoint import CHECKPOINT_FILE
from leukoscope.engine.config import save_config
from leukoscope.engine.loop import FitResult
from leukoscope.progress import run_log, say

CONFIG_FILE = "config.yaml"
ConfigT = TypeVar("ConfigT", bound=BaseModel)
#: Path keys made absolute even when nothing exists there yet (the run creates them).
_CREATED_PATHS = ("output_root", "split_file")


@dataclass
class RunResult:
    """Where a task's training run went: its folder, its bundle, its test metrics and how it trained."""

    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]
    fit: FitResult


def new_run_dir(output_root: str | Path, name: str) -> Path:
    """A fresh ``<output_root>/<name>-<time>[-n]`` path (not created)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(output_root) / f"{name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(output_root) / f"{name}-{stamp}-{suffix}"
    return run_dir


def fresh_dir(output_root: str | Path, name: str) -> Path:
    """A new ``<output_root>/<name>-<time>[-n]`` folder, created here: two jobs started in the same second
    get one each (checking, then creating, let both write into one)."""
    while True:
        folder = new_run_dir(output_root, name)
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue


def absolute_paths(config: ConfigT, keys: list[str]) -> ConfigT:
    """``config`` with the file paths at the dotted ``keys`` made absolute (those that name an
    existing file or folder: a torchvision weight name such as ``DEFAULT`` stays as it is; and
    the paths the run creates), so that a run resumes from any folder."""
    updates: dict[str, dict[str, str]] = {}
    for key in keys:
        section, _, name = key.rpartition(".")
        owner = getattr(config, section) if section else config
        value = getattr(owner, name)
        if isinstance(value, str) and value and (name in _CREATED_PATHS or Path(value).exists()):
            updates.setdefault(section, {})[name] = str(Path(value).resolve())
    top = dict(updates.pop("", {}))
    for section, values in updates.items():
        top[section] = getattr(config, section).model_copy(update=values)
    return config.model_copy(update=top) if top else config


def require_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` if it is a run directory that can be resumed, else a clear error."""
    run_dir = Path(run_dir)
    if not run_dir.exists():  # said as such, not as a config file that cannot be read
        raise FileNotFoundError(f"cannot resume: there is no run folder {run_dir}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: {run_dir} is a file, not a run folder")
    if not (run_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(f"cannot resume: {run_dir} is not a run directory (no {CONFIG_FILE})")
    return run_dir


#: The split a run trained on, in its folder: a resumed run continues on it.
SPLIT_FILE = "split.json"


def resumed_split(run_dir: Path) -> Path:
    """The ``split.json`` of the run being resumed, which it must continue on: another split (the shared one,
    remade since, or a new one) would move images its checkpoint trained on into validation and test."""
    split = require_run_dir(run_dir) / SPLIT_FILE
    if not split.is_file():
        raise FileNotFoundError(f"cannot resume {run_dir}: it has no {SPLIT_FILE}, and a resumed run continues on the "
                                f"split it trained on; restore {split} or start a new run")
    return split


@contextmanager
def open_run(run_dir: Path, config: BaseModel, *, resume: bool = False) -> Iterator[Path]:
    """Create ``run_dir`` (or reopen it to resume), write ``config.yaml`` and log every
    line to ``train.log``. A new run that fails before it wrote a checkpoint or a model
    leaves nothing behind (bad data fails in seconds; the folder would only be litter);
    one with a checkpoint is kept so that ``--resume`` can continue it. A resume that fails before it
    wrote a checkpoint of its own puts the run's ``config.yaml`` back as it was, so that a plain
    ``--resume`` still continues it."""
    before = _resume_state(require_run_dir(run_dir)) if resume else None
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_log(run_dir / "train.log"):
            save_config(config, run_dir / CONFIG_FILE)
            yield run_dir
    except BaseException as exc:
        if created and not resume and not _holds_work(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        if before is not None and _checkpoint_stamp(run_dir) == before[1]:
            (run_dir / CONFIG_FILE).write_bytes(before[0])
        if isinstance(exc, KeyboardInterrupt) and (run_dir / CHECKPOINT_FILE).exists():
            say(f"interrupted: `leukoscope train --resume {run_dir}` goes on from its last saved epoch")
        raise


@contextmanager
def one_run_of(command: str, index: int, total: int) -> Iterator[None]:
    """Around run ``index`` of ``total`` that ``command`` (compare, search) trains: interrupted, say that
    ``train --resume`` (which the run itself advises) goes on with that run alone, not with the ``command``."""
    try:
        yield
    except KeyboardInterrupt:
        say(f"the {command} stopped at run {index} of {total}: `leukoscope train --resume` finishes that run alone; "
            f"`leukoscope {command}` again trains every run from the start")
        raise


def _checkpoint_stamp(run_dir: Path) -> tuple[int, int] | None:
    """The checkpoint's modification time and size (None without one): changed once an epoch is saved."""
    try:
        stat = (run_dir / CHECKPOINT_FILE).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _resume_state(run_dir: Path) -> tuple[bytes, tuple[int, int] | None]:
    return (run_dir / CONFIG_FILE).read_bytes(), _checkpoint_stamp(run_dir)


def _holds_work(run_dir: Path) -> bool:
    """Whether a failed run has something worth keeping: a checkpoint to resume from, or a
    trained model (a multiple-instance run trains two, in runs of its own)."""
    return (run_dir / CHECKPOINT_FILE).exists() or any(run_dir.rglob(BUNDLE_FILE))


def finish_run(run_dir: Path, *, keep_checkpoint: bool) -> None:
    """A completed run needs its checkpoint only to train further (hundreds of MB for a CNN)."""
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.exists() and not keep_checkpoint:
        checkpoint.unlink()
        say(f"[dim]removed {checkpoint.name} (the run is complete; train.keep_checkpoint=true keeps it)[/dim]")
