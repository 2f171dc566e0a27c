"""Load run of the web service on loopback: N concurrent clients upload single cells for T s.

    python bench/service_load.py [--bundle B] [--clients 8] [--seconds 60]

Starts ``leukoscope serve`` on 127.0.0.1 with a fresh data directory, one technician
(and API token) per client, and sends ``POST /api/v1/cases`` (one 96x96 PNG each,
Grad-CAM on) back to back from every client. Prints p50 / p95 / p99 latency,
throughput and the error count, and writes them as JSON (``--out``). The upload
rate limit is raised for the run (``LEUKOSCOPE_RATE_LIMIT_PER_MINUTE``), since one
client here sends far more than a person would; everything else is the default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _service_common import (LOOPBACK, Server, cell_pngs, demo_bundle, free_port, load_average,  # noqa: E402
                             make_users, percentile, process_tree_cpu_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="cell-classifier bundle (default: train/reuse the demo bundle)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "leukoscope-bench-demo"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load not counted")
    parser.add_argument("--workers", type=int, default=1, help="server processes (leukoscope serve --workers)")
    parser.add_argument("--inference-threads", type=int, default=None, help="model threads per server process")
    parser.add_argument("--images", type=int, default=256, help="distinct cell images the clients cycle through")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.images < 1:
        parser.error(f"--images needs at least 1, got {args.images}")

    bundle = demo_bundle(args.bundle, Path(args.cache))
    work = Path(tempfile.mkdtemp(prefix="leukoscope-load-"))
    names = [f"tech{i}" for i in range(args.clients)]
    tokens = make_users(work / "data", names)
    images = cell_pngs(args.images)
    server = Server(bundle, work / "data", free_port(), env={"LEUKOSCOPE_RATE_LIMIT_PER_MINUTE": "0"},
                    log=work / "server.log", extra_args=["--workers", str(args.workers)] + (
                        ["--inference-threads", str(args.inference_threads)] if args.inference_threads else []))
    startup = server.start()
    print(f"server up in {startup:.1f} s on {server.url} (bundle {bundle}); {args.clients} clients x "
          f"{args.seconds:.0f} s after {args.warmup:.0f} s warm-up", flush=True)

    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    begin = time.monotonic()
    count_from, stop_at = begin + args.warmup, begin + args.warmup + args.seconds

    def client(index: int) -> None:
        headers = {"Authorization": f"Bearer {tokens[names[index]]}"}
        n = index
        with httpx.Client(base_url=server.url, headers=headers, timeout=30.0) as http:
            while time.monotonic() < stop_at:
                data = images[n % len(images)]
                n += args.clients
                started = time.monotonic()
                try:
                    response = http.post("/api/v1/cases", files={"files": (f"cell{n}.png", data, "image/png")})
                    outcome = "ok" if response.status_code == 201 else f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                elapsed = time.monotonic() - started
                if started >= count_from:
                    with lock:
                        if outcome == "ok":
                            latencies.append(elapsed)
                        else:
                            errors[outcome] = errors.get(outcome, 0) + 1

    cpu_marks: dict[str, float] = {}

    def mark_cpu() -> None:  # server (and load generator) CPU over exactly the counted window
        time.sleep(max(0.0, count_from - time.monotonic()))
        cpu_marks["start"] = process_tree_cpu_s(server.process.pid)
        cpu_marks["client_start"] = sum(os.times()[:2])
        cpu_marks["load_start"] = load_average()
        time.sleep(max(0.0, stop_at - time.monotonic()))
        cpu_marks["end"] = process_tree_cpu_s(server.process.pid)
        cpu_marks["client_end"] = sum(os.times()[:2])
        cpu_marks["load_end"] = load_average()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=mark_cpu))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.stop()

    ms = [1000 * v for v in latencies]
    result = {
        "clients": args.clients, "seconds": args.seconds, "requests_ok": len(ms),
        "errors": sum(errors.values()), "error_kinds": errors,
        "throughput_rps": round(len(ms) / args.seconds, 2),
        "p50_ms": round(percentile(ms, 50), 1), "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1), "max_ms": round(max(ms), 1) if ms else None,
        "mean_ms": round(sum(ms) / len(ms), 1) if ms else None, "bundle": str(bundle), "target": LOOPBACK,
        "server_cpu_ms_per_request": round(1000 * (cpu_marks["end"] - cpu_marks["start"]) / max(1, len(ms)), 1),
        "server_cpu_cores_used": round((cpu_marks["end"] - cpu_marks["start"]) / args.seconds, 2),
        "load_generator_cpu_cores_used": round((cpu_marks["client_end"] - cpu_marks["client_start"]) / args.seconds, 2),
        "machine_load_average_1_5_15min": [cpu_marks["load_start"], cpu_marks["load_end"]],
        "server_startup_s": round(startup, 1), "workers": args.workers,
        "inference_threads": args.inference_threads or 2,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
