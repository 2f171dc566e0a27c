"""Content fingerprints of the images a model learned from, kept in its bundle.

``leukoscope evaluate`` refuses data that holds a bundle's own training or validation
images: a score on them says nothing about new images. Paths alone miss them once the
images are copied, renamed or on another machine, and they miss the *source* images of a
model trained on crops cut from them (the shipped classifier learned from crops of pbc's
photographs and all-taleqani's fields; scoring those photographs is scoring its training
data). So a bundle records the SHA-256 of each training and validation image, or of each
source image its crops were cut from (``bench/zoo.py``), and evaluate compares contents.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping

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


#: What a record's digests are of: the images trained on, or the images the training crops were cut from.
OF_IMAGES, OF_CROP_SOURCES = "images", "crop sources"


def write_training_digests(bundle_dir: str | Path, parts: Mapping[str, Iterable[str | Path]], *,
                           of: str = OF_IMAGES) -> Path:
    """Record the digests of each part's files (``train``, ``val``) in ``bundle_dir``; ``of``:
    :data:`OF_IMAGES` or :data:`OF_CROP_SOURCES`."""
    record = {"hash": f"sha256[:{DIGEST_CHARS}]", "of": of,
              "parts": {part: sorted({file_digest(path) for path in paths}) for part, paths in parts.items()}}
    target = Path(bundle_dir) / DIGESTS_FILE
    target.write_text(json.dumps(record, separators=(",", ":")))
    return target


def read_training_digests(bundle_dir: str | Path) -> dict | None:
    """The bundle's record (:func:`write_training_digests`); None when it has none or it cannot be read."""
    path = Path(bundle_dir) / DIGESTS_FILE
    try:
        record = json.loads(path.read_text())
        parts = {str(part): set(map(str, digests)) for part, digests in record["parts"].items()}
        return {"of": str(record.get("of", OF_IMAGES)), "parts": parts}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def digest_overlap(record: dict, paths: Iterable[str | Path]) -> dict[str, int]:
    """How many of ``paths`` have the contents of an image of each learned part of ``record`` (parts
    without any left out)."""
    digests = []
    for path in paths:
        try:
            digests.append(file_digest(path))
        except OSError:  # unreadable: the scoring reports it
            continue
    found = {part: sum(1 for d in digests if d in record["parts"].get(part, ())) for part in LEARNED_PARTS}
    return {part: n for part, n in found.items() if n}


def describe_overlap(overlap: Mapping[str, int], of: str = OF_IMAGES) -> str:
    """``3 of its train images and 1 of its val images`` (or ``... source images of its train crops``)."""
    noun = "source images of its {part} crops" if of == OF_CROP_SOURCES else "of its {part} images"
    return " and ".join(f"{n} {noun.format(part=part)}" for part, n in overlap.items())
