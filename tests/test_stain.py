"""Stain normalisation (leukoscope.stain) on generated stain mixtures and, when present, real crops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoscope.preprocessing import Preprocessing
from leukoscope.stain import (LIGHT, REFERENCE_VECTORS, macenko, normalise_stain, optical_density,
                              stain_estimate, white_balance, white_point)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def _concentration_maps(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A cell: a dense nucleus (nuclear stain) in pale cytoplasm, red cells (other stain) around it."""
    yy, xx = np.mgrid[:size, :size]
    nuclear = np.where((yy - 32) ** 2 + (xx - 30) ** 2 < 100, 1.6, 0.0)
    nuclear += np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 300, 0.25, 0.0)
    other = np.zeros((size, size))
    for cy, cx in ((8, 8), (8, 56), (56, 10), (54, 54), (30, 58)):
        other += np.where((yy - cy) ** 2 + (xx - cx) ** 2 < 49, 0.6, 0.0)
    return nuclear, other


def _render(nuclear: np.ndarray, other: np.ndarray, vectors: np.ndarray, light: float) -> np.ndarray:
    density = nuclear[..., None] * vectors[:, 0] + other[..., None] * vectors[:, 1]
    return np.clip(np.rint(light * np.exp(-density)), 0, 255).astype(np.uint8)


def _unit_columns(matrix: list[list[float]]) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    return matrix / np.linalg.norm(matrix, axis=0, keepdims=True)


# Two labs' stains: pbc-like purple and pink, and a bluer nuclear stain with a lilac other stain
# under a dimmer, tinted light.
LAB_A = _unit_columns([[0.51, 0.49], [0.84, 0.75], [0.18, 0.45]])
LAB_B = _unit_columns([[0.66, 0.55], [0.75, 0.62], [0.03, 0.56]])


def test_the_same_cell_stained_by_two_labs_comes_out_alike() -> None:
    nuclear, other = _concentration_maps()
    a = _render(nuclear, other, LAB_A, 240)
    b = _render(nuclear * 0.8, other * 1.3, LAB_B, 215)  # another stain strength and lamp as well
    before = np.abs(a.astype(int) - b.astype(int)).mean()
    after = np.abs(macenko(a).astype(int) - macenko(b).astype(int)).mean()
    assert before > 20
    assert after < before / 4, (before, after)
    # Where the nucleus is stays darkest, where the background is stays lightest.
    out = macenko(b).astype(int).sum(axis=2)
    assert out[32, 30] < out[32, 45] < out[0, 30]


def test_the_estimate_finds_the_nuclear_stain_first() -> None:
    nuclear, other = _concentration_maps()
    vectors, maxima = stain_estimate(_render(nuclear, other, LAB_B, 230))
    assert vectors.shape == (3, 2) and maxima.shape == (2,)
    assert vectors[:, 0] @ LAB_B[:, 0] > 0.99  # the darkest pixels' direction
    assert vectors[:, 0] @ LAB_B[:, 0] > vectors[:, 0] @ LAB_B[:, 1]


def test_black_background_stays_black_and_a_blank_image_is_left_alone() -> None:
    nuclear, other = _concentration_maps()
    cell = _render(nuclear, np.zeros_like(other), LAB_B, 230)
    segmented = cell.copy()
    segmented[(nuclear == 0)] = 0  # a segmented cell on black, as C-NMC's
    out = macenko(segmented)
    assert (out[nuclear == 0] == 0).all()
    assert out[nuclear > 0].mean() > 10  # the cell is rebuilt, not blacked out
    blank = np.full((32, 32, 3), 235, dtype=np.uint8)
    assert stain_estimate(blank) is None
    assert np.array_equal(macenko(blank), blank)
    # one flat dim or saturated colour, no glass and no cell: left alone (it came out solid nucleus purple)
    for flat in ((128, 128, 128), (250, 20, 20)):
        image = np.full((32, 32, 3), flat, dtype=np.uint8)
        assert stain_estimate(image) is None and np.array_equal(macenko(image), image)


