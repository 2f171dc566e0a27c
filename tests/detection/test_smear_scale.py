"""Smear analysis at one physical scale: fields resampled to the detector's training
scale, cells cropped by the classifier's physical window, the scale recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from leukoscope.bundle import BundleInfo
from leukoscope.inference.detector import DetectionResult
from leukoscope.inference.smear import SmearAnalyzer
from leukoscope.preprocessing import Preprocessing
from tests.detection.smear_fakes import VERIFIED, FixedDetector, constant_classifier
from tests.test_scale import smear_field


class ScaledDetector(FixedDetector):
    """Trained at ``um_per_px``; finds one cell at a fixed place of what it is shown, and
    remembers the size of what it was shown."""

    def __init__(self, um_per_px: float | None) -> None:
        super().__init__([[100, 100, 140, 140]], metrics=VERIFIED)
        self.info = BundleInfo("rule", ["WBC"], task="detect", metrics=dict(VERIFIED), um_per_px=um_per_px)
        self.seen: list[tuple[int, int]] = []

    def detect(self, images, *, threshold=None, batch_size=4):
        self.seen += [tuple(image.shape[:2][::-1]) for image in images]  # (H, W, 3) tiles
        return [DetectionResult(self.boxes, self.scores, np.zeros(len(self.boxes), int), self.classes)]


class SizeRecorder:
    """Wraps a classifier and keeps the size of each crop it is given."""

    def __init__(self, classifier, window_um: float | None) -> None:
        self.inner = classifier
        self.classes, self.info = classifier.classes, classifier.info
        self.info.preprocessing = Preprocessing(16, [0.5] * 3, [0.25] * 3, cell_window_um=window_um)
        self.sizes: list[tuple[int, int]] = []

    def predict_images(self, images):
        self.sizes += [image.size for image in images]
        return self.inner.predict_images(images)


def test_a_field_at_another_magnification_is_resampled_to_the_detector_scale() -> None:
    detector = ScaledDetector(um_per_px=0.1)
    image = Image.new("RGB", (640, 480), (230, 220, 220))
    result = SmearAnalyzer(detector, um_per_px=0.2).analyze(image)  # half the magnification
    assert detector.seen == [(1280, 960)]
    assert result.cells[0].box == pytest.approx((50, 50, 70, 70))  # back in the field's pixels
    assert result.scale["source"] == "given" and result.scale["detector_resample"] == 2.0
    detector.seen.clear()
    SmearAnalyzer(detector, um_per_px=0.105).analyze(image)  # within 15%: left alone
    assert detector.seen == [(640, 480)]


def test_boxes_come_back_by_each_sides_own_ratio() -> None:
    """643 x 481 at half size is 322 x 240 (rounded): a box over all of it is the whole field."""
    detector = ScaledDetector(um_per_px=0.2)
    detector.boxes = np.array([[0.0, 0.0, 322.0, 240.0]])
    result = SmearAnalyzer(detector, um_per_px=0.1).analyze(Image.new("RGB", (643, 481), (230, 220, 220)))
    assert detector.seen == [(322, 240)]
    assert result.cells[0].box == pytest.approx((0, 0, 643, 481))


def test_the_scale_is_estimated_from_red_cells_and_written_in_the_result() -> None:
    detector = ScaledDetector(um_per_px=7.5 / 40)
    field = smear_field(20.0)  # red cells 20 px: twice the detector's pixel size -> upsample x2
    result = SmearAnalyzer(detector).analyze(field)
    assert result.scale["source"] == "estimated" and result.scale["um_per_px"] == pytest.approx(0.375, rel=0.08)
    (width, height), = detector.seen
    assert width == pytest.approx(1280, rel=0.08) and height == pytest.approx(960, rel=0.08)
    assert result.summary()["scale"]["red_cells"] >= 5


def test_a_field_without_a_scale_is_assumed_at_the_detectors_and_says_so() -> None:
    detector = ScaledDetector(um_per_px=0.08)
    result = SmearAnalyzer(detector).analyze(Image.new("RGB", (640, 480), (230, 220, 220)))
    assert detector.seen == [(640, 480)]
    assert result.scale["source"] == "unknown" and result.scale["analysed_at_um_per_px"] == 0.08
    assert "assumed 0.0800 um/px" in result.scale["note"]
    # ...and its flags too, not only the scale record: its count is not one to act on without a look
    (warning,) = result.differential.warnings
    assert "no scale for this field" in warning and "0.0800 um/px, the detector's training scale" in warning
    assert result.differential.flags[0] == f"WARNING: {warning}"


def test_a_field_without_a_scale_takes_the_runs_when_there_is_one() -> None:
    detector = ScaledDetector(um_per_px=0.08)
    classifier = SizeRecorder(constant_classifier(["blast", "lymphocyte"], "lymphocyte"), window_um=24.0)
    analyzer = SmearAnalyzer(detector, classifier, run_um_per_px=0.1)
    result = analyzer.analyze(Image.new("RGB", (640, 480), (230, 220, 220)))
    assert result.scale["source"] == "run" and result.scale["analysed_at_um_per_px"] == 0.1
    assert not result.differential.warnings  # the run's scale is a measurement, not a guess
    assert "no isolated red cells found: analysed at the run's scale" in result.scale["note"]
    assert detector.seen == [(800, 600)] and classifier.sizes == [(240, 240)]  # resampled and cropped at 0.1
    # a field with its own estimate keeps it when it is near the run's (within FIELD_RUN_MAX_RATIO)...
    own = SmearAnalyzer(detector, run_um_per_px=0.3).analyze(smear_field(20.0))
    assert own.scale["source"] == "estimated" and own.scale["um_per_px"] == pytest.approx(0.375, rel=0.08)
    # ...and, resting on WEAK_ESTIMATE_RED_CELLS (5) or fewer, is taken for a misreading when it is far off
    # (0.375 against the run's 0.1): the run's scale
    far = analyzer.analyze(smear_field(20.0, n_red=4))
    assert far.scale["source"] == "run" and far.scale["analysed_at_um_per_px"] == 0.1
    assert "0.3" in far.scale["note"] and "from 4 red cells, is more than 1.5 times off the run's" in far.scale["note"]
    # (five, since violet objects are left out: a BCCD field of platelets was read 6 times too coarse on 5)
    assert analyzer.analyze(smear_field(20.0, n_red=5)).scale["source"] == "run"
    # an estimate on more red cells stands (another microscope's field in a mixed run)
    strong = analyzer.analyze(smear_field(20.0, n_red=6))
    assert strong.scale["source"] == "estimated" and strong.scale["red_cells"] == 6
    # a scale the user stated is never overruled
    stated = SmearAnalyzer(detector, um_per_px=0.375, run_um_per_px=0.1).analyze(smear_field(20.0))
    assert stated.scale["source"] == "given" and stated.scale["um_per_px"] == 0.375
    with pytest.raises(ValueError, match="run_um_per_px must be between 0.005 and 5"):
        SmearAnalyzer(detector, run_um_per_px=0.0)


def test_an_estimate_on_a_few_red_cells_that_nothing_checked_is_warned() -> None:
    """A field enlarged twice had its platelets measured as red cells (5 of them: 0.39 um/px for 0.04) and a
    granule was counted as a blast, with no doubt raised: alone, a field's weak estimate is said to be one."""
    detector = ScaledDetector(um_per_px=0.08)
    weak = SmearAnalyzer(detector).analyze(smear_field(20.0, n_red=4))
    assert weak.scale["source"] == "estimated" and weak.scale["red_cells"] == 4
    (warning,) = weak.differential.warnings
    assert warning.startswith("scale estimated from only 4 red cells (0.3") and "--um-per-px" in warning
    assert weak.differential.flags[0] == f"WARNING: {warning}"
    # a folder names the fields it was said of, in one line
    from leukoscope.inference.smear_output import FieldWarnings, folded_field_warnings

    folded = folded_field_warnings([FieldWarnings("a.png", [warning], weak.scale), FieldWarnings("b.png", [], None)])
    assert folded == ["1 of 2 fields (a.png) had a scale estimated from a few red cells, which nothing checked: white "
                      "cells may be missed or mistyped; state the microscope's scale (--um-per-px)."]
    # on more red cells, or checked by the run's scale, or stated: no such warning
    assert not SmearAnalyzer(detector).analyze(smear_field(20.0, n_red=6)).differential.warnings
    assert not SmearAnalyzer(detector, run_um_per_px=0.36).analyze(smear_field(20.0, n_red=4)).differential.warnings
    assert not SmearAnalyzer(detector, um_per_px=0.375).analyze(smear_field(20.0, n_red=4)).differential.warnings


