"""The light check of smear analysis (leukoscope.light): a field whose background is of a colour none of the
classifier's training images had (a camera's white balance) is said, and its leukemia flag withheld; the
same field as taken, or a classifier without a recorded range, is not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from leukoscope.evaluation.ood import OodStats
from leukoscope.light import LIGHT_WORDING, LightRange, chromaticity, field_white, fit_light_range
from leukoscope.inference.smear import SmearAnalyzer
from tests.detection.smear_fakes import VERIFIED, FixedDetector, constant_classifier, grid_boxes

WARM, NEUTRAL = (250, 225, 200), (220, 222, 218)  # two labs' backgrounds (pbc's is warm, CBC's grey)
BLUISH = (0.80, 0.92, 1.15)  # the robustness review's camera


def _field(background: tuple[int, int, int], gains: tuple[float, float, float] = (1, 1, 1)) -> Image.Image:
    """A field of lilac cells on ``background``, through a camera of ``gains``."""
    pixels = np.empty((480, 640, 3), np.float32)
    pixels[:] = background
    for y in range(40, 480, 80):
        for x in range(40, 640, 80):
            pixels[y - 15:y + 15, x - 15:x + 15] = (150, 110, 170)
    return Image.fromarray(np.clip(np.rint(pixels * np.asarray(gains, np.float32)), 0, 255).astype(np.uint8))


def _training_pixels() -> np.ndarray:
    """Crops of both labs, (N, 3, 32, 32) as a model decodes them."""
    crops = [np.asarray(_field(background, (gain, gain, gain)).crop((0, 0, 80, 80)).resize((32, 32)))
             for background in (WARM, NEUTRAL) for gain in (0.9, 0.95, 1.0, 1.02, 1.05, 1.1)]
    return np.stack(crops).transpose(0, 3, 1, 2)


def test_the_range_holds_both_labs_at_any_exposure_and_not_a_bluish_camera() -> None:
    light = fit_light_range(_training_pixels())
    assert light is not None and light.images == 12
    for background in (WARM, NEUTRAL):
        for gain in (0.8, 1.0):  # exposure is no colour of light
            assert light.contains(field_white(_field(background, (gain, gain, gain))))
    assert not light.contains(field_white(_field(NEUTRAL, BLUISH)))
    assert not light.contains(field_white(_field(WARM, (1.0, 0.8, 0.6))))  # a far warmer lamp than the warm lab's
    assert chromaticity(np.array([200.0, 200.0, 200.0])) == (0.0, 0.0)
    again = LightRange.from_json(json.loads(json.dumps(light.to_json())))
    assert again.images == light.images and np.allclose(again.red + again.blue, light.red + light.blue, atol=1e-4)
    assert fit_light_range(_training_pixels()[:5]) is None  # too few images to say what the light was
    dark = np.zeros((12, 3, 32, 32), np.uint8)  # segmented cells on black: no background to take the light from
    assert fit_light_range(dark) is None and LightRange.from_json(None) is None


def test_an_eyepiece_field_of_view_is_checked_on_its_lit_part() -> None:
    """A round field of view in a 4:3 frame is about 59% lit: its light is still read."""
    light = fit_light_range(_training_pixels())
    field = np.asarray(_field(NEUTRAL, BLUISH)).copy()
    yy, xx = np.mgrid[:480, :640]
    field[(yy - 240) ** 2 + (xx - 320) ** 2 > 240 ** 2] = 0
    white = field_white(Image.fromarray(field))
    assert white is not None and not light.contains(white)
    big = Image.fromarray(np.asarray(_field(NEUTRAL)).repeat(4, axis=0).repeat(4, axis=1))  # 2560 x 1920
    assert np.allclose(field_white(big), NEUTRAL, atol=2)
    assert field_white(_field(NEUTRAL).convert("P")) is not None  # a palette image is read as its colours


def test_a_review_of_every_cell_answers_the_light_warning() -> None:
    from leukoscope.inference.quality import about_classification_only, light_fields_warning
    from leukoscope.inference.smear_output import is_folded
    from leukoscope.light import light_warning

    field = light_warning(np.array([167.0, 195.0, 240.0]))
    assert about_classification_only(field) and is_folded(field)  # one folded line per folder, not one per field
    assert about_classification_only(light_fields_warning(2, 5, ["a.png", "b.png"]))


def _classifier(light: LightRange | None):
    classifier = constant_classifier(["blast", "lymphocyte"], "blast")
    # familiar cells (the constant model's energy is about -4): only the light can send the field to review
    classifier.ood = OodStats("energy", {"energy": 0.0}, details={} if light is None else {"light": light.to_json()})
    return classifier


def test_a_field_in_a_light_the_classifier_never_saw_is_said_and_flags_nothing(tmp_path: Path) -> None:
    light = fit_light_range(_training_pixels())
    # every box counted whatever its colour (the nuclear-stain rule reads colours too; not what is tested here)
    analyzer = SmearAnalyzer(FixedDetector(grid_boxes(120), metrics=VERIFIED), _classifier(light), min_nuclear_share=0)
    as_taken = analyzer.analyze(_field(NEUTRAL))
    assert as_taken.warnings == [] and as_taken.differential.acute_leukemia_flag
    bluish = analyzer.analyze(_field(NEUTRAL, BLUISH))
    assert len(bluish.warnings) == 1 and bluish.warnings[0].startswith(LIGHT_WORDING)
    assert "its background is (176, 204, 251)" in bluish.warnings[0]
    assert not bluish.differential.acute_leukemia_flag and bluish.differential.total == 120
    # without a recorded range (an older bundle, or one that normalises each image's light) nothing is said
    plain = SmearAnalyzer(FixedDetector(grid_boxes(120), metrics=VERIFIED), _classifier(None), min_nuclear_share=0)
    assert plain.analyze(_field(NEUTRAL, BLUISH)).warnings == []
    # a folder names the fields
    paths = []
    for name, image in (("a.png", _field(NEUTRAL)), ("b.png", _field(NEUTRAL, BLUISH))):
        image.save(tmp_path / name)
        paths.append(tmp_path / name)
    summary = analyzer.analyze_paths(paths, tmp_path / "out")
    said = [w for w in summary.warnings if w.startswith(LIGHT_WORDING)]
    assert len(said) == 1 and "b.png" in said[0] and "a.png" not in said[0]
    assert not summary.pooled.acute_leukemia_flag
    assert json.loads((tmp_path / "out" / "a.json").read_text())["warnings"] == []


def test_a_field_s_light_is_read_once_however_often_its_warnings_are_asked(monkeypatch) -> None:
    """A slide's tile asks for its warnings twice (with its margin, then its core): one read of its light."""
    import leukoscope.inference.smear as smear_module

    reads = []
    monkeypatch.setattr(smear_module, "field_white", lambda image: reads.append(image) or field_white(image))
    light = fit_light_range(_training_pixels())
    analyzer = SmearAnalyzer(FixedDetector(grid_boxes(20), metrics=VERIFIED), _classifier(light), min_nuclear_share=0)
    field = analyzer.prepare(_field(NEUTRAL, BLUISH))
    result = analyzer.analyze_prepared(field)
    again = analyzer.field_warnings(field, result.cells)
    assert len(reads) == 1 and again == result.warnings and again[0].startswith(LIGHT_WORDING)


