"""What the API and the pages both do: create a case from uploads, find the cases
a user may see, review a case, export reviewed labels. One implementation, two
thin front ends (``routes_api`` and ``routes_pages``)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import secrets
import tempfile
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from PIL import Image, UnidentifiedImageError
from sqlalchemy import and_, func, or_, select
from sqlalchemy import case as sa_case
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool

from leukoscope.data.fingerprints import DIGEST_CHARS, PNG_SIGNATURE, with_source_digest
from leukoscope.inference.predictor import Prediction
from leukoscope.inference.quality import (CAP_WORDING, about_classification_only, classified_unit,
                                          is_unfamiliar_warning, unfamiliar_warning)
from leukoscope.inference.smear_output import FieldWarnings, folded_field_warnings, is_folded
from leukoscope.io import (SUPPORTED_FORMATS, ImageDecodeError, ImageTooLargeError, allow_pixels, load_image,
                           too_many_pixels)
from leukoscope.labels import DISCLAIMER, case_clashes, is_folder_name
from leukoscope.progress import name_some
from leukoscope.scale import (RUN_SCALE_MIN_ESTIMATES, STATED_DOUBT_MIN_ESTIMATES, FieldScale, checked_um_per_px,
                              field_scale, run_sample, run_scale_of, stated_doubt_of_run)
from leukoscope.service import throttle
from leukoscope.service.analysis import SCALE_FIELD, ImageOutcome, differential, in_service_words
from leukoscope.service.auth import Principal, audit, too_many
from leukoscope.service.db import sqlite_write_lock, transaction
from leukoscope.service.errors import ServiceError
from leukoscope.service.storage import EXTENSIONS, clean_png, jpeg_bytes
from leukoscope.service.tables import CASE_KINDS, Case, CaseImage, Cell, CellReview, User, utcnow

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


@dataclass
class Upload:
    filename: str
    data: bytes


@dataclass
class DecodedUpload:
    name: str
    data: bytes
    format: str
    image: Image.Image


@dataclass
class PreparedCell:
    """One analysed cell, its pictures already encoded (no decoded pixels kept)."""

    prediction: Prediction
    box: list[int] | None
    detection_score: float | None
    crop_png: bytes | None
    overlay_jpeg: bytes | None


@dataclass
class PreparedImage:
    """One analysed upload, ready to store: bytes only, so that a request holds at most one
    decoded image at a time however many files it has."""

    name: str
    data: bytes
    format: str
    width: int
    height: int
    served_png: bytes
    annotated_png: bytes | None
    cells: list[PreparedCell]
    warnings: list[str] = field(default_factory=list)
    """The analysis' quality warnings (:attr:`leukoscope.service.analysis.ImageOutcome.warnings`)."""
    scale: dict[str, Any] | None = None
    """A smear field's scale as analysed (:attr:`leukoscope.service.analysis.ImageOutcome.scale`)."""
    repeat_of: int | None = None
    """The position of the earlier upload of this case with the same file: this one was not analysed again
    and has no cells (a field sent twice must not be counted twice)."""


def repeat_of(original: PreparedImage, upload: Upload, position: int) -> PreparedImage:
    """A later copy of ``original``'s file in the same case: stored and shown, but no cells of its own."""
    return replace(original, name=display_name(upload.filename), annotated_png=None, cells=[], warnings=[],
                   repeat_of=position)


def repeated_positions(uploads: Sequence[Upload]) -> dict[int, int]:
    """By position, the position of the first upload with the same bytes, for every later copy."""
    first: dict[str, int] = {}
    repeats: dict[int, int] = {}
    for index, upload in enumerate(uploads):
        earlier = first.setdefault(hashlib.sha256(upload.data).hexdigest(), index)
        if earlier != index:
            repeats[index] = earlier
    return repeats


