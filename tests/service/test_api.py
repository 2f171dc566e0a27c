"""The JSON API: uploads of every format, clear 4xx errors that write nothing, roles,
tokens, rate limit, EXIF stripping, path-traversal names, audit, review and export."""

from __future__ import annotations

import copy
import csv
import hashlib
import html
import io
import struct
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from leukoscope.data.readers import read_dataset
from leukoscope.inference.drawing import enlargement
from tests.service.helpers import cell_image, csrf_of, encode, smear_field

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def upload(client, headers, *files, kind="cell", note=""):
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/api/v1/cases", headers=headers, files=parts, data={"kind": kind, "note": note})


def store_files(service) -> list[Path]:
    return sorted(p for p in (service.data_dir / "store").rglob("*") if p.is_file())


# ------------------------------------------------------------------ happy path


@pytest.mark.parametrize("fmt,name", [("JPEG", "cell.jpg"), ("PNG", "cell.png"), ("BMP", "cell.bmp"),
                                      ("TIFF", "cell.tif")])
def test_upload_each_format_gives_a_result(service, fmt, name):
    client = service.client()
    response = upload(client, service.auth("tech"), (name, encode(cell_image("blast", 1), fmt)))
    assert response.status_code == 201, response.text
    case = response.json()
    assert case["status"] == "new" and case["kind"] == "cell"
    assert case["images"][0]["format"] == fmt and case["images"][0]["file_name"] == name
    (cell,) = case["cells"]
    assert set(cell["probabilities"]) == {"blast", "lymphocyte", "monocyte", "neutrophil"}
    assert sum(cell["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert cell["top_class"] == max(cell["probabilities"], key=cell["probabilities"].get)
    assert cell["label"] in (cell["top_class"], "uncertain")
    assert "not a diagnosis" in case["decision_support"]
    overlay = client.get(cell["overlay_url"], headers=service.auth("tech"))
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(overlay.content)).size == (64, 64)  # the cell's own size: no upscaling
    assert response.headers["location"] == f"/api/v1/cases/{case['id']}"


def test_service_predictions_are_the_python_api_s(service, cell_bundle):
    """The service classifies with the same CellClassifier as the CLI and the Python API."""
    from leukoscope.inference.predictor import CellClassifier

    images = [cell_image(label, 40 + i, size=80) for i, label in enumerate(["blast", "monocyte", "neutrophil"])]
    expected = CellClassifier.from_bundle(cell_bundle).predict_images(images)
    case = upload(service.client(), service.auth("tech"),
                  *[(f"{i}.png", encode(image, "PNG")) for i, image in enumerate(images)]).json()
    for cell, reference in zip(case["cells"], expected):
        assert cell["label"] == reference.label and cell["top_class"] == reference.top_class
        assert cell["probabilities"] == pytest.approx(reference.probabilities, abs=1e-5)


def test_several_images_make_one_case(service):
    client = service.client()
    files = [(f"c{i}.png", encode(cell_image(label, i), "PNG"))
             for i, label in enumerate(["blast", "lymphocyte", "monocyte"])]
    case = upload(client, service.auth("tech"), *files).json()
    assert len(case["images"]) == 3 and len(case["cells"]) == 3
    assert case["differential"]["total"] == 3 and case["differential"]["blast_classes"] == ["blast"]
    assert service.rows() == {"cases": 1, "images": 3, "cells": 3}


# ------------------------------------------------------------------ bad input: 4xx, nothing written


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("name,data,status,code", [
    ("cut.jpg", encode(cell_image(), "JPEG")[:400], 422, "corrupt_image"),
    ("half.png", encode(cell_image(), "PNG")[:3000], 422, "corrupt_image"),
    ("notes.jpg", b"patient notes, definitely not a picture\n" * 20, 415, "unsupported_format"),
    ("empty.png", b"", 400, "empty_file"),
    ("bomb.png", _png_with_size(100_000, 100_000), 413, "too_many_pixels"),
    ("anim.gif", encode(cell_image(), "GIF"), 415, "unsupported_format"),
])
def test_bad_files_are_refused_with_json_and_nothing_is_written(service, name, data, status, code):
    client = service.client()
    response = upload(client, service.auth("tech"), ("good.png", encode(cell_image(), "PNG")), (name, data))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and name in error["message"]
    assert service.rows() == {"cases": 0, "images": 0, "cells": 0}
    assert store_files(service) == []
    # ...but the refusal is on the record: who sent which files, and why they were refused
    (entry,) = client.get("/api/v1/audit", headers=service.auth("admin")).json()["entries"]
    assert (entry["user"], entry["action"], entry["case_id"]) == ("tech", "case.refused", None)
    assert entry["detail"]["names"] == ["good.png", name] and entry["detail"]["code"] == code
    assert entry["detail"]["status"] == status and name in entry["detail"]["message"]


def test_too_many_pixels_by_setting(make_service):
    service = make_service(max_pixels=50 * 50)
    service.add_user("tech", "technician")
    response = upload(service.client(), service.auth("tech"), ("big.png", encode(cell_image(size=64), "PNG")))
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_pixels"
    assert "4,096" in response.json()["error"]["message"] and service.rows()["cases"] == 0


def test_a_server_allowing_more_pixels_than_pillow_reads_their_headers(monkeypatch):
    """The header check ran with Pillow's own limit (about 179 M pixels before it refuses): a server set to
    allow 500 M refused a 400 M-pixel image, saying "400,000,000 pixels exceeds the limit of 500,000,000"."""
    from PIL import Image

    from leukoscope.service.uploads import Upload, header_pixels

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default, as in a fresh process
    assert header_pixels(Upload("big.png", _png_with_size(20_000, 20_000)), 500_000_000) == 400_000_000


def test_a_bombs_header_is_refused_in_the_services_words(service):
    """A header past twice Pillow's own limit is refused by Pillow before any check of ours; the message is
    still ours (the size and the server's limit), not Pillow's "could be decompression bomb DOS attack"."""
    response = upload(service.client(), service.auth("tech"), ("bomb.png", _png_with_size(100_000, 100_000)))
    message = response.json()["error"]["message"]
    assert response.status_code == 413 and "DOS" not in message
    limit = service.state.settings.max_pixels
    assert message == f"bomb.png: 10,000,000,000 pixels exceeds the limit of {limit:,} pixels"


def test_oversized_upload_is_refused(make_service):
    service = make_service(max_upload_bytes=64 * 1024)
    service.add_user("tech", "technician")
    noise = Image.frombytes("RGB", (600, 600), bytes(range(256)) * (600 * 600 * 3 // 256 + 1))
    big = encode(noise, "PNG", compress_level=0)
    assert len(big) > 64 * 1024 + 256 * 1024
    service.add_user("admin", "admin")
    client = service.client()
    response = upload(client, service.auth("tech"), ("big.png", big))
    assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"
    assert service.rows()["cases"] == 0 and store_files(service) == []
    # on the record although no file was read: who, and why
    (entry,) = client.get("/api/v1/audit", headers=service.auth("admin")).json()["entries"]
    assert (entry["user"], entry["action"]) == ("tech", "case.refused")
    assert entry["detail"]["code"] == "upload_too_large" and entry["detail"]["names"] == []


def test_oversized_bodies_count_against_the_rate_limit_and_cannot_flood_the_audit_log(make_service):
    service = make_service(max_upload_bytes=16 * 1024, rate_limit_per_minute=2)
    service.add_user("tech", "technician")
    service.add_user("admin", "admin")
    client, headers = service.client(), service.auth("tech")
    big = b"\0" * (16 * 1024 + 300 * 1024)
    codes = [upload(client, headers, ("big.png", big)).status_code for _ in range(6)]
    assert codes == [413] * 6
    entries = client.get("/api/v1/audit", headers=service.auth("admin")).json()["entries"]
    assert sorted(e["action"] for e in entries) == ["case.refused", "case.refused", "upload.throttled"]
    # and they used the user's uploads of this minute
    assert upload(client, headers, ("a.png", encode(cell_image(), "PNG"))).status_code == 429


def test_oversized_upload_without_content_length_is_refused(make_service):
    service = make_service(max_upload_bytes=16 * 1024)
    service.add_user("tech", "technician")

    def body():  # a chunked body: the limit must hold while it streams in
        yield b"--xx\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(100):
            yield b"\0" * 8192
        yield b"\r\n--xx--\r\n"

    response = service.client().post("/api/v1/cases", content=body(),
                                     headers={**service.auth("tech"),
                                              "content-type": "multipart/form-data; boundary=xx"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"


def test_no_file_and_too_many_files(make_service):
    service = make_service(max_files_per_upload=2)
    service.add_user("tech", "technician")
    client = service.client()
    response = client.post("/api/v1/cases", headers=service.auth("tech"), data={"kind": "cell"},
                           files={"other": ("x.txt", b"x", "text/plain")})
    assert response.status_code == 400 and response.json()["error"]["code"] == "no_file"
    png = encode(cell_image(), "PNG")
    response = upload(client, service.auth("tech"), *[(f"{i}.png", png) for i in range(3)])
    assert response.status_code in (400, 413) and service.rows()["cases"] == 0


def test_smear_without_detector_is_a_clear_400(service):
    response = upload(service.client(), service.auth("tech"), ("f.png", encode(cell_image(), "PNG")), kind="smear")
    assert response.status_code == 400 and response.json()["error"]["code"] == "no_detector"


# ------------------------------------------------------------------ storage safety


def test_path_traversal_file_name_is_only_a_label(service):
    client = service.client()
    response = upload(client, service.auth("tech"), ("../../etc/passwd.jpg", encode(cell_image(), "PNG")))
    assert response.status_code == 201, response.text
    image = response.json()["images"][0]
    assert image["file_name"] == "passwd.jpg" and image["format"] == "PNG"  # content, not extension
    root = service.data_dir.resolve()
    import re

    files = store_files(service)
    for path in files:  # every object named by its content's digest alone, inside the store
        assert path.resolve().is_relative_to(root / "store" / "objects")
        assert re.fullmatch(r"[0-9a-f]{64}\.[a-z]+", path.name), path.name
    assert any(path.name.split(".")[0] == image["sha256"] for path in files)  # the original, by its digest
    assert not (service.data_dir.parent / "etc").exists() and not (service.data_dir / "etc").exists()


def test_exif_is_stripped_from_served_copies(service):
    photo = cell_image("monocyte", 3, size=64).resize((96, 64))
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"      # Make
    exif[0x0131] = "LabPC-Dr-Who"   # Software
    exif[0x0112] = 6                # Orientation: rotate 90 degrees when shown
    jpeg = encode(photo, "JPEG", exif=exif.tobytes(), quality=95)
    assert b"SecretCam" in jpeg
    client = service.client()
    case = upload(client, service.auth("tech"), ("photo.jpg", jpeg)).json()
    served = client.get(case["images"][0]["url"], headers=service.auth("tech"))
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert b"SecretCam" not in served.content and b"LabPC" not in served.content
    image = Image.open(io.BytesIO(served.content))
    assert not image.getexif() and "exif" not in image.info and "icc_profile" not in image.info
    assert image.size == (64, 96)  # orientation applied before the metadata went
    assert case["images"][0]["width"] == 64
    overlay = client.get(case["cells"][0]["overlay_url"], headers=service.auth("tech"))
    assert b"SecretCam" not in overlay.content


def test_served_files_need_authorisation(service):
    client = service.client()
    case = upload(client, service.auth("tech"), ("a.png", encode(cell_image(), "PNG"))).json()
    assert client.get(case["images"][0]["url"]).status_code == 401
    assert client.get(case["images"][0]["url"], headers=service.auth("tech2")).status_code == 404
    assert client.get(case["images"][0]["url"], headers=service.auth("hema")).status_code == 200
    assert client.get(f"/api/v1/cases/{case['id']}/images/{case['images'][0]['id']}/../../etc",
                      headers=service.auth("tech")).status_code == 404


# ------------------------------------------------------------------ auth and roles


def test_api_tokens(service):
    client = service.client()
    assert client.get("/api/v1/me").status_code == 401
    bad = client.get("/api/v1/me", headers={"Authorization": "Bearer lks_not-a-real-token"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "bad_token"
    assert bad.headers["www-authenticate"] == "Bearer"
    headers = service.auth("tech")
    assert client.get("/api/v1/me", headers=headers).json() == {"username": "tech", "role": "technician",
                                                                  "via": "token", "scope": "write"}
    from leukoscope.service.db import transaction
    from leukoscope.service.tables import ApiToken, utcnow

    with transaction(service.state.sessions) as db:
        for token in db.query(ApiToken).all():
            token.revoked_at = utcnow()
    assert client.get("/api/v1/me", headers=headers).status_code == 401


def test_cookie_session_cannot_post_to_the_api(service):
    """The API takes cookies only for GET: a cross-site form could not upload or review through it."""
    client = service.login("tech")
    assert client.get("/api/v1/me").json()["via"] == "session"
    response = upload(client, {}, ("a.png", encode(cell_image(), "PNG")))
    assert response.status_code == 401 and service.rows()["cases"] == 0


def test_roles(service):
    client = service.client()
    tech, tech2, hema, admin = (service.auth(n) for n in ("tech", "tech2", "hema", "admin"))
    case = upload(client, tech, ("a.png", encode(cell_image(), "PNG"))).json()
    upload(client, tech2, ("b.png", encode(cell_image("lymphocyte"), "PNG")))
    # a technician sees only their own cases, and cannot learn that others exist
    assert [c["id"] for c in client.get("/api/v1/cases", headers=tech).json()["cases"]] == [case["id"]]
    other = client.get(f"/api/v1/cases/{case['id']}", headers=tech2)
    assert other.status_code == 404 and other.json()["error"]["code"] == "case_not_found"
    # ... and cannot review, not even their own case
    review = client.post(f"/api/v1/cases/{case['id']}/review", headers=tech, json={"labels": {}})
    assert review.status_code == 403 and review.json()["error"]["code"] == "forbidden"
    # a hematologist sees and reviews every case
    assert len(client.get("/api/v1/cases", headers=hema).json()["cases"]) == 2
    cell = case["cells"][0]["id"]
    ok = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema, json={"labels": {str(cell): "monocyte"}})
    assert ok.status_code == 200 and ok.json()["status"] == "reviewed"
    # an admin manages users, not cases; nobody else reads the audit log or adds users
    assert client.get("/api/v1/cases", headers=admin).status_code == 403
    assert client.get("/api/v1/audit", headers=hema).status_code == 403
    assert client.post("/api/v1/users", headers=hema, json={"username": "x1", "password": "long enough 1",
                                                             "role": "admin"}).status_code == 403
    made = client.post("/api/v1/users", headers=admin, json={"username": "newtech", "password": "long enough 1",
                                                              "role": "technician"})
    assert made.status_code == 201 and made.json()["role"] == "technician"
    assert client.post("/api/v1/users", headers=admin, json={"username": "newtech", "password": "long enough 1",
                                                              "role": "technician"}).status_code == 409
    assert client.post("/api/v1/users", headers=admin, json={"username": "p", "password": "short",
                                                              "role": "technician"}).status_code == 400
    # technicians cannot export
    assert client.get("/api/v1/export", headers=tech).status_code == 403


def test_rate_limit_returns_429(make_service):
    service = make_service(rate_limit_per_minute=3)
    service.add_user("tech", "technician")
    service.add_user("tech2", "technician")
    client, headers = service.client(), service.auth("tech")
    png = encode(cell_image(), "PNG")
    assert [upload(client, headers, ("a.png", png)).status_code for _ in range(3)] == [201, 201, 201]
    limited = upload(client, headers, ("a.png", png))
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert upload(client, headers, ("a.png", png)).status_code == 429
    assert upload(client, service.auth("tech2"), ("a.png", png)).status_code == 201  # per user
    assert service.rows()["cases"] == 4
    # one audit entry per wait, not one per refused request
    service.add_user("admin", "admin")
    entries = client.get("/api/v1/audit", headers=service.auth("admin")).json()["entries"]
    throttled = [e for e in entries if e["action"] == "upload.throttled"]
    assert [e["user"] for e in throttled] == ["tech"] and throttled[0]["detail"]["rule"] == "uploads"


# ------------------------------------------------------------------ audit, review, export


def test_a_file_sent_again_points_to_the_cases_that_hold_it(service):
    """The same file in two cases would be counted twice: each later copy says where else it is, naming
    only cases the viewer may open (a technician's own, every case for a hematologist): a technician learns
    nothing of another user's uploads."""
    client = service.client()
    same, other = encode(cell_image("blast", 1), "PNG"), encode(cell_image("blast", 2), "PNG")
    first = upload(client, service.auth("tech"), ("a.png", same)).json()
    by_tech2 = upload(client, service.auth("tech2"), ("copy.png", same)).json()
    assert by_tech2["images"][0]["earlier_uploads"] is None  # tech's case is not named, nor counted
    third = upload(client, service.auth("tech"), ("again.png", same), ("new.png", other), ("twice.png", other)).json()
    assert [image["earlier_uploads"] for image in third["images"]] == [
        {"cases": [first["id"]], "more": 0, "in_this_case": []}, None,
        {"cases": [], "more": 0, "in_this_case": [1]}]
    seen = client.get(f"/api/v1/cases/{third['id']}", headers=service.auth("hema")).json()
    assert seen["images"][0]["earlier_uploads"]["cases"] == [first["id"], by_tech2["id"]]
    # the first upload of a file names no later copy of it
    assert client.get(f"/api/v1/cases/{first['id']}", headers=service.auth("hema")).json()["images"][0][
        "earlier_uploads"] is None
    page = " ".join(service.login("tech").get(f"/cases/{third['id']}").text.split())
    assert f'href="/cases/{first["id"]}"' in page and by_tech2["id"] not in page
    assert "The same file as image 2 of this case: its cells are counted there, once, and not again here" in page
    # the repeated copy is not analysed again: its cells are the first copy's, counted once
    assert [image["repeat_of"] for image in third["images"]] == [None, None, 1]
    assert len(third["cells"]) == 2 and third["differential"]["total"] == 2


def test_a_field_sent_twice_in_one_case_is_counted_once(make_service, smear_analyzer, tmp_path):
    """The same field twice in one case had counted its cells twice (6 blasts of 6 from 3, and a narrower
    interval): the later copy is stored and shown, but has no cells of its own, and the case says so."""
    service = make_service(analyzer_override=smear_analyzer)
    service.add_user("tech", "technician")
    service.add_user("hema", "hematologist")
    client, tech, hema = service.client(), service.auth("tech"), service.auth("hema")
    field = encode(smear_field()[0], "PNG")
    once = upload(client, tech, ("a.png", field), kind="smear").json()
    twice = upload(client, tech, ("a.png", field), ("a-again.png", field), kind="smear").json()
    assert len(twice["images"]) == 2 and twice["images"][1]["repeat_of"] == 0
    assert len(twice["cells"]) == len(once["cells"]) == 6
    for key in ("total", "counts", "blast_percentage", "blast_ci95"):
        assert twice["differential"][key] == once["differential"][key]
        assert twice["differential_at_upload"][key] == once["differential_at_upload"][key]
    note = "Fields uploaded twice in this case (field 2 = field 1): each file's cells are counted once."
    assert note in twice["differential"]["flags"] and note in twice["differential_at_upload"]["flags"]
    assert twice["differential"]["repeated_images"] == [{"position": 1, "same_as": 0}]
    page = html.unescape(" ".join(service.login("hema").get(f"/cases/{twice['id']}").text.split()))
    assert "The same file as field 1 of this case: its cells are counted there, once" in page and note in page
    # reviewed in full, the export holds each cell once
    labels = {str(cell["id"]): "blast" for cell in twice["cells"]}
    assert client.post(f"/api/v1/cases/{twice['id']}/review", headers=hema,
                       json={"labels": labels}).json()["status"] == "reviewed"
    with zipfile.ZipFile(io.BytesIO(client.get("/api/v1/export?layout=csv", headers=hema).content)) as archive:
        assert len(list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))) == 6


def test_a_case_stored_with_a_repeated_files_cells_counts_and_exports_them_once(service):
    """Cases stored before repeats were left out hold cells for both copies: the differential and the export
    read only the first copy's."""
    from sqlalchemy import select

    from leukoscope.service.db import transaction
    from leukoscope.service.tables import Case, CaseImage, Cell

    client, tech, hema = service.client(), service.auth("tech"), service.auth("hema")
    same = encode(cell_image("blast", 1), "PNG")
    case = upload(client, tech, ("a.png", same), ("b.png", encode(cell_image("blast", 2), "PNG"))).json()
    with transaction(service.state.sessions) as db:  # make it as an older server stored a repeat
        stored = db.get(Case, case["id"])
        second = db.scalar(select(CaseImage).where(CaseImage.case_id == case["id"], CaseImage.position == 1))
        second.sha256 = stored.images[0].sha256
        db.scalar(select(Cell).where(Cell.image_id == second.id)).top_class = "blast"
    seen = client.get(f"/api/v1/cases/{case['id']}", headers=hema).json()
    assert len(seen["cells"]) == 2 and seen["differential"]["total"] == 1
    assert seen["images"][1]["repeat_of"] == 0
    # the copy's cell counts for nothing: a review of the counted one completes the case, and confirming the
    # rest writes no label on the copy's
    first = seen["cells"][0]["id"]
    done = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                       json={"labels": {str(first): "blast"}, "confirm_rest": True}).json()
    now = client.get(f"/api/v1/cases/{case['id']}", headers=hema).json()
    assert now["status"] == "reviewed", done
    assert [cell["reviewed_label"] for cell in now["cells"]] == ["blast", None]
    with zipfile.ZipFile(io.BytesIO(client.get("/api/v1/export?layout=csv", headers=hema).content)) as archive:
        rows = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
    assert [int(row["cell"]) for row in rows] == [seen["cells"][0]["id"]]


def test_a_file_uploaded_in_two_cases_is_exported_once_and_a_label_conflict_named(service, tmp_path):
    """The same file re-uploaded in a second case (which says so) had its reviewed cell exported twice, and when
    the two reviews disagreed `train` warned of byte-identical images under two labels. The export keeps the
    earliest case's copy, counts the other as left out, and NOTES.txt (and the page) name any disagreement."""
    client, tech, hema = service.client(), service.auth("tech"), service.auth("hema")
    same = encode(cell_image("blast", 1), "PNG")
    first = upload(client, tech, ("a.png", same), ("b.png", encode(cell_image("monocyte", 2), "PNG"))).json()
    again = upload(client, tech, ("a-again.png", same)).json()
    assert again["images"][0]["earlier_uploads"]["cases"] == [first["id"]]
    a, b = (cell["id"] for cell in first["cells"])
    (copy,) = (cell["id"] for cell in again["cells"])
    for case, labels in ((first, {str(a): "blast", str(b): "monocyte"}), (again, {str(copy): "lymphocyte"})):
        assert client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                           json={"labels": labels}).json()["status"] == "reviewed"

    def exported(layout: str = "csv") -> tuple[Any, list[dict[str, str]], str]:
        response = client.get(f"/api/v1/export?layout={layout}", headers=hema)
        assert response.status_code == 200, response.text
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            rows = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
            notes = archive.read("NOTES.txt").decode() if "NOTES.txt" in archive.namelist() else ""
        return response, rows, notes

    response, rows, notes = exported()
    assert sorted(int(row["cell"]) for row in rows) == sorted([a, b])  # the earliest case's copy only
    assert response.headers["x-leukoscope-left-out"] == "1"
    assert response.headers["x-leukoscope-label-conflicts"] == "1"
    assert "1 reviewed cell(s) were left out as copies" in notes
    assert f"case {again['id']} cell {copy} (number 1 on its case page), a copy of case {first['id']} cell {a}" in notes
    (conflict,) = [line for line in notes.splitlines() if line.startswith("- a.png")]
    assert f"case {first['id']} cell {a}" in conflict and "'blast'" in conflict
    assert f"case {again['id']} cell {copy}" in conflict and "'lymphocyte'" in conflict
    page = html.unescape(" ".join(service.login("hema").get("/export").text.split()))
    assert 'id="export-copies"' in page and 'id="export-conflicts"' in page and "“lymphocyte”" in page
    # once the lab gives the cell one label, no conflict is left: the copy is still left out, and said so
    client.post(f"/api/v1/cases/{again['id']}/review", headers=hema, json={"labels": {str(copy): "blast"}})
    response, rows, notes = exported()
    assert response.headers["x-leukoscope-left-out"] == "1"
    assert response.headers["x-leukoscope-label-conflicts"] == "0"
    assert "LABEL CONFLICTS" not in notes and "left out as copies" in notes
    folders = client.get("/api/v1/export?layout=folders", headers=hema)
    with zipfile.ZipFile(io.BytesIO(folders.content)) as archive:
        archive.extractall(tmp_path / "folders")
    assert sorted(s.label for s in read_dataset(tmp_path / "folders").samples) == ["blast", "monocyte"]


def test_copies_of_a_cell_are_found_by_overlapping_boxes_not_only_equal_ones() -> None:
    """A field analysed again (another stated scale, another detector) boxes its cells a few pixels apart: the
    copies were matched by equal boxes only, so both were exported, under two cases (two subjects of a split).
    Two cells of one field stay two cells, however close."""
    from datetime import datetime, timedelta
    from types import SimpleNamespace

    from leukoscope.service.export import one_copy_each

    start = datetime(2026, 1, 1)

    def cell(n: int, case: str, box: list[int] | None, label: str, sha: str = "f" * 64) -> SimpleNamespace:
        made = start + timedelta(days=int(case[-1]))
        return SimpleNamespace(id=n, case_id=case, position=n, box=box, reviewed_label=label,
                               image=SimpleNamespace(sha256=sha), case=SimpleNamespace(created_at=made))

    first = [cell(1, "c1", [10, 10, 60, 60], "blast"), cell(2, "c1", [70, 10, 120, 60], "monocyte")]
    again = [cell(3, "c2", [13, 12, 62, 61], "lymphocyte"), cell(4, "c2", [71, 9, 121, 59], "monocyte")]
    other_file = [cell(5, "c3", [10, 10, 60, 60], "blast", sha="e" * 64)]
    whole = [cell(6, "c1", None, "basophil", sha="d" * 64), cell(7, "c4", None, "basophil", sha="d" * 64)]
    kept, copies, conflicts = one_copy_each(first + again + other_file + whole)
    assert [c.id for c in kept] == [1, 2, 5, 6]
    assert sorted((copy.id, original.id) for copy, original in copies) == [(3, 1), (4, 2), (7, 6)]
    assert [[c.id for c in group] for group in conflicts] == [[1, 3]]
    # overlapping cells of one case are not copies of each other
    close = [cell(8, "c5", [10, 10, 60, 60], "blast", sha="a" * 64), cell(9, "c5", [15, 15, 65, 65], "blast",
                                                                         sha="a" * 64)]
    assert [c.id for c in one_copy_each(close)[0]] == [8, 9]


def test_an_export_with_no_reviewed_cell_is_refused_saying_why(service):
    """With nothing reviewed, the export answered 200 with an empty ZIP (no NOTES.txt, no word) and the page
    offered it: now 409 `nothing_to_export` says to review a case first, and the page says so instead."""
    client, tech, hema = service.client(), service.auth("tech"), service.auth("hema")
    case = upload(client, tech, ("a.png", encode(cell_image("blast", 1), "PNG"))).json()  # not reviewed yet
    for layout in ("folders", "csv"):
        refused = client.get(f"/api/v1/export?layout={layout}", headers=hema)
        assert refused.status_code == 409, refused.status_code
        assert refused.json()["error"] == {"code": "nothing_to_export",
                                           "message": "no reviewed cells yet: review a case first"}
    browser = service.login("hema")
    page = browser.get("/export").text
    assert "No reviewed cells yet: review a case first." in page and 'id="export-folders"' not in page
    posted = browser.post("/export/dataset.zip", data={"layout": "csv", "csrf_token": csrf_of(page)})
    assert posted.status_code == 409 and "no reviewed cells yet: review a case first" in posted.text
    assert list(service.state.store.tmp.iterdir()) == []
    # an excluded cell is no training image either, and the answer does not ask for a review already made
    client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                json={"labels": {str(case["cells"][0]["id"]): "excluded"}})
    refused = client.get("/api/v1/export", headers=hema).json()["error"]
    assert refused["code"] == "nothing_to_export"
    assert refused["message"].startswith("no cell to export: the 1 reviewed cell is marked excluded")


def test_audit_log_records_views_and_changes(service):
    client = service.client()
    case = upload(client, service.auth("tech"), ("a.png", encode(cell_image(), "PNG"))).json()
    client.get(f"/api/v1/cases/{case['id']}", headers=service.auth("hema"))
    client.post(f"/api/v1/cases/{case['id']}/review", headers=service.auth("hema"),
                json={"labels": {str(case["cells"][0]["id"]): "neutrophil"}, "comment": "segmented"})
    client.get(f"/api/v1/cases/{case['id']}", headers=service.auth("tech2"))  # refused: not logged as a view
    entries = client.get(f"/api/v1/audit?case_id={case['id']}", headers=service.auth("admin")).json()["entries"]
    seen = [(e["user"], e["action"]) for e in reversed(entries)]
    assert seen == [("tech", "case.create"), ("hema", "case.view"), ("hema", "case.review")]
    review = entries[0]
    assert review["detail"]["labels"] == {str(case["cells"][0]["id"]): "neutrophil"}
    corrected = int(case["cells"][0]["label"] != "neutrophil")  # a correction unless the model said neutrophil
    assert review["detail"]["corrected"] == corrected and review["client"] == "testclient"


def test_review_is_stored_and_exported_as_a_dataset(service, tmp_path):
    client = service.client()
    tech, hema = service.auth("tech"), service.auth("hema")
    first = upload(client, tech, ("a.png", encode(cell_image("blast", 5), "PNG")),
                   ("b.png", encode(cell_image("lymphocyte", 6), "PNG"))).json()
    second = upload(client, tech, ("c.png", encode(cell_image("monocyte", 7), "PNG"))).json()
    upload(client, tech, ("d.png", encode(cell_image("neutrophil", 8), "PNG")))  # never reviewed: not exported
    a, b = (cell["id"] for cell in first["cells"])
    (c,) = (cell["id"] for cell in second["cells"])
    result = client.post(f"/api/v1/cases/{first['id']}/review", headers=hema,
                         json={"labels": {str(a): "monocyte", str(b): "lymphocyte"}, "comment": "check a"})
    assert result.status_code == 200 and result.json()["status"] == "reviewed"
    assert result.json()["case"]["review"]["reviewer"] == "hema"  # the completing review's answer said null
    client.post(f"/api/v1/cases/{second['id']}/review", headers=hema, json={"labels": {str(c): "excluded"}})
    # nothing left to count, and the case says why (not "No white cell found ... a smear field")
    emptied = client.get(f"/api/v1/cases/{second['id']}", headers=tech).json()["differential"]
    assert emptied["total"] == 0 and emptied["flags"] == [
        "No cell counted: every cell of this case was marked excluded in review."]
    page = service.login("tech").get(f"/cases/{second['id']}").text  # a one-cell case shows no differential...
    assert "No cell counted: every cell of this case was marked excluded in review." in page  # ...but says this
    stored = client.get(f"/api/v1/cases/{first['id']}", headers=tech).json()
    assert [cell["reviewed_label"] for cell in stored["cells"]] == ["monocyte", "lymphocyte"]
    assert stored["status"] == "reviewed" and stored["review"]["reviewer"] == "hema"
    assert stored["review"]["comment"] == "check a"
    assert [c["status"] for c in client.get("/api/v1/cases?status=new", headers=tech).json()["cases"]] == ["new"]

    folders = client.get("/api/v1/export?layout=folders", headers=hema)
    assert folders.status_code == 200 and folders.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(folders.content)) as archive:
        names = sorted(archive.namelist())
        archive.extractall(tmp_path / "folders")
    assert [n.split("/")[0] for n in names] == ["lymphocyte", "monocyte"]  # excluded and unreviewed left out
    manifest = read_dataset(tmp_path / "folders")
    assert sorted(s.label for s in manifest.samples) == ["lymphocyte", "monocyte"]
    # each cell names the file it came from: a model fine-tuned on the export records the lab's own files
    from leukoscope.data.fingerprints import source_digest_of

    sent = {hashlib.sha256(encode(cell_image(kind, seed), "PNG")).hexdigest()[:16]
            for kind, seed in (("blast", 5), ("lymphocyte", 6))}
    assert {source_digest_of(s.path) for s in manifest.samples} == sent

    table = client.get("/api/v1/export?layout=csv", headers=hema)
    with zipfile.ZipFile(io.BytesIO(table.content)) as archive:
        archive.extractall(tmp_path / "csv")
        rows = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
    assert {(r["label"], r["subject"], r["predicted"] in ("blast", "lymphocyte", "monocyte", "neutrophil",
                                                          "uncertain")) for r in rows} == \
        {("monocyte", first["id"], True), ("lymphocyte", first["id"], True)}
    from_csv = read_dataset(tmp_path / "csv" / "manifest.csv")
    assert all(s.path.is_file() and s.subject == first["id"] for s in from_csv.samples)
    assert client.get("/api/v1/export?layout=xml", headers=hema).status_code == 422
    assert list(service.state.store.tmp.iterdir()) == []  # each ZIP deleted once sent


def test_an_export_keeps_class_names_and_leaves_no_zip_behind_when_it_fails(service, tmp_path, monkeypatch):
    """A class folder is the class's own name ("Early Pre-B" renamed "Early_Pre-B" was no blast class for the
    model trained on it; two names could merge); a name no folder can hold is refused. A failed export leaves
    no ZIP of patient images behind."""
    from types import SimpleNamespace

    from leukoscope.service import export
    from leukoscope.service.errors import ServiceError

    cells = [SimpleNamespace(reviewed_label=label, case_id="c1", id=n, crop_object="x",
                             image=SimpleNamespace(sha256="0" * 64), predicted_label="",
                             top_class="", confidence=1.0, reviewed_at=None)
             for n, label in enumerate(["Early Pre-B", "Lymphozyt (reaktiv)", "Lymphozyt reaktiv", "好中球"])]
    with open(tmp_path / "a.zip", "wb") as handle:
        export._write_export(handle, cells, lambda name: encode(cell_image(), "PNG"), "folders")
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        archive.extractall(tmp_path / "folders")
    assert sorted(s.label for s in read_dataset(tmp_path / "folders").samples) == sorted(c.reviewed_label
                                                                                         for c in cells)
    for bad in (["a/b"], [".hidden"], ["WBC", "wbc"], ["blast?"], ["ends."], ["tab\there"]):
        with pytest.raises(ServiceError) as refused:
            export.check_export_folders(set(bad))
        assert refused.value.status == 400 and "layout=csv" in refused.value.message

    client, hema = service.client(), service.auth("hema")
    case = upload(client, service.auth("tech"), ("a.png", encode(cell_image("blast", 5), "PNG"))).json()
    client.post(f"/api/v1/cases/{case['id']}/review", headers=hema, json={"labels": {}, "confirm_rest": True})

    def gone(name: str) -> bytes:
        raise OSError("object missing")

    monkeypatch.setattr(service.state.store, "read", gone)
    failed = service.client(raise_server_exceptions=False).get("/api/v1/export?layout=folders", headers=hema)
    assert failed.status_code == 500
    assert list(service.state.store.tmp.iterdir()) == []


