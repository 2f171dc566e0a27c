"""Retrain every model leukoscope ships, from ../shared/datasets, and print their table.

    python bench/zoo.py                       # build crops, train both models at once, score, print
                                              # (all within --hours, 2 by default; 77 min measured
                                              # on a 2-core CPU with the shipped 40-epoch recipe)
    python bench/zoo.py --install             # ... and copy the bundles (fp16) into the package
    python bench/zoo.py --recolour taleqani   # half of pbc's training crops in all-taleqani's colours
                                              # (research recipes; off by default, see RECOLOUR_RECIPES)
    python bench/zoo.py --detector D --classifier C   # score existing bundles only (no training)
                                              # (--classifier-split S: C's split, if its run folder is gone)

The shipped models (``leukoscope models --pretrained``):

- ``smear-detector``: Faster R-CNN, MobileNetV3-Large + FPN with a 256-wide box
  head, from scratch on CBC Training+Validation (stain augmentation), scored on CBC
  Testing. It records the pixel size of its training fields (estimated from their
  red cells), so smear analysis brings every field to that scale first.
- ``wbc-classifier``: the eight pbc white-cell types plus ``blast``, on crops of a
  fixed physical window (``--window-um``) around each cell, every source brought to
  one scale (:mod:`leukoscope.scale`): pbc's 3,200 cells, the largest white
  cell of malignant all-taleqani fields (Early, Pre, Pro) as ``blast``, and the
  white cells of half of all-taleqani's Benign fields (hematogones) as
  ``lymphocyte``, so that this lab's stain is not by itself a reason to say blast.

Scored: the classifier's own test part (accuracy by source: issue #11's in-domain target is pbc's),
and what must hold on data it never saw (issue #11's controls), each row printed with the share
flagged unfamiliar and the out-of-distribution AUROC against the in-domain test cells:
the white cells of the other half of all-taleqani's Benign fields (same lab and
stain as the blast examples, no leukaemia; halves duplicate-aware) called blast <= 5%; cnmc-mini's ``all`` cells (another lab,
another format) called blast >= 90%; BCCD's white cells (another lab, types from
``wbc_types.csv``) called blast <= 2%, and their type (the leave-one-source-out
row: no BCCD/CBC cell label is used in training). Nothing is tuned on these.

The two models train at the same time, each in its own process on one thread (the
machine this was made for has two cores), each with the time left of ``--hours`` once the
crops are made, less a reserve for scoring: training schedules follow that clock, so a cut
run still anneals. Run times on the 2-core CPU are in docs/benchmarks.md ("Shipped models").
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import random
import shutil
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))  # recolour_crops and stain_swap, beside this script
SHARED = REPO.parent / "shared" / "datasets"
PACKAGE_MODELS = REPO / "src" / "leukoscope" / "pretrained"
BLAST = "blast"
PBC_TYPES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
BCCD_TYPES = {"NEUTROPHIL": "neutrophil", "EOSINOPHIL": "eosinophil", "LYMPHOCYTE": "lymphocyte",
              "MONOCYTE": "monocyte", "BASOPHIL": "basophil"}
CROP_PIXELS = 128  # crops are stored at this size; the classifier letterboxes them to its input
SMEAR_BACKGROUND = (233, 226, 226)  # a plain, unstained smear background (for cnmc-mini's black)
# all-taleqani's Benign fields hold hematogones, normal B-lymphocyte precursors that a manual
# differential counts as lymphocytes. Half of those fields train the classifier as lymphocyte
# (same lab, stain and cropping as the blasts, so the stain alone cannot mean "blast"); the
# other half, never trained on, is the control.
BENIGN_LABEL = "lymphocyte"
BENIGN_TRAIN_SHARE = 0.5
BENIGN_CELLS_PER_FIELD = 4
# A white cell, blasts included, is at most about 20 um across. A larger stained object that
# colour segmentation finds is touching cells (a clump): its crop widens to hold it and shows a
# zoomed-out view (61% of the largest objects of 150 malignant all-taleqani fields were over
# 20 um, median 23.6 um). `--max-cell-um 20` skips them in the training crops; off by default,
# so that this script retrains the shipped classifier as it was made (docs/benchmarks.md,
# "Stain, brightness and normalisation": clean crops traded one control for another).
CLUMP_UM = 20.0
# --recolour: a share of the training crops rebuilt in another lab's colours (bench/recolour_crops.py;
# docs/benchmarks.md, "pbc's training crops in the other lab's colours"): recipe -> (sources recoloured,
# whose colours). Off by default: the shipped classifier was trained on the crops as they are.
RECOLOUR_RECIPES = {"taleqani": ("pbc", "taleqani"), "other": ("pbc,taleqani", "other"),
                    "randstain": ("pbc,taleqani", "randstain")}
# Minutes kept back from --hours for what follows training: the detector on 400 images of other
# labs, the controls in float32 and float16, the colour swap, the cards (about 8 minutes on the
# 2-core CPU).
SCORING_RESERVE_MINUTES = 13.0


# ----------------------------------------------------------------------------- crops
def _say(message: str) -> None:
    print(message, flush=True)


def source_scales(data: Path, fields: int = 40) -> dict[str, dict[str, Any]]:
    """Each source's pixel size, the median of its fields' red-cell estimates."""
    from PIL import Image

    from leukoscope.scale import source_scale

    patterns = {"pbc": "pbc/*/*.jpg", "all-taleqani": "all-taleqani/*/*.jpg", "cbc": "cbc/Training/Images/*.jpg",
                "bccd": "bccd/JPEGImages/*.jpg"}
    scales = {}
    for source, pattern in patterns.items():
        files = sorted(data.glob(pattern))
        random.Random(0).shuffle(files)
        images = []
        for path in files[:fields]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        scale = source_scale(images) if images else None
        scales[source] = scale.to_json() if scale else {"um_per_px": None, "note": "absent"}
        _say(f"scale of {source}: {scales[source]['um_per_px']} um/px ({scales[source]['note']})")
    return scales


def _single_cells(boxes: list, um_per_px: float | None, max_cell_um: float | None) -> list:
    """The boxes no larger than ``max_cell_um``; all of them without a scale or a limit."""
    if not um_per_px or not max_cell_um:
        return boxes
    return [b for b in boxes if max(b[2] - b[0], b[3] - b[1]) * um_per_px <= max_cell_um]


def _largest_cell(image, um_per_px: float | None = None, max_cell_um: float | None = None):
    """The box of the largest stained object no larger than one cell (a field's biggest white
    cell), or None."""
    from leukoscope.tasks.mil import locate_cells_by_colour

    boxes = _single_cells(locate_cells_by_colour(image, pad=0.0, max_cells=8), um_per_px, max_cell_um)
    return boxes[0] if boxes else None


def _field_scale(image, fallback: float | None) -> float | None:
    """The field's own red-cell estimate, as smear analysis would make it; the source's when the field has
    too few isolated red cells, or when its estimate rests on a few and lies far from the source's (smear
    analysis overrules such a misreading: :func:`leukoscope.scale.disagrees_with_run`; 4 BCCD control cells
    were cut at estimates 2.8-6.8 times the source's without it)."""
    from leukoscope.scale import disagrees_with_run, estimate_scale

    scale = estimate_scale(image)
    if not scale.known or disagrees_with_run(scale, fallback):
        return fallback
    return scale.um_per_px


