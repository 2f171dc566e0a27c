"""Smoke test of bench/finetune_gap.py: a tiny bundle (pbc.py's, abas_cnn at 32 px, 1 epoch) fine-tuned
on generated cells of "another lab" with 2 and 4 shots a class, two seeds, one class too small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leukoscope.bundle import read_bundle_info
from leukoscope.data.splits import Split
from leukoscope.data.synthetic import SyntheticSpec, make_synthetic_dataset
from tests.bench.conftest import ScriptRun, run_script

pytestmark = pytest.mark.slow


def _lab(root: Path, monocytes: int = 5) -> Path:
    """9 generated crops of each synthetic type (another seed than the bundle's cells), fewer monocytes."""
    make_synthetic_dataset(root, SyntheticSpec(image_size=32, images_per_class=9, seed=5))
    for path in sorted((root / "monocyte").iterdir())[monocytes:]:
        path.unlink()
    return root


def _table(run: ScriptRun) -> dict[str, list[str]]:
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.lines if line.startswith("| ")]
    assert rows[0] == ["shots per class", "accuracy", "macro-F1", "balanced accuracy", "fine-tune min"]
    return {row[0]: row[1:] for row in rows[1:]}


def _median(cell: str) -> float:
    return float(cell.split()[0])


def test_finetune_gap(pbc_run: ScriptRun, tmp_path: Path) -> None:
    bundle = pbc_run.last_path
    run = run_script("finetune_gap.py", "--bundle", bundle, "--crops", _lab(tmp_path / "lab"), "--shots", "4,0,2",
                     "--seeds", "0,1", "--epochs", "1", "--batch-size", "4", "--out", tmp_path / "out")
    assert run.line_starting("left out ") == "left out (fewer than 7 images: 4 shots + 3 test): monocyte (5)"
    # 5 test images of each of 3 classes: accuracy 1/3, macro-F1 (2/3 * 1/3 + 0 + 0) / 3, balanced accuracy 1/3
    assert run.line_starting("always the most frequent class ").endswith(
        "test set): accuracy 0.333, macro f1 0.167, balanced accuracy 0.333")
    assert ("head replaced: the bundle's backbone is loaded, and its class layer keeps the bundle's rows of the "
            "shared classes only") in run.line_starting("bundle: ")
    table = _table(run)
    restricted, anywhere = "0 (bundle as it is, arg-max over the 3 classes)", "0 (bundle as it is, its top class of 4)"
    assert list(table) == [restricted, anywhere, "2", "4"]
    for name, (*scores, minutes) in table.items():
        assert all(0 <= _median(score) <= 1 for score in scores)
        assert (minutes == "-") == name.startswith("0 ")
    assert _median(table[restricted][0]) >= _median(table[anywhere][0])  # restricting can only turn errors right

    results = json.loads(run.last_path.read_text())
    assert run.last_path == tmp_path / "out" / "finetune_gap.json"
    classes = ["blast", "lymphocyte", "neutrophil"]
    assert results["classes"] == classes and results["left_out"] == {"monocyte": 5}
    assert results["bundle"]["classes"] == read_bundle_info(bundle).classes
    assert [s["seed"] for s in results["seeds"]] == [0, 1]
    for seed in results["seeds"]:
        assert seed["test_counts"] == {c: 5 for c in classes}  # 9 images - a pool of 4
        pooled = {p for pool in seed["pools"].values() for p in pool}
        assert all(len(seed["pools"][c]) == 4 for c in classes) and not pooled & set(seed["test"])
        runs = {(r["shots"], r["mode"]): r for r in results["runs"] if r["seed"] == seed["seed"]}
        assert set(runs) == {(0, "restricted"), (0, "any"), (2, "finetuned"), (4, "finetuned")}
        assert runs[(0, "restricted")]["accuracy"] >= runs[(0, "any")]["accuracy"]
        trained = {}
        for shots in (2, 4):
            row = runs[(shots, "finetuned")]
            assert row["evaluated_on"] == "test" and row["n_test"] == 15 and row["epochs_run"] == 1
            split = Split.load(Path(row["run_dir"]) / "split.json")
            assert sorted(str(s.path) for s in split.assignments["test"]) == sorted(seed["test"])  # one test set
            trained[shots] = {str(s.path) for s in split.assignments["train"]}
            assert trained[shots] == {p for pool in seed["pools"].values() for p in pool[:shots]}
            info = read_bundle_info(row["bundle"])
            assert info.classes == classes and info.provenance["config"]["model"]["init"] == str(bundle.resolve())
            scored = json.loads(Path(row["metrics"]).read_text())
            assert (scored["accuracy"], scored["macro"]["recall"]) == (row["accuracy"], row["balanced_accuracy"])
        assert trained[2] < trained[4]
    summary = {(r["shots"], r["mode"]): r for r in results["summary"]}
    assert summary[(4, "finetuned")]["seeds"] == [0, 1] and summary[(0, "restricted")]["train_minutes"] is None
    assert summary[(2, "finetuned")]["accuracy"]["min"] == min(
        r["accuracy"] for r in results["runs"] if r["shots"] == 2)


def test_finetune_gap_needs_two_classes_big_enough(pbc_run: ScriptRun, tmp_path: Path) -> None:
    run = run_script("finetune_gap.py", "--bundle", pbc_run.last_path, "--crops", _lab(tmp_path / "lab"),
                     "--shots", "0,8", "--out", tmp_path / "out", expect=1)
    assert "0 class(es)" in run.stderr and "lower --shots" in run.stderr


def test_finetune_gap_needs_the_crops(tmp_path: Path) -> None:
    run = run_script("finetune_gap.py", "--crops", tmp_path / "absent", expect=1)
    assert "not found" in run.stderr and "bench/zoo.py" in run.stderr
