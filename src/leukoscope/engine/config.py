"""Typed experiment configuration: YAML files validated by pydantic, ``key=value`` overrides.

Every section forbids unknown keys, so a typo such as ``train.epoch`` fails with
a message naming the key (and the closest valid one) instead of being ignored.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from leukoscope.classic.spec import FeatureSpec
from leukoscope.presets import AUGMENTATION_PRESETS
from leukoscope.pretrained import BundlePeek, PretrainedError, is_pretrained_spec, peek_bundle, resolve_bundle

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated. A number where a name is
    expected is taken as that name (``name=2024``, class folders ``[0, 1]``); true/false where a number is
    expected is refused (pydantic would read ``train.epochs=true`` as 1 epoch)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation)) | {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"must be a number, not {str(value).lower()}")
        return value


#: A classifier's input side, in pixels (an architecture may need more: alexnet 63).
IMAGE_SIZE_MIN, IMAGE_SIZE_MAX = 32, 1024


def image_size_in_range(value: int) -> int:
    """A classifier's input side: 32 to 1024 pixels."""
    if not IMAGE_SIZE_MIN <= value <= IMAGE_SIZE_MAX:
        raise ValueError(f"must be between {IMAGE_SIZE_MIN} and {IMAGE_SIZE_MAX} pixels")
    return value


class DataConfig(Section):
    path: str | None = None
    """A class-per-folder tree (``root/<class>/<image>``, C-NMC names give subjects) or a CSV manifest."""
    split_file: str | None = None
    """Where the split is saved and reused; default: ``<output_root>/splits/<dataset>-<settings>.json``."""
    ratios: list[float] = Field(default_factory=lambda: [0.8, 0.1, 0.1])
    split_seed: int = 0
    near_duplicates: bool = True
    phash_distance: int = Field(4, ge=0)
    on_corrupt: Literal["skip", "fail"] = "skip"
    max_pixels: int = Field(120_000_000, gt=0)
    classes: list[str] | None = None
    """Restrict to / order the classes; default: every class folder, sorted."""
    class_map: dict[str, str] | None = None
    """Merge labels, e.g. ``{Early: Malignant, Pre: Malignant, Pro: Malignant}``."""
    segmentation: Literal["lab_kmeans", "hsv"] | None = None
    cell_window_um: float | None = Field(None, gt=0)
    """The images are cell crops of this many micrometres around each cell (made with
    :func:`leukoscope.cell_window.crop_cell`, as ``bench/zoo.py`` does); recorded in the bundle
    so that smear analysis crops fields of any magnification the same way. None: plain images."""
    colour: Literal["rgb", "gray"] = "rgb"
    """``gray``: the model sees luminance only, so a lab's stain hue cannot be a cue."""
    standardize: bool = False
    """Each image to zero mean and unit variance, so a lab's brightness and contrast cannot be a cue."""
    stain: Literal["macenko", "white_balance"] | None = None
    """``macenko``: every image's stains rebuilt in one reference's colours; ``white_balance``: every
    image's background brought to one neutral white, its stain's colours kept (:mod:`leukoscope.stain`)."""


