"""Does an exported bundle answer as its torch model does? ``leukoscope export --check DATA``.

The torch model and the exported graph (on ``backend``: ``auto`` takes the one
``predict`` would) classify the same images through the same :class:`CellClassifier`
(so the same preprocessing, temperature and threshold); compared are the calibrated
probabilities (largest absolute difference), the top classes (agreement) and, for images
whose label the bundle knows, the accuracy of each and its change (an int8 graph's
price). Labels the bundle does not know (a class it was not trained on) are left out of
the accuracies; a dataset with a subset of the bundle's classes is scored on that subset.
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
from leukoscope.scale import lent_run_scale


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
    accuracy_export: float | None
    backend: str = "onnxruntime"
    """What ran the exported graph."""

    @property
    def accuracy_change(self) -> float | None:
        """Exported minus torch accuracy, in percentage points."""
        if self.accuracy_torch is None or self.accuracy_export is None:
            return None
        return 100 * (self.accuracy_export - self.accuracy_torch)

    def lines(self) -> list[str]:
        text = [f"parity on {self.images} images: largest |p_torch - p_{self.backend}| {self.max_abs_diff:.2e}, "
                f"top class agreement {100 * self.agreement:.2f}%"]
        if self.labelled:
            text.append(f"accuracy on {self.labelled} labelled images: torch {self.accuracy_torch:.4f}, "
                        f"{self.backend} {self.accuracy_export:.4f} (change {self.accuracy_change:+.2f} points)")
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


def check_data_readable(data: str | Path) -> None:
    """Refuse ``data`` for ``export --check`` / ``--calibration`` before the export is written: a manifest that
    cannot be read, or whose files are all missing, failed only after the graph was written, and left a complete
    export folder that blocked the rerun (decoding is left to the check itself)."""
    paths, _ = images_and_labels(data)
    if not paths:
        raise DatasetError(f"{data}: no images found")
    if not any(Path(path).is_file() for path in paths):
        raise DatasetError(f"{data}: none of its {len(paths)} images exist (e.g. {paths[0]}); fix the paths")


def compare_backends(bundle: str | Path, data: str | Path, *, backend: str = "auto", batch_size: int = 32,
                     threads: int | None = None, progress: Callable[..., None] | None = None, frame: bool = False,
                     um_per_px: float | None = None) -> ParityReport:
    """Classify ``data`` with the torch model and the exported graph of ``bundle`` on ``backend``. ``frame``:
    single-cell images framed for a classifier of a physical window as ``leukoscope predict`` frames them (at
    ``um_per_px``, else their own scale or the images' together); else taken as they are (crops already cut)."""
    paths, labels = images_and_labels(data)
    run = lent_run_scale(paths, um_per_px) if frame else None
    exported = CellClassifier.from_bundle(bundle, backend=backend, threads=threads)
    if exported.backend == "torch":
        raise ValueError(f"{bundle}: no exported graph this install can run (backend {backend!r}), nothing to "
                         f"compare with torch")
    results: list[list[Prediction]] = []
    for classifier in (CellClassifier.from_bundle(bundle, backend="torch"), exported):
        results.append(classifier.predict_paths(paths, batch_size=batch_size, progress=progress, frame=frame,
                                                um_per_px=um_per_px, run_um_per_px=run))
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
                        accuracy[0], accuracy[1], exported.backend)
