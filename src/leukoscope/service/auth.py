"""Users, passwords, browser sessions, API tokens, CSRF and the audit log.

- User names: NFKC-normalised; unique without regard to case ("Tina" is "tina").
- Passwords: 8-256 characters, not only spaces, not one of the 30,000 most common
  (zxcvbn's list); Argon2id (argon2-cffi), re-hashed when the parameters change; at
  most ``password_checks`` Argon2 checks run at once per process (:class:`PasswordGate`);
  log-in attempts are counted in the database before the check (``login_checks``).
- Browser sessions: a random 256-bit token in an HttpOnly, SameSite=Lax cookie
  (Secure over HTTPS); the database keeps only its SHA-256, with a per-session
  CSRF token that every form must echo back.
- API tokens (``Authorization: Bearer lks_...``) for scripts: random, shown
  once, stored as SHA-256, with an expiry and a scope (``read`` or ``write``),
  revocable, revoked when the password changes or the user is deactivated. The API
  accepts cookies only for safe (GET) requests from this site, so a cross-site form or
  link can never change or record anything through it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from fastapi import Request
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from leukoscope.service import throttle
from leukoscope.service.db import sqlite_write_lock
from leukoscope.service.errors import LoginRequired, ServiceError
from leukoscope.service.throttle import Check, Rule, address_block
from leukoscope.service.tables import ROLES, TOKEN_SCOPES, ApiToken, AuditEntry, User, WebSession, utcnow

if TYPE_CHECKING:  # pragma: no cover
    from leukoscope.service.settings import ServiceSettings

SESSION_COOKIE = "leukoscope_session"
LOGIN_CSRF_COOKIE = "leukoscope_login_csrf"
TOKEN_PREFIX = "lks_"
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{1,63}")  # whole string (fullmatch: no "hugo\n")
MIN_PASSWORD = 8
#: One maximum everywhere: setting, changing and logging in (longer input is refused, never cut).
MAX_PASSWORD = 256
MAX_TOKEN_DAYS = 365

_hasher = PasswordHasher()
# Verifying against this keeps the time of "no such user" equal to "wrong password".
_DUMMY_HASH = _hasher.hash("not a real password, used for timing only")


def hash_secret(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@lru_cache(maxsize=1)
def _common_passwords() -> frozenset[str]:
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"])


def password_problem(password: str) -> str | None:
    """Why ``password`` may not be set, or None."""
    if len(password) < MIN_PASSWORD:
        return f"password must have at least {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"password must have at most {MAX_PASSWORD} characters"
    if not password.strip():
        return "password cannot be only spaces"
    if len(set(password)) < 3:
        return "password needs at least 3 different characters"
    if password.lower() in _common_passwords():
        return "password is one of the most common passwords; choose another"
    return None


def hash_password(password: str) -> str:
    problem = password_problem(password)
    if problem:
        raise ServiceError(400, "weak_password", problem)
    return _hasher.hash(password)


def username_key(username: str) -> str:
    """What makes two user names the same: NFKC, then case-folded."""
    return unicodedata.normalize("NFKC", username).casefold()


def clean_username(raw: str) -> str:
    """The user name to store (NFKC), or a 400 naming the problem."""
    name = unicodedata.normalize("NFKC", raw or "")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise ServiceError(400, "bad_username", "user names cannot contain control or invisible characters")
    if not USERNAME.fullmatch(name):
        raise ServiceError(400, "bad_username", "user names are 2-64 letters, digits, '.', '_', '@' or '-'")
    return name


def find_user(db: Session, username: str) -> User | None:
    """The user a log-in name means: its exact name, else the same name in any case/width."""
    exact = db.scalar(select(User).where(User.username == username))
    return exact or db.scalar(select(User).where(User.username_key == username_key(username)))


def verify_password(user: User | None, password: str) -> bool:
    if len(password) > MAX_PASSWORD:
        return False  # no Argon2 work for input no account can have
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


class PasswordGate:
    """At most ``limit`` Argon2 checks at once in this process (each costs ~0.1 s of CPU and
    64 MiB). A request takes a slot *before* it touches the throttle or the database, so
    the excess of a burst waits ``wait_s`` at most, then gets a 503 that cost nothing."""

    def __init__(self, limit: int, wait_s: float = 0.25) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self.wait_s = wait_s

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise ServiceError(503, "busy", "the server is checking other passwords; try again in a second",
                               {"Retry-After": "1"})
        try:
            yield
        finally:
            self._slots.release()


def create_user(db: Session, username: str, password: str, role: str) -> User:
    username = clean_username(username)
    if role not in ROLES:
        raise ServiceError(400, "bad_role", f"role must be one of {', '.join(ROLES)}")
    existing = db.scalar(select(User).where(User.username_key == username_key(username)))
    if existing is not None:
        same = "" if existing.username == username else f" (as {existing.username!r})"
        raise ServiceError(409, "user_exists", f"user {username!r} already exists{same}")
    user = User(username=username, username_key=username_key(username), password_hash=hash_password(password),
                role=role, active=True)
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
    token: ApiToken | None = None

    @property
    def scope(self) -> str:
        return self.token.scope if self.token is not None else "write"

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


def cross_site(request: Request) -> bool:
    """A request another site started (a link, a form, an image): browsers say so in
    Sec-Fetch-Site. Such a request gets no session, so it can neither change nor record
    anything (SameSite=Lax still sends the cookie on a top-level link)."""
    return request.headers.get("sec-fetch-site", "").lower() == "cross-site"


def from_another_origin(request: Request) -> bool:
    """A request another origin's page started, a sibling subdomain's included (Sec-Fetch-Site): a page form
    of this service never is one, so it can be refused before its body is read (an upload's CSRF token comes
    last, in a body that may be too large to read)."""
    return request.headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site")


def same_origin_referer(request: Request) -> str | None:
    """The path (and query) of the page of this service that sent ``request`` (its Referer), or None when
    the Referer is missing or another origin's."""
    from urllib.parse import urlsplit

    parts = urlsplit(request.headers.get("referer", ""))
    if parts.netloc != request.url.netloc or parts.scheme != request.url.scheme or not parts.path.startswith("/"):
        return None
    return parts.path + (f"?{parts.query}" if parts.query else "")


