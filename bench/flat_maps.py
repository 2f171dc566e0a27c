"""How contrasted are the Grad-CAM maps `predict --explain` draws? (explain.map_contrast, FLAT_MAP_THRESHOLD)

For each bundle, the raw contrast of the maps of seeded pbc photographs (``--per-class`` of each class
folder under ``--data``), framed as `predict` frames them and explained for the class the model calls:
the minimum, median and maximum, and how many are flat. A model that reads its images should have none
flat; one whose output ignores them (a collapsed run) all.

    python bench/flat_maps.py --data ../shared/datasets/pbc --bundle pretrained:wbc-classifier \\
        --bundle runs/<collapsed run>/bundle [--per-class 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Sequence

import torch

from leukoscope.inference.explain import FLAT_MAP_THRESHOLD, grad_cam_maps
from leukoscope.inference.predictor import CellClassifier
from leukoscope.io import load_image
from leukoscope.pretrained import resolve_bundle


def cells(data: Path, per_class: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    picked = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        picked += rng.sample(images, min(per_class, len(images)))
    return picked


def contrasts(bundle: str, paths: Sequence[Path]) -> dict[str, object]:
    classifier = CellClassifier.from_bundle(resolve_bundle(bundle))
    framed = [classifier.frame(load_image(path))[0] for path in paths]
    batch = torch.stack([classifier.preprocess(image) for image in framed]).to(classifier.device)
    maps = grad_cam_maps(classifier.model, batch, None, views=classifier.info.preprocessing.views)
    values = sorted(float(c) for c in maps.contrast)
    return {"bundle": bundle, "views": classifier.info.preprocessing.views, "cells": len(values),
            "min": round(values[0], 4), "median": round(statistics.median(values), 4), "max": round(values[-1], 4),
            "flat": int(maps.flat.sum()), "threshold": FLAT_MAP_THRESHOLD}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="class folders of cell photographs (pbc)")
    parser.add_argument("--bundle", action="append", required=True, help="a classifier bundle or pretrained:NAME")
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    paths = cells(args.data, args.per_class, args.seed) if args.data.is_dir() else []
    if not paths:
        parser.error(f"no cell photographs in class folders under {args.data}")
    for bundle in args.bundle:
        print(json.dumps(contrasts(bundle, paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
