"""Score a bundle on any labelled dataset whose classes the model knows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from leukoscope.data.dataset import decode_manifest
from leukoscope.data.manifest import DatasetError
from leukoscope.data.readers import read_dataset
from leukoscope.data.splits import Split
from leukoscope.engine.trainer import predict_logits
from leukoscope.evaluation import evaluate_logits
from leukoscope.inference.bundle import load_bundle
from leukoscope.progress import counter_callback, progress_bar


def evaluate_bundle(
    bundle: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    split_file: str | Path | None = None,
    subset: str = "test",
    on_corrupt: str = "skip",
    device: str = "cpu",
    show_progress: bool = True,
) -> dict:
    """Write metrics.json, figures and report.html for ``bundle`` on ``data`` into ``out_dir``."""
    model, info = load_bundle(bundle, device)
    manifest = read_dataset(data, require_labels=True)
    if split_file is not None:
        part = Split.load(split_file).manifest(subset)
        wanted = {s.path.resolve() for s in part}
        manifest = manifest.filter([s.path.resolve() in wanted for s in manifest])
        if len(manifest) == 0:
            raise DatasetError(f"no image of {data} is in the {subset!r} part of {split_file}")
    manifest = manifest.with_classes(info.classes)  # fails clearly on classes the model does not know
    preprocess = None
    if info.preprocessing.segmentation:
        from leukoscope.segmentation import Segmenter

        preprocess = Segmenter(method=info.preprocessing.segmentation)
    with progress_bar(len(manifest), "decoding", enabled=show_progress) as update:
        images, kept, report = decode_manifest(manifest, info.preprocessing.image_size, on_corrupt=on_corrupt,
                                               preprocess=preprocess, progress=counter_callback(update))
    if info.framework == "sklearn":  # classical model: features from the uint8 images
        logits = model.predict_logits(images) / info.temperature
    else:
        logits = predict_logits(model, images, torch.device(device)) / info.temperature
    notes = [f"Bundle {Path(bundle).resolve()} scored on {Path(data).resolve()}"
             + (f" ({subset} part of {split_file})" if split_file else "") + "."]
    if info.temperature != 1.0:
        notes.append(f"Logits divided by the bundle's temperature {info.temperature:.3f} (fitted on validation).")
    if report.skipped:
        notes.append(f"{len(report.skipped)} unreadable image(s) skipped: "
                     + "; ".join(f"{s['path']} ({s['error']})" for s in report.skipped[:10]))
    return evaluate_logits(
        np.asarray(kept.targets), logits, info.classes, Path(out_dir),
        title=f"{info.model_name} on {Path(data).name}", notes=notes,
        extra={"bundle": str(Path(bundle).resolve()), "data": str(Path(data).resolve()),
               "skipped_images": report.skipped},
    )
