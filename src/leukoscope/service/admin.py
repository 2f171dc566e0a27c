"""Command-line administration: open the database (migrating it), add users, issue tokens."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from leukoscope.service import db as dbm
from leukoscope.service.auth import audit, create_user, find_user, new_api_token
from leukoscope.service.errors import ServiceError
from leukoscope.service.tables import Case, CaseImage, Cell, User
from leukoscope.service.settings import ServiceSettings
from leukoscope.service.storage import make_private_dir


@dataclass
class Database:
    url: str
    sessions: sessionmaker[Session]
    engine: object

    def close(self) -> None:
        self.engine.dispose()  # type: ignore[attr-defined]


def open_database(settings: ServiceSettings) -> Database:
    make_private_dir(settings.data_dir)
    engine = dbm.make_engine(settings.resolved_database_url)
    if settings.migrate:
        dbm.upgrade(engine)
    else:
        dbm.check_schema(engine)
    return Database(engine.url.render_as_string(hide_password=True), dbm.make_sessionmaker(engine), engine)


def add_user(settings: ServiceSettings, username: str, password: str, role: str) -> User:
    database = open_database(settings)
    try:
        with dbm.transaction(database.sessions) as db:
            user = create_user(db, username, password, role)
            audit(db, None, "user.create", username="(command line)", detail={"username": username, "role": role})
            return user
    finally:
        database.close()


def issue_token(settings: ServiceSettings, username: str, name: str, *, scope: str = "write",
                days: float | None = None) -> str:
    """A new API token (``settings.token_days`` long unless ``days`` is given)."""
    database = open_database(settings)
    try:
        with dbm.transaction(database.sessions) as db:
            user = find_user(db, username)
            if user is None:
                raise ServiceError(404, "no_user", f"no user {username!r}")
            token, secret = new_api_token(db, user, name, scope=scope, days=days or settings.token_days)
            audit(db, None, "token.create", username="(command line)",
                  detail={"for": user.username, "token": token.prefix, "scope": token.scope,
                          "expires_at": token.expires_at.isoformat()})
            return secret
    finally:
        database.close()


def list_users(settings: ServiceSettings) -> list[tuple[str, str, bool, int]]:
    database = open_database(settings)
    try:
        with dbm.transaction(database.sessions) as db:
            counts = dict(db.execute(select(Case.owner_id, func.count(Case.id)).group_by(Case.owner_id)).all())
            return [(u.username, u.role, u.active, counts.get(u.id, 0))
                    for u in db.scalars(select(User).order_by(User.username))]
    finally:
        database.close()


def user_count(settings: ServiceSettings) -> int:
    database = open_database(settings)
    try:
        with database.sessions() as db:
            return int(db.scalar(select(func.count(User.id))) or 0)
    finally:
        database.close()


def referenced_objects(db: Session) -> set[str]:
    """Every store object a database row points at."""
    names: set[str] = set()
    for row in db.execute(select(CaseImage.original_object, CaseImage.served_object, CaseImage.annotated_object)):
        names.update(filter(None, row))
    for row in db.execute(select(Cell.crop_object, Cell.overlay_object)):
        names.update(filter(None, row))
    return names


def collect_store_garbage(settings: ServiceSettings, *, min_age_s: float = 3600.0) -> list[str]:
    """Delete stored files that no case references (written by uploads whose transaction
    never committed: a crash or a kill between the file writes and the commit), once they
    are ``min_age_s`` old. Run by ``leukoscope serve`` at start-up."""
    from leukoscope.service.storage import ContentStore

    database = open_database(settings)
    try:
        with database.sessions() as db:
            referenced = referenced_objects(db)
    finally:
        database.close()
    return ContentStore(settings.store_dir, fsync=False).collect_garbage(referenced, min_age_s=min_age_s)
