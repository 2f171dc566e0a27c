"""Does a change of the code change what training produces? The same seeded run, two source trees.

    git worktree add /tmp/old 7a5cd71
    python bench/parity.py --against /tmp/old/src          # two CNNs and a classical model
    python bench/parity.py --against /tmp/old/src --models resnet18 --epochs 2 --image-size 64

Each run (synthetic 4-class cells generated once, one thread, fixed seed) runs in
a child process with the given tree's ``src`` first on ``PYTHONPATH``, and with
this checkout's. The per-epoch history (losses, accuracies, learning rates; not
the times) and the test accuracy, macro-F1 and ECE are compared exactly. Prints
one line per model and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Runs in the child process; imports what either layout of the package provides.
RUNNER = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from leukoscope.data.synthetic import SyntheticSpec, make_synthetic_dataset
from leukoscope.engine.config import load_config
try:
    from leukoscope.tasks.classify import run_experiment
except ImportError:  # the layout before the tasks package
    from leukoscope.engine.experiment import run_experiment
out, model, size, epochs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
data = out.parent / "data"
if not data.exists():
    make_synthetic_dataset(data, SyntheticSpec(image_size=64, images_per_class=30, seed=3))
config = load_config(overrides=[f"data.path={data}", f"output_root={out}", f"model.name={model}",
                                f"model.image_size={size}", f"train.epochs={epochs}", "train.batch_size=16",
                                "train.lr=0.003", "train.scheduler=onecycle", "train.optimizer=adamw",
                                "train.augmentation=geometric", "train.threads=1", "name=parity"])
result = run_experiment(config, show_progress=False)
history = [{k: v for k, v in row.items() if k != "elapsed_s"} for row in result.fit.history]
print(json.dumps({"history": history, "accuracy": result.metrics["accuracy"],
                  "macro_f1": result.metrics["macro"]["f1"], "ece": result.metrics.get("ece")}))
"""


def run(src: Path, out: Path, model: str, image_size: int, epochs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    completed = subprocess.run([sys.executable, "-c", RUNNER, str(out), model, str(image_size), str(epochs)],
                               env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"the run with {src} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the other tree's src folder (e.g. a worktree's src)")
    parser.add_argument("--models", default="abas_cnn,mobilenet_v3_small,random_forest")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    other = Path(args.against).resolve()
    if not (other / "leukoscope").is_dir():
        print(f"{other} holds no leukoscope package", file=sys.stderr)
        return 2
    differ = 0
    with tempfile.TemporaryDirectory(prefix="leukoscope-parity-") as work:
        for model in [m for m in args.models.split(",") if m]:
            theirs = run(other, Path(work) / f"{model}-other", model, args.image_size, args.epochs)
            ours = run(SRC, Path(work) / f"{model}-this", model, args.image_size, args.epochs)
            same = theirs == ours
            differ += not same
            print(f"{model}: {'identical' if same else 'DIFFERS'} (test accuracy {theirs['accuracy']:.4f} -> "
                  f"{ours['accuracy']:.4f}, macro-F1 {theirs['macro_f1']:.4f} -> {ours['macro_f1']:.4f}, "
                  f"{len(ours['history'])} epoch(s) compared)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
