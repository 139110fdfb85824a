"""The pooled operation driver and the lookup batcher, on a real server.

Connection losses are real: a thread terminates the backend that sits in
``pg_sleep`` with ``pg_terminate_backend``, during a statement or during a
COMMIT slowed down by a deferred trigger. The driver tests run each case on
:class:`AsyncDatabase` and on :class:`Database`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any, Protocol, TypeVar

import pytest

from mcp_authdb.db import Settings, resolve_target
from mcp_authdb.db.pool import (
    AsyncDatabase,
    Database,
    Operation,
    Query,
)
from mcp_authdb.errors import ConnectionFailedError, DatabaseError, InvalidValueError
from pgcluster import ServerCertificates, TcpCluster

from conftest import ScratchDatabase

pytest_plugins = ["pgcluster"]

T = TypeVar("T")

KINDS = ["async", "sync"]
ITEMS = 100

_ITEMS_SQL = """
CREATE TABLE items (key text PRIMARY KEY, value integer NOT NULL);
INSERT INTO items SELECT 'k' || i, i FROM generate_series(0, 99) AS i;
CREATE TABLE writes (id integer);
CREATE TABLE slow_commits (id integer);
CREATE FUNCTION sleep_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(30);
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER slow_commits_sleep AFTER INSERT ON slow_commits
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sleep_at_commit();
"""

LOOKUP = "SELECT key, value FROM items WHERE key = ANY(%(keys)s::text[]) ORDER BY value"
SLOW_LOOKUP = (
    "SELECT key, value FROM items, pg_sleep(0.3) "
    "WHERE key = ANY(%(keys)s::text[]) ORDER BY value"
)


class Runner(Protocol):
    def __call__(
        self,
        operation: Callable[[], Operation[T]],
        *,
        transaction: bool = ...,
        idempotent: bool = ...,
    ) -> T: ...


class Boom(Exception):
    """An error that an operation raises on its own."""


@pytest.fixture
def items_db(db: ScratchDatabase) -> ScratchDatabase:
    """A database with the table items (k0 to k99) and tables to write to."""
    with db.connect(autocommit=True) as conn:
        conn.execute(_ITEMS_SQL.encode())
    return db


@contextlib.contextmanager
def open_runner(kind: str, db: ScratchDatabase, **changes: Any) -> Iterator[Runner]:
    """Open a one-connection database of ``kind``; yield a blocking ``run``."""
    settings = db.settings.replace(pool_size=1, **changes)
    target = resolve_target(db.url, settings)
    if kind == "sync":
        with Database(target, settings, wait_s=5) as database:
            yield database.run
        return

    loop = asyncio.new_event_loop()
    async_database = AsyncDatabase(target, settings, wait_s=5)
    loop.run_until_complete(async_database.open())

    def run(
        operation: Callable[[], Operation[T]],
        *,
        transaction: bool = True,
        idempotent: bool = False,
    ) -> T:
        return loop.run_until_complete(
            async_database.run(
                operation, transaction=transaction, idempotent=idempotent
            )
        )

    try:
        yield run
    finally:
        loop.run_until_complete(async_database.close())
        loop.close()


class Terminator:
    """A thread that terminates backends of a database that sit in pg_sleep.

    It stops after ``count`` terminations, or when the block ends.
    """

    def __init__(self, db: ScratchDatabase, count: int = 1) -> None:
        self.db = db
        self.count = count
        self.terminated: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Terminator:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with self.db.connect(autocommit=True) as conn:
            while not self._stop.is_set() and len(self.terminated) < self.count:
                row = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = "
                    "current_database() AND wait_event = 'PgSleep' LIMIT 1"
                ).fetchone()
                if row is None:
                    time.sleep(0.005)
                    continue
                conn.execute("SELECT pg_terminate_backend(%s, 5000)", (row[0],))
                self.terminated.append(row[0])


class Attempts:
    """Operation factories that count how often the driver called them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(
        self, build: Callable[[int], Operation[T]]
    ) -> Callable[[], Operation[T]]:
        def factory() -> Operation[T]:
            self.count += 1
            return build(self.count)

        return factory


