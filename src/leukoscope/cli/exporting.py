"""`leukoscope export`: a bundle with an ONNX or OpenVINO graph beside its weights."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape

from leukoscope.cli._common import (call_or_exit, check_bundle, check_writable_folder, fail, flag, frames_cells,
                                    terminate_as_interrupt, user_errors)
from leukoscope.pretrained import peek_bundle, pretrained_root, shipped_spec
from leukoscope.progress import console


#: The package's own folder of shipped models (``pretrained_root()`` unless LEUKOSCOPE_PRETRAINED_DIR moves it).
PACKAGE_MODELS = Path(__file__).resolve().parent.parent / "pretrained"


def _check_or_remove(target: Path, source: Path, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``check(*args, **kwargs)``; when it cannot run (bad --check data), the export just written to its own folder
    is removed: left, it was unchecked and blocked the rerun ("already exists and is not empty"). A graph added to
    the bundle's own folder (``target`` is ``source``) stays: that folder is the user's trained model."""
    try:
        return check(*args, **kwargs)
    except user_errors() as exc:
        if target.resolve() == source.resolve():
            fail(f"{exc} (the graph added to {target} stays, unchecked: fix --check and export again)")
        shutil.rmtree(target, ignore_errors=True)
        fail(f"{exc} (the export in {target} was removed: fix --check and export again)")


def _export_out(bundle: Path, out: Optional[Path], suffix: str) -> Path:
    """Where `export` writes: ``--out``, else ``<bundle>-<suffix>`` beside the bundle (``./NAME-<suffix>`` for
    a shipped model, whose folder is inside the installed package). The bundle's own folder is allowed
    (the graph is added to it); any other folder must be new or empty."""
    shipped = shipped_spec(bundle)  # given as pretrained:NAME or as its folder: nothing is written inside
    if out is None:
        name = f"{bundle.name}-{suffix}"
        out = Path(name) if shipped else bundle.parent / name
    if out.resolve() == bundle.resolve():
        if shipped:
            fail(f"{shipped} is a shipped model: export it to another folder (--out DIR)")
        return out
    protected = {pretrained_root().resolve(), PACKAGE_MODELS.resolve()}
    if any(out.resolve() == root or out.resolve().is_relative_to(root) for root in protected):
        fail(f"{out} is inside the shipped models' folder (the installed package): choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out} already exists and is not empty: choose another --out (or remove it)")
    check_writable_folder(out, "--out")  # a file above it
    return out