def test_a_note_or_comment_past_its_limit_is_refused_not_cut(service):
    """A 2,530-character note was stored as 2,000 and a comment cut at 5,000, with 201/200 and no word: both are
    refused with 400 and a message now (nothing written); at the limit they are kept whole, and a line break a
    browser sends as CRLF counts as one character."""
    client, tech, hema = service.client(), service.auth("tech"), service.auth("hema")
    image = ("a.png", encode(cell_image(), "PNG"))
    long_note = upload(client, tech, image, note="n" * 2001)
    assert long_note.status_code == 400 and long_note.json()["error"]["code"] == "note_too_long"
    assert "2,001 characters; at most 2,000" in long_note.json()["error"]["message"]
    assert service.rows()["cases"] == 0
    case = upload(client, tech, image, note="n" * 2000).json()
    assert len(case["note"]) == 2000
    too_long = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema, json={"comment": "c" * 5001})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "comment_too_long"
    assert client.get(f"/api/v1/cases/{case['id']}", headers=hema).json()["review"]["comment"] == ""
    whole = "c" * 4000 + "\r\n" * 1000  # 5,000 characters as a textarea sends them
    saved = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema, json={"comment": whole})
    assert saved.status_code == 200 and saved.json()["case"]["review"]["comment"] == whole
    schema = client.get("/api/openapi.json").json()
    assert schema["components"]["schemas"]["ReviewBody"]["properties"]["comment"]["maxLength"] == 5000


