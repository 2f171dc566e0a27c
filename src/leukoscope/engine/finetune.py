"""Fine-tuning a trained bundle (``model.init``): which of its weights a new run starts from.

The config side (architecture, options, input size from the bundle) is resolved when the
config loads (:func:`leukoscope.engine.config.resolve_init`, no torch). Once the data's
classes are known, :func:`starting_weights` gives the model builder its ``weights``,
through the same loader as ``model.weights`` (:mod:`leukoscope.models.weights`):

- the data has the bundle's classes, in the bundle's order: the whole model, head included;
- otherwise the bundle's weights without its class layer (:class:`~leukoscope.models.WithoutHead`),
  and a class layer for the data's classes. A classifier whose class layer is linear then gets back
  that layer's rows (weights and bias) for the classes the data shares with the bundle
  (:meth:`FineTuneStart.adopt_head`), so that fine-tuning step by step keeps what the head knew; only
  the rows of new classes start afresh. One warning line names the differences and says which was done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from leukoscope.bundle import WEIGHTS_FILE, BundleInfo, read_bundle_info
from leukoscope.labels import NUCLEATED_RED_CELL_NAMES, PLATELET_NAMES, blast_classes_in, not_white_classes_in
from leukoscope.models import WithoutHead
from leukoscope.models.weights import read_state_dict
from leukoscope.pretrained import resolve_bundle
from leukoscope.progress import say


def class_difference(bundle_classes: Sequence[str], data_classes: Sequence[str]) -> str | None:
    """None when the two lists are equal; else what differs, in one phrase."""
    bundle_classes, data_classes = list(bundle_classes), list(data_classes)
    if bundle_classes == data_classes:
        return None
    if sorted(bundle_classes) == sorted(data_classes):
        return f"the same classes in another order (bundle {bundle_classes}, data {data_classes})"
    only_data = [c for c in data_classes if c not in bundle_classes]
    only_bundle = [c for c in bundle_classes if c not in data_classes]
    parts = ([f"only in the data: {only_data}"] if only_data else []) + \
        ([f"only in the bundle: {only_bundle}"] if only_bundle else [])
    spelled = {c.casefold(): c for c in only_bundle}
    renamed = [f"{c!r} is its {spelled[c.casefold()]!r}" for c in only_data if c.casefold() in spelled]
    if renamed:  # a folder "Neutrophil" would be a new class beside the bundle's "neutrophil"
        parts.append(f"spelled otherwise ({', '.join(renamed)}): rename to the bundle's spelling to keep them "
                     f"one class")
    in_data = {c.casefold() for c in only_data}
    lost = [c for c in only_bundle if c.casefold() not in in_data]
    if lost:
        parts.append(f"the new classifier will not know {', '.join(lost)}")
    blasts = blast_classes_in(lost) if not blast_classes_in(data_classes) else []  # the data's own blasts count
    if blasts:
        parts.append(f"without {', '.join(blasts)} it calls no cell a blast, and `analyze` cannot screen for "
                     f"leukemia with it (its counts say so); to keep blasts, train on the lab's blasts too")
    # each kind apart: data that keeps its erythroblasts (by any name) and loses its platelets counts platelets
    missing = frozenset().union(*(kind for kind in (PLATELET_NAMES, NUCLEATED_RED_CELL_NAMES)
                                  if not not_white_classes_in(data_classes, kind)))
    not_white = not_white_classes_in(lost, missing)
    if not_white:  # analyze counts them apart from the white cells: without them they become white cells
        parts.append(f"without {', '.join(not_white)} `analyze` calls each such cell the detector boxes one of the "
                     f"white-cell classes and counts it as a white cell, which changes the differential's "
                     f"denominator; to keep them apart, keep examples of them in the data (confirm such cells in "
                     f"the service's review instead of excluding them, or add their crops)")
    return "; ".join(parts)


def head_rows(bundle_classes: Sequence[str], data_classes: Sequence[str]) -> list[int | None]:
    """For each of the data's classes, the row of the bundle's class layer that is its (None: a new class)."""
    return [list(bundle_classes).index(c) if c in bundle_classes else None for c in data_classes]


def keep_head_rows(model: nn.Module, weights: Path, rows: Sequence[int | None], bundle_size: int) -> str | None:
    """Copy into ``model``'s class layer the rows (weights and bias) of ``weights``' class layer that ``rows``
    names; the other rows keep their initial values. The class layer is the model's last ``nn.Linear`` (every
    classifier builder's final layer, created last or put in the place of the old one); it must have one output
    per class and the file a tensor of one row per bundle class under its name. Returns the layer's name, or
    None where it is not such a layer (e.g. a one-output binary head): the head stays as built."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        return None
    name, layer = linears[-1]
    state = read_state_dict(weights)
    weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
    if (layer.out_features != len(rows) or weight is None or tuple(weight.shape) != (bundle_size, layer.in_features)
            or (bias is None) != (layer.bias is None) or (bias is not None and tuple(bias.shape) != (bundle_size,))):
        return None
    with torch.no_grad():
        for new, old in enumerate(rows):
            if old is not None:
                layer.weight[new] = weight[old]
                if bias is not None and layer.bias is not None:
                    layer.bias[new] = bias[old]
    return name


