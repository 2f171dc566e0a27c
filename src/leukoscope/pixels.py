"""Pixel conventions every image path shares, with numpy and PIL only: ImageNet's channel
statistics (the default normalisation) and the letterbox resize that makes a cell image square."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """Resize the longer side to ``size`` keeping the aspect ratio, pad to ``size x size``.

    The pad colour is the median colour of the image border, so the padding looks
    like slide background instead of a black frame the model could learn from.
    """
    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if (new_w, new_h) == (size, size):
        return resized
    array = np.asarray(resized)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def is_grayscale(image: Image.Image) -> bool:
    """Whether an RGB image (a field, a cell) holds grey levels only (its channels differ by at most 2 anywhere,
    on a sample): `analyze` and `predict` warn of it, stains telling white cells apart by their colour."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert copies even an RGB image (40 Mpx: 120 MB)
    sample = np.asarray(rgb.reduce(max(1, max(image.size) // 512)), dtype=np.int16)
    return bool(np.abs(sample - sample[..., :1]).max() <= 2)
