"""Readers that turn a folder or a CSV into a :class:`Manifest`.

Layouts understood:
- class per folder: ``root/<class>/<image>`` (all-taleqani, pbc, most Kaggle sets);
- C-NMC 2019: the same, with the subject id parsed from ``UID_<subject>_...``;
- the web service's reviewed-labels export: the same, the case parsed from ``case-<id>-cell-<n>.png``
  (its cells are one patient's: never split between training and test);
- a CSV manifest with columns ``path,label[,subject]``.

Labels that differ only in case ("Neutrophil" beside "neutrophil") would be two classes: training and
``split`` refuse them (:func:`check_spellings`).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Sequence

from leukoscope.data.manifest import DatasetError, Manifest, Sample
from leukoscope.io import files_below, is_image_file
from leukoscope.labels import UNCERTAIN, case_clashes
from leukoscope.progress import name_some

log = logging.getLogger(__name__)

#: ``UID_13_3_1_all.bmp`` -> subject ``13``; ``UID_H10_1_1_hem.bmp`` -> ``H10``.
CNMC_NAME = re.compile(r"^UID_(?P<subject>H?\d+)_", re.IGNORECASE)
#: the class C-NMC writes at the end of a name: ``..._all.bmp`` / ``..._hem.bmp``.
CNMC_LABEL = re.compile(r"_(?P<label>all|hem)\.[a-z0-9]+$", re.IGNORECASE)


#: ``case-<32 hex>-cell-<n>.png``: a cell of the web service's reviewed-labels export (folder layout).
EXPORT_NAME = re.compile(r"^case-(?P<case>[0-9a-f]{32})-cell-\d+\.png$")
#: ``field-<field>-cell-<n>.png``: a cell `leukoscope analyze --cells` cut from a field.
FIELD_CELL_NAME = re.compile(r"^field-(?P<field>.+)-cell-\d+\.png$")


def cnmc_subject(filename: str) -> str | None:
    """The C-NMC subject id in ``filename``, or None when the name does not follow C-NMC."""
    match = CNMC_NAME.match(filename)
    return match.group("subject").upper() if match else None


def name_subject(filename: str) -> str | None:
    """The subject a file's name gives: a C-NMC subject, the case id of a cell of the service's export (the
    subject its CSV layout writes), or the field a cell of ``analyze --cells`` was cut from; None otherwise."""
    exported = EXPORT_NAME.match(filename)
    if exported:
        return exported.group("case")
    cut = FIELD_CELL_NAME.match(filename)
    return f"field {cut.group('field')}" if cut else cnmc_subject(filename)


def check_dataset_path(source: str | Path) -> Path:
    """``source`` if it can be a dataset (an existing folder, or an existing ``.csv``
    file); else a :class:`DatasetError`. Cheap: the CLI calls it before heavy imports."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        if not source.is_file():
            raise DatasetError(f"{source}: manifest file does not exist")
        return source
    if not source.exists():
        raise DatasetError(f"{source}: folder does not exist")
    if not source.is_dir():
        raise DatasetError(f"{source}: is not a folder (give a class-folder tree or a .csv manifest)")
    return source


