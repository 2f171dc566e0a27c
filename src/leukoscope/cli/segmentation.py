"""`leukoscope segment`: masks of the stained cells (system E's colour clustering)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from leukoscope.cli._common import EXIT_SOME_FAILED, call_or_exit, check_writable_folder, flag
from leukoscope.progress import console


def segment(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Folder for `<name>_mask.png` files and masks.csv."),
    method: str = typer.Option("lab_kmeans", "--method", help="lab_kmeans (system E) or hsv."),
    figure: bool = flag(False, "--figure", help="Also save original | mask | segmented side by side."),
    segmented: bool = flag(False, "--segmented", help="Also save the segmented image (cells on white)."),
    quiet: bool = flag(False, "--quiet", help="No progress bar."),
) -> None:
    """Segment stained cells: save masks (PNG, 255 = most stained: a white cell's nucleus) and optional figures.

    Exits with 3 when some images could not be read (their error in masks.csv), 2 when none could."""
    check_writable_folder(out, "--out")
    from leukoscope.inference.segment_files import segment_files

    rows = call_or_exit(segment_files, inputs, out, method=method, figure=figure, segmented=segmented,
                        show_progress=not quiet)
    failed = sum(1 for r in rows if r.error)
    empty = sum(1 for r in rows if not r.error and not r.found)
    console.print(f"{len(rows)} images: {len(rows) - failed - empty} segmented, {empty} with nothing stained found, "
                  f"{failed} unreadable")
    print(out / "masks.csv")
    if failed:  # named in masks.csv's error column
        raise typer.Exit(2 if failed == len(rows) else EXIT_SOME_FAILED)
