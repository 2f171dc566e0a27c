"""Region proposals with an NMS that stops once it has what the cap keeps.

torchvision's RPN runs NMS over every pre-NMS candidate of each feature level, then
keeps the ``post_nms_top_n`` best survivors of all levels together. Greedy NMS costs
about (survivors x candidates) box comparisons, and an RPN on blood cells keeps most
of its candidates (60-80% at IoU 0.7), so on a 1456x1944 tile (4,600 candidates per
level, 1,843 proposals kept) NMS took 0.23 s of a 0.8 s detection (measured,
docs/benchmarks.md).

The same result is cheaper: whether a candidate survives depends only on the
candidates of its level scored above it, so NMS over the best candidates decides them
exactly as NMS over all of them, and once ``post_nms_top_n`` survivors outscore every
candidate left, the rest cannot enter the final list. So the levels run
NMS only as far down the scores as the cap needs: on the shipped detector's 1456x1944
tile, 0.25 s -> 0.05 s. The proposals are those of ``torchvision.ops.batched_nms``
(but for exactly tied scores, which may come in another order).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

#: The first chunk holds this many times the cap (+16) of the best candidates; later ones are
#: sized by the share kept so far, with the same margin.
PREFIX_FACTOR = 1.25


def top_nms_per_level(boxes: Tensor, scores: Tensor, levels: Tensor, iou_threshold: float, top: int) -> Tensor:
    """The indices ``batched_nms(boxes, scores, levels, iou_threshold)[:top]`` would give, best first
    (exactly tied scores come in index order, so where ties straddle ``top`` the one kept may differ).

    Candidates are decided in chunks, best first over all levels: a level's survivors so
    far outrank its next candidates and never suppress one another, so NMS over them plus
    the level's part of the next chunk extends that level's NMS exactly. It stops once
    ``top`` survivors score above every candidate not yet decided."""
    if top <= 0 or len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 100_000):
        # torchvision then runs one NMS on boxes moved apart by level (its "coordinate trick"): the
        # shift rounds in float32 and can decide IoUs within ~1e-4 of the threshold otherwise, so
        # the same shift here
        boxes = boxes + (levels.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes)))[:, None]
    order = torch.sort(scores, descending=True, stable=True)[1]
    survivors: dict[int, Tensor] = {}
    start, stop = 0, min(len(order), int(top * PREFIX_FACTOR) + 16)
    while start < len(order):
        chunk = order[start:stop]
        chunk_levels = levels[chunk]
        for level in torch.unique(chunk_levels).tolist():
            before = survivors.get(level, chunk[:0])
            candidates = torch.cat([before, chunk[chunk_levels == level]])
            survivors[level] = candidates[box_ops.nms(boxes[candidates], scores[candidates], iou_threshold)]
        found = torch.cat(list(survivors.values()))
        if stop == len(order) or (len(found) >= top and
                                  float(torch.topk(scores[found], top)[0][-1]) > float(scores[order[stop]])):
            break
        rate = max(len(found), 1) / stop  # the share kept so far sizes the next chunk
        start, stop = stop, min(len(order), stop + int(max(top - len(found), 1) / rate * PREFIX_FACTOR) + 16)
    # by score, ties by index (torchvision's unstable sort may order exact ties otherwise)
    keep = torch.sort(torch.cat(list(survivors.values())))[0]
    return keep[torch.sort(scores[keep], descending=True, stable=True)[1]][:top]


class PrefixNmsRPN(RegionProposalNetwork):
    """torchvision's RPN with :func:`top_nms_per_level` in place of its NMS: same proposals, less work.
    The weights and every other step are torchvision's own."""

    @classmethod
    def adopt(cls, rpn: RegionProposalNetwork) -> "PrefixNmsRPN":
        """``rpn`` itself, now running this class's proposal filter (its modules and settings kept)."""
        rpn.__class__ = cls
        return rpn  # type: ignore[return-value]

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        # torchvision's RegionProposalNetwork.filter_proposals (0.29) but for the NMS call
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), idx, dtype=torch.int64, device=device)
                            for idx, n in enumerate(num_anchors_per_level)])
        levels = levels.reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        objectness = objectness[batch_idx, top_n_idx]
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]
        objectness_prob = torch.sigmoid(objectness)

        final_boxes, final_scores = [], []
        for boxes, scores, lvl, img_shape in zip(proposals, objectness_prob, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = top_nms_per_level(boxes, scores, lvl, self.nms_thresh, self.post_nms_top_n())
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores
