"""One connection pool per process, a driver that runs database operations,
and a batcher that merges concurrent lookups into one statement.

An *operation* is a generator that yields :class:`Query` objects and receives
a :class:`Result` for each one; what it returns is the operation's result. It
does no I/O of its own, so one operation serves both :class:`AsyncDatabase`
and :class:`Database`::

    def count_sessions(user_id: str) -> Operation[int]:
        result = yield Query("SELECT count(*) FROM user_sessions WHERE user_id = %s",
                             (user_id,))
        return int(result.rows[0][0])

    n = await database.run(lambda: count_sessions("u1"), idempotent=True)

The driver takes a pooled connection, runs the operation in one transaction
(or, with ``transaction=False``, statement by statement in autocommit), and
returns the connection. When the connection is lost, because PostgreSQL
restarted or a network path broke, the driver retries the whole operation with
a fresh connection until ``wait_s`` has passed, provided that a retry cannot
apply the operation twice: an operation in a transaction is retried when the
loss came before its COMMIT was sent, and one in autocommit only when it is
declared ``idempotent``. Before it runs anything on a pooled connection, the
driver checks, without a round trip, that the server has not closed it while
it sat idle in the pool, so that a restart of PostgreSQL does not fail the
first statements that do not qualify for a retry.

Pool connections run in autocommit, so a single SELECT costs one round trip,
without BEGIN and COMMIT around it. Statements are prepared on the server after
a few executions, unless ``DB_TRANSACTION_POOLER`` is set: a pooler in
transaction mode, such as PgBouncer, hands each transaction to any server
connection, where a prepared statement may not exist. In that mode the
statement timeout, which such poolers reject as a startup parameter, is set by
``SET LOCAL`` in each transaction instead, and single statements run in a
transaction of their own for it.

Many concurrent lookups of single rows by key, such as access-token
validations, can share one statement and one round trip through a batcher:
see :meth:`AsyncDatabase.lookup_batcher` and :meth:`Database.lookup_batcher`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import select
import threading
import time
import weakref
from collections.abc import Callable, Generator, Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import sql as pgsql
from psycopg.pq import ExecStatus
from psycopg.rows import TupleRow

from mcp_authdb.db.connection import ConnectionTarget, register_adapters
from mcp_authdb.db.settings import Settings
from mcp_authdb.errors import ConnectionFailedError, DatabaseError, InvalidValueError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a call waits for a pooled connection, and, after a connection
# loss, how long it goes on retrying.
DEFAULT_WAIT_S = 10.0
# psycopg prepares a statement on the server after this many executions.
PREPARE_THRESHOLD = 5
# Pause between retries once the first immediate retry failed; doubled after
# each failure up to the maximum.
_FIRST_PAUSE_S = 0.05
_MAX_PAUSE_S = 1.0

# The largest number of keys that a batcher sends in one statement. A caller
# with more keys than this still gets a statement of its own.
DEFAULT_MAX_BATCH_KEYS = 500
# How many statements one batcher runs at the same time, each on its own
# pooled connection.
DEFAULT_MAX_IN_FLIGHT = 2

# SQLSTATE classes of failures that do not depend on the keys of a batch:
# connection exceptions, insufficient resources, operator intervention (which
# includes statement timeouts and cancellations), system and internal errors.
_SHARED_FAILURE_CLASSES = frozenset({"08", "53", "57", "58", "XX"})


@dataclasses.dataclass(frozen=True)
class Query:
    """One SQL statement of an operation, with its parameters.

    With ``binary``, the rows come in PostgreSQL's binary format, which loads
    timestamps and arrays with less work. Built-in types give the same Python
    values as in text format. A type that psycopg has no binary loader for,
    such as an enum that was not registered, gives ``bytes``.
    """

    sql: str
    params: Sequence[Any] | Mapping[str, Any] | None = None
    binary: bool = False


@dataclasses.dataclass(frozen=True)
class Result:
    """The rows of one statement (empty when it returns none) and its row count."""

    rows: list[tuple[Any, ...]]
    rowcount: int


Operation = Generator[Query, Result, T]


class _Attempt:
    """The retry policy shared by both drivers: when to retry, how long to pause.

    A driver calls :meth:`failed` with the error of an attempt. It returns the
    pause before the next attempt, or raises the error for the caller.
    """

    def __init__(self, wait_s: float, description: str) -> None:
        self._deadline = time.monotonic() + wait_s
        self._wait_s = wait_s
        self._description = description
        self._failures = 0
        self.commit_sent = False

    def remaining_s(self) -> float:
        """Return the time left before the deadline, in seconds, at least 0."""
        return max(0.0, self._deadline - time.monotonic())

    def failed(self, exc: Exception, *, retryable: bool) -> float:
        if isinstance(exc, psycopg_pool.PoolClosed):
            raise ConnectionFailedError(
                f"the connection pool of {self._description} is closed; open the "
                "database object again before running operations on it"
            ) from exc
        if isinstance(exc, psycopg_pool.PoolTimeout):
            raise ConnectionFailedError(
                f"no connection to {self._description} became available within "
                f"{self._wait_s:g} s; check that PostgreSQL is running and "
                "reachable, or raise DB_CONNECTION_POOL_SIZE if every connection "
                "is busy"
            ) from exc
        if not _is_connection_loss(exc):
            if isinstance(exc, psycopg.Error):
                raise DatabaseError.from_driver(
                    f"a statement failed on {self._description}: "
                    f"{_first_line(exc)} (SQLSTATE {exc.sqlstate})",
                    exc,
                ) from exc
            raise exc
        if self.commit_sent:
            raise DatabaseError(
                f"the connection to {self._description} was lost while a "
                "transaction was committing, so whether it was applied is "
                "unknown; check the data before repeating the call"
            ) from exc
        if not retryable:
            raise ConnectionFailedError(
                f"the connection to {self._description} was lost during a "
                f"statement outside a transaction ({_first_line(exc)}). It was not "
                "retried, because the statement may have been applied; run it in "
                "a transaction, or declare it idempotent if repeating it is safe"
            ) from exc
        if time.monotonic() >= self._deadline:
            raise ConnectionFailedError(
                f"no usable connection to {self._description} within "
                f"{self._wait_s:g} s: {_first_line(exc)}; check that PostgreSQL "
                "is running and reachable"
            ) from exc

        self._failures += 1
        if self._failures == 1:
            logger.warning(
                "lost a connection to %s (%s); retrying",
                self._description,
                _first_line(exc),
                extra={"action": "db.retry"},
            )
            return 0.0
        pause = min(_MAX_PAUSE_S, _FIRST_PAUSE_S * 2.0 ** (self._failures - 2))
        return min(pause, self.remaining_s())


def _is_connection_loss(exc: BaseException) -> bool:
    """Tell whether ``exc`` means the connection, not the statement, failed."""
    if isinstance(exc, psycopg.errors.AdminShutdown | psycopg.errors.CannotConnectNow):
        return True
    # A broken socket gives an OperationalError with no SQLSTATE.
    return isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pool_kwargs(settings: Settings) -> dict[str, Any]:
    threshold = None if settings.transaction_pooler else PREPARE_THRESHOLD
    return {"autocommit": True, "prepare_threshold": threshold}


def _set_local_timeout(settings: Settings) -> pgsql.Composed:
    return pgsql.SQL("SET LOCAL statement_timeout = {}").format(
        pgsql.Literal(settings.command_timeout_ms)
    )


def _configure(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    register_adapters(conn.adapters)


async def _configure_async(conn: psycopg.AsyncConnection[Any]) -> None:
    _configure(conn)


def _closed_while_idle(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
) -> bool:
    """Tell whether the server sent anything to a connection idle in the pool.

    PostgreSQL sends nothing unasked to an idle connection that is not
    listening for notifications, except an error just before it closes the
    connection (a shutdown, ``pg_terminate_backend``, an idle timeout of the
    server or of a pooler). So readable input means the connection is gone.
    The check is one ``poll`` system call, with no round trip.
    """
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _PooledAsyncConnection(psycopg.AsyncConnection[TupleRow]):
    """A pool connection that keeps one cursor for all the driver's statements.

    Creating a cursor copies the connection's adapters, a large part of the
    client's work for a short statement.
    """

    driver_cursor: psycopg.AsyncCursor[TupleRow] | None = None


class _PooledConnection(psycopg.Connection[TupleRow]):
    """The blocking counterpart of :class:`_PooledAsyncConnection`."""

    driver_cursor: psycopg.Cursor[TupleRow] | None = None


class AsyncDatabase:
    """The asyncio connection pool of one process, and the operation driver.

    ``settings.pool_size`` bounds the number of connections. Create one per
    process and share it. Open it with ``async with`` or :meth:`open`; close
    it with :meth:`close`.
    """

    def __init__(
        self,
        target: ConnectionTarget,
        settings: Settings,
        *,
        wait_s: float = DEFAULT_WAIT_S,
        min_size: int = 1,
    ) -> None:
        self.target = target
        self.settings = settings
        self.wait_s = wait_s
        self.pool = psycopg_pool.AsyncConnectionPool(
            target.conninfo,
            connection_class=_PooledAsyncConnection,
            min_size=min(min_size, settings.pool_size),
            max_size=settings.pool_size,
            kwargs=_pool_kwargs(settings),
            configure=_configure_async,
            open=False,
            timeout=wait_s,
            name="mcp-authdb",
        )
        self._set_timeout = _set_local_timeout(settings)
        self._batchers: weakref.WeakSet[AsyncLookupBatcher] = weakref.WeakSet()

    async def open(self) -> None:
        """Open the pool and wait for its first connection.

        Raises :class:`ConnectionFailedError` when none opens within
        ``wait_s``.
        """
        await self.pool.open()
        try:
            await self.pool.wait(timeout=self.wait_s)
        except psycopg_pool.PoolTimeout:
            await self.pool.close()
            raise ConnectionFailedError(
                f"could not open a connection to {self.target.description} "
                f"within {self.wait_s:g} s; check that PostgreSQL is running "
                "and DATABASE_URL is right"
            ) from None

    async def close(self) -> None:
        """Let the batches already running finish, then close the pool."""
        for batcher in list(self._batchers):
            await batcher.wait_idle()
        await self.pool.close()

    async def __aenter__(self) -> AsyncDatabase:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def run(
        self,
        operation: Callable[[], Operation[T]],
        *,
        transaction: bool = True,
        idempotent: bool = False,
    ) -> T:
        """Run the operation that ``operation()`` makes, and return its result.

        ``operation`` is called again for each retry, so it must build a new
        generator each time. Raises :class:`DatabaseError` when a statement
        fails. Raises :class:`ConnectionFailedError` when no connection worked
        within ``wait_s``, or when a connection was lost during a statement
        that is not retried. An error raised by the operation itself
        propagates unchanged, and its transaction is rolled back.
        """
        attempt = _Attempt(self.wait_s, self.target.description)
        in_transaction = transaction or self.settings.transaction_pooler
        while True:
            try:
                return await self._run_once(operation, in_transaction, attempt)
            except Exception as exc:
                pause = attempt.failed(exc, retryable=in_transaction or idempotent)
            await asyncio.sleep(pause)
            if pause == 0.0:
                await self.pool.check()

    def lookup_batcher(
        self,
        sql: str,
        *,
        key_column: int = 0,
        params: Mapping[str, Any] | None = None,
        keys_param: str = "keys",
        max_keys: int = DEFAULT_MAX_BATCH_KEYS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> AsyncLookupBatcher:
        """Return a batcher that runs concurrent lookups as shared statements.

        ``sql`` is one statement that takes the keys to look up as an array in
        the named parameter ``keys_param`` and returns, for each matching row,
        the row's key in the column at index ``key_column``::

            validate = database.lookup_batcher(
                "SELECT access_token_hash, user_id, expires_at FROM user_sessions"
                " WHERE access_token_hash = ANY(%(keys)s::text[])"
                " AND expires_at > now() AND revoked_at IS NULL",
            )
            rows = await validate.fetch([token_hash])

        ``params`` gives the statement's other named parameters, the same for
        every batch. A caller that finds fewer than ``max_in_flight``
        statements running starts one at the next turn of the event loop,
        with every caller that arrived by then. Callers that arrive while
        ``max_in_flight`` statements are running wait and share the next
        statement, with up to ``max_keys`` keys, so a busy process pays one
        round trip for many lookups. Each statement runs like
        an operation with ``transaction=False, idempotent=True``: it may be
        repeated after a connection loss, so it must be safe to repeat (a
        read, or a write such as touching a timestamp). The keys are sent as
        a binary array and the rows are read in binary format, as with
        ``Query(binary=True)``. Use the batcher from the event loop in which
        this database was opened.
        """
        batcher = AsyncLookupBatcher(
            self,
            _BatchPlan.build(sql, key_column, params, keys_param, max_keys),
            max_in_flight=_check_max_in_flight(max_in_flight),
        )
        self._batchers.add(batcher)
        return batcher

    async def _run_once(
        self,
        operation: Callable[[], Operation[T]],
        in_transaction: bool,
        attempt: _Attempt,
    ) -> T:
        conn = await self._getconn(attempt)
        try:
            if not in_transaction:
                return await _drive_async(conn, operation())
            async with conn.transaction():
                if self.settings.transaction_pooler:
                    await conn.execute(self._set_timeout)
                value = await _drive_async(conn, operation())
                attempt.commit_sent = True
            return value
        finally:
            await self.pool.putconn(conn)

    async def _getconn(self, attempt: _Attempt) -> _PooledAsyncConnection:
        """Take a pooled connection, skipping those the server closed meanwhile."""
        while True:
            conn = await self.pool.getconn(timeout=attempt.remaining_s())
            if not _closed_while_idle(conn):
                return conn
            _log_discarded(self.target)
            # The pool discards a closed connection and opens a replacement.
            await conn.close()
            await self.pool.putconn(conn)


class Database:
    """The thread-safe, blocking counterpart of :class:`AsyncDatabase`."""

    def __init__(
        self,
        target: ConnectionTarget,
        settings: Settings,
        *,
        wait_s: float = DEFAULT_WAIT_S,
        min_size: int = 1,
    ) -> None:
        self.target = target
        self.settings = settings
        self.wait_s = wait_s
        self.pool = psycopg_pool.ConnectionPool(
            target.conninfo,
            connection_class=_PooledConnection,
            min_size=min(min_size, settings.pool_size),
            max_size=settings.pool_size,
            kwargs=_pool_kwargs(settings),
            configure=_configure,
            open=False,
            timeout=wait_s,
            name="mcp-authdb",
        )
        self._set_timeout = _set_local_timeout(settings)

    def open(self) -> None:
        """Open the pool and wait for its first connection.

        Raises :class:`ConnectionFailedError` when none opens within
        ``wait_s``.
        """
        self.pool.open()
        try:
            self.pool.wait(timeout=self.wait_s)
        except psycopg_pool.PoolTimeout:
            self.pool.close()
            raise ConnectionFailedError(
                f"could not open a connection to {self.target.description} "
                f"within {self.wait_s:g} s; check that PostgreSQL is running "
                "and DATABASE_URL is right"
            ) from None

    def close(self) -> None:
        """Close the pool and its connections."""
        self.pool.close()

    def __enter__(self) -> Database:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(
        self,
        operation: Callable[[], Operation[T]],
        *,
        transaction: bool = True,
        idempotent: bool = False,
    ) -> T:
        """Run the operation that ``operation()`` makes, and return its result.

        The contract is that of :meth:`AsyncDatabase.run`.
        """
        attempt = _Attempt(self.wait_s, self.target.description)
        in_transaction = transaction or self.settings.transaction_pooler
        while True:
            try:
                return self._run_once(operation, in_transaction, attempt)
            except Exception as exc:
                pause = attempt.failed(exc, retryable=in_transaction or idempotent)
            time.sleep(pause)
            if pause == 0.0:
                self.pool.check()

    def lookup_batcher(
        self,
        sql: str,
        *,
        key_column: int = 0,
        params: Mapping[str, Any] | None = None,
        keys_param: str = "keys",
        max_keys: int = DEFAULT_MAX_BATCH_KEYS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> LookupBatcher:
        """Return a batcher that runs concurrent lookups as shared statements.

        The contract is that of :meth:`AsyncDatabase.lookup_batcher`, with
        threads in place of tasks: a thread that finds fewer than
        ``max_in_flight`` statements running runs one itself, for its own keys
        and those of the threads that wait.
        """
        return LookupBatcher(
            self,
            _BatchPlan.build(sql, key_column, params, keys_param, max_keys),
            max_in_flight=_check_max_in_flight(max_in_flight),
        )

    def _run_once(
        self,
        operation: Callable[[], Operation[T]],
        in_transaction: bool,
        attempt: _Attempt,
    ) -> T:
        conn = self._getconn(attempt)
        try:
            if not in_transaction:
                return _drive(conn, operation())
            with conn.transaction():
                if self.settings.transaction_pooler:
                    conn.execute(self._set_timeout)
                value = _drive(conn, operation())
                attempt.commit_sent = True
            return value
        finally:
            self.pool.putconn(conn)

    def _getconn(self, attempt: _Attempt) -> _PooledConnection:
        """Take a pooled connection, skipping those the server closed meanwhile."""
        while True:
            conn = self.pool.getconn(timeout=attempt.remaining_s())
            if not _closed_while_idle(conn):
                return conn
            _log_discarded(self.target)
            conn.close()
            self.pool.putconn(conn)


def _log_discarded(target: ConnectionTarget) -> None:
    logger.info(
        "discarding a pooled connection to %s that the server closed while it was idle",
        target.description,
        extra={"action": "db.pool.discard"},
    )


# Whether a statement returned rows is read from the result's status:
# cursor.description would build a Column object for every column of every
# statement.


def _returned_rows(
    cursor: psycopg.Cursor[Any] | psycopg.AsyncCursor[Any],
) -> bool:
    result = cursor.pgresult
    return result is not None and result.status == ExecStatus.TUPLES_OK


async def _drive_async(conn: _PooledAsyncConnection, operation: Operation[T]) -> T:
    cursor = conn.driver_cursor
    if cursor is None:
        cursor = conn.driver_cursor = conn.cursor()
    try:
        query = next(operation)
        while True:
            await cursor.execute(query.sql, query.params, binary=query.binary)
            rows = await cursor.fetchall() if _returned_rows(cursor) else []
            query = operation.send(Result(rows, cursor.rowcount))
    except StopIteration as stop:
        value: T = stop.value
        return value


def _drive(conn: _PooledConnection, operation: Operation[T]) -> T:
    cursor = conn.driver_cursor
    if cursor is None:
        cursor = conn.driver_cursor = conn.cursor()
    try:
        query = next(operation)
        while True:
            cursor.execute(query.sql, query.params, binary=query.binary)
            rows = cursor.fetchall() if _returned_rows(cursor) else []
            query = operation.send(Result(rows, cursor.rowcount))
    except StopIteration as stop:
        value: T = stop.value
        return value


# Batching: the plan and the bookkeeping shared by both batchers.


def _check_max_in_flight(value: int) -> int:
    if value < 1:
        raise InvalidValueError(
            f"max_in_flight={value} is invalid; a batcher needs to run at least "
            "1 statement at a time"
        )
    return value


@dataclasses.dataclass(frozen=True)
class _BatchPlan:
    """The statement of a batcher, and how to match its rows to keys."""

    sql: str
    key_column: int
    params: Mapping[str, Any]
    keys_param: str
    max_keys: int

    @classmethod
    def build(
        cls,
        sql: str,
        key_column: int,
        params: Mapping[str, Any] | None,
        keys_param: str,
        max_keys: int,
    ) -> _BatchPlan:
        """Check the arguments of a batcher; raise InvalidValueError naming one."""
        if f"%({keys_param})s" not in sql:
            raise InvalidValueError(
                f"the batch statement has no parameter %({keys_param})s; write "
                f"the array of keys as %({keys_param})s, for example "
                f"'WHERE key = ANY(%({keys_param})s)'"
            )
        if params is not None and keys_param in params:
            raise InvalidValueError(
                f"params contains {keys_param!r}, the parameter that receives "
                "the keys; rename one of them"
            )
        if key_column < 0:
            raise InvalidValueError(
                f"key_column={key_column} is invalid; give the index of the "
                "column that returns each row's key, from 0"
            )
        if max_keys < 1:
            raise InvalidValueError(
                f"max_keys={max_keys} is invalid; a batch needs room for at least 1 key"
            )
        # The keys go in binary format (%b), which costs less to build than an
        # array in text format; the rows come back in binary too.
        binary_sql = sql.replace(f"%({keys_param})s", f"%({keys_param})b")
        return cls(binary_sql, key_column, dict(params or {}), keys_param, max_keys)

    def operation(self, keys: list[Hashable]) -> Operation[list[tuple[Any, ...]]]:
        params = {**self.params, self.keys_param: keys}
        result = yield Query(self.sql, params, binary=True)
        return result.rows

    def index(
        self, rows: list[tuple[Any, ...]]
    ) -> dict[Hashable, list[tuple[int, tuple[Any, ...]]]]:
        """Group the rows by key, each with its position in the statement's result."""
        by_key: dict[Hashable, list[tuple[int, tuple[Any, ...]]]] = {}
        for position, row in enumerate(rows):
            by_key.setdefault(row[self.key_column], []).append((position, row))
        return by_key


