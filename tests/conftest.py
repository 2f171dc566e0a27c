"""Shared fixtures: small generated data, and the real datasets when ../shared is present."""

from __future__ import annotations

import os

# One thread per library: the tests' tensors are tiny, and on a 2-core machine
# shared with other work, OpenMP thread pools oversubscribe and slow tests 10x.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
# pytest-xdist's workers get COLUMNS=80, which the CLI's console takes as a terminal's width (leukoscope.progress):
# paths in its messages then break across lines where a piped run prints them whole, as a run without -n does.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from leukoscope.data.synthetic import SyntheticSpec, make_synthetic_dataset  # noqa: E402

torch.set_num_threads(1)

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Code under test may set torch's threads (a CLI's --threads, bench scripts run in this process):
    back to one after each test, so that no test's results depend on which tests ran before it (the
    Ray engine's tests compare the local engine's probabilities with the actors' exactly)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def fresh_python(code: str, *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 600) -> str:
    """Run ``code`` in a new Python process that imports this checkout's leukoscope (what a user's
    command imports, unlike this test process, which has imported torch already); its last line
    of output, after checking that it succeeded."""
    import subprocess
    import sys

    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                         os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": path, **(env or {})})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/datasets/<name>``; skips the test when it is absent."""
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} is not present (real datasets live in ../shared)")
    return path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four classes x 24 PNG cells of 64 px, made once per test session."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), SyntheticSpec(image_size=64, images_per_class=24, seed=1)
    )
