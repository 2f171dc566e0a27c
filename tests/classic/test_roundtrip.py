"""train -> evaluate -> bundle -> predict for classical models, through the CLI and the Python API."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from leukoscope.cli import app
from leukoscope.engine.config import load_config
from leukoscope.tasks.classify import run_experiment
from leukoscope.bundle import BundleError, load_bundle, read_bundle_info
from leukoscope.inference.predictor import CellClassifier

runner = CliRunner()

SMALL_FEATURES = ["features.histogram_bins=8", "features.lbp_radii=[1]", "features.glcm_distances=[1]"]


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result, [line for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def svm_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One svm_rbf run trained through `leukoscope train`; returns the bundle path."""
    out = tmp_path_factory.mktemp("classic-runs")
    result, lines = _invoke("train", "--data", str(synthetic_root), "--model", "svm_rbf", "--quiet",
                            "model.image_size=48", f"output_root={out}", "name=svm", *SMALL_FEATURES)
    assert result.exit_code == 0, result.output
    return Path(lines[-1])


def test_train_writes_the_same_run_layout_as_a_cnn(svm_run: Path):
    run_dir = svm_run.parent
    for name in ("config.yaml", "split.json", "metrics.json", "report.html", "train.log", "history.json",
                 "figures/roc.png", "figures/pr.png", "figures/confusion_matrix.png", "bundle/bundle.json",
                 "bundle/model.skops"):
        assert (run_dir / name).is_file(), name
    assert not (svm_run / "model.safetensors").exists()
    # the OOD flag reads the standardised features (a classical model's logits have no energy score)
    assert set(read_bundle_info(svm_run).ood["thresholds"]) == {"mahalanobis"}
    assert CellClassifier.from_bundle(svm_run).predict_images([Image.new("RGB", (48, 48))])[0].ood_score is not None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test" and metrics["framework"] == "sklearn"
    assert metrics["parameters"] is None
    assert metrics["train_minutes"] > 0 and metrics["images_per_second"] > 0
    for key in ("precision", "recall", "specificity", "f1"):
        assert 0 <= metrics["macro"][key] <= 1
    assert metrics["roc_auc_macro_ovr"] is not None
    assert metrics["accuracy"] > 0.5  # 4 balanced classes: chance is 0.25
    assert metrics["features"]["n_features"] == 8 * 6 + 16 + 6 + 10 + 9
    info = read_bundle_info(svm_run)
    assert info.framework == "sklearn" and info.model_name == "svm_rbf"
    assert info.feature_spec["histogram_bins"] == 8
    assert info.classes == ["blast", "lymphocyte", "monocyte", "neutrophil"]


def test_predict_cli_and_python_api_agree(svm_run: Path, synthetic_root: Path, tmp_path: Path):
    out = tmp_path / "preds.csv"
    result, lines = _invoke("predict", "--bundle", str(svm_run), str(synthetic_root / "blast"), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert lines[-1] == str(out)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 24 and {"p_blast", "p_neutrophil", "label", "top_class"} <= set(rows[0])
    classifier = CellClassifier.from_bundle(svm_run)
    predictions = classifier.predict_paths(sorted((synthetic_root / "blast").iterdir()))
    by_source = {row["source"]: row for row in rows}
    for prediction in predictions:
        row = by_source[prediction.source]
        assert row["top_class"] == prediction.top_class
        assert float(row["p_blast"]) == pytest.approx(prediction.probabilities["blast"], abs=1e-5)
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0)
    assert sum(p.top_class == "blast" for p in predictions) >= 18


def test_evaluate_on_the_test_split_reproduces_the_training_report(svm_run: Path, synthetic_root: Path,
                                                                   tmp_path: Path):
    run_dir = svm_run.parent
    result, lines = _invoke("evaluate", "--bundle", str(svm_run), "--data", str(synthetic_root),
                            "--split-file", str(run_dir / "split.json"), "--out", str(tmp_path / "eval"))
    assert result.exit_code == 0, result.output
    assert Path(lines[-1]).is_file()
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert scored["n"] == trained["n"]
    assert scored["accuracy"] == pytest.approx(trained["accuracy"])  # temperature never changes the argmax
    assert scored["confusion_matrix"] == trained["confusion_matrix"]