def _image_centre(image, um_per_px: float | None = None) -> tuple[float, float, float, float]:
    """A point box at the image's centre (the window around it is the crop)."""
    w, h = image.size
    return (w / 2 - 1, h / 2 - 1, w / 2 + 1, h / 2 + 1)


def _save_crop(image, box, um_per_px: float | None, window_um: float, path: Path) -> None:
    from PIL import Image

    from leukoscope.cell_window import crop_cell

    crop = crop_cell(image, box, um_per_px=um_per_px, window_um=window_um)
    path.parent.mkdir(parents=True, exist_ok=True)
    crop.resize((CROP_PIXELS, CROP_PIXELS), Image.Resampling.BILINEAR).save(path)


def _crop_field_cells(path: Path, fallback_um_per_px: float | None, window_um: float, out: Path,
                      max_cells: int, max_cell_um: float | None = None) -> list[Path]:
    """Crop every white cell colour segmentation finds in a field (up to ``max_cells``, largest
    first) into ``out/<stem>_c<k>.png``, at the field's own scale; with ``max_cell_um``, clumps
    larger than one cell are skipped (training crops; the control keeps what it always held)."""
    from leukoscope.io import load_image
    from leukoscope.tasks.mil import locate_cells_by_colour

    image = load_image(path).convert("RGB")
    um_per_px = _field_scale(image, fallback_um_per_px)
    targets = []
    boxes = locate_cells_by_colour(image, pad=0.0, max_cells=max_cells)
    for k, box in enumerate(_single_cells(boxes, um_per_px, max_cell_um)):
        targets.append(out / f"{path.stem}_c{k}.png")
        _save_crop(image, box, um_per_px, window_um, targets[-1])
    return targets


def _crop_files(jobs: list[tuple[Path, str, str]], out: Path, um_per_px: float | None, window_um: float,
                locate: Callable, rows: list[list[str]], describe: str) -> None:
    """Crop one cell per (image, label, subject) job into ``out/<label>/``; rows get path,label,subject."""
    from leukoscope.io import ImageDecodeError, load_image

    missed = 0
    for number, (path, label, subject) in enumerate(jobs, 1):
        try:
            image = load_image(path).convert("RGB")
        except ImageDecodeError:
            missed += 1
            continue
        scale = _field_scale(image, um_per_px)
        box = locate(image, scale)
        if box is None:
            missed += 1
            continue
        target = out / label / f"{path.stem}.png"
        _save_crop(image, box, scale, window_um, target)
        rows.append([str(target), label, subject])
        if number % 500 == 0:
            _say(f"  {describe}: {number}/{len(jobs)}")
    _say(f"{describe}: {len(jobs) - missed} crops ({missed} images without a located cell)")


def split_benign_fields(data: Path, train_share: float = BENIGN_TRAIN_SHARE) -> tuple[list[Path], list[Path]]:
    """all-taleqani's Benign fields in two parts, (training, control), duplicate-aware: near
    duplicates (perceptual hash) stay on one side. Deterministic; a larger train_share takes fields
    from the control only (the control of a larger share is a part of a smaller share's)."""
    from leukoscope.data.duplicates import duplicate_groups

    files = sorted((data / "all-taleqani" / "Benign").glob("*.jpg"))
    groups = duplicate_groups(files)
    ids = sorted(set(int(g) for g in groups))
    random.Random(0).shuffle(ids)
    training_ids = set(ids[: round(len(ids) * train_share)])
    training = [f for f, g in zip(files, groups) if int(g) in training_ids]
    control = [f for f, g in zip(files, groups) if int(g) not in training_ids]
    return training, control


def build_training_crops(data: Path, out: Path, scales: dict, window_um: float, blasts_per_subtype: int,
                         max_cell_um: float | None = None,
                         benign_cells_per_field: int = BENIGN_CELLS_PER_FIELD,
                         benign_train_share: float = BENIGN_TRAIN_SHARE) -> Path:
    """pbc's cells by type, the largest white cell of malignant all-taleqani fields as blast and
    of the training part of its Benign fields as lymphocyte; a manifest whose subject is the
    source image (a field's crops never straddle splits)."""
    rows: list[list[str]] = []
    pbc = [(p, p.parent.name, f"pbc-{p.stem}") for t in PBC_TYPES for p in sorted((data / "pbc" / t).glob("*.jpg"))]
    # CellaVision centres the cell it photographs: the window is centred on the image.
    _crop_files(pbc, out / "train", scales["pbc"]["um_per_px"], window_um, _image_centre, rows, "pbc")
    blasts = []
    for subtype in ("Early", "Pre", "Pro"):
        files = sorted((data / "all-taleqani" / subtype).glob("*.jpg"))
        random.Random(0).shuffle(files)
        blasts += [(p, BLAST, f"taleqani-{p.stem}") for p in files[:blasts_per_subtype]]
    _crop_files(blasts, out / "train", scales["all-taleqani"]["um_per_px"], window_um,
                partial(_largest_cell, max_cell_um=max_cell_um), rows,
                "all-taleqani malignant (blast)")
    # Every located white cell of a Benign field, as for the control: its largest cell alone
    # would leave blast the large majority of this lab's cells.
    benign = split_benign_fields(data, benign_train_share)[0]
    for path in benign:
        for target in _crop_field_cells(path, scales["all-taleqani"]["um_per_px"], window_um,
                                        out / "train" / BENIGN_LABEL, benign_cells_per_field, max_cell_um):
            rows.append([str(target), BENIGN_LABEL, f"taleqani-{path.stem}"])
    benign_rows = sum(r[2].startswith("taleqani-WBC-Benign") for r in rows)
    _say(f"all-taleqani Benign, training part ({BENIGN_LABEL}): {benign_rows} cells of {len(benign)} fields")
    manifest = out / "train.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "subject"], *rows])
    return manifest


