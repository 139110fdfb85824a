"""Deleting expired user sessions in batches, by the database clock.

:func:`delete_expired_sessions` calls the SQL function
``cleanup_expired_sessions_batch(n)`` again and again, each call in its own
transaction, until a call deletes fewer than ``n`` rows. The same function
serves the command line, the procedure ``cleanup_expired_sessions_in_batches``
and any scheduler, so every path deletes the same rows:

- A session is expired when its ``expires_at`` is earlier than ``now()`` of
  the batch's transaction. The application's clock is never consulted, and
  the connection's ``TimeZone`` does not matter because both sides are
  instants.
- Each batch holds its row locks only until it commits, so an update of a
  session that a batch has locked waits for that batch only. Inserts take no
  lock that the cleanup holds. Each batch is one statement, bounded by
  ``statement_timeout``.
- Rows locked by another transaction are skipped, not waited for. A later
  batch or run deletes them once they are unlocked, if they are still expired.

:func:`delete_expired_sessions_async` does the same on an async connection.
Both drivers only run the SQL. The counting, the stop condition, the
progress callback, the logging and the error messages live in
:class:`_BatchLoop`, which they share.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from mcp_authdb.errors import DatabaseError, InvalidValueError

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 5000
# One batch collects its rows' addresses in an array and holds their locks
# until it commits, so a batch stays far below PostgreSQL's 1 GB array limit
# and well inside the statement timeout.
MAX_BATCH_SIZE = 1_000_000

_DELETE_BATCH = "SELECT cleanup_expired_sessions_batch(%s)"


@dataclasses.dataclass(frozen=True)
class _CleanupCounts:
    deleted: int
    batches: int
    elapsed_s: float

    @property
    def rows_per_second(self) -> float:
        """Deleted rows per second of elapsed time, 0.0 before any time passed."""
        return self.deleted / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class CleanupProgress(_CleanupCounts):
    """The state of a cleanup after a committed batch.

    ``deleted`` counts the sessions deleted so far, ``batches`` the batches
    committed so far, and ``elapsed_s`` the seconds since the cleanup began.
    """


@dataclasses.dataclass(frozen=True)
class CleanupResult(_CleanupCounts):
    """The outcome of a finished cleanup.

    ``deleted`` counts all sessions deleted, ``batches`` all batches run (the
    last one deleted fewer than the batch size, possibly none), and
    ``elapsed_s`` the seconds the whole cleanup took.
    """


def delete_expired_sessions(
    conn: psycopg.Connection[Any],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[CleanupProgress], None] | None = None,
) -> CleanupResult:
    """Delete every expired session, ``batch_size`` rows per transaction.

    ``conn`` must not be inside a transaction. It runs in autocommit mode
    during the cleanup and gets its previous mode back afterwards.
    ``on_batch`` is called after each batch has committed. An exception from
    it, or a database error, stops the cleanup, and the batches committed
    before stay deleted.

    Raises :class:`InvalidValueError` for a batch size outside 1 to
    ``MAX_BATCH_SIZE`` or a connection inside a transaction, and
    :class:`DatabaseError` when a batch fails.
    """
    loop = _BatchLoop(batch_size, on_batch)
    _require_idle(conn.info.transaction_status)
    previous_autocommit = conn.autocommit
    conn.autocommit = True
    try:
        while not loop.done:
            try:
                row = conn.execute(_DELETE_BATCH, (loop.batch_size,)).fetchone()
            except psycopg.Error as exc:
                raise loop.failure(exc) from exc
            loop.record(row)
    finally:
        if _can_change_autocommit(conn):
            conn.autocommit = previous_autocommit
    return loop.finish()


async def delete_expired_sessions_async(
    conn: psycopg.AsyncConnection[Any],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[CleanupProgress], None] | None = None,
) -> CleanupResult:
    """Delete every expired session on an async connection.

    The contract is that of :func:`delete_expired_sessions`. ``on_batch`` is
    a plain function, called between batches on the event loop.
    """
    loop = _BatchLoop(batch_size, on_batch)
    _require_idle(conn.info.transaction_status)
    previous_autocommit = conn.autocommit
    await conn.set_autocommit(True)
    try:
        while not loop.done:
            try:
                cursor = await conn.execute(_DELETE_BATCH, (loop.batch_size,))
                row = await cursor.fetchone()
            except psycopg.Error as exc:
                raise loop.failure(exc) from exc
            loop.record(row)
    finally:
        if _can_change_autocommit(conn):
            await conn.set_autocommit(previous_autocommit)
    return loop.finish()


class _BatchLoop:
    """The state of one cleanup, shared by the sync and async drivers."""

    def __init__(
        self, batch_size: int, on_batch: Callable[[CleanupProgress], None] | None
    ) -> None:
        self.batch_size = _validate_batch_size(batch_size)
        self.on_batch = on_batch
        self.deleted = 0
        self.batches = 0
        self.done = False
        self.began = time.monotonic()

    def record(self, row: tuple[Any, ...] | None) -> None:
        """Count a committed batch from its result row and report progress."""
        if row is None or row[0] is None:
            raise DatabaseError(
                "cleanup_expired_sessions_batch returned no count; check that "
                "the migrations are applied"
            )
        batch_deleted = int(row[0])
        self.deleted += batch_deleted
        self.batches += 1
        # A short batch means that no unlocked expired row was left when it
        # started, so another call would find at most rows expired since.
        self.done = batch_deleted < self.batch_size

        logger.debug(
            "cleanup batch %d deleted %d expired sessions",
            self.batches,
            batch_deleted,
            extra={"action": "cleanup.batch", "deleted": batch_deleted},
        )
        if self.on_batch is not None:
            self.on_batch(
                CleanupProgress(self.deleted, self.batches, self._elapsed_s())
            )

    def failure(self, exc: psycopg.Error) -> DatabaseError:
        """Build the error for a batch that failed, saying what was committed."""
        detail = exc.diag.message_primary or str(exc)
        hint = "run the cleanup again"
        if isinstance(exc, psycopg.errors.UndefinedFunction):
            hint = "apply the migrations first, with `mcp-authdb migrate`"
        elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
            hint = (
                "run it as a role that may DELETE from user_sessions and "
                "execute cleanup_expired_sessions_batch"
            )
        elif isinstance(exc, psycopg.errors.QueryCanceled):
            hint = (
                "lower batch_size so that one batch fits in the statement "
                "timeout, or raise DB_COMMAND_TIMEOUT"
            )
        return DatabaseError.from_driver(
            f"session cleanup failed in batch {self.batches + 1} of "
            f"{self.batch_size} rows: {detail} (SQLSTATE {exc.sqlstate}); the "
            f"{self.batches} batches before it, {self.deleted} sessions, stay "
            f"deleted; {hint}",
            exc,
        )

    def finish(self) -> CleanupResult:
        """Log and return the result of the finished cleanup."""
        result = CleanupResult(self.deleted, self.batches, self._elapsed_s())
        # Debug, not info: the caller gets the result and reports it itself.
        logger.debug(
            "deleted %d expired sessions in %d batches in %.2f s (%.0f rows/s)",
            result.deleted,
            result.batches,
            result.elapsed_s,
            result.rows_per_second,
            extra={
                "action": "cleanup.finish",
                "deleted": result.deleted,
                "batches": result.batches,
            },
        )
        return result

    def _elapsed_s(self) -> float:
        return time.monotonic() - self.began


def _validate_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise InvalidValueError(
            f"batch_size={batch_size!r} is a {type(batch_size).__name__}, not a "
            f"whole number; pass a number of rows from 1 to {MAX_BATCH_SIZE}"
        )
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InvalidValueError(
            f"batch_size={batch_size} is invalid; pass a number of rows from 1 "
            f"to {MAX_BATCH_SIZE}, for example {DEFAULT_BATCH_SIZE}"
        )
    return batch_size


def _require_idle(status: TransactionStatus) -> None:
    if status != TransactionStatus.IDLE:
        raise InvalidValueError(
            f"the connection is in transaction status {status.name}, but the "
            "cleanup commits each batch on its own; commit or roll back first"
        )


def _can_change_autocommit(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
) -> bool:
    # After a lost connection or an interrupted query, the mode cannot be set
    # and the original error matters more.
    return not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE
