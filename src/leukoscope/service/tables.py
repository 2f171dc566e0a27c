"""Database tables of the web service (SQLAlchemy 2 declarative).

The schema is created and evolved only by Alembic migrations
(``leukoscope/service/migrations``); these classes must match them (a test
compares the two).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

ROLES: tuple[str, ...] = ("admin", "technician", "hematologist")
#: What an API token may do: ``read`` (GET only) or ``write`` (also upload and review, as the role allows).
TOKEN_SCOPES: tuple[str, ...] = ("read", "write")
CASE_STATUSES: tuple[str, ...] = ("new", "reviewed")
CASE_KINDS: tuple[str, ...] = ("cell", "smear")

# Stable constraint names, so that migrations look the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(value: datetime | None) -> datetime | None:
    """A stored time in UTC with its zone: SQLite hands back naive datetimes (every stored time is UTC);
    PostgreSQL hands back ``timestamptz`` in the session's time zone (the server's, often local), which pages
    would print as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc) if value is not None else None


class UtcDateTime(TypeDecorator[datetime]):
    """A time stored as UTC and always read back with its time zone (SQLite keeps no zone:
    without this, ``created_at`` read back naive while a fresh object had ``+00:00``)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return aware(value)


#: The longest class name a cell's label columns hold (PostgreSQL enforces it; SQLite does not): the service
#: refuses at start a classifier with a longer one (:func:`leukoscope.service.app.build_state`).
LABEL_LENGTH = 64


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    #: The name NFKC-normalised and case-folded: "Tina", "TINA" and "ｔｉｎａ" are one name.
    username_key: Mapped[str] = mapped_column(String(80), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(20))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class WebSession(Base):
    """A browser session; the cookie holds a random token, the table only its SHA-256."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())

    user: Mapped[User] = relationship(lazy="joined")


class ApiToken(Base):
    """A bearer token for scripts; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    scope: Mapped[str] = mapped_column(String(10))

    user: Mapped[User] = relationship(lazy="joined")


class LoginThrottle(Base):
    """Attempts per key (log-in per user name and address, per name, per address; uploads
    per user) in the database, so that every server process and host counts the same.
    Times are epoch seconds: plain numbers compare the same way on SQLite and PostgreSQL."""

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    refused: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[float] = mapped_column(Float)
    blocked_until: Mapped[float] = mapped_column(Float, default=0.0)
    #: When the row means nothing any more (window over, no wait left): it is deleted then.
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class Case(Base):
    """One upload: one or several images of one sample, analysed together, reviewed together."""

    __tablename__ = "cases"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # random hex: not guessable
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(10), default="new", index=True)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    classes: Mapped[list[str]] = mapped_column(JSON)
    analysis: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reviewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    reviewer_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    review_comment: Mapped[str] = mapped_column(Text, default="")

    owner: Mapped[User] = relationship(foreign_keys=[owner_id], lazy="joined")
    reviewer: Mapped[User | None] = relationship(foreign_keys=[reviewer_id], lazy="joined")
    images: Mapped[list["CaseImage"]] = relationship(
        back_populates="case", order_by="CaseImage.position", cascade="all, delete-orphan"
    )
    cells: Mapped[list["Cell"]] = relationship(
        back_populates="case", order_by="Cell.position", cascade="all, delete-orphan"
    )


class CaseImage(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    #: The client's file name, for display only (never used as a path).
    original_name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(10))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    #: Store object names (content hashes): the bytes as uploaded, the EXIF-free copy
    #: that is served, and (smear fields) the copy with the detected cells drawn on it.
    original_object: Mapped[str] = mapped_column(String(80))
    served_object: Mapped[str] = mapped_column(String(80))
    annotated_object: Mapped[str | None] = mapped_column(String(80), nullable=True)

    case: Mapped[Case] = relationship(back_populates="images")


class Cell(Base):
    """One classified cell: a whole single-cell image, or one detection in a smear field."""

    __tablename__ = "cells"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    box: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)  # x0, y0, x1, y1 in the field
    detection_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    predicted_label: Mapped[str] = mapped_column(String(LABEL_LENGTH))  # class name, or "uncertain"
    top_class: Mapped[str] = mapped_column(String(64))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    uncertain: Mapped[bool] = mapped_column(Boolean)
    crop_object: Mapped[str | None] = mapped_column(String(80), nullable=True)
    overlay_object: Mapped[str | None] = mapped_column(String(80), nullable=True)
    reviewed_label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reviewed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)

    case: Mapped[Case] = relationship(back_populates="cells")
    image: Mapped[CaseImage] = relationship()

    @property
    def final_label(self) -> str:
        return self.reviewed_label or self.predicted_label


class CellReview(Base):
    """Every label a hematologist gave a cell (history; ``Cell.reviewed_label`` is the latest)."""

    __tablename__ = "cell_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id", ondelete="CASCADE"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    label: Mapped[str] = mapped_column(String(64))
    previous_label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class AuditEntry(Base):
    """Who viewed or changed what. No foreign keys: entries outlive users and cases."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_case_at", "case_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    username: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(40))
    case_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    client: Mapped[str] = mapped_column(String(64), default="")
