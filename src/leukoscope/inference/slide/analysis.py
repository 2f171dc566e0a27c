"""Whole-slide analysis: find the monolayer, sample its tiles until enough white cells are counted,
and give the slide's differential.

    analyzer = SlideAnalyzer(SmearAnalyzer.from_bundles(detector, classifier), target_cells=200, workers=2)
    result = analyzer.analyze("slide.svs")
    write_slide(result, "out/")   # slide.json, cells.csv, summary.csv/.json, overview.png

Each sampled tile is a field for :class:`~leukoscope.inference.smear.SmearAnalyzer` (at the
slide's recorded pixel size, else estimated from its red cells as fields are), and the tiles'
differentials pool into the slide's with the same rules (:class:`FolderSummary`). As in a manual
differential, counting stops at the target: the cells of the last tile are counted in reading
order up to it, the rest of that tile is left uncounted. Decision support, not a diagnosis.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field, replace
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
from PIL import Image, ImageDraw

from leukoscope.inference.detector import DetectionResult
from leukoscope.inference.slide.monolayer import (DEFAULT_MAX_COVERAGE, DEFAULT_MIN_COVERAGE, Monolayer, TileSpot,
                                                  find_monolayer)
from leukoscope.inference.slide.reader import Slide, open_slide
from leukoscope.inference.slide.sampler import sample_until
from leukoscope.inference.smear import PreparedField, SmearAnalyzer
from leukoscope.inference.smear_output import FolderSummary, shortened
from leukoscope.inference.smear_result import Cell, SmearResult
from leukoscope.labels import DISCLAIMER
from leukoscope.scale import FieldScale, estimate_scale, stated_doubt_of_record

DEFAULT_TARGET_CELLS = 200
#: The monolayer is found on the finest level with at most this many pixels (read whole).
MASK_MAX_PIXELS = 16_000_000
#: Longest side of the overview picture.
OVERVIEW_SIDE = 1600


@dataclass
class SlideTile:
    """A sampled tile: where it is, the level it was read at and what its analysis found."""

    spot: TileSpot
    level: int
    level_size: int
    """Tile side in the pixels of ``level``."""
    result: SmearResult
    """The tile's analysis, cut to the cells counted (the last tile's beyond the target left out)."""
    counted: int
    """White cells of this tile in the slide's count (fewer than found in the last tile)."""
    found: int = -1
    """White cells the tile's analysis found (-1: not given; then ``counted``)."""

    @property
    def white_found(self) -> int:
        return self.counted if self.found < 0 else self.found


@dataclass
class SlideResult:
    source: str
    slide: dict[str, Any]
    """Dimensions, levels, recorded pixel size, reader."""
    monolayer: Monolayer
    mask_level: int
    mask_downsample: float
    tiles: list[SlideTile]
    summary: FolderSummary
    """The counted tiles as fields, pooled: the slide's differential (``summary.pooled``)."""
    target_cells: int
    seed: int
    sampling_warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    overview: Image.Image | None = field(default=None, repr=False)

    @property
    def differential(self):
        return self.summary.pooled

    @property
    def warnings(self) -> list[str]:
        """Quality warnings of the count, then the sampling's (target not reached, no monolayer)."""
        return self.differential.warnings + self.sampling_warnings

    def to_json(self) -> dict[str, Any]:
        mono = self.monolayer
        return {
            "disclaimer": DISCLAIMER,
            "source": self.source,
            "slide": self.slide,
            "warnings": self.warnings,
            "target_cells": self.target_cells,
            "counted_cells": self.differential.total,
            "seed": self.seed,
            "monolayer": {"level": self.mask_level, "downsample": self.mask_downsample,
                          "tile_size_level0": mono.tile_size, "grid": list(mono.coverage.shape),
                          "min_coverage": mono.min_coverage, "max_coverage": mono.max_coverage,
                          "green_threshold": mono.threshold, "monolayer_tiles": len(mono.tiles),
                          "coverage": np.round(mono.coverage, 3).tolist()},
            "tiles": [{"index": t.spot.index, "column": t.spot.column, "row": t.spot.row, "x": t.spot.x,
                       "y": t.spot.y, "width": t.spot.width, "height": t.spot.height,
                       "coverage": round(t.spot.coverage, 3), "level": t.level, "level_size": t.level_size,
                       "wbc_found": t.white_found, "wbc_counted": t.counted, "scale": t.result.scale,
                       "warnings": t.result.warnings} for t in self.tiles],
            "differential": self.differential.to_json(),
            "seconds": round(self.seconds, 3),
        }


