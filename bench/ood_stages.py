"""Which parts of a MobileNetV2 classifier's embedding should the out-of-distribution score read?
(issue #11 item 6)

    python bench/ood_stages.py BUNDLE [BUNDLE ...] --controls runs/zoo/crops/controls.json \
        [--split SPLIT]    # default: each bundle's recorded split

For each bundle (a `bench/zoo.py` cell classifier: MobileNetV2, pbc + all-taleqani crops) the
averaged outputs of blocks 3, 6, 10, 13 and 16 of its trunk and its penultimate embedding are read
in one pass over the split's train, val and test parts and over the control crops of
`bench/zoo.py` (cells of sources the model never saw, and all-taleqani's Benign control). Then
for each choice of parts, :func:`leukoscope.evaluation.ood.calibrate_ood` fits the Gaussians on
the train part and sets the threshold on val exactly as the bundle would, and the table gives,
per control, the AUROC of in-domain test cells against the control's cells and the share of the
control flagged; `test` is the share of in-domain test cells flagged (about 0.05 by design).
Nothing is fitted on the controls: they only score the choices. One line per (bundle, choice).

    python bench/ood_stages.py BUNDLE [BUNDLE ...] --fields 60 [--data ../shared/datasets]

What a user sees instead: `leukoscope analyze`'s warning ("review: images unlike the training data",
more than 30% of a field's white cells unfamiliar) with the shipped detector and each bundle as it is
(its own statistics), on a seeded sample of fields of each source: pbc (one cell per image; the
training lab), all-taleqani Benign and malignant fields (the training lab) and CBC Testing (BCCD's
smears: a lab never trained on). One line per (bundle, source): fields warned, cells unfamiliar.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from leukoscope.data.splits import Split
from leukoscope.evaluation.ood import calibrate_ood, ood_auroc
from leukoscope.inference.predictor import CellClassifier
from leukoscope.io import is_image_file, load_image
from leukoscope.models.embedding import embedding_widths, set_embedding_stages
from leukoscope.preprocessing import batched_outputs, stack_pixels

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
#: Every stage looked at (the shipped default, leukoscope.models.embedding.DEFAULT_STAGES).
STAGES = ("features.3", "features.6", "features.10", "features.13", "features.16")
PENULTIMATE = "penultimate"
#: The choices compared: one part alone, or several.
CHOICES = {**{name: (name,) for name in (*STAGES, PENULTIMATE)},
           "deep: 13, 16, penultimate": ("features.13", "features.16", PENULTIMATE),
           "6, 10, 13, penultimate": ("features.6", "features.10", "features.13", PENULTIMATE),
           "all: 3, 6, 10, 13, 16, penultimate": (*STAGES, PENULTIMATE)}


def outputs(classifier: CellClassifier, paths: list[Path], batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Logits and the full embedding (every stage, then the penultimate part) of the images."""
    logits, embeddings = [], []
    for start in range(0, len(paths), batch):
        pixels = stack_pixels([load_image(p) for p in paths[start:start + batch]], classifier.preprocessing)
        out, embedded = batched_outputs(classifier.model, pixels, classifier.preprocessing)
        logits.append(out), embeddings.append(embedded)
    return np.concatenate(logits), np.concatenate(embeddings)


