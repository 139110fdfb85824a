"""The migrations build exactly schema.sql, and every SQL file can run twice.

Schemas are compared with ``snapshot_schema``, which covers tables, columns,
constraints, indexes, triggers and functions with their bodies.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import mcp_authdb.sql
from mcp_authdb.db.migrations import migrate
from mcp_authdb.db.verify import SchemaSnapshot, compare_snapshots, snapshot_schema
from mcp_authdb.sql import load_migrations, load_schema

from conftest import ScratchDatabase

SQL_DIR = Path(mcp_authdb.sql.__file__).parent
SCHEMA_FILE = SQL_DIR / "schema.sql"
MIGRATION_FILES = [SQL_DIR / "migrations" / m.filename for m in load_migrations()]
EXPECTED_TABLES = {
    "user_sessions",
    "request_logs",
    "oauth_clients",
    "oauth_pending_authorizations",
    "oauth_codes",
    "oauth_grants",
}
PSQL_TIMEOUT_S = 60


@pytest.fixture
def psql() -> str:
    path = shutil.which("psql")
    if path is None:
        pytest.skip("psql is not installed, and these tests run SQL files with it")
    return path


def run_psql(
    psql: str, db: ScratchDatabase, path: Path
) -> subprocess.CompletedProcess[str]:
    """Run one SQL file as a person would, stopping at the first error."""
    return subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path), db.url],
        capture_output=True,
        text=True,
        timeout=PSQL_TIMEOUT_S,
        check=False,
    )


def snapshot_current_schema(conn: psycopg.Connection[Any]) -> SchemaSnapshot:
    row = conn.execute("SELECT current_schema()").fetchone()
    assert row is not None
    return snapshot_schema(conn, row[0])


def build_schema_sql(conn: psycopg.Connection[Any], schema_name: str) -> SchemaSnapshot:
    """Build schema.sql in a new schema of ``conn``'s database and snapshot it."""
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema_name)))
        conn.execute(
            "SELECT set_config('search_path', quote_ident(%s), true)", (schema_name,)
        )
        conn.execute(load_schema().encode())
    return snapshot_schema(conn, schema_name)


def describe_changes(expected: SchemaSnapshot, actual: SchemaSnapshot) -> str:
    differences = compare_snapshots(expected, actual)
    return "\n".join(str(difference) for difference in differences)


def test_migrations_replay_to_schema_sql(empty_db: ScratchDatabase) -> None:
    with empty_db.connect(autocommit=True) as conn:
        migrate(conn)
        replayed = snapshot_current_schema(conn)
        built = build_schema_sql(conn, "from_schema_sql")

    assert set(built.tables) == EXPECTED_TABLES
    assert all(function.body for function in built.functions.values())
    assert replayed == built, describe_changes(built, replayed)


def test_schema_sql_runs_twice(empty_db: ScratchDatabase, psql: str) -> None:
    first = run_psql(psql, empty_db, SCHEMA_FILE)
    with empty_db.connect() as conn:
        after_first = snapshot_current_schema(conn)
    second = run_psql(psql, empty_db, SCHEMA_FILE)
    with empty_db.connect() as conn:
        after_second = snapshot_current_schema(conn)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "ERROR" not in second.stderr
    assert set(after_first.tables) == EXPECTED_TABLES
    assert after_second == after_first, describe_changes(after_first, after_second)


def test_migrations_run_twice(empty_db: ScratchDatabase, psql: str) -> None:
    with empty_db.connect(autocommit=True) as conn:
        for path in MIGRATION_FILES:
            first = run_psql(psql, empty_db, path)
            after_first = snapshot_current_schema(conn)
            second = run_psql(psql, empty_db, path)
            after_second = snapshot_current_schema(conn)

            assert first.returncode == 0, f"{path.name}: {first.stderr}"
            assert second.returncode == 0, f"{path.name}: {second.stderr}"
            assert after_second == after_first, (
                f"{path.name} changed the schema when run again:\n"
                + describe_changes(after_first, after_second)
            )

        # Running an earlier file again must not undo a later one.
        for path in MIGRATION_FILES:
            again = run_psql(psql, empty_db, path)
            assert again.returncode == 0, f"{path.name}: {again.stderr}"
        after_all_again = snapshot_current_schema(conn)
        built = build_schema_sql(conn, "from_schema_sql")

    assert after_all_again == built, describe_changes(built, after_all_again)
