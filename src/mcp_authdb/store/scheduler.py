"""Periodic cleanup inside the application: expired sessions and old request logs.

:class:`AsyncCleanupScheduler` (an asyncio task) and :class:`CleanupScheduler`
(a daemon thread) run a *cleanup round* every ``interval_s`` seconds. A round
deletes the sessions that have ended, with the batched cleanup of
:mod:`mcp_authdb.store.cleanup`, and then the request log rows older than the
retention period, with the SQL function ``cleanup_request_logs_batch``, each
batch in its own transaction.

Replicas: a round runs under a PostgreSQL advisory lock on
:data:`CLEANUP_LOCK_KEY`, taken with ``pg_try_advisory_lock``, so among all
processes on one database at most one cleans at a time. A process that finds
the lock taken skips that round and tries again one interval later. The first
round of a process starts after a random delay of up to ``jitter`` times the
interval, so that replicas started together do not all wake at once. Each
process still runs its own round every interval; a round that follows another
process's round finds little left to delete.

The lock needs a session of its own, so each round opens a dedicated
connection to ``database.target`` (not one from the pool), holds the lock on
it for the whole round, unlocks and closes it. When the process dies, or the
connection breaks, PostgreSQL ends the session and releases the lock.

Behind a pooler in transaction mode (``DB_TRANSACTION_POOLER``), consecutive
statements of one client may run on different server connections, so a
session-level lock could be taken on one server connection and left there,
held, for another client. In that mode each batch runs in a transaction of
its own that first takes ``pg_try_advisory_xact_lock``, which PostgreSQL
releases at COMMIT. Exclusion is then per batch: a round whose first batch
finds the lock taken is skipped, and a round that finds it taken later stops
there, because another process has started cleaning.

Timing: after a completed or skipped round the next one starts ``interval_s``
after the start of the previous one. After a failed round the next attempt
comes sooner, after ``retry_s``, doubled after each further failure up to the
interval. Rounds of one scheduler never overlap. ``stop()`` ends the wait at
once and cancels the batch in progress, which PostgreSQL rolls back; the
batches before it stay committed. Only the thread scheduler behind a
transaction pooler lets that batch finish instead.

Settings from the environment (:meth:`CleanupSchedule.from_env`):

- ``SESSION_CLEANUP_INTERVAL``: seconds between rounds, default 86400. ``0``
  turns the periodic rounds off, for deployments that clean with pg_cron.
- ``TOKEN_CLEANUP_INTERVAL`` is not read here. Access and refresh tokens are
  columns of their session's row, so the session cleanup deletes them too,
  and an expired token is rejected at lookup by the database clock whether
  or not its row was deleted yet. The MCP server uses the variable for its
  own round, which deletes ended OAuth sign-ins, codes and unused clients.
- ``MCP_AUTHDB_REQUEST_LOG_RETENTION_DAYS``: days of request logs to keep,
  default 30. ``0`` keeps them forever.
- ``MCP_AUTHDB_BATCH_SIZE``: rows per transaction, default 5000.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal

import psycopg

from mcp_authdb.db.connection import connect, connect_async
from mcp_authdb.db.pool import AsyncDatabase, Database, Operation, Query
from mcp_authdb.db.settings import parse_whole_number_in_range
from mcp_authdb.errors import (
    AuthDBError,
    DatabaseError,
    InvalidValueError,
)
from mcp_authdb.store.cleanup import (
    DEFAULT_BATCH_SIZE,
    MAX_BATCH_SIZE,
    CleanupProgress,
    delete_expired_sessions,
    delete_expired_sessions_async,
)

logger = logging.getLogger(__name__)

# The key of the advisory lock held during a cleanup round: the bytes
# "mcpclean" read as a big-endian integer. It differs from the migration
# lock's key, so a cleanup never delays a migration.
CLEANUP_LOCK_KEY = int.from_bytes(b"mcpclean", "big")

DEFAULT_INTERVAL_S = 86_400
# A year. threading.Event.wait() rejects timeouts beyond about 292 years, and
# a longer interval is better expressed by turning the rounds off.
MAX_INTERVAL_S = 365 * 86_400
DEFAULT_LOG_RETENTION_DAYS = 30
MAX_LOG_RETENTION_DAYS = 36_500
DEFAULT_JITTER = 0.1
DEFAULT_RETRY_S = 60.0

Outcome = Literal["completed", "skipped", "failed", "stopped"]

_TRY_LOCK = "SELECT pg_try_advisory_lock(%s)"
_UNLOCK = "SELECT pg_advisory_unlock(%s)"
_TRY_XACT_LOCK = "SELECT pg_try_advisory_xact_lock(%s)"
_DELETE_SESSIONS_BATCH = "SELECT cleanup_expired_sessions_batch(%s)"
_DELETE_LOGS_BATCH = "SELECT cleanup_request_logs_batch(%s, %s)"


@dataclasses.dataclass(frozen=True)
class CleanupSchedule:
    """When and how much a cleanup scheduler deletes.

    ``interval_s`` is the number of seconds between rounds; 0 means no
    periodic rounds, though :meth:`AsyncCleanupScheduler.run_once` still
    works. ``log_retention`` is how long request logs are kept, and None keeps
    them forever. ``batch_size`` is the number of rows per transaction.
    ``jitter`` is the fraction of the interval over which the first round's
    start is spread. ``retry_s`` is the pause after a first failed round.
    Invalid values raise :class:`InvalidValueError` naming the field.
    """

    interval_s: float = DEFAULT_INTERVAL_S
    log_retention: timedelta | None = timedelta(days=DEFAULT_LOG_RETENTION_DAYS)
    batch_size: int = DEFAULT_BATCH_SIZE
    jitter: float = DEFAULT_JITTER
    retry_s: float = DEFAULT_RETRY_S

    def __post_init__(self) -> None:
        _check_number("interval_s", self.interval_s, 0, MAX_INTERVAL_S)
        _check_number("jitter", self.jitter, 0, 1)
        _check_number("retry_s", self.retry_s, 0, MAX_INTERVAL_S)
        if self.retry_s == 0:
            raise InvalidValueError(
                "retry_s=0 would retry a failed round at once and without end; "
                f"pass a pause in seconds, for example {DEFAULT_RETRY_S:g}"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise InvalidValueError(
                f"batch_size={self.batch_size!r} is not a whole number; pass a "
                f"number of rows from 1 to {MAX_BATCH_SIZE}"
            )
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise InvalidValueError(
                f"batch_size={self.batch_size} is out of range; pass a number "
                f"of rows from 1 to {MAX_BATCH_SIZE}"
            )
        retention = self.log_retention
        if retention is not None and (
            not isinstance(retention, timedelta) or retention <= timedelta(0)
        ):
            raise InvalidValueError(
                f"log_retention={retention!r} is invalid; pass a positive "
                "timedelta, or None to keep request logs forever"
            )

    @property
    def periodic(self) -> bool:
        """Whether the scheduler runs rounds by itself, that is interval_s > 0."""
        return self.interval_s > 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CleanupSchedule:
        """Read the schedule from ``environ`` (default: ``os.environ``).

        Empty variables count as unset. An invalid value raises
        :class:`ConfigurationError` naming the variable and its value.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        interval_s = _env_seconds("SESSION_CLEANUP_INTERVAL", get, DEFAULT_INTERVAL_S)

        days = parse_whole_number_in_range(
            "MCP_AUTHDB_REQUEST_LOG_RETENTION_DAYS",
            get("MCP_AUTHDB_REQUEST_LOG_RETENTION_DAYS"),
            DEFAULT_LOG_RETENTION_DAYS,
            0,
            MAX_LOG_RETENTION_DAYS,
            "the number of days of request logs to keep (0 keeps them forever)",
        )
        batch_size = parse_whole_number_in_range(
            "MCP_AUTHDB_BATCH_SIZE",
            get("MCP_AUTHDB_BATCH_SIZE"),
            DEFAULT_BATCH_SIZE,
            1,
            MAX_BATCH_SIZE,
            "the number of rows per batch",
        )
        return cls(
            interval_s=interval_s,
            log_retention=timedelta(days=days) if days else None,
            batch_size=batch_size,
        )


