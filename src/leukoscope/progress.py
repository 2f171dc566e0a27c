"""Progress display shared by training, evaluation and batch inference.

Uses Rich when attached to a terminal; in logs (CI, nohup) it prints a plain
line every few percent instead, so long runs are visibly alive either way.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: Console width when stderr is not a terminal (pipes, logs, CI). Rich would assume
#: 80 columns there, cutting tables and breaking paths across lines; a terminal (or
#: an explicit COLUMNS) keeps its own width.
PIPE_WIDTH = 200


def _console_width() -> int | None:
    return None if sys.stderr.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH


console = Console(stderr=True, width=_console_width())
_log_consoles: list[Console] = []


def say(message: str) -> None:
    """Print a status line to the terminal and to every active run log (train.log)."""
    console.print(message)
    for log_console in _log_consoles:
        log_console.print(message)


@contextmanager
def run_log(path: str | Path) -> Iterator[None]:
    """While active, :func:`say` and leukoscope's warnings also append (without colour codes) to ``path``:
    the one logging channel of a run, so that ``train.log`` holds every line the user saw."""
    with open(path, "a", encoding="utf-8") as handle:
        log_console = Console(file=handle, no_color=True, width=200, log_path=False)
        warnings_handler = logging.StreamHandler(handle)
        warnings_handler.setLevel(logging.WARNING)
        warnings_handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        package_logger = logging.getLogger("leukoscope")
        _log_consoles.append(log_console)
        package_logger.addHandler(warnings_handler)
        try:
            yield
        finally:
            package_logger.removeHandler(warnings_handler)
            _log_consoles.remove(log_console)


def name_some(items: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` items, comma-separated, then "and N more": failures named
    on the terminal without flooding it."""
    text = ", ".join(items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


#: update(advance=1, info="loss 0.31", **counts) -> None
ProgressUpdate = Callable[..., None]


class Rates:
    """Items per second since the start, and of every quantity counted with them
    (``update(advance=1, cells=16)``): "0.83 fields/s, 13.3 cells/s"."""

    def __init__(self, unit: str | None) -> None:
        self.unit = unit
        self.totals: dict[str, int] = {}
        self.done = 0
        self.start = time.monotonic()

    def add(self, advance: int, counts: dict[str, int]) -> None:
        self.done += advance
        for name, n in counts.items():
            self.totals[name] = self.totals.get(name, 0) + n

    def text(self, now: float | None = None) -> str:
        if self.unit is None:
            return ""
        seconds = max((time.monotonic() if now is None else now) - self.start, 1e-9)
        parts = [f"{self.done / seconds:.2f} {self.unit}/s"]
        parts += [f"{n / seconds:.1f} {name}/s" for name, n in self.totals.items()]
        return ", ".join(parts)


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True,
                 unit: str | None = None) -> Iterator[ProgressUpdate]:
    """Yield ``update(advance=1, info="...")``; draws a bar or prints periodic lines.

    With ``unit`` (e.g. ``"fields"``) it also shows items per second, and per second of every
    quantity counted in the updates: ``update(advance=1, cells=16)`` adds "cells/s"."""
    if not enabled or total <= 0:
        yield lambda advance=1, info="", **counts: None
        return
    rates = Rates(unit)
    if console.is_terminal:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rates]}"),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task(description, total=total, info="", rates="")

            def update(advance: int = 1, info: str = "", **counts: int) -> None:
                rates.add(advance, counts)
                progress.update(task, advance=advance, info=info, rates=rates.text())

            yield update
        return

    last_print = 0.0

    def update_plain(advance: int = 1, info: str = "", **counts: int) -> None:
        nonlocal last_print
        rates.add(advance, counts)
        now = time.monotonic()
        if rates.done >= total or now - last_print >= 10:
            last_print = now
            speed = rates.text(now)
            print(f"{description}: {rates.done}/{total} ({now - rates.start:.0f}s{', ' + speed if speed else ''}) "
                  f"{info}", file=sys.stderr, flush=True)

    yield update_plain


def counter_callback(update: ProgressUpdate) -> Callable[[int, int], None]:
    """Adapt ``update`` to the ``progress(done, total)`` callbacks of the data layer."""
    state = {"done": 0}

    def callback(done: int, total: int) -> None:
        update(advance=done - state["done"])
        state["done"] = done

    return callback
