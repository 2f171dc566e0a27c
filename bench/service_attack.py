"""Replays the probes of issue 13 against a real ``leukoscope serve`` on loopback and
prints a pass/fail table (and the server's peak memory during the upload probe).

    python bench/service_attack.py [--bundle B] [--workers 2] [--runs 3] [--out attack.json]

Starts ``leukoscope serve`` on 127.0.0.1 (``--workers 2`` by default, so that the
throttle must hold across processes) with a fresh data directory, then, as an
attacker on the same machine would:

- burst: 60 log-ins at once for one user (59 wrong, the right one last), and 40 at once
  for 40 different names (the Argon2 load), while /api/v1/health is polled;
- lock-out: 12 wrong passwords from one address (in three letter cases), then the right
  one from another address; then failures spread over several addresses;
- tokens: creation without the password, a read-only token uploading, password change,
  admin revocation, deactivation and reactivation;
- big pixels: 8 single-colour 6300x6300 PNGs in one POST (refused from their headers),
  then 2 of them (80 Mpx, the default budget of one request), ``--runs`` times, with the
  server's resident memory sampled every 5 ms;
- junk log-ins: 24 new names from 8 addresses, then the size of the throttle table
  (kept at most 20 rows for the run).

Every request goes to 127.0.0.1; the "other addresses" are other loopback source
addresses (127.0.0.x), so nothing leaves the machine. Every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # for the test suite's tiny bundle
from _service_common import (PeakMemory, Server, free_port, load_average, make_users,  # noqa: E402
                             process_tree, rss_bytes)

PASSWORD = "bench password 1"
MIB = 1024 * 1024
rows: list[dict[str, Any]] = []


def record(probe: str, check: str, passed: bool, measured: str) -> None:
    rows.append({"probe": probe, "check": check, "pass": bool(passed), "measured": measured})
    print(f"  {'PASS' if passed else 'FAIL'}  {probe}: {check} ({measured})", flush=True)


def tiny_bundle(cache: Path) -> Path:
    """The service tests' small CNN (trained in seconds): the probes do not need a good model."""
    from tests.service.helpers import train_tiny_bundle

    if (cache / "bundle.json").is_file():
        return cache
    return Path(train_tiny_bundle(cache, epochs=2, per_class=8))


def client_from(url: str, address: str, **options: Any) -> httpx.Client:
    """A client whose requests come from ``address`` (a loopback address)."""
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=60.0, **options)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    if match is None:
        raise RuntimeError("no CSRF token in the page")
    return match.group(1)


def login(client: httpx.Client, username: str, password: str) -> httpx.Response:
    page = client.get("/login")
    return client.post("/login", data={"username": username, "password": password, "csrf_token": csrf_of(page.text)})


