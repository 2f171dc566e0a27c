"""The local folder engine: many smear fields analysed as a pipeline on one machine.

Three stages overlap, each in its own thread, in input order:

    read + prepare (worker)  ->  models (caller's thread)  ->  draw + write files (worker)

Decoding a field, estimating its scale from its red cells and cutting the detector's tiles
(:meth:`SmearAnalyzer.prepare`) happen for the next fields while the models run on this one,
and drawing and PNG-encoding the annotated copy happen for the previous field. The models
themselves run one call at a time in the caller's thread (two model calls at once only slow
each other down on a small CPU). Queues are bounded, so at most ``ahead`` decoded fields and
``ahead`` unwritten results are held. Every field gets exactly what
:meth:`SmearAnalyzer.analyze` gives it, and the summary rows keep the input order.

    summary = analyze_folder(analyzer, paths, "out/", progress=update)
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from leukoscope.data.fingerprints import file_digest
from leukoscope.inference.smear_output import SUMMARY_STEM, FolderSummary, unique_stem, write_cells, write_field
from leukoscope.inference.smear_result import SmearResult
from leukoscope.io import ImageDecodeError, load_image

if TYPE_CHECKING:  # smear imports this module to delegate its folder runs here
    from PIL import Image

    from leukoscope.inference.smear import PreparedField, SmearAnalyzer


#: Fields read ahead of the models, and results waiting for their files (each holds a decoded field).
DEFAULT_AHEAD = 2


@dataclass
class _Read:
    """One input after the first stage: a prepared field, or why it could not be read."""

    path: Path
    stem: str
    field: "PreparedField | None" = None
    error: str | None = None


def _read(analyzer: "SmearAnalyzer", path: Path, stem: str, run_um_per_px: float | None,
          run_warnings: Sequence[str]) -> _Read:
    try:
        image = load_image(path, max_pixels=analyzer.max_pixels)
    except ImageDecodeError as exc:
        return _Read(path, stem, error=str(exc))
    return _Read(path, stem, analyzer.prepare(image, run_um_per_px=run_um_per_px, run_warnings=run_warnings))


def analyze_folder(analyzer: "SmearAnalyzer", paths: Sequence[str | Path], out_dir: str | Path, *,
                   progress: Callable[..., None] | None = None, ahead: int = DEFAULT_AHEAD,
                   run_um_per_px: float | None = None, run_warnings: Sequence[str] = (),
                   cells_dir: str | Path | None = None) -> FolderSummary:
    """Analyse every file, write its outputs (:func:`write_field`) and the folder's ``summary.csv`` /
    ``summary.json``; see the module docstring for the pipeline. ``run_um_per_px``: the run's scale for
    fields without their own, in place of the analyzer's. ``run_warnings``: about the run as a whole, the
    summary's and each field's (no field's count is surer than the run's). ``cells_dir``: each white cell
    also written there, by class (:func:`write_cells`).

    An unreadable file gives a row with ``error`` set, never a crash. ``progress`` is called in the
    caller's thread once per field whose files are written, in input order, as
    ``progress(advance=1, info="NAME: N WBC", cells=N)``.
    """
    if ahead < 1:
        raise ValueError(f"ahead must be at least 1, got {ahead}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used = {SUMMARY_STEM}  # a field called summary.jpg must not write over the folder's summary.json
    inputs = [(Path(p), unique_stem(Path(p), used)) for p in paths]
    results: list[SmearResult] = []
    reading: deque[Future[_Read]] = deque()
    writing: deque[tuple[SmearResult, Future]] = deque()

    def written(result: SmearResult, future: Future) -> None:
        future.result()  # a write error (disk full, no permission) stops the run, as it always did
        results.append(result)
        if progress is not None:
            n = result.differential.total
            progress(advance=1, info=f"{Path(result.source).name}: {'not read' if result.error else f'{n} WBC'}",
                     cells=n)

    # One thread per stage: more readers would compete with the models for the same cores.
    with ThreadPoolExecutor(1, thread_name_prefix="leukoscope-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="leukoscope-write") as writer:
        try:
            pending = iter(inputs)
            for path, stem in pending:
                reading.append(reader.submit(_read, analyzer, path, stem, run_um_per_px, run_warnings))
                if len(reading) >= ahead:
                    break
            while reading:
                item = reading.popleft().result()
                for path, stem in pending:  # keep the reader ``ahead`` fields in front
                    reading.append(reader.submit(_read, analyzer, path, stem, run_um_per_px, run_warnings))
                    break
                if item.field is None:
                    result = analyzer.failed_result(str(item.path), str(item.error))
                    image = None
                else:
                    result = analyzer.analyze_prepared(item.field, str(item.path))
                    image = item.field.image
                writing.append((result, writer.submit(_write, analyzer, result, out_dir, item.stem, image,
                                                      cells_dir)))
                while writing and (writing[0][1].done() or len(writing) > ahead):
                    written(*writing.popleft())
            while writing:
                written(*writing.popleft())
        except BaseException:
            # Stop at once (an error, Ctrl-C): queued fields are not read or written.
            for future in [*reading, *(f for _, f in writing)]:
                future.cancel()
            raise
    summary = FolderSummary(results, analyzer.rules, list(analyzer.detector.classes), analyzer.model_names,
                            list(analyzer.warnings), analyzer.unfamiliar_share,
                            run_um_per_px=_lent(analyzer, run_um_per_px), stated_um_per_px=analyzer.um_per_px,
                            run_warnings=list(run_warnings), provenance=analyzer.provenance,
                            outputs={str(path): stem for path, stem in inputs})
    summary.write(out_dir)
    return summary


def _write(analyzer: "SmearAnalyzer", result: SmearResult, out_dir: Path, stem: str, image: "Image.Image | None",
           cells_dir: str | Path | None) -> None:
    write_field(result, out_dir, stem, image)
    if cells_dir is not None and image is not None and result.cells:
        source = Path(result.source)
        write_cells(result, analyzer.cell_crops(image, result), cells_dir, stem,
                    file_digest(source) if source.is_file() else None)


def _lent(analyzer: "SmearAnalyzer", run_um_per_px: float | None) -> float | None:
    """The run's scale lent to fields without their own: none where the user stated one for every field."""
    if analyzer.um_per_px is not None:
        return None
    return run_um_per_px if run_um_per_px is not None else analyzer.run_um_per_px
