"""Test-time views: a classifier that averages a cell's rotations and mirror images, set in training
(``predict.views``) or on an existing bundle by ``leukoscope calibrate-ood --views``."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from leukoscope import bundle as bundle_module
from leukoscope.bundle import BundleError, BundleInfo, load_bundle, model_identity, read_bundle_info
from leukoscope.data.splits import Split
from leukoscope.engine.learner import create_learner
from leukoscope.evaluation.calibration import temperature_fit
from leukoscope.cli import app
from leukoscope.engine.config import ConfigError, load_config, resolve_init
from leukoscope.inference.predictor import CellClassifier
from leukoscope.io import load_image
from leukoscope.preprocessing import Preprocessing, batched_logits, dihedral_views, over_views
from leukoscope.tasks.classify import preprocessing_of, run_experiment

runner = CliRunner()


def _train(root: Path, out: Path, *extra: str):
    config = load_config(overrides=[
        f"data.path={root}", f"output_root={out}", "model.name=abas_cnn", "model.image_size=32", "train.epochs=4",
        "train.batch_size=16", "train.lr=0.003", "train.threads=1", "train.device=cpu", *extra])
    return run_experiment(config, show_progress=False)


@pytest.fixture(scope="module")
def one_view(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    return _train(synthetic_root, tmp_path_factory.mktemp("one-view"))


def _asymmetric(size: int = 32) -> Image.Image:
    """A square image unlike its own rotations and mirror images, at the models' input size (no resampling)."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[: size // 3, : size // 2] = (200, 40, 120)  # one dark corner block, off every axis
    return Image.fromarray(pixels)


def _turned(image: Image.Image) -> list[Image.Image]:
    """The image turned by 90, 180 and 270 degrees, and its mirror images."""
    t = Image.Transpose
    return [image.transpose(op) for op in (t.ROTATE_90, t.ROTATE_180, t.ROTATE_270, t.FLIP_LEFT_RIGHT,
                                           t.FLIP_TOP_BOTTOM, t.TRANSPOSE, t.TRANSVERSE)]


def test_the_views_are_the_eight_symmetries_of_the_square_in_numpy_and_torch() -> None:
    batch = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    eight = dihedral_views(batch, 8)
    assert eight.shape == (16, 3, 4, 4)
    assert len({view.tobytes() for view in eight[::2]}) == 8  # the first image's eight views all differ
    assert np.array_equal(dihedral_views(batch, 4), eight[:8])
    assert np.array_equal(dihedral_views(torch.from_numpy(batch), 8).numpy(), eight)
    assert dihedral_views(batch, 1) is batch
    # averaging: one row per image, the mean of its views' rows
    rows = np.arange(16, dtype=np.float32).reshape(8, 2)  # 4 views of 2 images, view after view
    (mean,) = over_views(lambda b: (rows,), batch, 4)
    assert np.array_equal(mean, np.array([[6, 7], [8, 9]], dtype=np.float32))  # rows 0, 2, 4, 6 and 1, 3, 5, 7


def test_a_bundle_with_eight_views_gives_one_answer_for_a_cell_however_it_lies(one_view, tmp_path: Path) -> None:
    image = _asymmetric()
    single = CellClassifier.from_bundle(one_view.bundle_dir)
    first, *others = single.probabilities([image, *_turned(image)])
    assert max(np.abs(first - other).max() for other in others) > 1e-4  # one view: the answer depends on it
    eight_dir = tmp_path / "eight"
    shutil.copytree(one_view.bundle_dir, eight_dir)
    info_file = eight_dir / "bundle.json"
    payload = json.loads(info_file.read_text())
    payload["preprocessing"]["views"] = 8
    payload["format_version"] = 8
    info_file.write_text(json.dumps(payload))
    eight = CellClassifier.from_bundle(eight_dir)
    probabilities, scores = eight.outputs([image, *_turned(image)])
    assert np.allclose(probabilities, probabilities[0], atol=1e-5)
    assert np.allclose(scores, scores[0], rtol=1e-4)
    # the average, not one view: it differs from the single view's answer
    assert np.abs(probabilities[0] - first).max() > 1e-4