def _check_number(field: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValueError(f"{field}={value!r} is not a number")
    if not low <= value <= high:
        raise InvalidValueError(
            f"{field}={value!r} is out of range; pass a number from {low:g} to {high:g}"
        )


def _env_seconds(name: str, get: Callable[[str], str | None], default: int) -> int:
    return parse_whole_number_in_range(
        name,
        get(name),
        default,
        0,
        MAX_INTERVAL_S,
        "the number of seconds between cleanup rounds (0 turns them off)",
    )


@dataclasses.dataclass(frozen=True)
class CleanupRunResult:
    """The outcome and counts of one cleanup round.

    ``outcome`` is one of:

    - ``completed``: every batch ran;
    - ``skipped``: another process held the cleanup lock, or a round of this
      scheduler was still running;
    - ``failed``: a statement or the connection failed;
    - ``stopped``: ``stop()`` ended the round.

    ``reason`` explains every outcome but ``completed``. The counts include
    the batches committed before a failure or stop, whose rows stay deleted.
    ``started_at`` is read from the process's clock, in UTC.
    """

    outcome: Outcome
    started_at: datetime
    elapsed_s: float
    sessions_deleted: int = 0
    request_logs_deleted: int = 0
    batches: int = 0
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """Counters of a cleanup scheduler since it was created, for metrics.

    ``runs``, ``skips`` and ``failures`` count rounds by outcome; rounds
    ended by ``stop()`` count in none of them. The ``*_deleted`` totals add
    up every round's counts. ``next_run_at`` is None while no round is due.
    """

    runs: int
    skips: int
    failures: int
    consecutive_failures: int
    sessions_deleted: int
    request_logs_deleted: int
    running: bool
    last_result: CleanupRunResult | None
    next_run_at: datetime | None


class _StopRequested(Exception):
    """Raised between batches when ``stop()`` was called during a round."""


class _LockTaken(Exception):
    """Raised when a batch finds the cleanup lock held by another process."""


class _SchedulerCore:
    """The policy that both schedulers share: timing, counters and logging.

    The counters are guarded by a threading lock, so a metrics endpoint may
    read :meth:`stats` from any thread.
    """

    def __init__(self, schedule: CleanupSchedule, rng: random.Random | None) -> None:
        self.schedule = schedule
        self.stopping = threading.Event()
        self._rng = rng or random.Random()
        self._round_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._runs = 0
        self._skips = 0
        self._failures = 0
        self._consecutive_failures = 0
        self._sessions_deleted = 0
        self._request_logs_deleted = 0
        self._last_result: CleanupRunResult | None = None
        self._next_run_at: datetime | None = None

    def first_delay(self) -> float:
        """Return a random pause of up to ``jitter * interval_s`` seconds."""
        return self._rng.uniform(0, self.schedule.jitter * self.schedule.interval_s)

    def next_delay(self, result: CleanupRunResult) -> float:
        """Return the pause before the round that follows ``result``."""
        interval = self.schedule.interval_s
        if result.outcome == "failed":
            with self._stats_lock:
                failures = self._consecutive_failures
            backoff = self.schedule.retry_s * 2.0 ** max(0, failures - 1)
            return min(interval, backoff)
        return max(0.0, interval - result.elapsed_s)

    def set_next_run(self, delay_s: float | None) -> None:
        next_run_at = None
        if delay_s is not None:
            next_run_at = datetime.now(UTC) + timedelta(seconds=delay_s)
        with self._stats_lock:
            self._next_run_at = next_run_at

    def begin(self) -> _Round | None:
        """Start a round, or return None while another round is running."""
        if not self._round_lock.acquire(blocking=False):
            return None
        return _Round(self.schedule, self.stopping)

    def finish(self, result: CleanupRunResult) -> CleanupRunResult:
        """Record and log the result of a round started with :meth:`begin`."""
        try:
            self.record(result)
        finally:
            self._round_lock.release()
        return result

    def busy_result(self) -> CleanupRunResult:
        result = CleanupRunResult(
            outcome="skipped",
            started_at=datetime.now(UTC),
            elapsed_s=0.0,
            reason="a round of this scheduler is already running",
        )
        self.record(result)
        return result

    def record(self, result: CleanupRunResult) -> None:
        with self._stats_lock:
            self._last_result = result
            self._sessions_deleted += result.sessions_deleted
            self._request_logs_deleted += result.request_logs_deleted
            if result.outcome == "completed":
                self._runs += 1
                self._consecutive_failures = 0
            elif result.outcome == "skipped":
                self._skips += 1
            elif result.outcome == "failed":
                self._failures += 1
                self._consecutive_failures += 1
            consecutive_failures = self._consecutive_failures
        _log_result(result, consecutive_failures)

    def stats(self, *, running: bool) -> SchedulerStats:
        with self._stats_lock:
            return SchedulerStats(
                runs=self._runs,
                skips=self._skips,
                failures=self._failures,
                consecutive_failures=self._consecutive_failures,
                sessions_deleted=self._sessions_deleted,
                request_logs_deleted=self._request_logs_deleted,
                running=running,
                last_result=self._last_result,
                next_run_at=self._next_run_at,
            )

    @property
    def round_running(self) -> bool:
        return self._round_lock.locked()


def _log_result(result: CleanupRunResult, consecutive_failures: int) -> None:
    extra = {
        "action": f"scheduler.{result.outcome}",
        "sessions_deleted": result.sessions_deleted,
        "request_logs_deleted": result.request_logs_deleted,
    }
    if result.outcome == "completed":
        logger.info(
            "cleanup round deleted %d ended sessions and %d old request log "
            "rows in %d batches in %.2f s",
            result.sessions_deleted,
            result.request_logs_deleted,
            result.batches,
            result.elapsed_s,
            extra=extra,
        )
    elif result.outcome == "failed":
        logger.warning(
            "cleanup round failed (%d in a row) after deleting %d sessions and "
            "%d request log rows: %s",
            consecutive_failures,
            result.sessions_deleted,
            result.request_logs_deleted,
            result.reason,
            extra=extra,
        )
    else:
        logger.info(
            "cleanup round %s: %s (deleted %d sessions and %d request log rows)",
            result.outcome,
            result.reason,
            result.sessions_deleted,
            result.request_logs_deleted,
            extra=extra,
        )


class _Round:
    """The counts of one round in progress, shared by every driver."""

    def __init__(self, schedule: CleanupSchedule, stopping: threading.Event) -> None:
        self.schedule = schedule
        self.stopping = stopping
        self.started_at = datetime.now(UTC)
        self.began = time.monotonic()
        self.sessions_deleted = 0
        self.session_batches = 0
        self.request_logs_deleted = 0
        self.log_batches = 0

    def check_stop(self) -> None:
        if self.stopping.is_set():
            raise _StopRequested

    def on_session_batch(self, progress: CleanupProgress) -> None:
        """Take the progress of the session cleanup, then stop if asked to."""
        self.sessions_deleted = progress.deleted
        self.session_batches = progress.batches
        self.check_stop()

    def phases(self) -> list[_Phase]:
        """Return the batch loops of this round for the transaction-pooler mode."""
        batch_size = self.schedule.batch_size
        phases = [
            _Phase(self, "sessions", _DELETE_SESSIONS_BATCH, (batch_size,)),
        ]
        retention = self.schedule.log_retention
        if retention is not None:
            phases.append(
                _Phase(
                    self, "request_logs", _DELETE_LOGS_BATCH, (retention, batch_size)
                )
            )
        return phases

    def log_phase(self) -> _Phase | None:
        """Return the request log loop, or None when logs are kept forever."""
        phases = self.phases()
        return phases[1] if len(phases) > 1 else None

    @property
    def batches(self) -> int:
        return self.session_batches + self.log_batches

    def result(self, outcome: Outcome, reason: str | None = None) -> CleanupRunResult:
        return CleanupRunResult(
            outcome=outcome,
            started_at=self.started_at,
            elapsed_s=time.monotonic() - self.began,
            sessions_deleted=self.sessions_deleted,
            request_logs_deleted=self.request_logs_deleted,
            batches=self.batches,
            reason=reason,
        )

    def outcome_of(self, exc: BaseException) -> CleanupRunResult:
        """Turn the exception that ended a round into its result."""
        if isinstance(exc, _StopRequested | asyncio.CancelledError):
            return self.result("stopped", "stop() was called during the round")
        if isinstance(exc, _LockTaken):
            if self.batches == 0:
                return self.result("skipped", "another process holds the cleanup lock")
            return self.result(
                "skipped",
                f"another process took the cleanup lock after {self.batches} "
                "batches of this round and goes on cleaning",
            )
        if isinstance(exc, AuthDBError | psycopg.Error | OSError):
            return self.result("failed", str(exc))
        # A bug rather than a database problem: keep the traceback in the log.
        logger.exception(
            "cleanup round failed with an unexpected error",
            extra={"action": "scheduler.unexpected"},
        )
        return self.result("failed", f"{type(exc).__name__}: {exc}")


class _Phase:
    """One batch loop of a round: ended sessions, or old request log rows."""

    def __init__(
        self,
        round_: _Round,
        table: Literal["sessions", "request_logs"],
        statement: str,
        params: tuple[Any, ...],
    ) -> None:
        self.round = round_
        self.table = table
        self.statement = statement
        self.params = params
        self.done = False

    @property
    def deleted(self) -> int:
        if self.table == "sessions":
            return self.round.sessions_deleted
        return self.round.request_logs_deleted

    @property
    def batches(self) -> int:
        if self.table == "sessions":
            return self.round.session_batches
        return self.round.log_batches

    def record(self, rows: list[tuple[Any, ...]]) -> None:
        """Count a committed batch from the rows its statement returned."""
        if not rows or rows[0][0] is None:
            raise DatabaseError(
                f"{self.statement.split('(')[0]} returned no count; check that "
                "the migrations are applied, with `mcp-authdb migrate`"
            )
        count = int(rows[0][0])
        if self.table == "sessions":
            self.round.sessions_deleted += count
            self.round.session_batches += 1
        else:
            self.round.request_logs_deleted += count
            self.round.log_batches += 1
        # A short batch means that no unlocked row was left when it started.
        self.done = count < self.round.schedule.batch_size

    def failure(self, exc: Exception) -> DatabaseError:
        """Build the error for a failed batch, saying what stays deleted."""
        detail = str(exc)
        sqlstate = getattr(exc, "sqlstate", None)
        if isinstance(exc, psycopg.Error):
            detail = f"{exc.diag.message_primary or exc} (SQLSTATE {exc.sqlstate})"
        what = "session cleanup" if self.table == "sessions" else "request log cleanup"
        return DatabaseError(
            f"{what} failed in batch {self.batches + 1}: {detail}; the "
            f"{self.batches} batches before it, {self.deleted} rows, stay deleted",
            sqlstate=sqlstate,
        )


def _locked_batch(phase: _Phase) -> Operation[list[tuple[Any, ...]]]:
    """Run one batch of ``phase`` in a transaction that holds the cleanup lock.

    Raises :class:`_LockTaken` when another process holds it; the driver then
    rolls the transaction back, and PostgreSQL releases the lock at its end.
    """
    lock = yield Query(_TRY_XACT_LOCK, (CLEANUP_LOCK_KEY,))
    if not lock.rows[0][0]:
        raise _LockTaken
    batch = yield Query(phase.statement, phase.params)
    return batch.rows


def _first_value(row: tuple[Any, ...] | None) -> Any:
    return None if row is None else row[0]


def _is_cancellation(exc: Exception) -> bool:
    """Tell whether ``exc`` reports a statement cancelled on the server."""
    # delete_expired_sessions and _Phase.failure wrap the driver's
    # QueryCanceled in a DatabaseError that keeps its SQLSTATE.
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return True
    return isinstance(exc, DatabaseError) and exc.sqlstate == "57014"


# The drivers below run one round each. Their sync and async versions differ
# only in I/O; what to run, what to count and when to stop is in _Round and
# _Phase.


def _round_on_session(
    database: Database,
    round_: _Round,
    hold: Callable[[psycopg.Connection[Any] | None], None],
) -> CleanupRunResult:
    """Run a round on a dedicated connection under a session-level lock."""
    conn = connect(database.target, autocommit=True)
    hold(conn)
    try:
        # stop() may have come before the connection was registered.
        round_.check_stop()
        if not _first_value(conn.execute(_TRY_LOCK, (CLEANUP_LOCK_KEY,)).fetchone()):
            raise _LockTaken
        delete_expired_sessions(
            conn,
            batch_size=round_.schedule.batch_size,
            on_batch=round_.on_session_batch,
        )
        phase = round_.log_phase()
        while phase is not None and not phase.done:
            round_.check_stop()
            try:
                rows = conn.execute(phase.statement, phase.params).fetchall()
            except psycopg.Error as exc:
                raise phase.failure(exc) from exc
            phase.record(rows)
        # Closing the connection would release the lock too; unlocking first
        # makes a lock that was somehow not held show up in the log.
        if not _first_value(conn.execute(_UNLOCK, (CLEANUP_LOCK_KEY,)).fetchone()):
            logger.warning(
                "the cleanup lock was no longer held at the end of the round",
                extra={"action": "scheduler.unlock"},
            )
    finally:
        hold(None)
        conn.close()
    return round_.result("completed")


async def _round_on_session_async(
    database: AsyncDatabase, round_: _Round
) -> CleanupRunResult:
    """Run a round on a dedicated connection under a session-level lock."""
    conn = await connect_async(database.target, autocommit=True)
    try:
        cursor = await conn.execute(_TRY_LOCK, (CLEANUP_LOCK_KEY,))
        if not _first_value(await cursor.fetchone()):
            raise _LockTaken
        await delete_expired_sessions_async(
            conn,
            batch_size=round_.schedule.batch_size,
            on_batch=round_.on_session_batch,
        )
        phase = round_.log_phase()
        while phase is not None and not phase.done:
            round_.check_stop()
            try:
                cursor = await conn.execute(phase.statement, phase.params)
                rows = await cursor.fetchall()
            except psycopg.Error as exc:
                raise phase.failure(exc) from exc
            phase.record(rows)
        cursor = await conn.execute(_UNLOCK, (CLEANUP_LOCK_KEY,))
        if not _first_value(await cursor.fetchone()):
            logger.warning(
                "the cleanup lock was no longer held at the end of the round",
                extra={"action": "scheduler.unlock"},
            )
    finally:
        await conn.close()
    return round_.result("completed")


def _round_in_transactions(database: Database, round_: _Round) -> CleanupRunResult:
    """Run a round batch by batch, each batch under a transaction-level lock."""
    for phase in round_.phases():
        while not phase.done:
            round_.check_stop()
            try:
                rows = database.run(partial(_locked_batch, phase), transaction=True)
            except DatabaseError as exc:
                raise phase.failure(exc) from exc
            phase.record(rows)
    return round_.result("completed")


async def _round_in_transactions_async(
    database: AsyncDatabase, round_: _Round
) -> CleanupRunResult:
    """Run a round batch by batch, each batch under a transaction-level lock."""
    for phase in round_.phases():
        while not phase.done:
            round_.check_stop()
            try:
                rows = await database.run(
                    partial(_locked_batch, phase), transaction=True
                )
            except DatabaseError as exc:
                raise phase.failure(exc) from exc
            phase.record(rows)
    return round_.result("completed")


class AsyncCleanupScheduler:
    """Runs cleanup rounds in an asyncio task of the running event loop.

    Use it as ``async with AsyncCleanupScheduler(database):``, or call
    :meth:`start` and later :meth:`stop`. The schedule defaults to
    :meth:`CleanupSchedule.from_env`. ``rng`` draws the first round's delay.
    """

    def __init__(
        self,
        database: AsyncDatabase,
        schedule: CleanupSchedule | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.database = database
        self.schedule = schedule or CleanupSchedule.from_env()
        self._core = _SchedulerCore(self.schedule, rng)
        self._task: asyncio.Task[None] | None = None

    @property
    def stats(self) -> SchedulerStats:
        """The counters and the last result; safe to read from any thread."""
        return self._core.stats(running=self._core.round_running)

    def start(self) -> None:
        """Start the periodic rounds; call it from a coroutine of the event loop.

        Does nothing but log when the schedule is not periodic. Raises
        RuntimeError when the scheduler was already started or stopped.
        """
        if self._task is not None or self._core.stopping.is_set():
            raise RuntimeError(
                "this cleanup scheduler was already started; create a new one"
            )
        if not _log_start(self.schedule, self.database.settings.transaction_pooler):
            return
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name="mcp-authdb-cleanup"
        )

    async def stop(self) -> None:
        """Stop the periodic rounds and cancel a round in progress.

        The batch in progress is cancelled on the server and rolled back, the
        batches before it stay committed. Calling it again does nothing.
        """
        self._core.stopping.set()
        self._core.set_next_run(None)
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        logger.info("cleanup scheduler stopped", extra={"action": "scheduler.stop"})

    async def __aenter__(self) -> AsyncCleanupScheduler:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run_once(self) -> CleanupRunResult:
        """Run one round now and return its result.

        Database errors do not raise: they give a ``failed`` result, which is
        logged and counted. A round already running in this scheduler gives a
        ``skipped`` result.
        """
        round_ = self._core.begin()
        if round_ is None:
            return self._core.busy_result()
        result: CleanupRunResult | None = None
        try:
            if self.database.settings.transaction_pooler:
                result = await _round_in_transactions_async(self.database, round_)
            else:
                result = await _round_on_session_async(self.database, round_)
        except asyncio.CancelledError as exc:
            result = round_.outcome_of(exc)
            raise
        except Exception as exc:
            result = round_.outcome_of(exc)
        finally:
            if result is None:
                # KeyboardInterrupt or SystemExit: count the round as stopped.
                result = round_.result("stopped", "the process is exiting")
            self._core.finish(result)
        return result

    async def _loop(self) -> None:
        delay = self._core.first_delay()
        while True:
            self._core.set_next_run(delay)
            await asyncio.sleep(delay)
            self._core.set_next_run(None)
            result = await self.run_once()
            delay = self._core.next_delay(result)


class CleanupScheduler:
    """Runs cleanup rounds in a daemon thread, for code without an event loop.

    Use it as ``with CleanupScheduler(database):``, or call :meth:`start` and
    later :meth:`stop`. The contract is that of
    :class:`AsyncCleanupScheduler`.
    """

    def __init__(
        self,
        database: Database,
        schedule: CleanupSchedule | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.database = database
        self.schedule = schedule or CleanupSchedule.from_env()
        self._core = _SchedulerCore(self.schedule, rng)
        self._thread: threading.Thread | None = None
        self._conn_lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def stats(self) -> SchedulerStats:
        """The counters and the last result; safe to read from any thread."""
        return self._core.stats(running=self._core.round_running)

    def start(self) -> None:
        """Start the periodic rounds in a daemon thread.

        Does nothing but log when the schedule is not periodic. Raises
        RuntimeError when the scheduler was already started or stopped.
        """
        if self._thread is not None or self._core.stopping.is_set():
            raise RuntimeError(
                "this cleanup scheduler was already started; create a new one"
            )
        if not _log_start(self.schedule, self.database.settings.transaction_pooler):
            return
        self._thread = threading.Thread(
            target=self._loop, name="mcp-authdb-cleanup", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the periodic rounds and cancel a round in progress.

        Waits up to ``timeout`` seconds for the thread to end and returns
        whether it did. Behind a transaction pooler a batch in progress is not
        cancelled but finishes, within ``DB_COMMAND_TIMEOUT``.
        """
        self._core.stopping.set()
        self._core.set_next_run(None)
        with self._conn_lock:
            conn = self._conn
        if conn is not None:
            # Cancels the statement in progress, which then raises
            # QueryCanceled in the round's thread; no effect between statements.
            with contextlib.suppress(psycopg.Error):
                conn.cancel_safe(timeout=min(timeout, 5.0))
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        thread.join(timeout)
        stopped = not thread.is_alive()
        if stopped:
            logger.info("cleanup scheduler stopped", extra={"action": "scheduler.stop"})
        else:
            logger.warning(
                "cleanup scheduler did not stop within %.1f s",
                timeout,
                extra={"action": "scheduler.stop"},
            )
        return stopped

    def __enter__(self) -> CleanupScheduler:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def run_once(self) -> CleanupRunResult:
        """Run one round now, in the calling thread, and return its result.

        The contract is that of :meth:`AsyncCleanupScheduler.run_once`.
        """
        round_ = self._core.begin()
        if round_ is None:
            return self._core.busy_result()
        result: CleanupRunResult | None = None
        try:
            if self.database.settings.transaction_pooler:
                result = _round_in_transactions(self.database, round_)
            else:
                result = _round_on_session(self.database, round_, self._hold)
        except Exception as exc:
            if self._core.stopping.is_set() and _is_cancellation(exc):
                exc = _StopRequested()
            result = round_.outcome_of(exc)
        finally:
            if result is None:
                result = round_.result("stopped", "the process is exiting")
            self._core.finish(result)
        return result

    def _hold(self, conn: psycopg.Connection[Any] | None) -> None:
        with self._conn_lock:
            self._conn = conn

    def _loop(self) -> None:
        delay = self._core.first_delay()
        while True:
            self._core.set_next_run(delay)
            if self._core.stopping.wait(delay):
                return
            self._core.set_next_run(None)
            result = self.run_once()
            if result.outcome == "stopped":
                return
            delay = self._core.next_delay(result)


def _log_start(schedule: CleanupSchedule, transaction_pooler: bool) -> bool:
    """Log how the scheduler will run; return whether it runs periodic rounds."""
    if not schedule.periodic:
        logger.info(
            "periodic cleanup is off (SESSION_CLEANUP_INTERVAL=0); clean with "
            "pg_cron or `mcp-authdb cleanup` instead",
            extra={"action": "scheduler.off"},
        )
        return False
    retention = schedule.log_retention
    logger.info(
        "cleanup scheduler started: a round every %g s, request logs kept %s, %s",
        schedule.interval_s,
        "forever"
        if retention is None
        else f"{retention.total_seconds() / 86400:g} days",
        "a transaction-level lock per batch (DB_TRANSACTION_POOLER)"
        if transaction_pooler
        else "a session-level lock per round",
        extra={"action": "scheduler.start"},
    )
    return True
