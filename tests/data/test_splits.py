"""Splits: stratified, subject-grouped, duplicate-aware; persistence and leak checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from leukoscope.data.manifest import DatasetError, Manifest, Sample
from leukoscope.data.readers import read_class_folders, read_dataset
from leukoscope.data.splits import (
    SPLIT_FORMAT_VERSION,
    LeakageError,
    Split,
    check_split,
    check_training_part,
    class_groups,
    count_groups,
    few_images_note,
    leakage_groups,
    make_split,
    parts_not_asked_for,
    split_matching,
)


def where(split: Split) -> dict[Path, str]:
    """path -> split name; also asserts that no file is in two splits."""
    located: dict[Path, str] = {}
    for name, samples in split.assignments.items():
        for sample in samples:
            key = sample.path.resolve()
            assert key not in located, f"{key} in {located[key]} and {name}"
            located[key] = name
    return located


@pytest.fixture(scope="module")
def synthetic(synthetic_root: Path) -> Manifest:
    return read_class_folders(synthetic_root)


@pytest.fixture
def leaky(leaky_root: Path) -> Manifest:
    return read_class_folders(leaky_root)


# -- make_split --------------------------------------------------------------


def test_byte_identical_images_under_different_labels_are_named(tmp_path: Path, cell_writer, caplog) -> None:
    """Basophils copied into the eosinophil folder were grouped as duplicates, the label conflict never said."""
    root = tmp_path / "data"
    for index in range(6):
        cell_writer(root / "basophil" / f"BA_{index}.png", seed=index)
        cell_writer(root / "eosinophil" / f"EO_{index}.png", seed=100 + index)
    for index in range(4):
        (root / "eosinophil" / f"copy_BA_{index}.png").write_bytes((root / "basophil" / f"BA_{index}.png").read_bytes())
    (root / "basophil" / "again_BA_5.png").write_bytes((root / "basophil" / "BA_5.png").read_bytes())  # same label
    with caplog.at_level("WARNING"):
        make_split(read_class_folders(root), ratios=(0.5, 0.5), seed=0)
    said = caplog.text
    assert "4 set(s) of byte-identical images carry different labels" in said
    assert f"{root / 'basophil' / 'BA_0.png'} (basophil) = {root / 'eosinophil' / 'copy_BA_0.png'} (eosinophil)" in said
    assert "and 1 more; correct the labels, or remove the copies" in said and "BA_5" not in said


def test_few_images_and_the_groups_they_come_from_are_said(tmp_path: Path, caplog) -> None:
    """An export of 2 basophils, 2 monocytes, 4 eosinophils and 5 neutrophils from 3 cases said only that a part
    had no images of some classes: how many groups each had, and which classes are too small to learn, are said."""
    counts = {"basophil": 2, "eosinophil": 4, "monocyte": 2, "neutrophil": 5}
    samples = [Sample(tmp_path / f"{label}-{i}.png", label, f"case-{i % 3}") for label, n in counts.items()
               for i in range(n)]
    manifest = Manifest(samples, sorted(counts))
    with caplog.at_level("WARNING"):
        split = make_split(manifest, ratios=(0.8, 0.1, 0.1), seed=0,
                           groups=np.asarray([int(str(s.subject)[-1]) for s in samples]))
    assert "too few groups to stratify: " in caplog.text and "basophil's images are in 2 group(s)" in caplog.text
    assert count_groups(split) == 3
    assert class_groups(split) == {"basophil": 2, "eosinophil": 3, "monocyte": 2, "neutrophil": 3}
    train = split.manifest("train").class_counts()
    note = few_images_note(split)
    assert note.startswith("few images of basophil, eosinophil, monocyte, neutrophil: under 10 each to train on")
    assert f"basophil {train['basophil']}/2/2, eosinophil {train['eosinophil']}/4/3" in note
    # a hand-made split records no groups: its subjects are, and an image of none is one of its own
    loose = [Sample(tmp_path / f"n-{i}.png", "neutrophil") for i in range(2)]
    assert count_groups(Split({"train": samples + loose}, sorted(counts))) == 5
    enough = [Sample(tmp_path / f"{label}-{i}.png", label) for label in ("a", "b") for i in range(10)]
    assert few_images_note(Split({"train": enough}, ["a", "b"])) is None
    # counted as decoded: files that cannot be read are no images to learn from (it said 10 of "b")
    decoded = few_images_note(Split({"train": enough}, ["a", "b"]), {"train": {"a": 10, "b": 4}, "test": {"b": 1}})
    assert decoded is not None and decoded.startswith("few images of b:") and decoded.endswith("a 10/10/10, b 4/5/10")


def test_ratios_and_stratification(synthetic: Manifest) -> None:
    split = make_split(synthetic, ratios=(0.8, 0.1, 0.1), seed=0)
    assert list(split.assignments) == ["train", "val", "test"]
    assert sum(split.sizes().values()) == len(synthetic) == 96
    located = where(split)
    assert set(located) == {s.path.resolve() for s in synthetic}
    table = split.class_table()
    for cls in synthetic.classes:  # 24 per class -> ideally 19.2 / 2.4 / 2.4
        assert 17 <= table["train"][cls] <= 21, table
        assert 1 <= table["val"][cls] <= 4, table
        assert 1 <= table["test"][cls] <= 4, table
    sizes = split.sizes()
    assert 70 <= sizes["train"] <= 80 and 8 <= sizes["val"] <= 14 and 8 <= sizes["test"] <= 14
    assert split.classes == synthetic.classes
    assert split.info["ratios"] == [0.8, 0.1, 0.1] and split.info["seed"] == 0
    assert split.info["n_groups"] == 96 and split.info["n_samples_in_shared_groups"] == 0
    assert split.info["grouped_by_subject"] is False


@pytest.mark.parametrize("ratios", [(0.6, 0.2, 0.2), (0.5, 0.25, 0.25), (0.7, 0.3, 0.0)])
def test_other_ratios(synthetic: Manifest, ratios) -> None:
    split = make_split(synthetic, ratios=ratios, seed=3)
    for name, ratio in zip(("train", "val", "test"), ratios):
        for cls, count in split.class_table()[name].items():
            assert abs(count - 24 * ratio) <= 2, (name, cls, count)


def test_two_ratios_make_train_and_test(synthetic: Manifest) -> None:
    split = make_split(synthetic, ratios=(0.75, 0.25), seed=0)
    assert list(split.assignments) == ["train", "test"]
    assert split.sizes() == {"train": 72, "test": 24}
    assert all(n == 6 for n in split.class_table()["test"].values())
    with pytest.raises(DatasetError, match="val"):
        split.manifest("val")


@pytest.mark.parametrize(
    "ratios",
    [
        (0.5, 0.5, 0.5),
        (1.0,),
        (0.25, 0.25, 0.25, 0.25),
        (0.7, 0.4, -0.1),
        (0.8, 0.1),
        (math.nan, 0.5, 0.5),
        (math.inf, 0.0, 0.0),
        (),
    ],
)
def test_invalid_ratios_rejected(synthetic: Manifest, ratios) -> None:
    with pytest.raises(DatasetError, match="ratios"):
        make_split(synthetic, ratios=ratios, groups=np.arange(len(synthetic)))


@pytest.mark.parametrize("ratios", [(0.0, 0.5, 0.5), (0.0, 1.0)])
def test_ratios_that_give_training_nothing_are_refused_before_hashing(synthetic: Manifest, ratios) -> None:
    """`split --ratios 0,0.5,0.5` wrote a split that training then refused ("the training split is empty")."""
    with pytest.raises(DatasetError, match=r"the training split is empty: its ratios \[0\.0, .*\] give it none"):
        make_split(synthetic, ratios=ratios, progress=lambda *_: pytest.fail("hashed before refusing"))


def test_parts_the_ratios_ask_no_images_for() -> None:
    assert parts_not_asked_for([1.0, 0.0, 0.0]) == ["val", "test"]
    assert parts_not_asked_for([0.8, 0.0, 0.2]) == ["val"] and parts_not_asked_for([0.8, 0.2, 0.0]) == ["test"]
    assert parts_not_asked_for([0.75, 0.25]) == ["val"] and parts_not_asked_for([1.0, 0.0]) == ["val", "test"]
    assert parts_not_asked_for([0.8, 0.1, 0.1]) == [] and parts_not_asked_for(None) == []  # hand-made: unknown


def test_a_class_without_training_images_is_refused(synthetic: Manifest, tmp_path: Path) -> None:
    """A hand-edited split that moved a class's training images to test trained and scored without a word, and
    its bundle listed the class."""
    split = make_split(synthetic, seed=0, groups=np.arange(len(synthetic)))
    check_training_part(split, "s.json")  # as made: every class has training images
    moved = [s for s in split.assignments["train"] if s.label == "monocyte"]
    split.assignments["train"] = [s for s in split.assignments["train"] if s.label != "monocyte"]
    split.assignments["test"] += moved
    with pytest.raises(DatasetError, match=r"s\.json: class\(es\) 'monocyte' have no training images"):
        check_training_part(split, "s.json")
    split.assignments["train"] = []
    with pytest.raises(DatasetError, match=r"s\.json: the training split is empty"):
        check_training_part(split, "s.json")


def test_untrainable_manifest_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="at least two classes"):
        make_split(Manifest([Sample(tmp_path / "a.png", "x"), Sample(tmp_path / "b.png", "x")]))


def test_same_seed_same_split_different_seed_different_split(synthetic: Manifest) -> None:
    a = make_split(synthetic, seed=0)
    b = make_split(synthetic, seed=0)
    c = make_split(synthetic, seed=1)
    assert a.assignments == b.assignments
    assert a.info == b.info
    assert where(a) != where(c)
    for split in (a, c):  # each seed's parts within one image of their share (an image more in one of two
        n = sum(split.sizes().values())  # parts equally short is a tie)
        assert all(abs(size - ratio * n) <= 1 for size, ratio in zip(split.sizes().values(), (0.8, 0.1, 0.1)))


def test_big_subjects_go_where_they_fit_not_to_val_and_test() -> None:
    """Each part's deficit relative to its own target sent big groups to val and test: five subjects of 400,
    200, 200, 100 and 100 images came out 400/200/400 or 600/200/200 for 80/10/10 (cnmc-mini: 70/15/15)."""
    from collections import Counter

    from leukoscope.data.splits import _deal_groups

    groups = np.repeat(np.arange(5), [400, 200, 200, 100, 100])
    targets = np.zeros(len(groups), dtype=np.int64)
    shapes = Counter(tuple(np.bincount(_deal_groups(targets, groups, 1, (0.8, 0.1, 0.1), seed), minlength=3))
                     for seed in range(10))
    assert shapes == Counter({(800, 100, 100): 10})


def test_explicit_groups_are_kept_together(synthetic: Manifest) -> None:
    groups = np.arange(len(synthetic)) // 8  # blocks of 8 consecutive (same-class) images
    split = make_split(synthetic, ratios=(0.5, 0.25, 0.25), seed=2, groups=groups)
    located = where(split)
    for g in np.unique(groups):
        names = {located[synthetic[i].path.resolve()] for i in np.flatnonzero(groups == g)}
        assert len(names) == 1
    assert split.info["n_groups"] == 12 and split.info["n_samples_in_shared_groups"] == 96


def test_leakage_groups_join_subjects_and_duplicates(leaky: Manifest) -> None:
    index = {s.path.name: i for i, s in enumerate(leaky)}
    groups = leakage_groups(leaky)
    # subject 1's three images + the byte copy
    subject_1 = [index[f"UID_1_{k}_1_all.bmp"] for k in (1, 2, 3)] + [index["copy_of_1.bmp"]]
    assert len({int(groups[i]) for i in subject_1}) == 1
    # subject H2's three images + the resized re-encoded copy
    subject_h2 = [index[f"UID_H2_{k}_1_hem.bmp"] for k in (1, 2, 3)] + [index["resized_H2.png"]]
    assert len({int(groups[i]) for i in subject_h2}) == 1
    assert groups[index["loose_4.png"]] == groups[index["loose_5.png"]]
    assert groups[index["loose_0.png"]] != groups[index["loose_1.png"]]
    assert groups[index["UID_1_1_1_all.bmp"]] != groups[index["UID_2_1_1_all.bmp"]]
    # 12 subjects + loose_0..3 + the loose_4/5 pair
    assert len(np.unique(groups)) == 17

    exact_only = leakage_groups(leaky, near_duplicates=False)
    assert exact_only[index["resized_H2.png"]] != exact_only[index["UID_H2_1_1_hem.bmp"]]
    assert exact_only[index["copy_of_1.bmp"]] == exact_only[index["UID_1_1_1_all.bmp"]]
    assert len(np.unique(exact_only)) == 18


def test_copies_filed_under_two_subjects_are_named(leaky_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """C-NMC files one cell under two donors (H10 and h3): kept in one part, said nothing."""
    (leaky_root / "hem" / "UID_H9_1_1_hem.bmp").write_bytes((leaky_root / "hem" / "UID_H3_1_1_hem.bmp").read_bytes())
    with caplog.at_level("WARNING", logger="leukoscope.data.splits"):
        leakage_groups(read_dataset(leaky_root))
    assert ("1 set(s) of identical or near-identical images are filed under different subjects (kept in one part of "
            "the split, with every image of those subjects): UID_H3_1_1_hem.bmp (subject H3) = UID_H9_1_1_hem.bmp "
            "(subject H9)") in caplog.text


@pytest.mark.parametrize("seed", range(5))
def test_no_subject_or_duplicate_straddles_splits(leaky: Manifest, seed: int) -> None:
    split = make_split(leaky, ratios=(0.6, 0.2, 0.2), seed=seed)
    located = where(split)
    by_subject: dict[str, set[str]] = {}
    for sample in leaky:
        if sample.subject is not None:
            by_subject.setdefault(sample.subject, set()).add(located[sample.path.resolve()])
    assert len(by_subject) == 12
    assert all(len(names) == 1 for names in by_subject.values()), by_subject

    def split_of(name: str) -> str:
        return located[(leaky.root / ("hem" if "H" in name else "all") / name).resolve()]

    assert split_of("copy_of_1.bmp") == split_of("UID_1_1_1_all.bmp")
    assert split_of("resized_H2.png") == split_of("UID_H2_1_1_hem.bmp")
    assert split_of("loose_4.png") == split_of("loose_5.png")
    assert split.info["grouped_by_subject"] is True
    assert split.info["n_groups"] == 17
    # every split got some of each class despite the grouping
    assert all(all(n > 0 for n in counts.values()) for counts in split.class_table().values())
    check_split(split)


# -- check_split -------------------------------------------------------------


def test_check_split_subject_straddling(tmp_path: Path) -> None:
    split = Split(
        {
            "train": [Sample(tmp_path / "UID_5_1_1_all.bmp", "all", "5"), Sample(tmp_path / "b.bmp", "hem", "H1")],
            "val": [],
            "test": [Sample(tmp_path / "UID_5_2_1_all.bmp", "all", "5")],
        },
        ["all", "hem"],
    )
    with pytest.raises(LeakageError, match=r"subject 5 is in both 'train' and 'test'"):
        check_split(split)
    assert issubclass(LeakageError, DatasetError)


def test_check_split_same_file_in_two_splits(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    # spelled differently: relative '..' parts must not hide the leak
    other_spelling = tmp_path / "sub" / ".." / "x.png"
    split = Split({"train": [Sample(path, "a")], "val": [Sample(other_spelling, "a")], "test": []}, ["a"])
    with pytest.raises(LeakageError, match=r"file .*x\.png is in both 'train' and 'val'"):
        check_split(split)


def test_check_split_duplicate_group_straddling(tmp_path: Path) -> None:
    split = Split({"train": [Sample(tmp_path / "a.png", "a")], "test": [Sample(tmp_path / "b.png", "a")]}, ["a"])
    check_split(split)  # no groups known: fine
    with pytest.raises(LeakageError, match="duplicate group 7"):
        check_split(split, {"train": [7], "test": [7]})
    split.info["groups"] = {"train": [7], "test": [7]}
    with pytest.raises(LeakageError, match="duplicate group 7"):
        check_split(split)


def test_check_split_checks_every_sample_even_with_short_group_lists(tmp_path: Path) -> None:
    split = Split(
        {
            "train": [Sample(tmp_path / "a.png", "a", "S1"), Sample(tmp_path / "b.png", "a", "S2")],
            "test": [Sample(tmp_path / "c.png", "a", "S2")],
        },
        ["a"],
        {"groups": {"train": [0], "test": [1]}},  # one group id short for 'train'
    )
    with pytest.raises(LeakageError, match="subject S2"):
        check_split(split)


def test_check_split_reports_the_number_of_problems(tmp_path: Path) -> None:
    train = [Sample(tmp_path / f"{i}.png", "a", f"S{i}") for i in range(8)]
    test = [Sample(tmp_path / f"t{i}.png", "a", f"S{i}") for i in range(8)]
    with pytest.raises(LeakageError, match=r"\(8 problem\(s\)\)"):
        check_split(Split({"train": train, "test": test}, ["a"]))



def test_subject_ids_typed_two_ways_are_one_subject(tmp_path: Path, cell_writer) -> None:
    """"P04" in some rows and "p04" (or "4" / "04" / "4.0") in others: one patient landed in train and test, and
    the check said no group straddled two parts."""
    rows, patients = ["path,label,subject"], []
    for index in range(24):
        label, patient = ("lymphocyte", "neutrophil")[index % 2], index // 4
        cell_writer(tmp_path / f"c{index}.png", label, seed=index)
        spellings = ((f"P0{patient}", f" p0{patient}") if patient < 3
                     else (f"{patient}", f"0{patient}", f"{patient}.0"))
        rows.append(f"c{index}.png,{label},{spellings[index % len(spellings)]}")
        patients.append(patient)
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    manifest = read_dataset(tmp_path / "m.csv")
    for seed in range(3):
        split = make_split(manifest, ratios=(0.6, 0.2, 0.2), seed=seed, near_duplicates=False)
        parts: dict[int, set[str]] = {}
        for patient, sample in zip(patients, manifest):
            parts.setdefault(patient, set()).add(where(split)[sample.path.resolve()])
        assert split.info["n_groups"] == 6 and all(len(found) == 1 for found in parts.values()), parts


def test_check_split_finds_a_subject_typed_two_ways_in_two_parts(tmp_path: Path) -> None:
    train = [Sample(tmp_path / "a.png", "a", "P04"), Sample(tmp_path / "b.png", "a", "7")]
    test = [Sample(tmp_path / "c.png", "a", "p04 "), Sample(tmp_path / "d.png", "a", "07.0")]
    split = Split({"train": train, "test": test}, ["a"])
    with pytest.raises(LeakageError, match=r"\(2 problem\(s\)\): subject 7 \(= 07.0\) is in both 'train' and "
                                           r"'test'; subject P04 \(= p04 \) is in both"):
        check_split(split)

# -- persistence -------------------------------------------------------------


def test_save_load_round_trip(leaky: Manifest, tmp_path: Path) -> None:
    split = make_split(leaky, seed=4)
    path = split.save(tmp_path / "splits" / "leaky.json")
    assert path.is_file() and not path.with_suffix(".json.tmp").exists()
    loaded = Split.load(path)
    assert loaded.classes == split.classes
    assert list(loaded.assignments) == list(split.assignments)
    for name in split.assignments:
        original = split.assignments[name]
        again = loaded.assignments[name]
        assert [s.path for s in again] == [s.path.resolve() for s in original]
        assert [(s.label, s.subject) for s in again] == [(s.label, s.subject) for s in original]
    assert loaded.info == split.info  # ratios, seed, groups...
    assert loaded.info["groups"] == split.info["groups"]
    check_split(loaded)
    payload = json.loads(path.read_text())
    assert payload["format_version"] == SPLIT_FORMAT_VERSION
    assert all(Path(row["path"]).is_absolute() for rows in payload["splits"].values() for row in rows)


def test_load_detects_a_leak_hand_edited_into_the_file(leaky: Manifest, tmp_path: Path) -> None:
    path = make_split(leaky, seed=0).save(tmp_path / "s.json")
    payload = json.loads(path.read_text())
    payload["splits"]["test"].append(payload["splits"]["train"][0])
    path.write_text(json.dumps(payload))
    with pytest.raises(LeakageError):
        check_split(Split.load(path))


def test_load_missing_image(leaky: Manifest, tmp_path: Path) -> None:
    split = make_split(leaky, seed=0)
    path = split.save(tmp_path / "s.json")
    gone = split.assignments["test"][0].path
    gone.unlink()
    with pytest.raises(DatasetError, match="missing") as info:
        Split.load(path)
    assert gone.name in str(info.value)


def test_a_split_is_read_from_a_copy_of_its_data_elsewhere(leaky: Manifest, leaky_root: Path,
                                                            tmp_path: Path) -> None:
    """A split file shared with a colleague named the images where they were made: on another copy of the data
    every image was 'missing' (or 'no longer in it'), and deleting the file, as advised, made another split."""
    import shutil

    split = make_split(leaky, seed=0)
    path = split.save(tmp_path / "s.json")
    copy = Path(shutil.copytree(leaky_root, tmp_path / "colleague"))
    shutil.rmtree(leaky_root)  # the original is gone: only the copy is there
    with pytest.raises(DatasetError, match="missing"):
        Split.load(path)  # without the data's folder nothing can be moved
    there = Split.load(path, data_root=copy)
    assert {name: [s.path.relative_to(copy) for s in samples] for name, samples in there.assignments.items()} == \
        {name: [s.path.relative_to(leaky_root) for s in samples] for name, samples in split.assignments.items()}
    split_matching(there, read_class_folders(copy))  # the copy's images are exactly the split's
    (copy / split.assignments["test"][0].path.relative_to(leaky_root)).unlink()
    with pytest.raises(DatasetError, match="missing"):  # an image missing from the copy too: refused as before
        Split.load(path, data_root=copy)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        Split.load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        (json.dumps({"format_version": 99, "classes": [], "splits": {}}), "unsupported split format 99"),
        (json.dumps({"classes": [], "splits": {}}), "unsupported split format None"),
        (json.dumps([1, 2, 3]), "not a split file"),
        (json.dumps({"format_version": SPLIT_FORMAT_VERSION, "classes": ["a"]}), "malformed"),
        (json.dumps({"format_version": SPLIT_FORMAT_VERSION, "classes": ["a"], "splits": {"train": [{"label": "a"}]}}), "malformed"),
    ],
)
def test_load_rejects_bad_files_clearly(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        Split.load(path)
    assert "bad.json" in str(info.value)


# -- split_matching ----------------------------------------------------------


def test_split_matching(leaky: Manifest, cell_writer) -> None:
    split = make_split(leaky, seed=0)
    split_matching(split, leaky)  # unchanged: fine
    # fewer images: training reads the split's own list, so the images taken out would still train and test
    with pytest.raises(DatasetError, match=rf"{len(leaky) - 10} image\(s\) no longer in it; make a new split"):
        split_matching(split, leaky.subset(range(10)))

    new = cell_writer(leaky.root / "all" / "UID_77_1_1_all.bmp", "blast", seed=4242)
    grown = Manifest(leaky.samples + [Sample(new, "all", "77")], leaky.classes, leaky.root)
    with pytest.raises(DatasetError, match=r"no longer matches the dataset: 1 new image\(s\); make"):
        split_matching(split, grown)

    relabelled = [Sample(s.path, "hem" if i == 3 else s.label, s.subject) for i, s in enumerate(leaky)]
    with pytest.raises(DatasetError, match=r"no longer matches the dataset: 1 relabelled; make"):
        split_matching(split, Manifest(relabelled, leaky.classes, leaky.root))
    # subjects given since the split was made (a CSV's subject column): the old split may put a patient's
    # images on both sides
    resubjected = [Sample(s.path, s.label, "P1" if i < 4 else s.subject) for i, s in enumerate(leaky)]
    with pytest.raises(DatasetError, match=r"no longer matches the dataset: \d+ with another subject \(a subject"):
        split_matching(split, Manifest(resubjected, leaky.classes, leaky.root))


def test_a_split_training_saved_names_its_file_when_the_data_grew(leaky: Manifest, cell_writer, tmp_path) -> None:
    """A lab adding reviewed cells to its folder was told to "delete the split file", which training had made
    under a name it never saw."""
    from leukoscope.engine.config import DataConfig
    from leukoscope.engine.data_prep import obtain_split

    split_file = tmp_path / "splits" / "cells-0123456789.json"
    obtain_split(DataConfig(path=str(leaky.root)), leaky, split_file, show_progress=False)
    new = cell_writer(leaky.root / "all" / "UID_77_1_1_all.bmp", "blast", seed=4242)
    grown = Manifest(leaky.samples + [Sample(new, "all", "77")], leaky.classes, leaky.root)
    with pytest.raises(DatasetError, match=rf"1 new image\(s\); .*\(the split is {split_file}: delete it"):
        obtain_split(DataConfig(path=str(leaky.root)), grown, split_file, show_progress=False)


def test_a_split_file_with_a_class_left_out_of_training_is_refused_by_name(synthetic: Manifest,
                                                                           tmp_path: Path) -> None:
    """The review's s-rare-edit.json: its one monocyte moved from train to test; training took it without a word."""
    from leukoscope.engine.config import DataConfig
    from leukoscope.engine.data_prep import obtain_split

    split_file = tmp_path / "edited.json"
    make_split(synthetic, seed=0, groups=np.arange(len(synthetic))).save(split_file)
    payload = json.loads(split_file.read_text())
    moved = [row for row in payload["splits"]["train"] if row["label"] == "monocyte"]
    payload["splits"]["train"] = [row for row in payload["splits"]["train"] if row["label"] != "monocyte"]
    payload["splits"]["test"] += moved
    split_file.write_text(json.dumps(payload))
    with pytest.raises(DatasetError, match=rf"{split_file}: class\(es\) 'monocyte' have no training images"):
        obtain_split(DataConfig(path=str(synthetic.root)), synthetic, split_file, show_progress=False)


