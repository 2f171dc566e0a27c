"""Models that ship inside the package: ``pretrained:NAME`` wherever a bundle folder is taken.

A shipped model is an ordinary leukoscope bundle folder (see :mod:`leukoscope.bundle`)
installed as package data, with a model card beside it::

    leukoscope/pretrained/
      smear-detector/      bundle.json, model.safetensors, MODEL_CARD.md
      wbc-classifier/      bundle.json, model.safetensors, MODEL_CARD.md

``leukoscope analyze smear.jpg`` with no model flags uses :data:`DEFAULT_DETECTOR` and
:data:`DEFAULT_CLASSIFIER`; ``predict --bundle``, ``evaluate --bundle``, ``analyze
--detector/--classifier``, ``serve --bundle/--detector``, ``train --init`` and the configs'
bundle keys (``model.init``, ``locate.detector``) take ``pretrained:NAME`` as well as a
folder. ``leukoscope models --pretrained`` lists what this install ships and ``leukoscope
models --card NAME`` prints a model's card.

The environment variable ``LEUKOSCOPE_PRETRAINED_DIR`` replaces the package folder by
another one of the same layout (tests use it with tiny generated bundles; a site can use
it to ship its own models without rebuilding the package).

This module imports no torch and reads ``bundle.json`` itself (:func:`peek_bundle`): the
CLI resolves and checks ``pretrained:NAME`` before torch is loaded. The full reader, with
every check, stays :func:`leukoscope.bundle.read_bundle_info`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The prefix that names a shipped model instead of a folder: ``pretrained:wbc-classifier``.
PREFIX = "pretrained:"
#: The white-cell detector that ``leukoscope analyze`` uses when given no ``--detector``.
DEFAULT_DETECTOR = "smear-detector"
#: The white-cell classifier that ``leukoscope analyze`` uses when given no ``--classifier``.
DEFAULT_CLASSIFIER = "wbc-classifier"
#: Environment variable: a folder to take the shipped models from instead of the package's.
ENV_VARIABLE = "LEUKOSCOPE_PRETRAINED_DIR"
CARD_FILE = "MODEL_CARD.md"
BUNDLE_JSON = "bundle.json"
#: What to do when a shipped model is missing: named in every such error.
RETRAIN_HINT = "retrain with python bench/zoo.py"
#: What version-1 bundles called their task (as :mod:`leukoscope.bundle` reads them).
_TASK_NAMES = {None: "classify", "classification": "classify", "detection": "detect"}


class PretrainedError(ValueError):
    """A shipped model is unknown or missing, or a bundle folder cannot be read."""


@dataclass(frozen=True)
class BundlePeek:
    """What ``bundle.json`` says, read without torch (no check beyond the JSON and its keys)."""

    path: Path
    task: str
    model_name: str
    classes: list[str]
    framework: str = "torch"
    model_options: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None
    """A classifier's ``image_size``, ``mean``, ``std``, ``segmentation`` (None for a detector)."""


@dataclass(frozen=True)
class PretrainedModel:
    """One shipped model: its folder, what it does, and its card."""

    name: str
    task: str
    """``classify`` or ``detect``."""
    path: Path
    card: Path | None
    """``MODEL_CARD.md``, when the folder has one."""
    size_bytes: int
    """All files of the folder together."""
    summary: str
    """The card's first line that is not a heading (empty without a card)."""
    classes: list[str] = field(default_factory=list)
    model_name: str = ""

    @property
    def spec(self) -> str:
        return PREFIX + self.name


def pretrained_root() -> Path:
    """The folder the shipped models are read from: ``$LEUKOSCOPE_PRETRAINED_DIR``, else the package's."""
    override = os.environ.get(ENV_VARIABLE)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().with_name("pretrained")


def is_pretrained_spec(spec: str | Path | None) -> bool:
    """Whether ``spec`` names a shipped model (``pretrained:NAME``) rather than a folder."""
    return spec is not None and str(spec).startswith(PREFIX)


def shipped_spec(directory: str | Path) -> str | None:
    """``pretrained:NAME`` when ``directory`` is a shipped model's own folder (inside the installed package,
    where nothing may be written), else None."""
    directory = Path(directory).resolve()
    return PREFIX + directory.name if directory.parent == pretrained_root().resolve() else None


def export_advice(directory: str | Path, export_format: str) -> str:
    """The command that gives ``directory`` a graph, and the folder to use as the bundle then: the export
    writes ``<bundle>-<format>`` beside it (or, for a shipped model, a folder of its own: the package's
    folder stays as installed). Said without naming an option: the bundle may have come from --bundle,
    --classifier or --detector."""
    shipped = shipped_spec(directory)
    if shipped is None:
        directory = Path(directory)
        exported = directory.parent / f"{directory.name}-{export_format}"
        return (f"run `leukoscope export --bundle {directory} --format {export_format}` first (it writes "
                f"{exported}) and give that folder as the bundle")
    name = f"{shipped[len(PREFIX):]}-{export_format}"
    return (f"it is a shipped model: run `leukoscope export --bundle {shipped} --format {export_format} --out "
            f"{name}` first and give {name} as the bundle")


