"""A white cell has a nucleus (leukoscope.inference.nuclei): white-cell boxes without violet stain are dropped."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

from leukoscope.inference.nuclei import MIN_NUCLEAR_SHARE, nuclear_shares, without_nucleus
from leukoscope.inference.smear import SmearAnalyzer
from tests.detection.smear_fakes import PBC_CLASSES, VERIFIED, FixedDetector, constant_classifier

VIOLET, PINK, BLUE_GREY, BACKGROUND = (120, 70, 170), (205, 135, 150), (150, 160, 200), (236, 226, 222)
WHITE_CELL, RED_CELL, RED_CLUMP = [40, 40, 100, 100], [200, 40, 240, 80], [300, 200, 380, 260]


def field(white: tuple[int, int, int] = VIOLET, red: tuple[int, int, int] = PINK) -> Image.Image:
    """A white cell (a nucleus of ``white`` in pale cytoplasm), an isolated red cell and a clump of two."""
    pixels = np.empty((320, 480, 3), np.uint8)
    pixels[:] = BACKGROUND
    pixels[disk((70, 70), 30, shape=pixels.shape[:2])] = (215, 190, 210)
    pixels[disk((70, 70), 18, shape=pixels.shape[:2])] = white
    pixels[disk((60, 220), 19, shape=pixels.shape[:2])] = red
    for cx in (320, 358):
        pixels[disk((230, cx), 19, shape=pixels.shape[:2])] = red
    return Image.fromarray(pixels)


def test_the_share_of_violet_pixels_in_each_box() -> None:
    shares = nuclear_shares(field(), [WHITE_CELL, RED_CELL, [900, 900, 950, 950]])
    assert shares[0] == pytest.approx(np.pi * 18 ** 2 / 60 ** 2, abs=0.03)
    assert shares[1] == 0.0 and shares[2] == 0.0  # a red cell; a box outside the field


def test_boxes_without_a_nucleus_are_found_only_where_the_stain_shows_nuclei_violet() -> None:
    boxes = [WHITE_CELL, RED_CELL, RED_CLUMP]
    assert without_nucleus(field(), boxes).tolist() == [False, True, True]
    # another lab's stain whose nuclei are blue-grey by this rule: no box holds a nucleus, none is dropped
    assert without_nucleus(field(white=BLUE_GREY), boxes).tolist() == [False, False, False]
    assert without_nucleus(field().convert("L").convert("RGB"), boxes).tolist() == [False, False, False]
    assert without_nucleus(field(), boxes, min_share=0).tolist() == [False, False, False]
    assert without_nucleus(field(), []).tolist() == []


def test_smear_analysis_does_not_count_red_cells_boxed_as_white_cells() -> None:
    """The detector calls a red cell and a clump of two white cells (as the shipped one does in another lab's
    blast-rich fields), the classifier types them: only the cell with a nucleus is counted."""
    detector = FixedDetector([WHITE_CELL, RED_CELL, RED_CLUMP], [0.9, 0.8, 0.7], metrics=VERIFIED)
    classifier = constant_classifier(PBC_CLASSES + ["blast"], "blast")
    result = SmearAnalyzer(detector, classifier, min_cells=1).analyze(field())
    assert [cell.box for cell in result.cells] == [tuple(map(float, WHITE_CELL))]
    assert result.object_counts == {"WBC": 1}
    everything = SmearAnalyzer(detector, classifier, min_cells=1, min_nuclear_share=0).analyze(field())
    assert len(everything.cells) == 3
    assert MIN_NUCLEAR_SHARE == 0.05
    with pytest.raises(ValueError, match="min_nuclear_share must be in"):
        SmearAnalyzer(detector, classifier, min_nuclear_share=1.0)
