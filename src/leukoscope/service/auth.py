"""Users, passwords, browser sessions, API tokens, CSRF, rate limits and the audit log.

- Passwords: Argon2id (argon2-cffi), re-hashed when the parameters change.
- Browser sessions: a random 256-bit token in an HttpOnly, SameSite=Lax cookie
  (Secure over HTTPS); the database keeps only its SHA-256, with a per-session
  CSRF token that every form must echo back.
- API tokens (``Authorization: Bearer lks_...``) for scripts: random, shown
  once, stored as SHA-256, revocable. The API accepts cookies only for safe
  (GET) requests, so a cross-site form can never change anything through it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from fastapi import Request
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from leukoscope.service.errors import LoginRequired, ServiceError
from leukoscope.service.tables import ROLES, ApiToken, AuditEntry, User, WebSession, aware, utcnow

SESSION_COOKIE = "leukoscope_session"
LOGIN_CSRF_COOKIE = "leukoscope_login_csrf"
TOKEN_PREFIX = "lks_"
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{1,63}$")
MIN_PASSWORD = 8

_hasher = PasswordHasher()
# Verifying against this keeps the time of "no such user" equal to "wrong password".
_DUMMY_HASH = _hasher.hash("not a real password, used for timing only")


def hash_secret(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ServiceError(400, "weak_password", f"password must have at least {MIN_PASSWORD} characters")
    return _hasher.hash(password)


def verify_password(user: User | None, password: str) -> bool:
    if user is None:
        try:
            _hasher.verify(_DUMMY_HASH, password)
        except VerificationError:
            pass
        return False
    try:
        _hasher.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return True


def create_user(db: Session, username: str, password: str, role: str) -> User:
    if not USERNAME.match(username or ""):
        raise ServiceError(400, "bad_username", "user names are 2-64 letters, digits, '.', '_', '@' or '-'")
    if role not in ROLES:
        raise ServiceError(400, "bad_role", f"role must be one of {', '.join(ROLES)}")
    if db.scalar(select(User).where(User.username == username)) is not None:
        raise ServiceError(409, "user_exists", f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, active=True)
    db.add(user)
    db.flush()
    return user


# ------------------------------------------------------------------ principals


@dataclass
class Principal:
    """Who is making a request, and how they proved it."""

    user: User
    via: str  # "session" or "token"
    session: WebSession | None = None

    @property
    def role(self) -> str:
        return self.user.role

    def require(self, *roles: str) -> None:
        if self.user.role not in roles:
            raise ServiceError(403, "forbidden", f"this needs the role {' or '.join(roles)}; "
                                                f"you are {self.user.role}")

    @property
    def csrf_token(self) -> str:
        return self.session.csrf_token if self.session else ""


def new_session(db: Session, user: User, hours: float) -> str:
    """Create a session; returns the cookie value (only its hash is stored)."""
    db.execute(delete(WebSession).where(WebSession.expires_at < utcnow()))  # tidy up expired sessions
    token = secrets.token_urlsafe(32)
    db.add(WebSession(id=hash_secret(token), user_id=user.id, csrf_token=secrets.token_urlsafe(32),
                      expires_at=utcnow() + timedelta(hours=hours)))
    return token


def session_principal(db: Session, request: Request) -> Principal | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 100:
        return None
    session = db.get(WebSession, hash_secret(token))
    if session is None:
        return None
    if aware(session.expires_at) <= utcnow() or not session.user.active:
        db.delete(session)
        return None
    return Principal(session.user, "session", session)


def new_api_token(db: Session, user: User, name: str) -> tuple[ApiToken, str]:
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(user_id=user.id, name=(name or "token")[:100], token_hash=hash_secret(secret),
                     prefix=secret[:10])
    db.add(token)
    db.flush()
    return token, secret


def token_principal(db: Session, request: Request) -> Principal | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value:
        return None
    value = value.strip()
    if not value.startswith(TOKEN_PREFIX) or len(value) > 100:
        raise ServiceError(401, "bad_token", "API token is not valid", {"WWW-Authenticate": "Bearer"})
    token = db.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(value)))
    if token is None or token.revoked_at is not None or not token.user.active:
        raise ServiceError(401, "bad_token", "API token is not valid or was revoked", {"WWW-Authenticate": "Bearer"})
    last = aware(token.last_used_at)
    if last is None or utcnow() - last > timedelta(minutes=5):  # not a write per request
        token.last_used_at = utcnow()
    return Principal(token.user, "token")


def api_principal(db: Session, request: Request) -> Principal:
    """API: a bearer token; a session cookie only for safe methods (no CSRF exposure)."""
    principal = token_principal(db, request)
    if principal is None and request.method in ("GET", "HEAD"):
        principal = session_principal(db, request)
    if principal is None:
        raise ServiceError(401, "not_authenticated", "send an API token: Authorization: Bearer lks_...",
                           {"WWW-Authenticate": "Bearer"})
    return principal


def page_principal(db: Session, request: Request) -> Principal:
    principal = session_principal(db, request)
    if principal is None:
        raise LoginRequired()
    return principal


def check_csrf(principal: Principal, submitted: Any) -> None:
    expected = principal.csrf_token
    if not expected or not isinstance(submitted, str) or not hmac.compare_digest(submitted, expected):
        raise ServiceError(403, "csrf", "the form has expired or did not come from this site; reload the page "
                                        "and try again")


def check_login_csrf(request: Request, submitted: Any) -> None:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not isinstance(submitted, str) or not hmac.compare_digest(submitted, cookie):
        raise ServiceError(403, "csrf", "the log-in form has expired; reload the page and try again")


# ------------------------------------------------------------------ rate limits


class RateLimiter:
    """Sliding-window counter per key (in this process; one server process by default)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window = window_s
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _trim(self, hits: deque[float], now: float) -> None:
        while hits and hits[0] <= now - self.window:
            hits.popleft()

    def retry_after(self, key: str) -> float | None:
        """Seconds to wait when ``key`` is at its limit, else None (does not count)."""
        if self.limit <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            hits = self._hits[key]
            self._trim(hits, now)
            if len(hits) >= self.limit:
                return max(0.0, hits[0] + self.window - now)
        return None

    def hit(self, key: str) -> float | None:
        """Count one event; returns the wait in seconds when over the limit (not counted then)."""
        if self.limit <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            hits = self._hits[key]
            self._trim(hits, now)
            if len(hits) >= self.limit:
                return max(0.0, hits[0] + self.window - now)
            hits.append(now)
        return None

    def reset(self, key: str) -> None:
        with self._lock:
            self._hits.pop(key, None)


def too_many(what: str, wait: float) -> ServiceError:
    seconds = max(1, int(wait + 0.999))
    return ServiceError(429, "rate_limited", f"too many {what}; try again in {seconds} s",
                        {"Retry-After": str(seconds)})


# ------------------------------------------------------------------ audit


def client_address(request: Request) -> str:
    return (request.client.host if request.client else "")[:64]


def audit(db: Session, user: User | None, action: str, *, case_id: str | None = None,
          detail: dict[str, Any] | None = None, request: Request | None = None, username: str | None = None,
          client: str | None = None) -> None:
    """Record who did what to which case (written in the caller's transaction)."""
    db.add(AuditEntry(user_id=user.id if user else None, username=(user.username if user else username or "")[:64],
                      action=action, case_id=case_id, detail=detail or {},
                      client=client_address(request) if request is not None else (client or "")[:64]))
