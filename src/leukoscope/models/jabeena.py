"""System C's CNN (Jabeena & Sulthana): convolution + max-pooling blocks, five
fully connected layers, a sigmoid output (ALL vs multiple myeloma).

The paper gives the layer types, not their sizes; the sizes here are ours:
three blocks ``conv 3x3 (32, 64, 128 filters) -> ReLU -> max-pool 2x2``, an
adaptive average pool to 4x4 (any input size works), then five fully
connected layers ``2048 -> 512 -> 256 -> 128 -> 64 -> output``.

Sigmoid output, kept exact while the rest of leukoscope sees class logits: for
two classes the last layer has **one** unit ``z`` and the model returns the
logits ``[-z/2, z/2]``. Their softmax is ``[1 - sigmoid(z), sigmoid(z)]``, so
cross-entropy on them is the binary cross-entropy of a sigmoid unit, and
probabilities, calibration and reports are unchanged. (The symmetric pair,
rather than ``[0, z]``, gives Grad-CAM a gradient for both classes.) For more
than two classes, where one sigmoid cannot decide, the last layer is a softmax
layer of ``num_classes`` units.

Train it as the paper did with ``configs/system_c_jabeena.yaml``: random 75/25
split, 90-degree rotations (``train.augmentation: jabeena``) and an
edge-detected copy of every training image (``train.edge_copies: true``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from leukoscope.models.registry import register_model
from leukoscope.models.weights import load_backbone_weights


class JabeenaCNN(nn.Module):
    """Conv+pool blocks, five FC layers; one sigmoid unit for two classes (see module doc)."""

    def __init__(self, num_classes: int, dropout: float = 0.0, channels: tuple[int, ...] = (32, 64, 128),
                 batch_norm: bool = False) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        layers: list[nn.Module] = []
        cin = 3
        for cout in channels:
            layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.binary = num_classes == 2
        widths = [cin * 16, 512, 256, 128, 64]
        head: list[nn.Module] = [nn.Flatten()]
        for win, wout in zip(widths[:-1], widths[1:]):
            head += [nn.Linear(win, wout), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        head.append(nn.Linear(widths[-1], 1 if self.binary else num_classes))  # the fifth FC layer
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.pool(self.features(x)))
        if self.binary:
            half = out / 2
            return torch.cat([-half, half], dim=1)
        return out


@register_model("jabeena_cnn")
def jabeena_cnn(num_classes: int, weights: str | Path | None = None, freeze_backbone: bool = False,
                dropout: float = 0.0, batch_norm: bool = False) -> JabeenaCNN:
    """System C's CNN: conv+pool blocks, five FC layers, sigmoid output for two classes."""
    model = JabeenaCNN(num_classes, dropout=dropout, batch_norm=batch_norm)
    if weights is not None:
        load_backbone_weights(model, weights, head_prefixes=("classifier.",), class_layer_only=True)
    if freeze_backbone:
        for parameter in model.features.parameters():
            parameter.requires_grad = False
    return model
