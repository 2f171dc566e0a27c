"""How often does the "several white cells in one cell's image" check (leukoscope.cell_presence) fire?

A smear field uploaded as a single cell is classified by the cell at its centre and counted as one. The
check counts the image's white-cell nuclei at its scale and speaks at three or more in an image of at
least four windows' area. It should stay silent on single-cell photographs (pbc) and on BCCD's and CBC's
fields (one or two white cells each, and under four windows: not counted), and speak on all-taleqani's
fields (about 0.46 um/px, many white cells each). Each image is read at its own red-cell scale, else its
source's (as the service and `predict` lend a run's scale). Nothing is fitted here: the constants were set
from a cell's size (module docstring), and this script measures them; BCCD's and CBC's annotated white
cells are compared with the nuclei counted on their whole fields (counted without the size gate).

    python bench/several_white_cells.py --data ../shared/datasets [--sample 200] [--out several.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Sequence

from PIL import Image

from leukoscope.cell_presence import several_white_cells, white_cell_nuclei
from leukoscope.scale import estimate_scale

WINDOW_UM = 24.0
#: Each source's scale where a field's red cells give none (their median estimates, docs/benchmarks.md).
SOURCE_UM_PER_PX = {"pbc": 0.1, "all-taleqani": 0.46, "bccd": 0.08, "cbc": 0.08}


def images_of(data: Path, source: str) -> list[Path]:
    return sorted(p for p in (data / source).rglob("*") if p.suffix.lower() in (".jpg", ".png", ".bmp"))


def annotated_white_cells(image: Path) -> int | None:
    """White-cell boxes of a VOC field (``Annotations/<stem>.xml`` beside its image folder); None without."""
    xml = image.parent.parent / "Annotations" / f"{image.stem}.xml"
    if not xml.is_file():
        return None
    return sum(1 for obj in ET.parse(xml).getroot().iter("object") if obj.find("name").text == "WBC")


def measure(paths: Sequence[Path], fallback: float) -> dict:
    """Images flagged, and the nuclei counted (and annotated white cells, where known) per image."""
    flagged, counted, pairs = 0, Counter(), Counter()
    for path in paths:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        estimate = estimate_scale(image)
        um = estimate.um_per_px if estimate.known else fallback
        flagged += several_white_cells(image, um, WINDOW_UM) is not None
        nuclei = white_cell_nuclei(image, um)
        counted[nuclei] += 1
        truth = annotated_white_cells(path)
        if truth is not None:
            pairs[f"{truth} annotated, {nuclei} counted"] += 1
    row = {"images": len(paths), "flagged": flagged, "nuclei_counted": dict(sorted(counted.items()))}
    if pairs:
        row["annotated_vs_counted"] = dict(sorted(pairs.items()))
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="../shared/datasets (pbc/, all-taleqani/, ...)")
    parser.add_argument("--sample", type=int, default=200, help="images per source (random, seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    result = {}
    for source, fallback in SOURCE_UM_PER_PX.items():
        paths = images_of(args.data, source)
        if source in ("bccd", "cbc"):  # fields with boxes: only their images folders
            paths = [p for p in paths if p.parent.name in ("JPEGImages", "Images")]
        if paths:
            result[source] = measure(rng.sample(paths, min(args.sample, len(paths))), fallback)
    if not result:
        parser.error(f"nothing to measure: none of {', '.join(SOURCE_UM_PER_PX)} under {args.data}")
    for name, row in result.items():
        print(f"{name}: {row['flagged']} of {row['images']} flagged; nuclei counted {row['nuclei_counted']}",
              file=sys.stderr)
    print(f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    text = json.dumps(result)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
