"""Benchmark: seconds per field of a detector on torch (eager) and on its exported graph.

    python bench/detector_export_speed.py --images ../shared/datasets/cbc/Testing/Images \
        [--bundle pretrained:smear-detector] [--fields 20] [--rounds 3] [--threads 2] [--crop-width W]
        [--compare OTHER_EXPORTED_BUNDLE]

The bundle is exported first (into a temporary folder) unless it already has a graph
(`leukoscope export`). Every backend installed (torch, onnxruntime, openvino) detects
in the same decoded fields through :class:`~leukoscope.inference.detector.CellDetector`
(the path of `analyze` and `evaluate`: transform, network, proposals, box head, NMS);
decoding is left out. The backends take turns field by field, so a burst of load from
other work falls on all of them; each backend's figure is the median over all fields
and rounds, after one warm-up field. The 1-minute load average is printed, since on a
shared machine the wall time also measures the others' work. ``--crop-width``: time the fields' first W columns only (1456: the
first detector tile of a 2592x1944 field, as ``SmearAnalyzer`` cuts it). ``--compare``: another
exported bundle (e.g. the same detector exported with ``--int8``), timed on onnxruntime in the
same turns, as ``compare_onnxruntime``.

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="Folder of fields (e.g. CBC's 640x480 Testing/Images).")
    parser.add_argument("--bundle", default="pretrained:smear-detector", help="Detector bundle (exported or not).")
    parser.add_argument("--fields", type=int, default=20, help="Fields to time (the first ones, by name).")
    parser.add_argument("--rounds", type=int, default=3, help="Passes over the fields.")
    parser.add_argument("--threads", type=int, default=2, help="torch, onnxruntime and OpenVINO threads.")
    parser.add_argument("--crop-width", type=int, default=None, help="Time the fields' first W columns only.")
    parser.add_argument("--compare", default=None, help="Another exported detector bundle to time on onnxruntime.")
    args = parser.parse_args(argv)
    if args.fields < 1 or args.rounds < 1 or args.threads < 1:
        sys.exit("--fields, --rounds and --threads must be at least 1")

    import numpy as np
    import torch

    from leukoscope.bundle import BundleError, read_bundle_info
    from leukoscope.inference.detector import CellDetector
    from leukoscope.inference.detector_runtime import exported_detector, installed
    from leukoscope.inference.export import export_onnx
    from leukoscope.inference.predict_files import collect_images
    from leukoscope.io import load_image
    from leukoscope.pretrained import resolve_bundle

    if not installed("onnxruntime"):
        sys.exit("onnxruntime is not installed: pip install 'leukoscope[onnx]'")
    torch.set_num_threads(args.threads)
    try:
        paths = collect_images([Path(args.images)])[:args.fields]
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(str(exc))
    fields = [np.asarray(load_image(path))[:, :args.crop_width] for path in paths]
    with tempfile.TemporaryDirectory() as work:
        try:
            bundle = resolve_bundle(args.bundle)
            info = read_bundle_info(bundle, task="detect")
            if not exported_detector(info):
                bundle = export_onnx(bundle, Path(work) / "exported")
        except BundleError as exc:
            sys.exit(str(exc))
        backends = [name for name in ("torch", "onnxruntime", "openvino") if name == "torch" or installed(name)]
        detectors = {name: CellDetector.from_bundle(bundle, backend=name, threads=args.threads) for name in backends}
        if args.compare is not None:
            try:
                detectors["compare_onnxruntime"] = CellDetector.from_bundle(args.compare, backend="onnxruntime",
                                                                            threads=args.threads)
            except BundleError as exc:
                sys.exit(f"--compare: {exc}")
            backends.append("compare_onnxruntime")
        times: dict[str, list[float]] = {name: [] for name in backends}
        for detector in detectors.values():
            detector.detect([fields[0]])  # warm-up (graph runtimes plan their first run)
        for _ in range(args.rounds):
            for field in fields:
                for name, detector in detectors.items():
                    start = time.perf_counter()
                    detector.detect([field])
                    times[name].append(time.perf_counter() - start)
        height, width = fields[0].shape[:2]
        measured: dict[str, object] = {"model": info.model_name, "fields": len(fields), "size": f"{width}x{height}",
                                       "rounds": args.rounds, "threads": args.threads,
                                       "load_1min": round(os.getloadavg()[0], 2)}
        eager = statistics.median(times["torch"])
        for name in backends:
            seconds = statistics.median(times[name])
            measured[f"{name}_s_per_field"] = round(seconds, 4)
            measured[f"{name}_ratio_to_torch"] = round(seconds / eager, 3)
            print(f"{name}: {seconds:.4f} s per field ({seconds / eager:.2f}x torch; {info.model_name}, "
                  f"{len(fields)} fields of {width}x{height}, {args.threads} thread(s), median of "
                  f"{len(times[name])})")
    print(json.dumps(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
