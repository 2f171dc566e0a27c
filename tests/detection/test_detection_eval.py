from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from leukoscope.evaluation.detection import (
    GroundTruth,
    Predicted,
    choose_threshold,
    coco_metrics,
    evaluate_detections,
    match_detections,
    operating_point,
)

CLASSES = ["WBC", "RBC"]


def _truths() -> list[GroundTruth]:
    return [
        GroundTruth(np.array([[10, 10, 60, 60], [100, 100, 140, 150]], float), np.array([0, 1]), 200, 200, "a"),
        GroundTruth(np.array([[20, 30, 90, 100], [150, 20, 190, 60], [5, 120, 45, 160]], float), np.array([0, 1, 1]),
                    200, 200, "b"),
    ]


def _perfect(truths: list[GroundTruth], shift: float = 0.0) -> list[Predicted]:
    return [Predicted(t.boxes + shift, np.linspace(0.9, 0.8, len(t.labels)), t.labels.copy()) for t in truths]


def test_perfect_boxes_give_map_one() -> None:
    metrics = coco_metrics(_perfect(_truths()), _truths(), CLASSES)
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert all(v["ap_50"] == pytest.approx(1.0) for v in metrics["per_class"].values())
    assert metrics["per_class"]["RBC"]["n_true"] == 3


def test_shifted_boxes_score_lower_and_wrong_class_scores_zero() -> None:
    perfect = coco_metrics(_perfect(_truths()), _truths(), CLASSES)["map"]
    shifted = coco_metrics(_perfect(_truths(), 6.0), _truths(), CLASSES)
    assert shifted["map"] < perfect
    assert shifted["map_50"] == pytest.approx(1.0)  # still IoU > 0.5
    far = coco_metrics(_perfect(_truths(), 40.0), _truths(), CLASSES)
    assert far["map_50"] < 0.5
    swapped = [Predicted(p.boxes, p.scores, 1 - p.labels) for p in _perfect(_truths())]
    assert coco_metrics(swapped, _truths(), CLASSES)["map"] == pytest.approx(0.0)


def test_no_predictions_and_no_truth() -> None:
    empty = [Predicted(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)) for _ in range(2)]
    assert coco_metrics(empty, _truths(), CLASSES)["map"] == 0.0
    with pytest.raises(ValueError, match="no ground-truth"):
        coco_metrics(empty, [GroundTruth(np.zeros((0, 4)), np.zeros(0, int), 10, 10)] * 2, CLASSES)


def test_matching_and_operating_point() -> None:
    true = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    pred = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], float)
    assert match_detections(pred, np.array([0.9, 0.8, 0.7]), true) == (1, 2, 1)
    predictions = _perfect(_truths())
    predictions[1].scores[2] = 0.2  # below the threshold: a missed RBC, an RBC count one too low
    point = operating_point(predictions, _truths(), CLASSES, 0.5)
    rbc = point["per_class"]["RBC"]
    assert (rbc["tp"], rbc["fp"], rbc["fn"]) == (2, 0, 1)
    assert rbc["recall"] == pytest.approx(2 / 3) and rbc["precision"] == 1.0
    assert rbc["count_exact"] == 0.5 and rbc["count_bias"] == -0.5
    assert point["per_class"]["WBC"]["count_exact"] == 1.0
    assert choose_threshold(predictions, _truths(), CLASSES) <= 0.2


def test_evaluate_writes_metrics_figures_report(tmp_path: Path) -> None:
    images = [np.full((200, 200, 3), 220, np.uint8)] * 2
    metrics = evaluate_detections(_perfect(_truths(), 3.0), _truths(), ["WBC", "RBC"], tmp_path, images=images,
                                  history=[{"epoch": 1, "train_loss": 1.0, "val_map": 0.2, "val_map_50": 0.4}],
                                  title="test <b>", notes=["a note"])
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["map_50"] == pytest.approx(1.0) and stored["wbc_count_exact"] == 1.0
    for name in ("pr_curves", "counts", "examples", "training_curves"):
        assert (tmp_path / metrics["figures"][name]).is_file()
    html = (tmp_path / "report.html").read_text()
    assert "test &lt;b&gt;" in html and "AP@0.5" in html and "a note" in html and "data:image/png;base64" in html


