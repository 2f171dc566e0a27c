"""Table rows of smear analysis: one row per field and one per white cell, built from a
:class:`~leukoscope.inference.smear_result.SmearResult`, and the result built back from them.

The rows are plain dictionaries, so any engine can make them; :func:`field_schema` and
:func:`cell_schema` give their Parquet (pyarrow) types, which depend on the run's classes
(``n_<class>`` and ``p_<class>`` columns, as in ``summary.csv`` and ``<field>.cells.csv``).
Unlike those files nothing is rounded here, so a result read back counts exactly as it did.

``path`` (the file's absolute path) is the key: a field is the same field whatever
folder a run was started from; ``source`` is the name it was given, as in the summary.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from leukoscope.inference.differential import CountRules
from leukoscope.inference.smear_result import Cell, SmearResult
from leukoscope.labels import UNCERTAIN

#: The column that names a field in both tables: its absolute path.
FIELD_KEY = "path"


def field_row(result: SmearResult, path: str | Path, rules: CountRules) -> dict[str, Any]:
    """One field: its size, tiles, time, error, warnings, object counts, scale, differential and the white cells
    scored under the detector's threshold (JSON)."""
    d = result.differential
    row: dict[str, Any] = {
        "path": str(path), "source": result.source, "folder": Path(path).parent.name,
        "width": result.width, "height": result.height, "tiles": result.tiles,
        "capped_tiles": result.capped_tiles, "seconds": float(result.seconds), "error": result.error,
        "wbc": d.total,
    }
    row.update({f"n_{name}": d.counts.get(name, 0) for name in rules.classes})
    row["n_uncertain"] = d.uncertain
    row["blasts"] = d.blasts
    row["blast_percent"] = d.blast_percentage
    row["blast_ci95_low"] = d.blast_ci95[0] if d.blast_ci95 else None
    row["blast_ci95_high"] = d.blast_ci95[1] if d.blast_ci95 else None
    row["warnings"] = list(result.warnings)
    row["flags"] = list(d.flags)
    # Key order kept (a map would sort or lose it): summary.json lists them as the detector does.
    row["object_counts"] = json.dumps(result.object_counts)
    row["scale"] = None if result.scale is None else json.dumps(result.scale)
    row["possible_white_cells"] = json.dumps(result.possible_white_cells)
    return row


def cell_rows(result: SmearResult, path: str | Path) -> list[dict[str, Any]]:
    """Every white cell of the field: box, detector class and score, label, classifier output."""
    rows = []
    for cell in result.cells:
        x0, y0, x1, y1 = cell.box
        row: dict[str, Any] = {
            "path": str(path), "cell_id": cell.cell_id, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "detector_class": cell.detector_class, "detector_score": cell.detector_score, "label": cell.label,
            "top_class": cell.top_class, "confidence": cell.confidence, "uncertain": cell.uncertain,
        }
        row.update({f"p_{name}": float(cell.probabilities.get(name, 0.0)) for name in result.cell_classes})
        row["ood_score"] = cell.ood_score
        row["unfamiliar"] = cell.unfamiliar
        rows.append(row)
    return rows


def result_from_rows(field: dict[str, Any], cells: Sequence[dict[str, Any]], rules: CountRules) -> SmearResult:
    """The field's result again (no detections; ``probabilities`` 0 for classes a cell had none of):
    its differential is recounted from the cells' labels by ``rules`` with the field's warnings,
    which is how the analyzer counted it."""
    classes = list(rules.classes)
    rebuilt = [Cell(int(c["cell_id"]), (c["x0"], c["y0"], c["x1"], c["y1"]), c["detector_class"],
                    c["detector_score"], c["label"], c["top_class"], c["confidence"], bool(c["uncertain"]),
                    {name: c.get(f"p_{name}", 0.0) for name in classes}, c["ood_score"], bool(c["unfamiliar"]))
               for c in sorted(cells, key=lambda c: c["cell_id"])]
    return replace(result_from_field_row(field, rules), cells=rebuilt,
                   differential=rules.count([cell.label for cell in rebuilt], list(field["warnings"])))


def field_label_counts(field: dict[str, Any], rules: CountRules) -> dict[str, int]:
    """How many cells of the field have each label: its ``n_<class>`` and ``n_uncertain`` columns."""
    return {**{name: int(field[f"n_{name}"]) for name in rules.classes}, UNCERTAIN: int(field["n_uncertain"])}


def result_from_field_row(field: dict[str, Any], rules: CountRules) -> SmearResult:
    """The field's result from its row alone, without its cells (a summary of millions of cells need
    not hold them): the differential is recounted from the row's counts and warnings."""
    differential = (rules.not_analysed(f"the file could not be read ({field['error']})") if field["error"] else
                    rules.count_from(field_label_counts(field, rules), list(field["warnings"])))
    return SmearResult(field["source"], int(field["width"]), int(field["height"]), [],
                       json.loads(field["object_counts"]), differential,
                       None, list(rules.classes), int(field["tiles"]), float(field["seconds"]), error=field["error"],
                       capped_tiles=int(field["capped_tiles"]),
                       scale=None if field["scale"] is None else json.loads(field["scale"]),
                       # (absent from the tables of archives made before it was kept)
                       possible_white_cells=json.loads(field.get("possible_white_cells") or "[]"))


def field_schema(rules: CountRules):
    """Parquet types of :func:`field_row` (pyarrow is imported here: it is an optional extra)."""
    import pyarrow as pa

    columns = [("path", pa.string()), ("source", pa.string()), ("folder", pa.string()), ("width", pa.int64()),
               ("height", pa.int64()), ("tiles", pa.int64()), ("capped_tiles", pa.int64()),
               ("seconds", pa.float64()), ("error", pa.string()), ("wbc", pa.int64())]
    columns += [(f"n_{name}", pa.int64()) for name in rules.classes]
    columns += [("n_uncertain", pa.int64()), ("blasts", pa.int64()), ("blast_percent", pa.float64()),
                ("blast_ci95_low", pa.float64()), ("blast_ci95_high", pa.float64()),
                ("warnings", pa.list_(pa.string())), ("flags", pa.list_(pa.string())),
                ("object_counts", pa.string()), ("scale", pa.string()), ("possible_white_cells", pa.string())]
    return pa.schema(columns)


def cell_schema(rules: CountRules):
    """Parquet types of :func:`cell_rows`."""
    import pyarrow as pa

    columns = [("path", pa.string()), ("cell_id", pa.int64())]
    columns += [(name, pa.float64()) for name in ("x0", "y0", "x1", "y1")]
    columns += [("detector_class", pa.string()), ("detector_score", pa.float64()), ("label", pa.string()),
                ("top_class", pa.string()), ("confidence", pa.float64()), ("uncertain", pa.bool_())]
    columns += [(f"p_{name}", pa.float64()) for name in rules.classes]
    columns += [("ood_score", pa.float64()), ("unfamiliar", pa.bool_())]
    return pa.schema(columns)
