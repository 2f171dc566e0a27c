"""classification_metrics on small arrays whose answers can be counted by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leukoscope.evaluation import classification_metrics, specificity_per_class, top_confusions
from leukoscope.evaluation.metrics import called_absent_note

CLASSES = ["a", "b", "c"]
# true:  a a a | b b | c c c c
# pred:  a a b | b c | c c c a
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0])


def one_hot_probs(pred: np.ndarray, n_classes: int, confidence: float = 0.8) -> np.ndarray:
    """Probabilities whose arg-max is ``pred``; the rest of the mass is spread evenly."""
    probs = np.full((pred.size, n_classes), (1.0 - confidence) / (n_classes - 1))
    probs[np.arange(pred.size), pred] = confidence
    return probs


@pytest.fixture(scope="module")
def hand() -> dict:
    return classification_metrics(Y_TRUE, one_hot_probs(Y_PRED, 3), CLASSES)


def test_confusion_matrix_counted_by_hand(hand: dict) -> None:
    assert hand["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert hand["n"] == 9
    assert hand["accuracy"] == pytest.approx(6 / 9)


def test_normalized_confusion_matrix_rows_are_recall(hand: dict) -> None:
    expected = [[2 / 3, 1 / 3, 0], [0, 1 / 2, 1 / 2], [1 / 4, 0, 3 / 4]]
    np.testing.assert_allclose(hand["confusion_matrix_normalized"], expected)


def test_per_class_precision_recall_specificity_by_hand(hand: dict) -> None:
    a, b, c = (hand["per_class"][k] for k in CLASSES)
    # precision = column diagonal / column sum; recall = row diagonal / row sum
    assert (a["precision"], a["recall"]) == pytest.approx((2 / 3, 2 / 3))
    assert (b["precision"], b["recall"]) == pytest.approx((1 / 2, 1 / 2))
    assert (c["precision"], c["recall"]) == pytest.approx((3 / 4, 3 / 4))
    # specificity = TN / (TN + FP): a has 6 negatives, 1 of them (a c) called a
    assert a["specificity"] == pytest.approx(5 / 6)
    assert b["specificity"] == pytest.approx(6 / 7)
    assert c["specificity"] == pytest.approx(4 / 5)
    assert [a["support"], b["support"], c["support"]] == [3, 2, 4]
    assert c["f1"] == pytest.approx(3 / 4)


def test_macro_and_weighted_averages_by_hand(hand: dict) -> None:
    assert hand["macro"]["f1"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert hand["macro"]["specificity"] == pytest.approx((5 / 6 + 6 / 7 + 4 / 5) / 3)
    assert hand["weighted"]["recall"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2 + 4 * 3 / 4) / 9)
    assert hand["weighted"]["specificity"] == pytest.approx((3 * 5 / 6 + 2 * 6 / 7 + 4 * 4 / 5) / 9)


def test_top_confusions_sorted_by_count_then_class_order(hand: dict) -> None:
    pairs = [(item["true"], item["predicted"], item["count"]) for item in hand["top_confusions"]]
    assert pairs == [("a", "b", 1), ("b", "c", 1), ("c", "a", 1)]
    assert hand["top_confusions"][2]["rate"] == pytest.approx(1 / 4)


def test_top_confusions_puts_largest_cell_first() -> None:
    cm = np.array([[5, 1, 0], [0, 4, 3], [2, 0, 6]])
    assert [(t["true"], t["predicted"]) for t in top_confusions(cm, CLASSES, k=2)] == [("b", "c"), ("c", "a")]


def test_result_is_strict_json(hand: dict) -> None:
    text = json.dumps(hand, allow_nan=False)
    assert json.loads(text) == hand


def test_binary_roc_auc_by_hand() -> None:
    # positives score 0.35 and 0.8; negatives 0.1 and 0.4: 3 of the 4 pairs ranked right
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    out = classification_metrics(np.array([0, 0, 1, 1]), np.column_stack([1 - p1, p1]), ["normal", "blast"])
    assert out["per_class"]["blast"]["roc_auc"] == pytest.approx(0.75)
    assert out["per_class"]["normal"]["roc_auc"] == pytest.approx(0.75)
    assert out["roc_auc_macro_ovr"] == pytest.approx(0.75)
    assert out["confusion_matrix"] == [[2, 0], [1, 1]]  # 0.35 < 0.5 -> called normal


def test_perfect_confident_predictions() -> None:
    y = np.array([0, 1, 2, 3, 3, 2, 1, 0])
    out = classification_metrics(y, one_hot_probs(y, 4, confidence=0.997), ["w", "x", "y", "z"])
    assert out["accuracy"] == 1.0
    assert out["macro"]["f1"] == 1.0 and out["weighted"]["f1"] == 1.0
    assert all(stats["specificity"] == 1.0 and stats["roc_auc"] == 1.0 for stats in out["per_class"].values())
    assert out["ece"] == pytest.approx(0.003, abs=1e-9)
    assert out["top_confusions"] == []


def test_class_absent_from_y_true_keeps_its_row_and_gets_no_auc() -> None:
    y = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 2, 1, 1, 0])  # one "a" is called "c", a class with no true members
    out = classification_metrics(y, one_hot_probs(pred, 3), CLASSES)
    assert out["confusion_matrix"] == [[1, 0, 1], [1, 2, 0], [0, 0, 0]]
    assert out["confusion_matrix_normalized"][2] == [0.0, 0.0, 0.0]
    assert out["absent_classes"] == ["c"]
    c = out["per_class"]["c"]
    assert c["roc_auc"] is None and c["support"] == 0 and c["precision"] == 0.0  # called once, wrongly: a real 0
    assert c["specificity"] == pytest.approx(4 / 5)
    assert out["per_class"]["a"]["roc_auc"] is not None
    # macro averages skip the absent class instead of counting its undefined recall as 0
    assert out["macro"]["recall"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["roc_auc_macro_ovr"] == pytest.approx(
        (out["per_class"]["a"]["roc_auc"] + out["per_class"]["b"]["roc_auc"]) / 2
    )
    json.dumps(out, allow_nan=False)
    # the image called "c" is a wrong call no average sees (macro precision 0.70 beside accuracy 0.18): said
    assert out["called_absent"] == {"c": 1}
    note = called_absent_note(out)
    assert note.startswith("1 of 5 images (20%) were called a class with no images in this set (c 1)")
    assert called_absent_note(classification_metrics(y, one_hot_probs(np.array([0, 0, 1, 1, 1]), 3), CLASSES)) is None


def test_single_class_present_has_no_auc_and_no_specificity() -> None:
    y = np.array([1, 1, 1])
    out = classification_metrics(y, one_hot_probs(np.array([1, 0, 1]), 2), ["normal", "blast"])
    assert out["roc_auc_macro_ovr"] is None
    assert out["per_class"]["blast"]["specificity"] is None  # no negatives at all
    assert out["per_class"]["normal"]["specificity"] == pytest.approx(2 / 3)
    assert out["macro"]["specificity"] is None
    json.dumps(out, allow_nan=False)


def test_specificity_per_class_from_matrix() -> None:
    # class 0: 6 negatives (row 1), 2 of them called 0; class 1: 4 negatives, 1 called 1
    assert specificity_per_class(np.array([[3, 1], [2, 4]])) == pytest.approx([4 / 6, 3 / 4])


@pytest.mark.parametrize(
    ("y", "probs", "classes", "message"),
    [
        (np.array([0, 1]), np.array([[3.0, -1.0], [0.0, 2.0]]), ["a", "b"], "softmax"),
        (np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "b", "c"], "class names"),
        (np.array([0, 2]), np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "b"], "outside"),
        (np.array([0]), np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "b"], "labels but"),
        (np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "a"], "unique"),
    ],
)
def test_invalid_inputs_are_rejected_with_a_reason(
    y: np.ndarray, probs: np.ndarray, classes: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(y, probs, classes)


def test_string_labels_are_rejected() -> None:
    with pytest.raises(TypeError, match="integer"):
        classification_metrics(np.array(["a", "b"]), np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "b"])


def test_the_macro_f1_epochs_are_chosen_on_is_the_reports() -> None:
    """Training's history took sklearn's macro (a class only predicted counted at F1 0), the report's leaves
    classes absent from the truth out: the epoch was chosen on another number than the one reported."""
    import numpy as np

    from leukoscope.engine.trainer import score_logits
    from leukoscope.evaluation.metrics import classification_metrics, macro_f1

    y = np.array([0, 0, 1, 1, 1])
    predicted = np.array([0, 2, 1, 1, 0])  # class 2: predicted once, never true
    probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
    report = classification_metrics(y, probs, ["a", "b", "c"])["macro"]["f1"]
    assert macro_f1(y, predicted) == pytest.approx(report)
    import torch

    logits = np.log(probs)
    assert score_logits(logits, list(y), torch.nn.CrossEntropyLoss())["macro_f1"] == pytest.approx(report)


def test_undefined_per_class_values_are_null_not_zero() -> None:
    """metrics.json said "recall": 0.0 for a class with no images ("misses every blast") and "precision": 0.0 for a
    class never predicted, where the report showed n/a; the macro averaged those zeros without saying so."""
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 0, 0])  # b and c never predicted; d never true nor predicted
    out = classification_metrics(y, one_hot_probs(pred, 4), ["a", "b", "c", "d"])
    b, d = out["per_class"]["b"], out["per_class"]["d"]
    assert b["precision"] is None and b["recall"] == 0.0 and b["f1"] == 0.0  # both of its images were missed
    assert d["precision"] is None and d["recall"] is None and d["f1"] is None and d["roc_auc"] is None
    assert out["absent_classes"] == ["d"] and out["never_predicted_classes"] == ["b", "c"]
    # the averages: present classes only, a never-predicted precision counted as 0, and metrics.json says so
    assert out["macro"]["precision"] == pytest.approx((2 / 5 + 0 + 0) / 3)
    assert out["weighted"]["precision"] == pytest.approx((2 * 2 / 5) / 5)
    assert out["macro"]["recall"] == pytest.approx(1 / 3)
    assert "counts as 0" in out["average_convention"]
    assert json.loads(json.dumps(out, allow_nan=False))["per_class"]["d"]["recall"] is None


def test_per_class_values_agree_with_sklearn_where_defined(hand: dict) -> None:
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=[0, 1, 2])
    for k, name in enumerate(CLASSES):
        row = hand["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[k], recall[k], f1[k]))
        assert row["support"] == support[k]
