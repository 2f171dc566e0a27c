"""Does an exported bundle answer as its torch model does? ``leukoscope export --check DATA``.

Both backends classify the same images through the same :class:`CellClassifier` (so the
same preprocessing, temperature and threshold); compared are the calibrated probabilities
(largest absolute difference), the top classes (agreement) and, for images whose label
the bundle knows, the accuracy of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from leukoscope.data.manifest import DatasetError
from leukoscope.data.readers import read_dataset
from leukoscope.inference.predict_files import collect_images
from leukoscope.inference.predictor import CellClassifier, Prediction


@dataclass
class ParityReport:
    images: int
    """Images both backends could read."""
    max_abs_diff: float
    """Largest absolute difference of any class probability."""
    agreement: float
    """Share of images with the same top class."""
    labelled: int
    """Images with a label the bundle knows (the accuracies' denominator)."""
    accuracy_torch: float | None
    accuracy_onnx: float | None

    def lines(self) -> list[str]:
        text = [f"parity on {self.images} images: largest |p_torch - p_onnx| {self.max_abs_diff:.2e}, "
                f"top class agreement {100 * self.agreement:.2f}%"]
        if self.labelled:
            text.append(f"accuracy on {self.labelled} labelled images: torch {self.accuracy_torch:.4f}, "
                        f"onnxruntime {self.accuracy_onnx:.4f}")
        else:
            text.append("no labels the bundle knows: accuracy not computed")
        return text


def images_and_labels(data: str | Path) -> tuple[list[Path], list[str | None]]:
    """A class-folder tree or CSV manifest (labelled where it says), or a folder of images (unlabelled)."""
    try:
        manifest = read_dataset(data)
    except DatasetError as exc:
        if "lie directly in the folder" not in str(exc):
            raise
        paths = collect_images([data])
        return paths, [None] * len(paths)
    return [s.path for s in manifest], [s.label for s in manifest]


def compare_backends(bundle: str | Path, data: str | Path, *, batch_size: int = 32, threads: int | None = None,
                     progress: Callable[..., None] | None = None) -> ParityReport:
    """Classify ``data`` with the torch model and the ONNX graph of the exported ``bundle``."""
    paths, labels = images_and_labels(data)
    results: list[list[Prediction]] = []
    for backend in ("torch", "onnxruntime"):
        classifier = CellClassifier.from_bundle(bundle, backend=backend, threads=threads)
        results.append(classifier.predict_paths(paths, batch_size=batch_size, progress=progress))
    torch_rows, onnx_rows = results
    readable = [i for i, (a, b) in enumerate(zip(torch_rows, onnx_rows)) if a.error is None and b.error is None]
    if not readable:
        raise DatasetError(f"{data}: none of its {len(paths)} images could be read")
    classes = list(classifier.classes)
    p_torch = np.array([[torch_rows[i].probabilities[c] for c in classes] for i in readable])
    p_onnx = np.array([[onnx_rows[i].probabilities[c] for c in classes] for i in readable])
    same = [torch_rows[i].top_class == onnx_rows[i].top_class for i in readable]
    known = [i for i in readable if labels[i] in classes]
    accuracy = [float(np.mean([rows[i].top_class == labels[i] for i in known])) if known else None
                for rows in (torch_rows, onnx_rows)]
    return ParityReport(len(readable), float(np.abs(p_torch - p_onnx).max()), float(np.mean(same)), len(known),
                        accuracy[0], accuracy[1])
