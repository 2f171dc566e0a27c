"""One classifier bundle's calls on the same cells seen through other cameras.

A camera's white balance and exposure multiply each channel by a gain (clipped at 255); its tone curve
bends the grey levels (gamma). Each variant here rebuilds every cell of one part of the bundle's
training split (``--part``: test by default; val to choose between recipes without reading the test
part) and, with ``--crops``, every BCCD white cell of
``bench/zoo.py``'s controls, and reports per variant: types right, share called blast, share flagged
unfamiliar, and the share of cells whose call differs from the one on the cell as taken. A classifier
that reads the cell keeps its calls; one that reads the light changes them. Nothing is fitted here.

    python bench/camera_shift.py --bundle pretrained:wbc-classifier --split runs/wb/split.json \\
        [--crops runs/zoo/crops] [--out shift.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402  (bench/ is not a package)


def _gains(red: float, green: float, blue: float) -> Callable[[np.ndarray], np.ndarray]:
    gains = np.array([red, green, blue], dtype=np.float32)
    return lambda pixels: np.clip(np.rint(pixels * gains), 0, 255).astype(np.uint8)


def _gamma(power: float) -> Callable[[np.ndarray], np.ndarray]:
    table = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** power), 0, 255).astype(np.uint8)
    return lambda pixels: table[pixels]


#: The cameras: the first is the cell as taken; the bluish one is the robustness review's (issue #11).
VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as taken": lambda pixels: pixels,
    "bluish (0.80, 0.92, 1.15)": _gains(0.80, 0.92, 1.15),
    "warm (1.15, 0.95, 0.80)": _gains(1.15, 0.95, 0.80),
    "dim (x0.75)": _gains(0.75, 0.75, 0.75),
    "bright (x1.25)": _gains(1.25, 1.25, 1.25),
    "gamma 0.6": _gamma(0.6),
}


def _images(paths: Sequence[Path], variant: Callable[[np.ndarray], np.ndarray]) -> list[Image.Image]:
    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(Image.fromarray(variant(np.asarray(image.convert("RGB")))))
    return out


def score_variants(classifier: Any, cells: Sequence[tuple[Path, str]]) -> dict[str, dict[str, Any]]:
    """Per variant: ``cells``, ``type_right``, ``called_blast``, ``unfamiliar`` (None without a flag),
    ``calls_changed`` (against the cell as taken) and the three most frequent calls."""
    paths = [Path(path) for path, _ in cells]
    labels = [label for _, label in cells]
    rows: dict[str, dict[str, Any]] = {}
    as_taken: list[str] | None = None
    for name, variant in VARIANTS.items():
        predictions = classifier.predict_images(_images(paths, variant))
        calls = [p.top_class for p in predictions]
        as_taken = as_taken or calls
        flags = [getattr(p, "unfamiliar", None) for p in predictions]
        counts: dict[str, int] = {}
        for call in calls:
            counts[call] = counts.get(call, 0) + 1
        n = max(1, len(calls))
        rows[name] = {
            "cells": len(calls),
            "type_right": round(sum(c == label for c, label in zip(calls, labels)) / n, 4),
            "called_blast": round(sum(c == "blast" for c in calls) / n, 4),
            "unfamiliar": None if any(f is None for f in flags) else round(sum(map(bool, flags)) / n, 4),
            "calls_changed": round(sum(c != t for c, t in zip(calls, as_taken)) / n, 4),
            "most_called": sorted(counts.items(), key=lambda kv: -kv[1])[:3],
        }
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="classifier bundle folder or pretrained:NAME")
    parser.add_argument("--split", type=Path, default=None, help="the bundle's training split (default: recorded)")
    parser.add_argument("--part", default="test", choices=("val", "test"), help="which part of the split")
    parser.add_argument("--crops", type=Path, default=None, help="bench/zoo.py's crops folder: BCCD's white cells too")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows here (JSON)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    from leukoscope.bundle import read_bundle_info
    from leukoscope.data.splits import Split

    split_file = args.split or read_bundle_info(args.bundle).split_file
    if split_file is None or not Path(split_file).is_file():
        parser.error(f"the bundle's training split ({split_file}) is not here: give --split")
    cell_sets = {f"in-domain {args.part}": [(s.path, s.label) for s in Split.load(split_file).manifest(args.part)]}
    if args.crops is not None:
        listing = args.crops / "controls.json"
        if not listing.is_file():
            parser.error(f"{listing} does not exist: run `python bench/zoo.py --crops-only` first")
        cell_sets["BCCD white cells"] = zoo.load_controls(listing).get("bccd", [])
    classifier = zoo._loaded_classifier(str(args.bundle))
    start = time.perf_counter()
    results: dict[str, Any] = {"bundle": str(args.bundle), "split": str(split_file), "sets": {}}
    for name, cells in cell_sets.items():
        rows = score_variants(classifier, cells)
        results["sets"][name] = rows
        for variant, row in rows.items():
            print(json.dumps({"set": name, "variant": variant, **row}))
    results["minutes"] = round((time.perf_counter() - start) / 60, 2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(f"scored in {results['minutes']} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
