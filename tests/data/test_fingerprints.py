"""A bundle's record of the contents it learned from: found wherever the images are now."""

from __future__ import annotations

from pathlib import Path

from leukoscope.data.fingerprints import (DIGESTS_FILE, OF_CROP_SOURCES, describe_overlap, digest_overlap,
                                          file_digest, learned_among, read_training_digests,
                                          write_training_digests)


def test_digests_find_copies_and_leave_the_test_part_alone(tmp_path: Path) -> None:
    files = {}
    for name, content in (("a", b"one"), ("b", b"two"), ("c", b"three"), ("d", b"four"), ("e", b"five")):
        files[name] = tmp_path / f"{name}.png"
        files[name].write_bytes(content)
    assert file_digest(files["a"]) == file_digest(files["a"]) != file_digest(files["b"])
    assert len(file_digest(files["a"])) == 16
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_training_digests(bundle, {"train": [files["a"], files["b"]], "val": [files["c"]]})
    # a second kind of record (the images crops were cut from) joins the first, never replaces it
    write_training_digests(bundle, {"train": [files["e"]]}, of=OF_CROP_SOURCES)
    records = read_training_digests(bundle)
    assert records is not None
    assert set(records) == {"images", "images (pixels)", OF_CROP_SOURCES, f"{OF_CROP_SOURCES} (pixels)"}
    copy = tmp_path / "elsewhere" / "renamed.jpg"
    copy.parent.mkdir()
    copy.write_bytes(b"one")
    found = digest_overlap(records, [copy, files["c"], files["d"], files["e"], tmp_path / "gone.png"])
    assert found == {"train": 1, "val": 1, "train sources": 1}
    assert digest_overlap(records, [files["d"]]) == {}
    assert describe_overlap(found) == ("1 of its train images and 1 of its val images and 1 source image of its "
                                       "train crops")
    assert describe_overlap({"train sources": 2}) == "2 source images of its train crops"


def test_a_missing_or_broken_record_is_none(tmp_path: Path) -> None:
    assert read_training_digests(tmp_path) is None
    (tmp_path / DIGESTS_FILE).write_text("{not json")
    assert read_training_digests(tmp_path) is None
    (tmp_path / DIGESTS_FILE).write_text('{"records": 3}')
    assert read_training_digests(tmp_path) is None


def test_a_run_is_checked_against_what_a_model_learned_on_a_sample(tmp_path: Path) -> None:
    """analyze and predict say when a model learned from some of their images (the shipped classifier from 34 of
    60 all-taleqani fields a review analysed, without a word); a large run is checked on a sample."""
    files = []
    for i in range(10):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(f"image {i}".encode())
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert learned_among({"classifier": bundle, "detector": None}, files) == ({}, 0)  # no record: nothing to say
    write_training_digests(bundle, {"train": files[:4], "val": files[4:5]})
    assert learned_among({"classifier": bundle}, files) == ({"classifier": {"train": 4, "val": 1}}, 10)
    assert learned_among({"classifier": bundle}, files[5:]) == ({}, 5)
    # a sample of 3, spread evenly: 0.png (train), 4.png (val), 9.png (neither)
    assert learned_among({"classifier": bundle}, files, sample=3) == ({"classifier": {"train": 1, "val": 1}}, 3)
    other = tmp_path / "other"
    other.mkdir()
    write_training_digests(other, {"train": files[9:]})
    assert learned_among({"detector": other, "classifier": bundle}, files[8:]) == ({"detector": {"train": 1}}, 2)


def test_a_copy_saved_again_is_known_by_its_pixels(tmp_path: Path) -> None:
    """The service's reviewed-labels export re-encodes every cell: a lab that fine-tuned on it and scored the
    original folder had 15 of 24 images pixel-identical to training images scored without a word."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    original, exported = tmp_path / "cell.jpg", tmp_path / "case-x-cell-1.png"
    Image.fromarray(pixels).save(original, quality=90)
    Image.open(original).save(exported)  # the same decoded pixels, other bytes
    other = tmp_path / "other.png"
    Image.fromarray(255 - pixels).save(other)
    assert file_digest(original) != file_digest(exported)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_training_digests(bundle, {"train": [exported]})
    records = read_training_digests(bundle)
    assert digest_overlap(records, [original, other]) == {"train": 1}
    assert learned_among({"classifier": bundle}, [original, other]) == ({"classifier": {"train": 1}}, 2)
    # a record made before (file digests only: the shipped models') decodes nothing and knows copies by bytes
    files_only = {"images": records["images"]}
    assert digest_overlap(files_only, [original, exported]) == {"train": 1}
