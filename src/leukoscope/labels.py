"""Names shared by every layer: the uncertain bin, the decision-support sentence,
and which cell classes are blasts.

One definition each, so that the CLI, the reports and the service cannot drift apart
(an "uncertain" spelt twice, or a blast rule that differs between ``analyze`` and the
service, would change a differential without anyone noticing).
"""

from __future__ import annotations

from typing import Iterable

#: The label of a cell whose classifier confidence is below its threshold.
UNCERTAIN = "uncertain"

#: Printed on every report, annotated image and result that could be read as a finding.
DISCLAIMER = "Decision support for trained staff, not a diagnosis."

#: Classifier class names counted as blasts when no blast classes are given, matched
#: exactly (case-insensitive, surrounding spaces ignored), never by substring: an
#: "erythroblast" or "normoblast" is a normal nucleated red cell (pbc's class), not a
#: leukemic blast. The names: generic blasts, C-NMC's ``all`` (ALL cells), a binary
#: ``malignant`` class, and the Taleqani B-ALL subtypes (early pre-B, pre-B and pro-B
#: lymphoblasts) under their short and long names.
BLAST_CLASS_NAMES: frozenset[str] = frozenset({
    "blast", "blasts", "blast cell", "blast cells", "blast_cell", "blast_cells",
    "lymphoblast", "lymphoblasts", "myeloblast", "myeloblasts", "monoblast", "monoblasts",
    "all", "malignant",
    "early", "pre", "pro", "early pre-b", "pre-b", "pro-b",
})


def is_blast_class(name: str) -> bool:
    """True when ``name`` is one of :data:`BLAST_CLASS_NAMES` (exactly, case-insensitive)."""
    return name.strip().casefold() in BLAST_CLASS_NAMES


def blast_classes_in(classes: Iterable[str]) -> list[str]:
    """The classes of ``classes`` that are blasts, in their order and spelling."""
    return [name for name in classes if is_blast_class(name)]
