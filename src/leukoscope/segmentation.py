"""Colour segmentation of stained white cells in blood-smear images.

Two methods, both returning a boolean ``H x W`` mask of the stained cell(s):

``lab_kmeans``
    The colour clustering of Chowdhury et al.: RGB -> CIE L*a*b*, k-means on the
    a* (green-magenta) channel, keep the cluster with the **highest a* centre**,
    threshold, fill holes, remove noise and small objects. Why the highest a*:
    Giemsa / May-Grünwald stain makes nuclei (and blast cytoplasm) purple, the
    most magenta colour on a smear; slide background is near-neutral and red
    cells, although pink, are paler (lower a*). When nuclei and cytoplasm differ
    (e.g. a neutrophil) the mask is the nucleus; a uniformly purple blast is
    masked whole. A larger ``n_clusters`` makes the kept cluster (and the mask)
    tighter around the most strongly stained pixels.
``hsv``
    Saturation above Otsu's threshold (never below ``min_saturation``) with a hue
    in the blue-violet-magenta band of stained nuclei, then the same clean-up.

If the stained cluster is not clearly more magenta (or saturated) than the
background, e.g. a blank field, the mask is empty: :func:`segment` then returns
the image unchanged and logs a warning, so a preprocessing pipeline never
crashes on one odd image. Grayscale images have no colour to cluster: the
``lab_kmeans`` method then clusters darkness (100 - L*) instead, stained nuclei
being the darkest objects on a bright-field slide.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hsv, rgb2lab
from skimage.filters import threshold_otsu
from skimage.morphology import disk
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

SEGMENTATION_METHODS: tuple[str, ...] = ("lab_kmeans", "hsv")

#: Pixels sampled to fit k-means: a 5 Mpx smear would be slow to cluster whole,
#: and a 1-D a* distribution is well estimated from this many pixels.
_KMEANS_SAMPLE = 20_000
_KMEANS_N_INIT = 4
_RANDOM_STATE = 0
#: Hue band (skimage's 0-1 scale) of stained nuclei: ~200 to ~340 degrees.
DEFAULT_HUE_RANGE: tuple[float, float] = (0.55, 0.95)

ImageLike = np.ndarray | Image.Image


# --------------------------------------------------------------------- inputs


def _to_pil(image: ImageLike) -> Image.Image:
    """Any PIL image or array -> PIL (uint8), without colour conversion yet."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected an H x W, H x W x 3 or H x W x 4 image, got shape {array.shape}")
    if array.size == 0:
        raise ValueError("image has no pixels")
    if array.dtype != np.uint8:
        array = _as_uint8(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def _as_uint8(array: np.ndarray) -> np.ndarray:
    # Floats are taken as 0-1 (skimage convention), integers as 0-255.
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("float images must hold finite values in [0, 1]")
        return np.round(array * 255).astype(np.uint8)
    if array.dtype == np.bool_ or array.min() < 0 or array.max() > 255:
        raise ValueError(f"cannot interpret a {array.dtype} array with this range as an 8-bit image")
    return array.astype(np.uint8)


def to_rgb(image: ImageLike) -> Image.Image:
    """RGB copy of ``image``; transparency is composited on white like a slide."""
    pil = _to_pil(image)
    if pil.mode == "RGB":
        return pil.copy()
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        background = Image.new("RGB", pil.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return pil.convert("RGB")


def _is_gray(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


# ------------------------------------------------------------------- clean-up


def _opening_radius(shape: tuple[int, int]) -> int:
    # ~0.5 % of the short side: 1 px at 224 px, 2 px at 360 px, 10 px on a 5 Mpx smear.
    return max(1, round(0.005 * min(shape)))


def _remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    # scipy instead of skimage.morphology.remove_small_objects, whose size
    # argument changed meaning and name in scikit-image 0.26.
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def clean_mask(mask: np.ndarray, min_object_fraction: float = 0.002) -> np.ndarray:
    """Opening (speckle, thin bridges), hole filling, then removal of objects
    smaller than ``min_object_fraction`` of the image area."""
    if not 0 <= min_object_fraction < 1:
        raise ValueError(f"min_object_fraction must be in [0, 1), got {min_object_fraction}")
    footprint = disk(_opening_radius(mask.shape))
    opened = ndimage.binary_opening(mask, structure=footprint)
    filled = ndimage.binary_fill_holes(opened)
    min_size = max(1, int(np.ceil(min_object_fraction * mask.size)))
    return _remove_small_objects(filled, min_size)


# ---------------------------------------------------------------- the methods


def _kmeans_centres(values: np.ndarray, n_clusters: int) -> np.ndarray:
    """Sorted 1-D k-means centres of ``values``, fitted on a fixed random sample."""
    flat = values.ravel()
    if flat.size > _KMEANS_SAMPLE:
        flat = np.random.default_rng(_RANDOM_STATE).choice(flat, _KMEANS_SAMPLE, replace=False)
    # One thread: this fit is far too small to gain from OpenMP, whose spin-waits
    # made it 30x slower on a busy 2-core machine and would oversubscribe DataLoader workers.
    with warnings.catch_warnings(), threadpool_limits(1, user_api="openmp"):
        # Fewer distinct values than clusters (flat images): harmless here.
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(n_clusters, n_init=_KMEANS_N_INIT, random_state=_RANDOM_STATE)
        kmeans.fit(flat.reshape(-1, 1).astype(np.float64))
    return np.sort(kmeans.cluster_centers_.ravel())


def _lab_kmeans_raw(rgb: np.ndarray, n_clusters: int, min_contrast: float) -> np.ndarray:
    if _is_gray(rgb):
        channel = 100.0 - rgb2lab(rgb)[..., 0]  # darkness: no colour to cluster
    else:
        channel = rgb2lab(rgb)[..., 1]
    # A flat channel cannot hold a stained object; also spares k-means the degenerate case.
    if np.ptp(channel) < min_contrast:
        return np.zeros(channel.shape, dtype=bool)
    # Images with fewer colours than clusters give duplicate centres: drop them.
    centres = np.unique(np.round(_kmeans_centres(channel, n_clusters), 6))
    if centres.size < 2:
        return np.zeros(channel.shape, dtype=bool)
    # 1-D nearest-centre assignment == threshold half-way to the next centre down.
    threshold = (centres[-1] + centres[-2]) / 2
    mask = channel >= threshold
    # Contrast against the median pixel, which is background wherever cells
    # cover under half the field: rejects "the most magenta speck of a blank
    # slide" and fields whose background is as magenta as the cells.
    if not mask.any() or channel[mask].mean() - np.median(channel) < min_contrast:
        return np.zeros(channel.shape, dtype=bool)
    return mask


def _hsv_raw(rgb: np.ndarray, hue_range: tuple[float, float], min_saturation: float) -> np.ndarray:
    hsv = rgb2hsv(rgb)
    hue, saturation = hsv[..., 0], hsv[..., 1]
    if np.ptp(saturation) == 0:
        return np.zeros(saturation.shape, dtype=bool)
    threshold = max(float(threshold_otsu(saturation)), min_saturation)
    low, high = hue_range
    return (saturation > threshold) & (hue >= low) & (hue <= high)


def cell_mask(
    image: ImageLike,
    method: str = "lab_kmeans",
    *,
    n_clusters: int = 3,
    min_object_fraction: float = 0.002,
    min_contrast: float = 10.0,
    hue_range: tuple[float, float] = DEFAULT_HUE_RANGE,
    min_saturation: float = 0.15,
) -> np.ndarray:
    """Boolean ``H x W`` mask of the stained cell(s) in ``image`` (may be all False).

    ``min_contrast`` (``lab_kmeans``): how much more magenta, in a* units, the kept
    cluster must be than the median pixel (darkness in L* units for grayscale);
    below it the mask is empty. A crop in which the stained cell fills more than
    half of the image therefore gives an empty mask (nothing to separate).
    ``hue_range`` / ``min_saturation`` (``hsv``): hue band (0-1) and saturation
    floor of stained pixels.
    """
    if method not in SEGMENTATION_METHODS:
        raise ValueError(f"unknown segmentation method {method!r}; choose from {SEGMENTATION_METHODS}")
    if n_clusters < 2:
        raise ValueError(f"n_clusters must be at least 2, got {n_clusters}")
    rgb = np.asarray(to_rgb(image))
    if method == "lab_kmeans":
        raw = _lab_kmeans_raw(rgb, n_clusters, min_contrast)
    else:
        raw = _hsv_raw(rgb, hue_range, min_saturation)
    return clean_mask(raw, min_object_fraction)


# ------------------------------------------------------------------ outputs


def _check_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask)
    width, height = size
    if mask.shape != (height, width):
        raise ValueError(f"mask shape {mask.shape} does not match the image ({height} x {width})")
    return mask.astype(bool, copy=False)


def apply_mask(
    image: ImageLike, mask: np.ndarray, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """RGB image with every pixel outside ``mask`` set to ``background``."""
    rgb = to_rgb(image)
    keep = _check_mask(mask, rgb.size)
    array = np.array(rgb)
    array[~keep] = np.asarray(background, dtype=np.uint8)
    return Image.fromarray(array)


def segment(
    image: ImageLike,
    method: str = "lab_kmeans",
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    **kwargs,
) -> Image.Image:
    """The stained cell(s) on a constant ``background``; the whole image (RGB)
    with a warning when nothing stained is found. ``kwargs`` go to :func:`cell_mask`."""
    mask = cell_mask(image, method, **kwargs)
    if not mask.any():
        log.warning("segmentation (%s) found no stained cell; using the whole image", method)
        return to_rgb(image)
    return apply_mask(image, mask, background)


@dataclass(frozen=True)
class Segmenter:
    """Picklable ``PIL -> PIL`` preprocessing step (:attr:`leukoscope.preprocessing.Preprocessing.segmenter`).

    Being a plain dataclass (no lambdas or closures), it pickles into DataLoader
    workers and can be recorded in an experiment config by its fields.
    """

    method: str = "lab_kmeans"
    n_clusters: int = 3
    min_object_fraction: float = 0.002
    background: tuple[int, int, int] = (255, 255, 255)
    min_contrast: float = 10.0
    hue_range: tuple[float, float] = DEFAULT_HUE_RANGE
    min_saturation: float = 0.15

    def __post_init__(self) -> None:
        if self.method not in SEGMENTATION_METHODS:
            raise ValueError(f"unknown segmentation method {self.method!r}; choose from {SEGMENTATION_METHODS}")

    def __call__(self, image: ImageLike) -> Image.Image:
        return segment(
            image,
            self.method,
            background=self.background,
            n_clusters=self.n_clusters,
            min_object_fraction=self.min_object_fraction,
            min_contrast=self.min_contrast,
            hue_range=self.hue_range,
            min_saturation=self.min_saturation,
        )


def save_mask(mask: np.ndarray, path: str | Path) -> Path:
    """Write ``mask`` as an 8-bit PNG (0 = background, 255 = cell)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(bool).astype(np.uint8) * 255, mode="L").save(path, format="PNG")
    return path


#: Said under every segmentation figure: what its white pixels are.
MASK_CAPTION = ("white: the most violet-stained pixels. In a white cell that is its nucleus (with the little "
                "cytoplasm of a blast or lymphocyte); pale cytoplasm and red cells are left out.")


def segmentation_figure(
    image: ImageLike, mask: np.ndarray, path: str | Path, title: str | None = None
) -> Path:
    """Save original | mask | segmented side by side as an image file at ``path``."""
    # A bare Figure (Agg canvas) instead of pyplot: no global state, nothing to
    # close, safe in threads and under any interactive backend.
    from matplotlib.figure import Figure

    rgb = to_rgb(image)
    keep = _check_mask(mask, rgb.size)
    figure = Figure(figsize=(10.5, 3.8), layout="constrained")
    axes = figure.subplots(1, 3)
    panels = (
        (rgb, "original", None),
        (keep, f"mask: most stained ({keep.mean():.1%} of image)", "gray"),
        (apply_mask(rgb, keep), "segmented", None),
    )
    for ax, (content, label, cmap) in zip(axes, panels):
        if cmap:
            ax.imshow(content, cmap=cmap, vmin=0, vmax=1)
        else:
            ax.imshow(content)
        ax.set_title(label)
        ax.set_axis_off()
    if title:
        figure.suptitle(str(title).replace("$", r"\$"))  # drawn literally, never as mathtext
    # the mask is read as "the cell" otherwise; on a white-cell photograph it is mostly the nucleus
    figure.supxlabel(MASK_CAPTION, fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
