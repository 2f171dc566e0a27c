"""Fine-tuning on another lab's cells (issue #11 item 8): how many of a lab's own labelled cells
close the gap between a shipped classifier and that lab's images?

    python bench/finetune_gap.py       # pretrained:wbc-classifier on runs/zoo/crops/controls/bccd (bench/zoo.py's)
    python bench/finetune_gap.py --bundle runs/x/bundle --crops lab-cells/ --shots 0,5,10,20 --seeds 0,1,2

``--crops`` is a class-per-folder tree of the target lab's cell crops (cut as the bundle's
training crops were, e.g. at its physical window). For each seed, every class gives a pool of
``max(--shots)`` images (whole duplicate groups: exact and near-identical images never straddle
pool and test) and all its other images form the fixed test set, so that every k is scored on the
same images. Classes with fewer than ``max(--shots) + --min-test`` images are left out and listed.

- k = 0: the bundle as it is, on the test set; twice: its prediction restricted to the
  experiment's classes (arg-max over those classes' probabilities) and its unrestricted top class
  (a call of a class outside the experiment counts as wrong).
- k > 0: ``leukoscope train --init BUNDLE`` (``run_experiment`` with ``model.init``) on the first k
  images of each class's pool, all of them for training (no validation part: the epoch is chosen
  by training accuracy, ties by training loss), through a split file whose test part is the fixed
  test set; scored by the run's own evaluation. The data has other classes than the bundle, so its
  backbone is loaded and its class layer is new but for the rows of the classes it shares with the
  bundle, which keep the bundle's (when the classes are the bundle's, in its order, the head is kept).

Prints a markdown table (median and min-max over the seeds) and, on the last line, the JSON with
everything (per seed and k: the images, the runs, the metrics).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leukoscope.bundle import load_bundle, read_bundle_info
from leukoscope.data.manifest import DatasetError, Manifest
from leukoscope.data.readers import read_dataset
from leukoscope.data.splits import Split, check_split, leakage_groups
from leukoscope.engine.config import load_config
from leukoscope.engine.finetune import class_difference
from leukoscope.engine.runtime import resolve_device
from leukoscope.evaluation import evaluate_logits
from leukoscope.preprocessing import batched_logits
from leukoscope.pretrained import resolve_bundle
from leukoscope.tasks.classify import run_experiment, training_overlap

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="pretrained:wbc-classifier",
                        help="a classifier bundle folder or pretrained:NAME")
    parser.add_argument("--crops", default=str(REPO / "runs" / "zoo" / "crops" / "controls" / "bccd"),
                        help="class-per-folder cell crops of the target lab (default: bench/zoo.py's BCCD controls)")
    parser.add_argument("--shots", default="0,5,10,20", help="images per class used for fine-tuning")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", default="0,1,2", help="repeat the sampling (and the training) with these seeds")
    parser.add_argument("--min-test", type=int, default=3, help="test images a class needs besides its pool")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="small, so that a few shots still make several steps an epoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-finetune-gap"))
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value for the fine-tuning")
    args = parser.parse_args()
    try:
        args.shot_list = sorted({int(v) for v in args.shots.split(",") if v.strip()})
        args.seed_list = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        parser.error("--shots and --seeds take comma-separated integers, e.g. --shots 0,5,10 --seeds 0,1")
    if not args.shot_list or min(args.shot_list) < 0 or not args.seed_list:
        parser.error("--shots needs non-negative integers and --seeds at least one seed")
    if args.min_test < 1:
        parser.error("--min-test must be at least 1")
    return args


# --------------------------------------------------------------------------- sampling
def sample_pools(labels: np.ndarray, groups: np.ndarray, n_classes: int, size: int,
                 rng: np.random.Generator) -> tuple[dict[int, list[int]], list[int]]:
    """Each class's pool (image indices in the order drawn, at least ``size`` when the class has
    them), made of whole leakage groups in random order, and the test set: every image outside them."""
    order = rng.permutation(np.unique(groups))
    members = {int(g): rng.permutation(np.flatnonzero(groups == g)) for g in order}
    pooled: set[int] = set()
    pools: dict[int, list[int]] = {c: [] for c in range(n_classes)}
    for c in range(n_classes):
        for g in order:
            if len(pools[c]) >= size:
                break
            g = int(g)
            if g in pooled or not (labels[members[g]] == c).any():
                continue
            pooled.add(g)
            for i in members[g]:
                pools[int(labels[i])].append(int(i))
    test = [i for i in range(len(labels)) if int(groups[i]) not in pooled]
    return pools, test


# --------------------------------------------------------------------------- k = 0
def score_bundle(model: Any, info: Any, device: torch.device, test: Manifest, classes: list[str], out: Path,
                 spec: str) -> dict[str, dict[str, Any]]:
    """The bundle as it is on ``test``: restricted to ``classes`` and with its unrestricted top class."""
    pixels, kept, report = info.preprocessing.decode(test)
    logits = batched_logits(model, pixels, info.preprocessing, device) / info.temperature
    labels = [s.label for s in kept]
    columns = [info.classes.index(c) for c in classes]
    note = f"Bundle {spec} as it is (no fine-tuning) on the fixed test set."
    restricted = evaluate_logits(
        np.asarray([classes.index(label) for label in labels]), logits[:, columns], classes, out / "k0-restricted",
        title=f"{info.model_name}: arg-max over {len(classes)} classes", notes=[
            note, f"Prediction restricted to the experiment's classes {classes} (arg-max over their columns)."],
        extra={"skipped_images": report.skipped})
    calls = [info.classes[i] for i in logits.argmax(1)]
    anywhere = evaluate_logits(
        np.asarray([info.classes.index(label) for label in labels]), logits, list(info.classes), out / "k0-any",
        title=f"{info.model_name}: top class of its {len(info.classes)}", notes=[
            note, "Unrestricted top class: a call of a class outside the experiment counts as wrong."],
        extra={"skipped_images": report.skipped, "calls": dict(Counter(calls).most_common()),
               "called_outside": sum(c not in classes for c in calls) / max(1, len(calls))})
    return {"restricted": restricted, "any": anywhere}


# --------------------------------------------------------------------------- k > 0
def finetune(args: argparse.Namespace, spec: str, train: list, test: list, groups: dict[str, list[int]],
             classes: list[str], folder: Path, seed: int, shots: int) -> dict[str, Any]:
    """``train --init`` on ``train`` (all of it), scored by the run on the fixed ``test``."""
    folder.mkdir(parents=True, exist_ok=True)
    cells = Manifest(train + test, classes).save_csv(folder / "cells.csv")
    split = Split({"train": train, "test": test}, classes,
                  {"made_by": "bench/finetune_gap.py", "seed": seed, "shots_per_class": shots, "groups": groups})
    check_split(split)
    split_file = split.save(folder / "split.json")
    config = load_config(overrides=[
        f"name=finetune-{shots}shot-seed{seed}", f"output_root={folder}", f"data.path={cells}",
        f"data.split_file={split_file}", f"data.classes={json.dumps(classes)}", f"model.init={spec}",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.seed={seed}",
        f"train.threads={args.threads}", *args.set,
    ])
    start = time.perf_counter()
    result = run_experiment(config, show_progress=False)
    metrics = result.metrics
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro"]["f1"],
            "balanced_accuracy": metrics["macro"]["recall"],
            "train_minutes": metrics["train_minutes"], "wall_s": round(time.perf_counter() - start, 1),
            "evaluated_on": metrics["evaluated_on"], "n_test": metrics["n"], "best_epoch": result.fit.best_epoch,
            "epochs_run": len(result.fit.history), "run_dir": str(result.run_dir),
            "bundle": str(result.bundle_dir), "metrics": str(result.run_dir / "metrics.json")}


# --------------------------------------------------------------------------- report
def spread(values: list[float], digits: int = 3) -> str:
    """``median (min-max)``; the median alone for one value."""
    if not values:
        return "-"
    median = f"{statistics.median(values):.{digits}f}"
    return median if len(values) == 1 else f"{median} ({min(values):.{digits}f}-{max(values):.{digits}f})"


#: The scores of the table, in its order; balanced accuracy = macro-averaged recall.
SCORES = ("accuracy", "macro_f1", "balanced_accuracy")


def majority_baseline(counts: dict[str, int]) -> dict[str, float]:
    """Scores of always calling the test set's most frequent class (its F1 2p/(1+p), the others' 0)."""
    share = max(counts.values()) / sum(counts.values())
    return {"accuracy": share, "macro_f1": 2 * share / (1 + share) / len(counts),
            "balanced_accuracy": 1 / len(counts)}


def summary_rows(runs: list[dict[str, Any]], n_classes: int, n_bundle: int) -> list[dict[str, Any]]:
    labels = {"restricted": f"0 (bundle as it is, arg-max over the {n_classes} classes)",
              "any": f"0 (bundle as it is, its top class of {n_bundle})"}
    keys = list(dict.fromkeys((r["shots"], r["mode"]) for r in runs))
    rows = []
    for shots, mode in keys:
        same = [r for r in runs if (r["shots"], r["mode"]) == (shots, mode)]
        minutes = [r["train_minutes"] for r in same if r.get("train_minutes") is not None]
        rows.append({
            "shots": shots, "mode": mode, "label": labels.get(mode, str(shots)), "seeds": [r["seed"] for r in same],
            **{key: {"median": statistics.median(r[key] for r in same), "min": min(r[key] for r in same),
                     "max": max(r[key] for r in same)} for key in SCORES},
            "train_minutes": ({"median": statistics.median(minutes), "min": min(minutes), "max": max(minutes)}
                              if minutes else None),
            "table": [labels.get(mode, str(shots)), *(spread([r[key] for r in same]) for key in SCORES),
                      spread(minutes, 2)],
        })
    return rows


def main() -> None:
    args = parse_args()
    crops = Path(args.crops)
    if not crops.is_dir():
        sys.exit(f"{crops} not found: give a class-per-folder tree of the lab's cell crops with --crops "
                 f"(bench/zoo.py writes BCCD's to runs/zoo/crops/controls/bccd)")
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        bundle_dir = resolve_bundle(args.bundle)
        info = read_bundle_info(bundle_dir, task="classify")
        manifest = read_dataset(crops, require_labels=True)
    except (DatasetError, ValueError, OSError) as exc:  # BundleError / PretrainedError are ValueErrors
        sys.exit(f"error: {exc}")
    largest = max(args.shot_list)
    needed = largest + args.min_test
    counts = manifest.class_counts()
    classes = [c for c in manifest.classes if counts[c] >= needed]
    left_out = {c: n for c, n in counts.items() if n < needed}
    print(f"crops: {crops} {counts}")
    if left_out:
        print(f"left out (fewer than {needed} images: {largest} shots + {args.min_test} test): "
              + ", ".join(f"{c} ({n})" for c, n in left_out.items()))
    if len(classes) < 2:
        sys.exit(f"error: {len(classes)} class(es) of {crops} have {needed} images or more; the experiment needs 2 "
                 f"(lower --shots or --min-test)")
    data = Manifest([s for s in manifest if s.label in classes], classes, manifest.root)
    unknown = [c for c in classes if c not in info.classes]
    difference = class_difference(info.classes, classes)
    head = ("kept (the data has the bundle's classes, in its order)" if difference is None else
            f"replaced: the bundle's backbone is loaded, and its class layer keeps the bundle's rows of the "
            f"shared classes only ({difference})")
    print(f"bundle: {args.bundle} ({info.model_name}, {len(info.classes)} classes); fine-tuning on {classes}: "
          f"head {head}")
    if unknown and 0 in args.shot_list:
        print(f"k = 0 not scored: the bundle has no class {unknown} (name the folders as its classes {info.classes})")
    overlap, _ = training_overlap(info, data)
    if overlap:
        print(f"warning: the bundle trained on or chose its epoch with some of these images: {overlap}")
    groups = leakage_groups(data)
    labels = np.asarray(data.targets)
    device = resolve_device("auto")
    model = load_bundle(bundle_dir, device, task="classify")[0] if 0 in args.shot_list and not unknown else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds, runs = [], []
    for seed in args.seed_list:
        pools, test_index = sample_pools(labels, groups, len(classes), largest, np.random.default_rng(seed))
        test = [data[i] for i in test_index]
        test_counts = Manifest(test, classes).class_counts()
        short = {c: n for c, n in test_counts.items() if n < args.min_test}
        if short:
            sys.exit(f"error: seed {seed}: after the pools, too few test images in {short} (groups of duplicate "
                     f"images are kept whole); lower --shots")
        folder = out / f"seed-{seed}"
        seeds.append({"seed": seed, "test_counts": test_counts, "test": [str(s.path) for s in test],
                      "pools": {classes[c]: [str(data[i].path) for i in pool] for c, pool in pools.items()}})
        print(f"seed {seed}: test images {test_counts}")
        for shots in args.shot_list:
            if shots == 0:
                if model is None:
                    continue
                scored = score_bundle(model, info, device, Manifest(test, classes), classes, folder, args.bundle)
                for mode, metrics in scored.items():
                    runs.append({"seed": seed, "shots": 0, "mode": mode, "accuracy": metrics["accuracy"],
                                 "macro_f1": metrics["macro"]["f1"], "balanced_accuracy": metrics["macro"]["recall"],
                                 "train_minutes": None, "n_test": metrics["n"],
                                 "called_outside": metrics.get("called_outside"),
                                 "metrics": str(folder / f"k0-{mode}" / "metrics.json")})
                continue
            train_index = [i for c in range(len(classes)) for i in pools[c][:shots]]
            split_groups = {"train": [int(groups[i]) for i in train_index],
                            "test": [int(groups[i]) for i in test_index]}
            row = finetune(args, args.bundle, [data[i] for i in train_index], test, split_groups, classes,
                           folder / f"k{shots}", seed, shots)
            runs.append({"seed": seed, "shots": shots, "mode": "finetuned", **row})
    rows = summary_rows(runs, len(classes), len(info.classes))
    baseline = majority_baseline(seeds[0]["test_counts"])
    shown = ", ".join(f"{key.replace('_', ' ')} {baseline[key]:.3f}" for key in SCORES)
    print(f"always the most frequent class (seed {args.seed_list[0]}'s test set): {shown}")
    header = ["shots per class", "accuracy", "macro-F1", "balanced accuracy", "fine-tune min"]
    print(f"test images per class (seed {args.seed_list[0]}): {seeds[0]['test_counts']}; "
          f"median (min-max) over seeds {args.seed_list}; fine-tuning: epochs {args.epochs}, batch {args.batch_size}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row["table"]) + " |")
    results = out / "finetune_gap.json"
    results.write_text(json.dumps({
        "args": vars(args),
        "bundle": {"spec": args.bundle, "path": str(bundle_dir), "model": info.model_name, "classes": info.classes,
                   "image_size": info.preprocessing.image_size},
        "crops": str(crops.resolve()), "class_counts": counts, "classes": classes, "left_out": left_out,
        "images_needed_per_class": needed, "head": head, "k0_not_scored_classes": unknown,
        "majority_baseline": baseline, "seeds": seeds, "runs": runs,
        "summary": [{k: v for k, v in r.items() if k != "table"} for r in rows],
        "minutes": round((time.perf_counter() - started) / 60, 2),
    }, indent=1))
    print(results)


if __name__ == "__main__":
    main()
