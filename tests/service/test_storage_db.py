"""Database migrations (SQLite; PostgreSQL when LEUKOSCOPE_TEST_POSTGRES_URL is set),
the content store, crash consistency of uploads, and the command-line tools."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from leukoscope.service import db as dbm
from leukoscope.service.tables import Base
from leukoscope.service.storage import ContentStore, StoreError, clean_png
from tests.service.helpers import PASSWORD, cell_image, empty_postgres_schema, encode

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TABLES = {"users", "sessions", "api_tokens", "cases", "images", "cells", "cell_reviews", "audit_log",
          "login_throttle", "alembic_version"}


def _schema_matches_models(engine) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def test_migration_on_a_fresh_sqlite_database(tmp_path):
    engine = dbm.make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    assert dbm.current_revision(engine) is None
    with pytest.raises(dbm.DatabaseError, match="leukoscope serve --migrate"):
        dbm.check_schema(engine)
    dbm.upgrade(engine)
    assert dbm.current_revision(engine) == dbm.head_revision()
    assert set(inspect(engine).get_table_names()) == TABLES
    assert _schema_matches_models(engine) == []  # the migration creates exactly what the models declare
    dbm.check_schema(engine)
    dbm.upgrade(engine)  # idempotent
    from alembic import command

    config = dbm.alembic_config(str(engine.url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_postgresql_migration_and_a_full_case(postgres_url: str, make_service):
    url = postgres_url
    empty_postgres_schema(url)
    engine = dbm.make_engine(url)
    assert TABLES <= set(inspect(engine).get_table_names())
    assert _schema_matches_models(engine) == []
    engine.dispose()
    service = make_service(database_url=url)
    service.add_user("tech", "technician")
    service.add_user("hema", "hematologist")
    client = service.client()
    case = client.post("/api/v1/cases", headers=service.auth("tech"),
                       files=[("files", ("a.png", encode(cell_image(), "PNG"), "image/png"))]).json()
    cell = case["cells"][0]["id"]
    review = client.post(f"/api/v1/cases/{case['id']}/review", headers=service.auth("hema"),
                         json={"labels": {str(cell): "monocyte"}})
    assert review.json()["status"] == "reviewed"
    assert client.get("/api/v1/export", headers=service.auth("hema")).status_code == 200
    assert service.rows() == {"cases": 1, "images": 1, "cells": 1}
    # a server whose session time zone is local hands timestamptz back in it: read back in UTC all the same
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from leukoscope.service.tables import Case

    local = create_engine(url, connect_args={"options": "-c TimeZone=America/New_York"})
    try:
        with Session(local) as db:
            created = db.scalars(select(Case.created_at)).one()
        assert created.utcoffset().total_seconds() == 0 and created.tzname() == "UTC"
    finally:
        local.dispose()


def test_times_read_back_in_utc_whatever_zone_the_database_used() -> None:
    from datetime import datetime, timezone
    from zoneinfo import ZoneInfo

    from leukoscope.service.tables import aware

    local = datetime(2026, 12, 6, 9, 40, tzinfo=ZoneInfo("America/New_York"))  # PostgreSQL in a local zone
    assert aware(local) == local and aware(local).tzinfo is timezone.utc and aware(local).hour == 14
    assert aware(datetime(2026, 12, 6, 14, 40)).tzinfo is timezone.utc  # SQLite: naive, stored as UTC
    assert aware(None) is None


def test_session_lengths_that_break_log_ins_are_refused(tmp_path) -> None:
    from pydantic import ValidationError

    from leukoscope.service.settings import ServiceSettings

    for hours in (float("inf"), 1e9, 1e-4):
        with pytest.raises(ValidationError, match="session_hours"):
            ServiceSettings(bundle=tmp_path, data_dir=tmp_path, session_hours=hours)


def test_a_classifier_with_a_class_name_too_long_to_store_is_refused_at_start(make_service, analyzer) -> None:
    """PostgreSQL holds 64 characters in a cell's label; every upload would have failed (SQLite ignores it)."""
    import copy

    from leukoscope.service.analysis import Analyzer

    long_name = "lymphocyte, reactive (" + "x" * 60 + ")"
    classifier = copy.copy(analyzer.base)
    classifier.classes = [*classifier.classes[:-1], long_name]
    odd = Analyzer(classifier, gradcam=False, threads=1)
    try:
        with pytest.raises(ValueError, match="longer than 64 characters"):
            make_service(analyzer_override=odd)
    finally:
        odd.close()


def test_hosts_migrating_one_postgresql_database_at_once_all_start(postgres_url: str) -> None:
    """Without a lock the second host's CREATE TABLE met the first's (UniqueViolation) and it failed to start."""
    import threading

    from alembic import command

    url = postgres_url
    engine = dbm.make_engine(url)
    config = dbm.alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    engine.dispose()
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def host() -> None:
        own = dbm.make_engine(url)
        try:
            start.wait()
            dbm.upgrade(own)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            own.dispose()

    hosts = [threading.Thread(target=host) for _ in range(3)]
    for thread in hosts:
        thread.start()
    for thread in hosts:
        thread.join()
    assert errors == []
    engine = dbm.make_engine(url)
    assert dbm.current_revision(engine) == dbm.head_revision()
    engine.dispose()


