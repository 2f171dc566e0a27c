"""Benchmark: images per second of a classifier's network on torch (eager), onnxruntime and OpenVINO, float and int8.

    python bench/export_speed.py --bundle pretrained:wbc-classifier [--calibration DATA] [--batch 32] \
        [--threads 2] [--repeats 5] [--rounds 3]

The torch bundle is exported into a temporary folder: an ONNX graph and an OpenVINO IR
(`leukoscope export --format onnx|openvino`), and with ``--calibration`` their int8
versions too (``--int8 --calibration DATA``). Every backend gets the same uint8 batch of
``--batch`` random images at the bundle's size, through the runtimes `predict` uses
(:mod:`leukoscope.inference.runtime`: normalisation, network, logits); decoding and
letterboxing, the same for all, are left out.

One round times every variant in turn (the median of ``--repeats`` timed calls after one
warm-up); ``--rounds`` rounds interleave them, so that the others' load on a shared machine
falls on all of them alike. Each figure is the median over rounds, and each speed-up the
median of the per-round ratios to torch (measured in the same round). The 1-minute load
average is printed with each round.

Prints one line per variant, then a JSON line of the measurements last.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="Classifier bundle (torch) or pretrained:NAME.")
    parser.add_argument("--calibration", default=None, help="Images to calibrate int8 graphs on (adds them).")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch, onnxruntime and OpenVINO intra-op threads.")
    args = parser.parse_args(argv)
    if min(args.batch, args.repeats, args.rounds, args.threads) < 1:
        sys.exit("--batch, --repeats, --rounds and --threads must be at least 1")

    import torch

    from leukoscope.bundle import BundleError, read_bundle_info
    from leukoscope.inference.export import export_bundle
    from leukoscope.inference.runtime import backend_available, load_runtime
    from leukoscope.pretrained import resolve_bundle

    torch.set_num_threads(args.threads)
    source = resolve_bundle(args.bundle)
    with tempfile.TemporaryDirectory() as work:
        # (label, bundle folder, backend); the exports are made from the torch bundle
        graphs: list[tuple[str, str | None]] = []
        if backend_available("onnxruntime"):
            graphs.append(("onnx", None))
        if backend_available("openvino"):
            graphs.append(("openvino", None))
        if args.calibration:
            graphs += [(fmt, args.calibration) for fmt, _ in list(graphs)]
        variants: list[tuple[str, Path, str]] = [("torch", source, "torch")]
        try:
            info = read_bundle_info(source, task="classify")
            for fmt, calibration in graphs:
                tag = f"{fmt}{'-int8' if calibration else ''}"
                started = time.perf_counter()
                folder = export_bundle(source, Path(work) / tag, fmt, calibration=calibration)
                print(f"exported {tag} in {time.perf_counter() - started:.0f} s", flush=True)
                if fmt == "onnx":
                    variants.append((f"onnxruntime {tag}", folder, "onnxruntime"))
                    if calibration and backend_available("openvino"):  # auto's choice for an int8 ONNX bundle
                        variants.append((f"openvino {tag} (ONNX graph)", folder, "openvino"))
                else:
                    variants.append((f"openvino {tag}", folder, "openvino"))
        except BundleError as exc:
            sys.exit(str(exc))
        size = info.preprocessing.image_size
        pixels = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        runtimes = {label: load_runtime(folder, read_bundle_info(folder), backend, threads=args.threads)
                    for label, folder, backend in variants}
        speeds: dict[str, list[float]] = {label: [] for label in runtimes}
        ratios: dict[str, list[float]] = {label: [] for label in runtimes}
        loads = []
        for round_index in range(args.rounds):
            loads.append(round(os.getloadavg()[0], 2))
            for label, runtime in runtimes.items():
                with torch.no_grad():
                    seconds = median_seconds(lambda: runtime.outputs(pixels), args.repeats)
                speeds[label].append(args.batch / seconds)
            for label in runtimes:
                ratios[label].append(speeds[label][-1] / speeds["torch"][-1])
            print(f"round {round_index + 1}: load {loads[-1]}: " + ", ".join(
                f"{label} {speeds[label][-1]:.1f}" for label in runtimes), flush=True)
    measured: dict[str, object] = {"model": info.model_name, "image_size": size, "batch": args.batch,
                                   "repeats": args.repeats, "rounds": args.rounds, "threads": args.threads,
                                   "load_1min": loads, "images_per_s": {}, "speedup_vs_torch": {}}
    for label in runtimes:
        speed, ratio = statistics.median(speeds[label]), statistics.median(ratios[label])
        measured["images_per_s"][label] = round(speed, 1)
        measured["speedup_vs_torch"][label] = round(ratio, 2)
        print(f"{label}: {speed:.1f} images/s, x{ratio:.2f} torch ({info.model_name}, {size} px, batch {args.batch}, "
              f"{args.threads} thread(s), median of {args.rounds} rounds of {args.repeats})")
    print(json.dumps(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
