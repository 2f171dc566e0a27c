"""Segment image files and folders: masks (PNG), optional side-by-side figures, a CSV index.

The engine behind ``leukoscope segment``. For every image it writes, under
``out``, mirroring each input folder's layout:

- ``<name>_mask.png``: 8-bit mask, 255 = stained cell(s), 0 = background;
- ``<name>_figure.png`` (``figure=True``): original | mask | segmented;
- ``<name>_segmented.png`` (``segmented=True``): the cells on white;

and ``masks.csv`` with one row per image (``source, mask, figure, segmented,
mask_fraction, found, error``). An unreadable image gives a row with ``error``
set, never a crash; an image where nothing stained is found gets an all-black
mask and ``found = False``.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from leukoscope.data.manifest import DatasetError
from leukoscope.io import DEFAULT_MAX_PIXELS, ImageDecodeError, files_below, is_image_file, load_image
from leukoscope.progress import progress_bar
from leukoscope.segmentation import SEGMENTATION_METHODS, apply_mask, cell_mask, save_mask, segmentation_figure


@dataclass
class SegmentRow:
    source: str
    mask: str = ""
    figure: str = ""
    segmented: str = ""
    mask_fraction: float = 0.0
    found: bool = False
    error: str = ""


def _targets(inputs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(image path, output name relative to ``out`` without suffix), names made unique."""
    pairs: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = [p for p in files_below(item) if is_image_file(p)]
            if not found:
                raise DatasetError(f"{item}: folder has no images (.jpg .png .bmp .tif)")
            pairs += [(p, p.relative_to(item).with_suffix("")) for p in found]
        elif item.exists():
            pairs.append((item, Path(item.stem)))
        else:
            raise DatasetError(f"{item}: no such file or folder")
    seen: dict[Path, int] = {}
    unique = []
    for path, name in pairs:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append((path, name if count == 0 else name.with_name(f"{name.name}-{count + 1}")))
    return unique


def segment_files(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "lab_kmeans",
    figure: bool = False,
    segmented: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
) -> list[SegmentRow]:
    """Segment every image of ``inputs`` (files and folders, recursively) into ``out``."""
    if method not in SEGMENTATION_METHODS:
        raise ValueError(f"unknown segmentation method {method!r}; choose from {list(SEGMENTATION_METHODS)}")
    out = Path(out)
    targets = _targets(inputs)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[SegmentRow] = []
    with progress_bar(len(targets), f"segmenting ({method})", enabled=show_progress) as update:
        for path, name in targets:
            row = SegmentRow(source=str(path))
            try:
                image = load_image(path, max_pixels=max_pixels)
            except ImageDecodeError as exc:
                row.error = str(exc)
            else:
                mask = cell_mask(image, method)
                base = out / name
                row.mask = str(save_mask(mask, base.with_name(base.name + "_mask.png")))
                row.mask_fraction = float(mask.mean())
                row.found = bool(mask.any())
                if figure:
                    row.figure = str(segmentation_figure(image, mask, base.with_name(base.name + "_figure.png"),
                                                         title=f"{path.name} ({method})"))
                if segmented:
                    target = base.with_name(base.name + "_segmented.png")
                    apply_mask(image, mask).save(target, format="PNG")
                    row.segmented = str(target)
            rows.append(row)
            update()
    with (out / "masks.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(SegmentRow(""))))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    return rows
