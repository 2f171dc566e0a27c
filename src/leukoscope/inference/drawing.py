"""The annotated copy of a smear field: boxes, labels, the count and any warning."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from leukoscope.inference.smear_result import SmearResult
from leukoscope.labels import DISCLAIMER, UNCERTAIN

#: Blasts red, uncertain cells orange: in every picture of a count (the annotated field, summary.png).
BLAST_RED, UNCERTAIN_ORANGE = (213, 0, 0), (230, 140, 0)
_COLOURS = {UNCERTAIN: UNCERTAIN_ORANGE, "blast": BLAST_RED, "other": (0, 90, 200), "RBC": (200, 120, 120),
            "Platelets": (120, 60, 160)}
# One colour for each of the shipped classifier's 8 cell types besides blast (in the order of its classes: basophil,
# eosinophil, erythroblast, ig, lymphocyte, monocyte, neutrophil, platelet), none of them red or orange (blast and
# uncertain). Six are Okabe and Ito's colour-blind-safe set without its orange and vermillion; wine and navy (after
# Paul Tol) make eight without making the closest pair closer, in CIELAB for normal, deutan and protan vision
# (reddish purple and bluish green, as in the six alone). A classifier with more classes repeats them.
_CELL_PALETTE = [(86, 180, 233), (204, 121, 167), (136, 34, 85), (240, 228, 66), (0, 0, 0), (0, 158, 115),
                 (0, 114, 178), (0, 40, 100)]
_WARNING_RED = (200, 0, 0)
_MARGIN = 4
_SMALL_FIELD = 640  # a field whose longer side is shorter is drawn enlarged (labels legible)
Colour = tuple[int, int, int]


def enlargement(size: tuple[int, int]) -> int:
    """How many times the annotated picture enlarges a field of ``size`` (width, height): a whole
    number, so that each pixel becomes a square block and nothing is invented between them. On a
    224 px field (all-taleqani's) an 11 px label is half the width of the field and the labels of
    neighbouring cells cover one another and the cells; three times larger they do not."""
    return max(1, -(-_SMALL_FIELD // max(size)))


def cell_colours(result: SmearResult) -> dict[str, Colour]:
    """The box colour of each class a cell of ``result`` can be labelled with, and of ``uncertain``: blasts
    red, uncertain orange, the other classes :data:`_CELL_PALETTE` in the classifier's order without the blast
    classes (so that the 8 other types of the shipped classifier get 8 different colours)."""
    blast = set(result.differential.blast_classes)
    others = [name for name in result.cell_classes if name not in blast]
    colours = {name: _CELL_PALETTE[k % len(_CELL_PALETTE)] for k, name in enumerate(others)}
    colours.update({name: _COLOURS["blast"] for name in blast})
    colours[UNCERTAIN] = _COLOURS[UNCERTAIN]
    for cell in result.cells:  # a label the classifier's class list lacks (not expected): the first colour
        colours.setdefault(cell.label, _CELL_PALETTE[0])
    return colours


def ink_on(paper: Colour) -> Colour:
    """Black or white, whichever contrasts more with ``paper`` (WCAG 2 contrast ratio of relative luminances).
    One of the two always reaches 4.58:1, above the 4.5:1 WCAG asks of small text; white on the IG's yellow
    had been 1.3:1."""
    def linear(channel: int) -> float:
        v = channel / 255
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    luminance = 0.2126 * linear(paper[0]) + 0.7152 * linear(paper[1]) + 0.0722 * linear(paper[2])
    # contrast with white (1.05 / (L + 0.05)) against with black ((L + 0.05) / 0.05)
    return (255, 255, 255) if 1.05 / (luminance + 0.05) >= (luminance + 0.05) / 0.05 else (0, 0, 0)


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font at ``size`` px (no font file to ship or find)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def annotate(image: Image.Image, result: SmearResult) -> Image.Image:
    """The field with a text band above it. On the field: white cells boxed and coloured by
    class with label and confidence, blasts red, uncertain orange, unfamiliar cells (unlike the
    classifier's training images) marked ``!``; possible white cells (scored under the detector's threshold, not
    counted) dashed black and white; other objects thin; the labels over the boxes,
    placed clear of one another (:func:`_label_position`). In the band: the count,
    every quality warning (white on red, so that a reviewer who sees only the picture sees it
    too), what ``!`` means when a cell has it, the decision-support sentence and a key to the
    colours of the classes drawn. The band sits
    above the field, not on it, so that no cell is hidden under the text (on a 224 px field it
    would cover a third of the image); the picture keeps the field's width, enlarged by
    :func:`enlargement` when the field is small."""
    field = image.copy() if image.mode == "RGB" else image.convert("RGB")
    # Text and lines are sized for the field as it came, so that on an enlarged one they are smaller beside the cells.
    # By the field's area, not its longer side: a thin strip (200000 x 10 px) must not get letters 3000 px tall.
    scale = max(1, round(math.sqrt(field.width * field.height) / 700))
    factor = enlargement(field.size)
    if factor > 1:
        field = field.resize((field.width * factor, field.height * factor), Image.Resampling.NEAREST)
    font = load_font(11 * scale)
    colours = cell_colours(result)
    header = _laid_out(ImageDraw.Draw(field), _header_lines(result), font, field.width)
    legend = _legend(ImageDraw.Draw(field), _legend_entries(result, colours), font, field.width,
                     int(header[-1][1][3]) + 2 + _MARGIN)
    band = max([int(header[-1][1][3])] + [int(box[3]) for box, *_ in legend]) + 2 + _MARGIN  # below the last line
    canvas = Image.new("RGB", (field.width, field.height + band), (255, 255, 255))
    canvas.paste(field, (0, band))
    draw = ImageDraw.Draw(canvas)

    def shifted(box) -> tuple[float, float, float, float]:  # field pixels -> the picture's
        return box[0] * factor, box[1] * factor + band, box[2] * factor, box[3] * factor + band

    if result.detections is not None:
        wbc_boxes = {tuple(np.round(cell.box, 2)) for cell in result.cells}
        for det in result.detections.detections():
            if tuple(np.round(det.box, 2)) in wbc_boxes:
                continue
            colour = _COLOURS.get(det.label, (150, 150, 150))
            draw.rectangle(shifted(det.box), outline=colour, width=scale)
    for possible in result.possible_white_cells:  # not counted: dashed black and white, seen on any stain
        _dashed_rectangle(draw, shifted(possible["box"]), 2 * scale, 6 * scale)
    drawn = [(cell, colours[UNCERTAIN if cell.uncertain else cell.label], shifted(cell.box)) for cell in result.cells]
    for _, colour, box in drawn:  # every box first, then the labels over them: no box is drawn across a label
        draw.rectangle(box, outline=colour, width=3 * scale)
    boxes = np.array([box for _, _, box in drawn], float).reshape(-1, 4)
    papers = np.empty((len(drawn), 4))  # the labels placed so far
    for k, (cell, colour, box) in enumerate(drawn):
        text = f"{cell.cell_id}: {cell.label if not cell.uncertain else '? ' + cell.top_class} {cell.confidence:.2f}"
        if cell.unfamiliar:
            text = f"! {text}"
        # The label's paper: its text box and 1 px round it.
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = right - left + 2, bottom - top + 2
        x, y = _label_position(box, (width, height), np.delete(boxes, k, axis=0), papers[:k], canvas.size, band,
                               3 * scale)
        papers[k] = (x, y, x + width, y + height)
        draw.rectangle((x, y, x + width, y + height), fill=colour)
        draw.text((x + 1 - left, y + 1 - top), text, fill=ink_on(colour), font=font)
    for y, (left, top, right, bottom), line, ink, paper in header:
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=paper)
        draw.text((_MARGIN, y), line, fill=ink, font=font)
    for swatch, (x, y), name, colour in legend:
        draw.rectangle(swatch, fill=colour, outline=(90, 90, 90))  # the outline: a yellow swatch on white paper
        draw.text((x, y), name, fill=(0, 0, 0), font=font)
    return canvas


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], width: int,
                      dash: int) -> None:
    """``box``'s outline in dashes of ``dash`` px, black and white in turn, ``width`` px wide, drawn inward."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    for a, b, fixed, horizontal in ((x0, x1, y0, True), (x0, x1, y1 - width + 1, True), (y0, y1, x0, False),
                                    (y0, y1, x1 - width + 1, False)):
        for k, start in enumerate(range(a, b + 1, dash)):
            end = min(start + dash - 1, b)
            ink = (0, 0, 0) if k % 2 == 0 else (255, 255, 255)
            rect = (start, fixed, end, fixed + width - 1) if horizontal else (fixed, start, fixed + width - 1, end)
            draw.rectangle(rect, fill=ink)


