"""Augmentation presets (random, training split only; the deterministic letterbox and
normalisation are :mod:`leukoscope.preprocessing`'s). A preset is named:

- ``none``: no augmentation.
- ``tusar`` (system D): shear 0.2, zoom 0.2, horizontal flip (Keras ImageDataGenerator).
- ``abas`` (system A): colour jitter, horizontal and vertical flips, rotation 0-90 degrees.
- ``jabeena`` (system C): random 90-degree rotations.
- ``stain``: stain (H&E/Giemsa optical-density) jitter and colour jitter, flips, 90-degree rotations.
- ``geometric``: flips and 90-degree rotations only (cells have no "up"; cheapest).
- ``default``: flips, 90-degree rotations, mild colour and stain jitter, small zoom.

Colour jitter leaves hue alone: torchvision's hue jitter costs ~35 ms per 128 px
image on 2 CPU cores (minutes per epoch), and stain jitter already shifts hue.

Augmentations work on uint8 tensors already letterboxed, so that decoding and
resizing happen once per image (see :mod:`leukoscope.data.dataset`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torchvision.transforms import v2

from leukoscope.presets import AUGMENTATION_PRESETS  # noqa: F401 - re-exported: the names of the presets built here

class RandomRot90:
    """Rotate by a random multiple of 90 degrees (lossless, keeps the square)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1)) if k else image


class RandomStainJitter:
    """Jitter stain concentrations in haematoxylin-eosin-DAB optical density space.

    Tellez et al. (2018) showed this makes models robust to stain differences
    between labs; it also weakens shortcuts where a class comes from one slide.
    Input and output: uint8 tensor (3, H, W).
    """

    # Ruifrok & Johnston stain vectors (as in skimage.color.rgb_from_hed).
    _RGB_FROM_HED = torch.tensor(
        [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
    )

    def __init__(self, sigma: float = 0.05, bias: float = 0.05) -> None:
        self.sigma, self.bias = sigma, bias
        rgb_from_hed = self._RGB_FROM_HED.clone()
        rgb_from_hed[2] = torch.linalg.cross(rgb_from_hed[0], rgb_from_hed[1])
        rgb_from_hed = rgb_from_hed / rgb_from_hed.norm(dim=1, keepdim=True)
        self.rgb_from_hed = rgb_from_hed
        self.hed_from_rgb = torch.linalg.inv(rgb_from_hed)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        rgb = image.float().clamp_min(1.0) / 255.0
        od = -torch.log(rgb).permute(1, 2, 0)  # (H, W, 3)
        hed = od @ self.hed_from_rgb
        alpha = 1 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.bias
        od = (hed * alpha + beta) @ self.rgb_from_hed
        out = torch.exp(-od).clamp(0, 1).permute(2, 0, 1)
        return (out * 255).round().to(torch.uint8)


class OnBorderColour:
    """``transform`` (an affine map or a rotation, which fill what they uncover with black) with what it
    uncovers in the image's own border colour, as letterboxing pads: a black frame only training images have
    is a cue no validation or test image shows. Input and output: uint8 tensor (3, H, W)."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
        colour = border.float().median(dim=1).values[:, None, None]
        moved = self.transform(image.float() - colour)  # the border colour at 0, which the transform fills
        return (moved + colour).round().clamp(0, 255).to(torch.uint8)


class RandomResolution:
    """With probability ``p``, blur the image to a coarser pixel size and back.

    Sources differ in resolution as well as stain: an all-taleqani cell brought to the
    common scale is upsampled from ~0.47 um/px, a pbc cell downsampled from ~0.10 um/px.
    A model trained on both could tell them apart by sharpness alone; degrading sharp
    images at random removes that cue. Input and output: uint8 tensor (3, H, W)."""

    def __init__(self, max_factor: float = 3.0, p: float = 0.5) -> None:
        if max_factor < 1.0:
            raise ValueError(f"max_factor must be at least 1, got {max_factor}")
        self.max_factor, self.p = max_factor, p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return image
        factor = 1.0 + float(torch.rand(())) * (self.max_factor - 1.0)
        height, width = image.shape[-2:]
        small = (max(4, round(height / factor)), max(4, round(width / factor)))
        coarse = v2.functional.resize(image, list(small), antialias=True)
        return v2.functional.resize(coarse, [height, width], antialias=True)


def augmentation(preset: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The random training augmentation named ``preset`` (uint8 tensor in and out)."""
    # System D's "shear 0.2" (Keras shear_range). Keras reads it in degrees, which makes
    # 0.2 a no-op shear of a fifth of a degree; we read it as 0.2 rad (11.5 degrees), the
    # shear the paper evidently meant to apply (docs/published-systems.md).
    shear_degrees = math.degrees(0.2)
    presets: dict[str, Sequence[Callable]] = {
        "none": [],
        "tusar": [
            OnBorderColour(v2.RandomAffine(degrees=0, shear=shear_degrees, scale=(0.8, 1.2))),
            v2.RandomHorizontalFlip(),
        ],
        "abas": [
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            OnBorderColour(v2.RandomRotation(degrees=(0, 90))),
        ],
        "jabeena": [RandomRot90()],
        "geometric": [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()],
        "stain": [
            RandomStainJitter(sigma=0.08, bias=0.08),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomRot90(),
        ],
        # Cells of several labs at one physical scale (the shipped classifier, bench/zoo.py):
        # strong stain and colour jitter and random loss of sharpness, so that neither a
        # lab's stain nor its optics identifies the class.
        "cross_source": [
            RandomStainJitter(sigma=0.12, bias=0.12),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.25, hue=0.04),
            v2.RandomGrayscale(p=0.1),  # now and then, shape and texture alone
            RandomResolution(max_factor=3.0, p=0.5),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomRot90(),
        ],
        "default": [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomRot90(),
            v2.RandomApply([OnBorderColour(v2.RandomAffine(degrees=0, scale=(0.9, 1.1)))], p=0.5),
            RandomStainJitter(sigma=0.04, bias=0.04),
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
        ],
    }
    if preset not in presets:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose from {list(presets)}")
    # v2.Compose refuses an empty list ("Pass at least one transform"): 'none' is the identity.
    return v2.Compose(list(presets[preset]) or [v2.Identity()])
