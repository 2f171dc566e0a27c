"""Training loop, experiments and grid search on small generated data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukoscope.data.manifest import DatasetError
from leukoscope.engine.config import load_config
from leukoscope.engine.data_prep import prepare_data
from leukoscope.preprocessing import Preprocessing
from leukoscope.tasks.classify import preprocessing_of, run_experiment
from leukoscope.tasks.search import grid, run_search
from leukoscope.engine.optim import lr_factor
from leukoscope.engine.trainer import class_weights, fit
from leukoscope.bundle import load_bundle
from leukoscope.inference.predictor import CellClassifier
from leukoscope.models import create_model

PREP = Preprocessing(32)  # the images of these tests are 32 px, ImageNet statistics


def _config(root: Path, out: Path, *extra: str):
    return load_config(overrides=[
        f"data.path={root}", f"output_root={out}", "model.name=mobilenet_v3_small", "model.image_size=32",
        "train.epochs=3", "train.batch_size=16", "train.lr=0.003", "train.augmentation=geometric", *extra,
    ])


@pytest.fixture(scope="module")
def prepared(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs")
    config = _config(synthetic_root, out)
    return config, prepare_data(config.data, preprocessing_of(config), out, show_progress=False)


def test_class_weights_are_inverse_frequency() -> None:
    weights = class_weights([0, 0, 0, 1], num_classes=3)
    assert weights.tolist() == pytest.approx([4 / (3 * 3), 4 / 3, 0.0])


def test_fit_learns_and_is_deterministic(prepared) -> None:
    config, data = prepared
    train, val = data.parts["train"], data.parts["val"]
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("mobilenet_v3_small", 4)
        results.append(fit(model, train.images, train.targets, val.images, val.targets, config.train,
                           num_classes=4, preprocessing=PREP, show_progress=False))
    first, second = results
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    assert [h["train_loss"] for h in first.history] == pytest.approx([h["train_loss"] for h in second.history])
    # Best epoch: highest validation accuracy, ties broken by the lower validation loss.
    assert first.best_epoch == max(first.history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))["epoch"]


def unchanging(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its BatchNorm running statistics held: at lr 0 it then cannot change at all (the
    statistics move in train mode whatever the rate, and its validation loss with them)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
    return model


def test_early_stopping_and_time_budget(prepared) -> None:
    config, data = prepared
    train = data.parts["train"]
    cfg = config.train.model_copy(update={"epochs": 20, "early_stopping_patience": 1, "lr": 0.0})
    # lr=0 and BatchNorm statistics held cannot improve after the first epoch: stops after patience runs out
    result = fit(unchanging(create_model("mobilenet_v3_small", 4)), train.images, train.targets,
                 data.parts["val"].images,
                 data.parts["val"].targets, cfg, num_classes=4, preprocessing=PREP, show_progress=False)
    assert len(result.history) == 2 and result.stopped_because.startswith("early stopping")
    cfg = config.train.model_copy(update={"epochs": 20, "max_minutes": 1e-6})
    result = fit(create_model("mobilenet_v3_small", 4), train.images, train.targets, None, None, cfg, num_classes=4, preprocessing=PREP,
                 show_progress=False)
    assert len(result.history) == 1 and "time budget" in result.stopped_because


def test_lr_schedules_have_the_onecycle_and_cosine_shape() -> None:
    assert lr_factor("onecycle", 0.0) == pytest.approx(0.04)
    assert lr_factor("onecycle", 0.2) == pytest.approx(1.0)
    assert lr_factor("onecycle", 0.6) == pytest.approx(0.5)
    assert lr_factor("onecycle", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor("cosine", f) for f in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert lr_factor("none", 0.7) == 1.0


def test_schedule_follows_steps_or_the_time_budget(prepared) -> None:
    config, data = prepared
    train = data.parts["train"]
    cfg = config.train.model_copy(update={"epochs": 2, "scheduler": "cosine", "lr": 0.01})
    result = fit(create_model("mobilenet_v3_small", 4), train.images, train.targets, None, None, cfg, num_classes=4, preprocessing=PREP,
                 show_progress=False)
    assert [h["lr"] for h in result.history] == pytest.approx([0.005, 0.0], abs=1e-9)
    # A budget that runs out first anneals the rate by time: a cut-short run ends at the bottom, not mid-schedule.
    cfg = cfg.model_copy(update={"epochs": 50, "max_minutes": 1e-6})
    result = fit(create_model("mobilenet_v3_small", 4), train.images, train.targets, None, None, cfg, num_classes=4, preprocessing=PREP,
                 show_progress=False)
    assert len(result.history) == 1 and result.history[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_budget_cut_run_anneals_by_the_end_of_its_last_epoch() -> None:
    """The run stops before an epoch that would overrun the budget, so its last epoch ends one epoch's length
    or less before the budget: counted against the whole budget, the schedule ended there part-annealed
    (1.2 s epochs, 2 s budget: 33% of the rate left)."""
    from leukoscope.engine.optim import TrainingClock

    clock = TrainingClock(total_steps=10_000, max_minutes=10 / 60)  # 10 s
    clock.resume_from(7.0, 0)
    assert clock.fraction() == pytest.approx(0.7, abs=0.01)
    clock.reserve_s = 3.0  # epochs of 3 s: none starts after 7 s
    assert clock.fraction() == pytest.approx(1.0)
    clock.reserve_s = 100.0  # an epoch longer than the budget: the fraction still grows with time
    assert clock.fraction() == pytest.approx(1.0) and TrainingClock(10_000, None).fraction() == 0.0


def test_resume_continues_exactly(prepared, tmp_path: Path) -> None:
    config, data = prepared
    train, val = data.parts["train"], data.parts["val"]
    torch.manual_seed(0)
    full = fit(create_model("mobilenet_v3_small", 4), train.images, train.targets, val.images, val.targets,
               config.train, num_classes=4, preprocessing=PREP, show_progress=False, run_dir=tmp_path / "a")
    short_cfg = config.train.model_copy(update={"epochs": 2})
    torch.manual_seed(0)
    fit(create_model("mobilenet_v3_small", 4), train.images, train.targets, val.images, val.targets, short_cfg,
        num_classes=4, preprocessing=PREP, show_progress=False, run_dir=tmp_path / "b")
    resumed = fit(create_model("mobilenet_v3_small", 4), train.images, train.targets, val.images, val.targets,
                  config.train, num_classes=4, preprocessing=PREP, show_progress=False, run_dir=tmp_path / "b", resume=True)
    assert len(resumed.history) == 3
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history],
                                                                       rel=1e-4)


def test_a_run_that_stopped_early_stays_stopped_when_resumed(prepared, tmp_path: Path) -> None:
    """Cut after its loop (during evaluation or the bundle) and resumed, it trained one more epoch."""
    config, data = prepared
    train, val = data.parts["train"], data.parts["val"]
    cfg = config.train.model_copy(update={"epochs": 20, "early_stopping_patience": 1, "lr": 0.0})
    stopped = fit(unchanging(create_model("mobilenet_v3_small", 4)), train.images, train.targets, val.images,
                  val.targets, cfg, num_classes=4, preprocessing=PREP, show_progress=False, run_dir=tmp_path)
    assert len(stopped.history) == 2 and stopped.stopped_because.startswith("early stopping")
    again = fit(unchanging(create_model("mobilenet_v3_small", 4)), train.images, train.targets, val.images,
                val.targets, cfg, num_classes=4, preprocessing=PREP, show_progress=False, run_dir=tmp_path, resume=True)
    assert [h["epoch"] for h in again.history] == [1, 2] and again.stopped_because == stopped.stopped_because
    assert again.best_epoch == stopped.best_epoch


def test_resume_without_checkpoint_fails(prepared, tmp_path: Path) -> None:
    config, data = prepared
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        fit(create_model("mobilenet_v3_small", 4), data.parts["train"].images, data.parts["train"].targets, None, None,
            config.train, num_classes=4, preprocessing=PREP, run_dir=tmp_path, resume=True, show_progress=False)


def test_divergence_is_reported(prepared) -> None:
    config, data = prepared
    cfg = config.train.model_copy(update={"lr": 1e12, "optimizer": "sgd", "epochs": 3})
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        fit(create_model("mobilenet_v3_small", 4), data.parts["train"].images, data.parts["train"].targets, None, None,
            cfg, num_classes=4, preprocessing=PREP, show_progress=False)


def test_experiment_writes_run_directory_and_bundle(synthetic_root: Path, tmp_path: Path) -> None:
    config = _config(synthetic_root, tmp_path, "name=unit")
    result = run_experiment(config, show_progress=False)
    run = result.run_dir
    for name in ("config.yaml", "split.json", "metrics.json", "report.html", "train.log",
                 "figures/confusion_matrix.png", "figures/training_curves.png", "bundle/bundle.json",
                 "bundle/model.safetensors"):
        assert (run / name).exists(), name
    assert not (run / "checkpoint.pt").exists()  # a complete run drops it unless train.keep_checkpoint
    assert run.name.startswith("unit-")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test" and metrics["n"] == result.metrics["n"] > 0
    assert metrics["parameters"] > 0 and metrics["images_per_second"] > 0
    assert "epoch   1/3" in (run / "train.log").read_text()
    # the bundle reproduces the run's test predictions
    model, info = load_bundle(result.bundle_dir)
    assert info.classes == ["blast", "lymphocyte", "monocyte", "neutrophil"]
    assert info.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    classifier = CellClassifier(model, info)
    test_paths = [Path(row["path"]) for row in json.loads((run / "split.json").read_text())["splits"]["test"]]
    labels = [p.parent.name for p in test_paths]
    predictions = classifier.predict_paths(test_paths)
    accuracy = np.mean([p.top_class == label for p, label in zip(predictions, labels)])
    assert accuracy == pytest.approx(metrics["accuracy"])


def test_second_run_reuses_the_saved_split(synthetic_root: Path, tmp_path: Path) -> None:
    config = _config(synthetic_root, tmp_path, "train.epochs=1")
    first = run_experiment(config, show_progress=False)
    second = run_experiment(config, show_progress=False)
    assert (first.run_dir / "split.json").read_text() == (second.run_dir / "split.json").read_text()
    assert first.run_dir != second.run_dir


def test_experiment_rejects_single_class_and_empty_data(tmp_path: Path, synthetic_root: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        run_experiment(_config(tmp_path / "empty", tmp_path / "runs"), show_progress=False)
    with pytest.raises(DatasetError, match="at least two classes"):
        run_experiment(_config(synthetic_root, tmp_path / "runs", "data.classes=[blast]"), show_progress=False)


def test_class_map_merges_labels(synthetic_root: Path, tmp_path: Path) -> None:
    config = _config(synthetic_root, tmp_path, "train.epochs=1",
                     "data.class_map={lymphocyte: mature, monocyte: mature, neutrophil: mature}")
    result = run_experiment(config, show_progress=False)
    info = load_bundle(result.bundle_dir)[1]
    assert info.classes == ["blast", "mature"]
    # its training images' centres, read for predict's check (synthetic cells: a violet nucleus at each centre)
    trained = json.loads((result.run_dir / "split.json").read_text())["splits"]["train"]
    assert info.provenance["training_centres"] == {"checked": len(trained), "without_white_cell": 0}


def test_a_split_of_the_unmerged_data_serves_a_run_that_merges_classes(synthetic_root: Path, tmp_path: Path) -> None:
    """`leukoscope split` saves the data's own labels; a config with data.class_map refused that split as
    "32 relabelled; make a new split or restore the data", though nothing had changed."""
    from leukoscope.data.readers import read_dataset
    from leukoscope.data.splits import make_split

    split_file = make_split(read_dataset(synthetic_root), seed=0).save(tmp_path / "split.json")
    config = _config(synthetic_root, tmp_path, f"data.split_file={split_file}",
                     "data.class_map={lymphocyte: mature, monocyte: mature, neutrophil: mature}")
    merged = prepare_data(config.data, preprocessing_of(config), tmp_path, show_progress=False)
    assert merged.classes == ["blast", "mature"]
    saved = json.loads(split_file.read_text())["splits"]
    for part, rows in saved.items():  # the parts it dealt, each image under its merged label
        mapped = {r["path"]: ("blast" if r["label"] == "blast" else "mature") for r in rows}
        assert {str(s.path.resolve()): s.label for s in merged.split.assignments[part]} == mapped
    # data.classes choosing among the merged classes, and a map whose names chain
    merge = "data.class_map={lymphocyte: mature, monocyte: mature, neutrophil: mature}"
    chained = "data.class_map={lymphocyte: monocyte, monocyte: neutrophil}"
    for overrides, classes in (([merge, "data.classes=[mature,blast]"], ["mature", "blast"]),
                               ([chained, "data.classes=[neutrophil,blast]"], ["neutrophil", "blast"])):
        config = _config(synthetic_root, tmp_path, f"data.split_file={split_file}", *overrides)
        assert prepare_data(config.data, preprocessing_of(config), tmp_path, show_progress=False).classes == classes
    # the run's own split, saved under the mapped names, is used as it is: mapped again, a chained map had
    # moved the monocytes (lymphocytes renamed) on to neutrophil
    own = _config(synthetic_root, tmp_path / "own", chained)
    first = prepare_data(own.data, preprocessing_of(own), tmp_path / "own", show_progress=False)
    again = prepare_data(own.data, preprocessing_of(own), tmp_path / "own", show_progress=False)
    assert first.classes == again.classes == ["blast", "monocyte", "neutrophil"]
    assert again.split.class_table() == first.split.class_table()


def test_a_class_none_of_whose_training_images_decode_is_refused_after_decoding(synthetic_root: Path,
                                                                                 tmp_path: Path) -> None:
    """A basophil folder of text files saved as .jpg became a model class that never saw a basophil, and the
    warning counted 5 training images of it."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    (data / "basophil").mkdir()
    for i in range(6):
        (data / "basophil" / f"b{i}.jpg").write_text("not an image")
    config = _config(data, tmp_path / "runs")
    with pytest.raises(DatasetError, match=r"class\(es\) 'basophil' \(unreadable: b\d\.jpg, b\d\.jpg, b\d\.jpg and \d "
                                           r"more\) have no training image that can be decoded"):
        prepare_data(config.data, preprocessing_of(config), tmp_path / "runs", show_progress=False)


