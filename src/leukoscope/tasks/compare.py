"""Train several models on one split and compare them in one table (systems C and E).

``leukoscope compare --config FILE`` (or ``--data D --models a,b,c``) runs
every model of the ``compare:`` section, CNNs and classical pipelines alike,
through :func:`~leukoscope.tasks.classify.run_experiment` on the **same saved
split** and the same decoded images, then writes into
``<output_root>/<name>-compare-<time>/``:

- ``compare.csv``, ``compare.json``, ``compare.md``: one row per model with
  accuracy and its 95% (Wilson) interval over the images scored, macro
  precision / recall / specificity / F1, ROC-AUC (macro one-vs-rest), training
  minutes, inference images/s and parameters;
- ``compare.png``: the scores as a dot plot (accuracy with its interval) and
  the training time as bars;
- ``compare.html``: the table, the figure and a link to each run's report;
- one run directory per model (``NN-<label>/``: bundle, metrics, report).

A row may carry settings of its own::

    compare:
      models:
        - svm_rbf
        - {model: tusar_convnet, label: convnet-3ep, overrides: {train.epochs: 3}}
        - {model: tusar_convnet, label: convnet-3ep-seg,
           overrides: {train.epochs: 3, data.segmentation: lab_kmeans}}

Overrides may change ``model.*``, ``train.*``, ``features.*``, ``predict.*``
and ``data.segmentation`` (pre-processing), never the data or the split. The
"best" row is chosen on **validation** accuracy (then validation macro F1),
never on test scores, as ``leukoscope search`` chooses: without a validation
part every row's scores are still reported, but no row is chosen, and the
outputs say why.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ValidationError
from rich.markup import escape
from rich.table import Table

from leukoscope.models.classic import CLASSIC_MODELS
from leukoscope.engine.config import (
    CompareEntry,
    ConfigError,
    ExperimentConfig,
    format_validation_error,
    merge_trees,
    set_dotted,
    save_config,
)
from leukoscope.engine.data_prep import PreparedData, prepare_data
from leukoscope.engine.run_dir import fresh_dir, one_run_of
from leukoscope.engine.learner import check_learner_config
from leukoscope.evaluation.metrics import collapsed_note, only_class_called
from leukoscope.tasks.classify import RunResult, preprocessing_of, run_experiment, with_absolute_paths
from leukoscope.tasks.search import selection_score
from leukoscope.models import model_entry
from leukoscope.progress import console
from leukoscope.proportions import wilson_interval

#: Models compared when neither the config nor the command line names any: the cheap ones.
DEFAULT_MODELS: tuple[str, ...] = CLASSIC_MODELS

_ALLOWED_SECTIONS = ("model.", "train.", "features.", "predict.")
_ALLOWED_KEYS = ("data.segmentation",)

#: (column key, header in compare.md / compare.html)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("label", "model"),
    ("accuracy", "accuracy"),
    ("accuracy_interval", "accuracy 95% CI"),
    ("precision", "precision (macro)"),
    ("recall", "recall (macro)"),
    ("specificity", "specificity (macro)"),
    ("f1", "F1 (macro)"),
    ("roc_auc", "ROC-AUC"),
    ("train_minutes", "train min"),
    ("images_per_second", "inference img/s"),
    ("parameters", "params"),
)


@dataclass
class CompareRow:
    label: str
    model: str
    kind: str
    accuracy: float
    precision: float | None
    recall: float | None
    specificity: float | None
    f1: float | None
    roc_auc: float | None
    train_minutes: float | None
    images_per_second: float | None
    parameters: int | None
    epochs: int | None
    val_accuracy: float | None
    val_macro_f1: float | None
    evaluated_on: str
    segmentation: str | None
    run_dir: str
    bundle: str
    chosen: bool = False
    val_loss: float | None = None
    one_class: str | None = None
    """The class a run called every scored image (a collapsed model: its scores say nothing of the images)."""
    n: int | None = None
    """Images scored: on a small test set two rows' accuracies differ by chance (``accuracy_low`` / ``_high``)."""
    accuracy_low: float | None = None
    accuracy_high: float | None = None

    @property
    def accuracy_interval(self) -> tuple[float, float] | None:
        """The 95% Wilson interval of the accuracy over the ``n`` images scored."""
        return None if self.accuracy_low is None or self.accuracy_high is None else (self.accuracy_low,
                                                                                   self.accuracy_high)