def test_explain_says_grad_cam_is_not_for_classical_models(svm_run: Path, synthetic_root: Path, tmp_path: Path):
    result, _ = _invoke("predict", "--bundle", str(svm_run), str(synthetic_root / "blast" / "blast_0000.png"),
                        "--out", str(tmp_path / "p.csv"), "--explain", str(tmp_path / "heat"))
    assert result.exit_code == 2
    assert "not available" in result.output and "classical" in result.output
    assert not (tmp_path / "heat").exists()


def test_evaluate_refuses_data_with_other_classes(svm_run: Path, synthetic_root: Path, tmp_path: Path):
    other = tmp_path / "other"
    for label in ("blast", "plasma_cell"):
        (other / label).mkdir(parents=True)
        for source in sorted((synthetic_root / "blast").iterdir())[:2]:
            shutil.copy(source, other / label / source.name)
    result, _ = _invoke("evaluate", "--bundle", str(svm_run), "--data", str(other), "--out", str(tmp_path / "e"))
    assert result.exit_code == 2
    assert "plasma_cell" in result.output and "does not know" in result.output


def test_a_damaged_or_dangerous_bundle_is_refused(svm_run: Path, tmp_path: Path):
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    broken = shutil.copytree(svm_run, tmp_path / "broken")
    (broken / "model.skops").write_bytes(b"not a zip file")
    with pytest.raises(BundleError, match="cannot read the model"):
        load_bundle(broken)

    hostile = shutil.copytree(svm_run, tmp_path / "hostile")
    sio.dump(Pipeline([("run", FunctionTransformer(os.system))]), hostile / "model.skops")
    with pytest.raises(BundleError, match="refusing to load"):
        load_bundle(hostile)

    no_spec = shutil.copytree(svm_run, tmp_path / "no-spec")
    payload = json.loads((no_spec / "bundle.json").read_text())
    payload["feature_spec"] = None
    (no_spec / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match="feature_spec"):
        load_bundle(no_spec)

    missing = shutil.copytree(svm_run, tmp_path / "missing")
    (missing / "model.skops").unlink()
    with pytest.raises(BundleError, match="model.skops is missing"):
        load_bundle(missing)


def test_python_api_with_segmentation_and_edge_copies(synthetic_root: Path, tmp_path: Path):
    config = load_config(overrides=[
        f"data.path={synthetic_root}", "model.name=decision_tree", "model.image_size=48", f"output_root={tmp_path}",
        "data.segmentation=hsv", "train.edge_copies=true", "features.families=[histogram,shape]",
        "features.histogram_bins=8",
    ])
    result = run_experiment(config, show_progress=False)
    assert result.metrics["features"]["edge_copies"] is True
    assert result.fit.stopped_because.startswith("fitted")
    model, info = load_bundle(result.bundle_dir)
    assert info.preprocessing.segmentation == "hsv"
    classifier = CellClassifier(model, info)
    assert classifier.preprocessing.segmenter is not None  # the bundle segments at prediction time too
    image_path = sorted((synthetic_root / "monocyte").iterdir())[0]
    prediction = classifier.predict_paths([image_path])[0]
    assert prediction.top_class in info.classes


def test_model_options_that_a_classical_model_lacks_are_named(synthetic_root: Path, tmp_path: Path):
    result, _ = _invoke("train", "--data", str(synthetic_root), "--model", "naive_bayes", "--quiet",
                        "model.image_size=48", f"output_root={tmp_path}", "model.options={n_estimators: 5}",
                        *SMALL_FEATURES)
    assert result.exit_code == 2
    assert "n_estimators" in result.output and "naive_bayes" in result.output


def test_models_command_lists_classical_models():
    result, _ = _invoke("models")
    assert result.exit_code == 0
    rows = [line.split() for line in result.output.splitlines()]
    kinds = {row[0]: row[1] for row in rows if len(row) > 1}
    assert kinds.get("svm_rbf") == "classic" and kinds.get("jabeena_cnn") == "classifier"
    assert np.isin(["naive_bayes", "random_forest", "gradient_boosting"], list(kinds)).all()