def test_content_store_names_and_atomic_writes(tmp_path):
    store = ContentStore(tmp_path / "store")
    name = store.put(b"hello", "png")
    assert store.read(name) == b"hello" and store.put(b"hello", "png") == name
    assert store.path(name).parent.parent == store.objects
    for evil in ("../../etc/passwd", "..%2f..%2fx.png", "a" * 64 + ".exe", "A" * 64 + ".png", ""):
        with pytest.raises(StoreError):
            store.path(evil)
    with pytest.raises(StoreError):
        store.put(b"x", "html")
    assert list(store.tmp.iterdir()) == []  # no temporary file left behind
    old = store.put(b"orphan", "jpg")
    os.utime(store.path(old), (0, 0))
    assert store.collect_garbage({name}) == [old] and store.exists(name) and not store.exists(old)


def test_clean_png_drops_metadata():
    from PIL import Image, PngImagePlugin
    import io

    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", "Jane Doe")
    image = cell_image()
    dirty = encode(image, "PNG", pnginfo=info, icc_profile=b"\0" * 128)
    assert b"Jane Doe" in dirty
    clean = clean_png(Image.open(io.BytesIO(dirty)))
    assert b"Jane Doe" not in clean and "icc_profile" not in Image.open(io.BytesIO(clean)).info


def test_a_failure_between_files_and_commit_leaves_no_half_case(make_service):
    """Files are written first, rows in one transaction: kill the transaction just before
    its commit and there is no case, image or cell row; only unreferenced files, which
    garbage collection removes."""
    service = make_service()
    service.add_user("tech", "technician")

    def crash(db, case_id):
        assert service.rows()["cases"] == 0  # other connections never see the open transaction
        raise RuntimeError("simulated crash before commit")

    service.state.before_commit = crash
    client = service.client(raise_server_exceptions=False)
    files = [("files", (f"{i}.png", encode(cell_image(seed=i), "PNG"), "image/png")) for i in range(3)]
    response = client.post("/api/v1/cases", headers=service.auth("tech"), files=files)
    assert response.status_code == 500
    assert service.rows() == {"cases": 0, "images": 0, "cells": 0}
    from leukoscope.service.tables import AuditEntry

    assert service.count(AuditEntry) == 0
    orphans = service.state.store.names()
    assert orphans  # files were written before the failure...
    service.state.before_commit = None
    other = [("files", ("x.png", encode(cell_image(seed=9), "PNG"), "image/png"))]
    ok = client.post("/api/v1/cases", headers=service.auth("tech"), files=other)
    assert ok.status_code == 201 and service.rows() == {"cases": 1, "images": 1, "cells": 1}
    kept = service.state.store.names() - orphans
    # ...and the start-up clean-up of `leukoscope serve` removes exactly them, not the committed case's files
    from leukoscope.service.admin import collect_store_garbage

    assert collect_store_garbage(service.state.settings, min_age_s=3600) == []  # too young: maybe still uploading
    assert set(collect_store_garbage(service.state.settings, min_age_s=0)) == orphans
    assert service.state.store.names() == kept
    case = client.get(f"/api/v1/cases/{ok.json()['id']}", headers=service.auth("tech"))
    assert case.status_code == 200


