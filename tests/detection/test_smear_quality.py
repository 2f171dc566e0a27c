"""The quality gates of smear analysis: exact blast names, an unverified or weak
detector, a field at the detection cap, and flags that never claim more than the count."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from leukoscope.inference.differential import LEUKEMIA_WORDING, CountRules, Differential
from leukoscope.inference.smear import SmearAnalyzer
from leukoscope.labels import BLAST_CLASS_NAMES, blast_classes_in
from tests.detection.smear_fakes import PBC_CLASSES, VERIFIED, FixedDetector, constant_classifier, grid_boxes

FIELD = Image.new("RGB", (640, 480), (230, 210, 220))
BLAST_OR_LYMPHOCYTE = ["blast", "lymphocyte"]


def weak(ap: float) -> dict:
    return {"evaluated_on": "test", "ap_50_per_class": {"WBC": ap}}


def no_leukemia_flag(d: Differential) -> bool:
    return not d.acute_leukemia_flag and not any(LEUKEMIA_WORDING in flag for flag in d.flags)


# ------------------------------------------------------------------ blast classes by exact name
def test_blast_classes_are_named_exactly_never_by_substring() -> None:
    assert blast_classes_in(PBC_CLASSES) == []
    assert blast_classes_in([*PBC_CLASSES, "Blast"]) == ["Blast"]
    not_blasts = ["erythroblast", "Erythroblast", "normoblast", "proerythroblast", "promyelocyte", "prolymphocyte",
                  "blast-like", "preB cell", "hem", "Benign"]
    assert blast_classes_in(not_blasts) == []
    named = ["Blast", "Blasts", "Blast cell", "blast cells", "blast_cell", "blast_cells", "LYMPHOBLAST",
             "Lymphoblasts", "myeloblast", "Myeloblasts", "monoblast", "monoblasts", "ALL", "Malignant", "Early", "Pre",
             "Pro", "Early Pre-B", "pre-B", "Pro-B"]
    assert blast_classes_in(named) == named
    assert {name.casefold() for name in named} == BLAST_CLASS_NAMES


def test_blast_classes_given_twice_or_not_white_cells_are_refused_or_counted_once() -> None:
    """--blast-class blast --blast-class blast counted the blasts twice (15 of 100 reported as 30%, with the
    leukemia wording); an erythroblast named a blast was counted outside the white cells it is a share of."""
    labels = ["blast"] * 15 + ["lymphocyte"] * 85
    twice = Differential.from_labels(labels, BLAST_OR_LYMPHOCYTE, ["blast", "blast"])
    assert (twice.blasts, twice.total, twice.blast_classes) == (15, 100, ["blast"]) and no_leukemia_flag(twice)
    assert Differential.from_labels(["blast"] * 60 + ["lymphocyte"] * 40, BLAST_OR_LYMPHOCYTE,
                                    ["blast", "blast"]).blast_percentage == 60.0  # 120 of 100 raised before
    with pytest.raises(ValueError, match=r"\['erythroblast'\] are not white cells"):
        Differential.from_labels(labels, [*PBC_CLASSES, "blast"], ["blast", "erythroblast"])
    detector = FixedDetector(grid_boxes(3), metrics=VERIFIED)
    classes = [*PBC_CLASSES, "blast"]
    analyzer = SmearAnalyzer(detector, constant_classifier(classes, "blast"), blast_classes=["blast", "blast"])
    assert analyzer.blast_classes == ["blast"]
    for wrong, message in ((["blast", "platelet"], "are not white cells"), (["Blast"], "not among the cell classes")):
        with pytest.raises(ValueError, match=message):
            SmearAnalyzer(detector, constant_classifier(classes, "blast"), blast_classes=wrong)


def test_a_classifier_without_a_blast_class_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="leukoscope.inference.smear"):
        SmearAnalyzer(FixedDetector(grid_boxes(3), metrics=VERIFIED), constant_classifier(PBC_CLASSES, "erythroblast"))
    assert "no blast percentage will be reported" in caplog.text and "--blast-class" in caplog.text


def test_a_count_without_a_blast_class_says_it_cannot_screen_for_leukemia() -> None:
    """A classifier fine-tuned on a lab's normal cells alone knows no blast: its fields' JSON said
    "acute_leukemia_flag": false with no word why, read downstream as a screen that found nothing."""
    normal = ["eosinophil", "lymphocyte", "neutrophil"]
    analyzer = SmearAnalyzer(FixedDetector(grid_boxes(120), metrics=VERIFIED),
                             constant_classifier(normal, "neutrophil"))
    d = analyzer.analyze(FIELD).differential
    assert d.total == 120 and d.blasts is None and d.acute_leukemia_flag is None  # not assessable, not "no"
    assert d.flags == ["No blast class among the cell classes (eosinophil, lymphocyte, neutrophil): blasts are not "
                       "counted and no leukemia flag can be raised; this count cannot screen for leukemia."]
    assert d.to_json()["acute_leukemia_flag"] is None
    # with a blast class, a count of no blasts is a "no" (the control)
    assert Differential.from_labels(["lymphocyte"] * 120, BLAST_OR_LYMPHOCYTE, ["blast"]).acute_leukemia_flag is False


def test_the_flag_is_false_only_for_a_count_that_could_have_raised_it() -> None:
    """"acute_leukemia_flag": false had also stood for a count withheld by a warning (40% blasts, the detector
    unverified), for 12 cells and for a file never read: a program reading the JSON saw a negative screen."""
    assert Differential.from_labels(["blast"] * 40 + ["lymphocyte"] * 60, BLAST_OR_LYMPHOCYTE, ["blast"])\
        .acute_leukemia_flag is True
    assert Differential.from_labels(["lymphocyte"] * 100, BLAST_OR_LYMPHOCYTE, ["blast"]).acute_leukemia_flag is False
    withheld = Differential.from_labels(["blast"] * 40 + ["lymphocyte"] * 60, BLAST_OR_LYMPHOCYTE, ["blast"],
                                        warnings=["The detector is unverified."])
    assert withheld.acute_leukemia_flag is None and "while the warning(s) above stand" in " ".join(withheld.flags)
    assert withheld.to_json()["acute_leukemia_flag"] is None
    quiet_but_warned = Differential.from_labels(["lymphocyte"] * 100, BLAST_OR_LYMPHOCYTE, ["blast"],
                                                warnings=["The detector is unverified."])
    assert quiet_but_warned.acute_leukemia_flag is None
    assert Differential.from_labels(["lymphocyte"] * 12, BLAST_OR_LYMPHOCYTE, ["blast"]).acute_leukemia_flag is None
    rules = CountRules(tuple(BLAST_OR_LYMPHOCYTE), ("blast",))
    assert rules.not_analysed("cannot be read").acute_leukemia_flag is None
    # a count that cannot say no: its 95% interval reaches 20% (15 of 100), or its uncertain cells would
    reaching = Differential.from_labels(["blast"] * 15 + ["lymphocyte"] * 85, BLAST_OR_LYMPHOCYTE, ["blast"])
    assert reaching.blast_ci95[1] >= 20 and reaching.acute_leukemia_flag is None
    unsure = Differential.from_labels(["blast"] * 10 + ["lymphocyte"] * 75 + ["uncertain"] * 15, BLAST_OR_LYMPHOCYTE,
                                      ["blast"])
    assert unsure.blast_ci95[1] < 20 and unsure.acute_leukemia_flag is None
    assert any("If the 15 uncertain cell(s) were blasts" in flag for flag in unsure.flags)
    none_of_few = Differential.from_labels(["lymphocyte"] * 12, BLAST_OR_LYMPHOCYTE, ["blast"], min_cells=10)
    assert none_of_few.acute_leukemia_flag is None  # 0 of 12: its interval reaches 24%, and says so
    assert any("No blast among 12 white cells counted, but the 95% interval" in flag for flag in none_of_few.flags)


def test_a_field_of_erythroblasts_is_not_reported_as_blasts() -> None:
    boxes = grid_boxes(120)
    pbc = SmearAnalyzer(FixedDetector(boxes, metrics=VERIFIED), constant_classifier(PBC_CLASSES, "erythroblast"))
    assert pbc.blast_classes == []
    d = pbc.analyze(FIELD).differential
    assert d.counts["erythroblast"] == 120 and d.blasts is None and d.total == 0  # nucleated red cells, not white
    assert not any("blast" in flag.lower().replace("erythroblast", "") for flag in d.flags) and no_leukemia_flag(d)
    assert d.flags == ["No white cell counted: the cells found were called 120 erythroblast, which are not white "
                       "cells."]

    with_blasts = [*PBC_CLASSES, "blast"]
    analyzer = SmearAnalyzer(FixedDetector(boxes, metrics=VERIFIED), constant_classifier(with_blasts, "erythroblast"))
    assert analyzer.blast_classes == ["blast"]
    d = analyzer.analyze(FIELD).differential
    assert d.blasts == 0 and d.blast_percentage is None and no_leukemia_flag(d)  # no white cell to take it of
    assert not any(flag.lower().startswith("blast") for flag in d.flags)


def test_platelets_and_nucleated_red_cells_do_not_dilute_the_blast_percentage() -> None:
    """A manual count reports nucleated red cells per 100 white cells, beside the differential, and a
    platelet is no white cell: neither is in the white cells a blast percentage is taken of."""
    from leukoscope.inference.differential import Differential
    from leukoscope.labels import not_white_classes_in

    classes = ["blast", "erythroblast", "lymphocyte", "platelet"]
    labels = ["blast"] * 30 + ["lymphocyte"] * 70 + ["platelet"] * 20 + ["erythroblast"] * 30
    d = Differential.from_labels(labels, classes, ["blast"])
    assert d.total == 100 and d.blast_percentage == 30.0 and d.acute_leukemia_flag
    assert d.per_100["erythroblast"] == 30.0 and d.counts["platelet"] == 20 and d.not_white == ["erythroblast",
                                                                                                 "platelet"]
    assert any("30 of 100 white cells counted" in flag for flag in d.flags)
    assert not_white_classes_in(["Platelet", "NRBC", "normoblast", "blast", "neutrophil"]) == ["Platelet", "NRBC",
                                                                                              "normoblast"]
    alone = Differential.from_labels(["platelet"], classes, ["blast"])  # a single-cell upload called platelet
    assert alone.total == 0 and alone.flags == ["No white cell counted: the cells found were called 1 platelet, "
                                                "which are not white cells."]


# ------------------------------------------------------------------ the detector's recorded test AP
def test_a_verified_detector_and_enough_blasts_raise_the_leukemia_flag() -> None:
    analyzer = SmearAnalyzer(FixedDetector(grid_boxes(120), metrics=VERIFIED),
                             constant_classifier(BLAST_OR_LYMPHOCYTE, "blast"))
    assert analyzer.warnings == []
    d = analyzer.analyze(FIELD).differential
    assert d.warnings == [] and d.acute_leukemia_flag
    assert any(LEUKEMIA_WORDING in flag and "120 of 120 white cells counted" in flag for flag in d.flags)


@pytest.mark.parametrize("metrics, reason", [
    ({}, "no recorded test AP@0.5"),
    ({"evaluated_on": "val", "ap_50_per_class": {"WBC": 0.99}}, "scored on its val split only"),
    ({"evaluated_on": "test", "ap_50_per_class": {"RBC": 0.99}}, "records no test AP@0.5 for WBC"),
    ({"evaluated_on": "test", "ap_50_per_class": {"WBC": float("nan")}}, "records no test AP@0.5 for WBC"),
    (weak(0.0), "test AP@0.5 for WBC is 0.000, below the floor of 0.9"),
    (weak(0.89), "test AP@0.5 for WBC is 0.890, below the floor of 0.9"),
])
def test_an_unverified_or_weak_detector_warns_and_never_flags_leukemia(metrics: dict, reason: str) -> None:
    analyzer = SmearAnalyzer(FixedDetector(grid_boxes(120), metrics=metrics),
                             constant_classifier(BLAST_OR_LYMPHOCYTE, "blast"))
    assert len(analyzer.warnings) == 1 and reason in analyzer.warnings[0]
    result = analyzer.analyze(FIELD)
    d = result.differential
    assert d.blast_percentage == 100.0 and d.blast_percentage_meaningful  # the count is there ...
    assert no_leukemia_flag(d)                                           # ... but no leukemia flag
    assert d.flags[0] == f"WARNING: {analyzer.warnings[0]}"
    assert any("no leukemia flag" in flag and "120 of 120 white cells counted" in flag for flag in d.flags)
    assert result.summary()["warnings"] == analyzer.warnings


def test_the_detector_ap_floor_is_configurable() -> None:
    detector = FixedDetector(grid_boxes(3), metrics=weak(0.85))
    assert SmearAnalyzer(detector).warnings and not SmearAnalyzer(detector, min_detector_ap=0.8).warnings
    assert SmearAnalyzer(FixedDetector(grid_boxes(3), metrics=weak(0.85)), min_detector_ap=0.95).warnings
    with pytest.raises(ValueError, match="min_detector_ap"):
        SmearAnalyzer(detector, min_detector_ap=1.5)


# ------------------------------------------------------------------ the per-image detection cap
def test_a_field_at_the_detection_cap_warns_and_never_flags_leukemia() -> None:
    blasts = constant_classifier(BLAST_OR_LYMPHOCYTE, "blast")
    boxes = grid_boxes(120)
    capped = SmearAnalyzer(FixedDetector(boxes, metrics=VERIFIED, cap=120), blasts).analyze(FIELD)
    assert capped.capped_tiles == 1 and len(capped.cells) == 120
    assert len(capped.warnings) == 1 and "per-image cap allows in this field" in capped.warnings[0]
    # tiled: 4 tiles of 800x650, each with a cap of ceil(50 * 800 * 650 / (640 * 480)) = 85 < 120 boxes
    tiled = SmearAnalyzer(FixedDetector(boxes, metrics=VERIFIED, cap=50), blasts, tile_size=800, overlap=300)
    assert "in 4 of 4 tiles" in tiled.analyze(Image.new("RGB", (1300, 1000), (230, 210, 220))).warnings[0]
    assert no_leukemia_flag(capped.differential) and capped.summary()["capped_tiles"] == 1

    below = SmearAnalyzer(FixedDetector(boxes, metrics=VERIFIED, cap=121), blasts).analyze(FIELD)
    assert below.capped_tiles == 0 and below.warnings == [] and below.differential.acute_leukemia_flag
    # the cap grows with the field (as CellDetector scales it): 60 per 640x480 is 240 on 1280x960
    large = SmearAnalyzer(FixedDetector(boxes, metrics=VERIFIED, cap=60), blasts).analyze(
        Image.new("RGB", (1280, 960), (230, 210, 220)))
    assert large.capped_tiles == 0 and large.warnings == []


def test_the_cap_of_a_real_detector_is_read_from_its_model(smear_root: Path, detector_bundle: Path) -> None:
    """The fixture's untrained Faster R-CNN keeps every box (score 0) up to its cap of 12."""
    analyzer = SmearAnalyzer(detector_bundle)
    assert analyzer.detection_cap == 12
    image = Image.open(sorted((smear_root / "JPEGImages").glob("*.png"))[0]).convert("RGB")
    found = analyzer.detect(image)
    assert found.capped_tiles == 1 and len(found.detections) == 12
    result = analyzer.analyze(image)
    assert result.capped_tiles == 1
    assert any("no recorded test AP@0.5" in w for w in result.warnings)
    assert any("per-image cap" in w for w in result.warnings)
    assert analyzer.detector.model.roi_heads.detections_per_img == 12