def read_class_folders(root: str | Path, *, parse_subjects: bool = True) -> Manifest:
    """Read ``root/<class>/<image>``; subjects come from C-NMC names when present."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root}: is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    _refuse_detection_folder(root, class_dirs)
    if not class_dirs:
        loose = [p for p in root.iterdir() if is_image_file(p)]
        if loose:
            raise DatasetError(
                f"{root}: images lie directly in the folder; put each class in its own "
                "sub-folder (root/<class>/<image>) or give a CSV manifest"
            )
        raise DatasetError(f"{root}: folder is empty (expected one sub-folder per class)")
    samples: list[Sample] = []
    for class_dir in class_dirs:
        for path in files_below(class_dir):
            hidden = any(part.startswith(".") for part in path.relative_to(class_dir).parts)
            if is_image_file(path) and not hidden:
                subject = name_subject(path.name) if parse_subjects else None
                samples.append(Sample(path=path, label=class_dir.name, subject=subject))
    if not samples:
        raise DatasetError(f"{root}: no images (.jpg .png .bmp .tif) in any class folder")
    _check_cnmc_labels(root, samples)
    classes = [d.name for d in class_dirs if any(s.label == d.name for s in samples)]
    empty = [d.name for d in class_dirs if d.name not in classes]
    if empty:  # a class the user meant to train, silently missing from the model, would surprise later
        log.warning("%s: class folder(s) without images left out (the model will not know them): %s",
                    root, ", ".join(empty))
    return Manifest(samples, classes, root)


def _refuse_detection_folder(root: Path, class_dirs: list[Path]) -> None:
    """A Pascal VOC folder (box files under ``Annotations/``, at the top or in each split) is a detector's data: read
    as class folders, its ``Training`` / ``Testing`` / ``Validation`` (or ``JPEGImages``) became "classes" and a model
    was trained on them."""
    boxes = [folder / "Annotations" for folder in (root, *class_dirs)
             if (folder / "Annotations").is_dir() and any((folder / "Annotations").glob("*.xml"))]
    if boxes:
        raise DatasetError(
            f"{root}: a Pascal VOC detection folder ({boxes[0].relative_to(root.parent)} holds box files), not one "
            f"sub-folder of images per class: train a detector on it (`leukoscope train-detector --data {root}`), or "
            f"give a classifier class folders (root/<class>/<image>) or a CSV manifest")


def _check_cnmc_labels(root: Path, samples: list[Sample]) -> None:
    """C-NMC names carry their class (``_all`` / ``_hem``). A folder holding both is not a
    class folder: usually ``--data`` points one level too high (``training_data/`` with
    ``fold_0/{all,hem}`` below), which would silently make the folds the classes."""
    by_folder: dict[str, set[str]] = {}
    for sample in samples:
        match = CNMC_LABEL.search(sample.path.name) if CNMC_NAME.match(sample.path.name) else None
        if match:
            by_folder.setdefault(str(sample.label), set()).add(match.group("label").lower())
    mixed = sorted(folder for folder, labels in by_folder.items() if len(labels) > 1)
    if mixed:
        raise DatasetError(
            f"{root}: class folder {mixed[0]!r} holds C-NMC images named both '_all' and '_hem'; "
            f"point the data path at a folder whose sub-folders are the classes (e.g. {root / mixed[0]}), "
            "or give a CSV manifest"
        )


#: How many of a manifest's bad rows an error names.
ROWS_NAMED = 5


def read_csv_manifest(path: str | Path, *, require_labels: bool = False, check_files: bool = False) -> Manifest:
    """Read a CSV with a header ``path,label[,subject]``; relative paths are resolved against the CSV's
    folder; a row without a subject takes the one its C-NMC file name gives. Without a ``label`` column the
    samples are unlabelled, unless ``require_labels`` (training, evaluation, splits) refuses it.
    ``check_files``: rows naming files that do not exist are refused, all of them counted and a few named
    (training and ``split`` failed on the first with a bare errno, ``evaluate`` skipped them).

    A file listed twice (however its path is spelled) with another label or subject is refused: one of the
    rows is wrong, and both landed in the training part. A row repeating an earlier one exactly is read once,
    with a warning (it was counted twice, and skewed the split's strata)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest file does not exist")
    # utf-8-sig: spreadsheet "CSV UTF-8" exports start with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "path" not in fields:
            # a spreadsheet's "CSV" in a locale whose separator is ';' (or a tab) reads as one column "path;label"
            other = next((sep for sep in (";", "\t", "|") if len(fields) == 1 and sep in fields[0]), None)
            hint = f": its columns look separated by {other!r}; a manifest's are separated by commas" if other else ""
            raise DatasetError(f"{path}: CSV manifest needs a 'path' column (found {fields or 'no header'}){hint}")
        if require_labels and "label" not in fields:
            raise DatasetError(f"{path}: CSV manifest has no 'label' column, which training and evaluation "
                               f"need (columns found: {', '.join(fields)})")
        samples = []
        missing: list[str] = []
        first: dict[Path, tuple[int, Sample]] = {}  # each file's first row: (line, sample)
        repeated: list[str] = []
        contradicted: list[str] = []
        rows = 0
        for row in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
            if not any(row.values()):
                continue  # a row of empty cells, as spreadsheets leave at the end
            if not row.get("path"):
                raise DatasetError(f"{path}:{reader.line_num}: empty path")
            image_path = Path(row["path"])
            if not image_path.is_absolute():
                image_path = path.parent / image_path
            # no subject given: a C-NMC, export or --cells name still names it, as in class folders (else by image)
            subject = row.get("subject") or name_subject(image_path.name)
            sample = Sample(image_path, row.get("label") or None, subject)
            rows += 1
            earlier = first.setdefault(image_path.resolve(), (reader.line_num, sample))
            if earlier[1] is not sample:
                if (earlier[1].label, earlier[1].subject) == (sample.label, sample.subject):
                    repeated.append(f"line {reader.line_num} repeats line {earlier[0]}")
                else:
                    contradicted.append(f"{image_path} (line {earlier[0]}: {_said(earlier[1])}; "
                                        f"line {reader.line_num}: {_said(sample)})")
                continue
            samples.append(sample)
            if check_files and not image_path.is_file():
                missing.append(f"line {reader.line_num}: {image_path}")
    if not samples:
        raise DatasetError(f"{path}: manifest has no rows")
    if contradicted:
        raise DatasetError(f"{path}: {len(contradicted)} file(s) are listed more than once with different labels "
                           f"or subjects: {name_some(contradicted, ROWS_NAMED)}; keep one row per file, with its "
                           f"right label")
    if missing:
        raise DatasetError(f"{path}: {len(missing)} of its {rows} rows name files that do not exist "
                           f"({name_some(missing, ROWS_NAMED)}); correct their paths (a relative path is read "
                           f"from the manifest's folder, {path.parent.resolve()}) or remove those rows")
    if repeated:
        log.warning("%s: %d row(s) repeat an earlier row (the same file, label and subject) and are read once: %s",
                    path, len(repeated), name_some(repeated, ROWS_NAMED))
    return Manifest(samples, root=path.parent)


def _said(sample: Sample) -> str:
    """A row's label and subject, in words."""
    label = f"label {sample.label!r}" if sample.label is not None else "no label"
    return label + (f", subject {sample.subject!r}" if sample.subject is not None else "")


def read_dataset(source: str | Path, *, require_labels: bool = False, check_files: bool = False) -> Manifest:
    """Read a dataset from a class-folder tree or a ``.csv`` manifest (class folders
    always label their images; ``require_labels``, ``check_files``: see :func:`read_csv_manifest`)."""
    source = check_dataset_path(source)
    if source.suffix.lower() == ".csv":
        return read_csv_manifest(source, require_labels=require_labels, check_files=check_files)
    return read_class_folders(source)


def refuse_uncertain_class(source: str | Path, classes: Sequence[str],
                           remedy: str = "or leave them out with data.classes") -> None:
    """Refuse a class named ``uncertain``: `analyze --cells` puts there the cells a classifier could not call, to
    be sorted by eye; a model trained on it would learn "could not call" as a cell type. Training checks the
    classes it will learn, ``split`` those it splits by."""
    if UNCERTAIN in classes:
        raise DatasetError(f"{source}: a class {UNCERTAIN!r} holds cells a classifier could not call: sort them "
                           f"into their classes, set them aside, {remedy}")


def check_spellings(source: str | Path, classes: Sequence[str], remedy: str = "give them one spelling") -> None:
    """Refuse classes that differ only in case: a lab's "Neutrophil" folder merged with an export's "neutrophil"
    made two classes of one cell type, the model trained to tell them apart. Training checks the classes it will
    learn (after ``data.class_map``), ``split`` those it splits by."""
    for other, name, *_ in case_clashes(classes):
        raise DatasetError(f"{source}: labels {other!r} and {name!r} differ only in case and would be two "
                           f"classes; {remedy} (a shipped model's are lower case)")
