"""The SQL of the session store, as operations for :mod:`mcp_authdb.db.pool`.

Each function here returns an operation: a generator that yields
:class:`~mcp_authdb.db.pool.Query` objects and returns a result. The async
and the blocking store run the same operations, so every rule below exists
once. The operations do no I/O and no logging of their own, and they never
raise for an expected outcome, because an exception would roll back their
transaction. A rejected refresh is returned as a :class:`Rejection`, and the
store raises after the transaction has committed.

Every expiry is compared with the database's ``now()``, which is the start
of the current transaction, so the application's clock never matters.

Row lifecycle:

- ``expires_at`` ends the access token and ``refresh_expires_at`` the refresh
  token. A row written without ``refresh_expires_at`` uses ``expires_at`` for
  both, and cleanup deletes a row once both have passed.
- Rotation marks a row ``rotated_at`` and shortens its refresh expiry to the
  replay window. A row rotated within the grace window can be refreshed
  again, so that every pair returned to concurrent refreshes keeps working.
  Once the grace window has passed, presenting its refresh token again is a
  replay.
- Revocation sets ``revoked_at`` and moves both expiries to ``now()``, so
  that queries which only read ``expires_at`` also see the row as expired.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from mcp_authdb.db.pool import Operation, Query
from mcp_authdb.store.sessions import Session, SessionStats

# The columns of a Session, in the order session_from_row() reads them.
_SESSION_COLUMNS = """
    id, family_id, user_id, scope, subscription_level, expires_at,
    coalesce(refresh_expires_at, expires_at), created_at, last_used_at
"""

# A revocation repeats its UPDATE until a pass changes nothing, which usually
# takes two passes (see revoke_rows).
MAX_REVOKE_PASSES = 10

_INSERT = f"""
INSERT INTO user_sessions (
    user_id, access_token_hash, refresh_token_hash, expires_at,
    refresh_expires_at, scope, subscription_level, family_id
)
VALUES (
    %(user_id)s, %(access_hash)s, %(refresh_hash)s, now() + %(access_lifetime)s,
    now() + %(refresh_lifetime)s, %(scopes)s::text[], %(level)s, %(family_id)s
)
RETURNING {_SESSION_COLUMNS}
"""

# The validation statement of the pool's lookup batcher. It looks up the
# hashes of every caller waiting at that moment, so its first column is the
# matching hash, by which the batcher hands each row to its caller. The last
# column tells whether last_used_at is due, which TOUCH then writes in a
# statement of its own. The lookup stays read-only because that is cheaper:
# measured at 8 us on the server against 44 us with an UPDATE in a CTE, even
# one that changed nothing.
VALIDATE = """
SELECT access_token_hash, id, family_id, user_id, scope, subscription_level,
       expires_at, coalesce(refresh_expires_at, expires_at), created_at,
       last_used_at, now(),
       last_used_at IS NULL OR last_used_at <= now() - %(touch_interval)s::interval
FROM user_sessions
WHERE access_token_hash = ANY(%(candidates)s::text[])
  AND expires_at > now()
  AND revoked_at IS NULL
"""

# Set last_used_at unless another process just did. A row locked by a
# refresh or a revocation is skipped (SKIP LOCKED), so validation never waits
# for one. The commit does not wait for the WAL flush, because
# synchronous_commit is off for this statement's transaction only. A crash
# can therefore lose the latest touches, and nothing else.
TOUCH = """
WITH async_commit AS (
    SELECT set_config('synchronous_commit', 'off', true)
)
UPDATE user_sessions
SET last_used_at = now()
WHERE id IN (
    SELECT id
    FROM user_sessions
    WHERE id = %(id)s
      AND (last_used_at IS NULL
           OR last_used_at <= now() - %(touch_interval)s::interval)
    FOR UPDATE SKIP LOCKED
)
  AND EXISTS (SELECT FROM async_commit)
