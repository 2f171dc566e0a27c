"""bench/two_stage.py, the blast decider + pbc-only typer probe, on tiny generated data in ../shared's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.bench.conftest import bench_module, run_script

TINY_CLASSIFIER = ["model.name=abas_cnn", "model.image_size=32", "train.epochs=1", "train.batch_size=8",
                   "train.threads=1"]


def test_composed_keeps_the_blast_call_and_shares_the_rest_by_the_typer() -> None:
    two_stage = bench_module("two_stage")
    decider = np.array([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])  # classes: neutrophil, blast, lymphocyte
    typer = np.array([[0.5, 0.5], [0.9, 0.1]])               # classes: lymphocyte, neutrophil
    both = two_stage.composed(decider, typer, ["neutrophil", "blast", "lymphocyte"], ["lymphocyte", "neutrophil"])
    np.testing.assert_allclose(both, [[0.35, 0.3, 0.35], [0.09, 0.1, 0.81]])
    np.testing.assert_allclose(both.sum(axis=1), 1.0)


def _train(tmp_path: Path, name: str, *overrides: str) -> Path:
    from leukoscope.engine.config import load_config
    from leukoscope.tasks.classify import run_experiment

    config = load_config(overrides=[f"output_root={tmp_path / name}", *TINY_CLASSIFIER, *overrides])
    return Path(run_experiment(config, show_progress=False).bundle_dir)


def test_two_stage_on_the_zoo_crops(zoo_datasets: Path, tmp_path: Path) -> None:
    zoo_out = tmp_path / "zoo"
    run_script("zoo.py", "--data", zoo_datasets, "--out", zoo_out, "--crops-only", "--blasts-per-subtype", "4",
               "--benign-cells-per-field", "2")
    decider = _train(tmp_path, "decider", f"data.path={zoo_out / 'crops' / 'train.csv'}")
    from leukoscope.bundle import read_bundle_info
    from leukoscope.data.splits import Split

    split_file = read_bundle_info(decider).split_file
    run_script("two_stage.py", "prepare", "--split", split_file, "--out", tmp_path / "typer-data")
    decider_split, typer_split = Split.load(split_file), Split.load(tmp_path / "typer-data" / "split.json")
    assert "blast" not in typer_split.classes and sorted([*typer_split.classes, "blast"]) == decider_split.classes
    for part, samples in typer_split.assignments.items():  # pbc's cells of each part, in the same part
        wanted = [s.path for s in decider_split.assignments[part] if s.subject.startswith("pbc-")]
        assert [s.path for s in samples] == wanted and wanted
    typer = _train(tmp_path, "typer", f"data.path={tmp_path / 'typer-data' / 'pbc.csv'}",
                   f"data.split_file={tmp_path / 'typer-data' / 'split.json'}")
    assert read_bundle_info(typer).classes == typer_split.classes

    run = run_script("two_stage.py", "score", "--decider", decider, "--typer", typer, "--split", split_file,
                     "--crops", zoo_out / "crops", "--out", tmp_path / "scores.json")
    assert "| bccd: types" in run.stdout
    result = json.loads((tmp_path / "scores.json").read_text())
    # The decider-alone rows are bench/zoo.py's own scoring of the same bundle.
    zoo = bench_module("zoo")
    in_domain, _ = zoo.score_in_domain(decider, split_file)
    alone = result["in_domain"]["decider"]
    assert alone["accuracy"] == pytest.approx(in_domain["accuracy"], abs=1e-4)
    assert {k: alone[k] for k in in_domain["accuracy_by_source"]} == pytest.approx(in_domain["accuracy_by_source"],
                                                                                     abs=1e-4)
    controls = {name: [(Path(p), label) for p, label in cells] for name, cells in
                json.loads((zoo_out / "crops" / "controls.json").read_text())["controls"].items()}
    scored = zoo.score_controls(decider, controls)
    for name, row in result["controls"].items():
        assert row["cells"] == scored[name]["cells"]
        assert row["called_blast_decider"] == pytest.approx(scored[name]["called_blast"], abs=1e-4)
        assert 0.0 <= row["called_blast_composed"] <= 1.0
    assert result["controls"]["bccd"]["types_decider"] == pytest.approx(scored["bccd"]["type_accuracy"], abs=1e-4)
    assert 0.0 <= result["controls"]["bccd"]["types_composed"] <= 1.0
    assert result["in_domain"]["composed"]["cells"] == in_domain["cells"]
    # A typer must rank exactly the decider's classes other than blast.
    refused = run_script("two_stage.py", "score", "--decider", decider, "--typer", decider, "--split", split_file,
                         "--crops", zoo_out / "crops", expect=1)
    assert "must be the decider's" in refused.stderr


def test_score_without_crops_says_what_to_run(tmp_path: Path) -> None:
    run = run_script("two_stage.py", "score", "--decider", "x", "--typer", "y", "--split", "s.json",
                     "--crops", tmp_path, expect=2)
    assert "bench/zoo.py --crops-only" in run.stderr


def test_score_of_a_missing_bundle_says_which(tmp_path: Path) -> None:
    (tmp_path / "controls.json").write_text('{"controls": {}}')
    run = run_script("two_stage.py", "score", "--decider", tmp_path / "gone", "--typer", "y", "--split", "s.json",
                     "--crops", tmp_path, expect=2)
    assert "gone: bundle folder does not exist" in run.stderr