def session_principal(db: Session, request: Request) -> Principal | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 100:
        return None
    session = db.get(WebSession, hash_secret(token))
    if session is None:
        return None
    if session.expires_at <= utcnow() or not session.user.active:
        db.delete(session)
        return None
    return Principal(session.user, "session", session)


def lock_user(db: Session, user: User) -> None:
    """Hold ``user``'s row until the transaction ends and read it afresh: a deactivation committed meanwhile is
    seen, and one sent now waits for this transaction (:func:`leukoscope.service.db.sqlite_write_lock`)."""
    sqlite_write_lock(db, User.active, User.id == user.id)
    db.refresh(user, with_for_update=True)


def new_api_token(db: Session, user: User, name: str, *, scope: str = "write",
                  days: float = 90) -> tuple[ApiToken, str]:
    # The user's row is held from the check to the insert: a deactivation landing between them had left a token
    # that worked again on reactivation (deactivation revokes the tokens it finds; this one was not yet written).
    lock_user(db, user)
    if not user.active:  # it would work again on reactivation, which brings no token back
        raise ServiceError(409, "inactive_user", f"{user.username} is deactivated: reactivate the account first")
    if scope not in TOKEN_SCOPES:
        raise ServiceError(400, "bad_scope", f"scope must be one of {', '.join(TOKEN_SCOPES)}")
    if not 1 <= days <= MAX_TOKEN_DAYS:
        raise ServiceError(400, "bad_expiry", f"a token lasts 1 to {MAX_TOKEN_DAYS} days")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(user_id=user.id, name=(name or "token")[:100], token_hash=hash_secret(secret),
                     prefix=secret[:10], scope=scope, expires_at=utcnow() + timedelta(days=days))
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
    if token.expires_at <= utcnow():
        raise ServiceError(401, "bad_token", "API token has expired; create a new one on the Account page",
                           {"WWW-Authenticate": "Bearer"})
    last = token.last_used_at
    if last is None or utcnow() - last > timedelta(minutes=5):  # not a write per request
        token.last_used_at = utcnow()
    return Principal(token.user, "token", token=token)


def revoke_tokens(db: Session, user: User) -> int:
    """Revoke every live token of ``user`` (password changed or reset, user deactivated)."""
    result = db.execute(update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
                        .values(revoked_at=utcnow()))
    return result.rowcount or 0


