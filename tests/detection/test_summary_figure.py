"""summary.png: a run's pooled differential as a picture (leukoscope.inference.summary_figure)."""

from __future__ import annotations

import numpy as np

from leukoscope.inference.differential import CountRules
from leukoscope.inference.summary_figure import WIDTH, blast_line, differential_figure

RULES = CountRules(("blast", "lymphocyte", "neutrophil", "platelet"), ("blast",))
RED = np.array((213, 0, 0))


def _red_columns(picture) -> np.ndarray:
    """The x of every pixel of the blast colour."""
    pixels = np.asarray(picture).astype(int)
    return np.nonzero((np.abs(pixels - RED).sum(axis=2) < 10))[1]


def test_the_blast_bar_is_as_long_as_its_share_and_warnings_are_on_red() -> None:
    few = RULES.count(["blast"] * 30 + ["lymphocyte"] * 70 + ["platelet"] * 5)
    many = RULES.count(["blast"] * 60 + ["lymphocyte"] * 40 + ["platelet"] * 5)
    pictures = [differential_figure(d, fields=4) for d in (few, many)]
    assert all(p.width == WIDTH for p in pictures)
    # the blast bar (red) reaches further with twice the blasts: 30 and 60 per 100 white cells
    widths = [np.ptp(_red_columns(p.crop((0, 0, p.width, 90 + 26 * 2)))) for p in pictures]
    assert widths[1] > 1.8 * widths[0] > 0
    warned = RULES.count(["blast"] * 30 + ["lymphocyte"] * 70, warnings=["The detector returned too many boxes"])
    assert warned.flags[0].startswith("WARNING")
    band = np.asarray(differential_figure(warned, fields=4)).astype(int)
    # a line-wide band of the warning red (200, 0, 0) under the WARNING flag
    rows = ((np.abs(band - (200, 0, 0)).sum(axis=2) < 10).sum(axis=1))
    assert rows.max() > 0.8 * WIDTH


def test_no_cell_and_no_blast_class_say_so() -> None:
    empty, no_blast = RULES.count([]), CountRules(("lymphocyte",), ()).count(["lymphocyte"] * 5)
    assert blast_line(empty) == "Blasts: no white cell counted"
    assert blast_line(no_blast).startswith("Blasts: not counted (no blast class")
    assert blast_line(RULES.count(["blast"] * 3 + ["lymphocyte"] * 7)) == (
        "Blasts: 3 of 10 white cells = 30.0% (95% CI 10.8-60.3%): not meaningful below 100 cells")
    for picture in (differential_figure(empty, fields=2, failed=2), differential_figure(no_blast, fields=1)):
        assert picture.width == WIDTH and picture.height > 200
    # without a blast class no flag can be raised: no threshold (red) is drawn
    assert len(_red_columns(differential_figure(no_blast, fields=1))) == 0
    assert len(_red_columns(differential_figure(empty, fields=2))) > 0  # the threshold, dashed
