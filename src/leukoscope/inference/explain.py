"""Grad-CAM heatmaps: where in the image a classifier found its evidence.

Hand-written (Selvaraju et al., 2017) instead of depending on pytorch-grad-cam,
which pulls in opencv-python. The implementation differs from the textbook one
in two ways that matter for real models:

- Activations are captured with a *forward* hook and their gradient is taken
  with :func:`torch.autograd.grad`, not with a full backward hook: backward hooks
  break on ``Conv2d -> ReLU(inplace=True)`` (the ``tusar_convnet`` and VGG
  layout), and ``autograd.grad`` leaves the parameters' ``.grad`` untouched, so
  Grad-CAM can run in the middle of training without polluting the next step.
- The input gets ``requires_grad``: with a frozen backbone nothing upstream of
  the head would otherwise carry a gradient.

:func:`heatmap_mask_fraction` then tells whether a model looks at the cells or
at the slide background (a shortcut), given a cell mask from
:mod:`leukoscope.segmentation`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from leukoscope.inference.drawing import load_font, wrap_text
from leukoscope.preprocessing import dihedral_views, view_back

#: Images (views included) in one Grad-CAM backward pass of a bundle with test-time views.
VIEWS_BATCH = 64
#: Probe size used by :func:`find_target_layer` when no input is at hand.
DEFAULT_PROBE_SIZE = 224

_Record = list[tuple[nn.Module, torch.Tensor]]


# ------------------------------------------------------------------ plumbing


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, each submodule's own mode restored after (even on error):
    a model may mix modes on purpose, e.g. frozen BatchNorm inside a training model."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        # The flag itself, not module.train(): that recurses into the children, and
        # calling it on every module costs depth x modules (a third of a Grad-CAM call).
        for module, training in modes:
            module.training = training


@contextmanager
def _recording(modules: Sequence[nn.Module]) -> Iterator[_Record]:
    """Record ``(module, output)`` for every call of ``modules``, in execution order."""
    record: _Record = []

    def hook(module: nn.Module, _inputs: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            record.append((module, output))

    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _is_spatial(output: torch.Tensor) -> bool:
    # (N, C, H, W) with more than one position: squeeze-excitation 1x1 convs and
    # maps pooled to 1x1 carry no "where".
    return output.dim() == 4 and output.shape[-2] * output.shape[-1] > 1


def _last_spatial(record: _Record) -> tuple[nn.Module, torch.Tensor]:
    """The last stage (:func:`_stages`) to run at the resolution of the last spatial conv: a block or stage
    whose output holds every branch the head reads, but not one that pools after it (a VGG-style
    ``features`` ending in max-pooling would halve the map's resolution)."""
    convs = [(module, output) for module, output in record if isinstance(module, nn.Conv2d) and _is_spatial(output)]
    if not convs:
        raise ValueError("the model has no Conv2d layer with a spatial (H x W > 1) output at this input size")
    size = convs[-1][1].shape[-2:]  # the last conv is in the record: the search always finds one
    return next((module, output) for module, output in reversed(record)
                if output.dim() == 4 and output.shape[-2:] == size)


def _stages(model: nn.Module) -> list[nn.Module]:
    """Every sub-module that is or holds a ``Conv2d``: a conv, a block, a stage. The last of them to give an
    output at the last conv's resolution (:func:`_last_spatial`) is the whole last stage (ResNet's ``layer4``
    with its skip path, DenseNet's ``features`` with every concatenated channel, GoogLeNet's ``inception5b``
    with all four branches), where the last conv alone would explain only one branch of what the head reads.
    Activations, pooling, dropout and norms hold no conv, so they are never the target themselves."""
    return [module for module in model.modules()
            if module is not model and any(isinstance(inner, nn.Conv2d) for inner in module.modules())]


def _logits(output: object) -> torch.Tensor:
    # torchvision's GoogLeNet/Inception return a namedtuple when aux heads are on.
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise ValueError("grad_cam needs a classifier returning logits of shape (N, num_classes)")
    return output


# ------------------------------------------------------------------ public API


def find_target_layer(
    model: nn.Module, input_size: int = DEFAULT_PROBE_SIZE, in_channels: int = 3
) -> nn.Module:
    """The last module holding a ``Conv2d`` (a conv, a block or a whole stage: :func:`_stages`) *executed*
    whose output is spatial for an ``in_channels x input_size x input_size`` input.

    Found with one probe forward pass (eval mode, no grad; the model's modes are
    restored), because registration order is not execution order and because
    squeeze-excitation blocks contain ``Conv2d`` layers applied to 1x1 maps.
    """
    return _probe_target(model, input_size, in_channels)[0]


def target_map_size(model: nn.Module, input_size: int, in_channels: int = 3) -> tuple[int, int]:
    """The ``(h, w)`` of the map the default Grad-CAM target gives at this input size (:func:`find_target_layer`)."""
    return tuple(_probe_target(model, input_size, in_channels)[1].shape[-2:])


def _probe_target(model: nn.Module, input_size: int, in_channels: int) -> tuple[nn.Module, torch.Tensor]:
    convs = _stages(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    probe = torch.zeros(1, in_channels, input_size, input_size, device=device)
    with _eval_mode(model), _recording(convs) as record, torch.no_grad():
        model(probe)
    return _last_spatial(record)


#: Grad-CAM maps coarser than this a side say where in the crop, not which part of the cell: the shipped
#: classifier's last stage at 96 px is 3 x 3, and its maps of unrelated cells correlate 0.89 (median) with its
#: 8 views averaged; an earlier 6 x 6 stage's maps differ by cell (0.48) but, deleted, take no more of the
#: answer away than another cell's map (docs/benchmarks.md, "Grad-CAM of the shipped classifier").
MIN_MAP_SIDE = 6


def coarse_map_warning(model: nn.Module, input_size: int) -> str | None:
    """What to tell a user of Grad-CAM maps read from a map coarser than :data:`MIN_MAP_SIDE`, or None."""
    h, w = target_map_size(model, input_size)
    if min(h, w) >= MIN_MAP_SIDE:
        return None
    return (f"Grad-CAM reads this classifier's last stage at {h} x {w} for its {input_size} px input: a map shows "
            f"at most which part of the crop weighed, not which part of the cell (maps of different cells look alike)")


def _class_indices(class_index: int | Sequence[int] | None, logits: torch.Tensor) -> torch.Tensor:
    n, num_classes = logits.shape
    if class_index is None:
        return logits.argmax(dim=1)
    if isinstance(class_index, (int, np.integer)):
        indices = torch.full((n,), int(class_index), dtype=torch.long)
    else:
        indices = torch.as_tensor(list(class_index), dtype=torch.long)
        if indices.shape != (n,):
            raise ValueError(f"class_index has {indices.numel()} entries for a batch of {n} images")
    if indices.min() < 0 or indices.max() >= num_classes:
        raise ValueError(f"class_index {indices.tolist()} is out of range for {num_classes} classes")
    return indices.to(logits.device)


def _normalise(cam: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1]; an all-flat map (no positive evidence) stays 0."""
    flat = cam.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = flat.max(dim=1).values[:, None, None] - low
    # clamp to the smallest normal float, not an epsilon: random-init nets give
    # maps of ~1e-13 that are still perfectly usable once rescaled.
    tiny = torch.finfo(cam.dtype).tiny
    scaled = (cam - low) / span.clamp_min(tiny)
    return torch.where(span >= tiny, scaled, torch.zeros_like(cam)).clamp_(0.0, 1.0)


class GradCamMaps(NamedTuple):
    """Grad-CAM maps scaled for display, with what their raw (unscaled) maps say of their contrast."""

    heatmaps: np.ndarray
    """float32 ``(N, H, W)`` in [0, 1]: each map min-max scaled to its own range."""
    contrast: np.ndarray
    """float64 ``(N,)``: each raw map's spread over its level (:func:`map_contrast`), 0 for an all-zero map."""

    @property
    def flat(self) -> np.ndarray:
        """bool ``(N,)``: maps that point at no region (:data:`FLAT_MAP_THRESHOLD`); their colours mean nothing."""
        return self.contrast < FLAT_MAP_THRESHOLD


#: A raw Grad-CAM map whose spread (q95 - q5) is under this share of its q95 points at no region: the display's
#: per-image min-max scaling would stretch its ripple to the full colour range. Judged on the raw map, never on
#: the scaled one (always 0 to 1 unless constant). A model whose output ignores its input (a collapsed run: 9
#: classes at 1/9 each) gave maps varying by 0.7% of their level; the shipped classifier's maps of pbc cells
#: varied by 39% or more, a 3-epoch resnet18's by 14% or more (docs/benchmarks.md, "Flat Grad-CAM maps").
FLAT_MAP_THRESHOLD = 0.05


#: The spread of a map is read between these quantiles, not its extremes: Grad-CAM clips the map at 0, so one
#: pixel (one cell of a 3 x 3 map) at 0 would make a collapsed model's level map read as fully contrasted.
_SPREAD_QUANTILES = (0.05, 0.95)


def map_contrast(raw: torch.Tensor) -> torch.Tensor:
    """``(q95 - q5) / q95`` of each raw (non-negative) map of an ``(N, H, W)`` batch (:data:`_SPREAD_QUANTILES`):
    scale-free, so the ~1e-13 maps of a random-init net that point somewhere count as contrasted; 0 for a map
    whose upper quantile is 0 (all-zero, or zero but for a few pixels)."""
    flat = raw.flatten(1).double()
    low, high = torch.quantile(flat, torch.tensor(_SPREAD_QUANTILES, dtype=flat.dtype), dim=1)
    spread = (high - low) / high.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(high > 0, spread, torch.zeros_like(high))


def grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    class_index: int | Sequence[int] | None = None,
    target_layer: nn.Module | None = None,
    views: int = 1,
) -> np.ndarray:
    """Grad-CAM heatmaps, float32 ``(N, H, W)`` in [0, 1] at the input resolution
    (:func:`grad_cam_maps`'s ``heatmaps``; that function also says which maps are flat)."""
    return grad_cam_maps(model, inputs, class_index, target_layer, views).heatmaps


def grad_cam_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    class_index: int | Sequence[int] | None = None,
    target_layer: nn.Module | None = None,
    views: int = 1,
) -> GradCamMaps:
    """Grad-CAM heatmaps, float32 ``(N, H, W)`` in [0, 1] at the input resolution, and each raw map's contrast
    (whether it is flat: :attr:`GradCamMaps.flat`).

    ``inputs``: a normalised batch ``(N, C, H, W)`` (a single ``(C, H, W)`` image is
    taken as a batch of one) on the model's device. ``class_index``: the class to
    explain, one per image, or ``None`` for each image's predicted class.
    ``target_layer``: any module with an ``(N, C, h, w)`` output (default
    :func:`find_target_layer`'s choice at this input size); if it runs more than
    once per forward pass, its last call is used. A conv followed by an in-place
    ReLU is explained through its post-ReLU output (the tensor the hook saw is
    overwritten in place), as if the ReLU were the target. The model runs in eval
    mode and gets back its own train/eval modes and no leftover hooks, even on error.
    ``views`` (a bundle's test-time views, 4 or 8; square inputs): the map of each of the image's
    rotations (and mirror images) for the same class, turned back and averaged, as its answer is
    the average of theirs; ``None`` then explains the class of the averaged logits. The contrast is then
    the average raw map's.
    """
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.dim() != 4 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty (N, C, H, W) batch, got shape {tuple(inputs.shape)}")
    if views > 1:
        return _grad_cam_over_views(model, inputs, class_index, target_layer, views)
    raw = _raw_grad_cam(model, inputs, class_index, target_layer)
    return GradCamMaps(_normalise(raw).cpu().numpy(), map_contrast(raw).cpu().numpy())


