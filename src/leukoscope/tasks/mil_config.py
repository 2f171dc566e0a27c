"""The config of a multiple-instance run (``leukoscope mil``): field labels -> a cell classifier.

```yaml
task: mil
name: mil-taleqani              # run folder <output_root>/<name>-<time>
data: {path: fields/, ratios: [0.8, 0.1, 0.1], class_map: {Early: Malignant}}
locate: {detector: null}        # colour segmentation; or a detector bundle (crops as smear analysis makes them)
model: {name: abas_cnn, cell_size: 64, field_size: 128}
train: {epochs: 20, lr: 0.001, batch_size: 32, max_minutes: null}
compare: {whole_image: true, bundle: null}
```
Validated like every other config: unknown keys fail with the closest valid key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator

from leukoscope.engine.config import RunConfig, Section, build_config, image_size_in_range, read_config_file


class MilDataConfig(Section):
    path: str | None = None
    """Labelled fields: a class-per-folder tree or a CSV manifest."""
    ratios: list[float] = Field(default_factory=lambda: [0.8, 0.1, 0.1])
    split_seed: int = 0
    """Seeds the field split and both classifiers' training."""
    near_duplicates: bool = True
    class_map: dict[str, str] | None = None
    """Merge field labels, e.g. ``{Early: Malignant, Pre: Malignant, Pro: Malignant}``."""


class MilLocateConfig(Section):
    detector: str | None = None
    """A detector bundle to find the white cells; default: colour segmentation (LAB k-means)."""


class MilModelConfig(Section):
    name: str = "abas_cnn"
    cell_size: int = 64
    field_size: int = 128
    """Input size of the whole-image classifier trained beside it."""

    _sizes = field_validator("cell_size", "field_size")(image_size_in_range)


class MilTrainConfig(Section):
    epochs: int = 20
    lr: float = Field(1e-3, gt=0)
    batch_size: int = 32
    max_minutes: float | None = Field(None, gt=0)
    """Time budget of each classifier (cells, and the whole-image one)."""


class MilCompareConfig(Section):
    whole_image: bool = True
    """Also train a whole-image classifier on the same field split and budget."""
    bundle: str | None = None
    """Also score this whole-image classifier bundle on the same test fields (refused if it saw any)."""


class MilConfig(RunConfig):
    task: Literal["mil"] = "mil"
    data: MilDataConfig = Field(default_factory=MilDataConfig)
    locate: MilLocateConfig = Field(default_factory=MilLocateConfig)
    model: MilModelConfig = Field(default_factory=MilModelConfig)
    train: MilTrainConfig = Field(default_factory=MilTrainConfig)
    compare: MilCompareConfig = Field(default_factory=MilCompareConfig)


def load_mil_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> MilConfig:
    """Read a MIL YAML (or the defaults) and apply ``key=value`` overrides; relative paths
    are resolved against the file's folder."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_config_file(path, [("data", "path"), ("locate", "detector"), ("compare", "bundle")])
    return build_config(MilConfig, raw, overrides, str(path) if path is not None else "defaults")
