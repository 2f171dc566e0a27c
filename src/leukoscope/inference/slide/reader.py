"""Open a whole-slide image: its levels, its pixel size when recorded, and regions of any level.

Pyramidal TIFFs (Aperio ``.svs``, Hamamatsu ``.ndpi``, generic tiled ``.tif``/``.tiff`` with
sub-resolution levels) are read with tiffslide (``pip install 'leukoscope[slide]'``); formats that
are not TIFF (MIRAX ``.mrxs``, ``.vms``/``.vmu``) with openslide-python when it is installed
(``pip install openslide-python openslide-bin``). Nothing else is done here: which regions to
read is the monolayer's and the sampler's business.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from leukoscope.io import DEFAULT_MAX_PIXELS

#: Suffixes that always mean a whole-slide file.
SLIDE_ONLY_SUFFIXES = frozenset({".svs", ".ndpi", ".scn", ".bif", ".svslide", ".mrxs", ".vms", ".vmu"})
#: Formats only OpenSlide reads (not TIFF inside).
OPENSLIDE_ONLY_SUFFIXES = frozenset({".mrxs", ".vms", ".vmu"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
#: The first bytes of a TIFF (little- and big-endian, classic and BigTIFF): an upload's format is read from them.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
SLIDE_EXTRA_HINT = "pip install 'leukoscope[slide]' (tiffslide, tifffile)"
OPENSLIDE_HINT = "pip install openslide-python openslide-bin"


log = logging.getLogger(__name__)


class SlideError(ValueError):
    """A file could not be used as a whole-slide image; the message says why and which file."""


def _recorded_mpp(properties: dict[str, Any], prefix: str, *, say: bool = True) -> float | None:
    """The pixel size tiffslide/OpenSlide read from the file, if a microscope's; ``say``: warn when it is not."""
    values = []
    for axis in ("x", "y"):
        try:
            value = float(properties.get(f"{prefix}.mpp-{axis}"))
        except (TypeError, ValueError):
            return None
        values.append(value)
    # A pixel size outside what a microscope gives (or unequal axes) is not trusted: said, then each tile's
    # scale is estimated from its red cells.
    if not all(math.isfinite(v) and 0.005 <= v <= 5.0 for v in values) or abs(values[0] - values[1]) > 0.05 * values[0]:
        if say:
            log.warning("the slide records a pixel size of %g x %g um, which no microscope gives (or unequal axes): "
                        "not used; each tile's scale is estimated from its red cells (or give --um-per-px)", *values)
        return None
    return float(sum(values) / 2)


@dataclass
class Slide:
    """An open slide. Coordinates are level 0 pixels (as OpenSlide's), sizes are the level's."""

    path: Path
    backend: str
    """``tiffslide`` or ``openslide``."""
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    um_per_px: float | None
    """Level 0's pixel size when the file records one (else None)."""
    _handle: Any = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_um_per_px(self, level: int) -> float | None:
        return None if self.um_per_px is None else self.um_per_px * self.level_downsamples[level]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """The RGB pixels of ``size`` (level pixels) at ``location`` (level 0 pixels); areas outside
        the scan are white (glass)."""
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")
        location, size = (int(location[0]), int(location[1])), (int(size[0]), int(size[1]))
        with self._lock:  # one reader at a time: the backends' file handles are shared
            if self.backend == "openslide":
                region = self._handle.read_region(location, level, size)
            else:
                region = self._tiff_region(location, level, size)
        if region.mode in ("RGBA", "LA"):
            white = Image.new("RGBA", region.size, (255, 255, 255, 255))
            region = Image.alpha_composite(white, region.convert("RGBA"))
        return region.convert("RGB")

    def _tiff_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """tiffslide's pixels, with what lies outside the scan white: tiffslide pads it with zeros (black),
        which an edge tile's margin then carries into Otsu's threshold of its red cells (its scale) and its
        stained share. Grayscale scans come back as RGB; other sample types are refused."""
        pixels = np.asarray(self._handle.read_region(location, level, size, as_array=True, padding=False))
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
            raise SlideError(f"{self.path}: pixels of {pixels.dtype} with shape {pixels.shape[2:]} per pixel are not "
                             f"read (8-bit grayscale, RGB or RGBA only)")
        if pixels.shape[2] == 1:
            pixels = np.repeat(pixels, 3, axis=2)
        width, height = size
        canvas = np.full((height, width, pixels.shape[2]), 255, dtype=np.uint8)
        # where tiffslide's own window (level pixels, truncated as it truncates) starts inside the canvas
        downsample = self.level_downsamples[level]
        left, top = (max(0, -int(location[0] / downsample)), max(0, -int(location[1] / downsample)))
        rows, cols = min(pixels.shape[0], height - top), min(pixels.shape[1], width - left)
        if rows > 0 and cols > 0:
            canvas[top:top + rows, left:left + cols] = pixels[:rows, :cols]
        return Image.fromarray(canvas)

    def read_level(self, level: int) -> Image.Image:
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recorded_um_per_px(source: str | Path | bytes) -> float | None:
    """The pixel size a TIFF records in its resolution tags (XResolution/YResolution in CENTIMETER or INCH, as
    microscope cameras write them), read and checked as a slide's is (:func:`_recorded_mpp`); ``source``: a file
    (a TIFF by its suffix) or a file's bytes (an upload: a TIFF by its first bytes). None: not a TIFF, no such
    tags, tiffslide not installed, or no microscope's size, said by no warning (72 dpi is an editor's default,
    not a scale: the field's red cells measure it, as before)."""
    if isinstance(source, bytes):
        if not source.startswith(TIFF_MAGIC):
            return None
        opened: Path | io.BytesIO = io.BytesIO(source)
    else:
        opened = Path(source)
        if opened.suffix.lower() not in TIFF_SUFFIXES or not opened.is_file():
            return None
    try:
        import tiffslide
    except ImportError:
        return None
    try:
        with tiffslide.TiffSlide(opened) as handle:
            properties = dict(handle.properties)
    except Exception:  # noqa: BLE001 - an unreadable header: reading the field says why
        return None
    return _recorded_mpp(properties, "tiffslide", say=False)


