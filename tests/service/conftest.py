"""Fixtures of the web-service tests: one tiny trained bundle per session, a fresh
service (database, store) per test, users, tokens and logged-in clients."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("sqlalchemy") is None:
    # The service extra is not installed (pip install -e '.[test,service]'): nothing here can run.
    collect_ignore_glob = ["test_*.py"]
else:
    import warnings

    with warnings.catch_warnings():  # starlette's TestClient nudges towards httpx2; httpx works
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from sqlalchemy import func, select

    from leukoscope.service.analysis import Analyzer
    from leukoscope.service.app import create_app
    from leukoscope.service.auth import create_user, new_api_token
    from leukoscope.service.db import transaction
    from leukoscope.service.tables import Case, CaseImage, Cell, User
    from leukoscope.service.settings import ServiceSettings

from tests.service.helpers import PASSWORD, FakeSmear, csrf_of, train_tiny_bundle


@pytest.fixture(scope="session")
def cell_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_bundle(tmp_path_factory.mktemp("bundle"), epochs=4, per_class=16)


@pytest.fixture(scope="session")
def analyzer(cell_bundle: Path):
    shared = Analyzer.from_bundles(cell_bundle, threads=2)
    shared.warm_up()
    yield shared
    shared.close()


@pytest.fixture(scope="session")
def smear_analyzer(analyzer):
    shared = Analyzer(analyzer.base, smear=FakeSmear(), threads=1, name="abas_cnn + fake detector")
    yield shared
    shared.close()


class Service:
    """A running app on a fresh data directory, with helpers."""

    def __init__(self, app, data_dir: Path) -> None:
        self.app = app
        self.state = app.state.service
        self.data_dir = data_dir
        self._clients: list[Any] = []

    # users ------------------------------------------------------------
    def add_user(self, username: str, role: str, password: str = PASSWORD) -> int:
        with transaction(self.state.sessions) as db:
            return create_user(db, username, password, role).id

    def token(self, username: str) -> str:
        with transaction(self.state.sessions) as db:
            user = db.scalar(select(User).where(User.username == username))
            return new_api_token(db, user, "test")[1]

    def auth(self, username: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(username)}"}

    # clients ------------------------------------------------------------
    def client(self, **options) -> "TestClient":
        client = TestClient(self.app, **options)
        client.__enter__()
        self._clients.append(client)
        return client

    def login(self, username: str, password: str = PASSWORD, client=None):
        client = client or self.client()
        page = client.get("/login")
        response = client.post("/login", data={"username": username, "password": password,
                                               "csrf_token": csrf_of(page.text)}, follow_redirects=False)
        assert response.status_code == 303, response.text
        return client

    # database -----------------------------------------------------------
    def count(self, model) -> int:
        with self.state.sessions() as db:
            return int(db.scalar(select(func.count()).select_from(model)))

    def rows(self) -> dict[str, int]:
        return {"cases": self.count(Case), "images": self.count(CaseImage), "cells": self.count(Cell)}

    def close(self) -> None:
        for client in self._clients:
            client.__exit__(None, None, None)


#: Held while a test uses the PostgreSQL test database: its tests empty and migrate the one database, so two
#: pytest processes (``pytest -n``) must not run two of them at once.
POSTGRES_LOCK = Path(tempfile.gettempdir()) / "leukoscope-test-postgres.lock"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The PostgreSQL test database (``LEUKOSCOPE_TEST_POSTGRES_URL``; the test skips without it), one test at a
    time whichever process runs it. Name it before ``make_service``: it is then released after the services close."""
    url = os.environ.get("LEUKOSCOPE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set LEUKOSCOPE_TEST_POSTGRES_URL=postgresql+psycopg://user:pw@host/db to test PostgreSQL")
    with POSTGRES_LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield url
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture
def make_service(tmp_path: Path, cell_bundle: Path, analyzer):
    made: list[Service] = []

    def make(*, analyzer_override=None, **settings) -> Service:
        data_dir = tmp_path / f"data{len(made)}"
        config = ServiceSettings(bundle=cell_bundle, data_dir=data_dir, fsync=False, **settings)
        service = Service(create_app(config, analyzer=analyzer_override or analyzer), data_dir)
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()
        service.state.engine.dispose()


@pytest.fixture
def service(make_service) -> Service:
    svc = make_service()
    svc.add_user("tech", "technician")
    svc.add_user("tech2", "technician")
    svc.add_user("hema", "hematologist")
    svc.add_user("admin", "admin")
    return svc


@pytest.fixture(autouse=True, scope="session")
def _cheap_password_hashing():
    """Argon2id with the library's defaults costs ~0.1 s per hash on purpose; tests hash
    hundreds of times, so they use the same algorithm with small parameters."""
    from argon2 import PasswordHasher

    from leukoscope.service import auth

    original = auth._hasher
    auth._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    yield
    auth._hasher = original


def pytest_configure(config):
    config.addinivalue_line("markers", "smear: the live server gets the smear (fake detector) analyzer")