def display_name(filename: str | None) -> str:
    """The client's file name reduced to something safe to *show* (it is never a path)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in unicodedata.normalize("NFC", name) if unicodedata.category(ch)[0] != "C")
    name = name.strip().lstrip(".") or "upload"
    return name[:200]


#: Magic numbers: what a file *is*, whatever its name says.
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"%PDF", "PDF"),
)


def sniff_format(data: bytes) -> str | None:
    """The file type from its first bytes (never from its name)."""
    for magic, name in MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_format(upload: Upload) -> tuple[str, str]:
    name = display_name(upload.filename)
    if not upload.data:
        raise ServiceError(400, "empty_file", f"{name}: the file is empty (0 bytes)")
    fmt = sniff_format(upload.data)
    if fmt not in SUPPORTED_FORMATS:
        found = f"a {fmt} file" if fmt else "not an image"
        raise ServiceError(415, "unsupported_format", f"{name}: {found}; send JPEG, PNG, BMP or TIFF (the format is "
                                                      "read from the file's content, not its name)")
    return name, fmt


def header_pixels(upload: Upload, max_pixels: int) -> int:
    """The pixel count a file's header declares (nothing is decoded); 413 past ``max_pixels``.
    A header Pillow cannot read counts 0 here: decoding then says what is wrong with it."""
    name, _fmt = _check_format(upload)
    allow_pixels(max_pixels)  # as load_image does: else Pillow's own limit would refuse what the server allows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(upload.data)) as image:
                width, height = image.size
        except Image.DecompressionBombError as exc:
            raise ServiceError(413, "too_many_pixels", too_many_pixels(name, exc, max_pixels)) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return 0
    if width * height > max_pixels:
        raise ServiceError(413, "too_many_pixels", f"{name}: {width}x{height} = {width * height:,} pixels exceeds "
                                                   f"the limit of {max_pixels:,} pixels")
    return width * height


def check_uploads(uploads: Sequence[Upload], max_pixels: int, max_files: int, max_total: int) -> None:
    """Everything that can be refused from the headers, before any file is decoded: the
    number of files, empty files, formats, pixels per file and pixels of the whole upload."""
    if not uploads:
        raise ServiceError(400, "no_file", "choose at least one image file to upload")
    if len(uploads) > max_files:
        raise ServiceError(413, "too_many_files", f"{len(uploads)} files in one upload; at most {max_files}")
    total = sum(header_pixels(upload, max_pixels) for upload in uploads)
    if total > max_total:
        raise ServiceError(413, "too_many_pixels_in_upload",
                           f"{len(uploads)} images of {total:,} pixels in all in one upload; at most {max_total:,} "
                           "(send fewer or smaller images at a time)")


def decode_upload(upload: Upload, max_pixels: int) -> DecodedUpload:
    name, fmt = _check_format(upload)
    try:
        image = load_image(upload.data, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise ServiceError(413, "too_many_pixels", f"{name}: {_strip_source(exc)}") from None
    except ImageDecodeError as exc:
        raise ServiceError(422, "corrupt_image", f"{name}: a damaged or truncated {fmt} file "
                                                 f"({_strip_source(exc)})") from None
    return DecodedUpload(name, upload.data, fmt, image)


def _strip_source(exc: Exception) -> str:
    return str(exc).removeprefix("<uploaded bytes>: ")


def encode_outcome(decoded: DecodedUpload, outcome: ImageOutcome) -> PreparedImage:
    """Encode every picture of one analysed upload (served copy, annotated field, crops,
    Grad-CAM overlays), so that its decoded pixels can go."""
    cells = [PreparedCell(cell.prediction, cell.box, cell.detection_score,
                          clean_png(cell.crop) if cell.crop is not None else None,
                          jpeg_bytes(cell.overlay) if cell.overlay is not None else None) for cell in outcome.cells]
    return PreparedImage(decoded.name, decoded.data, decoded.format, decoded.image.width, decoded.image.height,
                         clean_png(decoded.image),
                         clean_png(outcome.annotated) if outcome.annotated is not None else None, cells,
                         list(outcome.warnings), outcome.scale)


async def prepare_upload(state: "ServiceState", kind: str, upload: Upload, run_um_per_px: float | None = None,
                         um_per_px: float | None = None) -> PreparedImage:
    """Decode, analyse and encode one file; its decoded image is freed when this returns."""
    decoded = await run_in_threadpool(decode_upload, upload, state.settings.max_pixels)
    (outcome,) = await state.analyzer.run(kind, [decoded.image], run_um_per_px=run_um_per_px, um_per_px=um_per_px)
    return await run_in_threadpool(encode_outcome, decoded, outcome)


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


# ------------------------------------------------------------------ export


EXPORT_LAYOUTS = ("folders", "csv")
#: Why a reviewed cell is left out of the export (the export page, the ZIP's NOTES.txt and the API's header say it).
UNFRAMED_REASON = ("their single-cell image had no scale (none stated, too few red cells), so the classifier saw "
                   "the whole image instead of its physical window: the cell is not at the size a model trained on "
                   "the export sees; upload such images again with the microscope's scale (um_per_px)")


@dataclass
class Export:
    """A written export: the ZIP's path, the cells in it, the reviewed cells left out (:func:`unframed`, and the
    copies of :func:`one_copy_each`) and how many cells' copies were reviewed with different labels."""

    path: str
    cells: int
    left_out: int
    conflicts: int = 0


