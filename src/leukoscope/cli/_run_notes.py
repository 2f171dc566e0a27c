"""What a run over many images says before it starts (predict and analyze): the scale the images lend to those
without one, a stated scale their red cells contradict, and models that learned from these very images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from rich.markup import escape

from leukoscope.progress import console


def announced_run_scale(paths: list, out: Path, engine: str, *, single_cells: bool = False) -> Optional[float]:
    """The scale the fields lend to those too poor in red cells for their own
    (:func:`leukoscope.scale.run_scale`), said on the console; None when they have none. A Ray archive
    being resumed keeps the one it was started with (fields added since would change the sample).
    ``single_cells``: the images are cells (predict), said in those words."""
    from leukoscope.inference.archive_parts import SETTINGS
    from leukoscope.scale import FIELD_RUN_MAX_RATIO, RUN_SCALE_MIN_ESTIMATES, WEAK_ESTIMATE_RED_CELLS, run_scale

    recorded = out / SETTINGS
    if engine == "ray" and recorded.is_file():
        try:
            lent = json.loads(recorded.read_text()).get("options", {}).get("run_um_per_px")
        except (OSError, ValueError, AttributeError):
            lent = None  # an unreadable record: the archive's own check says so when the run claims it
        if not isinstance(lent, (int, float)) or not 0.005 <= lent <= 5.0:
            lent = None  # likewise a value no run could have recorded
        if lent is not None:
            console.print(f"scale: the archive's run scale, {lent:.4f} um/px, for fields without their own",
                          soft_wrap=True)
        return lent
    if len(paths) < RUN_SCALE_MIN_ESTIMATES:
        return None
    unit = "images" if single_cells else "fields"
    scale = run_scale(paths, unit=unit)
    if not scale.known:
        console.print(f"scale: no run scale for {unit} without their own ({scale.note})", soft_wrap=True)
        return None
    one, done = ("an image", "framed") if single_cells else ("a field", "analysed")
    console.print(f"scale: {one} with too few isolated red cells of its own, or an estimate on "
                  f"{WEAK_ESTIMATE_RED_CELLS} or fewer more than {FIELD_RUN_MAX_RATIO:g} times off, is {done} at "
                  f"{scale.um_per_px:.4f} um/px, the run's scale ({scale.note})", soft_wrap=True)
    return scale.um_per_px


def note_learned_from(paths: list, bundles: dict[str, Optional[Path]]) -> dict[str, Any]:
    """A note for each model that learned from some of ``paths`` (by content: a sample of a large run): its
    results on them say nothing about its accuracy on new images (``evaluate`` refuses such data). Returns the
    record for a run's ``summary.json`` (``images_checked`` and, per model, its overlap; empty when none learned)."""
    from leukoscope.data.fingerprints import describe_overlap, learned_among

    found, checked = learned_among(bundles, paths)
    among = f"{len(paths)} images" if checked == len(paths) else f"{checked} images checked of {len(paths)}"
    for role, overlap in found.items():
        console.print(f"[yellow]note:[/yellow] the {role} learned from {describe_overlap(overlap)} among these "
                      f"{among}: its results on them say nothing about its accuracy on new images", soft_wrap=True)
    return {"images_checked": checked, **found} if found else {}


def note_stated_scale_doubts(paths: list, um_per_px: float, *, single_cells: bool = False) -> list[str]:
    """The warning when the fields' (or single-cell images') red cells together measure another scale than the
    stated one (:func:`leukoscope.scale.stated_run_doubt`), said on the console; empty when they agree or cannot
    tell."""
    from leukoscope.scale import stated_run_doubt

    doubt = stated_run_doubt(paths, um_per_px, single_cells=single_cells)
    if doubt:
        console.print(f"[yellow]scale:[/yellow] {escape(doubt)}", soft_wrap=True)
    return [doubt] if doubt else []
