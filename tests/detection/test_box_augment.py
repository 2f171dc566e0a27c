from __future__ import annotations

import pytest
import torch

from leukoscope.data.box_augment import DetectionAugment, detection_augmentation, hflip, rot90, vflip


def _marked(height: int = 30, width: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[:, 5:12, 8:20] = 255  # rows 5..11, columns 8..19 -> box (8, 5, 20, 12)
    return image, torch.tensor([[8.0, 5.0, 20.0, 12.0]])


def _box_of_white(image: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(image[0] == 255, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("op", [hflip, vflip, lambda i, b: rot90(i, b, 1), lambda i, b: rot90(i, b, 2),
                                lambda i, b: rot90(i, b, 3)])
def test_boxes_follow_the_pixels(op) -> None:
    image, boxes = _marked()
    out_image, out_boxes = op(image, boxes)
    assert out_boxes[0].tolist() == _box_of_white(out_image)


def test_rot90_swaps_size_and_four_turns_are_identity() -> None:
    image, boxes = _marked()
    turned, turned_boxes = rot90(image, boxes, 1)
    assert turned.shape == (3, 50, 30)
    back, back_boxes = rot90(image, boxes, 4)
    assert torch.equal(back, image) and torch.equal(back_boxes, boxes)


def test_random_augment_keeps_boxes_valid_and_empty_boxes_work() -> None:
    augment = detection_augmentation("abas")
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        image, boxes = _marked()
        out, out_boxes = augment(image, boxes, generator)
        h, w = out.shape[-2:]
        assert out.dtype == torch.uint8
        assert (out_boxes[:, 2] > out_boxes[:, 0]).all() and (out_boxes[:, 3] > out_boxes[:, 1]).all()
        assert out_boxes[:, 2].max() <= w and out_boxes[:, 3].max() <= h
    out, out_boxes = DetectionAugment()(image, torch.zeros(0, 4), generator)
    assert out_boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="unknown detection augmentation"):
        detection_augmentation("spin")


def test_stain_preset_changes_colours_not_boxes() -> None:
    torch.manual_seed(0)
    image = torch.full((3, 30, 50), 180, dtype=torch.uint8)
    image[:, 5:12, 8:20] = torch.tensor([120, 60, 160], dtype=torch.uint8)[:, None, None]
    augment = DetectionAugment(flips=False, rotate=False, stain=0.1)
    out, boxes = augment(image, torch.tensor([[8.0, 5.0, 20.0, 12.0]]))
    assert torch.equal(boxes, torch.tensor([[8.0, 5.0, 20.0, 12.0]]))
    assert out.dtype == torch.uint8 and not torch.equal(out, image)
    assert detection_augmentation("stain").stain is not None