async def burst(url: str, address: str, attempts: list[tuple[str, str]]) -> list[tuple[int, float]]:
    """Every attempt at once; (status, seconds until its answer) each."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=60.0,
                                 limits=httpx.Limits(max_connections=len(attempts))) as client:
        page = await client.get("/login")
        csrf = csrf_of(page.text)

        async def one(username: str, password: str) -> tuple[int, float]:
            started = time.monotonic()
            response = await client.post("/login", data={"username": username, "password": password,
                                                         "csrf_token": csrf})
            return response.status_code, time.monotonic() - started

        return list(await asyncio.gather(*(one(u, p) for u, p in attempts)))


def allowed_checks(limit: int, seconds: float) -> int:
    """Password checks the policy allows one (name, address) in ``seconds``: ``limit``, then
    one more after each wait of 2, 4, 8 ... s."""
    allowed, wait, waited = limit, 2.0, 2.0
    while waited <= seconds:
        allowed, wait = allowed + 1, wait * 2
        waited += wait
    return allowed


def health_while(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=30.0) as client:
        while not stop.is_set() and len(latencies) < 10_000:
            started = time.monotonic()
            client.get("/api/v1/health")
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)


def probe_burst(server: Server, failures_allowed: int) -> None:
    def run(address: str, attempts: list[tuple[str, str]]) -> tuple[list[tuple[int, float]], float, float, int]:
        latencies: list[float] = []
        stop = threading.Event()
        poller = threading.Thread(target=health_while, args=(server.url, stop, latencies))
        with PeakMemory(server.process.pid) as memory:
            poller.start()
            started = time.monotonic()
            answers = asyncio.run(burst(server.url, address, attempts))
            elapsed = time.monotonic() - started
            stop.set()
            poller.join()
        return answers, elapsed, max(latencies, default=float("nan")), memory.rise

    answers, elapsed, _, _ = run("127.0.0.11", [("tina", f"wrong guess {i}") for i in range(59)]
                                 + [("tina", PASSWORD)])
    codes = [code for code, _ in answers]
    evaluated = codes.count(401) + codes.count(303)
    allowed = allowed_checks(failures_allowed, elapsed)
    counts = {code: codes.count(code) for code in sorted(set(codes))}
    record("burst", f"60 parallel log-ins for one user (right one last): no more password checks than the "
           f"policy allows ({failures_allowed}, +1 per 2, 4 ... s wait)",
           evaluated <= allowed and codes.count(429) >= 60 - allowed - codes.count(503),
           f"{counts} in {elapsed:.1f} s; {evaluated} checked, {allowed} allowed")
    answers, elapsed, worst_health, rise = run("127.0.0.12", [(f"nobody{i}", "wrong guess 1") for i in range(40)])
    codes = [code for code, _ in answers]
    busy = sorted(seconds for code, seconds in answers if code == 503)
    counts = {code: codes.count(code) for code in sorted(set(codes))}
    busy_median = statistics.median(busy) if busy else float("nan")
    record("burst", "40 parallel log-ins, 40 names: Argon2 checks bounded, the excess gets 503 (median < 2 s)",
           bool(busy) and busy_median < 2.0, f"{counts} in {elapsed:.1f} s; 503 after {busy_median:.2f} s (median)")
    record("burst", "server memory rise during the 40-name burst < 400 MiB (Argon2: 64 MiB per check)",
           rise < 400 * MIB, f"+{rise / MIB:.0f} MiB")
    record("burst", "/api/v1/health stays under 1 s during the burst", worst_health < 1.0,
           f"slowest {worst_health * 1000:.0f} ms")


def probe_lockout(server: Server, failures_allowed: int, user_lock: int) -> None:
    with client_from(server.url, "127.0.0.21") as attacker, client_from(server.url, "127.0.0.22") as owner:
        codes = [login(attacker, name, "wrong guess 1").status_code for name in ("hugo", "HUGO", "Hugo") * 4]
        record("lock-out", f"12 wrong passwords from one address: {failures_allowed} evaluated, then 429",
               codes.count(401) == failures_allowed and set(codes[failures_allowed:]) == {429}, f"{codes}")
        refused = login(attacker, "hugo", PASSWORD)
        record("lock-out", "the attacker's address waits (429 with Retry-After), even with the right password",
               refused.status_code == 429 and int(refused.headers.get("retry-after", 0)) >= 1,
               f"{refused.status_code}, Retry-After {refused.headers.get('retry-after')}")
        ok = login(owner, "hugo", PASSWORD)
        record("lock-out", "the right password from another address still logs in", ok.status_code == 303,
               f"{ok.status_code}")
    # distributed: `user_lock` failures from addresses that each stay under their own limit
    per_address = max(1, failures_allowed - 1)
    spread = [f"127.0.2.{n + 1}" for n in range(-(-user_lock // per_address))]
    total = 0
    for address in spread:
        with client_from(server.url, address) as client:
            for _ in range(per_address):
                total += login(client, "ines", "wrong guess 1").status_code == 401
    with client_from(server.url, "127.0.0.23") as owner:
        locked = login(owner, "ines", PASSWORD)
    record("lock-out", f"{total} failures from {len(spread)} addresses lock the user (admin can clear)",
           locked.status_code == 429, f"{locked.status_code}")


def probe_tokens(server: Server, admin_token: str) -> None:
    admin = {"Authorization": f"Bearer {admin_token}"}
    api = httpx.Client(base_url=server.url, timeout=60.0)

    def status(token: str) -> int:
        return api.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code

    with client_from(server.url, "127.0.0.31") as tech:
        login(tech, "tomas", PASSWORD)
        csrf = csrf_of(tech.get("/account").text)
        bare = tech.post("/account/tokens", data={"name": "x", "csrf_token": csrf})
        record("tokens", "a session alone cannot create a token (password needed)",
               bare.status_code == 400 and 'id="new-token"' not in bare.text, f"{bare.status_code}")

        def create(scope: str) -> str:
            page = tech.post("/account/tokens", data={"name": scope, "password": PASSWORD, "scope": scope,
                                                      "days": "7", "csrf_token": csrf}, follow_redirects=True)
            return page.text.split('id="new-token">', 1)[1].split("<", 1)[0]

        reader, writer = create("read"), create("write")
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 150, 170)).save(png, format="PNG")
        refused = api.post("/api/v1/cases", headers={"Authorization": f"Bearer {reader}"},
                           files={"files": ("a.png", png.getvalue(), "image/png")})
        record("tokens", "a read-only token cannot upload", refused.status_code == 403, f"{refused.status_code}")
        listed = api.get("/api/v1/tokens", headers=admin).json()["tokens"]
        mine = {t["name"]: t for t in listed if t["user"] == "tomas"}
        record("tokens", "the admin sees another user's tokens, with scope and expiry",
               {"read", "write"} <= set(mine) and mine["read"]["scope"] == "read" and mine["read"]["expires_at"],
               f"{len(mine)} of tomas listed")
        revoked = api.post(f"/api/v1/tokens/{mine['read']['id']}/revoke", headers=admin).status_code
        record("tokens", "the admin revokes another user's token", revoked == 200 and status(reader) == 401,
               f"revoke {revoked}, then {status(reader)}")
        before = status(writer)
        tech.post("/account/password", data={"current": PASSWORD, "new": "bench password 2",
                                             "confirm": "bench password 2", "csrf_token": csrf})
        record("tokens", "a password change revokes the user's tokens", before == 200 and status(writer) == 401,
               f"{before} -> {status(writer)}")
    tech_id = next(u["id"] for u in api.get("/api/v1/users", headers=admin).json()["users"]
                   if u["username"] == "tomas")
    with client_from(server.url, "127.0.0.32") as tech, client_from(server.url, "127.0.0.33") as boss:
        login(tech, "tomas", "bench password 2")
        page = tech.post("/account/tokens", data={"name": "again", "password": "bench password 2", "scope": "write",
                                                  "csrf_token": csrf_of(tech.get("/account").text)},
                         follow_redirects=True)  # the token is shown on the page the form redirects to
        token = page.text.split('id="new-token">', 1)[1].split("<", 1)[0]
        login(boss, "admin", PASSWORD)
        csrf = csrf_of(boss.get("/admin/users").text)
        for active in ("0", "1"):
            boss.post(f"/admin/users/{tech_id}", data={"active": active, "csrf_token": csrf})
        record("tokens", "deactivation then reactivation does not bring a token back", status(token) == 401,
               f"{status(token)}")
    api.close()


def big_png(size: int, colour: tuple[int, int, int] | int, mode: str = "RGB") -> bytes:
    """A single-colour PNG: tiny on the wire, ``size`` x ``size`` pixels once decoded."""
    buffer = io.BytesIO()
    Image.new(mode, (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def probe_pixels(server: Server, token: str, runs: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    two_files = [big_png(6300, (120 + 10 * i, 90, 160)) for i in range(2)]
    files = two_files * 4  # 8 files; each is decoded on its own, so repeats cost what new ones would
    sixteen = big_png(6300, 30000, mode="I;16")
    figures: dict[str, Any] = {"bytes_8_files": sum(map(len, files))}
    with httpx.Client(base_url=server.url, headers=headers, timeout=300.0) as client:
        peaks: list[int] = []

        def send(parts: list[bytes], name: str = "field") -> tuple[int, float, int]:
            with PeakMemory(server.process.pid) as memory:
                started = time.monotonic()
                response = client.post("/api/v1/cases", files=[("files", (f"{name}{i}.png", data, "image/png"))
                                                               for i, data in enumerate(parts)])
                elapsed = time.monotonic() - started
            peaks.append(memory.peak)
            return response.status_code, elapsed, memory.rise

        idle = rss_bytes(process_tree(server.process.pid))

        code, elapsed, rise = send(files)
        figures["eight"] = {"status": code, "seconds": elapsed, "rise_mib": rise / MIB}
        record("big pixels", "8 x 6300x6300 PNGs (317 Mpx) in one POST: 413 from the headers, quickly",
               code == 413 and elapsed < 3, f"{code} in {elapsed:.2f} s, +{rise / MIB:.0f} MiB")
        two = [send(two_files) for _ in range(runs)]
        figures["two_runs"] = [{"status": c, "seconds": s, "rise_mib": r / MIB} for c, s, r in two]
        rises = [r / MIB for _, _, r in two]
        seconds_median = statistics.median(s for _, s, _ in two)
        figures["two_median"] = {"seconds": seconds_median, "rise_mib": statistics.median(rises),
                                 "rise_mib_max": max(rises)}
        record("big pixels", f"2 x 6300x6300 PNGs (79 Mpx, the default budget) accepted; peak rise < 1 GiB in "
               f"each of {runs} runs", all(c == 201 for c, _, _ in two) and max(rises) < 1024,
               f"+{statistics.median(rises):.0f} MiB median, +{max(rises):.0f} MiB max, {seconds_median:.1f} s "
               "median")
        figures["server_rss_mib"] = {"before_probe": idle / MIB, "peak_during_probe": max(peaks) / MIB}
        record("big pixels", "server memory (all processes) during the upload probe, before -> peak",
               max(peaks) - idle < 1024 * MIB, f"{idle / MIB:.0f} -> {max(peaks) / MIB:.0f} MiB")
        code, elapsed, rise = send([sixteen], "sixteen")
        figures["sixteen"] = {"status": code, "seconds": elapsed, "rise_mib": rise / MIB}
        record("big pixels", "1 x 16-bit 6300x6300 PNG: accepted, peak rise < 1 GiB", code == 201 and rise < 1024 * MIB,
               f"{code}, +{rise / MIB:.0f} MiB, {elapsed:.1f} s")
    return figures


def probe_junk(server: Server, data_dir: Path, max_rows: int) -> None:
    names = 0
    for block in range(8):
        with client_from(server.url, f"127.0.1.{block + 1}") as client:
            for n in range(3):
                login(client, f"junk{block}-{n}", "wrong guess 1")
                names += 1
    time.sleep(0.5)
    with sqlite3.connect(data_dir / "leukoscope.db") as connection:
        count = connection.execute("SELECT count(*) FROM login_throttle").fetchone()[0]
    bound = max_rows + max_rows // 100 + 1 + 3
    record("junk log-ins", f"{names} new names from 8 addresses: throttle table stays bounded ({max_rows} rows)",
           count <= bound, f"{count} rows")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="cell-classifier bundle (default: the test suite's tiny CNN)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "leukoscope-attack-bundle"))
    parser.add_argument("--workers", type=int, default=2, help="server processes (the throttle must hold across)")
    parser.add_argument("--runs", type=int, default=3, help="runs of the accepted big-pixel upload (median)")
    parser.add_argument("--out", default=None, help="write the table and the figures as JSON here")
    args = parser.parse_args()

    bundle = Path(args.bundle) if args.bundle else tiny_bundle(Path(args.cache))
    work = Path(tempfile.mkdtemp(prefix="leukoscope-attack-"))
    data_dir = work / "data"
    tokens = make_users(data_dir, ["admin"], role="admin")
    tokens.update(make_users(data_dir, ["tina", "hugo", "ines", "tomas", "tech"]))
    failures_allowed, user_lock, max_rows = 5, 12, 20
    env = {"LEUKOSCOPE_LOGIN_FAILURES_ALLOWED": str(failures_allowed),
           "LEUKOSCOPE_LOGIN_USER_LOCK_FAILURES": str(user_lock),
           "LEUKOSCOPE_THROTTLE_MAX_ROWS": str(max_rows), "LEUKOSCOPE_GRADCAM": "true"}
    server = Server(bundle, data_dir, free_port(), env=env, log=work / "server.log",
                    extra_args=["--workers", str(args.workers)])
    load_before = load_average()
    started_at = datetime.now(timezone.utc)
    startup = server.start()
    print(f"server up in {startup:.1f} s on {server.url} ({args.workers} workers; data {data_dir}); "
          f"load average {load_before}", flush=True)
    figures: dict[str, Any] = {}
    probes = [("burst", lambda: probe_burst(server, failures_allowed)),
              ("lock-out", lambda: probe_lockout(server, failures_allowed, user_lock)),
              ("tokens", lambda: probe_tokens(server, tokens["admin"])),
              ("big pixels", lambda: figures.update(probe_pixels(server, tokens["tech"], args.runs))),
              ("junk log-ins", lambda: probe_junk(server, data_dir, max_rows))]
    seconds: dict[str, float] = {}
    try:
        for name, probe in probes:
            started = time.monotonic()
            try:
                probe()
            except Exception as exc:  # e.g. an older server without these routes: a failure, not a crash
                record(name, "the probe ran to the end", False, f"{type(exc).__name__}: {exc}"[:200])
            seconds[name] = round(time.monotonic() - started, 1)
    finally:
        server.stop()
    load_after = load_average()
    width = max(len(r["check"]) for r in rows)
    print(f"\n{'probe':<13} {'result':<6} {'check':<{width}}  measured")
    for r in rows:
        print(f"{r['probe']:<13} {'pass' if r['pass'] else 'FAIL':<6} {r['check']:<{width}}  {r['measured']}")
    failed = sum(not r["pass"] for r in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} passed; load average {load_before} -> {load_after}; "
          f"started {started_at:%Y-%m-%d %H:%M:%S} UTC; server start {startup:.0f} s; probe seconds {seconds}")
    if args.out:
        Path(args.out).write_text(json.dumps({"started": started_at.isoformat(), "workers": args.workers,
                                              "load_average": [load_before, load_after], "rows": rows,
                                              "startup_s": startup, "probe_seconds": seconds,
                                              "pixels": figures}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
