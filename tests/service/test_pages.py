"""The server-rendered pages: log in, cookies, CSRF, upload errors as messages,
case list and result, review form, export page, account tokens, admin."""

from __future__ import annotations

import html
import re

import pytest

from leukoscope.service.auth import SESSION_COOKIE
from tests.service.helpers import PASSWORD, FakeSmear, cell_image, csrf_of, encode, review_state_of, smear_field

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def page_upload(client, files, csrf, kind="cell"):
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/upload", files=parts, data={"kind": kind, "csrf_token": csrf}, follow_redirects=False)


def test_login_wrong_password_and_unknown_user(service):
    client = service.client()
    for username, password in (("tech", "wrong password"), ("nobody", PASSWORD)):
        form = client.get("/login")
        response = client.post("/login", data={"username": username, "password": password,
                                               "csrf_token": csrf_of(form.text)})
        assert response.status_code == 401 and "Wrong user name or password" in response.text
        assert SESSION_COOKIE not in response.cookies
    assert client.get("/cases", follow_redirects=False).headers["location"].startswith("/login")


def test_session_cookie_flags_and_logout(service):
    client = service.client()
    form = client.get("/login")
    response = client.post("/login", data={"username": "tech", "password": PASSWORD, "csrf_token": csrf_of(form.text),
                                           "next": "/upload"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/upload"
    cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "="))
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert "httponly" in flags and "samesite=lax" in flags and "path=/" in flags
    assert "secure" not in flags  # plain http on the test client; "always" below
    page = client.get("/cases")
    assert page.status_code == 200 and "My cases" in page.text
    # the database keeps a hash of the cookie, not the cookie
    token = response.cookies[SESSION_COOKIE]
    from leukoscope.service.tables import WebSession

    with service.state.sessions() as db:
        assert db.get(WebSession, token) is None and db.query(WebSession).count() == 1
    logout = client.post("/logout", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert logout.status_code == 303
    client.cookies.set(SESSION_COOKIE, token)  # a stolen cookie is dead after log-out
    assert client.get("/cases", follow_redirects=False).status_code == 303


def test_secure_cookie_setting(make_service):
    service = make_service(secure_cookies="always")
    service.add_user("tech", "technician")
    client = service.client(base_url="https://testserver")
    form = client.get("/login")
    response = client.post("/login", data={"username": "tech", "password": PASSWORD,
                                           "csrf_token": csrf_of(form.text)}, follow_redirects=False)
    cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "="))
    assert "secure" in {p.strip().lower() for p in cookie.split(";")}


@pytest.mark.parametrize("target", ["//evil.example/x", "/\\evil.example/x", "/\\/evil.example",
                                    "https://evil.example/", "\\\\evil.example"])
def test_open_redirect_after_login_is_refused(service, target):
    """Browsers read a backslash as a slash: "/\\evil.example" goes to evil.example."""
    client = service.client()
    form = client.get("/login")
    response = client.post("/login", data={"username": "tech", "password": PASSWORD, "csrf_token": csrf_of(form.text),
                                           "next": target}, follow_redirects=False)
    assert response.headers["location"] == "/"


def test_a_same_site_path_is_where_log_in_goes(service):
    client = service.client()
    form = client.get("/login")
    response = client.post("/login", data={"username": "tech", "password": PASSWORD, "csrf_token": csrf_of(form.text),
                                           "next": "/cases?status=new"}, follow_redirects=False)
    assert response.headers["location"] == "/cases?status=new"


def test_csrf_is_required_on_every_form(service):
    client = service.client()
    client.get("/login")
    no_token = client.post("/login", data={"username": "tech", "password": PASSWORD})
    assert no_token.status_code == 403 and "expired" in no_token.text
    service.login("tech", client=client)
    png = encode(cell_image(), "PNG")
    forged = page_upload(client, [("a.png", png)], "forged-token")
    assert forged.status_code == 403 and service.rows()["cases"] == 0
    good = page_upload(client, [("a.png", png)], csrf_of(client.get("/upload").text))
    assert good.status_code == 303
    case_url = good.headers["location"]
    hema = service.login("hema")
    page = hema.get(case_url)
    cell_id = re.search(r'name="label_(\d+)"', page.text).group(1)
    forged = hema.post(f"{case_url}/review", data={f"label_{cell_id}": "monocyte", "csrf_token": "x"})
    assert forged.status_code == 403
    missing = hema.post(f"{case_url}/review", data={f"label_{cell_id}": "monocyte"})
    assert missing.status_code == 403
    assert "status-new" in hema.get(case_url).text
    assert hema.post("/logout", data={}).status_code == 403


