"""User session rows: their Python types, input checks, and insert_session.

A *user session* is a row of ``user_sessions``: who is signed in, until when,
with which scopes. It is not an MCP transport session (``Mcp-Session-Id``).

The validators raise :class:`~mcp_authdb.errors.InvalidValueError` naming the
field, what is wrong with the value and the limit, so that bad input fails
before it reaches the database and nothing is written. The messages never
contain a token hash.

Timestamps: naive datetimes are rejected, because PostgreSQL would read them
in the connection's ``TimeZone``. Aware datetimes are stored as the same
instant, whatever the connection's ``TimeZone``; PostgreSQL keeps
``timestamp with time zone`` in UTC with microsecond precision, which is also
Python's precision, so a value reads back equal to the one written.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from mcp_authdb.errors import DatabaseError, InvalidValueError

logger = logging.getLogger(__name__)

# The varchar lengths of user_sessions. PostgreSQL counts varchar lengths in
# characters, not bytes, as Python's len() does on a str. A test compares
# these with the live columns.
USER_ID_MAX_LENGTH = 255
TOKEN_HASH_MAX_LENGTH = 255
SUBSCRIPTION_LEVEL_MAX_LENGTH = 50

DEFAULT_SUBSCRIPTION_LEVEL = "free"

# Limits on granted scopes. OAuth servers grant a handful of short scopes;
# these bounds stop a caller's mistake, not a real deployment.
MAX_SCOPES = 100
MAX_SCOPE_LENGTH = 200

# The maximum token lifetime. Any bound far below the year 9999,
# which is the end of Python's datetime range, would do: an expiry past it
# could be stored but not read back.
MAX_LIFETIME = timedelta(days=100 * 366)
# The maximum number of sessions one listing returns.
MAX_LIST_LIMIT = 10_000

# scope-token of RFC 6749, section 3.3: printable ASCII except space, '"' and
# '\'. Scopes travel as one space-separated string, so a scope containing a
# space could not be read back as the same list.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")

# How much of a rejected value an error message shows.
_PREVIEW_LENGTH = 40

_INSERT_SESSION = """
INSERT INTO user_sessions (
    user_id, access_token_hash, refresh_token_hash, expires_at, scope,
    subscription_level
)
VALUES (%s, %s, %s, %s, %s::text[], %s)
RETURNING id
"""


@dataclasses.dataclass(frozen=True)
class Session:
    """One row of user_sessions, as the session store returns it.

    ``session_id`` is the row's id. Rows with the same ``family_id`` descend
    from one sign-in through refresh-token rotation, and a row written without
    a family has None. ``expires_at`` is when the access token expires.
    ``refresh_expires_at`` is when the refresh token expires, which is
    ``expires_at`` for a row written without it. After the row's refresh
    token was rotated, it is the end of the replay window instead.
    ``last_used_at`` is when the access token was last validated, to within
    the store's touch interval, or None if never. Every datetime is aware and
    in UTC.
    """

    session_id: int
    family_id: uuid.UUID | None
    user_id: str
    scopes: tuple[str, ...]
    subscription_level: str
    expires_at: datetime
    refresh_expires_at: datetime
    created_at: datetime
    last_used_at: datetime | None


@dataclasses.dataclass(frozen=True)
class IssuedTokens:
    """A new token pair and the session row that stores its hashes.

    The tokens exist only here: the database stores their keyed hashes.
    ``repr`` leaves both tokens out, so this object can be logged.
    """

    access_token: str = dataclasses.field(repr=False)
    refresh_token: str = dataclasses.field(repr=False)
    session: Session


@dataclasses.dataclass(frozen=True)
class SessionStats:
    """Counts of user_sessions rows by state, which add up to all rows.

    ``live``: not revoked, and either the access token has not expired or
    the refresh token has neither expired nor been rotated.
    ``expired``: not revoked and not live. These are rows waiting for
    cleanup, and rotated rows kept for replay detection after their access
    token expired.
    ``revoked``: revoked and not yet deleted by cleanup.
    """

    live: int
    expired: int
    revoked: int

    @property
    def total(self) -> int:
        """The number of rows in user_sessions."""
        return self.live + self.expired + self.revoked


def insert_session(
    conn: psycopg.Connection[Any],
    *,
    user_id: str,
    access_token_hash: str,
    refresh_token_hash: str,
    expires_at: datetime,
    scope: Iterable[str] = (),
    subscription_level: str = DEFAULT_SUBSCRIPTION_LEVEL,
) -> int:
    """Insert one row into user_sessions and return its id.

    Every value is checked first: invalid input raises
    :class:`InvalidValueError` and sends nothing. The INSERT runs in the
    connection's current transaction, and committing it is the caller's job.
    A duplicate token hash raises :class:`DatabaseError` with SQLSTATE 23505
    and the unique index's name in ``constraint_name``.
    """
    validate_user_id(user_id)
    validate_token_hash("access_token_hash", access_token_hash)
    validate_token_hash("refresh_token_hash", refresh_token_hash)
    validate_expires_at(expires_at)
    scopes = validate_scope(scope)
    validate_subscription_level(subscription_level)

    params = (
        user_id,
        access_token_hash,
        refresh_token_hash,
        expires_at,
        scopes,
        subscription_level,
    )
    try:
        row = conn.execute(_INSERT_SESSION, params).fetchone()
    except psycopg.IntegrityError as exc:
        # The driver's message detail repeats the key, which is a token hash,
        # so only the primary message is kept, and the original error is
        # dropped from the chain so that no traceback prints it.
        detail = exc.diag.message_primary or type(exc).__name__
        hint = "check the values against the schema"
        if isinstance(exc, psycopg.errors.UniqueViolation):
            hint = "each token hash may belong to one session only, so hash a new token"
        raise DatabaseError(
            f"could not insert a session for user {_preview(user_id)}: {detail} "
            f"(SQLSTATE {exc.sqlstate}); {hint}",
            sqlstate=exc.sqlstate,
            constraint_name=exc.diag.constraint_name,
        ) from None

    if row is None:
        raise DatabaseError("INSERT INTO user_sessions returned no id")
    session_id = int(row[0])
    logger.debug(
        "inserted session %d for user %s",
        session_id,
        _preview(user_id),
        extra={"action": "sessions.insert", "session_id": session_id},
    )
    return session_id


def validate_user_id(value: object) -> None:
    """Raise InvalidValueError unless ``value`` fits ``user_sessions.user_id``."""
    _validate_text("user_id", value, max_length=USER_ID_MAX_LENGTH, secret=False)


def validate_token_hash(field: str, value: object) -> None:
    """Raise InvalidValueError unless ``value`` fits a token hash column.

    ``field`` names the column in the message. The message never shows the
    value, only its length or the position of the bad character.
    """
    _validate_text(field, value, max_length=TOKEN_HASH_MAX_LENGTH, secret=True)


def validate_subscription_level(value: object) -> None:
    """Raise InvalidValueError unless ``value`` fits ``subscription_level``."""
    _validate_text(
        "subscription_level",
        value,
        max_length=SUBSCRIPTION_LEVEL_MAX_LENGTH,
        secret=False,
    )


def validate_scope(value: object) -> list[str]:
    """Return the scopes as a list, or raise InvalidValueError.

    ``value`` must be an iterable of at most ``MAX_SCOPES`` strings, not one
    string, and each scope must be an RFC 6749 scope-token of at most
    ``MAX_SCOPE_LENGTH`` characters: printable ASCII other than space, '"'
    and '\\'.
    """
    if isinstance(value, str | bytes | bytearray):
        raise InvalidValueError(
            f"scope is a single {type(value).__name__}, {_preview(value)}; pass a "
            "list of scopes, for example ['content:read']"
        )
    if not isinstance(value, Iterable):
        raise InvalidValueError(
            f"scope is a {type(value).__name__}, not a list of strings; pass a "
            "list of scopes, for example ['content:read']"
        )

    # islice: an endless iterator must fail here, not hang.
    scopes = list(itertools.islice(value, MAX_SCOPES + 1))
    if len(scopes) > MAX_SCOPES:
        raise InvalidValueError(
            f"scope has more than {MAX_SCOPES} scopes; a session keeps a short "
            "list of granted scopes, so pass at most that many"
        )
    for index, item in enumerate(scopes):
        field = f"scope[{index}]"
        text = _validate_text(field, item, max_length=MAX_SCOPE_LENGTH, secret=False)
        if not _SCOPE_TOKEN.fullmatch(text):
            raise InvalidValueError(
                f"{field} is {_preview(text)}, which is not an OAuth scope: a scope "
                "is printable ASCII with no space, '\"' or '\\' (RFC 6749, "
                "section 3.3)"
            )
    return scopes


def validate_expires_at(value: object) -> None:
    """Raise InvalidValueError unless ``value`` is an aware datetime.

    Naive datetimes are rejected because PostgreSQL would read them in the
    connection's ``TimeZone``. The instant must also fall within Python's
    datetime range in UTC, so that the stored value can be read back.
    """
    if not isinstance(value, datetime):
        raise InvalidValueError(
            f"expires_at is a {type(value).__name__}, not a datetime; pass an "
            "aware datetime, for example datetime.now(UTC) + timedelta(hours=1)"
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidValueError(
            f"expires_at {value.isoformat()} is a naive datetime, with no time "
            "zone; PostgreSQL would read it in the connection's TimeZone. Pass "
            "an aware datetime, for example datetime.now(UTC)"
        )
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise InvalidValueError(
            f"expires_at {value.isoformat()} is outside the years 1 to 9999 in "
            "UTC, which Python cannot read back; pass an earlier or later instant"
        ) from None


def validate_lifetime(field: str, value: object) -> timedelta:
    """Return ``value`` if it is a positive timedelta up to :data:`MAX_LIFETIME`.

    Raises :class:`InvalidValueError` naming ``field`` and the value
    otherwise, including for numbers and datetimes.
    """
    duration = _require_timedelta(field, value)
    if duration <= timedelta(0):
        raise InvalidValueError(
            f"{field}={duration!r} is not positive; pass a duration such as "
            "timedelta(hours=1)"
        )
    if duration > MAX_LIFETIME:
        raise InvalidValueError(
            f"{field}={duration!r} is longer than the maximum of "
            f"{MAX_LIFETIME.days} days; pass a shorter duration"
        )
    return duration


def validate_lifetimes(access: object, refresh: object) -> tuple[timedelta, timedelta]:
    """Return the access and refresh lifetimes, each checked by validate_lifetime.

    The access token may not outlive the refresh token: a session whose
    refresh token expires first could no longer be refreshed while its access
    token still works, which is always a mix-up of the two arguments.
    """
    access_lifetime = validate_lifetime("access_lifetime", access)
    refresh_lifetime = validate_lifetime("refresh_lifetime", refresh)
    if access_lifetime > refresh_lifetime:
        raise InvalidValueError(
            f"access_lifetime={access_lifetime!r} is longer than "
            f"refresh_lifetime={refresh_lifetime!r}; the refresh token must "
            "last at least as long as the access token"
        )
    return access_lifetime, refresh_lifetime


def validate_interval(field: str, value: object, *, allow_zero: bool) -> timedelta:
    """Return ``value`` if it is a timedelta from 0 (or above 0) to MAX_LIFETIME.

    ``allow_zero`` sets whether 0 is accepted. Raises
    :class:`InvalidValueError` naming ``field`` and the value otherwise.
    """
    duration = _require_timedelta(field, value)
    if duration < timedelta(0) or (duration == timedelta(0) and not allow_zero):
        least = "0 or more" if allow_zero else "positive"
        raise InvalidValueError(
            f"{field}={duration!r} is invalid; it must be {least}, for example "
            "timedelta(seconds=1)"
        )
    if duration > MAX_LIFETIME:
        raise InvalidValueError(
            f"{field}={duration!r} is longer than the maximum of "
            f"{MAX_LIFETIME.days} days; pass a shorter duration"
        )
    return duration


def validate_session_id(value: object) -> int:
    """Return ``value`` if it is a session row id: a positive int, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueError(
            f"session_id={_short_repr(value)} is a {type(value).__name__}, not an "
            "int; pass "
            "the session_id of a Session"
        )
    if value < 1:
        raise InvalidValueError(
            f"session_id={value} is invalid; session ids are positive"
        )
    return value


