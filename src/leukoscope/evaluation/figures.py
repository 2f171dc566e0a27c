"""Evaluation figures written as PNG files.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas and
never touch ``pyplot``: no global backend switch, no open-figure registry to
leak (training loops call these every epoch) and safe from worker threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from leukoscope.evaluation.calibration import (
    check_labels,
    check_probs,
    expected_calibration_error,
    reliability_bins,
)
from leukoscope.evaluation.metrics import normalize_rows

DPI = 130
#: Colour-blind-safe qualitative palette (Okabe-Ito), cycled for many classes.
_PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
_LINESTYLES = ("-", "--", "-.", ":")


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # attach the non-interactive canvas explicitly
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    fig.clear()  # drop artists now rather than at garbage collection
    return path


def as_text(name: str) -> str:
    """A class or file name as matplotlib should draw it: literally (a ``$`` pair would start mathtext,
    and an unbalanced one makes ``savefig`` raise)."""
    return str(name).replace("$", r"\$")


def line_style(k: int) -> dict:
    """Colour + line style for series ``k``; the style changes once colours wrap."""
    return {"color": _PALETTE[k % len(_PALETTE)], "linestyle": _LINESTYLES[(k // len(_PALETTE)) % len(_LINESTYLES)]}


def _check_curve_inputs(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    p = check_probs(probs)
    if len(classes) != p.shape[1]:
        raise ValueError(f"{len(classes)} class names for {p.shape[1]} probability columns")
    return check_labels(y_true, p.shape[1], p.shape[0]), p


def _curve_classes(y: np.ndarray, n_classes: int) -> tuple[list[int], list[int]]:
    """Classes that get a one-vs-rest curve, and those skipped (no positives or no negatives).

    Binary problems get one curve, for the positive (second) class: the other
    is its mirror image and only adds clutter.
    """
    candidates = [1] if n_classes == 2 else list(range(n_classes))
    drawable = [k for k in candidates if 0 < np.sum(y == k) < y.size]
    return drawable, [k for k in candidates if k not in drawable]


def add_legend(ax, n_entries: int, loc: str) -> None:
    """Legend inside the axes for few entries, below them for many (inside it would hide the curves; on the
    right it made the picture half as wide again, and the report shrank the whole figure to fit its page)."""
    if n_entries <= 8:
        ax.legend(loc=loc, fontsize=8)
    else:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8)


# --------------------------------------------------------------------------- confusion matrix
def confusion_matrix_figure(
    cm: np.ndarray,
    classes: list[str],
    path: Path,
    *,
    normalize: bool = False,
    title: str | None = None,
    subset: str | None = None,
) -> Path:
    """Heat-map of a confusion matrix (rows = true, columns = predicted), annotated per cell.

    With ``normalize=True`` each row is divided by its total, so the diagonal
    reads as per-class recall; rows of absent classes read "n/a" (no recall).
    The default title names ``subset`` (e.g. "test") and n, the matrix's total.
    """
    counts = np.asarray(cm, dtype=np.float64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match {n} classes")
    values = normalize_rows(counts) if normalize else counts

    side = min(max(4.5, 0.55 * n + 2.5), 16.0)  # grow with the class count, within reason
    fig = new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                       label="fraction of true class" if normalize else "count")
    if not normalize:
        bar.locator = MaxNLocator(integer=True)  # counts: no "0.5, 1.5" ticks
        bar.update_ticks()

    fontsize = 10 if n <= 8 else 8 if n <= 15 else 6
    absent = counts.sum(axis=1) == 0
    for i in range(n):
        for j in range(n):
            if normalize and absent[i]:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=fontsize, color="grey")
                continue
            text = f"{values[i, j]:.2f}" if normalize else f"{int(round(values[i, j]))}"
            dark = values[i, j] > 0.55 * vmax  # white text on dark cells
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")

    labels = [as_text(name) for name in classes]
    ax.set_xticks(range(n), labels=labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=labels)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    sample = f"; {subset + ', ' if subset else ''}n = {int(counts.sum())}"
    ax.set_title(title or (f"Confusion matrix (row-normalised{sample})" if normalize
                           else f"Confusion matrix (counts{sample})"))
    return save_figure(fig, path)


# --------------------------------------------------------------------------- ROC / PR
def curve_widths(n: int) -> list[float]:
    """Line widths for ``n`` curves drawn in order, widest first: a curve drawn later over an identical one
    (two classes both at AUC 1.0) leaves a rim of it visible instead of hiding it."""
    return [float(w) for w in np.linspace(4.0, 1.4, n)] if n > 1 else [1.8] * n


def drawn_path(x: np.ndarray, y: np.ndarray, *, steps: bool = False) -> np.ndarray:
    """The polyline a curve draws (``steps``: as ``step(where="post")``), without repeated or collinear middle
    points, so that two curves that look the same compare equal (sklearn keeps points that draw nothing)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if steps and x.size > 1:
        x, y = np.repeat(x, 2)[1:], np.repeat(y, 2)[:-1]  # (x0,y0) (x1,y0) (x1,y1) (x2,y1) ...
    kept: list[tuple[float, float]] = []
    for px, py in zip(x.tolist(), y.tolist()):  # Python floats: a curve has a point per image (10,000 and more)
        if kept and math.isclose(px, kept[-1][0], rel_tol=1e-5, abs_tol=1e-8) and \
                math.isclose(py, kept[-1][1], rel_tol=1e-5, abs_tol=1e-8):
            continue
        if len(kept) >= 2:
            (ax_, ay), (bx, by) = kept[-2], kept[-1]
            if abs((bx - ax_) * (py - ay) - (by - ay) * (px - ax_)) < 1e-12:
                kept[-1] = (px, py)  # the middle point lies on the line: it draws nothing
                continue
        kept.append((px, py))
    return np.array(kept, dtype=np.float64).reshape(-1, 2)


