"""Safe image decoding.

Every image that enters leukoscope goes through :func:`load_image`: the format is
sniffed from the bytes (never trusted from the extension), the pixel count is
checked *before* decoding (decompression bombs), truncated files fail instead of
decoding to grey, EXIF orientation is applied and the result is always RGB.
"""

from __future__ import annotations

import functools
import io as _io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

#: Formats a lab brings: camera JPEGs, PNG exports, C-NMC BMPs, scanner TIFFs.
SUPPORTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "BMP", "TIFF"})
#: File suffixes looked at when scanning folders (content is still sniffed): one rule for training's class folders,
#: `predict`, `segment` and VOC folders. ``.jfif`` / ``.jpe``: JPEGs as Windows saves them from a browser.
IMAGE_SUFFIX_NAMES: tuple[str, ...] = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff")
IMAGE_SUFFIXES: frozenset[str] = frozenset(IMAGE_SUFFIX_NAMES)
#: Default ceiling: a 2592x1944 smear is 5 Mpx, a whole-slide tile mosaic 100+ Mpx.
DEFAULT_MAX_PIXELS: int = 120_000_000


class ImageDecodeError(ValueError):
    """An input could not be used as an image; the message says why and which file."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than the configured limit."""


def allow_pixels(max_pixels: int) -> None:
    """Let Pillow open headers of up to ``max_pixels`` before our own check refuses larger ones. Its bomb guard
    only warns below twice its limit; we want one hard rule, ours. Its refusal above that would otherwise
    override a larger ``max_pixels`` (raised once, for the process; callers check the size themselves)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def too_many_pixels(name: str, refusal: Image.DecompressionBombError, max_pixels: int) -> str:
    """Our words for Pillow's refusal of a header it will not even open (over twice its own limit), with the
    pixel count its message gives ("Image size (N pixels) exceeds limit of ... could be decompression bomb ...")."""
    found = re.search(r"\((\d+) pixels\)", str(refusal))
    pixels = f"{int(found.group(1)):,} pixels" if found else "its size"
    return f"{name}: {pixels} exceeds the limit of {max_pixels:,} pixels"


def _describe(source: str | Path | bytes | BinaryIO) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    # a buffer of a file's bytes, named for that file by the caller (duplicates.fingerprint)
    name = getattr(source, "name", None) if isinstance(source, _io.BytesIO) else None
    return name if isinstance(name, str) and name else "<uploaded bytes>"


#: The key of a decoded image's ``info`` that holds how many pages its file has, when more than one (only the
#: first is read).
PAGES_INFO = "leukoscope_pages"


def load_image(
    source: str | Path | bytes | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: frozenset[str] = SUPPORTED_FORMATS,
) -> Image.Image:
    """Decode ``source`` into an RGB :class:`PIL.Image.Image`.

    Raises :class:`ImageDecodeError` (or its subclass :class:`ImageTooLargeError`)
    with a message naming the file and the problem; never returns a partial image.
    """
    name = _describe(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ImageDecodeError(f"{name}: file does not exist")
        if path.is_dir():
            raise ImageDecodeError(f"{name}: is a folder, not an image file")
        try:
            if path.stat().st_size == 0:
                raise ImageDecodeError(f"{name}: file is empty (0 bytes)")
            fp: BinaryIO = _io.BytesIO(path.read_bytes())
        except OSError as exc:  # permission denied, an I/O error: this file's row, not the run's end
            raise ImageDecodeError(f"{name}: cannot be read: {exc.strerror or exc}") from None
    elif isinstance(source, bytes):
        if not source:
            raise ImageDecodeError(f"{name}: empty upload (0 bytes)")
        fp = _io.BytesIO(source)
    else:
        fp = source

    allow_pixels(max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageDecodeError(f"{name}: {_unrecognised(fp, formats)}") from None
        except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused before our check
            raise ImageTooLargeError(too_many_pixels(name, exc, max_pixels)) from None
        except OSError as exc:
            raise ImageDecodeError(f"{name}: cannot open image: {exc}") from None

        phone = image.format == "MPO"
        if phone and "JPEG" in formats:  # a phone's JPEG with a depth or gain-map picture
            image.format = "JPEG"
        elif image.format not in formats:
            raise ImageDecodeError(
                f"{name}: format {image.format} is not supported "
                f"(supported: {', '.join(sorted(formats))})"
            )
        frames = getattr(image, "n_frames", 1)
        if frames > 1 and not phone:  # a multi-page TIFF: said (a phone's second picture is no page of the field)
            (log.warning if name.startswith("<") else _say_pages)("%s: %d pages; only the first is read", name,
                                                                     frames)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"{name}: image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit "
                f"of {max_pixels:,} pixels"
            )
        try:
            image.load()  # forces a full decode: truncated files raise here
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(f"{name}: image data is truncated or corrupt: {exc}") from None
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(too_many_pixels(name, exc, max_pixels)) from None
        if image.format == "PNG":
            _check_png_rows(fp, name)
        image = _full_depth_colour(image, fp) or image

    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a field that needs no turn
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite transparency on white, as a slide background would be.
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
            image = background
        elif image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit (and 32-bit int/float) microscope TIFFs: rescale to 8 bit rather than clipping.
            import numpy as np

            array = np.asarray(image, dtype=np.float64)
            low, high = float(array.min()), float(array.max())
            scale = 255.0 / (high - low) if high > low else 0.0
            image = Image.fromarray(((array - low) * scale).astype("uint8")).convert("RGB")
        else:
            image = image.convert("RGB")
    if frames > 1 and not phone:  # kept with the image: the field's own record says so (the log line is lost)
        image.info[PAGES_INFO] = frames
    return image


@functools.lru_cache(maxsize=4096)
def _say_pages(message: str, name: str, frames: int) -> None:
    """A file's warning said once per process (a command is one run; a long-lived process, such as a notebook,
    says it on a file's first read only): a run reads a field more than once (its scale sample, its fingerprint,
    its analysis), and it had been printed as often (bytes, unnamed, are said each time)."""
    log.warning(message, name, frames)


#: The EXIF tag of a camera's orientation.
EXIF_ORIENTATION = 0x0112
#: The turn a camera's EXIF orientation asks for (what ImageOps.exif_transpose does).
_ORIENTATION_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                      4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                      6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


#: The first bytes of files that arrive as images but are not, and what to say of them.
_UNPACK = "archives are not read: unpack the fields first"
_NOT_IMAGES = ((b"PK\x03\x04", f"a ZIP archive, not an image ({_UNPACK})"),
               (b"\x1f\x8b", f"a gzip file (a .tar.gz?), not an image ({_UNPACK})"),
               (b"%PDF", "a PDF document, not an image (export its pages as PNG or TIFF)"))
_TIFF_HEADERS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _unrecognised(fp: BinaryIO, formats: frozenset[str]) -> str:
    """Why a file Pillow could not identify was refused, from its first bytes: an archive was "not a recognised
    image", and a TIFF of 32-bit float colour "not a recognised image (expected one of ... TIFF)"."""
    fp.seek(0)
    head = fp.read(512)
    if head.startswith(_TIFF_HEADERS):
        return ("a TIFF whose samples cannot be decoded (e.g. 32-bit floating-point colour, or an unusual "
                "compression; or a truncated file): save it as 8- or 16-bit RGB")
    for magic, said in _NOT_IMAGES:
        if head.startswith(magic):
            return said
    if head[257:262] == b"ustar":
        return f"a tar archive, not an image ({_UNPACK})"
    return f"not a recognised image (expected one of {', '.join(sorted(formats))})"


