"""Hand-made image features for the classical baselines (system C and beyond).

Every extractor maps an RGB ``uint8`` image (``H x W x 3``; PIL images and
``3 x H x W`` tensors are accepted too) to a 1-D ``float64`` vector whose column
names come from the matching ``*_names`` function. :class:`FeatureExtractor`
concatenates the families a :class:`~leukoscope.classic.spec.FeatureSpec` selects:

``histogram``
    Per-channel colour histograms in RGB, HSV and/or CIE L*a*b*, ``bins`` bins
    per channel, each summing to 1 (share of pixels).
``dft``
    Radial profile of the Discrete Fourier Transform magnitude of the gray
    image: the mean ``log(1 + |F| / sqrt(H W))`` in ``dft_bins`` rings of
    spatial frequency from 0 to 0.5 cycles/pixel (corner frequencies fall in the
    last ring). The mean is subtracted and a Hann window applied first, so the
    letterbox border and the overall brightness do not leak into every ring; a
    constant image gives all zeros. Rings, not the raw spectrum, make the
    features invariant to the 90-degree rotations system C augments with.
``glcm``
    Gray-level co-occurrence texture (Haralick): contrast, dissimilarity,
    homogeneity, energy, correlation and entropy for each distance in
    ``glcm_distances``, averaged over 0, 45, 90 and 135 degrees (rotation
    invariant), on the gray image quantised to ``glcm_levels`` levels.
``lbp``
    Local binary patterns, rotation-invariant uniform ("riu2", the
    ``method="uniform"`` of scikit-image): a ``lbp_points + 2`` bin histogram
    per radius in ``lbp_radii``. Computed here with whole-array bilinear
    sampling (a few times faster than ``skimage.feature.local_binary_pattern``
    at these sizes, and equal to it away from the border).
``shape``
    Nucleus shape from a mask: area and perimeter (as fractions of the image
    area and side), circularity ``4 pi A / P^2`` (Crofton perimeter, so a disk
    scores ~1; clipped to 1) and solidity and eccentricity of the largest
    nucleus part, the number of parts (lobes), the whole cell's area, and the
    nucleus-to-cell ratio. ``shape_found`` is 0 when no nucleus was found (then
    every shape column is 0). The nucleus mask is a fast version of the LAB
    k-means segmentation of :mod:`leukoscope.segmentation`: a 3-class Otsu
    threshold on a* (the optimum of 1-D 3-means on the histogram: ~0.5 ms
    instead of ~90 ms for k-means at 128 px), with the same contrast rule and
    clean-up. The cell is every pixel that differs from the background colour
    (the median of the image border in L*a*b*, Otsu threshold) and touches the
    nucleus, so red cells lying apart are left out. A mask passed by the caller
    (e.g. a data set's own nucleus masks) is used instead of the computed one.

Non-negativity: the chi-square test of ``SelectKBest`` needs features >= 0.
Every column is non-negative except the GLCM correlation (in [-1, 1]); the
pipelines in :mod:`leukoscope.models.classic` therefore min-max scale first
(see there).

Speed (2-core CPU, 128 px image, all families with default settings): ~10 ms.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2lab
from skimage.feature import graycomatrix, graycoprops
from skimage.filters import threshold_multiotsu, threshold_otsu
from skimage.measure import perimeter_crofton, regionprops

from leukoscope.classic.spec import FEATURE_FAMILIES, FeatureSpec
from leukoscope.segmentation import clean_mask

GLCM_PROPERTIES: tuple[str, ...] = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "entropy")
GLCM_ANGLES: tuple[float, ...] = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
SHAPE_NAMES: tuple[str, ...] = (
    "shape_found",
    "nucleus_area",
    "nucleus_perimeter",
    "nucleus_circularity",
    "nucleus_solidity",
    "nucleus_eccentricity",
    "nucleus_parts",
    "cell_area",
    "nucleus_cell_ratio",
)
_CHANNELS = {"rgb": ("r", "g", "b"), "hsv": ("h", "s", "v"), "lab": ("l", "a", "b")}
#: How much more magenta (a* units) the nucleus must be than the median pixel; as in segmentation.
MIN_CONTRAST = 10.0


# --------------------------------------------------------------------- inputs


def as_rgb_array(image: Any) -> np.ndarray:
    """``H x W x 3`` uint8 array from a PIL image, an ``H x W x 3`` array or a ``3 x H x W`` tensor/array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H x W x 3 or 3 x H x W), got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {array.dtype}")
    if min(array.shape[:2]) < 8:
        raise ValueError(f"image of {array.shape[0]} x {array.shape[1]} px is too small for features (min 8 px)")
    return np.ascontiguousarray(array)


