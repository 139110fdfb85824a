"""``DB_TRANSACTION_POOLER`` against a real PgBouncer in transaction mode.

A private cluster on 127.0.0.1 (see ``pgcluster``) sits behind a PgBouncer
started for this module on a free port of 127.0.0.1, with
``pool_mode = transaction`` and a configuration and auth file of its own in a
temporary folder. The auth file contains the SCRAM secret of the role
``app``, so PgBouncer checks the client's SCRAM proof and logs in to the
server with it, and no password is written to disk.

PgBouncer started as root exits with "PgBouncer should not run as root". As
root, these tests start it with ``-u`` and the unprivileged user that the
clusters run as, and give that user the folder and its files, because
PgBouncer opens some files, such as a log file, after switching user.

The tests show that with the setting many operations share few server
connections, without prepared statements and with the statement timeout
enforced in each transaction, and that without it PgBouncer rejects the
connection and prepared statements break. They need the ``pgbouncer``
program (the Debian package pgbouncer) and skip without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from mcp_authdb.db import Settings, connect, resolve_target
from mcp_authdb.db.pool import AsyncDatabase, Database, Operation, Query
from mcp_authdb.errors import ConnectionFailedError, DatabaseError
from pgcluster import DATABASE, ROLE, TcpCluster, free_port, server_user, start_cluster

pytest_plugins = ["pgcluster"]

# More clients than PgBouncer has server connections for them.
SERVER_CONNECTIONS = 2
CLIENTS = 8
OPERATIONS_PER_CLIENT = 12
TIMEOUT_MS = 300
STARTUP_TIMEOUT_S = 10.0


@dataclasses.dataclass
class Bouncer:
    """A running PgBouncer in front of a test cluster."""

    port: int
    password: str
    process: subprocess.Popen[bytes]
    log_file: Path

    def url(self) -> str:
        """Return a URL for role ``app`` through PgBouncer."""
        secret = quote(self.password, safe="")
        return f"postgresql://{ROLE}:{secret}@127.0.0.1:{self.port}/{DATABASE}"

    def settings(self, *, pooler: bool = True, **changes: Any) -> Settings:
        # Loopback without SSL, so DB_SSL_MODE is lowered explicitly.
        base = Settings(
            database_url=self.url(),
            ssl_mode="disable",
            transaction_pooler=pooler,
            command_timeout_ms=TIMEOUT_MS,
        )
        return base.replace(**changes)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


@pytest.fixture(scope="module")
def pgbouncer_program() -> Path:
    found = shutil.which("pgbouncer") or shutil.which(
        "pgbouncer", path="/usr/sbin:/usr/local/sbin"
    )
    if found is None:
        pytest.skip(
            "pgbouncer is not installed; install it (Debian: apt-get install "
            "pgbouncer) to run the tests of DB_TRANSACTION_POOLER"
        )
    return Path(found)


@pytest.fixture(scope="module")
def backend(cluster_folder: Path, pg_bin_dir: Path) -> Iterator[TcpCluster]:
    """The cluster behind PgBouncer, with a table ``hits`` that ``app`` owns."""
    tcp = start_cluster(cluster_folder / "pgbouncer-backend", pg_bin_dir)
    try:
        with psycopg.connect(tcp.socket_conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE hits (client integer, n integer)")
            conn.execute(
                sql.SQL("ALTER TABLE hits OWNER TO {}").format(sql.Identifier(ROLE))
            )
        yield tcp
    finally:
        tcp.cluster.stop()


def start_pgbouncer(
    program: Path, folder: Path, cluster: TcpCluster, pool_size: int
) -> Bouncer:
    """Start PgBouncer in transaction mode in ``folder``; wait until it listens."""
    with psycopg.connect(cluster.socket_conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (ROLE,)
        ).fetchone()
    assert row is not None
    scram_secret = str(row[0])

    folder.mkdir(mode=0o700)
    port = free_port()
    auth_file = folder / "userlist.txt"
    auth_file.write_text(f'"{ROLE}" "{scram_secret}"\n')
    auth_file.chmod(0o600)
    config = folder / "pgbouncer.ini"
    # No Unix socket, no log file (the log goes to stderr), and a short wait
    # for a server connection, so that a stuck test fails quickly.
    config.write_text(
        f"""[databases]
{DATABASE} = host=127.0.0.1 port={cluster.port} dbname={DATABASE}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {auth_file}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 100
query_wait_timeout = 10
"""
    )

    command = [str(program)]
    if os.geteuid() == 0:
        user = server_user()
        for path in (folder, auth_file, config):
            os.chown(path, user.uid, user.gid)
        command += ["-u", user.name]
    command.append(str(config))

    log_file = folder.parent / f"{folder.name}.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    bouncer = Bouncer(port, cluster.password, process, log_file)
    try:
        wait_until_listening(bouncer)
    except BaseException:
        stop_pgbouncer(bouncer)
        raise
    return bouncer


def wait_until_listening(bouncer: Bouncer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if bouncer.process.poll() is not None:
            raise RuntimeError(
                f"pgbouncer exited with status {bouncer.process.returncode}:\n"
                f"{bouncer.log()}"
            )
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", bouncer.port), timeout=1),
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"pgbouncer did not listen on 127.0.0.1:{bouncer.port} within "
                f"{STARTUP_TIMEOUT_S:g} s:\n{bouncer.log()}"
            )
        time.sleep(0.02)


def stop_pgbouncer(bouncer: Bouncer) -> None:
    # SIGTERM makes PgBouncer exit at once, closing every connection.
    bouncer.process.terminate()
    try:
        bouncer.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        bouncer.process.kill()
        bouncer.process.wait(timeout=10)


@pytest.fixture(scope="module")
def bouncer(
    pgbouncer_program: Path, cluster_folder: Path, backend: TcpCluster
) -> Iterator[Bouncer]:
    """PgBouncer with SERVER_CONNECTIONS server connections."""
    running = start_pgbouncer(
        pgbouncer_program, cluster_folder / "pgbouncer", backend, SERVER_CONNECTIONS
    )
    try:
        yield running
    finally:
        stop_pgbouncer(running)


@pytest.fixture(scope="module")
def single_bouncer(
    pgbouncer_program: Path, cluster_folder: Path, backend: TcpCluster
) -> Iterator[Bouncer]:
    """PgBouncer with one server connection, which every client shares."""
    running = start_pgbouncer(
        pgbouncer_program, cluster_folder / "pgbouncer-single", backend, 1
    )
    try:
        yield running
    finally:
        stop_pgbouncer(running)


def hit(client: int, n: int) -> Operation[tuple[int, str]]:
    """Insert a row, then read the server's pid and statement timeout."""
    yield Query("INSERT INTO hits VALUES (%s, %s)", (client, n))
    return (yield from server_state())


def server_state() -> Operation[tuple[int, str]]:
    result = yield Query(
        "SELECT pg_backend_pid(), current_setting('statement_timeout')"
    )
    pid, timeout = result.rows[0]
    return int(pid), str(timeout)


def sleep_longer_than_timeout() -> Operation[None]:
    yield Query("SELECT pg_sleep(%s)", (TIMEOUT_MS * 5 / 1000,))


def count_hits(backend: TcpCluster, client_base: int) -> int:
    with psycopg.connect(backend.socket_conninfo()) as conn:
        row = conn.execute(
            "SELECT count(*) FROM hits WHERE client >= %s AND client < %s",
            (client_base, client_base + CLIENTS),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_pooler_shares_server_connections_async(
    bouncer: Bouncer, backend: TcpCluster
) -> None:
    settings = bouncer.settings(pool_size=CLIENTS)
    client_base = 100

    async def scenario() -> tuple[list[tuple[int, str]], int]:
        async with AsyncDatabase(
            resolve_target(bouncer.url(), settings), settings, min_size=CLIENTS
        ) as database:

            async def client(number: int) -> list[tuple[int, str]]:
                states = []
                for n in range(OPERATIONS_PER_CLIENT):
                    if n % 2:
                        state = await database.run(
                            server_state, transaction=False, idempotent=True
                        )
                    else:
                        state = await database.run(
                            functools.partial(hit, client_base + number, n)
                        )
                    states.append(state)
                return states

            results = await asyncio.gather(*(client(i) for i in range(CLIENTS)))
            opened = database.pool.get_stats()["pool_size"]
            return [state for states in results for state in states], opened

    states, client_connections = asyncio.run(scenario())

    assert client_connections == CLIENTS
    assert len(states) == CLIENTS * OPERATIONS_PER_CLIENT
    assert len({pid for pid, _ in states}) <= SERVER_CONNECTIONS
    assert {timeout for _, timeout in states} == {f"{TIMEOUT_MS}ms"}
    assert count_hits(backend, client_base) == CLIENTS * OPERATIONS_PER_CLIENT // 2


def test_pooler_shares_server_connections_sync(
    bouncer: Bouncer, backend: TcpCluster
) -> None:
    settings = bouncer.settings(pool_size=CLIENTS)
    client_base = 200
    states: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    with Database(
        resolve_target(bouncer.url(), settings), settings, min_size=CLIENTS
    ) as database:
        start = threading.Barrier(CLIENTS)

        def client(number: int) -> None:
            try:
                start.wait(timeout=10)
                for n in range(OPERATIONS_PER_CLIENT):
                    if n % 2:
                        state = database.run(
                            server_state, transaction=False, idempotent=True
                        )
                    else:
                        state = database.run(
                            functools.partial(hit, client_base + number, n)
                        )
                    with lock:
                        states.append(state)
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        client_connections = database.pool.get_stats()["pool_size"]

    assert errors == []
    assert client_connections == CLIENTS
    assert len(states) == CLIENTS * OPERATIONS_PER_CLIENT
    assert len({pid for pid, _ in states}) <= SERVER_CONNECTIONS
    assert {timeout for _, timeout in states} == {f"{TIMEOUT_MS}ms"}
    assert count_hits(backend, client_base) == CLIENTS * OPERATIONS_PER_CLIENT // 2


@pytest.mark.parametrize("transaction", [True, False])
@pytest.mark.parametrize("kind", ["async", "sync"])
def test_pooler_enforces_statement_timeout(
    bouncer: Bouncer, kind: str, transaction: bool
) -> None:
    settings = bouncer.settings(pool_size=2)
    target = resolve_target(bouncer.url(), settings)
    elapsed: list[float] = []

    with pytest.raises(DatabaseError) as info:
        if kind == "sync":
            with Database(target, settings) as database:
                began = time.monotonic()
                try:
                    database.run(
                        sleep_longer_than_timeout,
                        transaction=transaction,
                        idempotent=True,
                    )
                finally:
                    elapsed.append(time.monotonic() - began)
        else:

            async def scenario() -> None:
                async with AsyncDatabase(target, settings) as database:
                    began = time.monotonic()
                    try:
                        await database.run(
                            sleep_longer_than_timeout,
                            transaction=transaction,
                            idempotent=True,
                        )
                    finally:
                        elapsed.append(time.monotonic() - began)

            asyncio.run(scenario())

    assert info.value.sqlstate == "57014"
    assert "statement timeout" in str(info.value)
    # The statement would sleep for five times the timeout.
    assert elapsed[0] < TIMEOUT_MS * 4 / 1000


def test_pooler_timeout_stays_in_transaction(single_bouncer: Bouncer) -> None:
    settings = single_bouncer.settings(pool_size=1)
    with Database(resolve_target(single_bouncer.url(), settings), settings) as database:
        pid, timeout = database.run(server_state)

    # Another client of the same, only server connection: SET LOCAL ended
    # with the transaction, so it reads the server's default.
    with psycopg.connect(single_bouncer.url(), sslmode="disable") as conn:
        row = conn.execute(
            "SELECT pg_backend_pid(), current_setting('statement_timeout')"
        ).fetchone()

    assert timeout == f"{TIMEOUT_MS}ms"
    assert row == (pid, "0")


def test_without_pooler_setting_connection_rejected(
    bouncer: Bouncer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = bouncer.settings(pooler=False, pool_size=1)
    target = resolve_target(bouncer.url(), settings)

    with pytest.raises(ConnectionFailedError) as direct:
        connect(target)

    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    with pytest.raises(ConnectionFailedError) as pooled:
        Database(target, settings, wait_s=1).open()

    assert "unsupported startup parameter: options" in str(direct.value)
    assert "could not open a connection" in str(pooled.value)
    assert "unsupported startup parameter: options" in caplog.text


def test_prepared_statements_break_without_setting(bouncer: Bouncer) -> None:
    url = bouncer.url()
    with (
        psycopg.connect(url, sslmode="disable", autocommit=True) as holder,
        psycopg.connect(
            url, sslmode="disable", autocommit=True, prepare_threshold=0
        ) as prepared,
    ):
        prepared_pid = prepared.execute("SELECT pg_backend_pid()").fetchone()
        # PgBouncer hands out the most recently released server connection
        # first, so the holder's transaction takes the one where the
        # statement was prepared, and the next execution gets the other.
        with holder.transaction():
            holder_pid = holder.execute("SELECT pg_backend_pid()").fetchone()
            with pytest.raises(psycopg.errors.InvalidSqlStatementName) as info:
                prepared.execute("SELECT pg_backend_pid()")

    assert holder_pid == prepared_pid
    assert "does not exist" in str(info.value)


def test_pooler_setting_survives_server_switches(bouncer: Bouncer) -> None:
    settings = bouncer.settings(pool_size=1)
    url = bouncer.url()
    pids = []
    with (
        Database(resolve_target(url, settings), settings) as database,
        # The holder itself must not prepare statements either.
        psycopg.connect(
            url, sslmode="disable", autocommit=True, prepare_threshold=None
        ) as holder,
    ):
        # Every other round the holder takes the server connection that the
        # database released last, so the database alternates between the
        # two, more times than psycopg's threshold for preparing.
        for round_number in range(12):
            if round_number % 2:
                with holder.transaction():
                    holder.execute("SELECT 1")
                    pid, _timeout = database.run(server_state, transaction=False)
            else:
                pid, _timeout = database.run(server_state, transaction=False)
            pids.append(pid)

    assert len(set(pids)) == SERVER_CONNECTIONS
    assert all(pid != following for pid, following in itertools.pairwise(pids))


def test_pooler_batcher_lookups(bouncer: Bouncer) -> None:
    settings = bouncer.settings(pool_size=4)
    doubles = (
        "SELECT g, g * 2 FROM generate_series(1, 100) AS g "
        "WHERE g = ANY(%(keys)s::int[])"
    )

    async def scenario() -> list[list[tuple[Any, ...]]]:
        async with AsyncDatabase(
            resolve_target(bouncer.url(), settings), settings
        ) as database:
            batcher = database.lookup_batcher(doubles)
            found = []
            for _ in range(3):
                found += await asyncio.gather(
                    *(batcher.fetch([n]) for n in range(1, 21))
                )
            return found

    assert asyncio.run(scenario()) == [[(n, 2 * n)] for n in range(1, 21)] * 3
