"""A white cell has a nucleus: boxes the detector calls white cells that hold no nuclear stain.

The shipped detector learned white cells from CBC's smears alone. In another lab's fields it also
boxes red cells, alone or in clumps, as white cells, and the classifier then types them (in
all-taleqani's blast-rich fields about a third of its white-cell boxes held no violet stain, typed
lymphocyte or blast: docs/benchmarks.md, "A white cell has a nucleus"). Every white cell stains a
violet nucleus (Romanowsky stains), red cells and their clumps none, so a box with almost no violet
pixels (:func:`leukoscope.scale.nuclear_pixels`) is dropped. Only where the field shows that its stain
colours nuclei so: some white-cell box of it holds a nucleus's share of violet; a stain whose nuclei
fall outside the violet rule, or a grey field, keeps every box.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from leukoscope.scale import nuclear_pixels

#: A white-cell box less than this share of whose pixels are violet holds no nucleus (CBC: 2 of 431
#: annotated white-cell boxes, one blurred speck labelled twice; pbc's centre 40% of a cell photograph:
#: >= 0.088 for every white type, erythroblasts included; platelets 0.03-0.06).
MIN_NUCLEAR_SHARE = 0.05
#: The rule applies to a field only when one of its white-cell boxes holds at least this share of violet.
NUCLEATED_SHARE = 0.15


def nuclear_shares(image: Image.Image, boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """The share of each box's pixels (x0, y0, x1, y1, field pixels) that are violet nuclear stain; 0 for a
    box with no pixels inside the field."""
    shares = []
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
        right, bottom = min(image.width, math.ceil(x1)), min(image.height, math.ceil(y1))
        if right <= left or bottom <= top:
            shares.append(0.0)
            continue
        pixels = np.asarray(image.crop((left, top, right, bottom)).convert("RGB"))
        shares.append(float(nuclear_pixels(pixels).mean()))
    return np.asarray(shares, dtype=np.float64)


def without_nucleus(image: Image.Image, boxes: Sequence[Sequence[float]] | np.ndarray,
                    min_share: float = MIN_NUCLEAR_SHARE) -> np.ndarray:
    """Which white-cell boxes hold no nucleus (fewer than ``min_share`` violet pixels): all False where no box
    holds :data:`NUCLEATED_SHARE` (the stain's nuclei are not violet by this rule, or the field is grey)."""
    shares = nuclear_shares(image, boxes)
    if min_share <= 0 or not len(shares) or shares.max() < NUCLEATED_SHARE:
        return np.zeros(len(shares), dtype=bool)
    return shares < min_share
