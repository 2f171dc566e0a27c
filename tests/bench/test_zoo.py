"""bench/zoo.py, the retraining of the shipped models, on tiny generated data in ../shared's layout."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

from leukoscope.bundle import read_bundle_info
from tests.bench.conftest import REPO, TINY_DETECTOR, bench_module, run_script



def test_zoo_retrains_scores_and_installs_the_shipped_models(zoo_datasets: Path, tmp_path: Path) -> None:
    install = tmp_path / "pretrained"
    run = run_script("zoo.py", "--data", zoo_datasets, "--out", tmp_path / "zoo", "--install", "--install-dir", install,
                     "--detector-epochs", "1", "--classifier-epochs", "1", "--blasts-per-subtype", "4",
                     "--elsewhere-fields", "3", "--benign-cells-per-field", "2",
                     "--detector-set", *TINY_DETECTOR[:1], *TINY_DETECTOR[2:],
                     "--classifier-set", "model.name=abas_cnn", "model.image_size=32", "train.batch_size=8",
                     "train.threads=1")
    assert "| control (never in training) |" in run.stdout and "| taleqani-benign |" in run.stdout
    results = json.loads((tmp_path / "zoo" / "zoo-results.json").read_text())
    assert set(results["controls"]) == {"taleqani-benign", "cnmc-all", "cnmc-hem", "cnmc-all-on-background",
                                        "cnmc-hem-on-background", "bccd"}
    assert results["controls"]["cnmc-all"]["cells"] == 10
    assert results["detector_elsewhere"]["pbc"]["images"] == 3 and results["detector_elsewhere"]["all-taleqani"]["fields"] == 3
    assert results["controls"]["bccd"]["cells"] >= 1  # images with one known type and one white cell
    bccd = results["controls"]["bccd"]
    assert sum(bccd["cells_by_type"].values()) == bccd["cells"] and set(bccd["recall_by_type"]) == set(
        bccd["cells_by_type"])
    assert bccd["type_accuracy"] == pytest.approx(sum(
        bccd["recall_by_type"][t] * n for t, n in bccd["cells_by_type"].items()) / bccd["cells"], abs=1e-3)
    assert "bccd" in results["verdicts"] and ("holds" in results["verdicts"]["bccd"]
                                             or "FAILS" in results["verdicts"]["bccd"])
    # The in-domain row re-scores the test part the training run recorded, by source, and gives
    # the out-of-distribution flag its in-distribution side.
    own = results["in_domain"]
    assert own["accuracy"] == pytest.approx(results["classifier_metrics"]["accuracy"], abs=1e-4)
    assert set(own["accuracy_by_source"]) == {"pbc", "taleqani"}
    assert sum(own["cells_by_source"].values()) == own["cells"]
    for row in results["controls"].values():
        assert 0 <= row["unfamiliar"] <= 1 and 0 <= row["ood_auroc"] <= 1
        assert row["called_blast_unflagged"] <= row["called_blast"]
    classifier_card = (install / "wbc-classifier" / "MODEL_CARD.md").read_text()
    assert "| OOD AUROC |" in classifier_card and "By source: pbc " in classifier_card
    assert "data.stain" not in classifier_card  # the shipped recipe reads each crop's own colours
    swap = results["stain_swap"]  # the Benign control in the blasts' colours, on what ships
    assert swap["benign_control_in_blast_colours"]["cells"] == results["controls"]["taleqani-benign"]["cells"]
    assert swap["benign_control_in_blast_colours"]["called_blast"] == results["fp16_controls"]["taleqani-benign"][
        "called_blast"]
    assert 0 <= swap["test_blasts_in_benign_colours"]["called_blast_swapped"] <= 1
    assert "in the colours of the blasts' slides" in classifier_card and "bench/stain_swap.py" in classifier_card
    assert f"{swap['benign_control_in_blast_colours']['called_blast_own_colours']:.3f} recoloured alike" in \
        classifier_card
    # the source images of its crops are on record: evaluate refuses pbc's photographs it learned from
    from leukoscope.data.fingerprints import OF_CROP_SOURCES, digest_overlap, read_training_digests

    records = read_training_digests(install / "wbc-classifier")
    assert records is not None  # its crops, and their sources, by file and by decoded pixels
    assert set(records) == {"images", "images (pixels)", OF_CROP_SOURCES, f"{OF_CROP_SOURCES} (pixels)"}
    assert digest_overlap(records, sorted((zoo_datasets / "pbc").rglob("*.jpg")))["train sources"] > 0
    classifier = read_bundle_info(install / "wbc-classifier")
    assert "blast" in classifier.classes and "erythroblast" in classifier.classes
    assert classifier.preprocessing.cell_window_um == 24.0
    detector = read_bundle_info(install / "smear-detector")
    assert detector.task == "detect"
    # It records what its float16 weights score on CBC Testing (the gate and the card read it).
    from leukoscope.tasks.detect import evaluate_detector_bundle

    measured = evaluate_detector_bundle(install / "smear-detector", zoo_datasets / "cbc", tmp_path / "eval",
                                        split="Testing", show_progress=False)
    for key in ("map", "map_50", "n_images"):
        assert detector.metrics[key] == pytest.approx(measured[key], abs=1e-6)
    assert detector.metrics["best_epoch"] == 1  # the training run's own records kept
    detector_card = (install / "smear-detector" / "MODEL_CARD.md").read_text()
    assert f"mAP@0.5 {measured['map_50']:.3f}" in detector_card
    assert "on one thread of a 2-core CPU" in detector_card  # each model trains on one thread, side by side
    for name in ("wbc-classifier", "smear-detector"):
        card = (install / name / "MODEL_CARD.md").read_text()
        assert card.startswith(f"# {name}") and "Known failure modes" in card
        assert not list((install / name).glob("*.pt"))
    from safetensors.torch import load_file

    weights = load_file(install / "wbc-classifier" / "model.safetensors")
    assert {str(v.dtype) for v in weights.values() if v.is_floating_point()} == {"torch.float16"}
    assert "research use" in (install / "wbc-classifier" / "MODEL_CARD.md").read_text()
    assert "(up to 2 per field)" in (install / "wbc-classifier" / "MODEL_CARD.md").read_text()
    manifest = (tmp_path / "zoo" / "crops" / "train.csv").read_text().splitlines()
    benign_rows = [row for row in manifest if ",lymphocyte,taleqani-" in row]
    per_field = Counter(row.rsplit(",", 1)[1] for row in benign_rows)
    assert benign_rows and max(per_field.values()) <= 2


def test_zoo_without_the_datasets_says_so(tmp_path: Path) -> None:
    run = run_script("zoo.py", "--data", tmp_path, expect=2)
    assert "has no pbc folder" in run.stderr
    # every Benign field trained on would leave no control
    run = run_script("zoo.py", "--data", tmp_path, "--benign-train-share", "1", expect=2)
    assert "--benign-train-share must be in (0, 1)" in run.stderr


def test_the_two_hour_budget_is_shared_by_crops_training_and_scoring(zoo_datasets: Path, tmp_path: Path) -> None:
    zoo = bench_module("zoo")
    # Both models train at once, so each gets all the time the crops and the scoring reserve leave.
    assert zoo.training_minutes(2.0, 10 * 60, None) == pytest.approx(120 - 10 - zoo.SCORING_RESERVE_MINUTES)
    assert zoo.training_minutes(2.0, 10 * 60, 45.0) == 45.0  # --minutes wins
    with pytest.raises(ValueError, match=f"leaves {15 - 7.5 - zoo.SCORING_RESERVE_MINUTES:.1f} min for training"):
        zoo.training_minutes(0.25, 7.5 * 60, None)
    # A budget too small for training once the crops and the scoring reserve are counted stops
    # before any training, with the reason.
    run = run_script("zoo.py", "--data", zoo_datasets, "--out", tmp_path / "zoo", "--hours", "0.01",
                     "--blasts-per-subtype", "2", expect=2)
    assert "for training after" in run.stderr and "set --minutes" in run.stderr
    assert not list((tmp_path / "zoo").glob("wbc-classifier-*")) and not list((tmp_path / "zoo").glob("smear-*"))


def test_benign_fields_split_into_training_and_control_halves_keeping_duplicates_together(tmp_path: Path) -> None:
    zoo = bench_module("zoo")
    benign = tmp_path / "all-taleqani" / "Benign"
    benign.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for k in range(10):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(benign / f"WBC-Benign-{k:03d}.jpg")
    (benign / "WBC-Benign-100.jpg").write_bytes((benign / "WBC-Benign-003.jpg").read_bytes())  # a byte copy
    training, control = zoo.split_benign_fields(tmp_path)
    assert sorted(training + control) == sorted(benign.glob("*.jpg"))
    assert not set(training) & set(control) and training and control
    copy_side = training if benign / "WBC-Benign-003.jpg" in training else control
    assert benign / "WBC-Benign-100.jpg" in copy_side
    assert (training, control) == zoo.split_benign_fields(tmp_path)  # deterministic
    more_training, less_control = zoo.split_benign_fields(tmp_path, train_share=0.8)
    # A larger training share only moves fields out of the control: a smaller share's control holds it.
    assert set(training) < set(more_training) and set(less_control) < set(control)
    assert sorted(more_training + less_control) == sorted(benign.glob("*.jpg"))


def test_training_crops_skip_clumps_larger_than_one_cell() -> None:
    zoo = bench_module("zoo")
    # A pale field with one cell of 30 px and a clump of three touching cells (about 80 px wide).
    pixels = np.full((200, 200, 3), (235, 225, 225), np.uint8)
    pixels[disk((50, 50), 15, shape=pixels.shape[:2])] = (90, 40, 140)
    for centre in ((140, 120), (140, 145), (140, 170)):
        pixels[disk(centre, 14, shape=pixels.shape[:2])] = (90, 40, 140)
    image = Image.fromarray(pixels)
    for unlimited in ({"um_per_px": 0.4}, {"max_cell_um": zoo.CLUMP_UM}):  # no limit, or no scale: the largest object
        clump = zoo._largest_cell(image, **unlimited)
        assert clump[2] - clump[0] > 60
    # 0.4 um/px: the clump is ~32 um, the cell 12 um
    single = zoo._largest_cell(image, um_per_px=0.4, max_cell_um=zoo.CLUMP_UM)
    assert single is not None and single[2] - single[0] < 40 and abs((single[0] + single[2]) / 2 - 50) < 5
    assert zoo._largest_cell(image, um_per_px=2.0, max_cell_um=zoo.CLUMP_UM) is None  # both too large at 2 um/px


def test_zoo_scores_an_exported_detector_on_its_graph(zoo_datasets: Path, tmp_path: Path) -> None:
    """--detector-backend: the other labs' images go through the exported graph (e.g. an int8 export)."""
    pytest.importorskip("onnxruntime")
    from leukoscope.inference.export import export_onnx

    exported = export_onnx("pretrained:smear-detector", tmp_path / "exported")
    run_script("zoo.py", "--data", zoo_datasets, "--out", tmp_path / "zoo", "--detector", exported, "--classifier",
                     "pretrained:wbc-classifier", "--elsewhere-fields", "2", "--detector-backend", "onnxruntime")
    results = json.loads((tmp_path / "zoo" / "zoo-results.json").read_text())
    assert results["detector_backend"] == "onnxruntime" and results["detector_elsewhere"]["pbc"]["images"] == 2
    refused = run_script("zoo.py", "--data", zoo_datasets, "--out", tmp_path / "zoo2", "--detector-backend", "onnxruntime",
                         expect=2)
    assert "--detector-backend scores an exported --detector" in refused.stderr
    no_graph = run_script("zoo.py", "--data", zoo_datasets, "--out", tmp_path / "zoo3", "--detector-backend", "onnxruntime",
                          "--detector", REPO / "src" / "leukoscope" / "pretrained" / "smear-detector", expect=2)
    assert "has no exported detector graph" in no_graph.stderr and not (tmp_path / "zoo3").exists()


