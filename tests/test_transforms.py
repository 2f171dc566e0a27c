"""Letterbox, augmentation presets, stain jitter, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from leukoscope.data.synthetic import render_cell
from leukoscope.pixels import IMAGENET_MEAN, IMAGENET_STD, letterbox
from leukoscope.preprocessing import Preprocessing
from leukoscope.transforms import (
    RandomResolution,
    AUGMENTATION_PRESETS,
    RandomRot90,
    RandomStainJitter,
    augmentation,
)

BACKGROUND = (200, 180, 190)
INK = (40, 20, 90)


def slide(width: int, height: int, square: int) -> Image.Image:
    """Background-coloured image with a dark ``square`` x ``square`` block in the middle."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    top, left = (height - square) // 2, (width - square) // 2
    pixels[top : top + square, left : left + square] = INK
    return Image.fromarray(pixels)


def dark_box(array: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(array[..., 0] < 120)
    return rows.min(), rows.max(), cols.min(), cols.max()


@pytest.fixture(scope="module")
def cell_tensor() -> torch.Tensor:
    return Preprocessing(64).pixels(Image.fromarray(render_cell("monocyte", np.random.default_rng(2), 64)))


# -- letterbox ---------------------------------------------------------------


def test_letterbox_wide_image_keeps_aspect_and_pads_with_border_colour() -> None:
    out = letterbox(slide(200, 100, 60), 64)
    assert out.size == (64, 64) and out.mode == "RGB"
    array = np.asarray(out)
    # content is 64 x 32, centred vertically: rows 16..47
    assert (array[:16] == BACKGROUND).all()
    assert (array[48:] == BACKGROUND).all()
    assert (array[16:48, :2] == BACKGROUND).all() and (array[16:48, -2:] == BACKGROUND).all()
    top, bottom, left, right = dark_box(array)
    assert 16 <= top and bottom <= 47
    height, width = bottom - top + 1, right - left + 1
    assert abs(height - width) <= 1  # the square stays square (60 px * 0.32 ~ 19 px)
    assert 18 <= width <= 21
    assert abs((top + bottom) / 2 - 31.5) <= 1 and abs((left + right) / 2 - 31.5) <= 1


def test_letterbox_tall_image_pads_left_and_right() -> None:
    out = np.asarray(letterbox(slide(100, 200, 60), 64))
    assert out.shape == (64, 64, 3)
    assert (out[:, :16] == BACKGROUND).all()
    assert (out[:, 48:] == BACKGROUND).all()
    top, bottom, left, right = dark_box(out)
    assert 16 <= left and right <= 47
    assert abs((bottom - top) - (right - left)) <= 1


def test_letterbox_pad_colour_is_the_border_median_not_black() -> None:
    pixels = np.zeros((50, 100, 3), dtype=np.uint8)
    pixels[:] = (230, 210, 220)
    pixels[0, :10] = (0, 0, 0)  # a few dark border pixels do not move the median
    out = np.asarray(letterbox(Image.fromarray(pixels), 32))
    assert tuple(out[0, 16]) == (230, 210, 220)
    assert tuple(out[31, 16]) == (230, 210, 220)


def test_letterbox_square_images() -> None:
    big = letterbox(slide(300, 300, 100), 64)
    assert big.size == (64, 64)
    top, bottom, left, right = dark_box(np.asarray(big))
    assert abs((bottom - top) - (right - left)) <= 1
    same = Image.fromarray(render_cell("blast", np.random.default_rng(0), 64))
    np.testing.assert_array_equal(np.asarray(letterbox(same, 64)), np.asarray(same))
    assert letterbox(Image.new("RGB", (10, 10)), 64).size == (64, 64)  # upscales too


def test_letterbox_extreme_aspect_ratio() -> None:
    out = letterbox(Image.new("RGB", (1000, 3), (5, 6, 7)), 32)
    assert out.size == (32, 32)


def test_pixels_are_channels_first_uint8_as_array_and_as_tensor() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    array = Preprocessing(8).pixel_array(Image.fromarray(pixels))  # already square: letterbox keeps it
    tensor = Preprocessing(8).pixels(Image.fromarray(pixels))
    assert array.shape == (3, 8, 8) and array.dtype == np.uint8 and array.flags["C_CONTIGUOUS"]
    assert tensor.dtype == torch.uint8 and tensor.is_contiguous()
    np.testing.assert_array_equal(array.transpose(1, 2, 0), pixels)
    np.testing.assert_array_equal(tensor.numpy(), array)


# -- augmentation presets ----------------------------------------------------


@pytest.mark.parametrize("preset", AUGMENTATION_PRESETS)
def test_every_preset_returns_uint8_of_the_same_shape(preset: str, cell_tensor: torch.Tensor) -> None:
    torch.manual_seed(0)
    transform = augmentation(preset)
    original = cell_tensor.clone()
    changed = False
    for _ in range(8):
        out = transform(cell_tensor)
        assert isinstance(out, torch.Tensor)
        assert out.dtype == torch.uint8
        assert out.shape == cell_tensor.shape
        changed |= not torch.equal(out, cell_tensor)
    assert torch.equal(cell_tensor, original)  # the input is never modified in place
    assert changed == (preset != "none")


def test_presets_work_on_non_square_and_odd_sizes() -> None:
    image = torch.randint(0, 256, (3, 33, 47), dtype=torch.uint8)
    for preset in ("none", "tusar", "abas"):
        assert augmentation(preset)(image).shape == (3, 33, 47)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ValueError, match="unknown augmentation preset 'fancy'") as info:
        augmentation("fancy")
    for name in AUGMENTATION_PRESETS:
        assert repr(name) in str(info.value)


