"""Smoke test of bench/parity.py: the same seeded run from two source trees (here, this one twice)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.conftest import run_script

pytestmark = pytest.mark.slow  # two child processes, each importing torch

SRC = Path(__file__).resolve().parents[2] / "src"


def test_parity_of_a_tree_with_itself(tmp_path: Path) -> None:
    run = run_script("parity.py", "--against", SRC, "--models", "decision_tree", "--image-size", "32",
                     "--epochs", "1")
    assert run.lines == [line for line in run.lines if line.startswith("decision_tree: identical (test accuracy ")]
    assert len(run.lines) == 1
    missing = run_script("parity.py", "--against", tmp_path, expect=2)
    assert "holds no leukoscope package" in missing.stderr
