"""The pipelined folder engine (leukoscope.inference.folder): the same results as analysing the
fields one by one, in input order, with every file written and unreadable files as error rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoscope.inference.drawing import annotate
from leukoscope.inference.folder import analyze_folder
from leukoscope.inference.smear import SmearAnalyzer
from leukoscope.inference.smear_result import SmearResult
from leukoscope.inference.summary_figure import differential_figure
from tests.conftest import fresh_python
from tests.detection.smear_fakes import DarkBlobDetector


def _fields(smear_root: Path, tmp_path: Path) -> list[Path]:
    """Four readable synthetic fields with a broken file and a missing one among them."""
    images = sorted((smear_root / "JPEGImages").glob("*.png"))[:4]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    return [images[0], broken, images[1], images[2], tmp_path / "missing.png", images[3]]


def _same(piped: SmearResult, alone: SmearResult) -> None:
    assert piped.source == alone.source and (piped.width, piped.height) == (alone.width, alone.height)
    assert piped.tiles == alone.tiles and piped.capped_tiles == alone.capped_tiles
    assert piped.object_counts == alone.object_counts and piped.scale == alone.scale
    assert [c.as_row(piped.cell_classes) for c in piped.cells] == [c.as_row(alone.cell_classes) for c in alone.cells]
    assert piped.differential.to_json() == alone.differential.to_json()
    np.testing.assert_array_equal(piped.detections.boxes, alone.detections.boxes)
    np.testing.assert_array_equal(piped.detections.scores, alone.detections.scores)


@pytest.mark.parametrize("ahead", [1, 3])
def test_pipelined_folder_gives_the_sequential_results_in_input_order(
        smear_root: Path, detector_bundle: Path, classifier_bundle: Path, tmp_path: Path, ahead: int) -> None:
    analyzer = SmearAnalyzer.from_bundles(detector_bundle, classifier_bundle, tile_size=128, overlap=48)
    paths = _fields(smear_root, tmp_path)
    calls: list[dict] = []
    summary = analyze_folder(analyzer, paths, tmp_path / "out", ahead=ahead,
                             progress=lambda **kw: calls.append(kw))
    assert [r.source for r in summary.results] == [str(p) for p in paths]
    for path, piped in zip(paths, summary.results):
        if path.name in ("broken.jpg", "missing.png"):
            assert piped.error and not piped.cells
            continue
        assert piped.error is None
        _same(piped, analyzer.analyze(path))
    assert sum(r.differential.total for r in summary.results) > 0  # the comparison compared cells
    # One progress call per field, in input order, with its cell count (and one per tile of a tiled field).
    calls = [c for c in calls if c["advance"]]
    assert [c["advance"] for c in calls] == [1] * len(paths)
    assert [c["cells"] for c in calls] == [r.differential.total for r in summary.results]
    assert [c["info"].split(":")[0] for c in calls] == [p.name for p in paths]


def test_every_output_is_written_and_an_unreadable_file_is_a_row(
        smear_root: Path, detector_bundle: Path, classifier_bundle: Path, tmp_path: Path) -> None:
    analyzer = SmearAnalyzer.from_bundles(detector_bundle, classifier_bundle, tile_size=128, overlap=48)
    paths = _fields(smear_root, tmp_path)
    out = tmp_path / "out"
    summary = analyzer.analyze_paths(paths, out)  # the CLI's entry point delegates to the engine
    for path, result in zip(paths, summary.results):
        assert (out / f"{path.stem}.json").is_file() and (out / f"{path.stem}.cells.csv").is_file()
        png = out / f"{path.stem}.annotated.png"
        if result.error:
            assert not png.exists()
            assert json.loads((out / f"{path.stem}.json").read_text())["error"] == result.error
            continue
        # Lossless: the PNG holds exactly the annotated field, whatever its compression settings.
        drawn = annotate(Image.open(path).convert("RGB"), result)
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(drawn))
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + len(paths) + 1  # header, one per input, TOTAL
    assert "not a recognised image" in rows[2] and "does not exist" in rows[5]
    assert json.loads((out / "summary.json").read_text())["failed"] == 2
    # and the pooled differential as a picture, as differential_figure draws it
    assert np.array_equal(np.asarray(Image.open(out / "summary.png")),
                          np.asarray(differential_figure(summary.pooled, len(paths), 2)))


def test_a_field_called_summary_keeps_its_own_files_beside_the_folders(tmp_path: Path) -> None:
    pixels = np.full((120, 160, 3), 230, np.uint8)
    pixels[40:70, 50:90] = 30
    paths = [tmp_path / "in" / "summary.png", tmp_path / "in" / "other.png"]
    paths[0].parent.mkdir()
    for path in paths:
        Image.fromarray(pixels).save(path)
    out = tmp_path / "out"
    analyze_folder(SmearAnalyzer(DarkBlobDetector()), paths, out)
    assert json.loads((out / "summary.json").read_text())["images"] == 2  # the folder's
    field = json.loads((out / "summary-2.json").read_text())  # the field's, under a stem of its own
    assert field["source"] == str(paths[0]) and (out / "summary-2.annotated.png").is_file()



def test_stems_differing_only_in_case_get_files_of_their_own() -> None:
    """On a case-insensitive file system (macOS, Windows) Field.jpg and field.png would share their files, and
    Summary.jpg would write over the folder's summary.json."""
    from leukoscope.inference.smear_output import SUMMARY_STEM, unique_stem

    used = {SUMMARY_STEM}
    stems = [unique_stem(Path(name), used) for name in ("Field.jpg", "field.png", "FIELD.tif", "Summary.jpg")]
    assert stems == ["Field", "field-2", "FIELD-3", "Summary-2"]
    assert len({stem.casefold() for stem in stems} | {SUMMARY_STEM}) == 5


