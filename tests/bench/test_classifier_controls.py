"""bench/classifier_controls.py: one classifier bundle scored as bench/zoo.py scores it, on any backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.conftest import run_script


def test_a_float_graph_scores_the_controls_as_torch_does(zoo_datasets: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from leukoscope.engine.config import load_config
    from leukoscope.inference.export import export_onnx
    from leukoscope.tasks.classify import run_experiment

    run_script("zoo.py", "--data", zoo_datasets, "--out", tmp_path / "zoo", "--crops-only", "--blasts-per-subtype", "4",
               "--benign-cells-per-field", "2")
    crops = tmp_path / "zoo" / "crops"
    config = load_config(overrides=[f"output_root={tmp_path}", f"data.path={crops / 'train.csv'}",
                                    "model.name=abas_cnn", "model.image_size=32", "train.epochs=1",
                                    "train.batch_size=8", "train.threads=1"])
    bundle = run_experiment(config, show_progress=False).bundle_dir
    graph = export_onnx(bundle, tmp_path / "graph")
    rows = {}
    for backend, scored in (("torch", bundle), ("onnxruntime", graph)):
        out = tmp_path / f"{backend}.json"
        run = run_script("classifier_controls.py", "--bundle", scored, "--crops", crops, "--backend", backend,
                         "--out", out)
        result = json.loads(out.read_text())
        rows[backend] = result["rows"]
        assert result["backend"] == backend
        assert [json.loads(line)["row"] for line in run.lines] == list(rows[backend])
    controls = json.loads((crops / "controls.json").read_text())["controls"]
    assert list(rows["torch"]) == ["in-domain", *controls]
    assert rows["torch"]["in-domain"]["cells"] > 0 and 0.0 <= rows["torch"]["bccd"]["ood_auroc"] <= 1.0
    for name, row in rows["torch"].items():  # the same calls: a float graph gives torch's answers to rounding
        graph_row = rows["onnxruntime"][name]
        assert graph_row["cells"] == row["cells"]
        for key in ("called_blast", "accuracy", "type_accuracy"):
            assert graph_row.get(key) == pytest.approx(row.get(key), abs=0.05)
    no_graph = run_script("classifier_controls.py", "--bundle", bundle, "--crops", crops, "--backend", "onnxruntime",
                          expect=2)
    assert "onnxruntime" in no_graph.stderr and "export" in no_graph.stderr
    missing = run_script("classifier_controls.py", "--bundle", bundle, "--crops", tmp_path, expect=2)
    assert "controls.json does not exist" in missing.stderr
