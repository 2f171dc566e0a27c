"""Crash run: kill -9 the web service in the middle of uploads, restart it, and check
that no acknowledged case is lost and no case is half written.

    python bench/service_crash.py [--bundle B] [--rounds 5] [--clients 4]

Each round: start ``leukoscope serve`` (same data directory every round), let
``--clients`` clients upload cases of 1-3 single-cell images back to back, SIGKILL
the server after a random 2-6 s (``--kill-after``), restart it, then check

- every case whose upload was acknowledged (HTTP 201) is in the database and is
  served by the API after the restart (no acknowledged case lost);
- every case in the database is whole: its images and cells are all there (one
  cell per single-cell image), every store object its rows name exists and its
  bytes hash to its name (no case half written);
- files written for uploads that never committed are only unreferenced objects,
  counted and removed by the store's garbage collection.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _service_common import Server, cell_pngs, demo_bundle, free_port, make_users  # noqa: E402


def check_database(data_dir: Path) -> dict:
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    from leukoscope.service.db import make_engine, make_sessionmaker
    from leukoscope.service.tables import Case
    from leukoscope.service.settings import ServiceSettings
    from leukoscope.service.storage import ContentStore

    settings = ServiceSettings(data_dir=data_dir)
    engine = make_engine(settings.resolved_database_url)
    store = ContentStore(settings.store_dir, fsync=False)
    problems, referenced, case_ids = [], set(), set()
    with make_sessionmaker(engine)() as db:
        cases = db.scalars(select(Case).options(selectinload(Case.images), selectinload(Case.cells))).all()
        for case in cases:
            case_ids.add(case.id)
            expected = case.analysis.get("differential_at_upload", {})
            if not case.images:
                problems.append(f"{case.id}: no images")
            if len(case.cells) != len(case.images):
                problems.append(f"{case.id}: {len(case.images)} images but {len(case.cells)} cells")
            if expected and expected["total"] != len(case.cells):
                problems.append(f"{case.id}: differential counted a different number of cells")
            names = [n for i in case.images for n in (i.original_object, i.served_object, i.annotated_object)]
            names += [n for c in case.cells for n in (c.overlay_object, c.crop_object)]
            for name in filter(None, names):
                referenced.add(name)
                if not store.exists(name):
                    problems.append(f"{case.id}: object {name} missing")
                elif hashlib.sha256(store.read(name)).hexdigest() != name.split(".")[0]:
                    problems.append(f"{case.id}: object {name} does not match its hash")
    engine.dispose()
    orphans = store.names() - referenced
    partial = list(store.tmp.glob("*.part"))
    removed = store.collect_garbage(referenced, min_age_s=0)
    return {"cases": case_ids, "problems": problems, "orphans": len(orphans), "partial_tmp_files": len(partial),
            "removed": len(removed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "leukoscope-bench-demo"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-after", type=float, nargs=2, default=[2.0, 6.0], metavar=("MIN", "MAX"),
                        help="kill the server after a random number of seconds in this range, each round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not 0 < args.kill_after[0] <= args.kill_after[1]:
        parser.error(f"--kill-after needs 0 < MIN <= MAX, got {args.kill_after}")
    rng = random.Random(args.seed)

    bundle = demo_bundle(args.bundle, Path(args.cache))
    work = Path(tempfile.mkdtemp(prefix="leukoscope-crash-"))
    data_dir = work / "data"
    names = [f"tech{i}" for i in range(args.clients)]
    tokens = make_users(data_dir, names)
    images = cell_pngs(128, seed=1)
    port = free_port()
    acknowledged: dict[str, str] = {}  # case id -> the client (technician) that got the 201
    in_flight_at_kill = 0
    rounds = []
    for round_index in range(args.rounds):
        server = Server(bundle, data_dir, port, env={"LEUKOSCOPE_RATE_LIMIT_PER_MINUTE": "0"},
                        log=work / "server.log")
        server.start()
        stop = threading.Event()
        lock = threading.Lock()
        flying = [0]
        acked_this_round = [0]
        failures: dict[str, int] = {}

        def client(index: int) -> None:
            headers = {"Authorization": f"Bearer {tokens[names[index]]}"}
            local = random.Random(args.seed * 1000 + round_index * 10 + index)
            with httpx.Client(base_url=server.url, headers=headers, timeout=30.0) as http:
                while not stop.is_set():
                    files = [("files", (f"c{k}.png", images[local.randrange(len(images))], "image/png"))
                             for k in range(local.randint(1, 3))]
                    with lock:
                        flying[0] += 1
                    try:
                        response = http.post("/api/v1/cases", files=files)
                        if response.status_code == 201:
                            with lock:
                                acknowledged[response.json()["id"]] = names[index]
                                acked_this_round[0] += 1
                        else:
                            failures[f"HTTP {response.status_code}"] = failures.get(f"HTTP {response.status_code}",
                                                                                    0) + 1
                    except httpx.HTTPError as exc:  # the kill: connection reset / refused
                        failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    finally:
                        with lock:
                            flying[0] -= 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        delay = rng.uniform(*args.kill_after)
        time.sleep(delay)
        with lock:
            in_flight = flying[0]
        server.kill9()
        stop.set()
        for thread in threads:
            thread.join()
        in_flight_at_kill += in_flight
        # restart and check through the API that every acknowledged case is served
        restart = Server(bundle, data_dir, port, env={"LEUKOSCOPE_RATE_LIMIT_PER_MINUTE": "0"},
                         log=work / "server.log")
        restart_s = restart.start()
        missing_api = 0
        with httpx.Client(base_url=restart.url, timeout=30.0) as http:
            for case_id, owner in sorted(acknowledged.items()):
                response = http.get(f"/api/v1/cases/{case_id}", headers={"Authorization": f"Bearer {tokens[owner]}"})
                if response.status_code != 200 or not response.json()["cells"]:
                    missing_api += 1
        restart.stop()
        check = check_database(data_dir)
        lost = set(acknowledged) - check["cases"]
        row = {"round": round_index + 1, "killed_after_s": round(delay, 2), "in_flight_at_kill": in_flight,
               "acknowledged_this_round": acked_this_round[0], "acknowledged_total": len(acknowledged),
               "cases_in_db": len(check["cases"]), "lost": len(lost), "not_served_after_restart": missing_api,
               "half_written": len(check["problems"]), "orphan_objects": check["orphans"],
               "partial_tmp_files": check["partial_tmp_files"], "restart_s": round(restart_s, 1),
               "client_errors": failures}
        rounds.append(row)
        print(json.dumps(row), flush=True)
        for problem in check["problems"][:10]:
            print("  PROBLEM:", problem)

    summary = {
        "rounds": args.rounds, "clients": args.clients, "acknowledged_cases": len(acknowledged),
        "in_flight_at_kills": in_flight_at_kill,
        "lost_cases": sum(r["lost"] for r in rounds),
        "not_served_after_restart": sum(r["not_served_after_restart"] for r in rounds),
        "half_written_cases": sum(r["half_written"] for r in rounds),
        "unacknowledged_but_committed": len(check_database(data_dir)["cases"] - set(acknowledged)),
        "orphan_objects_collected": sum(r["orphan_objects"] for r in rounds),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2))
    ok = summary["lost_cases"] == 0 and summary["half_written_cases"] == 0 and summary["not_served_after_restart"] == 0
    print("PASS: no acknowledged case lost, no case half written" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
