"""decode_manifest (corrupt-image policy) and TensorImageDataset."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukoscope.data.dataset import LoadReport, TensorImageDataset, decode_manifest
from leukoscope.data.manifest import DatasetError, Manifest, Sample
from leukoscope.data.readers import read_class_folders
from leukoscope.pixels import IMAGENET_MEAN, IMAGENET_STD
from leukoscope.preprocessing import Preprocessing


@pytest.fixture
def small(tmp_path: Path, cell_writer) -> Manifest:
    samples = []
    for i, label in enumerate(["blast", "lymphocyte", "blast", "lymphocyte"]):
        path = cell_writer(tmp_path / label / f"{i}.png", label, seed=i, size=48 + 8 * i)
        samples.append(Sample(path, label))
    return Manifest(samples)


@pytest.fixture
def with_corrupt(small: Manifest, tmp_path: Path) -> tuple[Manifest, Path]:
    corrupt = tmp_path / "blast" / "corrupt.jpg"
    good = small[0].path
    data = Image.open(good)
    data.save(corrupt, "JPEG")
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # truncated
    samples = list(small.samples)
    samples.insert(2, Sample(corrupt, "blast"))
    return Manifest(samples, list(small.classes)), corrupt


def test_decode_shapes_and_dtype(small: Manifest) -> None:
    images, kept, report = decode_manifest(small, Preprocessing(32).pixels)
    assert images.shape == (4, 3, 32, 32)
    assert images.dtype == torch.uint8
    assert images.is_contiguous()
    assert kept.samples == small.samples and kept.classes == small.classes
    assert report.loaded == 4 and report.skipped == []
    assert report.as_dict() == {"loaded": 4, "skipped": 0, "skipped_files": []}


def test_decoded_pixels_match_the_file(tmp_path: Path, cell_writer) -> None:
    path = cell_writer(tmp_path / "a" / "x.png", size=32)
    images, _, _ = decode_manifest(Manifest([Sample(path, "a")]), Preprocessing(32).pixels)
    expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(images[0].permute(1, 2, 0).numpy(), expected)


def test_skip_keeps_the_rest_and_records_the_file(with_corrupt, caplog) -> None:
    manifest, corrupt = with_corrupt
    with caplog.at_level(logging.WARNING, logger="leukoscope.data.dataset"):
        images, kept, report = decode_manifest(manifest, Preprocessing(24).pixels, on_corrupt="skip")
    assert images.shape == (4, 3, 24, 24)
    assert len(kept) == 4 and corrupt not in [s.path for s in kept]
    assert [s.path for s in kept] == [s.path for s in manifest if s.path != corrupt]
    assert kept.targets == [0, 1, 0, 1]  # labels stay aligned with the images
    assert report.loaded == 4
    assert len(report.skipped) == 1
    assert report.skipped[0]["path"] == str(corrupt)
    assert "truncated" in report.skipped[0]["error"].lower()
    assert report.as_dict()["skipped"] == 1
    assert "corrupt.jpg" in caplog.text


def test_skip_is_the_default(with_corrupt) -> None:
    manifest, _ = with_corrupt
    assert len(decode_manifest(manifest, Preprocessing(16).pixels)[1]) == 4


def test_fail_raises_naming_the_file(with_corrupt) -> None:
    manifest, corrupt = with_corrupt
    with pytest.raises(DatasetError, match="corrupt image") as info:
        decode_manifest(manifest, Preprocessing(24).pixels, on_corrupt="fail")
    assert str(corrupt) in str(info.value)


def test_missing_file_is_treated_as_unreadable(small: Manifest, tmp_path: Path) -> None:
    manifest = Manifest(small.samples + [Sample(tmp_path / "gone.png", "blast")])
    _, kept, report = decode_manifest(manifest, Preprocessing(16).pixels)
    assert len(kept) == 4
    assert "does not exist" in report.skipped[0]["error"]


def test_all_corrupt_raises(tmp_path: Path) -> None:
    samples = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"nope")
        samples.append(Sample(path, "a" if i else "b"))
    with pytest.raises(DatasetError, match="none of the 3 images"):
        decode_manifest(Manifest(samples), Preprocessing(16).pixels)


def test_max_pixels_applies(small: Manifest) -> None:
    # sizes are 48, 56, 64, 72 px square; a 3000 px limit keeps only the 48 px one
    _, kept, report = decode_manifest(small, Preprocessing(16).pixels, max_pixels=3000)
    assert [s.path for s in kept] == [small[0].path]
    assert len(report.skipped) == 3
    assert all("exceeds the limit" in row["error"] for row in report.skipped)


def test_invalid_policy(small: Manifest) -> None:
    with pytest.raises(ValueError, match="on_corrupt"):
        decode_manifest(small, Preprocessing(16).pixels, on_corrupt="ignore")  # type: ignore[arg-type]


def test_preprocess_and_progress(small: Manifest) -> None:
    seen, progress = [], []

    def black(image: Image.Image) -> Image.Image:
        seen.append(image.size)
        return Image.new("RGB", image.size, (0, 0, 0))

    to_pixels = Preprocessing(16).pixels
    images, _, _ = decode_manifest(small, lambda image: to_pixels(black(image)),
                                   progress=lambda d, t: progress.append((d, t)))
    assert seen == [(48, 48), (56, 56), (64, 64), (72, 72)]  # before letterboxing
    assert int(images.max()) == 0
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_non_square_images_are_letterboxed(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (80, 40), (10, 20, 30)).save(path)
    images, _, _ = decode_manifest(Manifest([Sample(path, "a")]), Preprocessing(20).pixels)
    assert images.shape == (1, 3, 20, 20)
    assert (images[0, :, 5:15, :] == torch.tensor([10, 20, 30]).view(3, 1, 1)).all()


def test_synthetic_root_decodes(synthetic_root: Path) -> None:
    manifest = read_class_folders(synthetic_root)
    images, kept, report = decode_manifest(manifest, Preprocessing(32).pixels)
    assert images.shape == (96, 3, 32, 32)
    assert report.loaded == 96 and not report.skipped
    assert isinstance(report, LoadReport)


# -- TensorImageDataset ------------------------------------------------------


def test_dataset_normalises_with_the_given_statistics() -> None:
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    images[1] = 0
    dataset = TensorImageDataset(images, [1, 0], None, Preprocessing(8, list(IMAGENET_MEAN), list(IMAGENET_STD)).model_input)
    assert len(dataset) == 2
    x, y = dataset[0]
    assert y == 1
    assert x.dtype == torch.float32 and x.shape == (3, 4, 4)
    for c in range(3):
        assert torch.allclose(x[c], torch.tensor((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))
    x0, y0 = dataset[1]
    assert y0 == 0
    assert torch.allclose(x0[0], torch.tensor(-IMAGENET_MEAN[0] / IMAGENET_STD[0]))


def test_dataset_applies_augmentation_before_normalisation() -> None:
    images = torch.zeros((1, 3, 4, 4), dtype=torch.uint8)
    images[0, :, 0, 0] = 255
    calls = []

    def flip(image: torch.Tensor) -> torch.Tensor:
        assert image.dtype == torch.uint8  # augmentation sees uint8
        calls.append(1)
        return image.flip(-1)

    dataset = TensorImageDataset(images, [0], augment=flip, normalize=Preprocessing(8, mean=[0, 0, 0], std=[1, 1, 1]).model_input)
    x, _ = dataset[0]
    assert calls == [1]
    assert x[0, 0, 3] == 1.0 and x[0, 0, 0] == 0.0
    assert images[0, 0, 0, 0] == 255  # the stored tensor is not modified


def test_dataset_without_targets() -> None:
    dataset = TensorImageDataset(torch.zeros((3, 3, 2, 2), dtype=torch.uint8), None, None, Preprocessing(8).model_input)
    assert dataset[2][1] == -1


def test_dataset_works_with_a_dataloader(small: Manifest) -> None:
    images, kept, _ = decode_manifest(small, Preprocessing(16).pixels)
    loader = torch.utils.data.DataLoader(TensorImageDataset(images, kept.targets, None, Preprocessing(8).model_input), batch_size=3)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [3, 1]
    assert batches[0][1].tolist() == [0, 1, 0]


def test_images_far_from_the_sets_size_are_named(tmp_path: Path) -> None:
    """A lab's fine-tuning folder mixed 300 px cell crops with a whole 640 x 480 field and a 64 px crop, all brought
    to one input size without a word: the field's cell looks a quarter of its size."""
    from leukoscope.data.dataset import odd_sizes

    samples = []
    for name, size in (("a.png", (300, 300)), ("b.png", (280, 300)), ("c.png", (310, 300)),
                       ("field.png", (1400, 1050)), ("tight.png", (64, 64))):
        Image.new("RGB", size, (200, 150, 180)).save(tmp_path / name)
        samples.append(Sample(tmp_path / name, "a"))
    _, _, report = decode_manifest(Manifest(samples), Preprocessing(32).pixels)
    said = odd_sizes(report.sides)
    assert said.startswith("2 of 5 images are over 4 times larger or smaller than the median (300 px a side)")
    assert said.endswith("(field.png, tight.png)")
    assert odd_sizes(report.sides[:3]) is None  # alike: nothing said
