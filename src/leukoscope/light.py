"""The light a field (or a single-cell image) was photographed in, against the light of a classifier's
training images.

A classifier that types white cells by their colours (the shipped one does: docs/benchmarks.md) takes a
camera's white balance for part of the cell, and its out-of-distribution flag can be fooled the same way:
the robustness review's 98 BCCD fields were 98 of 98 unfamiliar as given, and 25 of 103 once multiplied by
(0.80, 0.92, 1.15), a camera set a little blue, with 102 of the 103 cells called lymphocyte. So the colour of each
field's background (its white point, :func:`leukoscope.stain.white_point`), as a chromaticity
(ln(R/G), ln(B/G): the same whatever the exposure), is compared with the range of the classifier's
training images, recorded with its OOD statistics (``light`` in the bundle's ``ood`` entry); a field
outside it is said, and its leukemia flag withheld; a single-cell image (`predict`, the service's cell
cases) is read the same way on the window the classifier saw.

A classifier that normalises each image's light or stain itself (``data.stain``) gets no range: the
light of a field does not reach it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

from leukoscope.stain import DARK, SEGMENTED_SHARE, white_point

#: Beyond the training range, this much (natural log of one channel's gain against green) is still the
#: same light: about 8%. (Measured, docs/benchmarks.md: 200 fields of each of pbc, all-taleqani, BCCD and CBC
#: all fall inside the shipped classifier's range with it; a camera set blue by 15-20% falls outside.)
MARGIN = 0.08
#: The share of training white points left out at each end of the range (odd crops without glass in view).
TAIL = 0.01
#: Fewer training images with a white point than this and no range is recorded.
MIN_IMAGES = 10
#: Fields are reduced to at most this longest side before their white point is taken.
FIELD_SIDE = 1024
#: A single-cell image's window likewise: the training range was read from the model's inputs (96 px for the
#: shipped classifier); a median of the brightest pixels does not need more, and a 1000 px window took 72 ms.
CELL_SIDE = 128
#: Luma (ITU-R BT.601) weights of R, G, B.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
#: A background is brighter than the stained cells in view: an image whose darkest lit pixels (the darkest
#: :data:`DARKEST_SHARE`) come within this many grey levels of its white point shows no background to read (a flat
#: colour, a crop of cytoplasm alone).
MIN_CONTRAST = 40.0
#: 1%, not 5%: in a sparse field white cells are under 5% of the pixels, and pale red cells came within 40 levels of
#: a bluish background (44 of 2,768 all-taleqani fields lost their light warning with 5%; none with 1%).
DARKEST_SHARE = 0.01
#: A field's lit share may be this low: a round eyepiece field of view in a 4:3 frame is about 59% lit.
FIELD_LIT_SHARE = 0.2
LIGHT_WORDING = "Review: the field's light is unlike the classifier's training images'"
#: The same said of a single-cell image (`predict`, the service's cell cases). Its colour is not in it: a case's
#: images that share a warning are named under one line (leukoscope.service.cases.named_warnings).
LIGHT_CELL_WORDING = "The image's light is unlike the classifier's training images'"


def chromaticity(white: np.ndarray) -> tuple[float, float]:
    """(ln(R/G), ln(B/G)) of a white point ``(3,)``: 0, 0 for neutral grey at any brightness."""
    red, green, blue = (max(float(v), 1.0) for v in white)
    return float(np.log(red / green)), float(np.log(blue / green))


@dataclass(frozen=True)
class LightRange:
    """The chromaticities of a classifier's training images' white points: ``red`` and ``blue`` are
    (low, high) of ln(R/G) and ln(B/G), ``images`` how many images they come from."""

    red: tuple[float, float]
    blue: tuple[float, float]
    images: int

    def contains(self, white: np.ndarray) -> bool:
        red, blue = chromaticity(white)
        return (self.red[0] - MARGIN <= red <= self.red[1] + MARGIN
                and self.blue[0] - MARGIN <= blue <= self.blue[1] + MARGIN)

    def to_json(self) -> dict[str, Any]:
        return {"red": [round(v, 4) for v in self.red], "blue": [round(v, 4) for v in self.blue],
                "images": self.images}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any] | None) -> "LightRange | None":
        """The range recorded as ``light`` (:meth:`to_json`); None when none is. ValueError names what is wrong
        with a malformed one (a hand-edited bundle.json), so that loading the bundle fails, not its first field."""
        if not entry:
            return None
        if not isinstance(entry, Mapping):
            raise ValueError(f"light must be a mapping with red, blue and images, got {type(entry).__name__}")
        missing = [key for key in ("red", "blue", "images") if key not in entry]
        if missing:
            raise ValueError(f"light lacks {', '.join(missing)}")
        return cls(_bounds(entry["red"], "red"), _bounds(entry["blue"], "blue"), _count(entry["images"]))


def _bounds(value: Any, name: str) -> tuple[float, float]:
    """(low, high) of one chromaticity from a recorded ``[low, high]``."""
    try:
        if not isinstance(value, (list, tuple)):  # a string's characters are no bounds
            raise TypeError
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"light.{name} must be two numbers [low, high], got {value!r}") from None
    if not (np.isfinite(low) and np.isfinite(high)) or low > high:
        raise ValueError(f"light.{name} must be finite with low <= high, got {value!r}")
    return low, high


def _count(value: Any) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or value < 1):
        raise ValueError(f"light.images must be a positive whole number, got {value!r}")
    return int(value)


def fit_light_range(pixels: np.ndarray) -> LightRange | None:
    """The range of the white points of training images ``(N, 3, H, W)`` uint8 (as the model decodes
    them); None when fewer than :data:`MIN_IMAGES` show a background."""
    whites = [white for white in (white_point(np.ascontiguousarray(image.transpose(1, 2, 0))) for image in pixels)
              if white is not None]
    if len(whites) < MIN_IMAGES:
        return None
    points = np.array([chromaticity(white) for white in whites])
    low, high = np.quantile(points, TAIL, axis=0), np.quantile(points, 1 - TAIL, axis=0)
    return LightRange((float(low[0]), float(high[0])), (float(low[1]), float(high[1])), len(whites))


def image_white(image: Image.Image, min_lit_share: float = SEGMENTED_SHARE,
                side: int = FIELD_SIDE) -> np.ndarray | None:
    """The white point of an image (reduced to at most ``side`` px first), or None: no background in view,
    fewer lit pixels than ``min_lit_share`` (a segmented cell on black), or no lit pixel darker than its
    brightest part by :data:`MIN_CONTRAST` (a flat image: its colour may be a stain as well as a light)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    factor = max(1, -(-max(rgb.size) // side))  # rounded up: never above side
    pixels = np.asarray(rgb.reduce(factor) if factor > 1 else rgb)
    white = white_point(pixels, min_lit_share=min_lit_share)
    if white is None:
        return None
    flat = pixels.reshape(-1, 3)
    luma = flat[flat.max(axis=1) >= DARK].astype(np.float32) @ LUMA  # lit pixels: black surround is no stain
    rank = int(len(luma) * DARKEST_SHARE)
    darkest = float(np.partition(luma, rank)[rank])
    return white if float(white @ LUMA) - darkest >= MIN_CONTRAST else None


def field_white(image: Image.Image) -> np.ndarray | None:
    """The white point of a field (:func:`image_white`), which may be seen through an eyepiece's round field of
    view (:data:`FIELD_LIT_SHARE`)."""
    return image_white(image, FIELD_LIT_SHARE)


def cell_light_warning(image: Image.Image, light: LightRange | None) -> str | None:
    """The warning of a single-cell image (as the classifier sees it: its window) whose background's colour is
    outside ``light``; None when it is inside, when the image shows no background (a segmented cell on black,
    as the training crops' white points are read; a flat colour: :func:`image_white`) or without a recorded
    range."""
    if light is None:
        return None
    white = image_white(image, side=CELL_SIDE)
    return None if white is None or light.contains(white) else CELL_LIGHT_WARNING


CELL_LIGHT_WARNING = (f"{LIGHT_CELL_WORDING}: the colour of its background (the camera's white balance or the lamp) "
                      f"is one none of them had. The classifier types cells partly by colour, and its 'unlike the "
                      f"training data' flag can miss such a shift: its class here is untested (set the camera's white "
                      f"balance on an empty part of the slide, or review the cell)")


def light_warning(white: np.ndarray) -> str:
    """What a field whose background is ``white`` (outside the classifier's range) is told."""
    red, green, blue = (int(round(float(v))) for v in white)
    return (f"{LIGHT_WORDING}: its background is ({red}, {green}, {blue}), a colour of light (the camera's white "
            f"balance or the lamp) none of them had. The classifier types cells partly by colour, and its "
            f"'unlike the training data' flag can miss such a shift: its types here are untested (set the camera's "
            f"white balance on an empty part of the slide, or review every cell)")