def export(
    bundle: str = typer.Option(..., "--bundle", help="Classifier or detector bundle directory, or pretrained:NAME."),
    export_format: str = typer.Option("onnx", "--format", help="Graph format: onnx (runs on onnxruntime or "
                                      "OpenVINO) or openvino (OpenVINO IR; classifiers)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder of the exported bundle (default: "
                                       "`<bundle>-<format>[-int8]` beside it; the bundle's own folder adds the graph "
                                       "to it)."),
    int8: bool = flag(False, "--int8", help="Quantize to int8 (static, calibrated on --calibration; a "
                      "detector's box head: dynamic)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Images like those the model will "
                                              "see (a folder, class folders or a CSV manifest; at least 16, up to "
                                              "512 used; a detector: a folder of 16 to 64 fields) to calibrate "
                                              "--int8 on; not "
                                              "the --check images."),
    check: Optional[str] = typer.Option(None, "--check", help="Images (a folder, class folders or a CSV manifest; "
                                        "for a detector a VOC folder) to compare the graph with the torch model on "
                                        "(labelled: accuracy change; a detector: mAP change)."),
    split: Optional[str] = typer.Option(None, "--split", help="Detectors: the VOC split of --check (e.g. Testing)."),
    opset: int = typer.Option(17, help="ONNX opset."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the --check inference."),
    as_given: bool = flag(False, "--as-given", help="Classifiers: take the --calibration and --check images "
                          "whole, as they are (crops already cut at the classifier's window); by default "
                          "they are framed as predict frames single-cell images (the bundle's own training "
                          "data: as given)."),
    um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Classifiers: pixel size of the "
                                              "--calibration and --check images (micrometres), to frame them at."),
) -> None:
    """Export a classifier or detector bundle as an inference bundle: its files plus the graph, recorded
    in bundle.json.

    A classifier's graph takes the bundle's normalised input (preprocessing stays the bundle's) with a
    dynamic batch axis, and gives the logits and the penultimate embedding (for the OOD score).
    `leukoscope predict --backend auto` runs it (onnxruntime or openvino). A Faster R-CNN detector's
    graph is its dense part (backbone, feature pyramid, RPN head) for any image size, plus a box graph
    (RoIAlign, box head), as ONNX; proposal selection and NMS between them run in numpy (`leukoscope analyze
    --backend onnxruntime|openvino`). --int8 quantizes a classifier's graph, or both of a detector's.
    """
    import importlib.util

    if export_format not in ("onnx", "openvino"):
        fail(f"--format must be onnx or openvino, got {export_format!r}")
    if int8 and calibration is None:
        fail("--int8 needs --calibration DATA: images to measure the activation ranges on")
    if calibration is not None and not int8:
        fail("--calibration is for --int8 (a float export needs no calibration)")
    source = check_bundle(bundle, "--bundle")
    peek = call_or_exit(peek_bundle, source)
    detector = peek.task == "detect"
    if split is not None and not detector:
        fail(f"{source} is a classifier bundle: --split applies to detector bundles only")
    if split is not None and check is None:
        fail("--split names a split of --check DATA: give --check too")
    if detector and (as_given or um_per_px is not None):
        fail(f"{source} is a detector bundle: --as-given and --um-per-px apply to classifiers (a detector's fields "
             f"are scaled by their red cells, as analyze does)")
    if um_per_px is not None and as_given:
        fail("--um-per-px frames each image at that scale; --as-given takes the images as they are: give one")
    if um_per_px is not None:
        from leukoscope.scale import checked_um_per_px

        call_or_exit(checked_um_per_px, um_per_px, "--um-per-px")
    # The refusals of leukoscope.inference.export.check_exportable, before torch is imported.
    if detector and peek.model_name.startswith("fcos"):
        fail(f"{source} is an FCOS detector: export supports Faster R-CNN detectors only for now")
    if detector and export_format != "onnx":
        fail(f"{source} is a detector: it exports as ONNX graphs only (--format onnx); --backend openvino runs "
             f"those graphs too")
    if not detector and peek.framework != "torch":
        fail(f"{source} is a classical (scikit-learn) model: export to ONNX supports torch CNN classifiers only "
             f"for now")
    needed = {"onnx": "onnx"}
    if int8 or (check and export_format == "onnx" and importlib.util.find_spec("openvino") is None):
        needed["onnxruntime"] = "onnx"
    if export_format == "openvino":
        needed["openvino"] = "openvino"
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        extras = ",".join(dict.fromkeys(needed[name] for name in missing))
        fail(f"export needs {' and '.join(missing)}: pip install 'leukoscope[{extras}]'")
    from leukoscope.data.readers import check_dataset_path

    for given in (calibration, check):
        if given is not None:
            call_or_exit(check_dataset_path, given)
    if threads is not None and threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    if not detector:  # the datasets read before the export is written (a detector's check reads VOC folders)
        from leukoscope.inference.export_check import check_data_readable

        for given in dict.fromkeys(path for path in (calibration, check) if path is not None):
            call_or_exit(check_data_readable, given)
    target = _export_out(source, out, export_format + ("-int8" if int8 else ""))
    if threads:
        import torch

        torch.set_num_threads(threads)
    from leukoscope.inference.export import export_bundle

    from leukoscope.bundle import read_bundle_info

    info = None if detector else call_or_exit(read_bundle_info, source)
    # single-cell images are framed for the classifier's window as predict frames them (int8 ranges and the
    # accuracy change are then measured on what the model will be given)
    frames = {given: frames_cells(info, given, as_given, um_per_px) for given in (calibration, check)
              if given is not None and info is not None}
    with terminate_as_interrupt():
        call_or_exit(export_bundle, source, target, export_format, opset=opset, calibration=calibration,
                     frame_calibration=frames.get(calibration, False), um_per_px=um_per_px, show_progress=True)

    record = call_or_exit(read_bundle_info, target).export or {}
    precision = (f"int8, calibrated on {record.get('calibration_images')} images" if int8 else "float32")
    if detector:
        console.print(f"exported {escape(peek.model_name)} to {escape(str(target / 'model.onnx'))} (opset {opset}, "
                      f"{precision}, input (batch, 3, height, width: the dense part))", soft_wrap=True)
    else:
        console.print(f"exported {escape(peek.model_name)} to {escape(str(target / str(record.get('file'))))} "
                      f"({export_format}, {precision}, input (batch, 3, {peek.preprocessing['image_size']}, "
                      f"{peek.preprocessing['image_size']}))", soft_wrap=True)
    if check is not None and detector:
        from leukoscope.tasks.detect import compare_detector_backends

        report = _check_or_remove(target, source, compare_detector_backends, target, check, split=split,
                                  threads=threads)
    elif check is not None:
        from leukoscope.inference.export_check import compare_backends

        report = _check_or_remove(target, source, compare_backends, target, check, threads=threads,
                                  frame=frames.get(check, False), um_per_px=um_per_px)
    if check is not None:
        from leukoscope.bundle import note_export_in_card

        for line in report.lines():
            console.print(line)
        windowed = info is not None and info.preprocessing.cell_window_um is not None
        framed = "" if not windowed else (" (framed as predict frames them)" if frames.get(check) else " (as given)")
        note_export_in_card(target, record, [f"--check {Path(check).name}" + (f" --split {split}" if split else "")
                                             + framed, *report.lines()])
    print(target)