def test_a_sparse_field_keeps_its_light_read() -> None:
    """Pale red cells and one white cell (under 5% of the pixels) on a bluish background: the rule that an
    image must show something darker than its background (leukoscope.light.MIN_CONTRAST) reads the darkest 1%,
    and still finds this field's light; a flat colour, and the same with a black frame, show none."""
    light = fit_light_range(_training_pixels())
    pixels = np.empty((480, 640, 3), np.float32)
    pixels[:] = NEUTRAL
    for y in range(60, 480, 120):
        for x in range(60, 640, 120):
            pixels[y - 12:y + 12, x - 12:x + 12] = (205, 190, 195)  # pale red cells, 15-30 levels under the glass
    pixels[210:270, 290:350] = (120, 80, 170)  # one white cell's nucleus: 1.2% of the field (5% was read before)
    bluish = Image.fromarray(np.clip(np.rint(pixels * np.asarray(BLUISH, np.float32)), 0, 255).astype(np.uint8))
    white = field_white(bluish)
    assert white is not None and not light.contains(white)
    flat = np.zeros((480, 640, 3), np.uint8)
    flat[40:-40, 40:-40] = (150, 100, 180)  # a flat colour in a black frame: the black is no stain
    assert field_white(Image.fromarray(flat)) is None
    assert field_white(Image.new("RGB", (64, 48), (150, 100, 180))) is None
