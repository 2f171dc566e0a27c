"""The physical scale of a field (micrometres per pixel), from its red cells.

Sources differ in magnification: pbc's CellaVision crops show red cells ~73 px
across, CBC/BCCD fields ~95 px, all-taleqani's 224 px fields ~15 px. A model that
sees cells at one source's scale misreads another's, so detection and
classification work at one scale in microns. A user may state it (``--um-per-px``);
otherwise it is estimated here from the median diameter of isolated, round red
cells, which are about 7.5 um across in every healthy or leukaemic smear (the
white cells vary far more). Round violet objects (nuclei, blasts, small lymphocytes)
are left out first: in a blast-rich field they outnumber the isolated red cells.
A field with too few isolated red cells (a single segmented cell on black, a thick
area, a blank field) has no estimate and is flagged instead of guessed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence, TypeVar

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color, filters, measure

from leukoscope.field_of_view import background_colour, outside_mask

#: Median diameter of a normal red cell on a dried, stained smear (ICSH; 6.7-7.8 um).
RED_CELL_DIAMETER_UM = 7.5
#: Fewer isolated red cells than this and the field's scale is not estimated.
MIN_RED_CELLS = 3
#: Estimation runs on a copy at most this many pixels on its longer side (speed; a red
#: cell stays >= 10 px across at every magnification seen so far).
_MAX_SIDE = 1024
_MIN_DIAMETER_PX = 6.0
#: An estimate whose red cells are smaller than this (pixels across) is refused: a white cell would span
#: under ~20 px, too few for its type, and in crowded fields, where the red cells touch and none is
#: isolated, what is left isolated and round is platelets and debris (3 of BCCD's 364 fields were read
#: 9-11 times too coarse that way; `python bench/scale_estimates.py`, docs/benchmarks.md).
MIN_RED_CELL_PX = 12.0
#: CIELAB a* - b* above which a pixel is nuclear stain: chromatin is violet in every Romanowsky stain seen
#: (all-taleqani's nuclei and blasts 68-141 as object means), red cells pink or grey-blue (4-44; pbc's and
#: BCCD's pink ones about 25). Results hardly moved between 50 and 70 (docs/benchmarks.md, "Violet objects
#: left out of the red-cell scale").
NUCLEAR_VIOLET = 60.0
#: An object more than this share of whose pixels are nuclear stain is a white cell, not a red cell: a
#: neutrophil's or an erythroblast's nucleus may be a fifth of it (pbc: 0.15-0.3 for many), a red cell's none.
NUCLEAR_SHARE = 0.15
#: A field's own estimate resting on this many red cells or fewer, and further than FIELD_RUN_MAX_RATIO
#: from its run's scale, is taken for a misreading (every misread field of bench/scale_estimates.py rested
#: on 3 to 5 since violet objects are left out) and the field is analysed at the run's scale instead. An
#: estimate on more red cells stands: it may be another microscope's field in a mixed run.
WEAK_ESTIMATE_RED_CELLS = 5
FIELD_RUN_MAX_RATIO = 1.5

T = TypeVar("T")
ScaleSource = Literal["given", "recorded", "estimated", "run", "unknown"]
#: Fields of a run sampled for its scale (:func:`run_scale`): the median settles after a dozen estimates.
RUN_SCALE_FIELDS = 24
#: A run's scale needs this many sampled fields with an estimate...
RUN_SCALE_MIN_ESTIMATES = 5
#: ...of which at least two thirds lie within this factor of their median (the others are left out as
#: misread; pbc's 14 of 24 sampled fields: quartiles 1.15 apart; two microscopes in like numbers: none lent).
RUN_SCALE_MAX_SPREAD = 1.3
#: A stated scale is doubted by fewer agreeing fields than a run's scale is lent on: the doubt is a warning (and no
#: leukemia flag), not a scale used in its place. Six CBC fields stated at 0.8 um/px (truly about 0.08) had 3
#: estimates, agreeing within 1.2 times, and went unwarned with 15 of 18 cells called blast.
STATED_DOUBT_MIN_ESTIMATES = 3
#: How the CLI's user states a scale, as messages name it; the web service, whose users state it on the upload
#: form, puts its own words in its place (``leukoscope.service.analysis.in_service_words``).
SCALE_OPTION = "--um-per-px"


@dataclass(frozen=True)
class FieldScale:
    """A field's pixel size and where it came from."""

    um_per_px: float | None
    source: ScaleSource
    red_cells: int = 0
    """Isolated red cells of this field the scale rests on (0 when given, the run's, or unknown: then the note
    says what the field's own estimate found)."""
    note: str = ""

    @property
    def known(self) -> bool:
        return self.um_per_px is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "FieldScale":
        """Back from :meth:`to_json` (a field's recorded ``scale``; its other keys are ignored)."""
        return cls(record.get("um_per_px"), record.get("source", "unknown"), record.get("red_cells", 0),
                   record.get("note", ""))

    @classmethod
    def given(cls, um_per_px: float) -> "FieldScale":
        return cls(checked_um_per_px(um_per_px, SCALE_OPTION), "given", 0, "stated by the user")

    @classmethod
    def recorded(cls, um_per_px: float) -> "FieldScale":
        """The scale an image's file records (a TIFF's resolution tags), before its red cells check it."""
        return cls(float(um_per_px), "recorded", 0, "recorded in the file (TIFF resolution tags)")