def test_security_headers(service):
    client = service.login("tech")
    response = client.get("/cases")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"


def test_upload_page_result_and_review(service):
    tech = service.login("tech")
    upload = tech.get("/upload")
    assert "not a diagnosis" in upload.text
    response = page_upload(tech, [("blast.png", encode(cell_image("blast", 11), "PNG")),
                                  ("mono.bmp", encode(cell_image("monocyte", 12), "BMP"))], csrf_of(upload.text))
    assert response.status_code == 303
    case_url = response.headers["location"]
    page = tech.get(case_url)
    assert page.status_code == 200
    assert page.text.count("<meter") == 8  # 4 class probabilities x 2 cells
    assert page.text.count("/overlay") == 2 and "Grad-CAM" in page.text
    assert "Differential (2 white cells" in page.text and "per 100 white cells" in page.text
    assert 'id="not-white"' not in page.text  # no erythroblast or platelet class among this model's
    assert "blast.png" in page.text and "mono.bmp" in page.text
    assert "not a diagnosis" in page.text and 'id="review-form"' not in page.text  # technicians do not review
    assert tech.post(f"{case_url}/review", data={"csrf_token": csrf_of(page.text)}).status_code == 403
    listing = tech.get("/cases")
    assert case_url.rsplit("/", 1)[1][:8] in listing.text and "status-new" in listing.text

    hema = service.login("hema")
    page = hema.get(case_url)
    assert 'id="review-form"' in page.text
    ids = re.findall(r'name="label_(\d+)"', page.text)
    assert len(ids) == 2
    form = {f"label_{ids[0]}": "lymphocyte", "comment": "first cell is a lymphocyte", "csrf_token": csrf_of(page.text),
            "review_state": review_state_of(page.text)}
    # the second cell keeps the class its select shows (the predicted one) unless it is uncertain
    selected = re.search(rf'name="label_{ids[1]}".*?<option value="([^"]*)" selected', page.text, re.S).group(1)
    form[f"label_{ids[1]}"] = selected or "monocyte"
    saved = hema.post(f"{case_url}/review", data=form, follow_redirects=True)
    assert saved.status_code == 200 and "Review saved" in saved.text and 'id="case-status">reviewed' in saved.text
    assert "first cell is a lymphocyte" in saved.text
    assert "status-reviewed" in tech.get("/cases").text
    assert "first cell is a lymphocyte" in tech.get(case_url).text
    export = hema.get("/export")
    assert "lymphocyte" in export.text and 'id="export-folders"' in export.text
    archive = hema.post("/export/dataset.zip", data={"layout": "folders", "csrf_token": csrf_of(export.text)})
    assert archive.status_code == 200 and archive.content[:2] == b"PK"
    assert tech.get("/export").status_code == 403


def test_upload_errors_are_messages_on_the_page(make_service):
    service = make_service(rate_limit_per_minute=2)
    service.add_user("tech", "technician")
    tech = service.login("tech")
    csrf = csrf_of(tech.get("/upload").text)
    bad = page_upload(tech, [("x.jpg", b"hello, not an image")], csrf)
    assert bad.status_code == 415 and 'id="upload-error"' in bad.text and "not an image" in bad.text
    empty = page_upload(tech, [("zero.png", b"")], csrf)
    assert empty.status_code == 400 and "empty" in empty.text
    limited = page_upload(tech, [("a.png", encode(cell_image(), "PNG"))], csrf)
    assert limited.status_code == 429 and "too many uploads" in limited.text
    assert service.rows()["cases"] == 0