# ------------------------------------------------------------------ flags never claim more than the count
def test_below_100_cells_the_blast_percentage_is_not_called_meaningful() -> None:
    d = Differential.from_labels(["blast"] * 5 + ["lymphocyte"] * 5, BLAST_OR_LYMPHOCYTE, ["blast"])
    assert d.blast_percentage == 50.0 and not d.blast_percentage_meaningful and no_leukemia_flag(d)
    assert any("5 of 10 white cells counted" in flag for flag in d.flags)
    assert any("Only 10 white cells counted" in flag and "count at least 100 cells" in flag for flag in d.flags)
    assert not any("blast" in flag.lower() and "%" in flag for flag in d.flags)
    assert Differential.from_labels(["blast"] * 99 + ["lymphocyte"], BLAST_OR_LYMPHOCYTE, ["blast"]).flags[0] \
        .startswith("Blasts seen: 99 of 100") is False  # 100 cells: meaningful, and flagged as such
    d = Differential.from_labels(["blast"] * 99, BLAST_OR_LYMPHOCYTE, ["blast"], min_cells=100)
    assert no_leukemia_flag(d) and any("count at least 100 cells" in flag for flag in d.flags)


# ------------------------------------------------------------------ every output carries the warning
def test_folder_outputs_carry_the_warnings(tmp_path: Path) -> None:
    fields = []
    for name in ("a.png", "b.png"):
        FIELD.save(tmp_path / name)
        fields.append(tmp_path / name)
    analyzer = SmearAnalyzer(FixedDetector(grid_boxes(60), metrics=weak(0.5), cap=60),
                             constant_classifier(BLAST_OR_LYMPHOCYTE, "blast"))
    summary = analyzer.analyze_paths(fields, tmp_path / "out")
    pooled = summary.pooled
    assert pooled.total == 120 and pooled.blast_percentage == 100.0 and no_leukemia_flag(pooled)
    assert pooled.warnings[0] == analyzer.warnings[0]
    assert "2 of 2 fields (a.png, b.png)" in pooled.warnings[1]
    payload = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert payload["warnings"] == pooled.warnings and payload["pooled_differential"]["acute_leukemia_flag"] is None
    field_json = json.loads((tmp_path / "out" / "a.json").read_text())
    assert len(field_json["warnings"]) == 2 and field_json["capped_tiles"] == 1
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert rows[-1]["image"] == "TOTAL" and rows[-1]["flags"].startswith("WARNING: ")
    for path in (tmp_path / "out").iterdir():
        if path.suffix in (".json", ".csv"):
            assert LEUKEMIA_WORDING not in path.read_text()
    banner = np.asarray(Image.open(tmp_path / "out" / "a.annotated.png").convert("RGB"))[:40]
    assert (banner == (200, 0, 0)).all(axis=-1).sum() > 500  # the warning is drawn, white on red