def test_a_threshold_that_drops_a_whole_class_scores_it_zero_not_absent() -> None:
    """One WBC found at 0.99; two true RBCs, one found at 0.3, and a false RBC at 0.3. Above 0.3 no RBC is
    left: its F1 is 0 (recall 0), not undefined, so the mean over classes cannot prefer dropping the class."""
    truths = [GroundTruth(np.array([[10, 10, 60, 60], [100, 100, 140, 140], [150, 150, 190, 190]], float),
                          np.array([0, 1, 1]), 200, 200, "a")]
    found = [Predicted(np.array([[10, 10, 60, 60], [100, 100, 140, 140], [0, 150, 30, 190]], float),
                       np.array([0.99, 0.3, 0.3]), np.array([0, 1, 1]))]
    above = operating_point(found, truths, CLASSES, 0.35)["per_class"]["RBC"]
    assert (above["tp"], above["fp"], above["fn"]) == (0, 0, 2) and above["precision"] is None
    assert above["f1"] == 0.0
    at = operating_point(found, truths, CLASSES, 0.3)["per_class"]["RBC"]
    assert at["f1"] == pytest.approx(0.5)
    assert choose_threshold(found, truths, CLASSES) <= 0.3
    # a class with neither boxes nor detections has no F1
    none = [GroundTruth(np.array([[10, 10, 60, 60]], float), np.array([0]), 200, 200, "b")]
    only_wbc = [Predicted(np.array([[10, 10, 60, 60]], float), np.array([0.9]), np.array([0]))]
    assert operating_point(only_wbc, none, CLASSES, 0.5)["per_class"]["RBC"]["f1"] is None


def test_the_threshold_chosen_is_the_one_that_drops_the_false_alarms() -> None:
    """True boxes scored 0.8-0.9, false alarms 0.2-0.4: the best mean F1 lies above 0.4, not at the lowest
    candidate (the other tests' `<= 0.2` would pass for a chooser that always returns it)."""
    truths = _truths()
    found = []
    for truth in truths:
        false = np.array([[150, 150, 170, 170], [0, 150, 20, 170]], float)
        found.append(Predicted(np.concatenate([truth.boxes, false]),
                               np.concatenate([np.linspace(0.9, 0.8, len(truth.labels)), [0.4, 0.2]]),
                               np.concatenate([truth.labels, [0, 1]])))
    chosen = choose_threshold(found, truths, CLASSES)
    assert 0.4 < chosen <= 0.8
    assert all(v["f1"] == 1.0 for v in operating_point(found, truths, CLASSES, chosen)["per_class"].values())


