"""One call from logits to ``metrics.json``, figures and ``report.html``.

The trainer and ``leukoscope evaluate`` both go through :func:`evaluate_logits`,
so a number in the CLI output, in ``metrics.json`` and in the report always
comes from the same computation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from leukoscope.evaluation.calibration import (
    TEMPERATURE_BOUNDS,
    check_labels,
    check_logits,
    expected_calibration_error,
    negative_log_likelihood,
    softmax,
    temperature_fit,
)
from leukoscope.evaluation.figures import (
    confusion_matrix_figure,
    pr_figure,
    reliability_figure,
    roc_figure,
    training_curves_figure,
)
from leukoscope.evaluation.metrics import classification_metrics, collapsed_note, only_class_called
from leukoscope.evaluation.report import write_html_report

#: Below this many validation images the fitted temperature is flagged as noisy.
MIN_CALIBRATION_SAMPLES = 50


def to_jsonable(value: Any) -> Any:
    """Recursively turn numpy scalars/arrays, paths and tuples into plain JSON types.

    Non-finite floats become None so ``metrics.json`` stays strict JSON.
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)  # enums, datetimes, ...: readable beats crashing at the end of a run


def _calibrate(
    logits: np.ndarray, y_true: np.ndarray, val_logits: np.ndarray, val_true: np.ndarray
) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """Fit T on validation logits; report test ECE/NLL before and after. Returns (info, test probs after, notes)."""
    val_z = check_logits(val_logits)
    if val_z.shape[1] != logits.shape[1]:
        raise ValueError(f"val_logits have {val_z.shape[1]} classes, test logits {logits.shape[1]}")
    val_y = check_labels(val_true, val_z.shape[1], val_z.shape[0])
    fit = temperature_fit(val_z, val_y)
    temperature = fit.temperature
    probs_after = softmax(logits, temperature)
    info = {
        "temperature": temperature,
        "ece_before": expected_calibration_error(softmax(logits), y_true),
        "ece_after": expected_calibration_error(probs_after, y_true),
        "nll_before": negative_log_likelihood(logits, y_true),
        "nll_after": negative_log_likelihood(logits, y_true, temperature),
        "n_val": int(val_y.size),
    }
    notes = []
    if val_y.size < MIN_CALIBRATION_SAMPLES:
        notes.append(f"The temperature was fitted on only {val_y.size} validation images; "
                     "treat it as a rough estimate.")
    if fit.at_bound:  # a report note, not a warning: expected on small runs
        notes.append(f"The temperature fit reached its search limit {TEMPERATURE_BOUNDS}, so the temperature "
                     "was kept at 1.0: the validation set is probably too small or perfectly separated.")
    return info, probs_after, notes


def _subset_name(extra: dict | None) -> str | None:
    """What the figures were computed on, for their titles: the run's split, or the data file evaluated."""
    extra = extra or {}
    if extra.get("evaluated_on"):
        return str(extra["evaluated_on"])
    return Path(str(extra["data"])).name if extra.get("data") else None


def _write_figures(
    figures_dir: Path,
    y_true: np.ndarray,
    probs: np.ndarray,
    probs_after: np.ndarray | None,
    metrics: dict,
    classes: list[str],
    history: list[dict] | None,
    best_epoch: int | None = None,
    monitor: str | None = None,
    temperature: float | None = None,
    applied_temperature: float | None = None,
    subset: str | None = None,
) -> dict[str, Path]:
    cm = np.asarray(metrics["confusion_matrix"])
    served = probs if probs_after is None else probs_after  # what the bundle gives, as the metrics are
    paths = {
        "confusion_matrix": confusion_matrix_figure(cm, classes, figures_dir / "confusion_matrix.png", subset=subset),
        "confusion_matrix_normalized": confusion_matrix_figure(
            cm, classes, figures_dir / "confusion_matrix_normalized.png", normalize=True, subset=subset
        ),
        "roc": roc_figure(y_true, served, classes, figures_dir / "roc.png", subset=subset),
        "pr": pr_figure(y_true, served, classes, figures_dir / "pr.png", subset=subset),
        "reliability": reliability_figure(y_true, probs, probs_after, figures_dir / "reliability.png",
                                          temperature=temperature, applied_temperature=applied_temperature,
                                          subset=subset),
    }
    if history:
        paths["training_curves"] = training_curves_figure(history, figures_dir / "training_curves.png",
                                                          best_epoch=best_epoch, monitor=monitor)
    return paths