def _label_position(box: tuple[float, float, float, float], size: tuple[int, int], boxes: np.ndarray,
                    papers: np.ndarray, canvas: tuple[int, int], band: int, line: int) -> tuple[float, float]:
    """Where the top-left corner of a cell's label (its paper, ``size`` px) goes: the first of a few places by its
    ``box`` (above it, below it, inside its top; left-aligned, then right-aligned) that covers neither a label
    placed before (``papers``) nor the box of another cell (``boxes``). Where all do, the one that covers the least
    label, then the least box, the earlier on a tie: deterministic, and a few array operations per place. Each
    place is kept whole inside the picture: below the band (never over its text), left of the right edge (a
    blast's "0.70" was cut to "0.") and above the bottom. On a dense 224 px field the labels of neighbouring cells
    had covered one another and the cells' boxes."""
    width, height = size
    x0, y0, x1, y1 = box
    best, least = (0.0, 0.0), (math.inf, math.inf)
    for x, y in ((x0, y0 - 1 - height), (x0, y1 + 1), (x0, y0 + line),
                 (x1 - width, y0 - 1 - height), (x1 - width, y1 + 1), (x1 - width, y0 + line)):
        x = max(0.0, min(x, canvas[0] - 1 - width))  # x + width is the paper's last column
        y = max(band, min(y, canvas[1] - 1 - height))
        covered = (_covered((x, y, x + width, y + height), papers), _covered((x, y, x + width, y + height), boxes))
        if covered == (0.0, 0.0):
            return x, y
        if covered < least:
            best, least = (x, y), covered
    return best


