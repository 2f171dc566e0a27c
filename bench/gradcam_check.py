"""Does a classifier look at the cells or at the background?

For every test image of a saved split this measures, with the bundle's own
preprocessing (letterbox at its input size):

- accuracy on the original images;
- accuracy with the *cells removed* (stained pixels found by LAB k-means
  segmentation, dilated, painted with the median background colour): a model
  that still scores high here reads the slide background, not the cells;
- accuracy with the *background removed* (only the segmented cells kept, on white);
- the share of Grad-CAM energy inside the cell mask, next to the share of the
  image the cells cover (a model that ignores where the cells are scores about
  the area share; one that looks at the cells scores well above it);
- with ``--occlude x0,y0,x1,y1`` (fractions of the image), accuracy with that
  region painted out, and with *only* that region kept: for a stamp or scale
  bar burnt into the images (all-taleqani has one in its lower-right corner).

It also saves a figure of Grad-CAM overlays (two images per class).

    python bench/gradcam_check.py --bundle runs/.../bundle --split-file runs/.../split.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from leukoscope.data.splits import Split  # noqa: E402
from leukoscope.inference.explain import grad_cam, heatmap_mask_fraction, overlay_heatmap  # noqa: E402
from leukoscope.inference.predictor import CellClassifier  # noqa: E402
from leukoscope.io import load_image  # noqa: E402
from leukoscope.segmentation import cell_mask  # noqa: E402
from leukoscope.pixels import letterbox  # noqa: E402


def remove_cells(image: Image.Image, mask: np.ndarray) -> Image.Image:
    array = np.asarray(image).copy()
    grown = ndimage.binary_dilation(mask, iterations=max(1, image.size[0] // 40))
    if grown.all() or not grown.any():
        return image
    array[grown] = np.median(array[~grown], axis=0)
    return Image.fromarray(array)


def keep_cells(image: Image.Image, mask: np.ndarray) -> Image.Image:
    array = np.asarray(image).copy()
    if mask.any():
        array[~mask] = 255
    return Image.fromarray(array)


def paint(image: Image.Image, box: tuple[float, float, float, float], *, inside: bool) -> Image.Image:
    """Paint the region (``inside``) or everything but it with the median colour of the rest."""
    array = np.asarray(image).copy()
    height, width = array.shape[:2]
    region = np.zeros((height, width), dtype=bool)
    region[int(box[1] * height):int(np.ceil(box[3] * height)), int(box[0] * width):int(np.ceil(box[2] * width))] = True
    target = region if inside else ~region
    array[target] = np.median(array[~target], axis=0)
    return Image.fromarray(array)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--split-file", required=True)
    parser.add_argument("--subset", default="test")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    parser.add_argument("--figure", default=None, help="PNG of Grad-CAM overlays (default: beside the bundle)")
    parser.add_argument("--occlude", default=None, help="x0,y0,x1,y1 fractions of the letterboxed image: a region to paint out / keep alone")
    args = parser.parse_args()
    occlude = tuple(float(v) for v in args.occlude.split(",")) if args.occlude else None
    if occlude is not None and (len(occlude) != 4 or not 0 <= occlude[0] < occlude[2] <= 1
                                or not 0 <= occlude[1] < occlude[3] <= 1 or occlude == (0, 0, 1, 1)):
        parser.error(f"--occlude needs x0,y0,x1,y1 with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, not the whole "
                     f"image, got {args.occlude}")

    classifier = CellClassifier.from_bundle(args.bundle)
    size = classifier.image_size
    samples = list(Split.load(args.split_file).manifest(args.subset))
    if args.limit:
        rng = np.random.default_rng(0)
        samples = [samples[i] for i in sorted(rng.choice(len(samples), min(args.limit, len(samples)), replace=False))]
    truth = np.array([classifier.classes.index(s.label) for s in samples])

    originals, no_cells, only_cells, inside, area = [], [], [], [], []
    shown: dict[str, list[tuple[Image.Image, np.ndarray, str]]] = {}
    for sample in samples:
        seen = letterbox(load_image(sample.path), size)  # what the model sees
        mask = cell_mask(seen, "lab_kmeans")
        originals.append(seen)
        no_cells.append(remove_cells(seen, mask))
        only_cells.append(keep_cells(seen, mask))
        inputs = classifier.preprocess(seen).unsqueeze(0)
        heatmap = grad_cam(classifier.model, inputs, views=classifier.info.preprocessing.views)[0]
        if mask.any():
            inside.append(heatmap_mask_fraction(heatmap, mask))
            area.append(float(mask.mean()))
        if len(shown.setdefault(sample.label, [])) < 2:
            shown[sample.label].append((seen, heatmap, sample.path.name))

    def accuracy(images: list[Image.Image]) -> float:
        predicted = np.concatenate([classifier.probabilities(images[i:i + 64]).argmax(1)
                                    for i in range(0, len(images), 64)])
        return float((predicted == truth).mean())

    chance = float(np.bincount(truth).max() / len(truth))
    print(f"images: {len(samples)} ({args.subset} of {args.split_file}); majority-class rate {chance:.4f}")
    print(f"accuracy original:           {accuracy(originals):.4f}")
    print(f"accuracy cells removed:      {accuracy(no_cells):.4f}")
    print(f"accuracy background removed: {accuracy(only_cells):.4f}")
    if occlude is not None:
        print(f"accuracy region {args.occlude} painted out: "
              f"{accuracy([paint(im, occlude, inside=True) for im in originals]):.4f}")
        print(f"accuracy only region {args.occlude} kept:   "
              f"{accuracy([paint(im, occlude, inside=False) for im in originals]):.4f}")
    print(f"Grad-CAM energy inside cells: {np.nanmean(inside):.3f} (cells cover {np.mean(area):.3f} of the image; "
          f"enrichment x{np.nanmean(inside) / np.mean(area):.1f})")

    figure_path = Path(args.figure) if args.figure else Path(args.bundle).parent / "gradcam_check.png"
    rows = [item for items in shown.values() for item in items]
    fig, axes = plt.subplots(1, len(rows), figsize=(2.2 * len(rows), 2.6))
    for ax, (image, heatmap, name) in zip(np.atleast_1d(axes), rows):
        ax.imshow(overlay_heatmap(image, heatmap))
        ax.set_title(name[:22], fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(figure_path, dpi=130)
    print(f"figure: {figure_path}")


if __name__ == "__main__":
    with torch.enable_grad():
        main()
