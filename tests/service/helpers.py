"""Shared helpers of the service tests: a quickly trained bundle, images, a fake smear backend."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from leukoscope.data.synthetic import SYNTHETIC_CLASSES, render_cell
from leukoscope.bundle import BundleInfo, save_bundle
from leukoscope.preprocessing import Preprocessing
from leukoscope.models import create_model

CELL_SIZE = 64
PASSWORD = "correct horse battery"


def train_tiny_bundle(directory: Path, *, seed: int = 0, epochs: int = 6, per_class: int = 24) -> Path:
    """A small CNN trained for a few seconds on synthetic cells, saved as a real bundle
    (same files `leukoscope train` writes): enough for probabilities and Grad-CAM to mean something."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    images, labels = [], []
    for index, name in enumerate(SYNTHETIC_CLASSES):
        for _ in range(per_class):
            images.append(render_cell(name, rng, CELL_SIZE))
            labels.append(index)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.tensor(labels)
    model = create_model("abas_cnn", num_classes=len(SYNTHETIC_CLASSES))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for start in range(0, len(y), 32):
            batch = order[start:start + 32]
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimiser.step()
    info = BundleInfo(model_name="abas_cnn", classes=list(SYNTHETIC_CLASSES),
                      preprocessing=Preprocessing(image_size=CELL_SIZE, mean=mean, std=std),
                      uncertain_threshold=0.5, provenance={"made_by": "tests/service"})
    return save_bundle(directory, model.eval(), info)


def cell_image(label: str = "blast", seed: int = 0, size: int = CELL_SIZE) -> Image.Image:
    return Image.fromarray(render_cell(label, np.random.default_rng(seed), size))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def smear_field(seed: int = 0) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """A 320x200 'field' with six synthetic cells pasted at known places."""
    rng = np.random.default_rng(seed)
    field = Image.new("RGB", (320, 200), (232, 215, 222))
    boxes = []
    for index in range(6):
        x, y = 20 + (index % 3) * 100, 20 + (index // 3) * 90
        cell = Image.fromarray(render_cell(SYNTHETIC_CLASSES[index % 4], rng, CELL_SIZE))
        field.paste(cell, (x, y))
        boxes.append((x, y, x + CELL_SIZE, y + CELL_SIZE))
    return field, boxes


class FakeSmear:
    """Stands in for leukoscope.inference.smear.SmearAnalyzer: 'detects' the known boxes of
    :func:`smear_field`; the first cell comes back already classified, the others only as
    boxes (the service classifies those crops itself)."""

    def __init__(self) -> None:
        self.boxes = smear_field()[1]

    def analyse(self, image: Image.Image, run_um_per_px: float | None = None, um_per_px: float | None = None):
        """``um_per_px``: a scale the uploader stated comes back as the field's (as SmearAnalyzer records it)."""
        cells = []
        for index, box in enumerate(self.boxes):
            if index == 0:
                cells.append({"box": box, "score": 0.97, "top_class": "blast", "confidence": 0.42,
                              "probabilities": {"blast": 0.42, "lymphocyte": 0.3, "monocyte": 0.18,
                                                "neutrophil": 0.1}})
            else:
                cells.append({"box": box, "score": 0.9})
        if um_per_px is None:
            return {"cells": cells}
        return {"cells": cells, "scale": {"um_per_px": um_per_px, "source": "given", "red_cells": 0,
                                          "note": "stated by the user"}}


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def review_state_of(html: str) -> str:
    """The review state a case page's review form sends back (a review saved since refuses it)."""
    match = re.search(r'name="review_state" value="([0-9a-f]+)"', html)
    assert match, "no review state in the page"
    return match.group(1)


def empty_postgres_schema(url: str) -> None:
    """Start a PostgreSQL test database from an empty schema at the head revision (the database outlives the tests:
    rows and sequences of an earlier one would collide)."""
    from alembic import command

    from leukoscope.service import db as dbm

    engine = dbm.make_engine(url)
    config = dbm.alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    dbm.upgrade(engine)
    engine.dispose()
