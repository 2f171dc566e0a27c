"""The field scale from red cells (leukoscope.scale) and the physical cell window (leukoscope.cell_window)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

from leukoscope.cell_window import crop_cell, window_box
from leukoscope.scale import RED_CELL_DIAMETER_UM, FieldScale, estimate_scale, field_scale, source_scale

BACKGROUND = (236, 226, 222)


def smear_field(rbc_diameter: float, size: tuple[int, int] = (640, 480), seed: int = 0, n_red: int = 14,
                wbc: bool = True, platelets: int = 6, blasts: int = 0, blast_diameter: float | None = None,
                red: tuple[int, int, int] = (205, 135, 150), red_centre: tuple[int, int, int] = (222, 175, 182),
                blast: tuple[int, int, int] = (125, 80, 175), platelet_diameter: float | None = None,
                platelet: tuple[int, int, int] = (140, 90, 170),
                blast_nucleus: tuple[int, int, int] | None = None) -> Image.Image:
    """A field of isolated pink red cells with pale centres, a few platelets and one white cell;
    ``blasts``: as many round cells ``blast_diameter`` across (1.4 red cells by default), of one violet
    colour, or with ``blast_nucleus``: that colour in a nucleus of a fifth of their area."""
    rng = np.random.default_rng(seed)
    w, h = size
    canvas = np.empty((h, w, 3), np.float64)
    canvas[:] = BACKGROUND
    placed: list[tuple[float, float, float]] = []

    def place(radius: float) -> tuple[float, float] | None:
        for _ in range(200):
            cx, cy = rng.uniform(radius + 2, w - radius - 2), rng.uniform(radius + 2, h - radius - 2)
            if all(np.hypot(cx - x, cy - y) > radius + r + 3 for x, y, r in placed):
                placed.append((cx, cy, radius))
                return cx, cy
        return None

    if wbc:
        centre = place(rbc_diameter * 0.9)
        if centre:
            canvas[disk(centre[::-1], rbc_diameter * 0.9, shape=(h, w))] = (120, 80, 170)
    for _ in range(blasts):
        radius = (blast_diameter or 1.4 * rbc_diameter) / 2 * rng.uniform(0.95, 1.05)
        centre = place(radius)
        if centre:
            canvas[disk(centre[::-1], radius, shape=(h, w))] = blast
            if blast_nucleus is not None:
                canvas[disk(centre[::-1], radius * 0.45, shape=(h, w))] = blast_nucleus
    for _ in range(n_red):
        radius = rbc_diameter / 2 * rng.uniform(0.95, 1.05)
        centre = place(radius)
        if centre:
            canvas[disk(centre[::-1], radius, shape=(h, w))] = red
            canvas[disk(centre[::-1], radius * 0.4, shape=(h, w))] = red_centre
    platelet_radius = (platelet_diameter or 0.3 * rbc_diameter) / 2
    for _ in range(platelets):
        centre = place(platelet_radius)
        if centre:
            canvas[disk(centre[::-1], platelet_radius, shape=(h, w))] = platelet
    return Image.fromarray(canvas.astype(np.uint8))


@pytest.mark.parametrize("diameter", [16.0, 40.0, 90.0])
def test_scale_is_estimated_from_the_red_cells(diameter: float) -> None:
    scale = estimate_scale(smear_field(diameter, size=(max(320, int(diameter * 9)), max(240, int(diameter * 7)))))
    assert scale.source == "estimated" and scale.red_cells >= 5
    assert scale.um_per_px == pytest.approx(RED_CELL_DIAMETER_UM / diameter, rel=0.08)


def test_a_field_upsampled_twice_has_half_the_pixel_size() -> None:
    field = smear_field(40.0)
    big = field.resize((field.width * 2, field.height * 2), Image.Resampling.BILINEAR)
    assert estimate_scale(big).um_per_px == pytest.approx(estimate_scale(field).um_per_px / 2, rel=0.05)


def test_a_large_field_is_estimated_on_a_reduced_copy() -> None:
    field = smear_field(90.0, size=(2592, 1944), n_red=60)
    assert estimate_scale(field).um_per_px == pytest.approx(RED_CELL_DIAMETER_UM / 90.0, rel=0.08)


def test_fields_without_red_cells_have_no_scale() -> None:
    blank = Image.new("RGB", (320, 240), BACKGROUND)
    assert estimate_scale(blank).source == "unknown" and "no isolated red cells" in estimate_scale(blank).note
    pixels = np.zeros((450, 450, 3), np.uint8)  # a C-NMC-style segmented cell on black
    pixels[disk((225, 225), 140, shape=(450, 450))] = (150, 110, 190)
    single = Image.fromarray(pixels)
    assert not estimate_scale(single).known
    few = smear_field(40.0, n_red=2, wbc=False, platelets=0)
    scale = estimate_scale(few)
    assert not scale.known and "only 2 isolated red cell" in scale.note


def test_debris_does_not_pull_the_estimate_down() -> None:
    scale = estimate_scale(smear_field(60.0, platelets=30, n_red=10))
    assert scale.um_per_px == pytest.approx(RED_CELL_DIAMETER_UM / 60.0, rel=0.08)


def test_round_blasts_outnumbering_the_red_cells_are_left_out() -> None:
    """In a blast-rich field the isolated round objects are mostly blasts (the red cells touch): the
    estimate must rest on the red cells (all-taleqani's Pre-B fields were read a fifth too fine)."""
    field = smear_field(20.0, size=(480, 360), n_red=6, blasts=14, wbc=False, platelets=0)
    scale = estimate_scale(field)
    assert scale.um_per_px == pytest.approx(RED_CELL_DIAMETER_UM / 20.0, rel=0.08)
    assert scale.red_cells == 6


def test_pale_red_cells_beside_dark_nuclei_are_found() -> None:
    """Dark violet nuclei must not set the threshold that decides what is a cell: pale red cells would
    fall to the background, and the small lymphocytes' nuclei be measured in their place."""
    field = smear_field(24.0, size=(480, 360), n_red=8, blasts=12, blast_diameter=19.0, wbc=False, platelets=0,
                        red=(212, 196, 204), red_centre=(222, 208, 212), blast=(70, 35, 130))
    scale = estimate_scale(field)
    assert scale.um_per_px == pytest.approx(RED_CELL_DIAMETER_UM / 24.0, rel=0.08)
    assert scale.red_cells == 8


def test_nuclear_pixels_are_the_violet_ones() -> None:
    from leukoscope.scale import nuclear_pixels

    pixels = np.array([[(120, 80, 170), (70, 35, 130), (205, 135, 150), (150, 150, 175), (236, 226, 222)]], np.uint8)
    assert nuclear_pixels(pixels).tolist() == [[True, True, False, False, False]]


def test_white_cells_with_pale_cytoplasm_do_not_set_the_scale() -> None:
    """A neutrophil's nucleus is a fifth of its area, its cytoplasm pink: the cell must still be left out, or
    three of them outweigh ten isolated red cells and the field is read twice too coarse (pbc's erythroblast
    and neutrophil photographs had white cells 0.15-0.3 violet)."""
    field = smear_field(20.0, size=(640, 480), n_red=10, wbc=False, platelets=0, blasts=3, blast_diameter=40.0,
                        blast=(200, 160, 185), blast_nucleus=(110, 60, 160))
    scale = estimate_scale(field)
    assert scale.um_per_px == pytest.approx(RED_CELL_DIAMETER_UM / 20.0, rel=0.08) and scale.red_cells == 10


def test_pale_platelets_outnumbering_the_isolated_red_cells_do_not_set_the_scale() -> None:
    """In a crowded field the few isolated red cells may be outnumbered by platelets that are not violet
    enough to be left out by colour (BCCD's lavender ones): the estimate must sit on the red cells, which
    hold most of the area, not on the platelets' count (BCCD fields were read 2.5-3.5 times too coarse)."""
    field = smear_field(60.0, size=(640, 480), n_red=4, wbc=False, platelets=7, platelet_diameter=27.0,
                        platelet=(200, 170, 205))
    scale = estimate_scale(field)
    assert scale.um_per_px == pytest.approx(RED_CELL_DIAMETER_UM / 60.0, rel=0.08) and scale.red_cells == 4


def test_a_stated_scale_wins_and_is_checked() -> None:
    assert field_scale(Image.new("RGB", (10, 10)), 0.1) == FieldScale(0.1, "given", 0, "stated by the user")
    with pytest.raises(ValueError, match="between 0.005 and 5"):
        FieldScale.given(50.0)


def test_source_scale_is_the_median_of_its_fields() -> None:
    fields = [smear_field(40.0, seed=s) for s in range(4)] + [Image.new("RGB", (64, 64), BACKGROUND)]
    scale = source_scale(fields)
    assert scale.um_per_px == pytest.approx(RED_CELL_DIAMETER_UM / 40.0, rel=0.06)
    assert "4 of 5 fields" in scale.note
    assert not source_scale(fields[-1:] * 3).known
    assert source_scale(iter(fields)) == scale  # a generator of fields, as training reads them


def test_physical_window_is_the_same_area_of_slide_at_any_magnification() -> None:
    # A 10x10 um cell at 0.1 um/px (100 px) and at 0.5 um/px (20 px): a 24 um window is
    # 240 px and 48 px, both centred on the cell.
    assert window_box((100, 100, 200, 200), (1000, 1000), um_per_px=0.1, window_um=24) == (30, 30, 270, 270)
    assert window_box((20, 20, 40, 40), (224, 224), um_per_px=0.5, window_um=24) == (6, 6, 54, 54)
    # A cell larger than the window gets a window around the whole cell plus its margin.
    assert window_box((0, 0, 300, 300), (1000, 1000), um_per_px=0.1, window_um=24)[2:] == (330, 330)


def test_without_a_scale_the_crop_is_the_box_plus_its_margin() -> None:
    assert window_box((10, 20, 60, 70), (100, 100), margin=0.1) == (5, 15, 65, 75)
    assert window_box((0, 0, 50, 50), (50, 50), margin=0.1) == (0, 0, 50, 50)


def test_a_window_past_the_edge_is_filled_by_mirroring_the_field() -> None:
    field = Image.new("RGB", (100, 100), BACKGROUND)
    field.paste((90, 40, 150), (0, 0, 20, 20))
    crop = crop_cell(field, (0, 0, 20, 20), um_per_px=0.5, window_um=24)
    assert crop.size == (48, 48)
    pixels = np.asarray(crop)
    assert tuple(pixels[24, 24]) == (90, 40, 150)  # the cell stays at the centre ...
    assert tuple(pixels[10, 10]) == (90, 40, 150)  # ... and is mirrored past the edge
    assert tuple(pixels[47, 47]) == BACKGROUND
    far = crop_cell(field, (95, 95, 105, 105), um_per_px=0.1, window_um=24)  # window far larger than the field
    assert far.size == (240, 240)


def test_a_detectors_training_scale_is_estimated_from_its_images_or_taken_as_set(tmp_path) -> None:
    from types import SimpleNamespace

    from leukoscope.tasks.detect import training_scale

    images = []
    for seed in range(4):
        smear_field(40.0, seed=seed).save(tmp_path / f"{seed}.png")
        images.append(SimpleNamespace(image_path=tmp_path / f"{seed}.png"))
    assert training_scale("estimate", images) == pytest.approx(RED_CELL_DIAMETER_UM / 40.0, rel=0.06)
    assert training_scale(0.25, images) == 0.25 and training_scale(None, images) is None


def test_a_runs_scale_is_the_median_of_a_fixed_sample_of_its_readable_fields(tmp_path) -> None:
    from leukoscope.scale import RUN_SCALE_MIN_ESTIMATES, run_scale

    paths = []
    for seed, diameter in enumerate((18.0, 20.0, 22.0, 20.0, 19.0, 21.0)):
        path = tmp_path / f"field{seed}.png"
        smear_field(diameter, size=(320, 240), seed=seed, n_red=10).save(path)
        paths.append(path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    each = [estimate_scale(Image.open(p)).um_per_px for p in paths]
    scale = run_scale([broken, *paths])
    assert scale.known and scale.um_per_px == pytest.approx(float(np.median(each)))
    assert "median of 6 of 6 fields" in scale.note  # the unreadable file is skipped, not counted
    # at most `fields` of them, spread evenly, first and last included: fields 0, 2, 3 and 5 of 6
    four = run_scale(paths, fields=4, max_pixels=None)
    assert not four.known and "4 of 4 fields had a scale estimate" in four.note  # fewer than RUN_SCALE_MIN_ESTIMATES
    assert RUN_SCALE_MIN_ESTIMATES == 5
    five = run_scale(paths, fields=5)  # fields 0, 1, 2 (2.5 rounds to even), 4 and 5
    assert five.um_per_px == pytest.approx(float(np.median([each[k] for k in (0, 1, 2, 4, 5)])))
    assert not run_scale([]).known
    # fields of several microscopes do not lend one scale
    for seed, diameter in enumerate((16.0, 40.0, 16.0, 40.0, 16.0, 40.0)):
        smear_field(diameter, size=(480, 360), seed=seed, n_red=8).save(tmp_path / f"mixed{seed}.png")
    mixed = run_scale(sorted(tmp_path.glob("mixed*.png")))
    assert not mixed.known and "disagree" in mixed.note
    with pytest.raises(ValueError, match="at least 1"):
        run_scale(paths, fields=0)
    # a misread field or two neither decide nor veto the run's scale: left out, and said so
    for seed in range(2):
        smear_field(60.0, size=(960, 720), seed=seed, n_red=8).save(tmp_path / f"zoomed{seed}.png")
    with_outliers = run_scale([*paths, *sorted(tmp_path.glob("zoomed*.png"))])
    assert with_outliers.um_per_px == pytest.approx(float(np.median(each)))
    assert "median of 6 of 8 fields" in with_outliers.note
    assert "2 estimate(s) far from the rest left out" in with_outliers.note


def test_objects_too_small_to_be_red_cells_give_no_scale() -> None:
    """Isolated round objects under MIN_RED_CELL_PX across (in a crowded field: platelets and debris,
    the red cells all touching) would put a field at 0.6-0.9 um/px and invent cells: no estimate."""
    from leukoscope.scale import MIN_RED_CELL_PX

    assert estimate_scale(smear_field(14.0, size=(320, 240), n_red=10)).known
    tiny = estimate_scale(smear_field(9.0, size=(320, 240), n_red=10, platelets=0))
    assert not tiny.known and tiny.red_cells >= 3 and "too small to be red cells" in tiny.note
    assert MIN_RED_CELL_PX == 12.0
