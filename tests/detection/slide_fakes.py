"""A small generated whole slide: a thick strip, a monolayer and a feathered edge, written as a
pyramidal tiled TIFF with tifffile (levels as sub-IFDs, pixel size in the resolution tags), and a
rule-based white-cell detector fast enough to run on every tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage import measure
from skimage.draw import disk

from leukoscope.bundle import BundleInfo
from leukoscope.data.synthetic_smears import SmearSpec, render_smear
from leukoscope.inference.detector import CellDetector, DetectionResult
from tests.detection.smear_fakes import float_pixels

TILE = 256
#: Columns of TILE px, left to right: thick, monolayer x4, feathered edge; ROWS rows.
COLUMNS, ROWS = 6, 2
MONOLAYER_COLUMNS = range(1, 5)
MPP = 0.5
#: Monolayer fields: two to four white cells each, red cells then laid side by side around them.
MONOLAYER = SmearSpec(width=TILE, height=TILE, cell_size=48, wbc_per_image=(2, 4), rbc_per_image=(0, 0),
                      platelets_per_image=(1, 3))
#: Feathered edge: a few red cells, still some white cells (which must not be counted).
FEATHERED = SmearSpec(width=TILE, height=TILE, cell_size=48, wbc_per_image=(1, 2), rbc_per_image=(4, 8),
                      platelets_per_image=(0, 2))


def thick_field(rng: np.random.Generator) -> np.ndarray:
    """Red cells piled on one another (each disc darkens what is below), with a white cell."""
    pixels, _, _ = render_smear(rng, FEATHERED)
    canvas = pixels.astype(np.float64)
    for _ in range(700):
        cy, cx = rng.uniform(0, TILE, 2)
        rr, cc = disk((cy, cx), 7.7 * rng.uniform(0.85, 1.15), shape=(TILE, TILE))
        canvas[rr, cc] = 0.55 * canvas[rr, cc] + 0.45 * np.array([200, 120, 135])
    return np.clip(canvas, 0, 255).astype(np.uint8)


def monolayer_field(rng: np.random.Generator) -> np.ndarray:
    """Red cells (~15 px across) on a jittered 17 px grid, touching but not overlapping, around the
    white cells."""
    pixels, boxes, _ = render_smear(rng, MONOLAYER)
    canvas = pixels.astype(np.float64)
    white = [b for b in boxes if b.label != "RBC"]
    colour = np.array([212, 148, 158]) + rng.normal(0, 6, 3)
    for cy in np.arange(8.5, TILE, 17.0):
        for cx in np.arange(8.5, TILE, 17.0):
            y, x = cy + rng.uniform(-1, 1), cx + rng.uniform(-1, 1)
            if any(b.xmin - 9 < x < b.xmax + 9 and b.ymin - 9 < y < b.ymax + 9 for b in white):
                continue
            radius = 7.7 * rng.uniform(0.92, 1.05)
            rr, cc = disk((y, x), radius, shape=(TILE, TILE))
            canvas[rr, cc] = 0.1 * canvas[rr, cc] + 0.9 * colour
            rr, cc = disk((y, x), radius * 0.45, shape=(TILE, TILE))
            canvas[rr, cc] = 0.7 * canvas[rr, cc] + 0.3 * pixels[0, 0]
    return np.clip(canvas, 0, 255).astype(np.uint8)


def slide_pixels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(ROWS):
        row = [thick_field(rng)]
        row += [monolayer_field(rng) for _ in MONOLAYER_COLUMNS]
        row += [render_smear(rng, FEATHERED)[0]]
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


def write_pyramid(path: Path, pixels: np.ndarray, mpp: float | None = MPP, levels: int = 3) -> Path:
    """``pixels`` as a tiled TIFF with ``levels`` levels (each half the previous) as sub-IFDs."""
    import tifffile
    from PIL import Image

    options = {"tile": (128, 128), "photometric": "rgb"}
    if mpp is not None:
        options.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    pyramid = [pixels]
    for _ in range(levels - 1):
        h, w = pyramid[-1].shape[:2]
        pyramid.append(np.asarray(Image.fromarray(pyramid[-1]).resize((w // 2, h // 2), Image.Resampling.BOX)))
    with tifffile.TiffWriter(path) as tif:
        tif.write(pyramid[0], subifds=levels - 1, **options)
        for level in pyramid[1:]:
            tif.write(level, subfiletype=1, **options)
    return path


class NucleusDetector(CellDetector):
    """A fixed rule in place of a network: one WBC box per large dark-purple blob (the synthetic
    white cells' nuclei; red cells are pink, platelets too small)."""

    def __init__(self) -> None:
        self.classes = ["WBC"]
        self.score_threshold = 0.5
        self.info = BundleInfo("rule", ["WBC"], task="detect", metrics={})

    def detect(self, images, *, threshold=None, batch_size=4):
        out = []
        for image in map(float_pixels, images):
            dark = (image[1] < 0.35).numpy()
            boxes = [[r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]] for r in measure.regionprops(measure.label(dark))
                     if r.area >= 60]
            boxes = np.array(boxes, float).reshape(-1, 4)
            out.append(DetectionResult(boxes, np.full(len(boxes), 0.9), np.zeros(len(boxes), int), self.classes))
        return out