def backend_pid() -> Operation[int]:
    result = yield Query("SELECT pg_backend_pid()")
    return int(result.rows[0][0])


def count_rows(db: ScratchDatabase, table: str) -> int:
    with db.connect() as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


# The driver


@pytest.mark.parametrize("kind", KINDS)
def test_run_returns_result(kind: str, items_db: ScratchDatabase) -> None:
    def write_and_read() -> Operation[tuple[int, int]]:
        inserted = yield Query("INSERT INTO writes VALUES (1), (2)")
        result = yield Query("SELECT value FROM items WHERE key = %s", ("k7",))
        return inserted.rowcount, result.rows[0][0]

    with open_runner(kind, items_db) as run:
        in_transaction = run(write_and_read)
        autocommit = run(write_and_read, transaction=False)

    assert in_transaction == (2, 7)
    assert autocommit == (2, 7)
    assert count_rows(items_db, "writes") == 4


@pytest.mark.parametrize("kind", KINDS)
def test_own_error_propagates_and_rolls_back(
    kind: str, items_db: ScratchDatabase
) -> None:
    raised = Boom("from the operation")
    attempts = Attempts()

    def write_then_fail(_attempt: int) -> Operation[None]:
        yield Query("INSERT INTO writes VALUES (1)")
        raise raised

    with open_runner(kind, items_db) as run, pytest.raises(Boom) as info:
        run(attempts(write_then_fail), idempotent=True)

    assert info.value is raised
    assert attempts.count == 1
    assert count_rows(items_db, "writes") == 0


@pytest.mark.parametrize("kind", KINDS)
def test_statement_error_rolls_back(kind: str, items_db: ScratchDatabase) -> None:
    attempts = Attempts()

    def write_then_divide(_attempt: int) -> Operation[None]:
        yield Query("INSERT INTO writes VALUES (1)")
        yield Query("SELECT 1 / 0")

    with open_runner(kind, items_db) as run, pytest.raises(DatabaseError) as info:
        run(attempts(write_then_divide), idempotent=True)

    assert info.value.sqlstate == "22012"
    assert "division by zero" in str(info.value)
    assert attempts.count == 1
    assert count_rows(items_db, "writes") == 0


