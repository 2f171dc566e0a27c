"""A smear case in the web service gets the scale rules of ``leukoscope analyze``: each field's
scale is recorded and shown, a field whose red cells give none says so, and a case of several
fields lends their scale to such a field as a folder run does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from leukoscope.inference.smear import SmearAnalyzer
from leukoscope.scale import RUN_SCALE_MIN_ESTIMATES
from leukoscope.service.analysis import Analyzer, load_smear_backend
from tests.detection.test_smear_scale import ScaledDetector
from tests.service.helpers import encode
from tests.test_scale import smear_field

BLANK = Image.new("RGB", (640, 480), (230, 220, 220))  # no red cells: no scale of its own
PACKAGE_MODELS = Path(__file__).resolve().parents[2] / "src" / "leukoscope" / "pretrained"


@pytest.fixture
def scaled_service(make_service, analyzer):
    detector = ScaledDetector(um_per_px=0.08)
    smear = Analyzer(analyzer.base, smear=load_smear_backend(detector, analyzer.base), gradcam=False, threads=1,
                     name="abas_cnn + scaled detector")
    service = make_service(analyzer_override=smear)
    service.add_user("tech", "technician")
    yield service, detector
    smear.close()


def post_fields(client, headers, images: list[Image.Image]) -> dict:
    parts = [("files", (f"field{i}.png", encode(image, "PNG"), "application/octet-stream"))
             for i, image in enumerate(images)]
    response = client.post("/api/v1/cases", headers=headers, files=parts, data={"kind": "smear"})
    assert response.status_code == 201, response.text
    return response.json()


def test_a_case_of_fields_lends_their_scale_to_a_field_without_one(scaled_service) -> None:
    service, detector = scaled_service
    client, headers = service.client(), service.auth("tech")
    fields = [smear_field(20.0, seed=seed) for seed in range(RUN_SCALE_MIN_ESTIMATES)]  # 7.5 um / 20 px
    case = post_fields(client, headers, [BLANK, *fields])
    scales = [image["scale"] for image in case["images"]]
    assert scales[0]["source"] == "run" and scales[0]["um_per_px"] == pytest.approx(0.375, rel=0.08)
    assert all(s["source"] == "estimated" and s["um_per_px"] == pytest.approx(0.375, rel=0.08) for s in scales[1:])
    # the blank field was resampled to the detector's 0.08 um/px at the case's scale, not left as it came
    factor = scales[0]["um_per_px"] / 0.08
    assert detector.seen[0] == (round(640 * factor), round(480 * factor))
    assert case["run_scale"]["source"] == "estimated" and case["run_scale"]["um_per_px"] == scales[0]["um_per_px"]
    assert case["run_scale"]["note"].startswith(f"median of {RUN_SCALE_MIN_ESTIMATES} of 6 fields")
    # each field read by the detector once: the case's scale is known before any field is analysed
    assert len(detector.seen) == len(fields) + 1
    page = service.login("tech").get(f"/cases/{case['id']}").text
    assert page.count("not estimated from this field: the case&#39;s fields together") == 1
    assert len(re.findall(r"um/px, estimated from \d+ red cells", page)) == RUN_SCALE_MIN_ESTIMATES


def test_fields_that_disagree_lend_no_scale(scaled_service) -> None:
    service, detector = scaled_service
    client, headers = service.client(), service.auth("tech")
    # three fields at one magnification and three at another: not one microscope's run
    fields = [smear_field(diameter, seed=seed) for seed, diameter in enumerate([20.0] * 3 + [50.0] * 3)]
    case = post_fields(client, headers, [BLANK, *fields])
    assert case["run_scale"]["source"] == "unknown" and "disagree" in case["run_scale"]["note"]
    assert case["images"][0]["scale"]["source"] == "unknown" and len(detector.seen) == len(fields) + 1


def test_a_field_alone_without_a_scale_says_how_it_was_analysed(scaled_service) -> None:
    service, detector = scaled_service
    client, headers = service.client(), service.auth("tech")
    # Too few fields to lend a scale: the blank one is analysed at the detector's scale, and says so.
    case = post_fields(client, headers, [BLANK, *[smear_field(20.0, seed=s) for s in range(2)]])
    first = case["images"][0]["scale"]
    assert first["source"] == "unknown" and first["um_per_px"] is None
    assert first["analysed_at_um_per_px"] == 0.08 and detector.seen[0] == (640, 480)
    assert case["run_scale"] is None  # too few fields to judge a run
    # the case says it of its fields as a folder's summary does (a field without a scale among five named none)
    (unscaled,) = [w for w in case["differential"]["warnings"] if "no scale" in w]
    assert unscaled.startswith("1 of 3 fields (field0.png) had no scale and was analysed at the detector's")
    page = service.login("tech").get(f"/cases/{case['id']}").text
    assert '<p class="scale warn">scale not estimated (no isolated red cells found); assumed 0.0800 um/px' in page
    assert page.count('<p class="scale">scale 0.3') == 2
    # single cells carry no scale
    single = client.post("/api/v1/cases", headers=headers, data={"kind": "cell"},
                         files=[("files", ("cell.png", encode(smear_field(20.0).crop((0, 0, 96, 96)), "PNG"),
                                           "application/octet-stream"))]).json()
    assert single["images"][0]["scale"] is None


def test_one_analyzer_takes_a_run_scale_per_field_without_keeping_it() -> None:
    analyzer = SmearAnalyzer(ScaledDetector(um_per_px=0.08), run_um_per_px=0.2)
    assert analyzer.analyze(BLANK, run_um_per_px=0.1).scale["um_per_px"] == 0.1  # the call's, over the analyzer's
    assert analyzer.analyze(BLANK).scale["um_per_px"] == 0.2
    with pytest.raises(ValueError, match="run_um_per_px must be between 0.005 and 5"):
        analyzer.analyze(BLANK, run_um_per_px=float("nan"))


def test_a_field_far_off_the_cases_scale_is_analysed_at_the_cases(scaled_service) -> None:
    """A field whose own estimate rests on 5 red cells or fewer and is more than FIELD_RUN_MAX_RATIO off the
    others' (a misreading: the rest of its red cells touching) is analysed again at the case's scale, as a
    folder run does."""
    service, detector = scaled_service
    client, headers = service.client(), service.auth("tech")
    fields = [smear_field(20.0, seed=seed) for seed in range(RUN_SCALE_MIN_ESTIMATES)]
    case = post_fields(client, headers, [*fields, smear_field(50.0, seed=9, n_red=4)])  # 0.15 um/px against 0.375
    scales = [image["scale"] for image in case["images"]]
    assert all(s["source"] == "estimated" for s in scales[:-1])
    assert scales[-1]["source"] == "run" and scales[-1]["um_per_px"] == case["run_scale"]["um_per_px"]
    assert "more than 1.5 times off the run's scale" in scales[-1]["note"]
    assert "1 estimate(s) far from the rest left out" in case["run_scale"]["note"]
    assert len(detector.seen) == len(fields) + 1  # every field read once, the misread one too


def post_stated(client, headers, images: list[Image.Image], um_per_px: str, kind: str = "smear"):
    parts = [("files", (f"field{i}.png", encode(image, "PNG"), "application/octet-stream"))
             for i, image in enumerate(images)]
    return client.post("/api/v1/cases", headers=headers, files=parts, data={"kind": kind, "um_per_px": um_per_px})


def test_an_uploader_states_the_scale_of_a_cases_fields(scaled_service) -> None:
    service, detector = scaled_service
    client, headers = service.client(), service.auth("tech")
    response = post_stated(client, headers, [BLANK, smear_field(20.0, seed=1)], "0,2")  # a decimal comma is read
    assert response.status_code == 201, response.text
    case = response.json()
    assert case["stated_um_per_px"] == 0.2 and case["run_scale"] is None
    assert [image["scale"]["source"] for image in case["images"]] == ["given", "given"]
    assert [image["scale"]["um_per_px"] for image in case["images"]] == [0.2, 0.2]
    assert detector.seen == [(1600, 1200)] * 2  # both resampled from 0.2 to the detector's 0.08 um/px
    # the blank field is no longer analysed at a guessed scale: no warning of it
    assert not any("no scale" in warning for warning in case["differential"]["warnings"])
    page = service.login("tech").get(f"/cases/{case['id']}").text
    assert page.count('<p class="scale">scale 0.2000 um/px, stated (um_per_px)') == 2


def test_the_cases_red_cells_doubt_a_wrong_stated_scale(scaled_service) -> None:
    """Five fields at 0.375 um/px stated as 0.8: the case's red cells together doubt it (most fields have
    too few to doubt it alone), in the service's words, and the case raises no leukemia flag."""
    service, _detector = scaled_service
    client, headers = service.client(), service.auth("tech")
    fields = [smear_field(20.0, seed=seed, n_red=4) for seed in range(RUN_SCALE_MIN_ESTIMATES)]
    case = post_stated(client, headers, fields, "0.8").json()
    warnings = case["differential"]["warnings"]
    doubts = [warning for warning in warnings if warning.startswith("the stated scale")]
    assert len(doubts) == 1 and "0.8 um/px, is 2.1 times coarser than the run's red cells measure" in doubts[0]
    assert doubts[0].endswith("check the upload's um_per_px") and not any("--um-per-px" in w for w in warnings)
    assert case["stated_um_per_px"] == 0.8 and case["run_scale"] is None  # the scale stated stands
    assert all(image["scale"]["um_per_px"] == 0.8 for image in case["images"])
    assert any(doubts[0] in flag for flag in case["differential"]["flags"])  # what stops a leukemia flag


