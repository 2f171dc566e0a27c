"""The one checkpoint format of every trainer: model, optimizer, scheduler and every random state.

A checkpoint is written after each epoch through a temporary file (replaced
atomically) and loaded on the CPU: the random-number states must stay CPU
tensors; model and optimizer state are moved to the model's device by
``load_state_dict``. Everything else a trainer needs to continue (history,
best epoch and weights...) travels in ``progress``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
log = logging.getLogger(__name__)


def _rng_states() -> dict[str, Any]:
    """Python and NumPy random states in a form ``torch.load(weights_only=True)`` accepts."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt_state), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def _restore_rng_states(states: dict[str, Any]) -> None:
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _cuda_rng_state(model: torch.nn.Module) -> torch.Tensor:
    """The CUDA generator state of the device the model trains on (empty on the CPU)."""
    device = _device_of(model)
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0, dtype=torch.uint8)


def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, generator: torch.Generator, progress: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        # dropout on a GPU draws from the training device's CUDA generator: without it a resumed run drifts
        "cuda_rng": _cuda_rng_state(model),
        "rng": _rng_states(),
        "progress": progress,
    }, tmp)
    tmp.replace(path)


def trained_epochs(path: Path) -> int | None:
    """The epochs a checkpoint holds (None without one), read before any data or model is built."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mapped: no weights are read
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged file fails in many ways
        raise ValueError(f"cannot resume: {path} cannot be read ({exc}); the run cannot go on from it") from None
    epoch = state.get("progress", state).get("epoch") if isinstance(state, dict) else None
    return int(epoch) if epoch is not None else None


def check_resume_epochs(trained: int, epochs: int) -> None:
    """A resumed run goes on to ``epochs``: never fewer than it has trained."""
    if trained > epochs:
        raise ValueError(f"train.epochs={epochs} is below the {trained} epochs this run has already trained; "
                         f"resume with train.epochs={trained} or more")


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns its ``progress``."""
    if not path.exists():
        hint = ("; the run completed and removed it (train.keep_checkpoint=true keeps it for training further)"
                if (path.parent / "bundle").is_dir() else "")
        raise FileNotFoundError(f"cannot resume: no {path.name} in {path.parent}{hint}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "progress" not in state:  # written before the shared scaffold: the same entries, at the top level
        state["progress"] = {k: v for k, v in state.items()
                             if k not in ("model", "optimizer", "scheduler", "generator", "torch_rng", "cuda_rng",
                                          "rng")}
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    cuda_state, device = state.get("cuda_rng"), _device_of(model)
    if isinstance(cuda_state, torch.Tensor) and cuda_state.numel():
        if device.type == "cuda":
            torch.cuda.set_rng_state(cuda_state, device)
        else:
            log.warning("the checkpoint was trained on a GPU and resumes on the %s: dropout's random numbers "
                        "differ from the uninterrupted run's", device)
    if "rng" in state:  # detection checkpoints before the shared scaffold had no Python/NumPy states
        _restore_rng_states(state["rng"])
    return state["progress"]
