"""The decisions of the request log writer, shared by its thread and asyncio loops.

:class:`WriterCore` does no I/O. Callers of ``log()`` hand it sanitized rows
through :meth:`WriterCore.enqueue`. The writer loop calls :meth:`next_step`
for its next step (wait, write a batch, check whether an interrupted COMMIT
was applied, or stop), performs it, and reports the outcome. The core keeps the
queue, decides when a batch is due, schedules retries with capped
exponential backoff, isolates rows that the database rejects, counts
everything, and writes the rate-limited log messages.

The writer settles rows in the order they were queued, and counts each
queued row once, as written or as dropped with a reason.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time
import types
from collections.abc import Callable, Mapping

import psycopg

from mcp_authdb.errors import InvalidValueError
from mcp_authdb.store.request_log_sanitize import CopyRow

logger = logging.getLogger("mcp_authdb.store.request_log")

# Reasons in RequestLogStats.dropped.
DROP_QUEUE_FULL = "queue_full"
DROP_REJECTED = "rejected"
DROP_CLOSED = "closed"
DROP_CLOSE_TIMEOUT = "close_timeout"

# The Python memory a queued row takes besides its texts and parameters, an
# estimate for the queue's byte limit.
ROW_OVERHEAD_BYTES = 400

# The stages of a write, which tell how to read its failure.
STAGE_CONNECT = "connect"
STAGE_BEGIN = "begin"
STAGE_COPY = "copy"
STAGE_COMMIT = "commit"

# SQLSTATE classes of errors caused by the data of a row: data exception,
# integrity constraint violation, program limit exceeded (a row too big).
_DATA_ERROR_CLASSES = ("22", "23", "54")
# SQLSTATEs that end the session: admin, crash and startup shutdowns.
_SESSION_LOST = ("57P01", "57P02", "57P03")
# How long a commit may stay "in progress" before the check gives up and
# writes the batch again; a backend finishes its COMMIT long before this.
_IN_PROGRESS_LIMIT_S = 60.0


@dataclasses.dataclass(frozen=True)
class RequestLogStats:
    """Counters of a request log writer, for metrics.

    ``queued`` counts rows that ``log()`` accepted, and ``written`` rows
    committed to request_logs. ``dropped`` counts lost rows by reason:

    - ``queue_full``: the queue was full, so the row was never queued;
    - ``closed``: ``log()`` was called after ``close()``, never queued;
    - ``rejected``: the database rejected the row's data;
    - ``close_timeout``: the row was still unwritten when ``close()`` gave up.

    ``queue_depth`` is the number of rows queued and not yet written or
    dropped, so ``queued == written + dropped["rejected"] +
    dropped["close_timeout"] + queue_depth``. ``batches`` counts committed
    COPY transactions, and ``failed_attempts`` the writes and commit checks
    that failed and were retried.
    """

    queued: int
    written: int
    dropped: Mapping[str, int]
    queue_depth: int
    batches: int
    failed_attempts: int

    @property
    def dropped_total(self) -> int:
        """All rows dropped, for every reason."""
        return sum(self.dropped.values())


@dataclasses.dataclass(frozen=True)
class Wait:
    """Wait for a wake-up, or at most ``timeout`` seconds (None: no limit)."""

    timeout: float | None


@dataclasses.dataclass(frozen=True)
class Write:
    """Write ``rows`` with one COPY in one transaction."""

    rows: list[CopyRow]


@dataclasses.dataclass(frozen=True)
class CheckCommit:
    """Ask ``pg_xact_status`` whether transaction ``xid`` committed."""

    xid: str


@dataclasses.dataclass(frozen=True)
class Stop:
    """Close the connection and end the writer loop."""


Step = Wait | Write | CheckCommit | Stop

# A queued row, the monotonic time it was queued, and its estimated size.
_Queued = tuple[CopyRow, float, int]


@dataclasses.dataclass(frozen=True)
class WriterOptions:
    """The limits and timings of a writer; see the public classes for each one."""

    batch_size: int
    max_delay_s: float
    max_queue_rows: int
    max_queue_bytes: int
    min_backoff_s: float
    max_backoff_s: float
    report_interval_s: float

    def __post_init__(self) -> None:
        _require_int("batch_size", self.batch_size, 1, 1_000_000)
        _require_int("max_queue_rows", self.max_queue_rows, 1, 100_000_000)
        _require_int("max_queue_bytes", self.max_queue_bytes, 1, 2**50)
        if self.max_queue_rows < self.batch_size:
            raise InvalidValueError(
                f"max_queue_rows={self.max_queue_rows} is below batch_size="
                f"{self.batch_size}; a batch is taken from the queue, so allow "
                "at least one batch"
            )
        _require_seconds("max_delay_s", self.max_delay_s)
        _require_seconds("min_backoff_s", self.min_backoff_s)
        _require_seconds("max_backoff_s", self.max_backoff_s)
        _require_seconds("report_interval_s", self.report_interval_s)
        if self.max_backoff_s < self.min_backoff_s:
            raise InvalidValueError(
                f"max_backoff_s={self.max_backoff_s:g} is below min_backoff_s="
                f"{self.min_backoff_s:g}; pass a maximum at least as large"
            )


def _require_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueError(
            f"{name}={value!r} is a {type(value).__name__}, not a whole number; "
            f"pass a number from {low} to {high}"
        )
    if not low <= value <= high:
        raise InvalidValueError(
            f"{name}={value} is out of range; pass a number from {low} to {high}"
        )


def _require_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValueError(
            f"{name}={value!r} is a {type(value).__name__}, not a number of "
            "seconds; pass a positive number"
        )
    if not 0 < value < 86_400:
        raise InvalidValueError(
            f"{name}={value!r} is out of range; pass a positive number of "
            "seconds below one day"
        )


def error_summary(exc: BaseException) -> str:
    """Return the first line of ``exc`` and its SQLSTATE, never its detail.

    The detail of a rejected row repeats the row's values, so it is left out.
    """
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        text = exc.diag.message_primary
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text[:300] or type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{text} (SQLSTATE {sqlstate})" if sqlstate else text


def is_connection_loss(exc: BaseException) -> bool:
    """Tell whether ``exc`` means the connection, not the statement, failed."""
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        # A broken socket or a refused connection has no SQLSTATE.
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return sqlstate.startswith("08") or sqlstate in _SESSION_LOST


def is_data_error(exc: BaseException, stage: str) -> bool:
    """Tell whether ``exc`` blames the data of the rows being copied.

    Only errors of the COPY, or of the COMMIT that checks deferred
    constraints, count. An error without SQLSTATE raised while rows were
    being written to the COPY, other than a lost connection, comes from a
    dumper rejecting a value.
    """
    if isinstance(exc, psycopg.Error) and exc.sqlstate:
        in_data_stage = stage in (STAGE_COPY, STAGE_COMMIT)
        return in_data_stage and exc.sqlstate.startswith(_DATA_ERROR_CLASSES)
    return stage == STAGE_COPY and not is_connection_loss(exc)


class _Reports:
    """Rate-limited warnings: the first at once, then a count per interval.

    A key's window opens with its first event, whose message the caller logs.
    Later events in the window are counted, and when the window ends with a
    count, :meth:`due` returns it for a summary and a new window opens.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._windows: dict[str, list[float]] = {}

    def first(self, key: str, now: float, count: int = 1) -> bool:
        """Record ``count`` events; return True when the caller logs the first now.

        The events after the first are counted for the next summary.
        """
        window = self._windows.get(key)
        if window is None:
            self._windows[key] = [now + self.interval_s, count - 1]
            return True
        window[1] += count
        return False

    def due(self, now: float) -> list[tuple[str, int, float]]:
        """Return the keys whose window ended with events, their counts and
        the seconds their window lasted."""
        ended = []
        for key, window in list(self._windows.items()):
            if window[0] > now:
                continue
            if window[1]:
                ended.append((key, int(window[1]), self.interval_s))
                self._windows[key] = [now + self.interval_s, 0]
            else:
                del self._windows[key]
        return ended

    def next_due(self) -> float | None:
        """Return the monotonic time the next window ends, or None."""
        return min((window[0] for window in self._windows.values()), default=None)

    def pending(self, now: float) -> list[tuple[str, int, float]]:
        """Return and forget every count not yet summarized, when stopping."""
        counts = [
            (key, int(window[1]), now - (window[0] - self.interval_s))
            for key, window in self._windows.items()
            if window[1]
        ]
        self._windows.clear()
        return counts

    def reset(self, key: str) -> int:
        """Close the window of ``key``; return the events counted in it."""
        window = self._windows.pop(key, None)
        return int(window[1]) if window else 0