def build_control_crops(data: Path, out: Path, scales: dict, window_um: float,
                        cnmc_cell_um: float,
                        benign_train_share: float = BENIGN_TRAIN_SHARE) -> dict[str, list[tuple[Path, str]]]:
    """Cells no model saw, by control: (crop path, true label)."""
    import numpy as np
    from PIL import Image

    from leukoscope.io import load_image

    controls: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    # all-taleqani Benign, the part never trained on: every located white cell.
    for path in split_benign_fields(data, benign_train_share)[1]:
        for target in _crop_field_cells(path, scales["all-taleqani"]["um_per_px"], window_um,
                                        out / "taleqani-benign", BENIGN_CELLS_PER_FIELD):
            controls["taleqani-benign"].append((target, "not blast"))
    _say(f"all-taleqani Benign (control part): {len(controls['taleqani-benign'])} cells")
    # cnmc-mini: one segmented cell per image on black, no red cells to give a scale: the
    # cell is taken to be cnmc_cell_um across (stated in the card and the table).
    for label in ("all", "hem"):
        for path in sorted((data / "cnmc-mini" / label).glob("*.bmp")):
            image = load_image(path).convert("RGB")
            box = image.convert("L").point(lambda v: 255 if v > 12 else 0).getbbox()
            if box is None:
                continue
            diameter = max(box[2] - box[0], box[3] - box[1])
            truth = BLAST if label == "all" else "not blast"
            target = out / f"cnmc-{label}" / f"{path.stem}.png"
            _save_crop(image, box, cnmc_cell_um / diameter, window_um, target)
            controls[f"cnmc-{label}"].append((target, truth))
            # The same cell with its black surround painted a plain smear background: tells
            # the format (black) apart from the cell as the cause of a wrong call.
            pixels = np.asarray(image).copy()
            pixels[pixels.max(axis=2) <= 12] = SMEAR_BACKGROUND
            target = out / f"cnmc-{label}-on-background" / f"{path.stem}.png"
            _save_crop(Image.fromarray(pixels), box, cnmc_cell_um / diameter, window_um, target)
            controls[f"cnmc-{label}-on-background"].append((target, truth))
    _say(f"cnmc-mini: {len(controls['cnmc-all'])} all, {len(controls['cnmc-hem'])} hem cells")
    # BCCD: the white cell of each image whose type is known and single.
    types = {}  # image file name -> type, for the images of one known type (a few name two)
    with (data / "bccd" / "wbc_types.csv").open() as handle:
        for row in csv.DictReader(handle):
            name = row["wbc_type"].strip().upper()
            if name in BCCD_TYPES:
                types[row["image"].strip()] = BCCD_TYPES[name]
    from leukoscope.data.voc import read_voc_dataset

    for item in read_voc_dataset(data / "bccd", None, on_error="skip"):
        kind = types.get(item.image_path.name)
        wbc = [b for b in item.boxes if b.label == "WBC"]
        if kind is None or len(wbc) != 1:
            continue
        image = load_image(item.image_path).convert("RGB")
        target = out / "bccd" / kind / f"{item.image_path.stem}.png"
        _save_crop(image, wbc[0].as_xyxy(), _field_scale(image, scales["bccd"]["um_per_px"]), window_um, target)
        controls["bccd"].append((target, kind))
    _say(f"BCCD white cells with one known type: {len(controls['bccd'])} {dict(Counter(l for _, l in controls['bccd']))}")
    return controls


# ----------------------------------------------------------------------------- training
def train_detector(data: Path, out: Path, epochs: int, minutes: float, extra: list[str]) -> Path:
    from leukoscope.engine.detection_config import load_detection_config
    from leukoscope.tasks.detect import run_detection_experiment

    config = load_detection_config(REPO / "configs" / "zoo_detector.yaml", [
        f"data.path={data / 'cbc'}", f"output_root={out}", f"train.epochs={epochs}", f"train.max_minutes={minutes}", *extra])
    return Path(run_detection_experiment(config, show_progress=sys.stderr.isatty()).bundle_dir)


def train_classifier(manifest: Path, out: Path, window_um: float, epochs: int, minutes: float,
                     extra: list[str]) -> Path:
    from leukoscope.engine.config import load_config
    from leukoscope.tasks.classify import run_experiment

    config = load_config(REPO / "configs" / "zoo_classifier.yaml", [
        f"data.path={manifest}", f"data.cell_window_um={window_um}", f"output_root={out}",
        f"train.epochs={epochs}", f"train.max_minutes={minutes}", *extra])
    return Path(run_experiment(config, show_progress=sys.stderr.isatty()).bundle_dir)


def recoloured_training_set(manifest: Path, out: Path, recipe: str, share: float,
                            overrides: Iterable[str] = ()) -> tuple[Path, Path]:
    """The split training would make of ``manifest`` (the classifier config's ratios and seed, saved where
    training looks for it), with ``share`` of its training crops recoloured by ``recipe``
    (:data:`RECOLOUR_RECIPES`, bench/recolour_crops.py); validation and test crops untouched, so in-domain
    scores compare with a classifier trained on the crops as they are: (manifest, split file) to train on.
    ``overrides``: the classifier's config overrides (``--classifier-set``: its split settings count)."""
    import recolour_crops
    from leukoscope.engine.config import load_config
    from leukoscope.engine.data_prep import default_split_file, load_manifest, obtain_split

    data = load_config(REPO / "configs" / "zoo_classifier.yaml", [f"data.path={manifest}", *overrides]).data
    rows = load_manifest(data)
    split_file = default_split_file(data, out, rows)
    obtain_split(data, rows, split_file, show_progress=False)
    sources, colours = RECOLOUR_RECIPES[recipe]
    target = out / "recoloured"
    shutil.rmtree(target, ignore_errors=True)
    recolour_crops.main(["--split", str(split_file), "--out", str(target), "--source", sources,
                         "--colours-of", colours, "--share", str(share)])
    return target / "train.csv", target / "split.json"


def training_minutes(hours: float, elapsed_s: float, minutes: float | None) -> float:
    """Each model's training budget: ``minutes`` if given, else what ``hours`` leaves after
    ``elapsed_s`` and the scoring reserve; an error when that is under a minute."""
    if minutes is not None:
        return minutes
    left = hours * 60 - elapsed_s / 60 - SCORING_RESERVE_MINUTES
    if left < 1:
        raise ValueError(f"--hours {hours:g} leaves {left:.1f} min for training after {elapsed_s / 60:.1f} min "
                         f"of crops and {SCORING_RESERVE_MINUTES:g} min kept for scoring: allow more, or set --minutes")
    return left


def train_both(manifest: Path, data: Path, out: Path, window_um: float, classifier_epochs: int,
               detector_epochs: int, minutes: float, classifier_extra: list[str],
               detector_extra: list[str]) -> tuple[Path, Path]:
    """The classifier and the detector trained at the same time, each in its own (spawned)
    process on one thread: (classifier, detector) bundles."""
    one_thread = ["train.threads=1"]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        classifier = pool.submit(train_classifier, manifest, out, window_um, classifier_epochs, minutes,
                                 [*one_thread, *classifier_extra])
        detector = pool.submit(train_detector, data, out, detector_epochs, minutes, [*one_thread, *detector_extra])
        return classifier.result(), detector.result()


# ----------------------------------------------------------------------------- scoring
@lru_cache(maxsize=2)
def _loaded_classifier(bundle: str, backend: str = "torch"):
    """One load per bundle folder (and backend) for the in-domain and control scoring of a run."""
    from leukoscope.inference.predictor import CellClassifier

    return CellClassifier.from_bundle(bundle, backend=backend)


def load_controls(listing: Path) -> dict[str, list[tuple[Path, str]]]:
    """The control crops a run wrote (``<crops>/controls.json``): per control, (crop path, true label)."""
    saved = json.loads(Path(listing).read_text())["controls"]
    return {name: [(Path(p), label) for p, label in cells] for name, cells in saved.items()}


def crop_source(sample) -> str:
    """Which lab a training crop came from: its subject's prefix (``pbc-...``, ``taleqani-...``)."""
    return (sample.subject or "unknown").split("-", 1)[0]


