"""A cell classifier from field labels (multiple-instance learning).

Datasets such as all-taleqani label each *field* (224x224, several cells), not
each cell. Here every white cell of a field is located, cropped, and inherits
the field's label (the standard MIL baseline: instance = bag label); a cell
classifier is trained on the crops; a field is then classified from its cells
by averaging their log-probabilities (a geometric mean of the cell
probabilities). Its field-level accuracy is reported beside a whole-image
classifier trained with the same model, budget and field split.

Honesty rules kept:
- the split is made on *fields* (stratified, duplicate-aware) and every crop
  follows its field, so no field has cells in two splits (the crop's subject is
  its field);
- fields in which no cell was located are classified from the whole field (and
  counted in the report), never dropped from the test set.

Cells are located by colour segmentation (LAB k-means of the stain, connected
components) or by a detector bundle when one is given.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from leukoscope.data.manifest import DatasetError, Manifest, Sample
from leukoscope.data.readers import read_dataset
from leukoscope.data.splits import Split, make_split
from leukoscope.engine.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from leukoscope.io import ImageDecodeError, load_image
from leukoscope.engine.run_dir import new_run_dir, open_run
from leukoscope.progress import progress_bar, say
from leukoscope.tasks.mil_config import MilConfig

log = logging.getLogger(__name__)


def locate_cells_by_colour(image: Image.Image, *, min_area_fraction: float = 0.004, pad: float = 0.15,
                           max_cells: int = 16) -> list[tuple[int, int, int, int]]:
    """Boxes around the stained cells (LAB k-means mask, connected components), largest first."""
    from leukoscope.segmentation import cell_mask

    mask = cell_mask(image, "lab_kmeans")
    if not mask.any():
        return []
    # Close small gaps so a lobed nucleus gives one component, not several.
    mask = ndimage.binary_closing(mask, iterations=3)
    labels, n = ndimage.label(mask)
    width, height = image.size
    boxes = []
    for index, found in enumerate(ndimage.find_objects(labels), 1):
        if found is None:
            continue
        area = int((labels[found] == index).sum())
        if area < min_area_fraction * width * height:
            continue
        ys, xs = found
        w, h = xs.stop - xs.start, ys.stop - ys.start
        side = max(w, h) * (1 + 2 * pad)  # square crops, a margin of cytoplasm around the nucleus
        cx, cy = (xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2
        box = (max(0, int(cx - side / 2)), max(0, int(cy - side / 2)), min(width, int(math.ceil(cx + side / 2))),
               min(height, int(math.ceil(cy + side / 2))))
        boxes.append((area, box))
    boxes.sort(key=lambda item: -item[0])
    return [box for _, box in boxes[:max_cells]]


class CellLocator:
    """The white cells of a field as crops: colour segmentation by default; with a detector
    bundle, the crops smear analysis gives its classifier (the box plus its margin,
    :meth:`~leukoscope.inference.smear.SmearAnalyzer.crop_cell`), so a classifier trained
    here sees in ``analyze`` the same kind of crop it was trained on."""

    def __init__(self, detector: str | Path | None = None, **options: Any) -> None:
        self.analyzer = None
        self.options = options
        if detector is not None:
            from leukoscope.inference.smear import SmearAnalyzer

            self.analyzer = SmearAnalyzer(detector)

    def __call__(self, image: Image.Image) -> list[Image.Image]:
        if self.analyzer is None:
            return [image.crop(box) for box in locate_cells_by_colour(image, **self.options)]
        result = self.analyzer.analyze(image)
        return self.analyzer.cell_crops(image, result)


@dataclass
class CellDataset:
    manifest_csv: Path
    split_file: Path
    crops: dict[str, list[Path]]
    """Field image path -> its crops."""
    fields_without_cells: list[str] = field(default_factory=list)


def build_cell_dataset(field_split: Split, out_dir: Path, locator: CellLocator, *,
                       show_progress: bool = True) -> CellDataset:
    """Crop the located cells of every field; each crop inherits its field's label and split."""
    out_dir = Path(out_dir)
    rows, assignments = [], {}
    crops: dict[str, list[Path]] = {}
    empty: list[str] = []
    total = sum(len(samples) for samples in field_split.assignments.values())
    with progress_bar(total, "locating cells", enabled=show_progress) as update:
        for part, samples in field_split.assignments.items():
            cells: list[Sample] = []
            for number, sample in enumerate(samples):
                try:
                    image = load_image(sample.path)
                except ImageDecodeError as exc:
                    log.warning("skipping %s: %s", sample.path, exc)
                    update()
                    continue
                field_id = f"{part}-{number:05d}-{sample.path.stem}"
                cell_crops = locator(image)
                if not cell_crops:
                    empty.append(str(sample.path))
                paths = []
                for k, crop in enumerate(cell_crops):
                    path = out_dir / "cells" / part / str(sample.label) / f"{field_id}_c{k}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    crop.save(path)
                    paths.append(path)
                    cells.append(Sample(path, sample.label, field_id))
                    # absolute: a relative row is read against the CSV's folder (the run's, under output_root)
                    rows.append([str(path.resolve()), sample.label, field_id])
                crops[str(sample.path.resolve())] = paths
                update()
            assignments[part] = cells
    if not rows:
        raise DatasetError("no cell was located in any field")
    manifest_csv = out_dir / "cells.csv"
    with open(manifest_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject"])
        writer.writerows(rows)
    classes = sorted({row[1] for row in rows})
    split = Split(assignments, classes, {"from": "field split", "grouped_by_subject": True})
    split_file = split.save(out_dir / "cells_split.json")
    return CellDataset(manifest_csv, split_file, crops, empty)


def field_log_probabilities(classifier, field_images: Sequence[Path], crops: dict[str, list[Path]]) -> np.ndarray:
    """Per field: the mean log-probability of its cells (the whole field when it has none)."""
    out = []
    for path in field_images:
        cell_paths = crops.get(str(Path(path).resolve()), [])
        images = [load_image(p) for p in cell_paths] or [load_image(path)]
        probs = classifier.probabilities(images)
        out.append(np.log(np.clip(probs, 1e-7, 1.0)).mean(axis=0))
    return np.asarray(out)


@dataclass
class MilResult:
    out_dir: Path
    metrics: dict[str, Any]
    cell_bundle: Path
    field_bundle: Path | None

    # The names every task's result has (the CLI prints them).
    @property
    def run_dir(self) -> Path:
        return self.out_dir

    @property
    def bundle_dir(self) -> Path:
        return self.cell_bundle


def run_mil_from_config(config: MilConfig, *, run_dir: Path | None = None, resume: bool = False,
                        show_progress: bool = True) -> MilResult:
    """``leukoscope mil`` / ``train`` with a ``task: mil`` config: :func:`run_mil_experiment` in a run folder."""
    if resume:
        raise ValueError("a multiple-instance run cannot be resumed; start it again")
    if not config.data.path:
        raise DatasetError("no fields given: set data.path (labelled fields: class folders or a CSV manifest)")
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config.output_root,
                                                                   config.name or f"mil-{config.model.name}")
    with open_run(run_dir, config):
        return run_mil_experiment(
            config.data.path, run_dir, model=config.model.name, cell_size=config.model.cell_size,
            field_size=config.model.field_size, epochs=config.train.epochs, minutes=config.train.max_minutes,
            lr=config.train.lr, batch_size=config.train.batch_size, ratios=config.data.ratios,
            seed=config.data.split_seed, near_duplicates=config.data.near_duplicates,
            detector=config.locate.detector, compare_whole_image=config.compare.whole_image,
            whole_image_bundle=config.compare.bundle, class_map=config.data.class_map, show_progress=show_progress)


def run_mil_experiment(
    data: str | Path,
    out_dir: str | Path,
    *,
    model: str = "abas_cnn",
    cell_size: int = 64,
    field_size: int = 128,
    epochs: int = 10,
    minutes: float | None = None,
    lr: float = 1e-3,
    batch_size: int = 32,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    near_duplicates: bool = True,
    detector: str | Path | None = None,
    compare_whole_image: bool = True,
    whole_image_bundle: str | Path | None = None,
    class_map: dict[str, str] | None = None,
    show_progress: bool = True,
) -> MilResult:
    """Field split -> cell crops -> cell classifier -> field accuracy from cells (and a whole-image baseline)."""
    from leukoscope.tasks.classify import run_experiment
    from leukoscope.evaluation import evaluate_logits
    from leukoscope.inference.predictor import CellClassifier

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields: Manifest = read_dataset(data)
    if class_map:
        fields = Manifest([Sample(s.path, class_map.get(s.label, s.label), s.subject) for s in fields])
    with progress_bar(len(fields), "hashing fields", enabled=show_progress) as update:
        from leukoscope.progress import counter_callback

        field_split = make_split(fields, ratios=ratios, seed=seed, near_duplicates=near_duplicates,
                                 progress=counter_callback(update))
    field_split_file = field_split.save(out_dir / "field_split.json")
    if class_map:  # the whole-image run reads the folders itself, so it needs a manifest with mapped labels
        field_csv = out_dir / "fields.csv"
        with open(field_csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "subject"])  # subjects too: the field split holds them
            writer.writerows([[str(s.path.resolve()), s.label, s.subject or ""] for s in fields])
        field_data = str(field_csv)
    else:
        field_data = str(data)
    if whole_image_bundle is not None:  # refuse a leaky bundle before the long work, not after it
        check_whole_image_bundle(whole_image_bundle, field_split.manifest("test"))
    cells = build_cell_dataset(field_split, out_dir, CellLocator(detector), show_progress=show_progress)
    n_cells = {part: len(samples) for part, samples in Split.load(cells.split_file).assignments.items()}
    say(f"{sum(n_cells.values())} cells located in {len(fields)} fields ({n_cells}); "
                  f"{len(cells.fields_without_cells)} field(s) without a located cell")

    train = dict(epochs=epochs, lr=lr, batch_size=batch_size, max_minutes=minutes, seed=seed, augmentation="default")
    cell_config = ExperimentConfig(
        name="mil-cells", output_root=str(out_dir / "runs"),
        data=DataConfig(path=str(cells.manifest_csv), split_file=str(cells.split_file), near_duplicates=False),
        model=ModelConfig(name=model, image_size=cell_size), train=TrainConfig(**train))
    cell_run = run_experiment(cell_config, show_progress=show_progress)

    classifier = CellClassifier.from_bundle(cell_run.bundle_dir)
    all_test = field_split.manifest("test")
    # the test fields that were read (an unreadable one was skipped when cells were located) and whose class the
    # cell classifier knows (a class with no located cell in any training field is not among its classes)
    read = set(cells.crops) | {str(Path(p).resolve()) for p in cells.fields_without_cells}
    test_fields = [s for s in all_test if str(s.path.resolve()) in read and s.label in classifier.classes]
    if not test_fields:
        raise DatasetError("no test field could be scored from its cells (none read, or none of a class the cell "
                           "classifier learned)")
    left_out = len(all_test) - len(test_fields)
    field_logits = field_log_probabilities(classifier, [s.path for s in test_fields], cells.crops)
    y_true = np.array([classifier.classes.index(s.label) for s in test_fields])
    without = sum(1 for s in test_fields if not cells.crops.get(str(s.path.resolve())))
    notes = [f"{without} of {len(test_fields)} test fields had no located cell and were classified whole."]
    if left_out:
        notes.append(f"{left_out} test field(s) left out: unreadable, or of a class no training field gave a cell of.")
    field_metrics = evaluate_logits(
        y_true, field_logits, classifier.classes, out_dir / "fields_from_cells",
        title="Fields classified from their cells (mean cell log-probability)", notes=notes,
        extra={"test_fields": len(test_fields), "fields_without_cells": without, "test_fields_left_out": left_out})

    metrics: dict[str, Any] = {
        "data": str(Path(data).resolve()),
        "model": model,
        "cell_size": cell_size,
        "fields": field_split.sizes(),
        "cells": n_cells,
        "fields_without_cells": len(cells.fields_without_cells),
        "cell_level_test_accuracy_inherited_labels": cell_run.metrics.get("accuracy"),
        "field_accuracy_from_cells": field_metrics["accuracy"],
        "field_macro_f1_from_cells": field_metrics["macro"]["f1"],
        "cell_train_minutes": cell_run.metrics.get("train_minutes"),
        "cell_run": str(cell_run.run_dir),
    }
    field_bundle = None
    if compare_whole_image:
        field_config = ExperimentConfig(
            name="mil-whole-image", output_root=str(out_dir / "runs"),
            data=DataConfig(path=field_data, split_file=str(field_split_file)),
            model=ModelConfig(name=model, image_size=field_size), train=TrainConfig(**train))
        field_run = run_experiment(field_config, show_progress=show_progress)
        field_bundle = field_run.bundle_dir
        metrics.update({
            "whole_image_accuracy": field_run.metrics.get("accuracy"),
            "whole_image_macro_f1": field_run.metrics.get("macro", {}).get("f1"),
            "whole_image_train_minutes": field_run.metrics.get("train_minutes"),
            "whole_image_run": str(field_run.run_dir),
        })
    if whole_image_bundle is not None:
        metrics.update(score_whole_image_bundle(whole_image_bundle, field_data, field_split_file,
                                                out_dir / "whole_image_bundle", show_progress=show_progress))
    (out_dir / "mil_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    _say_result(metrics, len(test_fields))
    return MilResult(out_dir, metrics, cell_run.bundle_dir, field_bundle)


def _say_result(metrics: dict[str, Any], fields: int) -> None:
    """The comparison the run is for, last on the console: the two "test accuracy" lines above it are the cells'
    (each with its field's label) and the whole-image run's, and the fields' score was in mil_metrics.json alone."""
    rows = [("fields classified from their cells", "field_accuracy_from_cells", "field_macro_f1_from_cells"),
            ("whole-image classifier trained beside it", "whole_image_accuracy", "whole_image_macro_f1"),
            ("whole-image bundle given", "whole_image_bundle_accuracy", "whole_image_bundle_macro_f1")]
    say(f"[bold]test fields ({fields})[/bold]:")
    for name, accuracy, f1 in rows:
        if metrics.get(accuracy) is not None:
            say(f"  {name}: accuracy {metrics[accuracy]:.4f}, macro F1 {metrics[f1]:.4f}")


def check_whole_image_bundle(bundle: str | Path, test_fields: Manifest) -> None:
    """Refuse a whole-image classifier that could have seen any of these test fields.

    From the split saved in the bundle's provenance (or its run directory), every
    test field must be in the bundle's own *test* part (a field it was trained or
    validated on, or one its split never held, cannot be scored honestly), and the
    bundle must know every test class."""
    from leukoscope.bundle import read_bundle_info

    info = read_bundle_info(bundle)
    candidates = [info.provenance.get("split_file"),
                  str(Path(info.provenance["run_dir"]) / "split.json") if info.provenance.get("run_dir") else None]
    split_file = next((c for c in candidates if c and Path(c).is_file()), None)
    if split_file is None:
        raise DatasetError(f"{bundle}: its split file ({candidates[0]}) is not available, so it cannot be shown "
                           "that the model never saw these test fields")
    assignments = Split.load(split_file).assignments
    bundle_test = {Path(s.path).resolve() for s in assignments.get("test", [])}
    outside = [Path(s.path).resolve() for s in test_fields if Path(s.path).resolve() not in bundle_test]
    if outside:
        seen = {Path(s.path).resolve() for name, samples in assignments.items() if name != "test" for s in samples}
        leaked = [p for p in outside if p in seen]
        what = (f"was trained or validated on {len(leaked)} of these test fields (e.g. {leaked[0]})" if leaked
                else f"has {len(outside)} of these test fields outside its test part (e.g. {outside[0]})")
        raise DatasetError(f"{bundle} {what}; use the same field split (its {split_file})")
    unknown = sorted({s.label for s in test_fields} - set(info.classes))
    if unknown:
        raise DatasetError(f"{bundle} does not know the test classes {unknown}")


def score_whole_image_bundle(bundle: str | Path, data: str | Path, split_file: str | Path,
                             out_dir: Path, *, show_progress: bool = False) -> dict[str, Any]:
    """Score an already trained whole-image classifier (e.g. the best model of
    ``bench/taleqani.py``) on the test part of ``split_file``; call
    :func:`check_whole_image_bundle` first (before the long work) to refuse a leak."""
    from leukoscope.bundle import read_bundle_info
    from leukoscope.tasks.classify import evaluate_bundle

    info = read_bundle_info(bundle)
    scored = evaluate_bundle(bundle, data, out_dir, split_file=split_file, subset="test",
                             show_progress=show_progress)
    return {
        "whole_image_bundle": str(bundle),
        "whole_image_bundle_model": info.model_name,
        "whole_image_bundle_accuracy": scored["accuracy"],
        "whole_image_bundle_macro_f1": scored["macro"]["f1"],
        "whole_image_bundle_train_minutes": info.metrics.get("train_minutes"),
    }