def test_a_fields_own_red_cells_doubt_a_wrong_stated_scale_by_name(scaled_service) -> None:
    service, _detector = scaled_service
    client, headers = service.client(), service.auth("tech")
    case = post_stated(client, headers, [smear_field(20.0, seed=3, n_red=14)], "0.8").json()
    (doubt,) = [w for w in case["differential"]["warnings"] if "the stated scale" in w]
    assert doubt.startswith("the stated scale, 0.8 um/px") and "this field's 14 isolated red cells" in doubt
    # of two fields, the one whose red cells doubt it is named (the other has too few to tell)
    one = post_stated(client, headers, [smear_field(20.0, seed=3, n_red=4), smear_field(20.0, seed=4, n_red=14)],
                      "0.8").json()
    (doubt,) = [w for w in one["differential"]["warnings"] if "stated one" in w]
    assert doubt.startswith("1 of 2 fields (field1.png) measures another scale on its red cells than the stated")
    two = post_stated(client, headers, [smear_field(20.0, seed=s, n_red=14) for s in (3, 4)], "0.8").json()
    (doubt,) = [w for w in two["differential"]["warnings"] if "stated one" in w or "stated scale" in w]
    assert doubt.startswith("2 of 2 fields (field0.png, field1.png) measure another scale")
    assert "each field's warning" not in doubt  # the service keeps the case's warnings only