RETURNING last_used_at
"""

# Refreshes and revocations of one user serialize on a transaction-level
# advisory lock keyed by the user id: each refresh holds it shared, each
# revocation or level change exclusive. A revocation therefore waits for the
# refreshes in flight to commit, and its UPDATE, a later statement with a
# later snapshot, sees the rows they added; refreshes that start later wait
# for the revocation and then find their row revoked. Both take the advisory
# lock before any row lock, so they cannot deadlock on each other. A hash
# collision between two users only makes them wait for each other.
_USER_LOCK_KEY = "hashtextextended('mcp-authdb user ' || {user_id}, 0)"
_LOCK_USER = "SELECT pg_advisory_xact_lock({key})".format(
    key=_USER_LOCK_KEY.format(user_id="%s")
)
_LOCK_USER_FOR_REFRESH = """
SELECT pg_advisory_xact_lock_shared({key})
FROM user_sessions
WHERE refresh_token_hash = ANY(%(candidates)s::text[])
LIMIT 1
""".format(key=_USER_LOCK_KEY.format(user_id="user_id"))

# now() is the start of the transaction, and a concurrent refresh may have
# rotated the row since: FOR UPDATE waits for it and returns the row's latest
# version, on which these expressions are evaluated.
_LOCK_FOR_REFRESH = """
SELECT id, family_id, user_id,
       revoked_at IS NOT NULL,
       rotated_at IS NOT NULL,
       coalesce(rotated_at > now() - %(grace)s::interval, false),
       coalesce(refresh_expires_at, expires_at) > now()
FROM user_sessions
WHERE refresh_token_hash = ANY(%(candidates)s::text[])
LIMIT 1
FOR UPDATE
"""

# A row written without refresh_expires_at keeps its end: the replay window
# never makes a row outlive max(expires_at, refresh_expires_at).
_ROTATE_AND_INSERT = f"""
WITH parent AS (
    UPDATE user_sessions
    SET rotated_at = now(),
        refresh_expires_at = least(
            coalesce(refresh_expires_at, expires_at),
            now() + %(replay_window)s::interval
        ),
        family_id = coalesce(family_id, %(family_id)s)
    WHERE id = %(parent_id)s
    RETURNING user_id, scope, subscription_level, family_id
)
INSERT INTO user_sessions (
    user_id, access_token_hash, refresh_token_hash, expires_at,
    refresh_expires_at, scope, subscription_level, family_id
)
SELECT user_id, %(access_hash)s, %(refresh_hash)s, now() + %(access_lifetime)s,
       now() + %(refresh_lifetime)s, scope, subscription_level, family_id
FROM parent
RETURNING {_SESSION_COLUMNS}
"""

_INSERT_SIBLING = f"""
INSERT INTO user_sessions (
    user_id, access_token_hash, refresh_token_hash, expires_at,
    refresh_expires_at, scope, subscription_level, family_id
)
SELECT user_id, %(access_hash)s, %(refresh_hash)s, now() + %(access_lifetime)s,
       now() + %(refresh_lifetime)s, scope, subscription_level,
       coalesce(family_id, %(family_id)s)
FROM user_sessions
WHERE id = %(parent_id)s
RETURNING {_SESSION_COLUMNS}
"""

# {scope} is one of the _SCOPE_* conditions below, never caller input. Rows
# are locked in id order, so two revocations that hold no other row lock
# cannot deadlock each other. A row already revoked is changed again only if
# an expiry is still ahead.
_REVOKE = """
UPDATE user_sessions
SET revoked_at = coalesce(revoked_at, now()),
    expires_at = least(expires_at, now()),
    refresh_expires_at = least(coalesce(refresh_expires_at, expires_at), now())
