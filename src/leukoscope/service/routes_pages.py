"""Server-rendered pages (Jinja2, no JavaScript build): log in, upload, result,
case list, review, export, account (API tokens), admin (users, audit log).

Every form carries the session's CSRF token; the session cookie is HttpOnly and
SameSite=Lax (Secure over HTTPS).
"""

from __future__ import annotations

import os
import re
import secrets
from collections import Counter
from datetime import timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import select
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from leukoscope.service import cases as ops
from leukoscope.service import export
from leukoscope.service import throttle
from leukoscope.service.auth import (CSRF_MESSAGE, LOGIN_CSRF_COOKIE, MAX_TOKEN_DAYS, SESSION_COOKIE, Principal, audit,
                                     check_csrf, check_login_csrf, client_address, create_user, cross_site, find_user,
                                     from_another_origin, hash_password, hash_secret, login_checks, new_api_token,
                                     new_session, page_principal, password_checks, revoke_tokens, too_many,
                                     user_lock_key, revoke_token_of, user_locks, verify_password)
from leukoscope.service.db import transaction
from leukoscope.service.errors import ServiceError, refuse_nul
from leukoscope.service.params import RowId
from leukoscope.service.tables import ROLES, TOKEN_SCOPES, ApiToken, AuditEntry, Case, User, WebSession, utcnow
from leukoscope.service.routes_api import read_uploads

router = APIRouter(include_in_schema=False)


def state_of(request: Request):
    return request.app.state.service


def render(request: Request, template: str, principal: Principal | None, http_status: int = 200, **context: Any):
    state = state_of(request)
    context.update(user=principal.user if principal else None, csrf=principal.csrf_token if principal else "",
                   smear_enabled=state.analyzer.has_detector, cell_scale=state.analyzer.takes_stated_scale("cell"),
                   max_note=ops.MAX_NOTE, max_comment=ops.MAX_COMMENT)
    return state.templates.TemplateResponse(request, template, context, status_code=http_status)


def redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


def secure_cookie(request: Request) -> bool:
    mode = state_of(request).settings.secure_cookies
    return mode == "always" or (mode == "auto" and request.url.scheme == "https")


def safe_next(target: str | None) -> str:
    """Only same-site paths after log-in (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else "/"


#: Fields a page's form may send (the log-in form among them: parsing costs the event loop time)...
MAX_FORM_FIELDS = 500
#: ...and a review form, which sends one per cell: a case of 16 crowded fields held 542 cells (refused at 500).
MAX_REVIEW_FIELDS = 20_000


async def form_of(request: Request, max_fields: int = MAX_FORM_FIELDS) -> dict[str, str]:
    """The form's text fields; a NUL character in any is refused (400): PostgreSQL cannot store one, and a user
    name or comment holding it had answered 500 (an upload's note after its analysis had run). A form another
    origin's page sent (Sec-Fetch-Site) is refused (403) before it is read, as an upload and a log-in are: every
    page form that changes something comes through here, and the CSRF token alone had let a review or an export
    through from a page that was not this site's."""
    if from_another_origin(request):
        raise ServiceError(403, "csrf", CSRF_MESSAGE)
    form = await request.form(max_files=0, max_fields=max_fields)
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    refuse_nul(fields.values())
    return fields


# ------------------------------------------------------------------ log in / out


@router.get("/")
def home(request: Request):
    with transaction(state_of(request).sessions) as db:
        principal = page_principal(db, request)
        return redirect("/admin/users" if principal.role == "admin" else "/cases")


#: What the log-in page says when a form was sent after the session had ended.
UNSAVED_MESSAGE = "Your session had ended, so the form you sent was not saved: log in and send it again."


def login_page(request: Request, message: str = "", status: int = 200, next_path: str = "/",
               headers: dict[str, str] | None = None):
    # One token per browser, not per page: each tab the session's end sent here keeps a working form.
    token = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{43}", token):
        token = secrets.token_urlsafe(32)
    response = render(request, "login.html", None, http_status=status, login_csrf=token, message=message,
                      next_path=safe_next(next_path))
    response.headers.update(headers or {})
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookie(request),
                        path="/login", max_age=3600)
    return response


@router.get("/login")
def login_form(request: Request, next: str = "/", unsaved: bool = False):
    return login_page(request, UNSAVED_MESSAGE if unsaved else "", next_path=next)