@dataclass
class FineTuneStart:
    """Where a run fine-tuning bundle ``spec`` starts: the ``weights`` to build its model with, and, once built,
    what to do with its head (:meth:`adopt_head`)."""

    spec: str
    info: BundleInfo
    classes: list[str]
    weights: Path | WithoutHead
    difference: str | None

    @property
    def _lead(self) -> str:
        return f"fine-tuning {self.spec} ({self.info.model_name})"

    def _other_order(self) -> str:
        # the advice only where the head could not be kept: with its rows reordered nothing is lost
        return ("; set data.classes to the bundle's order to keep its head"
                if sorted(self.info.classes) == sorted(self.classes) else "")

    def say_head_new(self, why: str = "") -> None:
        """The line of a start whose head is kept whole (same classes) or new (``why``: what could not be kept)."""
        if self.difference is None:
            say(f"{self._lead}: same classes, its head is kept")
            return
        say(f"[yellow]warning:[/yellow] {self._lead} on other classes: {self.difference}{self._other_order()}; "
            f"its backbone is loaded and its head is new{why}")

    def adopt_head(self, model: nn.Module) -> None:
        """After ``model`` is built from :attr:`weights`: give its class layer back the bundle's rows of the
        classes the data shares with it (a classifier whose class layer is linear), and say what was done."""
        if self.difference is None:
            self.say_head_new()
            return
        rows = head_rows(self.info.classes, self.classes)
        shared = [c for c, row in zip(self.classes, rows) if row is not None]
        if not shared:
            self.say_head_new(" (no class shared with the bundle)")
            return
        layer = keep_head_rows(model, self.weights.path if isinstance(self.weights, WithoutHead) else self.weights,
                               rows, len(self.info.classes))
        if layer is None:
            self.say_head_new(f" ({self.info.model_name}'s class layer is not a linear layer of one row per class: "
                              f"the rows of the shared classes cannot be kept)")
            return
        new = [c for c, row in zip(self.classes, rows) if row is None]
        fresh = f"; the rows of {', '.join(new)} start afresh" if new else ""
        say(f"[yellow]warning:[/yellow] {self._lead} on other classes: {self.difference}; its backbone is loaded, "
            f"and its class layer ({layer}) keeps the bundle's rows of {', '.join(shared)}{fresh}")


def fine_tuning_start(spec: str, classes: Sequence[str], task: str) -> FineTuneStart:
    """Where a model built for ``classes`` starts when fine-tuning bundle ``spec`` (a folder or
    ``pretrained:NAME``): its whole ``model.safetensors`` when the classes match, else that file without the
    class layer. Says nothing yet: :meth:`FineTuneStart.adopt_head` does, once the model is built."""
    directory = resolve_bundle(spec)
    info = read_bundle_info(directory, task=task)
    weights = directory / WEIGHTS_FILE
    difference = class_difference(info.classes, classes)
    return FineTuneStart(spec, info, list(classes), weights if difference is None else WithoutHead(weights),
                         difference)


def starting_weights(spec: str, classes: Sequence[str], task: str) -> Path | WithoutHead:
    """The ``weights`` of :func:`fine_tuning_start`, said on the run's log at once: the whole head, or a new one
    (a detector's box predictor is new whenever the classes differ)."""
    start = fine_tuning_start(spec, classes, task)
    start.say_head_new()
    return start.weights
