"""`leukoscope analyze`: smear fields and whole slides to differentials, here or on a Ray cluster."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import typer
from rich.markup import escape

from leukoscope.cli._common import (BACKENDS, EXIT_SOME_FAILED, call_or_exit, check_bundle, check_writable_folder, fail,
                                    flag, user_errors)
from leukoscope.cli._run_notes import announced_run_scale, note_learned_from, note_stated_scale_doubts
from leukoscope.pretrained import (DEFAULT_CLASSIFIER, DEFAULT_DETECTOR, PREFIX, is_pretrained_spec, pretrained_names,
                                   shipped_spec)
from leukoscope.progress import console, name_some


def _analysis_models(detector: Optional[str], classifier: Optional[str],
                     no_classifier: bool) -> tuple[Path, Optional[Path], str]:
    """The detector and classifier folders `analyze` uses, and a line saying which they are.

    No --detector: the shipped detector. No --classifier: the shipped classifier; when it is not
    installed that is an error if no model was named at all, and with a --detector of one's own
    the cells keep the detector's classes (as before models shipped), with a note."""
    if no_classifier and classifier is not None and classifier.lower() != "none":
        fail("--no-classifier and --classifier contradict each other; give one")
    named = detector is not None or classifier is not None
    detector_spec = detector if detector is not None else PREFIX + DEFAULT_DETECTOR
    detector_dir = check_bundle(detector_spec, "--detector")
    note = ""
    if no_classifier or (classifier is not None and classifier.lower() == "none"):
        classifier_spec = None
    elif classifier is not None:
        classifier_spec = classifier
    elif named and DEFAULT_CLASSIFIER not in pretrained_names():
        classifier_spec = None
        note = (f" [yellow](no shipped {DEFAULT_CLASSIFIER} in this install: cells keep the detector's classes; "
                f"--classifier B classifies them, --no-classifier silences this)[/yellow]")
    else:
        classifier_spec = PREFIX + DEFAULT_CLASSIFIER
    classifier_dir = check_bundle(classifier_spec, "--classifier") if classifier_spec is not None else None

    def described(spec: str, folder: Path) -> str:
        return escape(f"{spec} ({folder})" if is_pretrained_spec(spec) else str(folder))

    used = f"detector {described(detector_spec, detector_dir)}, classifier " + (
        described(classifier_spec, classifier_dir) if classifier_dir is not None else "none (detector classes)")
    return detector_dir, classifier_dir, used + note