def test_calibrate_ood_sets_the_views_and_refits_the_temperature_in_one_write(
        one_view, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(one_view.bundle_dir, bundle)
    before = read_bundle_info(bundle)
    result = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(synthetic_root), "--quiet",
                                 "--views", "4"])
    assert result.exit_code == 0, result.output
    assert "4 test-time views; temperature" in " ".join(result.output.split())
    assert "warning" not in result.output  # a bundle never exported has no stale graph to warn of
    after = read_bundle_info(bundle)
    assert after.preprocessing.views == 4 and after.temperature != before.temperature
    assert "temperature refitted on the val part" in after.provenance["views"]
    assert json.loads((bundle / "bundle.json").read_text())["format_version"] == 8
    assert (bundle / "model.safetensors").read_bytes() == (one_view.bundle_dir / "model.safetensors").read_bytes()
    assert "accuracy" not in after.metrics and after.metrics["best_epoch"] == before.metrics["best_epoch"]
    assert model_identity(bundle)["views"] == 4 and "views" not in model_identity(one_view.bundle_dir)
    # a leukoscope that does not know views must not read such a bundle one view at a time
    with monkeypatch.context() as older:
        older.setattr(bundle_module, "READABLE_VERSIONS", (1, 2, 3, 4, 5, 6, 7))
        older.setattr(bundle_module, "BUNDLE_FORMAT_VERSION", 7)
        with pytest.raises(BundleError, match="format 8 is not supported.*upgrade leukoscope"):
            read_bundle_info(bundle)
    # back to one view: the default leaves bundle.json as a format-3 bundle writes it
    result = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(synthetic_root), "--quiet",
                                 "--views", "1"])
    assert result.exit_code == 0, result.output
    payload = json.loads((bundle / "bundle.json").read_text())
    assert "views" not in payload["preprocessing"] and payload["format_version"] == 3
    assert payload["temperature"] == pytest.approx(before.temperature, rel=1e-3)  # the same logits, the same fit


def test_wrong_views_are_refused_before_anything_is_written(one_view, synthetic_root: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(one_view.bundle_dir, bundle)
    written = (bundle / "bundle.json").read_bytes()
    result = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(synthetic_root),
                                 "--views", "3"])
    assert result.exit_code == 2 and "--views must be one of 1, 4, 8, got 3" in result.output
    assert (bundle / "bundle.json").read_bytes() == written
    with pytest.raises(ValueError, match="views must be one of"):
        Preprocessing(32, views=2)
    with pytest.raises(ConfigError, match="views"):
        load_config(overrides=["predict.views=5"])
    classical = load_config(overrides=[f"data.path={synthetic_root}", "model.name=random_forest", "predict.views=4"])
    with pytest.raises(ConfigError, match="classical model: leave predict.views at 1"):
        create_learner(classical, ["a", "b"], preprocessing_of(classical))
    # `leukoscope train` refuses it before a run folder exists or an image is read (here: none to read)
    runs = tmp_path / "runs"
    unreadable = classical.model_copy(update={"output_root": str(runs), "data": classical.data.model_copy(
        update={"path": str(tmp_path / "no-such-folder")})})
    with pytest.raises(ConfigError, match="classical model: leave predict.views at 1"):
        run_experiment(unreadable, show_progress=False)
    assert not runs.exists()
    with pytest.raises(BundleError, match="a classical model reads each image once"):
        BundleInfo("random_forest", ["a", "b"], Preprocessing(32, views=8), framework="sklearn")
    # another site's images: no validation part of the bundle's own to refit its temperature on
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(synthetic_root, elsewhere)
    # (a whole copy would be the training data moved, which a split reads where it is now: one image less)
    next(elsewhere.rglob("*.png")).unlink()
    result = runner.invoke(app, ["calibrate-ood", "--bundle", str(bundle), "--data", str(elsewhere), "--quiet",
                                 "--views", "8"])
    assert result.exit_code != 0 and "validation part of the split the bundle was trained with" in " ".join(
        result.output.split())
    assert (bundle / "bundle.json").read_bytes() == written
    # a hand-edited bundle.json that sets views under an older format number
    payload = json.loads(written)
    payload["preprocessing"]["views"] = 8
    (bundle / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match="sets 8 test-time views, which only format 8 and later have"):
        read_bundle_info(bundle)


def test_training_with_views_records_them_and_a_fine_tune_keeps_them(
        synthetic_root: Path, tmp_path: Path) -> None:
    run = _train(synthetic_root, tmp_path / "runs", "predict.views=8")
    info = read_bundle_info(run.bundle_dir)
    assert info.preprocessing.views == 8 and info.format_version == 8
    # its temperature is fitted on the validation part's eight-view logits, not on one view's
    model, _ = load_bundle(run.bundle_dir)
    val = Split.load(run.run_dir / "split.json").manifest("val")
    pixels, kept, _ = info.preprocessing.decode(val)
    eight = batched_logits(model, pixels, info.preprocessing)
    one = batched_logits(model, pixels, replace(info.preprocessing, views=1))
    assert np.abs(eight - one).max() > 1e-3
    assert info.temperature == pytest.approx(temperature_fit(eight, np.asarray(kept.targets)).temperature, rel=1e-4)
    # its recorded test accuracy is that of the eight views: the bundle scores the same
    classifier = CellClassifier.from_bundle(run.bundle_dir)
    test = [(Path(row["path"]), row["label"]) for row in
            json.loads((run.run_dir / "split.json").read_text())["splits"]["test"]]
    calls = [p.top_class for p in classifier.predict_images([load_image(path) for path, _ in test])]
    assert np.mean([c == label for c, (_, label) in zip(calls, test)]) == pytest.approx(info.metrics["accuracy"])
    fine_tune = resolve_init(load_config(overrides=[f"data.path={synthetic_root}", f"model.init={run.bundle_dir}"]))
    assert fine_tune.predict.views == 8
    chosen = resolve_init(load_config(overrides=[f"data.path={synthetic_root}", f"model.init={run.bundle_dir}",
                                                 "predict.views=1"]))
    assert chosen.predict.views == 1


