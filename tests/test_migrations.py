"""The migration runner on a real PostgreSQL: order, ledger, locks, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest

from mcp_authdb.db.migrations import (
    ADVISORY_LOCK_KEY,
    LEDGER_TABLE,
    migrate,
    read_status,
)
from mcp_authdb.errors import MigrationError
from mcp_authdb.sql import load_migrations

from conftest import ScratchDatabase

ALL_VERSIONS = [m.version for m in load_migrations()]


def ledger(conn: psycopg.Connection[Any]) -> list[tuple[int, str]]:
    rows = conn.execute(f"SELECT version, checksum FROM {LEDGER_TABLE} ORDER BY 1")
    return [(int(version), str(checksum)) for version, checksum in rows.fetchall()]


def table_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def test_migrate_fresh_applies_all(empty_db: ScratchDatabase) -> None:
    with empty_db.connect() as conn:
        applied = migrate(conn)
        rows = ledger(conn)

    assert [m.version for m in applied] == ALL_VERSIONS
    assert [version for version, _ in rows] == ALL_VERSIONS
    assert [checksum for _, checksum in rows] == [m.checksum for m in load_migrations()]


def test_migrate_again_changes_nothing(empty_db: ScratchDatabase) -> None:
    with empty_db.connect() as conn:
        migrate(conn)
        before = conn.execute(f"SELECT * FROM {LEDGER_TABLE} ORDER BY 1").fetchall()
        applied = migrate(conn)
        after = conn.execute(f"SELECT * FROM {LEDGER_TABLE} ORDER BY 1").fetchall()

    assert applied == []
    assert after == before


def test_migrate_needs_idle_connection(empty_db: ScratchDatabase) -> None:
    with empty_db.connect() as conn:
        conn.execute("SELECT 1")
        with pytest.raises(MigrationError, match="outside a transaction"):
            migrate(conn)


def test_dry_run_writes_nothing(empty_db: ScratchDatabase) -> None:
    with empty_db.connect() as conn:
        pending = migrate(conn, dry_run=True)
        ledger_exists = table_exists(conn, LEDGER_TABLE)
        sessions_exist = table_exists(conn, "user_sessions")

    assert [m.version for m in pending] == ALL_VERSIONS
    assert not ledger_exists
    assert not sessions_exist


def test_dry_run_cli_prints_sql(empty_db: ScratchDatabase) -> None:
    result = empty_db.run_cli("migrate", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "-- 0001_user_sessions.sql" in result.stdout
    assert "CREATE TABLE IF NOT EXISTS user_sessions" in result.stdout
    with empty_db.connect() as conn:
        assert not table_exists(conn, LEDGER_TABLE)


def test_eight_concurrent_migrators(empty_db: ScratchDatabase) -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "mcp_authdb", "migrate", "--json"],
            env=empty_db.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]

    for process, (_stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    applied = [
        migration["version"]
        for stdout, _ in outputs
        for migration in json.loads(stdout)["applied"]
    ]
    assert sorted(applied) == ALL_VERSIONS
    with empty_db.connect() as conn:
        assert [version for version, _ in ledger(conn)] == ALL_VERSIONS


def _wait_for_lock_wait(conn: psycopg.Connection[Any], timeout_s: float) -> int:
    """Return the pid of a mcp-authdb backend waiting on a lock."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = 'mcp-authdb' AND wait_event_type = 'Lock'"
            "   AND datname = current_database()"
        ).fetchone()
        if row:
            return int(row[0])
        time.sleep(0.05)
    raise AssertionError("the migrator never waited on the lock")


