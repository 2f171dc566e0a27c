"""Classical baselines and CNNs on one split: the comparison table of systems C and E.

    python bench/compare.py                                           # taleqani, 4 classes, classical rows
    python bench/compare.py --config configs/compare_taleqani_binary.yaml
    python bench/compare.py --config configs/compare_pbc.yaml
    python bench/compare.py --models svm_rbf,jabeena_cnn --cnn-epochs 3 --image-size 96
    python bench/compare.py --models all                              # every row of the config (CNNs: long)

Runs ``leukoscope compare`` (:func:`leukoscope.tasks.compare.run_compare`),
prints the table as Markdown (the form pasted into docs/benchmarks.md) and,
on the last line, the bundle of the row chosen by validation accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leukoscope.models.classic import CLASSIC_MODELS
from leukoscope.tasks.compare import markdown_table, run_compare
from leukoscope.engine.config import load_config

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "compare_taleqani.yaml"))
    parser.add_argument("--data", default=None, help="dataset folder instead of the config's data.path")
    parser.add_argument("--models", default=",".join(CLASSIC_MODELS),
                        help="comma-separated rows (config labels or model names), or 'all' for the config's rows")
    parser.add_argument("--image-size", type=int, default=None, help="model.image_size for every row")
    parser.add_argument("--cnn-epochs", type=int, default=None, help="train.epochs for every CNN row")
    parser.add_argument("--minutes", type=float, default=None, help="train.max_minutes per CNN row")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-compare"))
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    args = parser.parse_args()

    overrides = [f"output_root={args.out}", *args.set]
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.image_size:
        overrides.append(f"model.image_size={args.image_size}")
    if args.cnn_epochs:
        overrides.append(f"train.epochs={args.cnn_epochs}")
    if args.minutes:
        overrides.append(f"train.max_minutes={args.minutes}")
    config = load_config(args.config, overrides)
    if not config.data.path or not Path(config.data.path).exists():
        sys.exit(f"{config.data.path} not found: this benchmark needs the real dataset")
    models = None if args.models == "all" else args.models.split(",")
    result = run_compare(config, models=models, show_progress=False)
    print(markdown_table(result.rows))
    if result.best is None:  # no validation part: nothing chosen
        print(f"\n{result.chosen_by}")
    else:
        print(f"\nchosen by {result.chosen_by}: {result.rows[result.best_index].label}")
    print(f"outputs: {result.compare_dir}")
    print(result.compare_dir if result.best is None else result.best.bundle_dir)


if __name__ == "__main__":
    main()
