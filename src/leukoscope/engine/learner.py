"""One :class:`Learner` interface for every classifier: a torch network or a scikit-learn pipeline.

A learner is built from an experiment config, trained on a prepared split
(:meth:`Learner.fit`), scores uint8 images through the bundle's preprocessing
(:meth:`Learner.logits`) and saves a bundle. The classification experiment
(:mod:`leukoscope.tasks.classify`) only talks to this interface, so the
classical baselines share its split, report and bundle code with the CNNs.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from leukoscope.bundle import BUNDLE_FILE
from leukoscope.classic.features import FeatureExtractor
from leukoscope.engine.config import IMAGE_SIZE_MAX, ConfigError, ExperimentConfig
from leukoscope.engine.data_prep import PreparedData
from leukoscope.engine.finetune import fine_tuning_start
from leukoscope.engine.runtime import count_parameters, resolve_device, seed_everything
from leukoscope.engine.loop import FitResult
from leukoscope.engine.trainer import fit
from leukoscope.evaluation.calibration import negative_log_likelihood
from leukoscope.evaluation.metrics import macro_f1
from leukoscope.models import create_model, model_entry
from leukoscope.models.classic import ClassicModel
from leukoscope.models.registry import model_options, unknown_option, wrong_option_type
from leukoscope.preprocessing import Preprocessing, batched_logits, batched_outputs, dihedral_views
from leukoscope.progress import counter_callback, progress_bar, say


class Learner(Protocol):
    """What the classification experiment needs of a model."""

    model: Any
    preprocessing: Preprocessing
    model_options: dict[str, Any]
    """The builder options the bundle records."""

    def describe(self) -> str:
        """One line: the model and its size."""

    def fit(self, data: PreparedData, *, run_dir: Path, resume: bool, show_progress: bool) -> FitResult:
        """Train on ``data``'s train split (choosing by its validation split); keep the best model."""

    def logits(self, pixels: torch.Tensor) -> np.ndarray:
        """Uncalibrated logits of uint8 images, through :attr:`preprocessing`."""

    def outputs(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Uncalibrated logits and penultimate embeddings (for the out-of-distribution statistics)."""

    def images_per_second(self, pixels: torch.Tensor) -> float:
        """Median inference speed from uint8 images to logits."""

    def report_extra(self) -> dict[str, Any]:
        """Learner-specific entries of metrics.json, and notes for the report (``notes`` key)."""


def create_learner(config: ExperimentConfig, classes: list[str], preprocessing: Preprocessing) -> Learner:
    """A :class:`TorchLearner` or, for a classical model (``kind: classic``), a :class:`SklearnLearner`."""
    if check_learner_config(config, preprocessing) == "classic":
        return SklearnLearner(config, classes, preprocessing)
    return TorchLearner(config, classes, preprocessing)


def check_learner_config(config: ExperimentConfig, preprocessing: Preprocessing) -> str:
    """The model's kind (``classic`` or a network's), after refusing settings it cannot take
    (:class:`ConfigError`): called before any data is read, so that a wrong setting costs no decoding."""
    kind = model_entry(config.model.name).kind
    if kind == "detector":
        raise ConfigError(f"model.name {config.model.name!r} is a cell detector: train it with a detection "
                          f"config (task: detect, e.g. configs/detector_cbc.yaml) or `leukoscope train "
                          f"--model {config.model.name} --data VOC_FOLDER`")
    if kind == "classic":
        if config.model.init:
            raise ConfigError(f"model.init fine-tunes a CNN; {config.model.name} is a classical model, "
                              f"trained from the data alone")
        if preprocessing.styled:
            raise ConfigError(f"data.colour and data.standardize set what a CNN sees; {config.model.name} "
                              f"computes its own colour features from the pixels: leave them at rgb / false")
        if preprocessing.views != 1:
            raise ConfigError(f"predict.views averages a network's outputs over a cell's rotations; "
                              f"{config.model.name} is a classical model: leave predict.views at 1")
        if config.model.weights or config.model.freeze_backbone:  # they were dropped without a word
            raise ConfigError(f"model.weights and model.freeze_backbone are for CNNs; {config.model.name} is a "
                              f"classical model, trained from the data alone")
    elif config.model.freeze_backbone and not (config.model.weights or config.model.init):
        # it trained a class layer on a frozen random network: not the frozen-backbone experiment it names
        raise ConfigError("model.freeze_backbone=true keeps the backbone's weights as they start, and without "
                          "model.weights or model.init they are random: give the trained weights to freeze, "
                          "or leave model.freeze_backbone false")
    _check_model_options(config, kind)
    if kind != "classic":
        _check_input_size(config, preprocessing.image_size)
    return kind


def _check_input_size(config: ExperimentConfig, size: int) -> None:
    """Refuse an image size the architecture cannot take (alexnet's pooling needs 63 px), before any image
    is decoded: in a grid search the crash came after the runs before it had trained. Shapes only, on
    torch's meta device: no weights are drawn and no memory is taken."""
    def takes(pixels: int) -> bool:
        try:
            with torch.device("meta"), torch.no_grad():
                model(torch.zeros(1, 3, pixels, pixels))
        except RuntimeError:
            return False
        return True

    try:
        with torch.device("meta"):
            model = create_model(config.model.name, num_classes=2, **config.model.options).eval()
    except Exception:  # noqa: BLE001 - not a size question: the real build, later, says what is wrong
        return
    if takes(size):
        return
    low, high = size, IMAGE_SIZE_MAX  # the smallest size it takes, by bisection (shapes grow with the size)
    if not takes(high):
        raise ConfigError(f"{config.model.name} cannot take images of {size} px (model.image_size), nor of any "
                          f"size up to {high} px")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if takes(middle) else (middle, high)
    raise ConfigError(f"{config.model.name} cannot take images of {size} px (model.image_size): its layers "
                      f"shrink them to nothing; it needs at least {high} px")


#: Builder arguments a config sets in its own key: given as a model option they overrode it unseen, while the bundle
#: recorded the other (model.options k_best 3 fitted 3 features; feature_spec said features.k_best 50).
_OPTION_HOMES = {"weights": "model.weights", "freeze_backbone": "model.freeze_backbone"}
_CLASSIC_OPTION_HOMES = {**_OPTION_HOMES, "k_best": "features.k_best", "class_weight": "train.class_weighted_loss",
                         "random_state": "train.seed"}


def _check_model_options(config: ExperimentConfig, kind: str) -> None:
    """Refuse a ``model.options`` key that another setting owns, or that the builder does not take (before any
    image is decoded; the list offered is of the options a config sets there)."""
    homes = _CLASSIC_OPTION_HOMES if kind == "classic" else _OPTION_HOMES
    for option in config.model.options:
        if option in homes:
            raise ConfigError(f"model.options.{option} is set by {homes[option]}: set {homes[option]} instead (as an "
                              f"option it overrode that setting unseen, and the bundle recorded the other)")
    message = (unknown_option(config.model.name, config.model.options, offered_without=homes)
               or wrong_option_type(config.model.name, config.model.options))
    if message:
        raise ConfigError(message)


def _median_rate(run, n: int, repeats: int = 3) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(n / (time.perf_counter() - start))
    return float(np.median(rates))


class TorchLearner:
    """A torch network from the model registry, trained by :func:`leukoscope.engine.trainer.fit`."""

    def __init__(self, config: ExperimentConfig, classes: list[str], preprocessing: Preprocessing) -> None:
        self.config = config
        self.preprocessing = preprocessing
        self.device = resolve_device(config.train.device)
        seed_everything(config.train.seed)  # model initialisation is part of the seeded run
        weights = config.model.weights
        start = None
        if config.model.init:  # fine-tuning a bundle: its weights, with or without its class layer
            start = fine_tuning_start(config.model.init, classes, "classify")
            weights = start.weights
        self.model = create_model(config.model.name, num_classes=len(classes), weights=weights,
                                  freeze_backbone=config.model.freeze_backbone, **config.model.options)
        if start is not None:  # the class layer's rows of the classes the data shares with the bundle
            start.adopt_head(self.model)
        self.num_classes = len(classes)
        self.model_options = dict(config.model.options)

    def describe(self) -> str:
        return f"{self.config.model.name} ({count_parameters(self.model) / 1e6:.2f} M parameters)"

    def fit(self, data: PreparedData, *, run_dir: Path, resume: bool, show_progress: bool) -> FitResult:
        train, val = data.parts["train"], data.parts.get("val")
        images, targets = train.images, train.targets
        if self.config.train.edge_copies:  # system C: an edge-map copy of every training image
            from leukoscope.edges import with_edge_copies

            images, targets = with_edge_copies(images, targets)
        result = fit(self.model, images, targets, val.images if val else None, val.targets if val else None,
                     self.config.train, num_classes=self.num_classes, preprocessing=self.preprocessing,
                     run_dir=run_dir, resume=resume, show_progress=show_progress)
        say(f"training finished: {result.stopped_because}; best epoch {result.best_epoch}")
        return result

    def logits(self, pixels: torch.Tensor) -> np.ndarray:
        return batched_logits(self.model, pixels, self.preprocessing, self.device)

    def outputs(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return batched_outputs(self.model, pixels, self.preprocessing, self.device)

    @torch.no_grad()
    def images_per_second(self, pixels: torch.Tensor, batch_size: int = 32) -> float:
        """Median images/second of the model's forward pass (eval mode, no grad) on a batch of
        ``batch_size`` preprocessed images (each in all its test-time views) already on the device
        (images repeated if fewer)."""
        batch = pixels[torch.arange(batch_size) % len(pixels)]
        # Every view of each image: a bundle that reads 8 views does 8 forward passes per image.
        inputs = self.preprocessing.model_input(dihedral_views(batch, self.preprocessing.views)).to(self.device)
        self.model.eval()
        self.model(inputs)  # warm-up

        def forward() -> None:
            self.model(inputs)
            if self.device.type == "cuda":
                torch.cuda.synchronize()

        return _median_rate(forward, batch_size)

    def report_extra(self) -> dict[str, Any]:
        return {"parameters": count_parameters(self.model), "notes": []}


# --------------------------------------------------------------------------- classical models
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


def _scores(model: ClassicModel, features: np.ndarray, targets: list[int]) -> dict[str, float]:
    logits = model.logits_features(features)
    y = np.asarray(targets)
    predicted = logits.argmax(1)
    return {
        "loss": negative_log_likelihood(logits, y),
        "accuracy": float((predicted == y).mean()),
        "macro_f1": macro_f1(y, predicted),
    }


class SklearnLearner:
    """Hand-made features (:mod:`leukoscope.classic.features`) + a scikit-learn pipeline.

    Fitted in one step on the training split only (no hyper-parameter is tuned on
    validation or test); with ``train.edge_copies`` the training set also gets an
    edge-map copy of each image. ``train_minutes`` counts feature extraction of the
    training images plus fitting; logits are log-probabilities (``softmax(log p) = p``).
    """

    def __init__(self, config: ExperimentConfig, classes: list[str], preprocessing: Preprocessing) -> None:
        self.config = config
        self.preprocessing = preprocessing
        self.extractor = FeatureExtractor(config.features)
        self.model_options = self._builder_options()
        self.model = ClassicModel(create_model(config.model.name, num_classes=len(classes), **self.model_options),
                                  config.features, len(classes), name=config.model.name)
        self._timings: dict[str, float] = {}

    def _builder_options(self) -> dict[str, Any]:
        config = self.config
        options = dict(config.model.options)  # create_model names any unknown option
        accepted = model_options(config.model.name) or []
        k_best = config.features.k_best
        if k_best != "all" and k_best > len(self.extractor):  # it became "all" without a word
            say(f"note: features.k_best {k_best} is more than the {len(self.extractor)} features computed "
                f"({', '.join(config.features.families)}): every feature is kept")
        options.setdefault("k_best", "all" if k_best == "all" or k_best >= len(self.extractor) else k_best)
        options.setdefault("class_weight", "balanced" if config.train.class_weighted_loss else None)
        if "random_state" in accepted:
            options.setdefault("random_state", config.train.seed)
        return options

    def describe(self) -> str:
        return (f"{self.config.model.name} on {len(self.extractor)} features "
                f"({', '.join(self.config.features.families)})")

    def fit(self, data: PreparedData, *, run_dir: Path, resume: bool, show_progress: bool) -> FitResult:
        config = self.config
        if resume and (run_dir / "bundle" / BUNDLE_FILE).is_file():  # its bundle was overwritten in place
            raise ValueError(f"cannot resume: {run_dir} is a finished {config.model.name} run (a classical model "
                             f"trains in one step, and its bundle is written): start a new run")
        if resume:
            say("note: a classical model trains in one step; --resume fits it again from the start")
        train, val = data.parts["train"], data.parts.get("val")
        with threadpool_limits(config.train.threads):
            x_train, feature_seconds = cached_features(train.images, self.extractor,
                                                       edge_copies=config.train.edge_copies,
                                                       description="features (train)", show_progress=show_progress)
            y_train = np.asarray(list(train.targets) * (2 if config.train.edge_copies else 1))
            start = time.perf_counter()
            self.model.fit_features(x_train, y_train)
            fit_seconds = time.perf_counter() - start
            row: dict[str, Any] = {"epoch": 1}
            row.update({f"train_{k}": v for k, v in
                        _scores(self.model, x_train[: len(train.targets)], train.targets).items()})
            if val is not None:
                x_val = cached_features(val.images, self.extractor, description="features (val)",
                                        show_progress=show_progress)[0]
                row.update({f"val_{k}": v for k, v in _scores(self.model, x_val, val.targets).items()})
        row["elapsed_s"] = feature_seconds + fit_seconds
        self._timings = {"feature_minutes": feature_seconds / 60, "fit_minutes": fit_seconds / 60}
        monitor = {"val_accuracy": "accuracy", "val_macro_f1": "macro_f1", "val_loss": "loss"}[config.train.monitor]
        score = row.get(f"val_{monitor}", row[f"train_{monitor}"])
        val_text = f", val accuracy {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
        say(f"fitted in {fit_seconds:.1f} s (+{feature_seconds:.1f} s features): "
            f"train accuracy {row['train_accuracy']:.4f}{val_text}")
        return FitResult(history=[row], best_epoch=1, best_score=-score if monitor == "loss" else score,
                         train_seconds=feature_seconds + fit_seconds, stopped_because="fitted in one step (no epochs)")

    def logits(self, pixels: torch.Tensor) -> np.ndarray:
        with threadpool_limits(self.config.train.threads):
            features = cached_features(pixels, self.extractor, description="features", show_progress=False)[0]
            return self.model.logits_features(features)

    def outputs(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with threadpool_limits(self.config.train.threads):
            features = cached_features(pixels, self.extractor, description="features", show_progress=False)[0]
            return self.model.logits_features(features), self.model.embed_features(features)

    def images_per_second(self, pixels: torch.Tensor, batch_size: int = 32) -> float:
        """End to end from uint8 images (features + pipeline), uncached."""
        batch = pixels[:batch_size]
        with threadpool_limits(self.config.train.threads):
            return _median_rate(lambda: batched_logits(self.model, batch, self.preprocessing), len(batch))

    def report_extra(self) -> dict[str, Any]:
        families = ", ".join(self.config.features.families)
        return {
            "framework": "sklearn",
            "parameters": None,
            **self._timings,
            "features": {
                "families": list(self.config.features.families),
                "n_features": len(self.extractor),
                "k_best": self.model_options["k_best"],
                "edge_copies": self.config.train.edge_copies,
                "top_selected": self.model.selected_features()[:20],
            },
            "notes": [f"Classical model {self.config.model.name}: {len(self.extractor)} hand-made features "
                      f"({families}), {self.model_options['k_best']} kept by chi-square SelectKBest. "
                      "Logits are log-probabilities."],
        }
