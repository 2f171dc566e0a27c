"""Content fingerprints of the images a model learned from, kept in its bundle.

``leukoscope evaluate`` refuses data that holds a bundle's own training or validation
images: a score on them says nothing about new images. Paths alone miss them once the
images are copied, renamed or on another machine, and they miss the *source* images of a
model trained on crops cut from them (the shipped classifier learned from crops of pbc's
photographs and all-taleqani's fields; scoring those photographs is scoring its training
data). So a bundle records the SHA-256 of each training and validation image, or of each
source image its crops were cut from (``bench/zoo.py``), and evaluate compares contents: of the file,
and of its decoded pixels, so that a copy saved again (the service's reviewed-labels export re-encodes
every cell; another format, metadata stripped) is known too.

A cell this program cuts from a field (`analyze --cells`, the service's reviewed-labels export) carries its
field's digest in a PNG text chunk (:func:`with_source_digest`): a model fine-tuned on such cells records
the fields too, and `analyze` of those fields says that its classifier learned from them.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from leukoscope.io import ImageDecodeError, load_image
from leukoscope.scale import run_sample

#: The file in a bundle folder (beside bundle.json).
DIGESTS_FILE = "training-images.json"
#: Hex characters kept of each SHA-256 (64 bits: no accidental match among millions of images).
DIGEST_CHARS = 16
#: Parts whose images a score must not include (the test part is what a score is for).
LEARNED_PARTS = ("train", "val")


def file_digest(path: str | Path) -> str:
    """The first :data:`DIGEST_CHARS` hex characters of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:DIGEST_CHARS]


def pixel_digest(path: str | Path) -> str | None:
    """The first :data:`DIGEST_CHARS` hex characters of the SHA-256 of the image's decoded RGB pixels (and
    size), as :func:`leukoscope.io.load_image` reads them; None for a file that is no readable image."""
    try:
        image = load_image(path)
    except (ImageDecodeError, OSError):
        return None
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:DIGEST_CHARS]


#: The PNG text keyword under which a cut cell carries the file digest of the field it was cut from.
SOURCE_KEY = "leukoscope source"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DIGEST = re.compile(rf"[0-9a-f]{{{DIGEST_CHARS}}}")


def with_source_digest(png: bytes, digest: str) -> bytes:
    """``png`` with a ``tEXt`` chunk naming its source field's ``digest`` (:func:`file_digest`), put right after
    the header so that reading it decodes no pixels; the pixels and every other chunk are left as they are (the
    PNGs this program writes carry no text: a second tag would be read in place of the first)."""
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR" or not _DIGEST.fullmatch(digest):
        raise ValueError("with_source_digest takes PNG bytes and a 16-hex-character digest")
    end_of_header = 8 + 12 + struct.unpack(">I", png[8:12])[0]
    body = b"tEXt" + SOURCE_KEY.encode("latin-1") + b"\0" + digest.encode("ascii")
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return png[:end_of_header] + chunk + png[end_of_header:]


def source_digest_of(path: str | Path) -> str | None:
    """The source field's digest a cut cell carries (:func:`with_source_digest`); None for any other file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            # ``info`` holds the text chunks read before the pixels (``text`` would decode the whole image)
            value = image.info.get(SOURCE_KEY) if image.format == "PNG" else None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None
    return value if isinstance(value, str) and _DIGEST.fullmatch(value) else None


def record_crop_sources(bundle_dir: str | Path, parts: Mapping[str, Iterable[str | Path]]) -> dict[str, int]:
    """Add to ``bundle_dir``'s records the source fields that each part's cut cells name
    (:func:`source_digest_of`), beside any recorded already; how many fields per part (none: nothing written)."""
    found = {part: {digest for path in paths if (digest := source_digest_of(path))} for part, paths in parts.items()}
    found = {part: digests for part, digests in found.items() if digests}
    if found:
        records = read_training_digests(bundle_dir) or {}
        for part, digests in found.items():
            records.setdefault(OF_CROP_SOURCES, {}).setdefault(part, set()).update(digests)
        _save_records(bundle_dir, records)
    return {part: len(digests) for part, digests in found.items()}


#: What a record's digests are of: the images trained on, or the images the training crops were cut from.
OF_IMAGES, OF_CROP_SOURCES = "images", "crop sources"
#: How an overlap names the parts whose crops' source images were found (``train sources``).
SOURCES_SUFFIX = " sources"
#: A record kind's twin holding the digests of the images' decoded pixels (bundles made before it have none:
#: their images are then checked by file alone, and nothing is decoded for them).
PIXELS_SUFFIX = " (pixels)"


def write_training_digests(bundle_dir: str | Path, parts: Mapping[str, Iterable[str | Path]], *,
                           of: str = OF_IMAGES) -> Path:
    """Record the digests of each part's files (``train``, ``val``) in ``bundle_dir`` as what they are ``of``
    (:data:`OF_IMAGES` or :data:`OF_CROP_SOURCES`), beside a record of the other kind already there."""
    records = read_training_digests(bundle_dir) or {}
    listed = {part: list(paths) for part, paths in parts.items()}
    records[of] = {part: {file_digest(path) for path in paths} for part, paths in listed.items()}
    records[of + PIXELS_SUFFIX] = {part: {digest for path in paths if (digest := pixel_digest(path))}
                                   for part, paths in listed.items()}
    return _save_records(bundle_dir, records)


def inherit_training_digests(bundle_dir: str | Path, base_dir: str | Path) -> Path | None:
    """A bundle fine-tuned from ``base_dir`` learned what its base learned too: the base's records joined to
    its own, so that evaluate refuses the base's training images as well. None when the base has none."""
    base = read_training_digests(base_dir)
    if not base:
        return None
    records = read_training_digests(bundle_dir) or {}
    for kind, record in base.items():
        for part, digests in record.items():
            records.setdefault(kind, {}).setdefault(part, set()).update(digests)
    return _save_records(bundle_dir, records)


