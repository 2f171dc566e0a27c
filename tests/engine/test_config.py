import re
from pathlib import Path

import pytest

from leukoscope.engine.config import ConfigError, load_config, parse_overrides, save_config


def test_defaults_are_valid_and_typed() -> None:
    config = load_config()
    assert config.data.ratios == [0.8, 0.1, 0.1]
    assert config.train.optimizer == "adam"
    assert config.model.weights is None


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch' \(did you mean 'train\.epochs'\?\)"):
        load_config(overrides=["train.epoch=3"])


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  name: resnet18\n  imagesize: 64\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value) and "model.imagesize" in str(error.value)


def test_bad_values_are_rejected_with_the_key() -> None:
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(overrides=["train.optimizer=rmsprop"])
    with pytest.raises(ConfigError, match="augmentation"):
        load_config(overrides=["train.augmentation=wild"])
    with pytest.raises(ConfigError, match="ratios"):
        load_config(overrides=["data.ratios=[0.5,0.1]"])
    with pytest.raises(ConfigError, match="image_size"):
        load_config(overrides=["model.image_size=8"])


def test_overrides_parse_yaml_values() -> None:
    tree = parse_overrides(["train.lr=0.01", "data.ratios=[0.75,0.25]", "train.class_weighted_loss=false", "name=x"])
    assert tree == {"train": {"lr": 0.01, "class_weighted_loss": False}, "data": {"ratios": [0.75, 0.25]}, "name": "x"}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.lr"])
    for broken in ("data.path=*.csv", "train.lr=[", "run.name=@x"):  # a YAML error was a traceback
        with pytest.raises(ConfigError, match=rf"override '{re.escape(broken)}': the value is not valid YAML"):
            parse_overrides([broken])


def test_values_no_config_could_hold_are_refused() -> None:
    for override, key in (("data.max_pixels=-5", "data.max_pixels"), ("data.phash_distance=-3", "data.phash_distance"),
                          ("train.early_stopping_patience=0", "train.early_stopping_patience")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(overrides=[override])


def test_values_that_failed_only_after_training_or_as_tracebacks_are_refused_upfront() -> None:
    """predict.uncertain_threshold=5 trained the whole run and failed when writing the bundle; a bad
    train.device or train.threads was a traceback after the data were prepared; search.epochs=[0,1] a raw
    pydantic message."""
    for override, key in (("predict.uncertain_threshold=5", "predict.uncertain_threshold"),
                          ("train.device=gpu", "train.device"), ("train.threads=-1", "train.threads"),
                          ("data.cell_window_um=-3", "data.cell_window_um"), ("search.epochs=[0,1]", "search.epochs"),
                          ("search.batch_size=[0]", "search.batch_size")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(overrides=[override])
    for good in ("train.device=cuda:1", "train.device=cpu", "train.device=mps:0", "train.device=xpu",
                 "train.threads=2", "predict.uncertain_threshold=0.7"):
        load_config(overrides=[good])
    from leukoscope.engine.detection_config import load_detection_config

    for override, key in (("predict.score_threshold=5", "predict.score_threshold"), ("data.um_per_px=-1", "um_per_px"),
                          ("train.warmup_iters=-3", "train.warmup_iters"), ("train.grad_clip=-1", "train.grad_clip"),
                          ("train.max_images_per_epoch=0", "train.max_images_per_epoch")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_detection_config(overrides=[override])
    load_detection_config(overrides=["data.um_per_px=0.08"])
    load_detection_config(overrides=["data.um_per_px=estimate"])


def test_true_is_not_a_number_and_a_number_can_be_a_name() -> None:
    """train.epochs=true trained 1 epoch, train.lr=true at lr 1.0; name=2024 and class folders 0 and 1 were
    refused as "not a valid string"."""
    for override in ("train.epochs=true", "train.lr=true", "train.batch_size=yes", "model.image_size=false"):
        with pytest.raises(ConfigError, match="must be a number, not"):
            load_config(overrides=[override])
    config = load_config(overrides=["name=2024", "data.classes=[0,1]", "train.deterministic=false"])
    assert config.name == "2024" and config.data.classes == ["0", "1"] and config.train.deterministic is False


def test_a_section_written_as_one_value_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text("model: abas_cnn\ndata: /tmp/somewhere\n")
    with pytest.raises(ConfigError, match="model"):  # an AttributeError traceback before
        load_config(config)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "exp.yaml").write_text("data:\n  path: ../data\nmodel:\n  weights: DEFAULT\n")
    config = load_config(folder / "exp.yaml", ["train.epochs=2"])
    assert Path(config.data.path) == (tmp_path / "data").resolve()
    (folder / "split.yaml").write_text("data:\n  path: ../data\n  split_file: ../split.json\n")
    assert Path(load_config(folder / "split.yaml").data.split_file) == (tmp_path / "split.json").resolve()
    assert config.model.weights == "DEFAULT"  # a torchvision weight name, not a path
    assert config.train.epochs == 2
    # a bare name is a path too ("cells", "mysplit" beside the file): it was taken from the working folder
    (folder / "bare.yaml").write_text("data:\n  path: cells\n  split_file: mysplit\n")
    bare = load_config(folder / "bare.yaml")
    assert Path(bare.data.path) == (folder / "cells").resolve()
    assert Path(bare.data.split_file) == (folder / "mysplit").resolve()


def test_output_root_in_a_file_is_read_from_its_folder_and_an_override_from_the_working_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "proj" / "experiments"
    folder.mkdir(parents=True)
    (folder / "exp.yaml").write_text("output_root: runs_here\ndata:\n  path: ../../base\n")
    monkeypatch.chdir(tmp_path / "proj")  # it was proj/runs_here: where the run was started from
    assert Path(load_config(folder / "exp.yaml").output_root) == (folder / "runs_here").resolve()
    overridden = load_config(folder / "exp.yaml", ["output_root=elsewhere"])
    assert overridden.output_root == "elsewhere"  # the command line's: the working folder's, as before
    assert load_config(overrides=["data.path=x"]).output_root == "runs"


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  path: cells\ntrain:\n  epochs: 1\n  lr: 0.0001\nmodel:\n  name: abas_cnn\n"
                    "train:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: line 8: section 'train' appears twice "
                                          r"\(first at line 3\); merge them"):
        load_config(path)
    path.write_text("train:\n  epochs: 1\n  lr: 0.1\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'train\.epochs' appears twice \(first at line 2\)"):
        load_config(path)
    path.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match=r"line 2: key 'name' appears twice \(first at line 1\)"):
        load_config(path)
    from leukoscope.engine.detection_config import load_detection_config
    from leukoscope.tasks.mil_config import load_mil_config

    for task, load in (("detect", load_detection_config), ("mil", load_mil_config)):  # the same reader
        path.write_text(f"task: {task}\ndata: {{path: a}}\ndata: {{path: b}}\n")
        with pytest.raises(ConfigError, match=r"line 3: section 'data' appears twice \(first at line 2\)"):
            load(path)