def test_an_image_of_one_stain_is_rebuilt_in_the_reference_nuclear_colour() -> None:
    nuclear, _ = _concentration_maps()
    one = _render(nuclear, np.zeros_like(nuclear), LAB_B, 235)
    vectors, maxima = stain_estimate(one)
    assert vectors.shape == (3, 1)
    out = macenko(one)
    direction = optical_density(out[32, 30], LIGHT)
    assert direction / np.linalg.norm(direction) @ REFERENCE_VECTORS[:, 0] > 0.99


def test_unknown_methods_are_refused_everywhere() -> None:
    with pytest.raises(ValueError, match="unknown stain normalisation 'vahadane'"):
        normalise_stain(np.zeros((4, 4, 3), np.uint8), "vahadane")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown stain normalisation 'vahadane'"):
        Preprocessing(32, stain="vahadane")


def test_preprocessing_normalises_after_the_letterbox_and_the_bundle_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import leukoscope.bundle as bundle_module
    from leukoscope.bundle import BundleError, BundleInfo, load_bundle, read_bundle_info, save_bundle
    from leukoscope.models import create_model

    nuclear, other = _concentration_maps()
    image = Image.fromarray(_render(nuclear, other, LAB_B, 220))
    plain, stained = Preprocessing(32), Preprocessing(32, stain="macenko")
    expected = macenko(np.asarray(plain.pixel_array(image)).transpose(1, 2, 0).copy())
    assert np.array_equal(stained.pixel_array(image), expected.transpose(2, 0, 1))
    assert not np.array_equal(stained.pixel_array(image), plain.pixel_array(image))
    bundle = save_bundle(tmp_path / "b", create_model("mobilenet_v3_small", 2), BundleInfo(
        "mobilenet_v3_small", ["a", "b"], stained))
    assert load_bundle(bundle)[1].preprocessing.stain == "macenko"
    # Format 6: leukoscope before it asks for an upgrade instead of failing on the unknown field.
    assert json.loads((bundle / "bundle.json").read_text())["format_version"] == 6
    with monkeypatch.context() as older:
        older.setattr(bundle_module, "READABLE_VERSIONS", (1, 2, 3, 4, 5))
        older.setattr(bundle_module, "BUNDLE_FORMAT_VERSION", 5)
        with pytest.raises(BundleError, match="format 6 is not supported.*upgrade leukoscope"):
            read_bundle_info(bundle)
    plain_bundle = save_bundle(tmp_path / "p", create_model("mobilenet_v3_small", 2), BundleInfo(
        "mobilenet_v3_small", ["a", "b"], plain))
    assert "stain" not in json.loads((plain_bundle / "bundle.json").read_text())["preprocessing"]