def _raw_grad_cam(model: nn.Module, inputs: torch.Tensor, class_index: int | Sequence[int] | None,
                  target_layer: nn.Module | None) -> torch.Tensor:
    """The unscaled maps (float32 ``(N, H, W)``, non-negative) at the input resolution."""
    watched = [target_layer] if target_layer is not None else _stages(model)
    if not watched:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer; pass target_layer")
    # Inference mode / no_grad of the caller would make the whole thing gradient-free.
    with torch.inference_mode(False), torch.enable_grad(), _eval_mode(model), _recording(watched) as record:
        # clone(): an inference-mode tensor cannot join autograd; requires_grad: a
        # frozen backbone would otherwise produce activations without gradients.
        x = inputs.detach().clone().requires_grad_(True)
        logits = _logits(model(x))
        activation = _target_activation(record, target_layer)
        indices = _class_indices(class_index, logits)
        score = logits.gather(1, indices[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, activation, allow_unused=True)
        if gradient is None:
            raise ValueError("the target layer's output does not influence the logits")
        cam = _combine(activation.detach().float(), gradient.float())  # fp32 even under autocast
    return F.interpolate(cam[:, None], size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def _grad_cam_over_views(model: nn.Module, inputs: torch.Tensor, class_index: int | Sequence[int] | None,
                         target_layer: nn.Module | None, views: int) -> GradCamMaps:
    if inputs.shape[-1] != inputs.shape[-2]:
        raise ValueError(f"test-time views need square inputs, got {tuple(inputs.shape[-2:])}")
    n = len(inputs)
    if class_index is None:
        with torch.no_grad(), _eval_mode(model):
            class_index = _logits(model(dihedral_views(inputs, views))).reshape(views, n, -1).mean(dim=0).argmax(dim=1)
        class_index = class_index.tolist()
    indices = [int(class_index)] * n if isinstance(class_index, (int, np.integer)) else [int(i) for i in class_index]
    if len(indices) != n:
        raise ValueError(f"{len(indices)} class indices for {n} images")
    step = max(1, VIEWS_BATCH // views)  # images whose views go through one backward pass together
    means, raw_means = [], []
    for start in range(0, n, step):
        part = inputs[start:start + step]
        raw = _raw_grad_cam(model, dihedral_views(part, views), indices[start:start + step] * views, target_layer)
        # the picture: each view's map scaled to its own range, then averaged (as before)
        maps = _normalise(raw).cpu().numpy().reshape(views, len(part), *inputs.shape[-2:])
        means.append(np.mean([view_back(maps[view], view) for view in range(views)], axis=0))
        # flatness: the raw maps averaged, as the answer averages the views' logits; scaling each view first
        # would stretch a flat view's ripple as much as a real one's
        raw = raw.cpu().numpy().reshape(views, len(part), *inputs.shape[-2:])
        raw_means.append(np.mean([view_back(raw[view], view) for view in range(views)], axis=0))
    heatmaps = _normalise(torch.from_numpy(np.ascontiguousarray(np.concatenate(means)))).numpy()
    contrast = map_contrast(torch.from_numpy(np.ascontiguousarray(np.concatenate(raw_means)))).numpy()
    return GradCamMaps(heatmaps, contrast)


def _target_activation(record: _Record, target_layer: nn.Module | None) -> torch.Tensor:
    if target_layer is None:
        return _last_spatial(record)[1]
    if not record:
        raise ValueError("target_layer did not run during the forward pass (or returned no tensor)")
    activation = record[-1][1]
    if activation.dim() != 4:
        raise ValueError(f"target_layer output must be (N, C, h, w), got shape {tuple(activation.shape)}")
    if not activation.requires_grad:
        raise ValueError("target_layer output does not depend on the input (no gradient reaches it)")
    return activation


def _combine(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Channel weights = spatially averaged gradients; ReLU keeps positive evidence."""
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * activation).sum(dim=1))


def overlay_heatmap(
    image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45, colormap: str = "jet"
) -> Image.Image:
    """``image`` (RGB) blended with ``heatmap`` (``H x W`` in [0, 1], any size:
    resized to the image) drawn with a matplotlib ``colormap``."""
    import matplotlib

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = _check_heatmap(heatmap, require_unit_range=True)
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {colormap!r}") from None
    rgb = image.convert("RGB")
    resized = Image.fromarray(heat.astype(np.float32), mode="F").resize(rgb.size, Image.Resampling.BILINEAR)
    colours = cmap(np.clip(np.asarray(resized), 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * np.asarray(rgb, dtype=np.float64) + alpha * colours
    return Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))


_LEGEND_WIDTH = 72
_CAPTION_HEIGHT = 34


def heatmap_figure(overlay: Image.Image, heatmap: np.ndarray, label: str, *, flat: bool, status: str | None = None,
                   alert: bool = False, notes: Sequence[str] = (), colormap: str = "jet") -> Image.Image:
    """``overlay`` (from :func:`overlay_heatmap`) with a colour bar saying what the
    colours mean and a caption; a flat map (``flat``: :attr:`GradCamMaps.flat`, judged on the raw map)
    gets a visible note across the picture, so nobody reads meaning into a stretched colour wash.

    ``label``: the class the map explains. ``status``: what the prediction said of the image, first in the
    caption (red when ``alert``: uncertain, unfamiliar), and ``notes`` (warnings) after it, each wrapped to the
    figure's width: a picture passed on alone must not read as a confident answer when its row says otherwise."""
    import matplotlib

    _check_heatmap(heatmap, require_unit_range=True)
    cmap = matplotlib.colormaps[colormap]
    width, height = overlay.size
    font = load_font(11)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    room = width + _LEGEND_WIDTH - 8
    # (text, colour) per line: the status, what the map shows, then every note
    lines = [(line, "red" if alert else "black") for line in wrap_text(measure, status or "", font, room)]
    lines += [(f"Grad-CAM evidence for {label!r}", "black"),
              ("flat map: no localised evidence", "red") if flat else ("colour scale relative to this image", "black")]
    for note in notes:
        lines += [(line, "firebrick") for line in wrap_text(measure, note, font, room)]
    caption = max(_CAPTION_HEIGHT, 15 * len(lines) + 4)
    figure = Image.new("RGB", (width + _LEGEND_WIDTH, height + caption), "white")
    figure.paste(overlay.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(figure)
    # the colour bar: top = 1 (strongest evidence in this image), bottom = 0 (the least in this image:
    # each map is scaled to its own range, so 0 is not "no evidence")
    top, bottom, left = 14, height - 14, width + 8
    levels = np.linspace(1.0, 0.0, bottom - top)[:, None].repeat(14, axis=1)
    bar = Image.fromarray((cmap(levels)[..., :3] * 255).round().astype(np.uint8))
    figure.paste(bar, (left, top))
    draw.rectangle((left - 1, top - 1, left + 14, bottom), outline="black")
    for value, text in ((1.0, "high"), (0.5, "0.5"), (0.0, "lowest")):
        y = bottom - value * (bottom - top)
        draw.line((left + 14, y, left + 18, y), fill="black")
        draw.text((left + 21, y), text, fill="black", font=font, anchor="lm")
    for index, (text, colour) in enumerate(lines):
        draw.text((4, height + 3 + 15 * index), text, fill=colour, font=font)
    if flat:
        mark_flat(figure, (width, height), "FLAT MAP - uninformative")
    return figure


def mark_flat(picture: Image.Image, size: tuple[int, int] | None = None, note: str = "FLAT MAP") -> Image.Image:
    """Write ``note`` in red across the middle of ``picture``'s top-left ``size`` (all of it by default), in
    place: a flat heatmap's overlay is an even tint that reads as "evidence everywhere" without it."""
    width, height = size or picture.size
    draw = ImageDraw.Draw(picture)
    note_font = load_font(max(8, min(14, width // 7)))
    box = draw.textbbox((width // 2, height // 2), note, font=note_font, anchor="mm")
    draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill="white", outline="red", width=1)
    draw.text((width // 2, height // 2), note, fill="red", font=note_font, anchor="mm")
    return picture


def heatmap_mask_fraction(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's total mass that falls inside ``mask`` (same ``H x W``).

    A heatmap spread evenly over the image scores ``mask.mean()``; clearly more
    means the model looks at the masked cells, clearly less that it looks at the
    background. NaN when the heatmap is all zero (no evidence to share out).
    """
    heat = _check_heatmap(heatmap, require_unit_range=False)
    mask = np.asarray(mask)
    if mask.shape != heat.shape:
        raise ValueError(
            f"heatmap {heat.shape} and mask {mask.shape} differ in shape; compute the mask on "
            "the image the model saw (after letterboxing)"
        )
    total = float(heat.sum(dtype=np.float64))
    if total == 0.0:
        return float("nan")
    return float(heat[mask.astype(bool)].sum(dtype=np.float64)) / total


def _check_heatmap(heatmap: np.ndarray, require_unit_range: bool) -> np.ndarray:
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim == 3 and heat.shape[0] == 1:
        heat = heat[0]  # one image of a grad_cam batch
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be H x W, got shape {heat.shape}")
    if not np.isfinite(heat).all() or heat.min() < 0:
        raise ValueError("heatmap must be finite and non-negative")
    if require_unit_range and heat.max() > 1.0 + 1e-6:
        raise ValueError(f"heatmap must be in [0, 1] (max is {heat.max():.3g}); normalise it first")
    return heat