def revoke_token_of(db: Session, principal: Principal, token_id: int, request: Request) -> ApiToken:
    """Revoke a token of one's own, or any token for an admin (404 for anyone else's)."""
    token = db.get(ApiToken, token_id)
    if token is None or (token.user_id != principal.user.id and principal.role != "admin"):
        raise ServiceError(404, "not_found", "no such token")
    token.revoked_at = token.revoked_at or utcnow()
    audit(db, principal.user, "token.revoke", detail={"token": token.prefix, "of": token.user.username},
          request=request)
    return token


def _api_identity(db: Session, request: Request, *, cookie: bool = True) -> Principal | None:
    """Who an API request proves to be, whatever it may do (raises for a bad token)."""
    principal = token_principal(db, request)
    if principal is None and cookie and request.method in ("GET", "HEAD") and not cross_site(request):
        principal = session_principal(db, request)
    return principal


def api_principal(db: Session, request: Request, *, cookie: bool = True) -> Principal:
    """API: a bearer token (a ``read`` one only for GET); a session cookie only for safe
    methods from this site (no CSRF exposure, no audit entries from another site's link), and not
    at all with ``cookie=False`` (a GET that does work and writes an audit entry, as the export: a browser
    that sends no Sec-Fetch-Site header, or a sibling subdomain, could start it from a link; the pages
    use a form with a CSRF token instead)."""
    principal = _api_identity(db, request, cookie=cookie)
    if principal is None:
        raise ServiceError(401, "not_authenticated", "send an API token: Authorization: Bearer lks_...",
                           {"WWW-Authenticate": "Bearer"})
    if principal.scope == "read" and request.method not in ("GET", "HEAD"):
        raise ServiceError(403, "read_only_token", "this API token is read-only; create a write token to upload "
                                                   "or review")
    return principal


def optional_principal(db: Session, request: Request) -> Principal | None:
    """Whoever the request proves to be, or None (never raises: for error handling; a read-only token's
    refused write is still its user's, so that the refusal is audited)."""
    try:
        if request.url.path.startswith("/api/"):
            return _api_identity(db, request)
        return session_principal(db, request)
    except ServiceError:
        return None


def page_principal(db: Session, request: Request) -> Principal:
    principal = session_principal(db, request)
    if principal is None:
        raise LoginRequired()
    return principal


#: What a refused form says (no token, a stale one, or a post from another site's page).
CSRF_MESSAGE = "the form has expired or did not come from this site; reload the page and try again"


def check_csrf(principal: Principal, submitted: Any) -> None:
    expected = principal.csrf_token
    if not expected or not isinstance(submitted, str) or not hmac.compare_digest(submitted, expected):
        raise ServiceError(403, "csrf", CSRF_MESSAGE)


def check_login_csrf(request: Request, submitted: Any) -> None:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not isinstance(submitted, str) or not hmac.compare_digest(submitted, cookie):
        raise ServiceError(403, "csrf", "the log-in form has expired; reload the page and try again")


# ------------------------------------------------------------------ rate limits

#: Log-in counters run over 15 minutes.
LOGIN_WINDOW_S = 15 * 60.0


def login_checks(settings: "ServiceSettings", username: str, address: str) -> list[Check]:
    """What one log-in attempt counts against, in lock order: the client address (all
    names), the user name (all addresses: a lock only for sustained, distributed
    guessing) and the pair (growing waits: one address cannot lock anyone else out)."""
    key, where = username_key(username)[:100], address_block(address)
    return [(Rule("address", settings.login_address_failures, LOGIN_WINDOW_S), f"login:ip:{where}"),
            (Rule("user", settings.login_user_lock_failures, LOGIN_WINDOW_S), user_lock_key(key)),
            (Rule("user+address", settings.login_failures_allowed, LOGIN_WINDOW_S, growing=True),
             f"login:pair:{key}|{where}")]


def user_lock_key(key: str) -> str:
    return f"login:user:{key}"


def user_locks(db: Session, users: Sequence[User]) -> dict[int, datetime]:
    """Users whose account is locked now (sustained, distributed failed log-ins) -> until when."""
    keys = {user_lock_key(u.username_key): u.id for u in users}
    return {keys[key]: datetime.fromtimestamp(until, timezone.utc)
            for key, until in throttle.waits(db, list(keys)).items()}


def password_checks(settings: "ServiceSettings", user_id: int) -> list[Check]:
    """Re-entering one's password (to change it, to create a token): growing waits."""
    return [(Rule("password", settings.login_failures_allowed, LOGIN_WINDOW_S, growing=True),
             f"password:{user_id}")]


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