@pytest.mark.parametrize("kind", KINDS)
def test_retry_after_terminated_statement(
    kind: str, items_db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mcp_authdb")
    attempts = Attempts()

    def sleep_on_first_attempt(attempt: int) -> Operation[int]:
        yield Query("INSERT INTO writes VALUES (%s)", (attempt,))
        if attempt == 1:
            yield Query("SELECT pg_sleep(30)")
        return (yield from backend_pid())

    with open_runner(kind, items_db) as run, Terminator(items_db) as terminator:
        pid = run(attempts(sleep_on_first_attempt))

    assert attempts.count == 2
    assert len(terminator.terminated) == 1
    assert pid != terminator.terminated[0]
    # The first attempt's INSERT was rolled back with its connection.
    with items_db.connect() as conn:
        assert conn.execute("SELECT id FROM writes").fetchall() == [(2,)]
    assert "lost a connection" in caplog.text
    assert "retrying" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_idempotent_autocommit_is_retried(kind: str, items_db: ScratchDatabase) -> None:
    attempts = Attempts()

    def sleep_on_first_attempt(attempt: int) -> Operation[int]:
        if attempt == 1:
            yield Query("SELECT pg_sleep(30)")
        return (yield from backend_pid())

    with open_runner(kind, items_db) as run, Terminator(items_db):
        run(attempts(sleep_on_first_attempt), transaction=False, idempotent=True)

    assert attempts.count == 2


@pytest.mark.parametrize("kind", KINDS)
def test_autocommit_not_retried_unless_idempotent(
    kind: str, items_db: ScratchDatabase
) -> None:
    attempts = Attempts()

    def write_then_sleep(attempt: int) -> Operation[None]:
        yield Query("INSERT INTO writes VALUES (%s)", (attempt,))
        yield Query("SELECT pg_sleep(30)")

    with (
        open_runner(kind, items_db) as run,
        Terminator(items_db),
        pytest.raises(ConnectionFailedError) as info,
    ):
        run(attempts(write_then_sleep), transaction=False)

    assert attempts.count == 1
    assert "outside a transaction" in str(info.value)
    assert "not retried" in str(info.value)
    # In autocommit the INSERT was applied: the reason not to retry.
    assert count_rows(items_db, "writes") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_commit_loss_reported_not_retried(kind: str, items_db: ScratchDatabase) -> None:
    attempts = Attempts()

    def insert_slow_commit(_attempt: int) -> Operation[None]:
        # The deferred trigger sleeps in COMMIT, where the thread ends it.
        yield Query("INSERT INTO slow_commits VALUES (1)")

    with (
        open_runner(kind, items_db) as run,
        Terminator(items_db) as terminator,
        pytest.raises(DatabaseError) as info,
    ):
        run(attempts(insert_slow_commit), idempotent=True)

    assert attempts.count == 1
    assert len(terminator.terminated) == 1
    assert not isinstance(info.value, ConnectionFailedError)
    assert "while a transaction was committing" in str(info.value)
    assert count_rows(items_db, "slow_commits") == 0


@pytest.mark.parametrize("kind", KINDS)
def test_connection_closed_while_idle_is_replaced(
    kind: str, items_db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcp_authdb")
    attempts = Attempts()

    def pid_and_write(attempt: int) -> Operation[int]:
        yield Query("INSERT INTO writes VALUES (%s)", (attempt,))
        return (yield from backend_pid())

    with open_runner(kind, items_db) as run:
        first = run(backend_pid, transaction=False)
        with items_db.connect(autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (first,))
        # Neither idempotent nor in a transaction, so a loss would not be
        # retried: the driver must notice the closed connection beforehand.
        second = run(attempts(pid_and_write), transaction=False)

    assert second != first
    assert attempts.count == 1
    assert count_rows(items_db, "writes") == 1
    assert "server closed while it was idle" in caplog.text


def test_closed_while_idle_check_keeps_tls_connections(
    ssl_cluster: TcpCluster,
    server_certificates: ServerCertificates,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # TLS sends records of its own; none may count as a closed connection.
    caplog.set_level(logging.INFO, logger="mcp_authdb")
    url = ssl_cluster.url(
        sslmode="verify-full", sslrootcert=str(server_certificates.ca_file)
    )
    settings = Settings(database_url=url, pool_size=2)

    async def scenario() -> set[int]:
        async with AsyncDatabase(
            resolve_target(url, settings), settings, min_size=2
        ) as database:
            pids = set()
            for _ in range(20):
                pids.add(await database.run(backend_pid, transaction=False))
                await asyncio.sleep(0.01)
            return pids

    pids = asyncio.run(scenario())

    assert 1 <= len(pids) <= 2
    assert "closed while it was idle" not in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_closed_database_fails_at_once(kind: str, items_db: ScratchDatabase) -> None:
    settings = items_db.settings.replace(pool_size=1)
    target = resolve_target(items_db.url, settings)
    began = time.monotonic()
    with pytest.raises(ConnectionFailedError) as info:
        if kind == "sync":
            database = Database(target, settings, wait_s=5)
            database.open()
            database.close()
            database.run(backend_pid)
        else:

            async def scenario() -> None:
                database = AsyncDatabase(target, settings, wait_s=5)
                await database.open()
                await database.close()
                await database.run(backend_pid)

            asyncio.run(scenario())

    assert time.monotonic() - began < 4
    assert "is closed" in str(info.value)


# The lookup batcher


class CountingDatabase(AsyncDatabase):
    """An AsyncDatabase that records the keys of each batch statement it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[Any]] = []

    async def run(
        self,
        operation: Callable[[], Operation[T]],
        *,
        transaction: bool = True,
        idempotent: bool = False,
    ) -> T:
        record_batch(self.batches, operation)
        return await super().run(
            operation, transaction=transaction, idempotent=idempotent
        )


class CountingSyncDatabase(Database):
    """A Database that records the keys of each batch statement it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[Any]] = []
        self._record_lock = threading.Lock()

    def run(
        self,
        operation: Callable[[], Operation[T]],
        *,
        transaction: bool = True,
        idempotent: bool = False,
    ) -> T:
        with self._record_lock:
            record_batch(self.batches, operation)
        return super().run(operation, transaction=transaction, idempotent=idempotent)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` is true, for 10 s at most."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "the condition stayed false for 10 s"
        await asyncio.sleep(0.005)


def record_batch(
    batches: list[list[Any]], operation: Callable[[], Operation[Any]]
) -> None:
    generator = operation()
    query = next(generator)
    generator.close()
    assert isinstance(query.params, dict)
    # The keys are the one list among the parameters.
    batches.append(next(v for v in query.params.values() if isinstance(v, list)))


@contextlib.asynccontextmanager
async def counting_database(
    db: ScratchDatabase, **changes: Any
) -> AsyncIterator[CountingDatabase]:
    settings = db.settings.replace(pool_size=4, **changes)
    database = CountingDatabase(
        resolve_target(db.url, settings), settings, wait_s=5, min_size=2
    )
    async with database:
        yield database


def test_batcher_merges_concurrent_lookups(items_db: ScratchDatabase) -> None:
    async def scenario() -> tuple[list[list[tuple[Any, ...]]], list[list[Any]]]:
        async with counting_database(items_db) as database:
            batcher = database.lookup_batcher(LOOKUP)
            results = await asyncio.gather(
                *(batcher.fetch([f"k{i}"]) for i in range(20))
            )
            return results, database.batches

    results, batches = asyncio.run(scenario())

    assert results == [[(f"k{i}", i)] for i in range(20)]
    assert len(batches) == 1
    assert batches[0] == [f"k{i}" for i in range(20)]


def test_batcher_rows_per_caller(items_db: ScratchDatabase) -> None:
    async def scenario() -> list[list[tuple[Any, ...]]]:
        async with counting_database(items_db) as database:
            batcher = database.lookup_batcher(LOOKUP)
            rows = await asyncio.gather(
                batcher.fetch(["k9", "k3", "missing", "k3"]),
                batcher.fetch(["k3"]),
                batcher.fetch(["missing"]),
                batcher.fetch([]),
                batcher.fetch(("k50", "k5")),
            )
            return list(rows)

    assert asyncio.run(scenario()) == [
        # The statement's ORDER BY value, whatever the order of the keys.
        [("k3", 3), ("k9", 9)],
        [("k3", 3)],
        [],
        [],
        [("k5", 5), ("k50", 50)],
    ]


def test_batcher_error_reaches_each_caller(items_db: ScratchDatabase) -> None:
    timed_out = "SELECT key, pg_sleep(1) FROM items WHERE key = ANY(%(keys)s::text[])"

    async def scenario() -> tuple[list[BaseException | Any], list[list[Any]]]:
        async with counting_database(items_db, command_timeout_ms=200) as database:
            batcher = database.lookup_batcher(timed_out)
            outcomes = await asyncio.gather(
                *(batcher.fetch([f"k{i}"]) for i in range(3)), return_exceptions=True
            )
            return outcomes, database.batches

    outcomes, batches = asyncio.run(scenario())

    for outcome in outcomes:
        assert isinstance(outcome, DatabaseError)
        assert outcome.sqlstate == "57014"
    # A timeout does not depend on the keys, so the batch is not split.
    assert len(batches) == 1


def test_batcher_bad_key_fails_only_its_caller(items_db: ScratchDatabase) -> None:
    by_value = "SELECT value, key FROM items WHERE value = ANY(%(keys)s::int[])"

    async def scenario() -> tuple[list[BaseException | Any], list[list[Any]]]:
        async with counting_database(items_db) as database:
            batcher = database.lookup_batcher(by_value)
            outcomes = await asyncio.gather(
                batcher.fetch([1]),
                batcher.fetch(["not a number"]),
                batcher.fetch([2, 3]),
                return_exceptions=True,
            )
            return list(outcomes), database.batches

    outcomes, batches = asyncio.run(scenario())

    assert outcomes[0] == [(1, "k1")]
    assert isinstance(outcomes[1], DatabaseError)
    assert outcomes[1].sqlstate == "22P02"
    assert outcomes[2] == [(2, "k2"), (3, "k3")]
    assert batches == [[1, "not a number", 2, 3], [1], ["not a number"], [2, 3]]


def test_batcher_cancelled_caller_leaves_others(items_db: ScratchDatabase) -> None:
    async def scenario() -> tuple[list[Any], list[list[Any]]]:
        async with counting_database(items_db) as database:
            batcher = database.lookup_batcher(SLOW_LOOKUP, max_in_flight=1)
            first = asyncio.create_task(batcher.fetch(["k0"]))
            await wait_until(lambda: len(database.batches) == 1)
            # These wait for the first statement to end.
            waiting = [asyncio.create_task(batcher.fetch([f"k{i}"])) for i in (1, 2, 3)]
            await asyncio.sleep(0)
            # Cancelled while it waits: its key is not sent.
            waiting[0].cancel()
            await wait_until(lambda: len(database.batches) == 2)
            # Cancelled during the second statement: the other caller of that
            # statement still gets its rows.
            waiting[2].cancel()
            outcomes = await asyncio.gather(first, *waiting, return_exceptions=True)
            return list(outcomes), database.batches

    outcomes, batches = asyncio.run(scenario())

    assert outcomes[0] == [("k0", 0)]
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert outcomes[2] == [("k2", 2)]
    assert isinstance(outcomes[3], asyncio.CancelledError)
    assert batches == [["k0"], ["k2", "k3"]]


def test_batcher_integer_and_uuid_keys(items_db: ScratchDatabase) -> None:
    with items_db.connect(autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE things (id bigint PRIMARY KEY, tag uuid NOT NULL);"
            "INSERT INTO things VALUES (1, gen_random_uuid()), "
            "(3000000000, gen_random_uuid())"
        )
        tags = dict(conn.execute("SELECT id, tag FROM things").fetchall())

    async def scenario() -> list[list[tuple[Any, ...]]]:
        async with counting_database(items_db) as database:
            by_id = database.lookup_batcher(
                "SELECT id, tag FROM things WHERE id = ANY(%(keys)s::bigint[])"
            )
            by_tag = database.lookup_batcher(
                "SELECT tag, id FROM things WHERE tag = ANY(%(keys)s::uuid[])"
            )
            found = await asyncio.gather(
                by_id.fetch([1]),
                by_id.fetch([3000000000, 7]),
                by_tag.fetch([tags[1]]),
            )
            return list(found)

    assert asyncio.run(scenario()) == [
        [(1, tags[1])],
        [(3000000000, tags[3000000000])],
        [(tags[1], 1)],
    ]


def test_batcher_retries_after_connection_loss(items_db: ScratchDatabase) -> None:
    async def scenario() -> list[list[tuple[Any, ...]]]:
        async with counting_database(items_db) as database:
            batcher = database.lookup_batcher(SLOW_LOOKUP)
            return await asyncio.gather(*(batcher.fetch([f"k{i}"]) for i in range(4)))

    with Terminator(items_db) as terminator:
        results = asyncio.run(scenario())

    assert len(terminator.terminated) == 1
    assert results == [[(f"k{i}", i)] for i in range(4)]


def test_batcher_close_waits_for_statement(items_db: ScratchDatabase) -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        database = CountingDatabase(
            resolve_target(items_db.url, items_db.settings), items_db.settings
        )
        await database.open()
        batcher = database.lookup_batcher(SLOW_LOOKUP)
        running = [asyncio.create_task(batcher.fetch([f"k{i}"])) for i in range(3)]
        await asyncio.sleep(0.1)
        await database.close()
        answered = await asyncio.gather(*running, return_exceptions=True)
        # After close, a lookup fails at once instead of waiting.
        after = await asyncio.gather(batcher.fetch(["k5"]), return_exceptions=True)
        return list(answered), list(after)

    answered, after = asyncio.run(scenario())

    assert answered == [[(f"k{i}", i)] for i in range(3)]
    assert isinstance(after[0], ConnectionFailedError)
    assert "is closed" in str(after[0])


def test_batcher_limits_keys_in_order(items_db: ScratchDatabase) -> None:
    async def scenario() -> tuple[list[list[tuple[Any, ...]]], list[list[Any]]]:
        async with counting_database(items_db) as database:
            batcher = database.lookup_batcher(LOOKUP, max_keys=3, max_in_flight=1)
            results = await asyncio.gather(
                *(batcher.fetch([f"k{i}"]) for i in range(7)),
                batcher.fetch([f"k{i}" for i in range(10, 15)]),
                batcher.fetch(["k20"]),
            )
            return results, database.batches

    results, batches = asyncio.run(scenario())

    assert results[:7] == [[(f"k{i}", i)] for i in range(7)]
    assert results[7] == [(f"k{i}", i) for i in range(10, 15)]
    assert results[8] == [("k20", 20)]
    # Oldest first; a caller with more keys than max_keys gets its own batch.
    assert batches == [
        ["k0", "k1", "k2"],
        ["k3", "k4", "k5"],
        ["k6"],
        [f"k{i}" for i in range(10, 15)],
        ["k20"],
    ]


def test_batcher_later_callers_share_next_batch(items_db: ScratchDatabase) -> None:
    async def scenario() -> list[list[Any]]:
        async with counting_database(items_db) as database:
            batcher = database.lookup_batcher(SLOW_LOOKUP, max_in_flight=1)
            first = asyncio.create_task(batcher.fetch(["k0"]))
            await wait_until(lambda: len(database.batches) == 1)
            later = [batcher.fetch([f"k{i}"]) for i in range(1, 6)]
            await asyncio.gather(first, *later)
            return database.batches

    assert asyncio.run(scenario()) == [["k0"], ["k1", "k2", "k3", "k4", "k5"]]


def test_batcher_rejects_bad_arguments(items_db: ScratchDatabase) -> None:
    settings = items_db.settings
    database = AsyncDatabase(resolve_target(items_db.url, settings), settings)
    no_keys = "SELECT key FROM items WHERE key = %(key)s"
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: database.lookup_batcher(no_keys), "no parameter %(keys)s"),
        (
            lambda: database.lookup_batcher(LOOKUP, params={"keys": 1}),
            "params contains 'keys'",
        ),
        (lambda: database.lookup_batcher(LOOKUP, key_column=-1), "key_column=-1"),
        (lambda: database.lookup_batcher(LOOKUP, max_keys=0), "max_keys=0"),
        (lambda: database.lookup_batcher(LOOKUP, max_in_flight=0), "max_in_flight=0"),
    ]
    for make, message in cases:
        with pytest.raises(InvalidValueError) as info:
            make()
        assert message in str(info.value)


def test_batcher_rejects_one_string(items_db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with counting_database(items_db) as database:
            await database.lookup_batcher(LOOKUP).fetch("k1")

    with pytest.raises(TypeError) as info:
        asyncio.run(scenario())

    assert "pass [key]" in str(info.value)


def test_batcher_named_params(items_db: ScratchDatabase) -> None:
    above = (
        "SELECT key, value FROM items WHERE key = ANY(%(wanted)s::text[]) "
        "AND value > %(minimum)s ORDER BY value"
    )

    async def scenario() -> list[tuple[Any, ...]]:
        async with counting_database(items_db) as database:
            batcher = database.lookup_batcher(
                above, keys_param="wanted", params={"minimum": 5}
            )
            return await batcher.fetch(["k4", "k6"])

    assert asyncio.run(scenario()) == [("k6", 6)]


@contextlib.contextmanager
def counting_sync_database(db: ScratchDatabase) -> Iterator[CountingSyncDatabase]:
    settings = db.settings.replace(pool_size=4)
    database = CountingSyncDatabase(
        resolve_target(db.url, settings), settings, wait_s=5, min_size=2
    )
    with database:
        yield database


def run_threads(
    work: Callable[[int], Any],
    count: int,
    *,
    first_started: Callable[[], bool] | None = None,
) -> list[Any]:
    """Run ``work(i)`` in ``count`` threads; return results or exceptions.

    With ``first_started``, the other threads start once it returns true.
    """
    outcomes: list[Any] = [None] * count

    def target(index: int) -> None:
        try:
            outcomes[index] = work(index)
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for index, thread in enumerate(threads):
        thread.start()
        if index == 0 and first_started is not None:
            deadline = time.monotonic() + 10
            while not first_started():
                assert time.monotonic() < deadline, "the first thread did not start"
                time.sleep(0.005)
    for thread in threads:
        thread.join(timeout=30)
    return outcomes


def test_sync_batcher_threads_share_batch(items_db: ScratchDatabase) -> None:
    with counting_sync_database(items_db) as database:
        batcher = database.lookup_batcher(SLOW_LOOKUP, max_in_flight=1)
        # The first thread leads alone; the others arrive while its
        # statement sleeps and share the next one.
        outcomes = run_threads(
            lambda i: batcher.fetch([f"k{i}"]),
            6,
            first_started=lambda: len(database.batches) == 1,
        )

    assert outcomes == [[(f"k{i}", i)] for i in range(6)]
    assert len(database.batches) == 2
    assert database.batches[0] == ["k0"]
    assert sorted(database.batches[1]) == [f"k{i}" for i in range(1, 6)]


def test_sync_batcher_bad_key_fails_only_its_thread(
    items_db: ScratchDatabase,
) -> None:
    by_value = (
        "SELECT value, key FROM items, pg_sleep(0.2) WHERE value = ANY(%(keys)s::int[])"
    )
    with counting_sync_database(items_db) as database:
        batcher = database.lookup_batcher(by_value, max_in_flight=1)
        keys: list[list[object]] = [[1], [2], ["oops"], [3]]
        outcomes = run_threads(
            lambda i: batcher.fetch(keys[i]),
            4,
            first_started=lambda: len(database.batches) == 1,
        )

    assert outcomes[0] == [(1, "k1")]
    assert outcomes[1] == [(2, "k2")]
    assert isinstance(outcomes[2], DatabaseError)
    assert outcomes[2].sqlstate == "22P02"
    assert outcomes[3] == [(3, "k3")]


def test_sync_batcher_many_threads(items_db: ScratchDatabase) -> None:
    with counting_sync_database(items_db) as database:
        batcher = database.lookup_batcher(LOOKUP)

        # Each thread requests keys of its own, because one statement looks
        # up a key only once however many callers want it.
        def work(index: int) -> bool:
            for round_number in range(12):
                key = index * 12 + round_number
                rows = batcher.fetch([f"k{key}"])
                assert rows == [(f"k{key}", key)]
            return True

        outcomes = run_threads(work, 8)

    assert outcomes == [True] * 8
    assert sum(len(batch) for batch in database.batches) == 8 * 12