def score_in_domain(classifier: Path, split_file: Path | None = None,
                    backend: str = "torch") -> tuple[dict[str, Any], list[float]] | None:
    """The classifier on the test part of its training split (default: the split its bundle
    records), by source: pbc's accuracy stands beside the mixed figure (issue #11's in-domain
    target is pbc's). Also the out-of-distribution scores of those cells: the in-distribution side
    of every control's AUROC. None when the split is gone (a bundle moved to another machine).
    ``backend``: what runs an exported classifier (``onnxruntime``, ``openvino``)."""
    from leukoscope.bundle import read_bundle_info
    from leukoscope.data.splits import Split

    split_file = split_file or read_bundle_info(classifier).split_file
    if split_file is None or not Path(split_file).is_file():
        _say(f"{classifier}: its training split {split_file} is gone; no in-domain row, no OOD AUROC")
        return None
    test = Split.load(split_file).manifest("test")
    predictions = _loaded_classifier(str(classifier), backend).predict_paths([s.path for s in test])
    by_source: dict[str, list[bool]] = defaultdict(list)
    by_class: dict[str, list[bool]] = defaultdict(list)
    for sample, prediction in zip(test, predictions):
        by_source[crop_source(sample)].append(prediction.top_class == sample.label)
        by_class[sample.label].append(prediction.top_class == sample.label)
    from sklearn.metrics import f1_score

    row: dict[str, Any] = {
        "cells": len(predictions),
        "accuracy": round(sum(map(sum, by_source.values())) / max(1, len(predictions)), 4),
        "macro_f1": round(float(f1_score([s.label for s in test], [p.top_class for p in predictions],
                                         average="macro", zero_division=0)), 4),
        "accuracy_by_source": {name: round(sum(hits) / len(hits), 4) for name, hits in sorted(by_source.items())},
        "cells_by_source": {name: len(hits) for name, hits in sorted(by_source.items())},
        "recall_by_class": {name: round(sum(hits) / len(hits), 4) for name, hits in sorted(by_class.items())},
    }
    scores = [p.ood_score for p in predictions if p.ood_score is not None]
    if scores:
        row["unfamiliar"] = round(sum(p.unfamiliar for p in predictions) / len(predictions), 4)
    return row, scores


def score_controls(classifier: Path, controls: dict[str, list[tuple[Path, str]]],
                   in_domain_scores: list[float] | None = None, backend: str = "torch") -> dict[str, dict[str, Any]]:
    """Each control's calls. With the in-domain test cells' out-of-distribution scores, also the
    share of a control's cells flagged unfamiliar, and the flag's AUROC (those test cells against
    the control's: issue #11 item 6's figure; 0.5 is chance). ``backend``: as :func:`score_in_domain`'s."""
    import numpy as np

    from leukoscope.evaluation.ood import ood_auroc

    model = _loaded_classifier(str(classifier), backend)
    rows = {}
    for name, cells in controls.items():
        predictions = model.predict_paths([p for p, _ in cells])
        calls = [p.top_class for p in predictions]
        truth = [label for _, label in cells]
        blast_share = sum(c == BLAST for c in calls) / max(1, len(calls))
        row: dict[str, Any] = {"cells": len(calls), "called_blast": round(blast_share, 4),
                               "calls": dict(Counter(calls).most_common())}
        typed = [(c, t) for c, t in zip(calls, truth) if t not in (BLAST, "not blast")]
        if typed:
            row["type_accuracy"] = round(sum(c == t for c, t in typed) / len(typed), 4)
            by_type: dict[str, list[bool]] = defaultdict(list)
            for call, true in typed:
                by_type[true].append(call == true)
            row["recall_by_type"] = {t: round(sum(hits) / len(hits), 4) for t, hits in sorted(by_type.items())}
            row["cells_by_type"] = {t: len(hits) for t, hits in sorted(by_type.items())}
            row["uncertain"] = round(sum(p.uncertain for p in predictions) / len(predictions), 4)
        scores = [p.ood_score for p in predictions if p.ood_score is not None]
        if scores and len(scores) == len(predictions):
            row["unfamiliar"] = round(sum(p.unfamiliar for p in predictions) / len(predictions), 4)
            # Blast calls that reach a differential without the "unlike the training data" flag.
            row["called_blast_unflagged"] = round(
                sum(p.top_class == BLAST and not p.unfamiliar for p in predictions) / len(predictions), 4)
            if in_domain_scores:
                row["ood_auroc"] = round(ood_auroc(np.asarray(in_domain_scores), np.asarray(scores)), 4)
        rows[name] = row
    return rows


def score_stain_swap(classifier: Path, controls: dict[str, list[tuple[Path, str]]],
                     split_file: Path | None = None) -> dict[str, Any] | None:
    """all-taleqani's Benign control cells in the blasts' slides' colours and its test blasts in the Benign
    cells' (bench/stain_swap.py): called blast as they are, recoloured in their own group's colours and
    swapped; None without the split."""
    import stain_swap
    from leukoscope.bundle import read_bundle_info

    split_file = split_file or read_bundle_info(classifier).split_file
    if split_file is None or not Path(split_file).is_file():
        return None
    benign = [str(path) for path, _ in controls.get("taleqani-benign", [])]
    try:
        return stain_swap.swap_scores(_loaded_classifier(str(classifier)), json.loads(Path(split_file).read_text())[
            "splits"], benign)
    except ValueError as exc:
        _say(f"no colour-swap row: {exc}")
        return None


def score_detector_elsewhere(detector: Path, data: Path, fields: int = 200,
                             backend: str = "torch") -> tuple[dict[str, dict[str, Any]], str]:
    """The detector on sources it never saw, which have no boxes: pbc (another lab; one white
    cell centred in each image, none in the platelet folder) and all-taleqani (another lab and
    magnification; fields of several white cells): how often it finds the cells there are; and
    what ran it. ``backend``: what should (an exported bundle's graph, e.g. an int8 export, on
    onnxruntime)."""
    from leukoscope.inference.smear import SmearAnalyzer
    from leukoscope.io import load_image

    analyzer = SmearAnalyzer(detector, None, backend=backend)
    rng = random.Random(0)

    def white_cells_found(paths: list[Path]) -> tuple[list[int], int]:
        """White cells found in each of ``fields`` sampled images, and how many had their scale estimated."""
        found, scaled = [], 0
        for path in rng.sample(paths, min(fields, len(paths))):
            result = analyzer.analyze(load_image(path))
            found.append(result.differential.total)
            scaled += result.scale["source"] == "estimated"
        return found, scaled

    rows: dict[str, dict[str, Any]] = {}
    pbc = [p for t in PBC_TYPES if t != "platelet" for p in sorted((data / "pbc" / t).glob("*.jpg"))]
    found, scaled = white_cells_found(pbc)
    rows["pbc"] = {"images": len(found), "with_one_wbc": round(sum(n == 1 for n in found) / len(found), 4),
                   "with_none": round(sum(n == 0 for n in found) / len(found), 4), "scale_estimated": scaled}
    found, scaled = white_cells_found(sorted((data / "all-taleqani").glob("*/*.jpg")))
    rows["all-taleqani"] = {"fields": len(found), "with_a_wbc": round(sum(n > 0 for n in found) / len(found), 4),
                            "mean_wbc": round(sum(found) / len(found), 2), "scale_estimated": scaled}
    _say(f"detector elsewhere ({analyzer.detector.backend}): {rows}")
    return rows, analyzer.detector.backend


CONTROL_TARGETS = {"taleqani-benign": ("called_blast", "<=", 0.05), "cnmc-all": ("called_blast", ">=", 0.90),
                   "cnmc-all-on-background": ("called_blast", ">=", 0.90),
                   "bccd": ("called_blast", "<=", 0.02)}


