"""What runs a classifier's network: torch (the bundle's weights) or onnxruntime (its exported graph).

:class:`~leukoscope.inference.predictor.CellClassifier` keeps everything around the
network (the bundle's preprocessing, temperature, uncertain threshold, OOD score) and
asks a runtime only for the uncalibrated logits, and the penultimate embeddings when the
OOD score needs them, of a batch of uint8 pixels. Both runtimes turn the pixels into the
model's input with the same :meth:`Preprocessing.model_input`, so there is one
preprocessing path whichever runs the network.

``auto`` picks onnxruntime when the bundle has an exported graph (``leukoscope export``)
and onnxruntime is installed, else torch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leukoscope.bundle import ONNX_FILE, BundleError, BundleInfo, load_bundle
from leukoscope.preprocessing import Preprocessing, batched_logits, batched_outputs

BACKENDS = ("auto", "torch", "onnxruntime")
#: Images per onnxruntime call (as batched_logits' batches).
BATCH = 64


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


class Runtime:
    """Logits (and embeddings) of uint8 pixels ``(N, 3, S, S)``; ``backend`` names what runs them."""

    backend = ""
    model: Any = None
    """The torch model (Grad-CAM reads it); None when another runtime runs the network."""

    def outputs(self, pixels: torch.Tensor, embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError


class TorchRuntime(Runtime):
    """The bundle's torch model (or classical model), as before runtimes existed."""

    backend = "torch"

    def __init__(self, model: Any, preprocessing: Preprocessing, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.preprocessing = preprocessing
        self.device = torch.device(device)

    def outputs(self, pixels: torch.Tensor, embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        if embeddings:
            return batched_outputs(self.model, pixels, self.preprocessing, self.device)
        return batched_logits(self.model, pixels, self.preprocessing, self.device), None


class OnnxRuntime(Runtime):
    """The bundle's exported graph in an onnxruntime session (CPUExecutionProvider)."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, record: dict[str, Any], preprocessing: Preprocessing,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.preprocessing = preprocessing
        self.record = record
        self.input_name = str(record["inputs"][0]["name"])
        self.output_names = [str(output["name"]) for output in record["outputs"]]
        options = ort.SessionOptions()
        if threads:  # else onnxruntime's default (all cores)
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise BundleError(f"{path}: cannot load the exported graph: {str(exc)[:300]}") from None

    @property
    def has_embeddings(self) -> bool:
        return "embedding" in self.output_names

    def outputs(self, pixels: torch.Tensor, embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        if embeddings and not self.has_embeddings:
            # Never a made-up score: the caller asked for the OOD score and this graph cannot give it.
            raise BundleError("the exported graph has no embedding output, so the OOD score is unavailable on "
                              "onnxruntime: re-export the bundle with this leukoscope, or use --backend torch")
        wanted = ["logits", "embedding"] if embeddings else ["logits"]
        chunks: list[list[np.ndarray]] = [[] for _ in wanted]
        for start in range(0, len(pixels), BATCH):
            inputs = self.preprocessing.model_input(pixels[start:start + BATCH]).float().numpy()
            for chunk, result in zip(chunks, self.session.run(wanted, {self.input_name: inputs})):
                chunk.append(result)
        if not chunks[0]:
            raise ValueError("no images to score")
        joined = [np.concatenate(chunk) for chunk in chunks]
        return joined[0], joined[1] if embeddings else None


def choose_backend(backend: str, info: BundleInfo, directory: str | Path) -> str:
    """``torch`` or ``onnxruntime`` for ``backend`` (one of :data:`BACKENDS`) and this bundle; a clear
    error when the bundle or the install cannot run the one asked for."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    exported = info.export is not None and info.export.get("format") == "onnx"
    if backend == "auto":
        return "onnxruntime" if exported and onnxruntime_available() else "torch"
    if backend == "onnxruntime":
        if info.framework != "torch":
            raise BundleError(f"{directory} is a classical (scikit-learn) model: it runs only on torch's path "
                              f"(--backend torch); ONNX export of classical models is not supported yet")
        if not exported:
            raise BundleError(f"{directory} has no ONNX graph: run `leukoscope export --bundle {directory} "
                              f"--format onnx` first, or use --backend torch")
        if not onnxruntime_available():
            raise BundleError("--backend onnxruntime needs onnxruntime: pip install 'leukoscope[onnx]'")
    return backend


def load_runtime(directory: str | Path, info: BundleInfo, backend: str = "torch", device: str = "cpu",
                 threads: int | None = None) -> Runtime:
    """The runtime ``backend`` chooses for the classifier bundle in ``directory`` (a resolved folder)."""
    chosen = choose_backend(backend, info, directory)
    if chosen == "torch":
        model, _ = load_bundle(directory, device, task="classify")
        return TorchRuntime(model, info.preprocessing, device)
    if str(device) != "cpu":
        raise ValueError(f"the onnxruntime backend runs on the CPU; device {device!r} needs --backend torch")
    assert info.export is not None and info.preprocessing is not None
    path = Path(directory) / str(info.export.get("file", ONNX_FILE))
    if not path.is_file():
        raise BundleError(f"{directory}: bundle.json records an exported graph but {path.name} is missing")
    return OnnxRuntime(path, info.export, info.preprocessing, threads)
