"""Grid search over training settings, choosing by validation score (never test).

System E searched epochs {5, 10} x learning rate {0.01, 0.001} x optimizer {SGD, Adam}.
Every combination is a full run (own directory, bundle and report); the winner
is the one with the best validation score, and the table shows test scores of
all of them for transparency.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from leukoscope.engine.config import ConfigError, ExperimentConfig
from leukoscope.engine.data_prep import PreparedData, prepare_data
from leukoscope.engine.run_dir import fresh_dir, one_run_of
from leukoscope.engine.learner import check_learner_config
from leukoscope.evaluation.metrics import collapsed_note, only_class_called
from leukoscope.tasks.classify import RunResult, preprocessing_of, run_experiment, run_name, with_absolute_paths
from leukoscope.progress import console


@dataclass
class SearchResult:
    search_dir: Path
    rows: list[dict[str, Any]]
    best: RunResult


def grid(config: ExperimentConfig) -> list[dict[str, Any]]:
    """Every combination of the search section's lists (unset lists keep the base value)."""
    search = config.search
    axes = {
        "model.name": (search.models if search and search.models else [config.model.name]),
        "train.epochs": (search.epochs if search and search.epochs else [config.train.epochs]),
        "train.lr": (search.lr if search and search.lr else [config.train.lr]),
        "train.optimizer": (search.optimizer if search and search.optimizer else [config.train.optimizer]),
        "train.batch_size": (search.batch_size if search and search.batch_size else [config.train.batch_size]),
    }
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _refuse_settings_classical_models_ignore(config: ExperimentConfig) -> None:
    """A classical model trains in one step: a grid over epochs, learning rate, optimizer or batch size ran it
    again and again with the same result and "chose" one of the copies."""
    from leukoscope.models import model_entry

    search = config.search
    axes = [f"search.{name}" for name in ("epochs", "lr", "optimizer", "batch_size") if getattr(search, name, None)]
    names = (search.models if search and search.models else None) or [config.model.name]
    classical = [name for name in names if model_entry(name).kind == "classic"]
    if axes and classical:
        raise ConfigError(f"{', '.join(axes)} vary how a network trains; {', '.join(classical)} "
                          f"{'is a classical model' if len(classical) == 1 else 'are classical models'}, fitted in "
                          f"one step, which would give the same result for every value: search networks only, or "
                          f"compare a classical model's options (model.options) as rows of `leukoscope compare`")


def _apply(config: ExperimentConfig, settings: dict[str, Any]) -> ExperimentConfig:
    updated = config.model_copy(deep=True)
    for dotted, value in settings.items():
        section, key = dotted.split(".")
        if getattr(getattr(updated, section), key) != value:  # a setting not searched stays unset (model.init's)
            setattr(getattr(updated, section), key, value)
    updated.search = None
    return updated


