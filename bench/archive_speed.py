"""Benchmark: fields per minute of the local engine and of the Ray engine on this machine.

    python bench/archive_speed.py [--data DIR] [--fields 40] [--repeats 3] [--cpus 2] [--backend torch]

The same fields (default: the first 40 CBC test fields, 640x480) and the shipped models (or
``--detector``/``--classifier`` on ``--backend``), analysed with one thread per process (torch's,
or onnxruntime's and OpenVINO's) by (a) the local engine (``SmearAnalyzer.analyze_paths``, which
also writes each field's annotated PNG, cells CSV and JSON), (b) the same analysis in a plain loop
without those files (what a Ray actor does: the baseline of Ray's overhead), (c) Ray with one actor
(the same compute as (b): the difference is Ray's own cost) and (d) Ray with ``--cpus`` actors
(scale-out on this machine). One thread each: on a machine shared with other work, two OpenMP
threads per process were ten times slower here (they spin waiting for a core).
The Ray cluster is started once (``ray.init``, timed apart) as on a real cluster where ``ray start``
ran before; each Ray run still starts its actors and loads the models in them.

Two rates: end to end (fields / wall time of the run, actor start and model loading included) and
marginal (the second half of the fields once running: for Ray from a run of all the fields and one
of the first half, (n - n/2) / (T(n) - T(n/2)); in process, from the times the first half and the
last field were done). Ray's results reach the driver in bursts, so their arrival times
do not give a steady rate; the marginal one does. Overhead of Ray = 1 - its rate / the plain
loop's. Medians of ``--repeats``, the configurations interleaved so that another process's load
falls on all of them alike; the 1-minute load average is printed beside each run. Prints a JSON
line of the medians last.
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cbc" / "Testing" / "Images"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
LOCAL = "local engine (per-field files)"
LOOP = "plain loop (no files)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="Folder of fields (default: CBC's test images).")
    parser.add_argument("--fields", type=int, default=40, help="Fields analysed per run (the first, by name).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray's CPUs (default: all).")
    parser.add_argument("--actors", default="1", help="Comma-separated actor counts to run Ray with (default 1: "
                        "the same compute as the plain loop).")
    parser.add_argument("--detector", default="pretrained:smear-detector")
    parser.add_argument("--classifier", default="pretrained:wbc-classifier")
    parser.add_argument("--backend", default="torch", help="What runs the models: torch, auto, onnxruntime, "
                        "openvino (exported bundles: leukoscope export).")
    parser.add_argument("--engines", default="local,ray", help="Comma-separated: local, ray.")
    args = parser.parse_args(argv)
    if min(args.fields, args.repeats, args.cpus) < 1:
        parser.error("--fields, --repeats and --cpus must be at least 1")
    try:
        args.actors = [int(n) for n in args.actors.split(",")]
    except ValueError:
        parser.error(f"--actors: comma-separated whole numbers, got {args.actors!r}")
    if min(args.actors) < 1:
        parser.error("--actors: at least 1")
    unknown = set(args.engines.split(",")) - {"local", "ray"}
    if unknown:
        parser.error(f"--engines: unknown {sorted(unknown)} (local, ray)")
    return args


def load() -> float:
    return round(os.getloadavg()[0], 2)


class Clock:
    """A progress callback that notes when each field's result arrived."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: list[float] = []

    def __call__(self, advance: int = 1, info: str = "", **counts: int) -> None:
        self.marks.extend([time.perf_counter()] * advance)

    @property
    def seconds(self) -> float:
        return self.marks[-1] - self.start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.data.is_dir():
        sys.exit(f"{args.data}: no such folder (the CBC dataset lives in ../shared/datasets)")
    paths = sorted(p for p in args.data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:args.fields]
    if not paths:
        sys.exit(f"{args.data}: no images")
    from leukoscope.inference.archive import AnalyzerSpec, analyze_archive, analyze_file

    spec = AnalyzerSpec(args.detector, args.classifier, {"backend": args.backend})
    analyzer = spec.build(threads=1)  # one thread, as each Ray actor has (torch's, or the graph runtimes')
    configs: list[tuple[str, dict]] = []
    if "local" in args.engines:
        configs += [(LOCAL, {}), (LOOP, {})]
    if "ray" in args.engines:
        import ray

        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
        print(f"ray.init (a local cluster of {args.cpus} CPUs): {time.perf_counter() - started:.1f} s, "
              f"load {load()}", flush=True)
        configs += [(f"ray {n} actor{'s' if n > 1 else ''}", {"actors": n}) for n in args.actors]
    half = paths[:len(paths) // 2]
    measured: dict[str, dict[str, list[float]]] = {name: {"end_to_end": [], "marginal": []} for name, _ in configs}
    for repeat in range(args.repeats):
        for name, options in configs:
            seconds = {}
            for subset in ((paths, half) if name.startswith("ray") and half else (paths,)):
                before = load()
                with tempfile.TemporaryDirectory() as out:
                    clock = Clock()
                    if name == LOCAL:
                        # no run scale: the Ray engine gets none either
                        analyzer.analyze_paths(subset, out, progress=clock, estimate_run_scale=False)
                    elif name == LOOP:
                        for path in subset:
                            analyze_file(analyzer, path, str(path))
                            clock()
                    else:
                        analyze_archive(spec, subset, out, analyzer=analyzer, progress=clock, **options)
                seconds[len(subset)] = clock.seconds
                print(f"run {repeat + 1} {name}, {len(subset)} fields: {clock.seconds:.1f} s, "
                      f"{60 * len(subset) / clock.seconds:.1f} fields/min (load {before} -> {load()})", flush=True)
            end_to_end = 60 * len(paths) / seconds[len(paths)]
            measured[name]["end_to_end"].append(end_to_end)
            if len(seconds) == 2 and seconds[len(paths)] > seconds[len(half)]:
                measured[name]["marginal"].append(60 * (len(paths) - len(half))
                                                  / (seconds[len(paths)] - seconds[len(half)]))
            elif len(seconds) == 1 and len(clock.marks) > len(half) > 0:
                # The same second half of the fields (their cells differ from the first half's).
                measured[name]["marginal"].append(60 * (len(paths) - len(half))
                                                  / (clock.marks[-1] - clock.marks[len(half) - 1]))
    medians = {name: {kind: round(statistics.median(values), 2) if values else None for kind, values in rates.items()}
               for name, rates in measured.items()}
    print(f"\n{len(paths)} fields, {args.repeats} repeats, Ray on {args.cpus} CPUs; medians (fields/min):")
    for name, rates in medians.items():
        line = f"  {name:<32} end to end {rates['end_to_end']}, marginal {rates['marginal']}"
        if name.startswith("ray") and LOOP in medians:
            for kind in ("end_to_end", "marginal"):
                if rates[kind] and medians[LOOP][kind]:
                    line += f"; {kind} vs the plain loop {100 * (rates[kind] / medians[LOOP][kind] - 1):+.1f}%"
        print(line)
    print(json.dumps({"fields": len(paths), "repeats": args.repeats, "cpus": args.cpus, "backend": args.backend,
                      "medians": medians,
                      "load_at_end": load()}))

if __name__ == "__main__":
    main()
