"""`leukoscope segment`: masks, side-by-side figures and an index, for files and folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from leukoscope.cli import app
from leukoscope.inference.segment_files import segment_files

runner = CliRunner()


def _cell_image(path: Path, size: int = 96) -> Path:
    image = np.full((size, size, 3), (235, 228, 232), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < 20**2] = (95, 50, 145)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def test_cli_saves_masks_figures_and_an_index(tmp_path: Path):
    folder = tmp_path / "cells"
    _cell_image(folder / "a" / "one.png")
    _cell_image(folder / "b" / "one.png")  # same name in another sub-folder: no clash
    Image.new("RGB", (64, 64), (230, 230, 230)).save(folder / "blank.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    single = _cell_image(tmp_path / "single.png")
    out = tmp_path / "masks"
    result = runner.invoke(app, ["segment", str(folder), str(single), "--out", str(out), "--figure",
                                 "--segmented", "--quiet"])
    assert result.exit_code == 3, result.output  # one image unreadable: the others' masks written, a script told
    assert result.stdout.strip().splitlines()[-1] == str(out / "masks.csv")
    assert "3 segmented, 1 with nothing stained found, 1 unreadable" in " ".join(result.output.split())
    rows = {Path(r["source"]).relative_to(tmp_path).as_posix(): r for r in csv.DictReader((out / "masks.csv").open())}
    assert len(rows) == 5
    assert rows["cells/broken.jpg"]["error"] and not rows["cells/broken.jpg"]["mask"]
    assert rows["cells/blank.png"]["found"] == "False" and float(rows["cells/blank.png"]["mask_fraction"]) == 0
    for name, expected in (("cells/a/one.png", out / "a" / "one_mask.png"), ("single.png", out / "single_mask.png")):
        row = rows[name]
        assert Path(row["mask"]) == expected
        mask = np.asarray(Image.open(expected))
        assert set(np.unique(mask)) == {0, 255}
        assert float(row["mask_fraction"]) == (mask == 255).mean() > 0.1
        assert Path(row["figure"]).is_file() and Path(row["segmented"]).is_file()
    assert (out / "b" / "one_mask.png").is_file()


def test_figures_are_optional_and_method_is_checked(tmp_path: Path):
    image = _cell_image(tmp_path / "c.png")
    rows = segment_files([image], tmp_path / "out", method="hsv", show_progress=False)
    assert rows[0].found and not rows[0].figure and not (tmp_path / "out" / "c_figure.png").exists()
    result = runner.invoke(app, ["segment", str(image), "--out", str(tmp_path / "x"), "--method", "otsu"])
    assert result.exit_code == 2 and "unknown segmentation method 'otsu'" in result.output
    result = runner.invoke(app, ["segment", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no such file" in result.output