#: Side (level pixels) of the chunks a level too large to read whole is read in, to find the monolayer on.
MASK_CHUNK = 4096
#: Each tile is read with this much of its neighbours around it (microns; larger than a white
#: cell), and a cell is counted by the tile that holds its centre: a cell on a border is seen
#: whole by the detector and counted once.
TILE_MARGIN_UM = 25.0
#: The margin as a share of the tile side when the slide's pixel size is unknown.
TILE_MARGIN_SHARE = 0.25


def _core_cells(result: SmearResult, field: PreparedField, margin: int, side: int,
                analyzer: SmearAnalyzer) -> SmearResult:
    """``result`` of a tile read with ``margin`` pixels around it (``field``), cut to the tile itself: the
    cells and detected objects whose centre lies in it, boxes shifted to the tile's origin, and the warnings
    of those cells (those of the whole read counted the margin's cells: "6 of 6" on a tile that counted 4)."""
    def inside(box) -> bool:
        cx, cy = (box[0] + box[2]) / 2 - margin, (box[1] + box[3]) / 2 - margin
        return 0 <= cx < side and 0 <= cy < side

    shift = (margin, margin, margin, margin)
    cells = [replace(c, box=tuple(v - m for v, m in zip(c.box, shift))) for c in result.cells if inside(c.box)]
    detections, counts = result.detections, result.object_counts
    if detections is not None:
        keep = np.array([inside(box) for box in detections.boxes], dtype=bool).reshape(-1)
        detections = DetectionResult(detections.boxes[keep] - np.array(shift, dtype=float), detections.scores[keep],
                                     detections.labels[keep], detections.classes)
        counts = detections.counts()
    warnings = analyzer.field_warnings(field, cells, result.capped_tiles, result.tiles)
    # A slide keeps no list of the white cells scored under the threshold: its tiles' margins overlap, and its
    # record (slide.json) holds no field's JSON for the note to point to.
    return replace(result, width=side, height=side, cells=cells, detections=detections, object_counts=counts,
                   differential=analyzer.rules.count([c.label for c in cells], warnings), possible_white_cells=[])


def _counted(result: SmearResult, n: int, analyzer: SmearAnalyzer) -> SmearResult:
    """``result`` with its cells (reading order) up to its ``n``-th white cell counted: platelets and nucleated
    red cells met on the way stay, beside the count (:attr:`Differential.not_white`), as in any field."""
    if n >= result.differential.total:
        return result
    not_white = set(result.differential.not_white)
    cells, white = [], 0
    for cell in result.cells:
        if white >= n:
            break
        cells.append(cell)
        white += cell.label not in not_white
    return replace(result, cells=cells,
                   differential=analyzer.rules.count([c.label for c in cells], _cut_warnings(result, cells, analyzer)))


def _cut_warnings(result: SmearResult, cells: list[Cell], analyzer: SmearAnalyzer) -> list[str]:
    """``result``'s warnings for ``cells``, a part of its cells that holds at least one: of its warnings only the
    unfamiliar share turns on which cells (no colour and cells cut by their boxes, on whether there are any),
    so that one is made again for them, in its place (after the others when the whole tile had none)."""
    before, after = analyzer.unfamiliar_cells_warning(result.cells), analyzer.unfamiliar_cells_warning(cells)
    warnings = [after if w == before else w for w in result.warnings] if before else [*result.warnings, after]
    return [w for w in warnings if w]


