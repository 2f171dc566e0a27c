"""Every script in bench/ has a smoke test here (one broke unnoticed before these existed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.conftest import BENCH

#: Modules imported by the scripts, not run on their own (classification.py runs through taleqani.py and pbc.py).
LIBRARIES = {"_service_common.py", "_timing.py", "classification.py"}


def test_every_bench_script_is_run_by_a_smoke_test() -> None:
    here = Path(__file__)
    tests = "".join(path.read_text() for path in here.parent.glob("*.py") if path != here)
    scripts = sorted(path.name for path in BENCH.glob("*.py") if path.name not in LIBRARIES)
    assert len(scripts) >= 10
    assert [name for name in scripts if f'"{name}"' not in tests] == []


def test_a_script_runs_as_a_program_from_another_folder(tmp_path: Path) -> None:
    """The smoke tests run the scripts in-process; this runs one as ``python bench/x.py`` from elsewhere,
    so the import of its sibling module (``_service_common``) through the script's own folder is covered."""
    pytest.importorskip("httpx")  # imported at the top of the service scripts (the service extra)
    script = BENCH / "service_crash.py"
    done = subprocess.run([sys.executable, str(script), "--kill-after", "3", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--kill-after needs 0 < MIN <= MAX" in done.stderr
