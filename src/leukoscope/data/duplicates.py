"""Find byte-identical and near-identical images so that splits can keep them together.

Byte-identical files share a SHA-256; near-identical ones (re-encoded, resized,
brightened, slightly shifted copies) have perceptual hashes (pHash, via ImageHash) within a
small Hamming distance; a crop or re-framing moves the hash further (a copy with a few
percent of its border trimmed can be missed), and a cell photographed again is not caught.
A cell has no up, down, left or right, and datasets ship flipped and rotated copies as
augmentation: an image's pHash is compared with the pHashes of the other's eight
right-angle rotations and mirror images too. An image on a plain background (a segmented cell on black) is
hashed on the box of its content: the background would make any two such images alike. Both kinds become one
*duplicate group*.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from leukoscope.io import ImageDecodeError, load_image
from leukoscope.progress import name_some

log = logging.getLogger(__name__)

#: Hamming distance (of 64 pHash bits) at or below which two images count as near-identical.
DEFAULT_PHASH_DISTANCE = 4


#: The seven other right-angle rotations and mirror images of a picture.
TURNS = (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
         Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE,
         Image.Transpose.TRANSVERSE)


@dataclass(frozen=True)
class ImageFingerprint:
    sha256: str
    phash: int | None  # None when the file could not be decoded
    turned: tuple[int, ...] = ()
    """The pHashes of the image's :data:`TURNS` (empty: compared as it is only)."""


def fingerprint(path: Path) -> ImageFingerprint:
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    buffer = io.BytesIO(data)  # read once for the digest and the picture; named, for load_image's warnings
    buffer.name = str(path)  # type: ignore[attr-defined]
    try:
        image = load_image(buffer)
    except ImageDecodeError:
        return ImageFingerprint(digest, None)
    # pHash's own first steps (grey, 32 x 32, Lanczos) once; each turn of that is hashed as it is
    small = without_plain_border(image.convert("L")).resize((32, 32), Image.Resampling.LANCZOS)
    phash = _hash_value(imagehash.phash(small))
    return ImageFingerprint(digest, phash, tuple(_hash_value(imagehash.phash(small.transpose(t))) for t in TURNS))


#: A border is plain when 95% of its pixels are within this many grey levels of its median...
PLAIN_BORDER_SPREAD = 8
#: ...and the image's content is the box of the pixels further than this from that median...
CONTENT_CONTRAST = 16
#: ...when that box is at least this many pixels and this share of the image's shorter side (a C-NMC cell: 200
#: of 450 px).
MIN_CONTENT_SIDE, MIN_CONTENT_SHARE = 16, 0.1


def without_plain_border(grey: Image.Image) -> Image.Image:
    """``grey`` cut to the box of its content when its border is of one plain colour: C-NMC's cells are segmented
    onto black (84% of each image), and the pHashes of two different cells, of an ALL patient and of a healthy
    donor, were within 4 bits, which joined the two subjects in one split group. A photograph has no plain
    border and is left whole."""
    pixels = np.asarray(grey, dtype=np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border)
    if np.percentile(np.abs(border - background), 95) > PLAIN_BORDER_SPREAD:
        return grey
    content = np.abs(pixels - background) > CONTENT_CONTRAST
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    if not len(rows):
        return grey  # a plain image: nothing to cut to
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    if min(box[2] - box[0], box[3] - box[1]) < max(MIN_CONTENT_SIDE, MIN_CONTENT_SHARE * min(grey.size)):
        return grey  # a speck, blown up to the hash's 32 x 32, would be one even grey: every speck alike
    return grey.crop(box)


def _hash_value(value: imagehash.ImageHash) -> int:
    return int(str(value), 16)


def duplicate_groups(
    paths: Sequence[Path],
    *,
    max_distance: int = DEFAULT_PHASH_DISTANCE,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Label each path with a duplicate-group id (equal ids = duplicates).

    ``max_distance < 0`` turns off near-duplicate matching (exact bytes only).
    """
    return group_fingerprints(fingerprint_paths(paths, progress=progress), max_distance=max_distance)


def fingerprint_paths(paths: Sequence[Path], *,
                      progress: Callable[[int, int], None] | None = None) -> list[ImageFingerprint]:
    """The :func:`fingerprint` of each path, with a warning naming the files that cannot be decoded."""
    fingerprints = []
    for index, path in enumerate(paths):
        fingerprints.append(fingerprint(path))
        if progress:
            progress(index + 1, len(paths))
    unreadable = [Path(path).name for path, fp in zip(paths, fingerprints) if fp.phash is None]
    if unreadable:  # a split's counts include them; training and evaluation skip them (and say so)
        log.warning("%d file(s) cannot be decoded as images: they stay in the split's lists, and training and "
                    "evaluation skip them (%s)", len(unreadable), name_some(unreadable, 5))
    return fingerprints


def group_fingerprints(fingerprints: Sequence[ImageFingerprint], *, max_distance: int) -> np.ndarray:
    n = len(fingerprints)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []

    by_digest: dict[str, int] = {}
    for i, fp in enumerate(fingerprints):
        first = by_digest.setdefault(fp.sha256, i)
        if first != i:
            rows.append(np.array([first]))
            cols.append(np.array([i]))

    if max_distance >= 0:
        hashed = [i for i, fp in enumerate(fingerprints) if fp.phash is not None]
        if len(hashed) > 1:
            bits = np.array([fingerprints[i].phash for i in hashed], dtype=np.uint64)
            # each image as it is and turned (an image without turns: itself eight times)
            views = np.array([[fp.phash, *(fp.turned or (fp.phash,) * len(TURNS))]
                              for fp in (fingerprints[i] for i in hashed)], dtype=np.uint64)
            index = np.array(hashed)
            # Row blocks keep the pairwise distance matrix small in memory.
            for start in range(0, len(bits), 64):
                block = bits[start : start + 64]
                distance = np.bitwise_count(block[:, None, None] ^ views[None, :, :]).min(axis=-1)
                r, c = np.nonzero(distance <= max_distance)
                keep = (r + start) < c
                rows.append(index[r[keep] + start])
                cols.append(index[c[keep]])

    if rows:
        r = np.concatenate(rows)
        c = np.concatenate(cols)
    else:
        r = c = np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)