def test_a_folder_run_writes_each_cell_by_class_for_a_lab_to_sort(tmp_path: Path) -> None:
    """`analyze --cells`: each cell as the classifier saw it, in its class's folder, named by field (synthetic
    models here; the shipped ones on real fields in tests/test_shipped_models.py)."""
    from leukoscope.inference.smear_output import check_cell_folders

    FIELD.save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"no image")
    analyzer = SmearAnalyzer(FixedDetector(grid_boxes(3), metrics=VERIFIED),
                             constant_classifier(BLAST_OR_LYMPHOCYTE, "lymphocyte"))
    analyzer.analyze_paths([tmp_path / "a.png", tmp_path / "broken.png"], tmp_path / "out",
                           cells_dir=tmp_path / "cells")
    written = sorted(p.relative_to(tmp_path / "cells").as_posix() for p in (tmp_path / "cells").rglob("*.png"))
    assert written == [f"lymphocyte/field-a-cell-{n}.png" for n in (1, 2, 3)]  # nothing of the unreadable file
    check_cell_folders(BLAST_OR_LYMPHOCYTE)
    with pytest.raises(ValueError, match="'B/T' cannot name a folder"):
        check_cell_folders(["B/T", "blast"])
    with pytest.raises(ValueError, match="'Blast' and 'blast' would share one folder"):
        check_cell_folders(["Blast", "blast"])


