"""The export of reviewed labels: the reviewed cells, one copy of each, as class folders or a CSV in a ZIP
(what `leukoscope train --init ... --data` takes), and what is left out and why."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, selectinload

from leukoscope.data.fingerprints import DIGEST_CHARS, PNG_SIGNATURE, with_source_digest
from leukoscope.labels import case_clashes, is_folder_name
from leukoscope.service.auth import Principal, audit
from leukoscope.service.cases import EXCLUDED, image_scale, repeated_images
from leukoscope.service.errors import ServiceError
from leukoscope.service.tables import CaseImage, Cell


EXPORT_LAYOUTS = ("folders", "csv")
#: Why a reviewed cell is left out of the export (the export page, the ZIP's NOTES.txt and the API's header say it).
UNFRAMED_REASON = ("their single-cell image had no scale (none stated, too few red cells), so the classifier saw "
                   "the whole image instead of its physical window: the cell is not at the size a model trained on "
                   "the export sees; upload such images again with the microscope's scale (um_per_px)")


@dataclass
class Export:
    """A written export: the ZIP's path, the cells in it, the reviewed cells left out (:func:`unframed`, and the
    copies of :func:`one_copy_each`) and how many cells' copies were reviewed with different labels."""

    path: str
    cells: int
    left_out: int
    conflicts: int = 0


@dataclass
class ExportSelection:
    """What an export holds and what it leaves out, and why (:func:`exportable_cells`)."""

    cells: list[Cell]
    unframed: list[Cell] = field(default_factory=list)
    copies: list[tuple[Cell, Cell]] = field(default_factory=list)
    """(a cell left out, the exported cell it is a copy of)."""
    conflicts: list[list[Cell]] = field(default_factory=list)
    """The copies of one cell, the exported one first, where their reviewed labels differ."""
    excluded: int = 0
    """Reviewed cells marked excluded (never exported: said when nothing else is there)."""

    @property
    def left_out(self) -> list[Cell]:
        return self.unframed + [copy for copy, _kept in self.copies]


def unframed(cell: Cell) -> bool:
    """A single-cell image that a classifier of a physical window classified whole, for want of a scale: no crop
    of its window was stored, and the whole image would train a model on cells of the wrong size (one without a
    window takes images as they are: its cells have no scale record and are exported whole, as it saw them)."""
    if cell.crop_object is not None:
        return False
    scale = image_scale(cell.case, cell.image)
    return scale is not None and not scale.get("um_per_px")


#: Two boxes of one file overlapping at least this much (intersection over union) are one cell: a field analysed
#: again at another stated scale, or by another detector, boxes its cells a few pixels apart.
SAME_CELL_IOU = 0.5


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def same_cell(cell: Cell, other: Cell) -> bool:
    """One cell whichever case holds it: the same image file (SHA-256, as :func:`earlier_uploads` finds a file sent
    again), and boxes overlapping by :data:`SAME_CELL_IOU` (no box: a single-cell image, the whole image is the
    cell)."""
    if cell.image.sha256 != other.image.sha256 or bool(cell.box) != bool(other.box):
        return False
    return not cell.box or box_iou(cell.box, other.box) >= SAME_CELL_IOU


def one_copy_each(cells: Sequence[Cell]) -> tuple[list[Cell], list[tuple[Cell, Cell]], list[list[Cell]]]:
    """A file uploaded in several cases has its cells reviewed in each: the export keeps each cell once, the
    copy of the earliest case (by upload time) that holds it reviewed, so that a later upload of the file does
    not change what an export holds. Returns the kept cells (in ``cells``' order), the copies left out (each with
    the cell kept) and the copies whose labels differ (the kept one first): ``train`` on both had warned that
    "byte-identical images carry different labels" and learned from both."""
    by_file: dict[str, list[list[Cell]]] = {}
    for cell in sorted(cells, key=lambda cell: (cell.case.created_at, cell.case_id, cell.position)):
        groups = by_file.setdefault(cell.image.sha256, [])
        # a cell of another case joins the first group it is the same cell as (:func:`same_cell`), never one of
        # its own case: two cells of one field are two cells, however close
        group = next((g for g in groups if all(c.case_id != cell.case_id for c in g) and same_cell(g[0], cell)),
                     None)
        if group is None:
            groups.append([cell])
        else:
            group.append(cell)
    every = [group for groups in by_file.values() for group in groups]
    copies = [(copy, group[0]) for group in every for copy in group[1:]]
    conflicts = [group for group in every if len({cell.reviewed_label for cell in group}) > 1]
    left_out = {copy.id for copy, _kept in copies}
    return [cell for cell in cells if cell.id not in left_out], copies, conflicts


