"""Probe (issue #11): the blast call of one classifier and the white-cell types of another that
never saw all-taleqani, composed. Does that type other labs' cells better?

Why: bench/loso.py found that a MobileNetV2 trained on pbc's cells alone types BCCD's white cells
far better (0.60 on four types) than the shipped classifier (0.16), whose all-taleqani Benign cells,
taught as ``lymphocyte``, are the class BCCD's cells fall into. Here the decider (a classifier with
a ``blast`` class, e.g. the shipped one) keeps the blast call and a typer trained on pbc's cells
alone (the decider's other classes) ranks the types:

    p(blast) = the decider's p(blast);   p(type) = (1 - p(blast)) * the typer's p(type)

Three steps (the typer is trained on pbc's rows of the decider's own split, so both are scored
on the same test cells):

    python bench/two_stage.py prepare --split SPLIT --out runs/typer
    leukoscope train --config configs/zoo_classifier.yaml data.path=runs/typer/pbc.csv \\
        data.split_file=runs/typer/split.json data.cell_window_um=24 output_root=runs/typer
    python bench/two_stage.py score --decider BUNDLE --typer runs/typer/<run>/bundle \\
        --split SPLIT --crops runs/zoo/crops [--out two-stage.json]

``score`` prints, for the decider alone and composed: accuracy on the decider's test part, by
source, and its blast recall; each control's share called blast (bench/zoo.py's control crops);
BCCD's type accuracy (and balanced over the four types it has in number); and the typer's own
out-of-distribution flag on each control (AUROC against pbc's test cells), since the typer is
the one that never saw the control's lab.

Measured (docs/benchmarks.md, "A blast decider and a pbc-only typer, composed"): BCCD's types
0.16 -> 0.21-0.29, the in-domain and Benign figures worse; not pursued.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from loso import TYPES  # noqa: E402  (bench/ scripts share helpers as modules)
from loso import scores as type_scores  # noqa: E402
from zoo import BLAST, crop_source  # noqa: E402

if TYPE_CHECKING:
    import numpy as np

    from leukoscope.data.splits import Split
    from leukoscope.inference.predictor import CellClassifier

TYPER_SOURCE = "pbc"


def typer_split(split: "Split") -> "Split":
    """``split`` restricted to pbc's cells and the classes other than blast: the typer's split."""
    from leukoscope.data.splits import Split

    groups = split.info.get("groups", {})
    kept: dict[str, list] = {}
    kept_groups: dict[str, list] = {}
    for name, samples in split.assignments.items():
        rows = [(s, g) for s, g in zip(samples, groups.get(name, [None] * len(samples)))
                if crop_source(s) == TYPER_SOURCE]
        kept[name], kept_groups[name] = [s for s, _ in rows], [g for _, g in rows]
    if not kept.get("train"):
        raise SystemExit(f"the split holds no {TYPER_SOURCE} cells to train a typer on")
    return Split(kept, [c for c in split.classes if c != BLAST], {**split.info, "groups": kept_groups})


def prepare(split_file: Path, out: Path) -> tuple[Path, Path]:
    """Write the typer's manifest (``pbc.csv``) and split (``split.json``) into ``out``."""
    from leukoscope.data.splits import Split

    split = typer_split(Split.load(split_file))
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "pbc.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject"])
        for samples in split.assignments.values():
            writer.writerows((s.path, s.label, s.subject) for s in samples)
    split.info["dataset"] = str(manifest)
    return manifest, split.save(out / "split.json")


def composed(decider: "np.ndarray", typer: "np.ndarray", decider_classes: Sequence[str],
             typer_classes: Sequence[str]) -> "np.ndarray":
    """The decider's p(blast) and (1 - p(blast)) times the typer's probabilities, in the
    decider's class order."""
    import numpy as np

    blast = list(decider_classes).index(BLAST)
    out = np.zeros_like(decider)
    out[:, blast] = decider[:, blast]
    out[:, [list(decider_classes).index(c) for c in typer_classes]] = (1 - decider[:, [blast]]) * typer
    return out


def _outputs(classifier: "CellClassifier", paths: Sequence[Path]) -> tuple["np.ndarray", "np.ndarray"]:
    """Calibrated probabilities (in the classifier's class order) and OOD scores (NaN without
    statistics) of every file."""
    import numpy as np

    predictions = classifier.predict_paths(paths)
    unreadable = [p.source for p in predictions if p.error]
    if unreadable:
        raise SystemExit(f"{len(unreadable)} crop(s) cannot be read, e.g. {unreadable[0]}")
    return (np.array([[p.probabilities[c] for c in classifier.classes] for p in predictions]),
            np.array([np.nan if p.ood_score is None else p.ood_score for p in predictions]))


