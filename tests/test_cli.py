"""The installed command line, run in a subprocess as a user or a script would."""

from __future__ import annotations

import json
import os
import pty
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql

from mcp_authdb.sql import load_migrations

from conftest import ScratchDatabase


def seed_expired(db: ScratchDatabase, expired: int, live: int) -> None:
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO user_sessions"
            " (user_id, access_token_hash, refresh_token_hash, expires_at)"
            " SELECT 'user-' || n, 'a-' || n, 'r-' || n,"
            "  now() + CASE WHEN n <= %s THEN interval '-1 hour'"
            "               ELSE interval '1 hour' END"
            " FROM generate_series(1, %s) AS n",
            (expired, expired + live),
        )
        conn.commit()


def count_sessions(db: ScratchDatabase) -> int:
    with db.connect() as conn:
        row = conn.execute("SELECT count(*) FROM user_sessions").fetchone()
    assert row is not None
    return int(row[0])


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "mcp-authdb"
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_verify_clean_exits_zero(db: ScratchDatabase) -> None:
    result = db.run_cli("verify", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["matches"] is True
    assert report["differences"] == []


def test_verify_drift_exits_one(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        conn.execute("DROP INDEX idx_user_sessions_expires")
        conn.commit()

    result = db.run_cli("verify")

    assert result.returncode == 1
    assert "idx_user_sessions_expires" in result.stdout
    assert "missing" in result.stdout


def test_cleanup_without_terminal_prints_result(db: ScratchDatabase) -> None:
    seed_expired(db, expired=25, live=5)

    result = db.run_cli("cleanup", "--batch-size", "10")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deleted 25 expired session(s)")
    assert len(result.stdout.splitlines()) == 1
    assert "rows/s" not in result.stderr
    assert count_sessions(db) == 5


def test_cleanup_json_reports_batches(db: ScratchDatabase) -> None:
    seed_expired(db, expired=25, live=5)

    result = db.run_cli("cleanup", "--json", MCP_AUTHDB_BATCH_SIZE="10")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["deleted"] == 25
    assert report["batches"] == 3


def test_cleanup_on_terminal_shows_progress(db: ScratchDatabase) -> None:
    seed_expired(db, expired=30, live=0)
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "mcp_authdb", "cleanup", "--batch-size", "10"],
            env=db.env(),
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
        )
        stdout, _ = process.communicate(timeout=120)
        os.close(terminal)
        terminal = -1
        terminal_output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                break
            if not chunk:
                break
            terminal_output += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)

    assert process.returncode == 0
    assert "deleted 30 expired session(s)" in stdout
    assert b"rows/s" in terminal_output
    assert b"deleted 30 expired sessions" in terminal_output


def test_bad_batch_size_names_value(db: ScratchDatabase) -> None:
    from_option = db.run_cli("cleanup", "--batch-size", "0")
    from_env = db.run_cli("cleanup", MCP_AUTHDB_BATCH_SIZE="lots")

    assert from_option.returncode == 2
    assert "--batch-size 0" in from_option.stderr
    assert from_env.returncode == 2
    assert "MCP_AUTHDB_BATCH_SIZE='lots'" in from_env.stderr


def test_bad_setting_names_variable(db: ScratchDatabase) -> None:
    result = db.run_cli("status", DB_COMMAND_TIMEOUT="soon")

    assert result.returncode == 2
    assert "DB_COMMAND_TIMEOUT='soon'" in result.stderr


def test_weaker_sslmode_is_rejected(db: ScratchDatabase) -> None:
    result = db.run_cli(
        "status", DATABASE_URL=db.url + " sslmode=disable", DB_SSL_MODE="require"
    )

    assert result.returncode == 2
    assert "sslmode=disable" in result.stderr
    assert "DB_SSL_MODE=require" in result.stderr


def test_connection_error_hides_password(db: ScratchDatabase) -> None:
    # A port on loopback with nothing listening: the connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://someone:s3cret-Passw0rd@127.0.0.1:{port}/nowhere"

    result = db.run_cli("status", DATABASE_URL=url, DB_SSL_MODE="disable")

    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr
    assert "s3cret-Passw0rd" not in result.stderr + result.stdout


def test_migrate_json_lists_applied(empty_db: ScratchDatabase) -> None:
    first = empty_db.run_cli("migrate", "--json")
    second = empty_db.run_cli("migrate", "--json")

    assert first.returncode == 0, first.stderr
    assert [m["version"] for m in json.loads(first.stdout)["applied"]] == [
        m.version for m in load_migrations()
    ]
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["applied"] == []
    assert json.loads(second.stdout)["current"] is True


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_psql_calls_spec_function(db: ScratchDatabase) -> None:
    seed_expired(db, expired=3, live=2)

    result = subprocess.run(
        ["psql", "-X", "-At", "-c", "SELECT cleanup_expired_sessions()", db.url],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
    assert count_sessions(db) == 2


@pytest.fixture
def limited_role(db: ScratchDatabase) -> Iterator[str]:
    """A role that may read the ledger but create nothing, set at connection start."""
    role = f"limited_{db.name}"
    with db.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role))
        )
        conn.execute(
            sql.SQL("GRANT SELECT ON mcp_authdb_migrations TO {}").format(
                sql.Identifier(role)
            )
        )
    try:
        yield role
    finally:
        with db.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_migrate_current_needs_no_create(
    db: ScratchDatabase, limited_role: str
) -> None:
    url = db.url + f" options='-c role={limited_role}'"

    result = db.run_cli("migrate", DATABASE_URL=url)

    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_migrate_without_privilege_exits_two(
    db: ScratchDatabase, limited_role: str
) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute("DELETE FROM mcp_authdb_migrations WHERE version = 3")
    url = db.url + f" options='-c role={limited_role}'"

    result = db.run_cli("migrate", DATABASE_URL=url)

    assert result.returncode == 2
    assert "SQLSTATE 42501" in result.stderr
    assert "Traceback" not in result.stderr


def test_lock_timeout_must_be_finite(db: ScratchDatabase) -> None:
    from_option = db.run_cli("migrate", "--lock-timeout", "nan")
    from_env = db.run_cli("migrate", MCP_AUTHDB_LOCK_TIMEOUT="inf")

    assert from_option.returncode == 2
    assert "--lock-timeout" in from_option.stderr
    assert from_env.returncode == 2
    assert "MCP_AUTHDB_LOCK_TIMEOUT='inf'" in from_env.stderr


def test_batch_size_rejects_out_of_range(db: ScratchDatabase) -> None:
    huge = db.run_cli("cleanup", "--batch-size", "99999999999999999")
    underscored = db.run_cli("cleanup", "--batch-size", "1_000")

    assert huge.returncode == 2
    assert "out of range" in huge.stderr
    assert underscored.returncode == 2
    assert "not a whole number" in underscored.stderr
