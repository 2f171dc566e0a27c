"""What runs a classifier's network: torch (the bundle's weights), onnxruntime or OpenVINO (its exported graph).

:class:`~leukoscope.inference.predictor.CellClassifier` keeps everything around the
network (the bundle's preprocessing, temperature, uncertain threshold, OOD score) and
asks a runtime only for the uncalibrated logits, and the penultimate embeddings when the
OOD score needs them, of a batch of uint8 pixels. Every runtime turns the pixels into the
model's input with the same :meth:`Preprocessing.model_input`, so there is one
preprocessing path whichever runs the network.

Which backend can run which graph: an ONNX graph (``model.onnx``, float or int8) runs on
onnxruntime or OpenVINO (which reads ONNX itself); an OpenVINO IR (``model.xml``) on
OpenVINO only; torch runs the bundle's float weights, always there. ``auto`` takes the
first of :data:`AUTO_ORDER` that the bundle has a graph for and this install has:
OpenVINO, then onnxruntime, then torch (the order measured fastest on this project's CPU
for the shipped classifier, docs/benchmarks.md "Backends and int8"). The graph runtimes
import no torch.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from leukoscope.bundle import ONNX_FILE, OPENVINO_FILE, BundleError, BundleInfo, check_export_matches
from leukoscope.inference.int8_cpu import warn_if_full_range
from leukoscope.preprocessing import Preprocessing, batched_logits, batched_outputs, over_views
from leukoscope.pretrained import export_advice

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
#: ``auto``'s preference, fastest first (measured: docs/benchmarks.md).
AUTO_ORDER = ("openvino", "onnxruntime", "torch")
#: Which backends run a graph of each export format.
RUNS_FORMAT = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",)}
#: What installs each backend.
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}
#: Images per onnxruntime / OpenVINO call (as batched_logits' batches).
BATCH = 64


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads (process-wide) when ``threads`` is given, for a model that runs on
    torch; else torch's default."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def backend_available(backend: str) -> bool:
    """Is ``backend``'s package installed (torch always is)?"""
    if backend == "onnxruntime":
        return onnxruntime_available()
    if backend == "openvino":
        return openvino_available()
    return backend == "torch"