def verdicts(controls: dict[str, dict[str, Any]]) -> dict[str, str]:
    out = {}
    for name, (key, op, target) in CONTROL_TARGETS.items():
        if name in controls:
            value = controls[name][key]
            ok = value <= target if op == "<=" else value >= target
            out[name] = f"{key} {value:.3f} (target {op} {target}): {'holds' if ok else 'FAILS'}"
    return out


# ----------------------------------------------------------------------------- shipping
def record_crop_sources(classifier: Path, data: Path, split_file: Path | None = None) -> dict[str, int]:
    """Record in the classifier's folder the contents of the source images its training and validation crops
    were cut from (pbc's photographs, all-taleqani's fields; found by the crops' subjects), so that
    ``leukoscope evaluate`` refuses them as its training data wherever they are
    (:mod:`leukoscope.data.fingerprints`). ``split_file``: the bundle's split, where the one it records is
    gone. Returns how many source images each part has."""
    from leukoscope.bundle import read_bundle_info
    from leukoscope.data.fingerprints import LEARNED_PARTS, OF_CROP_SOURCES, write_training_digests
    from leukoscope.data.splits import Split

    split = Split.load(split_file or read_bundle_info(classifier).split_file)
    sources = {f"pbc-{p.stem}": p for p in (data / "pbc").rglob("*.jpg")}
    sources.update({f"taleqani-{p.stem}": p for p in (data / "all-taleqani").rglob("*.jpg")})
    learned = [s for part in LEARNED_PARTS for s in split.assignments.get(part, [])]
    unknown = sorted({s.subject for s in learned if s.subject not in sources})
    if unknown:  # a crop whose source is not found here cannot be refused: say so
        _say(f"warning: the source images of {len(unknown)} crop subject(s) are not in {data} "
             f"(e.g. {unknown[0]}): not recorded")
    parts = {part: sorted({sources[s.subject] for s in split.assignments.get(part, []) if s.subject in sources})
             for part in LEARNED_PARTS}
    write_training_digests(classifier, parts, of=OF_CROP_SOURCES)
    return {part: len(paths) for part, paths in parts.items()}


def to_half(bundle: Path, target: Path) -> Path:
    """A copy of the bundle with float weights stored as float16 (loaded back as float32)."""
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("*.pt"))
    weights = target / "model.safetensors"
    state = load_file(weights)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, weights)
    return target


def record_shipped_detector_scores(detector: Path, data: Path) -> dict[str, Any]:
    """Score the detector as it ships (float16 weights) on CBC Testing and record those scores in
    its bundle, for the quality gate of ``analyze`` and the card: float16 moves mAP by ~1e-3.
    Returns the bundle's metrics with the per-class rows."""
    import tempfile

    from leukoscope.bundle import record_metrics
    from leukoscope.tasks.detect import evaluate_detector_bundle, recorded_test_scores

    with tempfile.TemporaryDirectory() as out:
        # as training scores its test part (fields as they are): what the bundle records and the gate reads
        measured = evaluate_detector_bundle(detector, data / "cbc", out, split="Testing", show_progress=False,
                                            at_scale=False)
    info = record_metrics(detector, recorded_test_scores(measured))
    return {**info.metrics, "per_class": measured["per_class"]}


def record_shipped_classifier_scores(classifier: Path, in_domain: dict[str, Any]) -> None:
    """Record in the classifier's bundle its test-part scores as it ships (float16 weights, its
    test-time views), in place of its training run's (float32; one view when views were set after):
    those this does not measure again are dropped rather than kept beside another reading's."""
    from leukoscope.bundle import VIEW_DEPENDENT_METRICS, read_bundle_info, record_metrics

    views = read_bundle_info(classifier).preprocessing.views
    record_metrics(classifier, {"accuracy": in_domain["accuracy"], "macro_f1": in_domain["macro_f1"],
                                "n": in_domain["cells"], "accuracy_by_source": in_domain["accuracy_by_source"],
                                "evaluated_on": f"test, as shipped (float16 weights, {views} view"
                                                f"{'s' if views > 1 else ''})"},
                   drop=VIEW_DEPENDENT_METRICS)


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _threads(n: Any) -> str:
    return "one thread" if n == 1 else f"{n} threads" if isinstance(n, int) else "an unrecorded number of threads"


def detector_card(results: dict[str, Any]) -> str:
    m = results.get("detector_metrics", {})
    ap = m.get("ap_50_per_class", {})
    scale = results.get("detector_um_per_px") or results["scales"].get("cbc", {}).get("um_per_px")
    pbc = results.get("detector_elsewhere", {}).get("pbc", {})
    tal = results.get("detector_elsewhere", {}).get("all-taleqani", {})
    return f"""# smear-detector

Finds white cells, red cells and platelets in a stained peripheral-blood smear field.

- **Model**: Faster R-CNN, MobileNetV3-Large + FPN (strides 8/16/32), box head 256 wide,
  5.4 M parameters, weights stored as float16 (loaded as float32). Trained from random
  initialisation (no ImageNet weights), {m.get('best_epoch', results.get('detector_epochs', '?'))} epochs in
  {_fmt(m.get('train_minutes'), 0)} min on {_threads(results.get('detector_threads'))} of a 2-core CPU (the last epoch
  kept), stain augmentation.
  RoIAlign takes one sample per bin (`roi_sampling_ratio` 1): a quarter of the pooling work.
- **Classes**: WBC, RBC, Platelets.
- **Training data**: CBC (Alam & Islam 2019; the BCCD smears with corrected boxes),
  Training + Validation (300 distinct fields, 640x480), MIT licence. Pixel size of the
  training fields: {_fmt(scale, 4)} um/px (estimated from their red cells); smear analysis
  resamples every field to it first (`leukoscope.scale`).
- **In-domain test** (CBC Testing, 60 fields, never trained on): mAP@0.5 {_fmt(m.get('map_50'))},
  mAP@[.5:.95] {_fmt(m.get('map'))}, AP@0.5 WBC {_fmt(ap.get('WBC'))} / Platelets {_fmt(ap.get('Platelets'))} /
  RBC {_fmt(ap.get('RBC'))}; white-cell count exact on {_fmt(m.get('wbc_count_exact'))} of the fields.
- **Left-out sources** (no boxes there, so recall only): pbc (Barcelona, CellaVision, one
  white cell centred per image): exactly one white cell found in {_fmt(pbc.get('with_one_wbc'))} of
  {pbc.get('images', '?')} images, none in {_fmt(pbc.get('with_none'))}; all-taleqani (Tehran, another
  magnification, resampled by the scale estimate): a white cell found in {_fmt(tal.get('with_a_wbc'))} of
  {tal.get('fields', '?')} fields (mean {tal.get('mean_wbc', '?')} per field). BCCD shows the same smears
  as CBC, so it is not an independent test.
- **Intended use**: decision support in research and teaching; locating white cells for a
  differential that a trained person reviews. Not a medical device; not for diagnosis.
- **Known failure modes**: one lab, one stain, one camera in training: other stains and
  magnifications are handled by stain augmentation and the scale estimate, not by
  training data, so expect misses on strongly different slides (an earlier CBC detector
  missed 45% of the white cells of an outside lab's fields). Dense or thick areas (red
  cells overlapping) have no scale estimate and crowd the detector. Up to 100 boxes per
  640x480 field: fields at the cap are flagged by `leukoscope analyze`.
- **Retrain**: `python bench/zoo.py --install` (docs/benchmarks.md, "Shipped models").
"""


