"""What an upload is and how one file becomes a stored image: its format read from its bytes, its pixels
counted from its header before anything is decoded, then decoded, analysed and encoded, one file at a time."""

from __future__ import annotations

import hashlib
import io
import unicodedata
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from leukoscope.inference.predictor import Prediction
from leukoscope.inference.slide.reader import recorded_um_per_px
from leukoscope.io import (SUPPORTED_FORMATS, ImageDecodeError, ImageTooLargeError, allow_pixels, load_image,
                           too_many_pixels)
from leukoscope.service.analysis import ImageOutcome
from leukoscope.service.errors import ServiceError
from leukoscope.service.storage import clean_png, jpeg_bytes

if TYPE_CHECKING:  # pragma: no cover
    from leukoscope.service.app import ServiceState


@dataclass
class Upload:
    filename: str
    data: bytes


@dataclass
class DecodedUpload:
    name: str
    data: bytes
    format: str
    image: Image.Image


@dataclass
class PreparedCell:
    """One analysed cell, its pictures already encoded (no decoded pixels kept)."""

    prediction: Prediction
    box: list[int] | None
    detection_score: float | None
    crop_png: bytes | None
    overlay_jpeg: bytes | None


@dataclass
class PreparedImage:
    """One analysed upload, ready to store: bytes only, so that a request holds at most one
    decoded image at a time however many files it has."""

    name: str
    data: bytes
    format: str
    width: int
    height: int
    served_png: bytes
    annotated_png: bytes | None
    cells: list[PreparedCell]
    warnings: list[str] = field(default_factory=list)
    """The analysis' quality warnings (:attr:`leukoscope.service.analysis.ImageOutcome.warnings`)."""
    scale: dict[str, Any] | None = None
    """A smear field's scale as analysed (:attr:`leukoscope.service.analysis.ImageOutcome.scale`)."""
    repeat_of: int | None = None
    """The position of the earlier upload of this case with the same file: this one was not analysed again
    and has no cells (a field sent twice must not be counted twice)."""


def repeat_of(original: PreparedImage, upload: Upload, position: int) -> PreparedImage:
    """A later copy of ``original``'s file in the same case: stored and shown, but no cells of its own."""
    return replace(original, name=display_name(upload.filename), annotated_png=None, cells=[], warnings=[],
                   repeat_of=position)


def repeated_positions(uploads: Sequence[Upload]) -> dict[int, int]:
    """By position, the position of the first upload with the same bytes, for every later copy."""
    first: dict[str, int] = {}
    repeats: dict[int, int] = {}
    for index, upload in enumerate(uploads):
        earlier = first.setdefault(hashlib.sha256(upload.data).hexdigest(), index)
        if earlier != index:
            repeats[index] = earlier
    return repeats