def test_grid_search_chooses_by_validation(synthetic_root: Path, tmp_path: Path) -> None:
    config = _config(synthetic_root, tmp_path, "name=grid", "search.lr=[0.001,1e-9]", "search.epochs=[1]")
    assert grid(config) == [
        {"model.name": "mobilenet_v3_small", "train.epochs": 1, "train.lr": lr, "train.optimizer": "adam",
         "train.batch_size": 16} for lr in (0.001, 1e-9)
    ]
    result = run_search(config, show_progress=False)
    rows = json.loads((result.search_dir / "results.json").read_text())
    assert len(rows) == 2 and (result.search_dir / "results.csv").exists()
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1
    assert chosen[0]["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert Path(chosen[0]["bundle"]) == result.best.bundle_dir


def test_a_search_that_stops_keeps_the_table_of_its_finished_runs(synthetic_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The table was written after the last run only: a crash (or Ctrl-C) at run 17 lost the other 16."""
    import leukoscope.tasks.search as search

    trained = []

    def second_run_stops(*args, **kwargs):
        if trained:
            raise KeyboardInterrupt
        trained.append(run_experiment(*args, **kwargs))
        return trained[-1]

    monkeypatch.setattr(search, "run_experiment", second_run_stops)
    config = _config(synthetic_root, tmp_path, "name=grid-stop", "search.lr=[0.001,0.01]", "search.epochs=[1]")
    with pytest.raises(KeyboardInterrupt):
        run_search(config, show_progress=False)
    (search_dir,) = tmp_path.glob("grid-stop-search-*")
    rows = json.loads((search_dir / "results.json").read_text())
    assert [(row["run"], row["bundle"]) for row in rows] == [(1, str(trained[0].bundle_dir))]


def test_search_and_compare_from_a_bundle_train_at_its_input_size(synthetic_root: Path, tmp_path: Path) -> None:
    """A config built in Python (not by load_config, which reads `model.init` at once) takes its image size
    from the bundle too: the data were decoded at the default (128) before `model.init` was read, and the
    bundle saved the init's size (40) for images it had never been trained on; and a search without
    model.name was refused ("a mobilenet_v3_small bundle, but model.name is resnet18")."""
    from leukoscope.bundle import read_bundle_info
    from leukoscope.engine.config import ExperimentConfig
    from leukoscope.tasks.compare import run_compare

    init = run_experiment(_config(synthetic_root, tmp_path / "init", "model.image_size=40", "train.epochs=1"),
                          show_progress=False).bundle_dir

    def config(**more) -> ExperimentConfig:
        return ExperimentConfig.model_validate({"data": {"path": str(synthetic_root)}, "model": {"init": str(init)},
                                                "output_root": str(tmp_path / "runs"),
                                                "train": {"epochs": 1, "batch_size": 16}, **more})

    searched = run_search(config(search={"lr": [0.003]}), show_progress=False)
    assert read_bundle_info(searched.best.bundle_dir).preprocessing.image_size == 40
    compared = run_compare(config(), models=["mobilenet_v3_small"], show_progress=False)
    assert read_bundle_info(compared.runs[0].bundle_dir).preprocessing.image_size == 40
    # the guard under both: data decoded for another input size are refused, not trained on
    decoded = prepare_data(config().data, Preprocessing(image_size=32), tmp_path, show_progress=False)
    with pytest.raises(ValueError, match=r"decoded as \(32, .*this run's model takes \(40, "):
        run_experiment(config(), prepared=decoded, show_progress=False)


def test_a_grid_over_training_settings_of_a_classical_model_is_refused(synthetic_root: Path, tmp_path: Path) -> None:
    """`search --model svm_rbf search.lr=[0.1,0.01]` fitted the same SVM twice and "chose" run 1."""
    from leukoscope.engine.config import ConfigError

    config = _config(synthetic_root, tmp_path, "model.name=svm_rbf", "search.lr=[0.1,0.01]")
    with pytest.raises(ConfigError, match=r"search.lr vary how a network trains; svm_rbf is a classical model"):
        run_search(config, show_progress=False)
    mixed = _config(synthetic_root, tmp_path, "search.models=[mobilenet_v3_small,random_forest]", "search.epochs=[1,2]")
    with pytest.raises(ConfigError, match="random_forest is a classical model"):
        run_search(mixed, show_progress=False)
    assert not list(tmp_path.rglob("run-01"))  # refused before anything trained


def test_grid_search_without_validation_split_is_refused_before_training(synthetic_root: Path,
                                                                          tmp_path: Path) -> None:
    config = _config(synthetic_root, tmp_path, "name=grid-noval", "data.ratios=[0.8,0.0,0.2]",
                     "search.lr=[0.001,0.01]", "search.epochs=[1]")
    with pytest.raises(ValueError, match="needs a validation split"):
        run_search(config, show_progress=False)
    assert not list(tmp_path.rglob("run-01"))  # nothing was trained
    assert not list(tmp_path.glob("grid-noval-search-*"))  # nor an empty search folder left behind


def test_frozen_backbone_keeps_its_batchnorm_statistics(prepared) -> None:
    config, data = prepared
    train = data.parts["train"]
    model = create_model("resnet18", 4, freeze_backbone=True)
    before = {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("running_mean")}
    head_before = [p.detach().clone() for p in model.fc.parameters()]
    cfg = config.train.model_copy(update={"epochs": 1})
    fit(model, train.images, train.targets, None, None, cfg, num_classes=4, preprocessing=PREP, show_progress=False)
    after = dict(model.named_buffers())
    assert before and all(torch.equal(before[name], after[name].cpu()) for name in before)  # fit may use a GPU
    assert any(not torch.equal(p, q.cpu()) for p, q in zip(head_before, model.fc.parameters()))  # the head trained


def test_checkpoint_random_states_round_trip(tmp_path: Path) -> None:
    import random

    from leukoscope.engine.checkpoint import _restore_rng_states, _rng_states

    random.seed(3)
    np.random.seed(4)
    torch.save({"rng": _rng_states()}, tmp_path / "c.pt")
    expected = (random.random(), float(np.random.rand()))
    random.seed(99)
    np.random.seed(99)
    _restore_rng_states(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    assert (random.random(), float(np.random.rand())) == expected


def test_grid_search_by_validation_loss_prefers_the_lowest_loss() -> None:
    from leukoscope.tasks.search import selection_score

    rows = [{"val_loss": 0.4, "val_macro_f1": 0.9}, {"val_loss": 0.1, "val_macro_f1": 0.8},
            {"val_loss": None, "val_macro_f1": None}]
    assert max(range(3), key=lambda i: selection_score(rows[i], "val_loss")) == 1
    rows = [{"val_accuracy": 0.5, "val_macro_f1": 0.4}, {"val_accuracy": 0.5, "val_macro_f1": 0.45}]
    assert max(range(2), key=lambda i: selection_score(rows[i], "val_accuracy")) == 1


def test_unknown_model_option_is_named(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no option 'dropuot'.*did you mean 'dropout'"):
        create_model("tusar_convnet", 4, dropuot=0.3)
    config = _config(synthetic_root, tmp_path, "model.options={depth: 3}")
    with pytest.raises(ValueError, match="'mobilenet_v3_small' has no option 'depth'"):
        run_experiment(config, show_progress=False)


def test_cnn_trains_on_lab_kmeans_segmented_images(synthetic_root: Path, tmp_path: Path) -> None:
    config = _config(synthetic_root, tmp_path, "train.epochs=1", "data.segmentation=lab_kmeans")
    result = run_experiment(config, show_progress=False)
    assert result.metrics["n"] > 0 and (result.bundle_dir / "bundle.json").exists()
    info = load_bundle(result.bundle_dir)[1]
    assert info.preprocessing.segmentation == "lab_kmeans"


def test_runs_are_named_after_their_model_and_may_keep_their_checkpoint(synthetic_root: Path, tmp_path: Path) -> None:
    result = run_experiment(_config(synthetic_root, tmp_path, "train.epochs=1", "train.keep_checkpoint=true"),
                            show_progress=False)
    assert result.run_dir.name.startswith("mobilenet_v3_small-")
    assert (result.run_dir / "checkpoint.pt").is_file()


def test_a_run_that_stopped_early_is_not_resumed_into_training_nothing(synthetic_root: Path,
                                                                        tmp_path: Path) -> None:
    """A run stopped by its patience, its checkpoint kept: resuming trained no epoch and wrote its metrics, report
    and bundle again."""
    config = _config(synthetic_root, tmp_path, "train.epochs=6", "train.lr=1e-9", "train.early_stopping_patience=1",
                     "train.keep_checkpoint=true")
    first = run_experiment(config, show_progress=False)
    assert first.fit.stopped_because.startswith("early stopping")
    report = (first.run_dir / "report.html").read_bytes()
    with pytest.raises(ValueError, match=r"is finished \(early stopping: no improvement for 1 epochs\)"):
        run_experiment(config, run_dir=first.run_dir, resume=True, show_progress=False)
    assert (first.run_dir / "report.html").read_bytes() == report


def test_a_failed_run_leaves_no_run_directory(synthetic_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(DatasetError):
        run_experiment(_config(tmp_path / "missing", runs), show_progress=False)
    with pytest.raises(DatasetError):
        run_experiment(_config(synthetic_root, runs, "data.classes=[blast]"), show_progress=False)
    assert not runs.exists() or [p.name for p in runs.iterdir() if p.name != "splits"] == []


def test_a_gray_standardized_run_keeps_its_input_style_and_ignores_hue(synthetic_root: Path, tmp_path: Path) -> None:
    # GroupNorm too: each image normalised on its own, as the shipped classifier's study compares.
    config = _config(synthetic_root, tmp_path, "train.epochs=1", "model.name=mobilenet_v2", "data.colour=gray",
                     "data.standardize=true", "model.options={norm: group}", "train.augmentation=cross_source")
    result = run_experiment(config, show_progress=False)
    model, info = load_bundle(result.bundle_dir)
    assert info.preprocessing.colour == "gray" and info.preprocessing.standardize is True
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    classifier = CellClassifier.from_bundle(result.bundle_dir)
    colour = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    # The same luminance without hue, and a dimmer, lower-contrast copy of it: the same model
    # input up to rounding, so the same probabilities.
    luma = colour @ np.array([0.299, 0.587, 0.114])
    gray = np.repeat(np.rint(luma)[..., None], 3, axis=2).astype(np.uint8)
    dimmer = np.repeat(np.rint(luma * 0.5 + 60)[..., None], 3, axis=2).astype(np.uint8)
    probabilities = classifier.probabilities([Image.fromarray(a) for a in (colour, gray, dimmer)])
    assert np.abs(probabilities - probabilities[0]).max() < 0.02
    assert not np.allclose(probabilities[0], 1 / probabilities.shape[1])  # the model does not ignore its input


def test_fine_tuning_keeps_the_bundles_input_style(synthetic_root: Path, tmp_path: Path) -> None:
    first = run_experiment(_config(synthetic_root, tmp_path / "a", "train.epochs=1", "data.colour=gray",
                                   "data.standardize=true", "data.stain=macenko"), show_progress=False)
    config = load_config(overrides=[f"data.path={synthetic_root}", f"output_root={tmp_path / 'b'}",
                                    f"model.init={first.bundle_dir}", "train.epochs=1"])
    tuned = run_experiment(config, show_progress=False)
    preprocessing = load_bundle(tuned.bundle_dir)[1].preprocessing
    assert preprocessing.colour == "gray" and preprocessing.standardize is True
    assert preprocessing.stain == "macenko"


def test_a_stain_normalised_run_gives_one_answer_for_two_labs_stains(synthetic_root: Path, tmp_path: Path) -> None:
    from tests.test_stain import LAB_A, LAB_B, _concentration_maps, _render

    result = run_experiment(_config(synthetic_root, tmp_path, "train.epochs=1", "model.name=mobilenet_v2",
                                    "data.stain=macenko"), show_progress=False)
    assert load_bundle(result.bundle_dir)[1].preprocessing.stain == "macenko"
    classifier = CellClassifier.from_bundle(result.bundle_dir)
    nuclear, other = _concentration_maps()
    # One cell, two labs' stains, lamps and stain strengths: the same probabilities, where the
    # same model without normalisation would see two different images.
    images = [_render(nuclear, other, LAB_A, 240), _render(nuclear * 0.8, other * 1.3, LAB_B, 215)]
    probabilities = classifier.probabilities([Image.fromarray(a) for a in images])
    assert np.abs(probabilities[0] - probabilities[1]).max() < 0.02
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 20
    assert not np.allclose(probabilities[0], 1 / probabilities.shape[1])  # the model does not ignore its input


def test_classical_models_refuse_an_input_style_they_would_ignore(synthetic_root: Path, tmp_path: Path) -> None:
    from leukoscope.engine.config import ConfigError

    config = _config(synthetic_root, tmp_path, "model.name=naive_bayes", "data.colour=gray")
    with pytest.raises(ConfigError, match="naive_bayes computes its own colour features"):
        run_experiment(config, show_progress=False)
    assert not any(tmp_path.glob("naive_bayes-*"))


def test_train_deterministic_decides_cudnns_kernels_too() -> None:
    """seed_everything set cuDNN's deterministic convolutions for the whole process, so
    train.deterministic=false ("CUDA's faster kernels") left them on. Checked by the flags (no GPU needed)."""
    import torch

    from leukoscope.engine.runtime import deterministic_kernels, seed_everything

    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark)
    seed_everything(0)
    assert (cudnn.deterministic, cudnn.benchmark) == saved  # seeding chooses no kernels
    gpu = torch.device("cuda")
    with deterministic_kernels(gpu, False):
        assert not cudnn.deterministic and cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(gpu, True):
        assert cudnn.deterministic and not cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
    assert (cudnn.deterministic, cudnn.benchmark) == saved and not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(torch.device("cpu"), True):  # the CPU's kernels are deterministic already
        assert (cudnn.deterministic, cudnn.benchmark) == saved


def _collapse(monkeypatch: pytest.MonkeyPatch, model: str = "naive_bayes") -> None:
    """``model``'s learner calls every image the last class (a collapsed model); other models are left as they are."""
    from leukoscope.engine.learner import SklearnLearner

    original = SklearnLearner.logits

    def logits(self, pixels: torch.Tensor) -> np.ndarray:
        scores = original(self, pixels)
        if self.config.model.name != model:
            return scores
        collapsed = np.zeros_like(scores)
        collapsed[:, -1] = 5.0
        return collapsed

    monkeypatch.setattr(SklearnLearner, "logits", logits)


def test_a_run_that_called_every_image_one_class_says_so(synthetic_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A collapsed model (every test image one class) was trained, reported and bundled without a word: its
    ROC-AUC stood as a headline; only `compare` marked it."""
    _collapse(monkeypatch)
    run = run_experiment(_config(synthetic_root, tmp_path, "model.name=naive_bayes"), show_progress=False).run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["one_class_called"] == "neutrophil"
    said = " ".join((run / "train.log").read_text().split())
    assert "warning: the model called every scored image neutrophil: a collapsed model" in said
    report = (run / "report.html").read_text()
    note = report.index("The model called every scored image neutrophil: a collapsed model")
    assert note < report.index("Headline numbers")  # seen before the numbers it qualifies


def test_a_run_that_called_several_classes_records_none(tmp_path: Path) -> None:
    from leukoscope.evaluation import evaluate_logits

    metrics = evaluate_logits(np.array([0, 1, 2, 3]), np.eye(4), ["a", "b", "c", "d"], tmp_path)
    assert metrics["one_class_called"] is None and "collapsed" not in (tmp_path / "report.html").read_text()


def test_grid_search_marks_a_run_that_called_every_image_one_class(synthetic_root: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`search` marked no run whose every image was called one class (val_loss 91214.96), as compare does."""
    from leukoscope.progress import console

    _collapse(monkeypatch)
    config = _config(synthetic_root, tmp_path, "name=grid", "search.models=[decision_tree,naive_bayes]")
    with console.capture() as captured:
        result = run_search(config, show_progress=False)
    rows = json.loads((result.search_dir / "results.json").read_text())
    assert [row["one_class"] for row in rows] == [None, "neutrophil"]
    with (result.search_dir / "results.csv").open() as handle:
        assert [row["one_class"] for row in csv.DictReader(handle)] == ["", "neutrophil"]
    said = " ".join(captured.get().split())
    assert "│ 2 ! │" in said and "! run 2 called every scored image neutrophil: a collapsed model" in said
    assert "│ 1 │" in said and "run 1 called" not in said


def test_a_warning_about_the_data_is_said_once_for_the_runs_that_share_them(synthetic_root: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`search` and `compare` train many runs on one preparation of the data: the few-images warning was said again
    at every run of a grid."""
    import shutil

    from leukoscope.tasks import classify

    small = tmp_path / "small"
    for folder in sorted(p for p in synthetic_root.iterdir() if p.is_dir()):
        (small / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:6]:
            shutil.copy(image, small / folder.name / image.name)
    config = load_config(overrides=[f"data.path={small}", f"output_root={tmp_path / 'runs'}", "model.name=naive_bayes",
                                    "model.image_size=32", "data.near_duplicates=false"])
    data = prepare_data(config.data, preprocessing_of(config), tmp_path / "runs", show_progress=False)
    said: list[str] = []
    monkeypatch.setattr(classify, "say", said.append)
    for index in range(2):
        classify.run_experiment(config, run_dir=tmp_path / "runs" / f"run-{index}", prepared=data, show_progress=False)
    assert sum("few images of" in line for line in said) == 1
