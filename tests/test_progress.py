"""Terminal output: tables and lines print whole, in a narrow terminal and in pipes."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from leukoscope import progress
from leukoscope.tasks import search


def test_output_to_a_pipe_is_wide_unless_columns_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    monkeypatch.delenv("COLUMNS", raising=False)
    assert progress._console_width() == progress.PIPE_WIDTH > 80
    monkeypatch.setenv("COLUMNS", "100")
    assert progress._console_width() is None  # rich then uses COLUMNS


def test_grid_search_table_folds_in_an_80_column_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(search, "console", terminal)
    rows = [{"run": i, "model.name": "efficientnet_b0", "train.epochs": 10, "train.lr": 1e-05 * i,
             "train.optimizer": "adamw", "train.batch_size": 32, "best_epoch": 7, "val_loss": 0.123456,
             "val_accuracy": 0.987654, "val_macro_f1": 0.876543, "test_accuracy": 0.765432,
             "test_macro_f1": 0.654321, "train_minutes": 12.5, "bundle": "b", "chosen": i == 1} for i in (1, 2)]
    search._print_table(rows)
    text = terminal.file.getvalue()
    assert "…" not in text  # rich's default cuts cells to "…" when the table is wider than the terminal
    assert max(len(line) for line in text.splitlines()) <= 80
    wide = Console(file=io.StringIO(), width=progress.PIPE_WIDTH, color_system=None)
    monkeypatch.setattr(search, "console", wide)
    search._print_table(rows)
    lines = wide.file.getvalue().splitlines()
    for value in ("batch_size=32", "efficientnet_b0", "2e-05", "0.9877", "0.6543", "12.5000", "True"):
        assert any(value in line for line in lines), value  # in a pipe every cell is on one line


def test_name_some_lists_the_first_ten_and_counts_the_rest() -> None:
    names = [f"f{i}.png" for i in range(13)]
    assert progress.name_some(names) == ", ".join(names[:10]) + " and 3 more"
    assert progress.name_some(names[:2]) == "f0.png, f1.png"


def test_progress_bar_shows_items_and_counted_quantities_per_second(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    clock = iter([100.0, 102.0, 104.0, 7.0, 7.0])  # start, then one reading per update
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.progress_bar(2, "analysing", unit="fields") as update:  # not a terminal: plain lines
        update(advance=1, info="a.jpg: 16 WBC", cells=16)
        update(advance=1, info="b.jpg: 4 WBC", cells=4)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "analysing: 1/2 (2s, 0.50 fields/s, 8.0 cells/s) a.jpg: 16 WBC"
    assert lines[-1] == "analysing: 2/2 (4s, 0.50 fields/s, 5.0 cells/s) b.jpg: 4 WBC"
    with progress.progress_bar(1, "x", unit=None) as update:  # no unit: counts are accepted, no rates
        update(advance=1, info="", cells=3)
    assert capsys.readouterr().err.strip() == "x: 1/1 (0s)"
    with progress.progress_bar(1, "x", enabled=False) as update:
        update(advance=1, cells=3)
