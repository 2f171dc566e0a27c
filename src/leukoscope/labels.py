"""Names shared by every layer: the uncertain bin, the decision-support sentence,
which cell classes are blasts and which are not white cells at all.

One definition each, so that the CLI, the reports and the service cannot drift apart
(an "uncertain" spelt twice, or a blast rule that differs between ``analyze`` and the
service, would change a differential without anyone noticing).
"""

from __future__ import annotations

import unicodedata
from typing import Iterable, Sequence

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


#: Classifier class names that are not white cells, matched as blast names are: platelets, and
#: nucleated red cells (pbc's ``erythroblast``; a detector boxes them as white cells, being nucleated).
#: A differential counts them but leaves them out of the white cells a blast percentage is taken of,
#: as a manual count reports nucleated red cells per 100 white cells, beside the differential.
PLATELET_NAMES: frozenset[str] = frozenset({"platelet", "platelets", "thrombocyte", "thrombocytes"})
NUCLEATED_RED_CELL_NAMES: frozenset[str] = frozenset({
    "erythroblast", "erythroblasts", "normoblast", "normoblasts", "nrbc", "nrbcs",
    "nucleated red cell", "nucleated red cells", "nucleated_red_cell",
})
NOT_WHITE_CELL_NAMES: frozenset[str] = PLATELET_NAMES | NUCLEATED_RED_CELL_NAMES


def not_white_classes_in(classes: Iterable[str], kind: frozenset[str] = NOT_WHITE_CELL_NAMES) -> list[str]:
    """The classes of ``classes`` that are not white cells (:data:`NOT_WHITE_CELL_NAMES`; ``kind``: only those of
    :data:`PLATELET_NAMES` or :data:`NUCLEATED_RED_CELL_NAMES`), in their order."""
    return [name for name in classes if name.strip().casefold() in kind]


def checked_blast_classes(blast_classes: Iterable[str], classes: Sequence[str]) -> list[str]:
    """``blast_classes`` chosen by a user, each once in the order given: every one must be one of ``classes``
    and a white cell (a class listed twice would count its cells twice; an erythroblast or platelet is left
    out of the white cells a blast percentage is taken of, so counting it as a blast could pass 100%)."""
    chosen = list(dict.fromkeys(blast_classes))
    unknown = [name for name in chosen if name not in classes]
    if unknown:
        raise ValueError(f"blast classes {unknown} are not among the cell classes {list(classes)}")
    not_white = not_white_classes_in(chosen)
    if not_white:
        raise ValueError(f"blast classes {not_white} are not white cells (nucleated red cells or platelets are "
                         f"counted apart from the white cells); a blast class must be a white-cell class")
    return chosen


def nfc(name: str) -> str:
    """``name`` in Unicode's composed form (NFC): macOS writes folder names decomposed ("e" + a combining accent),
    other systems and typed labels composed, so one "éosinophile" was two classes that print alike."""
    return unicodedata.normalize("NFC", name)


def case_clashes(names: Iterable[str]) -> list[list[str]]:
    """Groups of ``names`` that differ only in case, surrounding spaces or Unicode form (:func:`nfc`): as classes
    they would be two, as folders one on a case-insensitive file system (:func:`how_they_differ` says which)."""
    spellings: dict[str, list[str]] = {}
    for name in names:
        spellings.setdefault(nfc(name).casefold().strip(), []).append(name)
    return [group for group in spellings.values() if len(group) > 1]


def how_they_differ(names: Sequence[str]) -> str:
    """What sets apart ``names`` of one :func:`case_clashes` group, in words ("case", "surrounding spaces",
    "case and surrounding spaces", "Unicode form"): a trailing space was reported as a difference of case."""
    kinds = []
    if len({nfc(n).strip() for n in names}) > 1:
        kinds.append("case")
    if len({nfc(n).casefold() for n in names}) > 1:
        kinds.append("surrounding spaces")
    if not kinds:
        return "Unicode form (composed, or decomposed as macOS writes names)"
    return " and ".join(kinds)


def shown(name: str) -> str:
    """``name`` quoted, with its combining characters spelt out (``'e\\u0301osinophile'``) when it is not in
    composed form: two spellings that differ only so printed alike, and a message naming both read as nonsense."""
    return repr(name) if nfc(name) == name else ascii(name)


#: Characters no folder name may hold on some file system in use (Windows' set; "/" everywhere).
NOT_IN_FOLDER_NAMES = frozenset('<>:"/\\|?*')


def is_folder_name(label: str) -> bool:
    """Whether a class can name its own folder as it is (read back by ``leukoscope train --data`` as that class):
    not empty, no surrounding spaces or dots, none of :data:`NOT_IN_FOLDER_NAMES`, no control characters."""
    return bool(label) and label == label.strip() and not label.startswith(".") and not label.endswith(".") \
        and not any(c in NOT_IN_FOLDER_NAMES or ord(c) < 32 for c in label)


def resembled_name(label: str, names: Iterable[str]) -> str | None:
    """The name of ``names`` that ``label`` is another spelling of: the same but for case, spaces and Unicode form,
    or a slip of one letter (two in names of eight letters or more: ``blsat``, ``neutrophl``); None when it is
    none's. Real names that contain a class's (``band neutrophil``, ``promonocyte``) are not slips: they are
    classes of their own."""
    written = " ".join(nfc(label).split()).casefold()
    for name in names:
        known = " ".join(nfc(name).split()).casefold()
        if written == known or _edits(written, known) <= (2 if len(known) >= 8 else 1):
            return name
    return None


def _edits(a: str, b: str) -> int:
    """Letters to insert, delete, change or swap with a neighbour to turn ``a`` into ``b`` (optimal string
    alignment distance)."""
    if abs(len(a) - len(b)) > 2:
        return 3  # more than any slip allowed
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]
