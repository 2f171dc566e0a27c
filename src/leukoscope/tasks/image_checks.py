"""What `leukoscope evaluate` says of each scored image beside its class: the checks `predict` makes.

`predict` gives every image its out-of-distribution score (``unfamiliar`` above the bundle's
threshold) and the warnings of :func:`~leukoscope.inference.predictor.single_cell_warnings` (too small,
grey, no white cell at the centre, several cells, no scale, light unlike the training images'). An
evaluation of another lab's folder gave none of them, so it could not say how the images the tool would
have flagged for review scored against the rest; now ``scored_images.csv`` has the same columns and
``metrics.json``'s ``image_checks`` the accuracy of each group.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from leukoscope.inference.predictor import CellClassifier
from leukoscope.inference.quality import lead_clause
from leukoscope.scale import FieldScale


@dataclass
class ImageChecks:
    """The warnings of each decoded image, in the order they were decoded (the scored images' order)."""

    classifier: CellClassifier
    warnings: list[tuple[str, ...]] = field(default_factory=list)

    def record(self, image: Image.Image, scale: FieldScale | None = None, seen: Image.Image | None = None) -> None:
        """Check ``image`` as given, classified at ``scale`` from ``seen`` (the window framed; None: the image)."""
        self.warnings.append(self.classifier.warnings_of(image, scale, seen))


#: Why no image was scored for familiarity, when the bundle has no OOD statistics.
NO_OOD_STATISTICS = "no OOD statistics in the bundle"


def checks_summary(correct: Sequence[bool], warnings: Sequence[Sequence[str]], unfamiliar: np.ndarray | None,
                   threshold: float | None, unscored_because: str = NO_OOD_STATISTICS) -> dict[str, Any]:
    """How the images the checks doubt (unfamiliar, or with a warning) scored against the rest: ``metrics.json``'s
    ``image_checks``, its ``note`` the report's line. ``unfamiliar`` None: no image was scored for familiarity,
    for the reason ``unscored_because`` says (the bundle has no OOD statistics, or its graph cannot give the
    score)."""
    correct = np.asarray(correct, dtype=bool)
    warned = np.array([bool(w) for w in warnings], dtype=bool)
    flagged = np.zeros(len(correct), dtype=bool) if unfamiliar is None else np.asarray(unfamiliar, dtype=bool)
    doubted = warned | flagged
    kinds = Counter(lead_clause(w) for image in warnings for w in image)

    def accuracy(mask: np.ndarray) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    summary: dict[str, Any] = {
        "images": int(len(correct)),
        "unfamiliar": None if unfamiliar is None else int(flagged.sum()),
        "ood_unscored_because": unscored_because if unfamiliar is None else None,
        "ood_threshold": threshold,
        "warned": int(warned.sum()),
        "warnings": dict(kinds.most_common()),
        "trusted": int((~doubted).sum()),
        "accuracy_trusted": accuracy(~doubted),
        "accuracy_doubted": accuracy(doubted),
    }
    said = (f"{unscored_because}, so no image flagged as unlike its training images" if unfamiliar is None
            else f"{int(flagged.sum())} of {len(correct)} images unlike the training images (OOD score above "
                 f"{threshold:.3g})")
    said += f", {int(warned.sum())} with a warning" + (
        f" ({'; '.join(f'{n}: {kind[:1].lower()}{kind[1:]}' for kind, n in kinds.most_common(4))})" if kinds else "")
    if doubted.any() and (~doubted).any():
        said += (f": accuracy {summary['accuracy_trusted']:.3f} on the other {summary['trusted']}, "
                 f"{summary['accuracy_doubted']:.3f} on those {int(doubted.sum())}")
    summary["note"] = (f"Image checks as predict makes them: {said} (scored_images.csv: ood_score, unfamiliar, "
                       f"warnings).")
    return summary
