"""The out-of-distribution flag end to end: fitted at the end of training, used by `predict`,
refitted by `leukoscope calibrate-ood` for an existing bundle."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from leukoscope import bundle as bundle_module
from leukoscope.bundle import OOD_FILE, BundleError, model_identity, read_bundle_info
from leukoscope.cli import app
from leukoscope.engine.config import load_config
from leukoscope.evaluation.ood import ood_auroc
from leukoscope.inference.predictor import CellClassifier
from leukoscope.io import load_image
from leukoscope.tasks.classify import run_experiment

runner = CliRunner()


@pytest.fixture(scope="module")
def run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ood-runs")
    config = load_config(overrides=[
        f"data.path={synthetic_root}", f"output_root={out}", "model.name=abas_cnn", "model.image_size=32",
        "train.epochs=3", "train.batch_size=16", "train.lr=0.003", "train.threads=1",
        "train.device=cpu"])  # calibrate-ood refits on the CPU: the same device gives the same statistics
    return run_experiment(config, show_progress=False)


def _noise(n: int, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _split_paths(run, part: str) -> list[Path]:
    return [Path(row["path"]) for row in json.loads((run.run_dir / "split.json").read_text())["splits"][part]]


def test_training_stores_the_ood_statistics(run) -> None:
    payload = json.loads((run.bundle_dir / "bundle.json").read_text())
    assert payload["format_version"] == 3 and (run.bundle_dir / OOD_FILE).is_file()
    ood = payload["ood"]
    assert ood["method"] == "mahalanobis" and set(ood["thresholds"]) == {"mahalanobis", "energy"}
    assert ood["threshold_from"] == "val" and ood["fit_images"] == len(_split_paths(run, "train"))
    assert ood["dimensions"] == 60
    # the recorded share is the flag's on the test part, as the bundle flags those images (it was range-checked)
    classifier = CellClassifier.from_bundle(run.bundle_dir)
    flagged = [p.unfamiliar for p in classifier.predict_paths(_split_paths(run, "test"))]
    assert ood["test_unfamiliar_share"] == pytest.approx(sum(flagged) / len(flagged), abs=1e-3)
    said = (run.run_dir / "train.log").read_text()
    assert f"{100 * ood['test_unfamiliar_share']:.1f}% of test images flagged" in said
    # the light of the training images (leukoscope.light), which `analyze` checks each field against
    light = ood["light"]
    assert 10 <= light["images"] <= ood["fit_images"] and light["red"][0] <= light["red"][1]
    assert light["blue"][0] <= light["blue"][1]


def test_a_model_that_normalises_each_image_records_no_light() -> None:
    from leukoscope.evaluation.ood import OodStats
    from leukoscope.preprocessing import Preprocessing
    from leukoscope.tasks.ood import record_light

    pixels = np.full((12, 3, 16, 16), 230, np.uint8)
    for settings, recorded in (({}, True), ({"stain": "white_balance"}, False), ({"stain": "macenko"}, False),
                               ({"colour": "gray"}, False), ({"standardize": True}, False)):
        stats = OodStats("energy", {"energy": 0.0})
        record_light(stats, pixels, Preprocessing(16, **settings))
        assert ("light" in stats.details) is recorded, settings


def test_held_out_cells_score_lower_than_noise(run) -> None:
    classifier = CellClassifier.from_bundle(run.bundle_dir)
    cells = [load_image(path) for path in _split_paths(run, "test")]
    _, familiar = classifier.outputs(cells)
    _, noise = classifier.outputs(_noise(len(cells)))
    assert ood_auroc(familiar, noise) > 0.9
    assert all(p.unfamiliar for p in classifier.predict_images(_noise(5)))


def test_predict_writes_the_score_and_the_flag(run, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(_noise(3)):
        image.save(folder / f"noise{index}.png")
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(folder), "--bundle", str(run.bundle_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert {"ood_score", "unfamiliar"} <= set(rows[0])
    assert all(row["unfamiliar"] == "True" and float(row["ood_score"]) > 0 for row in rows)
    assert "3 of 3 images are unlike the training data" in " ".join(result.output.split())


def test_calibrate_ood_on_the_training_data_reproduces_the_training_statistics(run, synthetic_root: Path,
                                                                                tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(run.bundle_dir, bundle)
    trained = read_bundle_info(bundle).ood
    (bundle / OOD_FILE).unlink()  # refitted from scratch, from the bundle's recorded split
    result = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(synthetic_root), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(bundle)
    refitted = read_bundle_info(bundle).ood
    assert "the train and val parts of" in refitted["fitted_on"] and refitted["threshold_from"] == "val"
    for method, threshold in trained["thresholds"].items():
        assert refitted["thresholds"][method] == pytest.approx(threshold, rel=1e-4)  # same images, same model
    assert refitted["light"] == trained["light"]
    assert CellClassifier.from_bundle(bundle).ood.threshold == pytest.approx(trained["thresholds"]["mahalanobis"],
                                                                             rel=1e-4)


def test_calibrate_ood_on_other_data_splits_that_data(run, synthetic_root: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(run.bundle_dir, bundle)
    before = model_identity(bundle)
    other = tmp_path / "site-b"
    for cls in ("blast", "lymphocyte", "monocyte", "neutrophil"):
        (other / cls).mkdir(parents=True)
        for path in sorted((synthetic_root / cls).iterdir())[:10]:
            Image.open(path).rotate(90).save(other / cls / path.name)
    result = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(other), "--method", "energy",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    ood = read_bundle_info(bundle).ood
    assert ood["method"] == "energy" and "a new 80/20 split" in ood["fitted_on"]
    assert "is not the bundle's training data" in ood["fitted_on"] and ood["threshold_from"] == "held-out"
    assert ood["fit_images"] + ood["threshold_images"] == 40
    # the weights are unchanged, the flag is not: results made before and after must not look made alike
    after = model_identity(bundle)
    assert after["weights_sha256"] == before["weights_sha256"] and after["ood_sha256"] != before["ood_sha256"]
    payload = json.loads((bundle / "bundle.json").read_text())
    payload["ood"]["fitted_on"] = "described otherwise"  # how it was fitted is not what it answers by
    (bundle / "bundle.json").write_text(json.dumps(payload))
    assert model_identity(bundle) == after
    payload["ood"]["thresholds"]["energy"] += 1.0
    (bundle / "bundle.json").write_text(json.dumps(payload))
    assert model_identity(bundle)["ood_sha256"] != after["ood_sha256"]
    missing = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(other),
                                  "--split-file", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and "split file does not exist" in missing.output
    wrong = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(other), "--method", "knn"])
    assert wrong.exit_code == 2 and "mahalanobis or energy" in wrong.output


def test_calibrate_ood_reads_the_stages_it_is_told_and_predict_and_the_export_use_them(
        run, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(run.bundle_dir, bundle)
    result = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(synthetic_root), "--quiet",
                                 "--stages", "features.3, features.7"])
    assert result.exit_code == 0, result.output
    assert "stages features.3, features.7" in " ".join(result.output.split())
    ood = read_bundle_info(bundle).ood
    assert ood["stages"] == ["features.3", "features.7"] and len(ood["part_scales"]) == 3
    # Format 7: leukoscope before it asks for an upgrade instead of calling the statistics incomplete.
    assert json.loads((bundle / "bundle.json").read_text())["format_version"] == 7
    with monkeypatch.context() as older:
        older.setattr(bundle_module, "READABLE_VERSIONS", (1, 2, 3, 4, 5, 6))
        older.setattr(bundle_module, "BUNDLE_FORMAT_VERSION", 6)
        with pytest.raises(BundleError, match="format 7 is not supported.*upgrade leukoscope"):
            read_bundle_info(bundle)
    classifier = CellClassifier.from_bundle(bundle)
    assert classifier.ood.stages == ("features.3", "features.7") and len(classifier.ood.widths) == 3
    cells = [load_image(path) for path in _split_paths(run, "test")]
    _, familiar = classifier.outputs(cells)
    _, noise = classifier.outputs(_noise(len(cells)))
    assert ood_auroc(familiar, noise) > 0.9
    # the exported graph's embedding output holds the same parts: the same scores on onnxruntime
    pytest.importorskip("onnxruntime")
    from leukoscope.inference.export import export_onnx

    exported_dir = export_onnx(bundle, tmp_path / "exported")
    exported = CellClassifier.from_bundle(exported_dir, backend="onnxruntime")
    assert np.allclose(exported.outputs(cells)[1], familiar, rtol=1e-3, atol=1e-3)
    # refitted without the stages, the graph's embedding no longer fits the statistics: said at once, and
    # the graph is refused (a graph of other stages of the same total width would score silently wrong)
    result = runner.invoke(app, ["calibrate-ood", "--bundle", str(exported_dir), "--data", str(synthetic_root),
                                 "--quiet", "--stages", "none"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "now read the stages none and its graph gives ['features.3', 'features.7']" in said
    assert "run `leukoscope export` on the bundle again" in said
    with pytest.raises(BundleError, match="its OOD statistics now read the stages none"):
        CellClassifier.from_bundle(exported_dir, backend="onnxruntime")
    assert CellClassifier.from_bundle(exported_dir).ood.widths == (60,)  # torch reads what the statistics do
    # --stages none: the penultimate embedding alone, stored as before stages existed
    result = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(synthetic_root), "--quiet",
                                 "--stages", "none"])
    assert result.exit_code == 0, result.output
    assert "stages" not in read_bundle_info(bundle).ood and CellClassifier.from_bundle(bundle).ood.widths == (60,)
    assert json.loads((bundle / "bundle.json").read_text())["format_version"] == 3  # as before stages existed
    wrong = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(synthetic_root), "--quiet",
                                "--stages", "features.99"])
    assert wrong.exit_code == 2 and "no submodule 'features.99'" in wrong.output
    assert "stages" not in read_bundle_info(bundle).ood  # the refused call left the stored statistics alone


def test_without_a_val_part_the_threshold_is_set_on_held_out_training_images_never_on_test(
        run, synthetic_root: Path, tmp_path: Path) -> None:
    """A split without a val part set the flag's threshold on its test part, which then no longer tested it."""
    from leukoscope.data.readers import read_dataset
    from leukoscope.data.splits import Split, make_split
    from leukoscope.tasks.ood import fit_parts

    split_file = make_split(read_dataset(synthetic_root), ratios=(0.8, 0.0, 0.2), seed=0).save(tmp_path / "s.json")
    split = Split.load(split_file)
    assert not split.assignments.get("val")
    train, held, name, source = fit_parts(run.bundle_dir, synthetic_root, split_file)
    tested = {s.path.resolve() for s in split.manifest("test")}
    trained = {s.path.resolve() for s in split.manifest("train")}
    used = {s.path.resolve() for s in [*train, *held]}
    assert name == "held-out train" and "its test part is left alone" in source
    assert not used & tested and used == trained and len(held) >= len(trained) // 6
    views = runner.invoke(app, ["calibrate-ood", "--bundle", str(run.bundle_dir), "--data", str(synthetic_root),
                                "--split-file", str(split_file), "--views", "4", "--quiet"])
    assert views.exit_code == 2 and "has no val part: leave --views out" in views.output
    # a split with a val part, but data of its training images alone: the same fifth of them, not a new split
    # (which mixed the train part with nothing and called the data "not the bundle's training data")
    split_file = make_split(read_dataset(synthetic_root), ratios=(0.7, 0.1, 0.2), seed=0).save(tmp_path / "v.json")
    split = Split.load(split_file)
    only_train = tmp_path / "train.csv"
    only_train.write_text("path,label\n" + "".join(f"{s.path},{s.label}\n" for s in split.manifest("train")))
    train, held, name, source = fit_parts(run.bundle_dir, only_train, split_file)
    assert name == "held-out train" and "holds none of the val part" in source
    assert {s.path.resolve() for s in [*train, *held]} == {s.path.resolve() for s in split.manifest("train")}


def test_a_test_share_flagged_far_above_the_aim_is_warned_of() -> None:
    """The demo flagged 22.5% of its 40 test images (same lab, never trained on) against the 5% its threshold aims
    at; nothing said so."""
    from leukoscope.tasks.ood import excess_flagged_warning

    warning = excess_flagged_warning(0.225, 40, 0.95, 40, "val")
    assert warning.startswith("the OOD flag calls 9 of this run's 40 test images unfamiliar (22.5%)")
    assert "95th percentile of 40 val images' scores" in warning
    # 4 of 40 (10%) is within what a 5% aim gives by chance on 40 images; 3 of 60 is on the aim
    assert excess_flagged_warning(0.1, 40, 0.95, 40, "val") is None
    assert excess_flagged_warning(0.05, 60, 0.95, 60, "val") is None
