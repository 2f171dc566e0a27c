"""Self-contained HTML evaluation report.

One file that can be mailed, archived with a run or opened offline in a lab
without internet: CSS is inline, figures are embedded as base64 data URIs and
nothing is fetched from elsewhere. Every value goes through Jinja2 autoescaping,
because class names, notes and config values come from user folders and files.
"""

from __future__ import annotations

import base64
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2

import leukoscope
from leukoscope.evaluation.metrics import called_absent_note
from leukoscope.labels import DISCLAIMER

#: Captions for the figures :func:`leukoscope.evaluation.evaluate_logits` writes.
FIGURE_CAPTIONS: dict[str, tuple[str, str]] = {
    "confusion_matrix": ("Confusion matrix", "Counts of true (rows) against predicted (columns) classes."),
    "confusion_matrix_normalized": (
        "Row-normalised confusion matrix",
        "Each row divided by its total: the diagonal is per-class recall (sensitivity).",
    ),
    "roc": (
        "ROC curves",
        "One-vs-rest receiver operating characteristic per class; the area under each curve (AUC) "
        "is the chance that a random cell of that class scores higher than a random other cell.",
    ),
    "pr": (
        "Precision-recall curves",
        "One-vs-rest precision against recall per class, with average precision (AP, per_class.average_precision "
        "in metrics.json); the dotted line in a class's colour is a random scorer's precision (its share of "
        "positives). More informative than ROC for rare classes.",
    ),
    "reliability": (
        "Reliability diagram",
        "Accuracy against confidence in equal-width bins; points below the diagonal mean the model "
        "is over-confident. ECE is the sample-weighted mean gap.",
    ),
    "training_curves": ("Training curves", "Loss and accuracy per epoch on the training and validation sets."),
}

_MIME_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
#: Metric keys shown in dedicated sections, hence left out of "Run details".
_STRUCTURED_KEYS = frozenset({
    "n", "classes", "absent_classes", "never_predicted_classes", "accuracy", "per_class", "macro", "weighted",
    "average_convention", "confusion_matrix", "confusion_matrix_normalized", "roc_auc_macro_ovr",
    "average_precision_macro", "ece", "top_confusions", "calibration", "figures", "called_absent",
    "one_class_called",  # a note at the top says it
})


