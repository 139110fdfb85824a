"""One connection pool per process, and a driver that runs database operations.

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
declared ``idempotent``.

Pool connections run in autocommit, so a single SELECT costs one round trip,
without BEGIN and COMMIT around it. Statements are prepared on the server after
a few executions, unless ``DB_TRANSACTION_POOLER`` is set: a pooler in
transaction mode, such as PgBouncer, hands each transaction to any server
connection, where a prepared statement may not exist. In that mode the
statement timeout, which such poolers refuse as a startup parameter, is set by
``SET LOCAL`` in each transaction instead, and single statements run in a
transaction of their own for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import sql as pgsql

from mcp_authdb.db.connection import ConnectionTarget, register_adapters
from mcp_authdb.db.settings import Settings
from mcp_authdb.errors import ConnectionFailedError, DatabaseError

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


@dataclasses.dataclass(frozen=True)
class Query:
    """One SQL statement of an operation, with its parameters."""

    sql: str
    params: Sequence[Any] | Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Result:
    """What a statement gave back: its rows (empty without any) and row count."""

    rows: list[tuple[Any, ...]]
    rowcount: int


Operation = Generator[Query, Result, T]


class _Attempt:
    """The retry policy shared by both drivers: when to retry, how long to pause.

    A driver calls :meth:`failed` with the error of an attempt; it returns the
    pause before the next attempt, or raises the error to give to the caller.
    """

    def __init__(self, wait_s: float, description: str) -> None:
        self._deadline = time.monotonic() + wait_s
        self._wait_s = wait_s
        self._description = description
        self._failures = 0
        self.commit_sent = False

    def failed(self, exc: Exception, *, retryable: bool) -> float:
        lost = _is_connection_loss(exc)
        if not lost:
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
        if not retryable or time.monotonic() >= self._deadline:
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
        return min(pause, max(0.0, self._deadline - time.monotonic()))


def _is_connection_loss(exc: BaseException) -> bool:
    """Tell whether ``exc`` means the connection, not the statement, failed."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return True
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
            min_size=min(min_size, settings.pool_size),
            max_size=settings.pool_size,
            kwargs=_pool_kwargs(settings),
            configure=_configure_async,
            open=False,
            timeout=wait_s,
            name="mcp-authdb",
        )

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
        """Close the pool and its connections."""
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
        fails, and :class:`ConnectionFailedError` when no connection worked
        within ``wait_s``; an error raised by the operation itself propagates
        unchanged, and its transaction is rolled back.
        """
        attempt = _Attempt(self.wait_s, self.target.description)
        in_transaction = transaction or self.settings.transaction_pooler
        while True:
            try:
                async with self.pool.connection() as conn:
                    if not in_transaction:
                        return await self._drive(conn, operation())
                    async with conn.transaction():
                        if self.settings.transaction_pooler:
                            await conn.execute(_set_local_timeout(self.settings))
                        value = await self._drive(conn, operation())
                        attempt.commit_sent = True
                    return value
            except Exception as exc:
                pause = attempt.failed(exc, retryable=in_transaction or idempotent)
            await asyncio.sleep(pause)
            if pause == 0.0:
                await self.pool.check()

    @staticmethod
    async def _drive(conn: psycopg.AsyncConnection[Any], operation: Operation[T]) -> T:
        try:
            query = next(operation)
            while True:
                cursor = await conn.execute(query.sql, query.params)
                rows = await cursor.fetchall() if cursor.description else []
                query = operation.send(Result(rows, cursor.rowcount))
        except StopIteration as stop:
            value: T = stop.value
            return value


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
            min_size=min(min_size, settings.pool_size),
            max_size=settings.pool_size,
            kwargs=_pool_kwargs(settings),
            configure=_configure,
            open=False,
            timeout=wait_s,
            name="mcp-authdb",
        )

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
                with self.pool.connection() as conn:
                    if not in_transaction:
                        return self._drive(conn, operation())
                    with conn.transaction():
                        if self.settings.transaction_pooler:
                            conn.execute(_set_local_timeout(self.settings))
                        value = self._drive(conn, operation())
                        attempt.commit_sent = True
                    return value
            except Exception as exc:
                pause = attempt.failed(exc, retryable=in_transaction or idempotent)
            time.sleep(pause)
            if pause == 0.0:
                self.pool.check()

    @staticmethod
    def _drive(conn: psycopg.Connection[Any], operation: Operation[T]) -> T:
        try:
            query = next(operation)
            while True:
                cursor = conn.execute(query.sql, query.params)
                rows = cursor.fetchall() if cursor.description else []
                query = operation.send(Result(rows, cursor.rowcount))
        except StopIteration as stop:
            value: T = stop.value
            return value
