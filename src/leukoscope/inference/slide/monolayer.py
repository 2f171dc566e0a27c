"""Where on a slide to count: the monolayer.

A wedge smear runs from a thick area (red cells piled on one another) through the
monolayer (red cells side by side, touching but hardly overlapping) to the feathered
edge (cells sparse, spread out and flattened). A manual differential is counted in the
monolayer only: in thick areas white cells are shrunken and hidden, at the feathered edge
they are distorted and large cells (blasts, monocytes) collect there, so either would bias
the count.

The rule here works on a low-resolution level of the slide: a pixel is stained (cells)
or glass by Otsu's threshold on the green channel (cells absorb green, glass does not),
and each analysis tile's footprint gets its stained share, its *coverage*. Red cells
touching without overlap cover roughly 35-75% of the glass (random packing of discs);
below ``min_coverage`` the area is feathered edge or empty glass, above ``max_coverage``
it is thick. The bounds are settings: a smear stained or spread differently may need others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import filters

DEFAULT_MIN_COVERAGE = 0.35
DEFAULT_MAX_COVERAGE = 0.75


@dataclass(frozen=True)
class TileSpot:
    """One analysis tile: its grid place, its footprint in level 0 pixels and its coverage."""

    index: int
    column: int
    row: int
    x: int
    y: int
    width: int
    height: int
    coverage: float


@dataclass
class Monolayer:
    """Coverage of every grid cell, which are monolayer, and the candidate tiles (monolayer ones)."""

    coverage: np.ndarray
    """(rows, columns) stained share of each tile footprint."""
    mask: np.ndarray
    """(rows, columns) True where ``min_coverage <= coverage <= max_coverage``."""
    tiles: list[TileSpot]
    """The monolayer tiles, row by row."""
    tile_size: int
    """Tile side in level 0 pixels."""
    min_coverage: float
    max_coverage: float
    threshold: float | None
    """The green-channel threshold under which a pixel counts as stained (None: a blank image)."""


#: Otsu's two classes must differ by this much in mean green (grey levels) to be cells and glass: red cells
#: absorb 60-100 levels of green against the glass; empty glass split by its own sensor noise differs by ~10.
MIN_STAIN_CONTRAST = 25.0


def stained_pixels(rgb: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Boolean mask of stained (cell) pixels of an RGB image and the green threshold used (None: blank
    glass, nothing stained)."""
    green = np.asarray(rgb, dtype=np.float32)[..., 1]
    blank = (np.zeros(green.shape, dtype=bool), None)
    if green.size == 0 or float(green.max() - green.min()) < 10:
        return blank
    threshold = float(filters.threshold_otsu(green))
    stained = green < threshold
    # a speck of dust defeats the range test above; Otsu then halves the glass's noise into "cells"
    if float(green[~stained].mean() - green[stained].mean()) < MIN_STAIN_CONTRAST:
        return blank
    return stained, threshold


def find_monolayer(low_res: np.ndarray, downsample: float, slide_size: tuple[int, int], tile_size: int, *,
                   min_coverage: float = DEFAULT_MIN_COVERAGE,
                   max_coverage: float = DEFAULT_MAX_COVERAGE) -> Monolayer:
    """The monolayer tiles of a slide from ``low_res`` (RGB pixels of a level ``downsample`` times
    smaller than level 0, whose size is ``slide_size``). Tiles of ``tile_size`` level 0 pixels form a
    grid from the top left corner; only whole tiles count (a partial tile at the right or bottom edge
    is left out)."""
    if not 0.0 <= min_coverage < max_coverage <= 1.0:
        raise ValueError(f"coverage bounds must satisfy 0 <= min < max <= 1, got {min_coverage}, {max_coverage}")
    if tile_size < 1:
        raise ValueError(f"tile size must be positive, got {tile_size}")
    stained, threshold = stained_pixels(low_res)
    columns, rows = slide_size[0] // tile_size, slide_size[1] // tile_size
    coverage = np.zeros((rows, columns), dtype=np.float64)
    for row in range(rows):
        for column in range(columns):
            y0, x0 = (int(round(v * tile_size / downsample)) for v in (row, column))
            y1, x1 = (int(round(v * tile_size / downsample)) for v in (row + 1, column + 1))
            cell = stained[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
            coverage[row, column] = float(cell.mean()) if cell.size else 0.0
    mask = (coverage >= min_coverage) & (coverage <= max_coverage)
    tiles = [TileSpot(index, int(column), int(row), int(column * tile_size), int(row * tile_size), tile_size,
                      tile_size, float(coverage[row, column]))
             for index, (row, column) in enumerate(zip(*np.nonzero(mask)))]
    return Monolayer(coverage, mask, tiles, int(tile_size), float(min_coverage), float(max_coverage), threshold)