def checked_um_per_px(um_per_px: float, name: str) -> float:
    """A pixel size someone gave (``name``: the option or argument, for the message), as a float,
    or a ValueError when it is no microscope's: outside 0.005-5 micrometres per pixel, or not finite."""
    if not (math.isfinite(um_per_px) and 0.005 <= um_per_px <= 5.0):
        raise ValueError(f"{name} must be between 0.005 and 5 micrometres per pixel, got {um_per_px}")
    return float(um_per_px)


def red_cell_diameters(image: Image.Image) -> np.ndarray:
    """Equivalent diameters (image pixels) of the isolated, round, stained objects of a field.

    Cells absorb green light far more than the background, so Otsu's threshold on the
    green channel separates them; holes (red cells' pale centres) are filled; objects
    cut by the border, touching clumps (low solidity) and elongated ones are dropped,
    and so are violet ones (:func:`nuclear_pixels`): white cells, which in a blast-rich
    field are most of the isolated round objects (all-taleqani's Pre-B fields were read
    a tenth too fine from their blasts). Two thresholds are tried, Otsu's over all pixels
    and over those that are not nuclear (where dark nuclei alone would set it, pale red
    cells fall to the background; where they do not, the lower one parts the dense pale
    red cells of blast-rich fields), and the one that finds more such objects is kept. The
    median of what remains is dominated by red cells."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # no full-size copy of an RGB field
    factor = min(1.0, _MAX_SIDE / max(rgb.size))
    if factor < 1.0:
        rgb = rgb.resize((max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor))),
                         Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb)
    # Black outside the field of view (an eyepiece camera's) had set Otsu's threshold to 0: painted as background,
    # and its edge taken as the image's (a red cell cut by it is not whole).
    outside = outside_mask(pixels)
    if outside is not None:
        pixels = pixels.copy()
        pixels[outside] = background_colour(pixels, outside)
        outside = ndimage.binary_dilation(outside, iterations=2)
    green = pixels[..., 1].astype(np.float32)
    if float(green.max() - green.min()) < 10:  # a blank field: nothing to threshold
        return np.zeros(0)
    nuclear = nuclear_pixels(pixels)
    rest = green[~nuclear]
    thresholds = {float(filters.threshold_otsu(green))}
    if rest.size >= 100 and float(rest.max() - rest.min()) >= 10:
        thresholds.add(float(filters.threshold_otsu(rest)))
    found = [_isolated_round_objects(green < threshold, nuclear, outside) for threshold in sorted(thresholds)]
    diameters = max(found, key=len) / factor
    return diameters[diameters >= _MIN_DIAMETER_PX]


def _isolated_round_objects(stained: np.ndarray, nuclear: np.ndarray,
                            outside: np.ndarray | None = None) -> np.ndarray:
    """Equivalent diameters of the objects of a stained-pixel mask that are whole (not cut by the border, nor by
    the edge of the field of view: ``outside``), round, solid and not nuclear (:data:`NUCLEAR_SHARE`)."""
    labels = measure.label(ndimage.binary_fill_holes(stained))
    n = int(labels.max())
    # objects cut by the border are left out (what skimage's clear_border does, without labelling twice)
    edges = [labels[0], labels[-1], labels[:, 0], labels[:, -1]] + ([labels[outside]] if outside is not None else [])
    border = np.unique(np.concatenate(edges))
    inside = ~np.isin(np.arange(1, n + 1), border)
    areas, eccentricities = _areas_and_eccentricities(labels)
    nuclear_share = np.bincount(labels.ravel(), weights=nuclear.ravel(), minlength=n + 1)[1:] / np.maximum(areas, 1)
    # solidity (a convex hull per region) is the slow test: only for regions that pass the others
    regions = measure.regionprops(labels)
    candidates = inside & (areas >= 20) & (eccentricities < 0.75) & (nuclear_share <= NUCLEAR_SHARE)
    return np.asarray([regions[k].equivalent_diameter_area for k in np.flatnonzero(candidates)
                       if regions[k].solidity > 0.9], dtype=np.float64)


def nuclear_pixels(pixels: np.ndarray, violet: float = NUCLEAR_VIOLET) -> np.ndarray:
    """Which pixels of an RGB ``uint8`` array are violet nuclear stain (CIELAB a* - b* above ``violet``),
    read from a table of 32 levels per channel: a tenth of the time of converting a field to CIELAB, and
    the rule is far coarser than the table."""
    levels = pixels >> 3
    return _violet_table()[levels[..., 0], levels[..., 1], levels[..., 2]] > violet


@functools.lru_cache(maxsize=1)
def _violet_table() -> np.ndarray:
    """CIELAB a* - b* at the centre of each of the 32 x 32 x 32 RGB bins."""
    centres = np.arange(4, 256, 8, dtype=np.uint8)
    grid = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), axis=-1)
    lab = color.rgb2lab(grid.reshape(-1, 1, 3)).reshape(32, 32, 32, 3)
    return (lab[..., 1] - lab[..., 2]).astype(np.float32)


def _areas_and_eccentricities(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count and eccentricity of regions ``1..labels.max()``, as skimage's regionprops gives
    them (to 1e-13) but from the central moments of all regions at once: regionprops computes
    them region by region, 0.1 s for the ~500 objects of a 5 MP field."""
    n = int(labels.max())
    pixels = np.flatnonzero(labels)
    label = labels.ravel()[pixels]
    rows, cols = (axis.astype(np.float64) for axis in np.divmod(pixels, labels.shape[1]))
    area = np.bincount(label, minlength=n + 1)[1:].astype(np.float64)

    def mean_per_region(values: np.ndarray) -> np.ndarray:
        return np.bincount(label, weights=values, minlength=n + 1)[1:] / np.maximum(area, 1)

    d_rows = rows - mean_per_region(rows)[label - 1]
    d_cols = cols - mean_per_region(cols)[label - 1]
    var_r, var_c, cov = (mean_per_region(d_rows * d_rows), mean_per_region(d_cols * d_cols),
                         mean_per_region(d_rows * d_cols))
    half = np.sqrt(((var_r - var_c) / 2) ** 2 + cov ** 2)
    major, minor = (var_r + var_c) / 2 + half, (var_r + var_c) / 2 - half
    ratio = np.divide(minor, major, out=np.ones_like(major), where=major > 0)
    return area, np.sqrt(np.clip(1 - ratio, 0, None))


