"""Synthetic stained single-cell images for the demo and the tests.

Each class has its own *morphology* (nucleus shape, size, nucleus-to-cytoplasm
ratio, chromatin texture) while stain colour, background, position and red
cells vary at random *independently of the class*, so a model can only succeed
by looking at the cell, not the background.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import disk, ellipse

#: The demo's four cell types and what distinguishes them.
SYNTHETIC_CLASSES: tuple[str, ...] = ("blast", "lymphocyte", "monocyte", "neutrophil")


@dataclass(frozen=True)
class SyntheticSpec:
    image_size: int = 96
    images_per_class: int = 60
    seed: int = 0


def _stain(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random May-Grünwald-Giemsa-like palette, shared by all classes."""
    jitter = lambda: rng.normal(0, 12, size=3)  # noqa: E731
    return {
        "background": np.clip(np.array([232, 215, 222]) + jitter(), 0, 255),
        "rbc": np.clip(np.array([214, 150, 160]) + jitter(), 0, 255),
        "cytoplasm": np.clip(np.array([170, 165, 215]) + jitter(), 0, 255),
        "nucleus": np.clip(np.array([95, 55, 140]) + jitter(), 0, 255),
    }


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float = 1.0) -> None:
    canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour


def _mask_from(rr: np.ndarray, cc: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rr, cc] = True
    return mask


def render_cell(label: str, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """One RGB uint8 image of a cell of type ``label``."""
    if label not in SYNTHETIC_CLASSES:
        raise ValueError(f"unknown synthetic class {label!r}; choose from {SYNTHETIC_CLASSES}")
    shape = (size, size)
    stain = _stain(rng)
    canvas = np.ones((size, size, 3)) * stain["background"]
    s = size / 96.0
    # Red cells scattered in the background, same for every class.
    for _ in range(rng.integers(3, 8)):
        r, c = rng.uniform(0, size, 2)
        radius = rng.uniform(9, 13) * s
        _paint(canvas, _mask_from(*disk((r, c), radius, shape=shape), shape), stain["rbc"], 0.9)
        _paint(canvas, _mask_from(*disk((r, c), radius * 0.45, shape=shape), shape), stain["background"], 0.4)

    centre = np.array([size / 2, size / 2]) + rng.normal(0, 4 * s, 2)
    cell_radius = {"blast": 27, "lymphocyte": 17, "monocyte": 30, "neutrophil": 25}[label] * s
    cell_radius *= rng.uniform(0.9, 1.1)
    cell = _mask_from(*disk(tuple(centre), cell_radius, shape=shape), shape)
    _paint(canvas, cell, stain["cytoplasm"])

    nucleus = np.zeros(shape, dtype=bool)
    angle = rng.uniform(0, np.pi)
    if label == "blast":  # large round nucleus, thin rim of cytoplasm
        nucleus |= _mask_from(*disk(tuple(centre), cell_radius * 0.85, shape=shape), shape)
    elif label == "lymphocyte":  # small dense round nucleus, most of the cell
        nucleus |= _mask_from(*disk(tuple(centre + rng.normal(0, 1, 2)), cell_radius * 0.8, shape=shape), shape)
    elif label == "monocyte":  # kidney-shaped: an ellipse with a bite taken out
        rr, cc = ellipse(*centre, cell_radius * 0.45, cell_radius * 0.7, shape=shape, rotation=angle)
        nucleus |= _mask_from(rr, cc, shape)
        bite = centre + cell_radius * 0.45 * np.array([np.cos(angle), np.sin(angle)])
        nucleus &= ~_mask_from(*disk(tuple(bite), cell_radius * 0.35, shape=shape), shape)
    else:  # neutrophil: three to five separate lobes
        lobes = rng.integers(3, 6)
        for k in range(lobes):
            theta = angle + 2 * np.pi * k / lobes
            lobe_centre = centre + cell_radius * 0.45 * np.array([np.cos(theta), np.sin(theta)])
            nucleus |= _mask_from(*disk(tuple(lobe_centre), cell_radius * 0.25, shape=shape), shape)
        # granules in the cytoplasm
        granules = (rng.random(shape) < 0.08) & cell & ~nucleus
        _paint(canvas, granules, stain["nucleus"] * 1.3, 0.35)
    _paint(canvas, nucleus, stain["nucleus"])

    # Chromatin texture: fine for blasts (with a pale nucleolus), coarse for others.
    grain = rng.normal(0, 6 if label == "blast" else 16, shape)
    canvas[nucleus] += grain[nucleus, None]
    if label == "blast":
        nucleolus = centre + rng.normal(0, cell_radius * 0.2, 2)
        _paint(canvas, _mask_from(*disk(tuple(nucleolus), cell_radius * 0.18, shape=shape), shape) & nucleus,
               stain["cytoplasm"], 0.6)

    canvas += rng.normal(0, 4, canvas.shape)  # sensor noise
    return np.clip(canvas, 0, 255).astype(np.uint8)


def make_synthetic_dataset(
    root: str | Path,
    spec: SyntheticSpec = SyntheticSpec(),
    classes: tuple[str, ...] = SYNTHETIC_CLASSES,
    image_format: str = "png",
) -> Path:
    """Write ``root/<class>/<class>_NNNN.<format>`` and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(spec.seed)
    for label in classes:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(spec.images_per_class):
            pixels = render_cell(label, rng, spec.image_size)
            Image.fromarray(pixels).save(folder / f"{label}_{i:04d}.{image_format}")
    return root