def test_a_csv_manifest_without_subjects_takes_them_from_cnmc_names(leaky: Manifest, tmp_path: Path) -> None:
    """The same C-NMC images as class folders or as a CSV without a subject column: the same subjects (the
    CSV gave none, and image-level splits put one patient on both sides)."""
    csv_path = tmp_path / "cells.csv"
    csv_path.write_text("path,label,subject\n" + "".join(
        f"{s.path},{s.label},{'GIVEN' if i == 0 else ''}\n" for i, s in enumerate(leaky)))
    read = read_dataset(csv_path)
    assert [s.subject for s in read][1:] == [s.subject for s in leaky][1:] and read[0].subject == "GIVEN"
    assert sum(1 for s in read if s.subject) > len(read) // 2  # most of the fixture's names are C-NMC's


# -- real data ---------------------------------------------------------------


@pytest.mark.shared
def test_cnmc_mini_split_keeps_subjects_together(cnmc_mini: Path, tmp_path: Path) -> None:
    manifest = read_class_folders(cnmc_mini)
    split = make_split(manifest, ratios=(0.6, 0.2, 0.2), seed=0)
    located = where(split)
    subjects: dict[str, set[str]] = {}
    for sample in manifest:
        subjects.setdefault(sample.subject, set()).add(located[sample.path.resolve()])
    assert len(subjects) == 26
    assert all(len(names) == 1 for names in subjects.values()), subjects
    assert sum(split.sizes().values()) == 54
    for name in ("train", "val", "test"):
        assert split.sizes()[name] > 0
    check_split(split)
    loaded = Split.load(split.save(tmp_path / "cnmc.json"))
    check_split(loaded)
    split_matching(loaded, manifest)
