"""Evaluation of classifiers: metrics, calibration, figures and the HTML report.

:func:`evaluate_logits` is the single entry point used by training and by
``leukoscope evaluate``; the other functions are its building blocks.
"""

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
