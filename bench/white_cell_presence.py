"""How often does the "no white cell at the image's centre" check (leukoscope.cell_presence) fire?

On white cells it should stay silent: the zoo's training crops (pbc and all-taleqani, cut at the
classifier's 24 um window), its control crops (all-taleqani Benign, BCCD, cnmc-mini), and pbc's
photographs framed as `predict` and the service frame a single-cell upload. On windows of BCCD's smears
that hold no white cell (the centre and all of the window outside every annotated white-cell box) and on
BCCD fields uploaded whole as a cell (centre outside every white-cell box) it should speak. Nothing is
fitted here: the check's two constants were set from what white cells and red cells look like
(module docstring), and this script measures them.

    python bench/white_cell_presence.py --data ../shared/datasets --crops runs/zoo/crops [--out presence.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from leukoscope.cell_presence import lacks_white_cell
from leukoscope.cell_window import frame_single_cell
from leukoscope.scale import estimate_scale

WINDOW_UM = 24.0
#: BCCD's pixel size where a field's red cells give none (its median estimate, docs/benchmarks.md).
BCCD_UM_PER_PX = 0.08


def doubted(pairs: Iterable[tuple[Image.Image, Image.Image]]) -> dict[str, int]:
    """``{"images": n, "doubted": k}`` over (image as given, window read) pairs."""
    counts = Counter(lacks_white_cell(seen) for _, seen in pairs)
    return {"images": sum(counts.values()), "doubted": counts[True]}


def crops(paths: Sequence[Path]) -> Iterable[tuple[Image.Image, Image.Image]]:
    for path in paths:
        image = Image.open(path).convert("RGB")
        yield image, image  # cut at the window already


def framed_photographs(paths: Sequence[Path]) -> Iterable[tuple[Image.Image, Image.Image]]:
    for path in paths:
        image = Image.open(path).convert("RGB")
        yield image, frame_single_cell(image, WINDOW_UM, None)[0]


def white_cell_boxes(xml: Path) -> list[list[float]]:
    return [[float(obj.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            for obj in ET.parse(xml).getroot().iter("object") if obj.find("name").text == "WBC"]


def bccd_without_white_cells(bccd: Path, rng: random.Random, every: int = 3,
                             tries: int = 3) -> tuple[list[tuple[Image.Image, Image.Image]], list]:
    """Windows of 24 um holding no part of an annotated white cell, and whole fields whose centre is in none."""
    windows, fields = [], []
    for xml in sorted((bccd / "Annotations").glob("*.xml"))[::every]:
        boxes = white_cell_boxes(xml)
        field = Image.open(bccd / "JPEGImages" / f"{xml.stem}.jpg").convert("RGB")
        scale = estimate_scale(field)
        half = WINDOW_UM / 2 / (scale.um_per_px if scale.known else BCCD_UM_PER_PX)
        for _ in range(tries):
            if field.width <= 2 * half or field.height <= 2 * half:
                break
            x, y = rng.uniform(half, field.width - half), rng.uniform(half, field.height - half)
            if not any(b[0] - half < x < b[2] + half and b[1] - half < y < b[3] + half for b in boxes):
                window = field.crop((round(x - half), round(y - half), round(x + half), round(y + half)))
                windows.append((window, window))
        cx, cy = field.width / 2, field.height / 2
        if not any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes):
            fields.append((field, frame_single_cell(field, WINDOW_UM, None)[0]))
    return windows, fields


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="../shared/datasets (pbc/, bccd/)")
    parser.add_argument("--crops", type=Path, help="bench/zoo.py's crops folder (train.csv, controls/)")
    parser.add_argument("--pbc-sample", type=int, default=400, help="pbc photographs framed (random, seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    result: dict[str, dict[str, int]] = {}
    if args.crops is not None:
        with (args.crops / "train.csv").open(newline="") as handle:
            result["training crops"] = doubted(crops([Path(row["path"]) for row in csv.DictReader(handle)]))
        for folder in sorted(p for p in (args.crops / "controls").glob("*") if p.is_dir()):
            result[f"control crops: {folder.name}"] = doubted(crops(sorted(folder.rglob("*.png"))))
    pbc = sorted(p for p in (args.data / "pbc").glob("*/*") if p.suffix.lower() in (".jpg", ".png"))
    if pbc:
        result["pbc photographs, framed"] = doubted(framed_photographs(rng.sample(pbc, min(args.pbc_sample,
                                                                                           len(pbc)))))
    if (args.data / "bccd" / "Annotations").is_dir():
        windows, fields = bccd_without_white_cells(args.data / "bccd", rng)
        result["BCCD windows without a white cell"] = doubted(windows)
        result["BCCD fields uploaded as a cell, centre outside every white cell"] = doubted(fields)
    if not result:
        parser.error(f"nothing to measure: no pbc/ or bccd/ under {args.data}, and no --crops")
    for name, counts in result.items():
        print(f"{name}: {counts['doubted']} of {counts['images']} doubted", file=sys.stderr)
    print(f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    text = json.dumps(result)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
