"""Evaluation of classifiers: metrics, calibration, figures and the HTML report.

:func:`evaluate_logits` is the single entry point used by training and by
``leukoscope evaluate``; the other functions are its building blocks.

The names are imported on first use (PEP 562): the metrics and figures pull in
scikit-learn and matplotlib, seconds of start-up that a process which only
uses a model (``leukoscope analyze``: the OOD statistics live in this package)
never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leukoscope.evaluation.calibration import (
        TEMPERATURE_BOUNDS,
        ReliabilityBins,
        expected_calibration_error,
        fit_temperature,
        negative_log_likelihood,
        reliability_bins,
        softmax,
    )
    from leukoscope.evaluation.evaluate import evaluate_logits, headline_metrics, to_jsonable
    from leukoscope.evaluation.figures import (
        confusion_matrix_figure,
        pr_figure,
        reliability_figure,
        roc_figure,
        training_curves_figure,
    )
    from leukoscope.evaluation.metrics import (
        classification_metrics,
        normalize_rows,
        roc_auc_per_class,
        specificity_per_class,
        top_confusions,
    )
    from leukoscope.evaluation.report import DISCLAIMER, render_html_report, write_html_report

_MODULE_OF = {
    **dict.fromkeys(["TEMPERATURE_BOUNDS", "ReliabilityBins", "expected_calibration_error", "fit_temperature",
                     "negative_log_likelihood", "reliability_bins", "softmax"], "calibration"),
    **dict.fromkeys(["evaluate_logits", "headline_metrics", "to_jsonable"], "evaluate"),
    **dict.fromkeys(["confusion_matrix_figure", "pr_figure", "reliability_figure", "roc_figure",
                     "training_curves_figure"], "figures"),
    **dict.fromkeys(["classification_metrics", "normalize_rows", "roc_auc_per_class", "specificity_per_class",
                     "top_confusions"], "metrics"),
    **dict.fromkeys(["DISCLAIMER", "render_html_report", "write_html_report"], "report"),
}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


__all__ = [
    "DISCLAIMER",
    "TEMPERATURE_BOUNDS",
    "ReliabilityBins",
    "classification_metrics",
    "confusion_matrix_figure",
    "evaluate_logits",
    "expected_calibration_error",
    "fit_temperature",
    "headline_metrics",
    "negative_log_likelihood",
    "normalize_rows",
    "pr_figure",
    "reliability_bins",
    "reliability_figure",
    "softmax",
    "render_html_report",
    "roc_auc_per_class",
    "roc_figure",
    "specificity_per_class",
    "to_jsonable",
    "top_confusions",
    "training_curves_figure",
    "write_html_report",
]
