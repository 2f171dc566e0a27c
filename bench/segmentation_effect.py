"""Does segmentation (system E's LAB k-means) change what a CNN learns? With and without, one split.

    python bench/segmentation_effect.py                                  # jabeena_cnn, 3 epochs, 96 px
    python bench/segmentation_effect.py --model tusar_convnet --epochs 5 --classic random_forest

Trains the CNN (and optionally a classical model) twice on the same saved
split, once on the plain images and once with ``data.segmentation=lab_kmeans``
(applied to training, validation, test and, through the bundle, prediction),
prints the comparison table, then measures on ``--n-cam`` test images where
each CNN's Grad-CAM heat lies: the share of the heatmap's mass inside the
stained-cell mask (LAB k-means of the letterboxed original image), against the
share of the image the mask covers (what a heatmap spread evenly would score).
Writes ``gradcam.png`` (examples: original, heat without / with segmentation)
and ``gradcam.json`` next to the comparison. The last line is the best bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from leukoscope.data.splits import Split
from leukoscope.tasks.classify import run_name
from leukoscope.tasks.compare import markdown_table, run_compare
from leukoscope.engine.config import CompareConfig, CompareEntry, load_config
from leukoscope.inference.explain import grad_cam, heatmap_mask_fraction, overlay_heatmap
from leukoscope.inference.predictor import CellClassifier
from leukoscope.io import load_image
from leukoscope.segmentation import cell_mask
from leukoscope.pixels import letterbox

REPO = Path(__file__).resolve().parents[1]


def cam_study(bundle: Path, paths: list[Path], size: int) -> tuple[list[float], list[float], list[np.ndarray]]:
    """Heat-in-mask share, mask area and the heatmap of each image, for the predicted class."""
    classifier = CellClassifier.from_bundle(bundle)
    inside, areas, heats = [], [], []
    for path in paths:
        image = load_image(path)
        mask = cell_mask(letterbox(image, size), "lab_kmeans")
        heat = grad_cam(classifier.model, classifier.preprocess(image).unsqueeze(0),
                        views=classifier.info.preprocessing.views)[0]
        share = heatmap_mask_fraction(heat, mask) if mask.any() else float("nan")
        inside.append(share)
        areas.append(float(mask.mean()))
        heats.append(heat)
    return inside, areas, heats


def figure(paths: list[Path], size: int, heats: dict[str, list[np.ndarray]], out: Path, count: int = 6) -> Path:
    from matplotlib.figure import Figure

    names = list(heats)
    fig = Figure(figsize=(2.6 * (1 + len(names)), 2.6 * count), layout="constrained")
    axes = fig.subplots(count, 1 + len(names), squeeze=False)
    for row, path in enumerate(paths[:count]):
        shown = letterbox(load_image(path), size)
        axes[row][0].imshow(shown)
        axes[row][0].set_title(path.parent.name if row else f"original\n{path.parent.name}", fontsize=9)
        for col, name in enumerate(names, start=1):
            axes[row][col].imshow(overlay_heatmap(shown, heats[name][row]))
            if row == 0:
                axes[row][col].set_title(name, fontsize=9)
    for ax in np.ravel(axes):
        ax.set_axis_off()
    fig.savefig(out, dpi=80)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "compare_taleqani.yaml"))
    parser.add_argument("--data", default=None, help="dataset folder instead of the config's data.path")
    parser.add_argument("--model", default="jabeena_cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--augmentation", default="jabeena")
    parser.add_argument("--classic", default=None, help="also compare this classical model with and without")
    parser.add_argument("--n-cam", type=int, default=100, help="test images for the Grad-CAM study")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-segmentation"))
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    args = parser.parse_args()

    data = [f"data.path={args.data}"] if args.data else []
    config = load_config(args.config, [f"output_root={args.out}", f"model.image_size={args.image_size}",
                                       f"train.epochs={args.epochs}", f"train.augmentation={args.augmentation}",
                                       *data, *args.set])
    if not config.data.path or not Path(config.data.path).exists():
        sys.exit(f"{config.data.path} not found: this benchmark needs the real dataset")
    seg = {"data.segmentation": "lab_kmeans"}
    rows = [CompareEntry(model=args.model, label=args.model),
            CompareEntry(model=args.model, label=f"{args.model}+seg", overrides=seg)]
    if args.classic:
        rows += [CompareEntry(model=args.classic, label=args.classic),
                 CompareEntry(model=args.classic, label=f"{args.classic}+seg", overrides=seg)]
    config.compare = CompareConfig(models=rows)
    config.name = f"{run_name(config)}-segmentation"
    result = run_compare(config, show_progress=False)
    print(markdown_table(result.rows))

    split = Split.load(Path(result.rows[0].run_dir) / "split.json")
    test = [sample.path for sample in split.manifest("test")]
    chosen = [test[i] for i in np.random.default_rng(0).permutation(len(test))[: args.n_cam]]
    torch.set_grad_enabled(True)
    study: dict[str, dict] = {}
    heats: dict[str, list[np.ndarray]] = {}
    for row in result.rows:
        if row.kind == "classic":
            continue
        inside, areas, heat = cam_study(Path(row.bundle), chosen, args.image_size)
        heats[row.label] = heat
        share = np.asarray(inside)
        study[row.label] = {
            "images": len(chosen),
            "images_with_mask": int(np.isfinite(share).sum()),
            "median_heat_in_mask": float(np.nanmedian(share)),
            "mean_heat_in_mask": float(np.nanmean(share)),
            "mean_mask_area": float(np.mean(areas)),
        }
    directory = result.compare_dir
    (directory / "gradcam.json").write_text(json.dumps(study, indent=2))
    figure(chosen, args.image_size, heats, directory / "gradcam.png")
    print("\n| model | Grad-CAM heat inside the cell mask (median, mean) | mask area (mean) | images |")
    print("|---|---:|---:|---:|")
    for label, item in study.items():
        print(f"| {label} | {item['median_heat_in_mask']:.3f}, {item['mean_heat_in_mask']:.3f} | "
              f"{item['mean_mask_area']:.3f} | {item['images_with_mask']}/{item['images']} |")
    print(f"\noutputs: {directory} (gradcam.png, gradcam.json)")
    print(directory if result.best is None else result.best.bundle_dir)  # no validation part: nothing chosen


if __name__ == "__main__":
    main()
