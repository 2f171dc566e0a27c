"""`leukoscope evaluate` and `calibrate-ood`: a bundle scored on labelled data, and its out-of-distribution flag."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from leukoscope.cli._common import (BACKENDS, call_or_exit, check_bundle, check_writable_folder, fail, flag,
                                    frames_cells, own_dataset)
from leukoscope.pretrained import is_pretrained_spec, shipped_spec
from leukoscope.progress import console


#: What an evaluation writes: a folder holding one of them holds an earlier evaluation.
EVALUATION_FILES = ("metrics.json", "report.html", "scored_images.csv")


def _evaluation_out(out: Optional[Path], default: Path, overwrite: bool) -> tuple[Path, str]:
    """Where an evaluation goes: ``out`` unless it holds an earlier evaluation (refused without ``overwrite``);
    else ``default``, or the first ``default-2``, ``-3``... that is free (an honest test score was silently
    replaced by a training-data score written to the same default folder). With a note saying so when the
    default was taken, for the caller to print once the evaluation is written (printed before, it announced a
    folder that an evaluation refused next, e.g. of training images, never wrote)."""
    if out is not None:
        held = [name for name in EVALUATION_FILES if (out / name).is_file()]
        if held and not overwrite:
            fail(f"--out {out} already holds an evaluation ({', '.join(held)}): choose another folder, or pass "
                 f"--overwrite to replace it")
        return out, ""
    folder, number = default, 1
    while folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):  # an empty folder is free
        number += 1
        folder = default.with_name(f"{default.name}-{number}")
    note = "" if folder == default else (f"note: {escape(str(default))} holds an earlier evaluation, kept; this one "
                                         f"went to {escape(str(folder))}")
    return folder, note


def evaluate(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory, or pretrained:NAME."),
    data: str = typer.Option(..., "--data", help="Labelled dataset folder or CSV."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: `<bundle>/../eval-<data>`, "
                                       "or `eval-<data>-2`, -3... when it holds an earlier evaluation; for "
                                       "pretrained:NAME `./eval-NAME-<data>`); refused when it holds an evaluation "
                                       "already, unless --overwrite."),
    overwrite: bool = flag(False, "--overwrite", help="Replace the evaluation an existing --out holds "
                           "(with --out only: the default folder is never replaced)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Score only one part of this split."),
    subset: Optional[str] = typer.Option(None, help="Which part of --split-file to score (default: test)."),
    on_corrupt: str = typer.Option("skip", help="skip or fail on unreadable images."),
    split: Optional[str] = typer.Option(None, "--split", help="Detector bundles: VOC split to score "
                                        "(e.g. Testing, test)."),
    allow_training_data: bool = flag(False, "--allow-training-data", help="Score images the bundle was "
                                     "trained or validated on (refused by default: such a score says "
                                     "nothing about new images)."),
    backend: str = typer.Option("auto", "--backend", help="What runs the model: auto (the fastest installed "
                                "backend the bundle has a graph for, else torch), torch, onnxruntime or openvino "
                                "(a bundle from `leukoscope export`); an exported int8 bundle is scored as int8 "
                                "unless torch."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference (default: the backend's)."),
    um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Pixel size of the images (micrometres); "
                                              "default: each image's own scale (its red cells), else the images' "
                                              "together. Classifiers frame each cell at it, as predict; detectors "
                                              "see each field brought to their training scale, as analyze."),
    as_given: bool = flag(False, "--as-given", help="Score each image as it is: a classifier's whole "
                          "(crops already cut at its window, e.g. a training set's), a detector's at its "
                          "own size."),
    class_map: bool = flag(True, "--class-map/--no-class-map", help="Classifier bundles: label the data as "
                           "the bundle's run did, by the data.class_map it recorded (and leave out the "
                           "classes its data.classes left out); --no-class-map scores the labels as "
                           "written."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Score a bundle on a labelled dataset with the same class names (a detector bundle: on a VOC folder).

    A classifier trained on a physical window (the shipped one: 24 um) scores each image as predict
    classifies it: that many micrometres around its centre, at --um-per-px or the scale the image's red
    cells give (else the images' scale together); an image with none is scored whole, and the report
    says how many. --as-given scores crops already cut at the window as they are, as is the bundle's
    own training dataset (its --split-file test part) unless --um-per-px is given.
    A classifier trained with data.class_map (Early, Pre, Pro -> Malignant) scores its data's labels mapped
    the same way, and says so.
    """
    from leukoscope.data.readers import check_dataset_path

    if overwrite and out is None:  # the default folder goes to eval-<data>-2, -3...: there is nothing to replace
        fail("--overwrite replaces the evaluation an --out folder holds; without --out each evaluation goes to a "
             "new folder (eval-<data>, then eval-<data>-2, ...) and none is replaced: give --out FOLDER to "
             "replace the evaluation it holds")
    if backend not in BACKENDS:
        fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if on_corrupt not in ("skip", "fail"):
        fail(f"--on-corrupt must be skip or fail, got {on_corrupt!r}")
    if threads is not None and threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    if um_per_px is not None and as_given:
        fail("--um-per-px gives the images' scale (a classifier frames each cell at it, a detector sees each field "
             "brought from it to its own); --as-given takes the images as they are: give one")
    if um_per_px is not None:
        from leukoscope.scale import checked_um_per_px

        call_or_exit(checked_um_per_px, um_per_px, "--um-per-px")

    spec, bundle = bundle, check_bundle(bundle, "--bundle")
    call_or_exit(check_dataset_path, data)
    if split_file is not None and not split_file.is_file():
        fail(f"{split_file}: split file does not exist (make one with `leukoscope split`)"
             if not split_file.exists() else f"{split_file}: is a folder, not a split file")
    if subset is not None and split_file is None:  # else every image would be scored, and said to be the part
        fail(f"--subset {subset} names a part of a split: give the split with --split-file")
    from leukoscope.bundle import read_bundle_info
    from leukoscope.tasks import task_named

    info = call_or_exit(read_bundle_info, bundle)
    evaluate_bundle = task_named(info.task).function("evaluate")
    # Options of the other task would be silently ignored: refuse them.
    foreign = ({"--split-file": split_file, "--subset": subset, "--allow-training-data": allow_training_data,
                "--no-class-map": not class_map}
               if info.task == "detect" else {"--split": split})
    given = [name for name, value in foreign.items() if value]
    if given:
        fail(f"{bundle} is a {'detector' if info.task == 'detect' else 'classifier'} bundle: "
             f"{', '.join(given)} does not apply to it")
    # a shipped model's folder is inside the installed package: its evaluations go to the working folder
    shipped = is_pretrained_spec(spec) or shipped_spec(bundle) is not None  # as pretrained:NAME or as its folder
    out_root, prefix = (Path("."), f"eval-{bundle.name}-") if shipped else (bundle.parent, "eval-")
    if threads:  # torch's share of either task (a detector's graph runs beside torch's proposal stage)
        import torch

        torch.set_num_threads(threads)
    if info.task == "detect":
        out, note = _evaluation_out(out, out_root / f"{prefix}{Path(data).name}{'-' + split if split else ''}",
                                    overwrite)
        check_writable_folder(out, "--out")
        if um_per_px is not None and not getattr(info, "um_per_px", None):
            console.print("[yellow]warning:[/yellow] --um-per-px ignored: this detector records no training scale "
                          "to bring the fields to; they are scored as they are", soft_wrap=True)
        metrics = call_or_exit(evaluate_bundle, bundle, data, out, split=split, on_error=on_corrupt, backend=backend,
                               threads=threads, at_scale=not as_given, um_per_px=um_per_px, show_progress=not quiet)
        if (metrics.get("scales") or {}).get("note"):
            console.print(f"scale: {escape(metrics['scales']['note'])}", soft_wrap=True)
        console.print(f"mAP@[.5:.95] {metrics['map']:.4f}, mAP@0.5 {metrics['map_50']:.4f} "
                      f"on {metrics['n_images']} images")
        if metrics.get("training_overlap"):
            from leukoscope.data.fingerprints import describe_overlap

            console.print(f"[yellow]warning:[/yellow] these images include the detector's training images "
                          f"({describe_overlap(metrics['training_overlap'])}): the score says nothing about new "
                          f"images", soft_wrap=True)
    else:
        out, note = _evaluation_out(out, out_root / f"{prefix}{Path(data).stem}", overwrite)
        check_writable_folder(out, "--out")
        if um_per_px is not None and info.preprocessing.cell_window_um is None:
            console.print("[yellow]warning:[/yellow] --um-per-px ignored: this classifier has no physical window "
                          "(it takes each image whole)", soft_wrap=True)
        # The bundle's own dataset holds crops already cut at its window (training took them as they are).
        own_data = own_dataset(info, data)
        frame = frames_cells(info, data, as_given, um_per_px)
        if own_data and not as_given and um_per_px is None and info.preprocessing.cell_window_um is not None:
            console.print("framing: the bundle's own dataset: its images are scored as they are (crops cut at "
                          "the window, as training took them)", soft_wrap=True)
        metrics = call_or_exit(evaluate_bundle, bundle, data, out, split_file=split_file, subset=subset or "test",
                               on_corrupt=on_corrupt, allow_training_data=allow_training_data, backend=backend,
                               threads=threads, frame=frame, um_per_px=um_per_px, as_trained=class_map,
                               show_progress=not quiet)
        if metrics.get("framing"):
            said = "[yellow]framing:[/yellow]" if metrics["framing"]["whole"] else "framing:"
            console.print(f"{said} {escape(metrics['framing']['note'])}", soft_wrap=True)
        console.print(f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro']['f1']:.4f} "
                      f"on {metrics['n']} images")
        from leukoscope.evaluation.metrics import called_absent_note

        if called_absent_note(metrics):
            console.print(f"[yellow]warning:[/yellow] {escape(called_absent_note(metrics))}", soft_wrap=True)
    if note:
        console.print(note, soft_wrap=True)
    print(out / "report.html")