def test_pages_enforce_roles(service):
    admin = service.login("admin")
    assert admin.get("/cases", follow_redirects=False).headers["location"] == "/admin/users"
    assert admin.get("/upload").status_code == 403
    tech = service.login("tech")
    assert tech.get("/admin/users").status_code == 403 and tech.get("/admin/audit").status_code == 403
    csrf = csrf_of(tech.get("/upload").text)
    case_url = page_upload(tech, [("a.png", encode(cell_image(), "PNG"))], csrf).headers["location"]
    other = service.login("tech2")
    refused = other.get(case_url)
    assert refused.status_code == 404 and "not yours" in refused.text
    assert case_url.rsplit("/", 1)[1][:8] not in other.get("/cases").text


def test_login_throttling(make_service):
    service = make_service(login_failures_allowed=3)
    service.add_user("tech", "technician")
    client = service.client()
    codes = []
    for _ in range(4):
        form = client.get("/login")
        codes.append(client.post("/login", data={"username": "tech", "password": "nope nope",
                                                 "csrf_token": csrf_of(form.text)}).status_code)
    assert codes == [401, 401, 401, 429]
    form = client.get("/login")  # even the right password waits now
    assert client.post("/login", data={"username": "tech", "password": PASSWORD,
                                       "csrf_token": csrf_of(form.text)}).status_code == 429


def test_a_new_token_is_shown_once_and_a_reload_makes_no_second(service):
    """The page that showed a new token answered the form's POST: reloading it posted the form again (the
    password with it) and made a second token. Now the POST redirects, and the token is shown once."""
    from leukoscope.service.routes_pages import NEW_TOKEN_COOKIE
    from leukoscope.service.tables import ApiToken

    tech = service.login("tech")
    created = tech.post("/account/tokens", data={"name": "scanner", "password": PASSWORD,
                                                 "csrf_token": csrf_of(tech.get("/account").text)},
                        follow_redirects=False)
    assert created.status_code == 303 and created.headers["location"] == "/account"
    shown = tech.get("/account")
    secret = re.search(r'id="new-token">([^<]+)<', shown.text).group(1)
    assert secret.startswith("lks_") and "shown only once" in shown.text
    reloaded = tech.get("/account")  # what a reload does now: a GET
    assert 'id="new-token"' not in reloaded.text and service.count(ApiToken) == 1
    # a cookie carrying anything but this user's fresh token shows nothing
    other = service.login("hema")
    other.cookies.set(NEW_TOKEN_COOKIE, secret, path="/account")
    assert 'id="new-token"' not in other.get("/account").text
    other.cookies.set(NEW_TOKEN_COOKIE, "<b>not a token</b>", path="/account")
    page = other.get("/account").text
    assert 'id="new-token"' not in page and "not a token" not in page


def test_account_tokens_and_admin_pages(service):
    tech = service.login("tech")
    account = tech.get("/account")
    created = tech.post("/account/tokens", data={"name": "scanner", "password": PASSWORD,
                                                 "csrf_token": csrf_of(account.text)})
    token = re.search(r'id="new-token">([^<]+)<', created.text).group(1)
    assert token.startswith("lks_")
    assert tech.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()["username"] == "tech"
    token_id = re.search(r'/account/tokens/(\d+)/revoke', created.text).group(1)
    tech.post(f"/account/tokens/{token_id}/revoke", data={"csrf_token": csrf_of(created.text)})
    assert service.client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401

    admin = service.login("admin")
    users = admin.get("/admin/users")
    made = admin.post("/admin/users", data={"username": "newhema", "password": "long enough 2", "role": "hematologist",
                                            "csrf_token": csrf_of(users.text)})
    assert made.status_code == 200 and "User newhema created" in made.text
    dup = admin.post("/admin/users", data={"username": "newhema", "password": "long enough 2", "role": "hematologist",
                                           "csrf_token": csrf_of(users.text)})
    assert dup.status_code == 409 and "already exists" in dup.text
    service.login("newhema", "long enough 2")
    # deactivating a user ends their sessions
    from leukoscope.service.tables import User

    with service.state.sessions() as db:
        tech_user = db.query(User).filter_by(username="tech").one()
    admin.post(f"/admin/users/{tech_user.id}", data={"role": "technician", "active": "0",
                                                     "csrf_token": csrf_of(users.text)})
    assert tech.get("/cases", follow_redirects=False).status_code == 303
    audit = admin.get("/admin/audit")
    assert "user.update" in audit.text and "token.revoke" in audit.text and "login.failed" not in audit.text


