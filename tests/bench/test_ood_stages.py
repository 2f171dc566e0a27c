"""bench/ood_stages.py, which parts of a MobileNetV2's embedding the OOD score reads, on tiny generated
data in ../shared's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.conftest import bench_module, run_script


def test_ood_stages_scores_each_choice_and_its_default_row_is_the_bundles_own_flag(zoo_datasets: Path,
                                                                                   tmp_path: Path) -> None:
    import torch

    from leukoscope.bundle import BundleInfo, save_bundle
    from leukoscope.data.readers import read_dataset
    from leukoscope.data.splits import make_split
    from leukoscope.models import create_model
    from leukoscope.models.embedding import DEFAULT_STAGES
    from leukoscope.preprocessing import Preprocessing
    from leukoscope.tasks.ood import calibrate_bundle

    zoo_out = tmp_path / "zoo"
    run_script("zoo.py", "--data", zoo_datasets, "--out", zoo_out, "--crops-only", "--blasts-per-subtype", "4",
               "--benign-cells-per-field", "2")
    crops = zoo_out / "crops" / "train.csv"
    manifest = read_dataset(crops, require_labels=True)
    split_file = make_split(manifest, ratios=(0.6, 0.2, 0.2), seed=0).save(tmp_path / "split.json")
    # An untrained network: a few epochs on these few crops leave a MobileNetV2 whose embedding barely
    # varies (covariances near singular, so float noise between two fits moves the scores); the
    # untrained one's features vary with the image, and the comparison below is exact.
    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "bundle", create_model("mobilenet_v2", num_classes=len(manifest.classes)),
                         BundleInfo("mobilenet_v2", list(manifest.classes), Preprocessing(32)))
    calibrate_bundle(bundle, crops, split_file=split_file, show_progress=False)  # the default stages
    controls_file = zoo_out / "crops" / "controls.json"
    run = run_script("ood_stages.py", bundle, "--controls", controls_file, "--split", split_file)
    rows = {row["choice"]: row for row in map(json.loads, run.stdout.splitlines())}
    stages = bench_module("ood_stages")
    assert list(rows) == list(stages.CHOICES)
    assert stages.CHOICES["all: 3, 6, 10, 13, 16, penultimate"][:-1] == DEFAULT_STAGES["mobilenet_v2"]
    # The default choice is what the bundle flags with: bench/zoo.py's scoring of the bundle gives the
    # same AUROC and flagged share on every control.
    zoo = bench_module("zoo")
    controls = {name: [(Path(p), label) for p, label in cells]
                for name, cells in json.loads(controls_file.read_text())["controls"].items()}
    own, in_domain_scores = zoo.score_in_domain(bundle, split_file)
    scored = zoo.score_controls(bundle, controls, in_domain_scores)
    default = rows["all: 3, 6, 10, 13, 16, penultimate"]
    assert default["test"] == pytest.approx(own["unfamiliar"], abs=1e-3)
    for name, row in scored.items():
        auroc, flagged = default[name]
        assert auroc == pytest.approx(row["ood_auroc"], abs=1e-3) and flagged == pytest.approx(row["unfamiliar"],
                                                                                             abs=0.006)
    for row in rows.values():
        assert all(0.0 <= row[name][0] <= 1.0 and 0.0 <= row[name][1] <= 1.0 for name in controls)


def test_ood_stages_fields_counts_the_warned_fields_of_each_source(zoo_datasets: Path, tmp_path: Path) -> None:
    from leukoscope.inference.quality import UNFAMILIAR_WORDING
    from leukoscope.inference.smear import SmearAnalyzer

    run = run_script("ood_stages.py", "pretrained:wbc-classifier", "--fields", "3", "--data", zoo_datasets)
    rows = {row["source"]: row for row in map(json.loads, run.stdout.splitlines())}
    assert list(rows) == ["pbc", "taleqani-benign", "taleqani-malignant", "cbc-testing"]
    sources = bench_module("ood_stages").field_sources(zoo_datasets)
    analyzer = SmearAnalyzer("pretrained:smear-detector", "pretrained:wbc-classifier")
    for name, row in rows.items():
        assert row["fields"] == min(3, len(sources[name])) > 0 and 0 <= row["warned"] <= row["fields"]
    # the pbc row is analyze's own verdicts on the same seeded fields (the first source sampled)
    import random

    chosen = random.Random(0).sample(sources["pbc"], rows["pbc"]["fields"])
    results = [analyzer.analyze(path) for path in chosen]
    assert rows["pbc"]["cells"] == sum(len(r.cells) for r in results)
    assert rows["pbc"]["warned"] == sum(any(UNFAMILIAR_WORDING.lower() in w.lower() for w in r.warnings)
                                        for r in results)