def estimate_scale(image: Image.Image, *, min_red_cells: int = MIN_RED_CELLS) -> FieldScale:
    """The field's micrometres per pixel from its red cells, or an 'unknown' scale saying why."""
    diameters = red_cell_diameters(image)
    if len(diameters) == 0:
        return FieldScale(None, "unknown", 0, "no isolated red cells found")
    # Debris and platelets are many but small: weighted by area they hardly count, so the
    # area-weighted median sits on the red cells; what lies far from it is dropped. (White cells,
    # which would pull it up, were left out by their nuclei's colour, NUCLEAR_SHARE; the plain
    # median, used before, sat on the platelets of crowded BCCD fields with few isolated red cells.)
    order = np.argsort(diameters)
    cumulative = np.cumsum(diameters[order] ** 2)
    weighted = float(diameters[order][np.searchsorted(cumulative, cumulative[-1] / 2)])
    red = diameters[(diameters > 0.6 * weighted) & (diameters < 1.5 * weighted)]
    if len(red) < min_red_cells:
        return FieldScale(None, "unknown", int(len(red)),
                          f"only {len(red)} isolated red cell(s) found (need {min_red_cells})")
    diameter = float(np.median(red))
    if diameter < MIN_RED_CELL_PX:
        return FieldScale(None, "unknown", int(len(red)),
                          f"the isolated round objects found are {diameter:.1f} px across, too small to be red "
                          f"cells of a field fit for a differential (under {MIN_RED_CELL_PX:g} px): likely "
                          f"platelets or debris")
    return FieldScale(RED_CELL_DIAMETER_UM / diameter, "estimated", int(len(red)),
                      f"median red-cell diameter {diameter:.1f} px = {RED_CELL_DIAMETER_UM} um")


