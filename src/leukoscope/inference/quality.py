"""Quality gates of smear analysis: can the detector's white-cell count be trusted?

Three reasons it cannot, each a warning that stops any leukemia flag
(:class:`~leukoscope.inference.differential.Differential`):

- the detector bundle records no test AP@0.5 for its white-cell class(es), or one
  below a floor (0.9 by default): a detector with a test mAP of 0.000 once produced
  "consistent with acute leukemia" on normal fields;
- a field (or tile) where the detector returned as many boxes as its per-image cap
  allows: the cells beyond the cap were dropped unseen, so the count is cut short
  and what was kept is mostly noise;
- a field where more than a share (30%) of the white cells are *unfamiliar*: unlike
  the images the cell classifier was trained on (its out-of-distribution score is
  above the threshold set on its validation split, which 5% of in-distribution
  cells exceed by construction). Another stain, scanner or magnification, or no
  cell at all: its classes, and so the blast count, mean little. A share, not the
  median score: a third of the cells unlike anything seen already makes the
  count unreliable, and with 5% false alarms per cell a field of 10 or more
  in-distribution cells passes 30% with a probability under 0.4% (0.1-0.3% for 10
  to 13 cells, under 0.05% from 14). Fields of one to three cells are flagged 5-14%
  of the time (one unfamiliar cell is a third of them), of four to nine 0.4-3%;
  they are below the 100 cells a blast percentage needs anyway, so the cost is a
  review line, not a lost leukemia flag.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from leukoscope.labels import not_white_classes_in
from leukoscope.progress import name_some
from leukoscope.light import LIGHT_CELL_WORDING, LIGHT_WORDING
from leukoscope.scale import SCALE_OPTION, STATED_CELL_SCALE_WORDING


#: A detector whose recorded test AP@0.5 for white cells is below this gets a warning.
DEFAULT_MIN_DETECTOR_AP = 0.9
#: A field (or slide) where more than this share of the cells are unfamiliar gets a warning.
DEFAULT_UNFAMILIAR_SHARE = 0.3
#: The words of that warning (tests and readers look for them).
UNFAMILIAR_WORDING = "review: images unlike the training data"
#: The start of the warning for a single-cell image classified whole, without a scale.
UNSCALED_CELL_WORDING = "No scale for a single-cell image"
UNFRAMED_WORDING = "Cells cut by their boxes, not at the classifier's window"
#: How a field's warning of the detection cap begins (:func:`cap_warning`).
CAP_WORDING = "The detector returned as many boxes as its per-image cap allows"
#: How the warning of a field analysed at the detector's scale, for want of its own, begins.
UNSCALED_FIELD_WORDING = "no scale for this field"
#: How a field's warning begins when its scale rests on a few red cells and nothing checked it.
WEAK_SCALE_WORDING = "scale estimated from only"


#: The fewest test white cells (of each white class; images, for bundles that do not count them) whose recorded
#: AP may verify a detector: a split of ten fields had left one test image, AP 1.0, and the gate open.
MIN_TEST_CELLS = 30


def detector_warnings(metrics: Mapping[str, Any], wbc_classes: Sequence[str], floor: float) -> list[str]:
    """Warnings about a detector from the metrics its training recorded in ``bundle.json``
    (``BundleInfo.metrics`` of a detector: ``evaluated_on`` and ``ap_50_per_class``)."""
    if not wbc_classes:
        return []
    evaluated_on = metrics.get("evaluated_on")
    if evaluated_on != "test":
        where = f"it was scored on its {evaluated_on} split only" if evaluated_on else "its bundle records no scores"
        return [f"The detector has no recorded test AP@0.5 for white cells ({where}): its white-cell count is "
                f"unverified."]
    per_class = metrics.get("ap_50_per_class") or {}
    recorded = {name: per_class.get(name) for name in wbc_classes}
    missing = [name for name, ap in recorded.items() if not isinstance(ap, (int, float)) or not math.isfinite(ap)]
    if missing:
        return [f"The detector's bundle records no test AP@0.5 for {', '.join(missing)}: its white-cell count is "
                f"unverified."]
    name, worst = min(recorded.items(), key=lambda item: item[1])
    if worst < floor:
        return [f"The detector's recorded test AP@0.5 for {name} is {worst:.3f}, below the floor of {floor:g}: "
                f"white cells may be missed or invented."]
    # An AP of 1.0 on one test cell says nothing: the gate asks for enough of them (bundles of before the count
    # was recorded: enough test images)
    objects = metrics.get("objects_per_class") or {}
    counted = {name: objects.get(name) for name in wbc_classes}
    if all(isinstance(n, int) for n in counted.values()):
        few = {name: n for name, n in counted.items() if n < MIN_TEST_CELLS}
        if few:
            listed = ", ".join(f"{n} {name}" for name, n in few.items())
            return [f"The detector's recorded test AP@0.5 rests on {listed} test cell(s), fewer than "
                    f"{MIN_TEST_CELLS}: its white-cell count is unverified."]
    elif isinstance(metrics.get("n_images"), int) and metrics["n_images"] < MIN_TEST_CELLS:
        return [f"The detector's recorded test AP@0.5 rests on {metrics['n_images']} test image(s), fewer than "
                f"{MIN_TEST_CELLS}: its white-cell count is unverified."]
    return []


def detection_cap(model: Any) -> int | None:
    """The model's cap on detections per image, set for a 640x480 field (torchvision's
    ``detections_per_img``: ``roi_heads`` for Faster R-CNN, the model for FCOS and
    RetinaNet); None when the model has none. Read it once, before any inference:
    :class:`~leukoscope.inference.detector_torch.TorchDetector` raises it while it runs on a large tile."""
    owner = getattr(model, "roi_heads", model)
    cap = getattr(owner, "detections_per_img", None)
    return int(cap) if isinstance(cap, int) else None


def _named(names: Sequence[str]) -> str:
    """`` (a.png, b.png and 3 more)`` naming at most five; empty without names."""
    return f" ({name_some(names, 5)})" if names else ""


def _some_fields(count: int, of: int, names: Sequence[str] = (), unit: str = "field") -> str:
    """``3 of 8 fields (a.png, b.png, c.png)``; ``unit``: what they are (a slide's are tiles)."""
    return f"{count} of {of} {unit}{'' if of == 1 else 's'}{_named(names)}"


def _verb(count: int, one: str, many: str) -> str:
    """The verb of :func:`_some_fields`' words, whose subject is ``count`` ("1 of 3 fields was")."""
    return one if count == 1 else many


def cap_warning(capped: int, of: int, unit: str = "tile", names: Sequence[str] = ()) -> str:
    """The warning for ``capped`` of ``of`` tiles (of one field) or fields (of a folder) at the cap; with
    ``names``, of the fields (a slide's tiles) named."""
    one_field = unit == "tile" and of == 1 and not names  # a field of one detector tile (not a slide's one tile)
    where = "this field" if one_field else _some_fields(capped, of, names, unit)
    return f"{CAP_WORDING} in {where}: cells beyond the cap were dropped, the count is unreliable."


def possible_cells_note(scores: Sequence[float], threshold: float) -> str:
    """A field's note (a flag, not a warning) of the white-cell boxes the detector scored under its threshold."""
    n = len(scores)
    scored = f"{min(scores):.2f}" + (f"-{max(scores):.2f}" if n > 1 else "")
    return (f"Review: {n} possible white cell{'s' if n > 1 else ''} not counted: the detector scored "
            f"{'them' if n > 1 else 'it'} {scored}, under its threshold {threshold:g} (their boxes: "
            f"possible_white_cells).")


def possible_cells_fields_note(cells: int, names: Sequence[str], of: int, unit: str = "field") -> str:
    """The folder's note when ``names`` of its ``of`` fields had :func:`possible_cells_note`."""
    return (f"Review: {cells} possible white cell{'s' if cells > 1 else ''} under the detector's threshold, not "
            f"counted, in {_some_fields(len(names), of, names, unit)} (their boxes: each field's "
            f"possible_white_cells).")


def weak_scale_warning(um_per_px: float, red_cells: int) -> str:
    """A field's warning when its scale is its own estimate on a few red cells and no run scale could check it: a
    field enlarged twice had measured platelets as its red cells (0.39 um/px for 0.04), and a granule was then
    counted as a blast."""
    return (f"{WEAK_SCALE_WORDING} {red_cells} red cell{'' if red_cells == 1 else 's'} ({um_per_px:.4f} um/px), "
            f"with no other field to check it: if it is wrong, white cells are missed or mistyped; state the "
            f"microscope's scale ({SCALE_OPTION})")


def weak_scale_fields_warning(weak: int, of: int, names: Sequence[str] = (), unit: str = "field") -> str:
    """The slide's (folder's) warning when ``weak`` of its ``of`` fields (``unit``s) had :func:`weak_scale_warning`."""
    return (f"{_some_fields(weak, of, names, unit)} had a scale estimated from a few red cells, which nothing "
            f"checked: white cells may be missed or mistyped; state the microscope's scale ({SCALE_OPTION}).")


def unscaled_fields_warning(unscaled: int, of: int, names: Sequence[str] = (), unit: str = "field") -> str:
    """The slide's warning when ``unscaled`` of its ``of`` fields (``unit``s) were analysed at a guessed scale."""
    return (f"{_some_fields(unscaled, of, names, unit)} had no scale and {_verb(unscaled, 'was', 'were')} "
            f"analysed at the detector's training scale: white cells may be missed or mistyped; state the "
            f"microscope's scale ({SCALE_OPTION}).")


def unfamiliar_warning(unfamiliar: Sequence[bool], max_share: float = DEFAULT_UNFAMILIAR_SHARE,
                       unit: str = "cells classified") -> str | None:
    """The warning for cells of which more than ``max_share`` are unfamiliar (out of
    distribution for the classifier); None when there is nothing to say."""
    return unfamiliar_count_warning(sum(bool(u) for u in unfamiliar), len(unfamiliar), max_share, unit)


def classified_unit(classes: Sequence[str]) -> str:
    """The unfamiliar warning's word for the cells it counts: every cell classified, so those of the classes that
    are not white cells too (a count beside the white-cell total would otherwise seem to disagree with it)."""
    not_white = not_white_classes_in(classes)
    if not not_white:
        return "cells classified"
    named = " or ".join(not_white) if len(not_white) < 3 else f"{', '.join(not_white[:-1])} or {not_white[-1]}"
    # "erythroblast and platelet included" read as "erythroblasts and platelets were found" on a field with neither
    return f"classified cells, counting any called {named}"


#: A single-cell image smaller than this a side cannot show a cell's nucleus or granules (a 20 x 20 blur was called
#: blast at 0.76, above the uncertain threshold; a 1 x 1 image eosinophil at 0.995).
MIN_CELL_IMAGE_SIDE = 32
TINY_CELL_WORDING = "Too small to show a cell"


def tiny_cell_warning(width: int, height: int) -> str | None:
    """The warning for a single-cell image under :data:`MIN_CELL_IMAGE_SIDE` a side; None for a larger one."""
    if min(width, height) >= MIN_CELL_IMAGE_SIDE:
        return None
    return (f"{TINY_CELL_WORDING}: the image is {width} x {height} px (a cell's nucleus and granules need at least "
            f"{MIN_CELL_IMAGE_SIDE} px a side); its class is not to be trusted")


def unscaled_cell_warning(window_um: float) -> str:
    """The warning for a single-cell image without a scale, classified whole by a classifier that expects
    ``window_um`` micrometres around its cell."""
    return (f"{UNSCALED_CELL_WORDING}: classified whole, although the classifier expects {window_um:g} um around "
            f"the cell; its class may be wrong")


def unframed_warning(window_um: float, why: str) -> str:
    """The warning of a field without a scale whose detector records none either: its cells were cut by their
    boxes for a classifier that expects ``window_um`` micrometres around each."""
    return (f"{UNFRAMED_WORDING}: the field has no scale ({why}) and the detector records none; the cell "
            f"classifier expects {window_um:g} um around each cell, so their classes may be wrong: state the "
            f"microscope's scale ({SCALE_OPTION})")


#: How the warning of a single-cell image without a white cell at its centre begins (:mod:`leukoscope.cell_presence`).
NO_WHITE_CELL_WORDING = "No white cell at the image's centre"
#: The warning itself: the image is classified as a cell all the same (its class says what it resembles).
NO_WHITE_CELL_WARNING = (f"{NO_WHITE_CELL_WORDING}: the window the classifier read holds no nuclear stain; its "
                         f"class is not to be trusted (a smear field? analyse it as one)")


#: How the warning of a single-cell image that holds several white cells begins (:mod:`leukoscope.cell_presence`).
SEVERAL_CELLS_WORDING = "Several white cells in one cell's image"


def lead_clause(warning: str) -> str:
    """A warning's kind: its words before the first colon (the rest names the image's own figures)."""
    return warning.split(": ", 1)[0]


def several_cells_warning(nuclei: int, width_um: float, height_um: float) -> str:
    """The warning of a single-cell image of ``width_um`` x ``height_um`` that shows about ``nuclei`` white
    cells: only the one at its centre was classified, the others are not counted (it stays after a review)."""
    return (f"{SEVERAL_CELLS_WORDING}: the image is {width_um:.0f} x {height_um:.0f} um and shows about {nuclei} "
            f"white-cell nuclei; only the cell at its centre was classified and counted (a smear field? analyse it "
            f"as one)")


#: A field narrower than this, in pixels, is no smear field: a 1 x 1 image and an 8 x 480 strip were "analysed",
#: counted among the run's fields, without a word (a white cell is about 100 px across in CBC's 640 x 480 fields).
MIN_FIELD_SIDE = 64
TINY_FIELD_WORDING = "Too small to be a smear field"


def tiny_field_warning(width: int, height: int) -> str | None:
    """The warning of a field under :data:`MIN_FIELD_SIDE` a side; None for a larger one."""
    if min(width, height) >= MIN_FIELD_SIDE:
        return None
    return (f"{TINY_FIELD_WORDING}: the image is {width} x {height} px (a field holds white and red cells, "
            f"at least {MIN_FIELD_SIDE} px a side); no white cell found in it says nothing of the smear")


#: A field without colour (stains tell white cells apart by it; the detectors learned from colour fields).
GRAYSCALE_WARNING = ("the field has no colour (grey levels only): white cells are found and typed by their stain's "
                     "colour, so none found here does not mean there are none; analyse the colour image")


#: The same of a single-cell image (`predict`, the service's single cells): its class rests on a colour it lacks.
GRAYSCALE_CELL_WORDING = "the image has no colour"
GRAYSCALE_CELL_WARNING = (f"{GRAYSCALE_CELL_WORDING} (grey levels only): white cells are typed by their stain's "
                          f"colour, so its class is not to be trusted; classify the colour image")


def light_fields_warning(unlit: int, of: int, names: Sequence[str] = (), unit: str = "field") -> str:
    """The folder's (slide's) warning when ``unlit`` of its ``of`` fields had :func:`leukoscope.light.light_warning`."""
    return (f"{LIGHT_WORDING}: {_some_fields(unlit, of, names, unit)} had a background of a colour none of the "
            f"classifier's training images had (the camera's white balance or the lamp): its types there are untested.")


def grayscale_fields_warning(grey: int, of: int, names: Sequence[str] = (), unit: str = "field") -> str:
    """The slide's (folder's) warning when ``grey`` of its ``of`` fields (``unit``s) had :data:`GRAYSCALE_WARNING`:
    their white cells are missing from its count."""
    return (f"{_some_fields(grey, of, names, unit)} had no colour (grey levels only) and no white cell found: "
            f"{_verb(grey, 'its', 'their')} cells are missing from the count; analyse the colour images.")


def stated_scale_fields_warning(doubted: int, of: int, names: Sequence[str] = (), *, fields_say: bool = True,
                                unit: str = "field") -> str:
    """The slide's (folder's) warning when the red cells of ``doubted`` of its ``of`` fields (``unit``s) contradict
    the scale the user stated (:func:`leukoscope.scale.stated_scale_doubt`): the count may have missed or mistyped
    cells. ``fields_say``: each field's own warning gives its measure (the web service keeps the case's only)."""
    measures = f" (each {unit}'s warning gives its measure)" if fields_say else ""
    return (f"{_some_fields(doubted, of, names, unit)} {_verb(doubted, 'measures', 'measure')} another scale on "
            f"{_verb(doubted, 'its', 'their')} red cells than the stated one: white cells may be missed or mistyped; "
            f"check {SCALE_OPTION}{measures}.")


def unframed_fields_warning(unframed: int, of: int, names: Sequence[str] = (), unit: str = "field") -> str:
    """The slide's (folder's) warning when ``unframed`` of its ``of`` fields (``unit``s) had
    :func:`unframed_warning`."""
    return (f"{UNFRAMED_WORDING}: {_some_fields(unframed, of, names, unit)} had no scale, "
            f"and the detector records none; {_verb(unframed, 'its', 'their')} cells' classes may be wrong: state the "
            f"microscope's scale "
            f"({SCALE_OPTION}).")


def is_unfamiliar_warning(warning: str) -> bool:
    """Whether ``warning`` is :func:`unfamiliar_count_warning`'s."""
    return warning.lower().startswith(UNFAMILIAR_WORDING)


def about_classification_only(warning: str) -> bool:
    """Whether ``warning`` doubts only the cell classifier's calls (cells unlike its training images, a cell
    image classified without a scale or at a stated scale its red cells doubt, cells cut by their boxes, a
    cell image without a white cell at its centre or without colour, a field or cell image in a light the
    classifier never saw: the reviewer labels or excludes it), not
    which cells were found or counted: a hematologist who has reviewed every cell has answered it, and the
    reviewed differential need not carry it. The detector's warnings (unverified, capped, a field at a guessed
    scale) still stand after any review: cells may have been missed."""
    return (is_unfamiliar_warning(warning) or warning.startswith(UNSCALED_CELL_WORDING)
            or warning.startswith(UNFRAMED_WORDING) or warning.startswith(TINY_CELL_WORDING)
            or warning.startswith(STATED_CELL_SCALE_WORDING) or warning.startswith(NO_WHITE_CELL_WORDING)
            or warning.startswith(GRAYSCALE_CELL_WORDING) or warning.startswith(LIGHT_WORDING)
            or warning.startswith(LIGHT_CELL_WORDING))


def unfamiliar_count_warning(k: int, n: int, max_share: float = DEFAULT_UNFAMILIAR_SHARE,
                             unit: str = "cells classified") -> str | None:
    """:func:`unfamiliar_warning` for ``k`` unfamiliar cells of ``n``."""
    if n == 0 or k / n <= max_share:
        return None
    return (f"{UNFAMILIAR_WORDING[0].upper()}{UNFAMILIAR_WORDING[1:]}: {k} of {n} {unit} ({100 * k / n:.0f}%, more "
            f"than {100 * max_share:g}%) are unlike the images the cell classifier was trained on; their classes and "
            f"the blast count may be wrong.")