def _rows_for(
    keys: tuple[Hashable, ...],
    by_key: Mapping[Hashable, list[tuple[int, tuple[Any, ...]]]],
) -> list[tuple[Any, ...]]:
    """Return the rows of ``keys``, in the order the statement returned them."""
    if len(keys) == 1:
        return [row for _, row in by_key.get(keys[0], ())]
    found = [entry for key in keys for entry in by_key.get(key, ())]
    found.sort(key=lambda entry: entry[0])
    return [row for _, row in found]


def _unique_keys(keys: Iterable[Hashable]) -> tuple[Hashable, ...]:
    if isinstance(keys, str | bytes):
        raise TypeError(
            "keys must be a collection of keys, not one string; pass [key] to "
            "look up one key"
        )
    return tuple(dict.fromkeys(keys))


def _may_fail_alone(exc: Exception) -> bool:
    """Tell whether the keys of one caller may have made a batch fail.

    A data error, such as a key that does not convert to the column's type,
    fails the statement for everyone in the batch, so the batch is worth
    splitting. A lost connection or a statement timeout does not depend on
    the keys, and splitting would only repeat it.
    """
    if isinstance(exc, ConnectionFailedError):
        return False
    if isinstance(exc, DatabaseError):
        sqlstate = exc.sqlstate
        return sqlstate is None or sqlstate[:2] not in _SHARED_FAILURE_CLASSES
    return True


