"""Whole-slide analysis on a generated pyramidal TIFF: thick strip | monolayer | feathered edge."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tiffslide")
pytest.importorskip("tifffile")

from leukoscope.bundle import BundleInfo  # noqa: E402
from leukoscope.data.synthetic import SYNTHETIC_CLASSES  # noqa: E402
from leukoscope.inference.slide.analysis import SlideAnalyzer, write_slide  # noqa: E402
from leukoscope.inference.slide.reader import SlideError, is_slide_path, open_slide  # noqa: E402
from leukoscope.inference.slide.sampler import sample_until  # noqa: E402
from leukoscope.inference.smear import SmearAnalyzer  # noqa: E402
from tests.detection.slide_fakes import (COLUMNS, MONOLAYER_COLUMNS, MPP, ROWS, TILE, NucleusDetector,  # noqa: E402
                                         slide_pixels, write_pyramid)
from tests.detection.smear_fakes import constant_classifier  # noqa: E402


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("slide") / "slide.tif", slide_pixels(0))


def slide_analyzer(**options) -> SlideAnalyzer:
    smear = SmearAnalyzer(NucleusDetector(), constant_classifier(SYNTHETIC_CLASSES, "lymphocyte"), min_cells=5)
    options = {"tile_size": TILE, "mask_max_pixels": 300_000, **options}
    return SlideAnalyzer(smear, **options)


def test_reader_levels_and_recorded_pixel_size(slide_path: Path) -> None:
    with open_slide(slide_path) as slide:
        assert slide.backend == "tiffslide" and slide.dimensions == (COLUMNS * TILE, ROWS * TILE)
        assert slide.level_count == 3 and slide.level_downsamples[1] == pytest.approx(2.0)
        assert slide.um_per_px == pytest.approx(MPP)
        region = slide.read_region((TILE, 0), 1, (64, 32))
        assert region.mode == "RGB" and region.size == (64, 32)
    assert is_slide_path(slide_path)


def test_what_lies_outside_the_scan_is_white_glass(slide_path: Path) -> None:
    """tiffslide pads a region reaching past the scan with black; an edge tile's margin would then carry
    black bands into its red-cell threshold (its scale) and its stained share."""
    with open_slide(slide_path) as slide:
        for level in (0, 1):
            scale = int(slide.level_downsamples[level])
            region = np.asarray(slide.read_region((-20 * scale, -10 * scale), level, (60, 50)))
            inside = np.asarray(slide.read_region((0, 0), level, (40, 40)))
            assert (region[:10] == 255).all() and (region[:, :20] == 255).all()
            assert (region[10:, 20:] == inside).all()
            width, height = slide.level_dimensions[level]
            beyond = np.asarray(slide.read_region(((width - 30) * scale, (height - 20) * scale), level, (50, 40)))
            assert (beyond[:20, :30] != 255).any() and (beyond[20:] == 255).all() and (beyond[:, 30:] == 255).all()


def test_empty_glass_with_a_speck_of_dust_has_no_monolayer() -> None:
    """Otsu's threshold halves blank glass's sensor noise into "stained" and "glass": every tile then had a
    coverage of about 0.5, inside the monolayer's bounds, and the whole slide was read at full resolution."""
    from leukoscope.inference.slide.monolayer import find_monolayer

    glass = np.clip(np.random.default_rng(0).normal(232, 2.5, (90, 150, 3)), 0, 255).astype(np.uint8)
    glass[40:43, 70:73] = 60  # dust
    assert find_monolayer(glass, 4.0, (600, 360), 64).tiles == []
    cells = glass.copy()
    cells[::4, :] = 150  # stained rows: 25% ... and 50% of the glass once doubled
    cells[1::4, :] = 150
    assert len(find_monolayer(cells, 4.0, (600, 360), 64).tiles) == (600 // 64) * (360 // 64)


def test_a_slide_smaller_than_one_tile_says_so(tmp_path: Path) -> None:
    """...naming the short side (a slide 1280 px wide was "smaller than one tile" of 1045), and that nothing was
    examined: its differential's flag said "No white cell found: check focus, stain...", as of a slide whose
    tiles held none."""
    for (height, width), short in (((200, 300), "in height"), ((300, 200), "in width"), ((200, 230), "in width and "
                                                                                                      "height")):
        small = write_pyramid(tmp_path / "small.tif", slide_pixels(0)[:height, :width], levels=2)
        result = slide_analyzer().analyze(small)
        assert not result.tiles and f"smaller than one tile ({TILE} px at level 0) {short}:" in result.warnings[0]
    flags = result.differential.flags
    assert flags == ["Not analysed: no tile of the slide was examined (it is smaller than one tile in width and "
                     "height)"]
    paths = write_slide(result, tmp_path / "out")
    summary = json.loads(paths["summary_json"].read_text())
    assert summary["images"] == 0 and summary["not_analysed"].startswith("no tile of the slide was examined")
    assert summary["pooled_differential"]["flags"] == flags


def test_a_slide_with_nothing_examined_is_not_analysed_for_the_exit_code(
        slide_path: Path, detector_bundle: Path, tmp_path: Path) -> None:
    """2 when nothing was analysed, 3 when other inputs were: a slide with no tile examined exited 0."""
    from typer.testing import CliRunner

    from leukoscope.cli import app

    glass = np.clip(np.random.default_rng(0).normal(232, 2.5, (2 * TILE, 2 * TILE, 3)), 0, 255).astype(np.uint8)
    blank = write_pyramid(tmp_path / "glass.tif", glass)
    common = ["--detector", str(detector_bundle), "--no-classifier", "--target-cells", "5", "--slide-tile", str(TILE),
              "--quiet"]
    alone = CliRunner().invoke(app, ["analyze", str(blank), "--out", str(tmp_path / "out"), *common])
    said = " ".join(alone.output.split())
    assert alone.exit_code == 2, alone.output
    assert "glass.tif: not analysed: No monolayer found" in said and "No white cell found" not in said
    summary = json.loads((tmp_path / "out" / "glass" / "summary.json").read_text())
    assert summary["not_analysed"] == "no tile of the slide was examined (no monolayer found)"
    both = CliRunner().invoke(app, ["analyze", str(blank), str(slide_path), "--out", str(tmp_path / "out2"), *common])
    assert both.exit_code == 3, both.output


def test_an_edge_tile_of_a_slide_without_a_pixel_size_estimates_its_scale_on_the_scan_only(tmp_path: Path) -> None:
    """Each tile is read with a margin, which past the slide's edge is white padding: on glass less white than
    the padding, Otsu's threshold of the red cells then parted padding from slide, and every tile of the top and
    bottom rows (here all of them) had "no isolated red cells found" and no scale."""
    from PIL import Image

    from leukoscope.scale import estimate_scale

    pixels = (slide_pixels(0) * 0.8).astype(np.uint8)  # glass at 184-209, not as white as the padding
    path = write_pyramid(tmp_path / "nores.tif", pixels, mpp=None)
    result = slide_analyzer(target_cells=10_000).analyze(path)
    assert len(result.tiles) == 4 * ROWS
    for tile in result.tiles:
        on_its_own = estimate_scale(Image.fromarray(pixels[tile.spot.y:tile.spot.y + TILE,
                                                           tile.spot.x:tile.spot.x + TILE]))
        assert tile.result.scale["source"] == "estimated", tile.result.scale
        assert tile.result.scale["um_per_px"] == pytest.approx(on_its_own.um_per_px, rel=0.05)
    assert not any("had no scale" in w for w in result.warnings)


def test_a_pixel_size_no_microscope_gives_is_said_and_not_used(tmp_path: Path, caplog) -> None:
    import logging

    path = write_pyramid(tmp_path / "odd.tif", slide_pixels(0)[:256, :512], mpp=40.0)  # 40 um per pixel
    with caplog.at_level(logging.WARNING, logger="leukoscope.inference.slide.reader"):
        with open_slide(path) as slide:
            assert slide.um_per_px is None
    assert "pixel size of 40 x 40 um, which no microscope gives" in caplog.text


def test_a_grayscale_slide_reads_as_rgb(tmp_path: Path) -> None:
    import tifffile

    gray = np.tile(np.linspace(40, 220, 256, dtype=np.uint8), (256, 1))
    path = tmp_path / "gray.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(gray, subifds=1, tile=(128, 128), photometric="minisblack")
        tif.write(gray[::2, ::2], subfiletype=1, tile=(128, 128), photometric="minisblack")
    with open_slide(path) as slide:
        region = np.asarray(slide.read_region((100, 0), 0, (20, 10)))
        assert region.shape == (10, 20, 3) and (region[..., 0] == gray[:10, 100:120]).all()
        assert (region[..., 0] == region[..., 2]).all()


def test_sampled_tiles_lie_in_the_monolayer(slide_path: Path) -> None:
    result = slide_analyzer(target_cells=10).analyze(slide_path)
    mono = result.monolayer
    assert result.mask_level == 1  # found on a low-resolution level
    assert mono.mask.shape == (ROWS, COLUMNS)
    assert mono.mask[:, list(MONOLAYER_COLUMNS)].all()
    assert not mono.mask[:, 0].any() and not mono.mask[:, -1].any()  # thick strip, feathered edge
    assert mono.coverage[:, 0].min() > mono.max_coverage and mono.coverage[:, -1].max() < mono.min_coverage
    assert result.tiles
    for tile in result.tiles:
        assert TILE <= tile.spot.x and tile.spot.x + tile.spot.width <= TILE * (MONOLAYER_COLUMNS[-1] + 1)
        assert mono.mask[tile.spot.row, tile.spot.column]


def test_a_slide_whose_every_level_is_too_large_to_read_whole_is_still_analysed(
        slide_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The monolayer is found on a level read whole; a pyramid of few levels (every one over the limit) was
    refused. Its coarsest level is now read in chunks and averaged down."""
    from leukoscope.inference.slide import analysis

    monkeypatch.setattr(analysis, "MASK_CHUNK", 64)  # several chunks across the 384 x 128 px level
    analyzer = slide_analyzer(target_cells=7, mask_max_pixels=20_000)  # level 2: 49,152 px
    with open_slide(slide_path) as slide:
        picture, level, downsample = analyzer.mask_image(slide)
        assert (level, downsample) == (2, 8.0)
        assert (np.asarray(picture) == np.asarray(slide.read_level(2).reduce(2))).all()
    result = analyzer.analyze(slide_path)
    mask = result.monolayer.mask
    assert not mask[:, 0].any() and not mask[:, -1].any()  # thick strip, feathered edge
    assert result.differential.total == 7
    assert all(tile.spot.column in MONOLAYER_COLUMNS for tile in result.tiles)


def test_counts_the_target_then_stops(slide_path: Path) -> None:
    result = slide_analyzer(target_cells=7).analyze(slide_path)
    assert result.differential.total == 7 and not result.sampling_warnings
    assert sum(t.counted for t in result.tiles) == 7 and len(result.tiles) < len(result.monolayer.tiles)
    assert result.tiles[-1].counted <= len(result.tiles[-1].result.cells)
    # the JSON says what each tile found, not only what was counted (the last tile's cells beyond the target)
    cut = slide_analyzer(target_cells=6).analyze(slide_path).to_json()["tiles"]
    assert sum(t["wbc_counted"] for t in cut) == 6 and sum(t["wbc_found"] for t in cut) > 6
    assert all(t["wbc_found"] >= t["wbc_counted"] for t in cut)


def test_platelets_and_nucleated_red_cells_do_not_count_towards_the_target(slide_path: Path) -> None:
    """Boxes the classifier calls erythroblast are counted beside the white cells, never as the target's."""
    classes = [*SYNTHETIC_CLASSES, "erythroblast"]
    smear = SmearAnalyzer(NucleusDetector(), constant_classifier(classes, "erythroblast"), min_cells=5)
    result = SlideAnalyzer(smear, tile_size=TILE, mask_max_pixels=300_000, target_cells=7).analyze(slide_path)
    assert result.differential.total == 0 and result.differential.counts["erythroblast"] > 7
    assert len(result.tiles) == len(result.monolayer.tiles)  # never reached 7 white cells: every tile read
    assert any("fewer than the target 7" in w for w in result.warnings)


def test_fewer_cells_than_the_target_counts_all_and_warns(slide_path: Path) -> None:
    result = slide_analyzer(target_cells=1000).analyze(slide_path)
    assert len(result.tiles) == len(result.monolayer.tiles) == 4 * ROWS
    assert 0 < result.differential.total < 1000
    assert any("fewer than the target 1000" in w for w in result.warnings)


def _signature(result) -> list:
    return [(t.spot.index, t.counted, [c.box for c in t.result.cells]) for t in result.tiles]


def test_seeded_sampling_is_deterministic_and_threads_change_nothing(slide_path: Path) -> None:
    one = slide_analyzer(target_cells=9, seed=3).analyze(slide_path)
    again = slide_analyzer(target_cells=9, seed=3).analyze(slide_path)
    threaded = slide_analyzer(target_cells=9, seed=3, workers=3).analyze(slide_path)
    assert _signature(one) == _signature(again) == _signature(threaded)
    assert one.differential.to_json() == threaded.differential.to_json()
    other = slide_analyzer(target_cells=9, seed=4).analyze(slide_path)
    assert [t.spot.index for t in other.tiles] != [t.spot.index for t in one.tiles]


def test_sampler_in_order_whatever_the_workers() -> None:
    items = list(range(20))
    for workers in (1, 4):
        done = sample_until(items, lambda i: i, lambda r: 1, 5, seed=1, workers=workers)
        assert done.total == 5 and done.reached and len(done.items) == 5
    assert sample_until(items, lambda i: i, lambda r: 1, 5, seed=1, workers=4).items == \
        sample_until(items, lambda i: i, lambda r: 1, 5, seed=1).items


def test_outputs(slide_path: Path, tmp_path: Path) -> None:
    result = slide_analyzer(target_cells=6, workers=2).analyze(slide_path)
    paths = write_slide(result, tmp_path)
    payload = json.loads(paths["json"].read_text())
    assert payload["counted_cells"] == 6 and payload["slide"]["um_per_px"] == pytest.approx(MPP)
    assert payload["differential"]["total"] == 6 and payload["tiles"]
    assert payload["tiles"][0]["scale"]["source"] == "given"  # the slide's recorded pixel size
    with open(paths["cells"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    for row in rows:  # boxes in level 0 pixels, inside their tile
        centre_x = (float(row["x0"]) + float(row["x1"])) / 2  # a counted cell's centre lies in its tile
        assert int(row["tile_x"]) <= centre_x < int(row["tile_x"]) + TILE
    summary = json.loads(paths["summary_json"].read_text())
    assert summary["pooled_differential"]["total"] == 6 and len(summary["fields"]) == len(result.tiles)
    from PIL import Image

    from leukoscope.inference.summary_figure import differential_figure

    # summary.png names a slide's parts tiles (it said "Differential of 9 fields")
    drawn = np.asarray(Image.open(tmp_path / "summary.png"))
    assert np.array_equal(drawn, np.asarray(differential_figure(result.summary.pooled, len(result.tiles), 0,
                                                                unit="tile")))
    assert not np.array_equal(drawn, np.asarray(differential_figure(result.summary.pooled, len(result.tiles), 0)))

    overview = Image.open(paths["overview"])
    assert overview.size == (COLUMNS * TILE // 2, ROWS * TILE // 2)
    # The monolayer is shaded green, the thick strip and the feathered edge are not.
    with open_slide(slide_path) as slide:
        plain = np.asarray(slide.read_level(1), dtype=float)
    shaded = np.asarray(overview.convert("RGB"), dtype=float)
    greener = (shaded[..., 1] - shaded[..., 0]) - (plain[..., 1] - plain[..., 0])
    half = TILE // 2
    assert greener[:, half * 2:half * 4].mean() > 20
    assert abs(greener[:, half * 5:].mean()) < 1 and abs(greener[20:, :half].mean()) < 1


def test_not_a_slide(tmp_path: Path) -> None:
    flat = write_pyramid(tmp_path / "flat.tif", slide_pixels(0)[:128, :128], levels=1)
    assert not is_slide_path(flat)
    with pytest.raises(SlideError, match="not a pyramidal slide.*analyse it as a field: leukoscope analyze FILE"):
        open_slide(flat)
    # a one-level .svs: `analyze FILE` would take it for a slide again; the advice says what works
    svs = write_pyramid(tmp_path / "flat.svs", slide_pixels(0)[:128, :128], levels=1)
    assert is_slide_path(svs)
    with pytest.raises(SlideError, match=r"save it as TIFF or PNG .*\.svs is always taken for a slide"):
        open_slide(svs)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all")
    with pytest.raises(SlideError, match="not a readable whole-slide TIFF"):
        open_slide(junk)
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "missing.svs")


def test_a_flat_scan_too_large_for_a_field_is_told_how_to_be_read(tmp_path: Path, monkeypatch) -> None:
    """An 11000 x 11000 one-level TIFF was refused as a field (over 120 Mpx) and, with --slide, as "not a pyramidal
    slide; analyse it as a field": each refusal sent to the other."""
    import leukoscope.inference.slide.reader as reader

    flat = write_pyramid(tmp_path / "flat.tif", slide_pixels(0)[:128, :128], levels=1)
    monkeypatch.setattr(reader, "DEFAULT_MAX_PIXELS", 128 * 128 - 1)
    with pytest.raises(SlideError, match=r"at 128x128 it is also over a field's limit .* save it as a tiled "
                                         r"pyramidal TIFF .*analyse that as a slide"):
        open_slide(flat)


def test_missing_tiffslide_names_the_extra(slide_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiffslide", None)  # import tiffslide -> ImportError
    with pytest.raises(SlideError, match=r"leukoscope\[slide\]"):
        open_slide(slide_path)


def test_missing_openslide_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openslide", None)
    mrxs = tmp_path / "slide.mrxs"
    mrxs.write_bytes(b"x")
    with pytest.raises(SlideError, match="openslide-python"):
        open_slide(mrxs)


def test_cli_analyze_slide_writes_the_outputs(slide_path: Path, detector_bundle: Path, classifier_bundle: Path,
                                              tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from leukoscope.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", str(slide_path), "--detector", str(detector_bundle),
                                      "--classifier", str(classifier_bundle), "--out", str(out), "--target-cells",
                                      "5", "--slide-tile", str(TILE), "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    folder = out / "slide"
    for name in ("slide.slide.json", "slide.cells.csv", "slide.overview.png", "summary.csv", "summary.json"):
        assert (folder / name).is_file(), name
    payload = json.loads((folder / "slide.slide.json").read_text())
    assert payload["target_cells"] == 5 and payload["tiles"]
    assert all(1 <= t["column"] <= 4 for t in payload["tiles"])


def test_a_slide_in_a_folder_is_analysed_as_a_slide(slide_path: Path, detector_bundle: Path,
                                                    classifier_bundle: Path, tmp_path: Path) -> None:
    """A pyramidal TIFF found in a folder was read flat as one field, pooled with the fields, and a .svs there
    was "left out, not an image": one rule for a file, however it is reached."""
    import shutil

    from PIL import Image
    from typer.testing import CliRunner

    from leukoscope.cli import app

    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(slide_path, folder / "slide.tif")
    shutil.copy(slide_path, folder / "other.svs")
    Image.new("RGB", (64, 64), (230, 200, 200)).save(folder / "field.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", str(folder), "--detector", str(detector_bundle), "--classifier",
                                      str(classifier_bundle), "--out", str(out), "--target-cells", "5",
                                      "--slide-tile", str(TILE), "--workers", "1", "--quiet"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert "2 whole-slide file(s) found in the folders are analysed as slides" in said
    for stem in ("slide", "other"):
        assert (out / stem / f"{stem}.slide.json").is_file(), stem
    # a scanner's long name (barcode, patient, date, position) is shortened, as a field's is
    long = folder / ("slide_" + "x" * 240 + ".tif")
    shutil.copy(slide_path, long)
    (folder / "slide.tif").unlink(), (folder / "other.svs").unlink()
    result = CliRunner().invoke(app, ["analyze", str(long), "--detector", str(detector_bundle), "--classifier",
                                      str(classifier_bundle), "--out", str(tmp_path / "long"), "--target-cells",
                                      "5", "--slide-tile", str(TILE), "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "long").iterdir()
    assert len(written.name) <= 160 and (written / f"{written.name}.slide.json").is_file()
    with (out / "summary.csv").open() as handle:  # the folder's fields: the slides are not among them
        assert [Path(row["image"]).name for row in csv.DictReader(handle)] == ["field.png", "TOTAL"]


def test_cli_flat_tif_given_as_slide_fails_clearly(detector_bundle: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from leukoscope.cli import app

    flat = write_pyramid(tmp_path / "flat.tif", slide_pixels(0)[:128, :128], levels=1)
    result = CliRunner().invoke(app, ["analyze", str(flat), "--slide", "--detector", str(detector_bundle),
                                      "--no-classifier", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and "not a pyramidal slide" in result.output


def test_one_bad_slide_does_not_stop_the_others_and_two_of_one_name_are_refused(
        slide_path: Path, detector_bundle: Path, classifier_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from leukoscope.cli import app

    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all")
    common = ["--detector", str(detector_bundle), "--classifier", str(classifier_bundle), "--target-cells", "5",
              "--slide-tile", str(TILE), "--workers", "1", "--quiet"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", str(broken), str(slide_path), "--out", str(out), *common])
    said = " ".join(result.output.split())
    assert result.exit_code == 3, result.output  # one slide of two analysed: a partial run
    assert "broken.svs: not analysed" in said and "1 of 2 slide(s) could not be analysed" in said
    assert f"slide files: {out / 'slide'}" in said
    assert (out / "slide" / "slide.slide.json").is_file()
    alone = CliRunner().invoke(app, ["analyze", str(broken), "--out", str(tmp_path / "out2"), *common])
    assert alone.exit_code == 2  # nothing analysed
    twin = tmp_path / "other" / slide_path.name
    twin.parent.mkdir()
    shutil.copy(slide_path, twin)
    same = CliRunner().invoke(app, ["analyze", str(slide_path), str(twin), "--out", str(tmp_path / "out3"), *common])
    assert same.exit_code == 2 and "would both write" in " ".join(same.output.split())
    assert not (tmp_path / "out3" / "slide").exists()


def test_a_cell_on_a_tile_border_is_counted_once(tmp_path: Path) -> None:
    from skimage.draw import disk

    pixels = slide_pixels(1)
    border_x, centre_y = 2 * TILE, TILE // 2  # between the 2nd and 3rd monolayer tiles of the first row
    rr, cc = disk((centre_y, border_x), 14, shape=pixels.shape[:2])
    pixels[rr, cc] = (60, 30, 110)  # a dark nucleus cut in half by the border
    path = write_pyramid(tmp_path / "border.tif", pixels)
    result = slide_analyzer(target_cells=10_000).analyze(path)
    assert {(t.spot.row, t.spot.column) for t in result.tiles} >= {(0, 1), (0, 2)}
    paths = write_slide(result, tmp_path / "out")
    with open(paths["cells"]) as handle:
        rows = list(csv.DictReader(handle))
    centres = [((float(r["x0"]) + float(r["x1"])) / 2, (float(r["y0"]) + float(r["y1"])) / 2) for r in rows]
    on_border = [c for c in centres if abs(c[0] - border_x) < 10 and abs(c[1] - centre_y) < 10]
    assert len(on_border) == 1  # seen whole through the margin, counted by one tile only
    whole = [r for r in rows if abs((float(r["x0"]) + float(r["x1"])) / 2 - border_x) < 10]
    assert float(whole[0]["x1"]) - float(whole[0]["x0"]) > 20  # the whole nucleus, not half of it


class _ScaledNucleusDetector(NucleusDetector):
    """The rule detector, recording a training scale of 2 * MPP: tiles come from level 1."""

    def __init__(self) -> None:
        super().__init__()
        self.info = BundleInfo("rule", ["WBC"], task="detect", metrics={}, um_per_px=2 * MPP)


def test_a_coarser_level_is_analysed_at_its_own_scale_also_when_level_0_is_stated(slide_path: Path) -> None:
    for stated in (None, MPP):  # recorded in the file / stated by the user
        smear = SmearAnalyzer(_ScaledNucleusDetector(), constant_classifier(SYNTHETIC_CLASSES, "lymphocyte"),
                              min_cells=5, um_per_px=stated)
        result = SlideAnalyzer(smear, tile_size=TILE // 2, mask_max_pixels=300_000, target_cells=5).analyze(slide_path)
        assert result.slide["tile_level"] == 1
        for tile in result.tiles:
            assert tile.result.scale["um_per_px"] == pytest.approx(2 * MPP)  # level 1's pixels, not level 0's
            assert tile.result.scale["detector_resample"] == 1.0


def test_a_stated_scale_the_slides_record_contradicts_is_said_and_stops_the_flag(slide_path: Path) -> None:
    """A slide file records its pixel size: a stated one twice as coarse is still used (a record can be
    wrong), but said, as a folder's red cells doubt one, and no leukemia flag rests on it."""
    from tests.detection.smear_fakes import VERIFIED

    def analysed(stated: float | None):
        detector = NucleusDetector()
        detector.info = BundleInfo("rule", ["WBC"], task="detect", metrics=dict(VERIFIED))  # no other warning
        smear = SmearAnalyzer(detector, constant_classifier(SYNTHETIC_CLASSES, "blast"), min_cells=5,
                              um_per_px=stated)
        return SlideAnalyzer(smear, tile_size=TILE, mask_max_pixels=300_000, target_cells=5).analyze(slide_path)

    wrong = analysed(2 * MPP).summary.pooled
    (doubt,) = [w for w in wrong.warnings if w.startswith("the stated scale")]
    assert doubt.startswith(f"the stated scale, {2 * MPP:g} um/px, is 2.0 times coarser than the slide file "
                            f"records ({MPP:.4f} um/px, at level 0)")
    assert not wrong.acute_leukemia_flag and wrong.blasts == wrong.total > 0
    agreed = analysed(MPP).summary.pooled  # the control: the same cells at the recorded scale are flagged
    assert not any(w.startswith("the stated scale") for w in agreed.warnings) and agreed.acute_leukemia_flag


def test_a_tile_reports_only_the_objects_inside_it(slide_path: Path) -> None:
    result = slide_analyzer(target_cells=10_000).analyze(slide_path)
    for tile in result.tiles:
        # The rule detector finds white cells only: objects and counted cells are the same ones.
        assert tile.result.object_counts["WBC"] == len(tile.result.cells) == tile.counted
        assert (tile.result.width, tile.result.height) == (TILE, TILE)


def test_a_tiles_warnings_speak_of_the_cells_it_counted(slide_path: Path) -> None:
    """A tile is analysed with its margin, then cut to its own cells: its warnings were those of the whole read
    ("6 of 6 classified cells" unlike the training data on a tile that counted 4), and the last tile's those of
    all its cells, also of the ones past the target."""
    from leukoscope.evaluation.ood import OodStats
    from leukoscope.inference.quality import is_unfamiliar_warning

    classifier = constant_classifier(SYNTHETIC_CLASSES, "lymphocyte")
    classifier.ood = OodStats("energy", {"energy": -100.0})  # every cell unfamiliar
    smear = SmearAnalyzer(NucleusDetector(), classifier, min_cells=5)
    for target in (10_000, 6):
        result = SlideAnalyzer(smear, tile_size=TILE, mask_max_pixels=300_000, target_cells=target).analyze(slide_path)
        assert sum(t.found > len(t.result.cells) for t in result.tiles) == (target == 6)  # the last one cut
        for tile in result.tiles:
            n = len(tile.result.cells)
            said = [w for w in tile.result.warnings if is_unfamiliar_warning(w)]
            assert said == ([] if n == 0 else [said[0]]) and all(f" {n} of {n} cells" in w for w in said), said
        assert f"{result.differential.total} of {result.differential.total} cells" in " ".join(result.warnings)


def test_a_slides_warnings_call_its_tiles_tiles_and_say_what_was_left_out(tmp_path: Path) -> None:
    """They said "1 of 1 field (stripes.tif@0,0) had no scale and were analysed", and of a slide whose right and
    bottom edges were never looked at (partial tiles), that "the whole monolayer was counted"."""
    stripes = np.full((TILE, TILE, 3), 232, dtype=np.uint8)
    stripes[::4], stripes[1::4] = 150, 150  # half stained (a monolayer's coverage), no round red cell: no scale
    path = write_pyramid(tmp_path / "stripes.tif", stripes, mpp=None, levels=2)
    smear = SmearAnalyzer(_ScaledNucleusDetector(), constant_classifier(SYNTHETIC_CLASSES, "lymphocyte"), min_cells=5)
    result = SlideAnalyzer(smear, tile_size=TILE, mask_max_pixels=300_000).analyze(path)
    assert len(result.tiles) == 1 and result.tiles[0].result.scale["source"] == "unknown"
    assert "1 of 1 tile (stripes.tif@0,0) had no scale and was analysed at the detector's" in " ".join(result.warnings)

    cut = write_pyramid(tmp_path / "cut.tif", slide_pixels(0)[:400, :1200])  # 4 whole columns, 1 whole row
    result = slide_analyzer(target_cells=1000).analyze(cut)
    assert result.monolayer.coverage.shape == (1, 4) and len(result.tiles) == 3  # columns 1-3 of the monolayer
    said = result.sampling_warnings
    assert said[0].endswith("fewer than the target 1000: every one was analysed and all its white cells counted.")
    assert said[1] == ("Partial tiles at the slide's edges were not considered: the right 176 px and the bottom "
                       f"144 px (45% of the slide) lie outside the grid of whole {TILE} px tiles.")
    whole = slide_analyzer(target_cells=1000).analyze(write_pyramid(tmp_path / "whole.tif", slide_pixels(0)))
    assert len(whole.sampling_warnings) == 1  # the grid covers it: nothing else to say


def test_folded_warnings_name_what_the_parts_are_and_agree_with_their_number() -> None:
    from leukoscope.inference.quality import CAP_WORDING
    from leukoscope.inference.smear_output import FieldWarnings, folded_field_warnings

    unscaled = {"source": "unknown", "analysed_at_um_per_px": 0.08}
    tiles = [FieldWarnings("s.tif@0,0", [], unscaled, capped=True), FieldWarnings("s.tif@0,256", [], {})]
    said = folded_field_warnings(tiles, unit="tile")
    assert said[0] == f"{CAP_WORDING} in 1 of 2 tiles (s.tif@0,0): cells beyond the cap were dropped, the count is " \
                      "unreliable."
    assert said[1].startswith("1 of 2 tiles (s.tif@0,0) had no scale and was analysed")
    one = folded_field_warnings([FieldWarnings("s.tif@0,0", [], unscaled, capped=True)], unit="tile")
    assert "1 of 1 tile (s.tif@0,0)" in one[0] and "this field" not in one[0]  # a slide's one tile is no field
    fields = folded_field_warnings([FieldWarnings(f"{k}.png", [], unscaled) for k in "ab"])
    assert fields[0].startswith("2 of 2 fields (a.png, b.png) had no scale and were analysed")


def test_slides_keep_their_own_scale_when_fields_lend_theirs(slide_path: Path, detector_bundle: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fields given beside a slide lend their run scale to each other, never to the slide's tiles."""
    from typer.testing import CliRunner

    from PIL import Image

    from leukoscope.cli import analysis, app
    from tests.test_scale import smear_field

    seen = []
    monkeypatch.setattr(analysis, "_analyze_slide",
                        lambda analyzer, path, out, **_: seen.append(analyzer.run_um_per_px) or True)
    fields = tmp_path / "fields"
    fields.mkdir()
    for seed in range(5):
        smear_field(20.0, size=(320, 240), seed=seed, n_red=10).save(fields / f"field{seed}.png")
    Image.new("RGB", (320, 240), (230, 220, 220)).save(fields / "blank.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", str(slide_path), str(fields), "--detector", str(detector_bundle),
                                          "--no-classifier", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert seen == [None]  # the slide was analysed without the fields' scale
    assert json.loads((out / "blank.json").read_text())["scale"]["source"] == "run"
