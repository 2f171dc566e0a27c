"""Tiles for large fields and the merging of their detections.

A field larger than a tile (:class:`~leukoscope.inference.smear.SmearAnalyzer`'s ``tile_size``)
is cut into overlapping tiles at the detector's pixel scale; a box cut by an inner tile edge
gives way to the whole box the neighbouring tile saw, and duplicates in the overlaps are merged.
"""

from __future__ import annotations

import math

import numpy as np


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Overlapping tiles (x0, y0, x1, y1) covering the image, evenly spread; one tile if it fits.

    Along each axis: the fewest tiles of at most ``tile`` pixels that overlap by at
    least ``overlap``, each only as long as that needs (a 2592 px side in two tiles
    of 2048 would overlap by 1504 px, 58% more pixels than the image; two tiles of
    1456 overlap by the 320 asked for). Tiles may therefore be rectangular.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap ({overlap}) must be >= 0 and smaller than the tile size ({tile})")

    def spans(length: int) -> list[tuple[int, int]]:
        if length <= tile:
            return [(0, length)]
        n = math.ceil((length - overlap) / (tile - overlap))
        size = min(tile, math.ceil((length + (n - 1) * overlap) / n))
        return [(start, start + size) for start in (round(i * (length - size) / (n - 1)) for i in range(n))]

    return [(x0, y0, x1, y1) for y0, y1 in spans(height) for x0, x1 in spans(width)]


def merge_tile_detections(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, cut: np.ndarray,
    iou_threshold: float = 0.5, containment: float = 0.6, around: int = 1,
) -> np.ndarray:
    """Indices to keep of detections gathered from overlapping tiles.

    ``cut`` marks boxes touching an inner tile edge (the cell may be cut off).
    Whole boxes are preferred to cut ones, then higher scores; a box is dropped
    when a kept box of the same class overlaps it by IoU > ``iou_threshold`` or,
    for a cut box, when it lies more than ``containment`` inside a kept box (it is part of
    it) or holds more than ``containment`` of at least ``around`` kept boxes (it is those
    cells with more: a box cut at a tile's edge around the next tile's whole cell, ``around=1``;
    one box around two touching cells, ``around=2``, which keeps a whole cell's box around a
    smaller, higher-scored box of part of it; with ``around=2`` also one kept box wholly and more than
    :data:`PART_OF_NEIGHBOUR` of another), or holds more than ``containment`` of one kept box that
    is the same cell boxed more loosely (:func:`_loosely_around`), whatever ``around``.
    """
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=int)
    order = np.lexsort((-scores, cut.astype(int)))  # whole boxes first, then by score
    boxes = np.asarray(boxes, dtype=np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    with np.errstate(divide="ignore", invalid="ignore"):  # two empty boxes: IoU nan, never a duplicate
        iou = inter / (area[:, None] + area[None, :] - inter)
    kept: list[int] = []
    for i in order:
        same = [j for j in kept if labels[j] == labels[i]]
        duplicate = any(iou[i, j] > iou_threshold for j in same)
        if cut[i] and not duplicate:
            around_kept = [j for j in same if area[j] > 0 and inter[i, j] > containment * area[j]]
            # around two touching cells, one of them wholly and the other in part (a field flipped upside down
            # had a third "cell": a loose box around one neutrophil and half of its neighbour)
            reaching = [j for j in same if area[j] > 0 and inter[i, j] > PART_OF_NEIGHBOUR * area[j]]
            duplicate = (any(area[i] > 0 and inter[i, j] > containment * area[i] for j in same)
                         or len(around_kept) >= around
                         or (around > 1 and len(around_kept) >= 1 and len(reaching) >= around)
                         or any(_loosely_around(boxes[i], boxes[j]) for j in around_kept))
        if not duplicate:
            kept.append(int(i))
    if around > 1:  # a box around two cells that outranked the second of them was kept before it: looked at again
        kept = [i for i in kept if not (cut[i] and _around_two(i, kept, labels, inter, area, containment))]
    return np.array(sorted(kept), dtype=int)


def _around_two(i: int, kept: list[int], labels: np.ndarray, inter: np.ndarray, area: np.ndarray,
                containment: float) -> bool:
    """Whether box ``i`` holds one other kept box of its class wholly (more than ``containment``) and more than
    :data:`PART_OF_NEIGHBOUR` of a second: one box around two touching cells, each also boxed on its own."""
    others = [j for j in kept if j != i and labels[j] == labels[i] and area[j] > 0]
    wholly = [j for j in others if inter[i, j] > containment * area[j]]
    return bool(wholly) and len([j for j in others if inter[i, j] > PART_OF_NEIGHBOUR * area[j]]) >= 2


#: With ``around`` > 1: a box holding one kept box wholly and more than this share of another is around both.
PART_OF_NEIGHBOUR = 0.3
#: A box around a kept box is that cell boxed loosely when the kept box fills more than this share of it
#: (less: the kept box is a fragment, e.g. a nucleus, inside the whole cell's box, which stays) ...
LOOSE_FILL = 1 / 3
#: ... and the two centres are closer than this share of the outer box's side along each axis (further: the
#: outer box reaches over to one side, around a neighbour the detector boxed only there, which stays).
LOOSE_OFFSET = 0.1


def _loosely_around(outer: np.ndarray, inner: np.ndarray) -> bool:
    """Whether ``outer``, holding most of ``inner``, is the same cell with a wider margin: a tile that saw the
    cell at its edge, or with a neighbour's rim, boxes it loosely, at IoU 0.5 or less with the tight box of the
    next tile (a 2592x1944 field in tiles of 700 counted a lymphocyte twice)."""
    outer_size, inner_size = outer[2:] - outer[:2], inner[2:] - inner[:2]
    if min(outer_size) <= 0 or inner_size.prod() <= LOOSE_FILL * outer_size.prod():
        return False
    offset = np.abs((outer[:2] + outer[2:]) - (inner[:2] + inner[2:])) / 2
    return bool((offset < LOOSE_OFFSET * outer_size).all())