def evaluate_logits(
    y_true: np.ndarray,
    logits: np.ndarray,
    classes: list[str],
    out_dir: Path,
    *,
    val_logits: np.ndarray | None = None,
    val_true: np.ndarray | None = None,
    history: list[dict] | None = None,
    config: dict | None = None,
    title: str = "leukoscope evaluation",
    notes: list[str] | None = None,
    extra: dict | None = None,
    applied_temperature: float | None = None,
) -> dict:
    """Evaluate test logits and write ``figures/``, ``metrics.json`` and ``report.html`` under ``out_dir``.

    Metrics are computed on ``softmax(logits)``; with ``val_logits``/``val_true`` a temperature is
    fitted on validation data first and they are computed on the probabilities it gives, which are those
    the bundle serves and `leukoscope evaluate` scores (a temperature changes no predicted class, but it
    does change per-class rankings, hence ROC-AUC: a run reported 0.506 where `evaluate` of its bundle found
    0.725 on the same test images). ``calibration = {"temperature", "ece_before", "ece_after", "nll_before",
    "nll_after", "n_val"}`` reports the temperature's effect on the test set. ``extra`` keys are
    merged into the result (they may not shadow a computed key); ``extra["evaluated_on"]`` (the split) or
    ``extra["data"]`` names the images on the figures. ``applied_temperature`` is the temperature ``logits``
    were already divided by (a bundle's, as `leukoscope evaluate` scores them), named on the reliability
    diagram. Returns the
    metrics dict as written to ``metrics.json``, with ``figures`` mapping each
    figure name to its path relative to ``out_dir``.
    """
    z = check_logits(logits)
    y = check_labels(y_true, z.shape[1], z.shape[0])
    if (val_logits is None) != (val_true is None):
        raise ValueError("pass both val_logits and val_true, or neither")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    clashes = sorted(set(extra or {}) & {"calibration", "figures"})
    if clashes:  # checked before the slow part so a caller bug fails fast
        raise ValueError(f"extra keys would overwrite computed metrics: {clashes}")
    report_notes = list(notes or [])
    probs = softmax(z)
    probs_after = calibration = None
    if val_logits is not None and val_true is not None:
        calibration, probs_after, calibration_notes = _calibrate(z, y, val_logits, val_true)
        report_notes.extend(calibration_notes)
    metrics: dict[str, Any] = classification_metrics(y, probs if probs_after is None else probs_after, list(classes))
    clashes = sorted(set(extra or {}) & set(metrics))
    if clashes:
        raise ValueError(f"extra keys would overwrite computed metrics: {clashes}")
    if calibration is not None:
        metrics["calibration"] = calibration
    # a collapsed model's headline numbers read like a model's: said first, above them (null when it is not)
    metrics["one_class_called"] = only_class_called(metrics)
    if metrics["one_class_called"] is not None:
        report_notes.insert(0, f"{collapsed_note('The model', metrics['one_class_called'])} (its ROC-AUC rests on "
                               f"differences too small to matter).")
    if metrics["absent_classes"]:
        report_notes.append("Classes with no images in the evaluated set (no recall, F1 or ROC-AUC for them): "
                            + ", ".join(metrics["absent_classes"]))

    monitor = ((config or {}).get("train") or {}).get("monitor") if isinstance(config, dict) else None
    figure_paths = _write_figures(out_dir / "figures", y, probs, probs_after, metrics, list(classes), history,
                                  (extra or {}).get("best_epoch"), monitor,
                                  temperature=(calibration or {}).get("temperature"),
                                  applied_temperature=applied_temperature, subset=_subset_name(extra))
    metrics["figures"] = {name: path.relative_to(out_dir).as_posix() for name, path in figure_paths.items()}

    metrics = to_jsonable({**metrics, **(extra or {})})

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False), encoding="utf-8")
    write_html_report(
        out_dir / "report.html",
        title=title,
        metrics=metrics,
        figures=figure_paths,
        config=to_jsonable(config) if config is not None else None,
        notes=report_notes,
    )
    return metrics


#: The metrics a bundle keeps in its ``bundle.json`` (the full set stays in metrics.json).
HEADLINE_KEYS = ("n", "accuracy", "roc_auc_macro_ovr", "ece", "evaluated_on", "train_minutes", "parameters",
                 "images_per_second", "best_epoch")


def headline_metrics(metrics: dict) -> dict:
    """The few numbers of ``metrics`` a bundle records about itself. Its ``ece`` is that of the probabilities
    the bundle gives (after its fitted temperature) where one was fitted; ``metrics.json`` keeps both."""
    out = {k: metrics[k] for k in HEADLINE_KEYS if k in metrics}
    calibration = metrics.get("calibration") or {}
    if calibration.get("ece_after") is not None:  # the bundle serves the calibrated probabilities
        out["ece"] = calibration["ece_after"]
    if "macro" in metrics:
        out["macro_f1"] = metrics["macro"]["f1"]
    if "weighted" in metrics:
        out["weighted_f1"] = metrics["weighted"]["f1"]
    return out