def test_a_refused_user_form_changes_nothing(service):
    """The admin's Save of role, activity and password together: a password too short refuses the
    whole form, so the role is not changed, the user's session goes on and the audit log has no update."""
    from leukoscope.service.tables import AuditEntry, User

    tech = service.login("tech")
    admin = service.login("admin")
    users = admin.get("/admin/users")
    with service.state.sessions() as db:
        tech_id = db.query(User).filter_by(username="tech").one().id
        audited = db.query(AuditEntry).count()
    for form in ({"role": "hematologist", "active": "1", "password": "short"},
                 {"role": "technician", "active": "0", "password": "short"},
                 {"role": "no-such-role", "active": "0"}):
        refused = admin.post(f"/admin/users/{tech_id}", data={**form, "csrf_token": csrf_of(users.text)})
        assert refused.status_code == 400
    with service.state.sessions() as db:
        user = db.get(User, tech_id)
        assert (user.role, user.active) == ("technician", True)
        assert db.query(AuditEntry).count() == audited
    assert tech.get("/cases", follow_redirects=False).status_code == 200  # still logged in


def test_smear_pages(make_service, smear_analyzer):
    service = make_service(analyzer_override=smear_analyzer)
    service.add_user("tech", "technician")
    tech = service.login("tech")
    upload = tech.get("/upload")
    assert 'value="smear" disabled' not in upload.text
    field, boxes = smear_field()
    response = page_upload(tech, [("field.png", encode(field, "PNG"))], csrf_of(upload.text), kind="smear")
    assert response.status_code == 303
    page = tech.get(response.headers["location"]).text
    assert "/annotated" in page and page.count('<figure class="cell') == len(boxes)
    assert "uncertain, review" in page and 'id="differential"' in page
    assert re.search(r"95% Wilson interval \d+\.\d–\d+\.\d%", page)
    annotated_url = re.search(r'src="(/api/v1/cases/[^"]+/annotated)"', page).group(1)
    assert tech.get(annotated_url).headers["content-type"] == "image/png"


def test_a_page_refused_for_the_role_says_so_and_offers_another_account(service):
    """A technician opening /export saw "Something went wrong (403)" above the right message, and a "Log in"
    link although logged in: now "Log in as another user" (a shared workstation's technician may need the
    hematologist's account)."""
    tech = service.login("tech")
    refused = tech.get("/export")
    assert refused.status_code == 403
    page = " ".join(refused.text.split())
    assert '<h1 id="error-heading">Not allowed for your role</h1>' in page and "Something went wrong" not in page
    assert "this needs the role hematologist; you are technician" in page
    assert '<a href="/login">Log in as another user</a>' in page
    missing = service.client().get("/no-such-page")  # anything else keeps its status, and offers log-in
    assert missing.status_code == 404 and "Not found" in missing.text and 'href="/login"' in missing.text


def test_a_field_with_one_detected_cell_says_cell(make_service, analyzer):
    """The case page said "1 detected cells"."""
    from leukoscope.service.analysis import Analyzer

    one = FakeSmear()
    one.boxes = one.boxes[:1]
    shared = Analyzer(analyzer.base, smear=one, threads=1, name="abas_cnn + fake detector of one cell")
    try:
        service = make_service(analyzer_override=shared)
        service.add_user("tech", "technician")
        tech = service.login("tech")
        upload = tech.get("/upload")
        response = page_upload(tech, [("field.png", encode(smear_field()[0], "PNG"))], csrf_of(upload.text),
                               kind="smear")
        page = " ".join(tech.get(response.headers["location"]).text.split())
    finally:
        shared.close()
    assert "<h3>1 detected cell</h3>" in page and "1 detected cells" not in page


