"""The differential count of white cells, its blast percentage and the flags a reader sees.

One implementation for ``leukoscope analyze`` (per field and pooled over a folder) and
the service. The flags never claim more than the count supports:

- every blast flag states how many cells were counted;
- below ``min_cells`` (100) no blast percentage is given in the flags, only the
  request to count at least that many cells, and no leukemia wording;
- with a quality warning (an unverified detector, a field where the detector hit its
  cap) the warning comes first and there is no leukemia flag at all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from leukoscope.labels import UNCERTAIN, checked_blast_classes, not_white_classes_in
from leukoscope.proportions import wilson_interval

#: The wording of the one flag that points at leukemia (tests and readers look for it).
LEUKEMIA_WORDING = "consistent with acute leukemia"
#: How the flag of a count without any blast class begins (a classifier fine-tuned on a lab's normal cells alone
#: knows none: its "no leukemia flag" would otherwise read as a screen that found nothing).
NO_BLAST_CLASS_WORDING = "No blast class among the cell classes"


@dataclass
class Differential:
    """Counts of the white cells of one field or a set of fields."""

    total: int
    """White cells counted: every cell but those of classes that are not white cells (``not_white``)."""
    counts: dict[str, int]
    """Per class, plus ``uncertain`` (cells below the classifier's confidence threshold)."""
    per_100: dict[str, float]
    """Per 100 white cells (``total``): the differential, and nucleated red cells or platelets beside it."""
    blast_classes: list[str]
    blasts: int | None
    blast_percentage: float | None
    blast_ci95: tuple[float, float] | None
    """Wilson 95% interval of the blast percentage, in percent."""
    uncertain: int
    blast_percentage_if_uncertain_are_blasts: float | None
    min_cells: int = 100
    """Below this many cells the blast percentage is not meaningful (and never flagged)."""
    warnings: list[str] = field(default_factory=list)
    """Why the count itself may be wrong; while there is one, there is no leukemia flag."""
    acute_leukemia_flag: bool | None = False
    """True only when the flags say "consistent with acute leukemia"; False only for a count that rules it out
    (:meth:`rules_out`: a blast class, at least ``min_cells`` white cells, no warning, and neither the 95% interval
    nor the uncertain cells reach the threshold); None otherwise (not assessable: no blast class
    (:data:`NO_BLAST_CLASS_WORDING`), too few cells, a warning, or a count that cannot say no), so that a program
    reading the JSON does not take a count it could not judge for "no leukemia"."""
    flags: list[str] = field(default_factory=list)
    not_white: list[str] = field(default_factory=list)
    """Classes counted but not white cells (:func:`leukoscope.labels.not_white_classes_in`): platelets and
    nucleated red cells, which no blast percentage may be diluted with."""

    @property
    def blast_percentage_meaningful(self) -> bool:
        return self.blast_percentage is not None and self.total >= self.min_cells

    @classmethod
    def from_labels(cls, labels: Sequence[str], classes: Sequence[str], blast_classes: Sequence[str] | None,
                    *, blast_flag_percent: float = 20.0, min_cells: int = 100, uncertain_flag_share: float = 0.1,
                    warnings: Sequence[str] = ()) -> "Differential":
        """Count ``labels`` (class names or ``"uncertain"``). Blasts are counted only
        when ``blast_classes`` is a non-empty list ("no blast class known" otherwise)."""
        return cls.from_counts(Counter(labels), classes, blast_classes, blast_flag_percent=blast_flag_percent,
                               min_cells=min_cells, uncertain_flag_share=uncertain_flag_share, warnings=warnings)

    @classmethod
    def from_counts(cls, label_counts: Mapping[str, int], classes: Sequence[str], blast_classes: Sequence[str] | None,
                    *, blast_flag_percent: float = 20.0, min_cells: int = 100, uncertain_flag_share: float = 0.1,
                    warnings: Sequence[str] = ()) -> "Differential":
        """:meth:`from_labels` of labels already counted (label -> number of cells)."""
        counts = {name: 0 for name in classes}
        counts[UNCERTAIN] = 0
        for label, n in label_counts.items():
            counts[label] = counts.get(label, 0) + int(n)
        not_white = not_white_classes_in(classes)
        if blast_classes:  # each once, and white cells only (:func:`leukoscope.labels.checked_blast_classes`)
            blast_classes = checked_blast_classes(blast_classes, list(classes))
        total = sum(n for name, n in counts.items() if name not in not_white)
        per_100 = {name: (100.0 * n / total if total else 0.0) for name, n in counts.items()}
        uncertain = counts[UNCERTAIN]
        blasts = percentage = interval = worst = None
        if blast_classes:
            blasts = sum(counts.get(name, 0) for name in blast_classes)
            if total:
                percentage = 100.0 * blasts / total
                low, high = wilson_interval(blasts, total)
                interval = (100.0 * low, 100.0 * high)
                worst = 100.0 * (blasts + uncertain) / total
        differential = cls(total, counts, per_100, list(blast_classes or []), blasts, percentage, interval,
                           uncertain, worst, int(min_cells), list(dict.fromkeys(warnings)), not_white=not_white)
        differential.flags = differential._flags(blast_flag_percent, uncertain_flag_share)
        if not differential.acute_leukemia_flag and not differential.rules_out(blast_flag_percent):
            differential.acute_leukemia_flag = None  # not assessable, rather than "no"
        return differential

    def rules_out(self, threshold: float) -> bool:
        """Whether this count says "no" to blasts >= ``threshold`` percent: :attr:`assessable`, and neither its
        95% interval nor its uncertain cells (were they blasts) reach the threshold (the flags then say "count
        more cells" or "review them": a "no" would claim more than the count)."""
        if not self.assessable or self.blast_ci95 is None:
            return False
        worst = self.blast_percentage_if_uncertain_are_blasts
        return self.blast_ci95[1] < threshold and (worst is None or worst < threshold)

    @property
    def assessable(self) -> bool:
        """Whether this count could raise the leukemia flag: a blast class, enough white cells, no warning."""
        return self.blasts is not None and self.total >= self.min_cells and not self.warnings

    def _flags(self, threshold: float, uncertain_share: float) -> list[str]:
        flags = [f"WARNING: {warning}" for warning in self.warnings]
        n = self.total
        others = {name: self.counts[name] for name in self.not_white if self.counts.get(name)}
        if n == 0 and others:
            listed = ", ".join(f"{count} {name}" for name, count in others.items())
            return flags + [f"No white cell counted: the cells found were called {listed}, which are not white "
                            f"cells."]
        if n == 0:
            return flags + ["No white cell found: check focus, stain and that the image is a smear field."]
        counted = f"{n} white cell{'' if n == 1 else 's'} counted"
        if self.blasts is None:
            white = [name for name in self.counts if name != UNCERTAIN and name not in self.not_white]
            flags.append(f"{NO_BLAST_CLASS_WORDING} ({', '.join(white)}): blasts are not counted and no leukemia "
                         f"flag can be raised; this count cannot screen for leukemia.")
        if self.blasts is not None and self.blast_percentage is not None and self.blast_ci95 is not None:
            low, high = self.blast_ci95
            if n < self.min_cells:
                if self.blasts:  # a fact worth a look, but no percentage: it would mean nothing yet
                    flags.append(f"Blasts seen: {self.blasts} of {counted}; blasts are not expected in peripheral "
                                 f"blood: review.")
            else:
                measured = f"{self.blasts} of {counted}, {self.blast_percentage:.1f}%, 95% CI {low:.1f}-{high:.1f}%"
                if self.blast_percentage >= threshold and self.warnings:
                    flags.append(f"Blasts {measured}: no leukemia flag while the warning(s) above stand; "
                                 f"review every cell by eye.")
                elif self.blast_percentage >= threshold:
                    self.acute_leukemia_flag = True
                    flags.append(f"BLASTS >= {threshold:g}% ({measured}): {LEUKEMIA_WORDING}; needs review by a "
                                 f"hematologist.")
                elif self.blasts:
                    flags.append(f"Blasts seen ({measured}): blasts are not expected in peripheral blood; review.")
                    if high >= threshold:
                        flags.append(f"The 95% interval of the blast percentage reaches {threshold:g}%: "
                                     f"count more cells.")
                elif high >= threshold:  # no blast among few cells (a min_cells set low) rules nothing out
                    flags.append(f"No blast among {counted}, but the 95% interval of the blast percentage "
                                 f"({low:.1f}-{high:.1f}%) reaches {threshold:g}%: count more cells.")
                worst = self.blast_percentage_if_uncertain_are_blasts
                if self.blast_percentage < threshold and worst is not None and worst >= threshold:
                    flags.append(f"If the {self.uncertain} uncertain cell(s) were blasts the blast percentage "
                                 f"would be {worst:.1f}%: review them.")
        if self.uncertain and self.uncertain / n >= uncertain_share:
            flags.append(f"{self.uncertain} of {n} cells ({100 * self.uncertain / n:.0f}%) are uncertain: "
                         f"classify them by eye.")
        if n < self.min_cells:
            what = "the blast percentage is not meaningful" if self.blasts is not None else \
                "the differential is not meaningful"
            flags.append(f"Only {counted}: {what}; count at least {self.min_cells} cells (analyse more fields "
                         f"of the slide).")
        return flags

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["blast_ci95"] = list(self.blast_ci95) if self.blast_ci95 else None
        payload["blast_percentage_meaningful"] = self.blast_percentage_meaningful
        return payload


@dataclass(frozen=True)
class CountRules:
    """How differentials are counted: the same for every field and for the pooled slide."""

    classes: tuple[str, ...]
    blast_classes: tuple[str, ...]
    """Empty: no blast class known, blasts are not counted."""
    blast_flag_percent: float = 20.0
    min_cells: int = 100

    def count(self, labels: Sequence[str], warnings: Sequence[str] = ()) -> Differential:
        return self.count_from(Counter(labels), warnings)

    def not_analysed(self, reason: str) -> Differential:
        """The differential of what was never analysed (a file that could not be read, a run where none
        could): no cells, and a flag that says so instead of "No white cell found"."""
        differential = self.count([])
        differential.flags = [f"Not analysed: {reason}"]
        return differential

    def count_from(self, label_counts: Mapping[str, int], warnings: Sequence[str] = ()) -> Differential:
        """:meth:`count` of labels already counted (label -> number of cells)."""
        return Differential.from_counts(label_counts, self.classes, self.blast_classes,
                                        blast_flag_percent=self.blast_flag_percent, min_cells=self.min_cells,
                                        warnings=warnings)