def test_a_control_of_the_in_domain_test_cells_themselves_is_not_told_apart(zoo_datasets: Path, tmp_path: Path) -> None:
    """The AUROC compares like with like: the test cells scored as a "control" give exactly 0.5,
    and the same share flagged as the in-domain row."""
    from leukoscope.data.splits import Split
    from leukoscope.engine.config import load_config
    from leukoscope.tasks.classify import run_experiment

    zoo = bench_module("zoo")
    run_script("zoo.py", "--data", zoo_datasets, "--out", tmp_path / "zoo", "--crops-only", "--blasts-per-subtype", "4",
               "--benign-cells-per-field", "2")
    crops = tmp_path / "zoo" / "crops" / "train.csv"
    config = load_config(overrides=[f"output_root={tmp_path}", f"data.path={crops}", "model.name=abas_cnn",
                                    "model.image_size=32", "train.epochs=1", "train.batch_size=8", "train.threads=1"])
    bundle = run_experiment(config, show_progress=False).bundle_dir
    own, scores = zoo.score_in_domain(bundle)
    test = Split.load(read_bundle_info(bundle).split_file).manifest("test")
    same = zoo.score_controls(bundle, {"test again": [(s.path, s.label) for s in test]}, scores)["test again"]
    assert same["ood_auroc"] == pytest.approx(0.5) and same["unfamiliar"] == own["unfamiliar"]
    assert zoo.score_in_domain(bundle, tmp_path / "gone.json") is None  # a split that is gone: no row
    # A bundle whose run folder is gone (the shipped one): the same split given by hand gives the same row.
    kept = read_bundle_info(bundle).split_file.rename(tmp_path / "kept-split.json")
    assert zoo.score_in_domain(bundle) is None
    again, _ = zoo.score_in_domain(bundle, kept)
    assert again == own
    counts = {c: n for c, n in test.class_counts().items() if n}  # a class the tiny test part lacks has no recall
    assert set(again["recall_by_class"]) == set(counts)
    assert sum(again["recall_by_class"][c] * n for c, n in counts.items()) / len(test) == pytest.approx(
        own["accuracy"], abs=1e-3)
    card = zoo.classifier_card({"controls": {}, "verdicts": {}, "window_um": 24.0, "cnmc_cell_um": 12.0,
                                "in_domain": again})  # no training run's per-class rows: the re-scoring's
    balanced = zoo.classifier_card({"controls": {}, "verdicts": {}, "window_um": 24.0, "cnmc_cell_um": 12.0,
                                    "in_domain": again, "classifier_stain": "white_balance"})
    assert "data.stain" not in card and "(`data.stain=white_balance`): a camera's white balance" in balanced
    first = next(iter(again["recall_by_class"]))
    assert f"{first} {again['recall_by_class'][first]:.2f}" in card


