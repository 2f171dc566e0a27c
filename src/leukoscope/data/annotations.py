"""Object annotations: Pascal VOC boxes, point centroids (ALL-IDB ``.xyc``) and
per-image white-cell types (``bccd/wbc_types.csv``): the types they are read into, the class names
resolved, the point and type files read.

Every problem is reported with the file and, where there is one, the line:
malformed XML, an unknown or misspelt class name (with the closest known name),
a box outside the image or with no area, an empty file. Readers either raise
:class:`AnnotationError` on the first problem (``on_error="fail"``) or drop the
offending object or file and collect an :class:`AnnotationIssue` for each
(``on_error="skip"``), so that training can go on and the report can list what
was left out.

The VOC files and folders themselves are read and written by :mod:`leukoscope.data.voc`.
"""

from __future__ import annotations

import csv
import difflib
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

from leukoscope.data.manifest import DatasetError
from leukoscope.progress import name_some

log = logging.getLogger(__name__)

OnError = Literal["fail", "skip"]

#: The classes of the BCCD / CBC detection sets, in the order leukoscope uses.
BLOOD_CELL_CLASSES: tuple[str, ...] = ("WBC", "RBC", "Platelets")
#: White-cell types of ``bccd/wbc_types.csv``.
WBC_TYPES: tuple[str, ...] = ("NEUTROPHIL", "EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "BASOPHIL")


class AnnotationError(DatasetError):
    """An annotation file cannot be used; the message names the file (and line)."""

    def __init__(self, source: str | Path, message: str, line: int | None = None) -> None:
        self.source = str(source)
        self.line = line
        self.detail = message
        where = f"{source}:{line}" if line is not None else str(source)
        super().__init__(f"{where}: {message}")


class SplitRequired(DatasetError):
    """A folder with splits (``<Split>/Annotations``) read without naming one; ``splits`` are its splits."""

    def __init__(self, root: Path, splits: Sequence[str]) -> None:
        self.root = root
        self.splits = list(splits)
        super().__init__(f"{root}: choose a split ({', '.join(self.splits)})")

    def roles(self) -> dict[str, list[str]]:
        """The splits by the part their name suggests (``train``, ``val``, ``test``), e.g. for a message that
        tells which setting takes which."""
        roles: dict[str, list[str]] = {}
        for split in self.splits:
            for role, names in (("train", ("train", "training")), ("val", ("val", "validation")),
                                ("test", ("test", "testing"))):
                if split.casefold() in names:
                    roles.setdefault(role, []).append(split)
        return roles


@dataclass(frozen=True)
class AnnotationIssue:
    """One problem found while reading, kept when ``on_error="skip"``."""

    source: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"source": self.source, "line": self.line, "message": self.message}


def unannotated_note(images: Sequence[Path], shown: int = 10) -> str:
    """A report's line naming the images left out because no annotation file names them."""
    return (f"{len(images)} image(s) without an annotation file left out (not scored or trained on as fields "
            f"without cells): {name_some([Path(p).name for p in images], shown)}.")


def issues_note(issues: Sequence[AnnotationIssue], shown: int = 5) -> str:
    """A report's line on the problems skipped: the first ``shown``, and where the run keeps all of them."""
    text = f"{len(issues)} annotation problem(s) skipped: " + "; ".join(str(i) for i in issues[:shown])
    if len(issues) > shown:  # a report with hundreds of lines would hide the rest of it
        text += f"; ... and {len(issues) - shown} more: every one is in metrics.json (annotation_issues)"
    return text


@dataclass(frozen=True)
class BoxAnnotation:
    """An axis-aligned box in pixel coordinates (VOC ``xmin ymin xmax ymax``, x to the right)."""

    label: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool = False
    truncated: bool = False

    @property
    def width(self) -> float:
        return self.xmax - self.xmin

    @property
    def height(self) -> float:
        return self.ymax - self.ymin

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.xmin + self.xmax) / 2, (self.ymin + self.ymax) / 2)

    def as_xyxy(self) -> list[float]:
        return [self.xmin, self.ymin, self.xmax, self.ymax]


@dataclass(frozen=True)
class PointAnnotation:
    """A cell marked by its centroid (ALL-IDB1 ``.xyc``: one ``x y`` per line)."""

    x: float
    y: float
    label: str | None = None


@dataclass
class AnnotatedImage:
    """One image and its objects. ``labels`` holds per-image labels (e.g. WBC types)."""

    image_path: Path
    width: int | None = None
    height: int | None = None
    boxes: list[BoxAnnotation] = field(default_factory=list)
    points: list[PointAnnotation] = field(default_factory=list)
    annotation_path: Path | None = None
    labels: list[str] = field(default_factory=list)
    dropped: int = 0
    """Objects of the file left out as unusable (a box outside the image, unreadable coordinates...; not a box
    of no area, which marks no cell, nor a class left out on purpose): their cells are in the picture but not
    among ``boxes``."""

    def __post_init__(self) -> None:
        self.image_path = Path(self.image_path)

    @property
    def name(self) -> str:
        return self.image_path.name

    def count(self, label: str) -> int:
        return sum(1 for box in self.boxes if box.label == label)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for box in self.boxes:
            out[box.label] = out.get(box.label, 0) + 1
        return out