#: How a warning that the stated scale looks wrong begins (:func:`stated_scale_doubt`, :func:`stated_run_doubt`).
STATED_SCALE_WORDING = "the stated scale"
#: ...and that of single-cell images, which doubts their classes only (no cell is detected, none missed).
STATED_CELL_SCALE_WORDING = f"{STATED_SCALE_WORDING} of these single-cell images"


def _doubt(um_per_px: float, measured: float, measured_by: str, how: str = "", *,
           single_cells: bool = False) -> str | None:
    """The doubt of a stated scale that ``measured_by`` ("the run's red cells measure") puts at ``measured``
    (``how``: said after it), or None within :data:`FIELD_RUN_MAX_RATIO`. ``single_cells``: said of single-cell
    images, framed at the wrong size (smear fields: their white cells may be missed too)."""
    ratio = um_per_px / measured
    if abs(math.log(ratio)) <= math.log(FIELD_RUN_MAX_RATIO):
        return None
    what, harm = ((STATED_CELL_SCALE_WORDING, "each cell is framed at the wrong size and its class may be wrong")
                  if single_cells else (STATED_SCALE_WORDING, "white cells may be missed or mistyped"))
    return (f"{what}, {um_per_px:g} um/px, is {max(ratio, 1 / ratio):.1f} times "
            f"{'coarser' if ratio > 1 else 'finer'} than {measured_by} ({measured:.4f} um/px"
            f"{', ' + how if how else ''}): {harm}; check {SCALE_OPTION}")


def stated_scale_doubt(image: Image.Image, um_per_px: float) -> str | None:
    """Why a scale the user stated looks wrong for this field, or None: its red cells measure another
    scale, more than :data:`FIELD_RUN_MAX_RATIO` off, on more than :data:`WEAK_ESTIMATE_RED_CELLS` red
    cells (a wrong ``--um-per-px`` had put CBC's red cells at 29 um and lost its white cells without a
    word). The stated scale is still the one used: the user may know better than a few red cells."""
    estimate = estimate_scale(image)
    if not estimate.known or estimate.red_cells <= WEAK_ESTIMATE_RED_CELLS:
        return None
    return _doubt(um_per_px, float(estimate.um_per_px), f"this field's {estimate.red_cells} isolated red cells measure")


#: A field's recorded pixel size coarser than this is no smear photograph's (a 10x objective gives about
#: 0.65 um/px, where a white cell is 18 px across): a camera that records its sensor's pixel pitch (3.45 um).
MAX_RECORDED_FIELD_UM_PER_PX = 1.0


def checked_record(image: Image.Image, recorded: float) -> FieldScale | None:
    """The scale of a field whose file records ``recorded`` um/px (a TIFF's resolution tags), as the red cells
    allow: the record, unless it is coarser than :data:`MAX_RECORDED_FIELD_UM_PER_PX` or the field's red cells
    measure another scale (on more than :data:`WEAK_ESTIMATE_RED_CELLS`, more than :data:`FIELD_RUN_MAX_RATIO`
    off), then their estimate, the record said in its note; None when the record is out of range and no red cell
    measures the field (its scale is then found as any field's is). A record trusted as it was, 3.45 um/px, had
    the field upsampled tenfold without a word."""
    if recorded > MAX_RECORDED_FIELD_UM_PER_PX:
        return None
    estimate = estimate_scale(image)
    if not estimate.known or estimate.red_cells <= WEAK_ESTIMATE_RED_CELLS:
        return FieldScale.recorded(recorded)
    ratio = recorded / float(estimate.um_per_px)
    if abs(math.log(ratio)) <= math.log(FIELD_RUN_MAX_RATIO):
        return FieldScale.recorded(recorded)
    return replace(estimate, note=f"{estimate.note}; the file records {recorded:g} um/px, {max(ratio, 1 / ratio):.1f} "
                                  f"times off what its red cells measure: not used")