def test_review_rejects_unknown_labels_and_cells(service):
    client = service.client()
    case = upload(client, service.auth("tech"), ("a.png", encode(cell_image(), "PNG"))).json()
    hema = service.auth("hema")
    bad = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema, json={"labels": {"999999": "blast"}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "unknown_cell"
    bad = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                      json={"labels": {str(case["cells"][0]["id"]): "giraffe"}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_label"
    assert client.get(f"/api/v1/cases/{case['id']}", headers=hema).json()["status"] == "new"


# ------------------------------------------------------------------ smear fields (detector plugged in)


def test_smear_field_analysis(make_service, smear_analyzer):
    service = make_service(analyzer_override=smear_analyzer)
    service.add_user("tech", "technician")
    service.add_user("hema", "hematologist")
    client = service.client()
    field, boxes = smear_field()
    response = upload(client, service.auth("tech"), ("field.png", encode(field, "PNG")), kind="smear")
    assert response.status_code == 201, response.text
    case = response.json()
    assert case["kind"] == "smear" and len(case["cells"]) == len(boxes)
    assert [tuple(c["box"]) for c in case["cells"]] == boxes
    assert case["cells"][0]["uncertain"] and case["cells"][0]["label"] == "uncertain"  # 0.42 < 0.5
    assert case["images"][0]["annotated_url"]
    for cell in case["cells"]:
        crop = Image.open(io.BytesIO(client.get(cell["crop_url"], headers=service.auth("tech")).content))
        assert crop.size == (64, 64)
    differential = case["differential"]
    assert differential["uncertain"] >= 1 and differential["total"] == 6
    assert differential["counts"]["uncertain"] == differential["uncertain"]
    low, high = differential["blast_ci95"]
    assert low <= differential["blast_percentage"] <= high
    assert any("uncertain" in flag for flag in differential["flags"])
    # a review that names no cell confirms none (the model's calls would reach the export as a hematologist's)
    hema = service.auth("hema")
    nothing = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema, json={"labels": {}})
    assert nothing.status_code == 200 and nothing.json()["changed"] == 0 and nothing.json()["status"] == "new"
    # asked to confirm the rest, an uncertain cell cannot be confirmed without a class (named by its id)
    refused = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema, json={"labels": {}, "confirm_rest": True})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "label_required"
    uncertain = next(c for c in case["cells"] if c["uncertain"])
    assert refused.json()["error"]["message"].startswith(f"cell {uncertain['id']} (number ")
    labels = {str(c["id"]): c["top_class"] for c in case["cells"] if c["uncertain"]}
    labels[str(case["cells"][0]["id"])] = "blast"
    done = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                       json={"labels": labels, "confirm_rest": True})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "reviewed"
    assert done.json()["case"]["differential"]["uncertain"] == 0
    assert done.json()["case"]["differential"]["total"] == 6