@dataclass
class CompareResult:
    compare_dir: Path
    rows: list[CompareRow]
    runs: list[RunResult]
    best_index: int | None
    """The chosen row; None without a validation part (``chosen_by`` then says why no row is chosen)."""
    chosen_by: str

    @property
    def best(self) -> RunResult | None:
        return None if self.best_index is None else self.runs[self.best_index]


# ----------------------------------------------------------------- planning


def compare_plan(config: ExperimentConfig, models: Sequence[str] | None = None) -> list[CompareEntry]:
    """The rows to run: ``models`` if given (a name that is the label of a ``compare.models`` row
    takes that row, settings included; other names are plain models), else the config's
    ``compare.models``, else :data:`DEFAULT_MODELS`. Checks model names, labels and override
    keys before any training."""
    configured = [CompareEntry(model=item) if isinstance(item, str) else item
                  for item in (config.compare.models if config.compare is not None else [])]
    if models:
        # A name that labels a configured row keeps that row's overrides; others are plain models.
        by_label = {entry.label or entry.model: entry for entry in configured}
        entries = [by_label.get(name.strip(), CompareEntry(model=name.strip())) for name in models if name.strip()]
    elif configured:
        entries = configured
    else:
        entries = [CompareEntry(model=name) for name in DEFAULT_MODELS]
    if not entries:
        raise ConfigError("nothing to compare: name models with --models a,b or compare.models in the config")
    labels: list[str] = []
    for entry in entries:
        model_entry(entry.model)  # unknown model: error listing the available ones
        if model_entry(entry.model).kind not in ("classifier", "classic"):
            raise ConfigError(f"compare: {entry.model} is a {model_entry(entry.model).kind}, not a classifier")
        for key in entry.overrides:
            if key == "model.name":
                raise ConfigError(f"compare: set the model with 'model: NAME', not an override ({entry.model})")
            if not (key.startswith(_ALLOWED_SECTIONS) or key in _ALLOWED_KEYS):
                raise ConfigError(
                    f"compare: override '{key}' of {entry.label or entry.model} is not allowed: every row "
                    f"uses the same data and split; rows may set model.*, train.*, features.*, predict.* "
                    f"and data.segmentation")
        labels.append(entry.label or entry.model)
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"compare: rows {repeated} appear more than once; give each a distinct label")
    return entries


def entry_config(config: ExperimentConfig, entry: CompareEntry) -> ExperimentConfig:
    """``config`` with the row's model and overrides applied (validated like a config file). Only what the
    config set is carried over: a row with ``model.init`` then takes the bundle's input settings (size, cell
    window, views), as ``train --init`` does, where a full dump had set every field to its default."""
    tree = _set_fields(config)
    tree["compare"] = None
    tree["search"] = None
    update: dict[str, Any] = {}
    set_dotted(update, "model.name", entry.model)
    for key, value in entry.overrides.items():
        set_dotted(update, key, value)
    label = entry.label or entry.model
    try:
        return ExperimentConfig.model_validate(merge_trees(tree, update))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"compare row {label!r}", ExperimentConfig)) from None


def _set_fields(model: BaseModel) -> dict[str, Any]:
    """The fields of ``model`` that were set (by a file, an override or an assignment), section by section: a
    section assigned into after loading counts with what was set in it (pydantic's ``exclude_unset`` would
    drop a section its parent did not record as set)."""
    tree: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            inner = _set_fields(value)
            if inner or name in model.model_fields_set:
                tree[name] = inner
        elif name in model.model_fields_set:
            tree[name] = model.model_dump(mode="json", include={name})[name]
    return tree


# ------------------------------------------------------------------ running