def _full_depth_colour(image: Image.Image, fp: BinaryIO) -> Image.Image | None:
    """A 16-bit colour PNG or TIFF as 8-bit RGB scaled from its own bit depth, turned upright (None: not one,
    or one imagecodecs cannot read: Pillow's decoding stands). Pillow keeps the top 8 bits of each sample, so a
    camera's 12-bit data in 16-bit samples came out nearly black (max 15 of 255). Scaled as data of the fewest
    bits that hold its 99.9th percentile (a hot pixel does not halve a field's brightness): 12-bit data by
    255/4095, full 16-bit data as Pillow would."""
    if image.mode not in ("RGB", "RGBA"):
        return None
    if image.format == "TIFF":
        bits_per_sample = image.tag_v2.get(258) or (8,)
        deep = all(bits == 16 for bits in (bits_per_sample if isinstance(bits_per_sample, tuple)
                                           else (bits_per_sample,)))
    elif image.format == "PNG":
        fp.seek(24)
        deep = fp.read(1) == b"\x10"  # the IHDR bit depth
    else:
        return None
    if not deep:
        return None
    import imagecodecs
    import numpy as np

    fp.seek(0)
    data = fp.read()
    try:
        samples = imagecodecs.png_decode(data) if image.format == "PNG" else imagecodecs.tiff_decode(data)
        orientation = image.getexif().get(EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - imagecodecs' and EXIF readers' errors vary: Pillow's decoding stands
        return None
    if samples.dtype != np.uint16 or samples.ndim != 3 or samples.shape[2] not in (3, 4):
        return None
    colour = samples[..., :3]
    bits = max(8, int(np.percentile(colour.reshape(-1)[::7], 99.9)).bit_length())  # a sample: large fields
    # integer arithmetic: a 16-bit field is large, and float64 copies of it were several times its size
    rgb = ((np.minimum(colour, 2 ** bits - 1).astype(np.uint32) * 255 + (2 ** bits - 1) // 2) // (2 ** bits - 1))
    rgb = rgb.astype(np.uint8)
    if samples.shape[2] == 4:  # alpha on white, as below
        alpha = samples[..., 3:].astype(np.uint32)
        rgb = ((rgb.astype(np.uint32) * alpha + 255 * (65535 - alpha) + 32767) // 65535).astype(np.uint8)
    decoded = Image.fromarray(rgb, "RGB")
    turn = _ORIENTATION_TURNS.get(orientation)
    decoded = decoded.transpose(turn) if turn is not None else decoded  # no EXIF is carried: turned here
    decoded.format = image.format
    return decoded


def _check_png_rows(fp: BinaryIO, name: str) -> None:
    """Refuse a PNG whose compressed data ends cleanly before its last row: Pillow fills the missing rows
    with black and raises nothing, libpng (through imagecodecs) says "Not enough image data". Read from
    byte 0, as Pillow's ``Image.open`` reads a file object."""
    import imagecodecs

    if not imagecodecs.PNG.available:  # a build without libpng: Pillow's checks alone
        return
    if isinstance(fp, _io.BytesIO):  # the bytes already in memory: a view, not a copy
        with fp.getbuffer() as view:
            _decode_png(view, name)
    else:
        fp.seek(0)
        _decode_png(fp.read(), name)


def _decode_png(data: bytes | memoryview, name: str) -> None:
    import imagecodecs

    try:
        imagecodecs.png_decode(data)
    except imagecodecs.PngError as exc:
        raise ImageDecodeError(f"{name}: image data is truncated or corrupt: {exc}") from None


def is_image_file(path: Path) -> bool:
    """Whether ``path`` looks like an image by suffix (cheap folder scans)."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


#: Files and folders a file system or an archiver leaves beside a user's images (hidden names, ``._*`` included,
#: are too): never read as images, never named among the files a folder scan left out.
SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "$recycle.bin", "system volume information"})


def is_system_name(name: str) -> bool:
    """Whether a file or folder of that name is a system's, not the user's (:data:`SYSTEM_NAMES`, hidden names)."""
    return name.startswith(".") or name.casefold() in SYSTEM_NAMES


def files_below(folder: Path) -> list[Path]:
    """Every file below ``folder``, sorted, through symlinked sub-folders too (``Path.rglob`` does not enter
    them: a class folder's linked sub-folder was left out without a word), each real folder once (a link
    to a folder above cannot loop)."""
    seen: set[str] = set()
    found: list[Path] = []
    for top, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        found += [Path(top) / name for name in files]
    return sorted(found)
