"""The light check of single-cell images (`predict`, the service's cell cases; leukoscope.light): a cell
photographed in a light none of the classifier's training images had is said in its warnings, as a smear
field is; the same cell as taken, a cell on black and a grey image are not; a malformed recorded range fails
when the bundle is loaded, not at the first image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoscope.bundle import BundleError
from leukoscope.inference.predictor import CellClassifier, single_cell_warnings
from leukoscope.inference.quality import about_classification_only
from leukoscope.light import CELL_LIGHT_WARNING, LIGHT_CELL_WORDING, LIGHT_WORDING, LightRange, cell_light_warning
from leukoscope.pretrained import resolve_bundle

NEUTRAL = (220, 222, 218)  # BCCD's and CBC's grey background
BLUISH = (0.80, 0.92, 1.15)  # the robustness review's camera
#: The shipped classifier's recorded range (its bundle.json, `ood.light`).
SHIPPED = LightRange((-0.0565, 0.1163), (-0.1385, 0.0317), 4164)


def _cell(background: tuple[int, int, int] = NEUTRAL, gains: tuple[float, float, float] = (1, 1, 1),
          size: int = 96) -> Image.Image:
    """A lilac nucleus in pink cytoplasm on ``background``, through a camera of ``gains``."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    pixels = np.empty((size, size, 3), np.float32)
    pixels[:] = background
    pixels[radius < size * 0.3] = (200, 160, 190)
    pixels[radius < size * 0.18] = (120, 80, 170)
    return Image.fromarray(np.clip(np.rint(pixels * np.asarray(gains, np.float32)), 0, 255).astype(np.uint8))


def test_a_cell_in_a_light_the_classifier_never_saw_is_said() -> None:
    as_taken, bluish = _cell(), _cell(gains=BLUISH)
    assert single_cell_warnings(as_taken, None, 24.0, as_taken, light=SHIPPED) == ()
    (warning,) = single_cell_warnings(bluish, None, 24.0, bluish, light=SHIPPED)
    # the same words for every such image (no colour of its own in them): a service case names them under one line
    assert warning == CELL_LIGHT_WARNING and warning.startswith(LIGHT_CELL_WORDING)
    assert not warning.startswith(LIGHT_WORDING)  # an image, not a field: `analyze`'s folded line is not this
    assert about_classification_only(warning)  # a reviewer's label answers it, as the field's light warning
    # without a recorded range (an older bundle, or one that normalises each image's light) nothing is said
    assert single_cell_warnings(bluish, None, 24.0, bluish) == ()
    # a warm lab's light is inside the range whatever the exposure
    for gain in (0.8, 1.0):
        assert cell_light_warning(_cell((250, 225, 200), (gain, gain, gain)), SHIPPED) is None


def test_the_window_read_decides_and_images_without_a_background_are_not_checked() -> None:
    bluish = _cell(gains=BLUISH)
    # the window the classifier saw is read, not the image as given (a bluish cell framed from a neutral image
    # cannot happen; the other way round shows which one is read)
    assert single_cell_warnings(bluish, None, 24.0, _cell(), light=SHIPPED) == ()
    on_black = np.asarray(bluish).copy()
    on_black[np.all(on_black == on_black[0, 0], axis=2)] = 0  # a segmented cell on black: no light to read
    assert cell_light_warning(Image.fromarray(on_black), SHIPPED) is None
    # a flat colour (or a crop of cytoplasm alone) shows nothing darker than its brightest part: no light to read
    assert cell_light_warning(Image.new("RGB", (64, 48), (150, 100, 180)), SHIPPED) is None
    big = bluish.resize((3000, 3000), Image.NEAREST)  # reduced before it is read, and still read
    assert cell_light_warning(big, SHIPPED) is not None


def _bluish_only_around_the_cell() -> Image.Image:
    """A 600 px photograph (60 um at 0.1 um/px) whose central 26 um were taken through the bluish camera: the
    24 um window the classifier reads is bluish, the photograph as a whole is not (its brightest pixels are the
    neutral rest)."""
    pixels = np.asarray(_cell(size=600)).copy()
    centre = slice(170, 430)
    pixels[centre, centre] = np.clip(np.rint(pixels[centre, centre] * np.asarray(BLUISH)), 0, 255)
    return Image.fromarray(pixels)


def test_predict_reads_the_range_from_the_bundle_and_the_window_it_framed(tmp_path: Path) -> None:
    for name, image in (("taken.png", _cell(size=240)), ("bluish.png", _cell(gains=BLUISH, size=240)),
                        ("window.png", _bluish_only_around_the_cell())):
        image.save(tmp_path / name)
    classifier = CellClassifier.from_bundle("pretrained:wbc-classifier")
    assert classifier.light_range is not None and classifier.light_range.images == SHIPPED.images
    taken, bluish, window = classifier.predict_paths([tmp_path / n for n in ("taken.png", "bluish.png", "window.png")],
                                                     frame=True, um_per_px=0.1)
    assert CELL_LIGHT_WARNING not in taken.warnings
    assert CELL_LIGHT_WARNING in bluish.warnings and CELL_LIGHT_WARNING in bluish.as_row()["warnings"]
    # the window the classifier saw is read, not the photograph as given (which is inside the range)
    assert CELL_LIGHT_WARNING in window.warnings
    assert cell_light_warning(_bluish_only_around_the_cell(), SHIPPED) is None


@pytest.mark.parametrize("light, says", [({"red": [0.0, 0.1], "images": 5}, "lacks blue"),
                                         ({"red": [0.1, 0.0], "blue": [0.0, 0.1], "images": 5}, "low <= high"),
                                         ({"red": [0.0], "blue": [0.0, 0.1], "images": 5}, "two numbers"),
                                         ({"red": "01", "blue": [0.0, 0.1], "images": 5}, "two numbers"),
                                         ({"red": [0.0, 0.1], "blue": [0.0, 0.1], "images": "many"}, "whole number"),
                                         ({"red": [0.0, 0.1], "blue": [0.0, 0.1], "images": 1e400}, "whole number"),
                                         ([0.0, 0.1], "mapping")])
def test_a_malformed_range_fails_when_the_bundle_is_loaded(tmp_path: Path, light, says: str) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(resolve_bundle("pretrained:wbc-classifier"), bundle)
    info = json.loads((bundle / "bundle.json").read_text())
    info["ood"]["light"] = light
    (bundle / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match=f"incomplete: .*{says}"):
        CellClassifier.from_bundle(bundle)