def _camera(image: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return np.clip(np.rint(image * np.asarray(gains)), 0, 255).astype(np.uint8)


def test_white_balance_undoes_a_camera_white_balance_and_exposure() -> None:
    """One stained cell photographed by three cameras (warm, bluish, dim): after white balance the
    three agree within a grey level or two, and the background is the neutral LIGHT."""
    nuclear, other = _concentration_maps()
    cell = _render(nuclear, other, LAB_A, 250)
    cameras = [_camera(cell, gains) for gains in ((1.0, 0.9, 0.8), (0.8, 0.92, 1.0), (0.8, 0.8, 0.8))]
    before = np.abs(cameras[0].astype(int) - cameras[1].astype(int)).mean()
    balanced = [white_balance(image) for image in cameras]
    after = max(np.abs(balanced[0].astype(int) - other_image.astype(int)).mean() for other_image in balanced[1:])
    assert before > 15 and after < 1.5, (before, after)
    assert np.allclose(white_point(balanced[0]), LIGHT, atol=2)
    # the stain's colours stay: the nucleus is still violet (blue above green), the red cells pink
    nucleus = balanced[0][32, 30].astype(int)
    red_cell = balanced[0][8, 8].astype(int)
    assert nucleus[2] > nucleus[1] and red_cell[0] > red_cell[1]


def test_white_balance_leaves_what_shows_no_background_alone() -> None:
    nuclear, other = _concentration_maps()
    segmented = _render(nuclear, other, LAB_A, 250)
    segmented[nuclear < 0.2] = 0  # a C-NMC-like cell on black: no background to take the white from
    assert white_point(segmented) is None and np.array_equal(white_balance(segmented), segmented)
    dark = np.full((16, 16, 3), 90, np.uint8)  # all stained (or underexposed): no glass in view
    assert white_point(dark) is None and np.array_equal(white_balance(dark), dark)
    assert np.array_equal(normalise_stain(_camera(_render(nuclear, other, LAB_A, 250), (1.0, 0.9, 0.8)),
                                          "white_balance")[0, 0], np.full(3, round(LIGHT), np.uint8))


def test_a_white_balanced_bundle_says_format_9(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import leukoscope.bundle as bundle_module
    from leukoscope.bundle import BundleError, BundleInfo, load_bundle, read_bundle_info, save_bundle
    from leukoscope.models import create_model

    bundle = save_bundle(tmp_path / "b", create_model("mobilenet_v3_small", 2), BundleInfo(
        "mobilenet_v3_small", ["a", "b"], Preprocessing(32, stain="white_balance", views=8)))
    assert load_bundle(bundle)[1].preprocessing.stain == "white_balance"
    payload = json.loads((bundle / "bundle.json").read_text())
    assert payload["format_version"] == 9
    with monkeypatch.context() as older:  # leukoscope of format 8 asks for an upgrade
        older.setattr(bundle_module, "READABLE_VERSIONS", (1, 2, 3, 4, 5, 6, 7, 8))
        older.setattr(bundle_module, "BUNDLE_FORMAT_VERSION", 8)
        with pytest.raises(BundleError, match="format 9 is not supported.*upgrade leukoscope"):
            read_bundle_info(bundle)
    payload["format_version"] = 8  # a hand edit
    (bundle / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(BundleError, match="white_balance stain normalisation, which only format 9 has"):
        read_bundle_info(bundle)


def test_a_wrong_stain_setting_is_a_config_error() -> None:
    from leukoscope.engine.config import ConfigError, load_config

    assert load_config(overrides=["data.stain=macenko"]).data.stain == "macenko"
    assert load_config(overrides=["data.stain=white_balance"]).data.stain == "white_balance"
    with pytest.raises(ConfigError, match="stain"):
        load_config(overrides=["data.stain=reinhard"])


@pytest.mark.skipif(not (SHARED / "pbc").is_dir(), reason="needs ../shared/datasets")
def test_real_nuclei_of_two_labs_come_out_in_closer_colours() -> None:
    """pbc's neutrophils (pink May-Grünwald-Giemsa) against all-taleqani's cells (lavender-blue):
    the median colour of the darkest pixels (nuclei) moves closer."""
    rng = np.random.default_rng(0)

    def nuclei(folder: Path, normalise: bool) -> np.ndarray:
        files = sorted(folder.glob("*.jpg"))
        colours = []
        for index in rng.permutation(len(files))[:12]:
            array = np.asarray(Preprocessing(96, stain="macenko" if normalise else None)
                               .pixel_array(Image.open(files[index]).convert("RGB"))).transpose(1, 2, 0)
            pixels = array.reshape(-1, 3).astype(float)
            colours.append(np.median(pixels[np.argsort(pixels.sum(axis=1))[:200]], axis=0))
        return np.median(colours, axis=0)

    taleqani = SHARED / "all-taleqani" / "Pro"
    if not taleqani.is_dir():
        pytest.skip("no all-taleqani/Pro folder")
    gaps = {}
    for normalise in (False, True):
        gaps[normalise] = float(np.linalg.norm(nuclei(SHARED / "pbc" / "neutrophil", normalise)
                                               - nuclei(taleqani, normalise)))
    assert gaps[True] < gaps[False] / 5, gaps