def test_saved_config_loads_back_identically(tmp_path: Path) -> None:
    # output_root absolute, as a run saves it: a relative one in a file is read from the file's folder
    config = load_config(overrides=["data.path=/data/x", "train.lr=0.005", "search.lr=[0.1,0.01]",
                                    f"output_root={tmp_path / 'runs'}"])
    again = load_config(save_config(config, tmp_path / "config.yaml"))
    assert again == config


def test_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: h\xe9mato\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(latin))}: not a UTF-8 text file"):
        load_config(latin)


def test_every_shipped_config_is_valid() -> None:
    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs, "configs/ should hold the published-system experiments"
    from leukoscope.tasks import task_named, task_of_config_file

    for path in configs:  # each task validates its own schema (detector experiments have their own)
        task_named(task_of_config_file(path)).function("load_config")(path)


@pytest.mark.parametrize(("typo", "meant"), [
    ("train.learning_rate", "train.lr"),  # an alias: difflib alone rates early_stopping_patience closest
    ("train.batch", "train.batch_size"),
    ("train.epoch", "train.epochs"),
    ("epochs", "train.epochs"),  # a leaf without its section
    ("train.image_size", "model.image_size"),  # a leaf in the wrong section
    ("model.imagesize", "model.image_size"),
])
def test_did_you_mean_compares_leaf_names_and_knows_synonyms(typo: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown config key '{typo}' \(did you mean '{meant}'\?\)"):
        load_config(overrides=[f"{typo}=1"])


def test_an_override_typo_is_blamed_on_the_override_not_the_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(overrides=["train.epochs=2", "train.lrr=0.1"])
    assert str(error.value).startswith("command-line override 'train.lrr=0.1': unknown config key 'train.lrr'")
    assert "defaults" not in str(error.value)
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ["model.image_size=8"])
    message = str(error.value)
    assert f"{path}: unknown config key 'train.epoch'" in message
    assert "command-line override 'model.image_size=8': config key 'model.image_size'" in message


def test_search_needs_a_section_with_values_and_shows_an_example() -> None:
    for overrides in ([], ["search={}"]):
        with pytest.raises(ConfigError, match="nothing to search") as error:
            load_config(overrides=overrides).require_search()
        assert "search:\n  epochs: [5, 10]\n  lr: [0.01, 0.001]" in str(error.value)
    assert load_config(overrides=["search.lr=[0.1,0.01]"]).require_search().lr == [0.1, 0.01]
