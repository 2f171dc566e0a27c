"""Archive scale-out: the smear analysis of many fields on a Ray cluster (Ray Data).

    spec = AnalyzerSpec("pretrained:smear-detector", "pretrained:wbc-classifier", {"um_per_px": 0.08})
    run = analyze_archive(spec, paths, "out/", address="auto")   # or address=None: a local Ray
    run.processed, run.skipped, run.summary.pooled

The fields become a Ray dataset of file paths; ``map_batches`` hands small batches to a pool of
actors, each of which builds its :class:`~leukoscope.inference.smear.SmearAnalyzer` once (the
models load once per actor), reads and analyses its fields, and returns their table rows
(:mod:`leukoscope.inference.field_tables`). The driver writes them in Parquet parts
(:mod:`leukoscope.inference.archive_parts`) and, at the end, ``summary.csv`` / ``summary.json``
in the local engine's format (:class:`~leukoscope.inference.smear_output.FolderSummary`).
Actors read the files themselves (paths travel, not pixels): on a cluster the fields must be on
storage every node sees at the same path. A rerun skips the fields already in the output; fields
that could not be read keep their error row unless ``retry_failed``.

Ray and pyarrow are an optional extra (``pip install 'leukoscope[ray]'``); the local engine
(:meth:`SmearAnalyzer.analyze_paths`) stays the default.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from leukoscope.bundle import model_identity
from leukoscope.inference.archive_parts import ArchiveParts
from leukoscope.inference.field_tables import cell_rows, field_label_counts, field_row, result_from_field_row
from leukoscope.inference.smear import SmearAnalyzer
from leukoscope.inference.smear_output import CellTally, FolderSummary
from leukoscope.inference.smear_result import SmearResult
from leukoscope.io import ImageDecodeError, load_image
from leukoscope.pretrained import PREFIX, pretrained_root, resolve_bundle

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'leukoscope[ray]'"


class RayUnavailable(ImportError):
    """Ray (or pyarrow) is not installed."""


def require_ray() -> None:
    """Import Ray Data and pyarrow, or say how to install them."""
    try:
        import pyarrow  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayUnavailable(f"--engine ray needs Ray Data and pyarrow ({exc.name} is not installed): "
                             f"{INSTALL_HINT}") from exc


def portable_spec(folder: str | Path | None) -> str | None:
    """A bundle folder as each node should find it: a shipped model as ``pretrained:NAME`` (a worker's
    own install may live elsewhere), any other folder as its absolute path."""
    if folder is None:
        return None
    if str(folder).startswith(PREFIX):
        return str(folder)
    path = Path(folder).resolve()
    return PREFIX + path.name if path.parent == pretrained_root().resolve() else str(path)


@dataclass(frozen=True)
class AnalyzerSpec:
    """How to build the analyzer: the same bundles and keyword options for every engine and actor."""

    detector: str | Path
    classifier: str | Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of :class:`SmearAnalyzer` (tile_size, blast_classes, um_per_px...)."""

    def portable(self) -> "AnalyzerSpec":
        return AnalyzerSpec(portable_spec(self.detector), portable_spec(self.classifier), dict(self.options))

    def build(self, threads: int | None = None) -> SmearAnalyzer:
        """The analyzer; ``threads``: what its graph runtimes (onnxruntime, OpenVINO) may use."""
        classifier = resolve_bundle(self.classifier) if self.classifier is not None else None
        return SmearAnalyzer.from_bundles(resolve_bundle(self.detector), classifier, threads=threads, **self.options)


def analyze_file(analyzer: SmearAnalyzer, path: str | Path, source: str,
                 run_warnings: Sequence[str] = ()) -> SmearResult:
    """One field file, as the local engine does it: an unreadable file is a result with ``error``;
    ``run_warnings``: its run's, on the field as the local engine puts them."""
    try:
        return analyzer.analyze(load_image(path, max_pixels=analyzer.max_pixels), source=source,
                                scale=analyzer.recorded_scale(path), run_warnings=run_warnings)
    except ImageDecodeError as exc:
        return analyzer.failed_result(source, str(exc))


def actor_analyzer(spec: AnalyzerSpec, threads: int) -> SmearAnalyzer:
    """The analyzer of a Ray actor that has ``threads`` CPUs: torch or the graph runtimes use that
    many (more would fight the other actors of the node)."""
    return spec.build(threads=max(1, int(threads)))


class FieldActor:
    """A Ray Data actor: builds its analyzer once, then turns batches of paths into table rows."""

    def __init__(self, spec: AnalyzerSpec, threads: int, run_warnings: Sequence[str] = ()) -> None:
        self.analyzer = actor_analyzer(spec, threads)
        self.run_warnings = list(run_warnings)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        records = []
        for path, source in zip(batch["path"], batch["source"]):
            result = analyze_file(self.analyzer, str(path), str(source), self.run_warnings)
            records.append(json.dumps({"field": field_row(result, str(path), self.analyzer.rules),
                                       "cells": cell_rows(result, str(path))}))
        return {"path": np.asarray(batch["path"], dtype=object), "record": np.asarray(records, dtype=object)}


