"""Shared by the smoke tests of bench/: run a script as ``python bench/<script> ARGS`` would, on tiny
generated data laid out like the real datasets, and the runs that later scripts take their bundles from."""

from __future__ import annotations

import io
import os
import runpy
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

from leukoscope.data.synthetic import SyntheticSpec, make_synthetic_dataset
from leukoscope.data.synthetic_smears import SmearSpec, make_synthetic_smears, render_smear

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"

#: all-taleqani's class folders; the generated fields of each hold one synthetic cell type.
TALEQANI_CLASSES = {"Benign": "lymphocyte", "Early": "blast", "Pre": "monocyte", "Pro": "neutrophil"}
#: Small fields with one or two white cells each: the detector and smear steps stay well under a second.
TINY_SMEAR = SmearSpec(width=160, height=120, cell_size=48, wbc_per_image=(1, 2), rbc_per_image=(3, 6),
                       platelets_per_image=(1, 2), seed=3)
#: A detector that trains one epoch in seconds (system A's small backbone, half-size input).
TINY_DETECTOR = ["model.name=fasterrcnn_abas", "train.epochs=1", "train.batch_size=4", "train.threads=1",
                 "train.warmup_iters=2", "model.options={input_scale: 0.5, roi_batch_size: 32, detections_per_img: 30}"]


@dataclass(frozen=True)
class ScriptRun:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.strip().splitlines()

    @property
    def last_path(self) -> Path:
        """Every benchmark prints its result (a bundle, usually) on its last line."""
        return Path(self.lines[-1])

    def line_starting(self, prefix: str) -> str:
        found = [line for line in self.lines if line.startswith(prefix)]
        assert found, f"no line starts with {prefix!r} in:\n{self.stdout}"
        return found[0]


def bench_module(name: str):
    """A bench/ script imported as a module (its functions, without running main)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str | Path, expect: int = 0) -> ScriptRun:
    """Run ``bench/<name>`` with ``args`` as its command line, in this process.

    In-process because each script would otherwise pay the 3-8 s import of torch,
    torchvision and scikit-learn again; the script still runs as ``__main__`` with its
    folder first on ``sys.path``, as ``python bench/<name>`` runs it.
    """
    script = BENCH / name
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *map(str, args)]
    sys.path.insert(0, str(BENCH))
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:  # sys.exit(2), sys.exit("message") or argparse
        if isinstance(exc.code, str):
            err.write(exc.code)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    run = ScriptRun(code, out.getvalue(), err.getvalue())
    assert run.code == expect, f"{name} exited with {run.code}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr[-3000:]}"
    return run


@pytest.fixture
def service_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """For the service scripts: the ``python -m leukoscope.cli serve`` they start imports this checkout's
    source (also where it is not installed in editable mode), and their work folders (``mkdtemp``: data
    directory, server log) land in the test's tmp_path instead of piling up in /tmp."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="session")
def cell_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-per-folder dataset (pbc's layout): 4 synthetic cell types x 10 images of 32 px."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("cells"),
                                  SyntheticSpec(image_size=32, images_per_class=10, seed=1))