@router.post("/login")
async def login(request: Request):
    state = state_of(request)
    if from_another_origin(request):  # a sibling subdomain can plant the log-in cookie; it cannot fake this
        raise ServiceError(403, "csrf", "the log-in form did not come from this site; reload the page and try again")
    form = await form_of(request)
    check_login_csrf(request, form.get("csrf_token"))
    username = form.get("username", "").strip()[:64]
    password = form.get("password", "")
    next_path = form.get("next", "/")
    checks = login_checks(state.settings, username, client_address(request))
    ip_key, user_key, pair_key = (key for _, key in checks)

    def refused(db, verdict: throttle.Verdict) -> None:
        audit(db, None, "login.throttled", username=username, request=request,
              detail={"rule": verdict.rule, "wait_s": round(verdict.wait or 0)})

    def attempt() -> tuple[str | None, throttle.Verdict]:
        with state.password_gate.slot():  # a burst's excess is refused here, before any work
            # Count (reserve) the attempt before the password check: a burst cannot outrun the count.
            verdict = throttle.attempt(state.sessions, checks, state.settings.throttle_max_rows, refused)
            if verdict.wait is not None:
                return None, verdict
            with transaction(state.sessions) as db:
                user = find_user(db, username)
                if not (verify_password(user, password) and user is not None and user.active):
                    audit(db, None, "login.failed", username=username, request=request)
                    return None, verdict
                audit(db, user, "login", request=request)
                return new_session(db, user, state.settings.session_hours), verdict

    try:
        token, verdict = await run_in_threadpool(attempt)
    except ServiceError as busy:
        return login_page(request, busy.message, busy.status, next_path, busy.headers)
    if verdict.wait is not None:
        error = too_many("failed log-ins", verdict.wait)
        return login_page(request, error.message, 429, next_path, error.headers)
    if token is None:
        return login_page(request, "Wrong user name or password.", 401, next_path)
    await run_in_threadpool(partial(throttle.settle, state.sessions, forget_keys=[pair_key],
                                    refund_keys=[ip_key, user_key]))
    response = redirect(safe_next(next_path))
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax", secure=secure_cookie(request),
                        path="/", max_age=int(state.settings.session_hours * 3600))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


def recheck_password(request: Request, user_id: int, password: str, action: str) -> ServiceError | None:
    """Re-entering one's own password (password change, new API token): throttled per user
    like a log-in, through the same bounded Argon2 checks, every failure audited."""
    state = state_of(request)
    checks = password_checks(state.settings, user_id)
    try:
        with state.password_gate.slot():
            verdict = throttle.attempt(state.sessions, checks, state.settings.throttle_max_rows)
            if verdict.wait is not None:
                return too_many("wrong passwords", verdict.wait)
            with transaction(state.sessions) as db:
                user = db.get(User, user_id)
                if not verify_password(user, password):
                    audit(db, user, f"{action}_failed", request=request)
                    return ServiceError(400, "wrong_password", "The current password is wrong.")
    except ServiceError as busy:
        return busy
    throttle.settle(state.sessions, forget_keys=[key for _, key in checks])
    return None


@router.post("/logout")
async def logout(request: Request):
    form = await form_of(request)

    def work() -> None:
        with transaction(state_of(request).sessions) as db:
            principal = page_principal(db, request)
            check_csrf(principal, form.get("csrf_token"))
            audit(db, principal.user, "logout", request=request)
            db.delete(principal.session)

    await run_in_threadpool(work)
    response = redirect("/login")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# ------------------------------------------------------------------ cases


#: Cases on one page of the case list (newest first; the list pages on: older unreviewed cases had dropped out).
CASES_PER_PAGE = 200


@router.get("/cases")
def case_list(request: Request, status: str | None = None, after: str = ""):
    """``after``: the last case of the page before (its id): the next page starts after it, wherever cases
    reviewed or uploaded since have moved the list (pages by position skipped cases reviewed meanwhile)."""
    with transaction(state_of(request).sessions) as db:
        principal = page_principal(db, request)
        if principal.role == "admin":
            return redirect("/admin/users")
        status = status if status in ("new", "reviewed") else None
        last = db.get(Case, after) if ops.CASE_ID.fullmatch(after) else None
        found = ops.visible_cases(db, principal, status, limit=CASES_PER_PAGE + 1,
                                  after=(last.created_at, last.id) if last is not None else None)
        more, found = len(found) > CASES_PER_PAGE, found[:CASES_PER_PAGE]
        return render(request, "cases.html", principal, cases=found, counts=ops.cell_counts(db, [c.id for c in found]),
                      status=status, later_page=last is not None, more=more)


