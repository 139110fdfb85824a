"""The cleanup scheduler on a real PostgreSQL: rounds, the lock, timing, stop."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from mcp_authdb.db import resolve_target
from mcp_authdb.db.pool import AsyncDatabase, Database
from mcp_authdb.errors import ConfigurationError, InvalidValueError
from mcp_authdb.store.scheduler import (
    CLEANUP_LOCK_KEY,
    AsyncCleanupScheduler,
    CleanupRunResult,
    CleanupSchedule,
    CleanupScheduler,
    Outcome,
    SchedulerStats,
    _SchedulerCore,
)

from conftest import ScratchDatabase

# Every session row the tests seed, by user_id: whether cleanup must delete it.
SEEDED_SESSIONS = {
    "ended-access-only": True,
    "ended-both": True,
    "revoked": True,
    "refresh-still-valid": False,
    "live": False,
}
# A statement timeout long enough for a round that the test keeps blocked.
LONG_TIMEOUT_MS = 60_000


def seed_sessions(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO user_sessions (user_id, access_token_hash,"
            " refresh_token_hash, expires_at, refresh_expires_at, revoked_at)"
            " VALUES"
            " ('ended-access-only', 'a1', 'r1', now() - interval '1 hour', NULL,"
            "  NULL),"
            " ('ended-both', 'a2', 'r2', now() - interval '2 hours',"
            "  now() - interval '1 hour', NULL),"
            " ('revoked', 'a3', 'r3', now() - interval '1 minute',"
            "  now() - interval '1 minute', now() - interval '1 minute'),"
            " ('refresh-still-valid', 'a4', 'r4', now() - interval '1 hour',"
            "  now() + interval '1 day', NULL),"
            " ('live', 'a5', 'r5', now() + interval '1 hour', NULL, NULL)"
        )
        conn.commit()


def seed_request_logs(db: ScratchDatabase, *, old: int, recent: int) -> None:
    """Insert ``old`` rows 40 days old and ``recent`` rows from 1 to 29 days old."""
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO request_logs (method, created_at)"
            " SELECT 'tools/call', now() - interval '40 days'"
            " FROM generate_series(1, %s)",
            (old,),
        )
        conn.execute(
            "INSERT INTO request_logs (method, created_at)"
            " SELECT 'tools/list', now() - make_interval(days => 1 + n %% 29)"
            " FROM generate_series(1, %s) AS n",
            (recent,),
        )
        conn.commit()


def remaining_users(db: ScratchDatabase) -> set[str]:
    with db.connect() as conn:
        rows = conn.execute("SELECT user_id FROM user_sessions").fetchall()
    return {row[0] for row in rows}


def count_request_logs(db: ScratchDatabase, *, older_than_days: int = 0) -> int:
    with db.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM request_logs"
            " WHERE created_at < now() - make_interval(days => %s)",
            (older_than_days,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def lock_is_free(db: ScratchDatabase) -> bool:
    with db.connect(autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s)", (CLEANUP_LOCK_KEY,)
        ).fetchone()
        assert row is not None
        if row[0]:
            conn.execute("SELECT pg_advisory_unlock(%s)", (CLEANUP_LOCK_KEY,))
        return bool(row[0])


def schedule(**fields: Any) -> CleanupSchedule:
    """Return a schedule for tests: rounds at once, then one an hour."""
    values: dict[str, Any] = {"interval_s": 3600, "jitter": 0.0, "batch_size": 10}
    values.update(fields)
    return CleanupSchedule(**values)


@pytest.fixture
def database(db: ScratchDatabase) -> Iterator[Database]:
    settings = db.settings.replace(command_timeout_ms=LONG_TIMEOUT_MS)
    with Database(resolve_target(db.url, settings), settings) as database:
        yield database


@pytest.fixture
def pooler_database(db: ScratchDatabase) -> Iterator[Database]:
    """A database used as if DATABASE_URL named a pooler in transaction mode."""
    settings = db.settings.replace(transaction_pooler=True)
    with Database(resolve_target(db.url, settings), settings) as database:
        yield database


def async_database(db: ScratchDatabase) -> AsyncDatabase:
    settings = db.settings.replace(command_timeout_ms=LONG_TIMEOUT_MS)
    return AsyncDatabase(resolve_target(db.url, settings), settings)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


async def wait_until_async(
    condition: Callable[[], bool], timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def round_waits_on_logs(db: ScratchDatabase) -> bool:
    """Tell whether a cleanup statement waits for the request_logs table lock."""
    with db.connect(autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks"
            " WHERE relation = 'request_logs'::regclass AND NOT granted"
        ).fetchone()
    assert row is not None
    return int(row[0]) > 0


# Settings from the environment.


def test_schedule_from_env_defaults() -> None:
    parsed = CleanupSchedule.from_env({})

    assert parsed.interval_s == 86_400
    assert parsed.log_retention == timedelta(days=30)
    assert parsed.batch_size == 5000
    assert parsed.periodic


def test_schedule_from_env_values() -> None:
    parsed = CleanupSchedule.from_env(
        {
            "SESSION_CLEANUP_INTERVAL": "600",
            "MCP_AUTHDB_REQUEST_LOG_RETENTION_DAYS": "7",
            "MCP_AUTHDB_BATCH_SIZE": "100",
        }
    )

    assert parsed.interval_s == 600
    assert parsed.log_retention == timedelta(days=7)
    assert parsed.batch_size == 100


def test_schedule_zero_means_off_and_forever() -> None:
    parsed = CleanupSchedule.from_env(
        {
            "SESSION_CLEANUP_INTERVAL": "0",
            "MCP_AUTHDB_REQUEST_LOG_RETENTION_DAYS": "0",
        }
    )

    assert not parsed.periodic
    assert parsed.log_retention is None


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SESSION_CLEANUP_INTERVAL", "soon", "SESSION_CLEANUP_INTERVAL='soon'"),
        ("SESSION_CLEANUP_INTERVAL", "-1", "out of range"),
        ("SESSION_CLEANUP_INTERVAL", "1.5", "not a whole number"),
        ("SESSION_CLEANUP_INTERVAL", "999999999", "out of range"),
        ("MCP_AUTHDB_REQUEST_LOG_RETENTION_DAYS", "30d", "not a whole number"),
        ("MCP_AUTHDB_REQUEST_LOG_RETENTION_DAYS", "-3", "out of range"),
        ("MCP_AUTHDB_BATCH_SIZE", "0", "MCP_AUTHDB_BATCH_SIZE='0'"),
    ],
)
def test_schedule_env_error_names_variable(
    name: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        CleanupSchedule.from_env({name: value})

    assert name in str(caught.value)
    assert expected in str(caught.value)


def test_token_interval_is_left_to_the_server() -> None:
    # The MCP server's config reads and checks TOKEN_CLEANUP_INTERVAL.
    parsed = CleanupSchedule.from_env(
        {"TOKEN_CLEANUP_INTERVAL": "hourly", "SESSION_CLEANUP_INTERVAL": "7200"}
    )

    assert parsed.interval_s == 7200


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"interval_s": -1}, "interval_s=-1"),
        ({"interval_s": float("nan")}, "interval_s=nan"),
        ({"jitter": 1.5}, "jitter=1.5"),
        ({"retry_s": 0}, "retry_s=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": True}, "batch_size=True"),
        ({"log_retention": timedelta(0)}, "log_retention="),
        ({"log_retention": 30}, "log_retention=30"),
    ],
)
def test_schedule_rejects_bad_fields(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidValueError) as caught:
        CleanupSchedule(**fields)

    assert expected in str(caught.value)


# What a round deletes.


def test_round_deletes_only_ended_sessions(
    db: ScratchDatabase, database: Database
) -> None:
    seed_sessions(db)
    scheduler = CleanupScheduler(database, schedule())

    result = scheduler.run_once()

    assert result.outcome == "completed", result.reason
    assert result.sessions_deleted == 3
    assert remaining_users(db) == {
        user for user, ended in SEEDED_SESSIONS.items() if not ended
    }
    assert result.started_at.tzinfo is UTC
    assert lock_is_free(db)


def test_async_round_deletes_only_ended_sessions(db: ScratchDatabase) -> None:
    seed_sessions(db)

    async def scenario() -> Any:
        async with async_database(db) as database:
            return await AsyncCleanupScheduler(database, schedule()).run_once()

    result = asyncio.run(scenario())

    assert result.outcome == "completed", result.reason
    assert result.sessions_deleted == 3
    assert remaining_users(db) == {"refresh-still-valid", "live"}
    assert lock_is_free(db)


def test_retention_deletes_old_logs_in_batches(
    db: ScratchDatabase, database: Database
) -> None:
    seed_request_logs(db, old=25, recent=7)
    scheduler = CleanupScheduler(database, schedule(batch_size=10))

    result = scheduler.run_once()

    assert result.outcome == "completed", result.reason
    assert result.request_logs_deleted == 25
    # One session batch that found nothing, then 10 + 10 + 5 log rows.
    assert result.batches == 4
    assert count_request_logs(db) == 7
    assert count_request_logs(db, older_than_days=30) == 0


def test_retention_forever_keeps_logs(db: ScratchDatabase, database: Database) -> None:
    seed_request_logs(db, old=5, recent=2)
    scheduler = CleanupScheduler(database, schedule(log_retention=None))

    result = scheduler.run_once()

    assert result.outcome == "completed", result.reason
    assert result.request_logs_deleted == 0
    assert count_request_logs(db) == 7


def test_async_retention_counts_batches(db: ScratchDatabase) -> None:
    seed_request_logs(db, old=12, recent=3)

    async def scenario() -> Any:
        async with async_database(db) as database:
            scheduler = AsyncCleanupScheduler(
                database, schedule(batch_size=5, log_retention=timedelta(days=10))
            )
            return await scheduler.run_once()

    result = asyncio.run(scenario())

    assert result.outcome == "completed", result.reason
    assert result.request_logs_deleted == 12
    assert result.batches == 1 + 3
    assert count_request_logs(db) == 3


# The advisory lock.


def test_round_skips_while_lock_held(db: ScratchDatabase, database: Database) -> None:
    seed_sessions(db)
    scheduler = CleanupScheduler(database, schedule())

    with db.connect(autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (CLEANUP_LOCK_KEY,))
        skipped = scheduler.run_once()
        holder.execute("SELECT pg_advisory_unlock(%s)", (CLEANUP_LOCK_KEY,))
    completed = scheduler.run_once()

    assert skipped.outcome == "skipped"
    assert skipped.reason is not None
    assert "another process holds the cleanup lock" in skipped.reason
    assert skipped.sessions_deleted == 0
    assert completed.outcome == "completed"
    assert completed.sessions_deleted == 3
    stats = scheduler.stats
    assert (stats.runs, stats.skips, stats.failures) == (1, 1, 0)
    assert stats.last_result == completed


def test_two_schedulers_one_cleans(db: ScratchDatabase) -> None:
    """An async and a thread scheduler start together; one cleans, one skips."""
    seed_sessions(db)
    seed_request_logs(db, old=3, recent=1)
    settings = db.settings.replace(command_timeout_ms=LONG_TIMEOUT_MS)

    async def scenario() -> tuple[SchedulerStats, SchedulerStats]:
        blocker = await psycopg.AsyncConnection.connect(db.url)
        # The round that wins the lock deletes the sessions, then waits here
        # for the request_logs table, still holding the cleanup lock.
        await blocker.execute("LOCK TABLE request_logs IN ACCESS EXCLUSIVE MODE")
        async with AsyncDatabase(resolve_target(db.url, settings), settings) as adb:
            with Database(resolve_target(db.url, settings), settings) as sdb:
                first = AsyncCleanupScheduler(adb, schedule())
                second = CleanupScheduler(sdb, schedule())
                first.start()
                second.start()
                await wait_until_async(
                    lambda: first.stats.skips + second.stats.skips == 1
                )
                await blocker.rollback()
                await wait_until_async(
                    lambda: first.stats.runs + second.stats.runs == 1
                )
                await first.stop()
                assert second.stop()
        await blocker.close()
        return first.stats, second.stats

    first, second = asyncio.run(scenario())

    assert sorted([first.runs, second.runs]) == [0, 1]
    assert sorted([first.skips, second.skips]) == [0, 1]
    assert first.failures == second.failures == 0
    winner = first if first.runs else second
    assert winner.sessions_deleted == 3
    assert winner.request_logs_deleted == 3
    loser = second if first.runs else first
    assert loser.last_result is not None
    assert loser.last_result.outcome == "skipped"
    assert loser.sessions_deleted == 0
    assert remaining_users(db) == {"refresh-still-valid", "live"}
    assert lock_is_free(db)


def test_round_busy_in_same_scheduler(db: ScratchDatabase, database: Database) -> None:
    seed_request_logs(db, old=1, recent=0)
    scheduler = CleanupScheduler(database, schedule())
    results = []

    with db.connect() as blocker:
        blocker.execute("LOCK TABLE request_logs IN ACCESS EXCLUSIVE MODE")
        worker = threading.Thread(target=lambda: results.append(scheduler.run_once()))
        worker.start()
        wait_until(lambda: round_waits_on_logs(db))
        busy = scheduler.run_once()
        blocker.rollback()
    worker.join(10)

    assert busy.outcome == "skipped"
    assert busy.reason == "a round of this scheduler is already running"
    assert [r.outcome for r in results] == ["completed"]
    assert scheduler.stats.skips == 1


# Behind a transaction pooler: a transaction-level lock per batch.


def test_pooler_round_deletes_in_batches(
    db: ScratchDatabase, pooler_database: Database
) -> None:
    seed_sessions(db)
    seed_request_logs(db, old=12, recent=2)
    scheduler = CleanupScheduler(pooler_database, schedule(batch_size=5))

    result = scheduler.run_once()

    assert result.outcome == "completed", result.reason
    assert result.sessions_deleted == 3
    assert result.request_logs_deleted == 12
    assert result.batches == 1 + 3
    assert remaining_users(db) == {"refresh-still-valid", "live"}
    assert lock_is_free(db)


def test_pooler_round_skips_while_lock_held(
    db: ScratchDatabase, pooler_database: Database
) -> None:
    seed_sessions(db)
    scheduler = CleanupScheduler(pooler_database, schedule())

    with db.connect() as holder:
        # Held by a transaction, as another pooled replica would hold it.
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (CLEANUP_LOCK_KEY,))
        skipped = scheduler.run_once()
        holder.rollback()
    completed = scheduler.run_once()

    assert skipped.outcome == "skipped"
    assert skipped.sessions_deleted == 0
    assert completed.outcome == "completed"
    assert completed.sessions_deleted == 3


def advisory_lock_waiters(db: ScratchDatabase) -> int:
    with db.connect(autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_async_pooler_round_stops_when_lock_taken(db: ScratchDatabase) -> None:
    """A round that finds the lock taken between its batches stops there."""
    seed_request_logs(db, old=10, recent=0)
    settings = db.settings.replace(transaction_pooler=True)

    async def scenario() -> Any:
        blocker = await psycopg.AsyncConnection.connect(db.url)
        holder = await psycopg.AsyncConnection.connect(db.url, autocommit=True)
        async with AsyncDatabase(resolve_target(db.url, settings), settings) as adb:
            scheduler = AsyncCleanupScheduler(adb, schedule(batch_size=5))
            # The first request log batch takes the lock, then waits for the
            # table. The holder queues for the lock and gets it when that
            # batch commits, before the round's next batch requests it.
            await blocker.execute("LOCK TABLE request_logs IN ACCESS EXCLUSIVE MODE")
            round_task = asyncio.create_task(scheduler.run_once())
            await asyncio.to_thread(wait_until, lambda: round_waits_on_logs(db))
            lock_task = asyncio.create_task(
                holder.execute("SELECT pg_advisory_lock(%s)", (CLEANUP_LOCK_KEY,))
            )
            await asyncio.to_thread(wait_until, lambda: advisory_lock_waiters(db) == 1)
            await blocker.rollback()
            result = await round_task
            await lock_task
            await holder.execute("SELECT pg_advisory_unlock(%s)", (CLEANUP_LOCK_KEY,))
        await blocker.close()
        await holder.close()
        return result

    result = asyncio.run(scenario())

    assert result.outcome == "skipped"
    assert result.reason == (
        "another process took the cleanup lock after 2 batches of this round "
        "and goes on cleaning"
    )
    assert result.request_logs_deleted == 5
    assert count_request_logs(db) == 5
    assert lock_is_free(db)


# Timing, failures and stop.


def test_first_round_waits_for_jitter(db: ScratchDatabase, database: Database) -> None:
    scheduler = CleanupScheduler(
        database, schedule(interval_s=1000, jitter=0.5), rng=random.Random(7)
    )
    expected_delay = random.Random(7).uniform(0, 500)

    before = datetime.now(UTC)
    scheduler.start()
    try:
        wait_until(lambda: scheduler.stats.next_run_at is not None)
        next_run_at = scheduler.stats.next_run_at
    finally:
        assert scheduler.stop()

    assert next_run_at is not None
    delay = (next_run_at - before).total_seconds()
    assert expected_delay - 1 < delay < expected_delay + 1
    assert scheduler.stats.runs == 0


def test_failed_round_retries_with_backoff(
    db: ScratchDatabase, database: Database
) -> None:
    seed_sessions(db)
    seed_request_logs(db, old=2, recent=0)
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "ALTER FUNCTION cleanup_request_logs_batch(interval, integer)"
            " RENAME TO cleanup_request_logs_batch_hidden"
        )
    scheduler = CleanupScheduler(database, schedule(retry_s=0.2))

    scheduler.start()
    try:
        wait_until(lambda: scheduler.stats.failures >= 2)
        failed = scheduler.stats
        with db.connect(autocommit=True) as conn:
            conn.execute(
                "ALTER FUNCTION cleanup_request_logs_batch_hidden(interval, integer)"
                " RENAME TO cleanup_request_logs_batch"
            )
        wait_until(lambda: scheduler.stats.runs == 1)
    finally:
        assert scheduler.stop()

    assert failed.last_result is not None
    assert failed.last_result.outcome == "failed"
    assert failed.consecutive_failures >= 2
    reason = failed.last_result.reason or ""
    assert "request log cleanup failed in batch 1" in reason
    assert "cleanup_request_logs_batch" in reason
    # The sessions of the first failed round stay deleted.
    assert failed.sessions_deleted == 3
    assert scheduler.stats.consecutive_failures == 0
    assert scheduler.stats.request_logs_deleted == 2
    assert lock_is_free(db)


def test_lost_connection_fails_round(db: ScratchDatabase, database: Database) -> None:
    """PostgreSQL releases the lock of a round whose connection is killed."""
    seed_sessions(db)
    seed_request_logs(db, old=2, recent=0)
    scheduler = CleanupScheduler(database, schedule())
    results = []

    with db.connect() as blocker:
        blocker.execute("LOCK TABLE request_logs IN ACCESS EXCLUSIVE MODE")
        worker = threading.Thread(target=lambda: results.append(scheduler.run_once()))
        worker.start()
        wait_until(lambda: round_waits_on_logs(db))
        blocker.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE relation = 'request_logs'::regclass AND NOT granted"
        )
        worker.join(10)
        blocker.rollback()
    lock_free = lock_is_free(db)
    retried = scheduler.run_once()

    assert [r.outcome for r in results] == ["failed"]
    assert results[0].sessions_deleted == 3
    assert "request log cleanup failed in batch 1" in (results[0].reason or "")
    assert lock_free
    assert retried.outcome == "completed"
    assert retried.request_logs_deleted == 2
    assert scheduler.stats.failures == 1


def test_next_delay_backs_off_then_resets() -> None:
    core = _SchedulerCore(schedule(interval_s=1000, retry_s=300), random.Random(1))
    began = datetime.now(UTC)

    def outcome(name: Outcome, elapsed_s: float = 1.0) -> CleanupRunResult:
        result = CleanupRunResult(outcome=name, started_at=began, elapsed_s=elapsed_s)
        core.record(result)
        return result

    delays = [core.next_delay(outcome("failed")) for _ in range(4)]
    after_success = core.next_delay(outcome("completed", elapsed_s=40.0))
    after_skip = core.next_delay(outcome("skipped", elapsed_s=0.5))
    after_long_round = core.next_delay(outcome("completed", elapsed_s=5000.0))

    assert delays == [300, 600, 1000, 1000]
    assert after_success == 960
    assert after_skip == 999.5
    assert after_long_round == 0


def test_thread_stop_is_prompt_while_waiting(
    db: ScratchDatabase, database: Database
) -> None:
    scheduler = CleanupScheduler(database, schedule())
    scheduler.start()
    wait_until(lambda: scheduler.stats.runs == 1)

    began = time.monotonic()
    stopped = scheduler.stop()
    elapsed = time.monotonic() - began

    assert stopped
    assert elapsed < 1.0
    assert scheduler.stats.next_run_at is None


def test_thread_stop_cancels_blocked_round(
    db: ScratchDatabase, database: Database
) -> None:
    seed_sessions(db)
    seed_request_logs(db, old=3, recent=0)
    scheduler = CleanupScheduler(database, schedule())

    with db.connect() as blocker:
        blocker.execute("LOCK TABLE request_logs IN ACCESS EXCLUSIVE MODE")
        scheduler.start()
        wait_until(lambda: round_waits_on_logs(db))
        began = time.monotonic()
        stopped = scheduler.stop()
        elapsed = time.monotonic() - began
        blocker.rollback()

    assert stopped
    assert elapsed < 3.0
    last = scheduler.stats.last_result
    assert last is not None
    assert last.outcome == "stopped"
    assert last.sessions_deleted == 3
    assert scheduler.stats.failures == 0
    assert remaining_users(db) == {"refresh-still-valid", "live"}
    assert count_request_logs(db) == 3
    assert lock_is_free(db)


def test_async_stop_cancels_blocked_round(db: ScratchDatabase) -> None:
    seed_sessions(db)
    seed_request_logs(db, old=3, recent=0)

    async def scenario() -> tuple[float, SchedulerStats]:
        blocker = await psycopg.AsyncConnection.connect(db.url)
        await blocker.execute("LOCK TABLE request_logs IN ACCESS EXCLUSIVE MODE")
        async with async_database(db) as database:
            scheduler = AsyncCleanupScheduler(database, schedule())
            scheduler.start()
            await asyncio.to_thread(wait_until, lambda: round_waits_on_logs(db))
            began = time.monotonic()
            await scheduler.stop()
            elapsed = time.monotonic() - began
        await blocker.rollback()
        await blocker.close()
        return elapsed, scheduler.stats

    elapsed, stats = asyncio.run(scenario())

    assert elapsed < 3.0
    assert stats.last_result is not None
    assert stats.last_result.outcome == "stopped"
    assert stats.sessions_deleted == 3
    assert stats.failures == 0
    assert count_request_logs(db) == 3
    assert lock_is_free(db)


def test_async_stop_is_prompt_while_waiting(db: ScratchDatabase) -> None:
    async def scenario() -> tuple[float, SchedulerStats]:
        async with async_database(db) as database:
            async with AsyncCleanupScheduler(database, schedule()) as scheduler:
                await wait_until_async(lambda: scheduler.stats.runs == 1)
                began = time.monotonic()
            return time.monotonic() - began, scheduler.stats

    elapsed, stats = asyncio.run(scenario())

    assert elapsed < 1.0
    assert stats.runs == 1
    assert stats.next_run_at is None


def test_interval_zero_starts_nothing(
    db: ScratchDatabase, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcp_authdb.store.scheduler")
    seed_sessions(db)
    scheduler = CleanupScheduler(database, schedule(interval_s=0))

    scheduler.start()
    time.sleep(0.2)
    manual = scheduler.run_once()

    assert scheduler.stop()
    assert "periodic cleanup is off" in caplog.text
    assert manual.outcome == "completed"
    assert scheduler.stats.runs == 1


def test_start_twice_raises(db: ScratchDatabase, database: Database) -> None:
    scheduler = CleanupScheduler(database, schedule(interval_s=1000, jitter=1.0))
    scheduler.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            scheduler.start()
    finally:
        assert scheduler.stop()
