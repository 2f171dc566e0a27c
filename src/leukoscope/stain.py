"""Stain normalisation of Romanowsky-stained (Giemsa, May-Grünwald-Giemsa, Wright) cell images.

After Macenko et al. (ISBI 2009): an image's two stain colours are estimated as directions in
optical-density space, every pixel is unmixed into two stain concentrations (non-negative), and
the image is rebuilt with a fixed reference's stain colours and concentration range. Another
lab's lavender-blue smear and pbc's pink one come out in the same colours, while what is dark
and what is pale (nucleus, cytoplasm, granules) stays.

Macenko's own estimate (the extreme angles in the plane of the two largest principal
components) is unstable on blood-cell crops: red cells dominate the stained pixels, and the
directions it finds change with the cell type in the crop. Here the directions come from what a
cell crop always holds: the nuclear stain (azure / methylene blue) is the median direction of
the darkest pixels (a white cell's nucleus), the other stain (eosin) that of the rest of the
stained pixels (red cells, cytoplasm). Near-black pixels (the background of segmented cells,
e.g. C-NMC) take no part and stay black; an image with one stain is unmixed into the
reference's nuclear stain alone, one with too few stained pixels is left as it is.

White balance (:func:`white_balance`) is the lighter normalisation: only the light is made equal.
Each image's background (its brightest pixels: plasma and glass between the cells) is taken as the
white its camera saw, and every channel scaled so that white becomes the neutral :data:`LIGHT`
(von Kries). A camera's white balance and exposure are per-channel gains, so they cancel; the
stain's own colours (what is violet, what is pink, how dark a nucleus is) stay. pbc's fields are
lit warm (background about (255, 228, 203)), BCCD's and CBC's grey (about (206, 208, 204)),
all-taleqani's white: docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

#: Stain normalisations an image can go through (``Preprocessing.stain``).
STAINS = ("macenko", "white_balance")
StainMethod = Literal["macenko", "white_balance"]

LIGHT = 240.0
"""Transmitted light (I0 of Beer-Lambert) of a rebuilt image: its background's brightness."""
BACKGROUND_PERCENTILE = 99.0
"""An image's own transmitted light, per channel: this percentile of its pixels (the background),
so that a lab's tinted or dim background is no stain."""
SEGMENTED_SHARE = 0.75
"""An image with fewer non-black pixels than this share is a segmented cell: I0 is taken as LIGHT."""
MIN_LIGHT = 160.0
"""The least transmitted light assumed (a crop filled with cells, showing no background)."""
#: A stained area whose 1st-percentile concentration is above this share of its 99th shows no structure.
FLAT_SHARE = 0.9
BETA = 0.15
"""Optical density a pixel must exceed in some channel to count as stained."""
DARK = 20
"""Pixels with every channel below this are background of a segmented image, not stain."""
NUCLEAR_SHARE = 0.05
"""The darkest share of stained pixels that gives the nuclear stain's direction."""
OTHER_SHARE = 0.8
"""The palest share of stained pixels that gives the other stain's direction."""
MIN_STAINED = 64
"""Fewer stained pixels than this: the stains cannot be estimated; the image is left as it is."""
ONE_STAIN_COS = 0.995
"""Stain directions closer than this (cosine) are one stain: the image is unmixed into that one."""

# The reference: stain directions (columns: nuclear, other; unit length, RGB optical density)
# and the 99th percentile of each stain's concentration: medians over 400 pbc images (50 per
# class, seeded), pbc being the shipped classifier's largest source (docs/benchmarks.md).
REFERENCE_VECTORS = np.array([[0.5145, 0.4941],
                              [0.8384, 0.7453],
                              [0.1799, 0.4476]], dtype=np.float64)
REFERENCE_MAX = np.array([2.7772, 0.6679], dtype=np.float64)


def transmitted_light(pixels: np.ndarray, lit: np.ndarray) -> np.ndarray:
    """Per-channel I0 ``(3,)`` of uint8 RGB pixels ``(N, 3)``: their background's brightness.
    ``lit``: which pixels are not near-black (:func:`_lit`)."""
    valid = pixels[lit]
    if len(valid) < SEGMENTED_SHARE * len(pixels):  # a segmented cell on black: no background to see
        return np.full(3, LIGHT)
    return np.maximum(np.percentile(valid, BACKGROUND_PERCENTILE, axis=0), MIN_LIGHT)


def optical_density(rgb: np.ndarray, light: np.ndarray | float = LIGHT) -> np.ndarray:
    """uint8 RGB ``(..., 3)`` -> optical density (float64), ``-log((I + 1) / (I0 + 1))``, at least 0."""
    return np.maximum(-np.log((rgb.astype(np.float64) + 1.0) / (np.asarray(light, dtype=np.float64) + 1.0)), 0.0)