def _outside_the_grid(dimensions: list[int], mono: Monolayer) -> str | None:
    """What the monolayer's grid of whole tiles leaves out (the strips at the right and bottom edges narrower than
    a tile; their cells are never considered), in words; None when the tiles cover the slide."""
    (width, height), (rows, columns), tile = dimensions, mono.coverage.shape, mono.tile_size
    right, bottom = width - columns * tile, height - rows * tile
    if not rows or not columns or (right <= 0 and bottom <= 0):
        return None
    strips = " and ".join(f"the {name} {px} px" for name, px in (("right", right), ("bottom", bottom)) if px > 0)
    share = 1 - rows * columns * tile * tile / (width * height)
    return (f"Partial tiles at the slide's edges were not considered: {strips} ({100 * share:.0f}% of the slide) "
            f"lie outside the grid of whole {tile} px tiles.")


def _white_cells(result: SmearResult) -> int:
    """What a slide's sampling counts towards ``target_cells``: white cells, not every box."""
    return result.differential.total


@dataclass(frozen=True)
class TileJob:
    """How to read and analyse any monolayer tile of one slide: small and picklable, so a Ray actor
    can do it with its own analyzer and its own handle on the slide file."""

    path: str
    level: int
    level_size: int
    """Tile side in the pixels of ``level``."""
    margin: int
    """Pixels of ``level`` read around the tile (:data:`TILE_MARGIN_UM`)."""
    downsample: float
    """``level``'s downsample from level 0."""
    scale: FieldScale | None
    """The tiles' pixel size when the slide records it (or the user stated it); None: estimated per tile."""

    def run(self, analyzer: SmearAnalyzer, slide: Slide, spot: TileSpot) -> SmearResult:
        """The analysis of the tile at ``spot``, cut to the cells whose centre lies in it."""
        m0 = int(round(self.margin * self.downsample))  # the margin in level-0 pixels
        side = self.level_size + 2 * self.margin
        location = (spot.x - m0, spot.y - m0)
        image = slide.read_region(location, self.level, (side, side))
        # Without a recorded scale, the tile's own red cells give it, on the scan only: the white glass padding
        # a margin past the slide's edge would take Otsu's threshold of the red cells (no scale at all).
        scale = (self.scale if self.scale is not None
                 else estimate_scale(image.crop(on_scan(slide, self.level, location, side))))
        field = analyzer.prepare(image, scale=scale)
        whole = analyzer.analyze_prepared(field, f"{Path(self.path).name}@{spot.x},{spot.y}")
        return _core_cells(whole, field, self.margin, self.level_size, analyzer)