def score(decider_bundle: str, typer_bundle: str, split_file: Path, crops: Path) -> dict[str, Any]:
    import numpy as np

    from leukoscope.data.splits import Split
    from leukoscope.evaluation.ood import ood_auroc
    from leukoscope.inference.predictor import CellClassifier

    decider, typer = CellClassifier.from_bundle(decider_bundle), CellClassifier.from_bundle(typer_bundle)
    if BLAST not in decider.classes or sorted(decider.classes) != sorted([*typer.classes, BLAST]):
        raise SystemExit(f"the typer's classes {typer.classes} + blast must be the decider's {decider.classes}")

    def calls(paths: Sequence[Path]) -> tuple[dict[str, list[str]], "np.ndarray"]:
        alone, _ = _outputs(decider, paths)
        types, typer_scores = _outputs(typer, paths)
        both = composed(alone, types, decider.classes, typer.classes)
        return ({"decider": [decider.classes[i] for i in alone.argmax(1)],
                 "composed": [decider.classes[i] for i in both.argmax(1)]}, typer_scores)

    test = Split.load(split_file).manifest("test")
    found, test_scores = calls([s.path for s in test])
    sources = [crop_source(s) for s in test]
    result: dict[str, Any] = {"in_domain": {}, "controls": {}}
    for rule, called in found.items():
        right = [c == s.label for c, s in zip(called, test)]
        row = {"cells": len(right), "accuracy": round(sum(right) / max(1, len(right)), 4)}
        for source in sorted(set(sources)):
            hits = [r for r, s in zip(right, sources) if s == source]
            row[source] = round(sum(hits) / len(hits), 4)
        blasts = [r for r, s in zip(right, test) if s.label == BLAST]
        row["blast_recall"] = round(sum(blasts) / max(1, len(blasts)), 4)
        result["in_domain"][rule] = row
    typer_in = test_scores[[s == TYPER_SOURCE for s in sources]]
    saved = json.loads((crops / "controls.json").read_text())["controls"]
    for name, cells in saved.items():
        paths, truth = [Path(p) for p, _ in cells], [label for _, label in cells]
        found, scores = calls(paths)
        row = {"cells": len(paths), **{f"called_blast_{rule}": round(c.count(BLAST) / max(1, len(c)), 4)
                                       for rule, c in found.items()}}
        if not np.isnan(scores).any() and len(typer_in) and len(scores):
            row["typer_ood_auroc"] = round(ood_auroc(typer_in, scores), 4)
        if all(t in typer.classes for t in truth):  # a typed control (BCCD)
            for rule, c in found.items():
                typed = type_scores(truth, c, TYPES)  # bench/loso.py's: a call outside the types is wrong
                row[f"types_{rule}"], row[f"types_balanced_{rule}"] = typed["accuracy"], typed["balanced_accuracy"]
        result["controls"][name] = row
    return result


def print_table(result: dict[str, Any]) -> None:
    print("| scored on | decider alone | composed |")
    print("|---|---|---|")
    for rule_row in ("accuracy", *sorted(k for k in result["in_domain"]["decider"] if k not in ("cells", "accuracy"))):
        alone, both = (result["in_domain"][r].get(rule_row) for r in ("decider", "composed"))
        print(f"| in-domain test: {rule_row} | {alone} | {both} |")
    for name, row in result["controls"].items():
        print(f"| {name}: called blast | {row['called_blast_decider']} | {row['called_blast_composed']} |")
        if "typer_ood_auroc" in row:
            print(f"| {name}: the typer's OOD AUROC against pbc's test cells | - | {row['typer_ood_auroc']} |")
        if "types_decider" in row:
            print(f"| {name}: types (balanced over {', '.join(TYPES)}) | {row['types_decider']} "
                  f"({row['types_balanced_decider']}) | {row['types_composed']} ({row['types_balanced_composed']}) |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    make = steps.add_parser("prepare", help="write the typer's manifest and split (pbc's rows of SPLIT)")
    make.add_argument("--split", type=Path, required=True, help="the decider's training split")
    make.add_argument("--out", type=Path, required=True)
    run = steps.add_parser("score", help="score the decider alone and composed with the typer")
    run.add_argument("--decider", required=True, help="classifier bundle with a blast class, or pretrained:NAME")
    run.add_argument("--typer", required=True, help="classifier bundle trained on `prepare`'s data")
    run.add_argument("--split", type=Path, required=True, help="the decider's training split")
    run.add_argument("--crops", type=Path, default=REPO / "runs" / "zoo" / "crops",
                     help="bench/zoo.py's crops (controls.json)")
    run.add_argument("--out", type=Path, help="also write the scores here (JSON)")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        manifest, split = prepare(args.split, args.out)
        print(f"typer data: {manifest} and {split}")
        return 0
    if not (args.crops / "controls.json").is_file():
        parser.error(f"{args.crops} has no controls.json: run `python bench/zoo.py --crops-only` first")
    import torch

    torch.set_num_threads(1)
    from leukoscope.bundle import BundleError
    from leukoscope.data.manifest import DatasetError

    try:
        result = score(args.decider, args.typer, args.split, args.crops)
    except (BundleError, DatasetError) as exc:
        parser.error(str(exc))
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