def _lit(pixels: np.ndarray) -> np.ndarray:
    """Which pixels ``(N, 3)`` are not near-black background (:data:`DARK`)."""
    return pixels.max(axis=1) >= DARK


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _concentrations(vectors: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Non-negative stain concentrations ``(k, N)`` of optical densities ``(N, 3)``: the least-squares
    unmixing (the pseudo-inverse: lstsq's answer at a fraction of its cost for many pixels), clipped at 0."""
    return np.maximum(np.linalg.pinv(vectors) @ density.T, 0.0)


def stain_estimate(image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """An HWC uint8 RGB image's stain directions ``(3, k)`` (nuclear first) and 99th-percentile
    concentrations ``(k,)``: k = 2, or 1 when the image shows one stain only (e.g. a crop of
    blue cells with no red cell); None when too few pixels are stained."""
    pixels = image.reshape(-1, 3)
    lit = _lit(pixels)
    return _estimate(optical_density(pixels, transmitted_light(pixels, lit)), lit)


def _estimate(density: np.ndarray, lit: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    stained = density[lit & (density > BETA).any(axis=1)]
    if len(stained) < MIN_STAINED:
        return None
    order = np.argsort(stained.sum(axis=1))
    nuclear = _unit(np.median(stained[order[-max(1, int(len(order) * NUCLEAR_SHARE)):]], axis=0))
    other = _unit(np.median(stained[order[:max(1, int(len(order) * OTHER_SHARE))]], axis=0))
    vectors = nuclear[:, None] if float(nuclear @ other) > ONE_STAIN_COS else np.stack([nuclear, other], axis=1)
    concentrations = _concentrations(vectors, stained)
    maxima = np.percentile(concentrations, 99, axis=1)
    if (maxima <= 1e-6).any():
        return None
    # one flat colour (a dim or saturated image with no glass and no cell in it): nothing to rebuild; its
    # single concentration would be scaled to the reference's nuclear maximum, a solid purple picture
    if (np.percentile(concentrations, 1, axis=1) > FLAT_SHARE * maxima).all():
        return None
    return vectors, maxima


def macenko(image: np.ndarray) -> np.ndarray:
    """An HWC uint8 RGB image in the reference's stain colours (same shape and dtype); unchanged
    when too few of its pixels are stained (:func:`stain_estimate`)."""
    pixels = image.reshape(-1, 3)
    lit = _lit(pixels)
    density = optical_density(pixels, transmitted_light(pixels, lit))
    estimate = _estimate(density, lit)
    if estimate is None:
        return image
    vectors, maxima = estimate
    stains = len(maxima)
    concentrations = _concentrations(vectors, density)
    concentrations *= (REFERENCE_MAX[:stains] / maxima)[:, None]
    rebuilt = LIGHT * np.exp(-(REFERENCE_VECTORS[:, :stains] @ concentrations)).T
    out = np.clip(np.rint(rebuilt), 0, 255).astype(np.uint8)
    out[~lit] = pixels[~lit]
    return out.reshape(image.shape)


WHITE_SHARE = 0.05
"""The brightest share of an image's lit pixels (by channel sum) whose median colour is its white."""


def white_point(image: np.ndarray, min_lit_share: float = SEGMENTED_SHARE) -> np.ndarray | None:
    """The white ``(3,)`` an HWC uint8 RGB image's camera saw: the median colour of its brightest
    :data:`WHITE_SHARE` of lit pixels. None for an image with fewer lit pixels than ``min_lit_share``
    (a segmented cell on black: no background to see) and for one whose brightest pixels are darker
    than :data:`MIN_LIGHT` (no background in view). A field seen through an eyepiece's round field of
    view is black around it: :func:`leukoscope.light.field_white` asks for fewer lit pixels."""
    pixels = image.reshape(-1, 3)
    lit = _lit(pixels)
    valid = pixels[lit]
    if len(valid) < max(1, min_lit_share * len(pixels)):
        return None
    brightness = valid.sum(axis=1, dtype=np.int32)
    count = max(1, int(len(valid) * WHITE_SHARE))
    brightest = valid[np.argpartition(brightness, len(valid) - count)[-count:]]
    white = np.median(brightest, axis=0).astype(np.float64)
    if float(white.max()) < MIN_LIGHT:
        return None
    return np.maximum(white, 1.0)


def white_balance(image: np.ndarray) -> np.ndarray:
    """An HWC uint8 RGB image with its background brought to the neutral :data:`LIGHT` by one gain per
    channel (same shape and dtype); unchanged when it shows no background (:func:`white_point`)."""
    white = white_point(image)
    if white is None:
        return image
    gains = LIGHT / white
    return np.clip(np.rint(image.astype(np.float32) * gains.astype(np.float32)), 0, 255).astype(np.uint8)


def normalise_stain(image: np.ndarray, method: StainMethod) -> np.ndarray:
    """An HWC uint8 RGB image through the named stain normalisation."""
    if method == "macenko":
        return macenko(image)
    if method == "white_balance":
        return white_balance(image)
    raise ValueError(f"unknown stain normalisation {method!r} (expected one of {STAINS})")


def fit_reference(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Median stain directions (unit length) and concentration maxima over ``images`` (HWC uint8
    RGB): how :data:`REFERENCE_VECTORS` and :data:`REFERENCE_MAX` were made."""
    estimates = [estimate for estimate in map(stain_estimate, images)
                 if estimate is not None and len(estimate[1]) == 2]
    if not estimates:
        raise ValueError("no image had two estimable stains")
    vectors = np.median(np.stack([vectors for vectors, _ in estimates]), axis=0)
    return vectors / np.linalg.norm(vectors, axis=0, keepdims=True), np.median(
        np.stack([maxima for _, maxima in estimates]), axis=0)
