"""bench/stain_swap.py: all-taleqani's Benign cells in the blasts' colours and its blasts in the Benign cells'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.bench.conftest import bench_module, run_script

PINK, LAVENDER = (235, 200, 215), (170, 160, 225)  # the Benign slides' background, the blast slides'


class ByColour:
    """Reads the slide: 'blast' when the crop's background is lavender (blue above red)."""

    def predict_images(self, images):
        return [type("P", (), {"top_class": "blast" if np.asarray(image)[0, 0, 2] > np.asarray(image)[0, 0, 0]
                               else "lymphocyte"}) for image in images]


class ByCell:
    """Reads the cell: 'blast' when the dark nucleus is large, whatever the colours."""

    def predict_images(self, images):
        def nucleus(image) -> float:  # share of pixels much darker than the crop's background
            grey = np.asarray(image.convert("L")).astype(float)
            return float((grey < np.median(grey) - 40).mean())

        return [type("P", (), {"top_class": "blast" if nucleus(image) > 0.12 else "lymphocyte"}) for image in images]


def _crop(path: Path, background: tuple[int, int, int], nucleus: int) -> str:
    pixels = np.full((40, 40, 3), background, np.uint8)
    pixels[20 - nucleus:20 + nucleus, 20 - nucleus:20 + nucleus] = (60, 30, 90)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_a_classifier_that_reads_the_slide_follows_the_swapped_colours(tmp_path: Path, monkeypatch) -> None:
    crops = tmp_path / "crops"
    benign = [_crop(crops / f"benign{k}.png", PINK, 5) for k in range(6)]  # small nuclei, pink slides
    split = {"train": [{"path": _crop(crops / f"tb{k}.png", LAVENDER, 9), "label": "blast",
                        "subject": f"taleqani-b{k}"} for k in range(4)] +
                      [{"path": _crop(crops / f"tl{k}.png", PINK, 5), "label": "lymphocyte",
                        "subject": f"taleqani-l{k}"} for k in range(4)] +
                      # neither another lab's crops nor crops recoloured for training give colours: both
                      # would make a lymphocyte donor lavender (and so the swapped blasts stay blasts)
                      [{"path": _crop(crops / f"p{k}.png", LAVENDER, 5), "label": "lymphocyte",
                        "subject": f"pbc-{k}"} for k in range(20)] +
                      [{"path": _crop(crops / "recoloured" / "lymphocyte" / f"r{k}.png", LAVENDER, 5),
                        "label": "lymphocyte", "subject": f"taleqani-r{k}"} for k in range(20)],
             "val": [],
             "test": [{"path": _crop(crops / f"x{k}.png", LAVENDER, 9), "label": "blast", "subject": f"taleqani-x{k}"}
                      for k in range(5)]}
    (tmp_path / "split.json").write_text(json.dumps({"splits": split}))
    (crops / "controls.json").write_text(json.dumps({"controls": {"taleqani-benign": [[p, "not blast"]
                                                                                      for p in benign]}}))
    swap = bench_module("stain_swap")
    results = {}
    for name, reader in (("slide", ByColour()), ("cell", ByCell())):
        monkeypatch.setattr(swap.zoo, "_loaded_classifier", lambda bundle, backend="torch", r=reader: r)
        out = tmp_path / f"{name}.json"
        assert swap.main(["--bundle", "any", "--crops", str(crops), "--split", str(tmp_path / "split.json"),
                          "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    slide, cell = results["slide"], results["cell"]
    assert slide["benign_control_in_blast_colours"] == {"cells": 6, "called_blast": 0.0,
                                                        "called_blast_own_colours": 0.0, "called_blast_swapped": 1.0}
    assert slide["test_blasts_in_benign_colours"] == {"cells": 5, "called_blast": 1.0,
                                                      "called_blast_own_colours": 1.0, "called_blast_swapped": 0.0}
    assert cell["benign_control_in_blast_colours"]["called_blast_swapped"] == 0.0
    assert cell["test_blasts_in_benign_colours"]["called_blast_swapped"] == 1.0


def test_without_the_crops_it_says_what_to_run_first(tmp_path: Path) -> None:
    (tmp_path / "split.json").write_text(json.dumps({"splits": {"train": [], "val": [], "test": []}}))
    run = run_script("stain_swap.py", "--bundle", "any", "--crops", tmp_path, "--split", tmp_path / "split.json",
                     expect=2)
    assert "controls.json does not exist: run `python bench/zoo.py --crops-only` first" in run.stderr
