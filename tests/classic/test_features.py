"""Hand-made features, checked by hand on tiny synthetic images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.draw import disk
from skimage.feature import local_binary_pattern

from leukoscope.classic.features import (
    FeatureExtractor,
    color_histogram,
    dft_features,
    extract_features,
    feature_names,
    glcm_features,
    glcm_names,
    histogram_names,
    lbp_codes,
    lbp_features,
    lbp_names,
    shape_features,
    shape_names,
)
from leukoscope.classic.spec import FEATURE_FAMILIES, FeatureSpec
from leukoscope.engine.config import ConfigError, load_config

BACKGROUND = (235, 228, 232)
CYTOPLASM = (185, 175, 220)
NUCLEUS = (95, 50, 145)


def _random_image(seed: int = 0, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _cell(size: int = 96, nucleus_radius: float = 12, cell_radius: float | None = 24) -> np.ndarray:
    """A pale background, optionally a lilac cytoplasm disk, a purple nucleus disk, centred."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    centre = (size / 2, size / 2)
    if cell_radius:
        image[disk(centre, cell_radius, shape=(size, size))] = CYTOPLASM
    image[disk(centre, nucleus_radius, shape=(size, size))] = NUCLEUS
    return image


# ------------------------------------------------------------------ histogram


def test_histogram_of_one_colour_fills_one_bin_per_channel():
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    image[:] = (0, 128, 255)
    values = color_histogram(image, bins=4, spaces=["rgb"])
    np.testing.assert_array_equal(values, [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1])


def test_histogram_channels_each_sum_to_one_and_names_match():
    bins = 8
    values = color_histogram(_random_image(), bins=bins, spaces=["rgb", "hsv", "lab"])
    names = histogram_names(bins, ["rgb", "hsv", "lab"])
    assert values.shape == (len(names),) == (3 * 3 * bins,)
    np.testing.assert_allclose(values.reshape(9, bins).sum(axis=1), 1.0)
    assert names[0] == "hist_rgb_r_0" and names[-1] == "hist_lab_b_7"


def test_histogram_rejects_bad_bins():
    with pytest.raises(ValueError, match="bins"):
        color_histogram(_random_image(), bins=1)


# ------------------------------------------------------------------------ DFT


def test_dft_of_a_constant_image_is_zero():
    image = np.full((32, 40, 3), 117, dtype=np.uint8)
    np.testing.assert_allclose(dft_features(image, bins=8), 0.0, atol=1e-12)


def test_dft_puts_fine_stripes_in_the_high_rings():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, ::2] = 255  # period 2 px: 0.5 cycles/pixel, the highest frequency
    fine = dft_features(image, bins=8)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, :32] = 255  # one step: mostly low frequencies
    coarse = dft_features(image, bins=8)
    assert fine.argmax() == 7
    assert coarse[:2].sum() > coarse[-2:].sum()


def test_dft_features_do_not_change_under_90_degree_rotation():
    image = _random_image(3, 32)
    np.testing.assert_allclose(dft_features(image), dft_features(np.rot90(image).copy()), atol=1e-9)


# ----------------------------------------------------------------------- GLCM


def test_glcm_shape_and_values_of_a_constant_image():
    values = glcm_features(np.full((24, 24, 3), 90, dtype=np.uint8), levels=16, distances=[1, 3])
    named = dict(zip(glcm_names([1, 3]), values))
    assert values.shape == (12,)
    assert named["glcm_contrast_d1"] == 0 and named["glcm_dissimilarity_d3"] == 0
    assert named["glcm_energy_d1"] == pytest.approx(1.0) and named["glcm_homogeneity_d3"] == pytest.approx(1.0)
    assert named["glcm_entropy_d1"] == pytest.approx(0.0)
    assert np.isfinite(values).all()  # correlation is undefined here; reported as 0, not NaN


def test_glcm_contrast_grows_with_texture():
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 1, 3))
    checker = ((np.indices((32, 32)).sum(axis=0) % 2) * 255).astype(np.uint8)
    rough = np.repeat(checker[..., None], 3, axis=2)
    contrast = lambda im: dict(zip(glcm_names([1]), glcm_features(im, distances=[1])))["glcm_contrast_d1"]  # noqa: E731
    assert contrast(rough) > 10 * contrast(smooth)


# ------------------------------------------------------------------------ LBP


def test_lbp_histograms_have_points_plus_two_bins_per_radius():
    values = lbp_features(_random_image(), points=8, radii=[1, 2])
    assert values.shape == (2 * 10,) == (len(lbp_names(8, [1, 2])),)
    np.testing.assert_allclose(values.reshape(2, 10).sum(axis=1), 1.0)


def test_lbp_codes_match_scikit_image_away_from_the_border():
    gray = np.asarray(Image.fromarray(_random_image(5, 40)).convert("L")).astype(np.float64)
    for points, radius in ((8, 1), (8, 2), (16, 2)):
        ours = lbp_codes(gray, points, radius)[3:-3, 3:-3]
        theirs = local_binary_pattern(gray.astype(np.uint8), points, radius, "uniform")[3:-3, 3:-3]
        assert (ours == theirs).mean() > 0.97, (points, radius)


def test_lbp_of_a_flat_image_is_all_one_pattern():
    values = lbp_features(np.full((16, 16, 3), 50, dtype=np.uint8), points=8, radii=[1])
    assert values[8] == pytest.approx(1.0)  # every neighbour >= centre: 8 ones, uniform


# ---------------------------------------------------------------------- shape


