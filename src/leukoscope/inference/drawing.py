"""The annotated copy of a smear field: boxes, labels, the count and any warning."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from leukoscope.inference.smear_result import SmearResult
from leukoscope.labels import DISCLAIMER, UNCERTAIN

_COLOURS = {UNCERTAIN: (230, 140, 0), "blast": (213, 0, 0), "other": (0, 90, 200), "RBC": (200, 120, 120),
            "Platelets": (120, 60, 160)}
_CELL_PALETTE = [(0, 114, 178), (0, 158, 115), (204, 121, 167), (86, 180, 233), (240, 228, 66), (0, 0, 0)]
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


def annotate(image: Image.Image, result: SmearResult) -> Image.Image:
    """The field with a text band above it. On the field: white cells boxed and coloured by
    class with label and confidence, blasts red, uncertain orange, unfamiliar cells (unlike the
    classifier's training images) marked ``!``; other objects thin. In the band: the count,
    every quality warning (white on red, so that a reviewer who sees only the picture sees it
    too), what ``!`` means when a cell has it, and the decision-support sentence. The band sits
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
    try:
        font = ImageFont.load_default(size=11 * scale)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        font = ImageFont.load_default()
    header = _laid_out(ImageDraw.Draw(field), _header_lines(result), font, field.width)
    band = int(header[-1][1][3]) + 2 + _MARGIN  # below the last line's paper
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
    blast = set(result.differential.blast_classes)
    for cell in result.cells:
        if cell.uncertain:
            colour = _COLOURS[UNCERTAIN]
        elif cell.label in blast:
            colour = _COLOURS["blast"]
        else:
            index = result.cell_classes.index(cell.label) if cell.label in result.cell_classes else 0
            colour = _CELL_PALETTE[index % len(_CELL_PALETTE)]
        box = shifted(cell.box)
        draw.rectangle(box, outline=colour, width=3 * scale)
        text = f"{cell.cell_id}: {cell.label if not cell.uncertain else '? ' + cell.top_class} {cell.confidence:.2f}"
        if cell.unfamiliar:
            text = f"! {text}"
        x, y = box[0], max(band, box[1] - 14 * scale)  # on the field, never over the band's text
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    for y, (left, top, right, bottom), line, ink, paper in header:
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=paper)
        draw.text((_MARGIN, y), line, fill=ink, font=font)
    return canvas


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
    lines.append((DISCLAIMER, (0, 0, 0), (255, 255, 255)))
    return lines


def _laid_out(draw: ImageDraw.ImageDraw, paragraphs: list[tuple[str, Colour, Colour]], font: ImageFont.ImageFont,
              width: int) -> list[tuple[int, tuple[int, int, int, int], str, Colour, Colour]]:
    """Each line of the band, wrapped to ``width``, top down: (where it is drawn, its text box,
    text, ink, paper). Laid out once, so that the band is as high as the lines drawn in it."""
    lines = []
    y = _MARGIN
    for text, ink, paper in paragraphs:
        for line in _wrap(draw, text, font, width - 2 * _MARGIN):
            box = draw.textbbox((_MARGIN, y), line, font=font)
            lines.append((y, box, line, ink, paper))
            y = box[3] + _MARGIN
    return lines


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (a warning must not run off a 640 px field)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines
