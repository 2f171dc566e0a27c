"""Training on a CUDA GPU, and what it writes running on the CPU.

Skipped where torch sees no CUDA GPU (CI, the development machine); on a GPU machine run
``python -m pytest tests/gpu -q``. A user with a GPU trains on it by default (``train.device=auto``)
and analyses on the CPU (``analyze`` and the service run there, and exported graphs run only there),
so a GPU run's bundle and checkpoint must load without a GPU, and the same weights must give the
same answers on both devices (within cuDNN's TF32 rounding)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from leukoscope.cli import app
from leukoscope.engine.config import load_config
from leukoscope.inference.predictor import CellClassifier
from leukoscope.inference.smear import SmearAnalyzer
from leukoscope.io import load_image
from leukoscope.tasks.classify import run_experiment
from leukoscope.tasks.detect import evaluate_detector_bundle
from tests.conftest import shared_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
runner = CliRunner()
TINY_DETECTOR_RUN = ["model.name=fasterrcnn_abas", "train.epochs=1", "train.batch_size=4", "train.eval_every=1",
                     "train.augmentation=default", "model.options={input_scale: 0.5, roi_batch_size: 32, "
                     "detections_per_img: 30}"]


def _test_cells(run_dir: Path) -> list:
    rows = json.loads((run_dir / "split.json").read_text())["splits"]["test"]
    return [load_image(row["path"]) for row in rows]


def _devices(bundle: Path | str) -> tuple[CellClassifier, CellClassifier]:
    return CellClassifier.from_bundle(bundle), CellClassifier.from_bundle(bundle, device="cuda")


def _assert_same_answers(cpu: CellClassifier, gpu: CellClassifier, cells: list) -> None:
    (p_cpu, ood_cpu), (p_gpu, ood_gpu) = cpu.outputs(cells), gpu.outputs(cells)
    np.testing.assert_allclose(p_gpu, p_cpu, atol=2e-3)
    decided = np.sort(p_cpu, axis=1)[:, -1] - np.sort(p_cpu, axis=1)[:, -2] > 0.01  # no near-ties
    assert (p_gpu.argmax(1) == p_cpu.argmax(1))[decided].all()
    if ood_cpu is not None:
        np.testing.assert_allclose(ood_gpu, ood_cpu, rtol=1e-2, atol=1e-2)


def test_a_classifier_trained_on_the_gpu_runs_on_the_cpu(synthetic_root: Path, tmp_path: Path) -> None:
    config = load_config(overrides=[
        f"data.path={synthetic_root}", f"output_root={tmp_path}", "model.name=abas_cnn", "model.image_size=32",
        "train.epochs=12", "train.batch_size=16", "train.lr=0.001", "train.device=cuda"])
    run = run_experiment(config, show_progress=False)
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.5  # four classes: it learned on the GPU
    cpu, gpu = _devices(run.bundle_dir)
    assert {p.device.type for p in cpu.model.parameters()} == {"cpu"}  # type: ignore[union-attr]
    _assert_same_answers(cpu, gpu, _test_cells(run.run_dir))
    assert json.loads((run.bundle_dir / "bundle.json").read_text())["ood"]["fit_images"] > 0  # fitted on the GPU


def test_fine_tuning_the_shipped_classifier_on_the_gpu(synthetic_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(synthetic_root), "--init", "pretrained:wbc-classifier",
                                 "--quiet", f"output_root={tmp_path}", "train.epochs=1", "train.batch_size=16",
                                 "train.device=cuda"])
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    cpu, gpu = _devices(bundle)
    _assert_same_answers(cpu, gpu, _test_cells(bundle.parent))


def test_a_detector_trained_on_the_gpu_resumes_and_scores_on_the_cpu(smear_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train-detector", "--data", str(smear_root), "--quiet",
                                 f"output_root={tmp_path / 'runs'}", *TINY_DETECTOR_RUN, "train.device=cuda",
                                 "train.keep_checkpoint=true"])
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    resumed = runner.invoke(app, ["train-detector", "--resume", str(bundle.parent), "--quiet", "train.epochs=2",
                                  "train.device=cpu"])
    assert resumed.exit_code == 0, resumed.output
    assert [row["epoch"] for row in json.loads((bundle.parent / "history.json").read_text())] == [1, 2]
    scored = {device: evaluate_detector_bundle(bundle, smear_root, tmp_path / device, device=device,
                                               score_threshold=0.05, show_progress=False)
              for device in ("cpu", "cuda")}
    assert scored["cuda"]["map_50"] == pytest.approx(scored["cpu"]["map_50"], abs=0.02)


def test_the_shipped_models_analyse_a_cbc_field_alike_on_both_devices(tmp_path: Path) -> None:
    cbc = shared_dataset("cbc")
    fields = sorted((cbc / "Testing" / "Images").glob("*.jpg"))[:6]
    cpu = SmearAnalyzer.from_bundles("pretrained:smear-detector", "pretrained:wbc-classifier")
    gpu = SmearAnalyzer.from_bundles("pretrained:smear-detector", "pretrained:wbc-classifier", device="cuda")
    for field in fields:
        on_cpu, on_gpu = cpu.analyze(field), gpu.analyze(field)
        assert on_gpu.object_counts.get("WBC") == on_cpu.object_counts.get("WBC"), field.name
        assert len(on_gpu.cells) == len(on_cpu.cells)
        for a, b in zip(on_cpu.cells, on_gpu.cells):
            assert np.allclose(a.box, b.box, atol=1.0), field.name
            assert a.top_class == b.top_class or abs(a.confidence - b.confidence) < 0.02


def test_the_shipped_detector_scores_the_same_on_the_gpu(tmp_path: Path) -> None:
    cbc = shared_dataset("cbc")
    scored = {device: evaluate_detector_bundle("pretrained:smear-detector", cbc, tmp_path / device, split="Testing",
                                               device=device, show_progress=False)
              for device in ("cpu", "cuda")}
    assert scored["cuda"]["map_50"] == pytest.approx(scored["cpu"]["map_50"], abs=0.005)
    assert scored["cuda"]["per_class"]["WBC"]["ap_50"] == pytest.approx(scored["cpu"]["per_class"]["WBC"]["ap_50"],
                                                                         abs=0.005)


def test_a_resumed_gpu_run_continues_exactly_and_a_seed_repeats_it(synthetic_root: Path, tmp_path: Path) -> None:
    """Dropout on the GPU draws from CUDA's generator (the checkpoint keeps it); with deterministic
    kernels (the default) two seeded runs agree to the rounding of the ops that have none."""
    from leukoscope.engine.data_prep import prepare_data
    from leukoscope.engine.trainer import fit
    from leukoscope.models import create_model
    from leukoscope.preprocessing import Preprocessing
    from leukoscope.tasks.classify import preprocessing_of

    config = load_config(overrides=[
        f"data.path={synthetic_root}", f"output_root={tmp_path}", "model.name=mobilenet_v3_small",
        "model.image_size=32", "train.epochs=3", "train.batch_size=16", "train.lr=0.003", "train.device=cuda"])
    data = prepare_data(config.data, preprocessing_of(config), tmp_path, show_progress=False)
    train, val = data.parts["train"], data.parts["val"]

    def run(cfg, run_dir: Path, resume: bool = False):
        torch.manual_seed(0)
        return fit(create_model("mobilenet_v3_small", 4), train.images, train.targets, val.images, val.targets,
                   cfg, num_classes=4, preprocessing=Preprocessing(32), show_progress=False, run_dir=run_dir,
                   resume=resume)

    losses = lambda result: [row["train_loss"] for row in result.history]  # noqa: E731
    full, again = run(config.train, tmp_path / "a"), run(config.train, tmp_path / "b")
    assert losses(again) == pytest.approx(losses(full), rel=1e-4)
    run(config.train.model_copy(update={"epochs": 2}), tmp_path / "c")
    resumed = run(config.train, tmp_path / "c", resume=True)
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-4)
    assert not torch.are_deterministic_algorithms_enabled()  # training's setting ends with training


def test_a_seeded_gpu_detector_run_repeats(smear_root: Path, tmp_path: Path) -> None:
    from leukoscope.engine.detection_config import load_detection_config
    from leukoscope.tasks.detect import run_detection_experiment

    config = load_detection_config(None, [f"data.path={smear_root}", f"output_root={tmp_path}", *TINY_DETECTOR_RUN,
                                          "train.device=cuda"])
    first, second = (run_detection_experiment(config, show_progress=False) for _ in range(2))
    assert [row["train_loss"] for row in first.fit.history] == [row["train_loss"] for row in second.fit.history]