def _wait_for_backend_exit(conn: psycopg.Connection[Any], pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        if row == (0,):
            return
        time.sleep(0.05)
    raise AssertionError(f"backend {pid} did not exit after its client was killed")


def test_killed_migrator_keeps_previous_version(empty_db: ScratchDatabase) -> None:
    # An uncommitted CREATE TABLE of the same name makes 0002's CREATE TABLE
    # wait on the catalog's unique index, so the migrator is killed while
    # 0002's transaction is open and 0001 is already committed.
    with empty_db.connect() as blocker, empty_db.connect(autocommit=True) as watcher:
        blocker.execute("CREATE TABLE request_logs (blocked integer)")
        migrator = subprocess.Popen(
            [sys.executable, "-m", "mcp_authdb", "migrate"],
            env=empty_db.env(DB_COMMAND_TIMEOUT="60000"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            backend = _wait_for_lock_wait(watcher, timeout_s=60)
            os.kill(migrator.pid, signal.SIGKILL)
            migrator.wait(timeout=10)
        finally:
            if migrator.poll() is None:
                migrator.kill()
        blocker.rollback()
        _wait_for_backend_exit(watcher, backend)

        assert migrator.returncode == -signal.SIGKILL
        assert [version for version, _ in ledger(watcher)] == [1]
        assert table_exists(watcher, "user_sessions")
        assert not table_exists(watcher, "request_logs")

    with empty_db.connect() as conn:
        applied = migrate(conn)
        assert [m.version for m in applied] == ALL_VERSIONS[1:]
        assert [version for version, _ in ledger(conn)] == ALL_VERSIONS


def test_failed_migration_rolls_back(empty_db: ScratchDatabase) -> None:
    # A request_logs table of another shape: 0002 skips creating the table,
    # then its index names a column that does not exist.
    with empty_db.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE request_logs (other integer)")
        with pytest.raises(MigrationError) as raised:
            migrate(conn)
        rows = ledger(conn)
        functions = conn.execute(
            "SELECT to_regprocedure('cleanup_expired_sessions()')"
        ).fetchone()

    assert "0002_request_logs.sql" in str(raised.value)
    assert raised.value.sqlstate == "42703"
    assert [version for version, _ in rows] == [1]
    assert functions == (None,)


def test_changed_file_is_named(db: ScratchDatabase) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute(f"UPDATE {LEDGER_TABLE} SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(MigrationError, match=r"0001_user_sessions\.sql"):
            migrate(conn)
        with pytest.raises(MigrationError, match="has changed since it was applied"):
            read_status(conn)

    result = db.run_cli("migrate")
    assert result.returncode == 2
    assert "0001_user_sessions.sql" in result.stderr


def test_newer_migration_is_reported(db: ScratchDatabase) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {LEDGER_TABLE} (version, name, checksum)"
            " VALUES (9999, 'from_the_future', 'abc')"
        )
        status = read_status(conn)

    assert [row.version for row in status.unknown] == [9999]
    assert status.is_current
    result = db.run_cli("status", "--json")
    assert result.returncode == 0, result.stderr
    states = {
        row["version"]: row["state"] for row in json.loads(result.stdout)["migrations"]
    }
    assert states[9999] == "unknown"
    assert states[1] == "applied"


def test_lock_timeout_names_the_wait(empty_db: ScratchDatabase) -> None:
    with empty_db.connect(autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        with empty_db.connect() as conn, pytest.raises(MigrationError) as raised:
            migrate(conn, lock_timeout_s=0.3)

    assert "migration lock" in str(raised.value)
    assert "MCP_AUTHDB_LOCK_TIMEOUT" in str(raised.value)


def test_status_lists_pending_then_applied(empty_db: ScratchDatabase) -> None:
    before = empty_db.run_cli("status", "--json")
    migrated = empty_db.run_cli("migrate")
    after = empty_db.run_cli("status")

    assert before.returncode == 0, before.stderr
    report = json.loads(before.stdout)
    assert report["current"] is False
    assert {row["state"] for row in report["migrations"]} == {"pending"}
    assert migrated.returncode == 0, migrated.stderr
    assert "0003_session_cleanup.sql" in migrated.stdout
    assert after.returncode == 0, after.stderr
    assert "up to date" in after.stdout