def _crowded_field(n: int = 214) -> tuple[list[GroundTruth], list[Predicted]]:
    """One large field with ``n`` red cells (more than COCO's 100 detections per image), all found."""
    boxes = np.array([[40.0 * (k % 20), 40.0 * (k // 20), 40.0 * (k % 20) + 30, 40.0 * (k // 20) + 30]
                      for k in range(n)])
    truth = GroundTruth(boxes, np.ones(n, int), 800, 800, "mosaic")
    return [truth], [Predicted(boxes.copy(), np.linspace(0.99, 0.6, n), np.ones(n, int))]


def test_a_field_with_more_than_100_cells_is_scored_on_all_its_detections(tmp_path: Path) -> None:
    """COCO's fixed 100 detections per image capped RBC recall at 100/214 on a large field: AP@0.5 0.47 for a
    detector that found every cell. The limit now follows the detections given."""
    truths, found = _crowded_field()
    metrics = coco_metrics(found, truths, CLASSES)
    assert metrics["max_detections"] == 214
    assert metrics["per_class"]["RBC"]["ap_50"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0) and metrics["map"] == pytest.approx(1.0)
    assert metrics["mar"] == pytest.approx(1.0)
    capped = coco_metrics(found, truths, CLASSES, max_detections=100)  # the old behaviour, on request
    assert capped["per_class"]["RBC"]["ap_50"] < 0.5
    stored = evaluate_detections(found, truths, CLASSES, tmp_path)
    assert stored["map_50"] == pytest.approx(1.0) and stored["max_detections_per_image"] == 214


def test_summary_means_agree_with_pycocotools_summarize() -> None:
    """mAP@[.5:.95], @0.5, @0.75 and mean recall are taken from COCOeval's arrays as its summarize takes them."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truths, found = _truths(), _perfect(_truths(), 6.0)
    found[1].scores[0] = 0.95  # an order that is not the truth's
    ours = coco_metrics(found, truths, CLASSES)
    gt = COCO()
    gt.dataset = {"images": [{"id": i + 1, "width": 200, "height": 200} for i in range(2)],
                  "categories": [{"id": 1, "name": "WBC"}, {"id": 2, "name": "RBC"}],
                  "annotations": [{"id": 10 * i + j + 1, "image_id": i + 1, "category_id": int(lab) + 1, "iscrowd": 0,
                                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                   "area": (b[2] - b[0]) * (b[3] - b[1])}
                                  for i, t in enumerate(truths) for j, (b, lab) in enumerate(zip(t.boxes, t.labels))]}
    gt.createIndex()
    dt = gt.loadRes([{"image_id": i + 1, "category_id": int(lab) + 1, "score": float(s),
                      "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                     for i, p in enumerate(found) for b, s, lab in zip(p.boxes, p.scores, p.labels)])
    reference = COCOeval(gt, dt, iouType="bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    assert ours["max_detections"] == 100
    assert [ours["map"], ours["map_50"], ours["map_75"], ours["mar"]] == pytest.approx(
        [reference.stats[k] for k in (0, 1, 2, 8)])
    assert 0 < ours["map"] < 1


def test_count_figure_draws_exact_counts_on_the_diagonal_and_none_below_zero(tmp_path: Path, monkeypatch) -> None:
    """Both axes were jittered: six exact WBC counts of 1 scattered round (1, 1), an exact 0 drawn at -0.1, and
    fractional ticks; the markers are now at the counts, sized by how many images share them."""
    from leukoscope.evaluation import detection

    drawn: list[dict] = []
    real = detection.save_figure

    def keep(fig, path):
        axes = [ax for ax in fig.axes]
        drawn.append({"offsets": [ax.collections[0].get_offsets().tolist() for ax in axes],
                      "sizes": [ax.collections[0].get_sizes().tolist() for ax in axes],
                      "texts": [[t.get_text() for t in ax.texts] for ax in axes],
                      "yticks": [[float(v) for v in ax.get_yticks() if ax.get_ylim()[0] <= v <= ax.get_ylim()[1]]
                                 for ax in axes],
                      "suptitle": fig._suptitle.get_text() if fig._suptitle else ""})
        return real(fig, path)

    monkeypatch.setattr(detection, "save_figure", keep)
    rows = [{"true_WBC": 1, "pred_WBC": 1, "true_RBC": 0, "pred_RBC": 0} for _ in range(5)]
    rows.append({"true_WBC": 1, "pred_WBC": 1, "true_RBC": 3, "pred_RBC": 2})
    operating = {"per_image_counts": rows, "per_class": {"WBC": {"count_exact": 1.0}, "RBC": {"count_exact": 5 / 6}}}
    detection.count_figure(operating, CLASSES, tmp_path / "counts.png")
    out = drawn[-1]
    assert out["offsets"][0] == [[1.0, 1.0]] and out["texts"][0] == ["6"]  # six exact counts: one marker, on the line
    assert out["offsets"][1] == [[0.0, 0.0], [3.0, 2.0]] and out["texts"][1] == ["5"]
    assert out["sizes"][1][0] == 5 * out["sizes"][1][1]  # area by multiplicity
    assert all(min(xy) >= 0 for panel in out["offsets"] for xy in panel)
    assert all(v == int(v) for panel in out["yticks"] for v in panel)
    assert "6 images" in out["suptitle"] and "how many images" in out["suptitle"]


def test_examples_label_readably_and_leave_crowded_classes_unlabelled(tmp_path: Path, monkeypatch) -> None:
    """5 pt labels, one per box: a field's dozen overlapping RBC labels were unreadable and covered the WBC's."""
    from leukoscope.evaluation import detection

    drawn: list[dict] = []
    real = detection.save_figure

    def keep(fig, path):
        ax = fig.axes[0]
        drawn.append({"texts": [(t.get_text(), t.get_fontsize()) for t in ax.texts], "title": ax.get_title()})
        return real(fig, path)

    monkeypatch.setattr(detection, "save_figure", keep)
    rbc = [[10 + 15 * i, 100, 22 + 15 * i, 112] for i in range(10)]
    boxes = np.array([[20, 20, 80, 80], *rbc], float)
    labels = np.array([0] + [1] * 10)
    pred = Predicted(boxes, np.full(11, 0.9), labels)
    truth = GroundTruth(boxes, labels, 200, 200, "field")
    detection.examples_figure([np.zeros((200, 200, 3), np.uint8)], [pred], [truth], CLASSES, 0.5, tmp_path / "e.png")
    out = drawn[-1]
    assert out["texts"] == [("WBC 0.90", detection.EXAMPLE_LABEL_SIZE)] and detection.EXAMPLE_LABEL_SIZE >= 7
    assert out["title"] == "field\nunlabelled: RBC x10"