def test_cells_cut_from_fields_name_them_and_a_model_fine_tuned_on_them_says_it_learned_them(tmp_path: Path) -> None:
    """A lab fine-tuned on the cells of six fields (`analyze --cells`, or the service's export) and analysed the same
    fields again with the new classifier: right on every cell, and no note that it had learned from them (the bundle
    recorded the crops, not the fields). Each cut cell now carries its field's digest; training records it."""
    from leukoscope.data.fingerprints import file_digest, learned_among, source_digest_of
    from leukoscope.engine.config import load_config
    from leukoscope.tasks.classify import run_experiment

    fields = []
    for name, colour in (("a", (230, 210, 220)), ("b", (200, 190, 230))):
        fields.append(tmp_path / f"{name}.png")
        Image.new("RGB", (640, 480), colour).save(fields[-1])
    cells = tmp_path / "cells"
    for field, label in zip(fields, BLAST_OR_LYMPHOCYTE):  # one class per field
        SmearAnalyzer(FixedDetector(grid_boxes(4), metrics=VERIFIED), constant_classifier(BLAST_OR_LYMPHOCYTE, label)
                      ).analyze_paths([field], tmp_path / f"out-{field.stem}", cells_dir=cells)
    cut = sorted(cells.rglob("*.png"))
    assert len(cut) == 8 and {source_digest_of(p) for p in cut} == {file_digest(f) for f in fields}
    assert np.asarray(Image.open(cut[0])).shape[-1] == 3 and source_digest_of(fields[0]) is None
    config = load_config(overrides=[f"data.path={cells}", "model.name=naive_bayes", "model.image_size=32",
                                    f"output_root={tmp_path / 'runs'}", "data.near_duplicates=false",
                                    "data.ratios=[1.0, 0.0, 0.0]"])
    bundle = run_experiment(config, show_progress=False).bundle_dir
    found, checked = learned_among({"classifier": bundle}, fields)
    assert checked == 2 and found == {"classifier": {"train sources": 2}}


