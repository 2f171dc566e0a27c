"""`leukoscope compare`: several models on one split, one table, one figure, one page."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from leukoscope.cli import app
from leukoscope.tasks.compare import compare_plan, entry_config, run_compare
from leukoscope.engine.config import CompareConfig, CompareEntry, ConfigError, load_config
from leukoscope.proportions import wilson_interval

FAST = ["model.image_size=32", "train.epochs=1", "train.batch_size=16", "features.histogram_bins=8",
        "features.lbp_radii=[1]", "features.glcm_distances=[1]"]


@pytest.fixture(scope="module")
def compared(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("compare")
    config = load_config(overrides=[f"data.path={synthetic_root}", f"output_root={out}", "name=cmp", *FAST])
    config.compare = CompareConfig(models=[
        "naive_bayes",
        CompareEntry(model="jabeena_cnn", label="jabeena-1ep", overrides={"train.augmentation": "jabeena"}),
    ])
    return run_compare(config, show_progress=False)


def test_writes_table_figure_and_page(compared):
    directory = compared.compare_dir
    for name in ("compare.csv", "compare.json", "compare.md", "compare.png", "compare.html", "config.yaml"):
        assert (directory / name).is_file(), name
    rows = list(csv.DictReader((directory / "compare.csv").open()))
    assert [row["label"] for row in rows] == ["naive_bayes", "jabeena-1ep"]
    for column in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "train_minutes",
                   "images_per_second", "parameters", "bundle"):
        assert column in rows[0]
    assert rows[0]["kind"] == "classic" and rows[0]["parameters"] == ""
    assert rows[1]["kind"] == "classifier" and int(rows[1]["parameters"]) > 0 and rows[1]["epochs"] == "1"
    table = (directory / "compare.md").read_text()
    for header in ("accuracy", "precision (macro)", "recall (macro)", "specificity (macro)", "F1 (macro)",
                   "ROC-AUC", "train min", "inference img/s", "params"):
        assert header in table
    assert "jabeena-1ep (1 ep)" in table and "| n/a |" in table
    page = (directory / "compare.html").read_text()
    assert "data:image/png;base64," in page and "01-naive_bayes/report.html" in page
    info = json.loads((directory / "compare.json").read_text())
    assert "validation" in info["chosen_by"]
    # each accuracy with its 95% interval over the images scored: on a small test set rows differ by chance
    for row in rows:
        n, accuracy = int(row["n"]), float(row["accuracy"])
        assert float(row["accuracy_low"]) < accuracy < float(row["accuracy_high"]) or accuracy in (0.0, 1.0)
        assert (float(row["accuracy_low"]), float(row["accuracy_high"])) == pytest.approx(
            wilson_interval(round(accuracy * n), n))
    assert "accuracy 95% CI" in table and f"{float(rows[0]['accuracy_low']):.3f}-" in table
    assert f"Wilson interval over the {rows[0]['n']} images scored" in table


def test_every_row_used_the_same_split_and_has_a_bundle(compared):
    splits = {(Path(row.run_dir) / "split.json").read_text() for row in compared.rows}
    assert len(splits) == 1
    for row in compared.rows:
        assert (Path(row.bundle) / "bundle.json").is_file()
    assert sum(row.chosen for row in compared.rows) == 1
    # the row chosen is the best on validation (then validation macro-F1), never on test
    best = max(compared.rows, key=lambda row: (row.val_accuracy, row.val_macro_f1 or 0.0))
    assert compared.rows[compared.best_index] is best and best.chosen
    assert len({row.val_accuracy for row in compared.rows}) == 2  # the two rows differ: the choice means something
    assert compared.best.bundle_dir == Path(compared.rows[compared.best_index].bundle)
    assert compared.rows[1].segmentation is None


def test_cli_compare_prints_the_best_bundle_last(synthetic_root: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["compare", "--data", str(synthetic_root), "--models",
                                      "naive_bayes", "--quiet", f"output_root={tmp_path}", *FAST])
    assert result.exit_code == 0, result.output
    last = [line for line in result.stdout.splitlines() if line.strip()][-1]
    assert (Path(last) / "bundle.json").is_file()
    assert "naive_bayes" in result.output
    # no name: the folder is compare-<time>, not named after the default model (resnet18), which no row is
    (folder,) = tmp_path.glob("*compare*")
    assert folder.name.startswith("compare-") and "resnet18" not in str(Path(last).relative_to(tmp_path))


def test_without_a_validation_part_every_row_is_scored_and_none_chosen(synthetic_root: Path, tmp_path: Path):
    """Without a validation part the "best" row was chosen by its test score (said to be "optimistic"): tuning to
    the test set, which `leukoscope search` refuses. The rows are still scored; none is chosen, and it says why."""
    result = CliRunner().invoke(app, ["compare", "--data", str(synthetic_root), "--models", "naive_bayes,decision_tree",
                                      "--quiet", f"output_root={tmp_path}", "data.ratios=[0.8,0.2]", *FAST])
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.glob("compare-*")
    rows = list(csv.DictReader((folder / "compare.csv").open()))
    assert [row["label"] for row in rows] == ["naive_bayes", "decision_tree"] and all(row["accuracy"] for row in rows)
    assert not any(row["chosen"] == "True" for row in rows)
    info = json.loads((folder / "compare.json").read_text())
    assert info["chosen"] is None and "no validation part" in info["chosen_by"]
    said = " ".join(result.output.split())
    assert "no row is chosen: the split has no validation part" in said and "data.ratios=[0.8,0.1,0.1]" in said
    table = (folder / "compare.md").read_text()
    assert "No row is chosen: the split has no validation part" in table and "chosen by" not in table
    last = [line for line in result.stdout.splitlines() if line.strip()][-1]
    assert Path(last) == folder  # the comparison's folder, not a bundle picked by its test score


def test_models_option_picks_configured_rows_by_label():
    config = load_config(overrides=["data.path=x"])
    config.compare = CompareConfig(models=[
        CompareEntry(model="tusar_convnet", label="convnet-seg", overrides={"data.segmentation": "lab_kmeans"}),
    ])
    plan = compare_plan(config, ["convnet-seg", "svm_rbf"])
    assert [(e.model, e.label) for e in plan] == [("tusar_convnet", "convnet-seg"), ("svm_rbf", None)]
    row = entry_config(config, plan[0])
    assert row.model.name == "tusar_convnet" and row.data.segmentation == "lab_kmeans"
    assert row.compare is None and config.data.segmentation is None  # the base config is untouched
    assert [e.model for e in compare_plan(load_config())] == [  # nothing named: the six classical models
        "svm_rbf", "naive_bayes", "decision_tree", "random_forest", "logistic_regression", "gradient_boosting"]


@pytest.mark.parametrize("models, message", [
    (["svm_rbf", "no_such_model"], "unknown model 'no_such_model'"),
    ([CompareEntry(model="svm_rbf"), CompareEntry(model="svm_rbf")], "more than once"),
    ([CompareEntry(model="svm_rbf", overrides={"data.path": "elsewhere"})], "same data and split"),
    ([CompareEntry(model="svm_rbf", overrides={"data.ratios": [0.5, 0.5]})], "same data and split"),
    ([CompareEntry(model="svm_rbf", overrides={"train.epoch": 3})], "unknown config key 'train.epoch'"),
])
def test_bad_plans_fail_before_any_training(models, message, tmp_path: Path):
    config = load_config(overrides=["data.path=x", f"output_root={tmp_path}"])
    config.compare = CompareConfig(models=models)
    with pytest.raises((ConfigError, ValueError), match=message):
        run_compare(config, show_progress=False)
    assert not any(tmp_path.iterdir())  # failed before creating anything


def test_compare_section_in_yaml(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("compare:\n  models:\n    - svm_rbf\n    - {model: resnet18, label: r18, overrides: "
                    "{train.epochs: 2}}\n")
    config = load_config(path)
    plan = compare_plan(config)
    assert entry_config(config, plan[1]).train.epochs == 2
    path.write_text("compare:\n  models:\n    - {model: resnet18, extra: 1}\n")
    with pytest.raises(ConfigError, match="extra"):
        load_config(path)


def test_ties_on_validation_go_to_the_lower_validation_loss_whatever_the_order() -> None:
    """Small validation sets tie on accuracy and macro-F1; the grid's (or the table's) order chose, once a
    run that had diverged (validation loss 464 against 1.5)."""
    from dataclasses import replace

    from leukoscope.tasks.compare import CompareRow, _choose
    from leukoscope.tasks.search import selection_score

    searched = [{"val_accuracy": 0.333, "val_macro_f1": 0.125, "val_loss": 464.5},
                {"val_accuracy": 0.333, "val_macro_f1": 0.125, "val_loss": 1.49}]
    for rows in (searched, searched[::-1]):
        best = max(rows, key=lambda row: selection_score(row, "val_accuracy"))
        assert best["val_loss"] == 1.49
    row = CompareRow(label="a", model="abas_cnn", kind="classifier", accuracy=0.5, precision=None, recall=None,
                     specificity=None, f1=None, roc_auc=None, train_minutes=None, images_per_second=None,
                     parameters=None, epochs=1, val_accuracy=0.333, val_macro_f1=0.125, evaluated_on="test",
                     segmentation=None, run_dir="r", bundle="b", val_loss=464.5)
    calm = replace(row, label="calm", val_loss=1.49)
    for rows in ([row, calm], [calm, row]):
        index, why = _choose(rows)
        assert rows[index].label == "calm" and "then loss" in why


def test_rows_are_chosen_by_the_configs_monitor_as_search_chooses() -> None:
    """compare chose by validation accuracy whatever train.monitor said (val_macro_f1 on a set of 15% Benign)."""
    from dataclasses import replace

    from leukoscope.tasks.compare import CompareRow, _choose

    row = CompareRow(label="majority", model="abas_cnn", kind="classifier", accuracy=0.85, precision=None,
                     recall=None, specificity=None, f1=None, roc_auc=None, train_minutes=None, images_per_second=None,
                     parameters=None, epochs=1, val_accuracy=0.85, val_macro_f1=0.46, evaluated_on="test",
                     segmentation=None, run_dir="r", bundle="b", val_loss=0.40)
    balanced = replace(row, label="balanced", val_accuracy=0.80, val_macro_f1=0.70, val_loss=0.45)
    assert _choose([row, balanced])[0] == 0
    index, why = _choose([row, balanced], "val_macro_f1")
    assert index == 1 and why.startswith("validation macro F1")
    assert _choose([row, balanced], "val_loss")[0] == 0


def test_a_row_a_classical_model_cannot_take_is_refused_before_any_row_trains(synthetic_root: Path,
                                                                               tmp_path: Path) -> None:
    """Each row's settings were checked at its turn: the CNN rows before it trained, then the run stopped."""
    config = load_config(overrides=[f"data.path={synthetic_root}", f"output_root={tmp_path}", "name=cmp",
                                    "data.colour=gray", *FAST])
    with pytest.raises(ConfigError, match="compare row 'svm_rbf'.*leave them at rgb"):
        run_compare(config, models=["abas_cnn", "svm_rbf"], show_progress=False)
    assert not list(tmp_path.glob("cmp-compare-*"))  # nothing trained, no folder