class _FailsOnSecondField(DarkBlobDetector):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def detect(self, images, *, threshold=None, batch_size=4):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("model broke")
        return super().detect(images, threshold=threshold, batch_size=batch_size)


def test_an_error_in_the_models_stops_the_run(tmp_path: Path) -> None:
    paths = []
    for k in range(5):
        pixels = np.full((120, 160, 3), 230, np.uint8)
        pixels[40:70, 50 + k:90 + k] = 30
        paths.append(tmp_path / f"f{k}.png")
        Image.fromarray(pixels).save(paths[-1])
    analyzer = SmearAnalyzer(_FailsOnSecondField())
    with pytest.raises(RuntimeError, match="model broke"):
        analyze_folder(analyzer, paths, tmp_path / "out")
    assert not (tmp_path / "out" / "summary.csv").exists()
    with pytest.raises(ValueError, match="ahead"):
        analyze_folder(analyzer, paths, tmp_path / "out", ahead=0)


def _blob_fields(tmp_path: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    paths = []
    for k, (width, height) in enumerate(sizes):
        pixels = np.full((height, width, 3), 230, np.uint8)
        pixels[40:70, 50 + k:90 + k] = 30
        paths.append(tmp_path / f"f{k}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_a_field_of_many_tiles_reports_each_tile(tmp_path: Path) -> None:
    """A 100 Mpx field ran 71 s with no progress line: each tile of a tiled field is reported, as a slide's are;
    a field of one tile is not."""
    paths = _blob_fields(tmp_path, [(1300, 1000), (160, 120)])
    calls: list[dict] = []
    analyze_folder(SmearAnalyzer(DarkBlobDetector(), tile_size=800, overlap=300), paths, tmp_path / "out",
                   progress=lambda **kw: calls.append(kw))
    assert [(c["advance"], c["info"]) for c in calls] == [
        (0, "f0.png: tiles 1/4"), (0, "f0.png: tiles 2/4"), (0, "f0.png: tiles 3/4"), (0, "f0.png: tiles 4/4"),
        (1, "f0.png: 1 WBC"), (1, "f1.png: 1 WBC")]


def test_fields_held_ahead_are_bounded_by_their_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four 100 Mpx fields peaked at 6.2 GB: two were read ahead and two waited for their files. Beyond the
    field the models work on, fields are held up to ``ahead_pixels``, or one field whatever its size."""
    import threading
    import time

    from leukoscope.inference import folder

    alive, peak, lock = [0], [0], threading.Lock()
    read, write = folder._read, folder._write

    def counted_read(*args, **kwargs):
        item = read(*args, **kwargs)
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        return item

    def slow_write(*args, **kwargs):
        time.sleep(0.1)  # files written slower than the models run: results wait for them
        write(*args, **kwargs)
        with lock:
            alive[0] -= 1

    monkeypatch.setattr(folder, "_read", counted_read)
    monkeypatch.setattr(folder, "_write", slow_write)
    paths = _blob_fields(tmp_path, [(160, 120)] * 6)
    peaks = {}
    for budget in (10**9, 160 * 120):  # every field within it (held by count, as before) / one field's pixels
        alive[0] = peak[0] = 0
        summary = analyze_folder(SmearAnalyzer(DarkBlobDetector()), paths, tmp_path / f"out{budget}",
                                 ahead_pixels=budget)
        assert [r.source for r in summary.results] == [str(p) for p in paths]
        peaks[budget] = peak[0]
    assert peaks[10**9] > 2 and peaks[160 * 120] == 2  # the models' field and one more


def test_prepare_then_analyze_prepared_is_analyze() -> None:
    pixels = np.full((1000, 1300, 3), 230, np.uint8)
    pixels[400:560, 620:800] = 40
    image = Image.fromarray(pixels)
    analyzer = SmearAnalyzer(DarkBlobDetector(), tile_size=800, overlap=300)
    prepared = analyzer.prepare(image)
    assert len(prepared.tiles) == 4 and prepared.factor == 1.0
    # uint8 views of one array: a prepared field waiting in the queue holds no float copies of its tiles
    assert all(tile.dtype == np.uint8 for _, tile in prepared.tiles)
    first = prepared.tiles[0][1]  # the four overlap in the middle: views of one array share it
    assert all(np.shares_memory(tile, first) for _, tile in prepared.tiles)
    piped, alone = analyzer.analyze_prepared(prepared, "f"), analyzer.analyze(image, "f")
    assert [c.box for c in piped.cells] == [c.box for c in alone.cells] == [(620.0, 400.0, 800.0, 560.0)]
    assert piped.seconds >= prepared.seconds


def test_loading_the_models_imports_neither_scikit_learn_nor_matplotlib(detector_bundle: Path,
                                                                       classifier_bundle: Path) -> None:
    """Seconds of start-up in every `leukoscope analyze`: the classical models and the evaluation
    package's metrics and figures are imported only when used."""
    code = ("import sys; from leukoscope.inference.smear import SmearAnalyzer; "
            f"SmearAnalyzer.from_bundles({str(detector_bundle)!r}, {str(classifier_bundle)!r}); "
            "print(sorted(m for m in ('sklearn', 'matplotlib', 'pandas') if m in sys.modules))")
    assert fresh_python(code, timeout=300) == "[]"
