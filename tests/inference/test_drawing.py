"""The annotated smear picture (leukoscope.inference.drawing): what a reader of the PNG can tell from it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from leukoscope.bundle import read_bundle_info
from leukoscope.inference.differential import CountRules
from leukoscope.inference.drawing import annotate
from leukoscope.inference.smear_result import Cell, SmearResult
from leukoscope.labels import UNCERTAIN, blast_classes_in
from leukoscope.pretrained import DEFAULT_CLASSIFIER, pretrained_path

GREY = (128, 128, 128)  # the field: no class colour is this grey


def _cell(cell_id: int, box: tuple[float, float, float, float], label: str, top_class: str | None = None,
          uncertain: bool = False) -> Cell:
    return Cell(cell_id, box, "WBC", 0.9, label, top_class or label, 0.87, uncertain, {})


def _drawn(cells: list[Cell], classes: list[str], size: tuple[int, int] = (700, 700)) -> tuple[np.ndarray, int]:
    """The annotated picture of a plain grey field of ``size`` (no enlargement, text of scale 1) with ``cells``, and
    the height of its text band."""
    rules = CountRules(tuple(classes), tuple(blast_classes_in(classes)))
    result = SmearResult("f.png", *size, cells, {}, rules.count([c.label for c in cells]), cell_classes=classes)
    drawn = np.asarray(annotate(Image.new("RGB", size, GREY), result))
    return drawn, drawn.shape[0] - size[1]


def _luminance(rgb: np.ndarray) -> np.ndarray:
    c = rgb.astype(float) / 255
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return c @ np.array([0.2126, 0.7152, 0.0722])


def _contrast(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    la, lb = _luminance(a), _luminance(b)
    return (np.maximum(la, lb) + 0.05) / (np.minimum(la, lb) + 0.05)


def _label_chip(drawn: np.ndarray, band: int, colour: np.ndarray, box: tuple[int, int, int, int],
                width: int = 3) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1 inclusive) of the pixels of ``colour`` below the band and outside the outline
    (``width`` px, drawn inward) of the cell's ``box`` in the picture: its label's paper."""
    mask = (drawn == colour).all(axis=-1)
    mask[:band] = False  # the key's swatch
    x0, y0, x1, y1 = box
    outline = np.zeros_like(mask)
    outline[y0:y1 + 1, x0:x1 + 1] = True
    outline[y0 + width:y1 + 1 - width, x0 + width:x1 + 1 - width] = False
    ys, xs = np.nonzero(mask & ~outline)
    assert len(xs), "no label drawn in the cell's colour"
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_every_class_of_the_shipped_classifier_has_its_own_colour_and_readable_label_text() -> None:
    """Item 5 of the figure review: "1: ig 0.82" was white on yellow (1.3:1) and 6 colours served 9 classes
    (basophil and monocyte both blue). Each class's box and label paper now differ, uncertain stays orange and
    blast red, and each label's text contrasts at least 4.5:1 with its paper."""
    classes = list(read_bundle_info(pretrained_path(DEFAULT_CLASSIFIER)).classes)
    assert len(classes) == 9 and "blast" in classes
    cells = [_cell(k + 1, (20 + 170 * (k % 4), 60 + 170 * (k // 4), 120 + 170 * (k % 4), 160 + 170 * (k // 4)), name)
             for k, name in enumerate(classes)]
    cells.append(_cell(len(cells) + 1, (530, 400, 630, 500), UNCERTAIN, "monocyte", uncertain=True))
    drawn, band = _drawn(cells, classes)
    colours = {}
    for cell in cells:
        x0, y0 = int(cell.box[0]), int(cell.box[1]) + band
        colours[cell.label] = drawn[y0 + 50, x0 + 1]  # the box's left edge, half-way down
    assert tuple(colours["blast"]) == (213, 0, 0) and tuple(colours[UNCERTAIN]) == (230, 140, 0)
    assert len({tuple(c) for c in colours.values()}) == len(cells), colours  # no two classes share a colour
    for cell in cells:
        paper = colours[cell.label]
        x0, y0 = int(cell.box[0]), int(cell.box[1]) + band
        chip = drawn[y0 - 14:y0, x0:x0 + 40]  # the label's first characters, just above the box
        on_paper = chip[(chip == paper).all(axis=-1)]
        assert len(on_paper) > 50, cell.label  # the label is there
        ink = chip.reshape(-1, 3)[_contrast(chip.reshape(-1, 3), paper).argmax()]  # the text's own colour
        assert _contrast(ink, paper) >= 4.5, (cell.label, paper, ink)
    # The key in the band above the field: a swatch of each colour drawn, named.
    for name, colour in colours.items():
        assert (drawn[:band] == colour).all(axis=-1).sum() >= 25, f"no swatch of {name} in the band"


def test_a_label_stays_whole_inside_the_picture_at_its_right_edge() -> None:
    """Item 6 of the figure review: a blast at the right edge was labelled "3: blast 0." (its confidence cut by
    the border). Small cells at the right edge, one in the bottom-right corner: each label's paper is as wide as
    its text needs and lies wholly inside the picture, below the band."""
    from PIL import ImageDraw, ImageFont

    classes = ["blast", "lymphocyte"]
    corner = _cell(1, (680, 670, 699, 699), "blast")  # 19 px: its label is far wider than its box
    edge = _cell(2, (650, 300, 699, 350), UNCERTAIN, "lymphocyte", uncertain=True)
    drawn, band = _drawn([corner, edge], classes)
    height, width = drawn.shape[:2]
    font = ImageFont.load_default(size=11)
    for cell, text in ((corner, "1: blast 0.87"), (edge, "2: ? lymphocyte 0.87")):
        left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
        box = (int(cell.box[0]), int(cell.box[1]) + band, int(cell.box[2]), int(cell.box[3]) + band)
        x0, y0, x1, y1 = _label_chip(drawn, band, drawn[box[1] + 10, box[0] + 1], box)
        assert x1 - x0 == right - left + 2, (text, x0, x1)  # the whole text: not cut at the right
        assert x1 == width - 1 and y0 >= band and y1 < height, (x0, y0, x1, y1)  # moved left to the edge


def test_labels_of_neighbouring_cells_cover_neither_one_another_nor_the_other_cells() -> None:
    """Item 7 of the figure review: on a dense 224 px field "7: lymphocyte 1.00" was drawn across cell 5's box and
    the labels of neighbouring cells over one another. Four cells close together (as on all-taleqani's fields,
    drawn three times larger): each label is whole (its paper as wide as its text), and no label covers another's
    or another cell's box."""
    classes = list(read_bundle_info(pretrained_path(DEFAULT_CLASSIFIER)).classes)
    cells = [_cell(1, (100, 100, 160, 160), "basophil"),
             _cell(2, (100, 165, 160, 225), "eosinophil"),  # just below 1: a label above it would cover 1's box
             _cell(3, (170, 100, 230, 160), "monocyte"),  # right of 1: a label above it would cover 1's label
             _cell(4, (300, 105, 360, 165), "neutrophil")]
    drawn, band = _drawn(cells, classes)
    boxes = [(int(c.box[0]), int(c.box[1]) + band, int(c.box[2]), int(c.box[3]) + band) for c in cells]
    papers = [_label_chip(drawn, band, drawn[box[1] + 30, box[0] + 1], box) for box in boxes]

    def meet(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:  # both inclusive
        return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]

    for k, paper in enumerate(papers):
        assert paper[2] - paper[0] > 80, paper  # the whole label, not a sliver left between others
        for j in range(len(cells)):
            if j != k:
                assert not meet(paper, papers[j]), (k + 1, j + 1, paper, papers[j])
                assert not meet(paper, boxes[j]), (k + 1, j + 1, paper, boxes[j])
    # Deterministic: the same picture again.
    assert np.array_equal(drawn, _drawn(cells, classes)[0])


def test_possible_white_cells_are_drawn_dashed_and_said_in_the_band() -> None:
    """A field whose only white cell scored under the detector's threshold read "WBC 0" and showed nothing where the
    cell was: its box is drawn in black and white dashes, and the band says what they are."""
    rules = CountRules(("lymphocyte", "blast"), ("blast",))
    plain = SmearResult("f.png", 700, 700, [], {}, rules.count([]), cell_classes=["lymphocyte", "blast"])
    marked = SmearResult("f.png", 700, 700, [], {}, rules.count([]), cell_classes=["lymphocyte", "blast"],
                         possible_white_cells=[{"box": [100.0, 200.0, 220.0, 320.0], "detector_score": 0.41}])
    without = np.asarray(annotate(Image.new("RGB", (700, 700), GREY), plain))
    drawn = np.asarray(annotate(Image.new("RGB", (700, 700), GREY), marked))
    band = drawn.shape[0] - 700
    assert band > without.shape[0] - 700  # one more line in the band
    top = drawn[band + 200, 100:221]  # the box's top edge
    assert ((top == 0).all(axis=-1).any() and (top == 255).all(axis=-1).any()), "no black-and-white dashes"
    inside = drawn[band + 205:band + 315, 105:215]
    assert (inside == GREY).all()  # the cell itself not covered
