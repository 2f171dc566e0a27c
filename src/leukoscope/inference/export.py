"""Export a classifier bundle's network as an inference graph: ``leukoscope export --format onnx|openvino``.

The exported bundle is a copy of the source bundle (``bundle.json``, weights, OOD
statistics) plus the graph, recorded in ``bundle.json``'s ``export`` entry (format 4):
``model.onnx`` (ONNX, run by onnxruntime or OpenVINO) or ``model.xml`` + ``model.bin``
(OpenVINO IR, converted from the ONNX graph with ``openvino.convert_model``, weights kept
float32). The graph takes what the torch model takes: the bundle's *normalised* float
input ``(batch, 3, S, S)``, so the bundle's preprocessing stays the one path to it
(:mod:`leukoscope.preprocessing`), and gives two outputs: ``logits`` and ``embedding``
(the input of the final linear layer, which the Mahalanobis OOD score reads). The batch
axis is dynamic; the image size is the bundle's. With ``calibration`` (``--int8``) the
ONNX graph is quantized to int8 first (:mod:`leukoscope.inference.quantize`), and the
OpenVINO IR is made from the quantized graph.

Exporter: torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``: it needs
only the ``onnx`` package, where the torch.export-based one needs onnxscript too. It
cannot export ``AdaptiveAvgPool2d`` when the output size does not divide the input
size (system A's CNN, System D's ConvNet, VGG and AlexNet at many image sizes); since
the input size is fixed, such a pool is replaced in the exported copy by the same
average written as two matrix products (:class:`FixedAdaptiveAvgPool`).

Detectors: their dense part, in :mod:`leukoscope.inference.detector_export`. Classical
(scikit-learn) bundles are not exported yet: a clear error.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from leukoscope.bundle import (GRAPH_FILES, ONNX_FILE, OPENVINO_FILE, OPENVINO_WEIGHTS_FILE,
                               BundleError, copy_bundle, load_bundle, ood_digest, read_bundle_info, save_export,
                               weights_digest)
from leukoscope.models.embedding import capture_embeddings, embedding_stages
from leukoscope.pretrained import resolve_bundle

FORMATS = ("onnx", "openvino")
DEFAULT_OPSET = 17
#: Opsets an export may ask for: from 13 (onnxruntime's per-channel int8 quantization; a detector's box
#: graph needs 16, checked with it) to the last that torch's TorchScript exporter writes.
OPSETS = range(13, 21)
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "embedding")


class FixedAdaptiveAvgPool(nn.Module):
    """``AdaptiveAvgPool2d(output)`` for one input size, as ``A_h @ x @ A_w^T``: each row of ``A``
    averages the window PyTorch's adaptive pool averages (start = floor(i*in/out),
    end = ceil((i+1)*in/out)), so the result is the same up to float rounding."""

    def __init__(self, input_size: tuple[int, int], output_size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", _averaging_matrix(input_size[0], output_size[0]))
        self.register_buffer("cols", _averaging_matrix(input_size[1], output_size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols.T


def _averaging_matrix(size_in: int, size_out: int) -> torch.Tensor:
    matrix = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _pair(size: Any, like: tuple[int, int]) -> tuple[int, int]:
    """An adaptive pool's output size as (h, w); None keeps the input's."""
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    return (like[0] if h is None else int(h), like[1] if w is None else int(w))


def exportable_copy(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` (eval mode) whose adaptive average pools the exporter cannot write are
    replaced by :class:`FixedAdaptiveAvgPool` for the input size of ``example``."""
    model = copy.deepcopy(model).eval()
    seen: dict[str, tuple[int, int]] = {}

    def recorder(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            seen.setdefault(name, (int(inputs[0].shape[-2]), int(inputs[0].shape[-1])))
        return record

    handles = [module.register_forward_hook(recorder(name))
               for name, module in model.named_modules() if isinstance(module, nn.AdaptiveAvgPool2d)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    for name, size_in in seen.items():
        size_out = _pair(model.get_submodule(name).output_size, size_in)
        if size_in[0] % size_out[0] or size_in[1] % size_out[1]:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, FixedAdaptiveAvgPool(size_in, size_out))
    return model


class WithEmbedding(nn.Module):
    """``(logits, embedding)`` from one forward pass: the graph's two outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with capture_embeddings(self.model) as captured:
            logits = self.model(x)
        return logits, captured[0]


def check_exportable(bundle: str | Path, export_format: str = "onnx") -> None:
    """A one-line error for what cannot be exported (format, task, framework), from ``bundle.json`` only."""
    if export_format not in FORMATS:
        raise ValueError(f"unknown export format {export_format!r} (supported: {', '.join(FORMATS)})")
    info = read_bundle_info(bundle)
    if info.task == "detect":  # Faster R-CNN detectors: leukoscope.inference.detector_export
        if info.model_name.startswith("fcos"):
            raise BundleError(f"{bundle} is an FCOS detector: export supports Faster R-CNN detectors only for now")
        return
    if info.framework != "torch":
        raise BundleError(f"{bundle} is a classical (scikit-learn) model: export to ONNX supports torch CNN "
                          f"classifiers only for now")


def export_onnx(bundle: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """:func:`export_bundle` as a float ONNX graph."""
    return export_bundle(bundle, out, "onnx", opset=opset)


def export_bundle(bundle: str | Path, out: str | Path, export_format: str = "onnx", *, opset: int = DEFAULT_OPSET,
                  calibration: str | Path | None = None, frame_calibration: bool = False,
                  um_per_px: float | None = None, show_progress: bool = False) -> Path:
    """Write the exported bundle of classifier (or detector) ``bundle`` into ``out`` (which may be ``bundle``
    itself: then only the graph and the ``export`` entry are added); returns ``out``. ``calibration``: images
    to quantize the graph(s) to int8 with (``None``: float32; a detector: fields, see
    :func:`~leukoscope.inference.quantize.quantize_detector_graphs`). ``frame_calibration``: a classifier of a
    physical window sees each calibration image framed as ``leukoscope predict`` frames it (at ``um_per_px``,
    else its own scale or the images' together); without it they are taken as they are (crops already cut at
    the window, as its training data).

    An export that fails (too few readable calibration images, a graph the checker refuses, Ctrl-C) leaves
    no bundle behind in a new or empty ``out``: a copy without its graph would load as the float torch model."""
    if opset not in OPSETS:
        raise ValueError(f"opset must be between {OPSETS.start} and {OPSETS.stop - 1}, got {opset}")
    out = Path(out)
    in_place = out.exists() and out.resolve() == resolve_bundle(bundle).resolve()
    fresh = not in_place and (not out.exists() or (out.is_dir() and not any(out.iterdir())))
    if not in_place and not fresh:  # another folder's files would be mixed with the export's
        raise BundleError(f"{out} already exists and is not empty: export into a new folder, or into the bundle "
                          "itself")
    existed = out.exists()
    try:
        return _export_bundle(bundle, out, export_format, opset=opset, calibration=calibration,
                              frame_calibration=frame_calibration, um_per_px=um_per_px, show_progress=show_progress)
    except BaseException:
        if fresh and out.is_dir():
            if existed:
                for child in out.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            else:
                shutil.rmtree(out, ignore_errors=True)
        raise


def _export_bundle(bundle: str | Path, out: Path, export_format: str, *, opset: int,
                   calibration: str | Path | None, frame_calibration: bool, um_per_px: float | None,
                   show_progress: bool) -> Path:
    source = resolve_bundle(bundle)
    check_exportable(source, export_format)
    if read_bundle_info(source).task == "detect":
        if export_format != "onnx":
            # OpenVINO runs the detector's ONNX graphs itself (--backend openvino).
            raise BundleError(f"{bundle} is a detector: it exports as ONNX graphs only (--format onnx); "
                              f"--backend openvino runs those graphs too")
        from leukoscope.inference.detector_export import export_detector_onnx  # imports this module

        return export_detector_onnx(source, out, opset=opset, calibration=calibration, show_progress=show_progress)
    if export_format == "openvino":
        _require_openvino()
    paths = None
    if calibration is not None:
        from leukoscope.inference.quantize import calibration_paths

        paths = calibration_paths(calibration)  # before any work: a bad folder fails at once
    model, info = load_bundle(source, "cpu", task="classify")
    assert info.preprocessing is not None
    size = info.preprocessing.image_size
    example = torch.zeros(2, 3, size, size)  # 2: batch norm layers and flattening see a real batch axis
    wrapped = WithEmbedding(exportable_copy(model, example)).eval()
    with torch.no_grad():
        logits, embedding = wrapped(example)
    out = Path(out)
    in_place = out.resolve() == source.resolve()
    if not in_place:
        copy_bundle(source, out, with_info=False)  # bundle.json comes last, with the graph's record
    graph_tmp = out / (ONNX_FILE + ".tmp")
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice: chosen on purpose (docstring)
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (example,), str(graph_tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)})
    check_graph(graph_tmp)
    record = export_record(info.model_name, size, logits.shape[1], embedding.shape[1], opset, source,
                           info.model_options, embedding_stages(model))
    if paths is not None:
        from leukoscope.cell_window import single_cell_framer
        from leukoscope.inference.quantize import quantize_graph
        from leukoscope.progress import progress_bar

        window = info.preprocessing.cell_window_um
        frame = single_cell_framer(window, paths, um_per_px) if frame_calibration and window is not None else None

        quantized_tmp = out / (ONNX_FILE + ".int8.tmp")
        try:
            with progress_bar(len(paths), "calibrating int8", enabled=show_progress) as update:
                record.update(quantize_graph(graph_tmp, quantized_tmp, paths, info.preprocessing, INPUT_NAME,
                                             update, frame))
            if info.ood is not None:  # the flag's thresholds, carried from the float graph's scores to int8's
                from leukoscope.inference.predictor import load_ood_stats
                from leukoscope.inference.quantize import int8_ood_thresholds

                record.update(int8_ood_thresholds(graph_tmp, quantized_tmp, paths, info.preprocessing, INPUT_NAME,
                                                  load_ood_stats(source, info), frame))
                record["ood_sha256"] = ood_digest(source, info)
        finally:
            graph_tmp.unlink(missing_ok=True)
        quantized_tmp.replace(graph_tmp)
        record["calibration_data"] = str(calibration)
        record["calibration_framed"] = frame is not None  # cut to the window as predict does, or as given
    converted = _to_openvino(graph_tmp, out) if export_format == "openvino" else None
    # Only now, the new graph made: a graph of another format left in the folder would be stale (and a
    # conversion that failed leaves an in-place export's old graph, which its record still names).
    for name in GRAPH_FILES:
        (out / name).unlink(missing_ok=True)
    if converted is not None:
        stem, fields = converted
        stem.with_suffix(".bin").replace(out / OPENVINO_WEIGHTS_FILE)
        stem.with_suffix(".xml").replace(out / OPENVINO_FILE)
        record.update(fields)
    else:
        graph_tmp.replace(out / ONNX_FILE)
    save_export(out, record, None if in_place else info)
    return out


def _require_openvino() -> None:
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        raise BundleError("export to OpenVINO needs openvino: pip install 'leukoscope[openvino]'")


def _to_openvino(graph: Path, out: Path) -> tuple[Path, dict[str, Any]]:
    """Convert the ONNX ``graph`` (removed after) into ``model-converting.xml``/``.bin`` in ``out`` (the caller moves
    them into place); their stem and the record's fields that change. Weights stay float32
    (``compress_to_fp16=False``): the parity check compares with float32 torch, and int8 is what ``--int8``
    is for."""
    import openvino as ov

    stem = out / "model-converting"  # model-converting.xml / .bin until moved into place
    try:
        with _no_converter_telemetry():
            converted = ov.convert_model(str(graph))
        ov.save_model(converted, str(stem.with_suffix(".xml")), compress_to_fp16=False)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
        for suffix in (".xml", ".bin"):
            stem.with_suffix(suffix).unlink(missing_ok=True)
        raise BundleError(f"OpenVINO cannot convert the exported graph: {str(exc)[:300]}") from None
    finally:
        graph.unlink(missing_ok=True)
    return stem, {"format": "openvino", "file": OPENVINO_FILE, "weights_file": OPENVINO_WEIGHTS_FILE,
                  "converter": f"openvino.convert_model {ov.__version__} (from the ONNX graph)"}


@contextmanager
def _no_converter_telemetry() -> Iterator[None]:
    """``openvino.convert_model`` sends usage telemetry (openvino_telemetry, to Google Analytics) from a forked
    process unless the user opted out or ``CI=true``; without network that process waits on the name lookup and
    Python waits for it at exit: a test run here hung after its last test, and an offline `leukoscope export`
    would not return. leukoscope sends nothing: the converter is given its documented opt-out for the call
    (``disable_in_ci``: the ``CI`` variable), and the variable is put back after."""
    before = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = before


def check_graph(path: Path) -> None:
    """onnx's own consistency check of the written graph (skipped when onnx is not installed)."""
    try:
        import onnx
    except ImportError:
        return
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types
        path.unlink(missing_ok=True)
        raise BundleError(f"the exported graph fails onnx's check: {str(exc)[:300]}") from None


def export_record(model_name: str, image_size: int, classes: int, embedding: int, opset: int,
                  source: Path, model_options: dict[str, Any] | None = None,
                  stages: Sequence[str] = ()) -> dict[str, Any]:
    """The ``export`` entry of ``bundle.json``: what the graph takes and gives, and how it was made."""
    return {
        "format": "onnx",
        "file": ONNX_FILE,
        "precision": "float32",
        "opset": opset,
        "exporter": f"torch.onnx (TorchScript) {torch.__version__}",
        "inputs": [{"name": INPUT_NAME, "shape": ["batch", 3, image_size, image_size], "dtype": "float32",
                    "preprocessing": "the bundle's: letterboxed RGB, mean/std normalised"}],
        "outputs": [{"name": "logits", "shape": ["batch", classes], "dtype": "float32"},
                    {"name": "embedding", "shape": ["batch", embedding], "dtype": "float32"}],
        "model_name": model_name,
        # What the graph was made from: a bundle whose weights or options change no longer matches it.
        "weights_sha256": weights_digest(source),
        "model_options": dict(model_options or {}),
        # The stages the embedding output holds (leukoscope.models.embedding): OOD statistics refitted
        # on other stages no longer fit the graph.
        "embedding_stages": list(stages),
    }