def test_cli_user_commands(tmp_path):
    from typer.testing import CliRunner

    from leukoscope.cli import app

    runner = CliRunner()
    data = str(tmp_path / "data")
    added = runner.invoke(app, ["user", "add", "alice", "--role", "hematologist", "--password-stdin",
                                "--data-dir", data], input=PASSWORD + "\n")
    assert added.exit_code == 0, added.output
    weak = runner.invoke(app, ["user", "add", "bob", "--role", "technician", "--password-stdin", "--data-dir", data],
                         input="short\n")
    assert weak.exit_code == 2 and "at least 8" in weak.output
    role = runner.invoke(app, ["user", "add", "carol", "--role", "boss", "--password-stdin", "--data-dir", data],
                         input=PASSWORD + "\n")
    assert role.exit_code == 2 and "role must be one of" in role.output
    token = runner.invoke(app, ["user", "token", "alice", "--name", "ci", "--data-dir", data])
    assert token.exit_code == 0 and token.output.strip().splitlines()[-1].startswith("lks_")
    listing = runner.invoke(app, ["user", "list", "--data-dir", data])
    assert "alice" in listing.output and "hematologist" in listing.output
    assert (Path(data) / "leukoscope.db").is_file()
    # (Without --bundle, serve uses the shipped classifier: a bundle that is not there is refused.)
    missing = runner.invoke(app, ["serve", "--data-dir", data, "--bundle", str(tmp_path / "no-bundle")])
    assert missing.exit_code == 2 and "bundle folder does not exist" in missing.output
    # refused before a database and a store are made for a service that cannot start
    fresh = tmp_path / "fresh"
    refused = runner.invoke(app, ["serve", "--data-dir", str(fresh), "--bundle", str(tmp_path / "no-bundle")])
    assert refused.exit_code == 2 and not fresh.exists()
    # a bad setting is one line naming it, not pydantic's dump
    backend = runner.invoke(app, ["serve", "--data-dir", str(fresh), "--detector-backend", "onnx"])
    said = " ".join(backend.output.split())
    assert backend.exit_code == 2 and said.startswith("error: --detector-backend (LEUKOSCOPE_DETECTOR_BACKEND):")
    assert "pydantic" not in said and not fresh.exists()
    # a setting serve has no option for is named by its variable only
    import os

    os.environ["LEUKOSCOPE_MAX_UPLOAD_BYTES"] = "abc"
    try:
        variable = runner.invoke(app, ["serve", "--data-dir", str(fresh)])
    finally:
        del os.environ["LEUKOSCOPE_MAX_UPLOAD_BYTES"]
    said = " ".join(variable.output.split())
    assert variable.exit_code == 2 and said.startswith("error: LEUKOSCOPE_MAX_UPLOAD_BYTES:"), said


def test_a_failed_sqlite_migration_changes_nothing_and_can_be_retried(tmp_path) -> None:
    """SQLite's driver committed each CREATE and ALTER on its own: a migration stopped by its own check left
    new tables behind, and every retry then failed ("table login_throttle already exists")."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = dbm.make_engine(url)
    dbm.upgrade(engine, "0001")
    with engine.begin() as connection:  # a session whose user is gone (foreign keys were off once)
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.execute(text("INSERT INTO sessions (id, user_id, csrf_token, created_at, expires_at) "
                                "VALUES ('h', 99, 'c', '2026-01-01', '2026-01-02')"))
    before = set(inspect(engine).get_table_names())
    with pytest.raises(dbm.DatabaseError, match="without their parent"):
        dbm.upgrade(engine)
    engine.dispose()
    engine = dbm.make_engine(url)
    assert set(inspect(engine).get_table_names()) == before and dbm.current_revision(engine) == "0001"
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM sessions WHERE user_id = 99"))
    dbm.upgrade(engine)
    assert dbm.current_revision(engine) == dbm.head_revision() and _schema_matches_models(engine) == []
    engine.dispose()


def _upgrade_with_look_alikes(url: str) -> None:
    """0001 -> head on a database that has look-alike user names and a token from before
    expiry and scopes: the names get distinct keys, the token a scope and an expiry."""
    from datetime import datetime, timezone

    from alembic import command

    engine = dbm.make_engine(url)
    config = dbm.alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    dbm.upgrade(engine, "0001")
    now = datetime.now(timezone.utc)
    with engine.begin() as connection:
        for user_id, name in ((1, "tina"), (2, "Tina"), (3, "hugo")):
            connection.execute(text("INSERT INTO users (id, username, password_hash, role, active, created_at) "
                                    "VALUES (:i, :n, 'x', 'technician', :a, :t)"),
                               {"i": user_id, "n": name, "a": True, "t": now})
        connection.execute(text("INSERT INTO api_tokens (user_id, name, token_hash, prefix, created_at) "
                                "VALUES (3, 'old', :h, 'lks_old', :t)"), {"h": "0" * 64, "t": now})
    dbm.upgrade(engine)
    with engine.connect() as connection:
        keys = dict(connection.execute(text("SELECT username, username_key FROM users")).all())
        scope, expires = connection.execute(text("SELECT scope, expires_at FROM api_tokens")).one()
    assert keys == {"tina": "tina", "Tina": "tina#2", "hugo": "hugo"}
    assert scope == "write" and expires is not None
    assert _schema_matches_models(engine) == []
    engine.dispose()


def test_upgrade_from_0001_keeps_look_alike_users_and_old_tokens(tmp_path):
    _upgrade_with_look_alikes(f"sqlite:///{tmp_path / 'old.db'}")


def test_upgrade_from_0001_on_postgresql(postgres_url: str):
    _upgrade_with_look_alikes(postgres_url)


def test_the_data_directory_is_its_owners_alone(make_service, tmp_path, caplog):
    """Patients' images and the database: a new data directory is 0700 whatever the umask; an existing one
    that others can read is left as it is, with a warning that says how to close it."""
    import logging
    import stat

    from leukoscope.service.storage import make_private_dir

    service = make_service()
    assert stat.S_IMODE(service.data_dir.stat().st_mode) == 0o700
    shared = tmp_path / "shared-data"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="leukoscope.service.storage"):
        make_private_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755 and "chmod 700" in caplog.text