def on_scan(slide: Slide, level: int, location: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) of a ``side`` px square read on ``level`` at ``location`` (level 0
    pixels) that lies on the scan; the rest :meth:`Slide.read_region` fills with white."""
    downsample = slide.level_downsamples[level]
    width, height = slide.level_dimensions[level]
    x, y = location[0] / downsample, location[1] / downsample
    return (max(0, math.ceil(-x)), max(0, math.ceil(-y)),
            min(side, max(0, math.floor(width - x))), min(side, max(0, math.floor(height - y))))


class TileRunner(Protocol):
    """Runs tile analyses somewhere else than this process's threads (Ray actors:
    :class:`~leukoscope.inference.slide.ray_tiles.RayTileRunner`)."""

    workers: int
    """How many tiles it analyses at once."""

    def submit(self, job: TileJob, spot: TileSpot) -> Future[SmearResult]: ...


class SlideAnalyzer:
    """Monolayer -> seeded tile sample -> per-tile smear analysis -> slide differential.

    ``tile_size``: tile side in the pixels the analysis works at (the detector's training scale
    when the detector records one and the slide records its pixel size; else level 0 pixels).
    Tiles are read from the coarsest level at most 15% coarser than that scale (resampled to it).
    Tiles are analysed ``workers`` at a time in threads of this process, or by ``runner`` (Ray
    actors); the count is the same either way.
    """

    def __init__(self, analyzer: SmearAnalyzer, *, target_cells: int = DEFAULT_TARGET_CELLS, tile_size: int = 1024,
                 min_coverage: float = DEFAULT_MIN_COVERAGE, max_coverage: float = DEFAULT_MAX_COVERAGE,
                 seed: int = 0, workers: int = 1, mask_max_pixels: int = MASK_MAX_PIXELS,
                 runner: TileRunner | None = None) -> None:
        if target_cells < 1:
            raise ValueError(f"--target-cells must be at least 1, got {target_cells}")
        if tile_size < 64:
            raise ValueError(f"tile size must be at least 64 pixels, got {tile_size}")
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        if not 0.0 <= min_coverage < max_coverage <= 1.0:
            raise ValueError(f"coverage bounds must satisfy 0 <= min < max <= 1, got {min_coverage}, {max_coverage}")
        self.analyzer = analyzer
        self.target_cells = int(target_cells)
        self.tile_size = int(tile_size)
        self.min_coverage, self.max_coverage = float(min_coverage), float(max_coverage)
        self.seed = int(seed)
        self.workers = int(workers)
        self.mask_max_pixels = int(mask_max_pixels)
        self.runner = runner

    def tile_level(self, slide: Slide) -> tuple[int, int, float | None]:
        """The level tiles are read at, the tile side in its pixels, and its pixel size (None: not recorded)."""
        stated = self.analyzer.um_per_px
        um0 = stated if stated is not None else slide.um_per_px
        trained = getattr(self.analyzer.detector.info, "um_per_px", None)
        if um0 is None or not trained:
            return 0, self.tile_size, um0
        fine_enough = [lv for lv in range(slide.level_count) if um0 * slide.level_downsamples[lv] <= trained * 1.15]
        level = max(fine_enough, key=lambda lv: slide.level_downsamples[lv]) if fine_enough else 0
        um = um0 * slide.level_downsamples[level]
        return level, max(64, int(round(self.tile_size * trained / um))), um

    def mask_image(self, slide: Slide) -> tuple[Image.Image, int, float]:
        """The low-resolution picture the monolayer is found on, the level it comes from and its downsample
        from level 0: the finest level of at most ``mask_max_pixels``, read whole; when every level is larger
        (a pyramid of few levels), the coarsest one read in chunks and box-averaged down to fit."""
        small = [lv for lv in range(slide.level_count)
                 if slide.level_dimensions[lv][0] * slide.level_dimensions[lv][1] <= self.mask_max_pixels]
        if small:
            level = min(small, key=lambda lv: slide.level_downsamples[lv])
            return slide.read_level(level), level, slide.level_downsamples[level]
        level = slide.level_count - 1
        width, height = slide.level_dimensions[level]
        factor = math.ceil(math.sqrt(width * height / self.mask_max_pixels))
        chunk = factor * max(1, MASK_CHUNK // factor)  # whole boxes of factor x factor in each chunk
        picture = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        downsample = slide.level_downsamples[level]
        for y in range(0, height, chunk):
            for x in range(0, width, chunk):
                region = slide.read_region((int(x * downsample), int(y * downsample)), level,
                                           (min(chunk, width - x), min(chunk, height - y)))
                picture.paste(region.reduce(factor), (x // factor, y // factor))
        return picture, level, downsample * factor

    def analyze(self, path: str | Path, *, progress: Callable[..., None] | None = None,
                on_plan: Callable[[int], None] | None = None) -> SlideResult:
        """Analyse the slide at ``path``. ``on_plan(n)`` is told how many monolayer tiles there are
        before any is analysed (to size a progress bar)."""
        start = time.perf_counter()
        with open_slide(path) as slide:
            level, level_size, level_um = self.tile_level(slide)
            downsample = slide.level_downsamples[level]
            tile0 = int(round(level_size * downsample))
            low, mask_level, mask_downsample = self.mask_image(slide)
            mono = find_monolayer(np.asarray(low), mask_downsample, slide.dimensions, tile0,
                                  min_coverage=self.min_coverage, max_coverage=self.max_coverage)
            if on_plan is not None:
                on_plan(len(mono.tiles))
            # The tile's own pixel size: level 0's (stated by the user, else recorded in the file)
            # times the level's downsample; None: estimated from each tile's red cells.
            stated = self.analyzer.um_per_px is not None
            known = (FieldScale(level_um, "given", 0, f"{'stated' if stated else 'recorded in the slide'} "
                                f"({level_um / downsample:.4f} um/px at level 0, read at level {level})")
                     if level_um is not None else None)

            margin = (int(np.ceil(TILE_MARGIN_UM / level_um)) if level_um is not None
                      else int(round(level_size * TILE_MARGIN_SHARE)))
            job = TileJob(str(Path(path).resolve()), level, level_size, margin, float(downsample), known)
            if self.runner is None:
                sampled = sample_until(mono.tiles, lambda spot: job.run(self.analyzer, slide, spot),
                                       _white_cells, self.target_cells, seed=self.seed,
                                       workers=self.workers, progress=progress)
            else:
                sampled = sample_until(mono.tiles, None, _white_cells, self.target_cells, seed=self.seed,
                                       workers=self.runner.workers, progress=progress,
                                       submit=lambda spot: self.runner.submit(job, spot))
            slide_info = {"path": str(path), "reader": slide.backend, "dimensions": list(slide.dimensions),
                          "level_dimensions": [list(d) for d in slide.level_dimensions],
                          "level_downsamples": slide.level_downsamples, "um_per_px": slide.um_per_px,
                          "tile_level": level, "tile_size_level": level_size, "tile_um_per_px": level_um,
                          "tile_margin_level": margin}
        tiles, results, remaining = [], [], self.target_cells
        for spot, result in zip(sampled.items, sampled.results):
            counted = _counted(result, remaining, self.analyzer)
            remaining -= counted.differential.total
            tiles.append(SlideTile(spot, level, level_size, counted, counted.differential.total,
                                   result.differential.total))
            results.append(counted)
        warnings, not_examined = list(sampled.warnings), None
        left_out = _outside_the_grid(slide_info["dimensions"], mono)
        if not sampled.reached and left_out:  # "every monolayer tile" is of the grid's whole tiles only
            warnings.append(left_out)
        if not mono.coverage.size:
            width, height = slide_info["dimensions"]
            short = " and ".join(side for side, n in (("width", width), ("height", height)) if n < mono.tile_size)
            warnings = [f"The slide ({width}x{height} px) is smaller than one tile ({mono.tile_size} px at level 0) "
                        f"in {short}: nothing was analysed; analyse it as a field, or give a smaller --slide-tile."]
            not_examined = f"no tile of the slide was examined (it is smaller than one tile in {short})"
        elif not mono.tiles:
            warnings = [f"No monolayer found: no tile has a stained share between {self.min_coverage:g} and "
                        f"{self.max_coverage:g} (see the overview and the coverage grid in slide.json)."]
            not_examined = "no tile of the slide was examined (no monolayer found)"
        # A stated scale the slide's own record contradicts: said, and no leukemia flag on it (as a folder's
        # red cells doubt one).
        doubt = (stated_doubt_of_record(self.analyzer.um_per_px, slide_info["um_per_px"])
                 if self.analyzer.um_per_px is not None else None)
        summary = FolderSummary(results, self.analyzer.rules, list(self.analyzer.detector.classes),
                                self.analyzer.model_names, list(self.analyzer.warnings), self.analyzer.unfamiliar_share,
                                stated_um_per_px=self.analyzer.um_per_px, run_warnings=[doubt] if doubt else [],
                                provenance=self.analyzer.provenance, unit="tile", not_analysed=not_examined)
        result = SlideResult(str(path), slide_info, mono, mask_level, mask_downsample, tiles, summary,
                             self.target_cells, self.seed, warnings, time.perf_counter() - start)
        result.overview = overview(low, mask_downsample, result)
        return result


def overview(low: Image.Image, downsample: float, result: SlideResult) -> Image.Image:
    """The low-resolution level with the monolayer tiles shaded green and the sampled tiles outlined
    (blue, numbered in sampling order), at most :data:`OVERVIEW_SIDE` pixels on its longer side."""
    factor = min(1.0, OVERVIEW_SIDE / max(low.size))
    picture = low.convert("RGB")
    if factor < 1.0:
        picture = picture.resize((max(1, round(low.width * factor)), max(1, round(low.height * factor))),
                                 Image.Resampling.BILINEAR)
    to_px = factor / downsample
    mono = result.monolayer
    shade = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    for row, column in zip(*np.nonzero(mono.mask)):
        x0, y0 = column * mono.tile_size * to_px, row * mono.tile_size * to_px
        draw.rectangle((x0, y0, x0 + mono.tile_size * to_px - 1, y0 + mono.tile_size * to_px - 1),
                       fill=(0, 200, 0, 70))
    picture = Image.alpha_composite(picture.convert("RGBA"), shade).convert("RGB")
    draw = ImageDraw.Draw(picture)
    width = max(1, round(max(picture.size) / 500))
    for number, tile in enumerate(result.tiles, 1):
        x0, y0 = tile.spot.x * to_px, tile.spot.y * to_px
        x1, y1 = (tile.spot.x + tile.spot.width) * to_px - 1, (tile.spot.y + tile.spot.height) * to_px - 1
        draw.rectangle((x0, y0, x1, y1), outline=(0, 60, 220), width=width)
        draw.text((x0 + 2, y0 + 1), str(number), fill=(0, 60, 220))
    d = result.differential
    text = f"{d.total} WBC in {len(result.tiles)} tile(s)"
    if d.blast_percentage_meaningful and d.blast_ci95 is not None:
        text += f", blasts {d.blast_percentage:.1f}% (95% CI {d.blast_ci95[0]:.1f}-{d.blast_ci95[1]:.1f}%)"
    for y, (line, paper) in enumerate([(text, (255, 255, 255))] + [(f"WARNING: {w}", (255, 210, 210))
                                                                  for w in result.warnings]):
        left, top, right, bottom = draw.textbbox((4, 4 + 14 * y), line)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=paper)
        draw.text((4, 4 + 14 * y), line, fill=(0, 0, 0))
    return picture


def write_slide(result: SlideResult, out_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
    """Write ``<stem>.slide.json`` (the slide, its monolayer, the tiles and the differential),
    ``<stem>.cells.csv`` (every counted cell, boxes in level 0 pixels), ``summary.csv`` /
    ``summary.json`` (the tiles as fields and the pooled differential, as for a folder of fields)
    and ``<stem>.overview.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or shortened(Path(result.source).stem)  # a scanner's long name: "File name too long"
    paths = {"json": out_dir / f"{stem}.slide.json", "cells": out_dir / f"{stem}.cells.csv",
             "overview": out_dir / f"{stem}.overview.png"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2))
    classes = result.summary.rules.classes
    columns = ["tile", "tile_x", "tile_y"] + list(Cell(0, (0, 0, 0, 0), "", 0, "", "", 0, False).as_row(classes))
    with open(paths["cells"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for tile in result.tiles:
            # Level pixels -> level 0 pixels of the slide.
            scale = tile.spot.width / tile.level_size
            for cell in tile.result.cells:
                x0, y0, x1, y1 = cell.box
                shifted = replace(cell, box=(tile.spot.x + x0 * scale, tile.spot.y + y0 * scale,
                                             tile.spot.x + x1 * scale, tile.spot.y + y1 * scale))
                writer.writerow({"tile": tile.spot.index, "tile_x": tile.spot.x, "tile_y": tile.spot.y,
                                 **shifted.as_row(classes)})
    paths["summary_csv"], paths["summary_json"] = result.summary.write(out_dir)
    if result.overview is not None:
        result.overview.save(paths["overview"], format="PNG")
    return paths
