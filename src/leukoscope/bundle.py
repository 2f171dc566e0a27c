"""Model bundles: a trained model as a self-describing directory, for every task.

```
bundle/
  bundle.json        task, architecture, classes, preprocessing, calibration, metrics, provenance
  model.safetensors  weights of a torch model (no pickle: safe to load from an untrusted source)
  model.skops        or: the fitted scikit-learn pipeline of a classical model
  ood.safetensors    optional: out-of-distribution statistics (class means, precision matrix; one pair
                     per part of the embedding when its ``ood`` entry names ``stages``)
  model.onnx         optional: the same classifier (a detector's dense part) as an ONNX graph
                     (`leukoscope export`)
  model.xml, .bin    or: a classifier as an OpenVINO IR graph (`leukoscope export --format openvino`)
```

This module is the only reader and writer of bundles: classifiers (``task:
classify``, torch or scikit-learn) and cell detectors (``task: detect``).

Why skops and not pickle/joblib for classical models: unpickling runs whatever
code the file names, so a bundle from elsewhere could take over the machine.
skops stores the pipeline as data and, on loading, refuses every type that is
not on a trust list: skops' own defaults plus :data:`TRUSTED_SKLEARN_TYPES`.

Format versions: 2 writes ``task`` explicitly. Version 1 bundles (leukoscope 0.1
before the one-pipeline change) load unchanged: a classifier's ``bundle.json`` had
no ``task``, a detector's said ``"detection"``. Version 3 may add an ``ood`` entry and
``ood.safetensors`` (:mod:`leukoscope.evaluation.ood`), the training images' pixel
size (``um_per_px``) and a classifier's physical crop window
(``preprocessing.cell_window_um``, :mod:`leukoscope.cell_window`). A bundle with none
of them is still written as version 2, byte for byte as before, so older leukoscope
reads it; one with any says 3, so older leukoscope asks for an upgrade instead of
failing on an unknown field. Version-2 bundles load with none of them. Version 4 adds
an ``export`` entry: the record of an exported graph (``model.onnx``, written by
:mod:`leukoscope.inference.export`); only exported bundles say 4. Version 5 adds a
classifier's input style (``preprocessing.colour`` other than ``rgb``,
``preprocessing.standardize``); only bundles that set one say 5, and bundle.json
leaves the defaults out, so every other bundle reads as before. Version 6 adds stain
normalisation (``preprocessing.stain``), in the same way. Version 7 adds OOD statistics
that read the network's stages (the ``ood`` entry's ``stages`` and ``part_scales``, one
``means.<k>`` / ``precision.<k>`` pair per part in ``ood.safetensors``); only bundles
with such statistics say 7. Version 8 adds test-time views (``preprocessing.views``: outputs
averaged over a cell's rotations and mirror images, :func:`leukoscope.preprocessing.over_views`); only
bundles that set more than one say 8: an older leukoscope would read such a bundle one view at a time,
against a calibration and an OOD flag fitted on the average, so it must ask for an upgrade instead.
Version 9 adds the ``white_balance`` stain normalisation (:func:`leukoscope.stain.white_balance`); only
bundles that set it say 9.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import platform
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import leukoscope
from leukoscope.preprocessing import Preprocessing, framework_of
from leukoscope.pretrained import CARD_FILE, resolve_bundle

if TYPE_CHECKING:  # torch is imported where models are built or saved: reading a bundle needs none
    import torch
    from torch import nn

BUNDLE_FORMAT_VERSION = 9
#: What a bundle with nothing of version 3 is written as (readable by leukoscope before version 3).
FORMAT_2 = 2
#: What a bundle with OOD statistics, a pixel size or a crop window but no exported graph is written as.
FORMAT_3 = 3
#: What an exported bundle without an input style is written as.
FORMAT_4 = 4
#: What a bundle with an input style (colour, standardisation) but no stain normalisation is written as.
FORMAT_5 = 5
#: What a bundle with stain normalisation but no OOD stages is written as.
FORMAT_6 = 6
#: What a bundle with OOD stages but one test-time view is written as.
FORMAT_7 = 7
#: What a bundle with test-time views but no white balance is written as.
FORMAT_8 = 8
#: Versions this code reads (older ones are converted on reading; see the module docstring).
#: What a bundle with the white_balance stain normalisation is written as.
FORMAT_9 = BUNDLE_FORMAT_VERSION
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
BUNDLE_FILE = "bundle.json"
#: A classifier's recorded scores that change with its test-time views (``calibrate-ood --views`` drops them).
VIEW_DEPENDENT_METRICS = ("n", "accuracy", "macro_f1", "weighted_f1", "roc_auc_macro_ovr", "ece", "evaluated_on",
                          "accuracy_by_source", "images_per_second")
WEIGHTS_FILE = "model.safetensors"
SKLEARN_FILE = "model.skops"
OOD_FILE = "ood.safetensors"
ONNX_FILE = "model.onnx"
#: An exported detector's second graph: RoIAlign, box head and class layer (detector_export).
BOX_ONNX_FILE = "box_head.onnx"
#: An OpenVINO IR graph: the network (XML) and its weights (BIN).
OPENVINO_FILE = "model.xml"
OPENVINO_WEIGHTS_FILE = "model.bin"
#: Every file an exported graph may consist of (stale when the weights change; not copied).
GRAPH_FILES = (ONNX_FILE, BOX_ONNX_FILE, OPENVINO_FILE, OPENVINO_WEIGHTS_FILE)
TASKS = ("classify", "detect")
#: What version-1 bundles called their task.
_LEGACY_TASK_NAMES = {None: "classify", "classification": "classify", "detection": "detect"}
#: Builder options that point at files used only to initialise training: never stored.
_TRAINING_ONLY_OPTIONS = ("weights", "backbone_weights", "freeze_backbone", "scale_jitter")
#: How to use a bundle of each task (named in wrong-task errors).
_TASK_USE = {
    "classify": "a cell classifier: use it with `leukoscope predict`, `evaluate`, or `analyze --classifier`",
    "detect": "a cell detector: use it with `leukoscope analyze --detector` or `evaluate`",
}

_TASK_NOUN = {"classify": "a cell classifier bundle", "detect": "a cell detector bundle"}

#: Types beyond skops' defaults that leukoscope's classical pipelines contain.
TRUSTED_SKLEARN_TYPES: frozenset[str] = frozenset({
    "sklearn.feature_selection._univariate_selection.chi2",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
})


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, of another task or from an unknown format."""


