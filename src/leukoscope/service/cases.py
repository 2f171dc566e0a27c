"""What the API and the pages both do: create a case from uploads (decoded by :mod:`.uploads`), find the cases
a user may see, review a case (its reviewed labels exported by :mod:`.export`). One implementation, two thin
front ends (``routes_api`` and ``routes_pages``)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Sequence

from sqlalchemy import and_, func, or_, select
from sqlalchemy import case as sa_case
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool

from leukoscope.inference.quality import (CAP_WORDING, about_classification_only, classified_unit,
                                          is_unfamiliar_warning, unfamiliar_warning)
from leukoscope.inference.smear_output import FieldWarnings, folded_field_warnings, is_folded
from leukoscope.labels import DISCLAIMER
from leukoscope.progress import name_some
from leukoscope.scale import (RUN_SCALE_MIN_ESTIMATES, STATED_DOUBT_MIN_ESTIMATES, FieldScale, checked_um_per_px,
                              field_scale, run_sample, run_scale_of, stated_doubt_of_run)
from leukoscope.service import throttle
from leukoscope.service.analysis import SCALE_FIELD, differential, in_service_words
from leukoscope.service.auth import Principal, audit, too_many
from leukoscope.service.db import sqlite_write_lock, transaction
from leukoscope.service.errors import ServiceError
from leukoscope.service.storage import EXTENSIONS
from leukoscope.service.tables import CASE_KINDS, Case, CaseImage, Cell, CellReview, User, utcnow
from leukoscope.service.uploads import (PreparedImage, Upload, check_uploads, decode_upload, display_name,
                                        prepare_upload, repeat_of, repeated_positions)

if TYPE_CHECKING:  # pragma: no cover
    from leukoscope.service.app import ServiceState

log = logging.getLogger(__name__)
#: The longest note of an upload and comment of a review, in characters (a line break counted as one: a
#: browser sends a textarea's as CRLF); longer ones are refused (400), not cut short.
MAX_NOTE = 2000
MAX_COMMENT = 5000


def check_length(text: str | None, limit: int, what: str, code: str) -> None:
    """400 for a ``text`` longer than ``limit`` characters (it was silently cut, and the rest lost)."""
    length = len((text or "").replace("\r\n", "\n"))
    if length > limit:
        raise ServiceError(400, code, f"the {what} has {length:,} characters; at most {limit:,} (nothing was saved)")


#: What a case id looks like (random hex; anything else is not looked up).
CASE_ID = re.compile(r"[0-9a-f]{32}")
#: A reviewer's label for a detection that is not a usable cell (not counted, not exported).
EXCLUDED = "excluded"
ALL_EXCLUDED_FLAG = "No cell counted: every cell of this case was marked excluded in review."
DECISION_SUPPORT_NOTE = f"{DISCLAIMER.rstrip('.')}: every result must be reviewed by a qualified hematologist."

# ------------------------------------------------------------------ create


#: A scale as typed: ASCII digits, one decimal point or comma (read as a point), an optional exponent.
SCALE_NUMBER = re.compile(r"\+?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?", re.ASCII)


def stated_scale(text: str | float | None) -> float | None:
    """The microscope's scale an uploader stated (:data:`SCALE_FIELD`, micrometres per pixel; a decimal comma is
    read as a point), or None when left empty; 400 for anything that is no microscope's scale."""
    if isinstance(text, (int, float)):
        text = str(text)
    text = (text or "").strip()
    if not text:
        return None
    # Plain ASCII decimals only: float() also reads "0_1" as 1.0 (a typo for 0.1) and other scripts' digits.
    if not SCALE_NUMBER.fullmatch(text):
        raise ServiceError(400, "bad_scale", f"{SCALE_FIELD} must be the microscope's scale in micrometres per "
                                             f"pixel, a number such as 0.1; got {text[:40]!r}")
    value = float(text.replace(",", "."))
    try:
        return checked_um_per_px(value, SCALE_FIELD)
    except ValueError as exc:
        raise ServiceError(400, "bad_scale", str(exc)) from None