def _same_as(curves: list[tuple[str, np.ndarray]], path: np.ndarray) -> str | None:
    """The first earlier curve that draws exactly this path, said in the legend, since it is drawn over it."""
    for name, earlier in curves:
        if earlier.shape == path.shape and np.allclose(earlier, path):
            return name
    return None


def _sample_title(kind: str, n: int, subset: str | None) -> str:
    return f"{kind} (one-vs-rest; {subset + ', ' if subset else ''}n = {n})"


def _missing(y: np.ndarray, k: int) -> str:
    """Why class ``k`` has no curve: it has no images among ``y``, or every image is of it."""
    return "no positives" if not np.any(y == k) else "no negatives: every image is of it"


def roc_figure(y_true: np.ndarray, probs: np.ndarray, classes: list[str], path: Path, *,
               subset: str | None = None) -> Path:
    """One-vs-rest ROC curve per class with its AUC and positives in the legend, ``subset`` and n in the title."""
    y, p = _check_curve_inputs(y_true, probs, classes)
    drawable, skipped = _curve_classes(y, len(classes))
    fig = new_figure(6.5, 5.5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance (AUC = 0.50)")
    drawn: list[tuple[str, np.ndarray]] = []
    for k, width in zip(drawable, curve_widths(len(drawable))):
        fpr, tpr, _ = roc_curve(y == k, p[:, k])
        auc = float(area_under_curve(fpr, tpr))
        label = f"{as_text(classes[k])} vs {as_text(classes[0])}" if len(classes) == 2 else as_text(classes[k])
        path_k = drawn_path(fpr, tpr)
        same = _same_as(drawn, path_k)
        ax.plot(fpr, tpr, linewidth=width, label=f"{label} (AUC = {auc:.3f}, {int(np.sum(y == k))} positive)"
                + (f", same curve as {same}" if same else ""), **line_style(k))
        drawn.append((label, path_k))
    for k in skipped:
        ax.plot([], [], " ", label=f"{as_text(classes[k])}: AUC n/a ({_missing(y, k)})")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title=_sample_title("ROC curves", y.size, subset))
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    add_legend(ax, len(drawable) + len(skipped) + 1, "lower right")
    return save_figure(fig, path)


