"""bench/several_white_cells.py: the "several white cells in one cell's image" check on cell photographs,
small fields and large ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import disk

from tests.bench.conftest import run_script
from tests.test_scale import smear_field

BOX = ("<object><name>{}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox>"
       "</object>")


def test_photographs_and_small_fields_stay_silent_and_a_large_field_of_blasts_speaks(tmp_path: Path) -> None:
    data = tmp_path / "datasets"
    for k in range(2):  # one nucleus at the centre of a photograph of about 60 um: not counted (under 4 windows)
        pixels = np.asarray(smear_field(20.0, size=(160, 160), seed=k, n_red=6, wbc=False, platelets=0)).copy()
        pixels[disk((80, 80), 22, shape=(160, 160))] = (120, 80, 170)
        (data / "pbc" / "neutrophil").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(data / "pbc" / "neutrophil" / f"BNE_{k}.png")
    (data / "all-taleqani" / "Pre").mkdir(parents=True)
    smear_field(20.0, size=(480, 360), seed=3, n_red=10, wbc=False, blasts=5).save(
        data / "all-taleqani" / "Pre" / "WBC-Malignant-Pre-1.jpg", quality=95)
    (data / "bccd" / "Annotations").mkdir(parents=True)
    (data / "bccd" / "JPEGImages").mkdir(parents=True)
    smear_field(20.0, size=(160, 120), seed=4, n_red=6, platelets=0).save(data / "bccd" / "JPEGImages" / "F.jpg")
    (data / "bccd" / "Annotations" / "F.xml").write_text(f"<annotation>{BOX.format('WBC', 1, 1, 40, 40)}</annotation>")
    run = run_script("several_white_cells.py", "--data", data, "--out", tmp_path / "s.json")
    result = json.loads(run.lines[-1])
    assert result == json.loads((tmp_path / "s.json").read_text())
    assert result["pbc"] == {"images": 2, "flagged": 0, "nuclei_counted": {"1": 2}}
    assert result["all-taleqani"]["flagged"] == 1
    assert result["bccd"]["flagged"] == 0 and result["bccd"]["annotated_vs_counted"] == {"1 annotated, 1 counted": 1}
    refused = run_script("several_white_cells.py", "--data", tmp_path / "nothing", expect=2)
    assert "nothing to measure" in refused.stderr