@dataclass
class CaseScale:
    """A case's scale as a whole: the one its uploader stated, or the one its images lent each other
    (:func:`leukoscope.scale.run_scale_of`), and the red cells' doubt of a stated one."""

    stated_um_per_px: float | None = None
    run: dict[str, Any] | None = None
    doubt: str | None = None

    def warnings(self, prepared: Sequence[PreparedImage], kind: str = "cell") -> list[str]:
        """The case's warnings: the stated scale's doubt by the case's red cells first; then, of a smear case of
        several fields, those of its fields as a folder's summary says them (one line per kind, naming the
        fields: :func:`leukoscope.inference.smear_output.folded_field_warnings`) after the others; else each
        image's own (:func:`named_warnings`)."""
        run = [self.doubt] if self.doubt else []
        if kind != "smear" or len(prepared) < 2:
            return run + named_warnings(prepared)
        fields = [FieldWarnings(upload.name, upload.warnings, upload.scale,
                                capped=any(w.startswith(CAP_WORDING) for w in upload.warnings)) for upload in prepared]
        unfolded = [replace(upload, warnings=[w for w in upload.warnings if not is_folded(w)]) for upload in prepared]
        return run + named_warnings(unfolded) + folded_field_warnings(fields, run, fields_say=False)


def named_warnings(prepared: Sequence[PreparedImage]) -> list[str]:
    """The warnings of a case's images, each once, in order, followed by the images it was said of when that
    is not all of them (``... [in 2 of 5 images: a.png, b.png]``): the case keeps its warnings only, and "no
    scale for this field" of one field among five named none. Each warning still begins with its own words
    (:func:`~leukoscope.inference.quality.about_classification_only` reads them)."""
    said_of: dict[str, list[str]] = {}
    for upload in prepared:
        for warning in dict.fromkeys(upload.warnings):
            said_of.setdefault(warning, []).append(upload.name)
    return [f"{warning}{in_images(names, len(prepared))}" for warning, names in said_of.items()]


def in_images(names: Sequence[str], of: int) -> str:
    """`` [in 2 of 5 images: a.png, b.png]``, naming at most five; empty when said of every image."""
    if len(names) >= of:
        return ""
    return f" [in {len(names)} of {of} image{'' if of == 1 else 's'}: {name_some(names, 5)}]"


async def create_case(state: "ServiceState", principal: Principal, kind: str, uploads: Sequence[Upload],
                      note: str = "", client: str = "", serialize: Callable[[Case], Any] | None = None,
                      um_per_px: str | float | None = None) -> tuple[str, Any]:
    """Validate, analyse and store one upload as one case; returns the case id.

    Nothing is written unless every file is valid. Files go to the store first
    (atomic, content-named), then every row in one transaction: a crash at any
    point leaves either the whole case or no case (plus, at worst, unreferenced
    files that :meth:`ContentStore.collect_garbage` removes). Returns the case id and
    ``serialize(case)``, computed in the same transaction (and handed out only once it
    has committed). ``um_per_px``: the microscope's scale the uploader stated (:func:`stated_scale`), used
    for every image; the case's red cells may doubt it (a warning, and no leukemia flag)."""
    principal.require("technician", "hematologist")
    kind = (kind or "cell").lower()
    if kind not in CASE_KINDS:
        raise ServiceError(400, "bad_kind", f"kind must be one of {', '.join(CASE_KINDS)}")
    if kind == "smear" and not state.analyzer.has_detector:
        raise ServiceError(400, "no_detector", "this server has no detector bundle: smear fields cannot be analysed "
                                               "(upload single-cell images, or start it with --detector)")
    check_length(note, MAX_NOTE, "note", "note_too_long")  # before any analysis runs
    stated = stated_scale(um_per_px)
    if stated is not None and not state.analyzer.takes_stated_scale(kind):  # said, rather than ignored
        why = ("this server's classifier takes single-cell images as they are (it has no physical window)"
               if kind == "cell" else "this server's smear analyser takes no stated scale")
        raise ServiceError(400, "scale_not_used", f"{why}: leave {SCALE_FIELD} empty")
    settings = state.settings
    user_id = principal.user.id
    verdict = await run_in_threadpool(reserve_upload, state, user_id, client, len(uploads))
    if verdict.wait is not None:
        raise too_many("uploads", verdict.wait)
    try:
        await run_in_threadpool(check_uploads, uploads, settings.max_pixels, settings.max_files_per_upload,
                                settings.max_pixels_per_request)
        # The case's scale first (each image decoded for its red cells, then let go), so that an image
        # without a scale of its own is analysed once, at the case's.
        # With a stated scale, the case's red cells only check it (as `analyze` checks a folder's: most fields
        # have too few red cells to doubt it alone).
        # A file sent twice in one case is analysed and counted once: its later copies only point to the first.
        repeats = repeated_positions(uploads)
        distinct = [upload for index, upload in enumerate(uploads) if index not in repeats]
        run = None
        # (a stated scale is checked on fewer agreeing images than a case's scale is lent on: it is only doubted)
        needed = STATED_DOUBT_MIN_ESTIMATES if stated is not None else RUN_SCALE_MIN_ESTIMATES
        if len(distinct) >= needed and (stated is not None or state.analyzer.borrows_case_scale(kind)):
            scales = [await run_in_threadpool(upload_scale, upload, settings.max_pixels)
                      for upload in run_sample(distinct)]
            run = run_scale_of(scales, unit="images" if kind == "cell" else "fields", min_fields=needed)
        lent = run.um_per_px if run is not None and run.known and stated is None else None
        # One file at a time: a request holds one decoded image, not all of them (issue 13).
        prepared: list[PreparedImage] = []
        for index, upload in enumerate(uploads):
            if index in repeats:
                prepared.append(repeat_of(prepared[repeats[index]], upload, repeats[index]))
            else:
                prepared.append(await prepare_upload(state, kind, upload, lent, stated))
    except ServiceError as error:  # a refused file is on the record too: who sent what, and why it was refused
        await run_in_threadpool(audit_refusal, state, user_id, kind, uploads, error, client)
        raise
    scale = CaseScale(stated, run.to_json() if run is not None and stated is None else None,
                      stated_doubt_of_run(stated, run, single_cells=kind == "cell")
                      if stated is not None and run is not None else None)
    return await run_in_threadpool(_persist, state, principal.user.id, kind, note, prepared, client, serialize, scale)


