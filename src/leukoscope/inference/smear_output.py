"""Files written by smear analysis: per field (annotated PNG, cells CSV, JSON) and per
folder (``summary.csv`` / ``summary.json`` with the pooled differential of the slide)."""

from __future__ import annotations

import csv
import hashlib
import os
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from leukoscope.inference.differential import CountRules, Differential
from leukoscope.inference.drawing import annotate
from leukoscope.inference.quality import (CAP_WORDING, DEFAULT_UNFAMILIAR_SHARE, GRAYSCALE_WARNING, UNFRAMED_WORDING,
                                          UNSCALED_FIELD_WORDING, WEAK_SCALE_WORDING, cap_warning, classified_unit,
                                          grayscale_fields_warning, light_fields_warning, stated_scale_fields_warning,
                                          possible_cells_fields_note, unfamiliar_count_warning, unframed_fields_warning,
                                          unscaled_fields_warning, weak_scale_fields_warning)
from leukoscope.inference.summary_figure import save_differential_figure
from leukoscope.inference.smear_result import Cell, SmearResult
from leukoscope.io import load_image
from leukoscope.labels import DISCLAIMER, UNCERTAIN, case_clashes, is_folder_name
from leukoscope.light import LIGHT_WORDING
from leukoscope.scale import STATED_SCALE_WORDING


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG of an RGB image, made for speed: libpng (imagecodecs) at zlib level 1 with
    run-length matching and the "up" filter on every row. For a 2592x1944 field on a 2-core CPU:
    0.18 s and 4.8 MB (OpenCV's fast settings, the "sub" filter: 0.22 s, 5.6 MB; Pillow: 4.4 s at its
    default level, 0.67 s and 4.4 MB at level 1 with run-length matching, most of it spent choosing
    a filter per row). Measured in docs/benchmarks.md."""
    import imagecodecs

    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() copies even an RGB image
    return imagecodecs.png_encode(np.asarray(rgb), level=1,
                                  strategy=imagecodecs.PNG.STRATEGY.RLE, filter=imagecodecs.PNG.FILTER.UP)


#: The stem of a folder's own files (``summary.csv``, ``summary.json``): a field may not take it.
SUMMARY_STEM = "summary"


def analysis_output_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an analysis's own files (its ``summary.json``: a run's ``--out``, a slide's
    folder in it): a folder analysed again with its earlier results inside read their ``summary.png`` and a
    slide's overview as fields (11 white cells added to a pooled count of 1)."""
    try:
        record = json.loads((folder / f"{SUMMARY_STEM}.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "pooled_differential" in record and "disclaimer" in record


#: The pictures an analysis writes beside its summary.json that are not fields' annotated copies (those end in
#: ``.annotated.png`` and are never read as fields): the pooled differential drawn, a slide's overview.
SUMMARY_PICTURE = f"{SUMMARY_STEM}.png"
OVERVIEW_SUFFIX = ".overview.png"


def earlier_outputs(paths: Sequence[Path]) -> list[Path]:
    """The ``paths`` that are pictures an analysis wrote (its ``summary.png``, a slide's ``*.overview.png``)
    in a folder that holds that analysis's summary: `leukoscope analyze .` run twice had analysed them as fields
    (a slide's overview added 11 white cells to a pooled count of 1). By name and place only: fields kept in
    the same folder as an analysis's files, or an --out that is the input folder, stay fields."""
    known: dict[Path, bool] = {}

    def written(path: Path) -> bool:
        if path.name != SUMMARY_PICTURE and not path.name.endswith(OVERVIEW_SUFFIX):
            return False
        if path.parent not in known:
            known[path.parent] = analysis_output_folder(path.parent)
        return known[path.parent]

    return [path for path in paths if written(path)]


#: File names are kept to this many characters, the longest suffix a field's outputs add (``.annotated.png``)
#: included, within the 255 bytes of most file systems (a scanner's name of barcode, patient, date and position
#: stopped a run with "File name too long").
MAX_STEM = 160


def shortened(stem: str, whole: str | None = None) -> str:
    """``stem`` kept to :data:`MAX_STEM` characters: a longer one is cut and ends in a digest of ``whole`` (the name
    it was made from; default: itself), which keeps two long names apart."""
    if len(stem) <= MAX_STEM:
        return stem
    return f"{stem[:MAX_STEM - 9]}-{hashlib.sha1(os.fsencode(stem if whole is None else whole)).hexdigest()[:8]}"


def unique_stem(path: Path, used: set[str]) -> str:
    """A file-name-safe stem for ``path``'s outputs whose case-folded form is not yet in ``used`` (which it
    joins, case-folded): on a case-insensitive file system (macOS, Windows) ``Field.jpg`` and ``field.png``
    would share files, and ``Summary.jpg`` would write over ``summary.json``."""
    base = shortened(re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem) or "image", path.stem)
    stem, k = base, 1
    while stem.casefold() in used:
        k += 1
        stem = f"{base}-{k}"
    used.add(stem.casefold())
    return stem


def write_field(result: SmearResult, out_dir: str | Path, stem: str | None = None,
                image: Image.Image | None = None) -> dict[str, Path]:
    """Write ``<stem>.annotated.png``, ``<stem>.cells.csv`` and ``<stem>.json`` into ``out_dir``
    (no PNG for a field that could not be read)."""
    source = Path(result.source)
    if image is None and result.error is None and not source.is_file():  # analysed from an image in memory
        raise ValueError(f"{result.source} is not a file: pass the analysed image (image=...) to draw it")
    if stem is None and not source.is_file():
        raise ValueError(f"{result.source} is not a file: pass the stem to name its outputs (stem=...)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or source.stem
    paths = {"json": out_dir / f"{stem}.json", "cells": out_dir / f"{stem}.cells.csv"}
    payload = result.summary()
    payload["cells"] = [cell.as_row(result.cell_classes) for cell in result.cells]
    paths["json"].write_text(json.dumps(payload, indent=2))
    columns = list(Cell(0, (0, 0, 0, 0), "", 0, "", "", 0, False).as_row(result.cell_classes))
    with open(paths["cells"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for cell in result.cells:
            writer.writerow(cell.as_row(result.cell_classes))
    if result.error is None:
        if image is None:
            image = load_image(result.source)
        paths["annotated"] = out_dir / f"{stem}.annotated.png"
        paths["annotated"].write_bytes(encode_png(annotate(image, result)))
    return paths


def check_cell_folders(classes: Sequence[str]) -> None:
    """A ValueError unless every class (and ``uncertain``) can name its folder of :func:`write_cells` as it is:
    the folder's name is the class ``train --data`` reads back (a renamed one would be a class of its own)."""
    names = [*classes, UNCERTAIN]
    bad = [name for name in names if not is_folder_name(name)]
    if bad:
        raise ValueError(f"the class(es) {', '.join(map(repr, bad))} cannot name a folder: --cells cannot write "
                         f"them by class")
    for other, name, *_ in case_clashes(names):
        raise ValueError(f"the classes {other!r} and {name!r} would share one folder on a case-insensitive file "
                         f"system: --cells cannot write them by class")


def write_cells(result: SmearResult, crops: Sequence[Image.Image], cells_dir: str | Path, stem: str,
                source_digest: str | None = None) -> list[Path]:
    """Each cell of a field, cut as the classifier saw it (``crops``: :meth:`SmearAnalyzer.cell_crops`: its window
    around the cell, or the detector's box with a margin where the field has no scale or there is no
    classifier), as ``cells_dir/<its class>/field-<stem>-cell-<n>.png`` (cells below the confidence threshold in
    ``uncertain/``, to be sorted by eye: training refuses a class of that name; classes checked by
    :func:`check_cell_folders`). A lab moves the misnamed ones to their right folder and fine-tunes on them
    (``train --init ... --data cells_dir``; the reader takes the field as the cells' subject, so a field's cells
    stay on one side of a split). ``source_digest``: the field file's (:func:`~leukoscope.data.fingerprints.
    file_digest`), carried by each cell (:func:`~leukoscope.data.fingerprints.with_source_digest`): a model
    fine-tuned on them records the field, and `analyze` of it says the classifier learned from it."""
    from leukoscope.data.fingerprints import with_source_digest

    written = []
    for cell, crop in zip(result.cells, crops):
        folder = Path(cells_dir) / cell.label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"field-{stem}-cell-{cell.cell_id}.png"
        png = encode_png(crop)
        path.write_bytes(with_source_digest(png, source_digest) if source_digest else png)
        written.append(path)
    return written


@dataclass(frozen=True)
class FieldWarnings:
    """What the warnings of a set of fields are folded from (:func:`folded_field_warnings`): a field's name,
    its own warnings, its scale record and whether the detector hit its cap in it."""

    name: str
    warnings: Sequence[str]
    scale: dict[str, Any] | None = None
    capped: bool = False

    @classmethod
    def of(cls, result: SmearResult) -> "FieldWarnings":
        return cls(Path(result.source).name, list(result.warnings), result.scale, bool(result.capped_tiles))


def is_folded(warning: str) -> bool:
    """Whether a field's ``warning`` is of a kind :func:`folded_field_warnings` says of the fields together."""
    return warning.startswith((CAP_WORDING, UNSCALED_FIELD_WORDING, UNFRAMED_WORDING, STATED_SCALE_WORDING,
                               WEAK_SCALE_WORDING, GRAYSCALE_WARNING, LIGHT_WORDING))


def folded_field_warnings(fields: Sequence[FieldWarnings], run_warnings: Sequence[str] = (), *,
                          fields_say: bool = True, unit: str = "field") -> list[str]:
    """The warnings of a slide (a folder, a web service case) from those of its fields, one line per kind naming
    the fields (at the detection cap, analysed at a guessed scale, cut without the classifier's window, a stated
    scale their red cells doubt (unless ``run_warnings`` doubt it for all), without colour): no leukemia flag of
    the slide rests on what none of a field's would. ``fields_say``: each field's own warning is shown too
    (its files; the web service keeps the case's warnings only). ``unit``: what the fields are (a slide's tiles)."""
    warnings = []
    capped = [f.name for f in fields if f.capped]
    if capped:
        warnings.append(cap_warning(len(capped), len(fields), unit, capped))
    unscaled = [f.name for f in fields if f.scale and f.scale.get("source") == "unknown"
                and f.scale.get("analysed_at_um_per_px")]
    if unscaled:
        warnings.append(unscaled_fields_warning(len(unscaled), len(fields), unscaled, unit))
    weak = [f.name for f in fields if any(w.startswith(WEAK_SCALE_WORDING) for w in f.warnings)]
    if weak:
        warnings.append(weak_scale_fields_warning(len(weak), len(fields), weak, unit))
    unframed = [f.name for f in fields if any(w.startswith(UNFRAMED_WORDING) for w in f.warnings)]
    if unframed:
        warnings.append(unframed_fields_warning(len(unframed), len(fields), unframed, unit))
    doubted = [f.name for f in fields if any(w.startswith(STATED_SCALE_WORDING) for w in f.warnings)]
    run_doubt = any(w.startswith(STATED_SCALE_WORDING) for w in run_warnings)  # said of every field then
    if doubted and not run_doubt:
        warnings.append(stated_scale_fields_warning(len(doubted), len(fields), doubted, fields_say=fields_say,
                                                    unit=unit))
    unlit = [f.name for f in fields if any(w.startswith(LIGHT_WORDING) for w in f.warnings)]
    if unlit:
        warnings.append(light_fields_warning(len(unlit), len(fields), unlit, unit))
    grey = [f.name for f in fields if GRAYSCALE_WARNING in f.warnings]
    if grey:  # a count that left out fields it could not see
        warnings.append(grayscale_fields_warning(len(grey), len(fields), grey, unit))
    return warnings


@dataclass(frozen=True)
class CellTally:
    """What the pooled differential needs of the cells: how many have each label, how many are unfamiliar."""

    labels: Counter[str]
    unfamiliar: int

    @classmethod
    def of(cls, results: Sequence[SmearResult]) -> "CellTally":
        cells = [cell for result in results for cell in result.cells]
        return cls(Counter(cell.label for cell in cells), sum(cell.unfamiliar for cell in cells))


@dataclass
class FolderSummary:
    """The fields of one run and their pooled differential (the slide)."""

    results: list[SmearResult]
    rules: CountRules
    object_classes: list[str]
    """The detector's classes (for the ``objects_*`` columns)."""
    models: dict[str, str | None] = field(default_factory=dict)
    """``detector`` and ``classifier`` model names."""
    detector_warnings: list[str] = field(default_factory=list)
    """Warnings about the detector itself (they hold for every field)."""
    unfamiliar_share: float = DEFAULT_UNFAMILIAR_SHARE
    """The slide is warned when more than this share of all its cells are unfamiliar."""
    cell_tally: CellTally | None = None
    """The cells of all fields, counted, when ``results`` do not hold them (the Ray engine's summary
    of an archive: millions of cells, read as counts from its tables); None: from ``results``."""
    run_um_per_px: float | None = None
    """The run's scale, lent to fields without one of their own (None: none lent)."""
    stated_um_per_px: float | None = None
    """The scale the user stated for every field (None: none stated)."""
    run_warnings: list[str] = field(default_factory=list)
    """Warnings about the run as a whole (:func:`leukoscope.scale.stated_run_doubt`)."""
    provenance: dict[str, Any] | None = None
    """What made the run's results (:attr:`SmearAnalyzer.provenance`: leukoscope's version, each model's bundle
    and identity), written into ``summary.json`` so that a result can be traced to the models behind it."""
    unit: str = "field"
    """What one result is, as ``summary.png`` names it: a field, or a slide's tile."""
    not_analysed: str | None = None
    """Why there is no result at all (a slide none of whose tiles was examined): the differential and
    ``summary.json`` say so, not "No white cell found"."""
    outputs: dict[str, str] = field(default_factory=dict)
    """The stem of each result's files (``<stem>.json``, ...) by its source, when it has files of its own (a
    folder's fields): summary.csv's ``output`` column. Same-named fields take ``-2``, ``-3`` in the order they
    come, so a rerun with other files can give a name to another field; joined by name, rows met wrong files."""

    def _tally(self) -> CellTally:
        return self.cell_tally if self.cell_tally is not None else CellTally.of(self.results)

    @property
    def warnings(self) -> list[str]:
        """The detector's warnings; when any field hit the detection cap, one naming those fields; when any
        was analysed at a guessed scale (the detector's), one naming those; and
        when more than ``unfamiliar_share`` of the slide's cells are unfamiliar, that warning (by the
        fields' rule on the pooled cells: one unusual field among many does not stop the slide's count,
        its own row carries its warning)."""
        read = [FieldWarnings.of(r) for r in self.results if r.error is None]
        folded = folded_field_warnings(read, self.run_warnings, unit=self.unit)  # a slide's tiles are not fields
        warnings = self.detector_warnings + self.run_warnings + folded
        tally = self._tally()
        unfamiliar = unfamiliar_count_warning(tally.unfamiliar, tally.labels.total(), self.unfamiliar_share,
                                             classified_unit(self.rules.classes))
        return warnings + ([unfamiliar] if unfamiliar else [])

    @property
    def pooled(self) -> Differential:
        """The differential of all fields together (the slide); when no field could be read, one that says so."""
        if self.results and all(r.error for r in self.results):
            return self.rules.not_analysed(f"none of the {len(self.results)} file(s) could be read")
        if self.not_analysed is not None and not self.results:
            return self.rules.not_analysed(self.not_analysed)
        pooled = self.rules.count_from(self._tally().labels, self.warnings)
        possible = [r for r in self.results if r.possible_white_cells]
        if possible:
            pooled.flags.append(possible_cells_fields_note(sum(len(r.possible_white_cells) for r in possible),
                                                           [Path(r.source).name for r in possible], len(self.results),
                                                           unit=self.unit))
        return pooled

    def rows(self) -> list[dict[str, Any]]:
        rows = []

        def row_for(name: str, d: Differential, objects: dict[str, int], seconds: float | str, error: str,
                    capped: int | str, scale: dict[str, Any] | None = None) -> dict:
            row: dict[str, Any] = {"image": name}
            if self.outputs:
                row["output"] = self.outputs.get(name, "")
            row["wbc"] = d.total
            row.update({f"n_{c}": d.counts.get(c, 0) for c in self.rules.classes})
            row["n_uncertain"] = d.uncertain
            row.update({f"objects_{c}": objects.get(c, 0) for c in self.object_classes})
            row["blasts"] = "" if d.blasts is None else d.blasts
            row["blast_percent"] = "" if d.blast_percentage is None else round(d.blast_percentage, 2)
            row["blast_ci95_low"] = "" if d.blast_ci95 is None else round(d.blast_ci95[0], 2)
            row["blast_ci95_high"] = "" if d.blast_ci95 is None else round(d.blast_ci95[1], 2)
            row["blast_percent_meaningful"] = d.blast_percentage_meaningful
            row["capped_tiles"] = capped
            known = scale.get("um_per_px") if scale else None
            row["um_per_px"] = "" if known is None else round(float(known), 5)
            row["scale_source"] = scale.get("source", "") if scale else ""
            row["flags"] = " | ".join(d.flags)
            row["seconds"] = seconds
            row["error"] = error
            return row

        for result in self.results:
            rows.append(row_for(result.source, result.differential, result.object_counts,
                                round(result.seconds, 3), result.error or "", result.capped_tiles, result.scale))
        totals: dict[str, int] = {}
        for result in self.results:
            for name, n in result.object_counts.items():
                totals[name] = totals.get(name, 0) + n
        rows.append(row_for("TOTAL", self.pooled, totals, round(sum(r.seconds for r in self.results), 3), "",
                            sum(r.capped_tiles for r in self.results)))
        return rows

    def _scale_summary(self) -> dict[str, Any]:
        """The run's scale and how many fields took each kind of scale (given, recorded, estimated, the run's,
        unknown)."""
        sources = Counter(r.scale.get("source", "unknown") for r in self.results if r.error is None and r.scale)
        return {"stated_um_per_px": self.stated_um_per_px, "run_um_per_px": self.run_um_per_px,
                "fields_by_source": dict(sorted(sources.items()))}

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        rows = self.rows()
        csv_path = out_dir / f"{SUMMARY_STEM}.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        json_path = out_dir / f"{SUMMARY_STEM}.json"
        pooled = self.pooled
        json_path.write_text(json.dumps({
            "disclaimer": DISCLAIMER,
            "warnings": pooled.warnings,
            "images": len(self.results),
            "failed": sum(1 for r in self.results if r.error),
            "not_analysed": self.not_analysed if not self.results else None,
            "detector": self.models.get("detector"),
            "classifier": self.models.get("classifier"),
            "provenance": self.provenance,
            "blast_classes": list(self.rules.blast_classes),
            "scale": self._scale_summary(),
            "pooled_differential": pooled.to_json(),
            "fields": [{**r.summary(), **({"output": self.outputs[r.source]} if r.source in self.outputs else {})}
                       for r in self.results],
        }, indent=2))
        # the same, as a picture (summary.png): a reader who opens one file sees the count and its flags
        save_differential_figure(out_dir / f"{SUMMARY_STEM}.png", pooled, len(self.results),
                                 sum(1 for r in self.results if r.error), self.rules.blast_flag_percent, self.unit)
        return csv_path, json_path
