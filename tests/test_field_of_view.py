"""The black surround outside a microscope's field of view (an eyepiece camera's round view, black padding): found,
painted as the smear's background for the scale estimate and the detector, and nothing else touched."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from leukoscope.field_of_view import filled_field, outside_mask
from leukoscope.scale import field_scale
from tests.test_scale import smear_field


def framed(field: Image.Image, border: int) -> Image.Image:
    out = Image.new("RGB", (field.width + 2 * border, field.height + 2 * border), (0, 0, 0))
    out.paste(field, (border, border))
    return out


def eyepiece(field: Image.Image, radius_share: float = 0.5) -> Image.Image:
    """Black outside a centred circle of radius ``radius_share`` of the field's diagonal."""
    mask = Image.new("L", field.size, 0)
    w, h = field.size
    r = radius_share * (w * w + h * h) ** 0.5
    ImageDraw.Draw(mask).ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=255)
    return Image.composite(field, Image.new("RGB", field.size, (0, 0, 0)), mask)


def test_a_field_without_a_surround_is_left_as_it_is() -> None:
    field = smear_field(20.0)
    assert outside_mask(np.asarray(field)) is None
    assert filled_field(field) is field


def test_the_surround_is_painted_in_the_background_colour_and_the_cells_are_kept() -> None:
    field = smear_field(20.0, seed=1)
    padded = framed(field, 40)
    filled = np.asarray(filled_field(padded)).astype(int)
    border = filled[:40].reshape(-1, 3)
    background = np.asarray(field).reshape(-1, 3)
    # the surround takes the field's most common colour (its glass), not black
    assert np.abs(border - np.median(background, axis=0)).max() <= 2
    assert np.array_equal(filled[40:-40, 40:-40], np.asarray(field).astype(int))


def test_dark_stain_inside_the_field_is_not_taken_for_the_surround() -> None:
    """A very dark object inside the field (not joined to the border by black) stays, surround or none."""
    pixels = np.asarray(smear_field(20.0, seed=2)).copy()
    pixels[200:230, 300:330] = 5
    assert outside_mask(pixels) is None
    framed_pixels = np.asarray(framed(Image.fromarray(pixels), 40))
    filled = np.asarray(filled_field(Image.fromarray(framed_pixels)))
    assert (filled[240:270, 340:370] == 5).all()  # the dark object, 40 px in: kept
    assert (filled[:40] > 100).all()  # the frame: painted


def test_the_red_cell_scale_is_measured_inside_the_field_of_view() -> None:
    """Black round the field had set Otsu's threshold to 0: no red cell found, no scale."""
    field = smear_field(20.0, seed=3, n_red=20)
    own = field_scale(field)
    assert own.known
    for shown in (framed(field, 20), framed(field, 106), eyepiece(field, 0.48)):
        scale = field_scale(shown)
        assert scale.known, scale.note
        assert abs(scale.um_per_px / own.um_per_px - 1) < 0.1
