"""An archive's output as Parquet parts: ``OUT/fields/part-*.parquet`` and ``OUT/cells/part-*.parquet``.

Each part holds a chunk of finished fields. It is written under a temporary name and renamed
into place (atomic on one filesystem), cells first and fields last: a fields part is the record
that its fields are done, so a run stopped at any moment leaves only whole parts, and a cells
part without its fields part is ignored. A rerun reads the fields parts and skips what they
hold. When a field is in several parts (it was retried), the newest part counts; part names
start with the run's UTC time, so name order is age order.

Read the tables with any Parquet reader, e.g. ``pyarrow.parquet.read_table("OUT/fields")``
(superseded rows included) or ``ArchiveParts("OUT").read()`` (the newest row per field).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Sequence

from leukoscope.inference.differential import CountRules
from leukoscope.inference.field_tables import FIELD_KEY, cell_schema, field_schema

FIELDS = "fields"
CELLS = "cells"
SETTINGS = "archive.json"


class ArchiveParts:
    """The parts under ``out_dir``; :meth:`write` adds one (its columns follow ``rules``' classes),
    :meth:`read` gives the newest row per field."""

    def __init__(self, out_dir: str | Path, rules: CountRules | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.rules = rules
        self.run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        self._written = 0
        self.fields_written = 0
        """Fields written by this object (this run)."""

    def _folder(self, table: str) -> Path:
        return self.out_dir / table

    def claim(self, settings: dict[str, Any]) -> None:
        """Record the models and options of the output (``OUT/archive.json``), or check that a rerun uses
        the same: fields analysed otherwise must not be skipped as done, nor pooled with the new ones."""
        path = self.out_dir / SETTINGS
        settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
        if path.is_file():
            recorded = json.loads(path.read_text())
            if recorded != settings:
                changed = sorted(k for k in {**recorded, **settings} if recorded.get(k) != settings.get(k))
                raise ValueError(f"{self.out_dir} holds an archive analysed with other settings ({', '.join(changed)} "
                                 f"differ, see {path}): give another output folder, or the same settings to resume")
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))

    def clean(self) -> int:
        """Remove temporary files left by a run that was stopped mid-write; how many there were."""
        stale = [p for table in (FIELDS, CELLS) if self._folder(table).is_dir()
                 for p in self._folder(table).glob(".*.tmp")]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def write(self, fields: Sequence[dict[str, Any]], cells: Sequence[dict[str, Any]]) -> Path:
        """One part of ``fields`` (rows of :func:`~leukoscope.inference.field_tables.field_row`) and their
        ``cells``; returns the fields part's path."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.rules is None:
            raise ValueError("ArchiveParts needs the count rules (the classes of its columns) to write")
        self._written += 1
        name = f"part-{self.run_id}-{self._written:05d}.parquet"
        final = None
        for table, rows, schema in ((CELLS, cells, cell_schema(self.rules)), (FIELDS, fields, field_schema(self.rules))):
            folder = self._folder(table)
            folder.mkdir(parents=True, exist_ok=True)
            temporary, final = folder / f".{name}.tmp", folder / name
            pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), temporary)
            os.replace(temporary, final)
        self.fields_written += len(fields)
        return final

    def parts(self) -> list[str]:
        """Names of the finished parts, oldest first (a cells part alone is not finished)."""
        folder = self._folder(FIELDS)
        return sorted(p.name for p in folder.glob("part-*.parquet")) if folder.is_dir() else []

    def done(self) -> dict[str, str | None]:
        """Each field in the output (its ``path``) and its error (None: analysed)."""
        import pyarrow.parquet as pq

        done: dict[str, str | None] = {}
        for name in self.parts():
            table = pq.read_table(self._folder(FIELDS) / name, columns=[FIELD_KEY, "error"])
            done.update(zip(table.column(FIELD_KEY).to_pylist(), table.column("error").to_pylist()))
        return done

    def read_fields(self, paths: Sequence[str] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """The newest field row of each field (only those in ``paths`` when given), and the part it is in."""
        import pyarrow.parquet as pq

        wanted = None if paths is None else set(paths)
        fields: dict[str, dict[str, Any]] = {}
        newest: dict[str, str] = {}
        for name in self.parts():
            for row in pq.read_table(self._folder(FIELDS) / name).to_pylist():
                if wanted is None or row[FIELD_KEY] in wanted:
                    fields[row[FIELD_KEY]] = row
                    newest[row[FIELD_KEY]] = name
        return fields, newest

    def read(self, paths: Sequence[str] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict]]]:
        """The newest field row of each field (only those in ``paths`` when given) and its cells."""
        import pyarrow.parquet as pq

        fields, newest = self.read_fields(paths)
        cells: dict[str, list[dict]] = {key: [] for key in fields}
        for name in sorted(set(newest.values())):
            for row in pq.read_table(self._folder(CELLS) / name).to_pylist():
                if newest.get(row[FIELD_KEY]) == name:
                    cells[row[FIELD_KEY]].append(row)
        return fields, cells

    def unfamiliar_counts(self, newest: dict[str, str]) -> dict[str, int]:
        """How many cells of each field (``newest``: field -> its part, from :meth:`read_fields`) are
        unfamiliar to the classifier: two columns of the cells table, part by part, not its rows."""
        import pyarrow.parquet as pq

        counts = {key: 0 for key in newest}
        for name in sorted(set(newest.values())):
            table = pq.read_table(self._folder(CELLS) / name, columns=[FIELD_KEY, "unfamiliar"])
            for key, unfamiliar in zip(table.column(FIELD_KEY).to_pylist(), table.column("unfamiliar").to_pylist()):
                if unfamiliar and newest.get(key) == name:
                    counts[key] += 1
        return counts