# --------------------------------------------------------------------------- formatting
def format_value(value: Any, digits: int = 3) -> str:
    """Numbers to fixed decimals; None/NaN to 'n/a' (an undefined metric is not 0)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _get(mapping: dict | None, *keys: str) -> Any:
    """Nested lookup that returns None instead of raising on a missing level."""
    current: Any = mapping
    for key in keys:
        if not isinstance(current, dict) or key not in current:
            return None
        current = current[key]
    return current


# --------------------------------------------------------------------------- view model
def _headline(metrics: dict) -> list[dict[str, str]]:
    images = f"{metrics['n']} images" if "n" in metrics else ""
    if (_get(metrics, "init_training_overlap", "parts") or {}).get(metrics.get("evaluated_on")):
        images += ", some learned by the model it started from (see the warning above)"  # a fine-tuned run's
    cards = [
        ("Accuracy", metrics.get("accuracy"), images),
        ("Macro F1", _get(metrics, "macro", "f1"), "unweighted mean over classes"),
        ("Weighted F1", _get(metrics, "weighted", "f1"), "weighted by class support"),
        ("ROC-AUC", metrics.get("roc_auc_macro_ovr"), "macro one-vs-rest"),
    ]
    calibration = metrics.get("calibration")
    if isinstance(calibration, dict):
        cards.append(("ECE before", calibration.get("ece_before"), "expected calibration error"))
        temperature = format_value(calibration.get("temperature"), 2)
        cards.append(("ECE after", calibration.get("ece_after"), f"temperature T = {temperature}"))
    elif "ece" in metrics:
        cards.append(("ECE", metrics.get("ece"), "expected calibration error"))
    return [{"label": label, "value": format_value(value), "hint": hint} for label, value, hint in cards]


def _class_cell(stats: dict, key: str, predicted: int | None = None) -> str:
    # metrics.json writes undefined values as null (n/a here); one written before that kept sklearn's
    # zero_division=0, whose 0.000 would read "missed every one" (recall of a class with no images) or
    # "every call of it was wrong" (precision of a class never predicted): n/a for those too.
    if key in ("recall", "f1") and stats.get("support") == 0:
        return "n/a"
    if key == "precision" and predicted == 0:
        return "n/a"
    return format_value(stats.get(key))


def _predicted_counts(metrics: dict) -> list[int | None]:
    """How often each class was predicted (the confusion matrix's column sums), None where unknown."""
    per_class = metrics.get("per_class") or {}
    matrix = metrics.get("confusion_matrix")
    try:
        if len(matrix) != len(per_class) or any(len(row) != len(per_class) for row in matrix):
            return [None] * len(per_class)
        return [int(sum(row[j] for row in matrix)) for j in range(len(per_class))]
    except (TypeError, ValueError):  # no matrix recorded
        return [None] * len(per_class)


def _per_class_rows(metrics: dict) -> tuple[list[dict], list[dict]]:
    per_class = metrics.get("per_class") or {}
    order = ("precision", "recall", "specificity", "f1", "support", "roc_auc", "average_precision")
    rows = [{"name": name, "cells": [_class_cell(stats, key, predicted) for key in order]}
            for (name, stats), predicted in zip(per_class.items(), _predicted_counts(metrics))]
    support = str(sum(stats.get("support", 0) for stats in per_class.values()))
    averages = []
    macro_ranking = [format_value(metrics.get(k)) if k in metrics else "" for k in ("roc_auc_macro_ovr",
                                                                                      "average_precision_macro")]
    for label, key, ranking in (("macro average", "macro", macro_ranking),
                                ("weighted average", "weighted", ["", ""])):  # no weighted AUC / AP is computed
        if isinstance(metrics.get(key), dict):
            cells = [format_value(metrics[key].get(k)) for k in order[:4]]
            averages.append({"name": label, "cells": [*cells, support, *ranking]})
    return rows, averages


def _never_predicted(metrics: dict) -> list[str]:
    """Present classes never predicted: their n/a precision counts as 0 in the averages (``average_convention``)."""
    if "never_predicted_classes" in metrics:
        return list(metrics["never_predicted_classes"])
    per_class = metrics.get("per_class") or {}  # a metrics.json written before the key existed
    return [name for (name, stats), predicted in zip(per_class.items(), _predicted_counts(metrics))
            if predicted == 0 and stats.get("support")]


def _confusion_view(metrics: dict) -> dict | None:
    matrix = metrics.get("confusion_matrix")
    classes = metrics.get("classes") or list((metrics.get("per_class") or {}).keys())
    if not matrix or len(classes) != len(matrix):
        return None
    rows = []
    for i, (name, counts) in enumerate(zip(classes, matrix)):
        total = sum(counts)
        cells = []
        for j, count in enumerate(counts):
            share = count / total if total else 0.0
            cells.append({
                "count": count,
                "diagonal": i == j,
                "alpha": round(0.85 * share, 3),  # cap so the darkest cell still shows its number
                "title": f"{share:.1%} of true {name} predicted as {classes[j]}",
            })
        rows.append({"name": name, "cells": cells, "total": total})
    return {"classes": classes, "rows": rows}


def _detail_value(value: Any) -> str:
    """A Run-details number as a reader takes it in: 11,181,129 parameters, 301.0 images per second."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return format_value(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if not math.isfinite(value):
        return format_value(value)
    return f"{value:,.1f}" if abs(value) >= 100 else format_value(value)


def _split_sizes(metrics: dict) -> str | None:
    """"train 288, val 36, test 36 (ratios 0.8 / 0.1 / 0.1)" from ``split_sizes`` and ``split_info.ratios``."""
    sizes = metrics.get("split_sizes")
    if not isinstance(sizes, dict) or not sizes:
        return None
    text = ", ".join(f"{name} {_detail_value(size)}" for name, size in sizes.items())
    ratios = _get(metrics, "split_info", "ratios")
    if isinstance(ratios, list) and ratios and all(isinstance(r, (int, float)) for r in ratios):
        text += f" (ratios {' / '.join(f'{r:g}' for r in ratios)})"
    return text


def _details(metrics: dict) -> list[tuple[str, str]]:
    """Scalar extras (epoch, timing, split name...) that have no dedicated section, and the split's sizes."""
    rows = [
        (key, _detail_value(value))
        for key, value in metrics.items()
        if key not in _STRUCTURED_KEYS and (value is None or isinstance(value, (str, int, float, bool)))
    ]
    sizes = _split_sizes(metrics)  # a dict, so it was left out with the other structured values
    return rows + [("split_sizes", sizes)] if sizes else rows


def embed_figure(name: str, path: Path) -> dict[str, str]:
    path = Path(path)
    mime = _MIME_TYPES.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"figure {name!r}: unsupported file type {path.suffix!r} (use PNG, JPEG or SVG)")
    if not path.is_file():
        raise FileNotFoundError(f"figure {name!r}: {path} does not exist")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    title, caption = FIGURE_CAPTIONS.get(name, (name.replace("_", " ").capitalize(), ""))
    return {"title": title, "caption": caption, "data_uri": f"data:{mime};base64,{data}"}