def validate_limit(value: object) -> int:
    """Return ``value`` if it is an int from 1 to :data:`MAX_LIST_LIMIT`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueError(
            f"limit={_short_repr(value)} is a {type(value).__name__}, not an int; "
            "pass a "
            f"number of sessions from 1 to {MAX_LIST_LIMIT}"
        )
    if not 1 <= value <= MAX_LIST_LIMIT:
        raise InvalidValueError(
            f"limit={value} is invalid; pass a number of sessions from 1 to "
            f"{MAX_LIST_LIMIT}"
        )
    return value


def _require_timedelta(field: str, value: object) -> timedelta:
    if isinstance(value, datetime):
        zone = "a naive" if value.tzinfo is None else "an aware"
        raise InvalidValueError(
            f"{field}={value.isoformat()} is {zone} datetime, not a duration; "
            "pass a timedelta, for example timedelta(hours=1)"
        )
    if not isinstance(value, timedelta):
        raise InvalidValueError(
            f"{field}={_short_repr(value)} is a {type(value).__name__}, not a "
            "timedelta; "
            "pass a duration, for example timedelta(hours=1)"
        )
    return value


def _validate_text(
    field: str, value: object, *, max_length: int | None, secret: bool
) -> str:
    """Return ``value`` if it is text PostgreSQL can store in ``field``.

    ``secret`` values are described by length and position only.
    """
    if not isinstance(value, str):
        raise InvalidValueError(
            f"{field} is a {type(value).__name__}, not a str; pass text"
        )
    if value == "":
        raise InvalidValueError(f"{field} is empty; it needs at least 1 character")
    if max_length is not None and len(value) > max_length:
        preview = "" if secret else f" ({_preview(value)})"
        raise InvalidValueError(
            f"{field}{preview} is {len(value)} characters long, over the maximum "
            f"of {max_length}; shorten it"
        )

    nul = value.find("\x00")
    if nul >= 0:
        raise InvalidValueError(
            f"{field} contains a NUL character (\\x00) at index {nul}, which "
            "PostgreSQL text cannot store; remove it"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidValueError(
            f"{field} contains a lone surrogate at index {exc.start}, which is "
            "not a Unicode character and cannot be encoded in UTF-8; decode the "
            "source text correctly"
        ) from None
    return value


def _short_repr(value: object) -> str:
    """Return ``repr(value)``, cut to a length fit for a message."""
    text = repr(value)
    if len(text) <= _PREVIEW_LENGTH:
        return text
    return f"{text[:_PREVIEW_LENGTH]}..."


def _preview(value: str | bytes | bytearray) -> str:
    """Return ``repr(value)``, cut to a length fit for a message."""
    if len(value) <= _PREVIEW_LENGTH:
        return repr(value)
    return f"{value[:_PREVIEW_LENGTH]!r}..."