def test_a_review_sent_with_a_state_another_review_has_overtaken_is_refused(service):
    client = service.client()
    hema = service.auth("hema")
    case = upload(client, service.auth("tech"), ("a.png", encode(cell_image(), "PNG"))).json()
    cell, read = str(case["cells"][0]["id"]), case["review"]["state"]
    first = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                        json={"labels": {cell: "monocyte"}, "review_state": read})
    assert first.status_code == 200 and first.json()["case"]["review"]["state"] != read
    stale = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                        json={"labels": {cell: "lymphocyte"}, "review_state": read})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "review_conflict"
    now = client.get(f"/api/v1/cases/{case['id']}", headers=hema).json()
    assert now["cells"][0]["reviewed_label"] == "monocyte"  # nothing of the stale review was saved
    fresh = client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                        json={"labels": {cell: "lymphocyte"}, "review_state": now["review"]["state"]})
    assert fresh.status_code == 200 and fresh.json()["case"]["cells"][0]["reviewed_label"] == "lymphocyte"


def test_reviewed_labels_drive_the_differential(service):
    """5 blasts among 100 reviewed cells: 5.0% with the Wilson interval 2.2-11.2%, the same
    numbers the smear module reports (one implementation for the CLI and the service)."""
    from leukoscope.service.analysis import differential

    labels = ["blast"] * 5 + ["lymphocyte"] * 95
    result = differential(labels, ["blast", "lymphocyte", "monocyte", "neutrophil"], ["blast"])
    assert result["blast_percentage"] == pytest.approx(5.0)
    assert [round(v, 1) for v in result["blast_ci95"]] == [2.2, 11.2]
    assert result["total"] == 100 and result["uncertain"] == 0


