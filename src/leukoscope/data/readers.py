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

import codecs
import csv
import io
import logging
import re
from pathlib import Path
from typing import Sequence

from leukoscope.data.manifest import DatasetError, Manifest, Sample, subject_key
from leukoscope.io import IMAGE_SUFFIX_NAMES, files_below, is_image_file, is_system_name
from leukoscope.labels import (BLAST_CLASS_NAMES, NOT_WHITE_CELL_NAMES, UNCERTAIN, case_clashes, how_they_differ, nfc,
                              shown)
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
    """Read ``root/<class>/<image>``; subjects come from C-NMC names when present. A class is its folder's name in
    composed Unicode form (:func:`~leukoscope.labels.nfc`: a folder copied from a Mac is named decomposed)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root}: is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not is_system_name(p.name))
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
    unread: list[Path] = []
    for class_dir in class_dirs:
        label = nfc(class_dir.name)
        for path in files_below(class_dir):
            if any(is_system_name(part) for part in path.relative_to(class_dir).parts):
                continue
            if is_image_file(path):
                subject = name_subject(path.name) if parse_subjects else None
                samples.append(Sample(path=path, label=label, subject=subject))
            else:
                unread.append(path)
    if not samples:
        raise DatasetError(f"{root}: no images ({' '.join(IMAGE_SUFFIX_NAMES)}) in any class folder")
    _check_cnmc_labels(root, samples)  # first: its folds are split parts too, and its message says more
    _refuse_split_folders(root, class_dirs)
    _say_unread(root, unread)
    _say_unicode_forms(root, class_dirs)
    labelled = {str(s.label) for s in samples}
    classes = sorted(labelled)  # by their composed names, as a CSV manifest's labels are
    empty = [d.name for d in class_dirs if nfc(d.name) not in labelled]
    if empty:  # a class the user meant to train, silently missing from the model, would surprise later
        log.warning("%s: class folder(s) without images left out (the model will not know them): %s",
                    root, ", ".join(empty))
    return Manifest(samples, classes, root)


#: How many of the files left unread a warning names.
UNREAD_NAMED = 5


def _say_unread(root: Path, unread: Sequence[Path]) -> None:
    """One warning for the files of class folders not read: another suffix (``.webp``, ``.gif``) or a link to a
    file that is gone (an unmounted share). They were dropped without a word, the run's count the only trace;
    `predict` named the same dangling link as unreadable."""
    if not unread:
        return
    broken = [p for p in unread if p.is_symlink() and not p.exists()]
    other = [p for p in unread if p not in broken]
    kinds = []
    if other:
        suffixes = sorted({p.suffix.lower() or "no suffix" for p in other})
        kinds.append(f"{len(other)} not named as an image ({' '.join(suffixes)}): "
                     f"{name_some([str(p.relative_to(root)) for p in other], UNREAD_NAMED)}")
    if broken:
        kinds.append(f"{len(broken)} link(s) to a file that is gone: "
                     f"{name_some([str(p.relative_to(root)) for p in broken], UNREAD_NAMED)}")
    log.warning("%s: %d file(s) in class folders are not read: %s; only %s files are read as images (convert "
                "the others, or restore the links' targets)", root, len(unread), "; ".join(kinds),
                " ".join(IMAGE_SUFFIX_NAMES))


def _say_unicode_forms(root: Path, class_dirs: Sequence[Path]) -> None:
    """Two folders whose names differ only in Unicode form (one copied from a Mac) are one class: say so."""
    by_name: dict[str, list[str]] = {}
    for folder in class_dirs:
        by_name.setdefault(nfc(folder.name), []).append(folder.name)
    for name, spellings in by_name.items():
        if len(spellings) > 1:
            log.warning("%s: folders %s have one name written in two Unicode forms (composed, and decomposed as "
                        "macOS writes names): read as one class %r", root, " and ".join(map(shown, spellings)), name)


#: Names of the parts of a dataset shipped already split (``TRAIN``, ``Validation``, ``test_set``, ``fold_0``,
#: Kaggle's ``TEST_SIMPLE``), as its top folders.
SPLIT_FOLDER = re.compile(r"(train(ing)?|val(id(ation)?)?|dev|test(ing)?([_ -]?simple)?|fold[_ -]?\d+)"
                          r"([_ -]?(set|data|images))?", re.IGNORECASE)


#: Names of blood-cell classes (singular, case-folded): which of two levels of folders holds the classes.
CELL_CLASS_WORDS = frozenset({"neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "ig", "band",
                              "segmented", "myelocyte", "metamyelocyte", "promyelocyte", "plasma cell", "hem",
                              "normal", "healthy", "benign"}) | BLAST_CLASS_NAMES | NOT_WHITE_CELL_NAMES


def _is_cell_class(name: str) -> bool:
    word = name.strip().casefold().replace("_", " ").replace("-", " ")
    return word in CELL_CLASS_WORDS or word.removesuffix("s") in CELL_CLASS_WORDS


def _refuse_split_folders(root: Path, class_dirs: list[Path]) -> None:
    """A dataset shipped split (``TRAIN/<class>/...``, ``TEST/<class>/...``): read as class folders, its parts
    became the "classes" and a model learned to tell the training folder from the test folder. Refused when two
    or more top folders holding no image of their own are named as parts; or when no top folder holds an image of
    its own, all hold the same two or more sub-folders named without digits, and those are named as blood-cell
    classes while the top folders are not (``<class>/<patient 01>/`` or ``blast/hospital_a/`` folders, a class's
    patients, slides or sites, stay a class's images)."""
    nested = {folder: _sub_folder_names(folder) for folder in class_dirs
              if not any(is_image_file(p) for p in folder.iterdir())}
    nested = {folder: names for folder, names in nested.items() if names}
    parts = [folder for folder in nested if SPLIT_FOLDER.fullmatch(folder.name)]
    alike = {frozenset(names) for names in nested.values()}
    other_meaning = ""
    if len(parts) < 2:
        if len(nested) < 2 or len(nested) < len(class_dirs) or len(alike) > 1:
            return
        shared = next(iter(alike))
        if len(shared) < 2 or any(c.isdigit() for name in shared for c in name):
            return
        if not any(map(_is_cell_class, shared)) or any(_is_cell_class(folder.name) for folder in nested):
            return
        parts = list(nested)
        other_meaning = (" If these sub-folders are not classes but each class's patients or slides, give a CSV "
                         "manifest (path,label,subject)")
    inside = sorted(set.intersection(*(nested[folder] for folder in parts))) or sorted(nested[parts[0]])
    raise DatasetError(
        f"{root}: its sub-folders {', '.join(p.name for p in parts)} look like the parts of a dataset already "
        f"split, each holding the class folders ({name_some(inside, 6)}), not like classes: point --data at one "
        f"of them (e.g. {parts[0]}), or merge them into one folder per class (the split is then made anew; to "
        f"keep theirs, write it as a split file and give --split-file).{other_meaning}")


def _sub_folder_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_dir() and not is_system_name(p.name)}


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
    with io.StringIO(_manifest_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "path" not in fields:
            # a spreadsheet's "CSV" in a locale whose separator is ';' (or a tab) reads as one column "path;label"
            other = next((sep for sep in (";", "\t", "|") if len(fields) == 1 and sep in fields[0]), None)
            hint = (f": its columns look separated by {other!r}; a manifest's are separated by commas (save it as "
                    f"{CSV_UTF8})" if other else "")
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
            sample = Sample(image_path, nfc(row["label"]) if row.get("label") else None, subject)
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
    _say_subject_spellings(path, samples)
    return Manifest(samples, root=path.parent)


#: What a spreadsheet calls a manifest saved as a manifest reader reads it.
CSV_UTF8 = "'CSV UTF-8 (Comma delimited)'"


def _manifest_text(path: Path) -> str:
    """A manifest's text: UTF-8 (with the byte-order mark of a spreadsheet's "CSV UTF-8", or none), or UTF-16
    with its mark (a spreadsheet's "Unicode Text"). Any other encoding (a Windows "CSV (Comma delimited)" is
    Windows-1252) is refused naming the file, the line and what to save it as: a bare codec message named
    neither."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise DatasetError(f"{path}: starts as UTF-16 text but is not; save it as {CSV_UTF8}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}: saved in "
                           f"another encoding, such as a spreadsheet's 'CSV (Comma delimited)'); save it as "
                           f"{CSV_UTF8}") from None


def _say_subject_spellings(path: Path, samples: Sequence[Sample]) -> None:
    """Subject ids written two ways ("P04" / "p04 ", "1" / "01" / "1.0"): the split takes them as one subject
    (:func:`~leukoscope.data.manifest.subject_key`) and a warning names them, as a patient's images in train and
    test were said to straddle no split."""
    spellings: dict[str, set[str]] = {}
    for sample in samples:
        if sample.subject is not None:
            spellings.setdefault(subject_key(sample.subject), set()).add(sample.subject)
    alike = [" / ".join(map(repr, sorted(names))) for names in spellings.values() if len(names) > 1]
    if alike:
        log.warning("%s: %d subject id(s) are written in more than one way (case, spaces, or leading zeros and "
                    "'.0' of a number) and each is taken as one subject: %s; write each subject one way",
                    path, len(alike), name_some(alike, ROWS_NAMED))


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
    """Refuse classes that differ only in case (or spaces, or Unicode form): a lab's "Neutrophil" folder merged
    with an export's "neutrophil" made two classes of one cell type, the model trained to tell them apart.
    Training checks the classes it will learn (after ``data.class_map``), ``split`` those it splits by."""
    for other, name, *_ in case_clashes(classes):
        how = how_they_differ([other, name])
        lower = " (a shipped model's are lower case)" if how.startswith("case") else ""
        raise DatasetError(f"{source}: labels {shown(other)} and {shown(name)} differ only in {how} and would be "
                           f"two classes; {remedy}{lower}")
