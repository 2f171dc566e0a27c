"""int8 quantization of exported graphs: ``leukoscope export --int8 --calibration DATA``.

onnxruntime's post-training quantizer (``onnxruntime.quantization.quantize_static``)
rewrites the float ONNX graph with QuantizeLinear/DequantizeLinear pairs (QDQ format):
weights int8 per output channel, activations uint8 per tensor with ranges measured
on calibration images. QDQ is the form both runtimes run as int8: onnxruntime fuses
the pairs into integer kernels, OpenVINO reads them as FakeQuantize (so an int8
OpenVINO IR is this graph converted).

The calibration images go through the bundle's own preprocessing
(:meth:`Preprocessing.model_input`), the path every backend's input takes. They
should be like the images the model will see, and not the images its accuracy is
then checked on (``--check``): ranges fitted on the check set flatter the result.

A detector (:func:`quantize_detector_graphs`) is quantized in two ways: its dense graph
(backbone, feature pyramid, RPN head: convolutions) statically as above, calibrated on whole
fields through the model's own transform; its box graph (RoIAlign, box head, class layer)
dynamically: the fully connected layers' weights int8, their inputs quantized per batch of
regions at run time, so no calibration (its RoIAlign stays float). Measured on the shipped
detector (docs/benchmarks.md): the same white-cell AP, 23% less CPU per 2592x1944 field.

Why no NNCF (OpenVINO's own quantizer, with accuracy-aware tuning): one more large
dependency for the same QDQ graph; onnxruntime is already the export extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from leukoscope.bundle import BundleError
from leukoscope.io import ImageDecodeError, load_image
from leukoscope.preprocessing import Preprocessing

#: Calibration images used at most (the ranges settle after a few hundred).
MAX_CALIBRATION_IMAGES = 512
#: Fewer than this gives ranges that one odd image decides.
MIN_CALIBRATION_IMAGES = 16
#: Images per calibration batch.
CALIBRATION_BATCH = 32
#: Fields used at most to calibrate a detector (each is a whole field: ranges settle sooner).
MAX_DETECTOR_CALIBRATION_FIELDS = 64


def calibration_paths(data: str | Path, limit: int = MAX_CALIBRATION_IMAGES) -> list[Path]:
    """Up to ``limit`` image paths of ``data`` (a folder, class folders or a CSV manifest), spread
    evenly over the list (so over the classes of a class-folder tree), in a fixed order."""
    from leukoscope.inference.export_check import images_and_labels

    paths, _ = images_and_labels(data)
    if len(paths) < MIN_CALIBRATION_IMAGES:
        raise BundleError(f"{data}: {len(paths)} calibration images; int8 calibration needs at least "
                          f"{MIN_CALIBRATION_IMAGES} images like the ones the model will classify")
    if len(paths) > limit:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit).round()]
    return paths


class _Reader:
    """onnxruntime's CalibrationDataReader protocol: ``get_next()`` -> ``{input: batch}`` or None.
    ``pixels(image)`` makes one image's tensor, ``model_input(list of them)`` the graph's batch."""

    def __init__(self, paths: Sequence[Path], pixels: Callable[[Any], Any], model_input: Callable[[list], np.ndarray],
                 input_name: str, batch: int, progress: Callable[..., None] | None) -> None:
        self.paths = list(paths)
        self.pixels = pixels
        self.model_input = model_input
        self.input_name = input_name
        self.batch = batch
        self.progress = progress
        self.position = 0
        self.used = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        pixels = []
        while self.position < len(self.paths) and len(pixels) < self.batch:
            path = self.paths[self.position]
            self.position += 1
            try:
                pixels.append(self.pixels(load_image(path)))
            except (ImageDecodeError, OSError):
                continue  # an unreadable image is no reason to stop; the count below says how many served
            if self.progress is not None:
                self.progress()
        if not pixels:
            return None
        self.used += len(pixels)
        return {self.input_name: self.model_input(pixels)}

    def rewind(self) -> None:
        self.position = 0


def _classifier_reader(paths: Sequence[Path], preprocessing: Preprocessing, input_name: str,
                       progress: Callable[..., None] | None) -> _Reader:
    import torch

    return _Reader(paths, preprocessing.pixels,
                   lambda pixels: preprocessing.model_input(torch.stack(pixels)).float().numpy(),
                   input_name, CALIBRATION_BATCH, progress)


def _quantizer() -> Any:
    try:
        from onnxruntime import quantization
        from onnxruntime.quantization import shape_inference
    except ImportError:
        raise BundleError("int8 export needs onnxruntime's quantizer: pip install 'leukoscope[onnx]'") from None
    return quantization, shape_inference


def _quantize_static(graph: Path, out: Path, reader: _Reader, total: int) -> None:
    """``graph`` -> int8 QDQ ``out`` with activation ranges from ``reader`` (weights per channel)."""
    quantization, shape_inference = _quantizer()
    prepared = out.with_name(out.name + ".pre.tmp")
    try:
        # Shape inference and graph folding first, as onnxruntime advises for static quantization.
        shape_inference.quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_static(str(prepared), str(out), reader, quant_format=quantization.QuantFormat.QDQ,
                                     per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8,
                                     calibrate_method=quantization.CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)
    if reader.used < MIN_CALIBRATION_IMAGES:
        out.unlink(missing_ok=True)
        raise BundleError(f"only {reader.used} of the {total} calibration images could be read; int8 "
                          f"calibration needs at least {MIN_CALIBRATION_IMAGES}")


def quantize_graph(graph: Path, out: Path, paths: Sequence[Path], preprocessing: Preprocessing,
                   input_name: str, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Write the int8 (QDQ) version of float classifier graph ``graph`` to ``out``, calibrated on
    ``paths``; returns what ``bundle.json``'s export record says about it."""
    _quantizer()
    import onnxruntime

    reader = _classifier_reader(paths, preprocessing, input_name, progress)
    _quantize_static(graph, out, reader, len(paths))
    return {"precision": "int8", "quantizer": f"onnxruntime.quantization {onnxruntime.__version__}: static, QDQ, "
            "weights int8 per channel, activations uint8 per tensor, MinMax ranges",
            "calibration_images": reader.used}