@dataclass
class DetectionDataset:
    """Annotated images with a fixed class order, and what was skipped while reading."""

    images: list[AnnotatedImage]
    classes: list[str]
    issues: list[AnnotationIssue] = field(default_factory=list)
    root: Path | None = None
    unannotated: list[Path] = field(default_factory=list)
    """Images of the folder that no annotation file names: left out (also among ``issues``)."""

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[AnnotatedImage]:
        return iter(self.images)

    def __getitem__(self, index: int) -> AnnotatedImage:
        return self.images[index]

    def class_counts(self) -> dict[str, int]:
        counts = {name: 0 for name in self.classes}
        for image in self.images:
            for box in image.boxes:
                counts[box.label] = counts.get(box.label, 0) + 1
        return counts

    def subset(self, indices: Sequence[int]) -> "DetectionDataset":
        return DetectionDataset([self.images[i] for i in indices], list(self.classes), list(self.issues), self.root,
                                list(self.unannotated))


# --------------------------------------------------------------------------- class names
class ClassResolver:
    """Map the names written in files to the canonical class names.

    Exact names and case-insensitive matches are accepted (``wbc`` -> ``WBC``);
    ``aliases`` add explicit spellings (``{"Platelet": "Platelets"}``); ``others``
    are classes of the data left out on purpose (RBC when reading WBC only; an alias
    may name one); anything else is an unknown class, reported with the closest known
    name.
    """

    def __init__(self, classes: Sequence[str] | None, aliases: dict[str, str] | None = None,
                 others: Sequence[str] = ()) -> None:
        self.classes = list(classes) if classes is not None else None
        self.aliases = dict(aliases or {})
        self.others: dict[str, str] = {}
        if self.classes is not None:
            read = {name.casefold() for name in self.classes}
            self.others = {name.casefold(): name for name in others if name.casefold() not in read}
            for source, target in list(self.aliases.items()):
                if target in self.classes:
                    continue
                if target.casefold() in self.others:  # a spelling of a class left out: left out too
                    self.others[source.casefold()] = self.aliases.pop(source)
                    continue
                raise DatasetError(f"class alias {source!r} -> {target!r}: {target!r} is not one of {self.classes}")
            self._folded = {name.casefold(): name for name in self.classes}
            self._folded.update({alias.casefold(): target for alias, target in self.aliases.items()})

    def is_other(self, name: str) -> bool:
        """Whether ``name`` is a class of the data left out on purpose (not read, and no error)."""
        return self.classes is not None and name.strip().casefold() in self.others

    def resolve(self, name: str) -> str:
        """Canonical name, or ValueError with a 'did you mean' hint."""
        name = name.strip()
        if name in self.aliases:
            return self.aliases[name]
        if self.classes is None:
            return name
        if name in self.classes:
            return name
        if name.casefold() in self._folded:
            return self._folded[name.casefold()]
        known = self.classes + list(self.aliases) + list(self.others.values())
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if not close:
            folded = {**self._folded, **self.others}
            close = difflib.get_close_matches(name.casefold(), list(folded), n=1, cutoff=0.6)
            close = [folded[close[0]]] if close else []
        hint = f" (did you mean {self.aliases.get(close[0], close[0])!r}?)" if close else ""
        others = sorted(set(self.others.values()))
        left_out = f" (left out on purpose: {', '.join(others)})" if others else ""
        raise ValueError(f"unknown class {name!r}{hint}; known classes: {', '.join(self.classes)}{left_out}")


def class_resolver(classes: Sequence[str] | None, aliases: dict[str, str] | None = None,
                   ignore_classes: Sequence[str] = ()) -> ClassResolver:
    """The resolver of detection annotations: the classes read, their aliases, and as classes left out on
    purpose ``ignore_classes``, the red cells and platelets (never white cells: a detector of white-cell types
    beside CBC's boxes, ``[WBC, Blast]``, leaves them out) and ``WBC`` when every class read is a blood-cell
    class (reading RBC alone). A ``WBC`` box beside classes of other names (``Leukocyte``, ``Lymphocyte``) may
    mark one of their cells, which would be learned as background: it is a problem, unless ignored."""
    return ClassResolver(classes, aliases, [*left_out_blood_classes(classes), *ignore_classes])


def left_out_blood_classes(classes: Sequence[str] | None) -> list[str]:
    """The blood-cell classes a reader of ``classes`` leaves out on purpose (:func:`class_resolver`)."""
    if classes is None:
        return []
    blood = {name.casefold() for name in BLOOD_CELL_CLASSES}
    only_blood = all(name.casefold() in blood for name in classes)
    return [name for name in BLOOD_CELL_CLASSES if name != "WBC" or only_blood]


