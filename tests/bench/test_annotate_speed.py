"""Smoke test of bench/annotate_speed.py: it draws its field and prints the times of one drawing."""

from __future__ import annotations

import re

from tests.bench.conftest import bench_module, run_script


def test_annotate_speed_prints_wall_and_cpu_seconds() -> None:
    run = run_script("annotate_speed.py", "--repeats", "2")
    times = re.search(r"wall ([\d.]+) s, CPU ([\d.]+) s \(median of 2; wall ([\d.]+), ([\d.]+)\)", run.lines[-1])
    assert times is not None, run.stdout
    assert 0 < float(times.group(1)) < 30 and float(times.group(2)) > 0
    field, result = bench_module("annotate_speed").field_and_result(width=400, height=300, cells=5, others=10)
    assert field.size == (400, 300) and len(result.cells) == 5
