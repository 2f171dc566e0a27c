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
  no worse for system A's CNN; docs/benchmarks.md). For a model with embedding
  *stages* (:mod:`leukoscope.models.embedding`; the shipped MobileNetV2's) each stage's
  averaged output gets its own Gaussians and the standardised distances are summed: a
  trained head discards the stain and texture that tell another lab's cells apart, the
  early stages keep them (the shipped classifier, BCCD's cells: AUROC 0.86 -> 0.96).
- ``energy`` (Liu et al. 2020): ``-logsumexp(logits)`` of the uncalibrated logits;
  cheap (no statistics), but meaningless for a classical model whose logits are
  log-probabilities (it is then always 0), so those get Mahalanobis only.

The threshold of each is the ``quantile`` (0.95) of the scores of the *validation*
split: 5% of new in-distribution images are flagged by construction.
:class:`OodStats` holds the statistics and thresholds; the bundle stores them as
``ood.safetensors`` plus an ``ood`` entry in ``bundle.json`` (:func:`OodStats.to_parts`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
from scipy.special import logsumexp

log = logging.getLogger(__name__)

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


def split_parts(embeddings: np.ndarray, widths: Sequence[int]) -> list[np.ndarray]:
    """The columns of each part of an embedding whose parts are ``widths`` wide, in order."""
    return np.split(embeddings, np.cumsum(widths)[:-1], axis=1)


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
    """What scoring needs: the method, its threshold(s) and the class Gaussians (Mahalanobis) of
    each part of the embedding.

    With one part (the penultimate embedding) the Mahalanobis score is its distance to the
    nearest class mean. With several (``stages``: the model's stages, then the penultimate
    layer; :mod:`leukoscope.models.embedding`) each part has its own Gaussians, and the score is
    the sum of the parts' distances, each standardised by the mean and spread of its validation
    distances (``part_scales``), so that a part with more dimensions does not outweigh the others.
    """

    method: str = DEFAULT_METHOD
    thresholds: dict[str, float] = field(default_factory=dict)
    """Per method: scores above it are unfamiliar."""
    means: list[np.ndarray] = field(default_factory=list)
    """Per part of the embedding: the class means ``(C, d_k)``."""
    precisions: list[np.ndarray] = field(default_factory=list)
    """Per part: the shared precision ``(d_k, d_k)``."""
    quantile: float = DEFAULT_QUANTILE
    details: dict[str, Any] = field(default_factory=dict)
    """How it was fitted (images, dimensions, shrinkage, where the threshold came from, ...)."""
    normalize: bool = True
    """Mahalanobis on unit-length embeddings (see the module docstring); each part on its own."""
    stages: tuple[str, ...] = ()
    """The model's stages whose parts come before the penultimate one (empty: that one alone)."""
    part_scales: list[tuple[float, float]] = field(default_factory=list)
    """Per part, with several: (mean, standard deviation) of its validation distances."""

    def __post_init__(self) -> None:
        if self.method not in self.thresholds:
            raise ValueError(f"OOD method {self.method!r} has no threshold (have {sorted(self.thresholds)})")
        if "mahalanobis" in self.thresholds and (not self.means or len(self.means) != len(self.precisions)):
            raise ValueError("Mahalanobis scoring needs class means and a precision matrix for each part")
        if self.means and len(self.means) != len(self.stages) + 1:
            raise ValueError(f"{len(self.means)} parts of class Gaussians for {len(self.stages)} stages and the "
                             f"penultimate layer")
        if len(self.means) > 1 and len(self.part_scales) != len(self.means):
            raise ValueError("several parts need the scale of each part's distances")

    @property
    def threshold(self) -> float:
        return float(self.thresholds[self.method])

    @property
    def needs_embeddings(self) -> bool:
        return self.method == "mahalanobis"

    @property
    def widths(self) -> tuple[int, ...]:
        """The width of each part of the embedding these statistics read."""
        return tuple(int(m.shape[1]) for m in self.means)

    def part_distances(self, embeddings: np.ndarray) -> list[np.ndarray]:
        """Each part's squared Mahalanobis distance to its nearest class mean."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != sum(self.widths):
            stages = f" (stages {', '.join(self.stages)}, then the penultimate layer)" if self.stages else ""
            raise ValueError(f"embeddings of {x.shape[1:]} dimensions, statistics of {sum(self.widths)}{stages}: "
                             f"the model's embedding is not the one the statistics were fitted on")
        parts = split_parts(x, self.widths)
        prepare = unit_length if self.normalize else (lambda a: a)
        return [mahalanobis_scores(prepare(part), m, p) for part, m, p in zip(parts, self.means, self.precisions)]

    def scores(self, logits: np.ndarray, embeddings: np.ndarray | None = None,
               method: str | None = None) -> np.ndarray:
        """Scores of uncalibrated ``logits`` (and ``embeddings`` for Mahalanobis): higher = less familiar."""
        method = method or self.method
        if method == "energy":
            return energy_scores(logits)
        if method != "mahalanobis":
            raise ValueError(f"unknown OOD method {method!r} (expected one of {METHODS})")
        if embeddings is None:
            raise ValueError("Mahalanobis scoring needs the embeddings")
        distances = self.part_distances(embeddings)
        if len(distances) == 1:
            return distances[0]
        return sum((d - centre) / spread for d, (centre, spread) in zip(distances, self.part_scales))

    def unfamiliar(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def with_method(self, method: str) -> "OodStats":
        return replace(self, method=method, thresholds=dict(self.thresholds), details=dict(self.details))

    # ---------------------------------------------------------------- storage
    def to_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(the small JSON entry, the arrays) as the bundle stores them; float32 keeps the file half size.
        One part is stored as ``means`` and ``precision`` (as before stages existed), several as
        ``means.<k>`` and ``precision.<k>``."""
        entry = {"method": self.method, "thresholds": {k: float(v) for k, v in self.thresholds.items()},
                 "quantile": float(self.quantile), "normalize": self.normalize, **self.details}
        if self.stages:
            entry["stages"] = list(self.stages)
            entry["part_scales"] = [[float(c), float(s)] for c, s in self.part_scales]
        if len(self.means) == 1:
            return entry, {"means": self.means[0].astype(np.float32),
                           "precision": self.precisions[0].astype(np.float32)}
        arrays = {}
        for k, (m, p) in enumerate(zip(self.means, self.precisions)):
            arrays[f"means.{k}"], arrays[f"precision.{k}"] = m.astype(np.float32), p.astype(np.float32)
        return entry, arrays

    @classmethod
    def from_parts(cls, entry: dict[str, Any], arrays: dict[str, np.ndarray]) -> "OodStats":
        stored = ("method", "thresholds", "quantile", "normalize", "stages", "part_scales")
        details = {k: v for k, v in entry.items() if k not in stored}
        if "means" in arrays:
            means, precisions = [arrays["means"]], [arrays["precision"]]
        else:
            count = sum(1 for name in arrays if name.startswith("means."))
            means = [arrays[f"means.{k}"] for k in range(count)]
            precisions = [arrays[f"precision.{k}"] for k in range(count)]
        return cls(entry["method"], {k: float(v) for k, v in entry["thresholds"].items()}, means, precisions,
                   float(entry.get("quantile", DEFAULT_QUANTILE)), details, bool(entry.get("normalize", True)),
                   tuple(entry.get("stages", ())), [(float(c), float(s)) for c, s in entry.get("part_scales", [])])


def calibrate_ood(train_embeddings: np.ndarray, train_targets: np.ndarray, held_logits: np.ndarray,
                  held_embeddings: np.ndarray, *, method: str = DEFAULT_METHOD, quantile: float = DEFAULT_QUANTILE,
                  energy: bool = True, threshold_from: str = "val", normalize: bool = True,
                  widths: Sequence[int] | None = None, stages: Sequence[str] = ()) -> OodStats:
    """Fit the class Gaussians on training embeddings and set each method's threshold at
    ``quantile`` of the held-out (validation) scores. ``energy=False`` for classical models
    (their logits are log-probabilities, whose energy is always 0); ``normalize=False``:
    Mahalanobis on the raw embeddings (as Lee et al.). ``widths``: the embedding's parts, one per
    stage in ``stages`` and the penultimate one last (default: one part, the whole embedding)."""
    if method not in METHODS:
        raise ValueError(f"unknown OOD method {method!r} (expected one of {METHODS})")
    if method == "energy" and not energy:
        raise ValueError("the energy score needs real logits; this model gives log-probabilities")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    if len(held_logits) == 0:
        raise ValueError("no held-out images to set the OOD threshold on")
    train = np.asarray(train_embeddings, dtype=np.float64)
    widths = tuple(widths) if widths is not None else (train.shape[1],)
    if len(widths) != len(stages) + 1:
        raise ValueError(f"{len(widths)} embedding parts {widths} for {len(stages)} stages and the penultimate "
                         f"layer: one part each")
    if sum(widths) != train.shape[1]:
        raise ValueError(f"embedding parts {widths} do not make the embedding's {train.shape[1]} dimensions")
    prepare = unit_length if normalize else (lambda x: x)
    means, precisions, shrinkages = [], [], []
    for part in split_parts(train, widths):
        m, p, shrinkage = fit_class_gaussians(prepare(part), train_targets)
        # Rounded to the float32 the bundle stores, before the threshold and the part scales are
        # set: a loaded bundle then scores exactly as these statistics do (a nearly singular
        # covariance, e.g. few images, would otherwise move every score).
        means.append(m.astype(np.float32).astype(np.float64))
        precisions.append(p.astype(np.float32).astype(np.float64))
        shrinkages.append(shrinkage)
    held_parts = split_parts(np.asarray(held_embeddings, dtype=np.float64), widths)
    held_distances = [mahalanobis_scores(prepare(part), m, p) for part, m, p in zip(held_parts, means, precisions)]
    part_scales = ([(float(d.mean()), float(max(d.std(), 1e-12))) for d in held_distances]
                   if len(widths) > 1 else [])
    stats = OodStats(method, {"mahalanobis": 0.0, method: 0.0}, means, precisions, quantile, {}, normalize,
                     tuple(stages), part_scales)
    held = {"mahalanobis": stats.scores(held_logits, held_embeddings, "mahalanobis")}
    if energy:
        held["energy"] = energy_scores(held_logits)
    stats.thresholds = {name: float(np.quantile(values, quantile)) for name, values in held.items()}
    stats.details = {"fit_images": int(len(train_targets)), "threshold_images": int(len(held_logits)),
                     "threshold_from": threshold_from, "dimensions": int(train.shape[1]),
                     "shrinkage": (round(shrinkages[-1], 6) if len(shrinkages) == 1
                                   else [round(s, 6) for s in shrinkages])}
    flat = flat_parts(train, widths, train_targets, prepare)
    if flat:
        stats.details["flat_parts"] = flat
        log.warning("the embedding barely varies across the training images (part(s) %s of %d: within-class "
                    "variance under %g): distances there are rounding noise, so the OOD flag of this model is not "
                    "reliable; train longer or on more images", ", ".join(map(str, flat)), len(widths), FLAT_VARIANCE)
    return stats


#: Total within-class variance below which a (unit-length) part of the embedding carries nothing but
#: rounding noise: a network that barely trained gives every image the same direction (measured: a
#: MobileNetV2 after two epochs on 24 generated cells at 64 px, from 9e-6 at block 3 down to 2e-15 at
#: the penultimate part; the shipped classifier's parts, 0.13-0.40 as the trace of their covariance).
FLAT_VARIANCE = 1e-8


def flat_parts(embeddings: np.ndarray, widths: Sequence[int], targets: np.ndarray, prepare) -> list[int]:
    """The indices of the parts whose total within-class variance is below :data:`FLAT_VARIANCE`."""
    y = np.asarray(targets)
    flat = []
    for index, part in enumerate(split_parts(embeddings, widths)):
        x = prepare(part)
        centred = x - np.stack([x[y == c].mean(axis=0) for c in np.unique(y)])[np.searchsorted(np.unique(y), y)]
        if float((centred ** 2).sum(axis=1).mean()) < FLAT_VARIANCE:
            flat.append(index)
    return flat


def ood_auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling ``out_scores`` (positives) from ``in_scores`` by score: 0.5 is chance."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[np.asarray(in_scores, float), np.asarray(out_scores, float)]))
