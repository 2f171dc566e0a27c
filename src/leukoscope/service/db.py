"""Engine, sessions and schema migrations (Alembic, run programmatically)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import Engine, create_engine, event, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class DatabaseError(RuntimeError):
    """The database is unreachable or its schema is not at the expected revision."""


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session:
        with session.begin():
            yield session


def sqlite_write_lock(db: Session, column: Any, where: Any) -> None:
    """On SQLite, take the database's write lock now, by a no-op update of ``column`` in the rows ``where``
    selects: Python's driver begins a transaction only at the first write, so what a transaction read before
    it is not held, and a concurrent writer could change it unseen. PostgreSQL holds rows with
    ``SELECT ... FOR UPDATE`` instead (nothing is done here)."""
    if db.get_bind().dialect.name == "sqlite":
        db.execute(update(column.class_).where(where).values({column.key: column}))


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is interpolation syntax in ConfigParser.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


#: The PostgreSQL advisory lock a migration holds (any constant of this project's own).
MIGRATION_LOCK = 0x1E0C05C0


def _sqlite_migration_engine(url: str) -> Engine:
    """An engine for migrating a SQLite file in one transaction. Python's sqlite3 driver sends no BEGIN before
    DDL, so each CREATE and ALTER of a migration committed on its own: a migration that failed half-way (a
    check below, a kill, a full disk) left tables behind that its retry then tripped over. Here the driver
    starts no transaction itself and SQLAlchemy's BEGIN covers all of it (SQLAlchemy's documented pysqlite
    recipe). Foreign keys are off for the connection: batch mode re-creates tables, and dropping the old
    ``users`` would cascade-delete every session and API token."""
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=OFF")  # only outside a transaction does this take effect
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (creates every table on a fresh database), all or nothing."""
    from alembic import command

    url = engine.url.render_as_string(hide_password=False)
    config = alembic_config(url)
    sqlite_file = engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:")
    migrating = _sqlite_migration_engine(url) if sqlite_file else engine
    try:
        with migrating.connect() as connection, connection.begin():
            if connection.dialect.name == "postgresql":  # hosts starting at once: one migrates, the others wait
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            if connection.dialect.name == "sqlite":
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise DatabaseError(f"the migration left rows without their parent: {broken[:5]}")
    finally:
        if migrating is not engine:
            migrating.dispose()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def check_schema(engine: Engine) -> None:
    """Refuse to serve on a database whose schema is not at the head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise DatabaseError(
            f"database schema is at revision {current or 'none (empty database)'}, this version needs "
            f"{head}: run `leukoscope serve --migrate` once (the default)"
        )