def reserve_upload(state: "ServiceState", user_id: int, client: str, files: int) -> throttle.Verdict:
    """Count one upload against the user's rate limit; the first refusal of each wait is audited
    (``upload.throttled``), not every request of a flood."""
    rule = throttle.Rule("uploads", state.settings.rate_limit_per_minute, 60.0)

    def throttled(db: Session, verdict: throttle.Verdict) -> None:
        audit(db, db.get(User, user_id), "upload.throttled", client=client,
              detail={"rule": verdict.rule, "wait_s": round(verdict.wait or 0), "files": files})

    return throttle.attempt(state.sessions, [(rule, f"upload:{user_id}")], state.settings.throttle_max_rows, throttled)


def refuse_oversized(state: "ServiceState", user_id: int, error: ServiceError, client: str) -> None:
    """A body refused for its size counts as an upload against the rate limit, and only a counted one is
    audited (``case.refused``, without names: none was read): a client sending oversized bodies cannot
    fill the audit log faster than it may upload."""
    if reserve_upload(state, user_id, client, 0).wait is None:
        audit_refusal(state, user_id, None, [], error, client)


def upload_scale(upload: Upload, max_pixels: int) -> FieldScale:
    """An upload's own scale from its red cells (:func:`leukoscope.scale.field_scale`)."""
    return field_scale(decode_upload(upload, max_pixels).image)


def audit_refusal(state: "ServiceState", user_id: int, kind: str | None, uploads: Sequence[Upload],
                  error: ServiceError, client: str) -> None:
    """``case.refused``: the files' names as shown (at most 20, each cut to 100 characters; none when the
    body was refused for its size before any file was read, and then no kind), the code and the message.
    The refusal stands if its record cannot be written (logged instead)."""
    names = [display_name(upload.filename)[:100] for upload in uploads[:20]]
    try:
        with transaction(state.sessions) as db:
            audit(db, db.get(User, user_id), "case.refused", client=client,
                  detail={"kind": kind, "files": len(uploads), "names": names, "code": error.code,
                          "status": error.status, "message": error.message[:500]})
    except Exception:  # noqa: BLE001 - the user gets their 4xx either way
        log.exception("could not record the refused upload of user %s", user_id)


