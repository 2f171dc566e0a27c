"""The early-stopping proposal NMS gives torchvision's proposals."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import batched_nms

from leukoscope.models.detectors import create_detector
from leukoscope.models.proposals import PrefixNmsRPN, top_nms_per_level


def clustered_boxes(n: int, levels: int, seed: int, spread: float, clusters: int) -> tuple[torch.Tensor, ...]:
    """Boxes jittered by ``spread`` px around ``clusters`` centres (as an RPN's are: a small spread
    and NMS drops most of them), distinct scores."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(clusters, 2, generator=generator) * 500
    pick = torch.randint(len(centres), (n,), generator=generator)
    xy = centres[pick] + torch.randn(n, 2, generator=generator) * spread
    size = 40 + torch.rand(n, 2, generator=generator) * 4
    boxes = torch.cat([xy, xy + size], dim=1)
    scores = torch.rand(n, generator=generator)
    return boxes, scores, torch.randint(levels, (n,), generator=generator)


@pytest.mark.parametrize("n,levels,top,spread,clusters", [
    (3000, 4, 60, 1.0, 20),     # most candidates suppressed: several chunks before the cap is reached
    (3000, 4, 60, 1.0, 10),     # fewer survivors than the cap: chunk after chunk to the end
    (3000, 4, 300, 60.0, 250),  # most kept: the first chunk is enough
    (2000, 3, 5000, 8.0, 150),  # cap above what survives: every candidate decided
    (500, 1, 50, 8.0, 40),
    (40, 2, 10, 8.0, 4),
])
def test_same_proposals_in_the_same_order_as_torchvision(n: int, levels: int, top: int, spread: float,
                                                         clusters: int) -> None:
    for seed in range(3):
        boxes, scores, level = clustered_boxes(n, levels, seed, spread, clusters)
        expected = batched_nms(boxes, scores, level, 0.7)[:top]
        assert torch.equal(top_nms_per_level(boxes, scores, level, 0.7, top), expected)


def test_no_candidates_or_no_room_give_no_proposals() -> None:
    kept = top_nms_per_level(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.7, 100)
    assert kept.shape == (0,) and kept.dtype == torch.int64
    boxes, scores, level = clustered_boxes(100, 2, 0, 8.0, 10)
    assert top_nms_per_level(boxes, scores, level, 0.7, 0).shape == (0,)


def test_few_candidates_are_decided_on_boxes_shifted_by_level_as_torchvision_does() -> None:
    """Up to 1,000 candidates torchvision shifts each level's boxes apart and runs one NMS: the shift
    rounds in float32, which decides a pair whose IoU is within ~1e-4 of the threshold (found by review)."""
    near = torch.tensor([[844.3848876953125, 1252.3326416015625, 879.6935424804688, 1290.2545166015625]])
    boxes = torch.cat([near, near + torch.tensor([6.2308, 0.0, 6.2308, 0.0]), torch.tensor([[10.0, 10.0, 50.0, 50.0]])])
    scores = torch.tensor([0.9, 0.8, 0.7])
    level = torch.tensor([3, 3, 0])
    assert torch.equal(top_nms_per_level(boxes, scores, level, 0.7, 10), batched_nms(boxes, scores, level, 0.7))


def test_faster_rcnn_detectors_propose_what_torchvision_proposes() -> None:
    torch.manual_seed(0)
    model = create_detector("fasterrcnn_mobilenet_v3_fpn", num_classes=3, input_scale=0.5).eval()
    assert isinstance(model.rpn, PrefixNmsRPN)
    images = [torch.rand(3, 480, 640)]
    with torch.no_grad():
        ours = model(images)[0]
        model.rpn.__class__ = RegionProposalNetwork  # torchvision's own filter
        theirs = model(images)[0]
    assert len(theirs["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(ours[key], theirs[key])
