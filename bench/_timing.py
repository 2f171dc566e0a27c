"""Timing shared by the speed benchmarks: the median wall time of a call after a warm-up."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn``, after one untimed warm-up call
    (first calls pay for lazy set-up: onnxruntime and OpenVINO plan their first run, torch its kernels)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