def test_upsampling_stops_at_the_pixel_limit() -> None:
    detector = ScaledDetector(um_per_px=0.01)
    SmearAnalyzer(detector, um_per_px=0.5, max_pixels=640 * 480 * 4).analyze(Image.new("RGB", (640, 480)))
    assert detector.seen == [(1280, 960)]


@pytest.mark.parametrize("field_um_per_px, expected", [(0.1, 240), (0.5, 48)])
def test_cells_are_cropped_by_the_classifiers_physical_window(field_um_per_px: float, expected: int) -> None:
    classifier = SizeRecorder(constant_classifier(["blast", "lymphocyte"], "lymphocyte"), window_um=24.0)
    analyzer = SmearAnalyzer(ScaledDetector(um_per_px=None), classifier, um_per_px=field_um_per_px)
    analyzer.analyze(Image.new("RGB", (640, 480), (230, 220, 220)))
    assert classifier.sizes == [(expected, expected)]


def test_a_classifier_without_a_window_gets_the_box_and_its_margin() -> None:
    classifier = SizeRecorder(constant_classifier(["blast", "lymphocyte"], "lymphocyte"), window_um=None)
    SmearAnalyzer(ScaledDetector(um_per_px=None), classifier, um_per_px=0.1).analyze(
        Image.new("RGB", (640, 480), (230, 220, 220)))
    assert classifier.sizes == [(48, 48)]  # the 40 px box plus 10% on each side


