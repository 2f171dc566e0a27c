"""The command line, end to end, on small generated data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from leukoscope.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained_bundle(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-runs")
    result = invoke("train", "--data", synthetic_root, "--model", "mobilenet_v3_small", "--quiet",
                    f"output_root={out}", "model.image_size=32", "train.epochs=2", "train.lr=0.003",
                    "train.augmentation=geometric")
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    assert (bundle / "bundle.json").exists()
    return bundle


def test_models_lists_the_registry() -> None:
    result = invoke("models")
    assert result.exit_code == 0
    for name in ("abas_cnn", "tusar_convnet", "mobilenet_v2", "resnet50", "vgg19", "densenet121",
                 "efficientnet_b0", "googlenet", "alexnet", "resnet18"):
        assert name in result.output


def test_predict_writes_csv_with_probabilities_and_uncertain(trained_bundle: Path, synthetic_root: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    result = invoke("predict", "--bundle", trained_bundle, synthetic_root / "blast", tmp_path / "broken.jpg",
                    "--out", out, "--threshold", "0.999999")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list((synthetic_root / "blast").iterdir())) + 1
    good = [r for r in rows if not r["error"]]
    assert all(abs(sum(float(r[f"p_{c}"]) for c in ("blast", "lymphocyte", "monocyte", "neutrophil")) - 1) < 1e-4
               for r in good)
    # with a threshold this high almost everything is "uncertain", but top_class is still given
    assert any(r["label"] == "uncertain" and r["top_class"] for r in good)
    broken = [r for r in rows if r["error"]]
    assert len(broken) == 1 and "broken.jpg" in broken[0]["error"]


def test_predict_json_and_explain(trained_bundle: Path, synthetic_root: Path, tmp_path: Path) -> None:
    images = sorted((synthetic_root / "monocyte").iterdir())[:3]
    out = tmp_path / "preds.json"
    result = invoke("predict", "--bundle", trained_bundle, *images, "--out", out, "--explain", tmp_path / "cam")
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [Path(r["source"]).name for r in rows] == [p.name for p in images]
    overlays = sorted((tmp_path / "cam").glob("*.png"))
    assert len(overlays) == 3
    assert Image.open(overlays[0]).size[0] >= 256


def test_evaluate_scores_a_labelled_folder(trained_bundle: Path, synthetic_root: Path, tmp_path: Path) -> None:
    # The folder holds the bundle's own training images: refused, then scored with a warning when asked.
    refused = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--out", tmp_path / "ev")
    assert refused.exit_code == 2 and "of its train images" in refused.output and "--split-file" in refused.output
    assert not (tmp_path / "ev").exists()
    result = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--out", tmp_path / "ev",
                    "--allow-training-data")
    assert result.exit_code == 0, result.output
    assert "says nothing about new images" in (tmp_path / "ev" / "report.html").read_text()
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 96 and 0 <= metrics["accuracy"] <= 1
    assert (tmp_path / "ev" / "report.html").exists()


def test_evaluate_rejects_classes_the_model_does_not_know(trained_bundle: Path, synthetic_root: Path,
                                                           tmp_path: Path) -> None:
    data = tmp_path / "other"
    (data / "eosinophil").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 100, 100)).save(data / "eosinophil" / "a.png")
    result = invoke("evaluate", "--bundle", trained_bundle, "--data", data)
    assert result.exit_code == 2
    assert "eosinophil" in result.output and "does not know" in result.output


def test_clear_errors_for_bad_input(tmp_path: Path, trained_bundle: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = invoke("train", "--data", tmp_path / "empty", f"output_root={tmp_path}")
    assert result.exit_code == 2 and "empty" in result.output
    result = invoke("train", "--data", tmp_path, "train.epoch=3")
    assert result.exit_code == 2 and "train.epochs" in result.output
    result = invoke("predict", "--bundle", tmp_path / "nope", tmp_path)
    assert result.exit_code == 2 and "bundle" in result.output
    result = invoke("predict", "--bundle", trained_bundle, tmp_path / "missing.png")
    assert result.exit_code == 2 and "missing.png" in result.output
    result = invoke("predict", "--bundle", trained_bundle, tmp_path / "empty")
    assert result.exit_code == 2 and "no images" in result.output


def test_split_command_saves_a_checked_split(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "split.json"
    result = invoke("split", "--data", synthetic_root, "--out", out, "--ratios", "0.75,0.25")
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert set(payload["splits"]) == {"train", "test"}
    assert len(payload["splits"]["test"]) == 24


def test_corrupt_image_policy(synthetic_root: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    (data / "blast" / "zz_truncated.png").write_bytes((data / "blast" / "blast_0000.png").read_bytes()[:200])
    common = ["train", "--data", data, "--model", "mobilenet_v3_small", "--quiet", f"output_root={tmp_path}/runs",
              "model.image_size=32", "train.epochs=1", "data.near_duplicates=false"]
    failed = invoke(*common, "data.on_corrupt=fail")
    assert failed.exit_code == 2 and "zz_truncated.png" in failed.output
    skipped = invoke(*common, "data.on_corrupt=skip")
    assert skipped.exit_code == 0, skipped.output
    run_dir = Path(skipped.stdout.strip().splitlines()[-1]).parent
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [Path(s["path"]).name for s in metrics["skipped_images"]] == ["zz_truncated.png"]
    assert "zz_truncated.png" in (run_dir / "report.html").read_text()


def test_demo_generates_data_trains_and_reports(tmp_path: Path) -> None:
    result = invoke("demo", "--out", tmp_path / "demo", "--minutes", "0.02", "--quiet")
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    assert (bundle / "bundle.json").is_file() and (bundle.parent / "report.html").is_file()
    classes = sorted(p.name for p in (tmp_path / "demo" / "data").iterdir())
    assert classes == ["blast", "lymphocyte", "monocyte", "neutrophil"]
    assert all(len(list((tmp_path / "demo" / "data" / c).iterdir())) == 100 for c in classes)
    assert "demo finished" in result.output


def test_train_resume_continues_the_run(synthetic_root: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(synthetic_root.parent)  # a relative data path, as a user types it
    first = invoke("train", "--data", synthetic_root.name, "--model", "mobilenet_v3_small", "--quiet",
                   f"output_root={tmp_path}", "model.image_size=32", "train.epochs=1", "train.keep_checkpoint=true")
    assert first.exit_code == 0, first.output
    run_dir = Path(first.stdout.strip().splitlines()[-1]).parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the run stored absolute data paths: resuming works from any folder
    resumed = invoke("train", "--resume", run_dir.resolve(), "--quiet", "train.epochs=2")
    assert resumed.exit_code == 0, resumed.output
    assert Path(resumed.stdout.strip().splitlines()[-1]).parent == run_dir
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert "resuming at epoch 2" in (run_dir / "train.log").read_text()


def test_evaluate_names_a_missing_split_part(trained_bundle: Path, synthetic_root: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    assert invoke("split", "--data", synthetic_root, "--out", split).exit_code == 0
    result = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--split-file", split,
                    "--subset", "holdout")
    assert result.exit_code == 2 and "no part named 'holdout'" in result.output
