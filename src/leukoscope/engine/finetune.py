"""Fine-tuning a trained bundle (``model.init``): which of its weights a new run starts from.

The config side (architecture, options, input size from the bundle) is resolved when the
config loads (:func:`leukoscope.engine.config.resolve_init`, no torch). Once the data's
classes are known, :func:`starting_weights` gives the model builder its ``weights``,
through the same loader as ``model.weights`` (:mod:`leukoscope.models.weights`):

- the data has the bundle's classes, in the bundle's order: the whole model, head included;
- otherwise the bundle's weights without its head (:class:`~leukoscope.models.WithoutHead`),
  and a new head for the data's classes, with one warning line naming the differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from leukoscope.bundle import WEIGHTS_FILE, read_bundle_info
from leukoscope.labels import blast_classes_in, not_white_classes_in
from leukoscope.models import WithoutHead
from leukoscope.pretrained import resolve_bundle
from leukoscope.progress import say


def class_difference(bundle_classes: Sequence[str], data_classes: Sequence[str]) -> str | None:
    """None when the two lists are equal; else what differs, in one phrase."""
    bundle_classes, data_classes = list(bundle_classes), list(data_classes)
    if bundle_classes == data_classes:
        return None
    if sorted(bundle_classes) == sorted(data_classes):
        return (f"the same classes in another order (bundle {bundle_classes}, data {data_classes}; "
                f"set data.classes to the bundle's order to keep its head)")
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
    not_white = not_white_classes_in(lost) if not not_white_classes_in(data_classes) else []
    if not_white:  # analyze counts them apart from the white cells: without them they become white cells
        parts.append(f"without {', '.join(not_white)} `analyze` calls each such cell the detector boxes one of the "
                     f"white-cell classes and counts it as a white cell, which changes the differential's "
                     f"denominator; to keep them apart, keep examples of them in the data (confirm such cells in "
                     f"the service's review instead of excluding them, or add their crops)")
    return "; ".join(parts)


def starting_weights(spec: str, classes: Sequence[str], task: str) -> Path | WithoutHead:
    """The ``weights`` a model built for ``classes`` starts from when fine-tuning bundle ``spec``
    (a folder or ``pretrained:NAME``): its whole ``model.safetensors`` when the classes match,
    else that file without the head. Says which, on the run's log."""
    directory = resolve_bundle(spec)
    info = read_bundle_info(directory, task=task)
    weights = directory / WEIGHTS_FILE
    difference = class_difference(info.classes, classes)
    if difference is None:
        say(f"fine-tuning {spec} ({info.model_name}): same classes, its head is kept")
        return weights
    say(f"[yellow]warning:[/yellow] fine-tuning {spec} ({info.model_name}) on other classes: {difference}; "
        f"its backbone is loaded and its head is new")
    return WithoutHead(weights)