def test_a_field_without_a_scale_tells_web_users_to_state_it_on_the_upload(scaled_service) -> None:
    service, _detector = scaled_service
    case = post_fields(service.client(), service.auth("tech"), [BLANK])
    (unscaled,) = [w for w in case["differential"]["warnings"] if "no scale" in w]
    assert unscaled.endswith("state the microscope's scale (the upload's um_per_px)")
    # the band of warnings drawn on the field's picture comes from the same words
    outcome = service.state.analyzer.analyse_smear(BLANK)
    assert any("the upload's um_per_px" in w for w in outcome.warnings)
    assert not any("--um-per-px" in w for w in outcome.warnings)
    # a case stored before (the CLI's words in its record) reads in the service's words
    from leukoscope.service.db import transaction
    from leukoscope.service.tables import Case

    with transaction(service.state.sessions) as db:
        stored = db.get(Case, case["id"])
        stored.analysis = {**stored.analysis, "warnings": [unscaled.replace("the upload's um_per_px", "--um-per-px")]}
    again = service.client().get(f"/api/v1/cases/{case['id']}", headers=service.auth("tech")).json()
    assert again["differential"]["warnings"] == [unscaled]


@pytest.mark.parametrize("text, message", [
    ("abc", "um_per_px must be the microscope's scale in micrometres per pixel, a number such as 0.1; got 'abc'"),
    ("0", "um_per_px must be between 0.005 and 5 micrometres per pixel, got 0.0"),
    ("nan", "a number such as 0.1; got 'nan'"),
    ("50", "um_per_px must be between 0.005 and 5 micrometres per pixel, got 50.0"),
    ("0_1", "a number such as 0.1; got '0_1'"),  # float() reads it as 1.0: ten times the 0.1 meant
    ("\uff10.\uff11", "a number such as 0.1"),  # full-width digits
])
def test_a_scale_that_is_no_microscopes_is_refused_before_any_analysis(scaled_service, text, message) -> None:
    service, detector = scaled_service
    client, headers = service.client(), service.auth("tech")
    response = post_stated(client, headers, [smear_field(20.0)], text)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_scale"
    assert message in response.json()["error"]["message"]
    assert detector.seen == [] and client.get("/api/v1/cases", headers=headers).json()["cases"] == []


