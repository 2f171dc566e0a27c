"""Probability calibration: softmax, expected calibration error, temperature scaling.

A screening model that says "blast, 99 %" must be right about 99 % of the time
at that confidence, otherwise staff learn to ignore (or over-trust) the number.
Temperature scaling (Guo et al., 2017) divides the logits by one scalar ``T``
fitted on validation data; it changes confidences but never the predicted class.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

#: Search range for the temperature. Outside it the fit is almost always a
#: symptom of a degenerate validation set (perfectly separated, or tiny).
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)

#: Tolerance on row sums when checking that an array holds probabilities
#: (float32 softmax over many classes drifts by ~1e-6; logits are far off).
_ROW_SUM_ATOL = 1e-3


# --------------------------------------------------------------------------- validation
def check_labels(y_true: np.ndarray, n_classes: int, n_samples: int | None = None) -> np.ndarray:
    """Return ``y_true`` as a 1-D int64 array of class indices in ``[0, n_classes)``.

    Float arrays holding whole numbers are accepted (labels often round-trip
    through pandas/JSON as floats); anything else non-integer is an error.
    """
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D class indices, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("y_true must hold whole-number class indices")
    elif y.dtype.kind not in "iub":
        raise TypeError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if n_samples is not None and y.shape[0] != n_samples:
        raise ValueError(f"y_true has {y.shape[0]} labels but there are {n_samples} predictions")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y_true holds labels outside [0, {n_classes}): min {y.min()}, max {y.max()}")
    return y


def check_logits(logits: np.ndarray) -> np.ndarray:
    """Return ``logits`` as a finite 2-D float64 array of shape (n_samples, n_classes)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must have shape (n_samples, n_classes>=2), got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    return z


def check_probs(probs: np.ndarray) -> np.ndarray:
    """Return ``probs`` as a 2-D float64 array whose rows are probability vectors.

    Catches the common mistake of passing raw logits where probabilities belong.
    """
    p = check_logits(probs)
    if p.size and (p.min() < -1e-6 or p.max() > 1 + 1e-6):
        raise ValueError("probs must lie in [0, 1]; pass softmax(logits), not raw logits")
    if p.size and not np.allclose(p.sum(axis=1), 1.0, atol=_ROW_SUM_ATOL):
        raise ValueError("each row of probs must sum to 1; pass softmax(logits), not raw logits")
    return p


# --------------------------------------------------------------------------- softmax / NLL
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable)."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    z = z - z.max(axis=-1, keepdims=True)  # shift so exp() cannot overflow
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL (cross-entropy, nats) of ``softmax(logits / temperature)``."""
    z = check_logits(logits)
    y = check_labels(y_true, z.shape[1], z.shape[0])
    if y.size == 0:
        raise ValueError("cannot compute NLL of an empty set")
    return _nll(z, y, temperature)


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    scaled = z / temperature
    log_norm = logsumexp(scaled, axis=1)
    return float(np.mean(log_norm - scaled[np.arange(y.size), y]))


# --------------------------------------------------------------------------- ECE
@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of top-label confidence; empty bins hold ``count == 0``."""

    edges: np.ndarray  # (n_bins + 1,)
    count: np.ndarray  # (n_bins,) samples per bin
    confidence: np.ndarray  # (n_bins,) mean confidence, NaN where empty
    accuracy: np.ndarray  # (n_bins,) fraction correct, NaN where empty


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> ReliabilityBins:
    """Bin samples by top-label confidence into ``n_bins`` equal-width bins over [0, 1].

    Bins are right-closed, ``(lo, hi]`` (the first also takes 0), so a confidence
    of exactly 1.0 falls in the last bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = check_probs(probs)
    y = check_labels(y_true, p.shape[1], p.shape[0])
    if y.size == 0:
        raise ValueError("cannot bin an empty set")
    conf = np.clip(p.max(axis=1), 0.0, 1.0)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ReliabilityBins(
            edges=np.linspace(0.0, 1.0, n_bins + 1),
            count=count,
            confidence=np.where(count > 0, conf_sum / count, np.nan),
            accuracy=np.where(count > 0, acc_sum / count, np.nan),
        )


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: ``sum_b (n_b / n) * |accuracy_b - confidence_b|`` over equal-width bins."""
    bins = reliability_bins(probs, y_true, n_bins)
    filled = bins.count > 0
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(bins.count[filled] * gaps) / bins.count.sum())


# --------------------------------------------------------------------------- temperature
def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` on validation data.

    The NLL is convex in ``1/T``, hence unimodal in ``log T``, so a bounded 1-D
    Brent search over ``log T`` finds the global optimum without gradients or
    step-size tuning. Tiny or perfectly separated sets push ``T`` towards 0 or
    infinity: when the optimum lies on :data:`TEMPERATURE_BOUNDS` the fit is
    uninformative and 1.0 is returned (with a warning), as it is when scaling does
    not lower the NLL (e.g. all logits equal).
    """
    fit = temperature_fit(logits, y_true)
    if fit.at_bound:
        warnings.warn(
            f"temperature fit hit the search bound {TEMPERATURE_BOUNDS} on {np.asarray(y_true).size} validation "
            "samples (set too small or perfectly separated); keeping temperature 1.0",
            UserWarning,
            stacklevel=2,
        )
    return fit.temperature


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    at_bound: bool = False
    """The optimum sat on :data:`TEMPERATURE_BOUNDS` (no information), so ``temperature`` is 1.0."""


def temperature_fit(logits: np.ndarray, y_true: np.ndarray) -> TemperatureFit:
    """:func:`fit_temperature` without its warning, saying whether the fit hit a bound:
    for callers that report it themselves (the evaluation report notes it, where a
    warning printed with a source path only puzzles the user of a small run)."""
    z = check_logits(logits)
    y = check_labels(y_true, z.shape[1], z.shape[0])
    if y.size == 0:
        raise ValueError("cannot fit a temperature on an empty validation set")
    lo, hi = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: _nll(z, y, float(np.exp(log_t))),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-6},
    )
    # Brent stops early on the flat plateau of a separated set; the bounds themselves
    # are candidates so such sets land exactly on the limit (and get the warning).
    candidates = [float(np.exp(result.x)), *TEMPERATURE_BOUNDS]
    temperature = min(candidates, key=lambda t: _nll(z, y, t))
    if not _nll(z, y, temperature) < _nll(z, y, 1.0) - 1e-12:
        return TemperatureFit(1.0)
    if min(abs(np.log(temperature) - lo), abs(np.log(temperature) - hi)) < 1e-3:
        # A fit stuck at a bound says "no information" (a perfectly separated or
        # tiny set), not "sharpen 20x": keep the model's own confidences.
        return TemperatureFit(1.0, at_bound=True)
    return TemperatureFit(temperature)