def test_rot90_only_produces_rotations() -> None:
    torch.manual_seed(0)
    image = torch.arange(3 * 5 * 5, dtype=torch.uint8).reshape(3, 5, 5)
    rotations = [torch.rot90(image, k, dims=(-2, -1)) for k in range(4)]
    seen = set()
    rot = RandomRot90()
    for _ in range(60):
        out = rot(image)
        matches = [k for k, r in enumerate(rotations) if torch.equal(out, r)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}
    batch = torch.stack([image, image])
    assert rot(batch).shape == batch.shape


def test_jabeena_preset_is_lossless(cell_tensor: torch.Tensor) -> None:
    torch.manual_seed(1)
    out = augmentation("jabeena")(cell_tensor)
    assert any(torch.equal(out, torch.rot90(cell_tensor, k, dims=(-2, -1))) for k in range(4))


def test_stain_jitter_zero_is_near_identity(cell_tensor: torch.Tensor) -> None:
    jitter = RandomStainJitter(sigma=0.0, bias=0.0)
    out = jitter(cell_tensor)
    assert out.dtype == torch.uint8 and out.shape == cell_tensor.shape
    assert (out.int() - cell_tensor.int()).abs().max() <= 1
    full_range = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(3, 16, 16)
    assert (jitter(full_range).int() - full_range.int().clamp_min(1)).abs().max() <= 1


def test_stain_jitter_matrices_are_inverse() -> None:
    jitter = RandomStainJitter()
    eye = jitter.rgb_from_hed @ jitter.hed_from_rgb
    assert torch.allclose(eye, torch.eye(3), atol=1e-5)
    assert torch.allclose(jitter.rgb_from_hed.norm(dim=1), torch.ones(3), atol=1e-6)


def test_stain_jitter_changes_colour_within_bounds(cell_tensor: torch.Tensor) -> None:
    torch.manual_seed(0)
    out = RandomStainJitter(sigma=0.2, bias=0.2)(cell_tensor)
    assert out.dtype == torch.uint8
    diff = (out.int() - cell_tensor.int()).abs().float()
    assert diff.mean() > 1  # something happened
    assert diff.mean() < 80  # but it is still the same picture
    # structure kept: strongly correlated with the input
    corr = np.corrcoef(out.float().flatten().numpy(), cell_tensor.float().flatten().numpy())[0, 1]
    assert corr > 0.8