class ModelConfig(Section):
    name: str = "resnet18"
    weights: str | None = None
    init: str | None = None
    """Fine-tune a trained classifier: its bundle folder or ``pretrained:NAME``. The architecture,
    its options, the input size, normalisation and segmentation come from the bundle unless set
    here; its head is kept when the data has the bundle's classes (same order), else replaced."""
    freeze_backbone: bool = False
    image_size: int = 128
    options: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the model builder (e.g. ``dropout``)."""

    _size = field_validator("image_size")(image_size_in_range)


class TrainingBase(Section):
    """Settings every trainer shares (optimizer and schedule, time budget, seed, device, checkpoint);
    each task's train section adds its own and may change the defaults."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    epochs: int = 10
    batch_size: int = 32
    max_minutes: float | None = Field(None, gt=0)
    """Time budget in minutes (the best weights so far are kept); the schedule follows it when it
    ends before the epochs do."""
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|(cuda|mps|xpu)(:\d+)?)$")
    """auto (a GPU when there is one), cpu, or a torch accelerator: cuda, mps, xpu (``:N`` for one of several)."""
    deterministic: bool = True
    """While training on a GPU, PyTorch's deterministic kernels where it has them, so that a seed repeats
    a run up to the few ops that have none (the CPU's kernels are deterministic already); false:
    CUDA's faster default kernels, which a rerun does not repeat exactly."""
    threads: int | None = Field(None, ge=1)
    keep_checkpoint: bool = False
    """Keep ``checkpoint.pt`` once the run is complete (only needed to train further; hundreds of MB)."""

    @field_validator("epochs", "batch_size")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


class TrainConfig(TrainingBase):
    scheduler: Literal["none", "cosine", "onecycle"] = "none"
    class_weighted_loss: bool = True
    label_smoothing: float = Field(0.0, ge=0.0, le=1.0)
    augmentation: str = "default"
    monitor: Literal["val_accuracy", "val_macro_f1", "val_loss"] = "val_accuracy"
    early_stopping_patience: int | None = Field(None, ge=1)
    edge_copies: bool = False
    """System C: add a Sobel edge-map copy of every training image (training split only)."""

    @field_validator("augmentation")
    @classmethod
    def _preset(cls, value: str) -> str:
        if value not in AUGMENTATION_PRESETS:
            raise ValueError(f"unknown augmentation preset {value!r}; choose from {list(AUGMENTATION_PRESETS)}")
        return value


class SearchConfig(Section):
    """A grid over training settings (system E: epochs x learning rate x optimizer)."""

    epochs: list[Annotated[int, Field(ge=1)]] | None = None
    lr: list[Annotated[float, Field(gt=0)]] | None = None
    optimizer: list[Literal["adam", "adamw", "sgd"]] | None = None
    batch_size: list[Annotated[int, Field(ge=1)]] | None = None
    models: list[str] | None = None

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in type(self).model_fields)


#: Shown when ``leukoscope search`` is given nothing to search over.
SEARCH_EXAMPLE = """search:
  epochs: [5, 10]
  lr: [0.01, 0.001]
  optimizer: [sgd, adam]"""


class PredictConfig(Section):
    uncertain_threshold: float = Field(0.5, ge=0, le=1)
    """A prediction whose top probability is below this is reported as "uncertain"."""
    views: Literal[1, 4, 8] = 1
    """Test-time views: every output the mean over the cell's right-angle rotations (4) and their mirror
    images (8), at that many times the work per cell; the run's test scores, the temperature, the OOD
    flag and every later use of the bundle read them alike (each epoch's validation, which picks the
    best epoch, reads a cell once). 1: the image as it is."""


class CompareEntry(Section):
    """One row of ``leukoscope compare``: a model and settings of its own."""

    model: str
    label: str | None = None
    """Row name (default: the model name); needed to compare one model under two settings."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted keys for this row only, e.g. ``{train.epochs: 3, data.segmentation: lab_kmeans}``."""


class CompareConfig(Section):
    """Models trained on one split and compared by ``leukoscope compare``."""

    models: list[str | CompareEntry] = Field(default_factory=list)