@dataclass
class ExportSelection:
    """What an export holds and what it leaves out, and why (:func:`exportable_cells`)."""

    cells: list[Cell]
    unframed: list[Cell] = field(default_factory=list)
    copies: list[tuple[Cell, Cell]] = field(default_factory=list)
    """(a cell left out, the exported cell it is a copy of)."""
    conflicts: list[list[Cell]] = field(default_factory=list)
    """The copies of one cell, the exported one first, where their reviewed labels differ."""
    excluded: int = 0
    """Reviewed cells marked excluded (never exported: said when nothing else is there)."""

    @property
    def left_out(self) -> list[Cell]:
        return self.unframed + [copy for copy, _kept in self.copies]


def unframed(cell: Cell) -> bool:
    """A single-cell image that a classifier of a physical window classified whole, for want of a scale: no crop
    of its window was stored, and the whole image would train a model on cells of the wrong size (one without a
    window takes images as they are: its cells have no scale record and are exported whole, as it saw them)."""
    if cell.crop_object is not None:
        return False
    scale = image_scale(cell.case, cell.image)
    return scale is not None and not scale.get("um_per_px")


#: Two boxes of one file overlapping at least this much (intersection over union) are one cell: a field analysed
#: again at another stated scale, or by another detector, boxes its cells a few pixels apart.
SAME_CELL_IOU = 0.5


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def same_cell(cell: Cell, other: Cell) -> bool:
    """One cell whichever case holds it: the same image file (SHA-256, as :func:`earlier_uploads` finds a file sent
    again), and boxes overlapping by :data:`SAME_CELL_IOU` (no box: a single-cell image, the whole image is the
    cell)."""
    if cell.image.sha256 != other.image.sha256 or bool(cell.box) != bool(other.box):
        return False
    return not cell.box or box_iou(cell.box, other.box) >= SAME_CELL_IOU


def one_copy_each(cells: Sequence[Cell]) -> tuple[list[Cell], list[tuple[Cell, Cell]], list[list[Cell]]]:
    """A file uploaded in several cases has its cells reviewed in each: the export keeps each cell once, the
    copy of the earliest case (by upload time) that holds it reviewed, so that a later upload of the file does
    not change what an export holds. Returns the kept cells (in ``cells``' order), the copies left out (each with
    the cell kept) and the copies whose labels differ (the kept one first): ``train`` on both had warned that
    "byte-identical images carry different labels" and learned from both."""
    by_file: dict[str, list[list[Cell]]] = {}
    for cell in sorted(cells, key=lambda cell: (cell.case.created_at, cell.case_id, cell.position)):
        groups = by_file.setdefault(cell.image.sha256, [])
        # a cell of another case joins the first group it is the same cell as (:func:`same_cell`), never one of
        # its own case: two cells of one field are two cells, however close
        group = next((g for g in groups if all(c.case_id != cell.case_id for c in g) and same_cell(g[0], cell)),
                     None)
        if group is None:
            groups.append([cell])
        else:
            group.append(cell)
    every = [group for groups in by_file.values() for group in groups]
    copies = [(copy, group[0]) for group in every for copy in group[1:]]
    conflicts = [group for group in every if len({cell.reviewed_label for cell in group}) > 1]
    left_out = {copy.id for copy, _kept in copies}
    return [cell for cell in cells if cell.id not in left_out], copies, conflicts


