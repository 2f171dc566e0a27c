"""The service with a bundle that has OOD statistics: each cell gets the same score as the CLI's,
the case stores which cells are unfamiliar, and a case of mostly unfamiliar single-cell images
says "review: images unlike the training data" in its differential."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukoscope.bundle import load_bundle, save_ood
from leukoscope.data.synthetic import SYNTHETIC_CLASSES, render_cell
from leukoscope.evaluation.ood import calibrate_ood
from leukoscope.inference.differential import LEUKEMIA_WORDING
from leukoscope.inference.predictor import CellClassifier
from leukoscope.inference.quality import UNFAMILIAR_WORDING
from leukoscope.preprocessing import batched_outputs
from leukoscope.service.analysis import Analyzer
from tests.service.helpers import CELL_SIZE, cell_image, encode
from tests.service.test_api import upload

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _cells(seed: int, per_class: int) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(SYNTHETIC_CLASSES)), per_class)
    pixels = np.stack([render_cell(SYNTHETIC_CLASSES[k], rng, CELL_SIZE) for k in labels])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), labels


@pytest.fixture(scope="module")
def ood_bundle(cell_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service's tiny bundle plus OOD statistics fitted on generated cells."""
    bundle = tmp_path_factory.mktemp("ood") / "bundle"
    shutil.copytree(cell_bundle, bundle)
    model, info = load_bundle(bundle)
    train, labels = _cells(100, 16)
    held, _ = _cells(101, 6)
    _, embeddings = batched_outputs(model, train, info.preprocessing)
    save_ood(bundle, *calibrate_ood(embeddings, labels, *batched_outputs(model, held, info.preprocessing)).to_parts())
    return bundle


@pytest.fixture(scope="module")
def ood_analyzer(ood_bundle: Path):
    analyzer = Analyzer.from_bundles(ood_bundle, threads=1)
    yield analyzer
    analyzer.close()


def _noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (CELL_SIZE, CELL_SIZE, 3), dtype=np.uint8))


def test_the_service_scores_as_the_python_api(ood_analyzer: Analyzer, ood_bundle: Path) -> None:
    """The Grad-CAM forward pass also yields the embedding: the same score as predict_images."""
    images = [cell_image("blast", 7), _noise(0)]
    expected = CellClassifier.from_bundle(ood_bundle).predict_images(images)
    for image, reference in zip(images, expected):
        outcome = ood_analyzer.analyse_cell(image)
        (cell,) = outcome.cells
        assert cell.overlay is not None  # the Grad-CAM path
        assert cell.prediction.ood_score == pytest.approx(reference.ood_score, rel=1e-4)
        assert cell.prediction.unfamiliar == reference.unfamiliar
    assert [p.unfamiliar for p in expected] == [False, True]


