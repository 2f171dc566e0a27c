"""`leukoscope demo`: synthetic cells, a short training run and its report."""

from __future__ import annotations

from pathlib import Path

import typer

from leukoscope.cli._common import call_or_exit, check_writable_folder, fail, flag
from leukoscope.progress import console


def demo(
    out: Path = typer.Option(Path("leukoscope-demo"), "--out", help="Folder for data and run."),
    minutes: float = typer.Option(2.0, help="Training time budget."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Generate synthetic stained cells, train ~2 minutes, evaluate, write the report."""
    if not minutes > 0:  # before the synthetic data are made
        fail(f"--minutes must be above 0, got {minutes}")
    check_writable_folder(out, "--out")
    from leukoscope.demo import run_demo

    result = call_or_exit(run_demo, out, minutes=minutes, show_progress=not quiet)
    # the run itself printed the report's path
    console.print(f"[bold green]demo finished[/bold green]: test accuracy {result.metrics['accuracy']:.3f}")
    print(result.bundle_dir)