def calibrate_ood(
    bundle: Path = typer.Option(..., "--bundle", help="Classifier bundle directory (gets ood.safetensors)."),
    data: str = typer.Option(..., "--data", help="Labelled dataset folder or CSV (the bundle's training data, "
                             "or images of the same kind)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Split whose train part fits the "
                                              "statistics and val part sets the threshold (without a val part: a "
                                              "fifth of its train part; never its test part) (default: the "
                                              "bundle's recorded split, when the data is its training data)."),
    method: str = typer.Option("mahalanobis", help="mahalanobis (embedding) or energy (logits)."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages (submodule names, comma-separated) read "
                                         "beside the penultimate embedding, or 'none' for that embedding alone "
                                         "(default: the architecture's; mobilenet_v2: features.3,features.6,"
                                         "features.10,features.13,features.16)."),
    quantile: float = typer.Option(0.95, help="Share of held-out in-distribution images below the threshold."),
    views: Optional[int] = typer.Option(None, "--views", help="Read every cell from now on in 1, 4 (its right-angle "
                                        "rotations) or 8 (and their mirror images) views, averaged; the temperature "
                                        "is refitted with them (default: the bundle's views, temperature kept)."),
    on_corrupt: str = typer.Option("skip", help="skip or fail on unreadable images."),
    quiet: bool = flag(False, "--quiet", help="No progress bars."),
) -> None:
    """Fit the out-of-distribution flag of a classifier bundle: 'unlike anything it was trained on'.

    Class means and a shrunk shared covariance of the embeddings on the training part
    (for the shipped architecture, one per stage of the network and one for its
    penultimate layer), the threshold at the 95th percentile of the validation part's
    scores (5% false alarms). Then `predict` gives every image an ood_score and an
    unfamiliar column, and `analyze` flags fields with many unfamiliar cells.

    --views 4 or 8 makes every later use of the bundle average the cell's rotations (and
    mirror images): steadier calls at 4 or 8 times the network's work per cell; the
    temperature is refitted on the same validation part, with the statistics.
    """
    from leukoscope.data.readers import check_dataset_path

    if not 0.5 <= quantile < 1:  # before any image is decoded
        fail(f"--quantile must be in [0.5, 1), got {quantile}")
    if on_corrupt not in ("skip", "fail"):
        fail(f"--on-corrupt must be skip or fail, got {on_corrupt!r}")

    folder = check_bundle(bundle, "--bundle")
    if is_pretrained_spec(bundle) or shipped_spec(folder):  # it would write into the installed package
        fail(f"{bundle} is a shipped model: copy its folder ({folder}) and calibrate the copy")
    call_or_exit(check_dataset_path, data)
    if split_file is not None and not split_file.is_file():
        fail(f"{split_file}: split file does not exist (make one with `leukoscope split`)")
    if method not in ("mahalanobis", "energy"):
        fail(f"--method must be mahalanobis or energy, got {method!r}")
    from leukoscope.preprocessing import VIEWS

    if views is not None and views not in VIEWS:
        fail(f"--views must be one of {', '.join(map(str, VIEWS))}, got {views}")
    from leukoscope.bundle import BundleError, check_export_matches, read_bundle_info
    from leukoscope.tasks.ood import calibrate_bundle

    named = None if stages is None else [] if stages.strip() == "none" else [
        name.strip() for name in stages.split(",") if name.strip()]
    stats, source = call_or_exit(calibrate_bundle, bundle, data, split_file=split_file, method=method,
                                 quantile=quantile, on_corrupt=on_corrupt, show_progress=not quiet, stages=named,
                                 views=views)
    console.print(f"OOD flag: {stats.method} threshold {stats.threshold:.4g} ({100 * stats.quantile:g}th percentile "
                  f"of {stats.details['threshold_images']} held-out images), fitted on "
                  f"{stats.details['fit_images']} images from {escape(source)}"
                  f"{'; stages ' + ', '.join(stats.stages) if stats.stages else ''}", soft_wrap=True)
    try:  # an exported graph made before the statistics: its embedding may no longer be theirs
        check_export_matches(bundle, read_bundle_info(bundle))
    except BundleError as exc:
        console.print(f"[yellow]warning:[/] {escape(str(exc))}", soft_wrap=True)
    print(bundle)
