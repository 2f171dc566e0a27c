"""Edge-detected copies of training images (system C's augmentation).

Jabeena & Sulthana enlarged their training set with an edge-detected copy of
every image. :func:`with_edge_copies` does the same on decoded ``uint8``
batches: each training image gets a Sobel gradient-magnitude copy (gray,
replicated to three channels, scaled so the strongest edge of the image is
255) with the same label. Training only: validation, test and prediction images
are never edge maps. Enable it with ``train.edge_copies: true``; it works for
CNNs and classical models alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def edge_maps(images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Sobel edge maps of ``N x 3 x H x W`` uint8 images, as ``N x 3 x H x W`` uint8 (gray in 3 channels)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images of shape N x 3 x H x W, got {images.dtype} {tuple(images.shape)}")
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    out = []
    for start in range(0, len(images), batch_size):
        gray = (images[start:start + batch_size].float() * _LUMA).sum(dim=1, keepdim=True)
        gradients = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
        magnitude = gradients.pow(2).sum(dim=1, keepdim=True).sqrt()
        # A peak under one gray level is rounding noise, not an edge: flat images stay black.
        peak = magnitude.amax(dim=(2, 3), keepdim=True).clamp_min(1.0)
        scaled = (magnitude / peak * 255).round().to(torch.uint8)
        out.append(scaled.expand(-1, 3, -1, -1))
    if not out:
        return images.clone()
    return torch.cat(out).contiguous()


def with_edge_copies(images: torch.Tensor, targets: list[int]) -> tuple[torch.Tensor, list[int]]:
    """``images`` followed by their edge maps, and the targets twice."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    return torch.cat([images, edge_maps(images)]), list(targets) + list(targets)