def gray_of(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma as float64 in [0, 255]."""
    return rgb @ np.array([0.299, 0.587, 0.114])


class _Cache(dict):
    """Per-image intermediate results shared by the families (LAB, gray)."""

    def __init__(self, rgb: np.ndarray) -> None:
        super().__init__()
        self.rgb = rgb

    def lab(self) -> np.ndarray:
        if "lab" not in self:
            self["lab"] = rgb2lab(self.rgb)
        return self["lab"]

    def gray(self) -> np.ndarray:
        if "gray" not in self:
            self["gray"] = gray_of(self.rgb)
        return self["gray"]


# ------------------------------------------------------------------ histogram


def histogram_names(bins: int, spaces: Sequence[str] = ("rgb", "hsv")) -> list[str]:
    return [f"hist_{space}_{channel}_{i}" for space in spaces for channel in _CHANNELS[space] for i in range(bins)]


def _space_channels(rgb: np.ndarray, space: str, cache: _Cache | None) -> np.ndarray:
    """``H x W x 3`` uint8 channels of ``space``, each spanning 0-255."""
    if space == "rgb":
        return rgb
    if space == "hsv":  # PIL's HSV conversion is C code, ~10x faster than skimage's
        return np.asarray(Image.fromarray(rgb).convert("HSV"))
    if space == "lab":
        lab = cache.lab() if cache is not None else rgb2lab(rgb)
        scaled = np.stack([lab[..., 0] * 2.55, lab[..., 1] + 128, lab[..., 2] + 128], axis=-1)
        return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown colour space {space!r}; choose from {list(_CHANNELS)}")


def color_histogram(image: Any, bins: int = 16, spaces: Sequence[str] = ("rgb", "hsv"),
                    _cache: _Cache | None = None) -> np.ndarray:
    """Per-channel histograms with ``bins`` equal bins over 0-255; each channel's sums to 1."""
    rgb = as_rgb_array(image)
    if not 2 <= bins <= 256:
        raise ValueError(f"bins must be between 2 and 256, got {bins}")
    n = rgb.shape[0] * rgb.shape[1]
    parts = []
    for space in spaces:
        channels = _space_channels(rgb, space, _cache)
        # One bincount for the three channels: channel c's bins start at c * bins.
        index = (channels.reshape(-1, 3).astype(np.int64) * bins) // 256 + np.arange(3) * bins
        parts.append(np.bincount(index.ravel(), minlength=3 * bins) / n)
    return np.concatenate(parts).astype(np.float64)


# ------------------------------------------------------------------------ DFT


def dft_names(bins: int) -> list[str]:
    return [f"dft_ring_{i}" for i in range(bins)]


@lru_cache(maxsize=16)
def _dft_layout(height: int, width: int, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hann window, ring index of each fft2 coefficient, which coefficients count, ring sizes.

    The full spectrum, not rfft2's half: the half-plane counts its edge column
    twice, which would make a 90-degree rotation move the features slightly."""
    window = np.outer(np.hanning(height), np.hanning(width))
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    ring = np.minimum((radius / 0.5 * bins).astype(np.int64), bins - 1)
    used = radius > 0  # the DC term is the mean, removed before the transform
    counts = np.bincount(ring[used], minlength=bins).astype(np.float64)
    return window, ring[used], used, counts


def dft_features(image: Any, bins: int = 16, _cache: _Cache | None = None) -> np.ndarray:
    """Mean log-magnitude of the gray image's spectrum in ``bins`` radial frequency rings."""
    rgb = as_rgb_array(image)
    gray = (_cache.gray() if _cache is not None else gray_of(rgb)) / 255.0
    height, width = gray.shape
    window, ring, used, counts = _dft_layout(height, width, bins)
    spectrum = np.fft.fft2((gray - gray.mean()) * window)
    magnitude = np.log1p(np.abs(spectrum[used]) / math.sqrt(height * width))
    sums = np.bincount(ring, weights=magnitude, minlength=bins)
    return np.divide(sums, counts, out=np.zeros(bins), where=counts > 0)


# ----------------------------------------------------------------------- GLCM


def glcm_names(distances: Sequence[int] = (1, 2, 4)) -> list[str]:
    return [f"glcm_{prop}_d{d}" for d in distances for prop in GLCM_PROPERTIES]


def glcm_features(image: Any, levels: int = 32, distances: Sequence[int] = (1, 2, 4),
                  _cache: _Cache | None = None) -> np.ndarray:
    """Haralick texture per distance, averaged over four angles (see module doc)."""
    rgb = as_rgb_array(image)
    gray = _cache.gray() if _cache is not None else gray_of(rgb)
    quantised = np.minimum((gray * levels / 256.0).astype(np.uint8), levels - 1)
    matrix = graycomatrix(quantised, list(distances), list(GLCM_ANGLES), levels=levels, symmetric=True, normed=True)
    columns = []
    for prop in GLCM_PROPERTIES:
        if prop == "entropy":  # computed here: graycoprops only has it from scikit-image 0.25
            logs = np.log2(matrix, out=np.zeros_like(matrix), where=matrix > 0)
            values = -(matrix * logs).sum(axis=(0, 1))
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                values = graycoprops(matrix, prop)
        columns.append(np.nan_to_num(values, nan=0.0).mean(axis=1))  # (distances,)
    return np.stack(columns, axis=1).ravel().astype(np.float64)  # distance-major, as glcm_names


# ------------------------------------------------------------------------ LBP


def lbp_names(points: int = 8, radii: Sequence[int] = (1, 2, 3)) -> list[str]:
    return [f"lbp_r{r}_{i}" for r in radii for i in range(points + 2)]


def lbp_codes(gray: np.ndarray, points: int = 8, radius: float = 1.0) -> np.ndarray:
    """Rotation-invariant uniform LBP code (0 .. points + 1) of every pixel.

    Neighbour ``p`` sits at ``(-radius sin(2 pi p / P), radius cos(2 pi p / P))``
    and is sampled bilinearly, as scikit-image does; pixels beyond the border
    repeat the edge. Code = number of neighbours >= the centre when the circular
    pattern has at most two 0/1 transitions, else ``points + 1``.
    """
    gray = np.asarray(gray, dtype=np.float64)
    pad = int(math.ceil(radius)) + 1
    padded = np.pad(gray, pad, mode="edge")
    height, width = gray.shape
    bits = []
    for p in range(points):
        angle = 2 * math.pi * p / points
        dy, dx = round(-radius * math.sin(angle), 5), round(radius * math.cos(angle), 5)
        y0, x0 = math.floor(dy), math.floor(dx)
        fy, fx = dy - y0, dx - x0

        def shifted(oy: int, ox: int) -> np.ndarray:
            return padded[pad + oy: pad + oy + height, pad + ox: pad + ox + width]

        value = (1 - fy) * (1 - fx) * shifted(y0, x0)
        if fx:
            value = value + (1 - fy) * fx * shifted(y0, x0 + 1)
        if fy:
            value = value + fy * (1 - fx) * shifted(y0 + 1, x0)
        if fx and fy:
            value = value + fy * fx * shifted(y0 + 1, x0 + 1)
        bits.append(value >= gray - 1e-7)  # tolerance: interpolating equal values may round down
    stack = np.stack(bits).astype(np.int8)
    transitions = np.abs(stack - np.roll(stack, -1, axis=0)).sum(axis=0)
    ones = stack.sum(axis=0, dtype=np.int64)
    return np.where(transitions <= 2, ones, points + 1)


def lbp_features(image: Any, points: int = 8, radii: Sequence[int] = (1, 2, 3),
                 _cache: _Cache | None = None) -> np.ndarray:
    """One normalised ``points + 2`` bin histogram of LBP codes per radius."""
    rgb = as_rgb_array(image)
    gray = _cache.gray() if _cache is not None else gray_of(rgb)
    parts = [np.bincount(lbp_codes(gray, points, r).ravel(), minlength=points + 2) / gray.size for r in radii]
    return np.concatenate(parts).astype(np.float64)


# ---------------------------------------------------------------------- shape


def shape_names() -> list[str]:
    return list(SHAPE_NAMES)


def nucleus_mask(image: Any, _cache: _Cache | None = None) -> np.ndarray:
    """Fast nucleus mask (see module doc): 3-class Otsu on a*, contrast rule, clean-up."""
    rgb = as_rgb_array(image)
    lab = _cache.lab() if _cache is not None else rgb2lab(rgb)
    gray_image = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    channel = 100.0 - lab[..., 0] if gray_image else lab[..., 1]
    empty = np.zeros(channel.shape, dtype=bool)
    if np.ptp(channel) < MIN_CONTRAST:
        return empty
    try:
        threshold = threshold_multiotsu(channel, classes=3, nbins=64)[-1]
    except ValueError:  # too few distinct values for three classes
        threshold = threshold_otsu(channel)
    mask = channel > threshold
    if not mask.any() or channel[mask].mean() - np.median(channel) < MIN_CONTRAST:
        return empty
    return clean_mask(mask)


def cell_mask_around(image: Any, nucleus: np.ndarray, _cache: _Cache | None = None) -> np.ndarray:
    """Pixels unlike the background (Otsu on L*a*b* distance to the border median) that touch ``nucleus``.
    The threshold is found among the pixels outside the nucleus: among all of them it fell between the nucleus
    and the rest, and a neutrophil's "cell" was its nucleus (nucleus-to-cell ratio 0.97 on pbc, now 0.46)."""
    rgb = as_rgb_array(image)
    lab = _cache.lab() if _cache is not None else rgb2lab(rgb)
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    distance = np.linalg.norm(lab - np.median(border, axis=0), axis=-1)
    outside = distance[~nucleus]
    if outside.size and np.ptp(outside) > 0:
        foreground = clean_mask(distance > max(threshold_otsu(outside), 5.0))
    else:
        foreground = np.zeros(distance.shape, dtype=bool)
    labels, _ = ndimage.label(foreground | nucleus)
    touching = np.unique(labels[nucleus])
    cell = np.isin(labels, touching[touching > 0])
    return ndimage.binary_fill_holes(cell | nucleus)


def shape_features(image: Any, mask: np.ndarray | None = None, _cache: _Cache | None = None) -> np.ndarray:
    """Nucleus shape and nucleus-to-cell ratio (see module doc); ``mask`` overrides the computed nucleus."""
    rgb = as_rgb_array(image)
    cache = _cache if _cache is not None else _Cache(rgb)
    if mask is None:
        nucleus = nucleus_mask(rgb, cache)
    else:
        nucleus = np.asarray(mask).astype(bool)
        if nucleus.shape != rgb.shape[:2]:
            raise ValueError(f"mask shape {nucleus.shape} does not match the image {rgb.shape[:2]}")
    out = np.zeros(len(SHAPE_NAMES))
    if not nucleus.any():
        return out
    height, width = nucleus.shape
    labels, parts = ndimage.label(nucleus)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(sizes.argmax())
    box = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    region_mask = np.pad(labels[box] == largest, 1)  # margin: the perimeter needs a background ring
    region = regionprops(region_mask.astype(np.uint8))[0]
    region_perimeter = perimeter_crofton(region_mask, directions=4)
    area = float(nucleus.sum())
    cell = cell_mask_around(rgb, nucleus, cache)
    out[:] = (
        1.0,
        area / (height * width),
        perimeter_crofton(nucleus, directions=4) / max(height, width),
        min(1.0, 4 * math.pi * region.area / region_perimeter**2) if region_perimeter > 0 else 0.0,
        float(region.solidity),
        float(region.eccentricity),
        float(parts),
        float(cell.sum()) / (height * width),
        area / max(float(cell.sum()), 1.0),
    )
    return out


# -------------------------------------------------------------------- together


def feature_names(spec: FeatureSpec | None = None) -> list[str]:
    """Column names of :func:`extract_features` for ``spec``, in order."""
    spec = spec or FeatureSpec()
    makers: dict[str, Callable[[], list[str]]] = {
        "histogram": lambda: histogram_names(spec.histogram_bins, spec.histogram_spaces),
        "dft": lambda: dft_names(spec.dft_bins),
        "glcm": lambda: glcm_names(spec.glcm_distances),
        "lbp": lambda: lbp_names(spec.lbp_points, spec.lbp_radii),
        "shape": shape_names,
    }
    return [name for family in spec.families for name in makers[family]()]


class FeatureExtractor:
    """The feature vector of one image for a :class:`FeatureSpec` (``names`` gives the columns)."""

    def __init__(self, spec: FeatureSpec | dict | None = None) -> None:
        if spec is None:
            spec = FeatureSpec()
        elif isinstance(spec, dict):
            spec = FeatureSpec.model_validate(spec)
        self.spec = spec
        self.names = feature_names(spec)

    def __len__(self) -> int:
        return len(self.names)

    def __call__(self, image: Any, mask: np.ndarray | None = None) -> np.ndarray:
        rgb = as_rgb_array(image)
        cache = _Cache(rgb)
        spec = self.spec
        parts = []
        for family in spec.families:
            if family == "histogram":
                parts.append(color_histogram(rgb, spec.histogram_bins, spec.histogram_spaces, cache))
            elif family == "dft":
                parts.append(dft_features(rgb, spec.dft_bins, cache))
            elif family == "glcm":
                parts.append(glcm_features(rgb, spec.glcm_levels, spec.glcm_distances, cache))
            elif family == "lbp":
                parts.append(lbp_features(rgb, spec.lbp_points, spec.lbp_radii, cache))
            elif family == "shape":
                parts.append(shape_features(rgb, mask, cache))
            else:  # pragma: no cover - FeatureSpec validates the names
                raise ValueError(f"unknown feature family {family!r}; choose from {list(FEATURE_FAMILIES)}")
        return np.concatenate(parts)

    def transform(self, images: Any, masks: Sequence[np.ndarray | None] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """``(N, len(names))`` features of a batch: ``N x 3 x S x S`` uint8 tensor/array or a list of images."""
        count = len(images)
        if masks is not None and len(masks) != count:
            raise ValueError(f"{len(masks)} masks for {count} images")
        out = np.empty((count, len(self.names)), dtype=np.float64)
        for index in range(count):
            out[index] = self(images[index], None if masks is None else masks[index])
            if progress is not None:
                progress(index + 1, count)
        return out


def extract_features(images: Any, spec: FeatureSpec | dict | None = None,
                     masks: Sequence[np.ndarray | None] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Feature matrix ``(N, D)`` of ``images``; columns named by :func:`feature_names`."""
    return FeatureExtractor(spec).transform(images, masks, progress)
