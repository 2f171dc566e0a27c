"""The local folder engine: many smear fields analysed as a pipeline on one machine.

Three stages overlap, each in its own thread, in input order:

    read + prepare (worker)  ->  models (caller's thread)  ->  draw + write files (worker)

Decoding a field, estimating its scale from its red cells and cutting the detector's tiles
(:meth:`SmearAnalyzer.prepare`) happen for the next fields while the models run on this one,
and drawing and PNG-encoding the annotated copy happen for the previous field. The models
themselves run one call at a time in the caller's thread (two model calls at once only slow
each other down on a small CPU). Queues are bounded, so at most ``ahead`` decoded fields and
``ahead`` unwritten results are held, and beyond the field the models work on no more than
``ahead_pixels`` pixels of fields, or one field (a folder of 100 Mpx fields held four of them
and peaked at 6.2 GB). Every field gets exactly what
:meth:`SmearAnalyzer.analyze` gives it, and the summary rows keep the input order.

    summary = analyze_folder(analyzer, paths, "out/", progress=update)
"""

from __future__ import annotations

import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from PIL import Image

from leukoscope.data.fingerprints import file_digest
from leukoscope.inference.smear_output import SUMMARY_STEM, FolderSummary, unique_stem, write_cells, write_field
from leukoscope.inference.smear_result import SmearResult
from leukoscope.io import ImageDecodeError, load_image

if TYPE_CHECKING:  # smear imports this module to delegate its folder runs here
    from leukoscope.inference.smear import PreparedField, SmearAnalyzer


#: Fields read ahead of the models, and results waiting for their files (each holds a decoded field).
DEFAULT_AHEAD = 2
#: Pixels of the fields held besides the one the models work on (read ahead, or waiting for their files): four
#: 2592x1944 fields (5 Mpx each) as before, but one 100 Mpx field at a time (one is always let through, or reading
#: and writing would not overlap the models at all).
DEFAULT_AHEAD_PIXELS = 24_000_000
#: A field analysed in more tiles than this reports each tile to ``progress`` (a 100 Mpx field runs a minute).
TILE_PROGRESS_MIN = 1


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
    return _Read(path, stem, analyzer.prepare(image, scale=analyzer.recorded_scale(path), run_um_per_px=run_um_per_px,
                                              run_warnings=run_warnings))


def analyze_folder(analyzer: "SmearAnalyzer", paths: Sequence[str | Path], out_dir: str | Path, *,
                   progress: Callable[..., None] | None = None, ahead: int = DEFAULT_AHEAD,
                   ahead_pixels: int = DEFAULT_AHEAD_PIXELS, run_um_per_px: float | None = None,
                   run_warnings: Sequence[str] = (), cells_dir: str | Path | None = None) -> FolderSummary:
    """Analyse every file, write its outputs (:func:`write_field`) and the folder's ``summary.csv`` /
    ``summary.json``; see the module docstring for the pipeline. ``run_um_per_px``: the run's scale for
    fields without their own, in place of the analyzer's. ``run_warnings``: about the run as a whole, the
    summary's and each field's (no field's count is surer than the run's). ``cells_dir``: each white cell
    also written there, by class (:func:`write_cells`).

    An unreadable file gives a row with ``error`` set, never a crash. ``progress`` is called in the
    caller's thread once per field whose files are written, in input order, as
    ``progress(advance=1, info="NAME: N WBC", cells=N)``, and for a field of more than one tile after
    each tile, as ``progress(advance=0, info="NAME: tiles I/N")``.
    """
    if ahead < 1:
        raise ValueError(f"ahead must be at least 1, got {ahead}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used = {SUMMARY_STEM}  # a field called summary.jpg must not write over the folder's summary.json
    stems = [(Path(p), unique_stem(Path(p), used)) for p in paths]
    pending = deque(stems)
    results: list[SmearResult] = []
    reading: deque[tuple[Future[_Read], int]] = deque()  # with each field's pixels
    writing: deque[tuple[SmearResult, Future, int]] = deque()
    sizes: dict[Path, int] = {}  # headers read once

    def held() -> int:
        return sum(n for _, n in reading) + sum(n for *_, n in writing)

    def size_of(path: Path) -> int:
        if path not in sizes:
            sizes[path] = _pixels(path)
        return sizes[path]

    def read_ahead(reader: ThreadPoolExecutor) -> None:
        # The next field for the models is always read; more only within ``ahead`` and ``ahead_pixels``.
        while pending:
            path, stem = pending[0]
            if reading and (len(reading) >= ahead or held() + size_of(path) > ahead_pixels):
                return
            pending.popleft()
            reading.append((reader.submit(_read, analyzer, path, stem, run_um_per_px, run_warnings), size_of(path)))

    def written(result: SmearResult, future: Future, _: int) -> None:
        future.result()  # a write error (disk full, no permission) stops the run, as it always did
        results.append(result)
        if progress is not None:
            n = result.differential.total
            progress(advance=1, info=f"{Path(result.source).name}: {'not read' if result.error else f'{n} WBC'}",
                     cells=n)

    def over() -> bool:  # results waiting for their files beyond ``ahead``, or beyond the pixels (one may wait)
        return len(writing) > ahead or (len(writing) + len(reading) > 1 and held() > ahead_pixels)

    # One thread per stage: more readers would compete with the models for the same cores.
    with ThreadPoolExecutor(1, thread_name_prefix="leukoscope-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="leukoscope-write") as writer:
        try:
            read_ahead(reader)
            while reading:
                item = reading.popleft()[0].result()
                read_ahead(reader)  # keep the reader in front while the models work on this field
                if item.field is None:
                    result = analyzer.failed_result(str(item.path), str(item.error))
                    image, pixels = None, 0
                else:
                    result = analyzer.analyze_prepared(item.field, str(item.path),
                                                       on_tile=_tile_progress(progress, item))
                    image = item.field.image
                    pixels = image.size[0] * image.size[1]
                writing.append((result, writer.submit(_write, analyzer, result, out_dir, item.stem, image,
                                                      cells_dir), pixels))
                while writing and (writing[0][1].done() or over()):
                    written(*writing.popleft())
                read_ahead(reader)
            while writing:
                written(*writing.popleft())
        except BaseException:
            # Stop at once (an error, Ctrl-C): queued fields are not read or written.
            for future in [*(f for f, _ in reading), *(f for _, f, _ in writing)]:
                future.cancel()
            raise
    summary = FolderSummary(results, analyzer.rules, list(analyzer.detector.classes), analyzer.model_names,
                            list(analyzer.warnings), analyzer.unfamiliar_share,
                            run_um_per_px=_lent(analyzer, run_um_per_px), stated_um_per_px=analyzer.um_per_px,
                            run_warnings=list(run_warnings), provenance=analyzer.provenance,
                            outputs={str(path): stem for path, stem in stems})
    summary.write(out_dir)
    return summary


def _pixels(path: Path) -> int:
    """A field's pixels from its header (0 when it cannot be read: its error row holds none)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size[0] * image.size[1]
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0


def _tile_progress(progress: Callable[..., None] | None, item: _Read) -> Callable[[int, int], None] | None:
    """Progress after each tile of a field of many (a 100 Mpx field ran 71 s with no line), none for one tile."""
    if progress is None or item.field is None or len(item.field.tiles) <= TILE_PROGRESS_MIN:
        return None
    name = item.path.name
    return lambda done, total: progress(advance=0, info=f"{name}: tiles {done}/{total}")


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
