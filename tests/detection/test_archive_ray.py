"""The Ray archive engine against the local one: the same rows and summary, and a resume that
analyses only the fields an interrupted run did not write (a real two-node Ray cluster)."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from leukoscope.data.synthetic_smears import make_synthetic_smears  # noqa: E402
from leukoscope.bundle import model_identity  # noqa: E402
from leukoscope.inference.archive import (AnalyzerSpec, analyze_archive, pending,  # noqa: E402
                                          portable_spec)
from leukoscope.inference.archive_parts import ArchiveParts  # noqa: E402
from leukoscope.inference.field_tables import cell_rows, field_row, result_from_rows  # noqa: E402
from leukoscope.inference.smear_result import Cell, SmearResult  # noqa: E402
from leukoscope.scale import run_scale  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from leukoscope.cli import app  # noqa: E402
from tests.detection.conftest import TINY  # noqa: E402

#: The analyzer options as `leukoscope analyze --tile-size 128 --overlap 48` passes them (a rerun checks them).
OPTIONS = {"tile_size": 128, "overlap": 48, "blast_classes": None, "uncertain_threshold": None,
           "detector_threshold": None, "um_per_px": None}


@pytest.fixture(scope="module")
def two_node_cluster():
    """Two Ray nodes of one CPU each (the head and one more, both run actors), stopped after the module.
    (A head without CPUs and two more nodes would start one more raylet: seconds that CI does not have.)"""
    from ray.cluster_utils import Cluster

    # A small object store (rows are small) spares CI's /dev/shm; no dashboard: seconds of start-up.
    node = {"num_cpus": 1, "object_store_memory": 128 * 1024**2}
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """20 generated fields and one file that is not an image."""
    root = tmp_path_factory.mktemp("archive")
    make_synthetic_smears(root, 20, TINY)
    broken = root / "broken.jpg"
    broken.write_bytes(b"not an image")
    return [*sorted((root / "JPEGImages").glob("*.png")), broken]


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _summary_files(out: Path) -> tuple[list[dict], dict]:
    """A run's summary less its times and the names of each field's own files (a local run writes them, an
    archive has none)."""
    rows = list(csv.DictReader(open(out / "summary.csv")))
    payload = json.loads((out / "summary.json").read_text())
    for entry in [*payload["fields"], *rows]:
        entry.pop("seconds", None), entry.pop("output", None)
    return _without_seconds(rows), payload


def _assert_same_as_local(local, parts: ArchiveParts, fields: list[Path]) -> None:
    keys = [str(p.resolve()) for p in fields]
    got_fields, got_cells = parts.read()
    assert sorted(got_fields) == sorted(keys)
    for result, key in zip(local.results, keys):
        want = field_row(result, key, parts.rules)
        assert _without_seconds([got_fields[key]]) == _without_seconds([want])
        want_cells, cells = cell_rows(result, key), sorted(got_cells[key], key=lambda c: c["cell_id"])
        assert len(cells) == len(want_cells)
        for got, wanted in zip(cells, want_cells):
            assert {k: v for k, v in got.items() if k not in "x0 y0 x1 y1"} == \
                {k: v for k, v in wanted.items() if k not in "x0 y0 x1 y1"}
            assert [got[k] for k in ("x0", "y0", "x1", "y1")] == pytest.approx(
                [wanted[k] for k in ("x0", "y0", "x1", "y1")], abs=1e-6)


@pytest.mark.slow
def test_ray_engine_matches_the_local_engine_and_resumes(two_node_cluster, fields: list[Path], detector_bundle: Path,
                                                         classifier_bundle: Path, tmp_path: Path) -> None:
    # the command line lends a field without a scale of its own the run's (leukoscope.scale.run_scale): the same here
    run = run_scale(fields)
    spec = AnalyzerSpec(detector_bundle, classifier_bundle,
                        {**OPTIONS, **({"run_um_per_px": run.um_per_px} if run.known else {})})
    analyzer = spec.build()
    local = analyzer.analyze_paths(fields, tmp_path / "local")
    assert sum(r.differential.total for r in local.results) > 0 and local.results[-1].error

    out = tmp_path / "ray"
    # An interrupted run: stopped after two parts of 5 fields.
    first = analyze_archive(spec, fields, out, analyzer=analyzer, actors=2, part_size=5, stop_after_parts=2)
    assert (first.processed, first.skipped, first.parts_written) == (10, 0, 2)
    (out / "fields" / ".part-stale.parquet.tmp").write_bytes(b"half a file")  # a write cut short
    # The rerun, from the command line, analyses only the 11 missing fields (in one part of up to 64).
    rerun = CliRunner().invoke(app, ["analyze", *map(str, fields), "--engine", "ray", "--detector", str(detector_bundle),
                                     "--classifier", str(classifier_bundle), "--tile-size", "128", "--overlap", "48",
                                     "--out", str(out), "--quiet"])
    assert rerun.exit_code == 3, rerun.output  # the last field cannot be read: a partial run
    assert "ray: 11 field(s) analysed, 10 already in" in " ".join(rerun.output.split())
    assert len(ArchiveParts(out, analyzer.rules).parts()) == 3
    assert not list((out / "fields").glob(".*.tmp"))
    parts = ArchiveParts(out, analyzer.rules)
    _assert_same_as_local(local, parts, fields)
    assert _summary_files(out) == _summary_files(tmp_path / "local")

    # Nothing left: no actor starts, the summary is written again.
    (out / "summary.csv").unlink()
    assert analyze_archive(spec, fields, out, analyzer=analyzer).processed == 0
    assert _summary_files(out) == _summary_files(tmp_path / "local")
    # Other settings would mix two analyses in one table.
    with pytest.raises(ValueError, match="other settings.*options"):
        analyze_archive(AnalyzerSpec(detector_bundle, classifier_bundle, {**OPTIONS, "overlap": 32}), fields, out)


def test_an_actor_puts_the_runs_warnings_on_each_field_as_the_local_engine_does(
        fields: list[Path], detector_bundle: Path, classifier_bundle: Path, tmp_path: Path) -> None:
    """A stated scale the fields' red cells doubt: the local engine warned every field (and withheld its flag);
    the Ray actors left it to the summary, so a field row could carry a leukemia flag the local one did not."""
    import numpy as np

    from leukoscope.inference.archive import FieldActor

    spec = AnalyzerSpec(detector_bundle, classifier_bundle, OPTIONS)
    doubt = ["the stated scale, 0.3 um/px, is 3.6 times coarser than the run's red cells measure"]
    chosen = fields[:2]
    local = spec.build().analyze_paths(chosen, tmp_path / "local", run_warnings=doubt)
    keys = [str(p.resolve()) for p in chosen]
    batch = FieldActor(spec, 1, run_warnings=doubt)({"path": np.asarray(keys, dtype=object),
                                                     "source": np.asarray(keys, dtype=object)})
    rows = [json.loads(record)["field"] for record in batch["record"]]
    rules = local.rules
    assert _without_seconds(rows) == _without_seconds([field_row(r, k, rules) for r, k in zip(local.results, keys)])
    assert all(any(doubt[0] in warning for warning in row["warnings"]) for row in rows)


def test_a_model_is_known_by_its_weights_and_options_not_its_name(detector_bundle: Path, tmp_path: Path) -> None:
    """An archive resumed with a model replaced under the same name must not pool the two analyses."""
    import shutil

    from safetensors.torch import load_file, save_file

    bundle = Path(shutil.copytree(detector_bundle, tmp_path / "detector"))
    before = model_identity(bundle)
    assert before == model_identity(detector_bundle) and len(before["weights_sha256"]) == 64
    payload = json.loads((bundle / "bundle.json").read_text())
    payload["model_options"]["roi_sampling_ratio"] = 1
    (bundle / "bundle.json").write_text(json.dumps(payload))
    options_changed = model_identity(bundle)
    assert options_changed["model_options"]["roi_sampling_ratio"] == 1 and options_changed != before
    state = load_file(bundle / "model.safetensors")
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, bundle / "model.safetensors")
    assert model_identity(bundle)["weights_sha256"] != before["weights_sha256"]
    parts = ArchiveParts(tmp_path / "out", None)
    parts.claim({"models": {"detector": before}})
    with pytest.raises(ValueError, match="other settings \\(models differ"):
        parts.claim({"models": {"detector": model_identity(bundle)}})
    # an int8 export of the same weights is another model when its graph runs; a float export is not
    int8 = Path(shutil.copytree(detector_bundle, tmp_path / "int8"))
    payload = json.loads((int8 / "bundle.json").read_text())
    payload["export"] = {"format": "onnx", "part": "dense", "precision": "int8"}
    (int8 / "bundle.json").write_text(json.dumps(payload))
    assert model_identity(int8, "onnxruntime") == {**before, "precision": "int8"}
    assert model_identity(int8, "torch") == before
    payload["export"]["precision"] = "float32"
    (int8 / "bundle.json").write_text(json.dumps(payload))
    assert model_identity(int8, "onnxruntime") == before


def test_a_bundle_threshold_edited_between_runs_is_another_analysis(detector_bundle: Path, classifier_bundle: Path,
                                                                    tmp_path: Path) -> None:
    """The thresholds in effect are part of an archive's identity, a bundle's own included (no field is
    analysed here: the settings are claimed before any actor starts)."""
    import shutil

    classifier = Path(shutil.copytree(classifier_bundle, tmp_path / "classifier"))
    spec = AnalyzerSpec(detector_bundle, classifier, OPTIONS)
    out = tmp_path / "out"
    analyze_archive(spec, [], out)
    recorded, built = json.loads((out / "archive.json").read_text())["options"], spec.build()
    assert built.classifier.threshold is not None and built.detector.score_threshold is not None
    assert recorded["uncertain_threshold"] == built.classifier.threshold
    assert recorded["detector_threshold"] == built.detector.score_threshold
    analyze_archive(spec, [], out)  # the same bundles again: the same archive
    payload = json.loads((classifier / "bundle.json").read_text())
    payload["uncertain_threshold"] = 0.9
    (classifier / "bundle.json").write_text(json.dumps(payload))
    assert model_identity(classifier) == model_identity(classifier_bundle)  # weights and options unchanged
    with pytest.raises(ValueError, match="other settings \\(options differ"):
        analyze_archive(spec, [], out)


def test_failed_fields_are_retried_only_when_asked() -> None:
    done = {"a": None, "b": "not a recognised image"}
    assert pending(["a", "b", "c", "c"], done) == ["c"]
    assert pending(["a", "b", "c"], done, retry_failed=True) == ["b", "c"]


def test_a_newer_part_replaces_a_field_of_an_older_one(tmp_path: Path) -> None:
    from leukoscope.inference.differential import CountRules

    rules = CountRules(("blast", "lymphocyte"), ("blast",))
    old, new = ArchiveParts(tmp_path, rules), ArchiveParts(tmp_path, rules)
    new.run_id = old.run_id + "-later"
    failed = SmearResult("f.png", 0, 0, [], {}, rules.count([]), cell_classes=list(rules.classes), error="unreadable")
    cell = Cell(1, (1.0, 2.0, 3.0, 4.0), "WBC", 0.9, "blast", "blast", 0.8, False, {"blast": 0.8, "lymphocyte": 0.2})
    found = SmearResult("f.png", 64, 48, [cell], {"WBC": 1}, rules.count(["blast"]), cell_classes=list(rules.classes))
    old.write([field_row(failed, "/x/f.png", rules)], [])
    new.write([field_row(found, "/x/f.png", rules)], cell_rows(found, "/x/f.png"))
    (tmp_path / "cells" / "part-orphan.parquet").write_bytes((tmp_path / "cells" / new.parts()[-1]).read_bytes())
    assert old.done() == {"/x/f.png": None}
    rows, cells = old.read()
    back = result_from_rows(rows["/x/f.png"], cells["/x/f.png"], rules)
    assert back.error is None and [c.label for c in back.cells] == ["blast"] and back.differential.blasts == 1


def test_result_read_back_counts_as_analysed(fields: list[Path], detector_bundle: Path, classifier_bundle: Path,
                                             tmp_path: Path) -> None:
    analyzer = AnalyzerSpec(detector_bundle, classifier_bundle, OPTIONS).build()
    parts = ArchiveParts(tmp_path, analyzer.rules)
    results = [analyzer.analyze(path) for path in fields[:3]]
    parts.write([field_row(r, r.source, analyzer.rules) for r in results],
                [c for r in results for c in cell_rows(r, r.source)])
    rows, cells = parts.read()
    for result in results:
        back = result_from_rows(rows[result.source], cells[result.source], analyzer.rules)
        assert back.summary() == result.summary()
        assert [c.as_row(analyzer.cell_classes) for c in back.cells] == \
            [c.as_row(analyzer.cell_classes) for c in result.cells]


def test_the_summary_from_counts_is_the_summary_from_cells(tmp_path: Path) -> None:
    """The Ray engine's summary reads field rows and two cell columns, not every cell row: the same
    pooled differential and warnings as the local engine's, unfamiliar cells included (3 of 4 here,
    above the share that warns), and a field replaced by a newer part counted once."""
    from leukoscope.inference.archive import _summary
    from leukoscope.inference.differential import CountRules
    from leukoscope.inference.smear_output import FolderSummary

    rules = CountRules(("blast", "lymphocyte"), ("blast",))

    def cell(k: int, label: str, unfamiliar: bool) -> Cell:
        return Cell(k, (1.0, 2.0, 3.0, 4.0), "WBC", 0.9, label, label, 0.8, False, {label: 0.8}, 5.0, unfamiliar)

    a = [cell(1, "blast", True), cell(2, "lymphocyte", True), cell(3, "uncertain", False)]
    b = [cell(1, "blast", True)]
    results = [SmearResult(name, 64, 48, cells, {"WBC": len(cells)}, rules.count([c.label for c in cells]),
                           cell_classes=list(rules.classes)) for name, cells in (("/x/a.png", a), ("/x/b.png", b))]
    stale = SmearResult("/x/b.png", 64, 48, [cell(1, "lymphocyte", False)] * 2, {"WBC": 2},
                        rules.count(["lymphocyte"] * 2), cell_classes=list(rules.classes))
    older, parts = ArchiveParts(tmp_path, rules), ArchiveParts(tmp_path, rules)
    parts.run_id = older.run_id + "-later"
    older.write([field_row(stale, stale.source, rules)], cell_rows(stale, stale.source))
    parts.write([field_row(r, r.source, rules) for r in results], [c for r in results for c in cell_rows(r, r.source)])

    class Analyzer:  # what _summary reads of the driver's analyzer
        detector = SimpleNamespace(info=SimpleNamespace(model_name="d"), classes=["WBC"])
        classifier = None
        warnings: list[str] = []
        unfamiliar_share = 0.5
        um_per_px = run_um_per_px = None
        model_names = {"detector": "d", "classifier": None}
        provenance = None

    keys = [r.source for r in results]
    analyzer = Analyzer()
    analyzer.rules = rules
    from_counts = _summary(analyzer, parts, keys, {k: k for k in keys})
    from_cells = FolderSummary(results, rules, ["WBC"], {"detector": "d", "classifier": None}, [], 0.5)
    assert from_counts.pooled.to_json() == from_cells.pooled.to_json()
    assert from_counts.pooled.total == 4 and from_counts.pooled.blasts == 2
    assert any("3 of 4" in w for w in from_counts.warnings) and from_counts.warnings == from_cells.warnings
    assert from_counts.rows() == from_cells.rows()
    assert all(not r.cells for r in from_counts.results)  # the cells themselves were not read


def test_shipped_models_travel_by_name(tmp_path: Path) -> None:
    from leukoscope.pretrained import pretrained_root

    assert portable_spec(pretrained_root() / "smear-detector") == "pretrained:smear-detector"
    assert portable_spec("pretrained:wbc-classifier") == "pretrained:wbc-classifier"
    assert portable_spec(tmp_path / "bundle") == str((tmp_path / "bundle").resolve())
    assert portable_spec(None) is None


@pytest.mark.slow
def test_more_threads_per_actor_than_any_node_has_is_an_error_not_a_hang(two_node_cluster, fields: list[Path],
                                                                         detector_bundle: Path, tmp_path: Path) -> None:
    # Each node of the test cluster has 1 CPU: an actor asking for 2 could never be placed, and Ray would wait.
    with pytest.raises(ValueError, match="--threads 2 per actor is more than the largest node.*1 CPUs"):
        analyze_archive(AnalyzerSpec(detector_bundle, None, OPTIONS), fields[:2], tmp_path / "out", threads=2)


def _tile_rows(result) -> list[tuple]:
    """What a slide analysis counted, tile by tile: where, and each counted cell's box, label and scores."""
    return [(tile.spot.index, tile.counted,
             [(cell.box, cell.label, sorted((k, round(v, 5)) for k, v in cell.probabilities.items()))
              for cell in tile.result.cells])
            for tile in result.tiles]


