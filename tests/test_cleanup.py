"""Deleting expired sessions: the SQL functions, the procedure and the Python loop.

Every expiry here is set relative to the database's now(), because the
cleanup compares with the database clock, never with the application's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from mcp_authdb.db import resolve_target
from mcp_authdb.db.connection import connect_async
from mcp_authdb.errors import DatabaseError, InvalidValueError
from mcp_authdb.store.cleanup import (
    MAX_BATCH_SIZE,
    CleanupProgress,
    delete_expired_sessions,
    delete_expired_sessions_async,
)
from mcp_authdb.store.sessions import insert_session

from conftest import ScratchDatabase

# Time zones with daylight saving time, with large or half-hour offsets, and UTC.
SESSION_TIME_ZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Pacific/Kiritimati",
]

_SEED = """
INSERT INTO user_sessions (user_id, access_token_hash, refresh_token_hash, expires_at)
SELECT %(prefix)s || i, %(prefix)s || '-access-' || i, %(prefix)s || '-refresh-' || i,
       now() + %(offset)s::interval - i * interval '1 microsecond'
FROM generate_series(1, %(count)s) AS i
"""


def seed(conn: psycopg.Connection[Any], count: int, offset: str, prefix: str) -> None:
    """Insert ``count`` sessions expiring about ``offset`` from the database's now()."""
    conn.execute(_SEED, {"prefix": prefix, "offset": offset, "count": count})


def count_sessions(conn: psycopg.Connection[Any], prefix: str = "") -> int:
    row = conn.execute(
        "SELECT count(*) FROM user_sessions WHERE user_id LIKE %s", (prefix + "%",)
    ).fetchone()
    assert row is not None
    return int(row[0])


def remaining_user_ids(conn: psycopg.Connection[Any]) -> set[str]:
    return {row[0] for row in conn.execute("SELECT user_id FROM user_sessions")}