def run_search(config: ExperimentConfig, *, show_progress: bool = True) -> SearchResult:
    config.require_search()
    config = with_absolute_paths(config)  # model.init's model, image size and views before the grid is made
    combos = grid(config)
    _refuse_settings_classical_models_ignore(config)
    for settings in combos:  # every run's settings before the first trains (lr, optimizer, batch size)
        run_config = _apply(config, settings)
        check_learner_config(run_config, preprocessing_of(run_config))
    prepared: dict[tuple[Any, ...], PreparedData] = {}  # decoded once per Preprocessing.decoded_as

    def prepared_for(run_config: ExperimentConfig) -> PreparedData:
        size = preprocessing_of(run_config).decoded_as()
        if size not in prepared:
            prepared[size] = prepare_data(run_config.data, preprocessing_of(run_config), Path(config.output_root),
                                          show_progress=show_progress)
            if "val" not in prepared[size].parts:  # refuse before hours of training, not after
                raise ValueError("grid search needs a validation split to choose a run (data.ratios gives it "
                                 "0 images); a choice by test or training scores would not be honest")
        return prepared[size]

    prepared_for(_apply(config, combos[0]))  # before the folder: a refused split or data left an empty one
    search_dir = fresh_dir(config.output_root, f"{run_name(config)}-search")
    console.print(f"[bold]grid search[/bold]: {len(combos)} runs in {search_dir}")
    rows: list[dict[str, Any]] = []
    results: list[RunResult] = []
    for index, settings in enumerate(combos, start=1):
        run_config = _apply(config, settings)
        run_config.name = f"{run_name(config)}-{index:02d}"
        data = prepared_for(run_config)
        console.print(f"[bold]run {index}/{len(combos)}[/bold] " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        with one_run_of("search", index, len(combos)):
            result = run_experiment(run_config, run_dir=search_dir / f"run-{index:02d}", prepared=data,
                                    show_progress=show_progress)
        results.append(result)
        val_rows = [h for h in result.fit.history if h["epoch"] == result.fit.best_epoch]
        best_row = val_rows[0] if val_rows else {}
        rows.append({
            "run": index,
            **settings,
            "best_epoch": result.fit.best_epoch,
            "val_loss": best_row.get("val_loss"),
            "val_accuracy": best_row.get("val_accuracy"),
            "val_macro_f1": best_row.get("val_macro_f1"),
            "test_accuracy": result.metrics["accuracy"],
            "test_macro_f1": result.metrics["macro"]["f1"],
            "train_minutes": result.fit.train_seconds / 60,
            "bundle": str(result.bundle_dir),
            # the class a collapsed run called every scored image (None otherwise), as compare's one_class
            "one_class": only_class_called(result.metrics),
        })
        _write_tables(search_dir, rows)  # after each run: a later run's crash kept none of the table
    key = config.train.monitor
    best_index = max(range(len(rows)), key=lambda i: selection_score(rows[i], key))
    for i, row in enumerate(rows):
        row["chosen"] = i == best_index
    _write_tables(search_dir, rows)
    _print_table(rows)
    console.print(f"chosen by {key}: run {rows[best_index]['run']} -> {rows[best_index]['bundle']}")
    return SearchResult(search_dir, rows, results[best_index])


def selection_score(row: dict[str, Any], monitor: str) -> tuple[float, float, float]:
    """Higher is better: the monitored validation value (loss negated), then macro-F1, then the lower
    validation loss, as training chooses its epoch (a small validation set ties often: the grid's order
    chose, and once a diverged run)."""
    value = row[monitor]
    if value is None:
        value = -float("inf")
    elif monitor == "val_loss":
        value = -value
    loss = row.get("val_loss")
    return value, row["val_macro_f1"] or 0.0, -loss if loss is not None else -float("inf")


def _write_tables(search_dir: Path, rows: list[dict[str, Any]]) -> None:
    (search_dir / "results.json").write_text(json.dumps(rows, indent=1))
    with (search_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _print_table(rows: list[dict[str, Any]]) -> None:
    # Settings shared by every run go to the title, so the table fits a terminal
    # more often; results.csv keeps every column.
    fixed = [c for c in rows[0] if "." in c and len({str(row[c]) for row in rows}) == 1]
    title = "grid search (chosen by validation)"
    if fixed:
        title += "; every run: " + ", ".join(f"{c.rpartition('.')[2]}={rows[0][c]}" for c in fixed)
    table = Table(title=title)
    shown = [c for c in rows[0] if c not in ("bundle", "one_class") and c not in fixed]
    for column in shown:
        table.add_column(column.rpartition(".")[2], overflow="fold")  # a narrow terminal wraps cells, never cuts them
    for row in rows:
        table.add_row(*[_cell(c, row[c]) + (" !" if c == "run" and row.get("one_class") else "") for c in shown])
    console.print(table)
    for row in rows:  # marked as compare marks its rows: a collapsed run's scores say nothing of the images
        if row.get("one_class"):
            note = collapsed_note(f"run {row['run']}", row["one_class"])
            console.print(f"[yellow]![/yellow] {escape(note)}", soft_wrap=True)


def _cell(column: str, value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4g}" if "." in column else f"{value:.4f}"  # settings: lr 1e-05 must not print as 0.0000
