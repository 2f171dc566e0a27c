"""One classical training run: the same split, report and bundle as a CNN run.

``leukoscope train --model svm_rbf --data D`` reaches :func:`run_classic_experiment`
through :func:`leukoscope.engine.experiment.run_experiment`. The steps:

1. :func:`~leukoscope.engine.data_prep.prepare_data`: the saved split and the
   decoded, letterboxed (and, with ``data.segmentation``, segmented) images,
   exactly what a CNN gets.
2. Features of every image (:mod:`leukoscope.classic.features`, the
   ``features:`` section); with ``train.edge_copies`` the training set also
   gets an edge-map copy of each image. Features are cached per decoded image
   set, so ``leukoscope compare`` extracts them once for all classical models.
3. Fit the pipeline on the training split only (no hyper-parameter is tuned
   on validation or test).
4. :func:`leukoscope.evaluation.evaluate_logits` on the test split with
   log-probabilities as logits (``softmax(log p) = p``), validation logits for
   the temperature: the same metrics, figures and report as a CNN.
5. The bundle (``model.skops`` + ``bundle.json``), usable by ``leukoscope
   predict`` and ``leukoscope evaluate`` unchanged.

Times: ``train_minutes`` counts feature extraction of the training images
plus fitting (the CNN's counts its epochs); ``images_per_second`` is measured
end to end from decoded uint8 images (features + pipeline) on test images.
"""

from __future__ import annotations

import json
import shutil
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from leukoscope.classic.bundle import save_classic_bundle
from leukoscope.classic.features import FeatureExtractor
from leukoscope.classic.models import ClassicModel
from leukoscope.engine.config import ExperimentConfig, save_config
from leukoscope.engine.data_prep import PreparedData, prepare_data
from leukoscope.engine.trainer import FitResult
from leukoscope.evaluation import evaluate_logits
from leukoscope.evaluation.calibration import negative_log_likelihood
from leukoscope.inference.bundle import BundleInfo, Preprocessing
from leukoscope.models import create_model, model_entry
from leukoscope.models.registry import model_options
from leukoscope.progress import counter_callback, progress_bar, run_log, say
from leukoscope.transforms import IMAGENET_MEAN, IMAGENET_STD

#: (id of the uint8 image tensor, feature spec, edge copies) -> (features, seconds to extract).
_FEATURE_CACHE: dict[tuple[int, str, bool], tuple[np.ndarray, float]] = {}


def cached_features(images: torch.Tensor, extractor: FeatureExtractor, *, edge_copies: bool = False,
                    description: str = "features", show_progress: bool = True) -> tuple[np.ndarray, float]:
    """Features of ``images`` (plus their edge maps when ``edge_copies``) and the seconds they took.

    Cached for as long as ``images`` lives, so several models on one prepared
    split pay for the features once (and report the same, measured, time).
    """
    key = (id(images), extractor.spec.model_dump_json(), edge_copies)
    if key not in _FEATURE_CACHE:
        batch = images
        if edge_copies:
            from leukoscope.edges import edge_maps

            batch = torch.cat([images, edge_maps(images)])
        start = time.perf_counter()
        with progress_bar(len(batch), description, enabled=show_progress) as update:
            features = extractor.transform(batch, progress=counter_callback(update))
        _FEATURE_CACHE[key] = (features, time.perf_counter() - start)
        weakref.finalize(images, _FEATURE_CACHE.pop, key, None)
    return _FEATURE_CACHE[key]


def measure_classic_throughput(model: ClassicModel, images: torch.Tensor, batch_size: int = 32,
                               repeats: int = 3) -> float:
    """Median images/second from uint8 images to probabilities (features + pipeline)."""
    batch = images[:batch_size]
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict_logits(batch)
        rates.append(len(batch) / (time.perf_counter() - start))
    return float(np.median(rates))


def _builder_options(config: ExperimentConfig, n_features: int) -> dict[str, Any]:
    options = dict(config.model.options)  # create_model names any unknown option
    accepted = model_options(config.model.name) or []
    k_best = config.features.k_best
    options.setdefault("k_best", "all" if k_best == "all" or k_best >= n_features else k_best)
    options.setdefault("class_weight", "balanced" if config.train.class_weighted_loss else None)
    if "random_state" in accepted:
        options.setdefault("random_state", config.train.seed)
    return options


def _scores(model: ClassicModel, features: np.ndarray, targets: list[int]) -> dict[str, float]:
    from sklearn.metrics import f1_score

    logits = model.logits_features(features)
    y = np.asarray(targets)
    predicted = logits.argmax(1)
    return {
        "loss": negative_log_likelihood(logits, y),
        "accuracy": float((predicted == y).mean()),
        "macro_f1": float(f1_score(y, predicted, average="macro", zero_division=0)),
    }


def run_classic_experiment(
    config: ExperimentConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    prepared: PreparedData | None = None,
    show_progress: bool = True,
):
    """Fit and evaluate the classical model ``config.model.name``; returns a ``RunResult``."""
    from leukoscope.engine.experiment import RunResult, _headline, new_run_dir

    if model_entry(config.model.name).kind != "classic":
        raise ValueError(f"{config.model.name} is not a classical model")
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config.output_root, config.name)
    if resume and not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"cannot resume: {run_dir} is not a run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_log(run_dir / "train.log"), threadpool_limits(config.train.threads):
        if resume:
            say("note: a classical model trains in one step; --resume fits it again from the start")
        save_config(config, run_dir / "config.yaml")
        if prepared is None:
            prepared = prepare_data(config.data, config.model.image_size, Path(config.output_root),
                                    show_progress=show_progress)
        shutil.copyfile(prepared.split_file, run_dir / "split.json")
        classes = prepared.classes
        extractor = FeatureExtractor(config.features)
        train, val = prepared.parts["train"], prepared.parts.get("val")
        eval_name = "test" if "test" in prepared.parts else "val" if val is not None else "train"
        say(f"[bold]{config.name}[/bold]: {config.model.name} on {len(extractor)} features "
            f"({', '.join(config.features.families)}), classes {classes}, train {len(train.targets)} / "
            f"val {len(val.targets) if val else 0} / "
            f"test {len(prepared.parts['test'].targets) if 'test' in prepared.parts else 0} images")

        x_train, feature_seconds = cached_features(train.images, extractor, edge_copies=config.train.edge_copies,
                                                   description="features (train)", show_progress=show_progress)
        y_train = np.asarray(list(train.targets) * (2 if config.train.edge_copies else 1))
        options = _builder_options(config, len(extractor))
        model = ClassicModel(create_model(config.model.name, num_classes=len(classes), **options),
                             config.features, len(classes), name=config.model.name)
        start = time.perf_counter()
        model.fit_features(x_train, y_train)
        fit_seconds = time.perf_counter() - start

        feats = {"train": x_train[: len(train.targets)]}
        for name in {eval_name, "val"} - {"train"}:
            if name in prepared.parts:
                feats[name] = cached_features(prepared.parts[name].images, extractor,
                                              description=f"features ({name})", show_progress=show_progress)[0]
        row: dict[str, Any] = {"epoch": 1}
        row.update({f"train_{k}": v for k, v in _scores(model, feats["train"], train.targets).items()})
        if val is not None:
            row.update({f"val_{k}": v for k, v in _scores(model, feats["val"], val.targets).items()})
        row["elapsed_s"] = feature_seconds + fit_seconds
        monitor = {"val_accuracy": "accuracy", "val_macro_f1": "macro_f1", "val_loss": "loss"}[config.train.monitor]
        score = row.get(f"val_{monitor}", row[f"train_{monitor}"])
        result = FitResult(history=[row], best_epoch=1, best_score=-score if monitor == "loss" else score,
                           train_seconds=feature_seconds + fit_seconds,
                           stopped_because="fitted in one step (no epochs)")
        val_text = f", val accuracy {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
        say(f"fitted in {fit_seconds:.1f} s (+{feature_seconds:.1f} s features): "
            f"train accuracy {row['train_accuracy']:.4f}{val_text}")

        target = prepared.parts[eval_name]
        eval_feats = feats.get(eval_name, feats["train"])
        logits = model.logits_features(eval_feats)
        val_logits = model.logits_features(feats["val"]) if val is not None and eval_name != "val" else None
        notes = [f"Classical model {config.model.name}: {len(extractor)} hand-made features "
                 f"({', '.join(config.features.families)}), {options['k_best']} kept by chi-square SelectKBest. "
                 "Logits are log-probabilities."]
        if eval_name != "test":
            notes.append(f"No test split: the figures below are on the {eval_name} split, "
                         f"which {'took part in training' if eval_name == 'train' else 'was not used for fitting'}.")
        skipped = prepared.skipped()
        if skipped:
            notes.append(f"{len(skipped)} unreadable image(s) were skipped: "
                         + "; ".join(f"{s['path']} ({s['error']})" for s in skipped[:10]))
        throughput = measure_classic_throughput(model, target.images)
        extra = {
            "evaluated_on": eval_name,
            "split_sizes": prepared.split.sizes(),
            "split_file": str(prepared.split_file),
            "split_info": {k: v for k, v in prepared.split.info.items() if k != "groups"},
            "skipped_images": skipped,
            "framework": "sklearn",
            "stopped_because": result.stopped_because,
            "train_minutes": result.train_seconds / 60,
            "feature_minutes": feature_seconds / 60,
            "fit_minutes": fit_seconds / 60,
            "parameters": None,
            "images_per_second": throughput,
            "history": result.history,
            "features": {
                "families": list(config.features.families),
                "n_features": len(extractor),
                "k_best": options["k_best"],
                "edge_copies": config.train.edge_copies,
                "top_selected": model.selected_features()[:20],
            },
        }
        metrics = evaluate_logits(
            np.asarray(target.targets), logits, classes, run_dir,
            val_logits=val_logits,
            val_true=np.asarray(val.targets) if val_logits is not None else None,
            config=config.to_dict(),
            title=f"{config.name}: {config.model.name}",
            notes=notes,
            extra=extra,
        )
        say(f"{eval_name} accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro']['f1']:.4f} "
            f"({metrics['n']} images); report: {run_dir / 'report.html'}")
        (run_dir / "history.json").write_text(json.dumps(result.history, indent=1))
        bundle_dir = save_classic_bundle(
            run_dir / "bundle",
            model,
            BundleInfo(
                model_name=config.model.name,
                classes=classes,
                preprocessing=Preprocessing(
                    image_size=config.model.image_size,
                    mean=list(IMAGENET_MEAN),
                    std=list(IMAGENET_STD),
                    segmentation=config.data.segmentation,
                ),
                model_options={k: v for k, v in options.items()},
                temperature=float(metrics.get("calibration", {}).get("temperature", 1.0)),
                uncertain_threshold=config.predict.uncertain_threshold,
                metrics=_headline(metrics),
                provenance={"run_dir": str(run_dir.resolve()), "split_file": str(prepared.split_file.resolve()),
                            "dataset": config.data.path, "config": config.to_dict()},
            ),
        )
        return RunResult(run_dir, bundle_dir, metrics, result)
