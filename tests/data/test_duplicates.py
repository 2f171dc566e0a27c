"""Duplicate grouping: SHA-256 for byte copies, pHash for re-encoded / resized copies."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoscope.data.duplicates import (
    DEFAULT_PHASH_DISTANCE,
    ImageFingerprint,
    duplicate_groups,
    fingerprint,
    group_fingerprints,
)
from leukoscope.data.readers import read_class_folders
from leukoscope.data.synthetic import SYNTHETIC_CLASSES


def same(groups: np.ndarray, i: int, j: int) -> bool:
    return bool(groups[i] == groups[j])


@pytest.fixture
def cells(tmp_path: Path, cell_writer) -> list[Path]:
    """Eight genuinely different cells (two per class, different seeds)."""
    return [
        cell_writer(tmp_path / f"{label}_{k}.png", label, seed=10 * i + k, size=96)
        for i, label in enumerate(SYNTHETIC_CLASSES)
        for k in range(2)
    ]


def test_different_cells_are_not_grouped(cells: list[Path]) -> None:
    groups = duplicate_groups(cells)
    assert groups.dtype == np.int64 and groups.shape == (len(cells),)
    assert len(set(groups.tolist())) == len(cells)


def test_byte_identical_copies_are_grouped(tmp_path: Path, cells: list[Path]) -> None:
    copy = tmp_path / "copy" / "renamed.png"
    copy.parent.mkdir()
    copy.write_bytes(cells[3].read_bytes())
    paths = cells + [copy]
    groups = duplicate_groups(paths, max_distance=-1)
    assert same(groups, 3, len(paths) - 1)
    assert len(set(groups.tolist())) == len(cells)


def test_reencoded_jpeg_is_a_near_duplicate(tmp_path: Path, cells: list[Path]) -> None:
    reencoded = tmp_path / "reencoded.jpg"
    Image.open(cells[2]).save(reencoded, "JPEG", quality=70)
    assert hashlib.sha256(reencoded.read_bytes()).digest() != hashlib.sha256(cells[2].read_bytes()).digest()
    paths = cells + [reencoded]
    groups = duplicate_groups(paths)
    assert same(groups, 2, len(paths) - 1)
    assert len(set(groups.tolist())) == len(cells)
    # exact-only matching does not see it
    exact = duplicate_groups(paths, max_distance=-1)
    assert not same(exact, 2, len(paths) - 1)
    assert len(set(exact.tolist())) == len(paths)


def test_slightly_resized_copy_is_a_near_duplicate(tmp_path: Path, cells: list[Path]) -> None:
    resized = tmp_path / "resized.png"
    Image.open(cells[5]).resize((86, 86), Image.Resampling.BILINEAR).save(resized)
    enlarged = tmp_path / "enlarged.bmp"
    Image.open(cells[6]).resize((120, 120), Image.Resampling.BICUBIC).save(enlarged)
    paths = cells + [resized, enlarged]
    groups = duplicate_groups(paths)
    assert same(groups, 5, len(paths) - 2)
    assert same(groups, 6, len(paths) - 1)
    assert len(set(groups.tolist())) == len(cells)


def test_groups_are_transitive(tmp_path: Path, cells: list[Path]) -> None:
    # a ~ b (bytes), b ~ c (pHash): all three are one group
    b = tmp_path / "b.png"
    b.write_bytes(cells[0].read_bytes())
    c = tmp_path / "c.jpg"
    Image.open(b).save(c, "JPEG", quality=75)
    paths = [cells[0], cells[1], c, b]
    groups = duplicate_groups(paths)
    assert groups[0] == groups[2] == groups[3]
    assert groups[1] != groups[0]


def test_corrupt_file_does_not_crash_and_byte_copies_still_group(tmp_path: Path, cells: list[Path],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(cells[0].read_bytes()[:200])
    corrupt_copy = tmp_path / "corrupt_copy.jpg"
    corrupt_copy.write_bytes(corrupt.read_bytes())
    text = tmp_path / "text.png"
    text.write_text("hello")
    assert fingerprint(corrupt).phash is None
    assert fingerprint(corrupt).sha256 == hashlib.sha256(corrupt.read_bytes()).hexdigest()
    paths = cells + [corrupt, corrupt_copy, text]
    with caplog.at_level("WARNING", logger="leukoscope.data.duplicates"):
        groups = duplicate_groups(paths)
    # a split counted them silently, and training then skipped them: said, by name
    assert "3 file(s) cannot be decoded as images" in caplog.text and "corrupt_copy.jpg, text.png" in caplog.text
    n = len(cells)
    assert same(groups, n, n + 1)
    assert not same(groups, n, n + 2)
    assert not any(same(groups, n, i) for i in range(n))  # not matched to the image it was cut from
    assert len(set(groups.tolist())) == n + 2


def test_fingerprint_of_a_good_image(cells: list[Path]) -> None:
    fp = fingerprint(cells[0])
    assert isinstance(fp, ImageFingerprint)
    assert fp.sha256 == hashlib.sha256(cells[0].read_bytes()).hexdigest()
    assert isinstance(fp.phash, int) and 0 <= fp.phash < 2**64


def test_a_multi_page_tiff_is_named_in_the_warning_of_its_fingerprint(tmp_path: Path, cells: list[Path],
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    pages = tmp_path / "stack.tif"
    first = Image.open(cells[0]).convert("RGB")
    first.save(pages, save_all=True, append_images=[first.rotate(90)])
    with caplog.at_level("WARNING", logger="leukoscope.io"):
        fp = fingerprint(pages)
    assert fp.phash is not None
    # it said "<uploaded bytes>: 2 pages": the fingerprint decodes the bytes it hashed
    assert f"{pages}: 2 pages; only the first is read" in caplog.text and "<uploaded bytes>" not in caplog.text


def test_group_fingerprints_hamming_threshold() -> None:
    # hand-made 64-bit hashes: distances 0, 4, 5 and a high-bit (>2**63) hash
    base = 0x0F0F_0F0F_0F0F_0F0F
    fps = [
        ImageFingerprint("a", base),
        ImageFingerprint("b", base ^ 0b1111),  # distance 4
        ImageFingerprint("c", base ^ (0b11111 << 40)),  # distance 5 from base, 9 from b
        ImageFingerprint("d", 0xF000_0000_0000_0000),  # top bit set: must not overflow
        ImageFingerprint("e", 0xF000_0000_0000_0001),  # distance 1 from d
        ImageFingerprint("f", None),
        ImageFingerprint("g", None),
    ]
    groups = group_fingerprints(fps, max_distance=DEFAULT_PHASH_DISTANCE)
    assert DEFAULT_PHASH_DISTANCE == 4
    assert groups[0] == groups[1]
    assert groups[2] not in (groups[0],)
    assert groups[3] == groups[4] != groups[0]
    assert groups[5] != groups[6]  # two undecodable files with different bytes are not duplicates
    assert len(set(groups.tolist())) == 5

    wider = group_fingerprints(fps, max_distance=5)
    assert wider[0] == wider[1] == wider[2]
    exact = group_fingerprints(fps, max_distance=-1)
    assert len(set(exact.tolist())) == len(fps)
    zero = group_fingerprints(fps, max_distance=0)
    assert len(set(zero.tolist())) == len(fps)


def test_group_fingerprints_blocks_beyond_256() -> None:
    # more than one 256-row block: pairs across blocks must still be found
    rng = np.random.default_rng(0)
    hashes = [int(h) for h in rng.integers(0, 2**63, 600, dtype=np.int64)]
    fps = [ImageFingerprint(str(i), h) for i, h in enumerate(hashes)]
    fps.append(ImageFingerprint("late", hashes[3] ^ 1))  # index 600 pairs with index 3
    fps.append(ImageFingerprint("3", None))  # same bytes as index 3 (sha "3")
    groups = group_fingerprints(fps, max_distance=2)
    assert groups[600] == groups[3] == groups[601]
    # random 63-bit hashes are far apart
    assert len(set(groups.tolist())) == 600


def test_empty_input() -> None:
    assert duplicate_groups([]).shape == (0,)


def test_progress_callback(cells: list[Path]) -> None:
    calls = []
    duplicate_groups(cells[:3], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_synthetic_dataset_has_no_duplicates(synthetic_root: Path) -> None:
    manifest = read_class_folders(synthetic_root)
    groups = duplicate_groups([s.path for s in manifest])
    assert len(set(groups.tolist())) == len(manifest)


# -- real data ---------------------------------------------------------------


@pytest.mark.shared
def test_all_taleqani_pro_duplicates(all_taleqani: Path) -> None:
    """all-taleqani/Pro holds 35 byte-identical pairs (70 files), measured with SHA-256;
    duplicate_groups (pHash distance <= 4) joins them into 43 groups holding 88 files.
    About 1.3 s for the 684 images on 2 cores."""
    paths = sorted((all_taleqani / "Pro").glob("*.jpg"))
    assert len(paths) == 684
    by_digest: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        by_digest.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(i)
    byte_groups = [members for members in by_digest.values() if len(members) > 1]
    assert len(byte_groups) >= 30  # 35 measured; the dataset README says "about 40"

    start = time.perf_counter()
    groups = duplicate_groups(paths)
    elapsed = time.perf_counter() - start
    for members in byte_groups:  # every byte-identical set is found...
        assert len({int(groups[i]) for i in members}) == 1, [paths[i].name for i in members]
    sizes = Counter(groups.tolist())
    shared = [g for g, n in sizes.items() if n > 1]
    # ...and near-duplicates only add to them (43 groups / 88 files measured)
    assert len(shared) >= len(byte_groups)
    assert sum(sizes[g] for g in shared) >= sum(len(m) for m in byte_groups)
    assert sum(sizes[g] for g in shared) < 0.25 * len(paths)  # but pHash does not lump the class together
    assert elapsed < 30


def test_a_flipped_or_rotated_copy_is_a_near_duplicate(tmp_path: Path, cells: list[Path]) -> None:
    """A cell has no up or left, and datasets ship turned copies as augmentation: a mirror image was 30-34 bits
    from its original, a quarter turn 24-32, and both sat on either side of a split."""
    turned = []
    for k, turn in enumerate((Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_90,
                              Image.Transpose.TRANSVERSE)):
        path = tmp_path / f"turned{k}.jpg"
        Image.open(cells[5]).transpose(turn).save(path, "JPEG", quality=90)
        turned.append(path)
    paths = cells + turned
    groups = duplicate_groups(paths)
    assert all(same(groups, 5, len(cells) + k) for k in range(3))
    assert len(set(groups.tolist())) == len(cells)  # and no two different cells joined
    plain = group_fingerprints([ImageFingerprint(fp.sha256, fp.phash) for fp in map(fingerprint, paths)],
                               max_distance=DEFAULT_PHASH_DISTANCE)
    assert not same(plain, 5, len(cells))  # as the image is, the mirror image is far


def test_cells_on_a_plain_background_are_compared_by_their_content(tmp_path: Path) -> None:
    """C-NMC's cells are segmented onto black (84% of each image): two different cells, of an ALL patient and of a
    healthy donor, had pHashes within 4 bits and their subjects were joined in one split group. The content is
    compared now: two cells apart, one cell moved within its frame together."""
    from skimage.draw import disk, ellipse

    def cell(nucleus: tuple[int, int, int, int]) -> np.ndarray:
        patch = np.zeros((170, 170, 3), dtype=np.uint8)
        patch[disk((85, 85), 84, shape=(170, 170))] = (170, 140, 200)  # cytoplasm
        patch[ellipse(*nucleus, shape=(170, 170))] = (90, 40, 130)
        return patch

    def on_black(patch: np.ndarray, top: int, left: int) -> Image.Image:
        pixels = np.zeros((450, 450, 3), dtype=np.uint8)
        pixels[top:top + 170, left:left + 170] = patch
        return Image.fromarray(pixels)

    a, b = cell((70, 60, 45, 35)), cell((100, 105, 50, 55))
    paths = []
    for name, image in (("a.bmp", on_black(a, 140, 140)), ("a_moved.bmp", on_black(a, 40, 260)),
                        ("b.bmp", on_black(b, 140, 140))):
        image.save(tmp_path / name)
        paths.append(tmp_path / name)
    groups = duplicate_groups(paths)
    assert same(groups, 0, 1) and not same(groups, 0, 2)
    # specks on black are not cut to: blown up to the hash's size, every speck would be one even grey
    from leukoscope.data.duplicates import without_plain_border

    speck = np.zeros((450, 450), dtype=np.uint8)
    speck[200:202, 300:302] = 255
    assert without_plain_border(Image.fromarray(speck)).size == (450, 450)


def test_cnmc_minis_copies_are_found_and_its_different_cells_kept_apart() -> None:
    from tests.conftest import shared_dataset

    cnmc = shared_dataset("cnmc-mini")
    paths = [cnmc / "all" / "UID_25_1_1_all.bmp", cnmc / "hem" / "UID_H14_1_1_hem.bmp",  # two cells, pHash 4 apart
             cnmc / "hem" / "UID_H10_1_1_hem.bmp", cnmc / "hem" / "UID_h3_1_1_hem.bmp"]  # one cell, two donors
    groups = duplicate_groups(paths)
    assert not same(groups, 0, 1) and same(groups, 2, 3)