# ------------------------------------------------------------------ service endpoints


def test_health_openapi_and_offline_docs(service):
    client = service.client()
    health = client.get("/api/v1/health").json()
    assert health["status"] == "ok" and health["smear_analysis"] is False and len(health["classes"]) == 4
    schema = client.get("/api/openapi.json").json()
    assert "/api/v1/cases" in schema["paths"] and "multipart/form-data" in \
        schema["paths"]["/api/v1/cases"]["post"]["requestBody"]["content"]
    docs = client.get("/api/docs")
    assert docs.status_code == 200 and "/api/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    assert client.get("/api/docs-assets/swagger-ui-bundle.js").status_code == 200
    missing = client.get("/api/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_smear_with_the_real_smear_analyzer(make_service, cell_bundle, tmp_path):
    """`leukoscope serve --detector`: the real SmearAnalyzer (an untrained Faster R-CNN that
    keeps every box, so the boxes are random) plugged into the service end to end."""
    import torch

    from leukoscope.bundle import BundleInfo, save_bundle
    from leukoscope.models import create_model
    from leukoscope.service.analysis import Analyzer

    torch.manual_seed(0)
    options = {"input_scale": 0.5, "score_thresh": 0.0, "detections_per_img": 8}
    model = create_model("fasterrcnn_abas", num_classes=3, **options)
    detector = save_bundle(tmp_path / "detector", model,
                           BundleInfo("fasterrcnn_abas", ["WBC", "RBC", "Platelets"], task="detect",
                                      model_options=options, score_threshold=0.0))
    analyzer = Analyzer.from_bundles(cell_bundle, detector, threads=1)
    try:
        service = make_service(analyzer_override=analyzer, detector=detector)
        service.add_user("tech", "technician")
        client, headers = service.client(), service.auth("tech")
        assert client.get("/api/v1/health").json()["smear_analysis"] is True
        field, _ = smear_field(1)
        response = upload(client, headers, ("field.jpg", encode(field, "JPEG")), kind="smear")
        assert response.status_code == 201, response.text
        case = response.json()
        assert case["differential"]["total"] == len(case["cells"])
        # the case says which models made it: weights digest and options, what ran them, no server path
        from leukoscope.bundle import read_bundle_info, weights_digest

        models = case["models"]
        assert models["detector"] == {"bundle": "detector", "model": "fasterrcnn_abas", "backend": "torch",
                                      "weights_sha256": weights_digest(detector),
                                      "model_options": read_bundle_info(detector).model_options}
        assert models["classifier"]["weights_sha256"] == weights_digest(cell_bundle)
        assert models["classifier"]["backend"] == "torch" and str(tmp_path) not in str(models)
        # a single cell on the same server: the detector took no part in it
        single = upload(client, headers, ("cell.png", encode(cell_image("blast", 1), "PNG"))).json()
        assert set(single["models"]) == {"classifier"} and single["models"]["classifier"] == models["classifier"]
        # an untrained detector records no test AP: the case carries the warning, stored with it,
        # and its differential raises no leukemia flag (also when recomputed after a review)
        assert case["differential"]["warnings"] and not case["differential"]["acute_leukemia_flag"]
        assert case["differential"]["flags"][0].startswith("WARNING: ")
        again = client.get(f"/api/v1/cases/{case['id']}", headers=headers).json()
        assert again["differential"]["warnings"] == case["differential"]["warnings"]
        # what the analyzer itself classified, from the same decoded upload
        decoded = Image.open(io.BytesIO(encode(field, "JPEG"))).convert("RGB")
        seen = analyzer.smear.cell_crops(decoded, analyzer.smear.analyse(decoded))
        assert len(seen) == len(case["cells"]) > 0
        for cell, expected in zip(case["cells"], seen):
            x0, y0, x1, y1 = cell["box"]
            assert 0 <= x0 < x1 <= field.width and 0 <= y0 < y1 <= field.height
            stored = client.get(cell["crop_url"], headers=headers)
            assert stored.status_code == 200
            # the stored crop is, pixel for pixel, the one the classifier saw (box plus margin)
            crop = Image.open(io.BytesIO(stored.content)).convert("RGB")
            assert np.array_equal(np.asarray(crop), np.asarray(expected))
        annotated = client.get(case["images"][0]["annotated_url"], headers=headers)
        drawn = Image.open(io.BytesIO(annotated.content))
        factor = enlargement(field.size)  # a small field is drawn enlarged
        assert drawn.width == field.width * factor and drawn.height > field.height * factor  # under its text band
        page = service.login("tech").get(f"/cases/{case['id']}")
        assert page.status_code == 200 and page.text.count('<figure class="cell') == len(case["cells"])
    finally:
        analyzer.close()


def windowed_analyzer(analyzer):
    """The tests' service analyzer with a classifier of a 24 um physical window (as the shipped one)."""
    import copy
    from dataclasses import replace

    from leukoscope.service.analysis import Analyzer

    windowed = copy.copy(analyzer.base)
    windowed.preprocessing = replace(windowed.preprocessing, cell_window_um=24.0)
    return Analyzer(windowed, gradcam=False, threads=1, name="abas_cnn, 24 um window")


def test_a_single_cell_upload_is_framed_at_the_classifiers_window(make_service, analyzer):
    """A classifier of a physical window sees that many micrometres around the upload's centre at the
    scale its red cells give (as `leukoscope predict`); the crop is kept for the export. An upload without a
    scale is classified whole, and its case carries a warning instead of any leukemia flag."""
    from tests.test_scale import smear_field

    framing = windowed_analyzer(analyzer)
    try:
        service = make_service(analyzer_override=framing)
        service.add_user("tech", "technician")
        client, headers = service.client(), service.auth("tech")
        case = upload(client, headers, ("field.png", encode(smear_field(20.0), "PNG"))).json()
        scale = case["images"][0]["scale"]
        assert scale["source"] == "estimated" and scale["um_per_px"] == pytest.approx(0.375, rel=0.08)
        crop = client.get(case["cells"][0]["crop_url"], headers=headers)
        side = Image.open(io.BytesIO(crop.content)).size[0]
        assert side == pytest.approx(24 / scale["um_per_px"], abs=1)  # 24 um at the upload's scale
        assert not any("No scale" in flag for flag in case["differential"]["flags"])
        blank = upload(client, headers, ("blank.png", encode(Image.new("RGB", (120, 90), (230, 220, 220)), "PNG")))
        blank = blank.json()
        assert blank["images"][0]["scale"]["source"] == "unknown" and blank["cells"][0]["crop_url"] is None
        assert any("No scale for a single-cell image" in flag for flag in blank["differential"]["flags"])
        # a case of enough images lends their scale to one without, as a folder does in `predict`
        fields = [(f"f{seed}.png", encode(smear_field(20.0, seed=seed), "PNG")) for seed in range(5)]
        lent = upload(client, headers, ("blank.png", encode(Image.new("RGB", (120, 90), (230, 220, 220)), "PNG")),
                      *fields).json()
        assert lent["images"][0]["scale"]["source"] == "run" and lent["cells"][0]["crop_url"] is not None
        assert lent["run_scale"]["um_per_px"] == pytest.approx(0.375, rel=0.08)
        assert not any("No scale" in flag for flag in lent["differential"]["flags"])
        page = service.login("tech").get(f"/cases/{lent['id']}").text
        assert page.count("not estimated from this image: the case&#39;s images together") == 1  # no "fields"
        # a scale the uploader states frames every image at it, the blank one too
        stated = client.post("/api/v1/cases", headers=headers, data={"kind": "cell", "um_per_px": "0.2"},
                             files=[("files", ("blank.png", encode(Image.new("RGB", (160, 160), (230, 220, 220)),
                                                                   "PNG"), "image/png"))]).json()
        assert stated["images"][0]["scale"] == {"um_per_px": 0.2, "source": "given", "red_cells": 0,
                                                "note": "stated by the user"}
        crop = client.get(stated["cells"][0]["crop_url"], headers=headers)
        assert Image.open(io.BytesIO(crop.content)).size[0] == 120  # 24 um at 0.2 um/px
        assert not any("No scale" in flag for flag in stated["differential"]["flags"])
    finally:
        framing.close()


def test_the_export_leaves_out_cells_classified_whole_for_want_of_a_scale(make_service, analyzer, tmp_path):
    """A single-cell image without a scale is classified whole; the export had put that whole, unscaled image
    beside 24 um crops, unmarked, and `train --data` learned cells of the wrong size. It is left out, and the
    export says how many and why (page, NOTES.txt, header)."""
    from tests.test_scale import smear_field

    framing = windowed_analyzer(analyzer)
    try:
        service = make_service(analyzer_override=framing)
        service.add_user("tech", "technician")
        service.add_user("hema", "hematologist")
        client, tech, hema = service.client(), service.auth("tech"), service.auth("hema")
        framed = upload(client, tech, ("field.png", encode(smear_field(20.0), "PNG"))).json()
        whole = upload(client, tech, ("blank.png", encode(Image.new("RGB", (120, 90), (230, 220, 220)), "PNG")))
        whole = whole.json()
        assert whole["cells"][0]["crop_url"] is None and framed["cells"][0]["crop_url"] is not None
        for case in (framed, whole):
            client.post(f"/api/v1/cases/{case['id']}/review", headers=hema,
                        json={"labels": {str(case["cells"][0]["id"]): "neutrophil"}})
        for layout in ("folders", "csv"):
            response = client.get(f"/api/v1/export?layout={layout}", headers=hema)
            assert response.status_code == 200 and response.headers["x-leukoscope-left-out"] == "1"
            with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
                images = [name for name in archive.namelist() if name.endswith(".png")]
                assert images and all(f"cell-{framed['cells'][0]['id']}.png" in name for name in images)
                notes = archive.read("NOTES.txt").decode()
                archive.extractall(tmp_path / layout)
            assert notes.startswith("1 reviewed cell(s) of 1 case(s) were left out") and whole["id"] in notes
        assert [s.label for s in read_dataset(tmp_path / "folders").samples] == ["neutrophil"]  # NOTES.txt unread
        page = html.unescape(" ".join(service.login("hema").get("/export").text.split()))
        assert "1 reviewed cell will be left out of the export: their single-cell image had no scale" in page
        assert f'href="/cases/{whole["id"]}"' in page
    finally:
        framing.close()


def test_a_stated_scale_single_cells_doubt_is_answered_by_a_full_review(make_service, analyzer):
    """Five single-cell images at 0.375 um/px stated as 0.8: their red cells doubt it in single-cell words (no
    cell is detected, so none is missed: the classes are what it puts in doubt), and once a hematologist has
    labelled every cell the doubt is answered, as "No scale for a single-cell image" is."""
    from tests.test_scale import smear_field

    framing = windowed_analyzer(analyzer)
    try:
        service = make_service(analyzer_override=framing)
        service.add_user("tech", "technician")
        service.add_user("hema", "hematologist")
        client = service.client()
        files = [("files", (f"c{seed}.png", encode(smear_field(20.0, seed=seed), "PNG"), "image/png"))
                 for seed in range(5)]
        case = client.post("/api/v1/cases", headers=service.auth("tech"), files=files,
                           data={"kind": "cell", "um_per_px": "0.8"}).json()
    finally:
        framing.close()
    (doubt,) = [w for w in case["differential"]["warnings"] if w.startswith("the stated scale")]
    assert doubt.startswith("the stated scale of these single-cell images, 0.8 um/px, is 2.1 times coarser")
    assert "its class may be wrong" in doubt and "white cells may be missed" not in doubt
    labels = {str(cell["id"]): "lymphocyte" for cell in case["cells"]}
    reviewed = client.post(f"/api/v1/cases/{case['id']}/review", headers=service.auth("hema"),
                           json={"labels": labels}).json()
    assert reviewed["status"] == "reviewed"
    after = client.get(f"/api/v1/cases/{case['id']}", headers=service.auth("hema")).json()["differential"]
    assert not any(w.startswith("the stated scale") for w in after["warnings"])


def test_a_stated_scale_is_refused_where_single_cells_are_taken_as_they_are(service):
    """A classifier without a physical window classifies an image whole: a scale stated for its single cells
    would change nothing, and saying so beats ignoring it."""
    client, headers = service.client(), service.auth("tech")
    response = client.post("/api/v1/cases", headers=headers, data={"kind": "cell", "um_per_px": "0.1"},
                           files=[("files", ("cell.png", encode(cell_image(), "PNG"), "image/png"))])
    assert response.status_code == 400 and response.json()["error"]["code"] == "scale_not_used"
    assert "leave um_per_px empty" in response.json()["error"]["message"]
    assert "the scale applies to smear fields only" in service.login("tech").get("/upload").text  # said on the form


def test_a_stated_scale_is_refused_by_a_smear_backend_that_cannot_take_one(make_service, analyzer):
    """A smear backend written before the stated scale (its analyse has no um_per_px) gave a 500 after the upload
    had counted against the rate limit; it is a 400 before any analysis."""
    from leukoscope.service.analysis import Analyzer
    from tests.service.helpers import FakeSmear

    class OlderSmear(FakeSmear):
        def analyse(self, image, run_um_per_px=None):
            return super().analyse(image, run_um_per_px)

    older = Analyzer(analyzer.base, smear=OlderSmear(), threads=1, name="abas_cnn + an older backend")
    try:
        service = make_service(analyzer_override=older)
        service.add_user("tech", "technician")
        client, headers = service.client(), service.auth("tech")
        refused = client.post("/api/v1/cases", headers=headers, data={"kind": "smear", "um_per_px": "0.1"},
                              files=[("files", ("f.png", encode(smear_field()[0], "PNG"), "image/png"))])
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "scale_not_used"
        assert "smear analyser takes no stated scale" in refused.json()["error"]["message"]
        assert upload(client, headers, ("f.png", encode(smear_field()[0], "PNG")), kind="smear").status_code == 201
    finally:
        older.close()


def test_a_flat_heatmap_is_shown_with_its_note() -> None:
    """The service drew a bare overlay: a flat map (no region pointed at) was an even tint under the caption
    "where the model found its evidence"; the CLI's figure says FLAT MAP. Flat is the raw map's verdict
    (GradCamMaps.flat): the scaled map of a collapsed model spans 0 to 1 like a real one's."""
    from leukoscope.inference.explain import overlay_heatmap
    from leukoscope.pixels import letterbox
    from leukoscope.service.analysis import explained, overlay_size

    image = cell_image()
    plain = letterbox(image, overlay_size(image, 32))
    stretched = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (32, 1))
    shown = explained(image, stretched, 32, flat=True)
    assert shown.size == plain.size
    assert not np.array_equal(np.asarray(shown), np.asarray(overlay_heatmap(plain, stretched)))  # the note
    assert np.array_equal(np.asarray(explained(image, stretched, 32, flat=False)),
                          np.asarray(overlay_heatmap(plain, stretched)))