def test_recolouring_changes_only_the_training_part_of_the_split_training_would_make(zoo_datasets: Path,
                                                                                     tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    run_script("zoo.py", "--data", zoo_datasets, "--out", out, "--crops-only", "--blasts-per-subtype", "4",
               "--benign-cells-per-field", "2")
    zoo = bench_module("zoo")
    manifest, split_file = zoo.recoloured_training_set(out / "crops" / "train.csv", out, "other", 1.0,
                                                       ["data.split_seed=3"])
    (original,) = (out / "splits").glob("train-*.json")
    # it is the split training on the crops would find and reuse (train_classifier's config, the same settings)
    from leukoscope.engine.config import load_config
    from leukoscope.engine.data_prep import default_split_file, load_manifest

    data = load_config(REPO / "configs" / "zoo_classifier.yaml", [
        f"data.path={out / 'crops' / 'train.csv'}", "data.cell_window_um=24", f"output_root={out}",
        "train.epochs=1", "data.split_seed=3"]).data
    assert default_split_file(data, out, load_manifest(data)) == original
    assert json.loads(original.read_text())["info"]["seed"] == 3
    before, after = (json.loads(f.read_text())["splits"] for f in (original, split_file))
    assert after["val"] == before["val"] and after["test"] == before["test"]
    assert [row["subject"] for row in after["train"]] == [row["subject"] for row in before["train"]]
    moved = Counter(row["subject"].split("-")[0] for row in after["train"] if "/recoloured/" in row["path"])
    assert set(moved) == {"pbc", "taleqani"} and sum(moved.values()) == len(after["train"])
    assert len(manifest.read_text().splitlines()) == 1 + sum(len(part) for part in after.values())
    refused = run_script("zoo.py", "--data", zoo_datasets, "--out", out, "--recolour", "other",
                         "--classifier", out / "none", expect=2)
    assert "cannot be used with --classifier" in refused.stderr
    refused = run_script("zoo.py", "--data", zoo_datasets, "--out", out, "--recolour", "other",
                         "--classifier-set", "data.split_file=x.json", expect=2)
    assert "drop data.split_file" in refused.stderr
    # the control crops are reused only by a rerun that would cut the same ones (--cnmc-cell-um was ignored)
    listing = out / "crops" / "controls.json"
    assert json.loads(listing.read_text())["cnmc_cell_um"] == 12.0
    run_script("zoo.py", "--data", zoo_datasets, "--out", out, "--crops-only", "--blasts-per-subtype", "4",
               "--benign-cells-per-field", "2", "--cnmc-cell-um", "15")
    assert json.loads(listing.read_text())["cnmc_cell_um"] == 15.0
    line = zoo._recolour_line({"recolour": {"recipe": "taleqani", "share": 0.5}})  # the model card says so
    assert "50% of the training crops of pbc rebuilt in taleqani's colours" in line
    assert zoo._recolour_line({"recolour": None}) == ""
    drawn = zoo._recolour_line({"recolour": {"recipe": "randstain", "share": 0.5}})
    assert "of pbc and taleqani rebuilt in colours drawn around both labs' (RandStainNA) (Reinhard" in drawn


def test_a_crops_field_scale_is_overruled_as_smear_analysis_overrules_it(monkeypatch) -> None:
    """A weak estimate far from the source's (4 BCCD control cells were cut 4-7 times too coarse) gives way to
    the source's scale, as analyze's does; a strong one stands (another microscope's field)."""
    from leukoscope import scale

    zoo = bench_module("zoo")
    estimate = {"value": scale.FieldScale(0.5, "estimated", 3)}
    monkeypatch.setattr(scale, "estimate_scale", lambda image: estimate["value"])
    assert zoo._field_scale(None, 0.1) == 0.1  # 5 times off, on 3 red cells: a misreading
    estimate["value"] = scale.FieldScale(0.5, "estimated", 40)
    assert zoo._field_scale(None, 0.1) == 0.5
    estimate["value"] = scale.FieldScale(0.11, "estimated", 3)
    assert zoo._field_scale(None, 0.1) == 0.11  # near the source's: its own
    estimate["value"] = scale.FieldScale(None, "unknown")
    assert zoo._field_scale(None, 0.1) == 0.1
