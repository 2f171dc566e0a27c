"""The service's smear path keeps the quality gates of ``leukoscope analyze``: exact blast
names, a warning for an unverified detector or a field at the detection cap, carried by
the outcome and its annotated image, and no leukemia flag in the differential then."""

from __future__ import annotations

import numpy as np
from PIL import Image

from leukoscope.inference.differential import LEUKEMIA_WORDING
from leukoscope.service.analysis import Analyzer, differential, load_smear_backend
from leukoscope.service.cases import named_warnings
from leukoscope.service.uploads import PreparedImage
from tests.detection.smear_fakes import PBC_CLASSES, VERIFIED, FixedDetector, constant_classifier, grid_boxes

CLASSES = ["blast", "lymphocyte"]
FIELD = Image.new("RGB", (640, 480), (230, 210, 220))


def service_analyzer(detector: FixedDetector) -> Analyzer:
    classifier = constant_classifier(CLASSES, "blast")
    return Analyzer(classifier, smear=load_smear_backend(detector, classifier), gradcam=False, threads=1)


def test_the_service_never_counts_an_erythroblast_as_a_blast() -> None:
    analyzer = Analyzer(constant_classifier(PBC_CLASSES, "erythroblast"), gradcam=False, threads=1)
    try:
        assert analyzer.blast_classes == []
    finally:
        analyzer.close()


def test_an_unverified_detector_warns_in_the_outcome_and_stops_the_leukemia_flag() -> None:
    analyzer = service_analyzer(FixedDetector(grid_boxes(120), metrics={"evaluated_on": "test",
                                                                         "ap_50_per_class": {"WBC": 0.2}}))
    try:
        assert len(analyzer.warnings) == 1 and "below the floor of 0.9" in analyzer.warnings[0]
        outcome = analyzer.analyse_smear(FIELD)
        assert len(outcome.cells) == 120 and outcome.warnings == analyzer.warnings
        labels = [cell.prediction.label for cell in outcome.cells]
        result = differential(labels, CLASSES, analyzer.blast_classes, warnings=outcome.warnings)
        assert result["blast_percentage"] == 100.0 and not result["acute_leukemia_flag"]
        assert result["flags"][0].startswith("WARNING: ") and not any(LEUKEMIA_WORDING in f for f in result["flags"])
        # the picture the reviewer sees carries the warning (white on red)
        banner = np.asarray(outcome.annotated)[:40]
        assert (banner == (200, 0, 0)).all(axis=-1).sum() > 500
        # control: the same cells without the warning are flagged
        assert differential(labels, CLASSES, analyzer.blast_classes)["acute_leukemia_flag"]
    finally:
        analyzer.close()


def test_a_field_at_the_detection_cap_warns_in_the_outcome() -> None:
    analyzer = service_analyzer(FixedDetector(grid_boxes(120), metrics=VERIFIED, cap=120))
    try:
        assert analyzer.warnings == []
        outcome = analyzer.analyse_smear(FIELD)
        assert len(outcome.warnings) == 1 and "per-image cap" in outcome.warnings[0]
    finally:
        analyzer.close()


def image_warned(name: str, *warnings: str) -> PreparedImage:
    return PreparedImage(name, b"", "PNG", 1, 1, b"", None, [], list(warnings))


def test_a_cases_warnings_name_the_images_they_were_said_of() -> None:
    """A case keeps its warnings, not each image's: a warning of some of its images names them (after its own
    words, which tell what it doubts), one said of all of them is said once."""
    cap = "The detector returned as many boxes as its per-image cap allows in this field: ..."
    unverified = "detector unverified: ..."
    images = [image_warned("a.png", unverified, cap), image_warned("b.png", unverified),
              image_warned("c.png", unverified, cap, cap)]
    assert named_warnings(images) == [unverified, f"{cap} [in 2 of 3 images: a.png, c.png]"]
    assert named_warnings(images[:1]) == [unverified, cap]  # one image: nothing to name
    many = [image_warned(f"f{i}.png", cap) for i in range(7)] + [image_warned("g.png")]
    assert named_warnings(many) == [f"{cap} [in 7 of 8 images: f0.png, f1.png, f2.png, f3.png, f4.png and 2 more]"]


def test_the_case_page_says_a_blast_percentage_of_few_cells_is_not_meaningful(make_service, smear_analyzer):
    from tests.service.helpers import csrf_of, encode, smear_field

    service = make_service(analyzer_override=smear_analyzer)
    service.add_user("tech", "technician")
    tech = service.login("tech")
    form = tech.get("/upload")
    field, boxes = smear_field()
    response = tech.post("/upload", files=[("files", ("field.png", encode(field, "PNG"), "application/octet-stream"))],
                         data={"kind": "smear", "csrf_token": csrf_of(form.text)}, follow_redirects=False)
    assert response.status_code == 303
    page = tech.get(response.headers["location"]).text
    assert f"not meaningful with {len(boxes)} cells: count at least 100 cells" in page
    assert LEUKEMIA_WORDING not in page


def test_a_server_names_its_blast_classes(cell_bundle, tmp_path) -> None:
    """`serve` told admins to "name them with --blast-class", an option it did not have: a lab whose classifier
    calls its blasts otherwise could not have them counted. The setting (LEUKOSCOPE_BLAST_CLASSES, which
    `serve --blast-class` sets) reaches the server's analyzer; a name the classifier does not have stops the
    start. (Smear fields get the same names through the analyzer's smear options: not run here, the tests'
    server has no detector bundle.)"""
    import pytest

    from leukoscope.service.app import create_app
    from leukoscope.service.settings import ServiceSettings

    settings = ServiceSettings.from_env({"LEUKOSCOPE_BLAST_CLASSES": "monocyte, neutrophil"}, bundle=cell_bundle,
                                        data_dir=tmp_path / "data", fsync=False, gradcam=False)
    assert settings.blast_class_list == ["monocyte", "neutrophil"]
    app = create_app(settings)
    try:
        assert app.state.service.analyzer.blast_classes == ["monocyte", "neutrophil"]
    finally:
        app.state.service.analyzer.close()
        app.state.service.engine.dispose()
    with pytest.raises(ValueError, match="lymphoblast"):
        create_app(settings.model_copy(update={"blast_classes": "lymphoblast", "data_dir": tmp_path / "other"}))


def test_a_smear_cases_fields_warnings_are_said_once_per_kind() -> None:
    """A grey field among colour fields was warned twice (its own line, named, beside the folded one)."""
    from leukoscope.inference.quality import GRAYSCALE_WARNING, cap_warning
    from leukoscope.service.cases import CaseScale

    unverified = "detector unverified: ..."
    images = [image_warned("a.png", unverified, GRAYSCALE_WARNING), image_warned("b.png", unverified),
              image_warned("c.png", unverified, cap_warning(1, 1))]
    said = CaseScale().warnings(images, "smear")
    assert said[0] == unverified and len(said) == 3
    assert said[1].startswith("The detector returned as many boxes as its per-image cap allows in 1 of 3 fields "
                              "(c.png)")
    assert said[2].startswith("1 of 3 fields (a.png) had no colour")
    assert not any(GRAYSCALE_WARNING in warning for warning in said)
    # one field: its own words
    assert CaseScale().warnings(images[:1], "smear") == [unverified, GRAYSCALE_WARNING]
