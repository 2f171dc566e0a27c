"""A single-cell case's warnings that doubt only the classifier's calls hold back its leukemia flag until a
hematologist has labelled every cell (leukoscope.service.cases.current_differential)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from leukoscope.inference.differential import LEUKEMIA_WORDING
from leukoscope.inference.quality import GRAYSCALE_CELL_WARNING, NO_WHITE_CELL_WARNING, tiny_cell_warning
from leukoscope.light import CELL_LIGHT_WARNING
from leukoscope.service.cases import current_differential


def _case(warning: str, reviewed: bool) -> SimpleNamespace:
    """100 single-cell images, 30 of them blasts: enough cells, and a blast share past the flag's 20%."""
    images = [SimpleNamespace(id=i, position=i, sha256=f"h{i}") for i in range(100)]
    labels = ["blast" if i < 30 else "lymphocyte" for i in range(100)]
    cells = [SimpleNamespace(image_id=i, final_label=label, reviewed_label=label if reviewed else None)
             for i, label in enumerate(labels)]
    analysis = {"blast_classes": ["blast"], "warnings": [f"{warning} [in 1 of 100 images: x.png]"]}
    return SimpleNamespace(kind="cell", images=images, cells=cells, classes=["blast", "lymphocyte"], analysis=analysis)


def _flagged(case: SimpleNamespace) -> bool:
    return any(LEUKEMIA_WORDING in flag for flag in current_differential(case)["flags"])


@pytest.mark.parametrize("warning", [NO_WHITE_CELL_WARNING, GRAYSCALE_CELL_WARNING, tiny_cell_warning(20, 20),
                                     CELL_LIGHT_WARNING])
def test_the_warning_holds_the_flag_back_until_every_cell_is_reviewed(warning: str) -> None:
    assert not _flagged(_case(warning, reviewed=False))
    assert _flagged(_case(warning, reviewed=True))  # a grey image's warning stood after any review
