"""The FastAPI application: ``create_app(settings)``.

Start-up (synchronous, before the first request): open the database and run the
Alembic migrations (or check the schema), open the content store under the data
directory, load the classifier (and detector) bundles once and warm the
inference threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import leukoscope
from leukoscope.service import db as dbm
from leukoscope.service.tables import LABEL_LENGTH
from leukoscope.service.analysis import Analyzer
from leukoscope.service.auth import PasswordGate, audit, client_address, optional_principal, same_origin_referer
from leukoscope.service.cases import DECISION_SUPPORT_NOTE
from leukoscope.service.errors import BodyTooLarge, LoginRequired, ServiceError
from leukoscope.service.settings import ServiceSettings
from leukoscope.service.storage import ContentStore, make_private_dir

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent

#: Pages: nothing from anywhere else, no inline script or style, no framing.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
#: Bytes a multipart envelope adds around the files (boundaries, headers, form fields).
MULTIPART_OVERHEAD = 256 * 1024


@dataclass
class ServiceState:
    settings: ServiceSettings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ContentStore
    analyzer: Analyzer
    password_gate: PasswordGate
    templates: Jinja2Templates
    owns_analyzer: bool = True
    #: Test hook, called inside the case transaction after the rows are flushed and
    #: before the commit (raise in it to simulate a crash between files and commit).
    before_commit: Callable[[Session, str], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class LimitBody:
    """Refuse request bodies over the limit while they stream in (Content-Length or not),
    before any of it reaches the multipart parser's temporary files."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes + MULTIPART_OVERHEAD
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = False
        try:
            too_big = declared is not None and int(declared) > limit
        except ValueError:
            too_big = True
        received = 0

        async def limited() -> Message:
            nonlocal received
            if too_big:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class ServerErrors:
    """An unexpected exception becomes a 500 in the service's own form (JSON for the API, the
    error page otherwise) *inside* SecurityHeaders: Starlette's own 500 is sent outside every
    middleware, as plain text without the security headers. The details go to the log only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for an error response: let the server close the connection
                raise
            response = render_error(Request(scope), 500, "internal_error",
                                    "an internal error occurred; it has been logged")
            await response(scope, receive, send)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/") or scope["path"].startswith("/api/docs-assets/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                defaults = {
                    b"x-content-type-options": b"nosniff",
                    b"x-frame-options": b"DENY",
                    b"referrer-policy": b"same-origin",
                    b"content-security-policy": CSP.encode(),
                    b"cross-origin-opener-policy": b"same-origin",
                    b"permissions-policy": b"camera=(), microphone=(), geolocation=()",
                    b"cache-control": b"public, max-age=3600" if static else b"no-store",
                }
                headers += [(k, v) for k, v in defaults.items() if k not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def render_error(request: Request, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
    if wants_json(request):
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)
    state: ServiceState = request.app.state.service
    return state.templates.TemplateResponse(
        request, "error.html", {"status": status, "code": code, "message": message, "user": None},
        status_code=status, headers=headers)


def build_state(settings: ServiceSettings, analyzer: Analyzer | None = None) -> ServiceState:
    make_private_dir(settings.data_dir)
    engine = dbm.make_engine(settings.resolved_database_url)
    if settings.migrate:
        dbm.upgrade(engine)
    else:
        dbm.check_schema(engine)
    owns = analyzer is None
    if analyzer is None:
        if settings.bundle is None:
            raise ValueError("a cell-classifier bundle is required: --bundle DIR (or LEUKOSCOPE_BUNDLE)")
        analyzer = Analyzer.from_bundles(settings.bundle, settings.detector,
                                         uncertain_threshold=settings.uncertain_threshold,
                                         gradcam=settings.gradcam, threads=settings.inference_threads,
                                         blast_classes=settings.blast_class_list,
                                         smear_options={"backend": settings.detector_backend,
                                                        "threads": settings.torch_threads},
                                         backend=settings.classifier_backend,
                                         backend_threads=settings.torch_threads)
        analyzer.warm_up()
    too_long = [name for name in analyzer.classes if len(name) > LABEL_LENGTH]
    if too_long:  # every upload would fail on PostgreSQL (and the stored files stay behind until a restart)
        if owns:
            analyzer.close()
        raise ValueError(f"class name(s) longer than {LABEL_LENGTH} characters cannot be stored: "
                         f"{', '.join(repr(n) for n in too_long)}; shorten them in the bundle's bundle.json")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(decision_note=DECISION_SUPPORT_NOTE, version=leukoscope.__version__)
    return ServiceState(
        settings=settings, engine=engine, sessions=dbm.make_sessionmaker(engine),
        store=ContentStore(settings.store_dir, fsync=settings.fsync), analyzer=analyzer,
        password_gate=PasswordGate(settings.password_checks), templates=templates, owns_analyzer=owns,
    )


def create_app(settings: ServiceSettings | None = None, *, analyzer: Analyzer | None = None) -> FastAPI:
    """The service as an ASGI app. ``analyzer``: an already loaded :class:`Analyzer`
    (tests share one); by default it is built from ``settings.bundle``/``detector``."""
    from contextlib import asynccontextmanager

    from leukoscope.service import routes_api, routes_pages

    settings = settings or ServiceSettings.from_env()
    state = build_state(settings, analyzer)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if state.owns_analyzer:
            state.analyzer.close()
        state.engine.dispose()

    app = FastAPI(
        title="leukoscope telediagnosis service",
        version=leukoscope.__version__,
        description=f"Upload blood-smear images, get cell classes with Grad-CAM, review, export.\n\n"
                    f"**{DECISION_SUPPORT_NOTE}**\n\nAuthenticate scripts with `Authorization: Bearer lks_...` "
                    f"(create a token on the Account page or with `leukoscope user token`).",
        docs_url=None, redoc_url=None, openapi_url="/api/openapi.json", lifespan=lifespan,
    )
    app.state.service = state

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        if exc.status in (403, 404):
            await run_in_threadpool(record_denial, state, request, exc)
        return render_error(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, _exc: LoginRequired):
        from urllib.parse import quote

        if request.method in ("GET", "HEAD"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)
        if request.url.path == "/logout":  # nothing to save: the session is gone already
            return RedirectResponse("/login", status_code=303)
        # A form sent after the session ended: its route answers POST only, so back to the page it came from
        # when that is a page (some forms answer at their own POST-only address), and the log-in page says the
        # form was not saved.
        target = same_origin_referer(request)
        if target is None or not _is_page(target):
            target = "/"
        return RedirectResponse(f"/login?next={quote(target, safe='/')}&unsaved=1", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # FastAPI validates the body before the route runs: say "who are you" before "what is wrong".
        if wants_json(request) and await run_in_threadpool(anonymous, state, request):
            return render_error(request, 401, "not_authenticated", "send an API token: Authorization: Bearer "
                                "lks_...", {"WWW-Authenticate": "Bearer"})
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return render_error(request, 422, "invalid_request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI reports any failed read of a JSON body as a 400
            if wants_json(request) and await run_in_threadpool(anonymous, state, request):
                return render_error(request, 401, "not_authenticated", "send an API token: Authorization: "
                                    "Bearer lks_...", {"WWW-Authenticate": "Bearer"})
            return render_error(request, exc.__cause__.status, exc.__cause__.code, exc.__cause__.message)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return render_error(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    try:
        import fastapi_offline

        assets = Path(fastapi_offline.__file__).resolve().parent / "static"
        app.mount("/api/docs-assets", StaticFiles(directory=str(assets)), name="docs-assets")
        state.extra["docs_assets"] = True
    except ImportError:  # pragma: no cover - docs page then links the schema only
        state.extra["docs_assets"] = False
    app.include_router(routes_api.router)
    app.include_router(routes_pages.router)
    app.add_middleware(LimitBody, max_bytes=settings.max_upload_bytes)
    app.add_middleware(ServerErrors)
    app.add_middleware(SecurityHeaders)
    return app


def _is_page(target: str) -> bool:
    """Whether ``target`` (a path, maybe with a query) is one of the service's pages (a GET route)."""
    from starlette.routing import Match

    from leukoscope.service import routes_pages

    scope = {"type": "http", "path": target.split("?", 1)[0], "method": "GET"}
    return any("GET" in (getattr(route, "methods", None) or ()) and route.matches(scope)[0] == Match.FULL
               for route in routes_pages.router.routes)


def anonymous(state: ServiceState, request: Request) -> bool:
    with dbm.transaction(state.sessions) as db:
        return optional_principal(db, request) is None


def record_denial(state: ServiceState, request: Request, error: ServiceError) -> None:
    """Audit a refused (403) or hidden (404) request of a known user (an anonymous one is
    not written: anybody could fill the audit log with them)."""
    with dbm.transaction(state.sessions) as db:
        principal = optional_principal(db, request)
        if principal is None:
            return
        audit(db, principal.user, "access.denied", client=client_address(request),
              detail={"status": error.status, "code": error.code, "method": request.method,
                      "path": request.url.path[:200]})


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and for each worker of ``leukoscope serve --workers N``:
    settings from ``LEUKOSCOPE_*`` variables."""
    settings = ServiceSettings.from_env()
    import torch

    torch.set_num_threads(settings.torch_threads)
    return create_app(settings)