def _row(label: str, entry_cfg: ExperimentConfig, result: RunResult) -> CompareRow:
    metrics = result.metrics
    macro = metrics.get("macro", {})
    history = result.fit.history or []
    best = next((h for h in history if h.get("epoch") == result.fit.best_epoch), {})
    kind = model_entry(entry_cfg.model.name).kind
    n = metrics.get("n")
    low, high = wilson_interval(round(metrics["accuracy"] * n), n) if n else (None, None)
    return CompareRow(
        label=label,
        model=entry_cfg.model.name,
        kind=kind,
        accuracy=metrics["accuracy"],
        precision=macro.get("precision"),
        recall=macro.get("recall"),
        specificity=macro.get("specificity"),
        f1=macro.get("f1"),
        roc_auc=metrics.get("roc_auc_macro_ovr"),
        train_minutes=metrics.get("train_minutes"),
        images_per_second=metrics.get("images_per_second"),
        parameters=metrics.get("parameters"),
        epochs=len(history) if kind != "classic" else None,
        val_accuracy=best.get("val_accuracy"),
        val_macro_f1=best.get("val_macro_f1"),
        val_loss=best.get("val_loss"),
        evaluated_on=metrics.get("evaluated_on", "test"),
        segmentation=entry_cfg.data.segmentation,
        run_dir=str(result.run_dir),
        bundle=str(result.bundle_dir),
        one_class=only_class_called(metrics),
        n=n,
        accuracy_low=low,
        accuracy_high=high,
    )


#: Why no row is chosen when the split has no validation part (the comparison's outputs and the CLI say it).
NO_VALIDATION = ("no row is chosen: the split has no validation part, and a choice by test scores would tune to "
                 "the test set (every row's test scores are still reported); give the split a validation part "
                 "(e.g. data.ratios=[0.8,0.1,0.1], or `leukoscope split --ratios 0.8,0.1,0.1`) to have the best "
                 "row chosen on it")


def _choose(rows: list[CompareRow], monitor: str = "val_accuracy") -> tuple[int | None, str]:
    """The best row on validation by ``monitor`` (the config's ``train.monitor``, as `search` chooses; ties as
    :func:`leukoscope.tasks.search.selection_score` breaks them) and the words of the rule; (None, why) when a
    row has no validation score: test scores never choose (a choice by them is tuning to the test set;
    `leukoscope search` refuses too)."""
    unscored = [row.label for row in rows if row.val_accuracy is None]
    if len(unscored) == len(rows):
        return None, NO_VALIDATION
    if unscored:  # a validation part, but a row without its score: the rows cannot be ranked on it
        return None, (f"no row is chosen: {', '.join(unscored)} recorded no validation score, and a choice by "
                      f"test scores would tune to the test set (every row's test scores are still reported)")

    def key(i: int) -> tuple[float, float, float]:  # ties: the lower validation loss, as training's epochs
        row = rows[i]
        return selection_score({"val_accuracy": row.val_accuracy, "val_macro_f1": row.val_macro_f1,
                                 "val_loss": row.val_loss}, monitor)
    words = {"val_accuracy": "validation accuracy (then validation macro F1, then loss)",
             "val_macro_f1": "validation macro F1 (then loss)",
             "val_loss": "the lower validation loss (then validation macro F1)"}[monitor]
    return max(range(len(rows)), key=key), words