def exportable_cells(db: Session) -> ExportSelection:
    """The reviewed cells of an export (not excluded, not a repeated file's copy in its case, each cell of a file
    uploaded in several cases once: :func:`one_copy_each`), and those left out because they were classified
    unframed (:func:`unframed`) or are another case's copy."""
    reviewed = and_(Cell.reviewed_label.is_not(None), Cell.reviewed_label != EXCLUDED)
    cells = db.scalars(
        select(Cell).where(reviewed).options(selectinload(Cell.image), selectinload(Cell.case))
        .order_by(Cell.case_id, Cell.position)
    ).all()
    # A file sent twice in one case: its later copy's cells (cases stored before they were left out) once only.
    images: dict[str, list[CaseImage]] = {}
    for image in db.scalars(select(CaseImage).where(CaseImage.case_id.in_(select(Cell.case_id).where(reviewed)))):
        images.setdefault(image.case_id, []).append(image)
    repeats = {image_id for case_images in images.values() for image_id in repeated_images(case_images)}
    cells = [cell for cell in cells if cell.image_id not in repeats]
    # Unframed cells first: a framed copy of one in another case (sent again with its scale) is then exported.
    framed, copies, conflicts = one_copy_each([cell for cell in cells if not unframed(cell)])
    excluded = db.scalar(select(func.count()).select_from(Cell).where(Cell.reviewed_label == EXCLUDED)) or 0
    return ExportSelection(framed, [cell for cell in cells if unframed(cell)], copies, conflicts, excluded)


def export_dataset(db: Session, principal: Principal, read_object: Callable[[str], bytes], layout: str,
                   request=None, workdir: str | Path | None = None) -> Export:
    """Every reviewed cell as a training image, in a ZIP written to a temporary file:
    ``folders``: ``<label>/case-<id>-cell-<n>.png`` (what ``leukoscope train --data`` reads);
    ``csv``: ``images/...png`` plus ``manifest.csv`` (path,label,subject,...), subject = case,
    so that a split keeps the cells of one case together. Cells classified whole for want of a scale are left
    out (:func:`unframed`), and so are the copies of a cell whose file was uploaded in several cases (one kept:
    :func:`one_copy_each`); ``NOTES.txt`` in the ZIP says how many and why, and names the copies whose labels
    differ. ``workdir``: where
    the ZIP is written (the store's private ``tmp``, whose leftover ``*.part`` files the start-up clean-up
    removes); it is deleted here if the export fails, and by the caller once sent or if its commit fails."""
    principal.require("hematologist")
    if layout not in EXPORT_LAYOUTS:
        raise ServiceError(400, "bad_layout", f"layout must be one of {', '.join(EXPORT_LAYOUTS)}")
    selection = exportable_cells(db)
    if not selection.cells:  # an empty ZIP said nothing: refused, saying why
        raise ServiceError(409, "nothing_to_export", nothing_to_export(selection))
    handle = tempfile.NamedTemporaryFile(prefix="export-", suffix=".zip.part", dir=workdir, delete=False)
    try:
        rows = _write_export(handle, selection.cells, read_object, layout, selection)
    except BaseException:
        handle.close()
        os.unlink(handle.name)
        raise
    handle.close()
    audit(db, principal.user, "dataset.export", request=request,
          detail={"layout": layout, "cells": len(rows), "cases": len({r["case"] for r in rows}),
                  "left_out_unframed": len(selection.unframed), "left_out_copies": len(selection.copies),
                  "label_conflicts": len(selection.conflicts)})
    return Export(handle.name, len(rows), len(selection.left_out), len(selection.conflicts))


def nothing_to_export(selection: ExportSelection) -> str:
    """Why an export holds no cell (the API's 409 and the export page say it)."""
    left_out = len(selection.left_out)
    if not left_out and selection.excluded:  # reviewed, every cell marked excluded: not "review a case first"
        n = selection.excluded
        return (f"no cell to export: the {n} reviewed cell{'' if n == 1 else 's'} {'is' if n == 1 else 'are'} "
                f"marked excluded (not a cell to learn from); review a case with cells to keep")
    if not left_out:
        return "no reviewed cells yet: review a case first"
    return (f"no reviewed cell to export: the {left_out} reviewed cell{'' if left_out == 1 else 's'} not excluded "
            f"{'is' if left_out == 1 else 'are'} left out (the export page says why)")


#: Why a copy of a cell is left out (the export page and NOTES.txt say it).
COPY_REASON = ("the same image file (same content) was uploaded in more than one case, and each of its cells is "
               "exported once, from the earliest case holding it reviewed")


