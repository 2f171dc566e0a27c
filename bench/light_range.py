"""Record a classifier bundle's light range (:mod:`leukoscope.light`) from one part of a split of its sources.

Training and ``leukoscope calibrate-ood`` record the range with the OOD statistics; this is for a bundle whose
training split is gone. The shipped classifier's range was made so (2026-12-07), on the train part of a fresh
split of the same crops as its own (docs/benchmarks.md, "A check of each field's light"):

    python bench/light_range.py --bundle src/leukoscope/pretrained/wbc-classifier --split runs/wb/split.json

Prints the range; writes it into the bundle's ``bundle.json`` (``ood.light``) unless ``--dry-run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="classifier bundle folder (written in place)")
    parser.add_argument("--split", type=Path, required=True, help="a split file of the bundle's training sources")
    parser.add_argument("--part", default="train", choices=("train", "val", "test"), help="which part (default train)")
    parser.add_argument("--dry-run", action="store_true", help="print the range only")
    args = parser.parse_args(list(argv) if argv is not None else None)
    from PIL import Image

    from leukoscope.bundle import read_bundle_info
    from leukoscope.data.splits import Split
    from leukoscope.light import fit_light_range

    info = read_bundle_info(args.bundle, task="classify")
    if info.ood is None:
        parser.error(f"{args.bundle} has no OOD statistics to record the light with: run leukoscope calibrate-ood")
    if info.preprocessing.stain is not None or info.preprocessing.styled:
        parser.error(f"{args.bundle} normalises each image itself: the light of a field does not reach it")
    samples = Split.load(args.split).manifest(args.part)
    pixels = []
    for sample in samples:
        with Image.open(sample.path) as image:
            pixels.append(info.preprocessing.pixel_array(image.convert("RGB")))
    light = fit_light_range(np.stack(pixels)) if pixels else None
    if light is None:
        parser.error(f"too few images with a background in view in the {args.part} part of {args.split}")
    print(json.dumps(light.to_json()))
    if not args.dry_run:
        path = args.bundle / "bundle.json"
        payload = json.loads(path.read_text())
        payload["ood"]["light"] = light.to_json()
        path.write_text(json.dumps(payload, indent=2))  # as leukoscope.bundle writes it
        print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
