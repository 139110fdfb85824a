"""The request log writers across PostgreSQL restarts, on a cluster of their own.

Each test logs a numbered sequence of rows, about one per millisecond, while
the cluster is stopped and started again twice: once in fast mode, where the
backends end their sessions, and once in immediate mode, where the server
quits at once and runs crash recovery at the next start. Every number must
be stored exactly once: rows queued while the server was down wait in the
queue, and a COMMIT whose result was lost is checked with pg_xact_status
before its batch is written again. After each restart a pooled SELECT must
also succeed within a bounded time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from mcp_authdb.db import Settings, resolve_target
from mcp_authdb.db.migrations import migrate
from mcp_authdb.db.pool import AsyncDatabase, Database, Operation, Query
from mcp_authdb.store.request_log import AsyncRequestLog, RequestLog, RequestLogStats
from pgcluster import ROLE, TcpCluster, start_cluster

pytest_plugins = ["pgcluster"]

DATABASE = "restart_logs"
# How long a pooled SELECT may take to succeed once the server is back.
RECOVERY_LIMIT_S = 10.0
# Seconds of logging before, during and after each restart.
PHASE_S = 0.6
WRITER_OPTIONS: dict[str, Any] = {
    "batch_size": 50,
    "max_delay_s": 0.02,
    "min_backoff_s": 0.02,
    "max_backoff_s": 0.3,
}


@pytest.fixture(scope="module")
def restart_cluster(cluster_folder: Path, pg_bin_dir: Path) -> Iterator[TcpCluster]:
    """A cluster on 127.0.0.1 that the tests may stop and start."""
    tcp = start_cluster(cluster_folder / "restart", pg_bin_dir)
    try:
        yield tcp
    finally:
        if tcp.cluster.is_running():
            tcp.cluster.stop()


@pytest.fixture
def logs_url(restart_cluster: TcpCluster) -> Iterator[str]:
    """A URL for role app of a new, migrated database that app owns."""
    with psycopg.connect(restart_cluster.socket_conninfo(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(DATABASE)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(DATABASE), sql.Identifier(ROLE)
            )
        )
    url = restart_cluster.url().replace("/postgres", f"/{DATABASE}")
    with psycopg.connect(url) as conn:
        migrate(conn)
    yield url


def settings_for(url: str) -> Settings:
    # The cluster has SSL off, which "prefer" accepts.
    return Settings(database_url=url, ssl_mode="prefer")


def select_one() -> Operation[int]:
    result = yield Query("SELECT 1")
    return int(result.rows[0][0])


def stored_sequence(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT (parameters->>'seq')::int FROM request_logs ORDER BY 1"
        ).fetchall()
    return [row[0] for row in rows]


def check_exactly_once(url: str, logged: int, stats: RequestLogStats) -> None:
    assert logged > 500
    assert stored_sequence(url) == list(range(logged))
    assert stats.queued == logged
    assert stats.written == logged
    assert stats.dropped == {}
    assert stats.queue_depth == 0
    # The restarts broke the writer's connection at least twice.
    assert stats.failed_attempts >= 2


def test_async_writer_survives_restarts(
    restart_cluster: TcpCluster, logs_url: str
) -> None:
    settings = settings_for(logs_url)
    target = resolve_target(logs_url, settings)
    cluster = restart_cluster.cluster

    async def scenario() -> tuple[int, RequestLogStats, list[float]]:
        recoveries = []
        async with (
            AsyncDatabase(target, settings, wait_s=RECOVERY_LIMIT_S) as database,
            AsyncRequestLog(target, settings, **WRITER_OPTIONS) as writer,
        ):
            logged = 0
            stop = asyncio.Event()

            async def produce() -> None:
                nonlocal logged
                while not stop.is_set():
                    writer.log(
                        "tools/call", user_id="restart", parameters={"seq": logged}
                    )
                    logged += 1
                    await asyncio.sleep(0.001)

            producer = asyncio.create_task(produce())
            await asyncio.sleep(PHASE_S)
            for mode in ("fast", "immediate"):
                await asyncio.to_thread(cluster.stop, mode)
                await asyncio.sleep(PHASE_S)
                await asyncio.to_thread(cluster.start)
                began = time.monotonic()
                assert (
                    await database.run(select_one, transaction=False, idempotent=True)
                    == 1
                )
                recoveries.append(time.monotonic() - began)
                await asyncio.sleep(PHASE_S)
            stop.set()
            await producer
            stats = await writer.aclose(timeout_s=30)
        return logged, stats, recoveries

    logged, stats, recoveries = asyncio.run(scenario())

    check_exactly_once(logs_url, logged, stats)
    assert all(seconds < RECOVERY_LIMIT_S for seconds in recoveries)


def test_thread_writer_survives_restarts(
    restart_cluster: TcpCluster, logs_url: str
) -> None:
    settings = settings_for(logs_url)
    target = resolve_target(logs_url, settings)
    cluster = restart_cluster.cluster
    stop = threading.Event()
    logged = 0

    def produce(writer: RequestLog) -> None:
        nonlocal logged
        while not stop.is_set():
            writer.log("tools/call", user_id="restart", parameters={"seq": logged})
            logged += 1
            time.sleep(0.001)

    recoveries = []
    with (
        Database(target, settings, wait_s=RECOVERY_LIMIT_S) as database,
        RequestLog(target, settings, **WRITER_OPTIONS) as writer,
    ):
        producer = threading.Thread(target=produce, args=(writer,))
        producer.start()
        try:
            time.sleep(PHASE_S)
            for mode in ("fast", "immediate"):
                cluster.stop(mode)
                time.sleep(PHASE_S)
                cluster.start()
                began = time.monotonic()
                assert database.run(select_one, transaction=False, idempotent=True) == 1
                recoveries.append(time.monotonic() - began)
                time.sleep(PHASE_S)
        finally:
            stop.set()
            producer.join()
        stats = writer.close(timeout_s=30)

    check_exactly_once(logs_url, logged, stats)
    assert all(seconds < RECOVERY_LIMIT_S for seconds in recoveries)
