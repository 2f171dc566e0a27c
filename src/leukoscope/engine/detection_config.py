"""The detection experiment config: its own YAML schema (sections ``data``, ``model``,
``train``, ``predict``), validated like the classification one: unknown keys fail
with the closest valid key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

from pydantic import Field, field_validator

from leukoscope.data.box_augment import DETECTION_AUGMENTATIONS
from leukoscope.engine.config import (RunConfig, Section, TrainingBase, build_config, init_updates, peek_init,
                                      read_config_file)


class DetectionDataConfig(Section):
    path: str | None = None
    """A Pascal VOC folder (bccd, cbc or flat layout)."""
    train: str | list[str] | None = None
    """Split(s) to train on, e.g. ``Training+Validation`` or ``trainval``; None: the whole folder, cut by ``ratios``."""
    val: str | list[str] | None = None
    """Split(s) to choose the best epoch and the score threshold on; None: no validation (keep the last epoch)."""
    test: str | list[str] | None = None
    """Split(s) the final metrics are computed on."""
    ratios: list[float] = Field(default_factory=lambda: [0.8, 0.1, 0.1])
    """train/val/test shares when ``train`` is None (folders without splits): fields dealt at random, a field's
    near copies (re-encoded, resized, turned) with it."""
    split_seed: int = 0
    classes: list[str] | None = None
    """Object classes, in order; default: every name found in the training annotations."""
    aliases: dict[str, str] = Field(default_factory=dict)
    """Other spellings of class names, e.g. ``{Platelet: Platelets}``."""
    ignore_classes: list[str] = Field(default_factory=list)
    """Classes annotated in the data but left out on purpose (their cells are background to the detector), beside
    WBC, RBC and Platelets outside ``classes``; a box of any other class outside ``classes`` is an unknown class,
    and its image is left out (its cell may be one of the classes trained)."""
    on_error: Literal["skip", "fail"] = "skip"
    """Bad objects/files (unknown class, box outside the image...): skip and report, or stop."""
    um_per_px: Annotated[float, Field(gt=0)] | Literal["estimate"] | None = "estimate"
    """Pixel size of the training images in micrometres: a number, ``estimate`` (from the red
    cells of up to 40 training images, :func:`leukoscope.scale.source_scale`) or null. Recorded
    in the bundle; smear analysis resamples fields of another magnification to it."""


class DetectorModelConfig(Section):
    name: str = "fasterrcnn_mobilenet_v3_fpn"
    weights: str | None = None
    """A local state dict of the whole detector to start from."""
    init: str | None = None
    """Fine-tune a trained detector: its bundle folder or ``pretrained:NAME``. The architecture and
    its options (input scale, anchors...) come from the bundle unless set here; its class layer is
    kept when the data has the bundle's classes (same order), else replaced."""
    backbone_weights: str | None = None
    """Classifier weights for the backbone (for fasterrcnn_abas: an abas_cnn bundle folder or its model.safetensors)."""
    freeze_backbone: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    """Builder options: input_scale, anchor_sizes, score_thresh, detections_per_img, ..."""


class DetectionTrainConfig(TrainingBase):
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = 30
    batch_size: int = 4
    scheduler: Literal["none", "cosine"] = "cosine"
    warmup_iters: int = Field(50, ge=0)
    grad_clip: float | None = Field(10.0, gt=0)
    augmentation: str = "default"
    monitor: Literal["val_map", "val_map_50"] = "val_map_50"
    eval_every: int = 1
    max_images_per_epoch: int | None = Field(None, ge=1)
    """Use a random subset of the training images each epoch (quick runs)."""

    @field_validator("augmentation")
    @classmethod
    def _preset(cls, value: str) -> str:
        if value not in DETECTION_AUGMENTATIONS:
            raise ValueError(f"unknown detection augmentation {value!r}; choose from {list(DETECTION_AUGMENTATIONS)}")
        return value

    @field_validator("eval_every")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


class DetectionPredictConfig(Section):
    score_threshold: float = Field(0.5, ge=0, le=1)
    """Operating threshold: detections below it are not counted."""
    choose_threshold: bool = True
    """With a validation split, replace ``score_threshold`` by the one with the best mean F1 there."""


class DetectionExperimentConfig(RunConfig):
    task: Literal["detect", "detection"] = "detect"
    data: DetectionDataConfig = Field(default_factory=DetectionDataConfig)
    model: DetectorModelConfig = Field(default_factory=DetectorModelConfig)
    train: DetectionTrainConfig = Field(default_factory=DetectionTrainConfig)
    predict: DetectionPredictConfig = Field(default_factory=DetectionPredictConfig)


def load_detection_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DetectionExperimentConfig:
    """Read a detection YAML (or the defaults) and apply ``key=value`` overrides.

    Relative ``data.path``, ``model.weights``, ``model.backbone_weights`` and ``model.init``
    are resolved against the file's folder; with ``model.init``, what the config leaves unset
    comes from that bundle (:func:`resolve_detection_init`).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_config_file(path, [("data", "path"), ("model", "weights"), ("model", "backbone_weights"),
                                      ("model", "init")])
    config = build_config(DetectionExperimentConfig, raw, overrides, str(path) if path is not None else "defaults")
    return resolve_detection_init(config)


def resolve_detection_init(config: DetectionExperimentConfig) -> DetectionExperimentConfig:
    """With ``model.init``: ``model.name`` and ``model.options`` from that detector bundle, unless
    the config sets them (no torch; repeated calls change nothing)."""
    spec = config.model.init
    if not spec:
        return config
    update = init_updates(config.model, peek_init(spec, "detect"), spec)
    return config.model_copy(update={"model": config.model.model_copy(update=update)})
