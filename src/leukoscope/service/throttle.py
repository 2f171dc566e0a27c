"""Attempt counters kept in the database, so that every server process (``--workers N``)
and every host on a shared PostgreSQL counts the same attempts.

An attempt is *reserved* before the expensive or sensitive work (the Argon2 check, the
upload): the counter rows are locked (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite
has one writer at a time), checked and incremented in one short transaction. Sixty
concurrent log-ins therefore get at most ``limit`` password checks, not sixty.

Rows expire once their window is over and no wait is left, and the table is kept
under ``max_rows`` (:func:`prune`).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from leukoscope.service.tables import LoginThrottle

#: Seconds between two clean-ups of expired rows by one process (new rows trigger it sooner).
PRUNE_EVERY_S = 30.0
#: Process-local bookkeeping per database URL: when it last pruned, rows it added since.
_last_prune: dict[str, float] = {}
_added_since_prune: dict[str, int] = {}


def now() -> float:
    """Wall-clock seconds (every process and host must agree, so not a monotonic clock)."""
    return time.time()


@dataclass(frozen=True)
class Rule:
    """``limit`` attempts per ``window_s``; then wait until the window ends, or, when
    ``growing``, 2, 4, 8 ... seconds after each further attempt (at most the window)."""

    name: str
    limit: int  # 0: no limit
    window_s: float
    growing: bool = False

    def blocked_until(self, row: LoginThrottle, at: float) -> float:
        if self.growing:
            return at + min(2.0 ** (row.attempts - self.limit + 1), self.window_s)
        return row.window_start + self.window_s


Check = tuple[Rule, str]


@dataclass
class Verdict:
    """``wait`` is None when the attempt may go ahead; otherwise the seconds to wait, the
    rule that refused it, and whether this is the first refusal of that wait (worth one
    audit entry, not one per request of a flood)."""

    wait: float | None = None
    rule: str = ""
    first_refusal: bool = False
    added_rows: int = 0


def address_block(address: str) -> str:
    """The client address as a throttle key: IPv6 by /64 (one host usually has a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _insert_missing(db: Session, key: str, at: float) -> int:
    dialect = db.get_bind().dialect.name
    values = dict(key=key, attempts=0, refused=0, window_start=at, blocked_until=0.0, expires_at=at)
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        result = db.execute(insert(LoginThrottle).values(**values).on_conflict_do_nothing(index_elements=["key"]))
        return result.rowcount or 0
    if db.get(LoginThrottle, key) is None:  # other databases: not atomic, but still shared
        db.add(LoginThrottle(**values))
        db.flush()
        return 1
    return 0


def _locked_row(db: Session, key: str, at: float) -> tuple[LoginThrottle, int]:
    """The row of ``key``, created if missing, locked until the transaction ends."""
    added = 0
    for _ in range(5):  # a concurrent prune may delete the row between the insert and the lock
        added += _insert_missing(db, key, at)
        row = db.get(LoginThrottle, key, with_for_update=True, populate_existing=True)
        if row is not None:
            return row, added
    raise RuntimeError(f"could not lock the throttle row {key!r}")


def reserve(db: Session, checks: Sequence[Check]) -> Verdict:
    """Count one attempt against every check, or none if any of them says wait.

    Checks are taken in the given order (every caller uses the same order of kinds of
    key, so PostgreSQL row locks cannot deadlock); a refusal leaves later rows untouched,
    so an address that is already waiting adds nothing to a user's count."""
    at = now()
    rows: list[tuple[Rule, LoginThrottle]] = []
    added = 0
    for rule, key in checks:
        if rule.limit <= 0:
            continue
        row, new = _locked_row(db, key, at)
        added += new
        if row.window_start + rule.window_s <= at and row.blocked_until <= at:  # a fresh window
            row.attempts, row.refused, row.window_start, row.blocked_until = 0, 0, at, 0.0
        if row.blocked_until > at:
            row.refused += 1
            db.flush()
            return Verdict(row.blocked_until - at, rule.name, row.refused == 1, added)
        rows.append((rule, row))
    for rule, row in rows:
        row.attempts += 1
        if row.attempts >= rule.limit:
            row.blocked_until, row.refused = rule.blocked_until(row, at), 0
        row.expires_at = max(row.window_start + rule.window_s, row.blocked_until)
    db.flush()
    return Verdict(added_rows=added)


def refund(db: Session, keys: Sequence[str]) -> None:
    """Take one attempt back (it succeeded, or the server was too busy to evaluate it).

    Any wait on these keys goes too: :func:`reserve` refuses an attempt while a wait is in
    force, so a wait found here was set by this very attempt reaching the limit, and a
    successful log-in must not lock its own account or address."""
    db.execute(update(LoginThrottle).where(LoginThrottle.key.in_(keys), LoginThrottle.attempts > 0)
               .values(attempts=LoginThrottle.attempts - 1, blocked_until=0.0))


def forget(db: Session, keys: Sequence[str]) -> int:
    """Delete the rows of exactly these keys; how many there were."""
    return db.execute(delete(LoginThrottle).where(LoginThrottle.key.in_(keys))).rowcount or 0


def forget_prefix(db: Session, prefix: str) -> int:
    """Delete every row whose key starts with ``prefix`` (an admin clearing a lock)."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    result = db.execute(delete(LoginThrottle).where(LoginThrottle.key.like(escaped + "%", escape="\\")))
    return result.rowcount or 0


def waits(db: Session, keys: Sequence[str]) -> dict[str, float]:
    """Keys among ``keys`` that are waiting now, with the time (epoch s) the wait ends."""
    at = now()
    rows = db.execute(select(LoginThrottle.key, LoginThrottle.blocked_until)
                      .where(LoginThrottle.key.in_(keys), LoginThrottle.blocked_until > at))
    return {key: until for key, until in rows}


def prune_due(url: str, added_rows: int, max_rows: int) -> bool:
    """Whether this process should prune now: every PRUNE_EVERY_S, or once it has added
    a hundredth of ``max_rows`` new rows (so a flood of new names cannot outrun the bound)."""
    _added_since_prune[url] = _added_since_prune.get(url, 0) + added_rows
    return (now() - _last_prune.get(url, 0.0) >= PRUNE_EVERY_S
            or _added_since_prune[url] >= max_rows // 100 + 1)


def prune(db: Session, max_rows: int) -> int:
    """Delete expired rows, then, above ``max_rows``, the rows closest to expiring that hold
    no wait (a wait in force is what protects an account). Rows another transaction holds
    are skipped (PostgreSQL ``SKIP LOCKED``), so pruning never blocks or deadlocks a log-in."""
    at = now()
    url = db.get_bind().url.render_as_string(hide_password=True)
    _last_prune[url], _added_since_prune[url] = at, 0
    expired = select(LoginThrottle.key).where(LoginThrottle.expires_at <= at).with_for_update(skip_locked=True)
    removed = db.execute(delete(LoginThrottle).where(LoginThrottle.key.in_(expired.scalar_subquery()))).rowcount
    count = int(db.scalar(select(func.count()).select_from(LoginThrottle)) or 0)
    if count > max_rows:
        excess = (select(LoginThrottle.key).where(LoginThrottle.blocked_until <= at)
                  .order_by(LoginThrottle.expires_at).limit(count - max_rows).with_for_update(skip_locked=True))
        removed += db.execute(delete(LoginThrottle).where(LoginThrottle.key.in_(excess.scalar_subquery()))).rowcount
    return int(removed or 0)


def attempt(sessions: "sessionmaker[Session]", checks: Sequence[Check], max_rows: int,
            on_refusal: Callable[[Session, Verdict], None] | None = None) -> Verdict:
    """:func:`reserve` in its own short transaction (``on_refusal`` runs in it, once per
    wait), then :func:`prune` in another one when it is due."""
    from leukoscope.service.db import transaction

    with transaction(sessions) as db:
        verdict = reserve(db, checks)
        if verdict.wait is not None and verdict.first_refusal and on_refusal is not None:
            on_refusal(db, verdict)
        url = db.get_bind().url.render_as_string(hide_password=True)
    if prune_due(url, verdict.added_rows, max_rows):
        with transaction(sessions) as db:
            prune(db, max_rows)
    return verdict


def settle(sessions: "sessionmaker[Session]", *, refund_keys: Sequence[str] = (),
           forget_keys: Sequence[str] = ()) -> None:
    from leukoscope.service.db import transaction

    with transaction(sessions) as db:
        if forget_keys:
            forget(db, forget_keys)
        if refund_keys:
            refund(db, refund_keys)