def stated_run_doubt(paths: Sequence[str | Path], um_per_px: float, *, max_pixels: int | None = None,
                     single_cells: bool = False) -> str | None:
    """:func:`stated_scale_doubt` for a run of fields together: the :func:`run_scale` of ``paths`` against
    the stated one, or None when they agree or the run has none. Most CBC fields have too few red cells to
    doubt a wrong scale alone (a 3.7 times wrong one went unsaid on 2 of 3 fields); a run's median does, on
    :data:`STATED_DOUBT_MIN_ESTIMATES` agreeing fields (fewer than a lent scale needs).
    ``single_cells``: the paths are single-cell images (`predict`), in the words for them."""
    if len(paths) < STATED_DOUBT_MIN_ESTIMATES:
        return None
    run = run_scale(paths, max_pixels=max_pixels, min_fields=STATED_DOUBT_MIN_ESTIMATES)
    return stated_doubt_of_run(um_per_px, run, single_cells=single_cells)


def stated_doubt_of_run(um_per_px: float, run: FieldScale, *, single_cells: bool = False) -> str | None:
    """:func:`stated_run_doubt` from the run's scale (:func:`run_scale_of` its fields' estimates: the web
    service has them from a case's uploads); None when the run has none or it agrees."""
    if not run.known:
        return None
    if single_cells:  # the run's note speaks of fields
        return _doubt(um_per_px, float(run.um_per_px), "their red cells measure", single_cells=True)
    return _doubt(um_per_px, float(run.um_per_px), "the run's red cells measure", run.note)


def stated_doubt_of_record(um_per_px: float, recorded: float | None) -> str | None:
    """Why a scale the user stated for a slide looks wrong: its file records another level-0 pixel size, more
    than :data:`FIELD_RUN_MAX_RATIO` off (None when it records none or they agree). The stated one is still
    used: a file's record can be wrong too."""
    if recorded is None:
        return None
    return _doubt(um_per_px, float(recorded), "the slide file records", "at level 0")


def run_sample(items: Sequence[T], fields: int = RUN_SCALE_FIELDS) -> list[T]:
    """Up to ``fields`` of ``items`` spread evenly over them, first and last included (a fixed choice:
    the same run gives the same sample)."""
    if fields < 1:
        raise ValueError(f"fields must be at least 1, got {fields}")
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, min(fields, len(items))).round()] if items else []


