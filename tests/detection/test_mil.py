from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from leukoscope.data.manifest import Manifest, Sample
from leukoscope.data.splits import Split
from leukoscope.data.synthetic_smears import SmearSpec, render_smear
from leukoscope.tasks.mil import locate_cells_by_colour, run_mil_experiment


def _fields(root: Path, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    spec = SmearSpec(width=128, height=96, cell_size=48, rbc_per_image=(2, 4), platelets_per_image=(0, 0))
    for label in ("blast", "lymphocyte"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels, _, _ = render_smear(rng, spec, types=[label] * int(rng.integers(1, 3)))
            Image.fromarray(pixels).save(root / label / f"{label}_{i}.png")
    return root


def test_colour_locator_finds_the_white_cells() -> None:
    rng = np.random.default_rng(1)
    pixels, boxes, _ = render_smear(rng, SmearSpec(width=200, height=150, cell_size=60, platelets_per_image=(0, 0),
                                                   rbc_per_image=(3, 5)), types=["blast", "monocyte"])
    found = locate_cells_by_colour(Image.fromarray(pixels))
    wbc = [b for b in boxes if b.label == "WBC"]
    assert len(found) == 2
    for box in wbc:  # each true white cell's centre lies in one located box
        cx, cy = box.center
        assert any(x0 <= cx <= x1 and y0 <= cy <= y1 for x0, y0, x1, y1 in found)


def test_mil_pipeline_on_synthetic_fields(tmp_path: Path) -> None:
    root = _fields(tmp_path / "fields")
    result = run_mil_experiment(root, tmp_path / "mil", model="abas_cnn", cell_size=32, field_size=32, epochs=1,
                                batch_size=8, near_duplicates=False, show_progress=False)
    metrics = json.loads((tmp_path / "mil" / "mil_metrics.json").read_text())
    # the figures are the reports' own (they were only checked to lie in [0, 1])
    from_cells = json.loads((tmp_path / "mil" / "fields_from_cells" / "metrics.json").read_text())
    assert metrics["field_accuracy_from_cells"] == from_cells["accuracy"]
    assert from_cells["test_fields"] == len(Split.load(tmp_path / "mil" / "field_split.json").manifest("test"))
    assert 0.0 <= metrics["whole_image_accuracy"] <= 1.0
    assert sum(metrics["cells"].values()) >= 16
    assert (tmp_path / "mil" / "fields_from_cells" / "report.html").is_file()
    cells = Split.load(tmp_path / "mil" / "cells_split.json")
    fields_by_part = {part: {s.subject for s in samples} for part, samples in cells.assignments.items()}
    parts = list(fields_by_part)
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            assert not fields_by_part[a] & fields_by_part[b]
    assert result.cell_bundle.is_dir() and result.field_bundle is not None


def test_a_whole_image_bundle_is_scored_on_the_same_test_fields_only_if_it_never_saw_them(tmp_path: Path) -> None:
    import pytest

    from leukoscope.data.manifest import DatasetError
    from leukoscope.tasks.mil import check_whole_image_bundle, score_whole_image_bundle

    root = _fields(tmp_path / "fields")
    result = run_mil_experiment(root, tmp_path / "mil", model="abas_cnn", cell_size=32, field_size=32, epochs=1,
                                batch_size=8, near_duplicates=False, show_progress=False)
    split_file = tmp_path / "mil" / "field_split.json"
    split = Split.load(split_file)
    check_whole_image_bundle(result.field_bundle, split.manifest("test"))
    scored = score_whole_image_bundle(result.field_bundle, root, split_file, tmp_path / "scored")
    # the same model on the same test fields: the whole-image run's own test accuracy
    assert scored["whole_image_bundle_accuracy"] == pytest.approx(result.metrics["whole_image_accuracy"])
    with pytest.raises(DatasetError, match="trained or validated on 1 of these test fields"):
        check_whole_image_bundle(result.field_bundle, split.manifest("train").subset([0]))
    # a field the bundle's split never held is refused too (it may have been trained on a copy elsewhere)
    stranger = Manifest([Sample(tmp_path / "elsewhere.png", split.manifest("test")[0].label)])
    with pytest.raises(DatasetError, match="outside its test part"):
        check_whole_image_bundle(result.field_bundle, stranger)
    # a leaky bundle is refused before any cell is located or trained
    # (a split with a bigger test part than the bundle's)
    with pytest.raises(DatasetError, match="trained or validated on"):
        run_mil_experiment(root, tmp_path / "mil-other-split", model="abas_cnn", cell_size=32, field_size=32,
                           epochs=1, batch_size=8, ratios=(0.4, 0.2, 0.4), near_duplicates=False,
                           show_progress=False, compare_whole_image=False, whole_image_bundle=result.field_bundle)
    assert not (tmp_path / "mil-other-split" / "cells_split.json").exists()


def test_mil_command_runs_a_validated_config(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from leukoscope.cli import app

    _fields(tmp_path / "fields")  # read by the config as ./fields
    config = tmp_path / "mil.yaml"
    config.write_text("task: mil\nname: tiny\ndata: {path: ./fields}\nmodel: {cell_size: 32, field_size: 32}\n"
                      "train: {epochs: 1, batch_size: 8}\ncompare: {whole_image: false}\n")
    runner = CliRunner()
    typo = runner.invoke(app, ["mil", "--config", str(config), "model.cel_size=48"])
    assert typo.exit_code == 2 and "model.cell_size" in typo.output
    result = runner.invoke(app, ["mil", "--config", str(config), "--quiet", f"output_root={tmp_path / 'runs'}"])
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    run_dir = bundle.parents[2]  # <run>/runs/<cell run>/bundle
    assert run_dir.name.startswith("tiny-") and (run_dir / "config.yaml").is_file()
    assert "cells located" in (run_dir / "train.log").read_text()
    metrics = json.loads((run_dir / "mil_metrics.json").read_text())
    assert 0.0 <= metrics["field_accuracy_from_cells"] <= 1.0 and "whole_image_accuracy" not in metrics
    # the comparison the run is for, said on the console (it was in mil_metrics.json alone)
    said = " ".join(result.output.split())
    assert (f"fields classified from their cells: accuracy {metrics['field_accuracy_from_cells']:.4f}, macro F1 "
            f"{metrics['field_macro_f1_from_cells']:.4f}") in said
    # `train` dispatches on the config's task as well
    again = runner.invoke(app, ["train", "--config", str(config), "--quiet", f"output_root={tmp_path / 'runs2'}"])
    assert again.exit_code == 0, again.output



def test_mil_runs_with_the_default_relative_output_root_and_a_class_map(tmp_path: Path, monkeypatch) -> None:
    """With output_root relative (the default `runs`), cells.csv's rows were relative and read against the
    CSV's own folder (a doubled path): the cell split no longer matched. A class map dropped the fields'
    subjects from fields.csv, and the whole-image run's split check failed after the cells had trained."""
    from typer.testing import CliRunner

    from leukoscope.cli import app

    root = _fields(tmp_path / "fields")
    manifest = tmp_path / "fields.csv"
    manifest.write_text("path,label,subject\n" + "".join(
        f"{p},{p.parent.name},patient-{k % 4}\n" for k, p in enumerate(sorted(root.rglob("*.png")))))
    config = tmp_path / "mil.yaml"
    config.write_text("task: mil\nname: tiny\ndata: {path: fields.csv, class_map: {blast: blast, lymphocyte: normal}}"
                      "\nmodel: {cell_size: 32, field_size: 32}\ntrain: {epochs: 1, batch_size: 8}\n")
    monkeypatch.chdir(tmp_path)  # output_root: the default, relative "runs"
    result = CliRunner().invoke(app, ["mil", "--config", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").glob("tiny-*")
    metrics = json.loads((run_dir / "mil_metrics.json").read_text())
    assert "whole_image_accuracy" in metrics


def test_detector_locator_crops_as_smear_analysis_does(detector_bundle: Path) -> None:
    from leukoscope.tasks.mil import CellLocator

    rng = np.random.default_rng(2)
    pixels, _, _ = render_smear(rng, SmearSpec(width=160, height=120, cell_size=48), types=["blast"])
    image = Image.fromarray(pixels)
    locator = CellLocator(detector_bundle)
    result = locator.analyzer.analyze(image)
    crops = locator(image)
    assert len(crops) == len(result.cells) > 0
    for crop, cell in zip(crops, result.cells):  # the analyzer's crop: the box plus its margin
        expected = locator.analyzer.crop_cell(image, cell.box)
        assert crop.size == expected.size and np.array_equal(np.asarray(crop), np.asarray(expected))
        x0, y0, x1, y1 = cell.box
        assert crop.size[0] >= x1 - x0 or crop.size[0] == image.size[0]


def test_an_unreadable_test_field_is_left_out_not_the_runs_end(tmp_path: Path) -> None:
    """Fields that cannot be read were skipped when cells were located, then read again to score the test part
    (ImageDecodeError after the cell classifier had trained)."""
    root = _fields(tmp_path / "fields", per_class=6)
    for k in range(4):
        (root / "blast" / f"broken_{k}.png").write_bytes(b"not an image %d" % k)  # four distinct files
    run_mil_experiment(root, tmp_path / "mil", model="abas_cnn", cell_size=32, field_size=32, epochs=1,
                       batch_size=8, near_duplicates=False, show_progress=False, compare_whole_image=False,
                       ratios=(0.5, 0.1, 0.4))
    test = Split.load(tmp_path / "mil" / "field_split.json").manifest("test")
    broken = sum(1 for s in test if s.path.name.startswith("broken"))
    assert broken >= 1  # the split put one in the test part
    metrics = json.loads((tmp_path / "mil" / "fields_from_cells" / "metrics.json").read_text())
    assert metrics["test_fields_left_out"] == broken and metrics["test_fields"] == len(test) - broken
