"""Benchmark: train a cell detector on CBC (Training + Validation), score it on Testing.

    python bench/detect_cbc.py                                  # default detector, full recipe
    python bench/detect_cbc.py --config configs/system_a_fasterrcnn.yaml
    python bench/detect_cbc.py --minutes 5 train.epochs=2       # a short check

Prints the metrics against the targets of issue #3 and, on its last line, the
path of the detector bundle it trained. Score the bundle again on any VOC folder
with ``leukoscope evaluate --bundle BUNDLE --data FOLDER [--split Testing]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cbc"
TARGETS = {"WBC": 0.98, "Platelets": 0.90, "RBC": 0.85}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "detector_cbc.yaml"))
    parser.add_argument("--data", default=str(DATA), help="the CBC folder")
    parser.add_argument("--minutes", type=float, default=None, help="training time budget")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="output root")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"{args.data} is absent: nothing to benchmark", file=sys.stderr)
        return 2

    from leukoscope.engine.detection_config import load_detection_config
    from leukoscope.tasks.detect import run_detection_experiment

    overrides = [f"data.path={args.data}", f"output_root={args.out}", *args.overrides]
    if args.minutes is not None:
        overrides.append(f"train.max_minutes={args.minutes}")
    config = load_detection_config(args.config, overrides)
    result = run_detection_experiment(config, show_progress=sys.stderr.isatty())
    metrics = result.metrics
    print(f"model {config.model.name}; trained {metrics['train_minutes']:.1f} min ({metrics['stopped_because']})")
    print(f"mAP@[.5:.95] {metrics['map']:.4f}   mAP@0.5 {metrics['map_50']:.4f} (target >= 0.92)")
    for name, target in TARGETS.items():
        ap = metrics["per_class"].get(name, {}).get("ap_50")
        text = "n/a" if ap is None else f"{ap:.4f}"
        print(f"AP@0.5 {name:<10} {text} (target >= {target})")
    exact = metrics.get("wbc_count_exact")
    print(f"WBC count exactly right in {exact:.1%} of test images (target >= 95%)" if exact is not None else "")
    print(f"detection time per 640x480 field: {metrics['seconds_per_image']:.3f} s (median of 5)")
    print(f"report: {result.run_dir / 'report.html'}")
    print(result.bundle_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
