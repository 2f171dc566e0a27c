"""docs/config.md names every key of the experiment configs: a key added to a pydantic model and not to
the page fails here."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from leukoscope.engine.config import ExperimentConfig
from leukoscope.engine.detection_config import DetectionExperimentConfig
from leukoscope.tasks.mil_config import MilConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"

#: Each config and the ``## `` section of the page that lists its keys.
CONFIGS = {"Classification": ExperimentConfig, "Detection": DetectionExperimentConfig, "Multiple-instance": MilConfig}


def _models_in(annotation: typing.Any) -> list[tuple[type[BaseModel], bool]]:
    """The pydantic models an annotation holds, each with whether it sits inside a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    in_list = typing.get_origin(annotation) is list
    found = []
    for arg in typing.get_args(annotation):
        found += [(model, in_list or listed) for model, listed in _models_in(arg)]
    return found


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of ``model``, dotted (``train.lr``); a list of sections is ``compare.models[].label``."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        for section, listed in _models_in(field.annotation):
            keys += config_keys(section, f"{prefix}{name}{'[]' if listed else ''}.")
    return keys


def doc_sections() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def test_walk_finds_nested_and_listed_sections():
    keys = config_keys(ExperimentConfig)
    assert {"train.lr", "features.k_best", "search.models", "compare.models[].overrides"} <= set(keys)


@pytest.mark.parametrize("title", list(CONFIGS))
def test_every_config_key_is_in_docs_config(title):
    sections = doc_sections()
    assert title in sections, f"docs/config.md has no '## {title}' section"
    named = set(re.findall(r"`([^`]+)`", sections[title]))
    missing = [key for key in config_keys(CONFIGS[title]) if key not in named]
    assert not missing, f"docs/config.md, '## {title}', does not name: {', '.join(missing)}"
