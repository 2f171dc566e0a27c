"""Out-of-distribution scores: the arithmetic, the threshold, storage, and generated cells against
images that are clearly not cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis

from leukoscope.data.synthetic import SYNTHETIC_CLASSES, render_cell
from leukoscope.evaluation.ood import (OodStats, calibrate_ood, energy_scores, fit_class_gaussians,
                                       mahalanobis_scores, ood_auroc)
from leukoscope.models import create_model
from leukoscope.preprocessing import Preprocessing, batched_outputs


def _gaussian_classes(rng: np.random.Generator, n: int = 300, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 3, n)
    means = np.array([[0.0] * d, [4.0] * d, [-4.0] + [0.0] * (d - 1)])
    return means[y] + rng.normal(size=(n, d)) @ np.diag([1.0, 2.0, 0.5, 1.0, 1.0][:d]), y


def test_mahalanobis_is_the_distance_to_the_nearest_class_mean() -> None:
    rng = np.random.default_rng(0)
    x, y = _gaussian_classes(rng)
    means, precision, shrinkage = fit_class_gaussians(x, y)
    assert means.shape == (3, 5) and precision.shape == (5, 5) and 0.0 <= shrinkage <= 1.0
    points = rng.normal(size=(7, 5)) * 3
    expected = [min(mahalanobis(p, m, precision) ** 2 for m in means) for p in points]
    assert np.allclose(mahalanobis_scores(points, means, precision), expected)
    # the shared covariance is the within-class one (diag 1, 4, 0.25, 1, 1), not the spread of the means
    assert np.allclose(np.diag(np.linalg.inv(precision)), [1, 4, 0.25, 1, 1], rtol=0.35)
    with pytest.raises(ValueError, match="dimensions"):
        mahalanobis_scores(points[:, :4], means, precision)


def test_energy_is_minus_logsumexp() -> None:
    logits = np.array([[0.0, 0.0], [10.0, -10.0]])
    assert np.allclose(energy_scores(logits), [-np.log(2), -np.logaddexp(10, -10)])


def test_the_threshold_flags_the_chosen_share_of_held_out_images() -> None:
    rng = np.random.default_rng(1)
    x, y = _gaussian_classes(rng, 400)
    held, _ = _gaussian_classes(rng, 1000)
    logits = rng.normal(size=(1000, 3))
    stats = calibrate_ood(x, y, logits, held, quantile=0.95)
    assert set(stats.thresholds) == {"mahalanobis", "energy"} and stats.method == "mahalanobis"
    assert stats.unfamiliar(stats.scores(logits, held)).mean() == pytest.approx(0.05, abs=0.002)
    assert stats.with_method("energy").unfamiliar(energy_scores(logits)).mean() == pytest.approx(0.05, abs=0.002)
    assert stats.details["fit_images"] == 400 and stats.details["threshold_from"] == "val"
    classical = calibrate_ood(x, y, logits, held, energy=False)  # log-probabilities: no energy score
    assert set(classical.thresholds) == {"mahalanobis"}
    with pytest.raises(ValueError, match="log-probabilities"):
        calibrate_ood(x, y, logits, held, method="energy", energy=False)
    with pytest.raises(ValueError, match="embeddings"):
        stats.scores(logits)


def test_stats_round_trip_through_their_stored_parts() -> None:
    rng = np.random.default_rng(2)
    x, y = _gaussian_classes(rng)
    stats = calibrate_ood(x, y, rng.normal(size=(50, 3)), x[:50])
    entry, arrays = stats.to_parts()
    assert arrays["means"].dtype == np.float32 and arrays["precision"].shape == (5, 5)
    back = OodStats.from_parts(entry, arrays)
    assert back.method == stats.method and back.thresholds == stats.thresholds and back.details == stats.details
    assert np.allclose(back.scores(None, x), stats.scores(None, x), rtol=1e-4)
    energy_only = OodStats("energy", {"energy": -1.0})
    assert OodStats.from_parts(*energy_only.to_parts()).threshold == -1.0 and not energy_only.needs_embeddings
    with pytest.raises(ValueError, match="no threshold"):
        OodStats("mahalanobis", {"energy": 0.0})


def _cells(rng: np.random.Generator, n: int, size: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    labels = np.arange(n) % len(SYNTHETIC_CLASSES)
    images = np.stack([render_cell(SYNTHETIC_CLASSES[k], rng, size) for k in labels])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def test_generated_cells_score_lower_than_noise_and_inverted_colours() -> None:
    """Mahalanobis on the embedding of a small CNN (untrained: the features of any network
    tell smooth stained cells from noise) separates new generated cells from images that are
    not cells at all, and flags few of the new cells."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, preprocessing = create_model("abas_cnn", 4).eval(), Preprocessing(32)
    train, train_y = _cells(rng, 80)
    val, _ = _cells(rng, 20)
    test, _ = _cells(rng, 40)
    _, train_embeddings = batched_outputs(model, train, preprocessing)
    stats = calibrate_ood(train_embeddings, train_y, *batched_outputs(model, val, preprocessing))
    familiar = stats.scores(*batched_outputs(model, test, preprocessing))
    noise = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for strange in (noise, 255 - test):
        unlike = stats.scores(*batched_outputs(model, strange, preprocessing))
        assert ood_auroc(familiar, unlike) > 0.9
        assert stats.unfamiliar(unlike).mean() > 0.9
    assert stats.unfamiliar(familiar).mean() < 0.3