def render_template(name: str, context: dict[str, Any]) -> str:
    """Render one of the package's report templates (``leukoscope/templates``)."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("leukoscope", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    return environment.get_template(name).render(context)


# --------------------------------------------------------------------------- public API
def render_html_report(
    *,
    title: str,
    sections: list[tuple[str, str]] | None = None,
    metrics: dict | None = None,
    figures: dict[str, Path] | None = None,
    config: dict | None = None,
    notes: list[str] | None = None,
) -> str:
    """The report as an HTML string; see :func:`write_html_report`."""
    metrics = metrics or {}
    per_class, averages = _per_class_rows(metrics)
    context = {
        "title": title,
        "version": leukoscope.__version__,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "disclaimer": DISCLAIMER,
        "n": metrics.get("n"),
        "notes": list(notes or []) + [note for note in [called_absent_note(metrics)] if note],
        "headline": _headline(metrics) if metrics else [],
        "sections": list(sections or []),
        "per_class": per_class,
        "averages": averages,
        "absent_classes": metrics.get("absent_classes") or [],
        "never_predicted": _never_predicted(metrics),
        "confusion": _confusion_view(metrics),
        "top_confusions": [{**item, "rate": format_value(item.get("rate"))} for item in metrics.get("top_confusions") or []],
        "details": _details(metrics),
        "figures": [embed_figure(name, path) for name, path in (figures or {}).items()],
        "config_json": json.dumps(config, indent=2, default=str, ensure_ascii=False) if config else "",
    }
    return render_template("report.html", context)


def write_html_report(
    path: Path,
    *,
    title: str,
    sections: list[tuple[str, str]] | None = None,
    metrics: dict | None = None,
    figures: dict[str, Path] | None = None,
    config: dict | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write one self-contained HTML report to ``path`` and return it.

    ``metrics`` is a :func:`~leukoscope.evaluation.classification_metrics` dict,
    optionally with ``calibration`` and scalar extras (shown under "Run
    details"); ``figures`` maps a name (captioned from :data:`FIGURE_CAPTIONS`
    when known) to an image file that is embedded; ``sections`` are extra
    (heading, plain text) blocks; ``notes`` are warnings shown near the top.
    """
    html = render_html_report(
        title=title, sections=sections, metrics=metrics, figures=figures, config=config, notes=notes
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