def test_one_analyzer_takes_a_stated_scale_per_field_without_keeping_it() -> None:
    analyzer = SmearAnalyzer(ScaledDetector(um_per_px=0.08))
    stated = analyzer.analyze(smear_field(20.0, n_red=14), um_per_px=0.8)
    assert stated.scale["source"] == "given" and stated.scale["um_per_px"] == 0.8
    assert any(w.startswith("the stated scale, 0.8 um/px") for w in stated.warnings)  # its red cells measure 0.375
    assert analyzer.analyze(smear_field(20.0, n_red=14)).scale["source"] == "estimated"


CBC_TESTING = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "cbc" / "Testing" / "Images"


@pytest.mark.skipif(not CBC_TESTING.is_dir() or not (PACKAGE_MODELS / "smear-detector" / "bundle.json").exists(),
                    reason="needs ../shared/datasets/cbc and the shipped models")
def test_real_fields_at_a_wrong_stated_scale_are_doubted_through_the_service(make_service) -> None:
    """Four CBC Testing fields (about 0.08 um/px), three with a scale estimate of their own (fewer than a case's
    scale is lent on, enough to doubt a stated one: a case like it, stated at 0.8 um/px, went unwarned and called
    3 cells blast), stated at 0.3 um/px through the API with the shipped models: each is analysed at the stated
    scale, the case's red cells together doubt it, and the case raises no leukemia flag. The fields' own scale
    agrees with what CBC's microscope is (no doubt at 0.081). Not 0.8 um/px: each field is then resampled to
    ten times its size for the detector, 20 s a field (the test took 95 s of the suite with ten fields at 0.3
    and four at 0.8)."""
    from leukoscope.io import load_image
    from leukoscope.scale import field_scale, run_scale_of, stated_doubt_of_run

    files = sorted(CBC_TESTING.glob("*.jpg"))[:10]  # five of them with a scale estimate of their own
    scales = [field_scale(load_image(path)) for path in files]
    run = run_scale_of(scales)
    assert run.known and stated_doubt_of_run(0.081, run) is None
    known = [path for path, scale in zip(files, scales) if scale.known]
    few = [*known[:3], next(path for path, scale in zip(files, scales) if not scale.known)]
    parts = [("files", (path.name, path.read_bytes(), "image/jpeg")) for path in few]
    shipped = Analyzer.from_bundles("pretrained:wbc-classifier", "pretrained:smear-detector", gradcam=False,
                                    threads=1)
    try:
        service = make_service(analyzer_override=shipped)
        service.add_user("tech", "technician")
        response = service.client().post("/api/v1/cases", headers=service.auth("tech"), files=parts,
                                         data={"kind": "smear", "um_per_px": "0.3"})
        assert response.status_code == 201, response.text
        case = response.json()
    finally:
        shipped.close()
    assert all(image["scale"]["um_per_px"] == 0.3 for image in case["images"])
    (doubt,) = [w for w in case["differential"]["warnings"] if w.startswith("the stated scale")]
    assert "0.3 um/px, is 3." in doubt and "times coarser than the run's red cells measure" in doubt
    assert "median of 3 of 4 fields" in doubt
    assert not case["differential"]["acute_leukemia_flag"]


