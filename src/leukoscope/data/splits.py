"""Honest train / validation / test splits.

Images are first joined into *groups* that must never be separated: all images of
one subject (patient), and every set of byte-identical or near-identical images.
Whole groups are then dealt to the splits so that each split gets close to its
share of every class (stratified). Splits are saved as JSON and reused, so a test
set never changes silently; :func:`check_split` fails loudly on any leak.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from leukoscope.data.duplicates import DEFAULT_PHASH_DISTANCE, fingerprint_paths, group_fingerprints
from leukoscope.data.manifest import DatasetError, Manifest, Sample, subject_key
from leukoscope.progress import name_some

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
SPLIT_FORMAT_VERSION = 1


class LeakageError(DatasetError):
    """A subject or a duplicate group appears in more than one split."""


@dataclass
class Split:
    """Which samples go where, plus how the split was made."""

    assignments: dict[str, list[Sample]]
    classes: list[str]
    info: dict = field(default_factory=dict)

    def manifest(self, name: str) -> Manifest:
        if name not in self.assignments:
            raise DatasetError(f"the split has no part named {name!r}; it has {list(self.assignments)}")
        return Manifest(list(self.assignments[name]), list(self.classes))

    def sizes(self) -> dict[str, int]:
        return {name: len(samples) for name, samples in self.assignments.items()}

    def class_table(self) -> dict[str, dict[str, int]]:
        return {name: self.manifest(name).class_counts() for name in self.assignments}

    # -- persistence --------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format_version": SPLIT_FORMAT_VERSION,
            "classes": self.classes,
            "info": {k: v for k, v in self.info.items() if k != "groups"},
            "splits": {
                name: [
                    {"path": str(s.path.resolve()), "label": s.label, "subject": s.subject, "group": g}
                    for s, g in zip(samples, self.info.get("groups", {}).get(name, [None] * len(samples)))
                ]
                for name, samples in self.assignments.items()
            },
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(path)  # atomic: a crash never leaves half a split file
        return path

    @classmethod
    def load(cls, path: str | Path, data_root: str | Path | None = None) -> "Split":
        """The split saved at ``path``. ``data_root``: where its data are now; a split made elsewhere (a
        colleague's copy of the data, a moved folder) names its images under the data folder it was made from
        (``info["root"]``), and is read with those paths moved to ``data_root`` when they are all there (the
        original may still exist: the data given are those of ``data_root``)."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise DatasetError(f"{path}: split file does not exist") from None
        except IsADirectoryError:
            raise DatasetError(f"{path}: is a folder, not a split file") from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: split file is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise DatasetError(f"{path}: not a split file (expected a JSON object)")
        if payload.get("format_version") != SPLIT_FORMAT_VERSION:
            raise DatasetError(f"{path}: unsupported split format {payload.get('format_version')!r}")
        assignments: dict[str, list[Sample]] = {}
        groups: dict[str, list] = {}
        try:
            for name, rows in payload["splits"].items():
                assignments[name] = [Sample(Path(r["path"]), r["label"], r.get("subject")) for r in rows]
                groups[name] = [r.get("group") for r in rows]
            info = dict(payload.get("info", {}))
            classes = list(payload["classes"])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DatasetError(f"{path}: malformed split file ({type(exc).__name__}: {exc})") from None
        info["groups"] = groups
        split = cls(assignments, classes, info)
        missing = [s.path for samples in assignments.values() for s in samples if not s.path.exists()]
        elsewhere = data_root is not None and isinstance(info.get("root"), str) and \
            Path(info["root"]) != Path(data_root).resolve()
        if elsewhere:
            moved = _moved(assignments, info.get("root"), Path(data_root))
            if moved is not None:
                log.warning("%s: its images are read under %s (it was made from the data in %s)", path,
                            Path(data_root).resolve(), info["root"])
                split = cls(moved, classes,
                            {**info, "made_under": info["root"], "root": str(Path(data_root).resolve())})
                missing = []
        if missing:
            raise DatasetError(
                f"{path}: {len(missing)} image(s) named in the split are missing, e.g. {missing[0]}"
            )
        return split


def _moved(assignments: dict[str, list[Sample]], root: object, data_root: Path) -> dict[str, list[Sample]] | None:
    """``assignments`` with every path under ``root`` (where the split was made) moved under ``data_root``; None
    when the split records no root, a path lies outside it, or a moved path does not exist."""
    if not isinstance(root, str):
        return None
    old, new = Path(root), data_root.resolve()
    moved: dict[str, list[Sample]] = {}
    for name, samples in assignments.items():
        moved[name] = []
        for sample in samples:
            if not sample.path.is_relative_to(old):
                return None
            there = new / sample.path.relative_to(old)
            if not there.exists():
                return None
            moved[name].append(Sample(there, sample.label, sample.subject))
    return moved


def leakage_groups(
    manifest: Manifest,
    *,
    near_duplicates: bool = True,
    max_distance: int = DEFAULT_PHASH_DISTANCE,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Group id per sample joining same-subject images and duplicate images; a warning names byte-identical
    images labelled differently (:func:`warn_of_copies_labelled_otherwise`)."""
    n = len(manifest)
    fingerprints = fingerprint_paths([s.path for s in manifest], progress=progress)
    warn_of_copies_labelled_otherwise(manifest, [fp.sha256 for fp in fingerprints])
    dup = group_fingerprints(fingerprints, max_distance=max_distance if near_duplicates else -1)
    warn_of_copies_of_other_subjects(manifest, dup)
    rows, cols = [], []
    # Link each sample to the first sample of its duplicate group and of its subject (however its id was typed).
    for key_of in (lambda i: ("dup", int(dup[i])), lambda i: ("subj", _subject(manifest[i]))):
        first: dict = {}
        for i in range(n):
            key = key_of(i)
            if key[1] is None:
                continue
            j = first.setdefault(key, i)
            if j != i:
                rows.append(j)
                cols.append(i)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _subject(sample: Sample) -> str | None:
    """The subject ``sample`` is grouped and checked by: ``P04`` and ``p04`` are one (:func:`subject_key`)."""
    return subject_key(sample.subject) if sample.subject is not None else None


#: How many sets of copies labelled otherwise a warning names.
COPIES_NAMED = 3


def warn_of_copies_labelled_otherwise(manifest: Manifest, digests: Sequence[str]) -> None:
    """Byte-identical images (one SHA-256 ``digests`` per sample) under different labels: one of the labels is
    wrong (a basophil copied into the eosinophil folder). The split keeps them together, but said nothing of the
    contradiction; an evaluation scored both copies, one against a wrong label."""
    by_digest: dict[str, list[int]] = {}
    for index, digest in enumerate(digests):
        by_digest.setdefault(digest, []).append(index)
    clashes = [members for members in by_digest.values() if len({manifest[i].label for i in members}) > 1]
    if clashes:
        named = [" = ".join(f"{manifest[i].path} ({manifest[i].label})" for i in members) for members in clashes]
        log.warning("%d set(s) of byte-identical images carry different labels, so at least one label of each is "
                    "wrong: %s; correct the labels, or remove the copies", len(clashes),
                    name_some(named, COPIES_NAMED))


def warn_of_copies_of_other_subjects(manifest: Manifest, duplicate_groups: np.ndarray) -> None:
    """Duplicate images filed under different subjects: the split keeps them (and so the subjects) together, but
    said nothing; in C-NMC the same cell is filed under two donors (H10 and h3), which also makes any per-subject
    count wrong."""
    by_group: dict[int, list[int]] = {}
    for index, group in enumerate(duplicate_groups):
        by_group.setdefault(int(group), []).append(index)
    shared = [members for members in by_group.values()
              if len({_subject(manifest[i]) for i in members if manifest[i].subject is not None}) > 1]
    if shared:
        named = [" = ".join(f"{manifest[i].path.name} (subject {manifest[i].subject})" for i in members)
                 for members in shared]
        log.warning("%d set(s) of identical or near-identical images are filed under different subjects (kept in "
                    "one part of the split, with every image of those subjects): %s; check whether they are one "
                    "subject's images", len(shared), name_some(named, COPIES_NAMED))


def _deal_groups(
    targets: np.ndarray, groups: np.ndarray, n_classes: int, ratios: Sequence[float], seed: int
) -> np.ndarray:
    """Assign whole groups to splits, stratified greedily; returns split index per sample."""
    rng = np.random.default_rng(seed)
    unique = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in unique}
    composition = {g: np.bincount(targets[idx], minlength=n_classes) for g, idx in members.items()}
    class_totals = np.bincount(targets, minlength=n_classes).astype(float)
    wanted = np.outer(np.asarray(ratios, dtype=float), class_totals)  # (splits, classes)
    have = np.zeros_like(wanted)
    order = rng.permutation(unique)
    # Big groups first, so that small ones can fill in the gaps they leave.
    order = sorted(order, key=lambda g: -len(members[g]))
    assignment = np.empty(len(targets), dtype=np.int64)
    open_splits = np.asarray(ratios) > 0
    scale = np.maximum(class_totals, 1.0)
    for g in order:
        counts = composition[g]
        # The split where the group leaves the parts nearest their targets (squared shortfall and overshoot,
        # per class as a share of the class): a group larger than a small part's whole target goes to a part
        # it fits. (Each split's deficit relative to its own target sent big groups of few-subject data to
        # val and test: cnmc-mini came out 70/15/15 for 80/10/10.)
        error = (have - wanted) / scale
        after = (have + counts - wanted) / scale  # each split's error were the group put there
        cost = ((after ** 2).sum(axis=1) - (error ** 2).sum(axis=1))  # what putting it there adds
        # ... and to the parts' sizes (classes tied between two parts do not all go the same way)
        size, grown = have.sum(axis=1) - wanted.sum(axis=1), have.sum(axis=1) + counts.sum() - wanted.sum(axis=1)
        cost = cost + (grown ** 2 - size ** 2) / max(float(class_totals.sum()), 1.0) ** 2 * n_classes
        cost = np.where(open_splits, cost, np.inf)
        choice = int(np.argmin(cost + rng.uniform(0, 1e-9, size=len(ratios))))
        have[choice] += counts
        assignment[members[g]] = choice
    return assignment


def make_split(
    manifest: Manifest,
    *,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    near_duplicates: bool = True,
    max_distance: int = DEFAULT_PHASH_DISTANCE,
    groups: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Split:
    """Make a stratified, subject-grouped, duplicate-aware split.

    ``ratios`` has two (train, test) or three (train, val, test) entries summing to 1.
    """
    manifest.require_trainable()
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) not in (2, 3) or not all(r >= 0 for r in ratios) or not abs(sum(ratios) - 1.0) <= 1e-6:
        raise DatasetError(f"split ratios must be 2 or 3 non-negative numbers summing to 1, got {ratios}")
    if ratios[0] == 0:  # refused before the images are hashed: training and `split` alike
        raise DatasetError(empty_training_part(list(ratios)))
    names = SPLIT_NAMES if len(ratios) == 3 else ("train", "test")
    targets = np.asarray(manifest.targets)
    if groups is None:
        groups = leakage_groups(manifest, near_duplicates=near_duplicates, max_distance=max_distance, progress=progress)
    assignment = _deal_groups(targets, groups, len(manifest.classes), ratios, seed)
    split = Split(
        {name: [manifest[i] for i in np.flatnonzero(assignment == k)] for k, name in enumerate(names)},
        list(manifest.classes),
        {
            "ratios": list(ratios),
            "seed": seed,
            # where its paths lie: a copy of the data elsewhere reads the split there (Split.load's data_root)
            "root": str(Path(manifest.root).resolve()) if manifest.root is not None else None,
            "grouped_by_subject": manifest.has_subjects,
            "near_duplicates": near_duplicates,
            "phash_max_distance": max_distance if near_duplicates else None,
            "n_groups": int(len(np.unique(groups))),
            "n_samples_in_shared_groups": int(sum(c for c in np.bincount(groups) if c > 1)),
            "groups": {name: [int(groups[i]) for i in np.flatnonzero(assignment == k)] for k, name in enumerate(names)},
        },
    )
    check_split(split)
    in_groups = class_groups(split)
    for name in names:
        empty = [c for c, n in split.manifest(name).class_counts().items() if n == 0]
        if empty and ratios[names.index(name)] > 0:  # how many groups there were to deal: why none came its way
            log.warning("split %r has no images of class(es) %s (too few groups to stratify: %s; a group (%s) "
                        "stays in one part)", name, empty,
                        ", ".join(f"{c}'s images are in {in_groups[c]} group(s)" for c in empty), GROUP_MEANING)
    return split


#: What a split group is, as messages say it.
GROUP_MEANING = "a subject or case, or an image of none, with the images duplicating it"


def _group_keys(split: Split) -> list[tuple[Sample, tuple[str, object]]]:
    """Each sample of ``split`` with the group it was dealt in: its recorded group, else its subject, else its file
    (a hand-made split file may record no groups)."""
    groups = split.info.get("groups", {})
    keyed = []
    for name, samples in split.assignments.items():
        group_ids = list(groups.get(name, []))
        group_ids += [None] * (len(samples) - len(group_ids))
        for sample, group in zip(samples, group_ids):
            keyed.append((sample, ("group", group) if group is not None else ("subject", _subject(sample))
                          if sample.subject is not None else ("file", str(sample.path))))
    return keyed


def count_groups(split: Split) -> int:
    """How many groups (subjects or cases, with the images duplicating them) ``split`` was dealt in."""
    return len({key for _, key in _group_keys(split)})


def class_groups(split: Split) -> dict[str, int]:
    """For each class of ``split``, how many groups (:func:`count_groups`) hold its images, over all parts."""
    found: dict[str, set] = {name: set() for name in split.classes}
    for sample, key in _group_keys(split):
        found.setdefault(str(sample.label), set()).add(key)
    return {name: len(keys) for name, keys in found.items()}


#: Fewer training images of a class than this are warned of: the fine-tuning measurement of docs/benchmarks.md
#: ("Fine-tuning on another lab's cells") needed about 10 cells a class to beat the shipped classifier.
FEW_IMAGES = 10


def few_images_note(split: Split, decoded: dict[str, dict[str, int]] | None = None) -> str | None:
    """One line naming the classes with fewer than :data:`FEW_IMAGES` training images, and for every class its
    training images, all images and groups (None: every class has enough). ``decoded``: each part's images per
    class that could be decoded, which the counts are then of (an undecodable file is no image to learn from)."""
    if decoded is not None:
        train = decoded.get("train", {})
        total = {name: sum(counts.get(name, 0) for counts in decoded.values()) for name in split.classes}
    else:
        train = split.manifest("train").class_counts() if "train" in split.assignments else {}
        total = Manifest([s for samples in split.assignments.values() for s in samples],
                         list(split.classes)).class_counts()
    few = [name for name in split.classes if train.get(name, 0) < FEW_IMAGES]
    if not few:
        return None
    groups = class_groups(split)
    table = ", ".join(f"{name} {train.get(name, 0)}/{total.get(name, 0)}/{groups.get(name, 0)}"
                      for name in split.classes)
    return (f"few images of {', '.join(few)}: under {FEW_IMAGES} each to train on (a class is hardly learned from "
            f"so few, and its scores say little; fine-tuning the shipped classifier, measured in docs/benchmarks.md, "
            f"needed about 10-20 a class); per class, training images / all images / split groups ({GROUP_MEANING}): "
            f"{table}")


def empty_training_part(ratios: object = None) -> str:
    """Why a split with no training images is refused (by training, and by `leukoscope split`)."""
    why = f": its ratios {ratios} give it none" if isinstance(ratios, list) and ratios and not ratios[0] else ""
    return (f"the training split is empty{why}; a model needs training images: give the training part a share "
            f"(e.g. ratios 0.8,0.1,0.1)")


def check_training_part(split: Split, source: str | Path) -> None:
    """Refuse a split that no model can be trained on: no training images, or a class with none (the model could
    not learn it, yet its bundle would list it). A hand-made or edited split file, or one dealt from too few
    images of a class; training and `leukoscope split` refuse alike."""
    counts = split.manifest("train").class_counts() if "train" in split.assignments else {}
    if not any(counts.values()):
        raise DatasetError(f"{source}: {empty_training_part(split.info.get('ratios'))}")
    missing = [name for name in split.classes if not counts.get(name)]
    if missing:
        raise DatasetError(f"{source}: class(es) {', '.join(map(repr, missing))} have no training images (none in "
                           f"the split's 'train' part): a model could not learn them, yet its bundle would list "
                           f"them; move some of their images into 'train', add images of them and make a new "
                           f"split, or leave them out (data.classes)")


def parts_not_asked_for(ratios: object) -> list[str]:
    """The parts (``val``, ``test``) that ``ratios`` give no share: a split without them as asked, not for want
    of images. Two ratios are train and test (no ``val``); ratios not recorded (a hand-made split) ask for all."""
    if not isinstance(ratios, (list, tuple)) or len(ratios) not in (2, 3):
        return []
    share = dict(zip(SPLIT_NAMES if len(ratios) == 3 else ("train", "test"), ratios))
    return [name for name in ("val", "test") if not share.get(name)]


def check_split(split: Split, groups: Mapping[str, Sequence] | None = None) -> None:
    """Raise :class:`LeakageError` if a file, subject (``P04`` and ``p04`` are one: :func:`subject_key`) or
    duplicate group is in two splits."""
    groups = groups if groups is not None else split.info.get("groups", {})
    seen: dict[tuple[str, object], tuple[str, object]] = {}  # key: (part, as written)
    problems: dict[tuple, str] = {}  # one per thing and pair of parts
    for name, samples in split.assignments.items():
        group_ids = list(groups.get(name, []))
        group_ids += [None] * (len(samples) - len(group_ids))  # never let zip() skip a sample
        for sample, group in zip(samples, group_ids):
            keys: list[tuple[str, object, object]] = [("file", str(sample.path.resolve()), sample.path.resolve())]
            if sample.subject is not None:
                keys.append(("subject", _subject(sample), sample.subject))
            if group is not None:
                keys.append(("duplicate group", group, group))
            for kind, key, written in keys:
                other, first = seen.setdefault((kind, key), (name, written))
                if other != name:
                    same = first if first == written else f"{first} (= {written})"
                    problems.setdefault((kind, key, other, name), f"{kind} {same} is in both {other!r} and {name!r}")
    if problems:
        shown = "; ".join(sorted(problems.values())[:5])
        raise LeakageError(f"split leaks between train/val/test ({len(problems)} problem(s)): {shown}")


def configured_split(split: Split, class_map: Mapping[str, str] | None, classes: Sequence[str] | None) -> Split:
    """``split`` as a run's ``data.class_map`` and ``data.classes`` see the data: its labels renamed by the map, its
    images of classes left out dropped (a ``leukoscope split`` of the data as they are, used by a run that merges or
    chooses classes). The parts stay those the split dealt: stratified by the finer classes, they are stratified
    by the merged ones too."""
    def label(name: str | None) -> str | None:
        return class_map.get(name, name) if class_map and name is not None else name

    assignments = {part: [Sample(s.path, label(s.label), s.subject) for s in samples]
                   for part, samples in split.assignments.items()}
    if classes:
        assignments = {part: [s for s in samples if s.label in classes] for part, samples in assignments.items()}
    names = list(classes) if classes else sorted({s.label for part in assignments.values() for s in part
                                                   if s.label is not None})
    return Split(assignments, names, dict(split.info))


def split_matching(split: Split, manifest: Manifest) -> None:
    """Check that a saved split still describes ``manifest``: the same files, labels and subjects. A split
    holding images the data no longer has would train and test on them (training reads the split's list); one
    made before the data had subjects would keep a patient's images on both sides."""
    in_split = {s.path.resolve(): (s.label, s.subject) for samples in split.assignments.values() for s in samples}
    in_data = {s.path.resolve(): (s.label, s.subject) for s in manifest}
    new = set(in_data) - set(in_split)
    gone = set(in_split) - set(in_data)
    both = set(in_data) & set(in_split)
    relabelled = [p for p in both if in_data[p][0] != in_split[p][0]]
    resubjected = [p for p in both if in_data[p][1] != in_split[p][1]]
    if new or gone or relabelled or resubjected:
        found = [f"{len(paths)} {what}" for paths, what in ((new, "new image(s)"), (gone, "image(s) no longer in it"),
                                                            (relabelled, "relabelled"),
                                                            (resubjected, "with another subject (a subject "
                                                             "column, or names read as subjects since)"))
                 if paths]
        raise DatasetError(
            f"the saved split no longer matches the dataset: {', '.join(found)}; make a new split or restore the data"
        )
