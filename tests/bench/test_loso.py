"""bench/loso.py, the leave-one-source-out table, on tiny generated data in ../shared's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.conftest import bench_module, run_script


def test_scores_weigh_every_class_alike() -> None:
    loso = bench_module("loso")
    truth = ["neutrophil"] * 8 + ["lymphocyte"] * 2
    constant = loso.scores(truth, ["neutrophil"] * 10, loso.TYPES)
    assert constant["accuracy"] == 0.8 and constant["balanced_accuracy"] == 0.5  # only the classes present count
    assert constant["recall"] == {"lymphocyte": 0.0, "neutrophil": 1.0}
    outside = loso.scores(["monocyte", "monocyte"], ["platelet", "monocyte"], loso.TYPES)
    assert outside["accuracy"] == 0.5  # a call outside the task's classes is wrong
    blast = loso.scores(["blast", "blast", "not blast", "not blast"], ["blast", "not blast", "blast", "blast"],
                        (loso.BLAST, loso.NOT_BLAST))
    assert blast["sensitivity"] == 0.5 and blast["specificity"] == 0.0 and blast["balanced_accuracy"] == 0.25


def test_loso_table_on_the_zoo_crops(zoo_datasets: Path, tmp_path: Path) -> None:
    zoo_out = tmp_path / "zoo"
    run_script("zoo.py", "--data", zoo_datasets, "--out", zoo_out, "--crops-only", "--blasts-per-subtype", "4",
               "--benign-cells-per-field", "2")
    from leukoscope.engine.config import load_config
    from leukoscope.tasks.classify import run_experiment

    config = load_config(overrides=[f"output_root={tmp_path}", f"data.path={zoo_out / 'crops' / 'train.csv'}",
                                    "model.name=abas_cnn", "model.image_size=32", "train.epochs=1",
                                    "train.batch_size=8", "train.threads=1"])
    classifier = run_experiment(config, show_progress=False).bundle_dir
    run = run_script("loso.py", "--crops", zoo_out / "crops", "--classifier", classifier, "--out", tmp_path / "loso",
                     "--models", "abas_cnn,random_forest", "--set", "model.image_size=32", "train.epochs=1",
                     "train.batch_size=4")
    assert "| task | left out |" in run.stdout
    rows = json.loads((tmp_path / "loso" / "loso-results.json").read_text())["rows"]
    both_ways = [("white-cell type", "BCCD", "pbc"), ("white-cell type", "pbc", "BCCD"),
                 ("blast or not", "cnmc-mini", "all-taleqani"), ("blast or not", "all-taleqani", "cnmc-mini")]
    assert [(r["task"], r["left_out"], r["trained_on"]) for r in rows] == [
        ("white-cell type", "BCCD", "pbc + all-taleqani, abas_cnn"),
        ("blast or not", "cnmc-mini", "pbc + all-taleqani, abas_cnn"),
        *[(task, out, f"{source}, {model}") for model in ("abas_cnn", "random_forest")
          for task, out, source in both_ways]]
    # The rows of the classifier given agree with bench/zoo.py's own control scoring.
    zoo = bench_module("zoo")
    controls = {name: [(Path(p), label) for p, label in cells] for name, cells in
                json.loads((zoo_out / "crops" / "controls.json").read_text())["controls"].items()}
    scored = zoo.score_controls(classifier, controls)
    bccd, cnmc = rows[0]["left_out_score"], rows[1]["left_out_score"]
    assert bccd["cells"] == scored["bccd"]["cells"]  # the generated BCCD cells are all of the four types
    assert bccd["accuracy"] == pytest.approx(scored["bccd"]["type_accuracy"], abs=1e-4)
    assert cnmc["cells"] == 20
    assert cnmc["sensitivity"] == pytest.approx(scored["cnmc-all"]["called_blast"], abs=1e-4)
    assert cnmc["specificity"] == pytest.approx(1 - scored["cnmc-hem"]["called_blast"], abs=1e-4)
    # The models trained here never saw the source they are tested on: every pbc cell of the four types.
    pbc_types = sum(1 for line in (zoo_out / "crops" / "train.csv").read_text().splitlines()[1:]
                    if line.split(",")[1] in {"eosinophil", "lymphocyte", "monocyte", "neutrophil"}
                    and ",pbc-" in line)
    by_direction = {(r["left_out"], r["trained_on"]): r for r in rows}
    assert by_direction["pbc", "BCCD, random_forest"]["left_out_score"]["cells"] == pbc_types == 16
    assert by_direction["BCCD", "pbc, random_forest"]["left_out_score"]["cells"] == bccd["cells"]
    trained_on_cnmc = by_direction["all-taleqani", "cnmc-mini, random_forest"]
    assert 0 < trained_on_cnmc["training_cells"] < 20 and trained_on_cnmc["in_domain"]["cells"] > 0  # its split
    taleqani_cells = sum(1 for line in (zoo_out / "crops" / "train.csv").read_text().splitlines()
                         if ",taleqani-" in line) + len(controls["taleqani-benign"])
    assert trained_on_cnmc["left_out_score"]["cells"] == taleqani_cells
    assert by_direction["cnmc-mini", "all-taleqani, random_forest"]["left_out_score"]["cells"] == 20


def test_loso_without_crops_says_what_to_run(tmp_path: Path) -> None:
    run = run_script("loso.py", "--crops", tmp_path, expect=2)
    assert "bench/zoo.py --crops-only" in run.stderr