@router.get("/upload")
def upload_form(request: Request):
    with transaction(state_of(request).sessions) as db:
        principal = page_principal(db, request)
        principal.require("technician", "hematologist")
        return render(request, "upload.html", principal, message="")


@router.post("/upload")
async def upload(request: Request):
    state = state_of(request)

    def who() -> Principal:
        with transaction(state.sessions) as db:
            return page_principal(db, request)

    principal = await run_in_threadpool(who)
    fields: dict[str, str] = {}
    try:
        principal.require("technician", "hematologist")
        if from_another_origin(request):  # before the body: an oversized one would be audited and counted
            raise ServiceError(403, "csrf", CSRF_MESSAGE)
        uploads, fields = await read_uploads(request, principal)
        check_csrf(principal, fields.get("csrf_token"))
        case_id, _ = await ops.create_case(state, principal, fields.get("kind", "cell"), uploads,
                                        fields.get("note", ""), client=client_address(request),
                                        um_per_px=fields.get(ops.SCALE_FIELD))
    except ServiceError as error:
        if error.code == "csrf" or error.status == 403:
            raise
        # what was typed stays (the files must be chosen again: a browser never refills a file input)
        response = render(request, "upload.html", principal, http_status=error.status, message=error.message,
                          typed={name: fields.get(name, "") for name in ("note", ops.SCALE_FIELD)},
                          kind=fields.get("kind", "cell"))
        response.headers.update(error.headers)
        return response
    return redirect(f"/cases/{case_id}")


def _cell_groups(db, principal: Principal, case) -> list[dict[str, Any]]:
    groups = []
    earlier = ops.earlier_uploads(db, principal, case)
    repeats = ops.repeated_images(case.images)
    for image in case.images:
        scale = ops.image_scale(case, image)
        groups.append({"image": image, "cells": [c for c in case.cells if c.image_id == image.id],
                       "scale": ops.scale_text(scale, case.kind),
                       "scale_known": bool(scale and scale.get("um_per_px")), "earlier": earlier.get(image.id),
                       "repeat_of": repeats[image.id].position if image.id in repeats else None})
    return groups


@router.get("/cases/{case_id}")
def case_page(request: Request, case_id: str, saved: int = 0):
    with transaction(state_of(request).sessions) as db:
        principal = page_principal(db, request)
        if cross_site(request):  # another site's link: no audit entry until the user opens it here
            return render(request, "open_case.html", principal, case_id=case_id if ops.CASE_ID.fullmatch(case_id)
                          else "")
        case = ops.load_case(db, principal, case_id, request=request)
        return render(request, "case.html", principal, case=case, counted=ops.counted_cells(case),
                      groups=_cell_groups(db, principal, case),
                      differential=ops.current_differential(case), can_review=principal.role == "hematologist",
                      excluded=ops.EXCLUDED, saved=bool(saved), message="", review_state=ops.review_state(case),
                      heatmap_note=state_of(request).analyzer.heatmap_note, all_excluded=ops.ALL_EXCLUDED_FLAG)


#: A review form's field of one cell's class (ASCII digits: str.isdigit() also takes "²", which int() refuses).
REVIEW_FIELD = re.compile(r"label_([0-9]{1,18})")


@router.post("/cases/{case_id}/review")
async def review(request: Request, case_id: str):
    form = await form_of(request, MAX_REVIEW_FIELDS)

    def work():
        with transaction(state_of(request).sessions) as db:
            principal = page_principal(db, request)
            check_csrf(principal, form.get("csrf_token"))
            principal.require("hematologist")
            case = ops.load_case(db, principal, case_id, action=None, for_update=True)
            labels = {}
            for key, value in form.items():
                cell = REVIEW_FIELD.fullmatch(key)
                if cell and value:
                    labels[int(cell.group(1))] = value
            try:
                with db.begin_nested():
                    # the state the page showed ("" from a form without it: refused, as a stale page would be)
                    # only the cells the reviewer chose a class for, unless they asked to confirm the rest
                    ops.review_case(db, principal, case, labels, form.get("comment", ""), request=request,
                                    confirm_rest=form.get("confirm_rest") == "1",
                                    expected_state=str(form.get("review_state", "")))
            except ServiceError as error:
                if error.status >= 500 or error.status in (401, 403):
                    raise
                # what the reviewer sent stays in view beside what is saved (a refused comment was lost)
                unsaved = {"comment": form.get("comment", ""), "labels": labels}
                return render(request, "case.html", principal, http_status=error.status, case=case,
                              counted=ops.counted_cells(case),
                              groups=_cell_groups(db, principal, case), differential=ops.current_differential(case),
                              can_review=True, excluded=ops.EXCLUDED, saved=False, message=error.message,
                              review_state=ops.review_state(case), heatmap_note=state_of(request).analyzer.heatmap_note,
                              all_excluded=ops.ALL_EXCLUDED_FLAG, unsaved=unsaved)
            return redirect(f"/cases/{case_id}?saved=1")

    return await run_in_threadpool(work)


