"""The annotated copy of a smear field: boxes, labels, the count and any warning."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from leukoscope.inference.smear_result import SmearResult
from leukoscope.labels import DISCLAIMER, UNCERTAIN

_COLOURS = {UNCERTAIN: (230, 140, 0), "blast": (213, 0, 0), "other": (0, 90, 200), "RBC": (200, 120, 120),
            "Platelets": (120, 60, 160)}
_CELL_PALETTE = [(0, 114, 178), (0, 158, 115), (204, 121, 167), (86, 180, 233), (240, 228, 66), (0, 0, 0)]
_WARNING_RED = (200, 0, 0)


def annotate(image: Image.Image, result: SmearResult) -> Image.Image:
    """Boxes on a copy of the image: white cells coloured by class with label and confidence,
    blasts red, uncertain orange, unfamiliar cells (unlike the classifier's training images)
    marked ``!``; other objects thin. At the top, the count, every quality warning (white on
    red, so that a reviewer who sees only the picture sees it too), what ``!`` means when a
    cell has it, and the decision-support sentence."""
    canvas = image.copy() if image.mode == "RGB" else image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    scale = max(1, round(max(canvas.size) / 700))
    try:
        font = ImageFont.load_default(size=11 * scale)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        font = ImageFont.load_default()
    if result.detections is not None:
        wbc_boxes = {tuple(np.round(cell.box, 2)) for cell in result.cells}
        for det in result.detections.detections():
            if tuple(np.round(det.box, 2)) in wbc_boxes:
                continue
            colour = _COLOURS.get(det.label, (150, 150, 150))
            draw.rectangle(det.box, outline=colour, width=scale)
    blast = set(result.differential.blast_classes)
    for cell in result.cells:
        if cell.uncertain:
            colour = _COLOURS[UNCERTAIN]
        elif cell.label in blast:
            colour = _COLOURS["blast"]
        else:
            index = result.cell_classes.index(cell.label) if cell.label in result.cell_classes else 0
            colour = _CELL_PALETTE[index % len(_CELL_PALETTE)]
        draw.rectangle(cell.box, outline=colour, width=3 * scale)
        text = f"{cell.cell_id}: {cell.label if not cell.uncertain else '? ' + cell.top_class} {cell.confidence:.2f}"
        if cell.unfamiliar:
            text = f"! {text}"
        x, y = cell.box[0], max(0, cell.box[1] - 14 * scale)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    d = result.differential
    count = f"WBC {d.total}"
    if d.blast_percentage_meaningful and d.blast_ci95 is not None:
        count += f", blasts {d.blast_percentage:.1f}% (95% CI {d.blast_ci95[0]:.1f}-{d.blast_ci95[1]:.1f}%)"
    elif d.blasts is not None:
        count += f", blasts {d.blasts} (no percentage below {d.min_cells} cells)"
    lines = [(f"WARNING: {w}", (255, 255, 255), _WARNING_RED) for w in d.warnings]
    lines += [(count, (0, 0, 0), (255, 255, 255))]
    if any(cell.unfamiliar for cell in result.cells):
        lines.append(("! = cell unlike the classifier's training images", (0, 0, 0), (255, 255, 255)))
    lines.append((DISCLAIMER, (0, 0, 0), (255, 255, 255)))
    y = 4
    for text, ink, paper in lines:
        for line in _wrap(draw, text, font, canvas.width - 8):
            left, top, right, bottom = draw.textbbox((4, y), line, font=font)
            draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=paper)
            draw.text((4, y), line, fill=ink, font=font)
            y = bottom + 4
    return canvas


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (a warning must not run off a 640 px field)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines
