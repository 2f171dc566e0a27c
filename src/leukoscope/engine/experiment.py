"""One training run from a config: data -> model -> fit -> evaluate -> bundle -> report.

Run directory layout::

    runs/<name>-<timestamp>/
      config.yaml      the resolved config
      split.json       copy of the split used
      checkpoint.pt    last epoch, for --resume
      bundle/          the trained model (see leukoscope.inference.bundle)
      metrics.json, figures/, report.html
      train.log
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leukoscope.engine.config import ExperimentConfig, save_config
from leukoscope.engine.data_prep import PreparedData, prepare_data
from leukoscope.engine.trainer import FitResult, fit, predict_logits, resolve_device, seed_everything
from leukoscope.evaluation import evaluate_logits
from leukoscope.inference.bundle import BundleInfo, Preprocessing, save_bundle
from leukoscope.models import create_model
from leukoscope.progress import run_log, say
from leukoscope.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]
    fit: FitResult


def new_run_dir(output_root: str | Path, name: str) -> Path:
    """A fresh ``<output_root>/<name>-<time>[-n]`` path (not created)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(output_root) / f"{name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(output_root) / f"{name}-{stamp}-{suffix}"
    return run_dir


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_throughput(model: nn.Module, image_size: int, device: torch.device, batch_size: int = 32,
                       repeats: int = 3) -> float:
    """Median images/second of batched inference on random input (eval mode, no grad)."""
    model.eval()
    batch = torch.randn(batch_size, 3, image_size, image_size, device=device)
    rates = []
    with torch.no_grad():
        model(batch)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(batch_size / (time.perf_counter() - start))
    return float(np.median(rates))


def run_experiment(
    config: ExperimentConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    prepared: PreparedData | None = None,
    show_progress: bool = True,
) -> RunResult:
    """Train and evaluate one model as ``config`` describes; returns where everything went."""
    from leukoscope.models import model_entry

    if model_entry(config.model.name).kind == "classic":  # scikit-learn pipeline on hand-made features
        from leukoscope.classic.experiment import run_classic_experiment

        return run_classic_experiment(config, run_dir=run_dir, resume=resume, prepared=prepared,
                                      show_progress=show_progress)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config.output_root, config.name)
    if resume and not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"cannot resume: {run_dir} is not a run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_log(run_dir / "train.log"):
        save_config(config, run_dir / "config.yaml")
        if prepared is None:
            prepared = prepare_data(config.data, config.model.image_size, Path(config.output_root),
                                    show_progress=show_progress)
        shutil.copyfile(prepared.split_file, run_dir / "split.json")
        classes = prepared.classes
        seed_everything(config.train.seed)  # model initialisation is part of the seeded run
        model = create_model(
            config.model.name,
            num_classes=len(classes),
            weights=config.model.weights,
            freeze_backbone=config.model.freeze_backbone,
            **config.model.options,
        )
        train, val = prepared.parts["train"], prepared.parts.get("val")
        say(
            f"[bold]{config.name}[/bold]: {config.model.name} ({count_parameters(model) / 1e6:.2f} M parameters), "
            f"classes {classes}, train {len(train.targets)} / val {len(val.targets) if val else 0} / "
            f"test {len(prepared.parts['test'].targets) if 'test' in prepared.parts else 0} images"
        )
        train_images, train_targets = train.images, train.targets
        if config.train.edge_copies:  # system C: an edge-map copy of every training image
            from leukoscope.edges import with_edge_copies

            train_images, train_targets = with_edge_copies(train_images, train_targets)
        result = fit(
            model,
            train_images,
            train_targets,
            val.images if val else None,
            val.targets if val else None,
            config.train,
            num_classes=len(classes),
            run_dir=run_dir,
            resume=resume,
            show_progress=show_progress,
        )
        say(f"training finished: {result.stopped_because}; best epoch {result.best_epoch}")
        metrics = evaluate_run(model, prepared, config, run_dir, result)
        bundle_dir = save_bundle(
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
                model_options=dict(config.model.options),
                temperature=float(metrics.get("calibration", {}).get("temperature", 1.0)),
                uncertain_threshold=config.predict.uncertain_threshold,
                metrics=_headline(metrics),
                provenance={"run_dir": str(run_dir.resolve()), "split_file": str(prepared.split_file.resolve()),
                            "dataset": config.data.path, "config": config.to_dict()},
            ),
        )
        return RunResult(run_dir, bundle_dir, metrics, result)


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "roc_auc_macro_ovr", "ece", "evaluated_on", "train_minutes", "parameters",
            "images_per_second", "best_epoch")
    out = {k: metrics[k] for k in keys if k in metrics}
    if "macro" in metrics:
        out["macro_f1"] = metrics["macro"]["f1"]
    if "weighted" in metrics:
        out["weighted_f1"] = metrics["weighted"]["f1"]
    return out


def evaluate_run(
    model: nn.Module, prepared: PreparedData, config: ExperimentConfig, run_dir: Path, result: FitResult
) -> dict[str, Any]:
    """Score the best model on the test split (validation when there is no test split)."""
    device = resolve_device(config.train.device)
    eval_name = "test" if "test" in prepared.parts else "val" if "val" in prepared.parts else "train"
    target = prepared.parts[eval_name]
    logits = predict_logits(model, target.images, device)
    val = prepared.parts.get("val") if eval_name != "val" else None
    val_logits = predict_logits(model, val.images, device) if val is not None else None
    notes = []
    if eval_name != "test":
        notes.append(f"No test split: the figures below are on the {eval_name} split, which took part in training.")
    skipped = prepared.skipped()
    if skipped:
        notes.append(f"{len(skipped)} unreadable image(s) were skipped: "
                     + "; ".join(f"{s['path']} ({s['error']})" for s in skipped[:10]))
    extra = {
        "evaluated_on": eval_name,
        "split_sizes": prepared.split.sizes(),
        "split_file": str(prepared.split_file),
        "split_info": {k: v for k, v in prepared.split.info.items() if k != "groups"},
        "skipped_images": skipped,
        "best_epoch": result.best_epoch,
        "stopped_because": result.stopped_because,
        "train_minutes": result.train_seconds / 60,
        "parameters": count_parameters(model),
        "images_per_second": measure_throughput(model, config.model.image_size, device),
        "history": result.history,
    }
    metrics = evaluate_logits(
        np.asarray(target.targets),
        logits,
        prepared.classes,
        run_dir,
        val_logits=val_logits,
        val_true=np.asarray(val.targets) if val is not None else None,
        history=result.history,
        config=config.to_dict(),
        title=f"{config.name}: {config.model.name}",
        notes=notes,
        extra=extra,
    )
    say(
        f"{eval_name} accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro']['f1']:.4f} "
        f"({metrics['n']} images); report: {run_dir / 'report.html'}"
    )
    (run_dir / "history.json").write_text(json.dumps(result.history, indent=1))
    return metrics
