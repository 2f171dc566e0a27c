"""`leukoscope predict`: single-cell images classified into a CSV or JSON file."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from leukoscope.cli._common import (BACKENDS, EXIT_SOME_FAILED, call_or_exit, check_bundle, check_writable_folder, fail,
                                    flag)
from leukoscope.cli._run_notes import announced_run_scale, note_learned_from, note_stated_scale_doubts
from leukoscope.progress import console, name_some


def _check_predict_outputs(out: Path, explain: Optional[Path], overwrite: bool) -> None:
    """Refuse to replace a predictions file or mix two runs' heatmaps without ``overwrite`` (with it, the earlier
    heatmaps are removed by ``predict_to_file`` once the images are predicted: a run refused later keeps them)."""
    from leukoscope.inference.predict_files import earlier_heatmaps

    if overwrite:
        return
    if out.is_file():
        fail(f"--out {out} exists (an earlier run's predictions?): give another file, or --overwrite to "
             f"replace it")
    earlier = earlier_heatmaps(explain) if explain is not None else []
    if earlier:
        fail(f"--explain {explain} holds {len(earlier)} heatmap(s) of an earlier run (e.g. {earlier[0].name}): "
             f"two runs' maps would mix, rows numbered alike; give another folder, or --overwrite to replace them")


def predict(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory, or pretrained:NAME."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", help=".csv or .json"),
    threshold: Optional[float] = typer.Option(None, help="Below this confidence answer 'uncertain' "
                                              "(default: the bundle's)."),
    explain: Optional[Path] = typer.Option(None, "--explain", help="Save a Grad-CAM overlay per image here."),
    overwrite: bool = flag(False, "--overwrite", help="Replace an existing --out file, and the heatmaps an "
                           "earlier run left in the --explain folder (refused without it)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    backend: str = typer.Option("auto", "--backend", help="What runs the network: torch, onnxruntime or openvino "
                                "(a bundle from `leukoscope export`) or auto (the fastest installed one that can "
                                "run the bundle's graph: openvino, onnxruntime, else torch). --explain loads the "
                                "torch model for Grad-CAM on any backend."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference (default: the backend's; 1 is "
                                          "faster on a machine busy with other work)."),
    um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Pixel size of the images (micrometres); "
                                              "default: estimated from each image's red cells, else the images' "
                                              "scale together."),
    as_given: bool = flag(False, "--as-given", help="Classify each image whole, as it is (crops already "
                          "cut at the classifier's window, e.g. a training set's)."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Classify images; writes probabilities per class, 'uncertain' below the threshold.

    Each image is one cell. A classifier trained on a physical window (the shipped one: 24 um)
    sees that many micrometres around the image's centre, at --um-per-px or the scale the image's
    red cells give, else the images' scale together (a folder's); an image with none is classified
    whole, and the output says so (um_per_px and scale_source columns). --as-given skips this.
    An existing --out file, or heatmaps an earlier run left in --explain, are replaced only with
    --overwrite (the folder's heatmaps of two runs had mixed, one image under two labels).

    Exits with 2 when no image could be predicted, 3 when some could not (they are named, and
    get a row with their error in the output file, its label, class and confidence empty), 0 when
    every image was predicted.
    """
    from leukoscope.inference.predict_files import collect_images

    if backend not in BACKENDS:
        fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if threads is not None and threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    if out.suffix.lower() not in (".csv", ".json"):  # before any image is read
        fail(f"--out {out}: must end in .csv or .json")
    check_writable_folder(out.parent, "--out", out)
    if out.is_dir():
        fail(f"--out {out}: is a folder; give the file to write (.csv or .json)")
    if explain is not None:
        check_writable_folder(explain, "--explain")
    _check_predict_outputs(out, explain, overwrite)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        fail(f"--threshold must be in [0, 1], got {threshold}")
    if um_per_px is not None and as_given:
        fail("--um-per-px frames each image at that scale; --as-given takes the images as they are: give one")
    if um_per_px is not None:
        from leukoscope.scale import checked_um_per_px

        call_or_exit(checked_um_per_px, um_per_px, "--um-per-px")
    bundle = check_bundle(bundle, "--bundle")
    paths = call_or_exit(collect_images, inputs)
    from leukoscope.bundle import read_bundle_info
    from leukoscope.inference.predict_files import predict_to_file

    info = call_or_exit(read_bundle_info, bundle, "classify")  # a wrong bundle fails before any image is read
    if um_per_px is not None and info.preprocessing.cell_window_um is None:
        console.print("[yellow]warning:[/yellow] --um-per-px ignored: this classifier has no physical window "
                      "(it takes each image whole)", soft_wrap=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    note_learned_from(paths, {"classifier": bundle})
    framing = not as_given and info.preprocessing.cell_window_um is not None
    # images of one run (a folder) lend their scale to those without one, as analyze's fields do
    lent = announced_run_scale(paths, out, "local", single_cells=True) if framing and um_per_px is None else None
    doubts = note_stated_scale_doubts(paths, um_per_px, single_cells=True) if framing and um_per_px is not None else []
    predictions = call_or_exit(predict_to_file, bundle, paths, out, threshold=threshold, explain_dir=explain,
                               batch_size=batch_size, backend=backend, threads=threads, frame=not as_given,
                               um_per_px=um_per_px, run_um_per_px=lent, run_warnings=doubts, show_progress=not quiet,
                               replace_heatmaps=overwrite)
    _say_framing(predictions, info.preprocessing.cell_window_um)
    _say_single_cell_warnings(predictions)
    failed = [p.source for p in predictions if p.error]
    counts: dict[str, int] = {}
    for p in predictions:
        if not p.error:
            counts[p.label] = counts.get(p.label, 0) + 1
    console.print(f"{len(predictions) - len(failed)} images predicted: {counts}; {len(failed)} failed")
    scored = [p for p in predictions if p.ood_score is not None]
    unfamiliar = sum(p.unfamiliar for p in scored)
    if unfamiliar:
        console.print(f"[yellow]{unfamiliar} of {len(scored)} images are unlike the training data[/yellow] "
                      f"(unfamiliar column): review them by eye")
    if failed:
        console.print(f"[red]could not read {len(failed)} of {len(predictions)} images[/red] (errors in {out}): "
                      f"{escape(name_some(failed))}", soft_wrap=True)
    if len(failed) == len(predictions):
        fail(f"no image could be predicted; see the error column of {out}")
    print(out)
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _say_single_cell_warnings(predictions: list) -> None:
    """Warnings naming the images too small to show a cell, those without colour, those that show several white
    cells (smear fields), those without a white cell at their centre and those in a light the classifier never saw
    (their ``warnings`` column says so too, as analyze's fields do); their rows stand."""
    from leukoscope.inference.quality import (GRAYSCALE_CELL_WARNING, MIN_CELL_IMAGE_SIDE, NO_WHITE_CELL_WARNING,
                                              SEVERAL_CELLS_WORDING, TINY_CELL_WORDING)
    from leukoscope.light import LIGHT_CELL_WORDING

    said = ((lambda w: w.startswith(TINY_CELL_WORDING),
             f"smaller than {MIN_CELL_IMAGE_SIDE} px a side cannot show a cell's detail; their classes are not to be "
             f"trusted (warnings column)"),
            (lambda w: w == GRAYSCALE_CELL_WARNING,
             "have no colour (grey levels only): white cells are typed by their stain's colour, so their classes are "
             "not to be trusted (warnings column); classify the colour images"),
            (lambda w: w.startswith(SEVERAL_CELLS_WORDING),
             "look like smear fields, with several white cells: only the cell at each one's centre was classified "
             "(warnings column); analyse fields with `leukoscope analyze`"),
            (lambda w: w == NO_WHITE_CELL_WARNING,
             "show no white cell at their centre (no nuclear stain in the window read): their classes are not to be "
             "trusted (warnings column); images of a smear are analysed with `leukoscope analyze`"),
            (lambda w: w.startswith(LIGHT_CELL_WORDING),
             "have a background of a colour of light none of the classifier's training images had (the camera's "
             "white balance or the lamp): their classes are untested (warnings column); set the camera's white "
             "balance on an empty part of the slide"))
    for matches, words in said:
        named = [Path(p.source).name for p in predictions if any(map(matches, p.warnings))]
        if named:
            console.print(f"[yellow]warning:[/yellow] {len(named)} image(s) {words}: {escape(name_some(named))}",
                          soft_wrap=True)

def _say_framing(predictions: list, window_um: Optional[float]) -> None:
    """How many images were cut at the classifier's window, and at which scale; the ones classified whole."""
    scales = [p.scale for p in predictions if p.scale is not None and not p.error]
    if not scales or window_um is None:
        return
    framed = [s for s in scales if s.known]
    if framed:
        sources = sorted({s.source for s in framed})
        console.print(f"framing: {len(framed)} of {len(scales)} images classified on {window_um:g} um around their "
                      f"centre (scale {' / '.join(sources)}; um_per_px column)", soft_wrap=True)
    whole = len(scales) - len(framed)
    if whole:
        console.print(f"[yellow]framing:[/yellow] {whole} of {len(scales)} images had no scale (too few isolated red "
                      f"cells) and were classified whole, although the classifier expects {window_um:g} um around "
                      f"the cell: pass --um-per-px, or --as-given for crops already cut at that window",
                      soft_wrap=True)
