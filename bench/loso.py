"""Leave-one-source-out table (issue #11 benchmarks): for each labelled source, a classifier that
never saw it, tested on it, beside the same score on the sources it was trained on.

    python bench/loso.py                     # bench/zoo.py's crops (runs/zoo/crops), the shipped classifier
    python bench/loso.py --crops /work/bench-runs/zoo/crops --classifier runs/x/bundle --split split.json

Two tasks, over the labels the sources share, every cell a crop of the same physical window
(bench/zoo.py's crops: ``train.csv`` and the control crops of ``controls.json``):

- **white-cell type** (eosinophil, lymphocyte, monocyte, neutrophil: the types BCCD has more
  than two of): pbc and BCCD.
- **blast or not**: all-taleqani (blasts of malignant fields against the white cells of Benign
  fields) and cnmc-mini (``all`` against ``hem``; 26 patients, split by patient).

Rows: ``--classifier`` (trained on pbc and all-taleqani, e.g. the shipped one) with BCCD and with
cnmc-mini left out, its in-domain score on its own test part (pbc's cells of the four types; blast
against every other cell); then each model of ``--models`` trained here on one source of a task
(its own duplicate-aware 80/10/10 split: in-domain = that split's test part) and tested on the
other source, both ways.

Scores: accuracy and balanced accuracy (the mean of the classes' recalls: BCCD is 59%
neutrophils, and a constant answer must not look good); a call outside the task's classes (e.g.
``platelet`` for a BCCD cell) is wrong. For blast or not: sensitivity (blasts called blast) and
specificity (other cells not called blast) too. The classifiers trained here use the shipped recipe
(configs/zoo_classifier.yaml) with each model of ``--models``; BCCD and cnmc-mini give them a few
hundred cells at most, and the table says how many cells each model trained on (the train part of
its split).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from zoo import BLAST, crop_source, load_controls  # noqa: E402  (bench/ scripts share helpers as modules)

# The types both sources hold in number (BCCD has 2 basophils, and none of pbc's other types).
TYPES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
NOT_BLAST = "not blast"

if TYPE_CHECKING:
    from leukoscope.inference.predictor import CellClassifier


def scores(truth: Sequence[str], calls: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy and balanced accuracy over ``classes`` (those present in ``truth``); with the blast
    task's two classes, sensitivity and specificity too."""
    present = [c for c in classes if c in truth]
    recalls = {c: sum(t == c and k == c for t, k in zip(truth, calls)) / truth.count(c) for c in present}
    row: dict[str, Any] = {"cells": len(truth), "accuracy": round(sum(t == k for t, k in zip(truth, calls))
                                                                 / max(1, len(truth)), 4),
                           "balanced_accuracy": round(sum(recalls.values()) / max(1, len(recalls)), 4),
                           "recall": {c: round(r, 4) for c, r in recalls.items()}}
    if set(classes) == {BLAST, NOT_BLAST}:
        row["sensitivity"], row["specificity"] = (round(recalls[c], 4) if c in recalls else None
                                                  for c in (BLAST, NOT_BLAST))
    return row


def predict(classifier: "CellClassifier", paths: Sequence[Path]) -> list[str]:
    return [p.top_class for p in classifier.predict_paths(list(paths))]


def as_blast_task(labels: Sequence[str]) -> list[str]:
    return [BLAST if label == BLAST else NOT_BLAST for label in labels]