def _persist(state: "ServiceState", user_id: int, kind: str, note: str, prepared: list[PreparedImage],
             client: str, serialize: Callable[[Case], Any] | None = None,
             case_scale: CaseScale | None = None) -> tuple[str, Any]:
    store = state.store
    stored = []
    for upload in prepared:
        stored.append({
            "original": store.put(upload.data, EXTENSIONS[upload.format]),
            "served": store.put(upload.served_png, "png"),
            "annotated": store.put(upload.annotated_png, "png") if upload.annotated_png is not None else None,
            "cells": [{"crop": store.put(cell.crop_png, "png") if cell.crop_png is not None else None,
                       "overlay": store.put(cell.overlay_jpeg, "jpg") if cell.overlay_jpeg is not None else None}
                      for cell in upload.cells],
        })
    case_id = secrets.token_hex(16)
    analyzer = state.analyzer
    labels = [cell.prediction.label for upload in prepared for cell in upload.cells]
    # Quality warnings travel with the case: while any stands its differential raises no leukemia flag. Unfamiliar
    # cells are judged on the case's cells together, as `analyze` judges a folder's: one unusual field among
    # several does not stop the case's count (its own annotated picture still says so).
    predictions = [cell.prediction for upload in prepared for cell in upload.cells]
    case_scale = case_scale or CaseScale()
    counted = [upload for upload in prepared if upload.repeat_of is None]  # a repeated file's warnings once
    warnings = [in_service_words(warning) for warning in case_scale.warnings(counted, kind)
                if not is_unfamiliar_warning(warning)]
    unfamiliar = unfamiliar_warning([p.unfamiliar for p in predictions],
                                    unit="cell images" if kind == "cell" else classified_unit(analyzer.classes))
    warnings += [unfamiliar] if unfamiliar else []
    ood = ({"unfamiliar_cells": [i for i, p in enumerate(predictions) if p.unfamiliar]}
           if any(p.ood_score is not None for p in predictions) else {})
    # Each image's scale as analysed, by image position; and the case's own (a smear case of enough fields).
    scales = ({"scales": [upload.scale for upload in prepared]}
              if any(upload.scale is not None for upload in prepared) else {})
    if case_scale.run is not None:
        scales["run_scale"] = case_scale.run
    if case_scale.stated_um_per_px is not None:
        scales["stated_um_per_px"] = case_scale.stated_um_per_px
    at_upload = differential(labels, analyzer.classes, analyzer.blast_classes, warnings)
    pairs = [(index, upload.repeat_of) for index, upload in enumerate(prepared) if upload.repeat_of is not None]
    if pairs:  # as current_differential says it
        at_upload["flags"].append(repeated_note(kind, pairs))
    at_upload["repeated_images"] = [{"position": position, "same_as": first} for position, first in pairs]
    with transaction(state.sessions) as db:
        case = Case(id=case_id, owner_id=user_id, kind=kind, status="new", note=note or "",
                    model_name=analyzer.model_name[:200], classes=list(analyzer.classes), review_comment="",
                    analysis={"threshold": analyzer.threshold, "blast_classes": analyzer.blast_classes,
                              # the detector took part in a smear field's result only
                              "models": {role: identity for role, identity in analyzer.models.items()
                                         if kind == "smear" or role != "detector"},
                              "warnings": warnings, **ood, **scales,
                              "differential_at_upload": at_upload})
        db.add(case)
        position = 0
        for index, (upload, files) in enumerate(zip(prepared, stored)):
            image = CaseImage(case=case, position=index, original_name=upload.name, format=upload.format,
                              width=upload.width, height=upload.height, size_bytes=len(upload.data),
                              sha256=files["original"].split(".")[0], original_object=files["original"],
                              served_object=files["served"], annotated_object=files["annotated"])
            db.add(image)
            for cell, cell_files in zip(upload.cells, files["cells"]):
                p = cell.prediction
                db.add(Cell(case=case, image=image, position=position, box=cell.box,
                            detection_score=cell.detection_score, predicted_label=p.label, top_class=p.top_class,
                            confidence=float(p.confidence), probabilities={k: float(v) for k, v in
                                                                           p.probabilities.items()},
                            uncertain=bool(p.uncertain), crop_object=cell_files["crop"],
                            overlay_object=cell_files["overlay"]))
                position += 1
        db.flush()
        user = db.get(User, user_id)
        audit(db, user, "case.create", case_id=case_id,
              detail={"kind": kind, "images": len(prepared), "cells": position}, client=client)
        payload = serialize(case) if serialize is not None else None
        if state.before_commit is not None:  # test hook: fail between the writes and the commit
            state.before_commit(db, case_id)
    return case_id, payload


# ------------------------------------------------------------------ read