def pr_figure(y_true: np.ndarray, probs: np.ndarray, classes: list[str], path: Path, *,
              subset: str | None = None) -> Path:
    """One-vs-rest precision-recall curve per class with average precision (AP) and positives in the legend.

    Each class's share of positives, the AP of a random scorer, is drawn as a dotted line in its colour: it
    matters for rare classes, where a high ROC-AUC can hide poor precision. The AP drawn is
    ``per_class.*.average_precision`` of :func:`~leukoscope.evaluation.classification_metrics`.
    """
    y, p = _check_curve_inputs(y_true, probs, classes)
    drawable = [k for k in range(len(classes)) if 0 < np.sum(y == k) < y.size]
    skipped = [k for k in range(len(classes)) if k not in drawable]
    fig = new_figure(6.5, 5.5)
    ax = fig.add_subplot()
    drawn: list[tuple[str, np.ndarray]] = []
    for k, width in zip(drawable, curve_widths(len(drawable))):
        precision, recall, _ = precision_recall_curve(y == k, p[:, k])
        ap = average_precision_score(y == k, p[:, k])
        positives = int(np.sum(y == k))
        path_k = drawn_path(recall, precision, steps=True)
        same = _same_as(drawn, path_k)
        ax.step(recall, precision, where="post", linewidth=width,
                label=f"{as_text(classes[k])} (AP = {ap:.3f}, {positives} positive)"
                + (f", same curve as {same}" if same else ""), **line_style(k))
        ax.axhline(positives / y.size, color=line_style(k)["color"], linestyle=":", linewidth=0.9, alpha=0.8)
        drawn.append((as_text(classes[k]), path_k))
    if drawable:
        ax.plot([], [], color="grey", linestyle=":", linewidth=0.9,
                label="dotted: a random scorer (precision = the class's share of positives)")
    for k in skipped:
        ax.plot([], [], " ", label=f"{as_text(classes[k])}: AP n/a ({_missing(y, k)})")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.05), xlabel="Recall (sensitivity)", ylabel="Precision",
           title=_sample_title("Precision-recall curves", y.size, subset))
    ax.grid(alpha=0.3)
    add_legend(ax, len(drawable) + len(skipped) + bool(drawable), "lower left")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- reliability
def reliability_figure(
    y_true: np.ndarray,
    probs_before: np.ndarray,
    probs_after: np.ndarray | None,
    path: Path,
    *,
    n_bins: int = 15,
    temperature: float | None = None,
    applied_temperature: float | None = None,
    subset: str | None = None,
) -> Path:
    """Reliability diagram: accuracy vs confidence per bin, before (and after) calibration.

    Points on the diagonal are perfectly calibrated; below it the model is
    over-confident. A lower panel shows how many samples fall in each bin, since
    a bin with three samples says little. ``temperature`` is the one that gave
    ``probs_after``; without ``probs_after``, ``applied_temperature`` is the one
    ``probs_before`` already carry (a bundle's, as ``leukoscope evaluate`` scores
    it): each curve is named by its temperature, not "model". ``subset`` (e.g.
    "test") is named with the number of samples above the legend, which sits
    outside the axes so that it hides no point.
    """
    y = np.asarray(y_true)
    if probs_after is not None:
        after = f"after temperature T = {temperature:.2f}" if temperature is not None else "after temperature scaling"
        series = [("before calibration (T = 1)", probs_before), (after, probs_after)]
    elif applied_temperature is not None and applied_temperature != 1.0:
        series = [(f"after temperature T = {applied_temperature:.2f}", probs_before)]
    else:
        series = [("model (no temperature scaling)" if applied_temperature == 1.0 else "model", probs_before)]

    fig = new_figure(6.0, 6.5)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax, ax_hist = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    for k, (name, probs) in enumerate(series):
        bins = reliability_bins(probs, y_true, n_bins)
        ece = expected_calibration_error(probs, y_true, n_bins)
        filled = bins.count > 0
        style = {"color": _PALETTE[k], "marker": "o" if k == 0 else "s"}
        ax.plot(bins.confidence[filled], bins.accuracy[filled], linewidth=1.6, markersize=5,
                label=f"{name} (ECE = {ece:.3f})", **style)
        centres = (bins.edges[:-1] + bins.edges[1:]) / 2
        ax_hist.step(centres, bins.count, where="mid", color=style["color"], linewidth=1.4)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="Accuracy in bin",
           title=f"Reliability diagram ({n_bins} equal-width bins)")
    ax.tick_params(labelbottom=False)
    ax.grid(alpha=0.3)
    # Outside the axes: inside, any corner can hold points (a small run's bins sit at accuracy 1.0 on the left).
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title_fontsize=8,
              title=f"{subset + ', ' if subset else ''}n = {y.size}")
    ax_hist.set(xlim=(0, 1), xlabel="Confidence (top-class probability)", ylabel="Samples")
    ax_hist.yaxis.set_major_locator(MaxNLocator(integer=True))  # sample counts, no "2.5"
    ax_hist.grid(alpha=0.3)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- training curves
def _series(history: list[dict], key: str) -> np.ndarray:
    """Values of ``key`` per epoch as floats, NaN where missing/None (drawn as gaps)."""
    values = [item.get(key) for item in history]
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def training_curves_figure(history: list[dict], path: Path, *, best_epoch: int | None = None,
                           monitor: str | None = None) -> Path:
    """Loss and accuracy per epoch (train and, when recorded, validation) in two panels.

    ``best_epoch`` (the checkpoint kept, chosen by ``monitor``) is marked on both panels; without it, the
    lowest validation loss is marked and labelled as such.
    """
    if not history:
        raise ValueError("training history is empty; nothing to plot")
    epochs = np.array(
        [item.get("epoch") if item.get("epoch") is not None else i + 1 for i, item in enumerate(history)],
        dtype=np.float64,
    )
    fig = new_figure(10.0, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric, ylabel in ((ax_loss, "loss", "Loss"), (ax_acc, "accuracy", "Accuracy")):
        drawn = 0
        for k, split in enumerate(("train", "val")):
            values = _series(history, f"{split}_{metric}")
            if np.all(np.isnan(values)):
                continue
            ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.6, color=_PALETTE[k],
                    label="train" if split == "train" else "validation")
            drawn += 1
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {metric} recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set(xlabel="Epoch", ylabel=ylabel, title=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 2.5" ticks
        ax.grid(alpha=0.3)
    if best_epoch is not None and best_epoch in epochs:
        for ax in (ax_loss, ax_acc):
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
    else:
        _mark_best_validation(ax_loss, epochs, _series(history, "val_loss"))
    if _accuracy_is_fraction(history):
        ax_acc.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    if best_epoch is not None and best_epoch in epochs:  # placed once the panel has its final size
        by = f", by {monitor}" if monitor else ""
        _checkpoint_note(ax_acc, best_epoch, f"checkpoint kept (epoch {best_epoch}{by})")
    return save_figure(fig, path)


def _checkpoint_note(ax, epoch: int, text: str) -> None:
    """``text`` beside the checkpoint line, inside the panel: right of it, else left (the best epoch is often the
    last, and the note ran off the panel), else on two lines on the side with more room."""
    renderer = ax.figure.canvas.get_renderer()
    panel = ax.get_window_extent(renderer)
    line_x = ax.transData.transform((epoch, 0))[0]
    for label in (text, text.replace(" (", "\n(", 1)):
        for left in (False, True):
            note = ax.annotate(label, (epoch, 0.02), xycoords=("data", "axes fraction"), xytext=(-6 if left else 6, 0),
                               textcoords="offset points", ha="right" if left else "left", va="bottom", fontsize=8,
                               color="dimgrey")
            box = note.get_window_extent(renderer)
            if panel.x0 <= box.x0 and box.x1 <= panel.x1:
                return
            note.remove()
    left = line_x - panel.x0 > panel.x1 - line_x  # nothing fits whole: the wider side, on two lines
    ax.annotate(text.replace(" (", "\n(", 1), (epoch, 0.02), xycoords=("data", "axes fraction"),
                xytext=(-6 if left else 6, 0), textcoords="offset points", ha="right" if left else "left",
                va="bottom", fontsize=8, color="dimgrey")


def _mark_best_validation(ax, epochs: np.ndarray, val_loss: np.ndarray) -> None:
    if np.all(np.isnan(val_loss)):
        return
    best = int(np.nanargmin(val_loss))
    ax.axvline(epochs[best], color="grey", linestyle="--", linewidth=1)
    ax.annotate(f"lowest val loss (epoch {epochs[best]:g})", (epochs[best], val_loss[best]), textcoords="offset points",
                xytext=(6, 10), fontsize=8, color="dimgrey")


def _accuracy_is_fraction(history: list[dict]) -> bool:
    """Accuracies in [0, 1] get a fixed 0..1 axis so runs compare at a glance."""
    values = np.concatenate([_series(history, "train_accuracy"), _series(history, "val_accuracy")])
    values = values[~np.isnan(values)]
    return values.size > 0 and values.min() >= 0 and values.max() <= 1
