"""int8 quantization of exported graphs: ``leukoscope export --int8 --calibration DATA``.

onnxruntime's post-training quantizer (``onnxruntime.quantization.quantize_static``)
rewrites the float ONNX graph with QuantizeLinear/DequantizeLinear pairs (QDQ format):
weights int8 per output channel, activations uint8 per tensor with ranges measured
on calibration images. Weights take 7 of their 8 bits (``reduce_range``): on a CPU without
VNNI (AVX2 and AVX-512F alone, e.g. many AMD EPYC), onnxruntime's uint8 x int8 kernels add
pairs of products in int16, which full-range weights overflow. Measured on such a machine
(2026-12-07, tests/export/test_int8_ood.py): the shipped classifier's int8 OOD scores
correlated 0.53 with the float model's at full range, 0.994 with 7-bit weights; a graph is written once
and may run on any CPU. QDQ is the form both runtimes run as int8: onnxruntime fuses
the pairs into integer kernels, OpenVINO reads them as FakeQuantize (so an int8
OpenVINO IR is this graph converted).

The calibration images go through the bundle's own preprocessing
(:meth:`Preprocessing.model_input`), the path every backend's input takes. They
should be like the images the model will see, and not the images its accuracy is
then checked on (``--check``): ranges fitted on the check set flatter the result.

A detector (:func:`quantize_detector_graphs`) is quantized in two ways: its dense graph
(backbone, feature pyramid, RPN head: convolutions) statically as above, calibrated on fields
as analysis gives them to the network (resampled to the detector's scale, tiled, through the
model's own transform); its box graph (RoIAlign, box head, class layer)
dynamically: the fully connected layers' weights int8, their inputs quantized per batch of
regions at run time, so no calibration (its RoIAlign stays float). Measured on the shipped
detector (docs/benchmarks.md, "int8 detector"): the same white-cell AP on CBC, 14-16% less
detection time, and not the same detections (an option to check on a lab's own fields).

Why no NNCF (OpenVINO's own quantizer, with accuracy-aware tuning): one more large
dependency for the same QDQ graph; onnxruntime is already the export extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from leukoscope.bundle import BundleError
from leukoscope.inference.int8_cpu import WEIGHT_BITS
from leukoscope.inference.rcnn_glue import RcnnSettings, model_batch
from leukoscope.inference.slide.reader import recorded_um_per_px
from leukoscope.io import ImageDecodeError, load_image
from leukoscope.preprocessing import Preprocessing, over_views

if TYPE_CHECKING:
    from leukoscope.evaluation.ood import OodStats

#: A single-cell image (and the scale its file records) framed for the classifier's window
#: (:func:`leukoscope.cell_window.single_cell_framer`).
Framer = Callable[[Image.Image, "float | None"], Image.Image]
#: Calibration images used at most (the ranges settle after a few hundred).
MAX_CALIBRATION_IMAGES = 512
#: Fewer than this gives ranges that one odd image decides.
MIN_CALIBRATION_IMAGES = 16
#: Images per calibration batch.
CALIBRATION_BATCH = 32
#: What an int8 export record says of the bundle's recorded metrics (they were measured before the export).
METRICS_NOTE = ("bundle.json's metrics are the float model's, measured before this export; `leukoscope evaluate "
                "--backend onnxruntime` scores this graph")
#: Fields used at most to calibrate a detector (each gives one or more whole tiles: ranges settle sooner).
MAX_DETECTOR_CALIBRATION_FIELDS = 64


def calibration_paths(data: str | Path, limit: int = MAX_CALIBRATION_IMAGES, *,
                      what: str = "images like the ones the model will classify") -> list[Path]:
    """Up to ``limit`` image paths of ``data`` (a folder, class folders or a CSV manifest), spread
    evenly over the list (so over the classes of a class-folder tree), in a fixed order. ``what``:
    what they should be, for the error when there are too few."""
    from leukoscope.inference.export_check import images_and_labels

    paths, _ = images_and_labels(data)
    if len(paths) < MIN_CALIBRATION_IMAGES:
        raise BundleError(f"{data}: {len(paths)} calibration images; int8 calibration needs at least "
                          f"{MIN_CALIBRATION_IMAGES} {what}")
    if len(paths) > limit:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit).round()]
    return paths


def detector_calibration_paths(data: str | Path) -> list[Path]:
    """:func:`calibration_paths` for a detector: a folder of fields. A VOC dataset's root is refused:
    its images span its splits, the scored ones included (calibrate on one split's images, e.g.
    ``cbc/Training/Images``, and ``--check`` another)."""
    root = Path(data)
    if root.is_dir() and (root / "Annotations").is_dir() and _is_one_of_several_splits(root):
        # one split of a dataset kept as split folders (cbc/Training): its images, which --check never scores
        images = next((root / name for name in ("Images", "JPEGImages") if (root / name).is_dir()), None)
        if images is None:
            raise BundleError(f"{data} is a VOC split without an Images or JPEGImages folder: give its images' folder")
        data = images
    elif root.is_dir() and ((root / "Annotations").is_dir() or any(root.glob("*/Annotations"))):
        raise BundleError(f"{data} is a VOC dataset: its images include every split, the ones --check scores "
                          f"too; calibrate on one split's images (a split folder such as cbc/Training, or a folder "
                          f"of the training images alone)")
    return calibration_paths(data, MAX_DETECTOR_CALIBRATION_FIELDS,
                             what="fields like the ones the detector will see")


def _is_one_of_several_splits(folder: Path) -> bool:
    """Whether a VOC folder sits beside other VOC folders (``cbc/{Training,Validation,Testing}``): a split of
    its own, rather than a whole dataset that a detector's training splits (one with ``ImageSets`` names its
    splits inside it)."""
    folder = folder.resolve()
    if (folder / "ImageSets").is_dir():
        return False
    return any(other != folder and (other / "Annotations").is_dir() for other in folder.parent.iterdir())


class _Reader:
    """onnxruntime's CalibrationDataReader protocol: ``get_next()`` -> ``{input: batch}`` or None:
    classifier images through the bundle's preprocessing, ``CALIBRATION_BATCH`` at a time."""

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing, input_name: str,
                 progress: Callable[..., None] | None, frame: Framer | None = None) -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing
        self.frame = frame  # single-cell images cut to the classifier's window, as predict gives them
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
                image = load_image(path)
                if self.frame is not None:
                    image = self.frame(image, recorded_um_per_px(path))
                pixels.append(self.preprocessing.pixels(image))
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


