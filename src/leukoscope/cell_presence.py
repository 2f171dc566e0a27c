"""Is there a white cell at the centre of a single-cell image?

A single-cell image is classified as a white cell whatever it shows: a smear field uploaded as
a cell, framed on its centre, showed the classifier red cells only and was called blast at 0.78.
A white cell's nucleus is violet (:func:`leukoscope.scale.nuclear_pixels`), red cells are not, so the
centre of the window the classifier read is checked for violet. The rule is looser than the red-cell
scale's (a* - b* above 50, not 60): C-NMC's cells and some pale all-taleqani blasts fall between the two.

Measured (``python bench/white_cell_presence.py``, docs/benchmarks.md; the looser rule was chosen on
these same crops, so they are not an independent check of it): doubted 18 of 5,164 of the zoo's training
crops (pale blasts; two cells with the gap between them at the centre), none of its 1,209 control crops
(all-taleqani Benign, BCCD, cnmc-mini), 2 of 400 pbc photographs framed as uploads; 63 of 67 windows of
BCCD's smears that hold no white cell.

The other way round, a smear field uploaded as a cell can show a white cell at its centre and many around it:
classified as one cell, the field's count was one. :func:`white_cell_nuclei` counts the nuclei of an image at
its scale, and a single-cell image far larger than the window with several of them is said to be a field
(``python bench/several_white_cells.py``, docs/benchmarks.md).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from PIL import Image

from leukoscope.scale import nuclear_pixels

#: The centre read: a disk of this share of the window's side as radius (a 24 um window: 6 um, about a
#: white cell's nucleus; a cell framed on its own centre fills it).
CENTRE_RADIUS_SHARE = 0.25
#: CIELAB a* - b* above which a pixel counts as a nucleus here: red cells are 4-44 (pink or grey-blue), C-NMC's
#: and pale blasts' nuclei fall between this and the scale's NUCLEAR_VIOLET (60).
CENTRE_VIOLET = 50.0
#: Below this share of violet pixels in that disk there is no nucleus at the centre: white cells of every
#: source measured hold far more (medians 0.2-0.7 at 60), a platelet about 0.1, windows of red cells 0.
MIN_CENTRE_NUCLEAR_SHARE = 0.02


#: The window is read at most this many pixels a side (box-averaged down): a nucleus is tens of pixels
#: across there, and an image classified whole (no scale) may be 40 Mpx (the service's upload budget).
MAX_SIDE = 256


def centre_nuclear_share(seen: Image.Image) -> float:
    """The share of violet nuclear-stain pixels in the central disk of ``seen`` (the window read)."""
    factor = math.ceil(max(seen.size) / MAX_SIDE)
    rgb = seen if seen.mode == "RGB" else seen.convert("RGB")
    pixels = np.asarray(rgb.reduce(factor) if factor > 1 else rgb)
    height, width = pixels.shape[:2]
    rows, cols = np.ogrid[:height, :width]
    radius = CENTRE_RADIUS_SHARE * min(height, width)
    disk = (rows - height / 2) ** 2 + (cols - width / 2) ** 2 <= radius ** 2
    return float(nuclear_pixels(pixels, CENTRE_VIOLET)[disk].mean()) if disk.any() else 0.0


def lacks_white_cell(seen: Image.Image) -> bool:
    """Whether ``seen`` (the window a single-cell image's classifier read) shows no white cell at its centre:
    no nuclear stain there."""
    return centre_nuclear_share(seen) < MIN_CENTRE_NUCLEAR_SHARE


#: The key of a classifier bundle's provenance that holds its :func:`centres_record`.
TRAINING_CENTRES = "training_centres"
#: Training images a classifier's record reads (:func:`centres_record`), a seeded sample beyond it.
CENTRES_CHECKED = 300
#: A classifier whose training images lacked a white cell at their centre more often than this learned from
#: whole fields (all-taleqani's: 17 of 200; pbc's photographs 0 of 200, cnmc-mini's cells 1 of 54): that an image
#: sent to it has none at its centre says nothing against its class.
MAX_CENTRES_WITHOUT_WHITE_CELL = 0.05


def centres_record(images: Iterable[Image.Image]) -> dict[str, int]:
    """How many of a classifier's training ``images`` show no white cell at their centre, of how many read: kept
    in its bundle, so that the check of :func:`lacks_white_cell` is made for the classifiers of single cells alone
    (:func:`checks_centres`)."""
    checked = without = 0
    for image in images:  # one at a time: a user's training images may be whole 5 Mpx fields
        checked += 1
        without += lacks_white_cell(image)
    return {"checked": checked, "without_white_cell": without}


def checks_centres(record: object) -> bool:
    """Whether a classifier with this training ``record`` (:func:`centres_record`; None: a bundle made before the
    record) learned from single cells, whose images it is worth checking for a white cell at their centre."""
    if not isinstance(record, dict) or not record.get("checked"):
        return True  # the check as it was made before the record
    return record.get("without_white_cell", 0) / record["checked"] <= MAX_CENTRES_WITHOUT_WHITE_CELL


#: Nuclei are counted on the image reduced to about this pixel size (um): a nucleus is 10-20 pixels across.
COUNT_UM_PER_PX = 0.5
#: Violet stain closer than this (um) is one nucleus: a neutrophil's lobes, a nucleus split by a paler band.
NUCLEUS_MERGE_UM = 2.0
#: A nucleus covers at least this area (um^2: a disk 4 um across); platelets and specks are smaller.
MIN_NUCLEUS_AREA_UM2 = 12.0
#: A single-cell image with at least this many nuclei is a field...
SEVERAL_WHITE_CELLS = 3
#: ...counted only in an image of at least this many windows' area (a single-cell photograph is one to three:
#: pbc's 360 px photographs 2.3, BCCD's and CBC's whole fields 3.4), where there is room for three cells.
MIN_FIELD_WINDOWS = 4.0


def white_cell_nuclei(image: Image.Image, um_per_px: float) -> int:
    """How many white-cell nuclei ``image`` shows at ``um_per_px``: patches of violet nuclear stain
    (:func:`leukoscope.scale.nuclear_pixels`) of at least :data:`MIN_NUCLEUS_AREA_UM2`, lobes within
    :data:`NUCLEUS_MERGE_UM` of each other joined."""
    from scipy import ndimage

    factor = max(1, int(COUNT_UM_PER_PX / um_per_px))
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    small = rgb.reduce(factor) if factor > 1 else rgb
    pixel_um = um_per_px * factor
    mask = nuclear_pixels(np.asarray(small))  # the red-cell scale's rule (60): stricter than the centre's
    reach = max(1, round(NUCLEUS_MERGE_UM / pixel_um))
    mask = ndimage.binary_closing(mask, structure=np.ones((2 * reach + 1, 2 * reach + 1), bool))
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0
    areas = np.asarray(ndimage.sum(mask, labels, range(1, n + 1))) * pixel_um ** 2
    return int((areas >= MIN_NUCLEUS_AREA_UM2).sum())


def several_white_cells(image: Image.Image, um_per_px: float, window_um: float) -> int | None:
    """The nuclei a single-cell ``image`` holds when it looks like a smear field: at least
    :data:`MIN_FIELD_WINDOWS` windows of ``window_um`` in area and :data:`SEVERAL_WHITE_CELLS` nuclei or more;
    None otherwise (a smaller image is not counted: a single-cell photograph may show a neighbour's edge)."""
    if image.width * image.height * um_per_px ** 2 < MIN_FIELD_WINDOWS * window_um ** 2:
        return None
    found = white_cell_nuclei(image, um_per_px)
    return found if found >= SEVERAL_WHITE_CELLS else None