def _covered(rect: tuple[float, float, float, float], rects: np.ndarray) -> float:
    """The area of ``rect`` that ``rects`` (N, 4; both with their last row and column drawn) cover, summed."""
    if not len(rects):
        return 0.0
    wide = np.minimum(rects[:, 2], rect[2]) - np.maximum(rects[:, 0], rect[0]) + 1
    high = np.minimum(rects[:, 3], rect[3]) - np.maximum(rects[:, 1], rect[1]) + 1
    return float((np.clip(wide, 0, None) * np.clip(high, 0, None)).sum())


def _legend_entries(result: SmearResult, colours: dict[str, Colour]) -> list[tuple[str, Colour]]:
    """(name, colour) of each class a cell of this field is labelled with, in the classifier's order, uncertain
    last: the key to the box colours, kept to the classes drawn so that it takes one line on most fields."""
    drawn = {cell.label for cell in result.cells}
    names = [name for name in [*result.cell_classes, UNCERTAIN] if name in drawn]
    names += sorted(drawn - set(names))
    return [(f"{name} (?)" if name == UNCERTAIN else name, colours[name]) for name in names]


def _legend(draw: ImageDraw.ImageDraw, entries: list[tuple[str, Colour]], font: ImageFont.ImageFont, width: int,
            y: int) -> list[tuple[tuple[int, int, int, int], tuple[int, int], str, Colour]]:
    """The legend laid out from ``y`` down, wrapped to ``width``: (swatch, where the name is drawn, name, colour)
    of each entry."""
    laid: list[tuple[tuple[int, int, int, int], tuple[int, int], str, Colour]] = []
    if not entries:
        return laid
    _, top, _, bottom = draw.textbbox((0, 0), "Xg", font=font)
    side = bottom - top  # a swatch as tall as the letters
    gap = max(3, side // 3)
    x = _MARGIN
    for name, colour in entries:
        item = side + gap + int(math.ceil(draw.textlength(name, font=font)))
        if x > _MARGIN and x + item > width - _MARGIN:
            x, y = _MARGIN, y + side + _MARGIN
        laid.append(((x, y + top, x + side, y + top + side), (x + side + gap, y), name, colour))
        x += item + 3 * gap
    return laid


def _header_lines(result: SmearResult) -> list[tuple[str, Colour, Colour]]:
    """(text, ink, paper) of each paragraph of the band: warnings first, then the count."""
    d = result.differential
    count = f"WBC {d.total}"
    if d.blast_percentage_meaningful and d.blast_ci95 is not None:
        count += (f", blasts {d.blasts} ({d.blast_percentage:.1f}%, 95% CI {d.blast_ci95[0]:.1f}-"
                  f"{d.blast_ci95[1]:.1f}%)")  # the count too: one blast in 2,501 cells reads 0.0%
    elif d.blasts is not None:
        count += f", blasts {d.blasts} (no percentage below {d.min_cells} cells)"
    lines = [(f"WARNING: {w}", (255, 255, 255), _WARNING_RED) for w in d.warnings]
    lines += [(count, (0, 0, 0), (255, 255, 255))]
    if any(cell.unfamiliar for cell in result.cells):
        lines.append(("! = cell unlike the classifier's training images", (0, 0, 0), (255, 255, 255)))
    if result.possible_white_cells:
        lines.append(("dashed black and white: possible white cell scored under the detector's threshold, not counted",
                      (0, 0, 0), (255, 255, 255)))
    lines.append((DISCLAIMER, (0, 0, 0), (255, 255, 255)))
    return lines


def _laid_out(draw: ImageDraw.ImageDraw, paragraphs: list[tuple[str, Colour, Colour]], font: ImageFont.ImageFont,
              width: int) -> list[tuple[int, tuple[int, int, int, int], str, Colour, Colour]]:
    """Each line of the band, wrapped to ``width``, top down: (where it is drawn, its text box,
    text, ink, paper). Laid out once, so that the band is as high as the lines drawn in it."""
    lines = []
    y = _MARGIN
    for text, ink, paper in paragraphs:
        for line in wrap_text(draw, text, font, width - 2 * _MARGIN):
            box = draw.textbbox((_MARGIN, y), line, font=font)
            lines.append((y, box, line, ink, paper))
            y = box[3] + _MARGIN
    return lines


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (a warning must not run off a 640 px field)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines
