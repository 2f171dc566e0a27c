"""A torch dataset over a manifest, with the corrupt-image policy in one place.

Images are decoded and letterboxed once, then kept as uint8 tensors in memory
(a 2,768-image set at 128 px is ~140 MB), so each epoch only pays for
augmentation: on a 2-core CPU decoding every epoch would cost more than the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from leukoscope.data.manifest import DatasetError, Manifest
from leukoscope.io import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from leukoscope.progress import name_some

log = logging.getLogger(__name__)

CorruptPolicy = Literal["skip", "fail"]


@dataclass
class LoadReport:
    """What happened while decoding a dataset; goes into metrics.json and the report."""

    loaded: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    sides: list[tuple[int, str]] = field(default_factory=list)
    """Each loaded image's longer side and file name (:func:`odd_sizes`)."""
    oblong: list[str] = field(default_factory=list)
    """The file names of loaded images far from square (:func:`oblong_images`)."""

    def as_dict(self) -> dict:
        return {"loaded": self.loaded, "skipped": len(self.skipped), "skipped_files": self.skipped}


#: How a training run skips unreadable images: a config key (train has no --on-corrupt option; it was advised).
TRAINING_SKIP = "data.on_corrupt=skip, in the config or as an override on the command line"


def decode_manifest(
    manifest: Manifest,
    to_pixels: Callable[..., torch.Tensor],
    *,
    on_corrupt: CorruptPolicy = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
    skip_with: str = TRAINING_SKIP,
    with_path: bool = False,
) -> tuple[torch.Tensor, Manifest, LoadReport]:
    """Decode every image once: returns (uint8 N x 3 x S x S, the manifest of the kept images, report).

    ``to_pixels`` turns a decoded PIL image into a uint8 ``(3, S, S)`` tensor: a
    bundle's or a config's :meth:`leukoscope.preprocessing.Preprocessing.pixels`; with ``with_path`` it is
    called with the image's path too (``to_pixels(image, path)``: what its file records, such as a scale).

    ``on_corrupt='skip'`` drops unreadable images with a warning and records them;
    ``'fail'`` raises on the first one, its message saying how to skip them: ``skip_with``, the setting of
    the command at hand (train's config key; evaluate's option).
    """
    if on_corrupt not in ("skip", "fail"):
        raise ValueError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
    report = LoadReport()
    tensors: list[torch.Tensor] = []
    keep: list[bool] = []
    for index, sample in enumerate(manifest):
        try:
            image = load_image(sample.path, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            if on_corrupt == "fail":
                raise DatasetError(f"corrupt image in dataset (skip such files and count them in the report with "
                                   f"{skip_with}): {exc}") from None
            log.warning("skipping unreadable image: %s", exc)
            report.skipped.append({"path": str(sample.path), "error": str(exc)})
            keep.append(False)
        else:
            tensors.append(to_pixels(image, sample.path) if with_path else to_pixels(image))
            keep.append(True)
            report.sides.append((max(image.size), sample.path.name))
            if max(image.size) > OBLONG_RATIO * min(image.size):
                report.oblong.append(sample.path.name)
        if progress:
            progress(index + 1, len(manifest))
    report.loaded = len(tensors)
    if not tensors:
        raise DatasetError(f"none of the {len(manifest)} images could be read")
    return torch.stack(tensors), manifest.filter(keep), report


#: An image whose longer side is this many times the set's median, or its inverse, is named as an odd size.
ODD_SIZE_FACTOR = 4.0


def odd_sizes(sides: list[tuple[int, str]]) -> str | None:
    """What to say of images far larger or smaller than the set's median (None: nothing). Every image is brought
    to one input size, so a whole field among one microscope's cell crops (or a tight 64 px crop among 300 px
    ones) shows its cell at another magnification than the rest: a lab's fine-tuning set mixed both without a
    word. (Crops of several sources at one physical window differ in pixels for good reason: callers ask this
    of one lab's set.)"""
    if len(sides) < 3:
        return None
    median = float(np.median([side for side, _ in sides]))
    odd = [name for side, name in sides if side > ODD_SIZE_FACTOR * median or side * ODD_SIZE_FACTOR < median]
    if not odd:
        return None
    return (f"{len(odd)} of {len(sides)} images are over {ODD_SIZE_FACTOR:g} times larger or smaller than the "
            f"median ({round(median)} px a side): whole fields or tight crops among cell images? each is brought "
            f"to one input size, so their cells look bigger or smaller than the others' ({name_some(odd, 5)})")


#: An image whose sides differ by more than this factor is no cell cut at a physical window (those are square).
OBLONG_RATIO = 1.2


def oblong_images(names: list[str], loaded: int) -> str | None:
    """What to say of images far from square among crops cut at a physical window (None: nothing): such crops are
    square (`analyze --cells`, the service's export, a window padded at a field's edge), a field (4:3) or a
    photograph is not; their pixel sizes differ rightly (one window at two magnifications: 290 px and 52 px), so
    :func:`odd_sizes` cannot tell."""
    if not names:
        return None
    return (f"{len(names)} of {loaded} images are not square (sides more than {OBLONG_RATIO:g} times apart), while "
            f"cells cut at the model's window are: whole fields or photographs among the cells? each is brought to "
            f"one input size, so their cells look smaller than the others' ({name_some(names, 5)})")


class TensorImageDataset(Dataset):
    """Decoded uint8 images + targets; applies augmentation then normalisation per item."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: list[int] | None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None,
        normalize: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.images = images
        self.targets = targets
        self.augment = augment
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        target = self.targets[index] if self.targets is not None else -1
        return self.normalize(image), target