class WriterCore:
    """The queue, the batching and retry decisions, and the counters.

    :meth:`enqueue`, :meth:`stats`, :meth:`request_flush` and
    :meth:`begin_close` may be called from any thread. Every other method
    belongs to the single writer loop. ``wake`` is called, outside any lock,
    when the writer should look at the queue again.
    """

    def __init__(self, options: WriterOptions, description: str) -> None:
        self.options = options
        self.description = description
        self.wake: Callable[[], None] = _no_wake
        self.settled_callback: Callable[[], None] = _no_wake

        self._lock = threading.Lock()
        self._pending: collections.deque[_Queued] = collections.deque()
        self._pending_bytes = 0
        self._held_rows = 0
        self._held_bytes = 0
        self._queued = 0
        self._written = 0
        self._settled = 0
        self._dropped: dict[str, int] = {}
        self._batches = 0
        self._failed_attempts = 0
        self._flush_upto = 0
        self._closed = False
        self._deadline: float | None = None
        self._abandoned = False
        self.stopped = False

        # Writer-only state. ``_work`` is a stack of batches, the next one
        # last; a data error splits the batch on top into two.
        self._work: list[list[_Queued]] = []
        self._unknown_xid: str | None = None
        self._unknown_since = 0.0
        self._retry_at = 0.0
        self._failures = 0
        self._failing_since: float | None = None
        self._last_error = ""
        self._reports = _Reports(options.report_interval_s)
        self._full_reported = 0

    # Any thread.

    def enqueue(self, row: CopyRow, now: float) -> None:
        """Queue ``row``, or count it as dropped when the queue is full or closed."""
        size = ROW_OVERHEAD_BYTES + len(row[1])
        if row[0] is not None:
            size += len(row[0])
        if row[2] is not None:
            size += len(row[2])
        if row[5] is not None:
            size += len(row[5])
        options = self.options
        with self._lock:
            if self._closed:
                self._dropped[DROP_CLOSED] = self._dropped.get(DROP_CLOSED, 0) + 1
                return
            if (
                len(self._pending) + self._held_rows >= options.max_queue_rows
                or self._pending_bytes + self._held_bytes + size
                > options.max_queue_bytes
            ):
                self._dropped[DROP_QUEUE_FULL] = (
                    self._dropped.get(DROP_QUEUE_FULL, 0) + 1
                )
                return
            self._pending.append((row, now, size))
            self._pending_bytes += size
            self._queued += 1
            count = len(self._pending)
        if count == 1 or count == options.batch_size:
            self.wake()

    def stats(self) -> RequestLogStats:
        """Return a snapshot of the counters."""
        with self._lock:
            return RequestLogStats(
                queued=self._queued,
                written=self._written,
                dropped=types.MappingProxyType(dict(self._dropped)),
                queue_depth=len(self._pending) + self._held_rows,
                batches=self._batches,
                failed_attempts=self._failed_attempts,
            )

    @property
    def settled(self) -> int:
        """Rows queued so far that were written or dropped."""
        return self._settled

    def request_flush(self) -> int:
        """Make every row queued so far due now; return the count to wait for."""
        with self._lock:
            self._flush_upto = max(self._flush_upto, self._queued)
            target = self._queued
        self.wake()
        return target

    def begin_close(self, deadline: float) -> None:
        """Stop accepting rows, and write the rest until ``deadline`` (monotonic)."""
        with self._lock:
            self._closed = True
            if self._deadline is None or deadline < self._deadline:
                self._deadline = deadline
        self.wake()

    def abandon(self) -> None:
        """Drop the rows still queued, as the close deadline has passed.

        A batch that the writer is writing at this moment is settled by the
        writer when the attempt ends, so it is counted once, written or not.
        """
        with self._lock:
            if self._abandoned:
                return
            self._abandoned = True
            count = len(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._count_dropped(count, DROP_CLOSE_TIMEOUT)
            self._settled += count
            unwritten = self._held_rows + count
        if unwritten:
            logger.error(
                "request log writer closed with %d rows not written to %s "
                "(close timeout); they are counted as dropped",
                unwritten,
                self.description,
                extra={"action": "request_log.close_timeout", "rows": unwritten},
            )
        self.settled_callback()
        self.wake()

    # The writer loop.

    def next_step(self, now: float) -> Step:
        """Return what the writer does next."""
        self._report(now)
        with self._lock:
            deadline = self._deadline
            abandoned = self._abandoned
        if not abandoned and deadline is not None and now >= deadline:
            self.abandon()
            abandoned = True
        if abandoned:
            self._drop_work(DROP_CLOSE_TIMEOUT)
            return Stop()

        if self._work:
            if now < self._retry_at:
                return Wait(self._wait_until(self._retry_at, now))
            if self._unknown_xid is not None:
                return CheckCommit(self._unknown_xid)
            return Write([queued[0] for queued in self._work[-1]])

        options = self.options
        with self._lock:
            count = len(self._pending)
            if count == 0:
                if self._closed:
                    return Stop()
                return Wait(self._wait_until(None, now))
            head_seq = self._settled + self._held_rows + 1
            due_at = self._pending[0][1] + options.max_delay_s
            due = (
                count >= options.batch_size
                or self._closed
                or self._flush_upto >= head_seq
                or now >= due_at
            )
            if due:
                batch = self._take(min(count, options.batch_size))
        if not due:
            return Wait(self._wait_until(due_at, now))
        self._work = [batch]
        return Write([queued[0] for queued in batch])

    def write_succeeded(self) -> None:
        """Settle the batch just written: its COPY committed."""
        self._recovered()
        self._settle_written(self._work.pop())

    def write_failed(
        self, exc: BaseException, *, stage: str, xid: str | None, reused: bool
    ) -> None:
        """Decide what to do after the write of the batch on top failed.

        ``stage`` is where it failed. ``xid`` is the transaction's id once
        known. A connection lost during COMMIT leaves the outcome unknown, so
        the next step queries the transaction's status before anything is
        written again.
        ``reused`` is true when the connection was open before this attempt.
        A server restart or an idle timeout may have closed it meanwhile, so
        its loss at BEGIN is retried at once on a new connection, without a
        warning, unless the writer was already failing.
        """
        now = time.monotonic()
        batch = self._work[-1]
        if (
            reused
            and stage == STAGE_BEGIN
            and self._failures == 0
            and is_connection_loss(exc)
        ):
            logger.debug(
                "the idle request log connection to %s was closed (%s); reconnecting",
                self.description,
                error_summary(exc),
                extra={"action": "request_log.reconnect"},
            )
            self._count_failure()
            self._retry_at = now
            return
        if stage == STAGE_COMMIT and xid is not None and is_connection_loss(exc):
            self._unknown_xid = xid
            self._unknown_since = now
            self._retry_at = now
            logger.warning(
                "lost the connection to %s while committing %d request log rows; "
                "asking the server whether transaction %s committed before "
                "writing them again",
                self.description,
                len(batch),
                xid,
                extra={"action": "request_log.commit_unknown", "xid": xid},
            )
            self._count_failure()
            return
        if is_data_error(exc, stage):
            self._recovered()
            self._isolate(exc)
            return
        self._failed(exc, now)

    def commit_status(self, status: str | None) -> None:
        """Act on ``pg_xact_status`` of the batch whose COMMIT was interrupted."""
        now = time.monotonic()
        xid = self._unknown_xid
        self._recovered()
        if status == "committed":
            self._unknown_xid = None
            logger.info(
                "transaction %s committed before the connection was lost; its "
                "request log rows are written",
                xid,
                extra={"action": "request_log.commit_confirmed", "xid": xid},
            )
            self._settle_written(self._work.pop())
        elif (
            status == "in progress" and now - self._unknown_since < _IN_PROGRESS_LIMIT_S
        ):
            self._retry_at = now + self.options.min_backoff_s
        else:
            self._unknown_xid = None
            if status == "aborted":
                logger.info(
                    "transaction %s did not commit; writing its request log rows again",
                    xid,
                    extra={"action": "request_log.commit_aborted", "xid": xid},
                )
            else:
                # NOTE: the server returned no status for the transaction, or
                # "in progress" for too long, so the rows are written again
                # and may be stored twice.
                logger.warning(
                    "could not tell whether transaction %s committed (status %s); "
                    "writing its %d request log rows again, which may store them "
                    "twice",
                    xid,
                    status,
                    len(self._work[-1]),
                    extra={"action": "request_log.commit_unknown_resent", "xid": xid},
                )

    def commit_check_failed(self, exc: BaseException) -> None:
        """Retry the commit check later, or write again if the xid is unknown.

        PostgreSQL raises "transaction ID ... is in the future" (SQLSTATE
        22023) for an xid it never assigned, which means that this server
        did not commit it.
        """
        if isinstance(exc, psycopg.Error) and exc.sqlstate == "22023":
            self.commit_status("aborted")
            return
        self._failed(exc, time.monotonic())

    def finish(self) -> None:
        """Log the summaries still open, and mark the writer as stopped."""
        self._report(time.monotonic(), final=True)
        self.stopped = True
        self.settled_callback()

    def drop_unfinished(self) -> None:
        """Drop the batches in hand, when the loop ends early (cancelled)."""
        self._drop_work(DROP_CLOSE_TIMEOUT)

    # Helpers of the writer loop.

    def _take(self, count: int) -> list[_Queued]:
        # Called with the lock held.
        if count == len(self._pending):
            batch = list(self._pending)
            self._pending.clear()
        else:
            popleft = self._pending.popleft
            batch = [popleft() for _ in range(count)]
        size = sum(queued[2] for queued in batch)
        self._pending_bytes -= size
        self._held_rows += count
        self._held_bytes += size
        return batch

    def _release(self, batch: list[_Queued]) -> None:
        # Called with the lock held.
        self._held_rows -= len(batch)
        self._held_bytes -= sum(queued[2] for queued in batch)
        self._settled += len(batch)

    def _settle_written(self, batch: list[_Queued]) -> None:
        with self._lock:
            self._release(batch)
            self._written += len(batch)
            self._batches += 1
        self.settled_callback()

    def _settle_dropped(self, batch: list[_Queued], reason: str) -> None:
        with self._lock:
            self._release(batch)
            self._count_dropped(len(batch), reason)
        self.settled_callback()

    def _count_dropped(self, count: int, reason: str) -> None:
        # Called with the lock held.
        if count:
            self._dropped[reason] = self._dropped.get(reason, 0) + count

    def _drop_work(self, reason: str) -> None:
        while self._work:
            self._settle_dropped(self._work.pop(), reason)
        self._unknown_xid = None

    def _isolate(self, exc: BaseException) -> None:
        """Split the batch on top, or drop it when it is a single row."""
        batch = self._work.pop()
        if len(batch) > 1:
            middle = len(batch) // 2
            self._work += [batch[middle:], batch[:middle]]
            logger.debug(
                "PostgreSQL rejected a batch of %d request log rows (%s); "
                "splitting it to find the rejected rows",
                len(batch),
                error_summary(exc),
                extra={"action": "request_log.split", "rows": len(batch)},
            )
            return

        self._settle_dropped(batch, DROP_REJECTED)
        row = batch[0][0]
        if self._reports.first(DROP_REJECTED, time.monotonic()):
            logger.warning(
                "PostgreSQL rejected a request log row and it was dropped: %s; "
                "method %r, user %r, created at %s",
                error_summary(exc),
                row[1][:100],
                row[0],
                row[6].isoformat(),
                extra={"action": "request_log.rejected"},
            )

    def _failed(self, exc: BaseException, now: float) -> None:
        self._count_failure()
        self._failures += 1
        self._last_error = error_summary(exc)
        step = self.options.min_backoff_s * 2.0 ** min(self._failures - 1, 60)
        delay = min(self.options.max_backoff_s, step) * random.uniform(0.5, 1.0)
        self._retry_at = now + delay
        if self._failing_since is None:
            self._failing_since = now
        if self._reports.first("failure", now):
            logger.warning(
                "request log writer cannot write to %s: %s; keeping %d rows and "
                "retrying with backoff",
                self.description,
                self._last_error,
                self.stats().queue_depth,
                extra={"action": "request_log.write_failed"},
            )

    def _count_failure(self) -> None:
        with self._lock:
            self._failed_attempts += 1

    def _recovered(self) -> None:
        self._failures = 0
        if self._failing_since is None:
            return
        failed_for = time.monotonic() - self._failing_since
        self._failing_since = None
        self._reports.reset("failure")
        logger.info(
            "request log writer reached %s again after %.1f s; %d rows waiting",
            self.description,
            failed_for,
            self.stats().queue_depth,
            extra={"action": "request_log.recovered"},
        )

    def _wait_until(self, at: float | None, now: float) -> float | None:
        """Return the wait from ``now`` to ``at``, cut short for reports and close."""
        times = [at, self._reports.next_due(), self._deadline]
        soonest = min((t for t in times if t is not None), default=None)
        return None if soonest is None else max(0.0, soonest - now)

    def _report(self, now: float, *, final: bool = False) -> None:
        """Log the summaries that are due (all of them if ``final``) and new drops."""
        with self._lock:
            full = self._dropped.get(DROP_QUEUE_FULL, 0)
            depth = len(self._pending) + self._held_rows
        new_full = full - self._full_reported
        if new_full:
            self._full_reported = full
            if self._reports.first(DROP_QUEUE_FULL, now, new_full):
                logger.warning(
                    "request log queue is full (%d rows waiting, at most %d rows "
                    "or %d bytes); dropping new rows",
                    depth,
                    self.options.max_queue_rows,
                    self.options.max_queue_bytes,
                    extra={"action": "request_log.queue_full"},
                )
        counts = self._reports.pending(now) if final else self._reports.due(now)
        for key, count, interval in counts:
            if key == "failure":
                logger.warning(
                    "request log writer still cannot write to %s: %d more failed "
                    "attempts in the last %.1f s, %d rows waiting; last error: %s",
                    self.description,
                    count,
                    interval,
                    depth,
                    self._last_error,
                    extra={"action": "request_log.write_failed", "count": count},
                )
            elif key == DROP_QUEUE_FULL:
                logger.warning(
                    "request log queue was full: dropped %d more rows in the last "
                    "%.1f s",
                    count,
                    interval,
                    extra={"action": "request_log.queue_full", "count": count},
                )
            else:
                logger.warning(
                    "PostgreSQL rejected %d more request log rows in the last %.1f s; "
                    "they were dropped",
                    count,
                    interval,
                    extra={"action": "request_log.rejected", "count": count},
                )


def _no_wake() -> None:
    pass
