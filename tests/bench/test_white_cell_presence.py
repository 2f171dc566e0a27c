"""bench/white_cell_presence.py: the "no white cell at the centre" check on cells, and on smear windows without one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import disk

from tests.bench.conftest import run_script
from tests.test_scale import smear_field


def _cell(path: Path, seed: int) -> None:
    """Red cells around a violet nucleus at the centre, as a cell photograph."""
    pixels = np.asarray(smear_field(20.0, size=(160, 160), seed=seed, n_red=6, wbc=False, platelets=0)).copy()
    pixels[disk((80, 80), 22, shape=(160, 160))] = (120, 80, 170)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_cells_pass_and_red_cells_alone_are_doubted(tmp_path: Path) -> None:
    data = tmp_path / "datasets"
    for k in range(3):
        _cell(data / "pbc" / "neutrophil" / f"BNE_{k}.png", k)
    (data / "bccd" / "Annotations").mkdir(parents=True)
    (data / "bccd" / "JPEGImages").mkdir(parents=True)
    for k in range(3):  # fields of red cells only: no white-cell box
        field = smear_field(20.0, size=(640, 480), seed=10 + k, wbc=False, platelets=0)
        field.save(data / "bccd" / "JPEGImages" / f"F{k}.jpg")
        (data / "bccd" / "Annotations" / f"F{k}.xml").write_text(
            "<annotation><object><name>RBC</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax>"
            "<ymax>20</ymax></bndbox></object></annotation>")
    crops = tmp_path / "crops"
    _cell(crops / "train" / "a.png", 5)
    _cell(crops / "controls" / "bccd" / "neutrophil" / "b.png", 6)
    (crops / "train.csv").write_text(f"path,label,subject\n{crops / 'train' / 'a.png'},neutrophil,pbc-a\n")
    run = run_script("white_cell_presence.py", "--data", data, "--crops", crops, "--out", tmp_path / "p.json")
    result = json.loads(run.lines[-1])
    assert result == json.loads((tmp_path / "p.json").read_text())
    assert result["training crops"] == {"images": 1, "doubted": 0}
    assert result["control crops: bccd"] == {"images": 1, "doubted": 0}
    assert result["pbc photographs, framed"] == {"images": 3, "doubted": 0}
    windows = result["BCCD windows without a white cell"]
    assert windows["images"] >= 3 and windows["doubted"] == windows["images"]
    fields = result["BCCD fields uploaded as a cell, centre outside every white cell"]  # every third field read
    assert fields == {"images": 1, "doubted": 1}
    refused = run_script("white_cell_presence.py", "--data", tmp_path / "nothing", expect=2)
    assert "nothing to measure" in refused.stderr
