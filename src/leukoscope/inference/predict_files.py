"""Batch prediction over files and folders, with CSV/JSON output and Grad-CAM overlays."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from rich.markup import escape

from leukoscope.data.manifest import DatasetError
from leukoscope.io import is_image_file, load_image
from leukoscope.progress import console, name_some, progress_bar

if TYPE_CHECKING:  # torch loads only once there is something to predict: input checks stay fast
    from leukoscope.inference.predictor import CellClassifier, Prediction


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand folders (recursively) into image files; keep explicit files as given."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if is_image_file(p))
            if not found:
                raise DatasetError(f"{item}: folder has no images (.jpg .png .bmp .tif)")
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise DatasetError(f"{item}: no such file or folder")
    return paths


def write_predictions(predictions: Sequence[Prediction], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [p.as_row() for p in predictions]
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=1))
    elif out.suffix.lower() == ".csv":
        fields = list(dict.fromkeys(key for row in rows for key in row))
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"{out}: output must end in .csv or .json")
    return out


def save_explanations(classifier: CellClassifier, predictions: Sequence[Prediction], out_dir: Path) -> list[Path]:
    """One Grad-CAM overlay PNG per readable image, for the predicted (top) class, with
    a colour bar; flat (uninformative) maps carry a note and are named in a warning."""
    from leukoscope.inference.explain import grad_cam, heatmap_figure, is_flat_heatmap, overlay_heatmap
    from leukoscope.transforms import letterbox

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    flat: list[str] = []
    readable = [p for p in predictions if p.error is None]
    with progress_bar(len(readable), "Grad-CAM") as update:
        for index, prediction in enumerate(readable):
            image = load_image(prediction.source)
            inputs = classifier.preprocess(image).unsqueeze(0).to(classifier.device)
            heatmap = grad_cam(classifier.model, inputs, classifier.classes.index(prediction.top_class))[0]
            shown = letterbox(image, max(classifier.image_size, 256))
            path = out_dir / f"{index:05d}_{Path(prediction.source).stem}_{prediction.top_class}.png"
            heatmap_figure(overlay_heatmap(shown, heatmap), heatmap, prediction.top_class).save(path)
            if is_flat_heatmap(heatmap):
                flat.append(path.name)
            written.append(path)
            update()
    if flat:
        console.print(f"[yellow]warning:[/yellow] {len(flat)} of {len(written)} Grad-CAM maps are flat (the model "
                      f"found no localised evidence; saved with a note): {escape(name_some(flat))}", soft_wrap=True)
    return written


def predict_to_file(
    bundle: str | Path,
    paths: Sequence[Path],
    out: Path,
    *,
    threshold: float | None = None,
    explain_dir: Path | None = None,
    batch_size: int = 32,
    backend: str = "torch",
    threads: int | None = None,
) -> list[Prediction]:
    """Classify ``paths`` with ``bundle`` on ``backend`` (:mod:`leukoscope.inference.runtime`) and write
    ``out``; with ``explain_dir``, Grad-CAM overlays (which need the torch model: ``auto`` then runs torch)."""
    import torch

    from leukoscope.inference.predictor import CellClassifier

    if out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"{out}: output must end in .csv or .json")
    if explain_dir is not None and backend == "onnxruntime":
        raise ValueError("Grad-CAM (--explain) needs the torch model: use --backend torch (or auto)")
    if explain_dir is not None:
        backend = "torch"
    classifier = CellClassifier.from_bundle(bundle, uncertain_threshold=threshold, backend=backend, threads=threads)
    if explain_dir is not None and classifier.info.framework != "torch":
        raise ValueError(f"Grad-CAM (--explain) is not available for {classifier.info.model_name}: it is a "
                         "classical model on hand-made features, with no convolutional layers to explain; "
                         "run without --explain")
    with progress_bar(len(paths), "predicting") as update:
        predictions = classifier.predict_paths(paths, batch_size=batch_size, progress=update)
    write_predictions(predictions, out)
    if explain_dir is not None:
        with torch.enable_grad():
            save_explanations(classifier, predictions, explain_dir)
    return predictions