def test_the_service_stores_the_crop_the_classifier_saw_at_the_fields_scale() -> None:
    """The service's stored crops (and their Grad-CAM, and the review export) come from the
    analyzer's physical window at the field's scale, not from the box plus a margin."""
    from leukoscope.service.analysis import Analyzer, _MethodAdapter

    classifier = SizeRecorder(constant_classifier(["blast", "lymphocyte"], "lymphocyte"), window_um=24.0)
    analyzer = SmearAnalyzer(ScaledDetector(um_per_px=None), classifier, um_per_px=0.1)
    service = Analyzer(classifier.inner, smear=_MethodAdapter(analyzer, "analyze"), gradcam=False, threads=1)
    try:
        image = Image.new("RGB", (640, 480), (230, 220, 220))
        (cell,) = service.analyse_smear(image).cells
        assert classifier.sizes == [(240, 240)] and cell.crop.size == (240, 240)
        assert cell.box == [100, 100, 140, 140]
        (expected,) = analyzer.cell_crops(image, analyzer.analyze(image))
        assert np.array_equal(np.asarray(cell.crop), np.asarray(expected))
    finally:
        service.close()


def test_analyze_says_how_fields_without_a_scale_were_analysed(detector_bundle, tmp_path) -> None:
    """A detector that records no training scale: the fields are analysed as they are, and the
    command does not claim a training scale it does not have."""
    from typer.testing import CliRunner

    from leukoscope.cli import app

    Image.new("RGB", (160, 120), (230, 220, 220)).save(tmp_path / "blank.png")  # no red cells: no scale
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "blank.png"), "--detector", str(detector_bundle),
                                      "--no-classifier", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "1 of 1 field(s) had no scale estimate (too few isolated red cells" in output
    assert "analysed as they are (the detector records no training scale)" in output
    assert "training scale (pass" not in output


