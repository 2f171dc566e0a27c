"""Shared driver for the classification benchmarks (taleqani.py, pbc.py).

Trains each architecture on one saved, duplicate-aware split of a real dataset,
prints one table (accuracy, macro-F1, training minutes, parameters, CPU
inference images/s) and, on the last line, the bundle of the model chosen by
validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leukoscope.engine.config import load_config
from leukoscope.engine.data_prep import prepare_data
from leukoscope.tasks.classify import preprocessing_of, run_experiment

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def parse_args(description: str, dataset: str, models: str, image_size: int, epochs: int, minutes: float,
               lr: float, augmentation: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default=str(SHARED / dataset))
    parser.add_argument("--models", default=models, help="comma-separated registry names")
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--minutes", type=float, default=minutes, help="training time budget per model")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--augmentation", default=augmentation)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "runs" / f"bench-{dataset}"))
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    return parser.parse_args()


def run(args: argparse.Namespace, name: str) -> None:
    if not Path(args.data).exists():
        sys.exit(f"{args.data} not found: this benchmark needs the real dataset")
    rows = []
    prepared = None
    for model in args.models.split(","):
        config = load_config(overrides=[
            f"name={name}-{model}",
            f"output_root={args.out}",
            f"data.path={args.data}",
            f"model.name={model}",
            f"model.image_size={args.image_size}",
            f"train.epochs={args.epochs}",
            f"train.max_minutes={args.minutes}",
            f"train.lr={args.lr}",
            f"train.batch_size={args.batch_size}",
            "train.scheduler=onecycle",
            "train.optimizer=adamw",
            "train.weight_decay=0.0001",
            f"train.augmentation={args.augmentation}",
            f"train.seed={args.seed}",
            *args.set,
        ])
        if prepared is None:
            prepared = prepare_data(config.data, preprocessing_of(config), Path(config.output_root),
                                    show_progress=False)
        result = run_experiment(config, prepared=prepared, show_progress=False)
        m = result.metrics
        best = next(h for h in result.fit.history if h["epoch"] == result.fit.best_epoch)
        rows.append({
            "model": model,
            "test_accuracy": m["accuracy"],
            "test_macro_f1": m["macro"]["f1"],
            "val_accuracy": best.get("val_accuracy"),
            "val_loss": best.get("val_loss"),
            "epochs_run": len(result.fit.history),
            "best_epoch": result.fit.best_epoch,
            "train_minutes": m["train_minutes"],
            "parameters_M": m["parameters"] / 1e6,
            "cpu_images_per_s": m["images_per_second"],
            "bundle": str(result.bundle_dir),
            "report": str(result.run_dir / "report.html"),
        })
    header = ["model", "test acc", "macro-F1", "val acc", "epochs", "train min", "params (M)", "CPU img/s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['model']} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} | {r['val_accuracy']:.4f} | "
              f"{r['epochs_run']} | {r['train_minutes']:.1f} | {r['parameters_M']:.2f} | {r['cpu_images_per_s']:.0f} |")
    split_sizes = prepared.split.sizes() if prepared else {}
    print(f"split: {prepared.split_file if prepared else '-'} {split_sizes}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}-results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    # Validation accuracy first; on a few hundred validation images several models tie
    # (often at 1.0), and the lower validation loss then separates them.
    chosen = max(rows, key=lambda r: (r["val_accuracy"] or 0, -(r["val_loss"] if r["val_loss"] is not None else 1e9)))
    print(f"chosen by validation accuracy, then validation loss: {chosen['model']}")
    print(chosen["bundle"])