def analyze(
    inputs: List[Path] = typer.Argument(..., help="Smear images and/or folders of them."),
    detector: Optional[str] = typer.Option(None, "--detector", help="Detector bundle (leukoscope train-detector) "
                                           f"or pretrained:NAME (default: {PREFIX}{DEFAULT_DETECTOR})."),
    classifier: Optional[str] = typer.Option(None, "--classifier", help="Cell classifier bundle for the "
                                             f"white-cell types, or pretrained:NAME (default: {PREFIX}"
                                             f"{DEFAULT_CLASSIFIER}); 'none' keeps the detector's classes."),
    no_classifier: bool = flag(False, "--no-classifier", help="Cells keep the detector's classes "
                               "(same as --classifier none)."),
    out: Path = typer.Option(Path("analysis"), "--out", help="Output folder."),
    blast_class: Optional[List[str]] = typer.Option(None, "--blast-class", help="Classifier class counted as "
                                                    "blast (repeatable; default: the classes named exactly, "
                                                    "ignoring case, one of leukoscope.labels.BLAST_CLASS_NAMES, "
                                                    "e.g. blast, lymphoblast, myeloblast, monoblast, ALL, "
                                                    "malignant, Early/Pre/Pro; never erythroblast)."),
    threshold: Optional[float] = typer.Option(None, help="Classifier confidence below which a cell is "
                                              "'uncertain' (default: the bundle's)."),
    detector_threshold: Optional[float] = typer.Option(None, help="Detector score threshold (default: the bundle's)."),
    min_detector_ap: Optional[float] = typer.Option(None, help="Warn, and raise no leukemia flag, when the "
                                                    "detector's recorded test AP@0.5 for white cells is below this "
                                                    "(default 0.9)."),
    um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Pixel size of the fields in micrometres "
                                              "(default: estimated per field from its red cells, ~7.5 um "
                                              "across; recorded in each field's JSON). A field whose red cells "
                                              "measure another scale is warned."),
    tile_size: Optional[int] = typer.Option(None, help="Tile side for large fields, in pixels of the field as "
                                            "the detector is given it (resampled to its scale; default: 2048 "
                                            "pixels as its network sees them, 4096 for the shipped detector)."),
    overlap: int = typer.Option(320, help="Tile overlap in pixels (larger than the biggest white cell)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference (default: each backend's; 1 "
                                          "is faster on a machine busy with other work); --engine ray: per actor "
                                          "(default 1)."),
    backend: str = typer.Option("auto", "--backend", help="What runs both models: torch, onnxruntime or openvino "
                                "(bundles from `leukoscope export`) or auto (the fastest installed one a bundle "
                                "has a graph for, else torch)."),
    slide: bool = flag(False, "--slide", help="Treat every input file as a whole-slide image (default: "
                       ".svs/.ndpi/.mrxs..., and .tif/.tiff files with more than one resolution level)."),
    target_cells: int = typer.Option(200, "--target-cells", help="Slides: sample monolayer tiles until this many "
                                     "white cells are counted (200, as in a manual differential)."),
    workers: int = typer.Option(1, "--workers", help="Slides: tiles analysed at once (local threads; with "
                                "--engine ray the actors analyse them, see --actors)."),
    seed: int = typer.Option(0, "--seed", help="Slides: seed of the random tile order."),
    slide_tile: int = typer.Option(1024, "--slide-tile", help="Slides: tile side in pixels at the analysis scale."),
    min_coverage: float = typer.Option(0.35, "--min-coverage", help="Slides: least stained share of a monolayer "
                                       "tile (below: feathered edge or glass)."),
    max_coverage: float = typer.Option(0.75, "--max-coverage", help="Slides: largest stained share of a "
                                       "monolayer tile (above: thick area)."),
    engine: str = typer.Option("local", "--engine", help="'local' (this process) or 'ray' (a Ray cluster: "
                               "fields into Parquet tables OUT/fields and OUT/cells, resumable; slides' tiles on "
                               "its actors; needs the ray extra)."),
    address: Optional[str] = typer.Option(None, "--address", help="--engine ray: the cluster to join ('auto': the "
                                          "one `ray start` runs here; default: a Ray started for this run)."),
    actors: Optional[int] = typer.Option(None, "--actors", help="--engine ray: analysis actors (default: as "
                                         "many as the nodes can place, each node's CPUs / --threads)."),
    retry_failed: bool = flag(False, "--retry-failed", help="--engine ray: analyse again the fields whose "
                              "row in the output holds an error (others already there are skipped)."),
    cells: Optional[Path] = typer.Option(None, "--cells", help="Also write each cell of the fields, cut as the "
                                         "classifier saw it (its window; the box where a field has no scale), to "
                                         "`CELLS/<class>/field-<field>-cell-<n>.png` (uncertain ones in "
                                         "CELLS/uncertain): move the misnamed ones to their class and fine-tune on "
                                         "them (train --init ... --data CELLS). A new folder; local engine, fields "
                                         "(not slides)."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Analyse smear fields: detect and classify every white cell, differential count, blast % and flags.

    Writes per image `<name>.annotated.png`, `<name>.cells.csv` and `<name>.json`, and
    summary.csv / summary.json / summary.png (the pooled differential drawn) for the whole folder.
    Decision support, not a diagnosis.

    A whole-slide image (.svs, .ndpi, a pyramidal .tif; needs the slide extra) is sampled in its
    monolayer until --target-cells white cells are counted; its files go to `OUT/<slide name>/`:
    `<name>.slide.json`, `<name>.cells.csv`, `<name>.overview.png`, summary.csv / summary.json / summary.png.

    With --engine ray the fields are analysed on a Ray cluster (--address auto: the one `ray start`
    runs; see docs/cluster.md) into Parquet tables OUT/fields/ and OUT/cells/ and the same
    summary.csv / summary.json / summary.png, without per-field files; a rerun skips the fields already there.
    A slide's tiles are then analysed by the cluster's actors (the slide must be on storage every
    node sees at the same path); its sampling and count are those of the local engine.

    Without model flags it uses the models shipped in the package (`leukoscope models
    --pretrained`); with only --detector, the shipped classifier when installed.

    Exits with 0 when every input was analysed, 3 when some could not be (named on the console and
    in summary.csv; the others' results are written), 2 when none could.
    """
    _check_engine(engine, address, actors, retry_failed)
    if cells is not None:
        if engine != "local":
            fail("--cells writes the cells of fields analysed here: use it with --engine local")
        check_writable_folder(cells, "--cells")
        if cells.is_dir() and any(cells.iterdir()):  # cells sorted since would be written again, under their old class
            fail(f"--cells {cells} is not empty (cells sorted there would be written again under the class "
                 f"predicted): give a new folder")
    check_writable_folder(out, "--out")
    if engine == "local" and (out / "summary.csv").is_file():  # (a Ray archive's rerun goes on where it was)
        console.print(f"[yellow]{out} holds an earlier run's results: the files of its fields that this run does "
                      f"not analyse stay there, and summary.csv will list this run's fields only; use another "
                      f"--out to keep runs apart[/yellow]", soft_wrap=True)
    if threads is not None and threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    from leukoscope.inference.predict_files import byte_copies, collect_images, copy_of

    from leukoscope.inference.slide.reader import is_slide_path

    if backend not in BACKENDS:
        fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    slides = [p for p in inputs if p.is_file() and (slide or is_slide_path(p))]
    inputs = [p for p in inputs if p not in slides]
    paths = [p for p in call_or_exit(collect_images, inputs, slides=True) if not p.name.endswith(".annotated.png")] \
        if inputs else []
    in_folders = [p for p in paths if is_slide_path(p)]
    if in_folders:  # one rule for a file however it is reached: a pyramid in a folder had been read flat, one field
        console.print(f"note: {len(in_folders)} whole-slide file(s) found in the folders are analysed as slides: "
                      f"{escape(name_some([str(p) for p in in_folders]))}", soft_wrap=True)
        slides += in_folders
        taken = set(in_folders)
        paths = [p for p in paths if p not in taken]
    from leukoscope.inference.smear_output import shortened

    stems: dict[str, Path] = {}
    for path in slides:  # each slide writes OUT/<stem>/: a second of the same stem would replace the first's
        other = stems.setdefault(shortened(path.stem).casefold(), path)  # one folder on a case-insensitive system
        if other != path:
            fail(f"{other} and {path} would both write {out / shortened(path.stem)}: analyse them into different "
                 f"--out folders, or rename one")
    left_out: dict[str, list[str]] = {}  # kept in the run's record (summary.json), by why
    for why, keep in (("written_by_an_earlier_analysis", lambda found: _without_earlier_outputs(found, inputs)),
                      ("cells_cut_by_leukoscope", lambda found: _without_cut_cells(found, inputs,
                                                                                   slides=bool(slides)))):
        kept = keep(paths)
        taken = set(kept)
        left_out[why] = [str(p) for p in paths if p not in taken]
        paths = kept
    copies = byte_copies(paths)
    left_out["byte_identical_copies"] = [copy_of(copy, original) for copy, original in copies.items()]
    paths = [p for p in paths if p not in copies]
    detector, classifier, used = _analysis_models(detector, classifier, no_classifier)
    console.print(f"models: {used}", soft_wrap=True)
    from leukoscope.inference.smear import SmearAnalyzer

    # One set of options for every engine (the Ray actors build their analyzers from the same).
    options = dict(tile_size=tile_size, overlap=overlap, blast_classes=blast_class or None,
                   uncertain_threshold=threshold, detector_threshold=detector_threshold, um_per_px=um_per_px,
                   backend=backend, **({} if min_detector_ap is None else {"min_detector_ap": min_detector_ap}))
    analyzer = call_or_exit(SmearAnalyzer.from_bundles, detector, classifier, threads=threads, **options)
    if cells is not None:
        from leukoscope.inference.smear_output import check_cell_folders

        call_or_exit(check_cell_folders, analyzer.rules.classes)
        if slides:
            console.print("[yellow]note:[/yellow] --cells writes the cells of fields, not of slides", soft_wrap=True)
    ran = f"detector on {analyzer.detector.backend}"
    detector_export = getattr(analyzer.detector.info, "export", None) or {}
    if detector_export.get("precision") == "int8" and analyzer.detector.backend != "torch":
        ran += " (int8 graphs: a different detector, see its --check figures)"
    if analyzer.classifier is not None:
        ran += f", classifier on {analyzer.classifier.backend}"
        exported = analyzer.classifier.info.export or {}
        if exported.get("precision") == "int8" and analyzer.classifier.backend != "torch":
            ran += " (int8 graph)"
    console.print(f"backends: {ran}", soft_wrap=True)
    learned = note_learned_from(paths, {"detector": detector, "classifier": classifier})
    if learned:  # kept with the run's record of its models: an archived run keeps the caution the console gave
        analyzer.provenance["learned_from_these_inputs"] = learned
    if any(left_out.values()):  # said on the console, and kept: a pipeline reading summary.json saw fewer inputs
        analyzer.provenance["inputs_left_out"] = {why: files for why, files in left_out.items() if files}
    lent = announced_run_scale(paths, out, engine) if um_per_px is None else None
    doubts = note_stated_scale_doubts(paths, um_per_px) if um_per_px is not None else []
    with _one_ray_session(address, engine == "ray" and bool(slides) and bool(paths)):
        _analyze_inputs(analyzer, detector, classifier, options, slides, paths, out, engine=engine, address=address,
                        actors=actors, threads=threads, retry_failed=retry_failed, quiet=quiet, run_um_per_px=lent,
                        run_warnings=doubts, cells=cells,
                        slide_options=dict(target_cells=target_cells, workers=workers, seed=seed, tile_size=slide_tile,
                                           min_coverage=min_coverage, max_coverage=max_coverage, quiet=quiet))


def _without_earlier_outputs(paths: list[Path], inputs: list[Path]) -> list[Path]:
    """``paths`` less the pictures an earlier analysis wrote into the input folders (its summary.png, a slide's
    overview): `leukoscope analyze .` run twice analysed them as fields. A file named on the command line stays
    in."""
    from leukoscope.inference.smear_output import earlier_outputs

    named = {p.resolve() for p in inputs if not p.is_dir()}
    written = set(earlier_outputs([p for p in paths if p.resolve() not in named]))
    if not written:
        return paths
    if len(written) == len(paths):
        fail(f"every image found ({len(paths)}) is one an earlier analysis wrote (its summary.png, a slide's "
             f"overview, beside the analysis's summary.json): name the fields, or their folder")
    console.print(f"[yellow]note:[/yellow] {len(written)} picture(s) that earlier analyses wrote into the input "
                  f"folders left out ({escape(name_some(sorted(str(p) for p in written)))}): they are results, not "
                  f"fields", soft_wrap=True)
    return [p for p in paths if p not in written]


def _without_cut_cells(paths: list[Path], inputs: list[Path], *, slides: bool) -> list[Path]:
    """``paths`` less the images found in folders that are named as single cells this program cut (``analyze
    --cells``, the web service's export): analysed again as fields, each would add its cell to the count a second
    time (a ``--cells`` folder kept beside the fields was). A cell named on the command line stays in."""
    from leukoscope.data.readers import EXPORT_NAME, FIELD_CELL_NAME

    named = {p.resolve() for p in inputs if not p.is_dir()}
    cut = [p for p in paths
           if p.resolve() not in named and (FIELD_CELL_NAME.match(p.name) or EXPORT_NAME.match(p.name))]
    if not cut:
        return paths
    if len(cut) == len(paths) and not slides:
        fail(f"every image found ({len(cut)}) is named as a cell that `analyze --cells` or the web service cut "
             f"(field-<name>-cell-<n>.png, case-<id>-cell-<n>.png): analyze takes smear fields; single cells go to "
             f"`leukoscope predict` (or name them on the command line to analyse them as fields)")
    console.print(f"[yellow]note:[/yellow] {len(cut)} image(s) named as cells that `analyze --cells` or the web "
                  f"service cut ({escape(name_some(sorted(p.name for p in cut)))}) left out: they are cells, not "
                  f"fields",
                  soft_wrap=True)
    left = set(cut)
    return [p for p in paths if p not in left]


@contextmanager
def _one_ray_session(address: Optional[str], needed: bool) -> Iterator[None]:
    """Slides and fields on Ray together share one Ray (started once, not once for each)."""
    if not needed:
        yield
        return
    from leukoscope.inference.archive import ray_session

    try:
        with ray_session(address):
            yield
    except ConnectionError as exc:
        fail(f"cannot reach the Ray cluster at --address {address}: {exc}")


def _analyze_inputs(analyzer, detector: Path, classifier: Optional[Path], options: dict, slides: list, paths: list,
                    out: Path, *, engine: str, address: Optional[str], actors: Optional[int], threads: Optional[int],
                    retry_failed: bool, quiet: bool, slide_options: dict, run_um_per_px: Optional[float] = None,
                    run_warnings: Sequence[str] = (), cells: Optional[Path] = None) -> None:
    """The whole-slide images, then the fields, on the chosen engine; the summary printed.
    ``run_um_per_px``: the fields' run scale (:func:`announced_run_scale`); slides keep their own. ``run_warnings``: the
    fields' together (:func:`note_stated_scale_doubts`). ``cells``: the fields' cells written there by class."""
    from leukoscope.progress import progress_bar

    analysed = 0
    if slides:
        if engine == "ray":
            analysed = _analyze_slides_on_ray(analyzer, detector, classifier, options, slides, out, address=address,
                                              actors=actors, threads=threads or 1, **slide_options)
        else:
            analysed = sum(_analyze_slide(analyzer, path, out, **slide_options) for path in slides)
        if analysed < len(slides):
            console.print(f"[red]{len(slides) - analysed} of {len(slides)} slide(s) could not be analysed[/red]")
    if not paths:
        print(out)
        if not analysed:
            raise typer.Exit(2)  # nothing analysed: a script must see it
        if analysed < len(slides):
            raise typer.Exit(EXIT_SOME_FAILED)
        return
    if run_um_per_px is not None:  # an option only when there is one: an archive's options stay as they were
        analyzer.run_um_per_px = run_um_per_px
        options = {**options, "run_um_per_px": run_um_per_px}
    with progress_bar(len(paths), "analysing", enabled=not quiet, unit="fields") as update:
        if engine == "ray":
            summary = _analyze_on_ray(analyzer, detector, classifier, options, paths, out, update, address=address,
                                      actors=actors, threads=threads or 1, retry_failed=retry_failed,
                                      run_warnings=run_warnings)
        else:  # the run's scale, or the doubt of a stated one, said above
            summary = call_or_exit(analyzer.analyze_paths, paths, out, progress=update, estimate_run_scale=False,
                                   run_warnings=run_warnings, cells_dir=cells)
    pooled = summary.pooled
    failed = [r for r in summary.results if r.error]
    console.print(_analysed_line(len(summary.results), len(failed), pooled))
    if cells is not None:
        written = [cell for r in summary.results for cell in r.cells]
        unsure = sum(cell.uncertain for cell in written)
        # the classifier that cut and named them, as --init takes it (it said "<classifier>")
        start = shipped_spec(classifier) or str(classifier) if classifier is not None else "<a classifier bundle>"
        console.print(f"cells: {len(written)} written to {cells}/<class>/ ({unsure} in uncertain/): move the misnamed "
                      f"ones to their class, sort uncertain/ away, then fine-tune with `leukoscope train --init "
                      f"{escape(start)} --data {cells}`", soft_wrap=True)
    read = len(summary.results) - len(failed)  # the fields analysed: an unreadable file has no scale to speak of
    borrowed = [r for r in summary.results if r.scale and r.scale.get("source") == "run"]
    if borrowed:
        console.print(f"[yellow]scale:[/yellow] {len(borrowed)} of {read} field(s) had no scale "
                      f"estimate of their own (too few isolated red cells, or one far off the run's) and were "
                      f"analysed at the run's scale "
                      f"({borrowed[0].scale['um_per_px']:.4f} um/px; pass --um-per-px to state it)", soft_wrap=True)
    unscaled = [r for r in summary.results if r.scale and r.scale.get("source") == "unknown"]
    if unscaled:
        assumed = ("were analysed at the detector's training scale" if analyzer.detector.info.um_per_px else
                   "were analysed as they are (the detector records no training scale)")
        console.print(f"[yellow]scale:[/yellow] {len(unscaled)} of {read} field(s) had no scale "
                      f"estimate (too few isolated red cells, or objects too small to be red cells) and {assumed} "
                      f"(pass --um-per-px to state it)", soft_wrap=True)
    for raised in pooled.flags:
        console.print(f"[yellow]flag:[/yellow] {escape(raised)}", soft_wrap=True)
    if failed:
        console.print(f"[red]{len(failed)} image(s) could not be read[/red] (see summary.csv)")
    print(out)
    if failed and len(failed) == len(summary.results) and not analysed:
        raise typer.Exit(2)  # nothing analysed: as predict, a script must see it
    if failed or analysed < len(slides):
        raise typer.Exit(EXIT_SOME_FAILED)


def _analysed_line(images: int, failed: int, pooled) -> str:
    """The console's one line on a folder run: the images read, the white cells, the blasts."""
    if failed == images:
        return f"none of the {images} image(s) could be read"
    text = f"{images - failed} of {images} image(s) read" if failed else f"{images} image(s)"
    text += f", {pooled.total} white cell{'' if pooled.total == 1 else 's'}"
    if pooled.blast_percentage is not None and pooled.blast_percentage_meaningful:
        low, high = pooled.blast_ci95
        text += f", blasts {pooled.blasts} ({pooled.blast_percentage:.1f}%, 95% CI {low:.1f}-{high:.1f}%)"
    elif pooled.blasts is not None:
        text += f", {pooled.blasts} blast(s): too few cells for a blast percentage ({pooled.min_cells} asked)"
    return text


ENGINES = ("local", "ray")


def _check_engine(engine: str, address: Optional[str], actors: Optional[int], retry_failed: bool) -> None:
    """The engine options, and Ray installed for --engine ray (checked before torch loads)."""
    import importlib.util

    if engine not in ENGINES:
        fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local":
        given = [name for name, value in (("--address", address), ("--actors", actors),
                                          ("--retry-failed", retry_failed or None)) if value is not None]
        if given:
            fail(f"{', '.join(given)}: only with --engine ray")
        return
    if actors is not None and actors < 1:
        fail(f"--actors must be at least 1, got {actors}")
    missing = [name for name in ("ray", "pyarrow") if importlib.util.find_spec(name) is None]
    if missing:
        fail(f"--engine ray needs {' and '.join(missing)}: pip install 'leukoscope[ray]'")


def _analyze_on_ray(analyzer, detector: Path, classifier: Optional[Path], options: dict, paths: list, out: Path,
                    update, **engine):
    """The fields on a Ray cluster (leukoscope.inference.archive); the local engine's summary back."""
    from leukoscope.inference.archive import AnalyzerSpec, analyze_archive

    try:
        run = call_or_exit(analyze_archive, AnalyzerSpec(detector, classifier, options), paths, out, analyzer=analyzer,
                           progress=update, **engine)
    except ConnectionError as exc:
        fail(f"cannot reach the Ray cluster at --address {engine.get('address')}: {exc}")
    console.print(f"ray: {run.processed} field(s) analysed, {run.skipped} already in {out} (skipped); "
                  f"tables {out / 'fields'} and {out / 'cells'}", soft_wrap=True)
    return run.summary


def _analyze_slides_on_ray(analyzer, detector: Path, classifier: Optional[Path], options: dict, slides: list,
                           out: Path, *, address: Optional[str], actors: Optional[int], threads: int,
                           **slide_options) -> int:
    """Whole-slide images whose tiles Ray actors analyse (leukoscope.inference.slide.ray_tiles); how many were
    analysed."""
    from ray.exceptions import RayActorError

    from leukoscope.inference.archive import AnalyzerSpec, ray_session
    from leukoscope.inference.slide.ray_tiles import RayTileRunner

    try:
        with ray_session(address):
            with call_or_exit(RayTileRunner, AnalyzerSpec(detector, classifier, options), actors=actors,
                              threads=threads) as runner:
                console.print(f"ray: {runner.workers} actor(s) of {threads} CPU(s) analyse the slides' tiles",
                              soft_wrap=True)
                return sum(_analyze_slide(analyzer, path, out, runner=runner, **slide_options) for path in slides)
    except ConnectionError as exc:
        fail(f"cannot reach the Ray cluster at --address {address}: {exc}")
    except RayActorError as exc:  # restarted twice and still dying: a node lost, memory, models missing there
        fail(f"a Ray actor analysing the slides' tiles died and could not be restarted: "
             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _analyze_slide(analyzer, path: Path, out: Path, *, quiet: bool, **options) -> bool:
    """One whole-slide image: its monolayer sampled to the target, files in ``out/<name>/``. False (said on
    the console) when the slide cannot be analysed (unreadable, one level only, an unsupported pixel type) or
    no tile of it was examined (smaller than one tile, no monolayer found: its files say so)."""
    from leukoscope.inference.slide.analysis import SlideAnalyzer, write_slide
    from leukoscope.inference.smear_output import shortened
    from leukoscope.progress import progress_bar

    slide_analyzer = call_or_exit(SlideAnalyzer, analyzer, **options)
    state: dict = {}

    def plan(n: int) -> None:
        state["bar"] = progress_bar(n, f"{path.name}: tiles", enabled=not quiet)
        state["update"] = state["bar"].__enter__()

    try:
        result = slide_analyzer.analyze(path, on_plan=plan, progress=lambda **kw: state["update"](**kw))
    except user_errors() as exc:  # this slide only: the other slides and the fields are still analysed
        console.print(f"[red]{escape(path.name)}: not analysed:[/red] {escape(str(exc))}", soft_wrap=True)
        return False
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)
    folder = out / shortened(path.stem)  # as write_slide names its files
    write_slide(result, folder)
    if not result.tiles:  # a run with nothing examined must not look like one that found no white cell
        console.print(f"[red]{escape(path.name)}: not analysed:[/red] {escape(' '.join(result.sampling_warnings))}",
                      soft_wrap=True)
        console.print(f"slide files: {folder}", soft_wrap=True)
        return False
    d = result.differential
    text = (f"{path.name}: {d.total} white cells in {len(result.tiles)} of {len(result.monolayer.tiles)} monolayer "
            f"tile(s)")
    if d.blast_percentage is not None and d.blast_percentage_meaningful:
        text += f", blasts {d.blasts} ({d.blast_percentage:.1f}%, 95% CI {d.blast_ci95[0]:.1f}-{d.blast_ci95[1]:.1f}%)"
    console.print(text, soft_wrap=True)
    for warning in result.sampling_warnings:
        console.print(f"[yellow]slide:[/yellow] {escape(warning)}", soft_wrap=True)
    for raised in d.flags:
        console.print(f"[yellow]flag:[/yellow] {escape(raised)}", soft_wrap=True)
    console.print(f"slide files: {folder}", soft_wrap=True)
    return True