@pytest.fixture(scope="session")
def taleqani_fields(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-taleqani's layout (Benign/Early/Pre/Pro folders of fields with a few white cells each), 6 fields a class."""
    root = tmp_path_factory.mktemp("all-taleqani")
    rng = np.random.default_rng(0)
    spec = SmearSpec(width=96, height=96, cell_size=40, rbc_per_image=(2, 4), platelets_per_image=(0, 0))
    for folder, cell_type in TALEQANI_CLASSES.items():
        (root / folder).mkdir()
        for index in range(6):
            pixels, _, _ = render_smear(rng, spec, types=[cell_type] * int(rng.integers(1, 3)))
            Image.fromarray(pixels).save(root / folder / f"WBC-{folder}-{index:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def cbc_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CBC's layout: {Training,Validation,Testing}/{Images,Annotations}, Validation holding byte copies
    of Training images as CBC's does."""
    root = tmp_path_factory.mktemp("cbc")
    training = make_synthetic_smears(root / "Training", 8, TINY_SMEAR)
    make_synthetic_smears(root / "Testing", 4, replace(TINY_SMEAR, seed=4))
    for kind in ("Images", "Annotations"):
        (root / "Validation" / kind).mkdir(parents=True)
    for split in ("Training", "Testing"):
        (root / split / "JPEGImages").rename(root / split / "Images")
    for image in training[:2]:
        for kind, name in (("Images", image.image_path.name), ("Annotations", f"{image.image_path.stem}.xml")):
            (root / "Validation" / kind / name).write_bytes((root / "Training" / kind / name).read_bytes())
    return root


PBC_TYPES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
CELL_OF = {"basophil": "blast", "eosinophil": "monocyte", "erythroblast": "lymphocyte", "ig": "neutrophil",
           "lymphocyte": "lymphocyte", "monocyte": "monocyte", "neutrophil": "neutrophil", "platelet": "lymphocyte"}


@pytest.fixture(scope="session")
def zoo_datasets(tmp_path_factory: pytest.TempPathFactory, taleqani_fields: Path, cbc_folder: Path) -> Path:
    """pbc, all-taleqani, cnmc-mini, bccd and cbc folders as ../shared/datasets lays them out."""
    root = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(1)
    spec = replace(TINY_SMEAR, width=96, height=96, wbc_per_image=(1, 1))
    for name in PBC_TYPES:
        (root / "pbc" / name).mkdir(parents=True)
        for k in range(4):
            pixels, _, _ = render_smear(rng, spec, types=[CELL_OF[name]])
            Image.fromarray(pixels).save(root / "pbc" / name / f"{name}_{k}.jpg", quality=95)
    (root / "all-taleqani").symlink_to(taleqani_fields)
    (root / "cbc").symlink_to(cbc_folder)
    for label in ("all", "hem"):  # one cell of each of ten patients (UID_<patient>_<image>_<cell>_<label>)
        (root / "cnmc-mini" / label).mkdir(parents=True)
        for k in range(10):
            pixels = np.zeros((96, 96, 3), np.uint8)
            # Cells of their own (size, place, texture): not near-duplicates, so a split can deal patients.
            cell = disk((30 + 4 * k, 66 - 4 * k), (24 if label == "all" else 16) + k % 3, shape=(96, 96))
            pixels[cell] = rng.integers(60, 200, (len(cell[0]), 3))
            patient = f"{k + 1}" if label == "all" else f"H{k + 1}"
            Image.fromarray(pixels).save(root / "cnmc-mini" / label / f"UID_{patient}_1_1_{label}.bmp")
    images = make_synthetic_smears(root / "bccd", 6, replace(TINY_SMEAR, seed=7))
    rows = ["image,wbc_type"] + [f"{image.image_path.name},{kind}" for image, kind in
                                 zip(images, ["NEUTROPHIL", "LYMPHOCYTE", "MONOCYTE", "EOSINOPHIL", "NEUTROPHIL",
                                              "NEUTROPHIL, LYMPHOCYTE"])]
    (root / "bccd" / "wbc_types.csv").write_text("\n".join(rows) + "\n")
    return root


def classification_run(script: str, data: Path, out: Path) -> ScriptRun:
    """taleqani.py or pbc.py with one small CNN, 32 px, one epoch."""
    return run_script(script, "--data", data, "--models", "abas_cnn", "--image-size", "32", "--epochs", "1",
                      "--batch-size", "16", "--out", out)


@pytest.fixture(scope="session")
def taleqani_run(taleqani_fields: Path, tmp_path_factory: pytest.TempPathFactory) -> ScriptRun:
    """bench/taleqani.py: its bundle and split feed gradcam_check."""
    return classification_run("taleqani.py", taleqani_fields, tmp_path_factory.mktemp("bench-taleqani"))


@pytest.fixture(scope="session")
def pbc_run(cell_folders: Path, tmp_path_factory: pytest.TempPathFactory) -> ScriptRun:
    """bench/pbc.py: its single-cell classifier bundle is the one the service scripts serve."""
    return classification_run("pbc.py", cell_folders, tmp_path_factory.mktemp("bench-pbc"))


@pytest.fixture(scope="session")
def detector_run(cbc_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> ScriptRun:
    """bench/detect_cbc.py for one epoch of a small detector: its bundle feeds smear_speed."""
    return run_script("detect_cbc.py", "--data", cbc_folder, "--out", tmp_path_factory.mktemp("bench-cbc"),
                      *TINY_DETECTOR)