def visible_cases(db: Session, principal: Principal, status: str | None = None, limit: int = 200,
                  offset: int = 0, after: tuple[datetime, str] | None = None) -> list[Case]:
    """Newest first; ``after``: only the cases after the one of this (created_at, id) in that order."""
    principal.require("technician", "hematologist")
    query = select(Case).order_by(Case.created_at.desc(), Case.id).limit(limit).offset(offset)
    if after is not None:
        created, case_id = after
        query = query.where(or_(Case.created_at < created, and_(Case.created_at == created, Case.id > case_id)))
    if principal.role == "technician":
        query = query.where(Case.owner_id == principal.user.id)
    if status:
        query = query.where(Case.status == status)
    return list(db.scalars(query).unique())


def cell_counts(db: Session, case_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per case: number of cells and of uncertain, unreviewed cells (for the case list)."""
    if not case_ids:
        return {}
    pending = sa_case((and_(Cell.uncertain, Cell.reviewed_label.is_(None)), 1), else_=0)
    rows = db.execute(select(Cell.case_id, func.count(Cell.id), func.sum(pending))
                      .where(Cell.case_id.in_(case_ids)).group_by(Cell.case_id)).all()
    return {case_id: {"cells": int(n), "uncertain": int(u or 0)} for case_id, n, u in rows}


def load_case(db: Session, principal: Principal, case_id: str, *, action: str | None = "case.view",
              request=None, for_update: bool = False) -> Case:
    """The case if ``principal`` may see it (404 otherwise: a technician cannot even learn
    that another's case exists); records ``action`` in the audit log. ``for_update``: its row locked
    until the transaction ends, so that two reviews of one case are applied one after the other, each to
    what the other saved (on SQLite, by taking the database's write lock before the case is read: Python's
    driver begins a transaction only at the first write, so two reviews had read the same state and the
    later one had overwritten the other without a word)."""
    principal.require("technician", "hematologist")
    case = None
    if CASE_ID.fullmatch(case_id or ""):
        if for_update:
            sqlite_write_lock(db, Case.status, Case.id == case_id)
        query = select(Case).where(Case.id == case_id).options(selectinload(Case.images), selectinload(Case.cells))
        case = db.scalar(query.with_for_update(of=Case) if for_update else query)
    if case is None or (principal.role == "technician" and case.owner_id != principal.user.id):
        raise ServiceError(404, "case_not_found", "no such case (or it is not yours to see)")
    if action:
        audit(db, principal.user, action, case_id=case.id, request=request)
    return case


def earlier_uploads(db: Session, principal: Principal, case: Case, limit: int = 10) -> dict[int, dict[str, Any]]:
    """By image id, for an image whose file (same SHA-256) came before: ``cases``, the earlier cases holding
    it that ``principal`` may open (every case for a hematologist, a technician's own; oldest first, at most
    ``limit``), ``more`` such cases beyond those, and ``in_this_case``, the positions of earlier images of
    this case with the same file. An image sent twice would be counted twice in a lab's figures and sit in
    two cases of an export. Another user's case is never named or counted for a technician (no hint that
    someone else sent the file). Images sent once are absent."""
    by_hash: dict[str, list[CaseImage]] = {}
    for image in sorted(case.images, key=lambda image: image.position):
        by_hash.setdefault(image.sha256, []).append(image)
    if not by_hash:
        return {}
    query = (select(CaseImage.sha256, Case.id).join(Case, Case.id == CaseImage.case_id)
             .where(CaseImage.sha256.in_(list(by_hash)), Case.id != case.id, Case.created_at <= case.created_at)
             .order_by(Case.created_at, Case.id))
    if principal.role != "hematologist":
        query = query.where(Case.owner_id == principal.user.id)
    holders: dict[str, list[str]] = {}
    for sha256, other_id in db.execute(query).all():
        if other_id not in holders.setdefault(sha256, []):
            holders[sha256].append(other_id)
    found: dict[int, dict[str, Any]] = {}
    for sha256, images in by_hash.items():
        others = holders.get(sha256, [])
        for index, image in enumerate(images):
            before = [earlier.position for earlier in images[:index]]
            if others or before:
                found[image.id] = {"cases": others[:limit], "more": max(0, len(others) - limit),
                                   "in_this_case": before}
    return found


def image_scale(case: Case, image: CaseImage) -> dict[str, Any] | None:
    """The scale a smear field was analysed at (``SmearResult.scale``), or a single-cell image framed at
    (:meth:`~leukoscope.inference.predictor.CellClassifier.frame`); None for a classifier without a physical
    window and for cases stored before it was recorded."""
    scales = case.analysis.get("scales") or []
    return scales[image.position] if image.position < len(scales) else None


def scale_text(scale: dict[str, Any] | None, kind: str = "smear") -> str:
    """One line for a reviewer: the image's scale and where it came from (``kind``: the case's, for its words)."""
    if not scale:
        return ""
    um = scale.get("um_per_px")
    what = "field" if kind == "smear" else "image"
    origin = {"given": f"stated ({SCALE_FIELD})", "recorded": "recorded in the image file",
              "estimated": f"estimated from {scale.get('red_cells', 0)} red cells",
              "run": f"not estimated from this {what}: the case's {what}s together"}.get(scale.get("source"))
    if um is None or origin is None:
        return str(scale.get("note") or "scale not estimated")
    return f"scale {um:.4f} um/px, {origin}"


def repeated_images(images: Sequence[CaseImage]) -> dict[int, CaseImage]:
    """By image id, for each later copy of a file in one case (same SHA-256), the case's first image of it.
    A copy's cells are not counted or exported: new cases store none for it, but cases stored before did."""
    first: dict[str, CaseImage] = {}
    repeats: dict[int, CaseImage] = {}
    for image in sorted(images, key=lambda image: image.position):
        earlier = first.setdefault(image.sha256, image)
        if earlier is not image:
            repeats[image.id] = earlier
    return repeats


