"""Score one classifier bundle, on any backend, as bench/zoo.py scores the shipped one.

In-domain: the test part of its training split (``--split``: that split's file, for a bundle whose run
folder is gone). Controls: the crops ``bench/zoo.py`` wrote (``<crops>/controls.json``: all-taleqani's
Benign cells, cnmc-mini, BCCD's white cells), each with the share called blast, the types right, the
share flagged unfamiliar and the flag's AUROC against the in-domain test cells. Nothing is fitted here.

    python bench/classifier_controls.py --bundle pretrained:wbc-classifier --crops runs/zoo/crops \\
        --split runs/ood-shipped/split.json [--backend onnxruntime] [--out scores.json]

Prints one JSON object per row (``in-domain``, then each control) and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402  (bench/ is not a package)

BACKENDS = ("torch", "onnxruntime", "openvino")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="classifier bundle folder or pretrained:NAME")
    parser.add_argument("--crops", type=Path, required=True, help="bench/zoo.py's crops folder (controls.json)")
    parser.add_argument("--split", type=Path, default=None, help="the bundle's training split (default: recorded)")
    parser.add_argument("--backend", default="torch", choices=BACKENDS, help="what runs the network")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows here (JSON)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    listing = args.crops / "controls.json"
    if not listing.is_file():
        parser.error(f"{listing} does not exist: run `python bench/zoo.py --crops-only` first")
    from leukoscope.bundle import BundleError

    try:  # before any scoring: a bundle without a graph for --backend, or a runtime not installed
        ran_on = zoo._loaded_classifier(str(args.bundle), args.backend).backend
    except (BundleError, ValueError) as exc:
        parser.error(f"--bundle {args.bundle}: {exc}")
    controls = zoo.load_controls(listing)
    start = time.perf_counter()
    in_domain = zoo.score_in_domain(args.bundle, args.split, args.backend)
    rows = {"in-domain": in_domain[0] if in_domain else None,
            **zoo.score_controls(args.bundle, controls, in_domain[1] if in_domain else None, args.backend)}
    for name, row in rows.items():
        print(json.dumps({"row": name, **(row or {})}))
    results = {"bundle": str(args.bundle), "backend": ran_on, "rows": rows,
               "minutes": round((time.perf_counter() - start) / 60, 2)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(f"scored in {results['minutes']} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
