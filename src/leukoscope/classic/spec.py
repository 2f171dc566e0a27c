"""Which hand-made features to compute: the ``features:`` section of an experiment.

Kept free of heavy imports (no scikit-image, no torch) because the experiment
config imports it on every command.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

#: Every feature family, in the order their columns appear in a feature vector.
FEATURE_FAMILIES: tuple[str, ...] = ("histogram", "dft", "glcm", "lbp", "shape")

HISTOGRAM_SPACES: tuple[str, ...] = ("rgb", "hsv", "lab")


class FeatureSpec(BaseModel):
    """Feature families and their settings (validated; unknown keys are errors).

    ``k_best`` is the number of features kept by the chi-square ``SelectKBest``
    step of every classical pipeline (``"all"`` keeps every feature; a number
    larger than the feature count keeps them all too).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    families: list[str] = list(FEATURE_FAMILIES)
    histogram_bins: int = 16
    histogram_spaces: list[Literal["rgb", "hsv", "lab"]] = ["rgb", "hsv"]
    dft_bins: int = 16
    glcm_levels: int = 32
    glcm_distances: list[int] = [1, 2, 4]
    lbp_points: int = 8
    lbp_radii: list[int] = [1, 2, 3]
    k_best: int | Literal["all"] = 100

    @field_validator("families")
    @classmethod
    def _families(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in FEATURE_FAMILIES]
        if unknown:
            raise ValueError(
                f"unknown feature famil{'y' if len(unknown) == 1 else 'ies'} "
                f"{', '.join(repr(u) for u in unknown)}; choose from {list(FEATURE_FAMILIES)}"
            )
        if not value:
            raise ValueError(f"at least one feature family is needed; choose from {list(FEATURE_FAMILIES)}")
        # Canonical order and no repeats: the same spec always gives the same columns.
        return [name for name in FEATURE_FAMILIES if name in value]

    @field_validator("histogram_bins")
    @classmethod
    def _bins(cls, value: int) -> int:
        if not 2 <= value <= 256:
            raise ValueError("histogram_bins must be between 2 and 256")
        return value

    @field_validator("dft_bins")
    @classmethod
    def _dft_bins(cls, value: int) -> int:
        if not 1 <= value <= 256:
            raise ValueError("dft_bins must be between 1 and 256")
        return value

    @field_validator("glcm_levels")
    @classmethod
    def _levels(cls, value: int) -> int:
        if not 2 <= value <= 256:
            raise ValueError("glcm_levels must be between 2 and 256")
        return value

    @field_validator("histogram_spaces", "glcm_distances", "lbp_radii")
    @classmethod
    def _non_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("must not be empty")
        if any(isinstance(v, int) and v < 1 for v in value):
            raise ValueError("distances and radii must be at least 1 pixel")
        return list(dict.fromkeys(value))

    @field_validator("lbp_points")
    @classmethod
    def _points(cls, value: int) -> int:
        if not 4 <= value <= 24:
            raise ValueError("lbp_points must be between 4 and 24")
        return value

    @field_validator("k_best")
    @classmethod
    def _k(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("k_best must be at least 1 (or 'all')")
        return value