def _stain_line(stain: str | None) -> str:
    """The card's sentence on what the crop goes through before the network (``data.stain``)."""
    if stain == "white_balance":
        return ("\n  Each crop's background (the glass between the cells) is first brought to one neutral white,\n"
                "  one gain per channel (`data.stain=white_balance`): a camera's white balance and exposure cancel.")
    if stain == "macenko":
        return "\n  Each crop's two stains are first rebuilt in pbc's colours (`data.stain=macenko`)."
    return ""


def _views_line(views: int) -> str:
    if views == 1:
        return "Each cell is read once, as cropped."
    which = "its right-angle rotations and their mirror images" if views == 8 else "its right-angle rotations"
    return (f"Each cell is read in {views} views ({which}), outputs averaged (`preprocessing.views`, set by "
            f"`predict.views` in training or `calibrate-ood --views`; {views} times the network's work per cell): "
            f"calibration and the out-of-distribution flag are fitted on the same averages, and Grad-CAM's map "
            f"is every view's, turned back and averaged.")


def _share_words(results: dict[str, Any]) -> str:
    """The card's words for the share of all-taleqani's Benign fields trained on."""
    share = results.get("benign_train_share", BENIGN_TRAIN_SHARE)
    return "half" if share == 0.5 else f"{share:.0%}"


def _recolour_line(results: dict[str, Any]) -> str:
    recolour = results.get("recolour")
    if not recolour:
        return ""
    sources, colours = RECOLOUR_RECIPES[recolour["recipe"]]
    whose = {"other": "the other lab's colours", "randstain": "colours drawn around both labs' (RandStainNA)"}.get(
        colours, f"{colours}'s colours")
    return (f"\n  - {recolour['share']:.0%} of the training crops of {sources.replace(',', ' and ')} rebuilt in "
            f"{whose} (Reinhard colour transfer, `bench/recolour_crops.py`); validation and test crops "
            f"as they are.")


def _swap_line(swap: dict[str, Any]) -> str:
    """The card's sentence on :func:`score_stain_swap`'s rows."""
    benign, blasts = swap["benign_control_in_blast_colours"], swap["test_blasts_in_benign_colours"]
    return (f"\n  The Benign control depends on the slides' colours: shown in the colours of the blasts' slides "
            f"(Reinhard colour transfer), {_fmt(benign['called_blast_swapped'])} of its cells are called blast "
            f"({_fmt(benign['called_blast'])} as they are, {_fmt(benign.get('called_blast_own_colours'))} "
            f"recoloured alike in their own slides' colours), and the test blasts in the Benign cells' colours "
            f"{_fmt(blasts['called_blast_swapped'])} ({_fmt(blasts['called_blast'])}; "
            f"{_fmt(blasts.get('called_blast_own_colours'))}) (`bench/stain_swap.py`): part of what tells this "
            f"lab's hematogones from its blasts is the slide, not the cell.")