WHERE id IN (
    SELECT id
    FROM user_sessions
    WHERE {scope}
      AND (
          revoked_at IS NULL
          OR expires_at > now()
          OR coalesce(refresh_expires_at, expires_at) > now()
      )
    ORDER BY id
    FOR UPDATE
)
RETURNING user_id
"""
_SCOPE_FAMILY = "family_id = %(value)s"
_SCOPE_ROW = "id = %(value)s"
_SCOPE_USER = "user_id = %(value)s"

_FIND_BY_HASH = {
    "access_token_hash": """
        SELECT id, family_id, user_id FROM user_sessions
        WHERE access_token_hash = ANY(%s::text[])
        LIMIT 1
    """,
    "refresh_token_hash": """
        SELECT id, family_id, user_id FROM user_sessions
        WHERE refresh_token_hash = ANY(%s::text[])
        LIMIT 1
    """,
}

_FIND_BY_ID = "SELECT id, family_id, user_id FROM user_sessions WHERE id = %s"

_SET_LEVEL = """
UPDATE user_sessions
SET subscription_level = %(level)s
WHERE id IN (
    SELECT id
    FROM user_sessions
    WHERE user_id = %(user_id)s AND subscription_level <> %(level)s
    ORDER BY id
    FOR UPDATE
)
"""

# A row is live while its access token is valid, or its refresh token is
# neither expired nor rotated: the rule of SessionStats.
_LIVE = """
    revoked_at IS NULL
    AND (
        expires_at > now()
        OR (rotated_at IS NULL AND coalesce(refresh_expires_at, expires_at) > now())
    )
"""

# Each family is listed once, by its newest live row. A row without a
# family is a family of its own.
_LIST = f"""
SELECT {_SESSION_COLUMNS}
FROM (
    SELECT DISTINCT ON (family_id, CASE WHEN family_id IS NULL THEN id END) *
    FROM user_sessions
    WHERE {_LIVE} {{user_filter}}
    ORDER BY family_id, CASE WHEN family_id IS NULL THEN id END, id DESC
) AS newest
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""
_LIST_ALL = _LIST.format(user_filter="")
_LIST_USER = _LIST.format(user_filter="AND user_id = %(user_id)s")

_STATS = f"""
SELECT count(*) FILTER (WHERE {_LIVE}),
       count(*) FILTER (WHERE revoked_at IS NOT NULL),
       count(*)
FROM user_sessions
"""


@dataclasses.dataclass(frozen=True)
class NewPair:
    """The hashes and lifetimes of a token pair about to be stored."""

    access_hash: str
    refresh_hash: str
    access_lifetime: timedelta
    refresh_lifetime: timedelta


@dataclasses.dataclass(frozen=True)
class ValidatedSession:
    """A session found by its access token, the database's now(), and
    whether its last_used_at is due to be written."""

    session: Session
    database_now: datetime
    touch_due: bool


