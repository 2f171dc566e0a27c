"""The embedded default job: synthetic stained cells -> a short training -> a full report."""

from __future__ import annotations

import json
from pathlib import Path

from leukoscope.data.synthetic import SyntheticSpec, make_synthetic_dataset
from leukoscope.engine.config import load_config
from leukoscope.tasks.classify import RunResult, run_experiment

DEMO_SPEC = SyntheticSpec(image_size=96, images_per_class=100, seed=0)


def run_demo(out: str | Path = "leukoscope-demo", *, minutes: float = 2.0, show_progress: bool = True) -> RunResult:
    """Make ``out/data`` (if absent) and train a small CNN on it for about ``minutes``."""
    out = Path(out)
    data = out / "data"
    if not data.exists():
        make_synthetic_dataset(data, DEMO_SPEC)
    config = load_config(overrides=[
        "name=demo",
        # paths as JSON strings: an override's value is YAML ("demo #2" would be cut at the "#")
        f"output_root={json.dumps(str(out / 'runs'))}",
        f"data.path={json.dumps(str(data))}",
        "model.name=abas_cnn",
        "model.image_size=64",
        "train.epochs=30",
        "train.lr=0.001",
        "train.batch_size=32",
        f"train.max_minutes={minutes}",
        "train.early_stopping_patience=6",
        "train.augmentation=default",
    ])
    return run_experiment(config, show_progress=show_progress)