def test_shape_of_a_disk_nucleus_is_round():
    values = dict(zip(shape_names(), shape_features(_cell(96, nucleus_radius=20, cell_radius=None))))
    assert values["shape_found"] == 1
    assert values["nucleus_circularity"] == pytest.approx(1.0, abs=0.06)
    assert values["nucleus_area"] == pytest.approx(math.pi * 20**2 / 96**2, rel=0.1)
    assert values["nucleus_parts"] == 1
    assert values["nucleus_eccentricity"] < 0.2
    assert values["nucleus_solidity"] > 0.95


def test_nucleus_to_cell_ratio_of_concentric_disks():
    values = dict(zip(shape_names(), shape_features(_cell(96, nucleus_radius=12, cell_radius=24))))
    assert values["nucleus_cell_ratio"] == pytest.approx((12 / 24) ** 2, abs=0.05)
    assert values["cell_area"] == pytest.approx(math.pi * 24**2 / 96**2, rel=0.1)


def test_a_faint_cytoplasm_still_counts_as_cell():
    """Otsu over every pixel's distance from the background split the nucleus from the rest: a cytoplasm as
    faint as a neutrophil's on pbc was left out, and the "cell" was the nucleus (ratio near 1)."""
    image = _cell(96, nucleus_radius=12, cell_radius=30)
    faint = np.array(BACKGROUND, float) * 0.4 + np.array(CYTOPLASM, float) * 0.6
    image[(image == CYTOPLASM).all(axis=-1)] = faint.round().astype(np.uint8)
    noise = np.random.default_rng(0).normal(0, 1.5, image.shape)  # a camera's: three flat colours are no image
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    values = dict(zip(shape_names(), shape_features(image)))
    assert values["nucleus_cell_ratio"] == pytest.approx((12 / 30) ** 2, abs=0.05)


def test_pbc_neutrophils_are_larger_than_their_nuclei():
    from tests.conftest import shared_dataset

    folder = shared_dataset("pbc") / "neutrophil"
    files = sorted(folder.glob("*.jpg"))[:12]
    ratios = [dict(zip(shape_names(), shape_features(np.asarray(Image.open(f).convert("RGB").resize((128, 128))))))
              ["nucleus_cell_ratio"] for f in files]
    assert float(np.median(ratios)) < 0.7  # a neutrophil's nucleus is about a third of the cell


def test_a_given_square_mask_is_used_instead_of_segmentation():
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 16:48] = True
    values = dict(zip(shape_names(), shape_features(np.full((64, 64, 3), 200, np.uint8), mask=mask)))
    assert values["nucleus_area"] == pytest.approx(0.25)
    # pi/4 for a perfect square; the Crofton perimeter (exact for disks) is ~6% short on axis-aligned edges.
    assert math.pi / 4 - 0.03 < values["nucleus_circularity"] < 0.92
    with pytest.raises(ValueError, match="mask shape"):
        shape_features(np.full((64, 64, 3), 200, np.uint8), mask=mask[:10])


def test_a_blank_field_has_no_nucleus_and_all_zero_shape():
    np.testing.assert_array_equal(shape_features(np.full((64, 64, 3), 230, np.uint8)), 0.0)


# ---------------------------------------------------------------- together


def test_names_match_the_vector_for_every_family_alone_and_together():
    image = _cell(64)
    for families in [[f] for f in FEATURE_FAMILIES] + [list(FEATURE_FAMILIES)]:
        spec = FeatureSpec(families=families, histogram_bins=8, dft_bins=5, lbp_radii=[1])
        extractor = FeatureExtractor(spec)
        vector = extractor(image)
        assert vector.shape == (len(extractor.names),) == (len(feature_names(spec)),)
        assert len(set(extractor.names)) == len(extractor.names)
        assert np.isfinite(vector).all()


def test_every_feature_but_glcm_correlation_is_non_negative():
    extractor = FeatureExtractor()
    matrix = extract_features([_random_image(s, 48) for s in range(3)] + [_cell(48)])
    negative_ok = [i for i, name in enumerate(extractor.names) if name.startswith("glcm_correlation")]
    keep = np.setdiff1d(np.arange(matrix.shape[1]), negative_ok)
    assert (matrix[:, keep] >= 0).all()


def test_pil_hwc_and_chw_tensor_inputs_give_the_same_features():
    image = _cell(48)
    extractor = FeatureExtractor(FeatureSpec(families=["histogram", "dft", "lbp"]))
    a = extractor(image)
    np.testing.assert_array_equal(a, extractor(Image.fromarray(image)))
    np.testing.assert_array_equal(a, extractor(torch.from_numpy(image).permute(2, 0, 1)))
    batch = torch.from_numpy(np.stack([image, image])).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(extractor.transform(batch), np.stack([a, a]))


def test_bad_images_are_refused_clearly():
    with pytest.raises(ValueError, match="uint8"):
        FeatureExtractor()(np.zeros((16, 16, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="RGB"):
        FeatureExtractor()(np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match="too small"):
        FeatureExtractor()(np.zeros((4, 4, 3), dtype=np.uint8))


# ---------------------------------------------------------------------- spec


def test_unknown_feature_family_in_a_config_names_it():
    with pytest.raises(ConfigError, match=r"features\.families.*unknown feature family 'colour'"):
        load_config(overrides=["features.families=[histogram,colour]"])


def test_unknown_feature_setting_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown config key 'features\.bins'"):
        load_config(overrides=["features.bins=8"])


def test_spec_puts_families_in_canonical_order_and_checks_ranges():
    assert FeatureSpec(families=["shape", "histogram", "shape"]).families == ["histogram", "shape"]
    with pytest.raises(ValueError, match="histogram_bins"):
        FeatureSpec(histogram_bins=1)
    with pytest.raises(ValueError, match="at least one"):
        FeatureSpec(families=[])
    with pytest.raises(ValueError, match="k_best"):
        FeatureSpec(k_best=0)