def test_a_folder_lends_its_scale_to_fields_without_one(detector_bundle, tmp_path) -> None:
    """Fields of one run share a microscope: those with too few red cells of their own are analysed at
    the median estimate of the others, and say so; without enough estimates nothing is lent."""
    import json

    from typer.testing import CliRunner

    from leukoscope.cli import app

    folder = tmp_path / "fields"
    folder.mkdir()
    for seed in range(5):
        smear_field(20.0, size=(320, 240), seed=seed, n_red=10).save(folder / f"field{seed}.png")
    Image.new("RGB", (320, 240), (230, 220, 220)).save(folder / "blank.png")
    result = CliRunner().invoke(app, ["analyze", str(folder), "--detector", str(detector_bundle), "--no-classifier",
                                      "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    estimates = [json.loads((tmp_path / "out" / f"field{seed}.json").read_text())["scale"] for seed in range(5)]
    assert all(e["source"] == "estimated" for e in estimates)
    lent = json.loads((tmp_path / "out" / "blank.json").read_text())["scale"]
    assert lent["source"] == "run"
    assert lent["um_per_px"] == pytest.approx(float(np.median([e["um_per_px"] for e in estimates])))
    assert "is analysed at" in output and "the run's scale (median of 5 of 6 fields" in output
    assert "1 of 6 field(s) had no scale estimate of their own (too few isolated red cells, or one far off the " \
        "run's) and were analysed at the run's" in output
    # the folder's summary records the scale it lent, and which fields took which scale
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["scale"]
    assert summary == {"stated_um_per_px": None, "run_um_per_px": lent["um_per_px"],
                       "fields_by_source": {"estimated": 5, "run": 1}}
    # fewer fields than a run's scale needs estimates from: none lent
    alone = CliRunner().invoke(app, ["analyze", str(folder / "blank.png"), str(folder / "field0.png"),
                                     "--detector", str(detector_bundle), "--no-classifier", "--out",
                                     str(tmp_path / "two"), "--quiet"])
    assert alone.exit_code == 0, alone.output
    assert json.loads((tmp_path / "two" / "blank.json").read_text())["scale"]["source"] == "unknown"
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())["scale"]
    assert summary == {"stated_um_per_px": None, "run_um_per_px": None,
                       "fields_by_source": {"estimated": 1, "unknown": 1}}


def test_the_python_api_lends_a_folders_scale_as_the_cli_does(tmp_path) -> None:
    paths = []
    for seed in range(5):
        smear_field(20.0, size=(320, 240), seed=seed, n_red=10).save(tmp_path / f"field{seed}.png")
        paths.append(tmp_path / f"field{seed}.png")
    Image.new("RGB", (320, 240), (230, 220, 220)).save(tmp_path / "blank.png")
    paths.append(tmp_path / "blank.png")
    analyzer = SmearAnalyzer(ScaledDetector(um_per_px=0.08))
    blank = analyzer.analyze_paths(paths, tmp_path / "out").results[-1].scale
    assert blank["source"] == "run" and blank["um_per_px"] == pytest.approx(0.375, rel=0.08)
    assert analyzer.run_um_per_px is None  # lent to this run only, not kept by the analyzer
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["scale"]["run_um_per_px"] == blank["um_per_px"]
    off = analyzer.analyze_paths(paths, tmp_path / "off", estimate_run_scale=False).results[-1].scale
    assert off["source"] == "unknown"
    stated = SmearAnalyzer(ScaledDetector(um_per_px=0.08), um_per_px=0.2).analyze_paths(paths, tmp_path / "s")
    assert {r.scale["source"] for r in stated.results} == {"given"}


def test_a_resumed_archive_keeps_the_run_scale_it_started_with(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fields added to a folder since would change the sample: the archive's recorded scale is kept,
    none when it started without one, and a value no run could have recorded is not trusted."""
    import json

    from leukoscope import scale
    from leukoscope.cli._run_notes import announced_run_scale

    monkeypatch.setattr(scale, "run_scale", lambda paths: pytest.fail("the run scale was computed again"))
    paths = [tmp_path / f"field{k}.png" for k in range(8)]
    archive = tmp_path / "archive.json"
    for recorded, expected in (({"run_um_per_px": 0.1}, 0.1), ({}, None), ({"run_um_per_px": "x"}, None),
                               ({"run_um_per_px": 50.0}, None)):
        archive.write_text(json.dumps({"options": recorded}))
        assert announced_run_scale(paths, tmp_path, "ray") == expected
    archive.write_text("{not json")
    assert announced_run_scale(paths, tmp_path, "ray") is None


def test_a_field_without_a_scale_whose_detector_records_none_warns_that_its_cells_were_not_framed() -> None:
    """Nothing warned: the classifier, which expects a 24 um window, got box crops, and a leukemia flag could
    still be raised."""
    detector = ScaledDetector(um_per_px=None)
    classifier = SizeRecorder(constant_classifier(["blast", "lymphocyte"], "blast"), window_um=24.0)
    result = SmearAnalyzer(detector, classifier).analyze(Image.new("RGB", (640, 480), (230, 220, 220)))
    (warning,) = result.differential.warnings
    assert warning.startswith("Cells cut by their boxes") and "expects 24 um around each cell" in warning
    assert classifier.sizes == [(48, 48)]  # the 40 px box and its margin, as the warning says
    # with a scale there is nothing to say
    scaled = SmearAnalyzer(detector, SizeRecorder(constant_classifier(["blast", "lymphocyte"], "blast"), 24.0),
                           um_per_px=0.1).analyze(Image.new("RGB", (640, 480), (230, 220, 220)))
    assert not scaled.differential.warnings


def test_a_stated_scale_the_red_cells_contradict_is_used_and_doubted() -> None:
    """A wrong --um-per-px (CBC fields stated at 0.3 um/px: red cells 29 um across) lost the white cell and
    counted a platelet in its place, without a word."""
    detector = ScaledDetector(um_per_px=0.1)
    wrong = SmearAnalyzer(detector, um_per_px=0.1).analyze(smear_field(20.0))  # the red cells say 0.375
    assert wrong.scale["source"] == "given" and wrong.scale["analysed_at_um_per_px"] == 0.1  # still used
    (doubt,) = [w for w in wrong.differential.warnings if "check --um-per-px" in w]
    assert doubt.startswith("the stated scale, 0.1 um/px, is 3.") and "times finer than this field's 14" in doubt
    right = SmearAnalyzer(detector, um_per_px=0.4).analyze(smear_field(20.0))
    assert not any("check --um-per-px" in w for w in right.differential.warnings)
    # a weak estimate (5 red cells or fewer) does not doubt what the user stated
    weak = SmearAnalyzer(detector, um_per_px=0.1).analyze(smear_field(20.0, n_red=5))
    assert not any("check --um-per-px" in w for w in weak.differential.warnings)


def test_a_folder_at_a_stated_scale_its_red_cells_contradict_raises_no_leukemia_flag(tmp_path) -> None:
    """A folder of 60 fields stated at 0.8 um/px (truly about 0.49): 52 fields warned, yet the folder's summary
    had no warning and called acute leukemia. Fields with too few red cells of their own to doubt the scale
    (most CBC fields) are doubted by the run's red cells together, and so is each field's own count."""
    blasts = constant_classifier(["blast", "lymphocyte"], "blast")
    detector = ScaledDetector(um_per_px=0.1)
    detector.boxes = np.array([[x, y, x + 20, y + 20] for x in range(0, 600, 25) for y in range(0, 125, 25)], float)
    detector.scores = np.full(len(detector.boxes), 0.9)  # 120 cells a field (every box kept): each could flag alone

    def analyzer(um_per_px: float) -> SmearAnalyzer:
        return SmearAnalyzer(detector, blasts, min_nuclear_share=0.0, um_per_px=um_per_px)
    rich, poor = tmp_path / "rich", tmp_path / "poor"
    for folder, n_red in ((rich, 14), (poor, 5)):
        folder.mkdir()
        for seed in range(5):
            smear_field(20.0, seed=seed, n_red=n_red).save(folder / f"field{seed}.png")  # red cells: 0.375 um/px
    for folder in (rich, poor):
        summary = analyzer(0.1).analyze_paths(sorted(folder.iterdir()), tmp_path / f"{folder.name}-out")
        pooled = summary.pooled
        assert pooled.total >= 100 and pooled.blast_percentage == 100.0  # the count is there, the flag is not
        assert not pooled.acute_leukemia_flag
        # the run's red cells together doubt it, in either folder, and it is said once, not field by field
        (doubt,) = [w for w in pooled.warnings if w.startswith("the stated scale, 0.1 um/px, is 3.")]
        assert "than the run's red cells measure (0.3" in doubt and ", median of 5 of 5 fields" in doubt
        assert not any("another scale on" in w for w in pooled.warnings)
        for result in summary.results:  # no field flags leukemia on a count the run's scale puts in doubt
            assert doubt in result.warnings and not result.differential.acute_leukemia_flag
            assert result.differential.total >= 100
        recorded = json.loads((tmp_path / f"{folder.name}-out" / "summary.json").read_text())
        assert recorded["scale"]["stated_um_per_px"] == 0.1 and not recorded["pooled_differential"][
            "acute_leukemia_flag"]
        field = json.loads((tmp_path / f"{folder.name}-out" / "field0.json").read_text())
        assert doubt in field["warnings"] and not field["differential"]["acute_leukemia_flag"]
    # two fields, too few for the run's check: the fields' own doubts (more than 5 red cells each) are the summary's
    few = analyzer(0.1).analyze_paths(sorted(rich.iterdir())[:2], tmp_path / "few")
    assert any(w.startswith("2 of 2 fields (field0.png, field1.png) measure another scale on their red "
                            "cells") for w in few.pooled.warnings)
    assert not few.pooled.acute_leukemia_flag
    # three fields of too few red cells each to doubt it alone, among others with none: the run's three doubt it
    # (a run's scale is lent on 5; six CBC fields stated 10 times too coarse, 3 with an estimate, went unwarned)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for seed in range(6):
        smear_field(20.0, seed=seed, n_red=5 if seed % 2 else 0).save(mixed / f"field{seed}.png")
    three = analyzer(0.1).analyze_paths(sorted(mixed.iterdir()), tmp_path / "three")
    (doubt,) = [w for w in three.pooled.warnings if w.startswith("the stated scale, 0.1 um/px, is 3.")]
    assert ", median of 3 of 6 fields" in doubt and not three.pooled.acute_leukemia_flag
    # control: the right scale stated, the same fields flag leukemia
    right = analyzer(0.375).analyze_paths(sorted(rich.iterdir()), tmp_path / "ok")
    assert right.pooled.warnings == [] and right.pooled.acute_leukemia_flag
    assert all(r.differential.acute_leukemia_flag for r in right.results)


def test_analyze_says_when_the_runs_red_cells_contradict_the_stated_scale(detector_bundle, tmp_path) -> None:
    from typer.testing import CliRunner

    from leukoscope.cli import app

    folder = tmp_path / "fields"
    folder.mkdir()
    for seed in range(5):
        smear_field(20.0, size=(320, 240), seed=seed, n_red=5).save(folder / f"field{seed}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    result = CliRunner().invoke(app, ["analyze", str(folder), "--detector", str(detector_bundle), "--no-classifier",
                                      "--um-per-px", "0.1", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 3, result.output  # broken.png: a partial run
    said = " ".join(result.output.split())
    assert "scale: the stated scale, 0.1 um/px, is 3." in said and "times finer than the run's red cells" in said
    recorded = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any(w.startswith("the stated scale, 0.1 um/px") for w in recorded["warnings"])
    assert recorded["scale"] == {"stated_um_per_px": 0.1, "run_um_per_px": None, "fields_by_source": {"given": 5}}


def test_a_grey_field_with_no_white_cell_says_it_has_no_colour() -> None:
    """A grayscale smear silently reported 0 white cells (the detectors read the stain's colour)."""
    detector = ScaledDetector(um_per_px=0.1)
    detector.boxes = np.zeros((0, 4))
    detector.scores = np.zeros(0)

    def nothing(images, *, threshold=None, batch_size=4):
        return [DetectionResult(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), detector.classes) for _ in images]

    detector.detect = nothing
    grey = SmearAnalyzer(detector, um_per_px=0.1).analyze(Image.new("RGB", (640, 480), (200, 200, 200)))
    assert any("no colour" in warning for warning in grey.differential.warnings)
    colour = SmearAnalyzer(detector, um_per_px=0.1).analyze(Image.new("RGB", (640, 480), (230, 200, 220)))
    assert not any("no colour" in warning for warning in colour.differential.warnings)
    # a folder run says so too: the console printed only "No white cell found" and summary.json had nothing
    from leukoscope.inference.smear_output import FolderSummary

    analyzer = SmearAnalyzer(detector, um_per_px=0.1)
    grey.source, colour.source = "/x/grey.png", "/x/colour.png"
    summary = FolderSummary([grey, colour], analyzer.rules, list(detector.classes))
    said = [w for w in summary.warnings if "no colour" in w]
    assert said == ["1 of 2 fields (grey.png) had no colour (grey levels only) and no white cell found: its cells "
                    "are missing from the count; analyse the colour images."]
    assert said[0] in summary.pooled.warnings


def test_a_folder_of_unframed_fields_raises_no_leukemia_flag_and_a_review_answers_it() -> None:
    """Each field withheld its flag, but the folder's pooled differential called "BLASTS >= 20%": its warnings
    knew only the unscaled fields analysed at the detector's scale."""
    from leukoscope.inference.quality import about_classification_only
    from leukoscope.inference.smear_output import FolderSummary

    detector = ScaledDetector(um_per_px=None)
    classifier = SizeRecorder(constant_classifier(["blast", "lymphocyte"], "blast"), window_um=24.0)
    analyzer = SmearAnalyzer(detector, classifier)
    results = [analyzer.analyze(Image.new("RGB", (640, 480), (230, 220, 220)), f"f{i}.png") for i in range(3)]
    summary = FolderSummary(results, analyzer.rules, list(detector.classes))
    (warning,) = summary.warnings
    assert warning.startswith("Cells cut by their boxes") and "3 of 3 fields" in warning
    assert not any("consistent with acute leukemia" in flag for flag in summary.pooled.flags)
    assert about_classification_only(warning) and about_classification_only(results[0].warnings[0])


def test_a_tiffs_resolution_tags_are_the_fields_recorded_scale(tmp_path) -> None:
    """A one-level TIFF's XResolution/YResolution (as microscope cameras write them) were ignored for fields, though
    slides use them: a field with too few red cells was analysed at another scale, or at none."""
    from leukoscope.inference.folder import analyze_folder

    pytest.importorskip("tiffslide")
    image = Image.new("RGB", (640, 480), (230, 220, 220))  # no red cells to estimate a scale from
    paths = {"cm": tmp_path / "cm.tif", "inch": tmp_path / "inch.tif", "dpi72": tmp_path / "dpi72.tif"}
    image.save(paths["cm"], resolution=1e4 / 0.2, resolution_unit="cm")  # 0.2 um/px
    image.save(paths["inch"], resolution=25400 / 0.2, resolution_unit="inch")
    image.save(paths["dpi72"], resolution=72, resolution_unit="inch")  # an editor's default: no microscope's
    detector = ScaledDetector(um_per_px=0.1)
    for name in ("cm", "inch"):
        scale = SmearAnalyzer(detector).analyze(paths[name]).scale
        assert scale["source"] == "recorded" and scale["um_per_px"] == pytest.approx(0.2)
        assert scale["detector_resample"] == pytest.approx(2.0) and "file" in scale["note"]
    assert SmearAnalyzer(detector).analyze(paths["dpi72"]).scale["source"] == "unknown"
    # the folder engine reads it too, and a stated scale wins over the file's
    summary = analyze_folder(SmearAnalyzer(detector), [paths["cm"]], tmp_path / "out")
    assert summary.results[0].scale["source"] == "recorded"
    stated = SmearAnalyzer(detector, um_per_px=0.1).analyze(paths["cm"]).scale
    assert stated["source"] == "given" and stated["um_per_px"] == 0.1


def test_a_recorded_scale_its_red_cells_contradict_is_not_used(tmp_path) -> None:
    """A camera that records its sensor's pixel pitch (3.45 um/px) had the field upsampled tenfold, trusted
    without a word; a record its red cells contradict was used as well."""
    from tests.test_scale import smear_field

    pytest.importorskip("tiffslide")
    field = smear_field(75.0, size=(1280, 960), seed=2, n_red=20)  # red cells 75 px across: 0.1 um/px
    detector = ScaledDetector(um_per_px=0.1)
    for recorded in (3.45, 0.4):
        path = tmp_path / f"field-{recorded}.tif"
        field.save(path, resolution=1e4 / recorded, resolution_unit="cm")
        scale = SmearAnalyzer(detector).analyze(path).scale
        assert scale["source"] == "estimated" and scale["um_per_px"] == pytest.approx(0.1, rel=0.15), scale
        assert recorded < 1 or "not used" not in scale["note"]  # out of range: ignored as 72 dpi is
    assert "the file records 0.4 um/px" in scale["note"] and "not used" in scale["note"]
    path = tmp_path / "agrees.tif"
    field.save(path, resolution=1e4 / 0.105, resolution_unit="cm")  # within the red cells' measure: the record
    assert SmearAnalyzer(detector).analyze(path).scale["source"] == "recorded"
