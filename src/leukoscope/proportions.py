"""Confidence intervals of binomial proportions (the blast percentage of a count).

Kept apart from :mod:`leukoscope.evaluation`, whose package import pulls in
matplotlib and scikit-learn (3 s): smear analysis and the service need only this.
"""

from __future__ import annotations

import math

#: The normal quantile of a two-sided 95% interval.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (as fractions in [0, 1]).

    5 blasts in 100 cells: (0.0215, 0.1118). Undefined for ``total == 0`` (ValueError).
    """
    if total <= 0:
        raise ValueError("the Wilson interval needs at least one counted cell")
    if not 0 <= successes <= total:
        raise ValueError(f"successes must be between 0 and {total}, got {successes}")
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # 0 or all of them: the bound is exactly 0 (1), not 0 plus rounding (1.7e-16 reached the JSON)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high