def test_an_exported_graph_averages_the_same_views(one_view, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from leukoscope.inference.export import export_onnx

    bundle = tmp_path / "bundle"
    shutil.copytree(one_view.bundle_dir, bundle)
    payload = json.loads((bundle / "bundle.json").read_text())
    payload["preprocessing"]["views"], payload["format_version"] = 8, 8
    (bundle / "bundle.json").write_text(json.dumps(payload))
    exported = CellClassifier.from_bundle(export_onnx(bundle, tmp_path / "exported"), backend="onnxruntime")
    in_torch = CellClassifier.from_bundle(bundle)
    image = _asymmetric()
    images = [image, *_turned(image)]
    graph_probabilities, graph_scores = exported.outputs(images)
    torch_probabilities, torch_scores = in_torch.outputs(images)
    assert exported.backend == "onnxruntime" and exported.info.preprocessing.views == 8
    assert np.allclose(graph_probabilities, torch_probabilities, atol=1e-4)
    assert np.allclose(graph_scores, torch_scores, rtol=1e-3, atol=1e-3)
    assert np.allclose(graph_probabilities, graph_probabilities[0], atol=1e-5)


def test_grad_cam_with_views_turns_with_the_cell(one_view) -> None:
    """The map of a bundle that answers from every view is every view's map, turned back and averaged:
    the cell turned by 90 degrees gives the same map turned by 90 degrees (one view's map does not)."""
    from leukoscope.inference.explain import grad_cam

    classifier = CellClassifier.from_bundle(one_view.bundle_dir)
    image = _asymmetric()
    turned = image.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise, as np.rot90
    inputs = torch.stack([classifier.preprocess(image), classifier.preprocess(turned)])
    eight = grad_cam(classifier.model, inputs, views=8)
    assert eight.shape == (2, 32, 32) and eight.max() == pytest.approx(1.0)
    assert np.allclose(eight[1], np.rot90(eight[0]), atol=1e-4)
    mirrored = grad_cam(classifier.model, classifier.preprocess(image.transpose(Image.Transpose.TRANSPOSE))[None],
                        views=8)
    assert np.allclose(mirrored[0], eight[0].T, atol=1e-4)
    one = grad_cam(classifier.model, inputs)
    assert not np.allclose(one[1], np.rot90(one[0]), atol=1e-2)
    # one class for every view: the averaged logits' class unless told, the one given otherwise
    assert np.allclose(grad_cam(classifier.model, inputs, [0, 0], views=4)[1],
                       np.rot90(grad_cam(classifier.model, inputs[:1], 0, views=4)[0]), atol=1e-4)


def test_heatmaps_of_predict_and_of_the_service_use_the_bundles_views(
        one_view, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from leukoscope.inference import explain
    from leukoscope.inference.predict_files import save_explanations
    from leukoscope.service.analysis import Analyzer

    bundle = tmp_path / "bundle"
    shutil.copytree(one_view.bundle_dir, bundle)
    payload = json.loads((bundle / "bundle.json").read_text())
    payload["preprocessing"]["views"], payload["format_version"] = 8, 8
    (bundle / "bundle.json").write_text(json.dumps(payload))
    seen: list[int] = []
    real = explain.grad_cam_maps

    def recording(model, inputs, class_index=None, target_layer=None, views=1):
        seen.append(views)
        return real(model, inputs, class_index, target_layer, views=views)

    monkeypatch.setattr(explain, "grad_cam_maps", recording)
    image_file = tmp_path / "cell.png"
    _asymmetric().save(image_file)
    classifier = CellClassifier.from_bundle(bundle)
    assert len(save_explanations(classifier, classifier.predict_paths([image_file]), tmp_path / "cam")) == 1
    analyzer = Analyzer.from_bundles(bundle, threads=1)
    try:
        (cell,) = analyzer.analyse_cell(_asymmetric()).cells
    finally:
        analyzer.close()
    assert cell.overlay is not None and [v for v in seen if v != 1] == [8, 8]  # (each calls one view per view)