def test_a_bundle_read_in_eight_views_scores_in_the_service_as_in_the_python_api(
        ood_bundle: Path, tmp_path: Path) -> None:
    """Its calibration is fitted on the views' average: the service's upload must not answer from
    Grad-CAM's single forward pass (sharper probabilities, more cells flagged)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(ood_bundle, bundle)
    model, info = load_bundle(bundle)
    info.preprocessing.views = 8
    train, labels = _cells(100, 16)
    held, held_labels = _cells(101, 6)
    _, embeddings = batched_outputs(model, train, info.preprocessing)
    stats = calibrate_ood(embeddings, labels, *batched_outputs(model, held, info.preprocessing))
    save_ood(bundle, *stats.to_parts(), views=8, temperature=1.3)
    images = [cell_image("blast", 7), cell_image("monocyte", 3).rotate(90), _noise(0)]
    expected = CellClassifier.from_bundle(bundle).predict_images(images)
    analyzer = Analyzer.from_bundles(bundle, threads=1)
    try:
        for image, reference in zip(images, expected):
            (cell,) = analyzer.analyse_cell(image).cells
            assert cell.overlay is not None
            assert cell.prediction.probabilities == pytest.approx(reference.probabilities, abs=1e-5)
            assert cell.prediction.ood_score == pytest.approx(reference.ood_score, rel=1e-4)
    finally:
        analyzer.close()


def test_a_case_of_unfamiliar_images_says_review(make_service, ood_analyzer: Analyzer) -> None:
    service = make_service(analyzer_override=ood_analyzer)
    service.add_user("tech", "technician")
    client = service.client()
    noise = upload(client, service.auth("tech"), *[(f"n{i}.png", encode(_noise(i), "PNG")) for i in range(3)])
    assert noise.status_code == 201, noise.text
    case = noise.json()
    assert [cell["unfamiliar"] for cell in case["cells"]] == [True] * 3
    flags = case["differential"]["flags"]
    assert any(UNFAMILIAR_WORDING in flag.lower() and "3 of 3 cell images" in flag for flag in flags)
    assert not case["differential"]["acute_leukemia_flag"] and not any(LEUKEMIA_WORDING in f for f in flags)
    familiar = upload(client, service.auth("tech"), ("c.png", encode(cell_image("blast", 7), "PNG"))).json()
    assert familiar["cells"][0]["unfamiliar"] is False
    assert not any(UNFAMILIAR_WORDING in flag.lower() for flag in familiar["differential"]["flags"])
    # the review page marks each unfamiliar cell, not only the case
    page = service.login("tech")
    assert page.get(f"/cases/{case['id']}").text.count("unlike the training data</span>") == 3
    assert "unlike the training data</span>" not in page.get(f"/cases/{familiar['id']}").text


def test_a_bundle_without_statistics_leaves_the_flag_unknown(service) -> None:
    case = upload(service.client(), service.auth("tech"), ("c.png", encode(cell_image("blast", 1), "PNG"))).json()
    assert case["cells"][0]["unfamiliar"] is None


def test_a_full_review_answers_the_unfamiliar_warning_and_no_other(make_service, ood_analyzer: Analyzer) -> None:
    """Once a hematologist has typed every cell, the differential rests on their classes: the warning that
    doubted the classifier's calls is answered (else a reviewed case could never raise a leukemia flag).
    Until then it stands; a warning about which cells were found (the detector's) never goes."""
    from types import SimpleNamespace

    from leukoscope.service.cases import current_differential

    service = make_service(analyzer_override=ood_analyzer)
    service.add_user("tech", "technician")
    service.add_user("hema", "hematologist")
    client, hema = service.client(), service.auth("hema")
    case = upload(client, service.auth("tech"), *[(f"n{i}.png", encode(_noise(i), "PNG")) for i in range(3)]).json()
    cells = [cell["id"] for cell in case["cells"]]

    def unfamiliar_flags() -> list[str]:
        shown = client.get(f"/api/v1/cases/{case['id']}", headers=hema).json()
        return [flag for flag in shown["differential"]["flags"] if UNFAMILIAR_WORDING in flag.lower()]

    assert len(unfamiliar_flags()) == 1
    partly = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                         json={"labels": {str(cells[0]): "blast"}, "confirm_rest": False})
    assert partly.status_code == 200 and partly.json()["status"] != "reviewed"
    assert len(unfamiliar_flags()) == 1  # two cells still rest on the classifier alone
    done = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                       json={"labels": {str(cell): "blast" for cell in cells}})
    assert done.status_code == 200 and done.json()["status"] == "reviewed"
    assert unfamiliar_flags() == []
    # the upload's own record keeps what the analysis said
    shown = client.get(f"/api/v1/cases/{case['id']}", headers=hema).json()
    assert any(UNFAMILIAR_WORDING in flag.lower() for flag in shown["differential_at_upload"]["flags"])

    # a detector's warning stays after a full review, and keeps the leukemia flag off
    detector_warning = "The detector's recorded test AP@0.5 for WBC is 0.200, below the floor of 0.9: ..."
    reviewed = [SimpleNamespace(final_label="blast", reviewed_label="blast", image_id=1) for _ in range(120)]
    smear = SimpleNamespace(cells=reviewed, classes=["blast", "lymphocyte"], kind="smear", images=[],
                            analysis={"blast_classes": ["blast"], "warnings": [
                                detector_warning, "Review: images unlike the training data: 90 of 120 ..."]})
    result = current_differential(smear)
    assert result["flags"][0] == f"WARNING: {detector_warning}" and not result["acute_leukemia_flag"]
    assert not any(UNFAMILIAR_WORDING in flag.lower() for flag in result["flags"])
    smear.analysis["warnings"] = smear.analysis["warnings"][1:]
    assert current_differential(smear)["acute_leukemia_flag"]


