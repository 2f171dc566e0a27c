"""Out-of-distribution scores: "this image is unlike anything the model was trained on".

A classifier answers every image with one of its classes, also a cell from another
stain, scanner or dataset, or no cell at all. Two scores (higher = less familiar):

- ``mahalanobis`` (Lee et al. 2018): the squared Mahalanobis distance of the
  penultimate-layer embedding (:func:`leukoscope.preprocessing.batched_outputs`) to
  the nearest class mean, with one covariance shared by the classes, shrunk by
  Ledoit-Wolf (embeddings have hundreds of dimensions and a few thousand training
  images: the plain sample covariance is singular or close to it). Fitted on the
  *training* split. The embedding is scaled to unit length first (``normalize``):
  its norm grows with contrast and stain intensity, and on pbc it drowned the
  direction that tells cells of other sources apart (bench/ood.py, MobileNetV3
  trained on pbc: AUROC against all-taleqani 0.84 -> 0.95, BCCD crops 0.86 -> 0.96;
  no worse for system A's CNN; docs/benchmarks.md).
- ``energy`` (Liu et al. 2020): ``-logsumexp(logits)`` of the uncalibrated logits;
  cheap (no statistics), but meaningless for a classical model whose logits are
  log-probabilities (it is then always 0), so those get Mahalanobis only.

The threshold of each is the ``quantile`` (0.95) of the scores of the *validation*
split: 5% of new in-distribution images are flagged by construction.
:class:`OodStats` holds the statistics and thresholds; the bundle stores them as
``ood.safetensors`` plus an ``ood`` entry in ``bundle.json`` (:func:`OodStats.to_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import logsumexp

METHODS: tuple[str, ...] = ("mahalanobis", "energy")
#: The method the flag uses; chosen by measuring (bench/ood.py, docs/benchmarks.md).
DEFAULT_METHOD = "mahalanobis"
#: Share of validation (in-distribution) images scored at or below the threshold.
DEFAULT_QUANTILE = 0.95


def energy_scores(logits: np.ndarray) -> np.ndarray:
    """``-logsumexp(logits)`` per row: low for inputs the model answers with large logits."""
    return -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


def fit_class_gaussians(embeddings: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Class means ``(C, d)`` of the classes present in ``targets``, the precision ``(d, d)`` of
    their shared, Ledoit-Wolf-shrunk covariance, and the shrinkage it chose."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(targets)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need at least 2 embeddings with one target each, got {x.shape} and {len(y)} targets")
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    estimator = LedoitWolf(assume_centered=True).fit(centred)
    return means, estimator.precision_, float(estimator.shrinkage_)


def unit_length(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mahalanobis_scores(embeddings: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each embedding to its nearest class mean."""
    x = np.asarray(embeddings, dtype=np.float64)
    m = np.asarray(means, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    if x.shape[1:] != (p.shape[0],):
        raise ValueError(f"embeddings of {x.shape[1:]} dimensions, statistics of {p.shape[0]}")
    z = x @ p
    # |x - m|^2_P = x'Px - 2 x'Pm + m'Pm for every class at once, without an N x C x d array.
    distances = (z * x).sum(1)[:, None] - 2 * z @ m.T + ((m @ p) * m).sum(1)[None, :]
    return np.maximum(distances.min(axis=1), 0.0)


@dataclass
class OodStats:
    """What scoring needs: the method, its threshold(s) and the class Gaussians (Mahalanobis)."""

    method: str = DEFAULT_METHOD
    thresholds: dict[str, float] = field(default_factory=dict)
    """Per method: scores above it are unfamiliar."""
    means: np.ndarray | None = None
    precision: np.ndarray | None = None
    quantile: float = DEFAULT_QUANTILE
    details: dict[str, Any] = field(default_factory=dict)
    """How it was fitted (images, dimensions, shrinkage, where the threshold came from, ...)."""
    normalize: bool = True
    """Mahalanobis on unit-length embeddings (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.method not in self.thresholds:
            raise ValueError(f"OOD method {self.method!r} has no threshold (have {sorted(self.thresholds)})")
        if "mahalanobis" in self.thresholds and (self.means is None or self.precision is None):
            raise ValueError("Mahalanobis scoring needs class means and a precision matrix")

    @property
    def threshold(self) -> float:
        return float(self.thresholds[self.method])

    @property
    def needs_embeddings(self) -> bool:
        return self.method == "mahalanobis"

    def scores(self, logits: np.ndarray, embeddings: np.ndarray | None = None,
               method: str | None = None) -> np.ndarray:
        """Scores of uncalibrated ``logits`` (and ``embeddings`` for Mahalanobis): higher = less familiar."""
        method = method or self.method
        if method == "energy":
            return energy_scores(logits)
        if method != "mahalanobis":
            raise ValueError(f"unknown OOD method {method!r} (expected one of {METHODS})")
        if embeddings is None:
            raise ValueError("Mahalanobis scoring needs the penultimate embeddings")
        return mahalanobis_scores(unit_length(embeddings) if self.normalize else embeddings, self.means,
                                  self.precision)

    def unfamiliar(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def with_method(self, method: str) -> "OodStats":
        return OodStats(method, dict(self.thresholds), self.means, self.precision, self.quantile, dict(self.details),
                        self.normalize)

    # ---------------------------------------------------------------- storage
    def to_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(the small JSON entry, the arrays) as the bundle stores them; float32 keeps the file half size."""
        entry = {"method": self.method, "thresholds": {k: float(v) for k, v in self.thresholds.items()},
                 "quantile": float(self.quantile), "normalize": self.normalize, **self.details}
        arrays = {} if self.means is None else {"means": self.means.astype(np.float32),
                                                "precision": self.precision.astype(np.float32)}
        return entry, arrays

    @classmethod
    def from_parts(cls, entry: dict[str, Any], arrays: dict[str, np.ndarray]) -> "OodStats":
        details = {k: v for k, v in entry.items() if k not in ("method", "thresholds", "quantile", "normalize")}
        return cls(entry["method"], {k: float(v) for k, v in entry["thresholds"].items()}, arrays.get("means"),
                   arrays.get("precision"), float(entry.get("quantile", DEFAULT_QUANTILE)), details,
                   bool(entry.get("normalize", True)))


def calibrate_ood(train_embeddings: np.ndarray, train_targets: np.ndarray, held_logits: np.ndarray,
                  held_embeddings: np.ndarray, *, method: str = DEFAULT_METHOD, quantile: float = DEFAULT_QUANTILE,
                  energy: bool = True, threshold_from: str = "val", normalize: bool = True) -> OodStats:
    """Fit the class Gaussians on training embeddings and set each method's threshold at
    ``quantile`` of the held-out (validation) scores. ``energy=False`` for classical models
    (their logits are log-probabilities, whose energy is always 0); ``normalize=False``:
    Mahalanobis on the raw embeddings (as Lee et al.)."""
    if method not in METHODS:
        raise ValueError(f"unknown OOD method {method!r} (expected one of {METHODS})")
    if method == "energy" and not energy:
        raise ValueError("the energy score needs real logits; this model gives log-probabilities")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    if len(held_logits) == 0:
        raise ValueError("no held-out images to set the OOD threshold on")
    prepare = unit_length if normalize else (lambda x: np.asarray(x, dtype=np.float64))
    means, precision, shrinkage = fit_class_gaussians(prepare(train_embeddings), train_targets)
    held = {"mahalanobis": mahalanobis_scores(prepare(held_embeddings), means, precision)}
    if energy:
        held["energy"] = energy_scores(held_logits)
    thresholds = {name: float(np.quantile(values, quantile)) for name, values in held.items()}
    details = {"fit_images": int(len(train_targets)), "threshold_images": int(len(held_logits)),
               "threshold_from": threshold_from, "dimensions": int(means.shape[1]), "shrinkage": round(shrinkage, 6)}
    return OodStats(method, thresholds, means, precision, quantile, details, normalize)


def ood_auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling ``out_scores`` (positives) from ``in_scores`` by score: 0.5 is chance."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[np.asarray(in_scores, float), np.asarray(out_scores, float)]))
