"""Box-aware augmentation for detection: the boxes move with the image.

Flips and 90-degree rotations are exact for axis-aligned boxes (a rotation by
an arbitrary angle would inflate every box, so system A's "random rotation
0-90 degrees" is done as random quarter turns plus flips, which together give
all eight symmetries of the square). Colour jitter and stain jitter (in
haematoxylin-eosin optical density, :class:`~leukoscope.transforms.RandomStainJitter`,
for detectors that must work on another lab's stain) touch pixels only.

Images are uint8 tensors (3, H, W); boxes float tensors (N, 4) in pixels, xyxy.
"""

from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

from leukoscope.transforms import RandomStainJitter

BoxTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], tuple[torch.Tensor, torch.Tensor]]

DETECTION_AUGMENTATIONS: tuple[str, ...] = ("none", "flips", "default", "abas", "stain")


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = image.shape[-1]
    out = boxes.clone()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return image.flip(-1), out


def vflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    height = image.shape[-2]
    out = boxes.clone()
    out[:, 1], out[:, 3] = height - boxes[:, 3], height - boxes[:, 1]
    return image.flip(-2), out


def rot90(image: torch.Tensor, boxes: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate counter-clockwise by ``k`` quarter turns (as :func:`torch.rot90` on H, W)."""
    k %= 4
    for _ in range(k):
        width = image.shape[-1]
        if len(boxes):
            # (x, y) -> (y, W - x) for a counter-clockwise quarter turn of an (H, W) image.
            x0, y0, x1, y1 = boxes.unbind(-1)
            boxes = torch.stack([y0, width - x1, y1, width - x0], dim=-1)
        image = torch.rot90(image, 1, dims=(-2, -1))
    return image, boxes


class DetectionAugment:
    """Random flips, quarter turns and colour jitter, applied to an image and its boxes."""

    def __init__(self, flips: bool = True, rotate: bool = True, colour: float = 0.0, stain: float = 0.0) -> None:
        self.stain = RandomStainJitter(sigma=stain, bias=stain) if stain > 0 else None
        self.flips = flips
        self.rotate = rotate
        self.colour = v2.ColorJitter(brightness=colour, contrast=colour, saturation=colour,
                                     hue=min(0.05, colour / 4)) if colour > 0 else None

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        def coin() -> bool:
            return bool(torch.rand(1, generator=generator) < 0.5)

        if self.flips:
            if coin():
                image, boxes = hflip(image, boxes)
            if coin():
                image, boxes = vflip(image, boxes)
        if self.rotate:
            k = int(torch.randint(0, 4, (1,), generator=generator))
            if k:
                image, boxes = rot90(image, boxes, k)
        if self.stain is not None:
            image = self.stain(image)
        if self.colour is not None:
            image = self.colour(image)
        return image.contiguous(), boxes


def detection_augmentation(preset: str) -> DetectionAugment | None:
    """``none``; ``flips``; ``default`` (flips, quarter turns, mild colour jitter);
    ``abas`` (system A: colour jitter, horizontal/vertical reflection, rotation);
    ``stain`` (flips, quarter turns, strong stain and colour jitter: other labs' stains)."""
    if preset == "none":
        return None
    if preset == "flips":
        return DetectionAugment(flips=True, rotate=False)
    if preset == "default":
        return DetectionAugment(flips=True, rotate=True, colour=0.1)
    if preset == "abas":
        return DetectionAugment(flips=True, rotate=True, colour=0.2)
    if preset == "stain":
        return DetectionAugment(flips=True, rotate=True, colour=0.2, stain=0.1)
    raise ValueError(f"unknown detection augmentation {preset!r}; choose from {list(DETECTION_AUGMENTATIONS)}")
