"""The numpy steps around an exported detector's graphs do what torchvision's do, step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms as torch_batched_nms
from torchvision.ops import nms as torch_nms

from leukoscope.inference import rcnn_glue
from leukoscope.inference.detector_export import rcnn_settings
from leukoscope.models import create_model
from leukoscope.models.proposals import top_nms_per_level as torch_top_nms_per_level


def _boxes(rng: np.random.Generator, n: int, extent: float = 300.0) -> np.ndarray:
    corners = rng.uniform(0, extent, (n, 2))
    sizes = rng.uniform(5, 80, (n, 2))
    return np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("fasterrcnn_mobilenet_v3_fpn", num_classes=3, input_scale=0.5).eval()


@pytest.mark.parametrize("n", [0, 1, 300, 2500])
def test_nms_keeps_what_torchvision_keeps_in_its_order(n: int) -> None:
    rng = np.random.default_rng(n)
    boxes, scores = _boxes(rng, n), rng.random(n).astype(np.float32)
    scores[: n // 4] = 1.0  # ties (a saturated sigmoid): broken by index, as torchvision's stable sort does
    if n > 1:  # the same box twice, a box inside another, and boxes that only touch
        quarter = np.tile((boxes[1][2:] - boxes[1][:2]) / 4, 2) * np.float32([1, 1, -1, -1])
        boxes[-1], boxes[n // 2] = boxes[0], boxes[1] + quarter
        boxes[n // 3] = [boxes[2][2], boxes[2][1], boxes[2][2] + 20, boxes[2][3]]
    for threshold in (0.3, 0.7):
        expected = torch_nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).numpy()
        assert np.array_equal(rcnn_glue.nms(boxes, scores, threshold), expected)


@pytest.mark.parametrize("n", [200, 1500])  # below and above the coordinate trick's limit (4,000 numbers)
def test_batched_nms_takes_both_of_torchvisions_ways(n: int) -> None:
    rng = np.random.default_rng(n)
    boxes, scores, groups = _boxes(rng, n), rng.random(n).astype(np.float32), rng.integers(0, 3, n)
    expected = torch_batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), 0.5)
    assert np.array_equal(rcnn_glue.batched_nms(boxes, scores, groups, 0.5), expected.numpy())


@pytest.mark.parametrize(("n", "top"), [(500, 50), (3000, 400), (3000, 5000)])
def test_top_nms_per_level_matches_the_torch_rpns(n: int, top: int) -> None:
    rng = np.random.default_rng(top)
    boxes, scores, levels = _boxes(rng, n, 600.0), rng.random(n).astype(np.float32), rng.integers(0, 4, n)
    expected = torch_top_nms_per_level(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(levels),
                                       0.7, top).numpy()
    assert np.array_equal(rcnn_glue.top_nms_per_level(boxes, scores, levels, 0.7, top), expected)


@pytest.mark.parametrize("size", [(480, 640), (485, 333), (97, 1201)])
def test_the_transform_scales_normalises_and_pads_as_the_models(model: torch.nn.Module,
                                                                 size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0])
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    settings = rcnn_settings(model)
    batch, sizes = rcnn_glue.model_batch([image], settings)
    with torch.no_grad():
        expected = model.transform([torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))])[0]
    assert sizes == [tuple(expected.image_sizes[0])]
    assert batch.shape == tuple(expected.tensors.shape)
    # torch weighs the antialiasing filter's taps in float32, PIL in double: within 1e-3 of a unit
    # of the normalised image (a 20th of a grey level), where bilinear without antialiasing differs by 2.3
    assert np.abs(batch - expected.tensors.numpy()).max() < 1e-3


def test_anchors_and_pooling_levels_are_torchvisions(model: torch.nn.Module) -> None:
    settings = rcnn_settings(model)
    padded = (256, 320)
    maps = [torch.zeros(1, 8, padded[0] // s, padded[1] // s) for s in (8, 16, 32, 64)]
    expected = model.rpn.anchor_generator(ImageList(torch.zeros(1, 3, *padded), [(250, 310)]), maps)[0]
    anchors = rcnn_glue.grid_anchors(settings, [tuple(m.shape[-2:]) for m in maps], padded)
    assert np.array_equal(anchors, expected.numpy())

    rng = np.random.default_rng(3)
    boxes = _boxes(rng, 400, 250.0) * np.float32(rng.uniform(0.2, 4.0))
    pool = model.roi_heads.box_roi_pool
    pooled = maps[:3]
    from torchvision.ops.poolers import _setup_scales

    scales, mapper = _setup_scales(pooled, [(250, 310)], pool.canonical_scale, pool.canonical_level)
    levels, own_scales = rcnn_glue.pooling_levels(boxes, [m.numpy() for m in pooled], [(250, 310)], settings)
    assert own_scales == scales
    assert np.array_equal(levels, mapper([torch.from_numpy(boxes)]).numpy())


def test_settings_survive_the_bundle_record(model: torch.nn.Module) -> None:
    import json

    settings = rcnn_settings(model)
    assert rcnn_glue.RcnnSettings.from_record(json.loads(json.dumps(settings.to_record()))) == settings
    assert settings.pooled_levels == (0, 1, 2) and len(settings.cell_anchors) == 4
    assert settings.input_scale == 0.5 and settings.rpn_post_nms_top_n == 200