# ------------------------------------------------------------------ export


@router.get("/export")
def export_page(request: Request):
    with transaction(state_of(request).sessions) as db:
        principal = page_principal(db, request)
        principal.require("hematologist")
        # what the ZIP will hold: not the excluded cells, a repeated file's copies or the unframed cells
        selection = export.exportable_cells(db)
        rows = sorted(Counter(cell.reviewed_label for cell in selection.cells).items())
        unframed = selection.unframed
        return render(request, "export.html", principal, rows=rows, excluded=ops.EXCLUDED, left_out=len(unframed),
                      left_out_cases=sorted({cell.case_id for cell in unframed}),
                      unframed_reason=export.UNFRAMED_REASON, copies=selection.copies, copy_reason=export.COPY_REASON,
                      conflicts=selection.conflicts,
                      nothing=export.nothing_to_export(selection) if not selection.cells else "")


@router.post("/export/dataset.zip")
async def export_zip(request: Request):
    """A POST with the CSRF token: another site cannot start an export (and its audit entry)."""
    state = state_of(request)
    form = await form_of(request)

    def work() -> str:
        path = None
        try:
            with transaction(state.sessions) as db:
                principal = page_principal(db, request)
                check_csrf(principal, form.get("csrf_token"))
                path = export.export_dataset(db, principal, state.store.read, form.get("layout", "folders"),
                                          request=request, workdir=state.store.tmp).path
        except BaseException:  # the audit entry was not committed: no patient images left behind
            if path is not None:
                os.unlink(path)
            raise
        return path

    path = await run_in_threadpool(work)
    layout = form.get("layout", "folders")
    return FileResponse(path, media_type="application/zip", filename=f"leukoscope-reviewed-{layout}.zip",
                        background=BackgroundTask(os.unlink, path))


# ------------------------------------------------------------------ account


def _account(request: Request, db, principal: Principal, message: str = "", new_token: str = "", status: int = 200,
             headers: dict[str, str] | None = None):
    tokens = db.scalars(select(ApiToken).where(ApiToken.user_id == principal.user.id).order_by(ApiToken.id)).all()
    response = render(request, "account.html", principal, http_status=status, tokens=tokens, message=message,
                      new_token=new_token, scopes=TOKEN_SCOPES, token_days=state_of(request).settings.token_days,
                      now=utcnow())
    response.headers.update(headers or {})
    return response


def _form_principal(request: Request, form: dict[str, str]) -> int:
    """The logged-in user's id, after the form's CSRF token is checked."""
    with transaction(state_of(request).sessions) as db:
        principal = page_principal(db, request)
        check_csrf(principal, form.get("csrf_token"))
        return principal.user.id


#: The cookie that carries a token just created from its POST to the account page it redirects to (Post/Redirect/
#: Get: reloading the page that showed a token had posted the form again and made a second token).
NEW_TOKEN_COOKIE = "leukoscope_new_token"
#: How long after its creation the account page still shows a token from that cookie.
NEW_TOKEN_SHOWN_FOR = timedelta(minutes=2)
TOKEN_CREATED = "Token created: copy it now, it is shown only once."


@router.get("/account")
def account(request: Request):
    carried = request.cookies.get(NEW_TOKEN_COOKIE, "")
    with transaction(state_of(request).sessions) as db:
        principal = page_principal(db, request)
        secret = _just_created(db, principal, carried) if carried else ""
        response = _account(request, db, principal, TOKEN_CREATED if secret else "", secret)
    if carried:  # shown once: a reload shows the list without it
        response.delete_cookie(NEW_TOKEN_COOKIE, path="/account", httponly=True, samesite="strict",
                               secure=secure_cookie(request))
    return response


