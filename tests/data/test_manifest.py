"""Sample and Manifest: labels, targets, trainability, class re-indexing, CSV."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from leukoscope.data.manifest import DatasetError, Manifest, Sample


def make(labels, classes=None, subjects=None) -> Manifest:
    subjects = subjects or [None] * len(labels)
    samples = [Sample(f"img_{i}.png", label, subject) for i, (label, subject) in enumerate(zip(labels, subjects))]
    return Manifest(samples, list(classes) if classes else [])


def test_sample_path_is_coerced_to_path() -> None:
    sample = Sample("a/b.png", "blast")
    assert isinstance(sample.path, Path)
    assert sample.path == Path("a/b.png")
    assert sample.subject is None
    with pytest.raises(AttributeError):
        sample.label = "other"  # frozen


def test_classes_default_to_sorted_labels() -> None:
    manifest = make(["b", "a", None, "c", "a"])
    assert manifest.classes == ["a", "b", "c"]
    assert manifest.class_counts() == {"a": 2, "b": 1, "c": 1}
    assert len(manifest) == 5
    assert manifest[1].label == "a"
    assert [s.label for s in manifest] == manifest.labels


def test_targets_follow_the_class_order() -> None:
    manifest = make(["b", "a", "c", "a"], classes=["c", "b", "a"])
    assert manifest.targets == [1, 2, 0, 2]


def test_targets_raise_on_missing_labels() -> None:
    manifest = make(["a", None, "b", None])
    with pytest.raises(DatasetError, match=r"2 sample\(s\) have no label, e\.g\. img_1\.png"):
        manifest.targets


def test_targets_raise_on_unknown_labels() -> None:
    manifest = make(["a", "b", "zz", "yy"], classes=["a", "b"])
    with pytest.raises(DatasetError, match=r"\['yy', 'zz'\] are not among the classes \['a', 'b'\]"):
        manifest.targets


def test_require_trainable_empty() -> None:
    with pytest.raises(DatasetError, match="empty"):
        Manifest([]).require_trainable()


def test_require_trainable_single_class() -> None:
    with pytest.raises(DatasetError, match=r"at least two classes.*\['a'\]"):
        make(["a", "a", "a"]).require_trainable()


def test_require_trainable_declared_but_empty_second_class() -> None:
    with pytest.raises(DatasetError, match="at least two classes"):
        make(["a", "a"], classes=["a", "b"]).require_trainable()


def test_require_trainable_only_unlabelled() -> None:
    # says what is wrong (no labels), not "found only none"
    with pytest.raises(DatasetError, match="none of the 2 images has a label"):
        make([None, None]).require_trainable()


def test_require_trainable_rejects_unlabelled_samples_among_labelled() -> None:
    with pytest.raises(DatasetError, match="no label"):
        make(["a", "b", None]).require_trainable()


def test_require_trainable_ok() -> None:
    make(["a", "b", "a"]).require_trainable()


def test_with_classes_reorders_indices() -> None:
    manifest = make(["a", "b", "a"])
    other = manifest.with_classes(["b", "a", "extra"])
    assert other.targets == [1, 0, 1]
    assert other.classes == ["b", "a", "extra"]
    assert manifest.targets == [0, 1, 0]  # the original is unchanged


def test_with_classes_unknown_label_names_it() -> None:
    manifest = make(["a", "b", "mystery", None])
    with pytest.raises(DatasetError, match=r"\['mystery'\]") as info:
        manifest.with_classes(["a", "b"])
    assert "model classes: ['a', 'b']" in str(info.value)


def test_with_classes_names_the_class_a_misspelt_label_resembles() -> None:
    """A label a letter or two off a model class was refused without naming the class it resembles."""
    manifest = make(["lymphocyt", "Blast ", "neutrophl", "promonocyte", "eosinophil"])
    with pytest.raises(DatasetError) as info:
        manifest.with_classes(["blast", "lymphocyte", "monocyte", "neutrophil"])
    said = str(info.value)
    assert "'lymphocyt' looks like a misspelling of the model's class 'lymphocyte'" in said
    assert "'Blast ' looks like a misspelling of the model's class 'blast'" in said
    assert "'neutrophl' looks like a misspelling of the model's class 'neutrophil'" in said
    # names of their own, not slips: refused as unknown, with no class suggested
    assert "'promonocyte' looks like" not in said and "'eosinophil' looks like" not in said
    assert "['Blast ', 'eosinophil', 'lymphocyt', 'neutrophl', 'promonocyte']" in said


def test_with_classes_takes_a_label_in_another_unicode_form_as_the_models_class() -> None:
    """A model trained on a Mac's folders (decomposed accents) refused the same name typed elsewhere (composed),
    its hint naming two names that print alike."""
    composed, decomposed = (unicodedata.normalize(form, "éosinophile") for form in ("NFC", "NFD"))
    manifest = make([composed, "neutrophil"]).with_classes([decomposed, "neutrophil"])
    assert manifest.labels == [decomposed, "neutrophil"] and manifest.targets == [0, 1]
    assert make([decomposed]).with_classes([composed]).labels == [composed]


def test_subset_and_filter_keep_classes_and_root(tmp_path: Path) -> None:
    manifest = Manifest([Sample("x.png", "a"), Sample("y.png", "b"), Sample("z.png", "a")], ["a", "b"], tmp_path)
    sub = manifest.subset([2, 0])
    assert [s.path.name for s in sub] == ["z.png", "x.png"]
    assert sub.classes == ["a", "b"] and sub.root == tmp_path
    only_a = manifest.filter([True, False, True])
    assert only_a.labels == ["a", "a"]
    assert only_a.classes == ["a", "b"]  # a class with no images left is kept
    assert only_a.class_counts() == {"a": 2, "b": 0}


def test_has_subjects() -> None:
    assert not make(["a", "b"]).has_subjects
    assert make(["a", "b"], subjects=[None, "P1"]).has_subjects


def test_save_csv_creates_folders_and_writes_empty_cells(tmp_path: Path) -> None:
    manifest = Manifest([Sample(tmp_path / "x.png", None, None), Sample(tmp_path / "sub" / "y.png", "a", "S1")])
    path = manifest.save_csv(tmp_path / "out" / "deep" / "m.csv")
    assert path.is_file()
    lines = path.read_text().splitlines()
    assert lines[0] == "path,label,subject"
    # both images lie outside out/deep: absolute paths
    assert lines[1] == f"{(tmp_path / 'x.png').resolve()},,"
    assert lines[2] == f"{(tmp_path / 'sub' / 'y.png').resolve()},a,S1"