def test_data_refused_leave_no_folder_behind(tmp_path: Path) -> None:
    """A comparison whose data were refused left a folder holding only config.yaml."""
    from leukoscope.data.manifest import DatasetError

    (tmp_path / "empty").mkdir()
    config = load_config(overrides=[f"data.path={tmp_path / 'empty'}", f"output_root={tmp_path / 'runs'}",
                                    "name=cmp", *FAST])
    with pytest.raises(DatasetError, match="empty"):
        run_compare(config, models=["naive_bayes", "abas_cnn"], show_progress=False)
    assert not list((tmp_path / "runs").glob("cmp-compare-*"))


def test_a_row_fine_tuning_a_bundle_takes_the_bundles_input_settings(tmp_path: Path) -> None:
    """The row's config was a full dump of the base config: every field counted as set, so model.init's bundle
    lent nothing (128 px, no cell window, one view for a bundle of 96 px, 24 um, 8 views)."""
    from leukoscope.engine.config import resolve_init

    config = load_config(overrides=[f"data.path={tmp_path}", "train.epochs=3"])
    config.features.k_best = 7  # assigned after loading, in a section no override named: carried over too
    row = resolve_init(entry_config(config, CompareEntry(model="mobilenet_v2",
                                                         overrides={"model.init": "pretrained:wbc-classifier"})))
    assert (row.model.image_size, row.data.cell_window_um, row.predict.views) == (96, 24.0, 8)
    assert row.train.epochs == 3 and row.data.path == str(tmp_path)  # what the config set is kept
    assert row.features.k_best == 7
    plain = entry_config(load_config(overrides=[f"data.path={tmp_path}", "model.image_size=64"]),
                         CompareEntry(model="abas_cnn"))
    assert plain.model.image_size == 64 and plain.model.name == "abas_cnn"


