"""Seeding and device choice, the same for every trainer."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str, deterministic: bool = True) -> torch.device:
    """The training device; on a GPU with ``deterministic``, PyTorch's deterministic kernels: CUDA's
    default ones (atomic adds in RoIAlign's and pooling's backward passes, cuBLAS's split reductions)
    sum in a different order each run, so that a seeded detector run was not repeatable there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    device = torch.device(name)
    if device.type == "cuda" and deterministic:
        # cuBLAS reads this when it creates a handle; ops with no deterministic kernel warn, not fail.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