def _save_records(bundle_dir: str | Path, records: Mapping[str, Mapping[str, set[str]]]) -> Path:
    payload = {"hash": f"sha256[:{DIGEST_CHARS}] of each file ('{PIXELS_SUFFIX.strip()}' kinds: of its decoded RGB "
                       f"pixels)",
               "records": {kind: {part: sorted(d) for part, d in record.items()} for kind, record in records.items()}}
    target = Path(bundle_dir) / DIGESTS_FILE
    target.write_text(json.dumps(payload, separators=(",", ":")))
    return target


def read_training_digests(bundle_dir: str | Path) -> dict[str, dict[str, set[str]]] | None:
    """The bundle's records (:func:`write_training_digests`): kind -> part -> digests; None when it has
    none or they cannot be read."""
    try:
        payload = json.loads((Path(bundle_dir) / DIGESTS_FILE).read_text())
        return {str(kind): {str(part): set(map(str, digests)) for part, digests in record.items()}
                for kind, record in payload["records"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def digest_overlap(records: Mapping[str, Mapping[str, set[str]]], paths: Iterable[str | Path]) -> dict[str, int]:
    """How many of ``paths`` have the contents of a learned part's image: ``train`` / ``val`` for the images
    trained on, ``train sources`` / ``val sources`` for the images the training crops were cut from (parts
    without any left out). Unreadable files are skipped (the scoring reports them)."""
    return _overlap(records, _digests_of(paths, _wants_pixels(records)))


def _wants_pixels(records: Mapping[str, object]) -> bool:
    return any(kind.endswith(PIXELS_SUFFIX) for kind in records)


def _digests_of(paths: Iterable[str | Path], pixels: bool) -> list[tuple[str, str | None]]:
    """Each readable file's digest, and its pixels' when ``pixels`` (a full decode: only for a record that has
    them)."""
    digests = []
    for path in paths:
        try:
            digests.append((file_digest(path), pixel_digest(path) if pixels else None))
        except OSError:
            continue
    return digests


def _overlap(records: Mapping[str, Mapping[str, set[str]]],
             digests: Sequence[tuple[str, str | None]]) -> dict[str, int]:
    """Per learned part, how many images (file digest, pixel digest or None) match its files or its pixels."""
    found: dict[str, int] = {}
    for kind in dict.fromkeys(kind.removesuffix(PIXELS_SUFFIX) for kind in records):
        files, pixels = records.get(kind, {}), records.get(kind + PIXELS_SUFFIX, {})
        for part in LEARNED_PARTS:
            n = sum(1 for file, pixel in digests
                    if file in files.get(part, ()) or (pixel is not None and pixel in pixels.get(part, ())))
            if n:
                found[part + (SOURCES_SUFFIX if kind == OF_CROP_SOURCES else "")] = n
    return found


def describe_overlap(overlap: Mapping[str, int]) -> str:
    """``3 of its train images and 2 source images of its val crops`` (keys of :func:`digest_overlap`)."""
    def one(key: str, n: int) -> str:
        if key.endswith(SOURCES_SUFFIX):
            return f"{n} source image{'' if n == 1 else 's'} of its {key[:-len(SOURCES_SUFFIX)]} crops"
        return f"{n} of its {key} images"

    return " and ".join(one(key, n) for key, n in overlap.items())


#: Files hashed at most when a run is checked against a model's training images (:func:`learned_among`): a
#: sample spread over the run, so that an archive of a hundred thousand fields is not read twice.
LEARNED_SAMPLE = 200


def learned_among(bundles: Mapping[str, str | Path | None], paths: Sequence[str | Path],
                  sample: int = LEARNED_SAMPLE) -> tuple[dict[str, dict[str, int]], int]:
    """For each of ``bundles`` (role -> bundle folder, None: no such model) that keeps records, the
    :func:`digest_overlap` of up to ``sample`` of ``paths`` (:func:`leukoscope.scale.run_sample`: spread evenly,
    first and last included; each read once for every bundle), where any matched; and how many were checked.
    ``analyze`` and ``predict`` say it: results on a model's own training images say nothing of new ones."""
    records = {role: read_training_digests(bundle) for role, bundle in bundles.items() if bundle is not None}
    records = {role: record for role, record in records.items() if record}
    if not records or not paths:
        return {}, 0
    checked = run_sample(list(paths), sample)
    # an unreadable file is skipped (the run reports it); pixels are decoded only for a record that has them
    digests = _digests_of(checked, any(_wants_pixels(record) for record in records.values()))
    found = {role: overlap for role, record in records.items() if (overlap := _overlap(record, digests))}
    return found, len(checked)