def quantize_detector_graphs(dense: Path, dense_out: Path, box: Path, box_out: Path, paths: Sequence[Path],
                             model: Any, input_name: str,
                             progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Write int8 versions of a Faster R-CNN's exported graphs (module docstring): ``dense`` to
    ``dense_out``, calibrated on the fields ``paths`` as ``model``'s transform gives them to it (scaled,
    normalised, padded; one field per batch, as fields differ in size), and ``box`` to ``box_out``;
    returns what ``bundle.json``'s export record says about them."""
    quantization, shape_inference = _quantizer()
    import onnxruntime
    import torch

    from leukoscope.inference.detector import to_model_tensor

    def field_input(image: Any) -> Any:
        with torch.no_grad():
            return model.transform([to_model_tensor(image)])[0].tensors[0]

    reader = _Reader(paths, field_input, lambda fields: torch.stack(fields).float().numpy(), input_name, 1, progress)
    _quantize_static(dense, dense_out, reader, len(paths))
    prepared = box_out.with_name(box_out.name + ".pre.tmp")
    try:
        shape_inference.quant_pre_process(str(box), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_dynamic(str(prepared), str(box_out), weight_type=quantization.QuantType.QInt8,
                                      op_types_to_quantize=["Gemm", "MatMul"])
    finally:
        prepared.unlink(missing_ok=True)
    return {"precision": "int8",
            "quantizer": f"onnxruntime.quantization {onnxruntime.__version__}: dense graph static, QDQ, weights int8 "
                         "per channel, activations uint8 per tensor, MinMax ranges; box graph dynamic, fully "
                         "connected weights int8 (RoIAlign float)",
            "calibration_images": reader.used}