@dataclass
class ArchiveRun:
    """What a run did: ``processed`` fields written now, ``skipped`` as already in the output."""

    summary: FolderSummary
    processed: int
    skipped: int
    parts_written: int
    out_dir: Path


def _summary(analyzer: SmearAnalyzer, parts: ArchiveParts, keys: Sequence[str],
             sources: dict[str, str], run_warnings: Sequence[str] = ()) -> FolderSummary:
    """The local engine's summary of these fields, from the output tables, in the order given: from
    the field rows and two columns of the cells table, never holding every cell row at once."""
    fields, newest = parts.read_fields(keys)
    unfamiliar = parts.unfamiliar_counts(newest)
    results: list[SmearResult] = []
    labels: Counter[str] = Counter()
    for key in dict.fromkeys(keys):
        if key in fields:
            row = dict(fields[key], source=sources[key])  # the name given in this run, as the local engine
            results.append(result_from_field_row(row, analyzer.rules))
            labels.update(field_label_counts(row, analyzer.rules))
    return FolderSummary(results, analyzer.rules, list(analyzer.detector.classes), analyzer.model_names,
                         list(analyzer.warnings), analyzer.unfamiliar_share,
                         CellTally(labels, sum(unfamiliar[key] for key in dict.fromkeys(keys) if key in fields)),
                         None if analyzer.um_per_px is not None else analyzer.run_um_per_px, analyzer.um_per_px,
                         list(run_warnings), provenance=analyzer.provenance)


def pending(keys: Sequence[str], done: dict[str, str | None], retry_failed: bool = False) -> list[str]:
    """The fields of ``keys`` still to analyse: those not ``done``, and with ``retry_failed`` those
    whose row holds an error (a file that could not be read may have been replaced since)."""
    return [key for key in dict.fromkeys(keys) if key not in done or (retry_failed and done[key] is not None)]


#: Fields an actor analyses per Ray Data batch. Each batch costs Ray ~50 ms of its own (scheduling, the
#: object store): one 640x480 field per batch made the Ray engine ~30% slower per field than a plain
#: loop on a 2-core machine, eight as fast (docs/benchmarks.md, "Archive on Ray").
DEFAULT_BATCH_FIELDS = 8


