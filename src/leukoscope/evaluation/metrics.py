"""Classification metrics as one JSON-ready dict.

Screening needs more than accuracy: sensitivity (recall) says how many blasts
are caught, specificity how many normal cells are left alone, and the confusion
matrix which cell types are mistaken for which. Everything returned is plain
Python (int/float/None/list/dict), so it goes straight into ``metrics.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from leukoscope.evaluation.calibration import check_labels, check_probs, expected_calibration_error

#: Number of off-diagonal confusion cells listed in ``top_confusions``.
TOP_CONFUSIONS = 10

_AVERAGED = ("precision", "recall", "specificity", "f1")


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    p = check_probs(probs)
    if len(classes) != p.shape[1]:
        raise ValueError(f"{len(classes)} class names for {p.shape[1]} probability columns")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {classes}")
    y = check_labels(y_true, p.shape[1], p.shape[0])
    if y.size == 0:
        raise ValueError("cannot compute metrics on an empty set")
    return y, p


def specificity_per_class(cm: np.ndarray) -> list[float | None]:
    """``TN / (TN + FP)`` for each class of a confusion matrix (rows = true).

    ``None`` when the class has no negatives (every sample belongs to it).
    """
    cm = np.asarray(cm, dtype=np.int64)
    total = cm.sum()
    out: list[float | None] = []
    for k in range(cm.shape[0]):
        negatives = total - cm[k, :].sum()
        false_pos = cm[:, k].sum() - cm[k, k]
        out.append(float((negatives - false_pos) / negatives) if negatives > 0 else None)
    return out


def roc_auc_per_class(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """One-vs-rest ROC-AUC per class; ``None`` where ``y_true`` lacks positives or negatives."""
    out: list[float | None] = []
    for k in range(probs.shape[1]):
        positive = y_true == k
        if positive.all() or not positive.any():
            out.append(None)  # AUC needs both kinds of sample
        else:
            out.append(float(roc_auc_score(positive, probs[:, k])))
    return out


def _mean(values: list[float | None], weights: np.ndarray) -> float | None:
    """Weighted mean over the defined (non-None, positive-weight) values."""
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and w > 0]
    total = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / total) if total > 0 else None


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Row-normalise a confusion matrix; rows of absent classes stay 0."""
    cm = np.asarray(cm, dtype=np.float64)
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)


def top_confusions(cm: np.ndarray, classes: list[str], k: int = TOP_CONFUSIONS) -> list[dict[str, Any]]:
    """The ``k`` largest off-diagonal cells: which true class is most often called what.

    ``rate`` is the share of that true class sent to the wrong prediction.
    """
    cm = np.asarray(cm, dtype=np.int64)
    support = cm.sum(axis=1)
    cells = [
        (int(cm[i, j]), i, j)
        for i in range(cm.shape[0])
        for j in range(cm.shape[1])
        if i != j and cm[i, j] > 0
    ]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))  # largest first, then class order: deterministic
    return [
        {"true": classes[i], "predicted": classes[j], "count": n, "rate": n / int(support[i])}
        for n, i, j in cells[:k]
    ]


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the classes present in ``y_true``, as :func:`classification_metrics`' macro leaves absent
    classes out (sklearn's default also averages classes only predicted, each at 0: a model's epochs were then
    chosen on another macro than the one its report gives)."""
    y_true = np.asarray(y_true)
    return float(f1_score(y_true, np.asarray(y_pred), labels=np.unique(y_true), average="macro", zero_division=0))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class / macro / weighted scores, confusion matrix, ROC-AUC and ECE.

    ``y_true`` holds class indices into ``classes``; ``probs`` has one column per
    class (rows sum to 1); the prediction is the arg-max. Classes absent from
    ``y_true`` keep their rows/columns and per-class entries (their recall is 0
    by convention, their ROC-AUC ``None``) but are left out of the macro
    averages, which would otherwise be dragged down by an undefined recall;
    they are listed under ``absent_classes``. ``roc_auc_macro_ovr`` is the mean
    of the defined per-class one-vs-rest AUCs, ``None`` if there are none.
    """
    y, p = _check_inputs(y_true, probs, classes)
    n_classes = len(classes)
    pred = p.argmax(axis=1)
    labels = list(range(n_classes))

    cm = confusion_matrix(y, pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=0
    )
    specificity = specificity_per_class(cm)
    auc = roc_auc_per_class(y, p)

    per_class = {
        name: {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "specificity": specificity[k],
            "f1": float(f1[k]),
            "support": int(support[k]),
            "roc_auc": auc[k],
        }
        for k, name in enumerate(classes)
    }
    present = (support > 0).astype(np.float64)
    macro = {m: _mean([per_class[c][m] for c in classes], present) for m in _AVERAGED}
    weighted = {m: _mean([per_class[c][m] for c in classes], support.astype(np.float64)) for m in _AVERAGED}

    return {
        "n": int(y.size),
        "classes": list(classes),
        "absent_classes": [c for c, s in zip(classes, support) if s == 0],
        "accuracy": float(np.mean(pred == y)),
        "per_class": per_class,
        "macro": macro,
        "weighted": weighted,
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": normalize_rows(cm).tolist(),
        "roc_auc_macro_ovr": _mean(auc, np.ones(n_classes)),
        "ece": expected_calibration_error(p, y),
        "top_confusions": top_confusions(cm, list(classes)),
    }