def run_compare(
    config: ExperimentConfig,
    *,
    models: Sequence[str] | None = None,
    compare_dir: Path | None = None,
    show_progress: bool = True,
) -> CompareResult:
    """Train every row of the comparison on one split; write the table, figure and page."""
    entries = compare_plan(config, models)
    # each row completed from its model.init bundle first: its image size decides how the data are decoded
    configs = [with_absolute_paths(entry_config(config, entry)) for entry in entries]
    labels = [entry.label or entry.model for entry in entries]
    for label, cfg in zip(labels, configs):  # every row's settings before the first row trains, not at its turn
        try:
            check_learner_config(cfg, preprocessing_of(cfg))
        except ConfigError as exc:
            raise ConfigError(f"compare row {label!r}: {exc}") from None
    # the config's model is not one of the rows: without a name the folder is "compare-<time>", not the default
    # model's name (a comparison of naive Bayes and a tree went into "resnet18-compare-...")
    base = config.name or "compare"
    prepared: dict[tuple[Any, ...], PreparedData] = {}  # decoded once per Preprocessing.decoded_as
    # the first row's data before the folder: a split or data refused left a folder holding only config.yaml
    prepared[preprocessing_of(configs[0]).decoded_as()] = prepare_data(
        configs[0].data, preprocessing_of(configs[0]), Path(config.output_root), show_progress=show_progress)
    if compare_dir is None:
        compare_dir = fresh_dir(config.output_root, base if not config.name else f"{base}-compare")
    compare_dir = Path(compare_dir)
    compare_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, compare_dir / "config.yaml")
    console.print(f"[bold]compare[/bold]: {len(entries)} models in {compare_dir}: {', '.join(labels)}")

    rows: list[CompareRow] = []
    runs: list[RunResult] = []
    split_files: set[str] = set()
    for index, (label, cfg) in enumerate(zip(labels, configs), start=1):
        key = preprocessing_of(cfg).decoded_as()
        if key not in prepared:
            prepared[key] = prepare_data(cfg.data, preprocessing_of(cfg), Path(config.output_root),
                                         show_progress=show_progress)
        data = prepared[key]
        split_files.add(str(data.split_file.resolve()))
        cfg.name = f"{base}-{label}"
        console.print(f"[bold]model {index}/{len(entries)}[/bold]: {label}")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        threads = torch.get_num_threads()  # a row's train.threads is its own: the next row starts as the first
        try:
            with one_run_of("compare", index, len(entries)):
                result = run_experiment(cfg, run_dir=compare_dir / f"{index:02d}-{safe}", prepared=data,
                                        show_progress=show_progress)
        finally:
            torch.set_num_threads(threads)
        runs.append(result)
        rows.append(_row(label, cfg, result))
    if len(split_files) != 1:  # cannot happen with the allowed overrides; guards future changes
        raise RuntimeError(f"compare used more than one split: {sorted(split_files)}")
    best_index, chosen_by = _choose(rows, config.train.monitor)
    if best_index is not None:
        rows[best_index].chosen = True
    first = next(iter(prepared.values()))
    info = {
        "name": base,
        "dataset": config.data.path,
        "classes": first.classes,
        "split_file": next(iter(split_files)),
        "split_sizes": first.split.sizes(),
        "chosen": None if best_index is None else rows[best_index].label,
        "chosen_by": chosen_by,
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    write_outputs(compare_dir, rows, info)
    print_table(rows, chosen_by)
    return CompareResult(compare_dir, rows, runs, best_index, chosen_by)


# ------------------------------------------------------------------ outputs


def _fmt(key: str, value: Any) -> str:
    if key == "accuracy_interval" and value is not None:
        return f"{value[0]:.3f}-{value[1]:.3f}"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if key == "parameters":
        return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value:,}"
    if key == "train_minutes":
        return f"{value:.2f}"
    if key == "images_per_second":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _label(row: CompareRow) -> str:
    return (row.label + (f" ({row.epochs} ep)" if row.epochs else "") + (" *" if row.chosen else "")
            + (" !" if row.one_class else ""))