def run_scale(paths: Sequence[str | Path], *, fields: int = RUN_SCALE_FIELDS, max_pixels: int | None = None,
              unit: str = "fields", min_fields: int = RUN_SCALE_MIN_ESTIMATES) -> FieldScale:
    """The scale of a run of fields from one microscope (a folder): :func:`run_scale_of` the estimates of
    :func:`run_sample` of ``paths``. Smear analysis gives it to a field with too few isolated red cells of
    its own, instead of assuming the detector's training scale: half of pbc's CellaVision images have
    fewer than three, and at the detector's scale their cells were typed right 69% of the time, at the
    run's 84% (docs/benchmarks.md, "The run's scale"). Unreadable files are skipped here (the analysis
    reports them). ``unit``: what its note calls the files (``images``: single cells, in `predict`);
    ``min_fields``: as :func:`run_scale_of`'s."""
    from leukoscope.io import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image

    def estimates() -> Iterator[FieldScale]:
        for path in run_sample(paths, fields):
            try:
                image = load_image(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
            except (ImageDecodeError, OSError):
                continue
            yield estimate_scale(image)

    return run_scale_of(list(estimates()), unit=unit, min_fields=min_fields)


def lent_run_scale(paths: Sequence[str | Path], um_per_px: float | None = None) -> float | None:
    """The scale ``paths`` together lend to those of them without one of their own (:func:`run_scale`): None
    when ``um_per_px`` is stated, when there are too few files to tell, or when they give no estimate."""
    if um_per_px is not None or len(paths) < RUN_SCALE_MIN_ESTIMATES:
        return None
    return run_scale(list(paths)).um_per_px


def run_scale_of(estimates: Sequence[FieldScale], *, unit: str = "fields",
                 min_fields: int = RUN_SCALE_MIN_ESTIMATES) -> FieldScale:
    """The run's scale from its sampled fields' own scales (:func:`pooled_scale`), lent only when it is
    one microscope's: at least ``min_fields`` fields (``RUN_SCALE_MIN_ESTIMATES``; a stated scale's check takes
    ``STATED_DOUBT_MIN_ESTIMATES``), and two thirds of those with an estimate, within ``RUN_SCALE_MAX_SPREAD`` of
    their median; else 'unknown'. The web service gives it the estimates of a case's images (a sample, as
    :func:`run_sample`), found before it analyses them."""
    return pooled_scale(estimates, min_fields=min_fields, max_spread=RUN_SCALE_MAX_SPREAD, unit=unit)


def field_scale(image: Image.Image, um_per_px: float | None = None) -> FieldScale:
    """The stated scale when there is one, else the estimate."""
    return FieldScale.given(um_per_px) if um_per_px is not None else estimate_scale(image)


def source_scale(images: Iterable[Image.Image], *, min_fields: int = 3,
                 max_spread: float | None = None) -> FieldScale:
    """One scale for a whole source (one microscope and camera): :func:`pooled_scale` of its fields'
    estimates. ``images`` may be a generator: each field is estimated as it comes, and none is kept."""
    return pooled_scale([estimate_scale(image) for image in images], min_fields=min_fields, max_spread=max_spread)


def pooled_scale(scales: Sequence[FieldScale], *, min_fields: int = 3, max_spread: float | None = None,
                 unit: str = "fields") -> FieldScale:
    """The median of the fields' estimates (those of ``scales`` that are known), which is steadier than
    any single field's. ``max_spread``: only the estimates within this factor of that median count (a
    misread field or two must not decide, nor veto, a run's scale), and 'unknown' unless they are at
    least ``min_fields`` and two thirds of the estimates (fields of several microscopes disagree)."""
    estimates = [scale for scale in scales if scale.known]
    fields = len(scales)
    if len(estimates) < min_fields:
        return FieldScale(None, "unknown", 0, f"{len(estimates)} of {fields} {unit} had a scale estimate")
    values = np.array([s.um_per_px for s in estimates])
    agree = np.ones(len(values), dtype=bool)
    if max_spread is not None:
        agree = np.abs(np.log(values / np.median(values))) <= math.log(max_spread)
    kept = values[agree]
    if len(kept) < max(min_fields, math.ceil(2 * len(values) / 3)):
        return FieldScale(None, "unknown", 0, f"the estimates of {len(estimates)} of {fields} {unit} disagree "
                          f"(only {len(kept)} within {max_spread:g} times their median, "
                          f"{values.min():.4f}-{values.max():.4f} um/px)")
    low, high = np.percentile(kept, [25, 75])
    spread = f"IQR {low:.4f}-{high:.4f} um/px"
    outliers = f", {len(values) - len(kept)} estimate(s) far from the rest left out" if len(kept) < len(values) else ""
    return FieldScale(float(np.median(kept)), "estimated",
                      int(sum(s.red_cells for s, a in zip(estimates, agree) if a)),
                      f"median of {len(kept)} of {fields} {unit} ({spread}{outliers})")


def disagrees_with_run(scale: FieldScale, run_um_per_px: float | None) -> bool:
    """A field's own estimate on at most :data:`WEAK_ESTIMATE_RED_CELLS` red cells and further than
    :data:`FIELD_RUN_MAX_RATIO` from its run's scale: a misread field, to be analysed at the run's scale (a
    scale the user stated, or an estimate on more red cells, is never overruled)."""
    return (scale.source == "estimated" and scale.um_per_px is not None and run_um_per_px is not None
            and scale.red_cells <= WEAK_ESTIMATE_RED_CELLS
            and abs(math.log(scale.um_per_px / run_um_per_px)) > math.log(FIELD_RUN_MAX_RATIO))