def _just_created(db, principal: Principal, secret: str) -> str:
    """``secret`` when it is a live token of this user created moments ago, else "" (a cookie set by anyone else,
    or kept past its time, shows nothing)."""
    if len(secret) > 100:
        return ""
    token = db.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret)))
    fresh = token is not None and utcnow() - token.created_at <= NEW_TOKEN_SHOWN_FOR
    return secret if fresh and token.user_id == principal.user.id and token.revoked_at is None else ""


@router.post("/account/tokens")
async def create_token(request: Request):
    """A new API token needs the password again (a stolen session alone cannot mint one)."""
    form = await form_of(request)

    def work():
        user_id = _form_principal(request, form)
        problem = recheck_password(request, user_id, form.get("password", ""), "token.create")
        with transaction(state_of(request).sessions) as db:
            principal = page_principal(db, request)
            if problem is not None:
                return _account(request, db, principal, problem.message, status=problem.status,
                                headers=problem.headers)
            try:
                days = float(form.get("days") or state_of(request).settings.token_days)
                with db.begin_nested():
                    token, secret = new_api_token(db, principal.user, form.get("name", "").strip() or "script",
                                                  scope=form.get("scope") or "read", days=days)
            except (ServiceError, ValueError) as error:
                message = error.message if isinstance(error, ServiceError) else f"days: 1 to {MAX_TOKEN_DAYS}"
                return _account(request, db, principal, message, status=400)
            audit(db, principal.user, "token.create", request=request,
                  detail={"token": token.prefix, "scope": token.scope, "expires_at": token.expires_at.isoformat()})
        response = redirect("/account")
        # A browser-session cookie (never written to disk); the page shows it for NEW_TOKEN_SHOWN_FOR at most.
        response.set_cookie(NEW_TOKEN_COOKIE, secret, path="/account", httponly=True, samesite="strict",
                            secure=secure_cookie(request))
        return response

    return await run_in_threadpool(work)


@router.post("/account/tokens/{token_id}/revoke")
async def revoke_token(request: Request, token_id: RowId):
    form = await form_of(request)

    def work():
        with transaction(state_of(request).sessions) as db:
            principal = page_principal(db, request)
            check_csrf(principal, form.get("csrf_token"))
            revoke_token_of(db, principal, token_id, request)
        return redirect("/admin/tokens" if principal.role == "admin" and form.get("back") == "admin" else "/account")

    return await run_in_threadpool(work)


@router.post("/account/password")
async def change_password(request: Request):
    form = await form_of(request)

    def work():
        user_id = _form_principal(request, form)
        problem = recheck_password(request, user_id, form.get("current", ""), "password.change")
        with transaction(state_of(request).sessions) as db:
            principal = page_principal(db, request)
            if problem is not None:
                return _account(request, db, principal, problem.message, status=problem.status,
                                headers=problem.headers)
            if form.get("new", "") != form.get("confirm", ""):
                return _account(request, db, principal, "The new passwords differ.", status=400)
            try:
                principal.user.password_hash = hash_password(form.get("new", ""))
            except ServiceError as error:
                return _account(request, db, principal, error.message, status=400)
            # every other session and every API token of this user ends
            for other in db.scalars(select(WebSession).where(WebSession.user_id == principal.user.id,
                                                             WebSession.id != principal.session.id)):
                db.delete(other)
            revoked = revoke_tokens(db, principal.user)
            audit(db, principal.user, "password.change", request=request, detail={"tokens_revoked": revoked})
            return _account(request, db, principal, "Password changed."
                            + (f" {revoked} API token(s) revoked." if revoked else ""))

    return await run_in_threadpool(work)


# ------------------------------------------------------------------ admin


def _users_page(request: Request, db, principal: Principal, message: str = "", status: int = 200):
    users = db.scalars(select(User).order_by(User.username)).all()
    return render(request, "admin_users.html", principal, http_status=status, users=users, roles=ROLES, message=message,
                  locks=user_locks(db, users))


@router.get("/admin/users")
def admin_users(request: Request):
    with transaction(state_of(request).sessions) as db:
        principal = page_principal(db, request)
        principal.require("admin")
        return _users_page(request, db, principal)


@router.post("/admin/users")
async def admin_create_user(request: Request):
    form = await form_of(request)

    def work():
        with transaction(state_of(request).sessions) as db:
            principal = page_principal(db, request)
            check_csrf(principal, form.get("csrf_token"))
            principal.require("admin")
            try:
                with db.begin_nested():
                    user = create_user(db, form.get("username", "").strip(), form.get("password", ""),
                                       form.get("role", ""))
            except ServiceError as error:
                return _users_page(request, db, principal, error.message, error.status)
            audit(db, principal.user, "user.create", detail={"username": user.username, "role": user.role},
                  request=request)
            return _users_page(request, db, principal, f"User {user.username} created.")

    return await run_in_threadpool(work)


