"""The picture of a run's pooled differential (``summary.png`` beside ``summary.csv`` / ``summary.json``).

A reader who opens one file of a folder run should see what the JSON says: the white cells counted per
class (bars per 100 white cells), the blast percentage with its 95% interval against the flag's threshold,
every flag and warning, and the decision-support sentence. Drawn with Pillow, as the annotated fields are
(``analyze`` loads no matplotlib).
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from leukoscope.inference.differential import Differential
from leukoscope.inference.drawing import BLAST_RED, UNCERTAIN_ORANGE, load_font, wrap_text
from leukoscope.labels import DISCLAIMER, UNCERTAIN

WIDTH = 960
_MARGIN = 16
_NAME_WIDTH = 190
_BAR_WIDTH = 480
_ROW = 26
_INK, _GREY, _PAPER = (0, 0, 0), (110, 110, 110), (255, 255, 255)
_BLAST, _UNCERTAIN_COLOUR, _OTHER, _NOT_WHITE = BLAST_RED, UNCERTAIN_ORANGE, (0, 90, 200), (170, 170, 170)
_WARNING = (200, 0, 0)


def _rows(differential: Differential) -> list[tuple[str, int, float, tuple[int, int, int]]]:
    """(class, cells, per 100 white cells, colour): the white-cell classes, uncertain, then those not white."""
    white = [name for name in differential.counts if name not in differential.not_white and name != UNCERTAIN]
    rows = []
    for name in [*white, UNCERTAIN, *differential.not_white]:
        if name not in differential.counts:
            continue
        colour = (_BLAST if name in differential.blast_classes else _UNCERTAIN_COLOUR if name == UNCERTAIN
                  else _NOT_WHITE if name in differential.not_white else _OTHER)
        rows.append((name, differential.counts[name], differential.per_100.get(name, 0.0), colour))
    return rows


def blast_line(differential: Differential) -> str:
    """The figure's line on blasts: the count, percentage and interval, or why there is none."""
    if differential.blasts is None:
        return "Blasts: not counted (no blast class among the cell classes)"
    if differential.blast_percentage is None:
        return "Blasts: no white cell counted"
    low, high = differential.blast_ci95 or (0.0, 0.0)
    cells = f"{differential.total} white cell{'' if differential.total == 1 else 's'}"
    percent = f"{differential.blast_percentage:.1f}% (95% CI {low:.1f}-{high:.1f}%)"
    text = f"Blasts: {differential.blasts} of {cells} = {percent}"
    if not differential.blast_percentage_meaningful:
        text += f": not meaningful below {differential.min_cells} cells"
    return text


def differential_figure(differential: Differential, fields: int, failed: int = 0,
                        blast_flag_percent: float = 20.0, unit: str = "field") -> Image.Image:
    """The pooled ``differential`` of ``fields`` images (``failed`` of them unreadable) as a picture."""
    title_font, font, small = load_font(22), load_font(16), load_font(13)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = WIDTH - 2 * _MARGIN
    read = fields - failed
    total = differential.total
    title = f"Differential of {read} {unit}{'' if read == 1 else 's'}: {total} white cell{'' if total == 1 else 's'}"
    if failed:
        title += f" ({failed} {unit}{'' if failed == 1 else 's'} unreadable)"
    rows = _rows(differential)
    notes = [(line, _PAPER, _WARNING) for flag in differential.flags if flag.startswith("WARNING")
             for line in wrap_text(scratch, flag, font, text_width - 8)]
    notes += [(line, _INK, _PAPER) for flag in differential.flags if not flag.startswith("WARNING")
              for line in wrap_text(scratch, flag, font, text_width)]
    notes += [(line, _GREY, _PAPER) for line in wrap_text(scratch, DISCLAIMER, small, text_width)]
    height = _MARGIN + 34 + _ROW * (len(rows) + 1) + 24 + 30 + 70 + 22 * len(notes) + _MARGIN
    canvas = Image.new("RGB", (WIDTH, height), _PAPER)
    draw = ImageDraw.Draw(canvas)
    y = _MARGIN
    draw.text((_MARGIN, y), title, font=title_font, fill=_INK)
    y += 34
    legend = "cells (per 100 white cells)"
    if differential.not_white:
        legend += f"; {', '.join(differential.not_white)}: beside the white cells, not counted among them"
    draw.text((_MARGIN + _NAME_WIDTH, y), legend, font=small, fill=_GREY)
    y += _ROW
    scale = _BAR_WIDTH / max(100.0, max((per for *_, per, _ in rows), default=0.0))
    for name, cells, per, colour in rows:
        draw.text((_MARGIN, y + 4), name, font=font, fill=_INK)
        left = _MARGIN + _NAME_WIDTH
        draw.rectangle((left, y + 3, left + _BAR_WIDTH, y + _ROW - 5), outline=(225, 225, 225))
        if per > 0:
            draw.rectangle((left, y + 3, left + max(1.0, per * scale), y + _ROW - 5), fill=colour)
        draw.text((left + _BAR_WIDTH + 12, y + 4), f"{cells}  ({per:.1f})", font=font, fill=_INK)
        y += _ROW
    y += 24
    draw.text((_MARGIN, y), blast_line(differential), font=font, fill=_INK)
    y += 30
    if differential.blasts is not None:  # without a blast class no flag can be raised: no threshold to draw
        _blast_axis(draw, differential, blast_flag_percent, _MARGIN + _NAME_WIDTH, y, small)
    y += 70
    for line, ink, paper in notes:
        if paper != _PAPER:
            box = draw.textbbox((_MARGIN + 4, y), line, font=font)
            draw.rectangle((_MARGIN, box[1] - 2, WIDTH - _MARGIN, box[3] + 2), fill=paper)
        draw.text((_MARGIN + 4, y), line, font=small if ink == _GREY else font, fill=ink)
        y += 22
    return canvas


def _blast_axis(draw: ImageDraw.ImageDraw, differential: Differential, threshold: float, left: int, top: int,
                font: ImageFont.ImageFont) -> None:
    """0-100% with the flag's threshold dashed, the blast percentage as a dot and its 95% interval as a bar."""
    y = top + 18

    def x(percent: float) -> float:
        return left + _BAR_WIDTH * percent / 100.0

    draw.line((x(0), y, x(100), y), fill=_GREY, width=1)
    for tick in range(0, 101, 20):
        draw.line((x(tick), y - 4, x(tick), y + 4), fill=_GREY)
        draw.text((x(tick) - 8, y + 8), f"{tick}%", font=font, fill=_GREY)
    for dash in range(0, 36, 6):  # the threshold, dashed
        draw.line((x(threshold), top + dash - 4, x(threshold), top + dash - 1), fill=_BLAST, width=2)
    draw.text((x(threshold) + 4, top - 6), f"flag at {threshold:g}%", font=font, fill=_BLAST)
    if differential.blast_percentage is None or differential.blast_ci95 is None:
        return
    low, high = differential.blast_ci95
    draw.line((x(low), y, x(high), y), fill=_INK, width=4)
    for end in (low, high):
        draw.line((x(end), y - 7, x(end), y + 7), fill=_INK, width=2)
    p = x(differential.blast_percentage)
    draw.ellipse((p - 6, y - 6, p + 6, y + 6), fill=_BLAST, outline=_INK)


def save_differential_figure(path, differential: Differential, fields: int, failed: int = 0,
                             blast_flag_percent: float = 20.0, unit: str = "field") -> None:
    differential_figure(differential, fields, failed, blast_flag_percent, unit).save(path)

