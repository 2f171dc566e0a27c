"""Detection evaluation: COCO mAP (pycocotools), AP@0.5 per class, precision and
recall at the operating threshold, per-image count errors, PR curves, example
images, and the same metrics.json + figures/ + report.html as classification.

Average precision is computed by pycocotools' ``COCOeval`` (the reference
implementation), never by hand. Precision/recall at the operating threshold use
a greedy one-to-one matching at IoU >= 0.5, highest score first, per class.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torchvision.ops import box_iou

import leukoscope
from leukoscope.evaluation.evaluate import to_jsonable
from leukoscope.evaluation.figures import add_legend, as_text, curve_widths, line_style, new_figure, save_figure
from leukoscope.evaluation.report import embed_figure, format_value, render_template
from leukoscope.labels import DISCLAIMER


@dataclass
class GroundTruth:
    """One image's true boxes (N, 4) xyxy and 0-based class indices (N,)."""

    boxes: np.ndarray
    labels: np.ndarray
    width: int
    height: int
    name: str = ""


@dataclass
class Predicted:
    """One image's predicted boxes, scores and 0-based class indices (any score; thresholds come later)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def _as_arrays(boxes, labels, scores=None):
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    s = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    return b, lab, s


# --------------------------------------------------------------------------- COCO mAP
def detection_limit(predictions: Sequence[Predicted]) -> int:
    """COCOeval's per-image detection limit that cuts none of ``predictions``: their most on one image, at
    least COCO's 100. A fixed 100 capped recall at 100/N on a large field of N cells (214 red cells on a
    2560x1920 mosaic scored RBC AP 0.46 for 0.92), though the detector's own cap grows with the field."""
    return max([100] + [len(np.asarray(p.scores).reshape(-1)) for p in predictions])