class Runtime:
    """Logits (and embeddings) of uint8 pixels ``(N, 3, S, S)``; ``backend`` names what runs them."""

    backend = ""
    model: Any = None
    """The torch model (Grad-CAM reads it); None when another runtime runs the network."""

    def outputs(self, pixels: np.ndarray, embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError


class TorchRuntime(Runtime):
    """The bundle's torch model (or classical model), as before runtimes existed."""

    backend = "torch"

    def __init__(self, model: Any, preprocessing: Preprocessing, device: "str | torch.device" = "cpu") -> None:
        import torch

        self.model = model
        self.preprocessing = preprocessing
        self.device = torch.device(device)

    def outputs(self, pixels: np.ndarray, embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        if embeddings:
            return batched_outputs(self.model, pixels, self.preprocessing, self.device)
        return batched_logits(self.model, pixels, self.preprocessing, self.device), None


def no_embedding_output(backend: str) -> str:
    """Why an exported graph gives no OOD score (one exported before the embedding was an output)."""
    return (f"the exported graph has no embedding output, so the OOD score is unavailable on {backend}: re-export "
            f"the bundle with this leukoscope, or use --backend torch")


class GraphRuntime(Runtime):
    """An exported graph (``record``: the bundle's ``export`` entry): the batching around one
    backend's ``_infer`` of a normalised float batch."""

    record: dict[str, Any]
    preprocessing: Preprocessing

    @property
    def output_names(self) -> list[str]:
        return [str(output["name"]) for output in self.record["outputs"]]

    @property
    def has_embeddings(self) -> bool:
        return "embedding" in self.output_names

    def _infer(self, inputs: np.ndarray, wanted: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def outputs(self, pixels: np.ndarray, embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        if embeddings and not self.has_embeddings:
            # Never a made-up score: the caller asked for the OOD score and this graph cannot give it.
            raise BundleError(no_embedding_output(self.backend))
        wanted = ["logits", "embedding"] if embeddings else ["logits"]
        chunks: list[list[np.ndarray]] = [[] for _ in wanted]

        def infer(batch: np.ndarray) -> tuple[np.ndarray, ...]:
            return tuple(self._infer(np.asarray(self.preprocessing.model_input(batch)), wanted))

        step = max(1, BATCH // self.preprocessing.views)  # images per call: each brings its views
        for start in range(0, len(pixels), step):
            # The bundle's test-time views around the graph, as batched_outputs does around the torch model.
            results = over_views(infer, np.asarray(pixels[start:start + step]), self.preprocessing.views)
            for chunk, result in zip(chunks, results):
                chunk.append(result)
        if not chunks[0]:
            raise ValueError("no images to score")
        joined = [np.concatenate(chunk) for chunk in chunks]
        return joined[0], joined[1] if embeddings else None


class OnnxRuntime(GraphRuntime):
    """The bundle's exported graph in an onnxruntime session (CPUExecutionProvider)."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, record: dict[str, Any], preprocessing: Preprocessing,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.preprocessing = preprocessing
        self.record = record
        self.input_name = str(record["inputs"][0]["name"])
        options = ort.SessionOptions()
        if threads:  # else onnxruntime's default (all cores)
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise BundleError(f"{path}: cannot load the exported graph: {str(exc)[:300]}") from None

    def _infer(self, inputs: np.ndarray, wanted: list[str]) -> list[np.ndarray]:
        return self.session.run(wanted, {self.input_name: inputs})


class OpenvinoRuntime(GraphRuntime):
    """The bundle's exported graph (OpenVINO IR, or the ONNX graph, which OpenVINO reads too) compiled
    for OpenVINO's CPU plugin.

    ``INFERENCE_PRECISION_HINT`` is f32: on CPUs with bfloat16 units (AMX, AVX512-BF16) OpenVINO
    would otherwise run a float graph in bfloat16, about 3 significant digits, and the parity with
    the torch model would be lost silently. An int8 graph runs its quantized layers in int8 either
    way. ``PERFORMANCE_HINT`` LATENCY: one stream, all the threads on each call (calls are batches)."""

    backend = "openvino"

    def __init__(self, path: str | Path, record: dict[str, Any], preprocessing: Preprocessing,
                 threads: int | None = None) -> None:
        import openvino as ov

        self.preprocessing = preprocessing
        self.record = record
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:  # else OpenVINO's default (all cores)
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types for bad files
            raise BundleError(f"{path}: cannot load the exported graph on OpenVINO: {str(exc)[:300]}") from None
        self._local = threading.local()  # an infer request serves one thread at a time (the service has several)

    def _infer(self, inputs: np.ndarray, wanted: list[str]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer([inputs])
        return [request.get_tensor(name).data.copy() for name in wanted]


def runnable_backends(info: BundleInfo) -> tuple[str, ...]:
    """The backends that can run this bundle's exported graph (none without one)."""
    return RUNS_FORMAT.get(str(info.export.get("format")), ()) if info.export is not None else ()


def choose_backend(backend: str, info: BundleInfo, directory: str | Path, device: str = "cpu") -> str:
    """``torch``, ``onnxruntime`` or ``openvino`` for ``backend`` (one of :data:`BACKENDS`) and this
    bundle; a clear error when the bundle or the install cannot run the one asked for. ``auto`` on a GPU
    ``device`` is torch (the exported graphs run on the CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    runnable = runnable_backends(info)
    if backend == "auto" and str(device) != "cpu":
        return "torch"
    if backend == "auto":
        return next((name for name in AUTO_ORDER if name in runnable and backend_available(name)), "torch")
    if backend == "torch":
        return backend
    if info.framework != "torch":
        raise BundleError(f"{directory} is a classical (scikit-learn) model: it runs only on torch's path "
                          f"(--backend torch); export of classical models is not supported yet")
    if info.export is None:
        graph, fmt = ("ONNX graph", "onnx") if backend == "onnxruntime" else ("exported graph", "openvino")
        raise BundleError(f"{directory} has no {graph}: {export_advice(directory, fmt)}, or use --backend torch")
    if backend not in runnable:
        raise BundleError(f"{directory} holds an {info.export.get('format')} graph, which {backend} cannot run: "
                          f"use --backend {' or '.join(runnable)} (or torch), or export it with --format onnx")
    if not backend_available(backend):
        raise BundleError(f"--backend {backend} needs {backend}: pip install 'leukoscope[{EXTRAS[backend]}]'")
    return backend


def load_runtime(directory: str | Path, info: BundleInfo, backend: str = "torch", device: str = "cpu",
                 threads: int | None = None) -> Runtime:
    """The runtime ``backend`` chooses for the classifier bundle in ``directory`` (a resolved folder)."""
    chosen = choose_backend(backend, info, directory, device)
    if chosen == "torch":
        from leukoscope.bundle import load_bundle

        use_threads(threads)
        model, _ = load_bundle(directory, device, task="classify")
        return TorchRuntime(model, info.preprocessing, device)
    if str(device) != "cpu":
        raise ValueError(f"the {chosen} backend runs on the CPU; device {device!r} needs --backend torch")
    assert info.export is not None and info.preprocessing is not None
    default = OPENVINO_FILE if info.export.get("format") == "openvino" else ONNX_FILE
    path = Path(directory) / str(info.export.get("file", default))
    if not path.is_file():
        raise BundleError(f"{directory}: bundle.json records an exported graph but {path.name} is missing")
    check_export_matches(directory, info)
    warn_if_full_range(directory, info.export)
    runtime_class = OpenvinoRuntime if chosen == "openvino" else OnnxRuntime
    return runtime_class(path, info.export, info.preprocessing, threads)