def classifier_card(results: dict[str, Any]) -> str:
    m = results.get("classifier_metrics", {})
    c = results["controls"]
    rows = "\n".join(f"| {name} | {row['cells']} | {_fmt(row['called_blast'])} | "
                     f"{_fmt(row.get('type_accuracy')) if 'type_accuracy' in row else '-'} | "
                     f"{_fmt(row.get('unfamiliar'))} | {_fmt(row.get('ood_auroc'))} | "
                     f"{results['verdicts'].get(name, '-')} |" for name, row in c.items())
    # The bundle as it ships, re-scored on its test part (its views and weights); the training run's
    # figures only where there is no re-scoring (a bundle whose split is gone).
    own = results.get("fp16_in_domain") or results.get("in_domain") or {}
    by_source = ", ".join(f"{name} {_fmt(acc, 4)} ({own['cells_by_source'][name]} cells)"
                          for name, acc in own.get("accuracy_by_source", {}).items()) or "not measured"
    recall = own.get("recall_by_class") or {name: row.get("recall") for name, row in m.get("per_class", {}).items()}
    views = results.get("classifier_views", 1)
    recalls = ", ".join(f"{name} {_fmt(value, 2)}" for name, value in recall.items()) or "-"
    bccd_calls = ", ".join(f"{name} {n}" for name, n in c.get("bccd", {}).get("calls", {}).items()) or "-"
    swap = results.get("stain_swap")
    swap_line = "" if not swap else _swap_line(swap)
    return f"""# wbc-classifier

Types one white cell: the eight cell types of the PBC dataset and **blast**.

- **Model**: MobileNetV2 at 96 px, 2.2 M parameters, from random initialisation, weights
  stored as float16 (loaded as float32); temperature-scaled probabilities; a cell whose
  calibrated confidence is below {results.get('uncertain_threshold', 0.5)} is answered "uncertain".
  {_views_line(views)}
- **Input**: a {results['window_um']:g} um square around the cell at the field's scale
  (`leukoscope.cell_window`, `leukoscope.scale`), whatever the microscope. `leukoscope predict` and
  the service cut it from a single-cell image around the image's centre, at the scale given,
  estimated from its red cells or lent by the other images of the folder or case; an image without
  one is classified whole and says so (a cell then
  looks larger or smaller than any it learned: its class may be wrong).{_stain_line(results.get("classifier_stain"))}
- **Classes**: basophil, blast, eosinophil, erythroblast, ig (immature granulocyte),
  lymphocyte, monocyte, neutrophil, platelet.
- **Training data and licences**:
  - PBC dataset (Acevedo et al. 2020, Hospital Clinic Barcelona, CC BY 4.0): 3,200 cells, eight types.
  - **blast**: the largest white cell of {results.get('blast_fields', '?')} malignant fields (Early Pre-B,
    Pre-B, Pro-B) of the ALL image dataset of Taleqani Hospital (Aria, Ghaderzadeh et al.
    2021), marked **research use**: this model is therefore for **research use only**, and
    its blast class is learned from B-lineage ALL of one hospital.
  - **lymphocyte** also from the same dataset: every white cell colour segmentation finds
    (up to {results.get('benign_cells_per_field', BENIGN_CELLS_PER_FIELD)} per field) in {_share_words(results)}
    of its Benign fields
    (hematogones, normal B-lymphocyte precursors, which a manual differential counts as
    lymphocytes), so that the stain of the blasts' lab is not by itself a reason to say blast. The
    dataset labels fields, not cells: the odd neutrophil or monocyte of those fields was learned as
    lymphocyte too, and in that lab's stain the classifier calls nearly every white cell lymphocyte
    (lobulated neutrophils included): read its types there as "not blast", not as a differential.
  - Split 80/10/10 by source image, duplicate-aware; test below never trained on.{_recolour_line(results)}
- **In-domain test**: accuracy {_fmt(own.get('accuracy', m.get('accuracy')), 4)}, macro-F1
  {_fmt(own.get('macro_f1', m.get('macro_f1')), 4)}
  (pbc cells and all-taleqani cells of the held-out images); recall by class: {recalls}.
  By source: {by_source} (target for pbc: >= 0.96); flagged unfamiliar: {_fmt(own.get('unfamiliar'))}
  of them (about 0.05 by construction).
- **Left-out sources and controls** (never in training; targets from issue #11). "unfamiliar":
  share flagged by the out-of-distribution score (Mahalanobis distances of five stages of the
  network and of its penultimate embedding, each standardised on validation cells and summed;
  threshold at the 95th percentile of validation cells); "OOD AUROC": that score telling the
  in-domain test cells from the row's (target >= 0.9; taleqani-benign is the training lab, not a
  new source):

| cells | n | called blast | type accuracy | unfamiliar | OOD AUROC | verdict |
|---|---|---|---|---|---|---|
{rows}

  taleqani-benign: every white cell of the all-taleqani Benign fields not trained on (same
  lab and stain as the blasts, no leukaemia; the parts are duplicate-aware): tests that the blast call comes
  from the cell, not the slide. cnmc-mini:
  C-NMC 2019 cells (another lab, segmented on black; no scale in the images, each cell
  taken to be {results['cnmc_cell_um']:g} um across). bccd: BCCD white cells (another lab; types from
  `wbc_types.csv`): the leave-one-source-out score for the cell types.
- **Intended use**: research and teaching; pre-classification for review by trained staff.
  Not a medical device; a blast percentage is decision support, never a diagnosis.
- **Known failure modes**: blasts come from one hospital and one ALL lineage (B-ALL):
  myeloblasts and other labs' blasts are out of its experience; the rows above that say
  FAILS are open problems, not tuned away. On BCCD's white cells (another lab) its calls
  were {bccd_calls}: on an unfamiliar lab's cells expect wrong types, and read the
  out-of-distribution flag (`unfamiliar`) of every cell. Cells at an unknown scale are cropped at the
  detector's training scale (flagged in `analyze`'s output). The controls move with the training run by a
  few points: BCCD's cells called blast 0.3-5.6% across runs of this recipe (docs/benchmarks.md), 98-100%
  of them flagged unfamiliar.{swap_line}
- **Retrain**: `python bench/zoo.py --install` (docs/benchmarks.md, "Shipped models").
"""


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "zoo")
    parser.add_argument("--window-um", type=float, default=24.0, help="physical crop around each cell")
    parser.add_argument("--blasts-per-subtype", type=int, default=400)
    parser.add_argument("--max-cell-um", type=float, default=None,
                        help=f"skip training crops of stained objects larger than this (clumps; e.g. {CLUMP_UM:g})")
    parser.add_argument("--benign-cells-per-field", type=int, default=BENIGN_CELLS_PER_FIELD,
                        help="white cells cropped from each Benign training field (the control keeps "
                             f"{BENIGN_CELLS_PER_FIELD})")
    parser.add_argument("--benign-train-share", type=float, default=BENIGN_TRAIN_SHARE,
                        help="share of the Benign fields trained on (by duplicate group); the rest is the control")
    parser.add_argument("--cnmc-cell-um", type=float, default=12.0,
                        help="assumed diameter of a cnmc-mini cell (its images carry no scale)")
    parser.add_argument("--recolour", choices=("none", *RECOLOUR_RECIPES), default="none",
                        help="rebuild a share of the classifier's training crops in another lab's colours: "
                             "taleqani (pbc's in all-taleqani's), other (each lab's in the other's), randstain "
                             "(both labs' in colours drawn around theirs)")
    parser.add_argument("--recolour-share", type=float, default=0.5, help="share of those crops recoloured")
    parser.add_argument("--detector-epochs", type=int, default=12)
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument("--hours", type=float, default=2.0,
                        help="time budget of the whole run: crops, training (both models at once), scoring")
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget of each model's training instead of what --hours leaves")
    parser.add_argument("--detector", type=Path, help="score this detector bundle instead of training one")
    parser.add_argument("--classifier", type=Path, help="score this classifier bundle instead of training one")
    parser.add_argument("--classifier-split", type=Path,
                        help="the --classifier's training split, where the one its bundle records is gone "
                             "(`leukoscope split` on the same crops rebuilds it)")
    parser.add_argument("--install", action="store_true", help="copy the bundles (fp16) into the package")
    parser.add_argument("--crops-only", action="store_true", help="stop after writing the crops")
    parser.add_argument("--elsewhere-fields", type=int, default=200,
                        help="pbc images and all-taleqani fields the detector is tried on")
    parser.add_argument("--detector-backend", default="torch", choices=("torch", "onnxruntime", "openvino"),
                        help="what runs the detector on the other labs' images: torch, onnxruntime or openvino "
                             "(an exported --detector, e.g. an int8 export)")
    parser.add_argument("--install-dir", type=Path, default=PACKAGE_MODELS, help="where --install puts the bundles")
    parser.add_argument("--detector-set", nargs="*", default=[], help="extra detector config overrides key=value")
    parser.add_argument("--classifier-set", nargs="*", default=[], help="extra classifier config overrides")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.elsewhere_fields < 1:
        parser.error("--elsewhere-fields must be at least 1")
    if args.benign_cells_per_field < 1:
        parser.error("--benign-cells-per-field must be at least 1")
    if not 0.0 < args.benign_train_share < 1.0:
        parser.error("--benign-train-share must be in (0, 1): the rest of the Benign fields is a control")
    if not 0.0 < args.recolour_share <= 1.0:
        parser.error("--recolour-share must be in (0, 1]")
    if args.recolour != "none" and args.classifier is not None:
        parser.error("--recolour changes the training crops: it cannot be used with --classifier (no training)")
    if args.recolour != "none" and any(item.startswith("data.split_file=") for item in args.classifier_set):
        parser.error("--recolour makes its own split file (the crops' split, training part recoloured): "
                     "drop data.split_file from --classifier-set")
    if args.detector_backend != "torch":
        if args.detector is None or args.install:
            parser.error("--detector-backend scores an exported --detector; the shipped models are torch bundles "
                         "(no --install)")
        from leukoscope.bundle import BundleError, read_bundle_info
        from leukoscope.inference.detector_runtime import choose_detector_backend

        try:  # before any crop is made: a bundle without a graph, or a runtime not installed
            choose_detector_backend(args.detector_backend, read_bundle_info(args.detector, task="detect"),
                                    args.detector)
        except (BundleError, ValueError) as exc:
            parser.error(f"--detector-backend: {exc}")
    if not (args.data / "pbc").is_dir():
        print(f"{args.data} has no pbc folder: this needs ../shared/datasets", file=sys.stderr)
        return 2
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    scales = source_scales(args.data)
    crops = args.out / "crops"
    listing = crops / "controls.json"  # reused by a rerun with the same window, Benign parts, cnmc size, data
    design = {"window_um": args.window_um, "benign_train_share": args.benign_train_share,
              "cnmc_cell_um": args.cnmc_cell_um, "data": str(args.data.resolve())}
    if listing.exists() and all(json.loads(listing.read_text()).get(k) == v for k, v in design.items()):
        controls = load_controls(listing)
    else:
        controls = build_control_crops(args.data, crops / "controls", scales, args.window_um, args.cnmc_cell_um,
                                       args.benign_train_share)
        listing.write_text(json.dumps({**design, "controls": {
            name: [(str(p), label) for p, label in cells] for name, cells in controls.items()}}))
    classifier = args.classifier
    if classifier is None or args.crops_only:
        manifest = build_training_crops(args.data, crops, scales, args.window_um, args.blasts_per_subtype,
                                        args.max_cell_um, args.benign_cells_per_field, args.benign_train_share)
        # A split saved for earlier crops no longer matches them (training refuses it): start afresh.
        shutil.rmtree(args.out / "splits", ignore_errors=True)
        if args.crops_only:
            return 0
        if args.recolour != "none":
            manifest, recoloured_split = recoloured_training_set(manifest, args.out, args.recolour,
                                                                 args.recolour_share, args.classifier_set)
            args.classifier_set = [*args.classifier_set, f"data.split_file={recoloured_split}"]
    try:
        minutes = training_minutes(args.hours, time.perf_counter() - start, args.minutes)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    detector = args.detector
    if classifier is None and detector is None:
        classifier, detector = train_both(manifest, args.data, args.out, args.window_um, args.classifier_epochs,
                                          args.detector_epochs, minutes, args.classifier_set, args.detector_set)
    elif classifier is None:
        classifier = train_classifier(manifest, args.out, args.window_um, args.classifier_epochs, minutes,
                                      args.classifier_set)
    elif detector is None:
        detector = train_detector(args.data, args.out, args.detector_epochs, minutes, args.detector_set)
    if args.classifier is None:  # its crops' source images, for evaluate to refuse (never a given bundle's folder)
        _say(f"source images of the classifier's crops recorded: {record_crop_sources(classifier, args.data)}")
    from leukoscope.bundle import read_bundle_info

    results: dict[str, Any] = {"scales": scales, "window_um": args.window_um, "cnmc_cell_um": args.cnmc_cell_um,
                               "detector_epochs": args.detector_epochs,
                               "blast_fields": 3 * args.blasts_per_subtype,
                               "benign_cells_per_field": args.benign_cells_per_field,
                               "benign_train_share": args.benign_train_share,
                               "recolour": None if args.recolour == "none" else
                               {"recipe": args.recolour, "share": args.recolour_share},
                               "uncertain_threshold": read_bundle_info(classifier).uncertain_threshold,
                               "classifier_views": read_bundle_info(classifier).preprocessing.views,
                               "classifier_stain": read_bundle_info(classifier).preprocessing.stain,
                               "detector": str(detector), "classifier": str(classifier)}
    # With --install, what ships (float16 weights) is what gets scored on other labs' images.
    scored_detector = to_half(detector, args.out / "half" / "smear-detector") if args.install else detector
    results["detector_elsewhere"], results["detector_backend"] = score_detector_elsewhere(
        scored_detector, args.data, args.elsewhere_fields, args.detector_backend)
    in_domain = score_in_domain(classifier, args.classifier_split)
    results["in_domain"] = in_domain[0] if in_domain else None
    results["controls"] = score_controls(classifier, controls, in_domain[1] if in_domain else None)
    results["verdicts"] = verdicts(results["controls"])
    for role, bundle in (("detector", detector), ("classifier", classifier)):
        # The run's metrics.json (beside the bundle) has the per-class rows the bundle leaves out.
        run_metrics = Path(bundle).parent / "metrics.json"
        per_class = json.loads(run_metrics.read_text()).get("per_class", {}) if run_metrics.exists() else {}
        results[f"{role}_metrics"] = {**read_bundle_info(bundle).metrics, "per_class": per_class}
    detector_info = read_bundle_info(detector)
    results["detector_um_per_px"] = detector_info.um_per_px
    results["detector_threads"] = detector_info.provenance.get("config", {}).get("train", {}).get("threads")
    # Does the Benign control hold in the blasts' colours? (With --install: on what ships, below.)
    results["stain_swap"] = None if args.install else score_stain_swap(classifier, controls, args.classifier_split)
    if args.install:
        half_classifier = to_half(classifier, args.out / "half" / "wbc-classifier")
        half_in_domain = score_in_domain(half_classifier, args.classifier_split)
        results["fp16_in_domain"] = half_in_domain[0] if half_in_domain else None
        if half_in_domain:
            record_shipped_classifier_scores(half_classifier, half_in_domain[0])
        results["fp16_controls"] = score_controls(half_classifier, controls,
                                                  half_in_domain[1] if half_in_domain else None)
        results["stain_swap"] = score_stain_swap(half_classifier, controls, args.classifier_split)
        results["detector_metrics"] = record_shipped_detector_scores(scored_detector, args.data)
        for name, bundle in (("smear-detector", scored_detector), ("wbc-classifier", half_classifier)):
            target = args.install_dir / name
            card = target / "MODEL_CARD.md"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("*.csv", "*.png", "*.html", "*.log"))
            card.write_text(detector_card(results) if name == "smear-detector" else classifier_card(results))
            _say(f"installed {target} ({sum(f.stat().st_size for f in target.iterdir()) / 1e6:.1f} MB)")
    results["minutes"] = round((time.perf_counter() - start) / 60, 1)
    (args.out / "zoo-results.json").write_text(json.dumps(results, indent=1, default=str))
    _print_table(results)
    return 0


