"""Seeding and device choice, the same for every trainer."""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # (cuDNN's algorithm choice: deterministic_kernels, by train.deterministic)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    return torch.device(name)


@contextmanager
def deterministic_kernels(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """While training on a GPU with ``enabled``: PyTorch's deterministic kernels. CUDA's default ones
    (atomic adds in RoIAlign's and pooling's backward passes, cuBLAS's split reductions) sum in another
    order each run, so a seeded detector run did not repeat there. On CUDA, torchvision then runs
    RoIAlign as a ``torch.compile``d function (Triton: compiled on the first batch); ops without a
    deterministic kernel (``adaptive_avg_pool2d``'s backward) warn and stay as they are. The previous
    setting is restored afterwards (it is process-wide: inference after training keeps CUDA's own
    kernels). The CPU's kernels are deterministic already: nothing changes there. cuDNN follows ``enabled``
    too: its deterministic convolutions, or (false) the fastest it benchmarks (seed_everything set the
    deterministic ones for the process whatever was asked)."""
    if device.type != "cuda":
        yield
        return
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = enabled, not enabled
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if enabled:
        # cuBLAS reads this when it creates a handle (set for the process: harmless for later work).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
