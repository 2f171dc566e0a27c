"""Calibration: softmax, ECE on hand-built bins, temperature scaling recovery."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leukoscope.evaluation import (
    TEMPERATURE_BOUNDS,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    softmax,
)


def calibrated_logits(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax *is* the true label distribution (labels are drawn from it)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, n_classes))
    probs = softmax(logits)
    labels = np.array([rng.choice(n_classes, p=row) for row in probs])
    return logits, labels


# --------------------------------------------------------------------------- softmax
def test_softmax_matches_hand_values_and_temperature_divides_logits() -> None:
    np.testing.assert_allclose(softmax(np.array([[0.0, math.log(3.0)]])), [[0.25, 0.75]])
    # halving the logits by T=2 gives the same as the original un-doubled logits
    np.testing.assert_allclose(softmax(np.array([[0.0, 2 * math.log(3.0)]]), temperature=2.0), [[0.25, 0.75]])


def test_softmax_is_stable_for_huge_logits() -> None:
    out = softmax(np.array([[1000.0, 0.0, -1000.0]]))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.0]], atol=1e-12)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_softmax_rejects_invalid_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        softmax(np.zeros((1, 3)), temperature=temperature)


# --------------------------------------------------------------------------- ECE
def test_ece_equals_hand_computed_value() -> None:
    # two samples at confidence 0.9 (one right, one wrong): |0.5 - 0.9| = 0.4, weight 1/2
    # two samples at confidence 0.6 (both right):            |1.0 - 0.6| = 0.4, weight 1/2
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.4)


def test_ece_bin_width_matters_when_confidences_share_a_bin() -> None:
    # with one bin, over- and under-confidence cancel: mean conf 0.75, accuracy 0.75
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(probs, y, n_bins=1) == pytest.approx(0.0, abs=1e-12)


def test_ece_is_small_for_perfect_confident_predictions() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    probs = np.full((6, 3), 0.0005)
    probs[np.arange(6), y] = 0.999
    assert expected_calibration_error(probs, y) == pytest.approx(0.001, abs=1e-9)


def test_reliability_bins_put_confidence_one_in_last_bin_and_count_everything() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.1, 0.9]])
    bins = reliability_bins(probs, np.array([0, 0, 1]), n_bins=5)
    assert bins.count.tolist() == [0, 0, 1, 0, 2]  # 0.5 -> (0.4, 0.6]; 0.9 and 1.0 -> (0.8, 1.0]
    assert bins.accuracy[4] == pytest.approx(1.0)
    assert bins.confidence[4] == pytest.approx(0.95)
    assert np.isnan(bins.accuracy[0])


def test_ece_rejects_logits_passed_as_probabilities() -> None:
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error(np.array([[2.0, -1.0], [0.5, 3.0]]), np.array([0, 1]))


def test_ece_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="outside"):
        expected_calibration_error(np.array([[0.5, 0.5]]), np.array([2]))


# --------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_fit_temperature_recovers_the_scale_of_mis_calibrated_logits(scale: float) -> None:
    logits, y = calibrated_logits(3000, 4, seed=0)
    temperature = fit_temperature(logits * scale, y)
    assert temperature == pytest.approx(scale, rel=0.12)


def test_temperature_fitted_on_validation_lowers_test_ece_of_overconfident_model() -> None:
    val_logits, val_y = calibrated_logits(1500, 4, seed=1)
    test_logits, test_y = calibrated_logits(1500, 4, seed=2)
    overconfident_val, overconfident_test = val_logits * 3.0, test_logits * 3.0
    temperature = fit_temperature(overconfident_val, val_y)
    assert temperature > 1.0
    before = expected_calibration_error(softmax(overconfident_test), test_y)
    after = expected_calibration_error(softmax(overconfident_test, temperature), test_y)
    assert after < before / 2
    # temperature scaling never changes the predicted class
    assert np.array_equal(softmax(overconfident_test, temperature).argmax(1), overconfident_test.argmax(1))


def test_fitted_temperature_is_a_minimum_of_the_nll() -> None:
    logits, y = calibrated_logits(400, 3, seed=3)
    logits = logits * 2.0
    t = fit_temperature(logits, y)
    best = negative_log_likelihood(logits, y, t)
    assert best <= negative_log_likelihood(logits, y, t * 1.05)
    assert best <= negative_log_likelihood(logits, y, t / 1.05)
    assert best < negative_log_likelihood(logits, y, 1.0)


def test_fit_temperature_on_a_separated_set_keeps_temperature_one_and_warns() -> None:
    with pytest.warns(UserWarning, match="search bound"):
        t = fit_temperature(np.array([[2.0, 0.0, -1.0]]), np.array([0]))
    assert t == 1.0  # the NLL optimum sits on the bound: uninformative


def test_fit_temperature_on_tiny_mixed_set_is_finite_and_positive() -> None:
    logits = np.array([[2.0, 0.0], [1.5, 0.0], [0.0, 1.0]])
    t = fit_temperature(logits, np.array([0, 1, 1]))
    assert math.isfinite(t) and TEMPERATURE_BOUNDS[0] < t < TEMPERATURE_BOUNDS[1]


def test_fit_temperature_returns_one_when_logits_carry_no_information() -> None:
    assert fit_temperature(np.zeros((5, 3)), np.array([0, 1, 2, 0, 1])) == 1.0


def test_fit_temperature_rejects_empty_validation_set() -> None:
    with pytest.raises(ValueError, match="empty"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_a_bundle_records_the_ece_of_the_probabilities_it_gives(tmp_path) -> None:
    """bundle.json's ``ece`` was the uncalibrated model's while the bundle divides by its fitted temperature."""
    from leukoscope.evaluation.evaluate import evaluate_logits, headline_metrics

    val_logits, val_y = calibrated_logits(600, 4, seed=1)
    test_logits, test_y = calibrated_logits(600, 4, seed=2)
    metrics = evaluate_logits(test_y, test_logits * 3.0, ["a", "b", "c", "d"], tmp_path, val_logits=val_logits * 3.0,
                              val_true=val_y)
    calibration = metrics["calibration"]
    assert calibration["ece_after"] < calibration["ece_before"] / 2
    assert headline_metrics(metrics)["ece"] == calibration["ece_after"]
    assert metrics["ece"] == calibration["ece_after"]  # the metrics are those of the probabilities it gives
    plain = evaluate_logits(test_y, test_logits, ["a", "b", "c", "d"], tmp_path / "plain")
    assert headline_metrics(plain)["ece"] == plain["ece"]  # nothing fitted: the model's own


def test_a_run_scores_what_evaluate_scores_of_its_bundle(tmp_path) -> None:
    """A temperature changes each class's ranking of the images: the run reported ROC-AUC 0.506 on the
    uncalibrated softmax where `leukoscope evaluate` of its bundle (which divides by the temperature) found 0.725
    on the same test images. The run's metrics are now those of the bundle's probabilities."""
    from leukoscope.evaluation.evaluate import evaluate_logits

    test_logits, test_y = calibrated_logits(300, 4, seed=3)
    val_logits, val_y = calibrated_logits(300, 4, seed=4)
    test_logits, val_logits = test_logits * 3.0, val_logits * 3.0  # overconfident: a temperature near 3
    run = evaluate_logits(test_y, test_logits, list("abcd"), tmp_path / "run", val_logits=val_logits, val_true=val_y)
    temperature = run["calibration"]["temperature"]
    assert abs(temperature - 1.0) > 0.5
    bundle = evaluate_logits(test_y, test_logits / temperature, list("abcd"), tmp_path / "evaluate")
    uncalibrated = evaluate_logits(test_y, test_logits, list("abcd"), tmp_path / "raw")
    assert run["roc_auc_macro_ovr"] == pytest.approx(bundle["roc_auc_macro_ovr"])
    assert uncalibrated["roc_auc_macro_ovr"] != pytest.approx(bundle["roc_auc_macro_ovr"])  # it does move
