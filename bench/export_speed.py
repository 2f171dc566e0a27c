"""Benchmark: images per second of a classifier's network on torch (eager) and on onnxruntime.

    python bench/export_speed.py --bundle runs/.../bundle [--batch 32] [--repeats 5] [--threads 1]

The bundle is exported first (into a temporary folder) unless it already has an ONNX
graph (`leukoscope export`). Both backends get the same uint8 batch of ``--batch``
random images at the bundle's size, through the same runtimes `predict` uses
(:mod:`leukoscope.inference.runtime`: normalisation, network, logits); decoding and
letterboxing, the same for both, are left out. Each figure is the median of
``--repeats`` timed runs after one warm-up; the 1-minute load average is printed,
since on a shared machine the wall time also measures the others' work.

Prints one line per backend, then a JSON line of the measurements last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (onnxruntime plans its first run)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="Classifier bundle (exported or not) or pretrained:NAME.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads.")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.threads < 1:
        sys.exit("--batch, --repeats and --threads must be at least 1")

    import torch

    from leukoscope.bundle import BundleError, read_bundle_info
    from leukoscope.inference.export import export_onnx
    from leukoscope.inference.runtime import load_runtime, onnxruntime_available
    from leukoscope.pretrained import resolve_bundle

    if not onnxruntime_available():
        sys.exit("onnxruntime is not installed: pip install 'leukoscope[onnx]'")
    torch.set_num_threads(args.threads)
    bundle = resolve_bundle(args.bundle)
    with tempfile.TemporaryDirectory() as work:
        try:
            info = read_bundle_info(bundle, task="classify")
            if info.export is None:
                bundle = export_onnx(bundle, Path(work) / "exported")
                info = read_bundle_info(bundle)
        except BundleError as exc:
            sys.exit(str(exc))
        size = info.preprocessing.image_size
        pixels = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        measured: dict[str, object] = {"model": info.model_name, "image_size": size, "batch": args.batch,
                                       "repeats": args.repeats, "threads": args.threads,
                                       "load_1min": round(os.getloadavg()[0], 2)}
        for backend in ("torch", "onnxruntime"):
            runtime = load_runtime(bundle, info, backend, threads=args.threads)
            with torch.no_grad():
                seconds = _median_seconds(lambda: runtime.outputs(pixels), args.repeats)
            measured[f"{backend}_images_per_s"] = round(args.batch / seconds, 1)
            print(f"{backend}: {args.batch / seconds:.1f} images/s ({info.model_name}, {size} px, batch {args.batch}, "
                  f"{args.threads} thread(s), median of {args.repeats})")
    print(json.dumps(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
