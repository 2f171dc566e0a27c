"""Classification metrics as one JSON-ready dict.

Screening needs more than accuracy: sensitivity (recall) says how many blasts
are caught, specificity how many normal cells are left alone, and the confusion
matrix which cell types are mistaken for which. Everything returned is plain
Python (int/float/None/list/dict), so it goes straight into ``metrics.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score

from leukoscope.evaluation.calibration import check_labels, check_probs, expected_calibration_error

#: Number of off-diagonal confusion cells listed in ``top_confusions``.
TOP_CONFUSIONS = 10

_AVERAGED = ("precision", "recall", "specificity", "f1")
_PER_CLASS_KEYS = ("precision", "recall", "specificity", "f1", "support", "roc_auc", "average_precision")

#: How ``macro`` and ``weighted`` treat the undefined values, written into ``metrics.json`` beside them.
AVERAGE_CONVENTION = (
    "macro: unweighted mean over the classes present in the data (absent_classes left out); weighted: weighted by "
    "support. The precision of a present class never predicted (never_predicted_classes) is undefined (null per "
    "class) and counts as 0 in both averages. Images called an absent class (called_absent) are wrong calls that "
    "neither average sees: accuracy counts them."
)


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


def _class_scores(cm: np.ndarray, k: int) -> dict[str, Any]:
    """Precision, recall, F1 and support of class ``k`` from the confusion matrix; ``None`` where undefined.

    F1 is ``2 TP / (2 TP + FP + FN)``: 0 for a present class never predicted (every one of its images was
    missed, a real 0), ``None`` for an absent class, whose recall half does not exist.
    """
    tp, called, support = int(cm[k, k]), int(cm[:, k].sum()), int(cm[k, :].sum())
    return {
        "precision": tp / called if called else None,
        "recall": tp / support if support else None,
        "f1": 2 * tp / (called + support) if support else None,
        "support": support,
    }


def average_precision_per_class(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """One-vs-rest average precision per class (the AP pr.png draws); ``None`` where ``y_true`` lacks
    positives or negatives, as for ROC-AUC."""
    out: list[float | None] = []
    for k in range(probs.shape[1]):
        positive = y_true == k
        if positive.all() or not positive.any():
            out.append(None)
        else:
            out.append(float(average_precision_score(positive, probs[:, k])))
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


def called_absent_note(metrics: dict) -> str | None:
    """What ``called_absent`` means for the averages, said where the scores are shown (console, report); None
    when no image was called an absent class."""
    called = metrics.get("called_absent") or {}
    total, n = sum(called.values()), metrics.get("n") or 0
    if not total or not n:
        return None
    named = ", ".join(f"{name} {count}" for name, count in called.items())
    return (f"{total} of {n} images ({100 * total / n:.0f}%) were called a class with no images in this set "
            f"({named}): wrong calls every one, which the macro and weighted precision, recall and F1 leave out "
            f"(they average the classes present); accuracy counts them.")


def only_class_called(metrics: dict[str, Any]) -> str | None:
    """The class a run's scored images were all called, from its confusion matrix (rows: true, columns:
    predicted); None when it called two or more, when the images are of one class (or it records none). Such a
    model has collapsed: its scores say nothing of the images, whatever its ROC-AUC (which then rests on
    differences too small to matter)."""
    matrix, classes = metrics.get("confusion_matrix"), metrics.get("classes")
    if not matrix or not classes or len(classes) < 2:
        return None
    # images of one class called that class is a right answer, not a collapse (a blast-only folder scored 1.0)
    if sum(1 for row in matrix if sum(row) > 0) < 2:
        return None
    called = [name for j, name in enumerate(classes) if sum(row[j] for row in matrix) > 0]
    return called[0] if len(called) == 1 else None


def collapsed_note(who: str, one_class: str) -> str:
    """The words train, search and compare use for a model that called every scored image ``one_class``."""
    return f"{who} called every scored image {one_class}: a collapsed model, whose scores say nothing of the images"


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the classes present in ``y_true``, as :func:`classification_metrics`' macro leaves absent
    classes out (sklearn's default also averages classes only predicted, each at 0: a model's epochs were then
    chosen on another macro than the one its report gives)."""
    y_true = np.asarray(y_true)
    return float(f1_score(y_true, np.asarray(y_pred), labels=np.unique(y_true), average="macro", zero_division=0))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class / macro / weighted scores, confusion matrix, ROC-AUC and ECE.

    ``y_true`` holds class indices into ``classes``; ``probs`` has one column per
    class (rows sum to 1); the prediction is the arg-max. An undefined per-class
    value is ``None`` (``null`` in metrics.json), never 0: the precision of a
    class never predicted (listed under ``never_predicted_classes``), the
    recall, F1 and ROC-AUC of a class absent from ``y_true`` (a recall of 0
    would read "missed every one"). Absent classes keep their rows/columns, are
    listed under ``absent_classes`` and are left out of the macro averages.
    ``average_convention`` states how the averages treat a never-predicted
    class's precision: as 0, sklearn's ``zero_division=0``.
    ``roc_auc_macro_ovr`` is the mean of the defined per-class one-vs-rest
    AUCs, ``None`` if there are none; ``average_precision`` per class is the
    one-vs-rest AP that pr.png draws, ``average_precision_macro`` their mean (as for the AUC).
    """
    y, p = _check_inputs(y_true, probs, classes)
    n_classes = len(classes)
    pred = p.argmax(axis=1)
    labels = list(range(n_classes))

    cm = confusion_matrix(y, pred, labels=labels)
    support = cm.sum(axis=1)
    specificity = specificity_per_class(cm)
    auc = roc_auc_per_class(y, p)
    ap = average_precision_per_class(y, p)
    per_class: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(classes):
        scores = {**_class_scores(cm, k), "specificity": specificity[k], "roc_auc": auc[k], "average_precision": ap[k]}
        per_class[name] = {key: scores[key] for key in _PER_CLASS_KEYS}  # metrics.json's order, as before
    never_predicted = [c for k, c in enumerate(classes) if support[k] > 0 and cm[:, k].sum() == 0]
    # Images called a class with none in the set: wrong every one, yet out of both averages (the class is absent;
    # weighted, its support is 0), so a model sending most images there showed a macro precision far above its
    # accuracy (0.70 beside 0.18). Counted here, said beside the averages.
    called_absent = {c: int(cm[:, k].sum()) for k, c in enumerate(classes) if support[k] == 0 and cm[:, k].sum() > 0}

    # The averages keep sklearn's zero_division=0 for a present class never predicted: averaging over the defined
    # precisions only would let a model that never calls a class score better for it (a collapsed model calling
    # one class would get that class's precision as its macro). Absent classes stay out (their recall is not 0,
    # it does not exist). AVERAGE_CONVENTION says so in metrics.json, and the report under its table.
    def averaged(metric: str, weights: np.ndarray) -> float | None:
        values = [per_class[c][metric] for c in classes]
        if metric == "precision":
            values = [0.0 if v is None and c in never_predicted else v for v, c in zip(values, classes)]
        return _mean(values, weights)

    present = (support > 0).astype(np.float64)
    macro = {m: averaged(m, present) for m in _AVERAGED}
    weighted = {m: averaged(m, support.astype(np.float64)) for m in _AVERAGED}

    return {
        "n": int(y.size),
        "classes": list(classes),
        "absent_classes": [c for c, s in zip(classes, support) if s == 0],
        "never_predicted_classes": never_predicted,
        "called_absent": called_absent,
        "accuracy": float(np.mean(pred == y)),
        "per_class": per_class,
        "macro": macro,
        "weighted": weighted,
        "average_convention": AVERAGE_CONVENTION,
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": normalize_rows(cm).tolist(),
        "roc_auc_macro_ovr": _mean(auc, np.ones(n_classes)),
        "average_precision_macro": _mean(ap, np.ones(n_classes)),
        "ece": expected_calibration_error(p, y),
        "top_confusions": top_confusions(cm, list(classes)),
    }
