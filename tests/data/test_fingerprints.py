"""A bundle's record of the contents it learned from: found wherever the images are now."""

from __future__ import annotations

from pathlib import Path

from leukoscope.data.fingerprints import (DIGESTS_FILE, OF_CROP_SOURCES, describe_overlap, digest_overlap,
                                          file_digest, read_training_digests, write_training_digests)


def test_digests_find_copies_and_leave_the_test_part_alone(tmp_path: Path) -> None:
    files = {}
    for name, content in (("a", b"one"), ("b", b"two"), ("c", b"three"), ("d", b"four")):
        files[name] = tmp_path / f"{name}.png"
        files[name].write_bytes(content)
    assert file_digest(files["a"]) == file_digest(files["a"]) != file_digest(files["b"])
    assert len(file_digest(files["a"])) == 16
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_training_digests(bundle, {"train": [files["a"], files["b"]], "val": [files["c"]]})
    record = read_training_digests(bundle)
    assert record is not None and record["of"] == "images"
    copy = tmp_path / "elsewhere" / "renamed.jpg"
    copy.parent.mkdir()
    copy.write_bytes(b"one")
    assert digest_overlap(record, [copy, files["c"], files["d"], tmp_path / "gone.png"]) == {"train": 1, "val": 1}
    assert digest_overlap(record, [files["d"]]) == {}
    assert describe_overlap({"train": 2, "val": 1}) == "2 of its train images and 1 of its val images"
    assert describe_overlap({"train": 2}, OF_CROP_SOURCES) == "2 source images of its train crops"


def test_a_missing_or_broken_record_is_none(tmp_path: Path) -> None:
    assert read_training_digests(tmp_path) is None
    (tmp_path / DIGESTS_FILE).write_text("{not json")
    assert read_training_digests(tmp_path) is None
    (tmp_path / DIGESTS_FILE).write_text('{"parts": 3}')
    assert read_training_digests(tmp_path) is None