def _admin_and_user(db, request: Request, form: dict, user_id: int) -> tuple[Any, User]:
    """The admin making a form request (CSRF checked) and the user it is about (404 if none)."""
    principal = page_principal(db, request)
    check_csrf(principal, form.get("csrf_token"))
    principal.require("admin")
    user = db.get(User, user_id)
    if user is None:
        raise ServiceError(404, "not_found", "no such user")
    return principal, user


@router.post("/admin/users/{user_id}")
async def admin_update_user(request: Request, user_id: RowId):
    form = await form_of(request)

    def work():
        with transaction(state_of(request).sessions) as db:
            principal, user = _admin_and_user(db, request, form, user_id)
            # Every part of the form is checked before anything changes: a refused form saves nothing.
            role = form.get("role")
            role = role if role and role != user.role else None
            if role is not None and role not in ROLES:
                return _users_page(request, db, principal, f"unknown role {role!r}", 400)
            if role is not None and user.id == principal.user.id:
                return _users_page(request, db, principal, "you cannot change your own role", 400)
            active = form.get("active")
            active = active == "1" if active in ("0", "1") and (active == "1") != user.active else None
            if active is not None and user.id == principal.user.id:
                return _users_page(request, db, principal, "you cannot deactivate yourself", 400)
            password_hash = None
            if form.get("password") and user.id == principal.user.id:  # that needs the current password
                return _users_page(request, db, principal, "change your own password on the Account page", 400)
            if form.get("password"):
                try:
                    password_hash = hash_password(form["password"])
                except ServiceError as error:
                    return _users_page(request, db, principal, error.message, 400)
            changes: dict[str, Any] = {}
            if role is not None:
                changes["role"] = [user.role, role]
                user.role = role
            if active is not None:
                user.active = active
                changes["active"] = active
            if password_hash is not None:
                user.password_hash = password_hash
                changes["password"] = "reset"
            if changes.get("password") or changes.get("active") is False or "role" in changes:
                for session in db.scalars(select(WebSession).where(WebSession.user_id == user.id)):
                    db.delete(session)
            if changes.get("password") or changes.get("active") is False:
                changes["tokens_revoked"] = revoke_tokens(db, user)
            audit(db, principal.user, "user.update", detail={"username": user.username, **changes}, request=request)
            return _users_page(request, db, principal, f"User {user.username} updated.")

    return await run_in_threadpool(work)


@router.post("/admin/users/{user_id}/unlock")
async def admin_unlock_user(request: Request, user_id: RowId):
    """Clear a user's log-in lock and the waits of every address for that name."""
    form = await form_of(request)

    def work():
        with transaction(state_of(request).sessions) as db:
            principal, user = _admin_and_user(db, request, form, user_id)
            # the user's own key exactly: a prefix of "al" would also clear alice's and albert's locks
            cleared = throttle.forget(db, [user_lock_key(user.username_key)])
            cleared += throttle.forget_prefix(db, f"login:pair:{user.username_key}|")
            audit(db, principal.user, "login.unlock", detail={"username": user.username, "entries": cleared},
                  request=request)
            return _users_page(request, db, principal, f"Log-in lock of {user.username} cleared.")

    return await run_in_threadpool(work)


@router.get("/admin/tokens")
def admin_tokens(request: Request):
    """Every API token of every user (never the secret), with revoke buttons."""
    with transaction(state_of(request).sessions) as db:
        principal = page_principal(db, request)
        principal.require("admin")
        tokens = db.scalars(select(ApiToken).order_by(ApiToken.id.desc())).all()
        return render(request, "admin_tokens.html", principal, tokens=tokens, now=utcnow())


@router.get("/admin/audit")
def admin_audit(request: Request, case: str | None = None):
    with transaction(state_of(request).sessions) as db:
        principal = page_principal(db, request)
        principal.require("admin")
        refuse_nul([case])
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(500)
        if case:
            query = query.where(AuditEntry.case_id == case)
        return render(request, "audit.html", principal, entries=db.scalars(query).all(), case=case or "")


@router.get("/favicon.ico")
def favicon() -> Response:
    return Response(status_code=204)


_ = hash_secret  # re-exported for tests