@dataclasses.dataclass(eq=False)
class _AsyncLookup:
    keys: tuple[Hashable, ...]
    future: asyncio.Future[list[tuple[Any, ...]]]


def _take_batch(
    pending: collections.deque[_AsyncLookup], max_keys: int
) -> list[_AsyncLookup]:
    """Take the oldest waiting lookups, up to ``max_keys`` keys, at least one."""
    batch: list[_AsyncLookup] = []
    size = 0
    while pending:
        lookup = pending[0]
        if lookup.future.done():
            # Its caller was cancelled.
            pending.popleft()
            continue
        if batch and size + len(lookup.keys) > max_keys:
            break
        batch.append(pending.popleft())
        size += len(lookup.keys)
    return batch


class AsyncLookupBatcher:
    """Lookups by key that concurrent tasks share; see
    :meth:`AsyncDatabase.lookup_batcher`.

    Statements run in worker tasks, at most ``max_in_flight`` of them. A
    worker takes the oldest waiting lookups, runs one statement for them and
    sets their results, then goes on while lookups wait. When none waits, it
    stays for one more turn of the event loop, because the callers whose
    results it just set often come back with their next lookup in that turn.
    It ends when none did.
    """

    def __init__(
        self, database: AsyncDatabase, plan: _BatchPlan, *, max_in_flight: int
    ) -> None:
        self._database = database
        self._plan = plan
        self._max_in_flight = max_in_flight
        self._pending: collections.deque[_AsyncLookup] = collections.deque()
        self._workers = 0
        # Workers that take the waiting lookups at their next step.
        self._gathering = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def fetch(self, keys: Iterable[Hashable]) -> list[tuple[Any, ...]]:
        """Return the rows whose key is one of ``keys``, in the statement's order.

        Keys must be hashable and equal to the values that PostgreSQL returns
        in the key column (``str`` for a varchar column). With no keys, this
        returns ``[]`` without a statement. Raises what :meth:`AsyncDatabase.run`
        raises for the shared statement. When a statement of several callers
        fails with an error that one caller's keys may have caused, each
        caller's keys run again alone, so the error reaches only the callers
        it belongs to. Cancelling a caller leaves the others waiting.
        """
        requested = _unique_keys(keys)
        if not requested:
            return []

        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        future: asyncio.Future[list[tuple[Any, ...]]] = loop.create_future()
        self._pending.append(_AsyncLookup(requested, future))
        # A new worker's first step comes after the steps of the tasks that
        # are already ready, so every caller made ready by the same event
        # joins its first statement.
        if self._gathering == 0 and self._workers < self._max_in_flight:
            self._workers += 1
            self._gathering += 1
            task = loop.create_task(self._work())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def wait_idle(self) -> None:
        """Wait until no statement of this batcher runs and no caller waits."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._pending or self._tasks:
            raise RuntimeError(
                "this lookup batcher has work in another event loop; use each "
                "batcher, like its AsyncDatabase, from one event loop"
            )
        self._loop = loop

    async def _work(self) -> None:
        """Run statements for waiting lookups until none is left."""
        gathering = True
        try:
            while True:
                batch = _take_batch(self._pending, self._plan.max_keys)
                gathering = False
                self._gathering -= 1
                if not batch:
                    return
                await self._run_statement(batch)
                gathering = True
                self._gathering += 1
                if not self._pending:
                    await asyncio.sleep(0)
        finally:
            self._workers -= 1
            if gathering:
                self._gathering -= 1

    async def _run_statement(self, batch: list[_AsyncLookup]) -> None:
        """Run one statement for ``batch`` and set each caller's result.

        Every exception ends up in the callers' futures, so that none waits
        forever.
        """
        live = [lookup for lookup in batch if not lookup.future.done()]
        if not live:
            return
        keys = list(dict.fromkeys(key for lookup in live for key in lookup.keys))
        try:
            rows = await self._database.run(
                lambda: self._plan.operation(keys), transaction=False, idempotent=True
            )
            by_key = self._plan.index(rows)
        except Exception as exc:
            if len(live) > 1 and _may_fail_alone(exc):
                for lookup in live:
                    await self._run_statement([lookup])
                return
            for lookup in live:
                if not lookup.future.done():
                    lookup.future.set_exception(exc)
            return
        except BaseException:
            # The worker itself was cancelled, as at shutdown.
            for lookup in live:
                lookup.future.cancel()
            raise

        for lookup in live:
            if not lookup.future.done():
                lookup.future.set_result(_rows_for(lookup.keys, by_key))


@dataclasses.dataclass(eq=False)
class _ThreadLookup:
    keys: tuple[Hashable, ...]
    ready: threading.Condition
    rows: list[tuple[Any, ...]] | None = None
    error: BaseException | None = None
    # Set when the thread is to run statements, for itself or for others.
    leads: bool = False

    @property
    def finished(self) -> bool:
        return self.rows is not None or self.error is not None

    def result(self) -> list[tuple[Any, ...]]:
        if self.error is not None:
            raise self.error
        assert self.rows is not None
        return self.rows


class LookupBatcher:
    """Lookups by key that concurrent threads share; see
    :meth:`Database.lookup_batcher`.

    There is no thread of its own: up to ``max_in_flight`` calling threads
    lead, each running the statement for the oldest waiting callers. A leader
    whose own lookup has its result hands the lead to the oldest waiting
    caller, so no thread works for others after the statement that gave its
    own result.
    """

    def __init__(
        self, database: Database, plan: _BatchPlan, *, max_in_flight: int
    ) -> None:
        self._database = database
        self._plan = plan
        self._max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._pending: collections.deque[_ThreadLookup] = collections.deque()
        self._leaders = 0

    def fetch(self, keys: Iterable[Hashable]) -> list[tuple[Any, ...]]:
        """Return the rows whose key is one of ``keys``, in the statement's order.

        The contract is that of :meth:`AsyncLookupBatcher.fetch`.
        """
        requested = _unique_keys(keys)
        if not requested:
            return []

        lookup = _ThreadLookup(requested, threading.Condition(self._lock))
        with self._lock:
            self._pending.append(lookup)
            if self._leaders < self._max_in_flight:
                self._leaders += 1
                lookup.leads = True
        while True:
            with self._lock:
                while not (lookup.finished or lookup.leads):
                    lookup.ready.wait()
                if not lookup.leads:
                    break
                batch = self._take_batch()
                if not batch:
                    # The lookup is in a statement that another leader runs.
                    lookup.leads = False
                    self._leaders -= 1
                    continue
            try:
                self._run_statement(batch)
            except BaseException:
                # Leave the lead to a waiting caller before raising.
                with self._lock:
                    lookup.leads = False
                    self._hand_over()
                raise
            with self._lock:
                if lookup.finished:
                    lookup.leads = False
                    self._hand_over()
        return lookup.result()

    def _take_batch(self) -> list[_ThreadLookup]:
        batch: list[_ThreadLookup] = []
        size = 0
        while self._pending:
            lookup = self._pending[0]
            if batch and size + len(lookup.keys) > self._plan.max_keys:
                break
            batch.append(self._pending.popleft())
            size += len(lookup.keys)
        return batch

    def _hand_over(self) -> None:
        """Pass the lead of a finishing thread to the oldest waiting caller.

        The caller holds the lock.
        """
        if self._pending:
            successor = self._pending[0]
            successor.leads = True
            successor.ready.notify()
        else:
            self._leaders -= 1

    def _run_statement(self, batch: list[_ThreadLookup]) -> None:
        """Run one statement for ``batch`` and set each caller's result."""
        keys = list(dict.fromkeys(key for lookup in batch for key in lookup.keys))
        try:
            rows = self._database.run(
                lambda: self._plan.operation(keys), transaction=False, idempotent=True
            )
            by_key = self._plan.index(rows)
        except Exception as exc:
            if len(batch) > 1 and _may_fail_alone(exc):
                for lookup in batch:
                    self._run_statement([lookup])
                return
            self._fail(batch, exc)
            return
        except BaseException as exc:
            # KeyboardInterrupt and the like: the waiting threads get it too.
            self._fail(batch, exc)
            raise

        with self._lock:
            for lookup in batch:
                lookup.rows = _rows_for(lookup.keys, by_key)
                lookup.ready.notify()

    def _fail(self, batch: list[_ThreadLookup], exc: BaseException) -> None:
        with self._lock:
            for lookup in batch:
                lookup.error = exc
                lookup.ready.notify()