def exportable_cells(db: Session) -> ExportSelection:
    """The reviewed cells of an export (not excluded, not a repeated file's copy in its case, each cell of a file
    uploaded in several cases once: :func:`one_copy_each`), and those left out because they were classified
    unframed (:func:`unframed`) or are another case's copy."""
    reviewed = and_(Cell.reviewed_label.is_not(None), Cell.reviewed_label != EXCLUDED)
    cells = db.scalars(
        select(Cell).where(reviewed).options(selectinload(Cell.image), selectinload(Cell.case))
        .order_by(Cell.case_id, Cell.position)
    ).all()
    # A file sent twice in one case: its later copy's cells (cases stored before they were left out) once only.
    images: dict[str, list[CaseImage]] = {}
    for image in db.scalars(select(CaseImage).where(CaseImage.case_id.in_(select(Cell.case_id).where(reviewed)))):
        images.setdefault(image.case_id, []).append(image)
    repeats = {image_id for case_images in images.values() for image_id in repeated_images(case_images)}
    cells = [cell for cell in cells if cell.image_id not in repeats]
    # Unframed cells first: a framed copy of one in another case (sent again with its scale) is then exported.
    framed, copies, conflicts = one_copy_each([cell for cell in cells if not unframed(cell)])
    excluded = db.scalar(select(func.count()).select_from(Cell).where(Cell.reviewed_label == EXCLUDED)) or 0
    return ExportSelection(framed, [cell for cell in cells if unframed(cell)], copies, conflicts, excluded)


def export_dataset(db: Session, principal: Principal, read_object: Callable[[str], bytes], layout: str,
                   request=None, workdir: str | Path | None = None) -> Export:
    """Every reviewed cell as a training image, in a ZIP written to a temporary file:
    ``folders``: ``<label>/case-<id>-cell-<n>.png`` (what ``leukoscope train --data`` reads);
    ``csv``: ``images/...png`` plus ``manifest.csv`` (path,label,subject,...), subject = case,
    so that a split keeps the cells of one case together. Cells classified whole for want of a scale are left
    out (:func:`unframed`), and so are the copies of a cell whose file was uploaded in several cases (one kept:
    :func:`one_copy_each`); ``NOTES.txt`` in the ZIP says how many and why, and names the copies whose labels
    differ. ``workdir``: where
    the ZIP is written (the store's private ``tmp``, whose leftover ``*.part`` files the start-up clean-up
    removes); it is deleted here if the export fails, and by the caller once sent or if its commit fails."""
    principal.require("hematologist")
    if layout not in EXPORT_LAYOUTS:
        raise ServiceError(400, "bad_layout", f"layout must be one of {', '.join(EXPORT_LAYOUTS)}")
    selection = exportable_cells(db)
    if not selection.cells:  # an empty ZIP said nothing: refused, saying why
        raise ServiceError(409, "nothing_to_export", nothing_to_export(selection))
    handle = tempfile.NamedTemporaryFile(prefix="export-", suffix=".zip.part", dir=workdir, delete=False)
    try:
        rows = _write_export(handle, selection.cells, read_object, layout, selection)
    except BaseException:
        handle.close()
        os.unlink(handle.name)
        raise
    handle.close()
    audit(db, principal.user, "dataset.export", request=request,
          detail={"layout": layout, "cells": len(rows), "cases": len({r["case"] for r in rows}),
                  "left_out_unframed": len(selection.unframed), "left_out_copies": len(selection.copies),
                  "label_conflicts": len(selection.conflicts)})
    return Export(handle.name, len(rows), len(selection.left_out), len(selection.conflicts))


def nothing_to_export(selection: ExportSelection) -> str:
    """Why an export holds no cell (the API's 409 and the export page say it)."""
    left_out = len(selection.left_out)
    if not left_out and selection.excluded:  # reviewed, every cell marked excluded: not "review a case first"
        n = selection.excluded
        return (f"no cell to export: the {n} reviewed cell{'' if n == 1 else 's'} {'is' if n == 1 else 'are'} "
                f"marked excluded (not a cell to learn from); review a case with cells to keep")
    if not left_out:
        return "no reviewed cells yet: review a case first"
    return (f"no reviewed cell to export: the {left_out} reviewed cell{'' if left_out == 1 else 's'} not excluded "
            f"{'is' if left_out == 1 else 'are'} left out (the export page says why)")