def test_a_rows_thread_count_does_not_carry_into_the_next_row(synthetic_root: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """fit sets torch's (process-wide) thread count from train.threads: a later row without the setting ran, and
    was timed, with the earlier row's."""
    import torch

    from leukoscope.tasks import compare

    seen: list[int] = []
    real = compare.run_experiment

    def spy(cfg, **kwargs):
        seen.append(torch.get_num_threads())
        return real(cfg, **kwargs)

    monkeypatch.setattr(compare, "run_experiment", spy)
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    before = 2
    config = load_config(overrides=[f"data.path={synthetic_root}", f"output_root={tmp_path}", "name=thr", *FAST])
    config.compare = CompareConfig(models=[CompareEntry(model="abas_cnn", overrides={"train.threads": 1}),
                                           "naive_bayes"])
    try:
        compare.run_compare(config, show_progress=False)
        assert seen == [before, before] and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(original)


def test_a_row_that_called_every_image_one_class_is_marked() -> None:
    """A collapsed model (every output the same) was drawn as an ordinary row, its ROC-AUC 0.686 quoted as
    if it read the images."""
    from leukoscope.tasks.compare import CompareRow, _footnotes, markdown_table, only_class_called

    collapsed = {"classes": ["blast", "lymphocyte", "platelet"], "confusion_matrix": [[0, 0, 4], [0, 0, 4], [0, 0, 4]]}
    working = {"classes": ["blast", "lymphocyte", "platelet"], "confusion_matrix": [[3, 0, 1], [0, 4, 0], [0, 1, 3]]}
    assert only_class_called(collapsed) == "platelet" and only_class_called(working) is None
    assert only_class_called({}) is None
    # images of one class, all called it: right answers, not a collapse (a blast-only folder was said collapsed)
    one_class_data = {"classes": ["blast", "lymphocyte"], "confusion_matrix": [[5, 0], [0, 0]]}
    assert only_class_called(one_class_data) is None
    row = CompareRow(label="m1", model="mobilenet_v3_small", kind="classifier", accuracy=0.33, precision=0.11,
                     recall=0.33, specificity=0.67, f1=0.17, roc_auc=0.686, train_minutes=None,
                     images_per_second=None, parameters=None, epochs=2, val_accuracy=0.3, val_macro_f1=0.1,
                     evaluated_on="test", segmentation=None, run_dir="r", bundle="b", one_class="platelet")
    assert "| m1 (2 ep) ! |" in markdown_table([row])
    info = {"chosen_by": "validation accuracy", "chosen": None, "dataset": "d", "classes": collapsed["classes"],
            "split_file": "s.json", "split_sizes": {}}
    assert any(note.startswith("! m1 called every scored image platelet") for note in _footnotes(info, [row]))