@dataclass
class BundleInfo:
    """Everything ``bundle.json`` says. Classifiers need ``preprocessing``; detectors use
    ``score_threshold`` and their ``model_options`` (e.g. ``input_scale``)."""

    model_name: str
    classes: list[str]
    preprocessing: Preprocessing | None = None
    task: str = "classify"
    framework: str = "torch"
    """``torch`` (model.safetensors) or ``sklearn`` (model.skops, a classical pipeline)."""
    model_options: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    uncertain_threshold: float = 0.5
    score_threshold: float = 0.5
    """Detectors: operating threshold, detections below it are not counted."""
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    feature_spec: dict[str, Any] | None = None
    """Hand-made features of a classical model (:class:`leukoscope.classic.FeatureSpec`)."""
    um_per_px: float | None = None
    """Pixel size (micrometres) of the images the model was trained on, when known (format 3):
    smear analysis brings a field of another magnification to it before detection."""
    format_version: int = BUNDLE_FORMAT_VERSION
    ood: dict[str, Any] | None = None
    """Classifiers: the out-of-distribution entry (method, thresholds, how it was fitted);
    its arrays are in ``ood.safetensors``. None: no OOD flag (bundles before format 3)."""
    export: dict[str, Any] | None = None
    """The record of an exported inference graph (format, file, opset, inputs,
    outputs; format 4); None: torch (or scikit-learn) only."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BundleError(f"unknown bundle task {self.task!r} (expected one of {TASKS})")
        if self.task == "classify" and self.preprocessing is None:
            raise BundleError("a classifier bundle needs its preprocessing (image size, mean, std)")
        if self.framework != "torch" and self.preprocessing is not None and self.preprocessing.views != 1:
            raise BundleError(f"a classical model reads each image once: preprocessing.views must be 1, "
                              f"not {self.preprocessing.views}")
        # a hand-edited number: a temperature of 0 gave NaN confidences, a quoted one a TypeError at predict
        if not _is_number(self.temperature) or not self.temperature > 0:
            raise BundleError(f"temperature must be a number above 0, got {self.temperature!r}")
        if not _is_number(self.uncertain_threshold) or not 0.0 <= self.uncertain_threshold <= 1.0:
            raise BundleError(f"uncertain_threshold must be a number in [0, 1], got {self.uncertain_threshold!r}")
        for key in ("ood", "export"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), dict):
                raise BundleError(f"{key} must be a mapping, got {type(getattr(self, key)).__name__}")

    @property
    def input_scale(self) -> float:
        """Detectors: the factor images are scaled by before the network."""
        return float(self.model_options.get("input_scale", 0.5))

    @property
    def split_file(self) -> Path | None:
        """The split the model was trained on, when it was recorded."""
        recorded = self.provenance.get("split_file")
        return Path(recorded) if recorded else None

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        if self.task == "detect":  # keep a detector's bundle.json free of classifier-only fields
            for key in ("preprocessing", "temperature", "uncertain_threshold", "feature_spec"):
                payload.pop(key)
        # Fields of format 3 that are not set stay out: a format-2 bundle.json, as older
        # leukoscope wrote and reads it.
        for key in ("ood", "um_per_px", "export"):
            if payload.get(key) is None:
                payload.pop(key)
        preprocessing = payload.get("preprocessing")
        if preprocessing:
            for key, default in (("cell_window_um", None), ("colour", "rgb"), ("standardize", False), ("stain", None),
                                 ("views", 1)):
                if preprocessing.get(key) == default:
                    preprocessing.pop(key)
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any], source: Path) -> "BundleInfo":
        payload = dict(payload)
        version = payload.get("format_version")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > BUNDLE_FORMAT_VERSION
            raise BundleError(
                f"{source}: bundle format {version!r} is not supported: this leukoscope "
                f"{leukoscope.__version__} reads formats {list(READABLE_VERSIONS)}"
                + ("; upgrade leukoscope (pip install -U leukoscope)" if newer else ""))
        if version == 1:
            payload["task"] = _LEGACY_TASK_NAMES.get(payload.get("task"), payload.get("task"))
            payload["format_version"] = BUNDLE_FORMAT_VERSION
        try:
            if payload.get("preprocessing") is not None:
                payload["preprocessing"] = Preprocessing(**payload["preprocessing"])
            info = cls(**payload)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{source}: bundle.json is incomplete or has unknown fields: {exc}") from None
        if info.preprocessing is not None and info.preprocessing.views > 1 and version < FORMAT_8:
            raise BundleError(f"{source}: bundle.json says format {version} but sets {info.preprocessing.views} "
                              f"test-time views, which only format {FORMAT_8} and later have: it was edited by hand")
        if info.preprocessing is not None and info.preprocessing.stain == "white_balance" and version < FORMAT_9:
            raise BundleError(f"{source}: bundle.json says format {version} but sets the white_balance stain "
                              f"normalisation, which only format {FORMAT_9} has: it was edited by hand")
        return info


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def needs_format_3(info: BundleInfo) -> bool:
    """Whether the bundle records anything older leukoscope cannot read (see the module docstring)."""
    window = info.preprocessing.cell_window_um if info.preprocessing is not None else None
    return info.ood is not None or info.um_per_px is not None or window is not None


def contiguous_state(model: "nn.Module") -> "dict[str, torch.Tensor]":
    # safetensors refuses shared or non-contiguous storage; clone to be safe.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def provenance_now(framework: str = "torch") -> dict[str, str]:
    """When and with which versions a bundle was written."""
    versions = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "leukoscope": leukoscope.__version__, "python": platform.python_version()}
    if framework == "sklearn":
        import sklearn

        versions["scikit-learn"] = sklearn.__version__
    else:
        import torch

        versions["torch"] = torch.__version__
    return versions


def inference_options(options: dict[str, Any], model_name: str) -> dict[str, Any]:
    """The builder options a bundle needs: training-only ones dropped and every default
    written out, so that a later change of a default cannot silently change (or break)
    an existing bundle."""
    from leukoscope.models import model_entry

    resolved: dict[str, Any] = {}
    for name, parameter in inspect.signature(model_entry(model_name).builder).parameters.items():
        if name != "num_classes" and parameter.default is not inspect.Parameter.empty:
            resolved[name] = parameter.default
    resolved.update(options)
    return json.loads(json.dumps({k: v for k, v in resolved.items() if k not in _TRAINING_ONLY_OPTIONS}))


def save_bundle(directory: str | Path, model: Any, info: BundleInfo,
                ood_arrays: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (an ``nn.Module`` or a classical model) and ``info`` into ``directory``;
    with ``info.ood``, ``ood_arrays`` (numpy arrays) go to ``ood.safetensors``.

    Files go through temporary names, each replaced atomically, ``bundle.json``
    last: a folder with a ``bundle.json`` always has its weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if info.ood is not None and ood_arrays is None:
        raise ValueError("a bundle with an ood entry needs its arrays (ood_arrays)")
    info.framework = framework_of(model)
    info.provenance = {**provenance_now(info.framework), **info.provenance}
    # New weights make any exported graph stale: it goes (re-export the new bundle).
    info.export = None
    for name in GRAPH_FILES:
        (directory / name).unlink(missing_ok=True)
    if info.framework == "sklearn":
        import skops.io as sio

        info.feature_spec = model.spec.model_dump(mode="json")
        weights_name = SKLEARN_FILE
        weights_tmp = directory / (weights_name + ".tmp")
        sio.dump(model.pipeline, weights_tmp)
    else:
        info.model_options = inference_options(info.model_options, info.model_name)
        weights_name = WEIGHTS_FILE
        weights_tmp = directory / (weights_name + ".tmp")
        from safetensors.torch import save_file

        save_file(contiguous_state(model), str(weights_tmp),
                  metadata={"model_name": info.model_name, "task": info.task})
    weights_tmp.replace(directory / weights_name)
    _write_ood_and_json(directory, info, ood_arrays)
    return directory


def save_ood(directory: str | Path, entry: dict[str, Any], arrays: dict[str, Any], *, views: int | None = None,
             temperature: float | None = None, note: str = "") -> BundleInfo:
    """Add (or replace) the OOD statistics of an existing classifier bundle: ``ood.safetensors``
    and the ``ood`` entry of ``bundle.json`` (which becomes format 3). With ``views``, the bundle's
    test-time views and the ``temperature`` fitted with them are written in the same ``bundle.json``
    (format 8 for more than one view), ``note`` recorded in its provenance (``views``): the statistics,
    the temperature and the views are one calibration and never stored apart. Test scores measured with
    other views (:data:`VIEW_DEPENDENT_METRICS`) are dropped from its metrics."""
    directory = resolve_bundle(directory)
    info = read_bundle_info(directory, task="classify")
    info.ood = dict(entry)
    if views is not None:
        if temperature is None:
            raise ValueError("new test-time views need the temperature fitted with them")
        if views != 1 and info.framework != "torch":  # before anything is written: BundleInfo would refuse it
            raise BundleError(f"a classical model reads each image once: views must be 1, not {views}")
        before = info.preprocessing.views
        info.preprocessing = replace(info.preprocessing, views=views)
        info.temperature = float(temperature)
        info.provenance = {**info.provenance, "views": note or f"{views} test-time views"}
        if views != before:  # scores of another reading of the cells would pass for this one's
            info.metrics = {k: v for k, v in info.metrics.items() if k not in VIEW_DEPENDENT_METRICS}
    _write_ood_and_json(directory, info, arrays)
    return info


def _write_ood_and_json(directory: Path, info: BundleInfo, ood_arrays: dict[str, Any] | None) -> None:
    """``ood.safetensors`` (when ``info.ood``) then ``bundle.json``, each through a temporary name;
    without ``info.ood`` a stale OOD file of an earlier model is removed after the JSON."""
    import numpy as np
    from safetensors.numpy import save_file as save_numpy

    if info.ood is not None:
        info.ood = {**info.ood, "file": OOD_FILE}
        ood_tmp = directory / (OOD_FILE + ".tmp")
        save_numpy({k: np.ascontiguousarray(v) for k, v in (ood_arrays or {}).items()}, str(ood_tmp),
                   metadata={"task": info.task})
        ood_tmp.replace(directory / OOD_FILE)
    _write_json(directory, info)
    if info.ood is None:
        (directory / OOD_FILE).unlink(missing_ok=True)


def _write_json(directory: Path, info: BundleInfo) -> None:
    """``bundle.json`` through a temporary name, as the oldest format that holds all it says."""
    if info.preprocessing is not None and info.preprocessing.stain == "white_balance":
        info.format_version = FORMAT_9
    elif info.preprocessing is not None and info.preprocessing.views > 1:
        info.format_version = FORMAT_8
    elif (info.ood or {}).get("stages"):
        info.format_version = FORMAT_7
    elif info.preprocessing is not None and info.preprocessing.stain is not None:
        info.format_version = FORMAT_6
    elif info.preprocessing is not None and info.preprocessing.styled:
        info.format_version = FORMAT_5
    elif info.export is not None:
        info.format_version = FORMAT_4
    else:
        info.format_version = FORMAT_3 if needs_format_3(info) else FORMAT_2
    json_tmp = directory / (BUNDLE_FILE + ".tmp")
    json_tmp.write_text(json.dumps(info.to_json(), indent=2, default=str))
    json_tmp.replace(directory / BUNDLE_FILE)


def record_metrics(directory: str | Path, metrics: dict[str, Any], drop: Sequence[str] = ()) -> BundleInfo:
    """Replace scores a bundle records (the others kept, but those named in ``drop``), e.g. re-measured
    once its weights are stored as float16: the quality gate of ``analyze`` and the model card read them."""
    directory = Path(directory)
    info = read_bundle_info(directory)
    info.metrics = {**{k: v for k, v in info.metrics.items() if k not in drop}, **metrics}
    _write_json(directory, info)
    return info


def copy_bundle(source: str | Path, target: str | Path, *, with_info: bool = True) -> Path:
    """Copy the files of bundle ``source`` (a folder or ``pretrained:NAME``) into ``target``,
    ``bundle.json`` last (a folder with a ``bundle.json`` has all its files). An exported graph
    of the source is left behind: whoever copies is about to write its own. ``with_info=False``:
    everything but ``bundle.json`` (an export writes it, with its graph's record, once the graph is
    there: a folder left by an export that was killed is not a bundle, rather than the float model)."""
    import shutil

    source = resolve_bundle(source)
    info = read_bundle_info(source)  # a clear error for a folder that is not a bundle
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in (BUNDLE_FILE, *GRAPH_FILES) and not path.name.endswith(".tmp"):
            shutil.copy2(path, target / path.name)
    if not with_info:
        return target
    if info.export is None:
        shutil.copy2(source / BUNDLE_FILE, target / BUNDLE_FILE)  # byte for byte
    else:  # the graph stayed behind: the copy must not claim it
        info.export = None
        _write_json(target, info)
    return target


def save_export(directory: str | Path, record: dict[str, Any], source: BundleInfo | None = None) -> BundleInfo:
    """Record an exported graph (already written into ``directory``) in its ``bundle.json``,
    which becomes format 4, and in its model card when it has one (:func:`note_export_in_card`).
    ``source``: the exported bundle's record, for a ``directory`` that has no ``bundle.json`` yet
    (:func:`copy_bundle` with ``with_info=False``)."""
    directory = Path(directory)
    info = source if source is not None else read_bundle_info(directory)
    info.export = dict(record)
    _write_json(directory, info)
    note_export_in_card(directory, record)
    return info


#: The heading of the section an export adds to a copied model card (replaced by a later export).
EXPORT_CARD_HEADING = "## This export"


def note_export_in_card(directory: str | Path, record: dict[str, Any], check: list[str] | None = None) -> None:
    """Say in the bundle's ``MODEL_CARD.md`` (a shipped model's card travels with its export) what
    this copy runs and that the card's figures are the PyTorch model's: an int8 graph is another
    model, whose change only ``--check`` measures (its ``check`` lines are added when given)."""
    card = Path(directory) / CARD_FILE
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8").split(f"\n{EXPORT_CARD_HEADING}\n")[0].rstrip("\n")
    precision = str(record.get("precision", "float32"))
    detector = record.get("part") == "dense"
    graphs = "the dense part's and the box part's graphs" if detector else "its graph"
    # the data's folder name only: the card travels with the bundle, the full path stays in bundle.json
    calibration = f"{record.get('calibration_images')} images of `{Path(str(record.get('calibration_data'))).name}`"
    if precision != "int8":
        made = f"{graphs} as {record.get('format', 'onnx')}, float32"
    elif detector:
        made = (f"the dense part's graph as static int8 calibrated on {calibration}, the box part's fully "
                f"connected layers as dynamic int8 (no calibration)")
    else:
        made = f"{graphs} as {record.get('format', 'onnx')}, int8, calibrated on {calibration}"
    lines = [f"`leukoscope export` wrote this copy: {made}."]
    if precision == "int8":
        lines.append("The figures above are the float model's in PyTorch, not this graph's: int8 changes the "
                     "model's answers, so judge it by the accuracy (or AP) change that `leukoscope export --check "
                     "DATA` prints on your own images, or by `leukoscope evaluate --backend onnxruntime`.")
        fits = {method: fit for method, fit in (record.get("ood_threshold_fit") or {}).items() if isinstance(fit, dict)}
        if record.get("ood_thresholds") and fits:
            described = "; ".join(f"{method}: slope {fit['slope']:.3g}, correlation {fit['correlation']:.3g}"
                                  for method, fit in fits.items())
            lines.append(f"int8 moves the out-of-distribution scores, so the flag's thresholds were carried over "
                         f"to this graph: its scores of the calibration images against the float model's, fitted "
                         f"as a line ({described}).")
    else:
        lines.append("The figures above are the PyTorch model's; a float graph gives the same answers to rounding "
                     "(`leukoscope export --check DATA` prints the largest difference).")
    if check:
        lines += ["", "Parity check at export:", "", *(f"    {line}" for line in check)]
    card.write_text(f"{text}\n\n{EXPORT_CARD_HEADING}\n\n" + "\n".join(lines) + "\n", encoding="utf-8")


def model_identity(bundle: str | Path, backend: str = "torch") -> dict[str, Any]:
    """What a bundle's results depend on: the digest of its weights and its model options; a classifier's
    temperature and, when it has one, the digest of its out-of-distribution flag (:func:`ood_digest`:
    ``calibrate-ood`` refits it with the weights unchanged, and the flag decides which fields are sent to
    review) and its test-time views when it reads more than one; and, when ``backend`` (what runs it)
    runs an exported graph that is not float32 (an int8 export: another model in effect), that
    precision and the flag's thresholds carried over to it (``export.ood_thresholds``). A float graph
    gives torch's results, so it is not recorded. (The threshold of the "uncertain" answer is not here:
    a run may set its own; a service case records the one used, an archive the ``--threshold`` given.)"""
    directory = resolve_bundle(bundle)
    info = read_bundle_info(directory)
    identity: dict[str, Any] = {"weights_sha256": weights_digest(directory), "model_options": info.model_options}
    if info.task == "classify":
        identity["temperature"] = info.temperature
        if info.preprocessing is not None and info.preprocessing.views > 1:  # left out at 1: identities as before
            identity["views"] = info.preprocessing.views
        if info.ood is not None:
            identity["ood_sha256"] = ood_digest(directory, info)
    record = info.export or {}
    precision = str(record.get("precision", "float32"))
    if backend != "torch" and precision != "float32":
        identity["precision"] = precision
        if record.get("weight_bits") is not None:  # 7-bit weights give other results than full-range ones
            identity["weight_bits"] = record["weight_bits"]
        if record.get("ood_thresholds"):
            identity["ood_thresholds"] = record["ood_thresholds"]
    return identity


def weights_digest(directory: str | Path) -> str | None:
    """SHA-256 of a bundle's ``model.safetensors`` (None when it has none): what an export records of
    the weights its graph holds, and what an archive knows a model by."""
    weights = Path(directory) / WEIGHTS_FILE
    return file_digest(weights) if weights.is_file() else None


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks. (Not cached: a cache keyed by the file's times can miss a
    rewrite within one clock tick; hashing the shipped classifier's 11 MB takes under 10 ms here.)"""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