def peek_bundle(directory: str | Path) -> BundlePeek:
    """The task, architecture, classes and preprocessing of a bundle folder, from its JSON only."""
    directory = Path(directory)
    path = directory / BUNDLE_JSON
    if not directory.is_dir():
        raise PretrainedError(f"{directory}: bundle folder does not exist")
    if not path.is_file():
        raise PretrainedError(f"{directory}: not a leukoscope bundle (no {BUNDLE_JSON})")
    try:
        payload = json.loads(path.read_text())
        task = _TASK_NAMES.get(payload.get("task"), payload.get("task"))
        return BundlePeek(directory, str(task), str(payload["model_name"]), [str(c) for c in payload["classes"]],
                          str(payload.get("framework", "torch")), dict(payload.get("model_options") or {}),
                          payload.get("preprocessing"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise PretrainedError(f"{path}: not a readable bundle description ({type(exc).__name__}: {exc})") from None


def card_summary(card: Path) -> str:
    """The first line of a Markdown card that is neither blank, a heading, front matter nor a comment, as
    plain text (emphasis and code marks dropped: it is shown in a terminal's table)."""
    lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
    if lines and lines[0].strip() == "---":  # YAML front matter, as Hugging Face cards have
        closing = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), 0)
        lines = lines[closing + 1:]
    for line in lines:
        text = line.strip()
        if text and not text.startswith(("#", "<!--", "---", "===")):
            return re.sub(r"(\*\*|__|`)(.+?)\1", r"\2", text)
    return ""


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _describe(folder: Path) -> PretrainedModel:
    peek = peek_bundle(folder)
    card = folder / CARD_FILE
    return PretrainedModel(folder.name, peek.task, folder, card if card.is_file() else None, _folder_size(folder),
                           card_summary(card) if card.is_file() else "", peek.classes, peek.model_name)


def list_pretrained() -> list[PretrainedModel]:
    """Every shipped model (a sub-folder with a ``bundle.json``), by name; none when the folder is empty."""
    root = pretrained_root()
    if not root.is_dir():
        return []
    return [_describe(folder) for folder in sorted(root.iterdir())
            if folder.is_dir() and (folder / BUNDLE_JSON).is_file()]


def pretrained_names() -> list[str]:
    root = pretrained_root()
    if not root.is_dir():
        return []
    return sorted(f.name for f in root.iterdir() if f.is_dir() and (f / BUNDLE_JSON).is_file())


def _not_shipped(name: str) -> str:
    names = pretrained_names()
    shipped = f"shipped: {', '.join(names)}" if names else f"{pretrained_root()} holds none"
    return f"no shipped model {name!r} in this install ({shipped})"


def missing_message(name: str, option: str | None = None) -> str:
    """Why ``name`` cannot be used, and what to do instead (``option``: the flag or key that takes a bundle).
    Said whether or not that flag was given (``--init pretrained:nope``): "pass --init" read as if it was not."""
    instead = f"give {option} a bundle folder" if option else "give a bundle folder"
    return f"{_not_shipped(name)}; {instead} or {RETRAIN_HINT}"


def pretrained_path(name: str, *, option: str | None = None) -> Path:
    """The folder of shipped model ``name``; a clear error naming the shipped ones when it is not there."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise PretrainedError(f"{PREFIX}{name}: give a model name, e.g. {PREFIX}{DEFAULT_CLASSIFIER} "
                              f"(`leukoscope models --pretrained` lists them)")
    folder = pretrained_root() / name
    if not (folder / BUNDLE_JSON).is_file():
        raise PretrainedError(missing_message(name, option))
    return folder


def resolve_bundle(spec: str | Path, *, option: str | None = None) -> Path:
    """``pretrained:NAME`` -> the shipped model's folder; any other value is a path, returned as it is."""
    if is_pretrained_spec(spec):
        return pretrained_path(str(spec)[len(PREFIX):], option=option)
    return Path(spec)


def model_card(name: str) -> str:
    """The Markdown text of a shipped model's card (``name`` with or without ``pretrained:``)."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if name not in pretrained_names():
        raise PretrainedError(_not_shipped(name))
    folder = pretrained_root() / name
    card = folder / CARD_FILE
    if not card.is_file():
        raise PretrainedError(f"shipped model {folder.name!r} has no {CARD_FILE} (in {folder})")
    return card.read_text(encoding="utf-8", errors="replace")