def test_a_smear_case_judges_unfamiliar_cells_on_all_its_fields_cells(make_service, analyzer) -> None:
    """The case took every field's own warning: one field of three cells, two of them unfamiliar, stopped a case
    of 23 cells (9% unfamiliar), where `analyze` judges a folder on its cells together."""
    from leukoscope.inference.predictor import Prediction
    from leukoscope.inference.quality import unfamiliar_count_warning

    classes = analyzer.classes

    def cell(index: int, unfamiliar: bool) -> dict:
        prediction = Prediction(f"c{index}", "lymphocyte", "lymphocyte", 0.9,
                                {c: (0.9 if c == "lymphocyte" else 0.1 / (len(classes) - 1)) for c in classes},
                                False, ood_score=9.0 if unfamiliar else 1.0, unfamiliar=unfamiliar)
        return {"box": (10 * index, 10, 10 * index + 8, 18), "score": 0.9, "prediction": prediction}

    class TwoFields:
        def analyse(self, image, run_um_per_px=None):
            if image.width == 321:  # the odd field: two of its three cells unfamiliar
                return {"cells": [cell(k, k < 2) for k in range(3)],
                        "warnings": [unfamiliar_count_warning(2, 3)]}
            return {"cells": [cell(k, False) for k in range(20)]}

    two = Analyzer(analyzer.base, smear=TwoFields(), threads=1, gradcam=False, name="two fields")
    try:
        service = make_service(analyzer_override=two)
        service.add_user("tech", "technician")
        client, headers = service.client(), service.auth("tech")
        odd, plain = Image.new("RGB", (321, 200), (230, 215, 222)), Image.new("RGB", (320, 200), (230, 215, 222))
        case = upload(client, headers, ("odd.png", encode(odd, "PNG")), ("plain.png", encode(plain, "PNG")),
                      kind="smear").json()
        assert sum(c["unfamiliar"] for c in case["cells"]) == 2 and len(case["cells"]) == 23
        assert not any(UNFAMILIAR_WORDING in flag.lower() for flag in case["differential"]["flags"])
        alone = upload(client, headers, ("odd.png", encode(odd, "PNG")), kind="smear").json()
        assert any(UNFAMILIAR_WORDING in flag.lower() and "2 of 3" in flag for flag in alone["differential"]["flags"])
    finally:
        two.close()


def test_a_cell_case_in_a_light_the_classifier_never_saw_says_so_once(make_service) -> None:
    """The shipped classifier records its training images' light: cell uploads whose background is bluish are
    told, as `predict` tells them (tests/inference/test_cell_light.py), under one line naming them, and the
    same cell as taken is not; the warning holds the case's leukemia flag back (test_review_answers.py)."""
    from leukoscope.light import CELL_LIGHT_WARNING
    from tests.inference.test_cell_light import BLUISH, _cell

    analyzer = Analyzer.from_bundles("pretrained:wbc-classifier", threads=1, gradcam=False)
    try:
        service = make_service(analyzer_override=analyzer)
        service.add_user("tech", "technician")
        files = [(name, encode(_cell(gains=gains, size=size), "PNG")) for name, gains, size in  # three files
                 (("taken.png", (1, 1, 1), 240), ("blue1.png", BLUISH, 240), ("blue2.png", BLUISH, 250))]
        response = service.client().post("/api/v1/cases", headers=service.auth("tech"), data={"kind": "cell",
                                         "um_per_px": "0.1"},
                                         files=[("files", (name, data, "image/png")) for name, data in files])
    finally:
        analyzer.close()
    assert response.status_code == 201, response.text
    said = [w for w in response.json()["differential"]["warnings"] if w.startswith(CELL_LIGHT_WARNING)]
    assert said == [f"{CELL_LIGHT_WARNING} [in 2 of 3 images: blue1.png, blue2.png]"]
