"""Fixtures for the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoscope.data.synthetic import render_cell

from tests.conftest import shared_dataset


@pytest.fixture
def cnmc_mini() -> Path:
    return shared_dataset("cnmc-mini")


@pytest.fixture
def all_taleqani() -> Path:
    return shared_dataset("all-taleqani")


def write_cell(path: Path, label: str = "blast", seed: int = 0, size: int = 64, **save_kwargs) -> Path:
    """Render one synthetic cell (distinct per seed) and save it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_cell(label, np.random.default_rng(seed), size)).save(path, **save_kwargs)
    return path


@pytest.fixture
def cell_writer():
    return write_cell


@pytest.fixture
def leaky_root(tmp_path: Path) -> Path:
    """Two classes, C-NMC-like names (several images per subject) and injected duplicates.

    - ``all``: subjects 1..6, three images each; ``hem``: subjects H1..H6, three images each.
    - ``all/UID_1_1_1_all.bmp`` has a byte-identical copy ``all/copy_of_1.bmp`` (no subject);
    - ``hem/UID_H2_1_1_hem.bmp`` has a re-encoded, resized copy ``hem/resized_H2.png`` (no subject);
    - ``all/loose_*.png``: 6 subject-less images, two of them byte-identical.
    """
    root = tmp_path / "leaky"
    seed = 100
    for label, prefix in (("all", ""), ("hem", "H")):
        for subject in range(1, 7):
            for image in range(1, 4):
                seed += 1
                write_cell(root / label / f"UID_{prefix}{subject}_{image}_1_{label}.bmp", "blast" if label == "all" else "lymphocyte", seed)
    (root / "all" / "copy_of_1.bmp").write_bytes((root / "all" / "UID_1_1_1_all.bmp").read_bytes())
    original = Image.open(root / "hem" / "UID_H2_1_1_hem.bmp")
    original.resize((58, 58), Image.Resampling.BILINEAR).save(root / "hem" / "resized_H2.png")
    for k in range(6):
        write_cell(root / "all" / f"loose_{k}.png", "blast", 900 + k)
    (root / "all" / "loose_5.png").write_bytes((root / "all" / "loose_4.png").read_bytes())
    return root