def repeated_note(kind: str, pairs: Sequence[tuple[int, int]]) -> str:
    """What a differential says of a case's repeated files, ``pairs`` of (position, first copy's position);
    "" when none."""
    if not pairs:
        return ""
    what = "field" if kind == "smear" else "image"
    named = ", ".join(f"{what} {position + 1} = {what} {first + 1}" for position, first in pairs)
    return f"{what.capitalize()}s uploaded twice in this case ({named}): each file's cells are counted once."


def counted_cells(case: Case) -> list[Cell]:
    """The case's cells but those of a file's later copy (:func:`repeated_images`; only cases stored before a
    copy was left unanalysed have any): what its differential counts, its export holds and its review needs."""
    repeats = repeated_images(case.images)
    return [cell for cell in case.cells if cell.image_id not in repeats]


def current_differential(case: Case) -> dict[str, Any]:
    """The differential from the current labels: the reviewed one where a hematologist gave
    it, else the model's (``uncertain`` below the threshold); excluded cells do not count, nor do the cells of
    a file's second copy in the case (:func:`repeated_images`). Once every
    cell has a reviewed label, the warnings that doubt only the classifier's calls are answered and
    left out (:func:`~leukoscope.inference.quality.about_classification_only`): the leukemia flag then
    rests on the hematologist's classes. The detector's warnings stay (cells may have been missed)."""
    repeats = repeated_images(case.images)
    cells = counted_cells(case)
    labels = [cell.final_label for cell in cells if cell.final_label != EXCLUDED]
    blast_classes = case.analysis.get("blast_classes", [])
    warnings = [in_service_words(warning) for warning in case.analysis.get("warnings", [])]  # cases stored before
    if cells and all(cell.reviewed_label is not None for cell in cells):
        warnings = [warning for warning in warnings if not about_classification_only(warning)]
    result = differential(labels, case.classes, blast_classes, warnings)
    if cells and not labels:  # nothing was "not found": the reviewer excluded what was
        result["flags"] = [flag for flag in result["flags"] if flag.startswith("WARNING: ")] + [ALL_EXCLUDED_FLAG]
    pairs = [(image.position, repeats[image.id].position) for image in case.images if image.id in repeats]
    if pairs:
        result["flags"].append(repeated_note(case.kind, pairs))
    result["repeated_images"] = [{"position": position, "same_as": first} for position, first in pairs]
    return result


# ------------------------------------------------------------------ review


def review_state(case: Case) -> str:
    """A digest of what a review can change (each cell's reviewed label, the comment, the status): a review
    form carries the one its page showed, and a review made from a page another review has since overtaken
    is refused rather than saved over it (:func:`review_case`'s ``expected_state``)."""
    state = [sorted((cell.id, cell.reviewed_label or "") for cell in case.cells), case.review_comment or "",
             case.status]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:16]


