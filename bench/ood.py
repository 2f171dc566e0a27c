"""Out-of-distribution flag (issue #11 item 6): does a classifier trained on one source tell its own
held-out cells from cells of sources it never saw?

    python bench/ood.py                            # train mobilenet_v3_small on pbc (64 px, <= 5 min), score
    python bench/ood.py --bundle runs/x/bundle     # a trained pbc bundle (with its recorded split)

In distribution: the test part of the bundle's recorded split (neither trained on nor used for the
threshold). Out of distribution: all-taleqani images (224 px crops of smears, several cells each),
cnmc-mini single cells (C-NMC BMPs, black background) and BCCD white-cell crops (the WBC boxes of
its VOC annotations, with the 10% margin smear analysis crops with). For each source: the AUROC
(sklearn's roc_auc_score: 1 separates perfectly, 0.5 is chance) of three scores, and the share
flagged at their thresholds (95th percentile of validation scores, so about 5% of
in-distribution cells): ``mahalanobis`` (the bundle's: unit-length embeddings), ``energy`` (the
bundle's threshold) and ``mahalanobis_raw`` (Lee et al. on the raw embeddings, fitted here on the
same train/val parts, for comparison). The last line is the bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from leukoscope.data.voc import read_voc_dataset
from leukoscope.data.splits import Split
from leukoscope.engine.config import load_config
from leukoscope.evaluation.ood import OodStats, calibrate_ood, ood_auroc
from leukoscope.inference.predictor import CellClassifier
from leukoscope.io import is_image_file, load_image
from leukoscope.preprocessing import batched_outputs, stack_pixels
from leukoscope.tasks.classify import run_experiment
from leukoscope.tasks.ood import calibrate_bundle, fit_sample

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="a trained classifier bundle (default: train one on --data)")
    parser.add_argument("--data", default=str(SHARED / "pbc"), help="the in-distribution source (class folders)")
    parser.add_argument("--taleqani", default=str(SHARED / "all-taleqani"))
    parser.add_argument("--cnmc", default=str(SHARED / "cnmc-mini"))
    parser.add_argument("--bccd", default=str(SHARED / "bccd"), help="VOC folder; its WBC boxes are cropped")
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=500, help="at most this many images per source (seeded sample)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-ood"))
    return parser.parse_args()


def train(args: argparse.Namespace) -> Path:
    config = load_config(overrides=[
        f"name=ood-{args.model}", f"output_root={args.out}", f"data.path={args.data}", f"model.name={args.model}",
        f"model.image_size={args.image_size}", f"train.epochs={args.epochs}", f"train.max_minutes={args.minutes}",
        f"train.lr={args.lr}", f"train.batch_size={args.batch_size}", "train.scheduler=onecycle",
        "train.optimizer=adamw", "train.weight_decay=0.0001", "train.augmentation=geometric",
        f"train.seed={args.seed}", f"train.threads={args.threads}",
    ])
    result = run_experiment(config, show_progress=False)
    print(f"trained {args.model}: test accuracy {result.metrics['accuracy']:.4f} in "
          f"{result.metrics['train_minutes']:.1f} min ({len(result.fit.history)} epochs)")
    return result.bundle_dir


def sample(items: list, limit: int, seed: int) -> list:
    if len(items) <= limit:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[i] for i in keep]


def folder_images(root: Path, limit: int, seed: int) -> list[Image.Image]:
    return [load_image(p) for p in sample(sorted(p for p in root.rglob("*") if is_image_file(p)), limit, seed)]


def wbc_crops(root: Path, limit: int, seed: int, margin: float = 0.1) -> list[Image.Image]:
    """Every WBC box of a VOC folder, cut out with ``margin`` on each side (as SmearAnalyzer.crop_cell)."""
    boxes = [(image.image_path, box) for image in read_voc_dataset(root, on_error="skip")
             for box in image.boxes if box.label.upper() == "WBC"]
    crops = []
    for path, box in sample(boxes, limit, seed):
        image = load_image(path)
        mx, my = box.width * margin, box.height * margin
        crops.append(image.crop((max(0, int(box.xmin - mx)), max(0, int(box.ymin - my)),
                                 min(image.width, int(np.ceil(box.xmax + mx))),
                                 min(image.height, int(np.ceil(box.ymax + my))))))
    return crops


def raw_mahalanobis(classifier: CellClassifier, split: Split, seed: int) -> OodStats:
    """Mahalanobis on the raw (not unit-length) embeddings, fitted as the bundle's statistics are:
    class Gaussians on the train part (at most 10,000 images) for each part of the embedding the
    bundle reads (its stages', if any, and the penultimate one), threshold on the val part."""
    outputs = {}
    for part in ("train", "val"):
        manifest = split.manifest(part)
        sample_ = fit_sample(len(manifest), seed) if part == "train" else None
        manifest = manifest if sample_ is None else manifest.subset(sample_.tolist())
        pixels, kept, _ = classifier.preprocessing.decode(manifest)
        outputs[part] = (*batched_outputs(classifier.model, pixels, classifier.preprocessing), kept.targets)
    (_, train, targets), (logits, held, _) = outputs["train"], outputs["val"]
    return calibrate_ood(train, np.asarray(targets), logits, held, normalize=False,
                         energy=classifier.info.framework == "torch", widths=classifier.ood.widths,
                         stages=classifier.ood.stages)


def scores(classifier: CellClassifier, raw: OodStats, images: list[Image.Image]) -> dict[str, np.ndarray]:
    """Every score of ``images``: the bundle's methods and Mahalanobis on the raw embeddings."""
    logits, embeddings = [], []
    for start in range(0, len(images), 64):
        pixels = stack_pixels(images[start:start + 64], classifier.preprocessing)
        out = batched_outputs(classifier.model, pixels, classifier.preprocessing, classifier.device)
        logits.append(out[0])
        embeddings.append(out[1])
    logits_all, embeddings_all = np.concatenate(logits), np.concatenate(embeddings)
    found = {method: classifier.ood.scores(logits_all, embeddings_all, method)
             for method in ("mahalanobis", "energy") if method in classifier.ood.thresholds}
    found["mahalanobis_raw"] = raw.scores(logits_all, embeddings_all, "mahalanobis")
    return found


def main() -> None:
    args = parse_args()
    if not Path(args.data).exists():
        sys.exit(f"{args.data} not found: this benchmark needs the real dataset")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bundle = Path(args.bundle) if args.bundle else train(args)
    classifier = CellClassifier.from_bundle(bundle)
    if classifier.ood is None:  # a bundle from before format 3: fit its statistics on its training data
        stats, source = calibrate_bundle(bundle, args.data, show_progress=False)
        print(f"fitted OOD statistics on {source}")
        classifier = CellClassifier.from_bundle(bundle)
    split_file = classifier.info.split_file
    if split_file is None or not split_file.is_file():
        sys.exit(f"{bundle}: no recorded split to take the in-distribution test cells from")
    split = Split.load(split_file)
    test = [s.path for s in split.manifest("test")]
    sources = {f"{Path(args.data).name} test (in-distribution)": [load_image(p) for p in sample(test, args.limit,
                                                                                                  args.seed)]}
    for name, path, read in (("all-taleqani images", args.taleqani, folder_images),
                             ("cnmc-mini cells", args.cnmc, folder_images),
                             ("BCCD WBC crops", args.bccd, wbc_crops)):
        if Path(path).exists():
            sources[name] = read(Path(path), args.limit, args.seed)
        else:
            print(f"skipped {name}: {path} not found")
    raw = raw_mahalanobis(classifier, split, args.seed)
    thresholds = {**classifier.ood.thresholds, "mahalanobis_raw": raw.threshold}
    scored = {name: scores(classifier, raw, images) for name, images in sources.items()}
    inside_name = next(iter(scored))
    inside = scored[inside_name]
    methods = list(inside)
    rows = []
    for name, values in scored.items():
        row = {"source": name, "images": len(sources[name])}
        for method in methods:
            flagged = float((values[method] > thresholds[method]).mean())
            row[f"flagged_{method}"] = flagged
            row[f"auroc_{method}"] = None if name == inside_name else ood_auroc(inside[method], values[method])
        rows.append(row)
    header = ["source", "images"] + [f"AUROC {m}" for m in methods] + [f"flagged {m}" for m in methods]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        aurocs = ["-" if row[f"auroc_{m}"] is None else f"{row[f'auroc_{m}']:.3f}" for m in methods]
        flagged = [f"{100 * row[f'flagged_{m}']:.1f}%" for m in methods]
        print("| " + " | ".join([row["source"], str(row["images"]), *aurocs, *flagged]) + " |")
    entry = classifier.info.ood or {}
    print(f"flag method in the bundle: {entry.get('method')}; thresholds {entry.get('thresholds')} "
          f"({entry.get('fit_images')} training images, {entry.get('threshold_images')} validation images)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "ood-results.json"
    results.write_text(json.dumps({"args": vars(args), "bundle": str(bundle), "ood": entry,
                                   "mahalanobis_raw": raw.to_parts()[0], "rows": rows,
                                   "seconds": time.perf_counter() - start}, indent=1))
    print(f"results: {results} ({(time.perf_counter() - start) / 60:.1f} min)")
    print(bundle)


if __name__ == "__main__":
    main()
