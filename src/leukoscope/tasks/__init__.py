"""The task x mode table: which function trains, evaluates or loads the config of each task.

``leukoscope train`` / ``evaluate`` look the task up here, from a config's
``task:`` key, a model's registry kind or a bundle's ``task``, instead of
choosing by hand. Entries are import paths, resolved on use, so that the CLI
can check its arguments before anything heavy (torch) is imported.

======== ============================== ======================================= ==============================
task     config (load_config)           train                                   evaluate (a bundle on data)
======== ============================== ======================================= ==============================
classify engine.config.load_config      tasks.classify.run_experiment           tasks.classify.evaluate_bundle
detect   engine.detection_config.load.. tasks.detect.run_detection_experiment   tasks.detect.evaluate_detector_bundle
mil      tasks.mil_config.load_mil_..   tasks.mil.run_mil_from_config           (a cell classifier bundle)
======== ============================== ======================================= ==============================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml


@dataclass(frozen=True)
class Task:
    name: str
    load_config: str
    train: str
    evaluate: str | None

    def function(self, mode: str) -> Callable[..., Any]:
        """The function behind ``mode`` (``load_config``, ``train`` or ``evaluate``)."""
        target = getattr(self, mode)
        if target is None:
            raise ValueError(f"the {self.name} task has no {mode} mode")
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)


TASKS: dict[str, Task] = {
    "classify": Task("classify", "leukoscope.engine.config:load_config",
                     "leukoscope.tasks.classify:run_experiment", "leukoscope.tasks.classify:evaluate_bundle"),
    "detect": Task("detect", "leukoscope.engine.detection_config:load_detection_config",
                   "leukoscope.tasks.detect:run_detection_experiment",
                   "leukoscope.tasks.detect:evaluate_detector_bundle"),
    "mil": Task("mil", "leukoscope.tasks.mil_config:load_mil_config", "leukoscope.tasks.mil:run_mil_from_config",
                None),
}
#: Other spellings of task names in configs (version-1 detection configs say ``detection``).
TASK_ALIASES = {"classification": "classify", "detection": "detect"}


def task_named(name: str) -> Task:
    name = TASK_ALIASES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


def task_of_config_file(path: str | Path) -> str:
    """The ``task:`` of a YAML config (``classify`` when it has none); no validation beyond that."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file must be a mapping of sections (data:, model:, train:, ...)")
    return task_named(str(raw.get("task", "classify"))).name


def task_of_model(name: str) -> str:
    """``detect`` for a registered detector, else ``classify`` (unknown names fail later, clearly)."""
    from leukoscope.models import model_entry

    try:
        return "detect" if model_entry(name).kind == "detector" else "classify"
    except ValueError:
        return "classify"