def coco_metrics(predictions: Sequence[Predicted], truths: Sequence[GroundTruth], classes: Sequence[str],
                 max_detections: int | None = None) -> dict[str, Any]:
    """COCO mAP@[.5:.95], AP@0.5, AP@0.75, mean recall, per-class AP and PR curves, from pycocotools.

    ``max_detections`` is COCOeval's limit of detections per image (highest scores kept); None: every
    detection given (:func:`detection_limit`), so that what is scored is what the detector returned.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} images")
    images, annotations, results = [], [], []
    for index, (pred, truth) in enumerate(zip(predictions, truths)):
        images.append({"id": index + 1, "width": int(truth.width), "height": int(truth.height)})
        boxes, labels, _ = _as_arrays(truth.boxes, truth.labels)
        for box, label in zip(boxes, labels):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": int(label) + 1,
                                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
        boxes, labels, scores = _as_arrays(pred.boxes, pred.labels, pred.scores)
        for box, label, score in zip(boxes, labels, scores):
            results.append({"image_id": index + 1, "category_id": int(label) + 1, "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    n_true = {name: int(sum(np.sum(np.asarray(t.labels) == k) for t in truths)) for k, name in enumerate(classes)}
    limit = detection_limit(predictions) if max_detections is None else int(max_detections)
    empty = {
        "map": 0.0, "map_50": 0.0, "map_75": 0.0, "mar": 0.0, "max_detections": limit,
        "per_class": {name: {"ap_50": 0.0 if n_true[name] else None, "ap": 0.0 if n_true[name] else None,
                             "n_true": n_true[name]} for name in classes},
        "pr_curves": {},
    }
    if not annotations:
        raise ValueError("no ground-truth box in the evaluated images: mAP is undefined")
    if not results:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.maxDets = [limit]
        evaluator.evaluate()
        evaluator.accumulate()
    # The summary means are taken here, as COCOeval.summarize takes them (defined entries, area "all", the
    # last limit): summarize reads its mAP@[.5:.95] at a fixed maxDets=100 and gives -1 for any other limit.
    precision = evaluator.eval["precision"]  # [IoU thresholds, recall points, classes, areas, max dets]
    recall = evaluator.eval["recall"]  # [IoU thresholds, classes, areas, max dets]

    def mean(values: np.ndarray) -> float:
        defined = values[values > -1]
        return float(defined.mean()) if defined.size else 0.0

    at_iou = {round(float(t), 2): i for i, t in enumerate(evaluator.params.iouThrs)}
    recall_points = evaluator.params.recThrs
    per_class: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for k, name in enumerate(classes):
        at_50 = precision[0, :, k, 0, -1]
        all_iou = precision[:, :, k, 0, -1]
        defined = at_50 > -1
        per_class[name] = {
            "ap_50": float(at_50[defined].mean()) if defined.any() and n_true[name] else None,
            "ap": float(all_iou[all_iou > -1].mean()) if (all_iou > -1).any() and n_true[name] else None,
            "n_true": n_true[name],
        }
        if defined.any() and n_true[name]:
            curves[name] = {"recall": recall_points.tolist(), "precision": np.where(defined, at_50, np.nan).tolist()}
    return {
        "map": mean(precision[:, :, :, 0, -1]),
        "map_50": mean(precision[at_iou[0.5], :, :, 0, -1]),
        "map_75": mean(precision[at_iou[0.75], :, :, 0, -1]),
        "mar": mean(recall[:, :, 0, -1]),
        "max_detections": limit,
        "per_class": per_class,
        "pr_curves": curves,
    }


# --------------------------------------------------------------------------- operating point and counts
def match_detections(pred_boxes: np.ndarray, pred_scores: np.ndarray, true_boxes: np.ndarray,
                     iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """Greedy one-to-one matching of one class in one image: (true positives, false positives, false negatives)."""
    if len(pred_boxes) == 0:
        return 0, 0, len(true_boxes)
    if len(true_boxes) == 0:
        return 0, len(pred_boxes), 0
    order = np.argsort(-pred_scores, kind="stable")
    iou = box_iou(torch.as_tensor(pred_boxes[order], dtype=torch.float64),
                  torch.as_tensor(true_boxes, dtype=torch.float64)).numpy()
    taken = np.zeros(len(true_boxes), dtype=bool)
    tp = 0
    for row in iou:
        candidates = np.where(~taken & (row >= iou_threshold))[0]
        if len(candidates):
            taken[candidates[np.argmax(row[candidates])]] = True
            tp += 1
    return tp, len(pred_boxes) - tp, len(true_boxes) - tp


def operating_point(predictions: Sequence[Predicted], truths: Sequence[GroundTruth], classes: Sequence[str],
                    score_threshold: float, iou_threshold: float = 0.5) -> dict[str, Any]:
    """Precision, recall, F1 per class at ``score_threshold``, and per-image count errors."""
    per_class: dict[str, Any] = {}
    rows = []
    for k, name in enumerate(classes):
        tp = fp = fn = 0
        errors = []
        for index, (pred, truth) in enumerate(zip(predictions, truths)):
            pb, pl, ps = _as_arrays(pred.boxes, pred.labels, pred.scores)
            tb, tl, _ = _as_arrays(truth.boxes, truth.labels)
            keep = (pl == k) & (ps >= score_threshold)
            a, b, c = match_detections(pb[keep], ps[keep], tb[tl == k], iou_threshold)
            tp, fp, fn = tp + a, fp + b, fn + c
            errors.append(int(keep.sum()) - int((tl == k).sum()))
        errors_arr = np.asarray(errors)
        precision = tp / (tp + fp) if tp + fp else None
        recall = tp / (tp + fn) if tp + fn else None
        # 2TP / (2TP + FP + FN): 0 for a class whose boxes were all missed or whose detections were all false
        # (precision or recall undefined there), so that a threshold dropping a whole class scores it 0 and
        # cannot win choose_threshold's mean; None only when the class has neither boxes nor detections.
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
        per_class[name] = {
            "precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn,
            "count_mae": float(np.abs(errors_arr).mean()) if len(errors_arr) else None,
            "count_bias": float(errors_arr.mean()) if len(errors_arr) else None,
            "count_exact": float((errors_arr == 0).mean()) if len(errors_arr) else None,
        }
    for index, (pred, truth) in enumerate(zip(predictions, truths)):
        pb, pl, ps = _as_arrays(pred.boxes, pred.labels, pred.scores)
        tl = np.asarray(truth.labels).reshape(-1)
        row: dict[str, Any] = {"image": truth.name or str(index)}
        for k, name in enumerate(classes):
            row[f"true_{name}"] = int((tl == k).sum())
            row[f"pred_{name}"] = int(((pl == k) & (ps >= score_threshold)).sum())
        rows.append(row)
    return {"score_threshold": score_threshold, "iou_threshold": iou_threshold, "per_class": per_class,
            "per_image_counts": rows}


# --------------------------------------------------------------------------- figures
def pr_curves_figure(coco: dict[str, Any], operating: dict[str, Any], path: Path) -> Path:
    fig = new_figure(5.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    widths = curve_widths(len(coco["pr_curves"]))  # widest first: a later identical curve leaves a rim of it
    for k, (name, curve) in enumerate(coco["pr_curves"].items()):
        ap, n_true = coco["per_class"][name]["ap_50"], coco["per_class"][name].get("n_true")
        objects = f", {n_true} true" if n_true is not None else ""
        ax.plot(curve["recall"], curve["precision"], linewidth=widths[k],
                label=f"{as_text(name)} (AP@0.5 {ap:.3f}{objects})", **line_style(k))
        point = operating["per_class"].get(name, {})
        if point.get("precision") is not None and point.get("recall") is not None:
            ax.plot([point["recall"]], [point["precision"]], "o", color=line_style(k)["color"])
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(f"Precision-recall at IoU 0.5 (dots: threshold {operating['score_threshold']:.2f})", fontsize=9)
    add_legend(ax, len(coco["pr_curves"]), "lower left")
    return save_figure(fig, path)


def count_figure(operating: dict[str, Any], classes: Sequence[str], path: Path) -> Path:
    """Predicted against true count per image and class, one marker per (true, predicted) pair at its exact
    integer place, its area and number giving how many images share it: jitter had moved exact counts off the
    diagonal and zero counts below zero."""
    rows = operating["per_image_counts"]
    fig = new_figure(3.2 * len(classes), 3.5)
    for k, name in enumerate(classes):
        ax = fig.add_subplot(1, len(classes), k + 1)
        true = np.array([r[f"true_{name}"] for r in rows], dtype=np.int64)
        pred = np.array([r[f"pred_{name}"] for r in rows], dtype=np.int64)
        pairs, images = (np.unique(np.stack([true, pred], axis=1), axis=0, return_counts=True) if len(rows)
                         else (np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)))
        # area by images, up to 20 (a test set of hundreds at one count would cover the panel); the number says more
        ax.scatter(pairs[:, 0], pairs[:, 1], s=18 * np.minimum(images, 20), alpha=0.6, color=line_style(k)["color"],
                   edgecolors="none")
        for (x, y), count in zip(pairs, images):
            if count > 1:  # the area alone is hard to read as a number
                ax.annotate(str(count), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        top = max(1, int(max(true.max(initial=0), pred.max(initial=0))) + 1)
        ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
        ax.set_xlim(-0.5, top + 0.5)  # the margin shows a zero count whole; no count is below 0
        ax.set_ylim(-0.5, top + 0.5)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # counts are whole numbers
        exact = operating["per_class"][name]["count_exact"]
        ax.set_title(f"{as_text(name)}: exact in {exact:.0%}" if exact is not None else as_text(name), fontsize=9)
        ax.set_xlabel("true count")
        if k == 0:
            ax.set_ylabel("predicted count")
    fig.suptitle(f"Counts per image ({len(rows)} images): a marker's area and number give how many images "
                 "share that pair; on the line the count is exact", fontsize=8)
    return save_figure(fig, path)


#: A class with more predicted boxes than this in a field is left unlabelled there (its colour says the class):
#: overlapping labels of crowded red cells were unreadable, and covered the white cells' labels.
EXAMPLE_LABELS_MAX = 6
#: Points; 5 pt labels could not be read at the figure's size.
EXAMPLE_LABEL_SIZE = 7


def examples_figure(images: Sequence[np.ndarray], predictions: Sequence[Predicted], truths: Sequence[GroundTruth],
                    classes: Sequence[str], score_threshold: float, path: Path, columns: int = 3) -> Path:
    """True boxes dashed, predictions (score >= threshold) solid, one colour per class; class and score are
    written on the boxes of the classes with at most :data:`EXAMPLE_LABELS_MAX` of them in that field, and each
    panel's title says which classes' boxes are unlabelled."""
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig = new_figure(4.2 * min(columns, n), 3.6 * rows)
    for i, (pixels, pred, truth) in enumerate(zip(images, predictions, truths)):
        ax = fig.add_subplot(rows, min(columns, n), i + 1)
        ax.imshow(pixels)
        for box, label in zip(*_as_arrays(truth.boxes, truth.labels)[:2]):
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                   linestyle="--", linewidth=1.0, edgecolor=line_style(int(label))["color"]))
        pb, pl, ps = _as_arrays(pred.boxes, pred.labels, pred.scores)
        shown = ps >= score_threshold
        per_class = np.bincount(pl[shown], minlength=len(classes))
        for box, label, score in zip(pb[shown], pl[shown], ps[shown]):
            colour = line_style(int(label))["color"]
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                   linewidth=1.6, edgecolor=colour))
            if per_class[int(label)] <= EXAMPLE_LABELS_MAX:
                ax.text(box[0], box[1], f"{as_text(classes[int(label)])} {score:.2f}", fontsize=EXAMPLE_LABEL_SIZE,
                        color="white", va="bottom", bbox={"facecolor": colour, "pad": 1.0, "linewidth": 0})
        crowded = [f"{as_text(classes[k])} x{int(c)}" for k, c in enumerate(per_class) if c > EXAMPLE_LABELS_MAX]
        ax.set_title(as_text(truth.name) + (f"\nunlabelled: {', '.join(crowded)}" if crowded else ""), fontsize=8)
        ax.axis("off")
    handles = [Line2D([], [], color=line_style(k)["color"], linewidth=2, label=as_text(name))
               for k, name in enumerate(classes)]
    handles += [Line2D([], [], color="grey", linestyle="--", label="true box"),
                Line2D([], [], color="grey", label=f"predicted (score >= {score_threshold:.2f})")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    return save_figure(fig, path)


def detection_training_figure(history: Sequence[dict[str, Any]], path: Path) -> Path | None:
    if not history:
        return None
    fig = new_figure(8, 3.2)
    epochs = [row["epoch"] for row in history]
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    for key, label in (("val_map", "val mAP@[.5:.95]"), ("val_map_50", "val mAP@0.5")):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- report
_CAPTIONS = {
    "pr_curves": ("Precision-recall curves", "Per class at IoU 0.5 (pycocotools' 101-point interpolation, every "
                  "detection of an image scored); the dot is the operating threshold."),
    "counts": ("Counts per image", "Predicted against true number of objects per image and class, at their "
               "exact values; a marker's area (and the number beside it) is how many images share that pair; "
               "on the diagonal the count is exactly right."),
    "examples": ("Examples", "Dashed: true boxes; solid: predicted boxes at the operating threshold, "
                 "coloured by class, with their scores (a class with more than "
                 f"{EXAMPLE_LABELS_MAX} boxes in a field is left unlabelled there, as its title says). "
                 "Worst count errors first."),
    "training_curves": ("Training curves", "Training loss and validation mAP per epoch."),
}


def render_detection_report(metrics: dict[str, Any], figures: dict[str, Path], *, title: str,
                            notes: Sequence[str] = (), config: dict | None = None) -> str:
    classes = metrics["classes"]
    rows = []
    for name in classes:
        coco = metrics["per_class"][name]
        op = metrics["operating_point"]["per_class"][name]
        rows.append([name, str(coco["n_true"]), format_value(coco["ap_50"]), format_value(coco["ap"]), format_value(op["precision"]),
                     format_value(op["recall"]), format_value(op["f1"]), format_value(op["count_mae"], 2), format_value(op["count_exact"])])
    cards = [
        ("mAP@[.5:.95]", format_value(metrics["map"]), "COCO, all classes"),
        ("mAP@0.5", format_value(metrics["map_50"]), "mean of per-class AP@0.5"),
        ("mAP@0.75", format_value(metrics["map_75"]), "stricter localisation"),
        ("Images", str(metrics["n_images"]), f"{metrics['n_objects']} true objects"),
        ("Threshold", format_value(metrics["operating_point"]["score_threshold"], 2), "operating score threshold"),
    ]
    details = [(k, format_value(v)) for k, v in metrics.items()
               if isinstance(v, (str, int, float, bool)) and k not in ("map", "map_50", "map_75")]
    embedded = []
    for name, path in figures.items():
        item = embed_figure(name, path)
        item["title"], item["caption"] = _CAPTIONS.get(name, (item["title"], item["caption"]))
        embedded.append(item)
    return render_template("detection_report.html", dict(
        title=title, version=leukoscope.__version__,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), disclaimer=DISCLAIMER,
        notes=list(notes), cards=cards, rows=rows, details=details, figures=embedded,
        config_json=json.dumps(config, indent=2, default=str) if config else "",
    ))


def evaluate_detections(
    predictions: Sequence[Predicted],
    truths: Sequence[GroundTruth],
    classes: Sequence[str],
    out_dir: str | Path,
    *,
    score_threshold: float = 0.5,
    images: Sequence[np.ndarray] | Callable[[int], np.ndarray] | None = None,
    n_examples: int = 6,
    history: Sequence[dict[str, Any]] | None = None,
    title: str = "Detection evaluation",
    notes: Sequence[str] = (),
    config: dict | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``figures/*.png`` and ``report.html`` into ``out_dir``; return the metrics.

    ``images`` (RGB arrays in the same order, or a function index -> array) are
    only needed for the example figure.
    """
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    coco = coco_metrics(predictions, truths, classes)
    operating = operating_point(predictions, truths, classes, score_threshold)
    wbc = next((c for c in classes if c.upper() == "WBC"), None)
    metrics: dict[str, Any] = {
        "task": "detection",
        "classes": list(classes),
        "n_images": len(truths),
        "n_objects": int(sum(len(np.asarray(t.labels).reshape(-1)) for t in truths)),
        "map": coco["map"],
        "map_50": coco["map_50"],
        "map_75": coco["map_75"],
        "mar": coco.get("mar"),
        "max_detections_per_image": coco.get("max_detections"),  # COCOeval's limit: none of the detections cut
        "per_class": coco["per_class"],
        "operating_point": operating,
    }
    if wbc is not None:
        metrics["wbc_count_exact"] = operating["per_class"][wbc]["count_exact"]
    metrics.update(extra or {})
    figures: dict[str, Path] = {}
    if coco["pr_curves"]:
        figures["pr_curves"] = pr_curves_figure(coco, operating, figures_dir / "pr_curves.png")
    figures["counts"] = count_figure(operating, classes, figures_dir / "counts.png")
    if images is not None and n_examples > 0:
        errors = [sum(abs(r[f"pred_{c}"] - r[f"true_{c}"]) for c in classes) for r in operating["per_image_counts"]]
        order = list(np.argsort(-np.asarray(errors), kind="stable")[:n_examples])
        load = images if callable(images) else images.__getitem__
        figures["examples"] = examples_figure([load(int(i)) for i in order], [predictions[i] for i in order],
                                              [truths[i] for i in order], classes, score_threshold,
                                              figures_dir / "examples.png")
    if history:
        path = detection_training_figure(history, figures_dir / "training_curves.png")
        if path is not None:
            figures["training_curves"] = path
    metrics["figures"] = {name: str(path.relative_to(out_dir)) for name, path in figures.items()}
    metrics = to_jsonable(metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    html = render_detection_report(metrics, figures, title=title, notes=notes, config=config)
    (out_dir / "report.html").write_text(html, encoding="utf-8")
    return metrics


def choose_threshold(predictions: Sequence[Predicted], truths: Sequence[GroundTruth], classes: Sequence[str],
                     candidates: Sequence[float] = tuple(np.round(np.arange(0.1, 0.951, 0.05), 2))) -> float:
    """The score threshold with the best mean F1 over classes (ties: the lower threshold)."""
    best, best_f1 = 0.5, -1.0
    for threshold in candidates:
        per_class = operating_point(predictions, truths, classes, float(threshold))["per_class"]
        f1 = [v["f1"] for v in per_class.values() if v["f1"] is not None]
        score = float(np.mean(f1)) if f1 else 0.0
        if score > best_f1 + 1e-9:
            best, best_f1 = float(threshold), score
    return best
