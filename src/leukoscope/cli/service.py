"""`leukoscope serve` and `leukoscope user ...`: the web service and its users (needs the service extra:
pip install 'leukoscope[service]')."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from leukoscope.cli._common import check_bundle, check_writable_folder, fail, flag, user_errors
from leukoscope.pretrained import DEFAULT_CLASSIFIER, DEFAULT_DETECTOR, PREFIX, pretrained_names, resolve_bundle
from leukoscope.progress import console


user_app = typer.Typer(no_args_is_help=True, help="Web-service users and API tokens.")


#: What `serve` and the `user` commands import: the service extra's packages (by module name).
SERVICE_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "argon2", "zxcvbn", "python_multipart",
                   "fastapi_offline")


def _service_settings(**overrides):
    """The service's settings from the options and the environment; first, the service extra installed (a plain
    `pip install leukoscope` had ended `serve` and `user add` in a traceback of a missing module)."""
    import importlib.util

    missing = [name for name in SERVICE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        fail(f"the web service needs its extra ({', '.join(missing)} not installed): pip install "
             f"'leukoscope[service]'")
    from pydantic import ValidationError

    from leukoscope.service.settings import ServiceSettings

    if overrides.get("data_dir") is not None:
        check_writable_folder(Path(overrides["data_dir"]), "--data-dir")
    try:
        return ServiceSettings.from_env(**overrides)
    except ValidationError as exc:  # one line per setting, named as the user gives it (not pydantic's dump)
        def named(field: str) -> str:
            variable = f"LEUKOSCOPE_{field.upper()}"
            return f"--{field.replace('_', '-')} ({variable})" if field in overrides else variable

        fail("; ".join(f"{named(str(error['loc'][0]))}: {error['msg'].removeprefix('Value error, ')}"
                       if error["loc"] else error["msg"] for error in exc.errors()))
    except ValueError as exc:
        fail(str(exc))


def _service_call(fn, *args, **kwargs):
    from leukoscope.service.db import DatabaseError
    from leukoscope.service.errors import ServiceError

    try:
        return fn(*args, **kwargs)
    except ServiceError as exc:
        fail(exc.message)
    except DatabaseError as exc:
        fail(str(exc))


def serve(
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Cell-classifier bundle or pretrained:NAME (or "
                                          "LEUKOSCOPE_BUNDLE; default: the shipped "
                                          f"{DEFAULT_CLASSIFIER}, with the shipped {DEFAULT_DETECTOR})."),
    detector: Optional[Path] = typer.Option(None, "--detector", help="Detector bundle or pretrained:NAME: "
                                            f"enables smear fields (default: the shipped {DEFAULT_DETECTOR}, "
                                            "whatever --bundle)."),
    no_detector: bool = flag(False, "--no-detector", help="Serve single-cell images only: no smear "
                             "fields (no detector is loaded)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Database and image store "
                                            "(default ./leukoscope-data, or LEUKOSCOPE_DATA_DIR)."),
    database_url: Optional[str] = typer.Option(None, "--database-url", help="e.g. postgresql+psycopg://u:p@host/db "
                                               "(default: SQLite in the data dir)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (put a TLS proxy in front for a network)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    migrate: Optional[bool] = flag(None, "--migrate/--no-migrate", help="Apply database migrations at "
                                   "start-up (default on); --no-migrate refuses an outdated schema."),
    forwarded_allow_ips: str = typer.Option("127.0.0.1", help="Proxies trusted for X-Forwarded-Proto/For."),
    workers: int = typer.Option(1, min=1, help="Server processes (each loads the model; log-in and upload limits "
                                "are counted in the database, for all of them together)."),
    inference_threads: Optional[int] = typer.Option(None, help="Model threads per process (default 2)."),
    detector_backend: Optional[str] = typer.Option(None, "--detector-backend", help="What runs the detector: "
                                                   "torch (default), onnxruntime, openvino (a bundle from "
                                                   "`leukoscope export`) or auto."),
    classifier_backend: Optional[str] = typer.Option(None, "--classifier-backend", help="What runs the cell "
                                                     "classifier: torch (default), onnxruntime, openvino (a bundle "
                                                     "from `leukoscope export`) or auto; Grad-CAM loads torch's "
                                                     "model too."),
    blast_class: Optional[List[str]] = typer.Option(None, "--blast-class", help="Classifier class counted as blast "
                                                    "(repeatable; as analyze's; default: the classes named blast)."),
    log_level: str = typer.Option("info", help="uvicorn's log level: critical, error, warning, info, debug or "
                                  "trace."),
) -> None:
    """Run the telediagnosis web service (pages, JSON API, OpenAPI docs at /api/docs)."""
    import os

    if no_detector and detector is not None:
        fail("--no-detector and --detector contradict each other; give one")
    settings = _service_settings(bundle=bundle, detector=detector, data_dir=data_dir, database_url=database_url,
                                 migrate=migrate, inference_threads=inference_threads,
                                 detector_backend=detector_backend, classifier_backend=classifier_backend,
                                 blast_classes=",".join(blast_class) if blast_class else None)
    settings = _shipped_service_models(settings, no_detector=no_detector)
    for model, option in ((settings.bundle, "--bundle"), (settings.detector, "--detector")):
        if model is not None:  # before the database and the store are made for a service that cannot start
            check_bundle(str(model), option)
    import uvicorn

    from leukoscope.service.admin import collect_store_garbage, open_database, user_count
    from leukoscope.service.app import app_from_env
    from leukoscope.service.db import DatabaseError

    # Migrate (or check) once, here, before any worker starts; the workers only check.
    database = _service_call(_guarded, open_database, settings)
    database.close()
    removed = _service_call(_guarded, collect_store_garbage, settings)
    if removed:
        console.print(f"removed {len(removed)} stored files that no case references (uploads that never committed)")
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    os.environ.update({f"LEUKOSCOPE_{name.upper()}": str(value) for name, value in settings.model_dump().items()
                       if value is not None})
    if settings.detector is None:  # --no-detector: the workers must not take one from the environment
        os.environ.pop("LEUKOSCOPE_DETECTOR", None)
    os.environ["LEUKOSCOPE_MIGRATE"] = "false"
    if user_count(settings.model_copy(update={"migrate": False})) == 0:
        console.print("[yellow]no users yet: add one with `leukoscope user add NAME --role admin` "
                      "(same --data-dir / --database-url)[/yellow]")
    options = dict(host=host, port=port, proxy_headers=True, forwarded_allow_ips=forwarded_allow_ips,
                   log_level=log_level, server_header=False)
    if workers > 1:
        console.print(f"leukoscope service on http://{host}:{port}/ with {workers} workers (API docs: /api/docs)")
        uvicorn.run("leukoscope.service.app:app_from_env", factory=True, workers=workers, **options)
        return
    try:
        application = app_from_env()
    except (DatabaseError, RuntimeError) as exc:
        fail(str(exc))
    except user_errors() as exc:
        fail(str(exc))
    console.print(f"leukoscope service on http://{host}:{port}/  (API docs: /api/docs)")
    uvicorn.run(application, **options)


def _shipped_service_models(settings, no_detector: bool = False):
    """The models `serve` serves, and a line saying which: the configured ones; with no classifier, the shipped
    one (required); with no detector, the shipped one whatever the classifier (as `analyze` does: a fine-tuned
    --bundle had silently turned smear fields off), unless ``no_detector``."""
    shipped = pretrained_names()
    update: dict[str, Any] = {}
    if settings.bundle is None:
        if DEFAULT_CLASSIFIER not in shipped:
            fail(f"give a cell-classifier bundle: --bundle DIR or pretrained:NAME (or LEUKOSCOPE_BUNDLE); no "
                 f"shipped model {DEFAULT_CLASSIFIER!r} in this install"
                 + (f" (shipped: {', '.join(shipped)})" if shipped else ""))
        update["bundle"] = resolve_bundle(PREFIX + DEFAULT_CLASSIFIER)
    if no_detector:
        update["detector"] = None
    elif settings.detector is None and DEFAULT_DETECTOR in shipped:
        update["detector"] = resolve_bundle(PREFIX + DEFAULT_DETECTOR)
    settings = settings.model_copy(update=update)

    def described(key: str, path: Any) -> str:
        return escape(str(path)) + (" (shipped)" if update.get(key) is not None else "")

    console.print(f"classifier: {described('bundle', settings.bundle)}", soft_wrap=True)
    if settings.detector is not None:
        console.print(f"smear fields: detector {described('detector', settings.detector)}", soft_wrap=True)
    else:
        why = "--no-detector" if no_detector else f"no --detector, and no shipped {DEFAULT_DETECTOR} in this install"
        console.print(f"[yellow]smear fields: off ({why}); single-cell images only[/yellow]", soft_wrap=True)
    return settings


def _guarded(fn, *args):
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return fn(*args)
    except SQLAlchemyError as exc:
        fail(f"cannot open the database: {exc}")


#: The user commands' options: the service's database, as `serve` finds it.
USER_DATA_DIR_HELP = "The service's data folder, as given to serve (default ./leukoscope-data, or LEUKOSCOPE_DATA_DIR)."


USER_DATABASE_HELP = "The service's database URL, as given to serve (default: SQLite in the data folder)."


@user_app.command("add")
def user_add(
    username: str = typer.Argument(..., help="Log-in name."),
    role: str = typer.Option(..., "--role", help="admin, technician or hematologist."),
    password_stdin: bool = flag(False, "--password-stdin", help="Read the password from standard input."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=USER_DATA_DIR_HELP),
    database_url: Optional[str] = typer.Option(None, "--database-url", help=USER_DATABASE_HELP),
) -> None:
    """Add a user (the password is asked for, never given on the command line)."""
    settings = _service_settings(data_dir=data_dir, database_url=database_url)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    from leukoscope.service.admin import add_user

    user = _service_call(add_user, settings, username, password, role)
    console.print(f"user {user.username} ({user.role}) added")


@user_app.command("token")
def user_token(
    username: str = typer.Argument(..., help="The user the token acts as."),
    name: str = typer.Option("script", "--name", help="What the token is for."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=USER_DATA_DIR_HELP),
    database_url: Optional[str] = typer.Option(None, "--database-url", help=USER_DATABASE_HELP),
) -> None:
    """Issue an API token for a user; printed once (only its hash is stored)."""
    from leukoscope.service.admin import issue_token

    print(_service_call(issue_token, _service_settings(data_dir=data_dir, database_url=database_url), username, name))


@user_app.command("list")
def user_list(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=USER_DATA_DIR_HELP),
    database_url: Optional[str] = typer.Option(None, "--database-url", help=USER_DATABASE_HELP),
) -> None:
    """List users, roles and how many cases each uploaded."""
    from leukoscope.service.admin import list_users

    for username, role, active, cases in _service_call(list_users, _service_settings(data_dir=data_dir,
                                                                                       database_url=database_url)):
        console.print(f"{username:<24} {role:<13} {'active' if active else 'inactive':<9} {cases} cases")
