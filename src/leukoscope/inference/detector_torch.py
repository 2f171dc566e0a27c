"""A detector bundle's torch model as a :class:`~leukoscope.inference.detector_runtime.DetectorRunner`:
``--backend torch``, training-time evaluation, and any device torch has."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from leukoscope.inference.detector_runtime import REFERENCE_FIELD_PIXELS, DetectorRunner, RawDetections, scaled_cap
from leukoscope.inference.quality import detection_cap


def to_model_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """(3, H, W): uint8 stays uint8 (the model's transform makes it float), any other type becomes float."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        # one copy, channels first in memory (the transform's scaling runs 1.2x faster on it, same
        # pixels), always writable: a decoded image's buffer is read-only, and a 1-pixel-high image's
        # transpose is contiguous already, which ascontiguousarray would not copy (torch then warns)
        image = torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C", copy=True))
    return image if image.dtype == torch.uint8 else image.float()


def pooling_modules(model: nn.Module) -> list[MultiScaleRoIAlign]:
    """The model's region poolers (a Faster R-CNN's box head has one)."""
    return [module for module in model.modules() if isinstance(module, MultiScaleRoIAlign)]


def forget_pooling_scales(poolers: Sequence[MultiScaleRoIAlign]) -> None:
    """Make each pooler work out its feature maps' scales from the batch it is given. torchvision's
    ``MultiScaleRoIAlign`` keeps the scales of the first batch it saw, rounded from that batch's padded size:
    after a first image of under ~135 px (a thumbnail, an edge tile) every later field was pooled at twice
    its scale and nothing was detected, silently."""
    for pooler in poolers:
        pooler.scales = None
        pooler.map_levels = None


class TorchDetector(DetectorRunner):
    """The whole model in torch, on ``device``."""

    backend = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self._poolers = pooling_modules(model)
        self.device = torch.device(device)
        # One model may serve several threads (the web service): its per-image caps are
        # changed for large tiles while it runs, so calls into the model take turns.
        self._lock = threading.Lock()
        self._cap = detection_cap(model)  # read before any run raises it

    @property
    def detection_cap(self) -> int | None:
        return self._cap

    @contextmanager
    def _limits_for(self, pixels: int) -> Iterator[None]:
        """Scale the per-image caps (proposals, detections) with the image area: they are
        set for a 640x480 field, and a 2048 px tile holds ten times as many cells."""
        saved: list[tuple[Any, str, Any]] = []

        def scale(owner: Any, key: str, index: str | None = None) -> None:
            if index is None:
                saved.append((owner, key, getattr(owner, key)))
                setattr(owner, key, scaled_cap(getattr(owner, key), pixels))
            else:
                table = getattr(owner, key)
                saved.append((table, index, table[index]))
                table[index] = scaled_cap(table[index], pixels)

        if pixels > REFERENCE_FIELD_PIXELS:
            model = self.model
            if hasattr(model, "rpn"):
                scale(model.rpn, "_pre_nms_top_n", "testing")
                scale(model.rpn, "_post_nms_top_n", "testing")
            if hasattr(model, "roi_heads"):
                scale(model.roi_heads, "detections_per_img")
            elif hasattr(model, "detections_per_img"):
                scale(model, "detections_per_img")
                if hasattr(model, "topk_candidates"):
                    scale(model, "topk_candidates")
        try:
            yield
        finally:
            for owner, key, value in reversed(saved):
                if isinstance(owner, dict):
                    owner[key] = value
                else:
                    setattr(owner, key, value)

    @torch.no_grad()
    def run(self, images: Sequence[Any], pixels: int) -> list[RawDetections]:
        batch = [to_model_tensor(image).to(self.device) for image in images]
        with self._lock, self._limits_for(pixels):
            forget_pooling_scales(self._poolers)
            outputs = self.model(batch)
        return [(output["boxes"].float().cpu().numpy().reshape(-1, 4), output["scores"].float().cpu().numpy(),
                 output["labels"].cpu().numpy()) for output in outputs]