def test_mahalanobis_reads_the_direction_of_the_embedding_unless_told_otherwise() -> None:
    rng = np.random.default_rng(3)
    x, y = _gaussian_classes(rng)
    x = x + 10.0  # away from the origin, so that direction and length differ
    logits = rng.normal(size=(50, 3))
    stats = calibrate_ood(x, y, logits, x[:50])
    assert stats.normalize and stats.to_parts()[0]["normalize"] is True
    assert np.allclose(stats.scores(None, x[:20] * 7.0), stats.scores(None, x[:20]))  # length does not count
    raw = calibrate_ood(x, y, logits, x[:50], normalize=False)
    assert not np.allclose(raw.scores(None, x[:20] * 7.0), raw.scores(None, x[:20]))
    back = OodStats.from_parts(*raw.to_parts())
    assert not back.normalize and np.allclose(back.scores(None, x[:20]), raw.scores(None, x[:20]), rtol=1e-4)


def _two_part_embeddings(rng: np.random.Generator, n: int, early_shift: float = 0.0):
    """An embedding of two parts: an 'early stage' of 8 dimensions, then a 'penultimate' one of
    5 that holds the classes. ``early_shift`` moves the early part only (another lab's stain)."""
    penultimate, y = _gaussian_classes(rng, n)
    early = rng.normal(size=(n, 8)) + 3.0
    early[:, :4] += early_shift  # a change of direction: the parts are read at unit length
    early[:, 4:] -= early_shift
    return np.hstack([early, penultimate]), y


def test_a_shift_only_an_early_stage_sees_is_caught_by_the_parts_and_missed_by_the_penultimate_part() -> None:
    rng = np.random.default_rng(4)
    train, y = _two_part_embeddings(rng, 600)
    held, _ = _two_part_embeddings(rng, 300)
    familiar, _ = _two_part_embeddings(rng, 300)
    other_lab, _ = _two_part_embeddings(rng, 300, early_shift=2.0)
    logits = rng.normal(size=(300, 3))
    parts = calibrate_ood(train, y, logits, held, widths=(8, 5), stages=("features.3",))
    alone = calibrate_ood(train[:, 8:], y, logits, held[:, 8:])
    assert parts.widths == (8, 5) and parts.stages == ("features.3",) and len(parts.part_scales) == 2
    assert ood_auroc(parts.scores(None, familiar), parts.scores(None, other_lab)) > 0.9
    assert ood_auroc(alone.scores(None, familiar[:, 8:]), alone.scores(None, other_lab[:, 8:])) < 0.6
    assert parts.unfamiliar(parts.scores(None, familiar)).mean() < 0.12  # new in-distribution draws: about 5%
    # each part standardised by its validation distances: a wide part does not outweigh a narrow one
    for (centre, spread), distances in zip(parts.part_scales, parts.part_distances(held)):
        assert centre == pytest.approx(distances.mean()) and spread == pytest.approx(distances.std())


def test_stats_of_several_parts_round_trip_and_refuse_another_embedding() -> None:
    rng = np.random.default_rng(5)
    train, y = _two_part_embeddings(rng, 300)
    stats = calibrate_ood(train, y, rng.normal(size=(100, 3)), train[:100], widths=(8, 5), stages=("features.3",))
    entry, arrays = stats.to_parts()
    assert sorted(arrays) == ["means.0", "means.1", "precision.0", "precision.1"]
    assert entry["stages"] == ["features.3"] and arrays["precision.0"].shape == (8, 8)
    back = OodStats.from_parts(entry, arrays)
    assert back.stages == stats.stages and back.widths == (8, 5) and "stages" not in back.details
    assert np.allclose(back.scores(None, train), stats.scores(None, train), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="features.3, then the penultimate layer"):
        back.scores(None, train[:, 8:])  # a model read without its stages
    with pytest.raises(ValueError, match="do not make the embedding's 13 dimensions"):
        calibrate_ood(train, y, rng.normal(size=(100, 3)), train[:100], widths=(8, 4), stages=("features.3",))
    with pytest.raises(ValueError, match="2 parts of class Gaussians for 0 stages"):
        OodStats("mahalanobis", {"mahalanobis": 1.0}, stats.means, stats.precisions, part_scales=stats.part_scales)


def test_a_part_that_barely_varies_is_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(6)
    train, y = _two_part_embeddings(rng, 300)
    train[:, :8] = 3.0 + 1e-9 * rng.normal(size=(300, 8))  # every image the same direction: rounding noise
    with caplog.at_level("WARNING", logger="leukoscope.evaluation.ood"):
        stats = calibrate_ood(train, y, rng.normal(size=(100, 3)), train[:100], widths=(8, 5), stages=("features.3",))
    assert stats.details["flat_parts"] == [0] and "part(s) 0 of 2" in caplog.text
    caplog.clear()
    healthy, y = _two_part_embeddings(rng, 300)
    with caplog.at_level("WARNING", logger="leukoscope.evaluation.ood"):
        stats = calibrate_ood(healthy, y, rng.normal(size=(100, 3)), healthy[:100], widths=(8, 5),
                              stages=("features.3",))
    assert "flat_parts" not in stats.details and caplog.text == ""
