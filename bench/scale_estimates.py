"""How often does a field's red-cell scale estimate go wrong, per source?

Each source (one microscope and camera: bccd, cbc, all-taleqani, pbc) has one true pixel size; the
median of many fields' estimates stands for it. For a seeded sample of ``--fields`` images per source
this prints how many get an estimate, their median, and how many are more than ``--ratio`` times off it
(a misread field: analysed at that scale, its cells look several times too large or too small), with the
red cells each misreading rested on. Nothing is fitted.

    python bench/scale_estimates.py --data ../shared/datasets [--fields 150] [--ratio 1.5] [--by-class]

One JSON line per source; ``--by-class``: one per class folder of all-taleqani (its classes come from
different slides, and its blast-rich Pre-B fields were read a fifth too fine before violet objects were
left out), each with its own ``--fields`` sample and median.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("bccd", "cbc", "all-taleqani", "pbc")


def source_fields(data: Path, source: str) -> list[Path]:
    return sorted(p for p in (data / source).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))


def row_sets(data: Path, by_class: bool) -> list[tuple[str, list[Path]]]:
    """(row name, fields) per source; with ``by_class``, all-taleqani's class folders as rows of their own."""
    rows = []
    for source in SOURCES:
        paths = source_fields(data, source)
        if by_class and source == "all-taleqani" and paths:
            classes = sorted({p.relative_to(data / source).parts[0] for p in paths if p.parent != data / source})
            rows += [(f"{source}/{name}", [p for p in paths if p.relative_to(data / source).parts[0] == name])
                     for name in classes]
        else:
            rows.append((source, paths))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--fields", type=int, default=150, help="images sampled per source (seed 0)")
    parser.add_argument("--ratio", type=float, default=1.5, help="an estimate this many times off the median is wrong")
    parser.add_argument("--by-class", action="store_true", help="a row per class folder of all-taleqani")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.fields < 1 or args.ratio <= 1:
        parser.error("--fields must be at least 1 and --ratio above 1")
    import numpy as np

    from leukoscope.io import load_image
    from leukoscope.scale import estimate_scale

    rng = random.Random(0)
    for source, paths in row_sets(args.data, args.by_class):
        if not paths:
            print(f"{source}: no images under {args.data / source}", file=sys.stderr)
            continue
        scales = [estimate_scale(load_image(p)) for p in rng.sample(paths, min(args.fields, len(paths)))]
        known = [s for s in scales if s.known]
        row: dict = {"source": source, "fields": len(scales), "estimated": len(known)}
        if known:
            median = float(np.median([s.um_per_px for s in known]))
            off = [s for s in known if abs(math.log(s.um_per_px / median)) > math.log(args.ratio)]
            row.update({"median_um_per_px": round(median, 4), "off": len(off),
                        "off_um_per_px": sorted(round(s.um_per_px, 3) for s in off),
                        "off_red_cells": sorted(s.red_cells for s in off)})
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