#: The keys of a bundle's ``ood`` entry that change its flag's answers (the others describe how it was fitted).
#: ``light``: the training images' light (:mod:`leukoscope.light`), which sends a field to review as the flag does.
_OOD_SCORING_KEYS = ("method", "thresholds", "normalize", "stages", "part_scales", "light")


def ood_digest(directory: str | Path, info: BundleInfo) -> str:
    """SHA-256 of what a classifier's out-of-distribution flag answers by: ``ood.safetensors`` and the
    scoring keys of its ``ood`` entry (method, thresholds, normalisation, stages, the parts' scales, the light)."""
    path = resolve_bundle(directory) / OOD_FILE
    if info.ood is None:
        raise BundleError(f"{directory}: {BUNDLE_FILE} names no OOD statistics")
    if not path.is_file():
        raise BundleError(f"{directory}: {BUNDLE_FILE} names OOD statistics but {OOD_FILE} is missing")
    entry = {key: info.ood[key] for key in _OOD_SCORING_KEYS if key in info.ood}
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode())
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: digest).hexdigest()


def check_export_matches(directory: str | Path, info: BundleInfo) -> None:
    """Refuse an exported bundle changed since its graph was made: ``model.safetensors`` is no longer
    the file the graph holds (``export.weights_sha256``), or ``model_options`` are no longer those it
    was built with (``export.model_options``, recorded since they are part of the graph, e.g. the box
    pooling's ``roi_sampling_ratio``), or its OOD statistics read other embedding stages than the
    graph's ``embedding`` output holds (``export.embedding_stages``; refitted by ``calibrate-ood``), or
    an int8 graph's OOD thresholds (``export.ood_thresholds``) were carried over from statistics refitted since.
    Its graph would give the old model's results while ``--backend torch``, its metrics and its
    calibration describe the new one. A bundle never exported has no graph to be stale."""
    if info.export is None:
        return
    record = info.export
    recorded = record.get("weights_sha256")
    changed = None
    if recorded and weights_digest(directory) not in (None, recorded):
        changed = f"{WEIGHTS_FILE} has changed"
    elif "model_options" in record and json.loads(json.dumps(info.model_options)) != record["model_options"]:
        changed = "its model_options have changed"
    elif info.ood is not None and list(info.ood.get("stages", [])) != list(record.get("embedding_stages", [])):
        # Graphs exported before stages existed record none: their embedding is the penultimate one.
        changed = (f"its OOD statistics now read the stages {info.ood.get('stages', []) or 'none'} and its graph "
                   f"gives {record.get('embedding_stages', []) or 'none'}")
    elif info.ood is not None and record.get("precision") == "int8" and "ood_sha256" not in record:
        # An export of before 2026-12-05, or statistics added since: the float thresholds over-flag on int8.
        changed = "its int8 graph has no OOD thresholds of its own for its OOD statistics"
    elif info.ood is not None and record.get("ood_thresholds") and record.get("ood_sha256") != ood_digest(directory,
                                                                                                          info):
        changed = "its OOD statistics have been refitted (the int8 graph's thresholds were set for the old ones)"
    if changed:
        raise BundleError(f"{directory}: {changed} since its graph was exported (the graph still holds the old "
                          f"model): run `leukoscope export` on the bundle again, or use --backend torch")