def test_an_upload_from_another_sites_page_is_refused_before_its_body_is_read(make_service):
    """A form posted from another origin (a sibling subdomain sends the session cookie with SameSite=Lax)
    cannot carry this page's CSRF token, and an oversized body from it must not be audited or use the user's
    uploads of this minute: it is refused on its Sec-Fetch-Site header before the body is read."""
    service = make_service(max_upload_bytes=16 * 1024, rate_limit_per_minute=1)
    service.add_user("tech", "technician")
    service.add_user("admin", "admin")
    tech = service.login("tech")
    csrf = csrf_of(tech.get("/upload").text)
    big = [("big.png", b"\0" * (16 * 1024 + 300 * 1024))]
    for site in ("same-site", "cross-site"):
        parts = [("files", (name, data, "application/octet-stream")) for name, data in big]
        response = tech.post("/upload", files=parts, data={"kind": "cell", "csrf_token": csrf},
                             headers={"Sec-Fetch-Site": site}, follow_redirects=False)
        assert response.status_code == 403 and "did not come from this site" in response.text
    entries = service.client().get("/api/v1/audit", headers=service.auth("admin")).json()["entries"]
    assert [e for e in entries if e["action"] in ("case.refused", "upload.throttled")] == []
    # the user's one upload of this minute is still theirs, from this site's own page
    page = tech.post("/upload", files=[("files", ("a.png", encode(cell_image(), "PNG"), "image/png"))],
                     data={"kind": "cell", "csrf_token": csrf}, headers={"Sec-Fetch-Site": "same-origin"},
                     follow_redirects=False)
    assert page.status_code == 303 and service.rows()["cases"] == 1


def _page_form(page: str, **labels: str) -> dict:
    """The review form as the page shows it (each cell's selected class), with ``labels`` changed."""
    form = {"csrf_token": csrf_of(page), "review_state": review_state_of(page),
            "comment": re.search(r'<textarea name="comment"[^>]*>([^<]*)</textarea>', page).group(1)}
    for cell_id in re.findall(r'name="label_(\d+)"', page):
        shown = re.search(rf'name="label_{cell_id}".*?<option value="([^"]*)" selected', page, re.S).group(1)
        form[f"label_{cell_id}"] = labels.get(cell_id) or shown or "lymphocyte"
    return form


def test_saving_one_correction_on_the_page_confirms_no_other_cell(service):
    """The page's form pre-selected every cell's predicted class, so saving one correction wrote the other
    cells as the hematologist's confirmations (50 of 51). Now a cell left at "not reviewed" stays unreviewed,
    unless the reviewer presses "confirm every cell not reviewed"."""
    from leukoscope.service.tables import Cell

    tech = service.login("tech")
    files = [(f"{i}.png", encode(cell_image(label, 30 + i), "PNG"))
             for i, label in enumerate(["blast", "lymphocyte", "monocyte"])]
    case_url = page_upload(tech, files, csrf_of(tech.get("/upload").text)).headers["location"]
    hema = service.login("hema")
    page = hema.get(case_url).text
    ids = re.findall(r'name="label_(\d+)"', page)
    assert len(ids) == 3 and page.count('<option value="" selected>— not reviewed —</option>') == 3
    form = {"csrf_token": csrf_of(page), "review_state": review_state_of(page), "comment": "",
            f"label_{ids[0]}": "neutrophil", f"label_{ids[1]}": "", f"label_{ids[2]}": ""}
    assert hema.post(f"{case_url}/review", data=form, follow_redirects=False).status_code == 303
    with service.state.sessions() as db:
        reviewed = {str(cell.id): cell.reviewed_label for cell in db.query(Cell)}
    assert reviewed == {ids[0]: "neutrophil", ids[1]: None, ids[2]: None}
    page = hema.get(case_url).text
    assert 'id="case-status">new' in page and "2 of 3 cells not reviewed yet" in page
    # the explicit choice: every cell left alone is confirmed in its class (uncertain ones need a class)
    with service.state.sessions() as db:
        cells = {str(cell.id): cell for cell in db.query(Cell)}
    assert not all(cells[i].uncertain for i in ids[1:])
    left = ids[2] if not cells[ids[2]].uncertain else ids[1]  # a confident cell, left alone
    chosen = next(i for i in ids[1:] if i != left)
    form = {"csrf_token": csrf_of(page), "review_state": review_state_of(page), "comment": "", "confirm_rest": "1",
            f"label_{ids[0]}": "neutrophil", f"label_{chosen}": "monocyte", f"label_{left}": ""}
    assert hema.post(f"{case_url}/review", data=form, follow_redirects=False).status_code == 303
    with service.state.sessions() as db:
        cells = {str(cell.id): cell for cell in db.query(Cell)}
    assert (cells[chosen].reviewed_label, cells[left].reviewed_label) == ("monocyte", cells[left].top_class)
    assert 'id="case-status">reviewed' in hema.get(case_url).text