def database_now(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def ambiguous_hours(year: int) -> list[tuple[str, datetime]]:
    """Return both readings of a wall time that occurs twice when DST ends."""
    berlin = ZoneInfo("Europe/Berlin")
    new_york = ZoneInfo("America/New_York")
    # Europe/Berlin leaves summer time on the last Sunday of October at 03:00,
    # America/New_York on the first Sunday of November at 02:00.
    last_sunday_october = max(
        day for day in range(25, 32) if datetime(year, 10, day).weekday() == 6
    )
    first_sunday_november = min(
        day for day in range(1, 8) if datetime(year, 11, day).weekday() == 6
    )
    berlin_time = datetime(year, 10, last_sunday_october, 2, 30, tzinfo=berlin)
    new_york_time = datetime(year, 11, first_sunday_november, 1, 30, tzinfo=new_york)
    return [
        (f"berlin-{year}-first", berlin_time),
        (f"berlin-{year}-second", berlin_time.replace(fold=1)),
        (f"new-york-{year}-first", new_york_time),
        (f"new-york-{year}-second", new_york_time.replace(fold=1)),
    ]


def insert_at(
    conn: psycopg.Connection[Any], user_id: str, expires_at: datetime
) -> None:
    insert_session(
        conn,
        user_id=user_id,
        access_token_hash=f"{user_id}-access",
        refresh_token_hash=f"{user_id}-refresh",
        expires_at=expires_at,
    )


def insert_at_literal(
    conn: psycopg.Connection[Any], user_id: str, literal: str
) -> None:
    """Insert a session whose expiry PostgreSQL parses from a text literal."""
    conn.execute(
        "INSERT INTO user_sessions"
        " (user_id, access_token_hash, refresh_token_hash, expires_at)"
        " VALUES (%s, %s, %s, %s::text::timestamptz)",
        (user_id, f"{user_id}-access", f"{user_id}-refresh", literal),
    )


@pytest.mark.parametrize("time_zone", SESSION_TIME_ZONES)
def test_cleanup_compares_instants(db: ScratchDatabase, time_zone: str) -> None:
    offsets = {
        "plus-0530": timezone(timedelta(hours=5, minutes=30)),
        "minus-0800": timezone(timedelta(hours=-8)),
        "plus-1400": timezone(timedelta(hours=14)),
        "utc": UTC,
    }
    expired: set[str] = set()
    live: set[str] = set()

    with db.connect() as conn:
        now = database_now(conn)
        for name, offset in offsets.items():
            # Written with +14:00, an instant 30 minutes ago shows a wall time
            # 13.5 hours after the UTC time now. Written with -08:00, one an
            # hour ahead shows a wall time 7 hours before it. So comparing
            # wall times instead of instants would keep or delete wrong rows.
            for sign, delta in (
                ("past", -timedelta(minutes=30)),
                ("future", timedelta(hours=1)),
            ):
                instant = (now + delta).astimezone(offset)
                insert_at(conn, f"{sign}-{name}", instant)
                insert_at_literal(conn, f"{sign}-{name}-literal", instant.isoformat())
                group = expired if sign == "past" else live
                group.update({f"{sign}-{name}", f"{sign}-{name}-literal"})
        for name, instant in ambiguous_hours(now.year - 1):
            insert_at(conn, f"past-dst-{name}", instant)
            expired.add(f"past-dst-{name}")
        for name, instant in ambiguous_hours(now.year + 1):
            insert_at(conn, f"future-dst-{name}", instant)
            live.add(f"future-dst-{name}")

    with db.connect(autocommit=True) as conn:
        conn.execute("SELECT set_config('TimeZone', %s, false)", (time_zone,))
        result = delete_expired_sessions(conn, batch_size=3)
        remaining = remaining_user_ids(conn)

    assert remaining == live
    assert result.deleted == len(expired)


def test_ambiguous_hour_readings_are_distinct() -> None:
    # The DST rows above only test something if fold picks another instant.
    for first, second in zip(
        ambiguous_hours(2025)[::2], ambiguous_hours(2025)[1::2], strict=True
    ):
        assert second[1].astimezone(UTC) - first[1].astimezone(UTC) == timedelta(
            hours=1
        )


@pytest.mark.parametrize(
    "cleanup_sql",
    [
        "SELECT cleanup_expired_sessions()",
        "SELECT cleanup_expired_sessions_batch(10)",
    ],
)
def test_boundary_keeps_now(db: ScratchDatabase, cleanup_sql: str) -> None:
    # now() stays the same within a transaction, so the rows and the cleanup
    # see the same instant.
    with db.connect() as conn, conn.transaction():
        conn.execute(
            "INSERT INTO user_sessions"
            " (user_id, access_token_hash, refresh_token_hash, expires_at)"
            " VALUES"
            " ('at-now', 'a1', 'r1', now()),"
            " ('before-now', 'a2', 'r2', now() - interval '1 microsecond'),"
            " ('after-now', 'a3', 'r3', now() + interval '1 microsecond')"
        )
        row = conn.execute(cleanup_sql).fetchone()
        remaining = remaining_user_ids(conn)

    assert row == (1,)
    assert remaining == {"at-now", "after-now"}


@pytest.mark.parametrize(
    "cleanup_sql",
    [
        "SELECT cleanup_expired_sessions()",
        "CALL cleanup_expired_sessions_in_batches(500)",
    ],
)
def test_sql_cleanup_returns_count(db: ScratchDatabase, cleanup_sql: str) -> None:
    # Autocommit, because the procedure commits after each batch, which it
    # cannot do inside a transaction block.
    with db.connect(autocommit=True) as conn:
        seed(conn, 1234, "-1 hour", "expired")
        seed(conn, 100, "1 hour", "live")
        row = conn.execute(cleanup_sql).fetchone()

        assert row == (1234,)
        assert count_sessions(conn, "expired") == 0
        assert count_sessions(conn, "live") == 100


def test_delete_expired_sessions_returns_count(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        seed(conn, 1234, "-1 hour", "expired")
        seed(conn, 100, "1 hour", "live")
        conn.commit()
        result = delete_expired_sessions(conn, batch_size=500)

        assert result.deleted == 1234
        assert result.batches == 3
        assert result.elapsed_s > 0
        assert result.rows_per_second == pytest.approx(1234 / result.elapsed_s)
        assert count_sessions(conn, "expired") == 0
        assert count_sessions(conn, "live") == 100


def test_delete_expired_sessions_restores_autocommit(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        delete_expired_sessions(conn)

        assert conn.autocommit is False


@pytest.mark.parametrize(
    ("expired", "batch_size", "progress"),
    [
        (2500, 1000, [1000, 2000, 2500]),
        (2000, 1000, [1000, 2000, 2000]),
        (0, 1000, [0]),
        (3, 1, [1, 2, 3, 3]),
    ],
)
def test_batches_follow_batch_size(
    db: ScratchDatabase, expired: int, batch_size: int, progress: list[int]
) -> None:
    reports: list[CleanupProgress] = []
    with db.connect(autocommit=True) as conn:
        seed(conn, expired, "-1 hour", "expired")
        seed(conn, 10, "1 hour", "live")
        result = delete_expired_sessions(
            conn, batch_size=batch_size, on_batch=reports.append
        )
        live = count_sessions(conn, "live")

    assert [report.deleted for report in reports] == progress
    assert [report.batches for report in reports] == list(range(1, len(progress) + 1))
    assert [report.elapsed_s for report in reports] == sorted(
        report.elapsed_s for report in reports
    )
    assert result.deleted == expired
    assert result.batches == len(progress)
    assert live == 10


def test_future_sessions_never_deleted(db: ScratchDatabase) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "INSERT INTO user_sessions"
            " (user_id, access_token_hash, refresh_token_hash, expires_at)"
            " VALUES"
            " ('in-a-second', 'a1', 'r1', now() + interval '1 second'),"
            " ('in-a-day', 'a2', 'r2', now() + interval '1 day'),"
            " ('never', 'a3', 'r3', 'infinity'),"
            " ('always', 'a4', 'r4', '-infinity')"
        )
        function_row = conn.execute("SELECT cleanup_expired_sessions()").fetchone()
        procedure_row = conn.execute(
            "CALL cleanup_expired_sessions_in_batches(1)"
        ).fetchone()
        result = delete_expired_sessions(conn, batch_size=1)
        remaining = remaining_user_ids(conn)

    assert function_row == (1,)
    assert procedure_row == (0,)
    assert result.deleted == 0
    assert remaining == {"in-a-second", "in-a-day", "never"}


@pytest.mark.parametrize("batch_size", [0, -1, MAX_BATCH_SIZE + 1, True, 1.5, "10"])
def test_invalid_batch_size_rejected(db: ScratchDatabase, batch_size: Any) -> None:
    with db.connect(autocommit=True) as conn:
        seed(conn, 5, "-1 hour", "expired")

        with pytest.raises(InvalidValueError) as raised:
            delete_expired_sessions(conn, batch_size=batch_size)

        assert f"batch_size={batch_size!r}" in str(raised.value)
        assert count_sessions(conn, "expired") == 5


def test_cleanup_rejects_open_transaction(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        seed(conn, 5, "-1 hour", "expired")

        with pytest.raises(InvalidValueError) as raised:
            delete_expired_sessions(conn)

        assert "commit or roll back" in str(raised.value)
        assert count_sessions(conn, "expired") == 5


def test_batch_failure_names_progress(empty_db: ScratchDatabase) -> None:
    # With no migrations applied the function is missing, so the first batch fails.
    with empty_db.connect() as conn:
        with pytest.raises(DatabaseError) as raised:
            delete_expired_sessions(conn, batch_size=10)

        assert raised.value.sqlstate == "42883"
        assert "batch 1 of 10 rows" in str(raised.value)
        assert "0 sessions, stay deleted" in str(raised.value)
        assert conn.autocommit is False


def test_locked_rows_skipped_not_waited(db: ScratchDatabase) -> None:
    with db.connect(autocommit=True) as setup:
        seed(setup, 20, "-1 hour", "expired")
        row = setup.execute(
            "SELECT id FROM user_sessions ORDER BY expires_at LIMIT 1"
        ).fetchone()
        assert row is not None
        locked_id = row[0]

    with db.connect() as holder, db.connect(autocommit=True) as cleaner:
        holder.execute(
            "SELECT id FROM user_sessions WHERE id = %s FOR UPDATE", (locked_id,)
        )
        # Waiting for the lock would end in a statement timeout, not a hang.
        cleaner.execute("SET statement_timeout = '5s'")
        began = time.monotonic()
        first = delete_expired_sessions(cleaner, batch_size=3)
        elapsed = time.monotonic() - began
        left_while_locked = [
            row[0] for row in cleaner.execute("SELECT id FROM user_sessions")
        ]
        holder.rollback()
        second = delete_expired_sessions(cleaner, batch_size=3)
        left_after = count_sessions(cleaner)

    assert first.deleted == 19
    assert elapsed < 4
    assert left_while_locked == [locked_id]
    assert second.deleted == 1
    assert left_after == 0


def test_async_cleanup_matches_sync(db: ScratchDatabase) -> None:
    reports: list[CleanupProgress] = []

    async def run() -> tuple[int, int, bool]:
        target = resolve_target(db.url, db.settings)
        async with await connect_async(target) as conn:
            result = await delete_expired_sessions_async(
                conn, batch_size=100, on_batch=reports.append
            )
            return result.deleted, result.batches, conn.autocommit

    with db.connect(autocommit=True) as conn:
        seed(conn, 250, "-1 hour", "expired")
        seed(conn, 10, "1 hour", "live")
        deleted, batches, autocommit = asyncio.run(run())
        live = count_sessions(conn, "live")

    assert deleted == 250
    assert batches == 3
    assert [report.deleted for report in reports] == [100, 200, 250]
    assert autocommit is False
    assert live == 10


def run_in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start ``work`` in a thread; the list receives its result or its exception."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_writes_wait_at_most_one_batch(db: ScratchDatabase) -> None:
    expired_count = 100_000
    with db.connect(autocommit=True) as conn:
        seed(conn, expired_count, "-1 hour", "expired")
        bounds = conn.execute("SELECT min(id), max(id) FROM user_sessions").fetchone()
        assert bounds is not None
    first_id, last_id = bounds

    batch_ends: list[float] = []
    started = threading.Event()

    def on_batch(progress: CleanupProgress) -> None:
        batch_ends.append(progress.elapsed_s)
        started.set()
        # Pauses between batches stretch the cleanup to a few seconds, well
        # past the latency bound, so that a cleanup holding its locks across
        # batches would fail this test. They hold no lock.
        time.sleep(0.004)

    def cleanup() -> Any:
        with db.connect(autocommit=True) as conn:
            return delete_expired_sessions(conn, batch_size=200, on_batch=on_batch)

    thread, outcome = run_in_thread(cleanup)
    assert started.wait(timeout=30)

    insert_latencies: list[float] = []
    refresh_latencies: list[float] = []
    refreshed: list[int] = []
    deadline = time.monotonic() + 60
    with db.connect(autocommit=True) as conn:
        index = 0
        while thread.is_alive() and time.monotonic() < deadline:
            began = time.monotonic()
            insert_at(conn, f"live-{index}", datetime.now(UTC) + timedelta(hours=1))
            insert_latencies.append(time.monotonic() - began)

            # A refresh of an expired session waits for the batch that has
            # locked it, if any, and then finds it deleted or keeps it.
            target_id = first_id + (index * 7919) % (last_id - first_id + 1)
            began = time.monotonic()
            row = conn.execute(
                "UPDATE user_sessions SET expires_at = now() + interval '1 hour'"
                " WHERE id = %s RETURNING id",
                (target_id,),
            ).fetchone()
            refresh_latencies.append(time.monotonic() - began)
            if row is not None:
                refreshed.append(row[0])
            index += 1

        thread.join(timeout=30)
        remaining = {row[0] for row in conn.execute("SELECT id FROM user_sessions")}
        live_count = count_sessions(conn, "live")

    batch_durations = [
        b - a for a, b in zip([0.0, *batch_ends], batch_ends, strict=False)
    ]
    # One batch plus a second of scheduling noise, so a busy machine passes.
    bound = max(batch_durations) + 1.0
    cleanup_result = outcome[0] if outcome else None

    assert not thread.is_alive()
    assert not isinstance(cleanup_result, BaseException), cleanup_result
    assert cleanup_result is not None
    assert cleanup_result.deleted + len(refreshed) == expired_count
    assert batch_ends[-1] > bound
    assert len(insert_latencies) >= 10
    assert max(insert_latencies) < bound
    assert max(refresh_latencies) < bound
    assert live_count == len(insert_latencies)
    assert set(refreshed) <= remaining