def load_ood_arrays(directory: str | Path, info: BundleInfo) -> dict[str, Any] | None:
    """The numpy arrays of ``ood.safetensors``; None for a bundle without an ``ood`` entry."""
    if info.ood is None:
        return None
    from safetensors.numpy import load_file as load_numpy

    path = resolve_bundle(directory) / OOD_FILE  # pretrained:NAME too, as the other readers
    if not path.is_file():
        raise BundleError(f"{directory}: {BUNDLE_FILE} names OOD statistics but {OOD_FILE} is missing")
    try:
        return load_numpy(str(path))
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated file
        raise BundleError(f"{path}: cannot read the OOD statistics: {exc}") from None


def read_bundle_info(directory: str | Path, task: str | None = None) -> BundleInfo:
    """The :class:`BundleInfo` of ``directory`` (a folder, or ``pretrained:NAME`` for a shipped
    model); with ``task``, a clear error if the bundle is of another task."""
    directory = resolve_bundle(directory)
    path = directory / BUNDLE_FILE
    if not directory.is_dir():
        raise BundleError(f"{directory}: bundle folder does not exist")
    if not path.is_file():
        raise BundleError(f"{directory}: not a leukoscope bundle (no {BUNDLE_FILE})")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BundleError(f"{path}: not a bundle description (a JSON object is expected)")
    info = BundleInfo.from_json(payload, path)
    if task is not None and info.task != task:
        raise BundleError(f"{directory} is {_TASK_USE[info.task]}; this needs {_TASK_NOUN[task]}")
    return info