def _print_table(results: dict[str, Any]) -> None:
    det = results.get("detector_metrics", {})
    # The classifier as it ships (re-scored on its test part) where it was; else its training run's scores.
    own = results.get("fp16_in_domain") or results.get("in_domain") or {}
    cls = {**results.get("classifier_metrics", {}), **own}
    print("\n| model | in-domain test | left-out sources |")
    print("|---|---|---|")
    ap = det.get("ap_50_per_class", {})
    away = results.get("detector_elsewhere", {})
    pbc, tal = away.get("pbc", {}), away.get("all-taleqani", {})
    print(f"| smear-detector | CBC Testing mAP@0.5 {det.get('map_50', float('nan')):.3f}, WBC AP@0.5 "
          f"{ap.get('WBC', float('nan')):.3f} | pbc: one white cell found in {pbc.get('with_one_wbc', float('nan')):.3f} "
          f"of {pbc.get('images', 0)} images (none in {pbc.get('with_none', float('nan')):.3f}); all-taleqani: a white "
          f"cell in {tal.get('with_a_wbc', float('nan')):.3f} of {tal.get('fields', 0)} fields |")
    c = results["controls"]
    bccd = c.get("bccd", {})
    print(f"| wbc-classifier | pbc+blast test accuracy {cls.get('accuracy', float('nan')):.4f}, macro-F1 "
          f"{cls.get('macro_f1', float('nan')):.4f} | BCCD types {bccd.get('type_accuracy', float('nan')):.3f} "
          f"({bccd.get('cells', 0)} cells) |")
    if own:
        print("in-domain test accuracy by source: " + ", ".join(
            f"{name} {acc:.4f} ({own['cells_by_source'][name]} cells)"
            for name, acc in own["accuracy_by_source"].items()))
    print("\n| control (never in training) | cells | called blast | target | verdict | unfamiliar | OOD AUROC |")
    print("|---|---|---|---|---|---|---|")
    for name, row in c.items():
        target = CONTROL_TARGETS.get(name)
        verdict = results["verdicts"].get(name, "")
        print(f"| {name} | {row['cells']} | {row['called_blast']:.3f} | "
              f"{(target[1] + ' ' + str(target[2])) if target else '-'} | "
              f"{verdict.split(': ')[-1] if verdict else ''} | "
              f"{_fmt(row.get('unfamiliar'))} | {_fmt(row.get('ood_auroc'))} |")
    print("\nscales (um/px): " + ", ".join(f"{k} {v.get('um_per_px')}" for k, v in results["scales"].items()))
    print(f"total {results['minutes']} min")


if __name__ == "__main__":
    sys.exit(main())
