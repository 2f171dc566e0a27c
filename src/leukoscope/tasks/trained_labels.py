"""The labels a classifier's training run gave its data (its recorded ``data.class_map`` and ``data.classes``),
applied to other data of the same kind, so that `evaluate` and `calibrate-ood` read a lab's labels as the
bundle learned them (a bundle trained with Early/Pre/Pro mapped to Malignant knows no label of its own data)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from leukoscope.bundle import BundleInfo
from leukoscope.data.manifest import DatasetError, Manifest, Sample
from leukoscope.labels import resembled_name


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
    # a slip of a label the class map renames ("Erly" for "Early") would otherwise be left out as a class of
    # its own or refused as unknown, its images unscored either way
    for label in sorted({s.label for s in manifest if s.label is not None} - set(class_map) - set(info.classes)):
        meant = resembled_name(label, [key for key in class_map if key != label])
        if meant is not None and resembled_name(label, info.classes) is None:
            raise DatasetError(f"{data}: label {label!r} looks like a misspelling of {meant!r}, which the bundle's "
                               f"data.class_map maps to {class_map[meant]!r}; correct the label (labels are "
                               f"case-sensitive)")
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
                          and resembled_name(s.label, known) is None)
        if dropped:
            samples = [s for s in samples if s.label not in dropped]
            said.append(f"left out {sum(dropped.values())} image(s) of class(es) the bundle was trained without "
                        f"(its data.classes: {', '.join(classes)}): "
                        + ", ".join(f"{label} ({n})" for label, n in sorted(dropped.items())))
            if not samples:
                raise DatasetError(f"no image of {data} is of a class the bundle was trained on "
                                   f"(its data.classes: {', '.join(classes)})")
    return Manifest(samples, list(manifest.classes), manifest.root), said
