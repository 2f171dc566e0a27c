"""The steps of a torchvision Faster R-CNN around its exported graphs, in numpy.

An exported detector bundle (:mod:`leukoscope.inference.detector_export`) holds the two
parts of the network where the time goes as graphs: the *dense* part (backbone, feature
pyramid, RPN head) and the *box* part (RoIAlign, box head, class layer). What lies
between and around them chooses regions and has per-image caps, so it is not in a graph
(a graph would freeze the caps of the image size it was traced at; here they grow with
the tile, as on the torch path: :func:`~leukoscope.inference.detector.scaled_cap`):

1. the model's transform: scale by ``input_scale`` (antialiased bilinear, as
   ``FixedScaleTransform``), normalise, pad the batch to a multiple of 32;
2. anchors, box decoding, the RPN's proposal filter (top-n per level, NMS within each
   level, stopping once the cap is filled: :func:`top_nms_per_level`, as
   :class:`~leukoscope.models.proposals.PrefixNmsRPN`);
3. which feature level pools each proposal (torchvision's ``LevelMapper``);
4. the box head's postprocessing (softmax, decoding, per-class NMS, the detections cap)
   and the boxes back in image pixels.

Each step follows torchvision 0.29's code, in float32, step for step (``tests/export``
checks it box for box against the torch model). It is numpy so that analysing with
exported models needs neither torch nor torchvision: importing them is most of a short
run's start-up (docs/benchmarks.md). The model's settings come from the bundle's
``export`` entry (:class:`RcnnSettings`), read off the torch model when it was exported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

#: The first chunk of :func:`top_nms_per_level` holds this many times the cap (+16) of the best
#: candidates; later ones are sized by the share kept so far (as models/proposals.py).
PREFIX_FACTOR = 1.25
#: torchvision's ``batched_nms`` moves boxes apart by class and runs one NMS at most this many
#: coordinates (4 per box) on a CPU, and one NMS per class above.
COORDINATE_TRICK_MAX = 4000


@dataclass(frozen=True)
class RcnnSettings:
    """What the glue needs of a torchvision Faster R-CNN (recorded at export as ``export["rcnn"]``)."""

    input_scale: float
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    size_divisible: int
    cell_anchors: tuple[tuple[tuple[float, float, float, float], ...], ...]
    """Per feature level, the anchors centred on (0, 0), in model pixels (torchvision's ``cell_anchors``)."""
    rpn_pre_nms_top_n: int
    rpn_post_nms_top_n: int
    rpn_nms_thresh: float
    rpn_score_thresh: float
    rpn_min_size: float
    rpn_box_weights: tuple[float, float, float, float]
    box_score_thresh: float
    box_nms_thresh: float
    detections_per_img: int
    box_weights: tuple[float, float, float, float]
    bbox_xform_clip: float
    pooled_levels: tuple[int, ...]
    """Indices (into the dense graph's levels) of the feature maps the box head pools from."""
    canonical_scale: int = 224
    canonical_level: int = 4

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "RcnnSettings":
        def tuples(value: Any) -> Any:
            return tuple(tuples(v) for v in value) if isinstance(value, list) else value

        return cls(**{key: tuples(value) for key, value in record.items()})


# -------------------------------------------------------------------------- boxes

def box_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def clip_boxes(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boxes (..., 4) clipped to an image of ``size`` (height, width)."""
    height, width = size
    clipped = boxes.copy()
    clipped[..., 0::2] = np.clip(boxes[..., 0::2], 0, width)
    clipped[..., 1::2] = np.clip(boxes[..., 1::2], 0, height)
    return clipped


def large_enough(boxes: np.ndarray, min_size: float) -> np.ndarray:
    """Indices of the boxes at least ``min_size`` wide and high (torchvision's ``remove_small_boxes``)."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.where((widths >= min_size) & (heights >= min_size))[0]


def decode_boxes(codes: np.ndarray, boxes: np.ndarray, weights: Sequence[float], clip: float) -> np.ndarray:
    """torchvision's ``BoxCoder.decode_single``: deltas ``(n, 4k)`` applied to ``boxes`` ``(n, 4)`` -> ``(n, k, 4)``."""
    f32 = np.float32
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    centre_x = boxes[:, 0] + f32(0.5) * widths
    centre_y = boxes[:, 1] + f32(0.5) * heights
    wx, wy, ww, wh = (f32(w) for w in weights)
    dx, dy = codes[:, 0::4] / wx, codes[:, 1::4] / wy
    dw = np.minimum(codes[:, 2::4] / ww, f32(clip))
    dh = np.minimum(codes[:, 3::4] / wh, f32(clip))
    x = dx * widths[:, None] + centre_x[:, None]
    y = dy * heights[:, None] + centre_y[:, None]
    half_w = f32(0.5) * (np.exp(dw) * widths[:, None])
    half_h = f32(0.5) * (np.exp(dh) * heights[:, None])
    return np.stack((x - half_w, y - half_h, x + half_w, y + half_h), axis=2)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes greedy NMS keeps, best first (torchvision's ``nms`` on the CPU: a stable
    sort by score, a box suppressed by a kept one when their IoU, computed as there in float32, is
    above ``iou_threshold``).

    Only boxes that overlap can suppress one another: the pairs that overlap along x are found by a
    sweep over the boxes sorted by x1, those that also overlap along y get their IoU, all at once,
    and the greedy pass walks the boxes best first along the pairs above the threshold (a loop of
    each kept box against all later ones: 0.061 s on a 2592x1944 field's largest NMS, 5,273
    proposals; this 0.043 s, docs/benchmarks.md)."""
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order]  # from here on, a box's index is its rank by score
    count = len(boxes)
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[:, k]) for k in range(4))
    area = (x2 - x1) * (y2 - y1)
    i, j = overlapping_along_x(x1, x2)
    height = np.minimum(y2[i], y2[j]) - np.maximum(y1[i], y1[j])
    near = height > 0
    i, j, height = i[near], j[near], height[near]
    width = np.maximum(np.float32(0), np.minimum(x2[i], x2[j]) - np.maximum(x1[i], x1[j]))
    inter = width * height
    with np.errstate(divide="ignore", invalid="ignore"):  # two empty boxes: nan, not above the threshold
        over = inter / (area[i] + area[j] - inter) > iou_threshold
    better, worse = np.minimum(i[over], j[over]), np.maximum(i[over], j[over])
    by_better = np.argsort(better, kind="stable")
    better, worse = better[by_better], worse[by_better]
    bounds = np.searchsorted(better, np.arange(count + 1))
    suppressed = np.zeros(count, dtype=bool)
    keep = []
    for rank in range(count):
        if suppressed[rank]:
            continue
        keep.append(rank)
        suppressed[worse[bounds[rank]:bounds[rank + 1]]] = True
    return order[np.asarray(keep, dtype=np.int64)]


def overlapping_along_x(x1: np.ndarray, x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of boxes (i, j) whose x ranges overlap, once each: sorted by x1, box j starts at or
    after box i and before box i ends."""
    count = len(x1)
    by_x = np.argsort(x1, kind="stable")
    ends = np.searchsorted(x1[by_x], x2[by_x], side="left")
    counts = np.maximum(ends - np.arange(1, count + 1), 0)
    first = np.repeat(np.arange(count), counts)
    second = first + 1 + np.arange(len(first)) - np.repeat(np.cumsum(counts) - counts, counts)
    return by_x[first], by_x[second]


def _apart(boxes: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Boxes moved apart by group, as torchvision's "coordinate trick" (the shift rounds in float32)."""
    return boxes + (groups.astype(boxes.dtype) * (boxes.max() + np.float32(1)))[:, None]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, iou_threshold: float) -> np.ndarray:
    """NMS within each group, best first (torchvision's ``batched_nms``, both of its ways)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    if boxes.size <= COORDINATE_TRICK_MAX:
        return nms(_apart(boxes, groups), scores, iou_threshold)
    kept = np.concatenate([members[nms(boxes[members], scores[members], iou_threshold)]
                           for members in (np.where(groups == g)[0] for g in np.unique(groups))])
    return kept[np.argsort(-scores[kept], kind="stable")]


def top_nms_per_level(boxes: np.ndarray, scores: np.ndarray, levels: np.ndarray, iou_threshold: float,
                      top: int) -> np.ndarray:
    """``batched_nms(boxes, scores, levels)[:top]``, deciding only as many candidates as the cap needs
    (why it gives the same: :mod:`leukoscope.models.proposals`, whose steps these are)."""
    if top <= 0 or len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    if boxes.size <= COORDINATE_TRICK_MAX:
        boxes = _apart(boxes, levels)
    order = np.argsort(-scores, kind="stable")
    survivors: dict[int, np.ndarray] = {}
    start, stop = 0, min(len(order), int(top * PREFIX_FACTOR) + 16)
    while start < len(order):
        chunk = order[start:stop]
        chunk_levels = levels[chunk]
        for level in np.unique(chunk_levels).tolist():
            candidates = np.concatenate([survivors.get(level, chunk[:0]), chunk[chunk_levels == level]])
            survivors[level] = candidates[nms(boxes[candidates], scores[candidates], iou_threshold)]
        found = np.concatenate(list(survivors.values()))
        if stop == len(order) or (len(found) >= top and np.sort(scores[found])[-top] > scores[order[stop]]):
            break
        rate = max(len(found), 1) / stop
        start, stop = stop, min(len(order), stop + int(max(top - len(found), 1) / rate * PREFIX_FACTOR) + 16)
    keep = np.sort(np.concatenate(list(survivors.values())))
    return keep[np.argsort(-scores[keep], kind="stable")][:top]


# -------------------------------------------------------------------------- the model's transform

def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The size ``FixedScaleTransform`` scales an image to (Python's rounding, as there)."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def scale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """An (H, W, 3) uint8 or [0, 1] float image -> (3, h, w) float32 in [0, 1] at ``scale``: bilinear,
    antialiased when shrinking (torch's ``interpolate(..., antialias=True)`` is PIL's filter, and
    without antialiasing, when enlarging, the two coincide), on each channel in float."""
    height, width = image.shape[:2]
    size = scaled_size(height, width, scale)
    factor = np.float32(1 / 255) if image.dtype == np.uint8 else np.float32(1)
    channels = []
    for c in range(3):
        plane = np.ascontiguousarray(image[:, :, c], dtype=np.float32)
        if size != (height, width):
            resized = Image.fromarray(plane, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
            plane = np.asarray(resized, dtype=np.float32)
        channels.append(plane * factor)
    return np.stack(channels)


def model_batch(images: Sequence[np.ndarray], settings: RcnnSettings) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(H, W, 3) images -> the dense graph's normalised, zero-padded batch and each image's scaled size."""
    scaled = [scale_image(image, settings.input_scale) for image in images]
    mean = np.asarray(settings.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(settings.image_std, dtype=np.float32)[:, None, None]
    sizes = [(int(s.shape[1]), int(s.shape[2])) for s in scaled]
    step = settings.size_divisible
    height = int(math.ceil(max(h for h, _ in sizes) / step) * step)
    width = int(math.ceil(max(w for _, w in sizes) / step) * step)
    batch = np.zeros((len(images), 3, height, width), dtype=np.float32)
    for k, (image, (h, w)) in enumerate(zip(scaled, sizes)):
        batch[k, :, :h, :w] = (image - mean) / std
    return batch, sizes


# -------------------------------------------------------------------------- region proposals

def grid_anchors(settings: RcnnSettings, grid_sizes: Sequence[tuple[int, int]],
                 padded: tuple[int, int]) -> np.ndarray:
    """Every anchor of every level, level by level, position by position (torchvision's ``AnchorGenerator``)."""
    levels = []
    for (grid_h, grid_w), cell in zip(grid_sizes, settings.cell_anchors):
        stride_h, stride_w = padded[0] // grid_h, padded[1] // grid_w
        shift_y, shift_x = np.meshgrid(np.arange(grid_h) * stride_h, np.arange(grid_w) * stride_w, indexing="ij")
        shifts = np.stack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel()), axis=1)
        levels.append((shifts[:, None, :] + np.asarray(cell, dtype=np.float32)[None]).reshape(-1, 4)
                      .astype(np.float32))
    return np.concatenate(levels)


def best_first(scores: np.ndarray, top: int) -> np.ndarray:
    """Indices of the ``top`` highest ``scores``, best first, ties by index (torch's ``topk``)."""
    if top < len(scores):
        picked = np.argpartition(-scores, top - 1)[:top]
    else:
        picked = np.arange(len(scores))
    return picked[np.lexsort((picked, -scores[picked]))]


def flatten_level(values: np.ndarray, per_anchor: int) -> np.ndarray:
    """(N, A * C, H, W) -> (N, H * W * A, C): the anchors' order (torchvision's ``permute_and_flatten``)."""
    n, _, h, w = values.shape
    return values.reshape(n, -1, per_anchor, h, w).transpose(0, 3, 4, 1, 2).reshape(n, -1, per_anchor)


def proposals(objectness: Sequence[np.ndarray], deltas: Sequence[np.ndarray], anchors: np.ndarray,
              sizes: Sequence[tuple[int, int]], settings: RcnnSettings, pre_nms_top_n: int,
              post_nms_top_n: int) -> list[np.ndarray]:
    """Each image's proposals, best first (the RPN's ``filter_proposals`` with
    :func:`top_nms_per_level`)."""
    per_level = [int(np.prod(o.shape[1:])) for o in objectness]
    scores_all = np.concatenate([flatten_level(o, 1)[..., 0] for o in objectness], axis=1)
    codes_all = np.concatenate([flatten_level(d, 4) for d in deltas], axis=1)
    result = []
    for scores, codes, size in zip(scores_all, codes_all, sizes):
        picked, levels, offset = [], [], 0
        for k, count in enumerate(per_level):
            top = best_first(scores[offset:offset + count], pre_nms_top_n)
            picked.append(top + offset)
            levels.append(np.full(len(top), k))
            offset += count
        index = np.concatenate(picked)
        level = np.concatenate(levels)
        boxes = decode_boxes(codes[index], anchors[index], settings.rpn_box_weights, settings.bbox_xform_clip)[:, 0]
        probability = (1 / (1 + np.exp(-scores[index].astype(np.float64)))).astype(np.float32)
        boxes = clip_boxes(boxes, size)
        keep = large_enough(boxes, settings.rpn_min_size)
        boxes, probability, level = boxes[keep], probability[keep], level[keep]
        keep = np.where(probability >= settings.rpn_score_thresh)[0]
        boxes, probability, level = boxes[keep], probability[keep], level[keep]
        result.append(boxes[top_nms_per_level(boxes, probability, level, settings.rpn_nms_thresh, post_nms_top_n)])
    return result


# -------------------------------------------------------------------------- the box part

def pooling_levels(boxes: np.ndarray, maps: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                   settings: RcnnSettings) -> tuple[np.ndarray, list[float]]:
    """Which of ``maps`` pools each box, and each map's scale (torchvision's ``MultiScaleRoIAlign`` setup
    and ``LevelMapper``)."""
    largest = (max(h for h, _ in sizes), max(w for _, w in sizes))
    scales = [float(2 ** np.round(np.log2(np.float32(m.shape[-2] / largest[0])))) for m in maps]
    if len(maps) == 1:
        return np.zeros(len(boxes), dtype=np.int64), scales
    k_min, k_max = int(-np.log2(np.float32(scales[0]))), int(-np.log2(np.float32(scales[-1])))
    side = np.sqrt(box_area(boxes))
    target = np.floor(np.float32(settings.canonical_level) + np.log2(side / np.float32(settings.canonical_scale))
                      + np.float32(1e-6))
    return (np.clip(target, k_min, k_max).astype(np.int64) - k_min), scales


def box_outputs(box_graph: Callable[..., Sequence[np.ndarray]], maps: Sequence[np.ndarray],
                boxes: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                settings: RcnnSettings) -> tuple[np.ndarray, np.ndarray]:
    """Class logits and box regression of every image's proposals (in their order) from the box graph,
    which takes each level's regions as (image index, x1, y1, x2, y2) already scaled to that level."""
    regions = np.concatenate([np.concatenate([np.full((len(b), 1), k, dtype=np.float32), b], axis=1)
                              for k, b in enumerate(boxes)])
    levels, scales = pooling_levels(regions[:, 1:], maps, sizes, settings)
    members = [np.where(levels == k)[0] for k in range(len(maps))]
    scaled = []
    for k, index in enumerate(members):
        level_regions = regions[index]
        level_regions[:, 1:] *= np.float32(scales[k])
        scaled.append(level_regions)
    logits, regression = box_graph(*maps, *scaled)
    order = np.concatenate(members)  # the graph's rows come level by level: back to the proposals' order
    class_logits = np.empty_like(logits)
    class_logits[order] = logits
    box_regression = np.empty_like(regression)
    box_regression[order] = regression
    return class_logits, box_regression


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def detections(class_logits: np.ndarray, box_regression: np.ndarray, boxes: Sequence[np.ndarray],
               sizes: Sequence[tuple[int, int]], settings: RcnnSettings,
               detections_per_img: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(boxes, scores, model labels 1..K) per image, best first (torchvision's ``postprocess_detections``)."""
    classes = class_logits.shape[1]
    decoded = decode_boxes(box_regression, np.concatenate(boxes), settings.box_weights, settings.bbox_xform_clip)
    probabilities = softmax(class_logits)
    result, start = [], 0
    for image_boxes, size in zip(boxes, sizes):
        stop = start + len(image_boxes)
        found = clip_boxes(decoded[start:stop], size)[:, 1:].reshape(-1, 4)
        scores = probabilities[start:stop, 1:].reshape(-1)
        labels = np.broadcast_to(np.arange(1, classes), (stop - start, classes - 1)).reshape(-1)
        start = stop
        keep = np.where(scores > settings.box_score_thresh)[0]
        found, scores, labels = found[keep], scores[keep], labels[keep]
        keep = large_enough(found, 1e-2)
        found, scores, labels = found[keep], scores[keep], labels[keep]
        keep = batched_nms(found, scores, labels, settings.box_nms_thresh)[:detections_per_img]
        result.append((found[keep], scores[keep], labels[keep]))
    return result


def to_image_pixels(boxes: np.ndarray, scaled: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """Boxes found at the model's scale back in the image's pixels (torchvision's ``resize_boxes``)."""
    ratio_h = np.float32(original[0]) / np.float32(scaled[0])
    ratio_w = np.float32(original[1]) / np.float32(scaled[1])
    return boxes * np.array([ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float32)