def test_slide_tiles_on_ray_actors_count_what_local_threads_count(two_node_cluster, detector_bundle: Path,
                                                                  classifier_bundle: Path, fields: list[Path],
                                                                  tmp_path: Path) -> None:
    """A generated pyramidal slide: the same tiles, cells and differential from two actors (one per node)
    as from this process; and from the command line."""
    pytest.importorskip("tiffslide")
    from leukoscope.inference.slide.analysis import SlideAnalyzer
    from leukoscope.inference.slide.ray_tiles import RayTileRunner
    from tests.detection.slide_fakes import TILE, slide_pixels, write_pyramid

    path = write_pyramid(tmp_path / "slide.tif", slide_pixels(0))
    spec = AnalyzerSpec(detector_bundle, classifier_bundle, OPTIONS)
    options = {"target_cells": 60, "tile_size": TILE, "mask_max_pixels": 300_000}
    local = SlideAnalyzer(spec.build(), workers=2, **options).analyze(path)
    assert local.differential.total == 60 and len(local.tiles) >= 2  # more than one tile
    with RayTileRunner(spec, actors=2) as runner:
        assert runner.workers == 2
        on_ray = SlideAnalyzer(spec.build(), runner=runner, **options).analyze(path)
    assert _tile_rows(on_ray) == _tile_rows(local)
    assert on_ray.differential.to_json() == local.differential.to_json()

    # A slide and a field in one command: one Ray session for both (the archive engine takes the field).
    result = CliRunner().invoke(app, ["analyze", str(path), str(fields[0]), "--engine", "ray", "--actors", "2", "--detector",
                                      str(detector_bundle), "--classifier", str(classifier_bundle), "--tile-size",
                                      "128", "--overlap", "48", "--slide-tile", str(TILE), "--target-cells", "60",
                                      "--out", str(tmp_path / "cli"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "ray: 2 actor(s)" in result.output
    written = json.loads((tmp_path / "cli" / "slide" / "slide.slide.json").read_text())
    assert written["differential"]["total"] == 60
    assert "ray: 1 field(s) analysed" in result.output and (tmp_path / "cli" / "fields").exists()


def test_more_actors_than_the_nodes_can_place_is_an_error_not_a_hang(two_node_cluster) -> None:
    from leukoscope.inference.archive import actor_count

    assert actor_count(None, 1) == 2  # one per node of 1 CPU
    with pytest.raises(ValueError, match="--actors 3 of 1 CPU.*can run 2 at once"):
        actor_count(3, 1)


def test_a_slide_a_worker_cannot_read_comes_back_as_its_own_error(two_node_cluster, detector_bundle: Path,
                                                                  tmp_path: Path) -> None:
    """Not as Ray's wrapper with the actor's traceback: the CLI prints it as one line."""
    from leukoscope.inference.slide.analysis import TileJob
    from leukoscope.inference.slide.monolayer import TileSpot
    from leukoscope.inference.slide.ray_tiles import RayTileRunner
    from leukoscope.inference.slide.reader import SlideError

    job = TileJob(str(tmp_path / "gone.tif"), 0, 256, 16, 1.0, None)
    with RayTileRunner(AnalyzerSpec(detector_bundle, None, OPTIONS), actors=1) as runner:
        error = runner.submit(job, TileSpot(0, 0, 0, 0, 0, 256, 256, 0.5)).exception(timeout=300)
    # type(...) is: Ray's wrapper is a subclass of the cause (RayTaskError(SlideError)), its text the traceback
    assert type(error) is SlideError and "gone.tif" in str(error) and "ray::" not in str(error)


def test_an_actor_that_dies_mid_tile_is_restarted_and_the_tile_tried_again(two_node_cluster, detector_bundle: Path,
                                                                          tmp_path: Path) -> None:
    """A worker process lost mid-tile (out of memory, a node gone): the tile's result still comes, the same
    as an actor that never died gives, from the restarted actor (max_restarts / max_task_retries)."""
    pytest.importorskip("tiffslide")
    import os
    from dataclasses import dataclass

    from leukoscope.inference.slide.analysis import TileJob
    from leukoscope.inference.slide.monolayer import TileSpot
    from leukoscope.inference.slide.ray_tiles import RayTileRunner, SlideTileActor
    from tests.detection.slide_fakes import slide_pixels, write_pyramid

    @dataclass(frozen=True)
    class DiesTheFirstTime(TileJob):  # pickled by value: the actor needs no test module to run it
        marker: str = ""

        def run(self, analyzer, slide, spot):
            if not os.path.exists(self.marker):
                with open(self.marker, "w") as handle:
                    handle.write(str(os.getpid()))
                os._exit(1)  # the worker process dies as an OOM kill would leave it: no exception, no cleanup
            return TileJob.run(self, analyzer, slide, spot)

    path = str(write_pyramid(tmp_path / "slide.tif", slide_pixels(0)))
    spec = AnalyzerSpec(detector_bundle, None, OPTIONS)
    spot = TileSpot(0, 1, 0, 256, 0, 256, 256, 0.5)
    marker = tmp_path / "died"
    with RayTileRunner(spec, actors=1) as runner:
        result = runner.submit(DiesTheFirstTime(path, 0, 256, 16, 1.0, None, marker=str(marker)), spot).result(
            timeout=300)
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # it was the actor's process that died
    expected = SlideTileActor(spec, 1).analyze(TileJob(path, 0, 256, 16, 1.0, None), spot)  # in this process
    assert [(c.box, c.label) for c in result.cells] == [(c.box, c.label) for c in expected.cells]
    assert result.cells  # the untrained detector keeps every box: there is something to compare


def test_an_actor_keeps_one_slide_open(detector_bundle: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tiffslide")
    from leukoscope.inference.slide import ray_tiles
    from leukoscope.inference.slide.analysis import TileJob
    from leukoscope.inference.slide.monolayer import TileSpot
    from tests.detection.slide_fakes import slide_pixels, write_pyramid

    opened, closed = [], []
    real_open = ray_tiles.open_slide

    def tracking_open(path):
        slide = real_open(path)
        opened.append(path)
        real_close = slide.close
        slide.close = lambda: (closed.append(path), real_close())[1]
        return slide

    monkeypatch.setattr(ray_tiles, "open_slide", tracking_open)
    actor = ray_tiles.SlideTileActor(AnalyzerSpec(detector_bundle, None, OPTIONS), 1)  # in this process
    paths = [str(write_pyramid(tmp_path / f"s{k}.tif", slide_pixels(k))) for k in range(2)]
    spot = TileSpot(0, 1, 0, 256, 0, 256, 256, 0.5)
    for path in (paths[0], paths[0], paths[1], paths[0]):
        actor.analyze(TileJob(path, 0, 256, 16, 1.0, None), spot)
    assert opened == [paths[0], paths[1], paths[0]] and closed == [paths[0], paths[1]]
