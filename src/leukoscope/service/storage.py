"""Content-addressed file store for uploads and the images derived from them.

- Every object is named by the SHA-256 of its bytes plus an extension chosen by
  the server from the *sniffed* format: a client's file name never becomes a
  path (system D's Flask app saved uploads under the user's own file name).
- Writes are atomic: a temporary file in the store, fsync, ``os.replace`` to the
  final name, fsync of the folder. A crash leaves either no object or a whole
  one, never a partial file under a final name.
- The store lives under the data directory, outside any served directory; the
  app streams objects through authorised routes only.
- Served copies are re-encoded from decoded pixels, so they carry no EXIF (GPS,
  camera serial, dates), no ICC profile and no text chunks.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import secrets
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

#: Extensions the store writes; the served copies are always PNG.
EXTENSIONS: dict[str, str] = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif"}
MEDIA_TYPES: dict[str, str] = {"jpg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "tif": "image/tiff"}
_NAME = re.compile(r"^(?P<hash>[0-9a-f]{64})\.(?P<ext>jpg|png|bmp|tif)$")


class StoreError(ValueError):
    """An object name is malformed or the object is missing."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_png(image: Image.Image, compress_level: int = 1) -> bytes:
    """PNG bytes of ``image``'s pixels only: no EXIF, ICC profile or text chunks."""
    # One copy of the pixels, not two (a 40 Mpx field is 120 MB per copy); the PNG
    # writer takes metadata only from ``info`` (and save options), which the copy drops.
    fresh = image.copy() if image.mode == "RGB" else image.convert("RGB")
    fresh.info.clear()
    buffer = io.BytesIO()
    fresh.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of ``image``'s pixels only (no metadata)."""
    fresh = Image.fromarray(np.asarray(image.convert("RGB")), mode="RGB")
    buffer = io.BytesIO()
    fresh.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_private_dir(path: Path) -> None:
    """The service's data directory, created readable by its owner alone (0700): it holds patients' images
    and the database, and files in it are written with the process's umask (often world-readable). An
    existing one is left as it is, with a warning when other users can read it."""
    path = Path(path)
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        path.chmod(0o700)  # mkdir's mode is filtered by the umask
        return
    if path.stat().st_mode & 0o077:
        log.warning("%s can be read by other users of this machine (mode %o): it holds patients' images and the "
                    "database; `chmod 700 %s`", path, path.stat().st_mode & 0o777, path)


class ContentStore:
    """``root/objects/<first two hex>/<sha256>.<ext>``."""

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.fsync = fsync
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def check_name(name: str) -> re.Match[str]:
        match = _NAME.match(name or "")
        if match is None:
            raise StoreError(f"not a store object name: {name!r}")
        return match

    def path(self, name: str) -> Path:
        """Where object ``name`` lives; the name is validated, so no traversal is possible."""
        match = self.check_name(name)
        return self.objects / match["hash"][:2] / name

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def read(self, name: str) -> bytes:
        path = self.path(name)
        if not path.is_file():
            raise StoreError(f"object {name} is missing from the store")
        return path.read_bytes()

    def put(self, data: bytes, ext: str) -> str:
        """Store ``data`` atomically; returns its name. Idempotent (same bytes, same name)."""
        if ext not in MEDIA_TYPES:
            raise StoreError(f"extension {ext!r} is not one the store writes")
        name = f"{sha256_hex(data)}.{ext}"
        final = self.path(name)
        if final.is_file() and final.stat().st_size == len(data):
            os.utime(final)  # fresh again: garbage collection must not take it before the commit
            return name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{secrets.token_hex(8)}.part"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        if self.fsync:
            _fsync_dir(final.parent)
        return name

    def put_png(self, image: Image.Image) -> str:
        """Store a metadata-free PNG of ``image`` (the form every served image takes)."""
        return self.put(clean_png(image), "png")

    def put_jpeg(self, image: Image.Image, quality: int = 90) -> str:
        """Store a metadata-free JPEG (for pictures that need not be lossless: heatmap overlays)."""
        return self.put(jpeg_bytes(image, quality), "jpg")

    def names(self) -> set[str]:
        return {p.name for p in self.objects.glob("??/*") if _NAME.match(p.name)}

    def collect_garbage(self, referenced: set[str], *, min_age_s: float = 3600.0) -> list[str]:
        """Delete objects no database row references and older than ``min_age_s``
        (younger ones may belong to an upload whose transaction is still open), and
        leftover temporary files. Returns the deleted names."""
        now = time.time()
        removed = []
        for name in sorted(self.names() - referenced):
            path = self.path(name)
            if now - path.stat().st_mtime >= min_age_s:
                path.unlink(missing_ok=True)
                removed.append(name)
        for part in self.tmp.glob("*.part"):
            if now - part.stat().st_mtime >= min_age_s:
                part.unlink(missing_ok=True)
        return removed