class _TileReader:
    """The same protocol for a detector's dense graph: each field as ``leukoscope analyze`` gives it
    to the network (:meth:`SmearAnalyzer.prepare`: resampled to the detector's scale, cut into
    tiles; then the model's transform, :func:`~leukoscope.inference.rcnn_glue.model_batch`), one tile
    per batch (tiles differ in size)."""

    def __init__(self, paths: Sequence[Path], analyzer: Any, settings: RcnnSettings, input_name: str,
                 progress: Callable[..., None] | None) -> None:
        self.paths = list(paths)
        self.analyzer = analyzer
        self.settings = settings
        self.input_name = input_name
        self.progress = progress
        self.position = 0
        self.used = 0
        self.tiles: list[Any] = []

    def get_next(self) -> dict[str, np.ndarray] | None:
        while not self.tiles and self.position < len(self.paths):
            path = self.paths[self.position]
            self.position += 1
            try:
                field = self.analyzer.prepare(load_image(path, max_pixels=self.analyzer.max_pixels))
            except (ImageDecodeError, OSError):
                continue
            self.tiles = [pixels for _, pixels in field.tiles]
            self.used += 1
            if self.progress is not None:
                self.progress()
        if not self.tiles:
            return None
        batch, _ = model_batch([self.tiles.pop(0)], self.settings)
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.position = 0
        self.tiles = []


def _quantizer() -> Any:
    try:
        from onnxruntime import quantization
        from onnxruntime.quantization import shape_inference
    except ImportError:
        raise BundleError("int8 export needs onnxruntime's quantizer: pip install 'leukoscope[onnx]'") from None
    return quantization, shape_inference


def _quantize_static(graph: Path, out: Path, reader: "_Reader | _TileReader", total: int) -> None:
    """``graph`` -> int8 QDQ ``out`` with activation ranges from ``reader`` (weights per channel)."""
    quantization, shape_inference = _quantizer()
    prepared = out.with_name(out.name + ".pre.tmp")
    try:
        # Shape inference and graph folding first, as onnxruntime advises for static quantization.
        shape_inference.quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_static(str(prepared), str(out), reader, quant_format=quantization.QuantFormat.QDQ,
                                     per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8,
                                     calibrate_method=quantization.CalibrationMethod.MinMax, reduce_range=True)
    finally:
        prepared.unlink(missing_ok=True)
    if reader.used < MIN_CALIBRATION_IMAGES:
        out.unlink(missing_ok=True)
        raise BundleError(f"only {reader.used} of the {total} calibration images could be read; int8 "
                          f"calibration needs at least {MIN_CALIBRATION_IMAGES}")


def quantize_graph(graph: Path, out: Path, paths: Sequence[Path], preprocessing: Preprocessing,
                   input_name: str, progress: Callable[..., None] | None = None,
                   frame: Framer | None = None) -> dict[str, Any]:
    """Write the int8 (QDQ) version of float classifier graph ``graph`` to ``out``, calibrated on
    ``paths`` (each through ``frame`` first when given); returns what ``bundle.json``'s export record says."""
    _quantizer()
    import onnxruntime

    reader = _Reader(paths, preprocessing, input_name, progress, frame)
    _quantize_static(graph, out, reader, len(paths))
    return {"precision": "int8", "quantizer": f"onnxruntime.quantization {onnxruntime.__version__}: static, QDQ, "
            "weights int8 per channel (7-bit range), activations uint8 per tensor, MinMax ranges",
            "weight_bits": WEIGHT_BITS, "calibration_images": reader.used, "metrics_note": METRICS_NOTE}