def test_the_service_marks_a_collapsed_model_s_maps_flat(analyzer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both of the service's Grad-CAM paths (one forward pass for a single cell, batches for smear cells) judge
    flatness on the raw map: a model whose maps barely vary got full-range overlays without the note."""
    import torch

    from leukoscope.service import analysis

    class Collapsed(torch.nn.Module):  # one feature map: 1 everywhere, plus 0.5% of the red channel
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 1)
            self.head = torch.nn.Linear(1, classes)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([0.005, 0.0, 0.0]).view(1, 3, 1, 1))
                self.conv.bias.fill_(1.0)
                self.head.weight.fill_(1.0)
                self.head.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).mean(dim=(2, 3)))

    marked: list[bool] = []
    real = analysis.explained

    def recording(image: Image.Image, heatmap: np.ndarray, size: int, flat: bool) -> Image.Image:
        marked.append(flat)
        return real(image, heatmap, size, flat)

    monkeypatch.setattr(analysis, "explained", recording)
    classifier = copy.copy(analyzer.base)
    classifier.model, classifier.ood = Collapsed(len(classifier.classes)).eval(), None
    _, overlay = analyzer._predict_and_explain(classifier, cell_image(), "upload")
    overlays = analyzer._overlays(classifier, [cell_image(), cell_image()], [classifier.classes[0]] * 2)
    assert overlay is not None and all(o is not None for o in overlays) and marked == [True, True, True]


def test_two_reviews_sent_at_once_with_one_state_save_one_and_refuse_the_other(service):
    """On SQLite two reviews of one case sent together were both saved (17 of 20 page pairs), the later
    overwriting the earlier: each had read the case before either wrote. The second now waits for the
    first's write and is refused (409), as a review sent after it is."""
    import threading

    from sqlalchemy import select

    from leukoscope.service import cases as ops
    from leukoscope.service.auth import Principal
    from leukoscope.service.db import transaction
    from leukoscope.service.errors import ServiceError
    from leukoscope.service.tables import User

    client = service.client()
    case = upload(client, service.auth("tech"), ("a.png", encode(cell_image(), "PNG"))).json()
    cell_id, read = case["cells"][0]["id"], case["review"]["state"]
    loaded, outcomes = threading.Event(), {}

    def review(name: str, label: str, hold: float) -> None:
        try:
            with transaction(service.state.sessions) as db:
                principal = Principal(db.scalar(select(User).where(User.username == "hema")), "session")
                found = ops.load_case(db, principal, case["id"], action=None, for_update=True)
                loaded.set()
                time.sleep(hold)  # the other review is sent meanwhile
                ops.review_case(db, principal, found, {cell_id: label}, None, expected_state=read)
            outcomes[name] = "saved"
        except ServiceError as error:
            outcomes[name] = error.status

    first = threading.Thread(target=review, args=("first", "monocyte", 0.5))
    first.start()
    assert loaded.wait(10)
    second = threading.Thread(target=review, args=("second", "lymphocyte", 0.0))
    second.start()
    first.join(30), second.join(30)
    assert outcomes == {"first": "saved", "second": 409}
    now = client.get(f"/api/v1/cases/{case['id']}", headers=service.auth("hema")).json()
    assert now["cells"][0]["reviewed_label"] == "monocyte"


def test_a_cell_image_without_a_white_cell_at_its_centre_holds_back_the_flag(service):
    """A smear field of red cells uploaded among single cells was called blast at 0.78, and the case of six
    cells and that field carried no warning (one unfamiliar image of seven is under the 30% gate)."""
    from PIL import Image

    client = service.client()
    red_cells = Image.new("RGB", (96, 96), (236, 226, 222))
    for x, y in ((10, 10), (50, 12), (12, 52), (52, 54)):  # pink red cells, nothing violet
        red_cells.paste((205, 135, 150), (x, y, x + 30, y + 30))
    files = [(f"c{k}.png", encode(cell_image(seed=k), "PNG")) for k in range(6)] + [("red.png", encode(red_cells,
                                                                                                       "PNG"))]
    case = upload(client, service.auth("tech"), *files).json()
    (warning,) = [w for w in case["differential"]["warnings"] if w.startswith("No white cell at the image's centre")]
    assert "red.png" in warning and "c0.png" not in warning
    assert case["differential"]["acute_leukemia_flag"] is not True
    only_cells = upload(client, service.auth("tech"), *files[:6]).json()
    assert not any(w.startswith("No white cell") for w in only_cells["differential"]["warnings"])


def test_a_cell_image_too_small_to_show_a_cell_says_so(service):
    """A 1 x 1 PNG was called eosinophil at 0.995 and a 20 x 20 blur blast at 0.67, with nothing said."""
    from PIL import Image

    client = service.client()
    tiny = upload(client, service.auth("tech"), ("tiny.png", encode(Image.new("RGB", (20, 20), (150, 90, 170)),
                                                                    "PNG"))).json()
    (warning,) = [w for w in tiny["differential"]["warnings"] if w.startswith("Too small to show a cell")]
    assert "20 x 20 px" in warning and not tiny["differential"]["acute_leukemia_flag"]
    fine = upload(client, service.auth("tech"), ("a.png", encode(cell_image(), "PNG"))).json()
    assert not any(w.startswith("Too small") for w in fine["differential"]["warnings"])
