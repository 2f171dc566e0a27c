"""Pascal VOC boxes: one XML file read and written, and a whole VOC folder read (its layout found, a split
chosen) into a :class:`~leukoscope.data.annotations.DetectionDataset`.

Every problem is reported with the file and, where there is one, the line (see
:mod:`leukoscope.data.annotations`). Layouts understood by :func:`read_voc_dataset`:

- ``bccd``: ``root/JPEGImages``, ``root/Annotations``, ``root/ImageSets/Main/<split>.txt``
  (splits ``train``, ``val``, ``trainval``, ``test``);
- ``cbc``: ``root/<Split>/Images`` + ``root/<Split>/Annotations`` (splits
  ``Training``, ``Validation``, ``Testing``; ``train``/``val``/``test`` are aliases);
- ``flat``: ``root/Images`` (or ``JPEGImages``) + ``root/Annotations``, or image
  and XML files side by side in one folder.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, NamedTuple, Sequence
from xml.parsers import expat
from xml.sax.saxutils import escape

from leukoscope.data.annotations import (AnnotatedImage, AnnotationError, AnnotationIssue, BoxAnnotation, ClassResolver,
                                        DetectionDataset, OnError, SplitRequired, class_resolver)
from leukoscope.data.manifest import DatasetError
from leukoscope.io import EXIF_ORIENTATION, IMAGE_SUFFIXES
from leukoscope.labels import case_clashes, how_they_differ
from leukoscope.progress import name_some

log = logging.getLogger(__name__)

#: How far (pixels) a box may stick out of the image before it is an error; less is clipped.
BOX_TOLERANCE = 2.0

_SPLIT_ALIASES = {
    "train": ("Training", "train"),
    "training": ("Training", "train"),
    "val": ("Validation", "val"),
    "validation": ("Validation", "val"),
    "test": ("Testing", "test"),
    "testing": ("Testing", "test"),
    "trainval": ("trainval",),
}


# --------------------------------------------------------------------------- XML with line numbers
class _Node:
    __slots__ = ("tag", "line", "children", "text")

    def __init__(self, tag: str, line: int) -> None:
        self.tag = tag
        self.line = line
        self.children: list[_Node] = []
        self.text = ""

    def find(self, tag: str) -> "_Node | None":
        return next((child for child in self.children if child.tag == tag), None)

    def findall(self, tag: str) -> list["_Node"]:
        return [child for child in self.children if child.tag == tag]


def _parse_xml(data: bytes, source: Path) -> _Node:
    """Parse with expat, keeping the line of every element (ElementTree forgets them).

    Entity declarations are refused: annotation files have no use for them and
    they are the vehicle of entity-expansion attacks.
    """
    parser = expat.ParserCreate()
    stack: list[_Node] = []
    root: list[_Node] = []

    def start(tag: str, _attrs: dict) -> None:
        node = _Node(tag, parser.CurrentLineNumber)
        if stack:
            stack[-1].children.append(node)
        else:
            root.append(node)
        stack.append(node)

    def end(_tag: str) -> None:
        stack.pop()

    def chars(text: str) -> None:
        if stack:
            stack[-1].text += text

    def entity(*_args) -> None:
        raise AnnotationError(source, "XML entity declarations are not allowed", parser.CurrentLineNumber)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.EntityDeclHandler = entity
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise AnnotationError(source, f"malformed XML: {expat.ErrorString(exc.code)} (column {exc.offset + 1})",
                              exc.lineno) from None
    if not root:
        raise AnnotationError(source, "no XML element found")
    return root[0]


def _number(node: _Node | None, name: str, source: Path, parent: _Node) -> float:
    if node is None:
        raise AnnotationError(source, f"<{parent.tag}> has no <{name}>", parent.line)
    text = node.text.strip()
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(source, f"<{name}> is not a number: {text!r}", node.line) from None
    if not math.isfinite(value):
        raise AnnotationError(source, f"<{name}> is not a finite number: {text!r}", node.line)
    return value


def _flag(node: _Node | None) -> bool:
    return node is not None and node.text.strip() not in ("", "0", "false", "False")


# --------------------------------------------------------------------------- VOC files
def parse_voc_xml(
    path: str | Path,
    *,
    classes: Sequence[str] | None = None,
    aliases: dict[str, str] | None = None,
    ignore_classes: Sequence[str] = (),
    image_dir: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
    on_error: OnError = "fail",
    issues: list[AnnotationIssue] | None = None,
) -> AnnotatedImage:
    """Read one Pascal VOC XML file.

    ``classes`` restricts and canonicalises the object names (None: accept any);
    a box of another class is left out without a word when that class is one of
    ``ignore_classes`` or a blood-cell class the reader leaves out (:func:`left_out_blood_classes`;
    classes of the data left out on purpose: :func:`class_resolver`), and is a problem otherwise (an
    unknown or misspelt class: its box may mark a cell of a class read, so the image counts it in ``dropped``);
    ``image_dir`` is where the image is looked up by ``<filename>`` (default: the
    XML's folder, then a sibling ``JPEGImages`` / ``Images`` folder);
    ``image_size`` (width, height) overrides a missing ``<size>``.
    With ``on_error="skip"`` a bad object is dropped and recorded in ``issues``;
    a file that cannot be read at all still raises.
    """
    path = Path(path)
    resolver = classes if isinstance(classes, ClassResolver) else class_resolver(classes, aliases, ignore_classes)
    if not path.is_file():
        raise AnnotationError(path, "annotation file does not exist")
    data = path.read_bytes()
    if not data.strip():
        raise AnnotationError(path, "annotation file is empty")
    root = _parse_xml(data, path)
    if root.tag != "annotation":
        raise AnnotationError(path, f"root element is <{root.tag}>, expected <annotation> (Pascal VOC)", root.line)

    filename_node = root.find("filename")
    filename = filename_node.text.strip() if filename_node is not None and filename_node.text.strip() else None
    if filename is None:
        filename = path.stem + ".jpg"
    elif not Path(filename).suffix:
        filename += ".jpg"
    image_path = _locate_image(path, filename, image_dir)

    width = height = None
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width = int(_number(size.find("width"), "width", path, size))
        height = int(_number(size.find("height"), "height", path, size))
        if width <= 0 or height <= 0:  # some exporters write 0x0: as no <size> (a dataset reads the image's own)
            width = height = None
    if width is None and image_size is not None:
        width, height = image_size

    dropped = 0

    def problem(message: str, line: int | None, a_cell: bool = True) -> None:
        nonlocal dropped
        if on_error == "fail":
            raise AnnotationError(path, message, line)
        dropped += a_cell
        issue = AnnotationIssue(str(path), line, message)
        log.debug("%s (object skipped)", issue)
        if issues is not None:
            issues.append(issue)

    boxes: list[BoxAnnotation] = []
    for obj in root.findall("object"):
        name_node = obj.find("name")
        if name_node is None or not name_node.text.strip():
            problem("<object> has no <name>", obj.line)
            continue
        try:
            label = resolver.resolve(name_node.text)
        except ValueError as exc:
            if resolver.is_other(name_node.text):  # a class of the data left out by choice (RBC when reading WBC)
                continue
            # unknown or misspelt (Leukocyte, Platelet): its cell may be one of a class read, which the image
            # would teach as background, or score a right detection on as a false one
            problem(str(exc), name_node.line)
            continue
        bndbox = obj.find("bndbox")
        if bndbox is None:
            problem(f"<object> {label!r} has no <bndbox>", obj.line)
            continue
        try:
            x0, y0, x1, y1 = (_number(bndbox.find(k), k, path, bndbox) for k in ("xmin", "ymin", "xmax", "ymax"))
        except AnnotationError as exc:
            problem(exc.detail, exc.line)
            continue
        if x1 <= x0 or y1 <= y0:
            problem(f"{label} box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) has no area (xmax <= xmin or ymax <= ymin)",
                    bndbox.line, a_cell=False)
            continue
        if width is not None and height is not None:
            tol = BOX_TOLERANCE
            if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
                problem(f"{label} box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the "
                        f"{width}x{height} image", bndbox.line)
                continue
            x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
            if x1 - x0 < 1 or y1 - y0 < 1:
                problem(f"{label} box is less than 1 pixel wide inside the image", bndbox.line)
                continue
        boxes.append(BoxAnnotation(label, x0, y0, x1, y1, _flag(obj.find("difficult")), _flag(obj.find("truncated"))))
    return AnnotatedImage(image_path, width, height, boxes, annotation_path=path, dropped=dropped)


def _locate_image(xml_path: Path, filename: str, image_dir: str | Path | None) -> Path:
    name = Path(filename).name  # never follow directories written in the file
    candidates = []
    if image_dir is not None:
        candidates.append(Path(image_dir) / name)
    candidates += [xml_path.parent / name, xml_path.parent.parent / "JPEGImages" / name,
                   xml_path.parent.parent / "Images" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    # The XML may name a .png while the file is a .jpg (or the reverse): try the stem.
    for folder in {c.parent for c in candidates}:
        for suffix in IMAGE_SUFFIXES:
            for stem in (Path(name).stem, xml_path.stem):
                candidate = folder / (stem + suffix)
                if candidate.is_file():
                    return candidate
    return candidates[0]


def write_voc_xml(image: AnnotatedImage, path: str | Path, *, folder: str = "JPEGImages") -> Path:
    """Write ``image`` as a Pascal VOC XML file (boxes rounded to whole pixels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "<annotation>",
        f"\t<folder>{escape(folder)}</folder>",
        f"\t<filename>{escape(image.image_path.name)}</filename>",
        "\t<source>",
        "\t\t<database>leukoscope</database>",
        "\t</source>",
    ]
    if image.width is not None and image.height is not None:
        lines += ["\t<size>", f"\t\t<width>{image.width}</width>", f"\t\t<height>{image.height}</height>",
                  "\t\t<depth>3</depth>", "\t</size>"]
    lines.append("\t<segmented>0</segmented>")
    for box in image.boxes:
        lines += [
            "\t<object>",
            f"\t\t<name>{escape(box.label)}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(box.truncated)}</truncated>",
            f"\t\t<difficult>{int(box.difficult)}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{round(box.xmin)}</xmin>",
            f"\t\t\t<ymin>{round(box.ymin)}</ymin>",
            f"\t\t\t<xmax>{round(box.xmax)}</xmax>",
            f"\t\t\t<ymax>{round(box.ymax)}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- VOC folders
@dataclass(frozen=True)
class VocLayout:
    """Where a VOC folder keeps its files: ``kind`` and a list of (images, annotations, ids) per split."""

    kind: Literal["bccd", "cbc", "flat"]
    root: Path

    def splits(self) -> list[str]:
        if self.kind == "bccd":
            main = self.root / "ImageSets" / "Main"
            return sorted(p.stem for p in main.glob("*.txt")) if main.is_dir() else []
        if self.kind == "cbc":
            return [p.name for p in sorted(self.root.iterdir()) if (p / "Annotations").is_dir()]
        return []


def detect_layout(root: str | Path) -> VocLayout:
    root = Path(root)
    if root.is_file():
        raise DatasetError(f"{root}: is a file; a detector's data are a Pascal VOC folder (Annotations/*.xml "
                           f"beside the images)")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return VocLayout("bccd", root)
    if any((p / "Annotations").is_dir() for p in root.iterdir() if p.is_dir()):
        return VocLayout("cbc", root)
    if (root / "Annotations").is_dir() or any(root.glob("*.xml")):
        return VocLayout("flat", root)
    raise DatasetError(
        f"{root}: not a Pascal VOC folder (expected Annotations/ + JPEGImages/, <Split>/Annotations/, "
        f"or XML files beside the images)"
    )


def _resolve_split_name(layout: VocLayout, split: str) -> str:
    available = layout.splits()
    if split in available:
        return split
    for candidate in _SPLIT_ALIASES.get(split.casefold(), ()):
        if candidate in available:
            return candidate
    folded = {name.casefold(): name for name in available}
    if split.casefold() in folded:
        return folded[split.casefold()]
    raise DatasetError(f"{layout.root}: no split {split!r}; available: {', '.join(available) or 'none'}")


def _split_files(layout: VocLayout, split: str | None) -> tuple[list[Path], Path | None]:
    """Annotation files of one split and the folder holding its images."""
    root = layout.root
    if layout.kind == "bccd":
        ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
        if split is None:
            return sorted(ann_dir.glob("*.xml")), img_dir
        name = _resolve_split_name(layout, split)
        list_file = root / "ImageSets" / "Main" / f"{name}.txt"
        ids = []
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            token = line.strip().split()[0] if line.strip() else ""
            if token:
                ids.append(Path(token).stem)
        if not ids:
            raise AnnotationError(list_file, "split list is empty")
        return [ann_dir / f"{i}.xml" for i in ids], img_dir
    if layout.kind == "cbc":
        if split is None:
            raise SplitRequired(root, layout.splits())
        name = _resolve_split_name(layout, split)
        images = root / name / "Images"
        if not images.is_dir():
            images = root / name / "JPEGImages"
        return sorted((root / name / "Annotations").glob("*.xml")), images
    ann_dir = root / "Annotations" if (root / "Annotations").is_dir() else root
    img_dir = next((root / d for d in ("JPEGImages", "Images") if (root / d).is_dir()), ann_dir)
    if split is not None:
        raise DatasetError(f"{root}: this folder has no splits; leave the split out")
    return sorted(ann_dir.glob("*.xml")), img_dir


def read_voc_dataset(
    root: str | Path,
    split: str | Sequence[str] | None = None,
    *,
    classes: Sequence[str] | None = None,
    aliases: dict[str, str] | None = None,
    ignore_classes: Sequence[str] = (),
    on_error: OnError = "fail",
    deduplicate: bool = True,
    require_images: bool = True,
) -> DetectionDataset:
    """Read a VOC folder (``bccd``, ``cbc`` or flat layout), one split or several.

    ``split`` may be a name, a list of names or ``"Training+Validation"``. With
    several splits, an image that appears in more than one (same file name and
    same bytes, as CBC's Validation images all also sit in Training) is kept once.
    ``classes`` fixes the class order; default: every name found, sorted. A box of a
    class outside ``classes`` is left out when the class is one of ``ignore_classes`` or a blood-cell
    class :func:`left_out_blood_classes` leaves out; any other name is a problem that
    leaves its image out (see :func:`parse_voc_xml`).
    """
    layout = detect_layout(root)
    if isinstance(split, str) and "+" in split:
        split = [s for s in split.split("+") if s]
    splits: list[str | None] = [None] if split is None else [split] if isinstance(split, str) else list(split)
    resolver = class_resolver(classes, aliases, ignore_classes)
    issues: list[AnnotationIssue] = []
    images: list[AnnotatedImage] = []
    seen: dict[str, str] = {}
    duplicates = 0
    annotated_by: dict[Path, list[Path]] = {}  # image -> the annotation files that name it
    unannotated: list[Path] = []
    for name in splits:
        files, image_dir = _split_files(layout, name)
        for xml in files:
            try:
                if not xml.is_file():
                    raise AnnotationError(xml, "annotation file listed in the split does not exist")
                found: list[AnnotationIssue] = []
                image = parse_voc_xml(xml, classes=resolver, image_dir=image_dir, on_error=on_error, issues=found)
                if require_images and not image.image_path.is_file():
                    raise AnnotationError(xml, f"image {image.image_path.name} not found (looked in {image_dir})")
                claims = annotated_by.setdefault(image.image_path.resolve(), [])
                if xml.resolve() not in claims:
                    claims.append(xml.resolve())
                if len(claims) > 1 and on_error == "fail":
                    raise AnnotationError(xml, f"names the image {image.image_path.name}, which "
                                               f"{claims[0].name} annotates too: one of them names the wrong image "
                                               f"(its <filename>)")
                decoded = decoded_size(image.image_path) if image.image_path.is_file() else None
                if decoded is not None and image.width is None:  # no <size>: the boxes are checked on the image's
                    found = []
                    image = parse_voc_xml(xml, classes=resolver, image_dir=image_dir, image_size=decoded[:2],
                                          on_error=on_error, issues=found)
                elif decoded is not None and (image.width, image.height) != decoded[:2]:
                    raise AnnotationError(xml, f"<size> says {image.width}x{image.height}, but "
                                               f"{image.image_path.name} decodes to {decoded[0]}x{decoded[1]}"
                                               f"{' (its EXIF orientation turns it)' if decoded.turned else ''}: "
                                               f"its boxes may not lie on its cells; "
                                               f"fix <size> or the image")
                issues.extend(found)
                if image.dropped:  # training would teach those cells as background, scoring count them as misses
                    raise AnnotationError(xml, f"{image.dropped} object(s) above could not be used; the image is "
                                               f"left out, or its cells would count as background")
            except AnnotationError as exc:
                if on_error == "fail":
                    raise
                issues.append(AnnotationIssue(exc.source, exc.line, exc.detail + " (file skipped)"))
                continue
            if deduplicate and len(splits) > 1 and image.image_path.is_file():
                key = image.image_path.name
                digest = hashlib.sha1(image.image_path.read_bytes()).hexdigest()
                if seen.get(key) == digest:
                    duplicates += 1
                    continue
                seen[key] = digest
            images.append(image)
        if layout.kind != "bccd" or name is None:  # a BCCD split is its list: images not listed are not in it
            unannotated += [p for p in _without_annotation(image_dir, files, annotated_by) if p not in unannotated]
    # An image without an annotation file is left out, not read as a field without cells: that would teach its
    # cells as background, or count every detection on it as false, were its file only lost. A field without
    # cells has an XML file with no <object>.
    for path in unannotated:
        message = (f"no annotation file names this image (no {path.stem}.xml): the image is left out; "
                   f"a field without cells needs an XML file with no <object>")
        if on_error == "fail":
            raise AnnotationError(path, message)
        issues.append(AnnotationIssue(str(path), None, message))
    if unannotated:
        log.warning("%s: %d image(s) without an annotation file left out: %s", root, len(unannotated),
                    name_some([p.name for p in unannotated]))
    # an image several files name (a stale <filename>): which file is right cannot be told, so none is used
    claimed = {image: files for image, files in annotated_by.items() if len(files) > 1}
    if claimed:
        images = [image for image in images if image.image_path.resolve() not in claimed]
        for image, files in claimed.items():
            names = ", ".join(f.name for f in files)
            issues += [AnnotationIssue(str(f), None, f"{names} all name the image {image.name}: one of them names "
                                                     f"the wrong image (its <filename>); the image is left out")
                       for f in files]
    if not images:
        raise DatasetError(f"{root}: no usable annotated image" + (f" in split {split!r}" if split else "")
                           + (f" ({len(unannotated)} image(s) without an annotation file)" if unannotated else ""))
    if issues:
        log.warning("%s: %d annotation problem(s) skipped, e.g. %s", root, len(issues), issues[0])
    if duplicates:
        # a warning, not a note: a run of 360 files read as 300 said so with --verbose only (CBC's Validation is
        # a copy of part of its Training)
        log.warning("%s: %d image(s) appear in more than one of %s and were kept once", root, duplicates, splits)
    found = sorted({box.label for image in images for box in image.boxes})
    if classes is None:  # the names found are the classes: two spellings of one name would be two classes
        clashes = case_clashes(found)
        if clashes:
            listed = "; ".join(" / ".join(names) for names in clashes)
            how = " or ".join(dict.fromkeys(how_they_differ(names) for names in clashes))
            raise DatasetError(f"{root}: class names that differ only in {how} ({listed}) would be separate "
                               f"classes: list the classes (data.classes; other cases of a name then match it), or "
                               f"correct the annotations: {_spelt_in(images, clashes, Path(root))}")
    class_list = list(classes) if classes is not None else found
    return DetectionDataset(images, class_list, issues, Path(root), unannotated)


def _spelt_in(images: Sequence[AnnotatedImage], clashes: Sequence[Sequence[str]], root: Path,
              shown: int = 5) -> str:
    """Which annotation files write each spelling of the ``clashes``, rarest spelling first (most likely the
    slip to correct), so that the user knows which files to open."""
    files: dict[str, list[str]] = {}
    for image in images:
        source = image.annotation_path or image.image_path
        where = str(source.relative_to(root)) if source.is_relative_to(root) else str(source)
        for label in sorted({box.label for box in image.boxes}):
            files.setdefault(label, []).append(where)
    parts = []
    for names in clashes:
        for name in sorted(names, key=lambda n: (len(files.get(n, [])), n)):
            named = files.get(name, [])
            parts.append(f"{name!r} in {len(named)} file(s): {name_some(named, shown)}")
    return "; ".join(parts)


def _without_annotation(image_dir: Path | None, files: Sequence[Path], annotated_by: dict[Path, list[Path]]
                        ) -> list[Path]:
    """Images of ``image_dir`` that none of the annotation ``files`` names: neither by its ``<filename>``
    (``annotated_by``, filled as they are read) nor by its stem (a file that could not be read claims its own)."""
    if image_dir is None or not image_dir.is_dir():
        return []
    stems = {xml.stem for xml in files}
    images = sorted(p for p in image_dir.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    return [p for p in images if p.stem not in stems and p.resolve() not in annotated_by]


class DecodedSize(NamedTuple):
    """An image's size as :func:`leukoscope.io.load_image` gives it, and whether its EXIF orientation turned it."""

    width: int
    height: int
    turned: bool


def decoded_size(path: Path) -> DecodedSize | None:
    """(width, height) of the image as :func:`leukoscope.io.load_image` gives it, EXIF orientation applied
    (a camera's portrait JPEG turned upright), from its header alone; None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # the image's own reading says why
    return DecodedSize(height, width, True) if turned else DecodedSize(width, height, False)


def write_voc_dataset(images: Iterable[AnnotatedImage], root: str | Path) -> Path:
    """Write ``root/Annotations/<stem>.xml`` for images that already sit in ``root/JPEGImages``."""
    root = Path(root)
    for image in images:
        write_voc_xml(image, root / "Annotations" / f"{image.image_path.stem}.xml")
    return root