def test_the_same_review_sent_twice_is_saved_not_refused(service):
    """A review form sent twice (a double click, or back and send again) was answered 409 "another review of this
    case was saved after you opened it, so nothing was saved": the reviewer's own first send had changed the
    state, and what they sent was saved. The second send changes nothing and is answered as saved; a stale form
    that would change something is still refused."""
    from leukoscope.service.tables import Case, CellReview

    service.add_user("hema2", "hematologist")
    tech = service.login("tech")
    case_url = page_upload(tech, [("a.png", encode(cell_image("blast", 11), "PNG"))],
                           csrf_of(tech.get("/upload").text)).headers["location"]
    hema, other = service.login("hema"), service.login("hema2")
    page, other_page = hema.get(case_url).text, other.get(case_url).text  # both before any review
    (cell_id,) = re.findall(r'name="label_(\d+)"', page)
    form = {**_page_form(page, **{cell_id: "monocyte"}), "comment": "monocyte, not a blast"}
    assert hema.post(f"{case_url}/review", data=form, follow_redirects=False).status_code == 303
    again = hema.post(f"{case_url}/review", data=form, follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"].endswith("?saved=1")
    with service.state.sessions() as db:
        reviews = db.query(CellReview).count()
    assert reviews == 1  # nothing written twice
    # another hematologist's agreeing form, from a page opened before, changes nothing either: the case stays
    # reviewed by the first
    agreeing = {**_page_form(other_page, **{cell_id: "monocyte"}), "comment": "monocyte, not a blast"}
    assert other.post(f"{case_url}/review", data=agreeing, follow_redirects=False).status_code == 303
    with service.state.sessions() as db:
        case = db.query(Case).one()
        assert case.reviewer.username == "hema"
    changed = hema.post(f"{case_url}/review", data={**form, f"label_{cell_id}": "lymphocyte"})
    assert changed.status_code == 409 and "nothing was saved" in changed.text


def test_a_review_from_a_page_another_review_has_overtaken_saves_nothing(service):
    """Two hematologists open a case; the first corrects a cell and comments; the second's form, which
    sends every cell's class as their page showed it, must not silently undo that (it did: last save won)."""
    tech = service.login("tech")
    case_url = page_upload(tech, [("a.png", encode(cell_image("blast", 11), "PNG"))],
                           csrf_of(tech.get("/upload").text)).headers["location"]
    first, second = service.login("hema"), service.login("hema")  # two sessions: two tabs or two people
    page_a, page_b = first.get(case_url).text, second.get(case_url).text
    (cell_id,) = re.findall(r'name="label_(\d+)"', page_a)
    saved = first.post(f"{case_url}/review", data={**_page_form(page_a, **{cell_id: "monocyte"}),
                                                   "comment": "corrected to monocyte (A)"}, follow_redirects=False)
    assert saved.status_code == 303
    stale = second.post(f"{case_url}/review", data={**_page_form(page_b, **{cell_id: "lymphocyte"}),
                                                    "comment": "B's long comment\nsecond line"})
    assert stale.status_code == 409 and "another review of this case was saved after you opened it" in stale.text
    assert "corrected to monocyte (A)" in stale.text  # the page now shows what was saved
    # ... and keeps what the second reviewer sent in view, so that it is not lost
    unsaved = re.search(r'<div class="unsaved" id="unsaved-comment">.*?<blockquote>(.*?)</blockquote>', stale.text,
                        re.S)
    assert unsaved and html.unescape(unsaved.group(1)) == "B's long comment\nsecond line"
    assert "Your choice, not saved: <strong>lymphocyte</strong>" in stale.text
    shown = first.get(case_url).text
    assert re.search(rf'name="label_{cell_id}".*?<option value="monocyte" selected', shown, re.S)
    assert "corrected to monocyte (A)" in shown
    # from the page it now shows, the second reviewer's change is saved
    again = second.post(f"{case_url}/review", data=_page_form(stale.text, **{cell_id: "lymphocyte"}),
                        follow_redirects=False)
    assert again.status_code == 303
    assert re.search(rf'name="label_{cell_id}".*?<option value="lymphocyte" selected', first.get(case_url).text,
                     re.S)
    # a form without the state is a stale one; a non-ASCII digit in a field name is no cell (it was a 500)
    page = first.get(case_url).text
    assert first.post(f"{case_url}/review", data={k: v for k, v in _page_form(page, **{cell_id: "basophil"}).items()
                                                  if k != "review_state"}).status_code == 409
    odd = first.post(f"{case_url}/review", data={**_page_form(page), "label_\u00b2": "blast"}, follow_redirects=False)
    assert odd.status_code == 303


def test_an_expired_session_logs_out(service):
    """No test let a session expire: removing the expiry check passed every test."""
    from datetime import timedelta

    from sqlalchemy import update

    from leukoscope.service.tables import WebSession, utcnow

    client = service.login("tech")
    assert client.get("/cases", follow_redirects=False).status_code == 200
    with service.state.sessions() as db, db.begin():
        db.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    gone = client.get("/cases", follow_redirects=False)
    assert gone.status_code in (302, 303) and gone.headers["location"].startswith("/login")
    service.login("tech")  # a new log-in tidies expired sessions away: the new one is left
    assert service.count(WebSession) == 1


def test_the_case_page_says_what_coarse_heatmaps_can_show(service, monkeypatch: pytest.MonkeyPatch):
    """The page captioned every map "where the model found its evidence"; the shipped classifier's maps are
    3 x 3 and those of unrelated cells look alike (docs/benchmarks.md, "Grad-CAM of the shipped classifier")."""
    import torch

    from leukoscope.bundle import BundleInfo
    from leukoscope.inference.predictor import CellClassifier
    from leukoscope.models import create_model
    from leukoscope.preprocessing import Preprocessing
    from leukoscope.service.analysis import Analyzer

    with torch.device("meta"):
        model = create_model("mobilenet_v2", num_classes=2)
    model.to_empty(device="cpu")
    for size, coarse in ((96, True), (224, False)):
        info = BundleInfo(model_name="mobilenet_v2", classes=["a", "b"], preprocessing=Preprocessing(image_size=size))
        shown, hidden = (Analyzer(CellClassifier(model, info), threads=1, gradcam=on) for on in (True, False))
        assert bool(shown.heatmap_note) == coarse and (not coarse or "3 x 3" in shown.heatmap_note)
        assert hidden.heatmap_note is None  # no maps, nothing to say of them
        shown.close(), hidden.close()
    # the page shows the analyzer's note in the heatmap's caption
    monkeypatch.setitem(service.state.analyzer.__dict__, "heatmap_note", "a coarse map, says the test")
    tech = service.login("tech")
    upload = tech.get("/upload")
    response = page_upload(tech, [("blast.png", encode(cell_image("blast", 11), "PNG"))], csrf_of(upload.text))
    page = tech.get(response.headers["location"]).text
    assert "Grad-CAM for" in page and ": a coarse map, says the test</figcaption>" in page


def test_a_case_of_one_cell_shows_its_warnings(service):
    """A single-cell case drew no differential, and with it none of its warnings: the page of a pbc cell
    classified whole, without a scale, showed only its class (the API carried the warning)."""
    from sqlalchemy import select

    from leukoscope.service.db import transaction
    from leukoscope.service.tables import Case

    tech = service.login("tech")
    response = page_upload(tech, [("one.png", encode(cell_image("blast", 11), "PNG"))],
                           csrf_of(tech.get("/upload").text))
    case_url = response.headers["location"]
    assert 'id="flags"' not in tech.get(case_url).text  # nothing to warn of
    with transaction(service.state.sessions) as db:
        case = db.scalar(select(Case))
        case.analysis = {**case.analysis, "warnings": ["No scale for a single-cell image: classified whole"]}
    page = tech.get(case_url).text
    assert 'id="flags"' in page and "WARNING: No scale for a single-cell image: classified whole" in page
    assert 'id="differential"' not in page  # still no differential of one cell


def test_the_case_list_pages_on_past_its_newest_cases(service, monkeypatch: pytest.MonkeyPatch):
    """/cases listed the 200 newest cases and no more: older unreviewed cases dropped out of the review list.
    The next page starts after the last case shown, so cases reviewed meanwhile do not make it skip any."""
    import re

    from leukoscope.service import routes_pages

    monkeypatch.setattr(routes_pages, "CASES_PER_PAGE", 2)
    tech = service.login("tech")
    made = []
    for index in range(4):
        response = page_upload(tech, [(f"c{index}.png", encode(cell_image("blast", index), "PNG"))],
                               csrf_of(tech.get("/upload").text))
        made.append(response.headers["location"].rsplit("/", 1)[1])
    first = tech.get("/cases?status=new").text
    assert made[3][:8] in first and made[2][:8] in first and made[1][:8] not in first  # newest first
    older = re.search(r'href="(/cases\?after=[0-9a-f]+&amp;status=new)" rel="next"', first).group(1)
    # a hematologist reviews a case of the first page before the next page is opened
    client = service.client()
    case = client.get(f"/api/v1/cases/{made[3]}", headers=service.auth("hema")).json()
    assert client.post(f"/api/v1/cases/{made[3]}/review", headers=service.auth("hema"),
                       json={"labels": {str(c["id"]): c["top_class"] for c in case["cells"]}}).status_code == 200
    second = tech.get(older.replace("&amp;", "&")).text
    assert made[1][:8] in second and made[0][:8] in second  # none skipped (by position, made[1] was)
    assert 'rel="first"' in second and 'rel="next"' not in second
    for odd in ("abc", "0" * 32, "x" * 5000):
        assert tech.get(f"/cases?after={odd}").status_code == 200
    assert 'href="/cases?status=new" rel="first"' in second



def test_the_differential_says_what_it_counts_beside_the_white_cells(service):
    """Three cells read "Differential (1 cells)" beside three rows at 100.0 per 100: platelets and erythroblasts
    are counted beside the white cells, and nothing said so."""
    from sqlalchemy import select

    from leukoscope.service.db import transaction
    from leukoscope.service.tables import Case

    tech = service.login("tech")
    files = [("a.png", encode(cell_image("blast", 1), "PNG")), ("b.png", encode(cell_image("monocyte", 2), "PNG"))]
    response = page_upload(tech, files, csrf_of(tech.get("/upload").text))
    with transaction(service.state.sessions) as db:
        case = db.scalar(select(Case))
        case.classes = [*case.classes, "platelet"]  # a model with a platelet class
    page = tech.get(response.headers["location"]).text
    assert 'id="not-white"' in page and "platelet: counted beside the white cells" in page


def test_a_refused_upload_keeps_what_was_typed(service):
    """The upload form states the microscope's scale; a refused one is said, and the page comes back with the
    scale, note and kind as typed (a browser never refills the file input; the rest need not be typed again)."""
    tech = service.login("tech")
    form = tech.get("/upload").text
    assert 'name="um_per_px"' in form and 'value="cell" checked' in form
    parts = [("files", ("a.png", encode(cell_image(), "PNG"), "application/octet-stream"))]
    refused = tech.post("/upload", files=parts, data={"kind": "cell", "csrf_token": csrf_of(form),
                                                      "um_per_px": "0.1 um", "note": "slide 7 <b>"})
    assert refused.status_code == 400 and service.rows()["cases"] == 0
    assert "um_per_px must be the microscope&#39;s scale in micrometres per pixel" in refused.text
    assert 'value="0.1 um"' in refused.text and 'value="slide 7 &lt;b&gt;"' in refused.text