def cell_words(cell: Cell) -> str:
    """A cell as a lab finds it again: its case, its id (the export's file names) and number on the case page."""
    return f"case {cell.case_id} cell {cell.id} (number {cell.position + 1} on its case page)"


def export_notes(selection: ExportSelection) -> str:
    """NOTES.txt of an export that left cells out or holds cells reviewed differently in two cases ("" when
    neither)."""
    parts = []
    if selection.unframed:
        cases = sorted({cell.case_id for cell in selection.unframed})
        parts.append(f"{len(selection.unframed)} reviewed cell(s) of {len(cases)} case(s) were left out of this "
                     f"export: {UNFRAMED_REASON}.\nCases: {', '.join(cases)}\n")
    if selection.copies:
        lines = [f"- {cell_words(copy)}, a copy of {cell_words(kept)}\n" for copy, kept in selection.copies]
        parts.append(f"{len(selection.copies)} reviewed cell(s) were left out as copies: {COPY_REASON}.\n"
                     + "".join(lines))
    if selection.conflicts:
        lines = []
        for group in selection.conflicts:
            where = f"{group[0].image.original_name}" + (f", box {group[0].box}" if group[0].box else "")
            said = "; ".join(f"{cell_words(cell)}: {cell.reviewed_label!r}" for cell in group)
            lines.append(f"- {where}: {said}; exported as {group[0].reviewed_label!r}\n")
        parts.append(f"LABEL CONFLICTS: {len(selection.conflicts)} cell(s) were reviewed with different labels in "
                     "the cases holding their image file; the export holds the earliest case's label. Review "
                     "them again to give them one label.\n" + "".join(lines))
    return "\n".join(parts)


#: Characters a folder name cannot hold on some file system a lab unpacks the export on (Windows' set).
def check_export_folders(labels: set[str]) -> None:
    """A ``folders`` export names each class's folder by the class itself, which ``leukoscope train --data``
    reads back as the class (renaming it would merge classes or lose a blast class: "Early Pre-B"). A name
    that cannot be a folder, or two that one case-insensitive file system would merge, is refused (400): the
    ``csv`` layout keeps any name."""
    for label in sorted(labels):
        if not is_folder_name(label):
            raise ServiceError(400, "label_not_a_folder", f"the class {label!r} cannot be a folder name; export "
                                                          f"with layout=csv, which keeps it in manifest.csv")
    for other, label, *_ in case_clashes(sorted(labels)):
        raise ServiceError(400, "labels_collide", f"the classes {other!r} and {label!r} would share one folder "
                                                  f"on a case-insensitive file system; export with layout=csv")


def _write_export(handle: Any, cells: Sequence[Cell], read_object: Callable[[str], bytes],
                  layout: str, selection: ExportSelection | None = None) -> list[dict[str, Any]]:
    rows = []
    if layout == "folders":
        check_export_folders({cell.reviewed_label or "" for cell in cells})
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
        for cell in cells:
            label = cell.reviewed_label or ""
            file_name = f"case-{cell.case_id}-cell-{cell.id}.png"
            member = f"{label}/{file_name}" if layout == "folders" else f"images/{file_name}"
            # the uploaded file's digest in the PNG: a model fine-tuned on the export records it, and `analyze` or
            # `predict` of that file says the model learned from it
            data = read_object(cell.crop_object or cell.image.served_object)
            if data.startswith(PNG_SIGNATURE):  # (every stored cell and served image is a PNG; anything else as is)
                data = with_source_digest(data, cell.image.sha256[:DIGEST_CHARS])
            archive.writestr(member, data)
            rows.append({"path": member, "label": label, "subject": cell.case_id, "case": cell.case_id,
                         "cell": cell.id, "predicted": cell.predicted_label, "top_class": cell.top_class,
                         "confidence": round(cell.confidence, 6), "reviewed_at": cell.reviewed_at.isoformat()
                         if cell.reviewed_at else ""})
        if layout == "csv":
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=["path", "label", "subject", "case", "cell", "predicted",
                                                      "top_class", "confidence", "reviewed_at"])
            writer.writeheader()
            writer.writerows(rows)
            archive.writestr("manifest.csv", text.getvalue())
        notes = export_notes(selection) if selection is not None else ""
        if notes:  # a text file at the top: `leukoscope train --data` reads images only
            archive.writestr("NOTES.txt", notes)
    return rows
