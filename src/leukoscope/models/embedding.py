"""The embedding an out-of-distribution score reads, by forward hooks.

Every classifier in the registry (torchvision models, the seed-paper CNNs, system
C's CNN) ends in one ``nn.Linear`` that maps its features to the class logits; the
input of that layer is the penultimate embedding. A hook on it needs no change to
the models and no second forward pass: the logits and the embedding come from the
same call.

A model may also have **stages** (named submodules, e.g. ``features.3``) whose
outputs, averaged over the image, are put in front of the penultimate embedding:
the embedding is then ``[stage 1 | ... | stage k | penultimate]``, and the OOD score
reads each part on its own (Lee et al. 2018's feature ensemble;
:mod:`leukoscope.evaluation.ood`). Early stages see stain, texture and sharpness,
which a trained head learns to ignore and which is what differs between labs
(docs/benchmarks.md: the shipped MobileNetV2's AUROC on BCCD's cells 0.86 -> 0.96).
Which stages a model reads is set on the model (:func:`set_embedding_stages`): by a
bundle's OOD statistics when it is loaded, by :data:`DEFAULT_STAGES` when they are fitted.
"""

from __future__ import annotations

import difflib
import threading
from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn


class EmbeddingError(ValueError):
    """The model has no final linear layer, a stage it names is missing, or a hooked layer did not
    run exactly once per forward pass."""


#: Stages read beside the penultimate embedding, per architecture: MobileNetV2's inverted-residual
#: blocks at the end of the 56, 28 and 14 px resolutions of a 224 px input (blocks 3, 6, 13), the
#: middle of the 14 px ones (10) and the last block before the final 1x1 convolution (16; block
#: 18, that convolution, is what the penultimate embedding averages). Measured for mobilenet_v2
#: only (the shipped classifier); other architectures read the penultimate embedding alone until
#: measured (``calibrate-ood --stages`` names stages for any model).
DEFAULT_STAGES: dict[str, tuple[str, ...]] = {
    "mobilenet_v2": ("features.3", "features.6", "features.10", "features.13", "features.16"),
}

#: The attribute of a model that names its stages (a tuple of submodule names; absent = none).
_STAGES_ATTRIBUTE = "leukoscope_embedding_stages"


def default_stages(model_name: str) -> tuple[str, ...]:
    """The stages the OOD statistics of a ``model_name`` classifier read by default."""
    return DEFAULT_STAGES.get(model_name, ())


def set_embedding_stages(model: nn.Module, stages: Sequence[str]) -> None:
    """Make ``model``'s embedding ``[stages | penultimate]``; every name must be a submodule."""
    names = tuple(stages)
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            # the names one level below the last that exists: what could have been meant (typed by hand)
            parent = name.rpartition(".")[0]
            try:
                children = [f"{parent}.{child}" if parent else child for child, _ in
                            model.get_submodule(parent).named_children()]
            except AttributeError:
                parent, children = "", [child for child, _ in model.named_children()]
            close = difflib.get_close_matches(name, children, n=1)
            raise EmbeddingError(f"{type(model).__name__} has no submodule {name!r} to read as an embedding stage"
                                 f"{f' (did you mean {close[0]!r}?)' if close else ''}; "
                                 f"{'under ' + repr(parent) if parent else 'at its top'}: "
                                 f"{', '.join(children[:20])}{', ...' if len(children) > 20 else ''}") from None
    for name in names:
        # One module's output once: a repeat or a module inside another stage reads the same pixels twice.
        if names.count(name) > 1 or any(other.startswith(name + ".") for other in names):
            raise EmbeddingError(f"embedding stage {name!r} is named twice or holds another stage: name each "
                                 f"stage once, none inside another")
    setattr(model, _STAGES_ATTRIBUTE, names)


def embedding_stages(model: nn.Module) -> tuple[str, ...]:
    """The stages ``model``'s embedding reads before its penultimate layer (empty: that layer alone)."""
    return tuple(getattr(model, _STAGES_ATTRIBUTE, ()))


def final_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model``: its head (the registry's models define
    their head last, and torchvision's GoogLeNet without auxiliary heads too)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise EmbeddingError(f"{type(model).__name__} has no linear layer: no penultimate embedding to read")
    return linears[-1]


def _pooled(output: torch.Tensor) -> torch.Tensor:
    """A stage's output averaged over its spatial axes: one value per channel."""
    return (output.mean(dim=(2, 3)) if output.dim() == 4 else output.flatten(1)).detach().float().cpu()


@contextmanager
def capture_embeddings(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass of ``model`` appends its embedding (flattened, detached,
    float32 on the CPU) to the yielded list: the input of its final linear layer, after the
    spatially averaged outputs of its stages (:func:`set_embedding_stages`) when it has any."""
    captured: list[torch.Tensor] = []
    stages = embedding_stages(model)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in stages}
    # Hooks fire for every forward pass of the model, from any thread: another thread's pass through
    # the same model (the service runs smear fields on worker threads) must not land in this list.
    owner = threading.get_ident()

    def stage(name: str, output: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            parts[name].append(_pooled(output))

    def penultimate(_module, inputs, _output) -> None:
        if threading.get_ident() != owner:
            return
        embedding = inputs[0].detach().flatten(1).float().cpu()
        if stages:
            if any(len(parts[name]) != 1 for name in stages):
                counts = {name: len(parts[name]) for name in stages}
                raise EmbeddingError(f"the stages of {type(model).__name__} did not each run once before its head: "
                                     f"{counts}")
            embedding = torch.cat([parts[name].pop() for name in stages] + [embedding], dim=1)
        captured.append(embedding)

    with ExitStack() as hooks:
        for name in stages:
            handle = model.get_submodule(name).register_forward_hook(
                lambda _module, _inputs, output, name=name: stage(name, output))
            hooks.callback(handle.remove)
        hooks.callback(final_linear(model).register_forward_hook(penultimate).remove)
        yield captured


def embedding_widths(model: nn.Module, inputs: torch.Tensor) -> tuple[int, ...]:
    """The width of each part of ``model``'s embedding (its stages', then the penultimate one's),
    read from one forward pass of ``inputs``."""
    stages = embedding_stages(model)
    widths: dict[str, int] = {}  # by stage name: the embedding keeps the named order, not the run order
    training = model.training
    model.eval()  # one image through batch statistics would fail in training mode

    owner = threading.get_ident()

    def record(name: str, value: torch.Tensor) -> None:  # a hook that returned a value would replace the output
        if threading.get_ident() == owner:
            widths[name] = int(value.shape[1])

    with ExitStack() as hooks, torch.no_grad():
        hooks.callback(model.train, training)
        for name in stages:
            hooks.callback(model.get_submodule(name).register_forward_hook(
                lambda _m, _i, output, name=name: record(name, _pooled(output[:1]))).remove)
        hooks.callback(final_linear(model).register_forward_hook(
            lambda _m, inputs_, _o: record("", inputs_[0][:1].flatten(1))).remove)
        model(inputs[:1])
    return tuple(widths[name] for name in (*stages, ""))


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
