"""JSON API under ``/api/v1`` (OpenAPI schema at ``/api/openapi.json``, docs at ``/api/docs``).

Scripts authenticate with ``Authorization: Bearer lks_...``. Errors are always
``{"error": {"code": ..., "message": ...}}`` with a 4xx status.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import object_session
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

import leukoscope
from leukoscope.service import cases as ops
from leukoscope.service.export import export_dataset
from leukoscope.service.uploads import Upload
from leukoscope.service.auth import (Principal, api_principal, audit, client_address, create_user, revoke_token_of,
                                     user_locks)
from leukoscope.service.db import transaction
from leukoscope.service.errors import BodyTooLarge, ServiceError, refuse_nul
from leukoscope.service.params import Offset, RowId
from leukoscope.service.tables import ROLES, ApiToken, AuditEntry, Case, User
from leukoscope.service.storage import MEDIA_TYPES

router = APIRouter()
API = "/api/v1"


def state_of(request: Request):
    return request.app.state.service


def url(request: Request, path: str) -> str:
    return request.scope.get("root_path", "") + path


def case_json(request: Request, case: Case, principal: Principal) -> dict[str, Any]:
    base = f"{API}/cases/{case.id}"
    earlier = ops.earlier_uploads(object_session(case), principal, case)
    repeats = ops.repeated_images(case.images)
    unfamiliar = case.analysis.get("unfamiliar_cells")  # absent: the model has no OOD statistics
    return {
        "id": case.id,
        "kind": case.kind,
        "status": case.status,
        "note": case.note,
        "created_at": case.created_at.isoformat(),
        "owner": case.owner.username,
        "model": case.model_name,
        "models": case.analysis.get("models", {}),  # absent from cases made before it was recorded
        "classes": case.classes,
        "uncertain_threshold": case.analysis.get("threshold"),
        "run_scale": case.analysis.get("run_scale"),  # a case of at least 5 images with scales: theirs together
        "stated_um_per_px": case.analysis.get("stated_um_per_px"),  # the scale its uploader stated, if any
        "decision_support": ops.DECISION_SUPPORT_NOTE,
        "images": [{
            "id": image.id,
            "position": image.position,
            "file_name": image.original_name,
            "format": image.format,
            "width": image.width,
            "height": image.height,
            "sha256": image.sha256,
            "url": url(request, f"{base}/images/{image.id}/image"),
            "annotated_url": url(request, f"{base}/images/{image.id}/annotated") if image.annotated_object else None,
            "scale": ops.image_scale(case, image),
            # the same file uploaded before: in earlier cases you may open, or earlier in this one
            "earlier_uploads": earlier.get(image.id),
            # a later copy of a file in this case: the position of its first copy, whose cells alone are counted
            "repeat_of": repeats[image.id].position if image.id in repeats else None,
        } for image in case.images],
        "cells": [{
            "id": cell.id,
            "image_id": cell.image_id,
            "position": cell.position,
            "box": cell.box,
            "detection_score": cell.detection_score,
            "label": cell.predicted_label,
            "top_class": cell.top_class,
            "confidence": cell.confidence,
            "uncertain": cell.uncertain,
            "unfamiliar": None if unfamiliar is None else cell.position in unfamiliar,
            "probabilities": cell.probabilities,
            "reviewed_label": cell.reviewed_label,
            "final_label": cell.final_label,
            "overlay_url": url(request, f"{base}/cells/{cell.id}/overlay") if cell.overlay_object else None,
            "crop_url": url(request, f"{base}/cells/{cell.id}/crop") if cell.crop_object else None,
        } for cell in case.cells],
        "differential": ops.current_differential(case),
        # what the analysis said before any review (its warnings included)
        "differential_at_upload": case.analysis.get("differential_at_upload"),
        "review": {
            "reviewer": case.reviewer.username if case.reviewer else None,
            "reviewed_at": case.reviewed_at.isoformat() if case.reviewed_at else None,
            "comment": case.review_comment,
            "state": ops.review_state(case),  # send it back as review_state: a review saved since is not overwritten
        },
    }


def _principal(request: Request, db) -> Principal:
    return api_principal(db, request)


# ------------------------------------------------------------------ service


@router.get(f"{API}/health", tags=["service"])
def health(request: Request) -> dict[str, Any]:
    """Liveness and what the loaded models can do (no authentication)."""
    analyzer = state_of(request).analyzer
    return {"status": "ok", "version": leukoscope.__version__, "model": analyzer.model_name,
            "classes": analyzer.classes, "smear_analysis": analyzer.has_detector,
            "decision_support": ops.DECISION_SUPPORT_NOTE}


@router.get(f"{API}/me", tags=["service"])
def me(request: Request) -> dict[str, Any]:
    with transaction(state_of(request).sessions) as db:
        principal = _principal(request, db)
        return {"username": principal.user.username, "role": principal.role, "via": principal.via,
                "scope": principal.scope}


# ------------------------------------------------------------------ cases

UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["files"],
            "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": "one or several JPEG/PNG/BMP/TIFF images (format read from the content)"},
                "kind": {"type": "string", "enum": ["cell", "smear"], "default": "cell",
                         "description": "single-cell images, or smear fields (needs a detector bundle)"},
                "note": {"type": "string", "maxLength": ops.MAX_NOTE,
                         "description": f"free text shown with the case (at most {ops.MAX_NOTE:,} characters: "
                                        "a longer one is refused with 400 note_too_long)"},
                ops.SCALE_FIELD: {"type": "number", "minimum": 0.005, "maximum": 5,
                                  "description": "the microscope's scale in micrometres per pixel, for every image "
                                                 "(optional: else estimated from each image's red cells)"},
            },
        }}},
    }
}


async def read_uploads(request: Request, principal: Principal) -> tuple[list[Upload], dict[str, str]]:
    """Parse the multipart body (the size limit is enforced while it streams in; a body refused for its size
    counts against the upload rate limit and is on the record: :func:`cases.refuse_oversized`)."""
    state = state_of(request)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ServiceError(415, "not_multipart", "send the images as multipart/form-data (field 'files')")
    most = state.settings.max_files_per_upload
    try:
        form = await request.form(max_files=most + 1, max_fields=20)
    except BodyTooLarge as error:
        await run_in_threadpool(ops.refuse_oversized, state, principal.user.id, error, client_address(request))
        raise
    except StarletteHTTPException as refused:  # the multipart parser's own limits (files, fields, part size)
        error = (ServiceError(413, "too_many_files", f"more than {most + 1} files in one upload; at most {most}")
                 if "files" in str(refused.detail).lower() else
                 ServiceError(400, "bad_form", f"the upload form was refused: {refused.detail}"))
        await run_in_threadpool(ops.refuse_oversized, state, principal.user.id, error, client_address(request))
        raise error from None
    try:
        uploads: list[Upload] = []
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in ("files", "file"):
                    if value.filename == "" and (value.size or 0) == 0:
                        continue  # the browser's empty file input
                    uploads.append(Upload(value.filename or "", await value.read()))
            else:
                fields[key] = value
        refuse_nul([*fields.values(), *(upload.filename for upload in uploads)])  # before any analysis runs
        return uploads, fields
    finally:
        await form.close()


@router.post(f"{API}/cases", status_code=201, tags=["cases"], openapi_extra=UPLOAD_SCHEMA,
             responses={400: {"description": "no file / empty file / bad kind / bad scale / note too long"},
                        413: {"description": "too large (bytes, pixels or files)"},
                        415: {"description": "not a supported image format"},
                        422: {"description": "corrupt or truncated image"},
                        429: {"description": "upload rate limit"}})
async def upload_case(request: Request) -> JSONResponse:
    """Upload one or several images as one case; answers the analysed case."""
    state = state_of(request)

    def who() -> Principal:
        with transaction(state.sessions) as db:
            return _principal(request, db)

    principal = await run_in_threadpool(who)
    principal.require("technician", "hematologist")
    uploads, fields = await read_uploads(request, principal)
    case_id, payload = await ops.create_case(state, principal, fields.get("kind", "cell"), uploads,
                                             fields.get("note", ""), client=request.client.host if request.client
                                             else "", serialize=lambda case: case_json(request, case, principal),
                                             um_per_px=fields.get(ops.SCALE_FIELD))
    return JSONResponse(payload, status_code=201, headers={"Location": f"{API}/cases/{case_id}"})


@router.get(f"{API}/cases", tags=["cases"])
def list_cases(request: Request, status: Literal["new", "reviewed"] | None = None,
               limit: int = Query(100, ge=1, le=1000), offset: Offset = 0) -> dict[str, Any]:
    """Cases you may see: a technician's own, every case for a hematologist."""
    with transaction(state_of(request).sessions) as db:
        principal = _principal(request, db)
        found = ops.visible_cases(db, principal, status, limit, offset)
        counts = ops.cell_counts(db, [c.id for c in found])
        return {"cases": [{"id": c.id, "kind": c.kind, "status": c.status, "note": c.note,
                           "created_at": c.created_at.isoformat(), "owner": c.owner.username,
                           "cells": counts.get(c.id, {}).get("cells", 0),
                           "uncertain": counts.get(c.id, {}).get("uncertain", 0),
                           "url": f"{API}/cases/{c.id}"} for c in found]}


