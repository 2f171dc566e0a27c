"""Samples and manifests: the one description of a dataset every stage shares."""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from leukoscope.labels import nfc, resembled_name


class DatasetError(ValueError):
    """A dataset cannot be used as given (empty, one class, missing labels...)."""


#: A subject id a spreadsheet wrote as a number: ``1``, ``01``, ``1.0``.
_NUMBER = re.compile(r"0*(\d+)(\.0*)?")


def subject_key(subject: str) -> str:
    """The one subject ``subject`` names however it was typed: case, spaces (surrounding, or repeated inside) and
    a number's leading zeros or ``.0`` (a spreadsheet's ``1`` / ``01`` / ``1.0``) set none apart. Splits group
    and check subjects by it: "P04" and "p04" were two patients, one in train and the other in test."""
    key = " ".join(subject.split()).casefold()
    number = _NUMBER.fullmatch(key)
    return number.group(1) if number else key


@dataclass(frozen=True)
class Sample:
    """One image and what is known about it.

    ``subject`` is the patient or slide the image came from, when known; splits
    keep all images of a subject together.
    """

    path: Path
    label: str | None
    subject: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


@dataclass
class Manifest:
    """An ordered list of samples plus the class names, in a fixed order."""

    samples: list[Sample]
    classes: list[str] = field(default_factory=list)
    root: Path | None = None

    def __post_init__(self) -> None:
        if not self.classes:
            self.classes = sorted({s.label for s in self.samples if s.label is not None})

    # -- container protocol -------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    # -- derived views ------------------------------------------------------
    @property
    def labels(self) -> list[str | None]:
        return [s.label for s in self.samples]

    @property
    def targets(self) -> list[int]:
        """Class indices; raises if any sample has no label."""
        index = {name: i for i, name in enumerate(self.classes)}
        missing = [str(s.path) for s in self.samples if s.label is None]
        if missing:
            raise DatasetError(
                f"{len(missing)} sample(s) have no label, e.g. {missing[0]}; "
                "labels are needed for training and evaluation"
            )
        unknown = sorted({s.label for s in self.samples if s.label not in index})
        if unknown:
            raise DatasetError(f"labels {unknown} are not among the classes {self.classes}")
        return [index[s.label] for s in self.samples]  # type: ignore[index]

    @property
    def has_subjects(self) -> bool:
        return any(s.subject is not None for s in self.samples)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(s.label for s in self.samples)
        return {name: counts.get(name, 0) for name in self.classes}

    def subset(self, indices: Sequence[int]) -> "Manifest":
        return Manifest([self.samples[i] for i in indices], list(self.classes), self.root)

    def filter(self, keep: Iterable[bool]) -> "Manifest":
        return Manifest([s for s, k in zip(self.samples, keep) if k], list(self.classes), self.root)

    def with_classes(self, classes: Sequence[str]) -> "Manifest":
        """The same samples indexed by another class order (e.g. a model's). A label that is one of ``classes`` in
        another Unicode form takes its spelling: a model trained on a Mac's folder names (decomposed accents)
        refused the same names typed elsewhere, its hint naming two names that print alike."""
        spelt = {nfc(name): name for name in classes}
        samples = [s if s.label is None or s.label in classes or nfc(s.label) not in spelt
                   else Sample(s.path, spelt[nfc(s.label)], s.subject) for s in self.samples]
        unknown = sorted({s.label for s in samples if s.label is not None and s.label not in classes})
        if unknown:
            # a slip of a letter or two names the class it resembles: the fix is a rename, not another model
            slips = [(label, resembled_name(label, classes)) for label in unknown]
            hints = "".join(f"; {label!r} looks like a misspelling of the model's class {name!r}"
                            for label, name in slips if name is not None)
            raise DatasetError(
                f"the data has labels {unknown} that the model does not know "
                f"(model classes: {list(classes)}){hints}"
            )
        return Manifest(samples, list(classes), self.root)

    def require_trainable(self) -> None:
        """Fail clearly when the data cannot train a classifier."""
        if not self.samples:
            raise DatasetError("the dataset is empty: no images were found")
        if all(s.label is None for s in self.samples):
            raise DatasetError(f"none of the {len(self.samples)} images has a label; training needs labelled "
                               "images (class sub-folders, or a 'label' column in a CSV manifest)")
        present = [c for c, n in self.class_counts().items() if n > 0]
        if len(present) < 2:
            beside = manifests_in(self.root) if self.root is not None and self.root.is_dir() else []
            hint = f"; {beside[0]} lists images: give it as --data" if beside else ""
            raise DatasetError(
                f"training needs at least two classes with images; found only {present or 'none'}{hint}"
            )
        self.targets  # noqa: B018 - raises on unlabelled samples

    # -- persistence --------------------------------------------------------
    def save_csv(self, path: str | Path) -> Path:
        """Write ``path,label,subject``; paths relative to the CSV's folder when possible."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        base = path.parent.resolve()
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "subject"])
            for sample in self.samples:
                writer.writerow([_relative_or_absolute(sample.path, base), sample.label or "", sample.subject or ""])
        return path


def manifests_in(folder: Path) -> list[Path]:
    """The CSV files in ``folder`` (not below) whose header has a ``path`` column: a folder holding ``labels.csv``
    beside ``images/`` read as class folders has one class, "images"; the error now points to the manifest."""
    found = []
    for candidate in sorted(folder.glob("*.csv")):
        try:
            with candidate.open(encoding="utf-8-sig", errors="replace") as handle:
                header = next(csv.reader([handle.readline()]), [])
        except OSError:
            continue
        if "path" in (cell.strip().lower() for cell in header):
            found.append(candidate)
    return found


def _relative_or_absolute(path: Path, base: Path) -> str:
    resolved = path.resolve()
    try:
        return resolved.relative_to(base).as_posix()
    except ValueError:
        return str(resolved)