def _review_changes(case: Case, labels: dict[int, str], comment: str | None, confirm_rest: bool) -> bool:
    """Whether a review would change what is saved: a cell's label, the comment, or (``confirm_rest``) a counted
    cell not reviewed yet. Unknown cells count as changes (the review goes on to refuse them)."""
    cells = {cell.id: cell for cell in case.cells}
    if any(cell_id not in cells or cells[cell_id].reviewed_label != label for cell_id, label in labels.items()):
        return True
    if comment is not None and comment != case.review_comment:
        return True
    return confirm_rest and any(cell.reviewed_label is None for cell in counted_cells(case))


def review_case(db: Session, principal: Principal, case: Case, labels: dict[int, str], comment: str | None,
                *, confirm_rest: bool = True, expected_state: str | None = None, request=None) -> dict[str, Any]:
    """Set the hematologist's label of each cell in ``labels``; with ``confirm_rest``,
    every other cell keeps (confirms) its predicted class. The case becomes
    ``reviewed`` once every cell has a reviewed label. ``expected_state``: the :func:`review_state` the
    reviewer saw; when another review has been saved since, nothing is saved (409): a form sends every
    cell's class as its page showed it, and would silently undo the other reviewer's corrections. A review
    that would change nothing saved (the same form sent again) is answered as saved, with nothing changed."""
    principal.require("hematologist")
    check_length(comment, MAX_COMMENT, "review comment", "comment_too_long")
    # A form sent twice (a double click, the browser's back and send again) changes nothing the second time: that
    # is saved as it stands, not refused as "nothing was saved" (the reviewer's labels are the saved ones).
    if (expected_state is not None and expected_state != review_state(case)
            and _review_changes(case, labels, comment, confirm_rest)):
        raise ServiceError(409, "review_conflict", "another review of this case was saved after you opened it, "
                                                   "so nothing was saved: the labels shown now are the ones saved; "
                                                   "review them again")
    allowed = set(case.classes) | {EXCLUDED}
    cells = {cell.id: cell for cell in case.cells}
    unknown = sorted(set(labels) - set(cells))
    if unknown:
        raise ServiceError(422, "unknown_cell", f"cells {unknown} are not part of case {case.id}")
    for cell_id, label in labels.items():
        if label not in allowed:
            raise ServiceError(422, "bad_label", f"cell {cell_id}: {label!r} is not one of "
                                                 f"{', '.join(sorted(allowed))}")
    wanted: dict[int, str] = dict(labels)
    if confirm_rest:
        for cell in counted_cells(case):  # a repeated file's old cells count for nothing: not confirmed
            if cell.id in wanted or cell.reviewed_label is not None:
                continue
            if cell.uncertain:
                raise ServiceError(422, "label_required", f"cell {cell.id} (number {cell.position + 1} on the case "
                                                          f"page) is uncertain: choose its class (or 'excluded')")
            wanted[cell.id] = cell.top_class
    now = utcnow()
    changes = []
    for cell_id, label in wanted.items():
        cell = cells[cell_id]
        previous = cell.reviewed_label
        if previous == label:
            continue
        db.add(CellReview(cell_id=cell.id, reviewer_id=principal.user.id, label=label, previous_label=previous,
                          created_at=now))
        changes.append({"cell": cell.id, "predicted": cell.predicted_label, "from": previous, "to": label})
        cell.reviewed_label, cell.reviewed_by, cell.reviewed_at = label, principal.user.id, now
    comment_change = None
    if comment is not None and comment != case.review_comment:
        comment_change = {"from": case.review_comment, "to": comment}  # the audit keeps both texts
        case.review_comment = comment
    # a review that changed nothing (the same form sent again, or another reviewer's agreeing one) leaves "reviewed
    # by" to whoever's labels stand
    if all(cell.reviewed_label is not None for cell in counted_cells(case)) and (
            changes or comment_change or case.status != "reviewed"):
        case.status = "reviewed"
        case.reviewed_at = now
        case.reviewer_id = principal.user.id
        case.reviewer = principal.user  # the relationship too: the response is made before any refresh
    corrected = sum(1 for c in changes if c["to"] != c["predicted"])
    audit(db, principal.user, "case.review", case_id=case.id, request=request,
          detail={"changed": len(changes), "corrected": corrected, "status": case.status,
                  "labels": {str(c["cell"]): c["to"] for c in changes},
                  **({"comment": comment_change} if comment_change else {})})
    return {"changed": len(changes), "corrected": corrected, "status": case.status}
