"""End to end in a real browser: Debian's chromium driven by Playwright (no browser
download). A technician logs in and uploads two cells, sees the result (class,
probabilities, Grad-CAM); a hematologist corrects one cell and saves (the other stays unreviewed),
confirms the other with "confirm every cell not reviewed", comments, and exports the reviewed labels.
Screenshots are kept in test-artifacts/browser/ (git-ignored) for a person to look at after the run."""

from __future__ import annotations

import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from tests.service.helpers import PASSWORD, cell_image, smear_field

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium; "
                                                     ".ci/run installs it)"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(make_service, request):
    import uvicorn

    smear = request.node.get_closest_marker("smear") is not None
    service = make_service(analyzer_override=request.getfixturevalue("smear_analyzer") if smear else None)
    service.add_user("tech", "technician")
    service.add_user("hema", "hematologist")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def shots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _log_in(page, base: str, username: str) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/cases")


def test_login_upload_result_review_export(live_server, browser, tmp_path, shots):
    base, service = live_server
    images = []
    for label, seed in (("blast", 21), ("lymphocyte", 22)):
        path = tmp_path / f"{label}.png"
        cell_image(label, seed, size=96).save(path)
        images.append(str(path))
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)

    # wrong password first: a message, no session
    page.goto(f"{base}/login")
    page.fill("input[name=username]", "tech")
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert "Wrong user name or password" in page.inner_text("#login-error")

    # technician: log in, upload two cells, see the result
    _log_in(page, base, "tech")
    assert "not a diagnosis" in page.inner_text("#decision-support")
    page.click("text=Upload")
    page.set_input_files("input[type=file]", images)
    page.fill("input[name=note]", "e2e sample")
    page.click("form[action='/upload'] button[type=submit]")
    page.wait_for_url(f"{base}/cases/*")
    case_url = page.url
    results = page.locator("section.result")
    assert results.count() == 2
    assert page.locator("table.probs").first.locator("tr").count() == 4
    assert page.locator("meter").count() == 8
    first_label = page.locator(".prediction").first.inner_text()
    assert any(name in first_label for name in ("blast", "lymphocyte", "monocyte", "neutrophil"))
    heatmaps = page.locator("img.heatmap")
    assert heatmaps.count() == 2
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert heatmaps.first.evaluate("i => i.naturalWidth") == 96  # drawn at the cell image's own size
    page.screenshot(path=str(shots / "result.png"), full_page=True)
    page.click("button:has-text('Log out')")
    page.wait_for_url(f"{base}/login")

    # hematologist: case list, review (correct one cell, confirm the other), comment
    _log_in(page, base, "hema")
    row = page.locator("#case-list tbody tr").first
    assert "new" in row.inner_text()
    row.locator("a").first.click()
    page.wait_for_url(case_url)
    selects = page.locator("#review-form select")
    assert selects.count() == 2
    assert [selects.nth(i).input_value() for i in range(2)] == ["", ""]  # nothing chosen for the reviewer
    # one correction saved: the other cell stays unreviewed (it was confirmed unseen), and the case new
    selects.nth(0).select_option("monocyte")
    page.fill("textarea[name=comment]", "first cell corrected to monocyte")
    page.click("#save-review")
    page.wait_for_selector("#review-saved")
    assert page.inner_text("#case-status") == "new"
    assert "1 of 2 cells not reviewed yet" in page.inner_text("#review-progress")
    selects = page.locator("#review-form select")
    assert [selects.nth(i).input_value() for i in range(2)] == ["monocyte", ""]
    # then the explicit "confirm the rest" (an uncertain cell needs the hematologist's class)
    second = selects.nth(1)
    if page.locator("section.result").nth(1).locator(".uncertain").count():
        second.select_option("lymphocyte")
    page.click("#confirm-rest")
    page.wait_for_selector("#review-saved")
    assert page.inner_text("#case-status") == "reviewed"
    assert "corrected" in page.locator(".reviewed").first.inner_text() or \
        page.locator(".reviewed").first.inner_text().endswith("monocyte")
    page.screenshot(path=str(shots / "reviewed.png"), full_page=True)

    page.click("text=Cases")
    assert "reviewed" in page.locator("#case-list tbody tr").first.inner_text()

    # export the reviewed labels as class folders
    page.click("text=Export")
    assert "monocyte" in page.inner_text("#export-counts")
    with page.expect_download() as download_info:
        page.click("#export-folders")
    archive = tmp_path / "export.zip"
    download_info.value.save_as(archive)
    with zipfile.ZipFile(archive) as zf:
        folders = sorted({name.split("/")[0] for name in zf.namelist()})
    assert "monocyte" in folders and len(zf.namelist()) == 2
    page.screenshot(path=str(shots / "export.png"), full_page=True)
    assert not [e for e in errors if "Content Security Policy" in e], errors
    context.close()
    assert all((shots / f"{name}.png").stat().st_size > 10_000 for name in ("result", "reviewed", "export"))
    print(f"screenshots: {shots}")


@pytest.mark.smear
def test_smear_field_page(live_server, browser, tmp_path, shots):
    """With a detector plugged in (a stand-in for SmearAnalyzer): annotated field, a gallery
    of every detected cell with class and confidence, the differential, the blast percentage
    with its interval, and "uncertain, review" flags."""
    base, _service = live_server
    field, boxes = smear_field()
    path = tmp_path / "field.png"
    field.save(path)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _log_in(page, base, "tech")
    page.click("text=Upload")
    page.check("input[value=smear]")
    page.set_input_files("input[type=file]", str(path))
    page.fill("#um_per_px", "0.1 um")  # not a number: refused, and the form comes back as typed
    page.click("form[action='/upload'] button[type=submit]")
    assert "um_per_px must be the microscope's scale" in page.inner_text("#upload-error")
    assert page.input_value("#um_per_px") == "0.1 um" and page.is_checked("input[value=smear]")
    assert "Choose the image files again" in page.inner_text("#choose-again")
    page.screenshot(path=str(shots / "upload-refused.png"), full_page=True)
    page.set_input_files("input[type=file]", str(path))  # a browser never refills a file input
    page.fill("#um_per_px", "0.1")  # the microscope's scale, stated on the form
    page.click("form[action='/upload'] button[type=submit]")
    page.wait_for_url(f"{base}/cases/*")
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("img.annotated").evaluate("i => i.naturalWidth") == field.width
    assert page.locator("p.scale").inner_text() == "scale 0.1000 um/px, stated (um_per_px)"
    assert page.locator("figure.cell").count() == len(boxes)
    assert page.locator("figure.cell .flag", has_text="uncertain, review").count() >= 1
    assert "95% Wilson interval" in page.inner_text("#blast-percent")
    page.screenshot(path=str(shots / "smear.png"), full_page=True)
    page.close()
