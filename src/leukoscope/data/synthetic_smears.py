"""Synthetic smear fields with Pascal VOC boxes, for tests and demos.

A field is a slide-coloured background with red cells (pale-centred discs),
platelets (small purple dots) and a few white cells pasted from
:func:`leukoscope.data.synthetic.render_cell` (so each white cell has a type:
blast, lymphocyte, monocyte or neutrophil). The folder written is a flat VOC
layout that :func:`leukoscope.data.voc.read_voc_dataset` reads::

    root/JPEGImages/smear_0000.png
    root/Annotations/smear_0000.xml      objects WBC / RBC / Platelets
    root/cell_types.csv                  image, box index, white-cell type
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import disk

from leukoscope.data.annotations import AnnotatedImage, BoxAnnotation
from leukoscope.data.voc import write_voc_xml
from leukoscope.data.synthetic import SYNTHETIC_CLASSES, render_cell


@dataclass(frozen=True)
class SmearSpec:
    width: int = 320
    height: int = 240
    cell_size: int = 72
    """Side of the rendered white-cell patch; the cell itself is about 0.6 of it."""
    wbc_per_image: tuple[int, int] = (1, 3)
    rbc_per_image: tuple[int, int] = (6, 14)
    platelets_per_image: tuple[int, int] = (0, 3)
    cell_types: tuple[str, ...] = SYNTHETIC_CLASSES
    seed: int = 0


def _overlaps(box: tuple[float, float, float, float], others: list[tuple[float, float, float, float]],
              margin: float) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
               for b in others)


def render_smear(rng: np.random.Generator, spec: SmearSpec = SmearSpec(),
                 types: list[str] | None = None) -> tuple[np.ndarray, list[BoxAnnotation], list[str]]:
    """One field: RGB uint8 pixels, boxes (WBC / RBC / Platelets) and the type of each WBC box, in order."""
    h, w = spec.height, spec.width
    background = np.clip(np.array([232, 214, 220]) + rng.normal(0, 8, 3), 0, 255)
    canvas = np.ones((h, w, 3)) * background
    rbc_colour = np.clip(np.array([212, 148, 158]) + rng.normal(0, 8, 3), 0, 255)
    boxes: list[BoxAnnotation] = []
    wbc_types: list[str] = []
    occupied: list[tuple[float, float, float, float]] = []

    n_wbc = int(rng.integers(spec.wbc_per_image[0], spec.wbc_per_image[1] + 1)) if types is None else len(types)
    size = spec.cell_size
    patch_radius = 0.34 * size
    yy, xx = np.mgrid[0:size, 0:size]
    for index in range(n_wbc):
        label = types[index] if types is not None else str(rng.choice(spec.cell_types))
        for _attempt in range(50):
            x0 = float(rng.uniform(0, w - size))
            y0 = float(rng.uniform(0, h - size))
            if not _overlaps((x0, y0, x0 + size, y0 + size), occupied, 2):
                break
        else:
            continue
        cell = render_cell(label, rng, size).astype(float)
        # A soft round mask around the cell, so no square patch edge is visible.
        distance = np.hypot(yy - size / 2, xx - size / 2)
        alpha = np.clip((patch_radius + 3 - distance) / 3, 0, 1)[..., None]
        ix, iy = int(x0), int(y0)
        region = canvas[iy:iy + size, ix:ix + size]
        canvas[iy:iy + size, ix:ix + size] = alpha * cell + (1 - alpha) * region
        # The box of the cell's own disc (its radius varies a little with the type).
        radius = {"blast": 27, "lymphocyte": 17, "monocyte": 30, "neutrophil": 25}.get(label, 27) * size / 96.0
        cx, cy = ix + size / 2, iy + size / 2
        box = (max(0.0, cx - radius - 1), max(0.0, cy - radius - 1), min(float(w), cx + radius + 1),
               min(float(h), cy + radius + 1))
        boxes.append(BoxAnnotation("WBC", *box))
        wbc_types.append(label)
        occupied.append((ix, iy, ix + size, iy + size))

    rbc_radius = size * 0.16
    for _ in range(int(rng.integers(spec.rbc_per_image[0], spec.rbc_per_image[1] + 1))):
        radius = rbc_radius * rng.uniform(0.85, 1.15)
        for _attempt in range(30):
            cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            if not _overlaps(box, occupied, 1):
                break
        else:
            continue
        rr, cc = disk((cy, cx), radius, shape=(h, w))
        canvas[rr, cc] = 0.1 * canvas[rr, cc] + 0.9 * rbc_colour
        rr, cc = disk((cy, cx), radius * 0.45, shape=(h, w))
        canvas[rr, cc] = 0.6 * canvas[rr, cc] + 0.4 * background
        boxes.append(BoxAnnotation("RBC", *box))
        occupied.append(box)

    platelet_colour = np.array([120, 70, 150])
    for _ in range(int(rng.integers(spec.platelets_per_image[0], spec.platelets_per_image[1] + 1))):
        radius = size * rng.uniform(0.05, 0.07)
        for _attempt in range(30):
            cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            if not _overlaps(box, occupied, 1):
                break
        else:
            continue
        rr, cc = disk((cy, cx), radius, shape=(h, w))
        canvas[rr, cc] = platelet_colour + rng.normal(0, 10, 3)
        boxes.append(BoxAnnotation("Platelets", *box))
        occupied.append(box)

    canvas += rng.normal(0, 3, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8), boxes, wbc_types


def make_synthetic_smears(root: str | Path, n_images: int = 24, spec: SmearSpec = SmearSpec(),
                          image_format: str = "png") -> list[AnnotatedImage]:
    """Write ``n_images`` synthetic fields as a flat VOC folder under ``root``; returns them.

    Each returned :class:`AnnotatedImage` has ``labels`` = the types of its WBC
    boxes, in box order (also written to ``root/cell_types.csv``).
    """
    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    images = []
    rows = []
    for i in range(n_images):
        pixels, boxes, types = render_smear(rng, spec)
        path = root / "JPEGImages" / f"smear_{i:04d}.{image_format}"
        Image.fromarray(pixels).save(path)
        image = AnnotatedImage(path, spec.width, spec.height, boxes, labels=types)
        write_voc_xml(image, root / "Annotations" / f"{path.stem}.xml")
        images.append(image)
        wbc_index = 0
        for box_index, box in enumerate(boxes):
            if box.label == "WBC":
                rows.append([path.name, box_index, types[wbc_index]])
                wbc_index += 1
    with open(root / "cell_types.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "box_index", "cell_type"])
        writer.writerows(rows)
    return images
