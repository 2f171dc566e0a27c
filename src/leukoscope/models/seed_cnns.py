"""The small CNNs of the published systems, written from their papers.

- ``abas_cnn`` (system A): the custom backbone of the Faster R-CNN leukemia
  detector, trained first as a classifier. ``features`` is reusable as a
  detection backbone (``out_channels = 128``, stride 16).
- ``tusar_convnet`` (system D): 4 conv, 3 max-pool, 2 dropout, dense softmax;
  5.6 M parameters at 224 px.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from leukoscope.models.registry import register_model
from leukoscope.models.weights import load_backbone_weights


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class AbasCNN(nn.Module):
    """System A: conv32-64-128-128 (3x3, BN, ReLU, 2x2 max-pool each), FC 150-60-classes.

    The paper flattens a 16x16x128 map (input 256 px). An adaptive pool to 16x16
    keeps that exact head for 256 px input and lets other sizes work too.
    """

    out_channels = 128  # for use as a detection backbone

    def __init__(self, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((3, 32), (32, 64), (64, 128), (128, 128)):
            layers += _conv_bn_relu(cin, cout) + [nn.MaxPool2d(2, 2)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(16)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 16 * 16, 150),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(150, 60),
            nn.ReLU(inplace=True),
            nn.Linear(60, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class TusarConvNet(nn.Module):
    """System D's ConvNet: conv32, conv64, pool, conv64, pool, conv64, pool,
    dropout, dense 128, dropout, dense softmax (logits here; softmax at inference)."""

    def __init__(self, num_classes: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        # 26x26 is the map a 224 px input gives; other sizes are pooled to it.
        self.pool = nn.AdaptiveAvgPool2d(26)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(64 * 26 * 26, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout * 2),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def _finish(model: nn.Module, weights: str | Path | None, freeze_backbone: bool) -> nn.Module:
    if weights is not None:
        load_backbone_weights(model, weights, head_prefixes=("classifier.",), class_layer_only=True)
    if freeze_backbone:
        for parameter in model.features.parameters():
            parameter.requires_grad = False
    return model


@register_model("abas_cnn")
def abas_cnn(num_classes: int, weights: str | Path | None = None, freeze_backbone: bool = False,
             dropout: float = 0.0) -> AbasCNN:
    """System A's custom CNN (Faster R-CNN backbone), as a classifier."""
    return _finish(AbasCNN(num_classes, dropout), weights, freeze_backbone)


@register_model("tusar_convnet")
def tusar_convnet(num_classes: int, weights: str | Path | None = None, freeze_backbone: bool = False,
                  dropout: float = 0.25) -> TusarConvNet:
    """System D's ConvNet (4 conv, 3 pool, 2 dropout, dense), 5.6 M parameters."""
    return _finish(TusarConvNet(num_classes, dropout), weights, freeze_backbone)