def int8_ood_thresholds(float_graph: Path, int8_graph: Path, paths: Sequence[Path], preprocessing: Preprocessing,
                        input_name: str, stats: "OodStats", frame: Framer | None = None) -> dict[str, Any]:
    """The out-of-distribution flag's thresholds for the int8 graph (``export.ood_thresholds``).

    The flag's statistics and thresholds were fitted on the float model's embeddings; int8 moves
    them: the shipped classifier's int8 graph scored its in-domain test cells about 2.6 higher
    (Mahalanobis, median), so the float threshold flagged 13% of them instead of 4%, while the
    scores kept their order (AUROC on BCCD 0.959 against 0.963). Both graphs score the calibration
    images; each method's int8 scores are fitted as a line of the float ones (least squares;
    correlation 0.98 on that classifier) and its threshold is carried over that line, so the int8
    graph flags the share of images the float model flags. A method whose scores do not rise together
    (slope not positive) keeps its float threshold, with the reason recorded."""
    float_scores, int8_scores = _graph_scores((float_graph, int8_graph), paths, preprocessing, input_name, stats,
                                              frame)
    thresholds: dict[str, float] = {}
    fits: dict[str, Any] = {}
    for method, threshold in stats.thresholds.items():
        x, y = float_scores[method], int8_scores[method]
        slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (np.nan, np.nan)
        correlation = float(np.corrcoef(x, y)[0, 1]) if np.ptp(x) > 0 and np.ptp(y) > 0 else float("nan")
        if not (np.isfinite(slope) and slope > 0):
            fits[method] = "kept the float threshold: the int8 scores do not rise with the float ones"
            continue
        thresholds[method] = float(slope * threshold + intercept)
        fits[method] = {"slope": round(float(slope), 6), "intercept": round(float(intercept), 6),
                        "correlation": round(correlation, 4)}
    return {"ood_thresholds": thresholds, "ood_threshold_fit": fits}


def _graph_scores(graphs: Sequence[Path], paths: Sequence[Path], preprocessing: Preprocessing, input_name: str,
                  stats: "OodStats", frame: Framer | None = None) -> list[dict[str, np.ndarray]]:
    """Per ONNX classifier graph (outputs: logits, embedding), each OOD method's scores of ``paths``,
    each image decoded once for all the graphs."""
    import onnxruntime

    sessions = [onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"]) for graph in graphs]
    reader = _Reader(paths, preprocessing, input_name, None, frame)
    outputs: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in sessions]
    while (batch := reader.get_next()) is not None:
        for session, out in zip(sessions, outputs):
            # Averaged over the bundle's test-time views, as the graph's scores are when it runs.
            logits, embedding = over_views(lambda views, s=session: tuple(s.run(["logits", "embedding"],
                                                                               {input_name: views})),
                                           batch[input_name], preprocessing.views)
            out.append((logits, embedding))
    if not outputs[0]:
        raise BundleError("none of the calibration images could be read to set the int8 graph's OOD thresholds")
    scores = []
    for out in outputs:
        logits, embeddings = (np.concatenate(part) for part in zip(*out))
        scores.append({method: np.asarray(stats.scores(logits, embeddings, method), dtype=np.float64)
                       for method in stats.thresholds})
    return scores


def quantize_detector_graphs(dense: Path, dense_out: Path, box: Path, box_out: Path, paths: Sequence[Path],
                             detector: Any, settings: RcnnSettings, input_name: str,
                             progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Write int8 versions of a Faster R-CNN's exported graphs (module docstring): ``dense`` to
    ``dense_out``, calibrated on the fields ``paths`` as analysis gives them to ``detector``'s network
    (:class:`_TileReader`), and ``box`` to ``box_out``; returns what ``bundle.json``'s export record
    says about them. ``detector``: the :class:`~leukoscope.inference.detector.CellDetector` of the
    float model (torch)."""
    quantization, shape_inference = _quantizer()
    import onnxruntime

    from leukoscope.inference.smear import SmearAnalyzer

    reader = _TileReader(paths, SmearAnalyzer(detector, None), settings, input_name, progress)
    _quantize_static(dense, dense_out, reader, len(paths))
    prepared = box_out.with_name(box_out.name + ".pre.tmp")
    try:
        shape_inference.quant_pre_process(str(box), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_dynamic(str(prepared), str(box_out), weight_type=quantization.QuantType.QInt8,
                                      op_types_to_quantize=["Gemm", "MatMul"], reduce_range=True)
    finally:
        prepared.unlink(missing_ok=True)
    return {"precision": "int8",
            "quantizer": f"onnxruntime.quantization {onnxruntime.__version__}: dense graph static, QDQ, weights int8 "
                         "per channel (7-bit range), activations uint8 per tensor, MinMax ranges; box graph dynamic, "
                         "fully connected weights int8 (7-bit range; RoIAlign float)",
            "weight_bits": WEIGHT_BITS, "calibration_images": reader.used, "metrics_note": METRICS_NOTE}