def train_on(rows: list[tuple[Path, str, str]], name: str, model: str, out: Path, window_um: float,
             minutes: float, extra: Sequence[str]) -> tuple[Path, list[tuple[Path, str]], int]:
    """Train the shipped recipe with ``model`` on ``rows`` (path, label, subject); the bundle, its
    test part and how many cells it trained on."""
    from leukoscope.bundle import read_bundle_info
    from leukoscope.data.splits import Split
    from leukoscope.engine.config import load_config
    from leukoscope.models import model_entry
    from leukoscope.tasks.classify import run_experiment

    out.mkdir(parents=True, exist_ok=True)
    manifest = out / f"{name}.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject"])
        writer.writerows((str(p), label, subject) for p, label, subject in rows)
    # The shipped recipe's test-time views are for networks; a classical model reads each cell once.
    views = [] if model_entry(model).kind != "classic" else ["predict.views=1"]
    config = load_config(REPO / "configs" / "zoo_classifier.yaml", overrides=[
        f"name=loso-{name}-{model}", f"output_root={out}", f"data.path={manifest}", f"model.name={model}",
        f"data.cell_window_um={window_um}", f"train.max_minutes={minutes}", "train.threads=1", *views, *extra])
    bundle = run_experiment(config, show_progress=False).bundle_dir
    split = Split.load(read_bundle_info(bundle).split_file)
    return bundle, [(s.path, s.label) for s in split.manifest("test")], len(split.manifest("train"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=Path, default=REPO / "runs" / "zoo" / "crops",
                        help="bench/zoo.py's crops folder (train.csv and controls.json)")
    parser.add_argument("--classifier", default="pretrained:wbc-classifier",
                        help="the classifier trained on pbc + all-taleqani (a bundle, or pretrained:NAME)")
    parser.add_argument("--split", type=Path, help="its training split, where the bundle's recorded one is gone")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "loso")
    parser.add_argument("--models", default="mobilenet_v2,random_forest",
                        help="what is trained here on each source and tested on the other (comma-separated): "
                             "the shipped network, and a classical model on colour and texture features, which "
                             "needs fewer cells; empty: only --classifier's rows")
    parser.add_argument("--minutes", type=float, default=15.0, help="time budget of each model trained here")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for the models trained here")
    args = parser.parse_args(list(argv) if argv is not None else None)
    listing = args.crops / "controls.json"
    if not (args.crops / "train.csv").is_file() or not listing.is_file():
        print(f"{args.crops} has no train.csv and controls.json: run `python bench/zoo.py --crops-only` first",
              file=sys.stderr)
        return 2
    from leukoscope.bundle import read_bundle_info
    from leukoscope.data.readers import read_dataset
    from leukoscope.data.splits import Split
    from leukoscope.inference.predictor import CellClassifier
    from leukoscope.pretrained import resolve_bundle

    start = time.perf_counter()
    classifier = resolve_bundle(args.classifier)
    info = read_bundle_info(classifier)
    split_file = args.split or info.split_file
    if split_file is None or not Path(split_file).is_file():
        print(f"{classifier}: its training split {split_file} is gone; give it with --split", file=sys.stderr)
        return 2
    window_um = float(json.loads(listing.read_text())["window_um"])
    controls = load_controls(listing)
    own_split = Split.load(split_file)
    own_test = own_split.manifest("test")
    training = read_dataset(str(args.crops / "train.csv"), require_labels=True)
    rows: list[dict[str, Any]] = []

    def add(task: str, left_out: str, trained_on: str, cells: int, in_domain: dict, away: dict) -> None:
        rows.append({"task": task, "left_out": left_out, "trained_on": trained_on, "training_cells": cells,
                     "in_domain": in_domain, "left_out_score": away})
        print(f"{task}, {left_out} left out: in-domain {in_domain['balanced_accuracy']}, "
             f"left out {away['balanced_accuracy']}", file=sys.stderr, flush=True)

    # The classifier trained on pbc + all-taleqani: BCCD's types and cnmc-mini's blasts are new to it.
    given = CellClassifier.from_bundle(classifier)
    own_calls = predict(given, [s.path for s in own_test])
    pbc_typed = [(c, s.label) for c, s in zip(own_calls, own_test) if crop_source(s) == "pbc" and s.label in TYPES]
    bccd = [(p, label) for p, label in controls["bccd"] if label in TYPES]
    bccd_calls = predict(given, [p for p, _ in bccd])
    trained_cells = len(own_split.manifest("train"))
    shipped = f"pbc + all-taleqani, {info.model_name}"
    add("white-cell type", "BCCD", shipped, trained_cells,
        scores([t for _, t in pbc_typed], [c for c, _ in pbc_typed], TYPES),
        scores([label for _, label in bccd], bccd_calls, TYPES))
    cnmc = controls["cnmc-all"] + controls["cnmc-hem"]
    cnmc_calls = predict(given, [p for p, _ in cnmc])
    add("blast or not", "cnmc-mini", shipped, trained_cells,
        scores(as_blast_task([s.label for s in own_test]), as_blast_task(own_calls), (BLAST, NOT_BLAST)),
        scores([label for _, label in cnmc], as_blast_task(cnmc_calls), (BLAST, NOT_BLAST)))

    # Each model of --models trained here on one source of a task and tested on the other, both ways.
    bccd_rows = [(p, label, f"bccd-{p.stem}") for p, label in bccd]
    pbc_rows = [(s.path, s.label, s.subject) for s in training if crop_source(s) == "pbc" and s.label in TYPES]
    # cnmc-mini's names are UID_<patient>_<image>_<cell>_<all|hem>: the patient is the subject.
    cnmc_rows = [(p, label, "cnmc-" + p.stem.rsplit("_", 3)[0]) for p, label in cnmc]
    # all-taleqani: the blast crops and the Benign training cells (the Benign control half stays out).
    taleqani_rows = [(s.path, BLAST if s.label == BLAST else NOT_BLAST, s.subject) for s in training
                     if crop_source(s) == "taleqani"]
    directions = [("white-cell type", TYPES, "pbc", pbc_rows, "BCCD", bccd),
                  ("white-cell type", TYPES, "BCCD", bccd_rows, "pbc", [(p, label) for p, label, _ in pbc_rows]),
                  ("blast or not", (BLAST, NOT_BLAST), "all-taleqani", taleqani_rows, "cnmc-mini", cnmc),
                  ("blast or not", (BLAST, NOT_BLAST), "cnmc-mini", cnmc_rows, "all-taleqani",
                   [(p, label) for p, label, _ in taleqani_rows]
                   + [(p, NOT_BLAST) for p, _ in controls["taleqani-benign"]])]
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        for task, classes, source, rows_in, left_out, cells_out in directions:
            name = f"{source.lower()}-{'types' if task == 'white-cell type' else 'blast'}"
            bundle, test, cells = train_on(rows_in, name, model, args.out, window_um, args.minutes, args.set)
            trained = CellClassifier.from_bundle(bundle)
            label = as_blast_task if task == "blast or not" else list
            add(task, left_out, f"{source}, {model}", cells,
                scores(label([t for _, t in test]), label(predict(trained, [p for p, _ in test])), classes),
                scores(label([t for _, t in cells_out]), label(predict(trained, [p for p, _ in cells_out])),
                       classes))

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"classifier": str(classifier), "split": str(split_file), "crops": str(args.crops), "rows": rows,
              "minutes": round((time.perf_counter() - start) / 60, 1)}
    (args.out / "loso-results.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n| task | left out | trained on (cells) | in-domain: cells, accuracy, balanced | "
          "left out: cells, accuracy, balanced | left out: sensitivity / specificity |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        own, away = row["in_domain"], row["left_out_score"]
        sens = " / ".join("-" if away.get(k) is None else f"{away[k]:.3f}" for k in ("sensitivity", "specificity"))
        sens = "-" if "sensitivity" not in away else sens
        print(f"| {row['task']} | {row['left_out']} | {row['trained_on']} ({row['training_cells']}) | "
              f"{own['cells']}, {own['accuracy']:.3f}, {own['balanced_accuracy']:.3f} | "
              f"{away['cells']}, {away['accuracy']:.3f}, {away['balanced_accuracy']:.3f} | {sens} |")
    print(f"total {result['minutes']} min; {args.out / 'loso-results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