# -- normalisation -----------------------------------------------------------


def test_model_input_values() -> None:
    image = torch.tensor([0, 255, 51], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2).contiguous()
    out = Preprocessing(8).model_input(image)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    expected = [(0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (1 - IMAGENET_MEAN[1]) / IMAGENET_STD[1], (0.2 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    for c in range(3):
        assert torch.allclose(out[c], torch.tensor(expected[c]), atol=1e-6)


def test_model_input_custom_and_batched() -> None:
    preprocessing = Preprocessing(8, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    batch = torch.stack([torch.zeros((3, 2, 2), dtype=torch.uint8), torch.full((3, 2, 2), 255, dtype=torch.uint8)])
    out = preprocessing.model_input(batch)
    assert out.shape == (2, 3, 2, 2)
    assert torch.allclose(out[0], torch.full((3, 2, 2), -1.0))
    assert torch.allclose(out[1], torch.full((3, 2, 2), 1.0))


@pytest.mark.parametrize("style", [{}, {"colour": "gray"}, {"standardize": True}, {"colour": "gray", "standardize": True}])
def test_model_input_is_the_same_for_numpy_and_torch_and_matches_torchs_arithmetic(style: dict) -> None:
    """An exported classifier gets numpy, a torch model a tensor: one computation, the same numbers,
    and those of the torch formulas the bundles were trained with (std unbiased, as torch's)."""
    preprocessing = Preprocessing(16, **style)
    pixels = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (4, 3, 16, 16), dtype=np.uint8))
    from_torch, from_numpy = preprocessing.model_input(pixels), preprocessing.model_input(pixels.numpy())
    assert isinstance(from_torch, torch.Tensor) and isinstance(from_numpy, np.ndarray)
    assert from_numpy.dtype == np.float32 and np.array_equal(from_torch.numpy(), from_numpy)
    image = pixels.float() / 255.0
    if style.get("colour") == "gray":
        image = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(dim=-3, keepdim=True).expand_as(image)
    if style.get("standardize"):
        expected = (image - image.mean(dim=(-2, -1), keepdim=True)) / image.std(dim=(-2, -1), keepdim=True).clamp_min(1 / 255)
    else:
        expected = (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(from_torch, expected, atol=1e-5)


def test_random_resolution_blurs_and_keeps_the_shape(cell_tensor: torch.Tensor) -> None:
    assert torch.equal(RandomResolution(p=0.0)(cell_tensor), cell_tensor)
    torch.manual_seed(0)
    blurred = RandomResolution(max_factor=3.0, p=1.0)(cell_tensor)
    assert blurred.shape == cell_tensor.shape and blurred.dtype == torch.uint8

    def detail(image: torch.Tensor) -> float:  # energy of the differences between neighbouring pixels
        return float(image.float().diff(dim=-1).abs().mean())

    assert detail(blurred) < detail(cell_tensor)
    with pytest.raises(ValueError, match="at least 1"):
        RandomResolution(max_factor=0.5)


@pytest.mark.parametrize("preset", ["default", "tusar", "abas"])
def test_zoom_shear_and_rotation_uncover_background_not_black(preset: str) -> None:
    """RandomAffine and RandomRotation filled what they uncovered with black (in 15-96% of the draws): a frame
    only training images had, where letterboxing pads with the border colour."""
    from leukoscope.transforms import augmentation

    image = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    image[:, 24:40, 24:40] = 90  # a cell, never black either
    aug = augmentation(preset)
    torch.manual_seed(0)
    for _ in range(60):
        out = aug(image)
        assert out.dtype == torch.uint8 and not (out < 40).all(dim=0).any()


def test_on_border_colour_changes_nothing_a_transform_does_not_move() -> None:
    from leukoscope.transforms import OnBorderColour

    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert torch.equal(OnBorderColour(lambda x: x)(image), image)
