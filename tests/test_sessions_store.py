"""Writing user_sessions rows: validation, limits, timestamps and the trigger."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from mcp_authdb.errors import DatabaseError, InvalidValueError
from mcp_authdb.store.sessions import (
    SUBSCRIPTION_LEVEL_MAX_LENGTH,
    TOKEN_HASH_MAX_LENGTH,
    USER_ID_MAX_LENGTH,
    insert_session,
)

from conftest import ScratchDatabase

ACCESS_HASH = "3f" * 32
REFRESH_HASH = "9a" * 32
IN_AN_HOUR = datetime.now(UTC) + timedelta(hours=1)


def valid_session(**changes: Any) -> dict[str, Any]:
    """Return insert_session keyword arguments, with ``changes`` applied."""
    session: dict[str, Any] = {
        "user_id": "user-1",
        "access_token_hash": ACCESS_HASH,
        "refresh_token_hash": REFRESH_HASH,
        "expires_at": IN_AN_HOUR,
        "scope": ["content:read", "content:search"],
        "subscription_level": "plus",
    }
    session.update(changes)
    return session


def count_sessions(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM user_sessions").fetchone()
    assert row is not None
    return int(row[0])


def set_time_zone(conn: psycopg.Connection[Any], time_zone: str) -> None:
    conn.execute("SELECT set_config('TimeZone', %s, false)", (time_zone,))


def test_limits_match_live_columns(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT column_name, character_maximum_length"
            " FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'user_sessions'"
            " AND character_maximum_length IS NOT NULL"
        ).fetchall()
    limits = dict(rows)

    assert limits["user_id"] == USER_ID_MAX_LENGTH
    assert limits["access_token_hash"] == TOKEN_HASH_MAX_LENGTH
    assert limits["refresh_token_hash"] == TOKEN_HASH_MAX_LENGTH
    assert limits["subscription_level"] == SUBSCRIPTION_LEVEL_MAX_LENGTH
    assert set(limits) == {
        "user_id",
        "access_token_hash",
        "refresh_token_hash",
        "subscription_level",
    }


def test_insert_session_stores_values(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        session_id = insert_session(conn, **valid_session())
        row = conn.execute(
            "SELECT id, user_id, access_token_hash, refresh_token_hash, expires_at,"
            " scope, subscription_level FROM user_sessions"
        ).fetchone()

    assert row == (
        session_id,
        "user-1",
        ACCESS_HASH,
        REFRESH_HASH,
        IN_AN_HOUR,
        ["content:read", "content:search"],
        "plus",
    )


def test_insert_session_defaults(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        insert_session(
            conn,
            user_id="user-1",
            access_token_hash=ACCESS_HASH,
            refresh_token_hash=REFRESH_HASH,
            expires_at=IN_AN_HOUR,
        )
        row = conn.execute(
            "SELECT scope, subscription_level FROM user_sessions"
        ).fetchone()

    assert row == ([], "free")


def test_insert_session_uses_callers_transaction(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        insert_session(conn, **valid_session())
        conn.rollback()

        assert count_sessions(conn) == 0


def test_multibyte_text_at_limit_accepted(db: ScratchDatabase) -> None:
    # varchar(n) counts characters: 255 four-byte characters fit user_id.
    with db.connect() as conn:
        insert_session(
            conn,
            **valid_session(
                user_id="\N{GRINNING FACE}" * USER_ID_MAX_LENGTH,
                access_token_hash="\N{LATIN SMALL LETTER E WITH ACUTE}"
                * TOKEN_HASH_MAX_LENGTH,
                subscription_level="\N{CJK UNIFIED IDEOGRAPH-4E2D}"
                * SUBSCRIPTION_LEVEL_MAX_LENGTH,
            ),
        )
        row = conn.execute(
            "SELECT char_length(user_id), octet_length(user_id),"
            " char_length(access_token_hash), char_length(subscription_level)"
            " FROM user_sessions"
        ).fetchone()

    assert row == (
        USER_ID_MAX_LENGTH,
        4 * USER_ID_MAX_LENGTH,
        TOKEN_HASH_MAX_LENGTH,
        SUBSCRIPTION_LEVEL_MAX_LENGTH,
    )


TOO_LONG = "x" * (TOKEN_HASH_MAX_LENGTH + 1)

# (field changed, value, words the message must contain)
BAD_INPUTS: list[tuple[str, Any, list[str]]] = [
    ("user_id", "", ["user_id", "empty"]),
    ("user_id", "u" * 256, ["user_id", "256 characters", "maximum of 255"]),
    ("user_id", "\N{GRINNING FACE}" * 256, ["user_id", "256 characters", "255"]),
    ("user_id", 42, ["user_id", "int", "not a str"]),
    ("user_id", b"user-1", ["user_id", "bytes"]),
    ("user_id", "user\x001", ["user_id", "NUL", "index 4"]),
    ("user_id", "user-\ud800", ["user_id", "surrogate", "index 5"]),
    ("access_token_hash", "", ["access_token_hash", "empty"]),
    ("access_token_hash", TOO_LONG, ["access_token_hash", "256", "maximum of 255"]),
    ("access_token_hash", "ab\x00cd", ["access_token_hash", "NUL", "index 2"]),
    ("access_token_hash", None, ["access_token_hash", "NoneType"]),
    ("refresh_token_hash", "", ["refresh_token_hash", "empty"]),
    ("refresh_token_hash", TOO_LONG, ["refresh_token_hash", "256", "maximum of 255"]),
    ("refresh_token_hash", "\x00", ["refresh_token_hash", "NUL", "index 0"]),
    ("subscription_level", "", ["subscription_level", "empty"]),
    ("subscription_level", "p" * 51, ["subscription_level", "51", "maximum of 50"]),
    ("subscription_level", "pro\x00", ["subscription_level", "NUL"]),
    ("scope", "content:read", ["scope", "single str", "list"]),
    ("scope", 7, ["scope", "int"]),
    ("scope", ["content:read", 3], ["scope[1]", "int"]),
    ("scope", [None], ["scope[0]", "NoneType"]),
    ("scope", [""], ["scope[0]", "empty"]),
    ("scope", ["content:\x00read"], ["scope[0]", "NUL"]),
    ("scope", ["content:read content:search"], ["scope[0]", "RFC 6749"]),
    ("scope", ['say"hi'], ["scope[0]", "RFC 6749"]),
    ("scope", ["caf\N{LATIN SMALL LETTER E WITH ACUTE}"], ["scope[0]", "RFC 6749"]),
    ("expires_at", datetime(2030, 1, 1, 12, 0), ["expires_at", "naive"]),
    ("expires_at", date(2030, 1, 1), ["expires_at", "date", "not a datetime"]),
    ("expires_at", "2030-01-01T00:00:00Z", ["expires_at", "str"]),
    ("expires_at", 1_900_000_000, ["expires_at", "int"]),
    (
        "expires_at",
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        ["expires_at", "outside the years 1 to 9999"],
    ),
]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    BAD_INPUTS,
    ids=[f"{field}-{index}" for index, (field, _, _) in enumerate(BAD_INPUTS)],
)
def test_bad_input_writes_nothing(
    db: ScratchDatabase, field: str, value: Any, words: list[str]
) -> None:
    # In autocommit mode any row sent would stay, so a count of 0 shows that
    # nothing was sent.
    with db.connect(autocommit=True) as conn:
        with pytest.raises(InvalidValueError) as raised:
            insert_session(conn, **valid_session(**{field: value}))
        message = str(raised.value)

        for word in words:
            assert word in message
        assert count_sessions(conn) == 0


@pytest.mark.parametrize("field", ["access_token_hash", "refresh_token_hash"])
def test_hash_errors_hide_value(db: ScratchDatabase, field: str) -> None:
    secret = "s3cr3t" * 50
    with db.connect() as conn, pytest.raises(InvalidValueError) as raised:
        insert_session(conn, **valid_session(**{field: secret}))

    assert "s3cr3t" not in str(raised.value)


def test_duplicate_hash_error_hides_value(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        insert_session(conn, **valid_session())
        with pytest.raises(DatabaseError) as raised:
            insert_session(
                conn, **valid_session(user_id="user-2", refresh_token_hash="other")
            )
        conn.rollback()

    error = raised.value
    assert error.sqlstate == "23505"
    assert error.constraint_name == "idx_user_sessions_access_token_hash"
    assert ACCESS_HASH not in str(error)
    assert "hash a new token" in str(error)
    assert error.__cause__ is None
    assert error.__suppress_context__ is True


def timestamps_to_write() -> dict[str, datetime]:
    """Return aware datetimes with microseconds in various offsets and zones."""
    berlin = ZoneInfo("Europe/Berlin")
    # 02:30 on 2025-10-26 occurs twice in Berlin, an hour apart.
    ambiguous = datetime(2025, 10, 26, 2, 30, 15, 123456, tzinfo=berlin)
    return {
        "utc": datetime(2030, 6, 1, 12, 0, 0, 1, tzinfo=UTC),
        "plus-0530": datetime(
            2030, 1, 1, 0, 0, 0, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30))
        ),
        "minus-0800": datetime(
            2029, 12, 31, 23, 59, 59, 500000, tzinfo=timezone(timedelta(hours=-8))
        ),
        "plus-1400": datetime(
            2030, 3, 1, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=14))
        ),
        "berlin-first": ambiguous,
        "berlin-second": ambiguous.replace(fold=1),
        # 02:30 on 2025-03-09 does not exist in New York: clocks jump 02:00 to 03:00.
        "new-york-gap": datetime(
            2025, 3, 9, 2, 30, tzinfo=ZoneInfo("America/New_York")
        ),
    }


@pytest.mark.parametrize(
    ("write_zone", "read_zone"),
    [
        ("UTC", "America/New_York"),
        ("America/New_York", "Europe/Berlin"),
        ("Europe/Berlin", "Pacific/Kiritimati"),
        ("Asia/Kolkata", "UTC"),
    ],
)
def test_timestamps_round_trip(
    db: ScratchDatabase, write_zone: str, read_zone: str
) -> None:
    written = timestamps_to_write()
    with db.connect() as conn:
        set_time_zone(conn, write_zone)
        for name, instant in written.items():
            insert_session(
                conn,
                **valid_session(
                    user_id=name,
                    access_token_hash=f"{name}-access",
                    refresh_token_hash=f"{name}-refresh",
                    expires_at=instant,
                ),
            )
        conn.commit()

    with db.connect() as conn:
        set_time_zone(conn, read_zone)
        rows = conn.execute(
            "SELECT user_id, expires_at,"
            " to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
            " FROM user_sessions"
        ).fetchall()
    read = {user_id: (expires_at, utc_text) for user_id, expires_at, utc_text in rows}

    for name, instant in written.items():
        expires_at, utc_text = read[name]
        # Compared in UTC: Python's == is False across zones for a wall time
        # that occurs twice or never (PEP 495), even for the same instant.
        assert expires_at.astimezone(UTC) == instant.astimezone(UTC), name
        assert utc_text == instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"), (
            name
        )
    # Subtraction within one zone ignores the offsets, so it too goes by UTC.
    first = read["berlin-first"][0].astimezone(UTC)
    second = read["berlin-second"][0].astimezone(UTC)
    assert second - first == timedelta(hours=1)


def test_updated_at_moves_on_update(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        insert_session(conn, **valid_session())
        conn.commit()
        before = conn.execute(
            "SELECT created_at, updated_at FROM user_sessions"
        ).fetchone()
        conn.commit()
        # now() is the start of the transaction, so the UPDATE's own now() is
        # what updated_at must become.
        after = conn.execute(
            "UPDATE user_sessions SET scope = '{content:meta}'"
            " RETURNING created_at, updated_at, now()"
        ).fetchone()
        conn.commit()

    assert before is not None
    assert after is not None
    assert before[0] == before[1]
    assert after[0] == before[0]
    assert after[1] == after[2]
    assert after[1] > before[1]