def display_name(filename: str | None) -> str:
    """The client's file name reduced to something safe to *show* (it is never a path)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in unicodedata.normalize("NFC", name) if unicodedata.category(ch)[0] != "C")
    name = name.strip().lstrip(".") or "upload"
    return name[:200]


#: Magic numbers: what a file *is*, whatever its name says.
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"%PDF", "PDF"),
)


def sniff_format(data: bytes) -> str | None:
    """The file type from its first bytes (never from its name)."""
    for magic, name in MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_format(upload: Upload) -> tuple[str, str]:
    name = display_name(upload.filename)
    if not upload.data:
        raise ServiceError(400, "empty_file", f"{name}: the file is empty (0 bytes)")
    fmt = sniff_format(upload.data)
    if fmt not in SUPPORTED_FORMATS:
        found = f"a {fmt} file" if fmt else "not an image"
        raise ServiceError(415, "unsupported_format", f"{name}: {found}; send JPEG, PNG, BMP or TIFF (the format is "
                                                      "read from the file's content, not its name)")
    return name, fmt


def header_pixels(upload: Upload, max_pixels: int) -> int:
    """The pixel count a file's header declares (nothing is decoded); 413 past ``max_pixels``.
    A header Pillow cannot read counts 0 here: decoding then says what is wrong with it."""
    name, _fmt = _check_format(upload)
    allow_pixels(max_pixels)  # as load_image does: else Pillow's own limit would refuse what the server allows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(upload.data)) as image:
                width, height = image.size
        except Image.DecompressionBombError as exc:
            raise ServiceError(413, "too_many_pixels", too_many_pixels(name, exc, max_pixels)) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return 0
    if width * height > max_pixels:
        raise ServiceError(413, "too_many_pixels", f"{name}: {width}x{height} = {width * height:,} pixels exceeds "
                                                   f"the limit of {max_pixels:,} pixels")
    return width * height


def check_uploads(uploads: Sequence[Upload], max_pixels: int, max_files: int, max_total: int) -> None:
    """Everything that can be refused from the headers, before any file is decoded: the
    number of files, empty files, formats, pixels per file and pixels of the whole upload."""
    if not uploads:
        raise ServiceError(400, "no_file", "choose at least one image file to upload")
    if len(uploads) > max_files:
        raise ServiceError(413, "too_many_files", f"{len(uploads)} files in one upload; at most {max_files}")
    total = sum(header_pixels(upload, max_pixels) for upload in uploads)
    if total > max_total:
        raise ServiceError(413, "too_many_pixels_in_upload",
                           f"{len(uploads)} images of {total:,} pixels in all in one upload; at most {max_total:,} "
                           "(send fewer or smaller images at a time)")


def decode_upload(upload: Upload, max_pixels: int) -> DecodedUpload:
    name, fmt = _check_format(upload)
    try:
        image = load_image(upload.data, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise ServiceError(413, "too_many_pixels", f"{name}: {_strip_source(exc)}") from None
    except ImageDecodeError as exc:
        raise ServiceError(422, "corrupt_image", f"{name}: a damaged or truncated {fmt} file "
                                                 f"({_strip_source(exc)})") from None
    return DecodedUpload(name, upload.data, fmt, image)


def _strip_source(exc: Exception) -> str:
    return str(exc).removeprefix("<uploaded bytes>: ")


def encode_outcome(decoded: DecodedUpload, outcome: ImageOutcome) -> PreparedImage:
    """Encode every picture of one analysed upload (served copy, annotated field, crops,
    Grad-CAM overlays), so that its decoded pixels can go."""
    cells = [PreparedCell(cell.prediction, cell.box, cell.detection_score,
                          clean_png(cell.crop) if cell.crop is not None else None,
                          jpeg_bytes(cell.overlay) if cell.overlay is not None else None) for cell in outcome.cells]
    return PreparedImage(decoded.name, decoded.data, decoded.format, decoded.image.width, decoded.image.height,
                         clean_png(decoded.image),
                         clean_png(outcome.annotated) if outcome.annotated is not None else None, cells,
                         list(outcome.warnings), outcome.scale)


async def prepare_upload(state: "ServiceState", kind: str, upload: Upload, run_um_per_px: float | None = None,
                         um_per_px: float | None = None) -> PreparedImage:
    """Decode, analyse and encode one file; its decoded image is freed when this returns. A TIFF's resolution
    tags are its recorded scale, as `leukoscope analyze` and `predict` read a TIFF file's (a stated one wins)."""
    decoded = await run_in_threadpool(decode_upload, upload, state.settings.max_pixels)
    recorded = (await run_in_threadpool(recorded_um_per_px, upload.data)
                if decoded.format == "TIFF" and um_per_px is None else None)
    (outcome,) = await state.analyzer.run(kind, [decoded.image], run_um_per_px=run_um_per_px, um_per_px=um_per_px,
                                          recorded_um_per_px=[recorded])
    return await run_in_threadpool(encode_outcome, decoded, outcome)