class RunConfig(Section):
    """What every task's config has: the run's name and where runs go."""

    name: str | None = None
    """Run folder name (``<name>-<time>``); default: the model's name."""
    description: str = ""
    output_root: str = "runs"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ExperimentConfig(RunConfig):
    task: Literal["classify", "classification"] = "classify"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig | None = None
    predict: PredictConfig = Field(default_factory=PredictConfig)
    features: FeatureSpec = Field(default_factory=FeatureSpec)
    """Hand-made features of the classical models (``leukoscope.classic``)."""
    compare: CompareConfig | None = None

    @model_validator(mode="after")
    def _ratios(self) -> "ExperimentConfig":
        ratios = self.data.ratios
        if len(ratios) not in (2, 3) or abs(sum(ratios) - 1) > 1e-6 or min(ratios) < 0:
            raise ValueError(f"data.ratios must be 2 or 3 non-negative numbers summing to 1, got {ratios}")
        return self

    def require_search(self) -> SearchConfig:
        """The search section, refusing a grid with no list to vary: that would
        silently train the defaults once, for minutes, under a search's name."""
        if self.search is None or self.search.is_empty():
            raise ConfigError("nothing to search: the config has no search section with values to try; "
                              f"add one to the YAML file, e.g.\n{SEARCH_EXAMPLE}\n"
                              "or give it on the command line: search.lr=[0.01,0.001] search.epochs=[5,10]")
        return self.search


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                keys += _known_keys(candidate, prefix + name + ".")
    return keys


#: Names people reach for from other tools -> the key leukoscope uses. Consulted
#: before string similarity, which cannot see that ``learning_rate`` means ``lr``.
KEY_ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "learningrate": "lr",
    "lr_rate": "lr",
    "batch": "batch_size",
    "batchsize": "batch_size",
    "bs": "batch_size",
    "epoch": "epochs",
    "n_epochs": "epochs",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "patience": "early_stopping_patience",
    "wd": "weight_decay",
    "optim": "optimizer",
    "lr_scheduler": "scheduler",
    "img_size": "image_size",
    "input_size": "image_size",
    "size": "image_size",
    "arch": "name",
    "architecture": "name",
    "pretrained": "weights",
    "dataset": "path",
    "data_dir": "path",
    "root": "path",
    "augment": "augmentation",
    "augmentations": "augmentation",
}


def suggest_key(key: str, known: Sequence[str]) -> str | None:
    """The valid key a mistyped ``key`` most likely meant, or None.

    Compares leaf names within the key's own section (an alias first, then
    difflib), then the same leaf in another section (``train.image_size`` ->
    ``model.image_size``): whole dotted keys share their section prefix, so
    comparing them whole rates ``train.learning_rate`` closest to
    ``train.early_stopping_patience``.
    """
    section, _, leaf = key.rpartition(".")
    leaf = KEY_ALIASES.get(leaf.lower(), leaf)
    prefix = f"{section}." if section else ""
    siblings = [k[len(prefix):] for k in known if k.startswith(prefix) and "." not in k[len(prefix):]]
    if leaf in siblings and prefix + leaf != key:
        return prefix + leaf
    elsewhere = [k for k in known if k.rpartition(".")[2] == leaf and k != key]
    if elsewhere:
        return elsewhere[0]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    return prefix + close[0] if close else None


def format_validation_error(error: ValidationError, source: str, schema: type[BaseModel],
                             overrides: Sequence[str] = ()) -> str:
    """One line naming every bad key, each under where it came from: a command-line
    override or ``source`` (the file, or the defaults)."""
    known = _known_keys(schema)
    by_origin: dict[str, list[str]] = {}
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            close = suggest_key(key, known)
            hint = f" (did you mean '{close}'?)" if close else ""
            line = f"unknown config key '{key}'{hint}"
        elif key:
            line = f"config key '{key}': {item['msg']}"
        else:  # a check across keys (a model validator): its message names them
            line = str(item["msg"]).removeprefix("Value error, ")
        origin = _origin(item["loc"], overrides, line, unknown=item["type"] == "extra_forbidden")
        by_origin.setdefault(origin or source, []).append(line)
    return "; ".join(f"{origin}: " + "; ".join(lines) for origin, lines in by_origin.items())