# --------------------------------------------------------------------------- points (.xyc)
def read_points(
    path: str | Path,
    *,
    image_size: tuple[int, int] | None = None,
    label: str | None = None,
    on_error: OnError = "fail",
    issues: list[AnnotationIssue] | None = None,
) -> list[PointAnnotation]:
    """Read an ALL-IDB1-style ``.xyc`` file: one ``x y`` centroid per line (tabs or spaces).

    Blank lines and ``#`` comments are ignored. An empty file means "no cell"
    and gives an empty list (ALL-IDB1 healthy images have empty files); a line
    that is not two numbers, or a point outside ``image_size`` (width, height),
    is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "point file does not exist")
    points: list[PointAnnotation] = []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = re.split(r"[\s,;]+", line)
        try:
            if len(parts) != 2:
                raise ValueError
            x, y = float(parts[0]), float(parts[1])
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError
        except ValueError:
            message = f"expected two numbers 'x y', got {raw.strip()!r}"
            if on_error == "fail":
                raise AnnotationError(path, message, number) from None
            if issues is not None:
                issues.append(AnnotationIssue(str(path), number, message))
            continue
        if image_size is not None and not (0 <= x <= image_size[0] and 0 <= y <= image_size[1]):
            message = f"point ({x:g}, {y:g}) lies outside the {image_size[0]}x{image_size[1]} image"
            if on_error == "fail":
                raise AnnotationError(path, message, number)
            if issues is not None:
                issues.append(AnnotationIssue(str(path), number, message))
            continue
        points.append(PointAnnotation(x, y, label))
    return points


def write_points(points: Iterable[PointAnnotation], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(f"{p.x:g}\t{p.y:g}\n" for p in points))
    return path


def points_to_boxes(points: Iterable[PointAnnotation], size: float, label: str = "WBC",
                    image_size: tuple[int, int] | None = None) -> list[BoxAnnotation]:
    """Square boxes of side ``size`` around centroids (clipped to the image), for point-only data."""
    half = size / 2
    boxes = []
    for point in points:
        x0, y0, x1, y1 = point.x - half, point.y - half, point.x + half, point.y + half
        if image_size is not None:
            x0, y0 = max(0.0, x0), max(0.0, y0)
            x1, y1 = min(float(image_size[0]), x1), min(float(image_size[1]), y1)
        boxes.append(BoxAnnotation(point.label or label, x0, y0, x1, y1))
    return boxes


# --------------------------------------------------------------------------- wbc_types.csv
def read_wbc_types(
    path: str | Path,
    *,
    types: Sequence[str] | None = WBC_TYPES,
    on_error: OnError = "fail",
    issues: list[AnnotationIssue] | None = None,
) -> dict[str, list[str]]:
    """Read ``image,wbc_type`` rows -> ``{image stem: [types]}``.

    A cell may name several types (``"NEUTROPHIL, EOSINOPHIL"``: one per white
    cell of the image). Names are upper-cased; an unknown type (not in ``types``)
    is an error naming the line, with the closest known type.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "file does not exist")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise AnnotationError(path, "file is empty")
    resolver = ClassResolver(types) if types is not None else None
    reader = csv.reader(text.splitlines())
    header = next(reader)
    columns = [h.strip().lower() for h in header]
    if "image" not in columns or not ({"wbc_type", "category", "type"} & set(columns)):
        raise AnnotationError(path, f"expected columns 'image,wbc_type', found {header}", 1)
    image_col = columns.index("image")
    type_col = next(columns.index(c) for c in ("wbc_type", "category", "type") if c in columns)
    out: dict[str, list[str]] = {}
    for number, row in enumerate(reader, 2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(image_col, type_col):
            message = f"row has {len(row)} column(s), expected at least {max(image_col, type_col) + 1}"
            if on_error == "fail":
                raise AnnotationError(path, message, number)
            if issues is not None:
                issues.append(AnnotationIssue(str(path), number, message))
            continue
        image = Path(row[image_col].strip()).stem
        names = [name.strip().upper() for name in row[type_col].split(",") if name.strip()]
        try:
            resolved = [resolver.resolve(name) for name in names] if resolver else names
        except ValueError as exc:
            if on_error == "fail":
                raise AnnotationError(path, str(exc), number) from None
            if issues is not None:
                issues.append(AnnotationIssue(str(path), number, str(exc)))
            continue
        if image:
            out[image] = resolved
    return out


def attach_labels(dataset: DetectionDataset, labels: dict[str, list[str]]) -> DetectionDataset:
    """Copy per-image labels (e.g. from :func:`read_wbc_types`) onto a dataset's images."""
    images = [replace(image, labels=list(labels.get(image.image_path.stem, []))) for image in dataset.images]
    return DetectionDataset(images, list(dataset.classes), list(dataset.issues), dataset.root)