@router.get(f"{API}/cases/{{case_id}}", tags=["cases"])
def get_case(request: Request, case_id: str) -> dict[str, Any]:
    """One case with every cell, its probabilities, overlays and the differential (audited)."""
    with transaction(state_of(request).sessions) as db:
        principal = _principal(request, db)
        return case_json(request, ops.load_case(db, principal, case_id, request=request), principal)


class ReviewBody(BaseModel):
    labels: dict[int, str] = Field(default_factory=dict, description="cell id -> class (or 'excluded')")
    comment: str | None = Field(None, description=f"the review's comment (at most {ops.MAX_COMMENT:,} characters: "
                                                  "a longer one is refused with 400 comment_too_long)",
                                json_schema_extra={"maxLength": ops.MAX_COMMENT})  # checked by review_case
    confirm_rest: bool = Field(False, description="true: cells not listed are confirmed in their predicted class "
                                                  "(their labels then reach the reviewed-labels export as a "
                                                  "hematologist's); false (default): they stay unreviewed")
    review_state: str | None = Field(None, description="the case's review.state when it was read: if another "
                                                       "review was saved since, nothing is saved (409)")


@router.post(f"{API}/cases/{{case_id}}/review", tags=["cases"])
def review(request: Request, case_id: str, body: ReviewBody) -> dict[str, Any]:
    """A hematologist confirms or corrects the cells of a case (audited)."""
    refuse_nul([body.comment, *body.labels.values()])
    with transaction(state_of(request).sessions) as db:
        principal = _principal(request, db)
        principal.require("hematologist")
        case = ops.load_case(db, principal, case_id, action=None, for_update=True)
        outcome = ops.review_case(db, principal, case, body.labels, body.comment, confirm_rest=body.confirm_rest,
                                  expected_state=body.review_state, request=request)
        return {**outcome, "case": case_json(request, case, principal)}


