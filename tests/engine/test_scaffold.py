"""The shared training scaffold: run folders, checkpoints, absolute paths; and a bundle's split check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leukoscope.bundle import BundleInfo
from leukoscope.data.manifest import Manifest, Sample
from leukoscope.data.splits import Split
from leukoscope.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint
from leukoscope.engine.config import ConfigError, load_config
from leukoscope.engine.run_dir import absolute_paths, one_run_of, open_run
from leukoscope.preprocessing import Preprocessing
from leukoscope.tasks.classify import training_overlap

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_a_failed_run_keeps_its_folder_only_when_it_holds_a_model(tmp_path: Path) -> None:
    config = load_config()
    with pytest.raises(RuntimeError), open_run(tmp_path / "empty", config):
        raise RuntimeError("bad data")
    assert not (tmp_path / "empty").exists()
    with pytest.raises(RuntimeError), open_run(tmp_path / "mil", config) as run_dir:
        (run_dir / "runs" / "cells" / "bundle").mkdir(parents=True)  # a multiple-instance run's first model
        (run_dir / "runs" / "cells" / "bundle" / "bundle.json").write_text("{}")
        raise RuntimeError("the second model failed")
    assert (tmp_path / "mil" / "runs" / "cells" / "bundle" / "bundle.json").is_file()
    assert "config.yaml" in {p.name for p in (tmp_path / "mil").iterdir()}


def test_an_interrupted_run_says_how_to_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during `train` ended with no word of the checkpoint it had saved."""
    import io

    from rich.console import Console

    from leukoscope import progress

    terminal = Console(file=io.StringIO(), width=200, color_system=None)
    monkeypatch.setattr(progress, "console", terminal)
    with pytest.raises(KeyboardInterrupt), open_run(tmp_path / "run", load_config()) as run_dir:
        (run_dir / CHECKPOINT_FILE).write_bytes(b"epoch 2")
        raise KeyboardInterrupt
    assert f"interrupted: `leukoscope train --resume {tmp_path / 'run'}` goes on" in terminal.file.getvalue()
    with pytest.raises(KeyboardInterrupt), open_run(tmp_path / "early", load_config()):
        raise KeyboardInterrupt  # before any epoch: nothing to resume, nothing said
    assert "early" not in terminal.file.getvalue() and not (tmp_path / "early").exists()
    # one run of a comparison: its resume goes on with that run, not with the comparison
    row_config = load_config()
    with pytest.raises(KeyboardInterrupt), one_run_of("compare", 2, 3), open_run(tmp_path / "row", row_config) as row:
        (row / CHECKPOINT_FILE).write_bytes(b"epoch 1")
        raise KeyboardInterrupt
    said = " ".join(terminal.file.getvalue().split())
    assert "the compare stopped at run 2 of 3: `leukoscope train --resume` finishes that run alone" in said


def test_paths_become_absolute_but_weight_names_do_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cells").mkdir()
    config = load_config(overrides=["data.path=./cells", "data.split_file=split.json", "model.weights=DEFAULT",
                                    "output_root=runs"])
    resolved = absolute_paths(config, ["data.path", "data.split_file", "model.weights", "output_root"])
    assert resolved.data.path == str(tmp_path / "cells") and resolved.data.split_file == str(tmp_path / "split.json")
    assert resolved.model.weights == "DEFAULT" and resolved.output_root == str(tmp_path / "runs")


def test_a_checkpoint_of_the_earlier_layout_still_resumes(tmp_path: Path) -> None:
    """Before the shared scaffold, the trainer's entries sat at the top level of checkpoint.pt
    (and detection checkpoints had no Python/NumPy random states)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": None,
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": [{"epoch": 1}],
                "best_score": 0.5, "best_epoch": 1, "best_state": {}, "epoch": 1, "elapsed": 3.0},
               tmp_path / CHECKPOINT_FILE)
    progress = load_checkpoint(tmp_path / CHECKPOINT_FILE, model=torch.nn.Linear(2, 2), optimizer=optimizer,
                               scheduler=None, generator=torch.Generator())
    assert progress["epoch"] == 1 and progress["best_score"] == 0.5 and progress["history"] == [{"epoch": 1}]
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        load_checkpoint(tmp_path / "elsewhere" / CHECKPOINT_FILE, model=model, optimizer=optimizer, scheduler=None,
                        generator=generator)


def test_a_config_of_another_task_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a 'detect' experiment.*leukoscope train --config"):
        load_config(CONFIGS / "detector_cbc.yaml")


def _samples(root: Path, names: list[str]) -> list[Sample]:
    for name in names:
        (root / name).write_bytes(b"x")
    return [Sample(root / name, "a") for name in names]


def test_the_training_overlap_of_a_split_without_validation(tmp_path: Path) -> None:
    train, test = _samples(tmp_path, ["t1.png", "t2.png"]), _samples(tmp_path, ["s1.png"])
    split_file = Split({"train": train, "test": test}, ["a"]).save(tmp_path / "split.json")
    info = BundleInfo("m", ["a"], Preprocessing(32), provenance={"split_file": str(split_file)})
    assert training_overlap(info, Manifest(train + test, ["a"])) == ({"train": 2}, None)
    assert training_overlap(info, Manifest(test, ["a"])) == ({}, None)
    split_file.unlink()
    overlap, note = training_overlap(info, Manifest(test, ["a"]))
    assert overlap == {} and "is gone" in note


def test_jobs_started_in_the_same_second_get_folders_of_their_own(tmp_path) -> None:
    """search and compare checked a stamped name, then created it with exist_ok: two jobs of one second shared
    a folder and mixed their run-01... and results files."""
    from leukoscope.engine import run_dir

    folders = [run_dir.fresh_dir(tmp_path, "cmp-compare") for _ in range(3)]
    assert len(set(folders)) == 3 and all(folder.is_dir() for folder in folders)
    assert all(folder.name.startswith("cmp-compare-") for folder in folders)
    # two processes that both found the same name free: the second to create it takes the next one
    names = iter([tmp_path / "job-1", tmp_path / "job-1", tmp_path / "job-2"])
    original = run_dir.new_run_dir
    run_dir.new_run_dir = lambda root, name: next(names)
    try:
        assert [run_dir.fresh_dir(tmp_path, "job"), run_dir.fresh_dir(tmp_path, "job")] == [tmp_path / "job-1",
                                                                                             tmp_path / "job-2"]
    finally:
        run_dir.new_run_dir = original
