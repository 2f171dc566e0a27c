"""bench/camera_shift.py: the same cells seen through other cameras."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.bench.conftest import bench_module, run_script

BACKGROUND = (230, 220, 215)  # a slightly warm slide: a bluish camera turns it blue


class ByLight:
    """Reads the light: 'blast' when the crop's background is bluer than red."""

    def predict_images(self, images):
        return [type("P", (), {"top_class": "blast" if np.asarray(image)[0, 0, 2] > np.asarray(image)[0, 0, 0]
                               else "lymphocyte", "unfamiliar": False}) for image in images]


class ByCell:
    """Reads the cell: 'blast' when the dark nucleus is large, whatever the light."""

    def predict_images(self, images):
        def nucleus(image) -> float:
            grey = np.asarray(image.convert("L")).astype(float)
            return float((grey < np.median(grey) * 0.6).mean())

        return [type("P", (), {"top_class": "blast" if nucleus(image) > 0.12 else "lymphocyte", "unfamiliar": False})
                for image in images]


def _crop(path: Path, nucleus: int) -> str:
    pixels = np.full((40, 40, 3), BACKGROUND, np.uint8)
    pixels[20 - nucleus:20 + nucleus, 20 - nucleus:20 + nucleus] = (90, 50, 130)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_a_classifier_that_reads_the_light_changes_its_calls_with_the_camera(tmp_path: Path, monkeypatch) -> None:
    test = ([{"path": _crop(tmp_path / f"b{k}.png", 9), "label": "blast", "subject": f"b{k}"} for k in range(4)]
            + [{"path": _crop(tmp_path / f"l{k}.png", 4), "label": "lymphocyte", "subject": f"l{k}"} for k in range(4)])
    split = {"format_version": 1, "classes": ["blast", "lymphocyte"], "info": {},
             "splits": {"train": [], "val": test[:2], "test": test}}
    (tmp_path / "split.json").write_text(json.dumps(split))
    shift = bench_module("camera_shift")
    results = {}
    for name, reader in (("light", ByLight()), ("cell", ByCell())):
        monkeypatch.setattr(shift.zoo, "_loaded_classifier", lambda bundle, backend="torch", r=reader: r)
        out = tmp_path / f"{name}.json"
        assert shift.main(["--bundle", "any", "--split", str(tmp_path / "split.json"), "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())["sets"]["in-domain test"]
    light, cell = results["light"], results["cell"]
    assert set(light) == set(shift.VARIANTS)
    assert light["as taken"] == {"cells": 8, "type_right": 0.5, "called_blast": 0.0, "unfamiliar": 0.0,
                                 "calls_changed": 0.0, "most_called": [["lymphocyte", 8]]}
    assert light["bluish (0.80, 0.92, 1.15)"]["called_blast"] == 1.0
    assert light["bluish (0.80, 0.92, 1.15)"]["calls_changed"] == 1.0
    assert all(row["type_right"] == 1.0 and row["calls_changed"] == 0.0 for row in cell.values()), cell
    out = tmp_path / "val.json"  # the validation part, to choose between recipes without the test part
    assert shift.main(["--bundle", "any", "--split", str(tmp_path / "split.json"), "--part", "val",
                       "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sets"]["in-domain val"]["as taken"]["cells"] == 2


def test_without_a_split_it_says_what_to_give(tmp_path: Path) -> None:
    run = run_script("camera_shift.py", "--bundle", "any", "--split", tmp_path / "missing.json", expect=2)
    assert "give --split" in run.stderr