def _origin(loc: tuple[Any, ...], overrides: Sequence[str], message: str = "", *,
            unknown: bool = False) -> str | None:
    """``command-line override 'train.lrr=0.1'`` when the last override setting
    ``loc`` (or a section containing it; with ``unknown``, ``loc`` being a key no schema has, also an
    override of a key inside it: ``trian.epochs=3`` made section ``trian``) is what made it invalid, or,
    for a check across keys (empty ``loc``), the last override of a key its ``message`` names; else None."""
    path = [str(part) for part in loc]
    for item in reversed(overrides):  # the last override of a key wins, as in the merge
        key = item.partition("=")[0].strip()
        parts = key.split(".")
        if path and (path[:len(parts)] == parts or (unknown and parts[:len(path)] == path)):
            return f"command-line override '{item}'"
        if not path and key and key in message:
            return f"command-line override '{item}'"
    return None


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "model.name=resnet18"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc.__class__.__name__}); quote it, "
                              f"e.g. {key.strip()}='\"...\"'") from None
        set_dotted(tree, key.strip(), value)
    return tree


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_file(path: str | Path, path_keys: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The mapping in a YAML experiment file, with the relative paths at ``path_keys``
    (``(section, key)`` pairs) and ``output_root`` resolved against the file's folder, so configs run
    from any working directory (an ``output_root=...`` override stays the working directory's)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8"), path) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for section, key in path_keys:
        # a section absent, or written as one value: the model check says so
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw[section][key] = _from_folder(path.parent, key, raw[section][key])
    for key in TOP_LEVEL_PATH_KEYS:
        if key in raw:
            raw[key] = _from_folder(path.parent, key, raw[key])
    return raw


#: Paths at the top level of every task's config (:class:`RunConfig`), read from the file's folder as the
#: sections' paths are: the same config wrote its runs to a place that depended on where it was started.
TOP_LEVEL_PATH_KEYS = ("output_root",)


def _from_folder(folder: Path, key: str, value: Any) -> Any:
    """A relative path ``value`` at ``key`` made absolute against ``folder``; other values as they are."""
    if not isinstance(value, str) or not value or Path(value).is_absolute() or is_pretrained_spec(value):
        return value
    if key in WEIGHT_NAME_KEYS and not _looks_like_path(value):  # a torchvision weights name
        return value
    return str((folder / value).resolve())  # a bare "cells" too: the file's folder's


def _load_yaml(text: str, path: Path) -> Any:
    """``text`` parsed as safe YAML, refusing a key written twice in one mapping: PyYAML keeps the last, so a
    section added at the end of a file (a second ``train:``) silently dropped the first one's settings."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: Path, prefix: str = "") -> None:
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path, prefix)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        name, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if name in first:
            what = "section" if not prefix and isinstance(value_node, yaml.MappingNode) else "key"
            raise ConfigError(f"{path}: line {line}: {what} {name!r} appears twice (first at line {first[name]}); "
                              f"merge them (YAML would keep only the last)")
        first[name] = line
        _refuse_duplicate_keys(value_node, path, f"{name}.")


def build_config(schema: type[ConfigT], raw: dict[str, Any], overrides: Sequence[str], source: str) -> ConfigT:
    """Validate ``raw`` with ``key=value`` overrides applied; errors name the bad keys."""
    try:
        return schema.model_validate(merge_trees(raw, parse_overrides(overrides)))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, schema, overrides)) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults) and apply ``key=value`` overrides.

    Relative ``data.path`` / ``data.split_file`` / ``model.weights`` / ``model.init`` / ``output_root`` in a
    file are resolved against the file's folder; with ``model.init``, what the config leaves
    unset comes from that bundle (:func:`resolve_init`).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_config_file(path, [("data", "path"), ("data", "split_file"), ("model", "weights"),
                                      ("model", "init")])
        task = raw.get("task", "classify")
        if task not in ("classify", "classification"):  # another task's schema: say which command runs it
            raise ConfigError(f"{path}: a {task!r} experiment, not a classification one; run it with "
                              f"`leukoscope train --config {path}`")
    return resolve_init(build_config(ExperimentConfig, raw, overrides, str(path) if path is not None else "defaults"))


# --------------------------------------------------------------------------- model.init
def peek_init(spec: str, task: str) -> BundlePeek:
    """The bundle ``model.init`` names (a folder or ``pretrained:NAME``), read without torch; a
    :class:`ConfigError` when it is missing, of another task, or a classical model."""
    try:
        peek = peek_bundle(resolve_bundle(spec, option="model.init"))
    except PretrainedError as exc:
        raise ConfigError(f"model.init: {exc}") from None
    if peek.task != task:
        kinds = {"classify": "a cell classifier", "detect": "a cell detector"}
        raise ConfigError(f"model.init {spec} is {kinds.get(peek.task, peek.task)} bundle; this {task} run "
                          f"starts from {kinds[task]} bundle")
    if peek.framework != "torch":
        raise ConfigError(f"model.init {spec} is a classical model ({peek.model_name}): only a CNN bundle can be "
                          f"fine-tuned; train a classical model from the data alone")
    return peek


def init_updates(model: BaseModel, peek: BundlePeek, spec: str) -> dict[str, Any]:
    """What ``model.init``'s bundle gives a model section (``name``, merged ``options``): the
    config's own ``name`` must be the bundle's, its ``options`` win over the bundle's."""
    if getattr(model, "weights", None) or getattr(model, "backbone_weights", None):
        raise ConfigError(f"model.init {spec} already gives the starting weights: drop model.weights "
                          f"and model.backbone_weights, or model.init")
    if "name" in model.model_fields_set and model.name != peek.model_name:
        raise ConfigError(f"model.init {spec} is a {peek.model_name} bundle, but model.name is {model.name}: "
                          f"drop model.name (it comes from the bundle) or start from a {model.name} bundle")
    return {"name": peek.model_name, "options": {**peek.model_options, **model.options}}


def resolve_init(config: ExperimentConfig) -> ExperimentConfig:
    """With ``model.init``: ``model.name``, ``model.options``, ``model.image_size``,
    ``data.segmentation``, ``data.cell_window_um``, ``data.colour``, ``data.standardize``,
    ``data.stain`` and ``predict.views`` from that bundle, unless the config sets them. Reads only
    the bundle's JSON (no torch); repeated calls change nothing. The weights are loaded by the learner."""
    spec = config.model.init
    if not spec:
        return config
    peek = peek_init(spec, "classify")
    model = init_updates(config.model, peek, spec)
    preprocessing = peek.preprocessing or {}
    if "image_size" not in config.model.model_fields_set and preprocessing.get("image_size"):
        try:
            model["image_size"] = image_size_in_range(int(preprocessing["image_size"]))
        except ValueError as exc:
            raise ConfigError(f"model.init {spec}: its image size {preprocessing['image_size']} {exc}; "
                              f"set model.image_size") from None
    update: dict[str, Any] = {"model": config.model.model_copy(update=model)}
    # The crops a fine-tuned shipped classifier sees in analysis (and in the service's export)
    # are its physical window: keep recording it.
    data = {key: preprocessing[key] for key in ("segmentation", "cell_window_um", "colour", "standardize", "stain")
            if key not in config.data.model_fields_set and preprocessing.get(key)}
    if data:
        update["data"] = config.data.model_copy(update=data)
    if "views" not in config.predict.model_fields_set and preprocessing.get("views", 1) != 1:
        update["predict"] = config.predict.model_copy(update={"views": int(preprocessing["views"])})
    return config.model_copy(update=update)


#: Keys that take a torchvision weights name ("DEFAULT", "IMAGENET1K_V1") as well as a file.
WEIGHT_NAME_KEYS = frozenset({"weights", "backbone_weights"})


def _looks_like_path(value: str) -> bool:
    # torchvision weight names ("DEFAULT", "IMAGENET1K_V1") are not paths.
    return "/" in value or "." in value


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write a (resolved) experiment config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