def test_analyze_keeps_in_its_summary_that_a_model_learned_from_these_fields(detector_bundle: Path,
                                                                            tmp_path: Path) -> None:
    """The console's note that a model learned from some of the fields analysed was not in summary.json: an
    archived run lost the caution (a lab review)."""
    import shutil

    from leukoscope.cli import app
    from leukoscope.data.fingerprints import write_training_digests

    fields = tmp_path / "fields"
    fields.mkdir()
    FIELD.save(fields / "a.png")  # learned
    Image.new("RGB", (640, 480), (200, 190, 230)).save(fields / "b.png")  # new
    detector = shutil.copytree(detector_bundle, tmp_path / "detector")
    write_training_digests(detector, {"train": [fields / "a.png"]})
    result = CliRunner().invoke(app, ["analyze", str(fields), "--detector", str(detector), "--no-classifier",
                                      "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "note: the detector learned from 1 of its train images among these 2 images" in " ".join(
        result.output.split())
    recorded = json.loads((tmp_path / "out" / "summary.json").read_text())["provenance"]
    assert recorded["learned_from_these_inputs"] == {"images_checked": 2, "detector": {"train": 1}}


def test_the_cli_prints_the_warning(smear_root: Path, detector_bundle: Path, classifier_bundle: Path,
                                    tmp_path: Path) -> None:
    from leukoscope.cli import app

    image = sorted((smear_root / "JPEGImages").glob("*.png"))[0]
    result = CliRunner().invoke(app, ["analyze", str(image), "--detector", str(detector_bundle), "--classifier",
                                      str(classifier_bundle), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "WARNING: The detector has no recorded test AP@0.5 for white cells" in output
    assert "per-image cap" in output and LEUKEMIA_WORDING not in output


def test_a_field_saved_twice_is_counted_once(smear_root: Path, detector_bundle: Path, classifier_bundle: Path,
                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same field under two names (b.png a copy of a.png) was analysed twice and pooled twice, without a
    word."""
    import shutil

    from leukoscope.cli import app

    fields = tmp_path / "fields"
    fields.mkdir()
    first, second = sorted((smear_root / "JPEGImages").glob("*.png"))[:2]
    (fields / "sub").mkdir()
    for name, source in (("a.png", first), ("b.png", first), ("c.png", second), ("sub/c.png", second)):
        shutil.copy(source, fields / name)
    (fields / "empty.png").write_bytes(b""), (fields / "empty2.png").write_bytes(b"")  # unreadable, not copies
    result = CliRunner().invoke(app, ["analyze", str(fields), "--detector", str(detector_bundle), "--classifier",
                                      str(classifier_bundle), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 3, result.output  # the empty files: each a failed row
    rows = csv.DictReader(open(tmp_path / "out" / "summary.csv"))
    assert [Path(row["image"]).name for row in rows] == ["a.png", "c.png", "empty.png", "empty2.png", "TOTAL"]
    assert (f"2 file(s) are byte-identical copies of others and are used once: b.png (= a.png), "
            f"{fields / 'sub' / 'c.png'} (= {fields / 'c.png'})") in caplog.text
    # and kept in the run's record: a pipeline reading summary.json saw fewer inputs than the folder held
    left_out = json.loads((tmp_path / "out" / "summary.json").read_text())["provenance"]["inputs_left_out"]
    moved = f"{fields / 'sub' / 'c.png'} (= {fields / 'c.png'})"
    assert left_out == {"byte_identical_copies": ["b.png (= a.png)", moved]}


def test_a_runs_summary_names_the_models_behind_it(smear_root: Path, detector_bundle: Path,
                                                  classifier_bundle: Path, tmp_path: Path) -> None:
    """summary.json named the architectures only ("mobilenet_v2"): not which bundle, which weights, which
    version of leukoscope made the count a lab may file."""
    from leukoscope import __version__
    from leukoscope.bundle import weights_digest
    from leukoscope.cli import app

    image = sorted((smear_root / "JPEGImages").glob("*.png"))[0]
    result = CliRunner().invoke(app, ["analyze", str(image), "--detector", str(detector_bundle), "--classifier",
                                      str(classifier_bundle), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    made_by = json.loads((tmp_path / "out" / "summary.json").read_text())["provenance"]
    assert made_by["leukoscope"] == __version__
    for role, bundle in (("detector", detector_bundle), ("classifier", classifier_bundle)):
        assert made_by[role]["bundle"] == str(bundle.resolve())
        assert made_by[role]["weights_sha256"] == weights_digest(bundle)
    assert "temperature" in made_by["classifier"]
    assert made_by["detector"]["backend"] == made_by["classifier"]["backend"] == "torch"  # what ran (auto: torch)
    assert CliRunner().invoke(app, ["--version"]).output.strip() == f"leukoscope {__version__}"


def test_cells_cut_by_a_run_are_not_analysed_as_fields(smear_root: Path, detector_bundle: Path,
                                                       classifier_bundle: Path, tmp_path: Path) -> None:
    """A `--cells` folder kept beside the fields: the next run over the folder leaves the cut cells out (each
    would have been counted again as a field); a cell named on the command line is still analysed."""
    import shutil

    from leukoscope.cli import app

    fields = tmp_path / "fields"
    fields.mkdir()
    shutil.copy(sorted((smear_root / "JPEGImages").glob("*.png"))[0], fields / "a.png")
    models = ["--detector", str(detector_bundle), "--classifier", str(classifier_bundle), "--quiet"]
    first = CliRunner().invoke(app, ["analyze", str(fields), "--out", str(tmp_path / "o1"), "--cells",
                                     str(fields / "cells"), *models])
    assert first.exit_code == 0, first.output
    cut = sorted((fields / "cells").rglob("*.png"))
    assert cut
    again = CliRunner().invoke(app, ["analyze", str(fields), "--out", str(tmp_path / "o2"), *models])
    assert again.exit_code == 0, again.output
    assert f"{len(cut)} image(s) named as cells" in " ".join(again.output.split())
    rows = csv.DictReader(open(tmp_path / "o2" / "summary.csv"))
    assert [Path(row["image"]).name for row in rows] == ["a.png", "TOTAL"]
    only_cells = CliRunner().invoke(app, ["analyze", str(fields / "cells"), "--out", str(tmp_path / "o3"), *models])
    assert only_cells.exit_code != 0 and "`leukoscope predict`" in " ".join(only_cells.output.split())
    named = CliRunner().invoke(app, ["analyze", str(cut[0]), "--out", str(tmp_path / "o4"), *models])
    assert named.exit_code == 0, named.output
    assert (tmp_path / "o4" / f"{cut[0].stem}.json").is_file()


def test_fields_analysed_at_a_guessed_scale_never_give_the_slide_a_leukemia_flag() -> None:
    """A field without a scale (no red cells, no run's) is analysed at the detector's training scale and
    warned; the slide pooled from such fields is warned too, and has no leukemia flag, however many
    blasts its fields hold."""
    from leukoscope.inference.smear_output import FolderSummary

    detector = FixedDetector(grid_boxes(40), metrics=VERIFIED)
    detector.info.um_per_px = 0.08  # trained at a scale: a field's scale matters
    analyzer = SmearAnalyzer(detector, constant_classifier(BLAST_OR_LYMPHOCYTE, "blast"))
    results = [analyzer.analyze(FIELD, f"{name}.png") for name in ("a", "b", "c")]
    assert all(r.scale["source"] == "unknown" and not r.differential.acute_leukemia_flag for r in results)
    summary = FolderSummary(results, analyzer.rules, ["WBC"])
    pooled = summary.pooled
    # the same count at a known scale would be flagged
    assert Differential.from_labels(["blast"] * 120, BLAST_OR_LYMPHOCYTE, ["blast"]).acute_leukemia_flag
    assert pooled.total == 120 and no_leukemia_flag(pooled) and not pooled.acute_leukemia_flag
    (warning,) = summary.warnings
    assert warning.startswith("3 of 3 fields (a.png, b.png, c.png) had no scale and were analysed")
    assert pooled.flags[0] == f"WARNING: {warning}"


def test_the_detector_gate_reads_its_weakest_white_class_and_the_floor_itself_passes() -> None:
    """A detector of several white-cell classes is as trustworthy as its weakest; AP at the floor passes."""
    from leukoscope.inference.quality import detector_warnings

    two = {"evaluated_on": "test", "ap_50_per_class": {"WBC": 0.97, "Blast": 0.52, "RBC": 0.1}}
    (warning,) = detector_warnings(two, ["WBC", "Blast"], floor=0.9)
    assert "for Blast is 0.520, below the floor of 0.9" in warning
    assert detector_warnings(two, ["WBC"], floor=0.9) == []  # the red cells' AP is not the white count's
    at_floor = {"evaluated_on": "test", "ap_50_per_class": {"WBC": 0.9}}
    assert detector_warnings(at_floor, ["WBC"], floor=0.9) == []


def test_a_perfect_test_ap_on_a_few_cells_does_not_verify_a_detector() -> None:
    """Ten fields split 80/10/10 left one test image: AP 1.0 on its cell opened the gate of the leukemia flag."""
    from leukoscope.inference.quality import MIN_TEST_CELLS, detector_warnings
    from leukoscope.tasks.detect import recorded_test_scores

    one = {"evaluated_on": "test", "n_images": 1, "ap_50_per_class": {"WBC": 1.0, "RBC": 0.9},
           "objects_per_class": {"WBC": 2, "RBC": 40}}
    (warning,) = detector_warnings(one, ["WBC"], floor=0.9)
    assert warning.startswith("The detector's recorded test AP@0.5 rests on 2 WBC test cell(s), fewer than 30")
    enough = {**one, "objects_per_class": {"WBC": MIN_TEST_CELLS, "RBC": 40}}
    assert detector_warnings(enough, ["WBC"], floor=0.9) == []
    older = {"evaluated_on": "test", "n_images": 6, "ap_50_per_class": {"WBC": 1.0}}  # no counts: its images
    assert "rests on 6 test image(s)" in detector_warnings(older, ["WBC"], floor=0.9)[0]
    # what training records: the true objects of each class beside its AP
    metrics = {"map": 0.5, "map_50": 0.9, "map_75": 0.4, "wbc_count_exact": 1.0, "n_images": 1,
               "per_class": {"WBC": {"ap_50": 1.0, "n_true": 2}, "RBC": {"ap_50": 0.9, "n_true": 40}}}
    assert recorded_test_scores(metrics)["objects_per_class"] == {"WBC": 2, "RBC": 40}
