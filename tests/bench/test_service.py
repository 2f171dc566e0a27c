"""Smoke tests of the web-service benchmarks: service_load.py and service_crash.py start
``leukoscope serve`` on 127.0.0.1 with the bundle of the pbc.py smoke run, for a few seconds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.bench.conftest import ScriptRun, run_script

pytestmark = [pytest.mark.slow,  # each starts the server (twice for the crash run)
              pytest.mark.skipif(importlib.util.find_spec("fastapi") is None,
                                 reason="the service extra is not installed (pip install -e '.[service]')")]


@pytest.mark.usefixtures("service_env")
def test_service_load(pbc_run: ScriptRun, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    # the first uploads (cold model, database) fall in the warm-up second, which is not counted
    run = run_script("service_load.py", "--bundle", pbc_run.last_path, "--clients", "2", "--seconds", "1",
                     "--warmup", "1", "--images", "8", "--out", out)
    assert run.lines[0].startswith("server up in ") and "on http://127.0.0.1:" in run.lines[0]
    result = json.loads(out.read_text())
    assert json.loads(run.stdout.split("\n", 1)[1]) == result  # the printed JSON is the one written
    assert result["target"] == "127.0.0.1" and result["bundle"] == str(pbc_run.last_path)
    assert result["clients"] == 2 and result["errors"] == 0 and result["requests_ok"] > 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["throughput_rps"] == result["requests_ok"]  # per second, over the one counted second
    assert "--images needs at least 1" in run_script("service_load.py", "--images", "0", expect=2).stderr


@pytest.mark.usefixtures("service_env")
def test_service_crash(pbc_run: ScriptRun, tmp_path: Path) -> None:
    out = tmp_path / "crash.json"
    run = run_script("service_crash.py", "--bundle", pbc_run.last_path, "--rounds", "1", "--clients", "2",
                     "--kill-after", "2", "2.5", "--out", out)
    assert run.lines[-1] == "PASS: no acknowledged case lost, no case half written"
    report = json.loads(out.read_text())
    [round_] = report["rounds"]
    assert json.loads(run.lines[0]) == round_
    assert 2.0 <= round_["killed_after_s"] <= 2.5
    summary = report["summary"]
    assert summary["rounds"] == 1 and summary["acknowledged_cases"] > 0  # uploads were accepted before the kill
    assert summary["lost_cases"] == summary["half_written_cases"] == summary["not_served_after_restart"] == 0
    assert round_["cases_in_db"] >= summary["acknowledged_cases"]
    bad = run_script("service_crash.py", "--kill-after", "3", "1", expect=2)
    assert "--kill-after needs 0 < MIN <= MAX" in bad.stderr


@pytest.mark.usefixtures("service_env")
def test_service_attack(pbc_run: ScriptRun, tmp_path: Path) -> None:
    out = tmp_path / "attack.json"
    run = run_script("service_attack.py", "--bundle", pbc_run.last_path, "--workers", "1", "--runs", "1",
                     "--out", out)
    assert run.lines[0].startswith("server up in ") and "on http://127.0.0.1:" in run.lines[0]
    result = json.loads(out.read_text())
    probes = {row["probe"] for row in result["rows"]}
    assert probes == {"burst", "lock-out", "tokens", "big pixels", "junk log-ins"}
    failed = [row for row in result["rows"] if not row["pass"]]
    assert failed == [], failed
    assert f"{len(result['rows'])}/{len(result['rows'])} passed" in run.stdout