@dataclasses.dataclass(frozen=True)
class Revocation:
    """Rows a revocation changed, and the users they belong to."""

    rows: int
    user_ids: frozenset[str]
    complete: bool = True

    def then(self, later: Revocation) -> Revocation:
        """Return this revocation followed by ``later``, as one."""
        return Revocation(
            self.rows + later.rows, self.user_ids | later.user_ids, later.complete
        )


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A refresh token that was not accepted, and what was done about it.

    ``reason`` is one of ``errors.GRANT_REJECTIONS``. ``revocation`` is set
    for a replay, whose family was revoked.
    """

    reason: str
    session_id: int | None = None
    user_id: str | None = None
    family_id: uuid.UUID | None = None
    revocation: Revocation | None = None


def session_from_row(row: Sequence[Any]) -> Session:
    """Build a Session from the columns of ``_SESSION_COLUMNS``."""
    last_used_at = row[8]
    return Session(
        session_id=int(row[0]),
        family_id=row[1],
        user_id=row[2],
        scopes=tuple(row[3]),
        subscription_level=row[4],
        expires_at=_utc(row[5]),
        refresh_expires_at=_utc(row[6]),
        created_at=_utc(row[7]),
        last_used_at=None if last_used_at is None else _utc(last_used_at),
    )


def insert_session_row(
    user_id: str,
    scopes: Sequence[str],
    subscription_level: str,
    pair: NewPair,
    family_id: uuid.UUID,
) -> Operation[Session]:
    """Insert the first row of a new family and return it."""
    result = yield Query(
        _INSERT,
        {
            "user_id": user_id,
            "access_hash": pair.access_hash,
            "refresh_hash": pair.refresh_hash,
            "access_lifetime": pair.access_lifetime,
            "refresh_lifetime": pair.refresh_lifetime,
            "scopes": list(scopes),
            "level": subscription_level,
            "family_id": family_id,
        },
    )
    return session_from_row(result.rows[0])


def validated_session(rows: Sequence[Sequence[Any]]) -> ValidatedSession | None:
    """Build the outcome of a validation from the rows ``VALIDATE`` returned.

    ``rows`` are those of one token's hashes. A hash belongs to at most one
    row, and a token issued by this library has one row, so the first wins.
    """
    if not rows:
        return None
    row = rows[0]
    return ValidatedSession(session_from_row(row[1:]), _utc(row[10]), bool(row[11]))


def touch_session(
    session_id: int, touch_interval: timedelta
) -> Operation[datetime | None]:
    """Set last_used_at of the row ``session_id``; return it, or None if skipped."""
    result = yield Query(TOUCH, {"id": session_id, "touch_interval": touch_interval})
    return _utc(result.rows[0][0]) if result.rows else None


def refresh_session(
    candidates: Sequence[str],
    pair: NewPair,
    *,
    grace: timedelta,
    replay_window: timedelta,
    new_family_id: uuid.UUID,
) -> Operation[Session | Rejection]:
    """Exchange a refresh token for a new row, or return why it was rejected.

    The token's row is locked first, so that concurrent refreshes of one
    token run one after the other:

    - no row: rejected as unknown. A revoked row: rejected as revoked. A row
      that was not rotated and whose refresh token expired: rejected as
      expired. Nothing changes.
    - not rotated: the row is rotated, and a new row joins its family. A row
      without a family gets ``new_family_id`` for both.
    - rotated within ``grace``: another new row joins the family.
    - rotated before ``grace``: a replay. The family's rows that this
      transaction can see are revoked here, so that the revocation commits
      with the rejection even if the caller gives up. A refresh of the same
      family that commits meanwhile is outside this snapshot, so the caller
      then runs :func:`revoke_session_family`, which takes the user lock
      exclusive, in a transaction of its own.
    """
    locked = yield Query(_LOCK_USER_FOR_REFRESH, {"candidates": list(candidates)})
    if not locked.rows:
        return Rejection("unknown")
    result = yield Query(
        _LOCK_FOR_REFRESH, {"candidates": list(candidates), "grace": grace}
    )
    if not result.rows:
        return Rejection("unknown")

    row_id, family_id, user_id, revoked, rotated, within_grace, unexpired = result.rows[
        0
    ]
    session_id = int(row_id)
    if revoked:
        return Rejection("revoked", session_id, user_id, family_id)
    if not rotated and not unexpired:
        return Rejection("expired", session_id, user_id, family_id)
    if rotated and not within_grace:
        revocation = yield from _revoke_family(session_id, family_id)
        return Rejection("replayed", session_id, user_id, family_id, revocation)

    params = {
        "parent_id": session_id,
        "family_id": new_family_id,
        "replay_window": replay_window,
        "access_hash": pair.access_hash,
        "refresh_hash": pair.refresh_hash,
        "access_lifetime": pair.access_lifetime,
        "refresh_lifetime": pair.refresh_lifetime,
    }
    sql = _INSERT_SIBLING if rotated else _ROTATE_AND_INSERT
    inserted = yield Query(sql, params)
    return session_from_row(inserted.rows[0])


def revoke_token_family(
    candidates: Sequence[str], column: str
) -> Operation[Revocation]:
    """Revoke the family of the row whose ``column`` is one of ``candidates``.

    ``column`` is ``access_token_hash`` or ``refresh_token_hash``. A token
    that no row has revokes nothing.
    """
    result = yield Query(_FIND_BY_HASH[column], (list(candidates),))
    if not result.rows:
        return Revocation(0, frozenset())
    row_id, family_id, user_id = result.rows[0]
    return (yield from _revoke_family_locked(int(row_id), family_id, user_id))


def revoke_session_family(session_id: int) -> Operation[Revocation]:
    """Revoke the family of the row ``session_id``; a missing row revokes nothing."""
    result = yield Query(_FIND_BY_ID, (session_id,))
    if not result.rows:
        return Revocation(0, frozenset())
    row_id, family_id, user_id = result.rows[0]
    return (yield from _revoke_family_locked(int(row_id), family_id, user_id))


def revoke_user_sessions(user_id: str) -> Operation[Revocation]:
    """Revoke every row of ``user_id``."""
    yield Query(_LOCK_USER, (user_id,))
    return (yield from revoke_rows(_SCOPE_USER, user_id))


def _revoke_family_locked(
    row_id: int, family_id: uuid.UUID | None, user_id: str
) -> Operation[Revocation]:
    """Take the user lock exclusive, then revoke the row's family.

    A refresh that held the lock may have given a row without a family a new
    ``family_id``, for the row and its new child, so the family is read
    again once the lock is held.
    """
    yield Query(_LOCK_USER, (user_id,))
    again = yield Query(_FIND_BY_ID, (row_id,))
    if again.rows:
        family_id = again.rows[0][1]
    return (yield from _revoke_family(row_id, family_id))


def _revoke_family(row_id: int, family_id: uuid.UUID | None) -> Operation[Revocation]:
    if family_id is None:
        return (yield from revoke_rows(_SCOPE_ROW, row_id))
    return (yield from revoke_rows(_SCOPE_FAMILY, family_id))


def revoke_rows(scope: str, value: object) -> Operation[Revocation]:
    """Revoke the rows that ``scope`` selects.

    The caller holds the exclusive user lock, so no refresh of these rows is
    in flight and the first pass revokes them all. The UPDATE is still
    repeated until a pass changes no row, at most ``MAX_REVOKE_PASSES``
    times, for rows that SQL outside this library adds without the lock;
    ``complete`` is False when they kept coming, and the store logs a warning.
    """
    sql = _REVOKE.format(scope=scope)
    rows = 0
    user_ids: set[str] = set()
    for _ in range(MAX_REVOKE_PASSES):
        result = yield Query(sql, {"value": value})
        if result.rowcount == 0:
            return Revocation(rows, frozenset(user_ids))
        rows += result.rowcount
        user_ids.update(row[0] for row in result.rows)
    return Revocation(rows, frozenset(user_ids), complete=False)


def set_level(user_id: str, subscription_level: str) -> Operation[int]:
    """Set the subscription level of every row of ``user_id``; return rows changed.

    Repeated until a pass changes nothing, for the reason given in
    :func:`revoke_rows`: a concurrent refresh copies the old level.
    """
    changed = 0
    params = {"user_id": user_id, "level": subscription_level}
    yield Query(_LOCK_USER, (user_id,))
    for _ in range(MAX_REVOKE_PASSES):
        result = yield Query(_SET_LEVEL, params)
        if result.rowcount == 0:
            break
        changed += result.rowcount
    return changed


def list_live_sessions(user_id: str | None, limit: int) -> Operation[list[Session]]:
    """Return the newest live row of each live family, newest family first."""
    if user_id is None:
        result = yield Query(_LIST_ALL, {"limit": limit})
    else:
        result = yield Query(_LIST_USER, {"limit": limit, "user_id": user_id})
    return [session_from_row(row) for row in result.rows]


def count_sessions() -> Operation[SessionStats]:
    """Count the rows by state, as :class:`SessionStats` defines the states."""
    result = yield Query(_STATS)
    live, revoked, total = (int(value) for value in result.rows[0])
    return SessionStats(live=live, expired=total - live - revoked, revoked=revoked)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)
