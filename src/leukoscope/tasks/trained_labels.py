"""The labels a classifier's training run gave its data (its recorded ``data.class_map`` and ``data.classes``),
applied to other data of the same kind, so that `evaluate` and `calibrate-ood` read a lab's labels as the
bundle learned them (a bundle trained with Early/Pre/Pro mapped to Malignant knows no label of its own data)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from leukoscope.bundle import BundleInfo
from leukoscope.data.manifest import DatasetError, Manifest, Sample


def trained_labels(info: BundleInfo) -> tuple[dict[str, str], list[str] | None]:
    """The ``data.class_map`` and ``data.classes`` the bundle's run was trained with (its provenance config);
    empty / None when it records none (or a hand-edited record is not a mapping / a list of names)."""
    config = info.provenance.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        return {}, None
    class_map, classes = data.get("class_map"), data.get("classes")
    class_map = ({str(k): str(v) for k, v in class_map.items()} if isinstance(class_map, dict) else {})
    classes = [str(c) for c in classes] if isinstance(classes, list) and classes else None
    return class_map, classes


def labels_as_trained(manifest: Manifest, info: BundleInfo, data: str | Path) -> tuple[Manifest, list[str]]:
    """``manifest`` labelled as the bundle's training run labelled its data: its recorded ``data.class_map``
    applied and the images of classes its ``data.classes`` left out left out; and what was done, in words.
    A label neither maps to nor is among the model's classes stays, for :meth:`Manifest.with_classes` to refuse."""
    class_map, classes = trained_labels(info)
    said: list[str] = []
    renamed = Counter((s.label, class_map[s.label]) for s in manifest if s.label in class_map
                      and class_map[s.label] != s.label)
    samples = [Sample(s.path, class_map.get(s.label, s.label) if s.label is not None else None, s.subject)
               for s in manifest]
    if renamed:
        said.append("labels mapped by the bundle's data.class_map: "
                    + ", ".join(f"{old} -> {new} ({n})" for (old, new), n in sorted(renamed.items())))
    if classes is not None:
        # the classes training left out (not a label the model could know under another name)
        # (a near spelling of a class, "blsat" or "Blast ", is a typo to refuse, not a class left out)
        known = [*classes, *info.classes]
        dropped = Counter(s.label for s in samples if s.label is not None and s.label not in known
                          and not _near_spelling(s.label, known))
        if dropped:
            samples = [s for s in samples if s.label not in dropped]
            said.append(f"left out {sum(dropped.values())} image(s) of class(es) the bundle was trained without "
                        f"(its data.classes: {', '.join(classes)}): "
                        + ", ".join(f"{label} ({n})" for label, n in sorted(dropped.items())))
            if not samples:
                raise DatasetError(f"no image of {data} is of a class the bundle was trained on "
                                   f"(its data.classes: {', '.join(classes)})")
    return Manifest(samples, list(manifest.classes), manifest.root), said


def _near_spelling(label: str, names: list[str]) -> bool:
    """Whether ``label`` is another spelling of one of ``names``: the same but for case and spaces, or a slip of
    one letter (two in names of eight letters or more: ``blsat``, ``neutrophl``). Real names that contain a class's
    (``band neutrophil``, ``promonocyte``) are not slips: they are classes of their own."""
    written = " ".join(label.split()).casefold()
    for name in names:
        known = " ".join(name.split()).casefold()
        if written == known or _edits(written, known) <= (2 if len(known) >= 8 else 1):
            return True
    return False


def _edits(a: str, b: str) -> int:
    """Letters to insert, delete, change or swap with a neighbour to turn ``a`` into ``b`` (optimal string
    alignment distance)."""
    if abs(len(a) - len(b)) > 2:
        return 3  # more than any slip allowed
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]