def test_a_tiff_fields_resolution_tags_are_its_recorded_scale(scaled_service) -> None:
    """As `leukoscope analyze` reads a TIFF file's: the service had ignored an upload's tags."""
    pytest.importorskip("tiffslide")
    service, detector = scaled_service
    client, headers = service.client(), service.auth("tech")
    tagged = encode(BLANK, "TIFF", resolution=1e4 / 0.2, resolution_unit="cm")  # 0.2 um/px, no red cell to doubt it
    parts = [("files", ("tagged.tif", tagged, "application/octet-stream")),
             ("files", ("plain.tif", encode(BLANK, "TIFF"), "application/octet-stream"))]
    response = client.post("/api/v1/cases", headers=headers, files=parts, data={"kind": "smear"})
    assert response.status_code == 201, response.text
    tagged_scale, plain_scale = (image["scale"] for image in response.json()["images"])
    assert tagged_scale["source"] == "recorded" and tagged_scale["um_per_px"] == pytest.approx(0.2)
    assert plain_scale["source"] == "unknown"
    assert detector.seen[0] == (1600, 1200)  # resampled from the record's 0.2 to the detector's 0.08 um/px
    page = service.login("tech").get(f"/cases/{response.json()['id']}").text
    assert page.count("scale 0.2000 um/px, recorded in the image file") == 1
    # a stated scale wins over the record
    stated = client.post("/api/v1/cases", headers=headers, files=parts[:1], data={"kind": "smear", "um_per_px": "0.1"})
    assert stated.json()["images"][0]["scale"]["source"] == "given"


def test_a_tiff_cells_resolution_tags_frame_it(make_service) -> None:
    """A single-cell upload is framed at its file's record, as `predict` frames a TIFF cell image (the shipped
    classifier has a physical window)."""
    pytest.importorskip("tiffslide")
    analyzer = Analyzer.from_bundles("pretrained:wbc-classifier", threads=1, gradcam=False)
    try:
        service = make_service(analyzer_override=analyzer)
        service.add_user("tech", "technician")
        client, headers = service.client(), service.auth("tech")
        tagged = encode(BLANK, "TIFF", resolution=1e4 / 0.1, resolution_unit="cm")
        response = client.post("/api/v1/cases", headers=headers, data={"kind": "cell"},
                               files=[("files", ("cell.tif", tagged, "application/octet-stream")),
                                      ("files", ("cell.png", encode(BLANK, "PNG"), "application/octet-stream"))])
    finally:
        analyzer.close()
    assert response.status_code == 201, response.text
    tagged_scale, plain_scale = (image["scale"] for image in response.json()["images"])
    assert tagged_scale["source"] == "recorded" and tagged_scale["um_per_px"] == pytest.approx(0.1)
    assert plain_scale["source"] == "unknown"


def test_a_scale_the_server_states_for_every_field_wins_over_a_files_record(analyzer) -> None:
    """A smear backend made with ``um_per_px`` (the Python API's smear_options): the record had won over it."""
    backend = load_smear_backend(ScaledDetector(um_per_px=0.08), analyzer.base, um_per_px=0.3)
    scale = backend.analyse(BLANK, recorded_um_per_px=0.2).scale
    assert scale["source"] == "given" and scale["um_per_px"] == 0.3
    unstated = load_smear_backend(ScaledDetector(um_per_px=0.08), analyzer.base)
    assert unstated.analyse(BLANK, recorded_um_per_px=0.2).scale["source"] == "recorded"
