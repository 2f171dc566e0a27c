"""The dark surround of a microscope field: what lies outside the field of view.

A camera on an eyepiece adapter sees a round field of view on black; a scan may be padded with
black. That black is no part of the smear, yet it took part in everything measured over the whole
image: Otsu's threshold of the red-cell scale fell to 0 (no object darker than black, so no scale),
and the detector, whose features pool over the whole image, found no white cell at all in a field
framed by black (`leukoscope analyze` on CBC fields padded with 20 px of black). The surround is
found here and painted in the smear's own background colour before those steps; the pictures a user
sees keep it as it was.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

#: A pixel is black (outside the field of view) when none of its channels is brighter than this: far
#: darker than any stain seen through a lit field (a nucleus's darkest channel is well above it).
DARK_LEVEL = 30
#: The surround must cover at least this share of the image (a dark speck at the border is no surround).
MIN_SHARE = 0.002
#: The side the surround is looked for at (a 100 Mpx field is not labelled at full size).
_MASK_SIDE = 1024


def outside_mask(pixels: np.ndarray) -> np.ndarray | None:
    """Which pixels of an RGB ``uint8`` array are outside the field of view: black, and joined to the image's
    border by black; None when there are none (or too few to matter), or when nothing else is left."""
    dark = pixels.max(axis=-1) <= DARK_LEVEL
    border = np.concatenate([dark[0], dark[-1], dark[:, 0], dark[:, -1]])
    if not border.any():  # the common case, answered without labelling
        return None
    labels, _ = ndimage.label(dark)
    touching = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, touching[touching > 0])
    share = float(outside.mean())
    if share < MIN_SHARE or share > 0.98:
        return None
    return outside


def background_colour(pixels: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """The smear's background (the glass between cells) inside the field of view: the median colour of the
    brighter half of the lit pixels by green, where cells absorb most."""
    inside = pixels[~outside]
    green = inside[:, 1]
    bright = inside[green >= np.median(green)]
    return np.median(bright, axis=0).astype(np.uint8)


def filled_field(image: Image.Image) -> Image.Image:
    """An RGB field with its surround outside the field of view painted in the background's colour, found on a
    copy at most :data:`_MASK_SIDE` pixels a side (the field itself when it has none)."""
    factor = min(1.0, _MASK_SIDE / max(image.size))
    small = image if factor == 1.0 else image.resize(
        (max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.Resampling.NEAREST)
    pixels = np.asarray(small)
    outside = outside_mask(pixels)
    if outside is None:
        return image
    colour = tuple(int(v) for v in background_colour(pixels, outside))
    if factor < 1.0:  # two pixels more of the small copy: the enlarged mask's steps leave no black rim
        outside = ndimage.binary_dilation(outside, iterations=2)
    mask = Image.fromarray(outside.astype(np.uint8) * 255)
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
    return Image.composite(Image.new("RGB", image.size, colour), image, mask)