def load_bundle(directory: str | Path, device: "str | torch.device" = "cpu",
                task: str | None = None) -> tuple[Any, BundleInfo]:
    """Rebuild the model of a bundle with its trained weights, in eval mode: an
    ``nn.Module``, or a :class:`leukoscope.models.classic.ClassicModel` for a classical bundle.
    ``directory`` may name a shipped model: ``pretrained:NAME`` (:mod:`leukoscope.pretrained`)."""
    directory = resolve_bundle(directory)
    info = read_bundle_info(directory, task)
    if info.framework == "sklearn":
        return _load_sklearn(directory, info), info
    if info.framework != "torch":
        raise BundleError(f"{directory}: unknown model framework {info.framework!r} (expected torch or sklearn)")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{directory}: weights file {WEIGHTS_FILE} is missing")
    from safetensors.torch import load_file

    from leukoscope.models import create_model

    try:
        model = create_model(info.model_name, num_classes=len(info.classes), **info.model_options)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{directory}: cannot build {info.model_name!r}: {exc}") from None
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated file
        raise BundleError(f"{weights}: cannot read weights: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{weights}: weights do not match {info.model_name}: {str(exc)[:300]}") from None
    _read_ood_stages(model, info, directory)
    return model.to(device).eval(), info


def _read_ood_stages(model, info: BundleInfo, directory: Path) -> None:
    """Give the model the embedding its OOD statistics were fitted on (their ``stages``)."""
    from leukoscope.models.embedding import EmbeddingError, set_embedding_stages

    stages = (info.ood or {}).get("stages", [])
    try:
        set_embedding_stages(model, stages)
    except EmbeddingError as exc:
        raise BundleError(f"{directory}: its OOD statistics read a stage the model lacks: {exc}") from None