def _object_response(request: Request, name: str | None) -> Response:
    if not name:
        raise ServiceError(404, "not_found", "this case has no such image")
    store = state_of(request).store
    data = store.read(name)
    ext = name.rsplit(".", 1)[-1]
    return Response(data, media_type=MEDIA_TYPES[ext], headers={"Content-Disposition": "inline"})


@router.get(f"{API}/cases/{{case_id}}/images/{{image_id}}/{{variant}}", tags=["files"],
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
def image_file(request: Request, case_id: str, image_id: RowId, variant: Literal["image", "annotated"]) -> Response:
    """The served copy of an uploaded image (PNG, metadata stripped) or its annotated version."""
    with transaction(state_of(request).sessions) as db:
        principal = _principal(request, db)
        case = ops.load_case(db, principal, case_id, action=None)
        image = next((i for i in case.images if i.id == image_id), None)
        if image is None:
            raise ServiceError(404, "not_found", "this case has no such image")
        name = image.served_object if variant == "image" else image.annotated_object
    return _object_response(request, name)


@router.get(f"{API}/cases/{{case_id}}/cells/{{cell_id}}/{{variant}}", tags=["files"],
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
def cell_file(request: Request, case_id: str, cell_id: RowId, variant: Literal["crop", "overlay"]) -> Response:
    """A detected cell cut from its field, or its Grad-CAM overlay (PNG)."""
    with transaction(state_of(request).sessions) as db:
        principal = _principal(request, db)
        case = ops.load_case(db, principal, case_id, action=None)
        cell = next((c for c in case.cells if c.id == cell_id), None)
        if cell is None:
            raise ServiceError(404, "not_found", "this case has no such cell")
        name = cell.crop_object if variant == "crop" else cell.overlay_object
    return _object_response(request, name)


@router.get(f"{API}/export", tags=["export"], response_class=FileResponse,
            responses={200: {"content": {"application/zip": {}}}})
def export(request: Request, layout: Literal["folders", "csv"] = "folders") -> FileResponse:
    """Reviewed cells as a training dataset (ZIP): class folders, or images + manifest.csv. A cell whose
    single-cell image had no scale (classified whole, not framed at the classifier's window) is left out, and so
    is every copy but one of a cell whose image file was uploaded in several cases: the ``X-Leukoscope-Left-Out``
    header counts them, ``X-Leukoscope-Label-Conflicts`` the cells whose copies were reviewed with different
    labels, and the ZIP's ``NOTES.txt`` names them."""
    state = state_of(request)
    path = None
    try:
        with transaction(state.sessions) as db:
            principal = api_principal(db, request, cookie=False)  # a token: the pages export by a CSRF-checked form
            made = export_dataset(db, principal, state.store.read, layout, request=request,
                                      workdir=state.store.tmp)
            path = made.path
    except BaseException:  # the audit entry was not committed: no patient images left behind
        if path is not None:
            os.unlink(path)
        raise
    # how many reviewed cells were left out (unframed, or another case's copy) and how many copies disagree
    return FileResponse(path, media_type="application/zip", filename=f"leukoscope-reviewed-{layout}.zip",
                        background=BackgroundTask(os.unlink, path),
                        headers={"X-Leukoscope-Left-Out": str(made.left_out),
                                 "X-Leukoscope-Label-Conflicts": str(made.conflicts)})


# ------------------------------------------------------------------ admin


@router.get(f"{API}/audit", tags=["admin"])
def audit_log(request: Request, case_id: str | None = None, limit: int = Query(200, ge=1, le=5000)) -> dict:
    """Who viewed or changed which case (admins)."""
    with transaction(state_of(request).sessions) as db:
        principal = _principal(request, db)
        principal.require("admin")
        refuse_nul([case_id])
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if case_id:
            query = query.where(AuditEntry.case_id == case_id)
        return {"entries": [{"at": e.at.isoformat(), "user": e.username, "action": e.action, "case_id": e.case_id,
                             "detail": e.detail, "client": e.client} for e in db.scalars(query)]}


class NewUser(BaseModel):
    username: str
    password: str
    role: Literal["admin", "technician", "hematologist"]


@router.get(f"{API}/users", tags=["admin"])
def users(request: Request) -> dict[str, Any]:
    """Every user; ``locked_until``: the end of a log-in lock (sustained failed log-ins from
    many addresses), cleared on the admin's Users page."""
    with transaction(state_of(request).sessions) as db:
        _principal(request, db).require("admin")
        found = db.scalars(select(User).order_by(User.username)).all()
        locks = user_locks(db, found)
        return {"users": [{"id": u.id, "username": u.username, "role": u.role, "active": u.active,
                           "locked_until": locks[u.id].isoformat() if u.id in locks else None} for u in found]}


def token_json(token: ApiToken) -> dict[str, Any]:
    return {"id": token.id, "user": token.user.username, "name": token.name, "prefix": token.prefix,
            "scope": token.scope, "created_at": token.created_at.isoformat(),
            "expires_at": token.expires_at.isoformat(),
            "last_used_at": token.last_used_at.isoformat() if token.last_used_at else None,
            "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None}


@router.get(f"{API}/tokens", tags=["admin"])
def tokens(request: Request) -> dict[str, Any]:
    """API tokens (never their secrets): an admin sees every user's, anyone else their own."""
    with transaction(state_of(request).sessions) as db:
        principal = _principal(request, db)
        query = select(ApiToken).order_by(ApiToken.id)
        if principal.role != "admin":
            query = query.where(ApiToken.user_id == principal.user.id)
        return {"tokens": [token_json(t) for t in db.scalars(query)]}


@router.post(f"{API}/tokens/{{token_id}}/revoke", tags=["admin"])
def revoke_token(request: Request, token_id: RowId) -> dict[str, Any]:
    """Revoke a token: one's own, or anyone's for an admin."""
    with transaction(state_of(request).sessions) as db:
        principal = _principal(request, db)
        return token_json(revoke_token_of(db, principal, token_id, request))


@router.post(f"{API}/users", tags=["admin"], status_code=201)
def add_user(request: Request, body: NewUser) -> dict[str, Any]:
    with transaction(state_of(request).sessions) as db:
        principal = _principal(request, db)
        principal.require("admin")
        user = create_user(db, body.username, body.password, body.role)
        audit(db, principal.user, "user.create", detail={"username": user.username, "role": user.role},
              request=request)
        return {"id": user.id, "username": user.username, "role": user.role, "active": user.active}


assert set(ROLES) == {"admin", "technician", "hematologist"}


# ------------------------------------------------------------------ docs (offline)


@router.get("/api/docs", include_in_schema=False)
def docs(request: Request):
    """Swagger UI from local assets (fastapi-offline ships them): works with no network."""
    if not state_of(request).extra.get("docs_assets"):
        return JSONResponse({"openapi": "/api/openapi.json"})
    page = get_swagger_ui_html(openapi_url="/api/openapi.json", title="leukoscope API",
                               swagger_js_url="/api/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url="/api/docs-assets/swagger-ui.css",
                               swagger_favicon_url="/api/docs-assets/favicon.png")
    # Swagger UI starts itself with an inline script: allow that on this page only.
    page.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; style-src 'self' "
                                               "'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
                                               "frame-ancestors 'none'")
    return page