def markdown_table(rows: list[CompareRow]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" if key == "label" else "---:" for key, _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        values = [_label(row) if key == "label" else _fmt(key, getattr(row, key)) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def _footnotes(info: dict[str, Any], rows: Sequence[CompareRow] = ()) -> list[str]:
    why = info["chosen_by"]
    choice = f"* = chosen by {why}." if info["chosen"] is not None else f"{why[:1].upper()}{why[1:]}."
    return [
        f"Data: {info['dataset']}; classes {info['classes']}; one split for every row: {info['split_file']} "
        f"{info['split_sizes']}.",
        "Scores on the test split (the validation split where there is none); macro = unweighted mean over classes; "
        "ROC-AUC = mean one-vs-rest AUC.",
        f"accuracy 95% CI: Wilson interval over the {_scored(rows)} images scored; rows whose intervals overlap "
        "are not told apart by this test set.",
        "train min: CNN = its epochs; classical = feature extraction of the training images + fitting. "
        "inference img/s: CNN = forward pass on batches of 32 decoded images; classical = features + "
        "pipeline from decoded images (decoding excluded for both). Parameters: n/a for classical models.",
        f"{choice} (N ep) = epochs trained.",
    ] + [f"! {collapsed_note(row.label, row.one_class)} (its ROC-AUC rests on differences too small to matter)."
         for row in rows if row.one_class]


def _scored(rows: Sequence[CompareRow]) -> str:
    counts = sorted({row.n for row in rows if row.n})
    return " / ".join(str(n) for n in counts) or "n/a"


def comparison_figure(rows: list[CompareRow], path: Path, title: str = "") -> Path:
    """Dot plot of the six scores per model, and training minutes as bars (log scale)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from leukoscope.evaluation.figures import as_text

    scores = (("accuracy", "accuracy", "o"), ("precision", "precision", "s"), ("recall", "recall", "^"),
              ("specificity", "specificity", "v"), ("f1", "F1", "D"), ("roc_auc", "ROC-AUC", "*"))
    height = max(3.0, 0.45 * len(rows) + 1.6)
    figure = Figure(figsize=(12, height), layout="constrained")
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]}, sharey=True)
    positions = list(range(len(rows)))[::-1]
    for offset, (key, name, marker) in enumerate(scores):
        values = [getattr(row, key) for row in rows]
        shown = [(y + (offset - 2.5) * 0.06, v) for y, v in zip(positions, values) if v is not None]
        if shown:
            left.scatter([v for _, v in shown], [y for y, _ in shown], marker=marker, s=36, label=name, alpha=0.85)
    # accuracy's 95% interval as a bar through its dot: on a small test set the rows' dots overlap by chance
    spans = [(y - 2.5 * 0.06, row.accuracy_interval) for y, row in zip(positions, rows) if row.accuracy_interval]
    for y, (low, high) in spans:
        left.plot([low, high], [y, y], color="tab:blue", linewidth=1.2, alpha=0.6)
    lowest = min([getattr(r, k) for r in rows for k, _, _ in scores if getattr(r, k) is not None]
                 + [low for _, (low, _) in spans] + [1.0])
    left.set_xlim(max(0.0, math.floor(lowest * 10) / 10 - 0.05), 1.01)
    left.set_yticks(positions, [as_text(_label(row)) for row in rows])
    left.set_xlabel("score (test split, macro averages; line: accuracy's 95% interval)")
    left.grid(axis="x", alpha=0.3)
    figure.legend(*left.get_legend_handles_labels(), loc="outside upper left", ncols=6, fontsize=8)
    minutes = [row.train_minutes or 0.0 for row in rows]
    colours = ["tab:orange" if row.kind == "classic" else "tab:blue" for row in rows]
    right.barh(positions, [max(m, 1e-3) for m in minutes], color=colours)
    positive = [m for m in minutes if m > 0]
    if positive and max(positive) / min(positive) > 20:  # seconds next to hours: a log axis
        right.set_xscale("log")
        right.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        right.xaxis.set_minor_formatter(NullFormatter())
        right.set_xlabel("training minutes (log scale)")
    else:
        right.set_xlim(0, max(positive or [1.0]) * 1.35)
        right.set_xlabel("training minutes")
    right.set_title("orange = classical, blue = CNN; label = inference img/s", fontsize=8)
    for y, row, m in zip(positions, rows, minutes):
        if row.images_per_second:
            right.annotate(f" {row.images_per_second:.0f} img/s", (max(m, 1e-3), y), va="center", fontsize=8)
    right.grid(axis="x", alpha=0.3)
    if title:
        figure.suptitle(title, x=0.99, ha="right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _html_page(rows: list[CompareRow], info: dict[str, Any], figure: Path, compare_dir: Path) -> str:
    from leukoscope.labels import DISCLAIMER

    image = base64.b64encode(figure.read_bytes()).decode("ascii")
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in COLUMNS) + "<th>report</th>"
    body = []
    for row in rows:
        cells = [html.escape(_label(row)) if key == "label" else _fmt(key, getattr(row, key)) for key, _ in COLUMNS]
        report = Path(row.run_dir) / "report.html"
        try:
            link = report.resolve().relative_to(compare_dir.resolve()).as_posix()
        except ValueError:
            link = report.resolve().as_uri()
        style = ' style="font-weight:bold"' if row.chosen else ""
        body.append(f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in cells)
                    + f'<td><a href="{html.escape(link)}">report</a></td></tr>')
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in _footnotes(info, rows))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leukoscope comparison: {html.escape(info['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.warn{{background:#fff3cd;padding:8px;border:1px solid #e0c36a}}</style>
</head><body>
<h1>Model comparison: {html.escape(info['name'])}</h1>
<p class="warn">{html.escape(DISCLAIMER)}</p>
<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
<ul>{notes}</ul>
<img alt="comparison figure" style="max-width:100%" src="data:image/png;base64,{image}">
</body></html>
"""


def write_outputs(compare_dir: Path, rows: list[CompareRow], info: dict[str, Any]) -> dict[str, Path]:
    """compare.csv / .json / .md / .png / .html in ``compare_dir``."""
    from leukoscope.evaluation import to_jsonable

    paths = {name: compare_dir / f"compare.{name}" for name in ("csv", "json", "md", "png", "html")}
    records = [asdict(row) for row in rows]
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    paths["json"].write_text(json.dumps(to_jsonable({**info, "rows": records}), indent=2, allow_nan=False))
    text = [f"# Model comparison: {info['name']}", "", markdown_table(rows), ""]
    text += [f"- {note}" for note in _footnotes(info, rows)]
    paths["md"].write_text("\n".join(text) + "\n")
    comparison_figure(rows, paths["png"], title=f"{info['name']}: {len(info['classes'])} classes")
    paths["html"].write_text(_html_page(rows, info, paths["png"], compare_dir), encoding="utf-8")
    return paths


#: Short headers for the terminal, where the table must fit 80 columns.
_SHORT = {"precision": "prec", "recall": "rec", "specificity": "spec", "f1": "F1", "roc_auc": "AUC",
          "accuracy": "acc", "train_minutes": "train min", "images_per_second": "img/s", "parameters": "params"}


def print_table(rows: list[CompareRow], chosen_by: str) -> None:
    chosen = any(row.chosen for row in rows)
    table = Table(title=f"comparison ({f'* chosen by {chosen_by}' if chosen else 'no row chosen'}; macro averages)")
    # the accuracy's interval stays in compare.md / .csv / .html: in an 80-column terminal it folded every cell
    shown = [(key, title) for key, title in COLUMNS if key != "accuracy_interval"]
    for key, title in shown:
        # fold, never cut with "...": a narrow terminal wraps a cell instead of hiding digits
        table.add_column(_SHORT.get(key, title), justify="left" if key == "label" else "right", overflow="fold")
    for row in rows:
        table.add_row(*[_label(row) if key == "label" else _fmt(key, getattr(row, key)) for key, _ in shown])
    console.print(table)
    console.print(f"accuracy's 95% interval over the {_scored(rows)} images scored: "
                  + ", ".join(f"{escape(row.label)} {_fmt('accuracy_interval', row.accuracy_interval)}"
                              for row in rows),
                  soft_wrap=True)
    if not chosen:
        console.print(f"[yellow]note:[/yellow] {escape(chosen_by)}", soft_wrap=True)
    for row in rows:
        if row.one_class:
            console.print(f"[yellow]![/yellow] {escape(collapsed_note(row.label, row.one_class))}", soft_wrap=True)