#: Why a copy of a cell is left out (the export page and NOTES.txt say it).
COPY_REASON = ("the same image file (same content) was uploaded in more than one case, and each of its cells is "
               "exported once, from the earliest case holding it reviewed")


def cell_words(cell: Cell) -> str:
    """A cell as a lab finds it again: its case, its id (the export's file names) and number on the case page."""
    return f"case {cell.case_id} cell {cell.id} (number {cell.position + 1} on its case page)"


def export_notes(selection: ExportSelection) -> str:
    """NOTES.txt of an export that left cells out or holds cells reviewed differently in two cases ("" when
    neither)."""
    parts = []
    if selection.unframed:
        cases = sorted({cell.case_id for cell in selection.unframed})
        parts.append(f"{len(selection.unframed)} reviewed cell(s) of {len(cases)} case(s) were left out of this "
                     f"export: {UNFRAMED_REASON}.\nCases: {', '.join(cases)}\n")
    if selection.copies:
        lines = [f"- {cell_words(copy)}, a copy of {cell_words(kept)}\n" for copy, kept in selection.copies]
        parts.append(f"{len(selection.copies)} reviewed cell(s) were left out as copies: {COPY_REASON}.\n"
                     + "".join(lines))
    if selection.conflicts:
        lines = []
        for group in selection.conflicts:
            where = f"{group[0].image.original_name}" + (f", box {group[0].box}" if group[0].box else "")
            said = "; ".join(f"{cell_words(cell)}: {cell.reviewed_label!r}" for cell in group)
            lines.append(f"- {where}: {said}; exported as {group[0].reviewed_label!r}\n")
        parts.append(f"LABEL CONFLICTS: {len(selection.conflicts)} cell(s) were reviewed with different labels in "
                     "the cases holding their image file; the export holds the earliest case's label. Review "
                     "them again to give them one label.\n" + "".join(lines))
    return "\n".join(parts)


#: Characters a folder name cannot hold on some file system a lab unpacks the export on (Windows' set).
def check_export_folders(labels: set[str]) -> None:
    """A ``folders`` export names each class's folder by the class itself, which ``leukoscope train --data``
    reads back as the class (renaming it would merge classes or lose a blast class: "Early Pre-B"). A name
    that cannot be a folder, or two that one case-insensitive file system would merge, is refused (400): the
    ``csv`` layout keeps any name."""
    for label in sorted(labels):
        if not is_folder_name(label):
            raise ServiceError(400, "label_not_a_folder", f"the class {label!r} cannot be a folder name; export "
                                                          f"with layout=csv, which keeps it in manifest.csv")
    for other, label, *_ in case_clashes(sorted(labels)):
        raise ServiceError(400, "labels_collide", f"the classes {other!r} and {label!r} would share one folder "
                                                  f"on a case-insensitive file system; export with layout=csv")


def _write_export(handle: Any, cells: Sequence[Cell], read_object: Callable[[str], bytes],
                  layout: str, selection: ExportSelection | None = None) -> list[dict[str, Any]]:
    rows = []
    if layout == "folders":
        check_export_folders({cell.reviewed_label or "" for cell in cells})
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
        for cell in cells:
            label = cell.reviewed_label or ""
            file_name = f"case-{cell.case_id}-cell-{cell.id}.png"
            member = f"{label}/{file_name}" if layout == "folders" else f"images/{file_name}"
            # the uploaded file's digest in the PNG: a model fine-tuned on the export records it, and `analyze` or
            # `predict` of that file says the model learned from it
            data = read_object(cell.crop_object or cell.image.served_object)
            if data.startswith(PNG_SIGNATURE):  # (every stored cell and served image is a PNG; anything else as is)
                data = with_source_digest(data, cell.image.sha256[:DIGEST_CHARS])
            archive.writestr(member, data)
            rows.append({"path": member, "label": label, "subject": cell.case_id, "case": cell.case_id,
                         "cell": cell.id, "predicted": cell.predicted_label, "top_class": cell.top_class,
                         "confidence": round(cell.confidence, 6), "reviewed_at": cell.reviewed_at.isoformat()
                         if cell.reviewed_at else ""})
        if layout == "csv":
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=["path", "label", "subject", "case", "cell", "predicted",
                                                      "top_class", "confidence", "reviewed_at"])
            writer.writeheader()
            writer.writerows(rows)
            archive.writestr("manifest.csv", text.getvalue())
        notes = export_notes(selection) if selection is not None else ""
        if notes:  # a text file at the top: `leukoscope train --data` reads images only
            archive.writestr("NOTES.txt", notes)
    return rows
