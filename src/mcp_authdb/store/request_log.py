"""Writing request_logs rows in the background, in batches, by COPY.

:class:`AsyncRequestLog` writes from an asyncio task, :class:`RequestLog` from
a thread, for programs without an event loop. Both share one core, so they
behave the same way::

    async with AsyncRequestLog(database.target, database.settings) as requests:
        requests.log("tools/call", user_id="u1", parameters=params,
                     response_size=512, duration_ms=12, status="ok")

``log()`` does no I/O and raises on no value; it raises only for a
programming error, such as an unknown keyword argument. It converts the
values into a row that PostgreSQL accepts, by the rules of
:mod:`mcp_authdb.store.request_log_sanitize` (secrets redacted, text repaired,
sizes capped), stamps ``created_at`` with the time of the call, and appends
the row to a bounded queue under a lock held only for the append. When the
queue is full (``max_queue_rows`` rows or an estimated ``max_queue_bytes`` of
memory), the row is dropped and counted.

The writer sends one binary ``COPY request_logs (...) FROM STDIN`` per batch,
once ``batch_size`` rows are queued or ``max_delay_s`` seconds after the
oldest queued row, whichever comes first. ``close()`` (``aclose()``) writes
every queued row, waiting at most ``timeout_s``, and stops.

Connection: the writer opens a dedicated connection to the same target as
the pool, instead of taking one from :class:`~mcp_authdb.db.pool.Database`.

- A COPY keeps its connection busy for the whole batch, and a backlog after
  an outage takes many batches. With a connection of its own, the writer
  never makes a request wait for a pooled connection, and logging never
  waits behind requests when the pool is busy.
- Its reconnect schedule is its own, capped at ``max_backoff_s``.
- It costs one connection per process, idle between batches.

When the database is unreachable or rejects the write, the rows stay in the
queue, whose limits bound the backlog, and the writer retries with
exponential backoff from ``min_backoff_s`` to ``max_backoff_s``. It logs the
first failure, then a summary every ``report_interval_s`` seconds with the
counts, and a message once it writes again. A batch leaves the queue only
after its COPY committed.

Rows are stored exactly once, barring a failover. The writer reads each
batch's transaction id (``pg_current_xact_id()``) before it sends COMMIT. If
the connection breaks during COMMIT, the outcome is unknown, so before
writing the batch again the writer queries ``pg_xact_status(xid)``:
``committed`` settles the batch, ``aborted`` (or an xid the server never
assigned) writes it again, and ``in progress`` queries again shortly.
NOTE: if the server returns no status for the xid, or "in progress" for a
minute, the batch is written again and may be stored twice. After a failover
to a standby that had not received the COMMIT, the xid may name another
transaction, and the batch may be lost or stored twice.

A batch that PostgreSQL rejects for its data (SQLSTATE classes 22, 23 and 54,
or a value that a dumper rejects) is split in halves until the rejected rows
are alone. Each of them is dropped, counted as ``rejected`` and logged with
its error, method and user, never its parameters.

The writer logs target descriptions, counts, transaction ids, methods, user
ids and the first line of errors. It never logs parameters, whose secrets
the sanitizer has redacted, or the connection string.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.pq import Format, TransactionStatus

from mcp_authdb.db.connection import ConnectionTarget, register_adapters
from mcp_authdb.db.pool import PREPARE_THRESHOLD
from mcp_authdb.db.settings import Settings, scrub_message
from mcp_authdb.store.request_log_core import (
    DROP_CLOSE_TIMEOUT,
    DROP_CLOSED,
    DROP_QUEUE_FULL,
    DROP_REJECTED,
    STAGE_BEGIN,
    STAGE_COMMIT,
    STAGE_CONNECT,
    STAGE_COPY,
    CheckCommit,
    RequestLogStats,
    Wait,
    Write,
    WriterCore,
    WriterOptions,
)
from mcp_authdb.store.request_log_sanitize import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_PARAMETERS_BYTES,
    CopyRow,
    RowSanitizer,
)

__all__ = [
    "DROP_CLOSED",
    "DROP_CLOSE_TIMEOUT",
    "DROP_QUEUE_FULL",
    "DROP_REJECTED",
    "AsyncRequestLog",
    "RequestLog",
    "RequestLogStats",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 5000
DEFAULT_MAX_DELAY_S = 1.0
DEFAULT_MAX_QUEUE_ROWS = 100_000
DEFAULT_MAX_QUEUE_BYTES = 64 * 1024 * 1024
DEFAULT_MIN_BACKOFF_S = 0.1
DEFAULT_MAX_BACKOFF_S = 5.0
DEFAULT_REPORT_INTERVAL_S = 60.0
DEFAULT_CLOSE_TIMEOUT_S = 10.0

COPY_SQL = (
    "COPY request_logs (user_id, method, parameters, response_size, duration_ms, "
    "status, created_at) FROM STDIN (FORMAT BINARY)"
)
COPY_TYPES = ["varchar", "varchar", "jsonb", "int4", "int4", "varchar", "timestamptz"]
_XACT_STATUS = "SELECT pg_xact_status(%s::xid8)"


class _JsonbBytesDumper(Dumper):
    """Binary jsonb from JSON that the sanitizer already encoded as UTF-8.

    The binary jsonb format is a version byte, 1, and the JSON text.
    """

    format = Format.BINARY
    oid = psycopg.postgres.types["jsonb"].oid

    def dump(self, obj: bytes) -> Buffer | None:
        return b"\x01" + obj


class _RequestLogBase:
    """Options, sanitizer, ``log()`` and counters, shared by both writers."""

    def __init__(
        self,
        target: ConnectionTarget,
        settings: Settings,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_delay_s: float = DEFAULT_MAX_DELAY_S,
        max_queue_rows: int = DEFAULT_MAX_QUEUE_ROWS,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        max_parameters_bytes: int = DEFAULT_MAX_PARAMETERS_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
        extra_secret_keys: Iterable[str] = (),
        min_backoff_s: float = DEFAULT_MIN_BACKOFF_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
    ) -> None:
        """Prepare a writer to ``target``; nothing connects until it is opened.

        ``batch_size`` is the maximum number of rows per COPY, and a batch is
        written once that many are queued, or ``max_delay_s`` seconds after the oldest
        queued row. The queue contains at most ``max_queue_rows`` rows and an
        estimated ``max_queue_bytes`` bytes of memory. ``max_parameters_bytes``,
        ``max_depth`` and ``extra_secret_keys`` configure the sanitizer.
        Failed writes are retried after ``min_backoff_s``, doubling up to
        ``max_backoff_s`` (each pause is between half and all of that step).
        Repeated warnings are summarized every ``report_interval_s`` seconds.

        Raises :class:`InvalidValueError` for an option out of range.
        """
        self.target = target
        self.settings = settings
        self._sanitizer = RowSanitizer(
            max_parameters_bytes=max_parameters_bytes,
            max_depth=max_depth,
            extra_secret_keys=extra_secret_keys,
        )
        options = WriterOptions(
            batch_size=batch_size,
            max_delay_s=max_delay_s,
            max_queue_rows=max_queue_rows,
            max_queue_bytes=max_queue_bytes,
            min_backoff_s=min_backoff_s,
            max_backoff_s=max_backoff_s,
            report_interval_s=report_interval_s,
        )
        self._core = WriterCore(options, target.description)

        begin = ["BEGIN"]
        if settings.transaction_pooler:
            # A pooler in transaction mode rejects the startup option that
            # sets the statement timeout elsewhere.
            begin.append(f"SET LOCAL statement_timeout = {settings.command_timeout_ms}")
        begin.append("SELECT pg_current_xact_id()")
        # One simple query: the xid costs no extra round trip.
        self._begin_sql = "; ".join(begin)
        self._init_loop_state()

    def _init_loop_state(self) -> None:
        """Set up what the writer loop of the subclass needs."""
        raise NotImplementedError

    def log(
        self,
        method: object,
        *,
        user_id: object = None,
        parameters: object = None,
        response_size: object = None,
        duration_ms: object = None,
        status: object = None,
        created_at: object = None,
    ) -> None:
        """Queue one request_logs row, with no I/O and no exception for any value.

        Every value is converted by the rules of
        :mod:`~mcp_authdb.store.request_log_sanitize`: ``method``,
        ``user_id`` and ``status`` are text, ``parameters`` any value that
        becomes jsonb, ``response_size`` and ``duration_ms`` numbers (a
        timedelta for the duration too), and ``created_at`` a datetime that
        defaults to now. A full or closed queue drops the row and counts it.
        May be called from any thread.
        """
        queued_at = time.monotonic()
        now = datetime.now(UTC)
        try:
            row = self._sanitizer.row(
                method,
                user_id=user_id,
                parameters=parameters,
                response_size=response_size,
                duration_ms=duration_ms,
                status=status,
                created_at=created_at,
                now=now,
            )
        except Exception:
            # The sanitizer handles every value, so this is a bug in it; the
            # request still gets a row.
            logger.exception(
                "request log sanitizer failed; storing a placeholder row",
                extra={"action": "request_log.sanitize_failed"},
            )
            row = (None, "[sanitize failed]", None, None, None, None, now)
        self._core.enqueue(row, queued_at)

    def stats(self) -> RequestLogStats:
        """Return a snapshot of the counters."""
        return self._core.stats()

    def _connect_kwargs(self) -> dict[str, Any]:
        threshold = None if self.settings.transaction_pooler else PREPARE_THRESHOLD
        return {"autocommit": True, "prepare_threshold": threshold}

    def _connect_error(self, exc: psycopg.Error) -> psycopg.OperationalError:
        """Return a connection error whose message names no password."""
        text = scrub_message(str(exc).strip(), self.target.conninfo)
        return psycopg.OperationalError(
            f"could not connect to {self.target.description}: {text}"
        )


def _prepare_connection(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
) -> None:
    register_adapters(conn.adapters)
    conn.adapters.register_dumper(None, _JsonbBytesDumper)


class RequestLog(_RequestLogBase):
    """A request log writer running in a thread of its own.

    Open it with :meth:`open` or ``with``, and close it with :meth:`close`,
    which writes what is queued. The thread is a daemon, so a program that
    exits without closing loses the rows still queued.
    """

    # The tests replace it to break connections at chosen moments.
    _connection_class: type[psycopg.Connection[Any]] = psycopg.Connection

    def _init_loop_state(self) -> None:
        self._wakeup = threading.Event()
        self._settled = threading.Condition()
        self._core.wake = self._wakeup.set
        self._core.settled_callback = self._notify_settled
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None

    def open(self) -> None:
        """Start the writer thread; calling it again does nothing."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="mcp-authdb-request-log", daemon=True
            )
            self._thread.start()

    def flush(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> bool:
        """Write every row queued so far, waiting at most ``timeout_s`` seconds.

        Returns True when each of those rows was written or dropped, False
        when the time ran out first.
        """
        core = self._core
        target = core.request_flush()
        if self._thread is None:
            return core.settled >= target
        with self._settled:
            self._settled.wait_for(
                lambda: core.settled >= target or core.stopped, timeout_s
            )
        return core.settled >= target

    def close(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> RequestLogStats:
        """Write the queued rows, waiting at most ``timeout_s``, and stop.

        Rows still unwritten at the deadline are dropped and counted as
        ``close_timeout``. If the thread is stuck in a connection attempt at
        that moment, this returns without it, and the thread ends once the
        attempt times out (``connect_timeout``). Later ``log()`` calls are
        counted as dropped (``closed``). Returns the final counters.
        """
        deadline = time.monotonic() + timeout_s
        self._core.begin_close(deadline)
        thread = self._thread
        if thread is None:
            self._core.abandon()
            self._core.finish()
        else:
            thread.join(max(0.0, deadline - time.monotonic()) + 0.1)
            if thread.is_alive():
                self._core.abandon()
        return self.stats()

    def __enter__(self) -> RequestLog:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _notify_settled(self) -> None:
        with self._settled:
            self._settled.notify_all()

    def _run(self) -> None:
        core = self._core
        try:
            while True:
                self._wakeup.clear()
                step = core.next_step(time.monotonic())
                if isinstance(step, Wait):
                    self._wakeup.wait(step.timeout)
                elif isinstance(step, Write):
                    self._write(step.rows)
                elif isinstance(step, CheckCommit):
                    self._check_commit(step.xid)
                else:
                    break
        except Exception:
            # A bug in the writer: I/O errors are handled in the steps.
            logger.exception(
                "request log writer stopped by an unexpected error; the rows "
                "still queued are not written",
                extra={"action": "request_log.crashed"},
            )
        finally:
            core.drop_unfinished()
            self._close_connection()
            core.finish()

    def _open_connection(self) -> psycopg.Connection[Any]:
        try:
            conn = self._connection_class.connect(
                self.target.conninfo, **self._connect_kwargs()
            )
        except psycopg.Error as exc:
            error = self._connect_error(exc)
        else:
            _prepare_connection(conn)
            return conn
        raise error

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self._open_connection()
        return self._conn

    def _write(self, rows: list[CopyRow]) -> None:
        stage = STAGE_CONNECT
        xid: str | None = None
        reused = self._conn is not None and not self._conn.closed
        try:
            conn = self._connection()
            stage = STAGE_BEGIN
            cursor = conn.execute(self._begin_sql)
            while cursor.nextset():
                pass
            xid = str(_first_value(cursor.fetchone()))
            with cursor.copy(COPY_SQL) as copy:
                copy.set_types(COPY_TYPES)
                stage = STAGE_COPY
                for row in rows:
                    copy.write_row(row)
            stage = STAGE_COMMIT
            conn.execute("COMMIT")
        except Exception as exc:
            self._end_transaction()
            self._core.write_failed(exc, stage=stage, xid=xid, reused=reused)
        else:
            self._core.write_succeeded()

    def _check_commit(self, xid: str) -> None:
        try:
            conn = self._connection()
            status = _first_value(conn.execute(_XACT_STATUS, (xid,)).fetchone())
        except Exception as exc:
            self._end_transaction()
            self._core.commit_check_failed(exc)
        else:
            self._core.commit_status(status)

    def _end_transaction(self) -> None:
        """Roll back what a failed step left open, or drop a broken connection."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        if conn.info.transaction_status == TransactionStatus.IDLE:
            return
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            self._close_connection()

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class AsyncRequestLog(_RequestLogBase):
    """A request log writer running as a task on the current event loop.

    Open it with ``await open()`` or ``async with`` inside the loop, and close
    it with :meth:`aclose`, which writes what is queued. ``log()`` may also be
    called from other threads.
    """

    # The tests replace it to break connections at chosen moments.
    _connection_class: type[psycopg.AsyncConnection[Any]] = psycopg.AsyncConnection

    def _init_loop_state(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wakeup: asyncio.Event | None = None
        self._settled: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def open(self) -> None:
        """Start the writer task on the running loop; calling it again does nothing."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wakeup = asyncio.Event()
        self._settled = asyncio.Event()
        self._core.wake = self._wake
        self._core.settled_callback = self._notify_settled
        self._task = self._loop.create_task(self._run(), name="mcp-authdb-request-log")

    async def flush(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> bool:
        """Write every row queued so far, waiting at most ``timeout_s`` seconds.

        Returns True when each of those rows was written or dropped, False
        when the time ran out first.
        """
        core = self._core
        target = core.request_flush()
        settled = self._settled
        if settled is None:
            return core.settled >= target
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while core.settled < target and not core.stopped:
                    settled.clear()
                    await settled.wait()
        return core.settled >= target

    async def aclose(
        self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S
    ) -> RequestLogStats:
        """Write the queued rows, waiting at most ``timeout_s``, and stop.

        Rows still unwritten at the deadline are dropped and counted as
        ``close_timeout``. That includes a batch whose COMMIT the deadline
        interrupted, even if it committed. Later ``log()`` calls are counted
        as dropped (``closed``). Returns the final counters.
        """
        self._core.begin_close(time.monotonic() + timeout_s)
        task = self._task
        if task is None:
            self._core.abandon()
            self._core.finish()
            return self.stats()
        try:
            # A little longer than the core's own deadline, so that a writer
            # that is not stuck in I/O stops by itself.
            await asyncio.wait_for(asyncio.shield(task), timeout_s + 0.1)
        except TimeoutError:
            self._core.abandon()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return self.stats()

    async def __aenter__(self) -> AsyncRequestLog:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _wake(self) -> None:
        self._call_in_loop(self._wakeup)

    def _notify_settled(self) -> None:
        self._call_in_loop(self._settled)

    def _call_in_loop(self, event: asyncio.Event | None) -> None:
        loop = self._loop
        if loop is None or event is None:
            return
        if threading.get_ident() == self._loop_thread:
            event.set()
            return
        with contextlib.suppress(RuntimeError):
            # RuntimeError: the loop is closed, so no writer is left to wake.
            loop.call_soon_threadsafe(event.set)

    async def _run(self) -> None:
        core = self._core
        wakeup = self._wakeup
        assert wakeup is not None
        try:
            while True:
                wakeup.clear()
                step = core.next_step(time.monotonic())
                if isinstance(step, Wait):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(step.timeout):
                            await wakeup.wait()
                elif isinstance(step, Write):
                    await self._write(step.rows)
                elif isinstance(step, CheckCommit):
                    await self._check_commit(step.xid)
                else:
                    break
        except Exception:
            # A bug in the writer: I/O errors are handled in the steps.
            logger.exception(
                "request log writer stopped by an unexpected error; the rows "
                "still queued are not written",
                extra={"action": "request_log.crashed"},
            )
        finally:
            core.drop_unfinished()
            await self._close_connection()
            core.finish()

    async def _open_connection(self) -> psycopg.AsyncConnection[Any]:
        try:
            conn = await self._connection_class.connect(
                self.target.conninfo, **self._connect_kwargs()
            )
        except psycopg.Error as exc:
            error = self._connect_error(exc)
        else:
            _prepare_connection(conn)
            return conn
        raise error

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await self._open_connection()
        return self._conn

    async def _write(self, rows: list[CopyRow]) -> None:
        stage = STAGE_CONNECT
        xid: str | None = None
        reused = self._conn is not None and not self._conn.closed
        try:
            conn = await self._connection()
            stage = STAGE_BEGIN
            cursor = await conn.execute(self._begin_sql)
            while cursor.nextset():
                pass
            xid = str(_first_value(await cursor.fetchone()))
            async with cursor.copy(COPY_SQL) as copy:
                copy.set_types(COPY_TYPES)
                stage = STAGE_COPY
                for row in rows:
                    await copy.write_row(row)
            stage = STAGE_COMMIT
            await conn.execute("COMMIT")
        except Exception as exc:
            await self._end_transaction()
            self._core.write_failed(exc, stage=stage, xid=xid, reused=reused)
        else:
            self._core.write_succeeded()

    async def _check_commit(self, xid: str) -> None:
        try:
            conn = await self._connection()
            cursor = await conn.execute(_XACT_STATUS, (xid,))
            status = _first_value(await cursor.fetchone())
        except Exception as exc:
            await self._end_transaction()
            self._core.commit_check_failed(exc)
        else:
            self._core.commit_status(status)

    async def _end_transaction(self) -> None:
        """Roll back what a failed step left open, or drop a broken connection."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        if conn.info.transaction_status == TransactionStatus.IDLE:
            return
        try:
            await conn.execute("ROLLBACK")
        except psycopg.Error:
            await self._close_connection()

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def _first_value(row: tuple[Any, ...] | None) -> Any:
    if row is None:
        raise psycopg.ProgrammingError("the query returned no row")
    return row[0]
