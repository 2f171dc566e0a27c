"""The crop a cell classifier sees: one rule for training data and for smear analysis.

With the field's scale known and a classifier trained on a physical window
(``Preprocessing.cell_window_um``), the crop is a square of that many micrometres
centred on the cell (larger only when the cell itself is larger), so a lymphocyte
stays small and a monocyte large whatever the microscope, and a crop from a 224 px
all-taleqani field covers the same area of slide as one from a 360 px pbc image.
Without a scale, the crop is the cell's box plus a margin (the older rule).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from leukoscope.scale import (FIELD_RUN_MAX_RATIO, FieldScale, checked_record, disagrees_with_run, field_scale,
                              lent_run_scale)


def window_box(box: Sequence[float], image_size: tuple[int, int], *, um_per_px: float | None = None,
               window_um: float | None = None, margin: float = 0.1) -> tuple[int, int, int, int]:
    """The crop rectangle ``(x0, y0, x1, y1)`` for a cell box. With a scale and a window it is
    square and may reach past the image (the caller pads); otherwise clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if um_per_px and window_um:
        side = max(window_um / um_per_px, (x1 - x0) * (1 + 2 * margin), (y1 - y0) * (1 + 2 * margin))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
        size = max(1, int(round(side)))
        return left, top, left + size, top + size
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    width, height = image_size
    return (max(0, int(x0 - mx)), max(0, int(y0 - my)), min(width, int(math.ceil(x1 + mx))),
            min(height, int(math.ceil(y1 + my))))


def crop_cell(image: Image.Image, box: Sequence[float], *, um_per_px: float | None = None,
              window_um: float | None = None, margin: float = 0.1) -> Image.Image:
    """The cell's crop (see :func:`window_box`). A physical window reaching past the field is
    filled by mirroring the field at its edge, so that a cell at the edge keeps its scale and
    its surroundings look like a smear, not like a border no training crop had."""
    rect = window_box(box, image.size, um_per_px=um_per_px, window_um=window_um, margin=margin)
    width, height = image.size
    if rect[0] >= 0 and rect[1] >= 0 and rect[2] <= width and rect[3] <= height:
        return image.crop(rect)
    inside = (min(max(0, rect[0]), width - 1), min(max(0, rect[1]), height - 1),
              max(min(width, rect[2]), 1), max(min(height, rect[3]), 1))
    inside = (inside[0], inside[1], max(inside[2], inside[0] + 1), max(inside[3], inside[1] + 1))
    pixels = np.asarray(image.crop(inside).convert("RGB"))  # crop first: no copy of the whole field
    pad = ((inside[1] - rect[1], rect[3] - inside[3]), (inside[0] - rect[0], rect[2] - inside[2]), (0, 0))
    return Image.fromarray(np.pad(pixels, pad, mode="symmetric"))


def centre_window(image: Image.Image, um_per_px: float, window_um: float) -> Image.Image:
    """The classifier's window around the image's centre: a single-cell image (pbc's 360 px photographs,
    a C-NMC cell) holds its cell there. Where the window reaches past a smaller image it is filled with
    the median colour of the image's border (its background), not mirrored as a smear field's edge is: a
    tight crop mirrored would show the same cell several times."""
    cx, cy = image.size[0] / 2, image.size[1] / 2
    rect = window_box((cx, cy, cx, cy), image.size, um_per_px=um_per_px, window_um=window_um)
    width, height = image.size
    if rect[0] >= 0 and rect[1] >= 0 and rect[2] <= width and rect[3] <= height:
        return image.crop(rect)
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    canvas = Image.new("RGB", (rect[2] - rect[0], rect[3] - rect[1]),
                       tuple(int(v) for v in np.median(border, axis=0)))
    canvas.paste(image.convert("RGB"), (-rect[0], -rect[1]))
    return canvas


def frame_single_cell(image: Image.Image, window_um: float, um_per_px: float | None = None, *,
                      run_um_per_px: float | None = None,
                      recorded_um_per_px: float | None = None) -> tuple[Image.Image, FieldScale]:
    """A single-cell image as a classifier of a ``window_um`` physical window was trained to see it: that
    many micrometres around the image's centre at ``um_per_px`` or, not given, the scale its file records
    (``recorded_um_per_px``: a TIFF's resolution tags, checked by its red cells as a field's is,
    :func:`leukoscope.scale.checked_record`), else the scale its red cells give
    (:func:`leukoscope.scale.field_scale`), or the run's (``run_um_per_px``: the images' scale
    together, :func:`leukoscope.scale.run_scale`) when they give none or one far off it, as in smear
    analysis. An image without any is returned whole with an 'unknown' scale (the cell then looks bigger
    or smaller than any the classifier learned)."""
    recorded = (checked_record(image, recorded_um_per_px)
                if um_per_px is None and recorded_um_per_px is not None else None)
    scale = recorded if recorded is not None else field_scale(image, um_per_px)
    if run_um_per_px is not None and (not scale.known or disagrees_with_run(scale, run_um_per_px)):
        why = (scale.note if not scale.known else f"its own estimate, {scale.um_per_px:.4f} um/px from "
               f"{scale.red_cells} red cells, is more than {FIELD_RUN_MAX_RATIO:g} times off")
        scale = FieldScale(run_um_per_px, "run", 0, f"{why}: framed at the images' scale together")
    if not scale.known:
        return image, scale
    return centre_window(image, float(scale.um_per_px), window_um), scale


def single_cell_framer(window_um: float, paths: Sequence[str | Path],
                       um_per_px: float | None = None) -> Callable[[Image.Image, float | None], Image.Image]:
    """How a set of single-cell image files is framed for a classifier of a ``window_um`` window, as
    ``leukoscope predict`` frames them: at ``um_per_px``, else the scale an image's file records (the framer's
    second argument: a TIFF's tags), else its red cells' scale, else the files' scale together
    (:func:`leukoscope.scale.run_scale`, from five files on)."""
    run = lent_run_scale(paths, um_per_px)

    def frame(image: Image.Image, recorded_um_per_px: float | None = None) -> Image.Image:
        return frame_single_cell(image, window_um, um_per_px, run_um_per_px=run,
                                 recorded_um_per_px=recorded_um_per_px)[0]

    return frame
