"""Shared by the web-service benchmarks: a bundle, a server process on loopback, users, images."""

from __future__ import annotations

import atexit
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

LOOPBACK = "127.0.0.1"  # load is only ever sent here


def demo_bundle(bundle: str | None, cache: Path) -> Path:
    """``--bundle`` if given, else the demo's bundle (trained once into ``cache``, ~2 min)."""
    if bundle:
        return Path(bundle)
    found = sorted(cache.glob("runs/demo-*/bundle/bundle.json"))
    if found:
        return found[-1].parent
    from leukoscope.demo import run_demo

    print(f"training the demo bundle into {cache} (about 2 minutes) ...", flush=True)
    return Path(run_demo(cache, minutes=1.5, show_progress=False).bundle_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def make_users(data_dir: Path, names: list[str], role: str = "technician") -> dict[str, str]:
    """Users and one API token each (through the service's own admin functions)."""
    from leukoscope.service.admin import add_user, issue_token
    from leukoscope.service.settings import ServiceSettings

    settings = ServiceSettings(data_dir=data_dir)
    tokens = {}
    for name in names:
        add_user(settings, name, "bench password 1", role)
        tokens[name] = issue_token(settings, name, "bench")
    return tokens


class Server:
    """``leukoscope serve`` as a child process (so that it can be killed with SIGKILL)."""

    def __init__(self, bundle: Path, data_dir: Path, port: int, env: dict[str, str] | None = None,
                 log: Path | None = None, extra_args: list[str] | None = None) -> None:
        self.bundle, self.data_dir, self.port = bundle, data_dir, port
        self.extra_args = extra_args or []
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 120.0) -> float:
        # single cells only, as these benchmarks were measured (serve now adds the shipped detector to any --bundle)
        smear = [] if "--detector" in self.extra_args else ["--no-detector"]
        command = [sys.executable, "-m", "leukoscope.cli", "serve", "--bundle", str(self.bundle), "--data-dir",
                   str(self.data_dir), "--host", LOOPBACK, "--port", str(self.port), "--log-level", "warning", *smear,
                   *self.extra_args]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        started = time.monotonic()
        self.process = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        atexit.register(self.stop)  # a run that fails half-way leaves no server behind
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} (log: {self.log})")
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1.0).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout:.0f} s (log: {self.log})")

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def cell_pngs(count: int, size: int = 96, seed: int = 0) -> list[bytes]:
    """Distinct synthetic single-cell PNGs (each upload is new content)."""
    from leukoscope.data.synthetic import SYNTHETIC_CLASSES, render_cell

    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(render_cell(SYNTHETIC_CLASSES[index % 4], rng, size)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def _proc_table() -> tuple[dict[int, int], dict[int, list[str]]]:
    parents, stats = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        stats[int(entry.name)] = fields
    return parents, stats


def process_tree(root_pid: int, parents: dict[int, int] | None = None) -> set[int]:
    """A process and all its descendants (Linux /proc)."""
    parents = parents if parents is not None else _proc_table()[0]
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def process_tree_cpu_s(root_pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, stats = _proc_table()
    return sum((int(stats[pid][11]) + int(stats[pid][12])) / ticks
               for pid in process_tree(root_pid, parents) if pid in stats)


def rss_bytes(pids: set[int]) -> int:
    """Resident memory of these processes together (VmRSS; gone processes count 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


class PeakMemory:
    """Samples the resident memory of a process tree every ``every_s`` while in a ``with``
    block: ``baseline`` (at entry), ``peak`` and ``peak - baseline`` (``rise``)."""

    def __init__(self, root_pid: int, every_s: float = 0.005) -> None:
        self.pids = process_tree(root_pid)
        self.every_s = every_s
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pids))
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakMemory":
        self.baseline = self.peak = rss_bytes(self.pids)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pids))

    @property
    def rise(self) -> int:
        return self.peak - self.baseline


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")
