"""The penultimate-layer embedding of any registered classifier, by a forward hook.

Every classifier in the registry (torchvision models, the seed-paper CNNs, system
C's CNN) ends in one ``nn.Linear`` that maps its features to the class logits; the
input of that layer is the embedding an out-of-distribution score reads
(:mod:`leukoscope.evaluation.ood`). A hook on it needs no change to the models and
no second forward pass: the logits and the embedding come from the same call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EmbeddingError(ValueError):
    """The model has no final linear layer, or it did not run exactly once per forward pass."""


def final_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model``: its head (the registry's models define
    their head last, and torchvision's GoogLeNet without auxiliary heads too)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise EmbeddingError(f"{type(model).__name__} has no linear layer: no penultimate embedding to read")
    return linears[-1]


@contextmanager
def capture_embeddings(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass of ``model`` appends the input of its final linear
    layer (flattened, detached, float32 on the CPU) to the yielded list."""
    captured: list[torch.Tensor] = []
    handle = final_linear(model).register_forward_hook(
        lambda _module, inputs, _output: captured.append(inputs[0].detach().flatten(1).float().cpu()))
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def logits_and_embeddings(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, embeddings)`` of one batch of model inputs, in one forward pass."""
    with capture_embeddings(model) as captured:
        logits = model(inputs)
    if len(captured) != 1 or len(captured[0]) != len(inputs):
        # Shared heads or a head used twice would give the wrong rows: refuse rather than guess.
        raise EmbeddingError(f"the final linear layer of {type(model).__name__} ran {len(captured)} times for one "
                             f"batch: cannot read its embedding")
    return logits, captured[0]
