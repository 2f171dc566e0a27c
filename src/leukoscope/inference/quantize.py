"""Static int8 quantization of an exported classifier graph: ``leukoscope export --int8 --calibration DATA``.

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
    """onnxruntime's CalibrationDataReader protocol: ``get_next()`` -> ``{input: batch}`` or None."""

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing, input_name: str,
                 progress: Callable[..., None] | None) -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing
        self.input_name = input_name
        self.progress = progress
        self.position = 0
        self.used = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        import torch

        pixels = []
        while self.position < len(self.paths) and len(pixels) < CALIBRATION_BATCH:
            path = self.paths[self.position]
            self.position += 1
            try:
                pixels.append(self.preprocessing.pixels(load_image(path)))
            except (ImageDecodeError, OSError):
                continue  # an unreadable image is no reason to stop; the count below says how many served
            if self.progress is not None:
                self.progress()
        if not pixels:
            return None
        self.used += len(pixels)
        return {self.input_name: self.preprocessing.model_input(torch.stack(pixels)).float().numpy()}

    def rewind(self) -> None:
        self.position = 0


def quantize_graph(graph: Path, out: Path, paths: Sequence[Path], preprocessing: Preprocessing,
                   input_name: str, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Write the int8 (QDQ) version of float ONNX ``graph`` to ``out``, calibrated on ``paths``;
    returns what ``bundle.json``'s export record says about it."""
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise BundleError("int8 export needs onnxruntime's quantizer: pip install 'leukoscope[onnx]'") from None
    import onnxruntime

    reader = _Reader(paths, preprocessing, input_name, progress)
    prepared = out.with_name(out.name + ".pre.tmp")
    try:
        # Shape inference and graph folding first, as onnxruntime advises for static quantization.
        quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)
    if reader.used < MIN_CALIBRATION_IMAGES:
        out.unlink(missing_ok=True)
        raise BundleError(f"only {reader.used} of the {len(paths)} calibration images could be read; int8 "
                          f"calibration needs at least {MIN_CALIBRATION_IMAGES}")
    return {"precision": "int8", "quantizer": f"onnxruntime.quantization {onnxruntime.__version__}: static, QDQ, "
            "weights int8 per channel, activations uint8 per tensor, MinMax ranges",
            "calibration_images": reader.used}