def analyze_archive(spec: AnalyzerSpec, paths: Sequence[str | Path], out_dir: str | Path, *,
                    analyzer: SmearAnalyzer | None = None, address: str | None = None, actors: int | None = None,
                    threads: int = 1, batch_size: int = DEFAULT_BATCH_FIELDS, part_size: int = 64,
                    retry_failed: bool = False,
                    stop_after_parts: int | None = None,
                    progress: Callable[..., None] | None = None, run_warnings: Sequence[str] = ()) -> ArchiveRun:
    """Analyse ``paths`` on Ray, write ``out_dir/{fields,cells}/part-*.parquet`` and the summary files.

    ``analyzer``: the driver's own (built from ``spec`` when not given; it checks the options before
    any actor starts and gives the summary its counting rules). ``address``: a running cluster
    (``"auto"``, ``"ray://host:10001"``...); None starts a local one, unless this process is already
    connected. ``actors`` (default: as many as the nodes can place: :func:`actor_count`) analyse ``batch_size`` fields at
    a time with ``threads`` CPUs each. ``part_size``: fields per Parquet part (what an interruption can
    cost at most). ``stop_after_parts``: stop once that many parts are written (tests: an interruption).
    ``run_warnings``: about the run as a whole (a stated scale the fields' red cells contradict), on every field
    and the summary, as the local engine puts them. Not part of the archive's identity: their words hold counts
    of the sampled fields, which fields added to a resumed run change (the stated scale itself is in it).
    """
    require_ray()
    import ray

    if threads < 1 or batch_size < 1 or part_size < 1 or (actors is not None and actors < 1):
        raise ValueError("actors, threads, batch_size and part_size must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    analyzer = analyzer or spec.build()
    parts = ArchiveParts(out_dir, analyzer.rules)
    portable = spec.portable()
    # What runs the networks is not part of the archive's identity: float graphs give torch's results (an
    # int8 graph does not: model_identity records it, by the backend asked for, which is what the actors
    # build with). The tile size is the one used (a default follows the detector), and each model is known
    # by its weights and options, not only its name: a shipped model replaced under the same name differs.
    identity = {**{k: v for k, v in portable.options.items() if k != "backend"}, "tile_size": analyzer.tile_size}
    # The thresholds in effect, not only those asked for: a bundle's own, edited between two runs, changes calls.
    identity["uncertain_threshold"] = analyzer.classifier.threshold if analyzer.classifier is not None else None
    identity["detector_threshold"] = getattr(analyzer.detector, "score_threshold", None)
    backend = str(portable.options.get("backend", "torch"))
    parts.claim({"detector": portable.detector, "classifier": portable.classifier, "options": identity,
                 "models": {role: model_identity(bundle, backend) for role, bundle in
                            (("detector", spec.detector), ("classifier", spec.classifier)) if bundle is not None},
                 "cell_classes": analyzer.cell_classes, "blast_classes": analyzer.blast_classes})
    if parts.clean():
        log.info("removed the temporary files of an interrupted run in %s", out_dir)
    sources = {str(Path(p).resolve()): str(p) for p in paths}
    keys = [str(Path(p).resolve()) for p in paths]
    todo = pending(sources, parts.done(), retry_failed)
    if progress is not None and len(sources) > len(todo):
        progress(advance=len(sources) - len(todo), info="already in the output")
    written = 0
    if todo:
        with ray_session(address):
            written = _run_on_ray(portable, todo, sources, parts, actors, threads, batch_size, part_size,
                                  stop_after_parts, progress, run_warnings)
    summary = _summary(analyzer, parts, keys, sources, run_warnings)
    summary.write(out_dir)
    return ArchiveRun(summary, parts.fields_written, len(sources) - len(todo), written, out_dir)


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connected to Ray for the block: to the cluster at ``address`` (``"auto"``, ``"ray://..."``), or
    to a Ray started here for the block when None; a process already connected stays as it is."""
    import ray

    started = not ray.is_initialized()
    if started:
        # A Ray of its own for this run needs no dashboard (seconds of start-up, a web port).
        ray.init(address=address, logging_level=logging.WARNING,
                 **({"include_dashboard": False} if address is None else {}))
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def actor_count(actors: int | None, threads: int) -> int:
    """How many actors of ``threads`` CPUs to run: ``actors``, else as many as the cluster's nodes can
    place (each node ``its CPUs // threads``). An error when no node has ``threads`` CPUs, or when more
    actors are asked for than the nodes can place: Ray would wait for such an actor for ever."""
    import ray

    node_cpus = [int(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    largest = max(node_cpus, default=0)
    if threads > largest:
        raise ValueError(f"--threads {threads} per actor is more than the largest node of the Ray cluster has "
                         f"({largest} CPUs): give --threads {largest} or fewer")
    capacity = sum(cpus // threads for cpus in node_cpus)
    if actors is not None and actors > capacity:
        raise ValueError(f"--actors {actors} of {threads} CPU(s) each: the Ray cluster's nodes "
                         f"({', '.join(map(str, node_cpus))} CPUs) can run {capacity} at once; give --actors "
                         f"{capacity} or fewer")
    return actors or capacity


def _run_on_ray(spec: AnalyzerSpec, todo: list[str], sources: dict[str, str], parts: ArchiveParts,
                actors: int | None, threads: int, batch_size: int, part_size: int, stop_after_parts: int | None,
                progress: Callable[..., None] | None, run_warnings: Sequence[str] = ()) -> int:
    """Stream the fields through the actor pool; write a part every ``part_size`` fields. Returns the
    number of parts written; a stop (error, Ctrl-C) first writes the fields already finished."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # leukoscope's own bar counts fields
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines would bury the bar
    pool = actor_count(actors, threads)
    items = [{"path": key, "source": sources[key]} for key in todo]
    # Batches of up to ``batch_size`` fields, but at least one per actor (a short run or a resume's
    # tail would leave actors idle); one batch per block, so results come back a batch at a time.
    batch_size = max(1, min(batch_size, -(-len(items) // pool)))
    dataset = ray.data.from_items(items, override_num_blocks=min(-(-len(items) // batch_size), 10_000))
    rows = dataset.map_batches(FieldActor, fn_constructor_kwargs={"spec": spec, "threads": threads,
                                                                  "run_warnings": list(run_warnings)},
                               batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=pool), num_cpus=threads,
                               batch_format="numpy")
    fields: list[dict] = []
    cells: list[dict] = []
    written = 0

    def flush() -> None:
        nonlocal written, fields, cells
        if fields:
            parts.write(fields, cells)
            written += 1
            fields, cells = [], []

    try:
        for row in rows.iter_rows():
            record = json.loads(row["record"])
            fields.append(record["field"])
            cells.extend(record["cells"])
            if progress is not None:
                done = record["field"]
                said = "not read" if done["error"] else f"{done['wbc']} WBC"
                progress(advance=1, info=f"{Path(done['source']).name}: {said}", cells=int(done["wbc"]))
            if len(fields) >= part_size:
                flush()
                if stop_after_parts is not None and written >= stop_after_parts:
                    break
    finally:
        flush()
    return written
