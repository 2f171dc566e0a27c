"""Which tiles to analyse, and when to stop: a seeded random order, analysed until enough white
cells are counted (200 by default, as in a manual differential) or the tiles run out.

The order is fixed by the seed, and results are taken in that order whatever the number of
workers (threads here, or Ray actors through ``submit``): with more workers a few tiles past the
stopping point may be analysed, but they are never counted, so the count is the same as with one.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


def sample_order(n: int, seed: int) -> list[int]:
    """A random permutation of ``range(n)``, the same for the same seed."""
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


@dataclass
class Sampled(Generic[T, R]):
    """The items analysed in order (with their results) until the target was reached."""

    items: list[T]
    results: list[R]
    counts: list[int]
    target: int
    available: int
    """How many items there were to sample from."""
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def reached(self) -> bool:
        return self.total >= self.target


def sample_until(items: Sequence[T], analyse: Callable[[T], R] | None, count: Callable[[R], int], target: int, *,
                 seed: int = 0, workers: int = 1, progress: Callable[..., None] | None = None,
                 submit: Callable[[T], Future[R]] | None = None) -> Sampled[T, R]:
    """Analyse ``items`` in a seeded random order, ``workers`` at a time, until the counts of the
    results taken in that order reach ``target``; warn when the items run out first.

    ``analyse`` runs in a pool of ``workers`` threads; or ``submit`` starts the analysis of an item
    elsewhere (a Ray actor) and returns its future, ``workers`` of them in flight at a time."""
    if target < 1:
        raise ValueError(f"the target number of cells must be at least 1, got {target}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if (analyse is None) == (submit is None):
        raise ValueError("give either analyse (run in threads here) or submit (run elsewhere)")
    order = [items[i] for i in sample_order(len(items), seed)]
    done = Sampled[T, R]([], [], [], int(target), len(items))
    with ExitStack() as stack:
        if submit is None:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers))
            submit = lambda item: pool.submit(analyse, item)  # noqa: E731
        pending: deque[tuple[T, Future[R]]] = deque()
        upcoming = iter(order)

        def start_next() -> None:
            item = next(upcoming, None)
            if item is not None:
                pending.append((item, submit(item)))

        for _ in range(workers):
            start_next()
        while pending and done.total < target:
            item, future = pending.popleft()
            result = future.result()
            done.items.append(item)
            done.results.append(result)
            done.counts.append(int(count(result)))
            if progress is not None:
                progress(advance=1, info=f"{done.total}/{target} cells")
            if done.total < target:
                start_next()
        for _, future in pending:
            future.cancel()
    if not done.reached:
        done.warnings.append(f"Only {done.total} white cells in all {len(items)} monolayer tile(s), fewer than the "
                             f"target {target}: every one was analysed and all its white cells counted.")
    return done