def columns(widths: tuple[int, ...], parts: tuple[str, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The embedding's columns of ``parts`` and their widths."""
    names = (*STAGES, PENULTIMATE)
    starts = np.concatenate([[0], np.cumsum(widths)])
    chosen = [names.index(p) for p in parts]
    return np.concatenate([np.arange(starts[k], starts[k + 1]) for k in chosen]), tuple(widths[k] for k in chosen)


def score_bundle(bundle: str, split_file: Path | None, controls: dict[str, list[Path]]) -> list[dict]:
    classifier = CellClassifier.from_bundle(bundle)
    model = classifier.model
    set_embedding_stages(model, STAGES)
    split = Split.load(split_file or classifier.info.split_file)
    parts = {name: split.manifest(name) for name in ("train", "val", "test")}
    classes = {name: k for k, name in enumerate(classifier.classes)}
    seen = {name: outputs(classifier, [s.path for s in part]) for name, part in parts.items()}
    unseen = {name: outputs(classifier, paths) for name, paths in controls.items()}
    example = classifier.preprocessing.model_input(torch.as_tensor(
        stack_pixels([load_image(parts["test"][0].path)], classifier.preprocessing)))
    widths = embedding_widths(model, example)
    targets = np.array([classes[s.label] for s in parts["train"]])
    rows = []
    for choice, chosen in CHOICES.items():
        cols, part_widths = columns(widths, chosen)
        stats = calibrate_ood(seen["train"][1][:, cols], targets, seen["val"][0], seen["val"][1][:, cols],
                              widths=part_widths, stages=chosen[:-1])
        familiar = stats.scores(seen["test"][0], seen["test"][1][:, cols])
        row = {"bundle": bundle, "choice": choice, "test": round(float(stats.unfamiliar(familiar).mean()), 3)}
        for name, (logits, embedded) in unseen.items():
            scores = stats.scores(logits, embedded[:, cols])
            row[name] = (round(ood_auroc(familiar, scores), 3), round(float(stats.unfamiliar(scores).mean()), 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def field_sources(data: Path) -> dict[str, list[Path]]:
    """The image files of each source's folders (pbc without its platelet folder: no white cell)."""
    def images(*folders: Path) -> list[Path]:
        return sorted(p for folder in folders for p in folder.glob("*") if is_image_file(p))

    return {"pbc": images(*(f for f in sorted((data / "pbc").glob("*")) if f.is_dir() and f.name != "platelet")),
            "taleqani-benign": images(data / "all-taleqani" / "Benign"),
            "taleqani-malignant": images(*(data / "all-taleqani" / c for c in ("Early", "Pre", "Pro"))),
            "cbc-testing": images(data / "cbc" / "Testing" / "Images")}


def field_flags(bundle: str, data: Path, fields: int, detector: str = "pretrained:smear-detector") -> list[dict]:
    """Per source: of ``fields`` seeded fields, how many get the unfamiliar warning, and the share of
    their white cells that are unfamiliar."""
    from leukoscope.inference.quality import UNFAMILIAR_WORDING
    from leukoscope.inference.smear import SmearAnalyzer

    analyzer = SmearAnalyzer(detector, bundle)
    rng = random.Random(0)
    rows = []
    for source, files in field_sources(data).items():
        chosen = rng.sample(files, min(fields, len(files)))
        warned = cells = unfamiliar = 0
        for path in chosen:
            result = analyzer.analyze(path)
            warned += any(UNFAMILIAR_WORDING.lower() in w.lower() for w in result.warnings)
            cells += len(result.cells)
            unfamiliar += sum(c.unfamiliar for c in result.cells)
        row = {"bundle": bundle, "source": source, "fields": len(chosen), "warned": warned, "cells": cells,
               "unfamiliar": round(unfamiliar / max(cells, 1), 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--controls", type=Path, help="bench/zoo.py's controls.json (the choices' table)")
    parser.add_argument("--split", type=Path, help="the split (default: each bundle's recorded one)")
    parser.add_argument("--fields", type=int, help="instead: analyze this many fields of each source")
    parser.add_argument("--data", type=Path, default=SHARED, help="../shared/datasets (with --fields)")
    parser.add_argument("--detector", default="pretrained:smear-detector", help="with --fields")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fields:
        for bundle in args.bundles:
            field_flags(bundle, args.data, args.fields, args.detector)
        return 0
    if args.controls is None:
        parser.error("--controls is required (or --fields)")
    saved = json.loads(args.controls.read_text())["controls"]
    controls = {name: [Path(p) for p, _ in cells] for name, cells in saved.items()}
    for bundle in args.bundles:
        score_bundle(bundle, args.split, controls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