def _load_sklearn(directory: Path, info: BundleInfo):
    """The classical model of a bundle, loaded with skops against the trust list."""
    import numpy as np
    import skops.io as sio

    from leukoscope.models.classic import ClassicModel

    path = directory / SKLEARN_FILE
    if not path.is_file():
        raise BundleError(f"{directory}: model file {SKLEARN_FILE} is missing")
    if info.feature_spec is None:
        raise BundleError(f"{directory}: a classical bundle needs a feature_spec in {BUNDLE_FILE}")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated file
        raise BundleError(f"{path}: cannot read the model: {exc}") from None
    refused = sorted(set(untrusted) - TRUSTED_SKLEARN_TYPES)
    if refused:
        raise BundleError(f"{path}: refusing to load types that are not on leukoscope's trust list: {refused}")
    try:
        pipeline = sio.load(path, trusted=list(untrusted))
    except Exception as exc:  # noqa: BLE001
        raise BundleError(f"{path}: cannot load the model: {exc}") from None
    try:
        model = ClassicModel(pipeline, info.feature_spec, len(info.classes), name=info.model_name)
    except ValueError as exc:
        raise BundleError(f"{directory}: invalid feature_spec: {exc}") from None
    n_in = getattr(pipeline, "n_features_in_", None)
    if n_in is not None and n_in != len(model.extractor):
        raise BundleError(f"{path}: the pipeline expects {n_in} features but feature_spec gives "
                          f"{len(model.extractor)}")
    known = np.asarray(getattr(pipeline, "classes_", []))
    if known.size and (known.min() < 0 or known.max() >= len(info.classes)):
        raise BundleError(f"{path}: the pipeline predicts classes {known.tolist()} but the bundle names "
                          f"{len(info.classes)}")
    return model