def tiff_level_count(path: str | Path) -> int | None:
    """How many resolution levels the first image series of a TIFF has (None: not a TIFF, or
    tifffile missing). Reads the header only."""
    try:
        import tifffile
    except ImportError:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.series[0].levels) if tif.series else 0
    except Exception:  # noqa: BLE001 - any unreadable file is "not a pyramidal TIFF"
        return None


def is_slide_path(path: str | Path) -> bool:
    """A whole-slide file by its suffix, or a TIFF with more than one resolution level (a plain
    one-level TIFF stays a smear field, as before slides were read)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SLIDE_ONLY_SUFFIXES:
        return True
    return suffix in TIFF_SUFFIXES and path.is_file() and (tiff_level_count(path) or 0) > 1


def _open_openslide(path: Path) -> Slide:
    try:
        import openslide
    except ImportError as exc:
        raise SlideError(f"{path}: this format is read by OpenSlide, which is not installed: {OPENSLIDE_HINT}") \
            from exc
    try:
        handle = openslide.OpenSlide(str(path))
    except Exception as exc:  # noqa: BLE001 - OpenSlide's errors vary by version
        raise SlideError(f"{path}: OpenSlide cannot read it ({exc})") from exc
    return Slide(path, "openslide", [tuple(map(int, d)) for d in handle.level_dimensions],
                 [float(d) for d in handle.level_downsamples], _recorded_mpp(dict(handle.properties), "openslide"),
                 handle)


def open_slide(path: str | Path, *, min_levels: int = 2) -> Slide:
    """Open ``path`` as a whole-slide image.

    Raises :class:`SlideError` when the file is missing, not a slide, has fewer than
    ``min_levels`` resolution levels (a plain TIFF is a field, not a slide: analyse it as one),
    or when the optional reader it needs is not installed (the message names what to install)."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    if path.suffix.lower() in OPENSLIDE_ONLY_SUFFIXES:
        slide = _open_openslide(path)
    else:
        try:
            import tiffslide
        except ImportError as exc:
            raise SlideError(f"{path}: reading whole-slide images needs tiffslide, which is not installed: "
                             f"{SLIDE_EXTRA_HINT}") from exc
        handle = None
        try:
            handle = tiffslide.TiffSlide(path)
            dimensions = [tuple(map(int, d)) for d in handle.level_dimensions]
            downsamples = [float(d) for d in handle.level_downsamples]
            properties = dict(handle.properties)
        except Exception as exc:  # noqa: BLE001 - tifffile/tiffslide raise many kinds
            if handle is not None:
                handle.close()
            raise SlideError(f"{path}: not a readable whole-slide TIFF ({type(exc).__name__}: {exc})") from exc
        slide = Slide(path, "tiffslide", dimensions, downsamples, _recorded_mpp(properties, "tiffslide"), handle)
    if slide.level_count < min_levels:
        slide.close()
        width, height = slide.dimensions
        if width * height > DEFAULT_MAX_PIXELS:  # a field is refused too: the two refusals pointed at each other
            how = (f"at {width}x{height} it is also over a field's limit ({DEFAULT_MAX_PIXELS:,} pixels): save it as "
                   f"a tiled pyramidal TIFF (e.g. `vips tiffsave {path.name} slide.tif --tile --pyramid "
                   f"--bigtiff`) and analyse that as a slide")
        elif path.suffix.lower() in SLIDE_ONLY_SUFFIXES:
            how = ("save it as TIFF or PNG and analyse that as a field (a file named ."
                   f"{path.suffix.lower().lstrip('.')} is always taken for a slide)")
        else:
            how = "analyse it as a field: leukoscope analyze FILE"
        raise SlideError(f"{path}: not a pyramidal slide ({slide.level_count} resolution level; a slide has "
                         f"at least {min_levels}); {how}")
    return slide
