"""mcp_authdb.db.verify against real PostgreSQL: each kind of drift, by message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from mcp_authdb.db import connect, resolve_target
from mcp_authdb.db.migrations import migrate
from mcp_authdb.db.verify import (
    SCRATCH_SCHEMA_PREFIX,
    Difference,
    verify_schema,
)
from mcp_authdb.errors import AuthDBError, SchemaCheckError

from conftest import ScratchDatabase

IDLE = psycopg.pq.TransactionStatus.IDLE


def verify_after(db: ScratchDatabase, statements: str) -> list[Difference]:
    """Run ``statements`` on ``db``, then return what verify_schema reports."""
    with db.connect(autocommit=True) as conn:
        conn.execute(statements.encode())
        return verify_schema(conn)


def scratch_schemas(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)",
        (SCRATCH_SCHEMA_PREFIX,),
    ).fetchall()
    return [row[0] for row in rows]


def test_clean_database_matches(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        assert verify_schema(conn) == []


# Each case: statements that change a migrated database, and the one
# difference that verify_schema must report for them.
SINGLE_DRIFTS = [
    pytest.param(
        "DROP INDEX idx_user_sessions_expires",
        Difference(
            "missing",
            "index idx_user_sessions_expires",
            "index idx_user_sessions_expires on user_sessions (expires_at) is missing",
        ),
        id="missing-index",
    ),
    pytest.param(
        "ALTER TABLE request_logs DROP COLUMN status",
        Difference(
            "missing",
            "column request_logs.status",
            "column request_logs.status of type character varying(50) is missing",
        ),
        id="missing-column",
    ),
    pytest.param(
        "ALTER TABLE user_sessions ALTER COLUMN subscription_level SET DEFAULT 'basic'",
        Difference(
            "changed",
            "column user_sessions.subscription_level",
            "column user_sessions.subscription_level has default "
            "'basic'::character varying, expected 'free'::character varying",
        ),
        id="changed-default",
    ),
    pytest.param(
        "ALTER TABLE request_logs ALTER COLUMN method DROP NOT NULL",
        Difference(
            "changed",
            "column request_logs.method",
            "column request_logs.method allows NULL, expected NOT NULL",
        ),
        id="dropped-not-null",
    ),
    pytest.param(
        "DROP FUNCTION cleanup_expired_sessions()",
        Difference(
            "missing",
            "function cleanup_expired_sessions()",
            "function cleanup_expired_sessions() is missing",
        ),
        id="dropped-function",
    ),
    pytest.param(
        "DROP TRIGGER user_sessions_set_updated_at ON user_sessions",
        Difference(
            "missing",
            "trigger user_sessions_set_updated_at on user_sessions",
            "trigger user_sessions_set_updated_at on user_sessions is missing",
        ),
        id="missing-trigger",
    ),
    pytest.param(
        "ALTER TABLE user_sessions DISABLE TRIGGER user_sessions_set_updated_at",
        Difference(
            "changed",
            "trigger user_sessions_set_updated_at on user_sessions",
            "trigger user_sessions_set_updated_at on user_sessions is disabled, "
            "expected enabled",
        ),
        id="disabled-trigger",
    ),
    pytest.param(
        "ALTER TABLE user_sessions ADD COLUMN note text",
        Difference(
            "extra",
            "column user_sessions.note",
            "column user_sessions.note of type text is not in the expected schema",
        ),
        id="extra-column",
    ),
    pytest.param(
        "CREATE INDEX idx_request_logs_method ON request_logs (method)",
        Difference(
            "extra",
            "index idx_request_logs_method",
            "index idx_request_logs_method on request_logs (method) is not in the "
            "expected schema",
        ),
        id="extra-index",
    ),
    pytest.param(
        """
        DROP INDEX idx_user_sessions_expires;
        CREATE INDEX idx_user_sessions_expires ON user_sessions (expires_at DESC);
        """,
        Difference(
            "changed",
            "index idx_user_sessions_expires",
            "index idx_user_sessions_expires on user_sessions is defined as "
            "CREATE INDEX idx_user_sessions_expires ON user_sessions USING btree "
            "(expires_at DESC), expected CREATE INDEX idx_user_sessions_expires "
            "ON user_sessions USING btree (expires_at)",
        ),
        id="changed-index-sort-order",
    ),
    pytest.param(
        """
        CREATE OR REPLACE FUNCTION cleanup_expired_sessions() RETURNS bigint
            LANGUAGE plpgsql
            AS $function$ BEGIN RETURN 0; END $function$
        """,
        Difference(
            "changed",
            "function cleanup_expired_sessions()",
            "function cleanup_expired_sessions() has a different body than expected",
        ),
        id="changed-function-body",
    ),
    pytest.param(
        "CREATE FUNCTION cleanup_expired_sessions(integer) RETURNS integer"
        " LANGUAGE sql AS 'SELECT 0'",
        Difference(
            "extra",
            "function cleanup_expired_sessions(integer)",
            "function cleanup_expired_sessions(integer) is not in the expected schema",
        ),
        id="extra-function-overload",
    ),
    pytest.param(
        """
        ALTER TABLE request_logs
            DROP CONSTRAINT request_logs_duration_ms_not_negative,
            ADD CONSTRAINT request_logs_duration_ms_not_negative
                CHECK (duration_ms > 0)
        """,
        Difference(
            "changed",
            "constraint request_logs_duration_ms_not_negative on request_logs",
            "constraint request_logs_duration_ms_not_negative on request_logs is "
            "CHECK ((duration_ms > 0)), expected CHECK ((duration_ms >= 0))",
        ),
        id="changed-check-constraint",
    ),
]


@pytest.mark.parametrize(("statements", "expected"), SINGLE_DRIFTS)
def test_drift_reported(
    db: ScratchDatabase, statements: str, expected: Difference
) -> None:
    assert verify_after(db, statements) == [expected]


def test_wrong_column_type(db: ScratchDatabase) -> None:
    differences = verify_after(
        db,
        """
        DROP TRIGGER user_sessions_notify_update ON user_sessions;
        ALTER TABLE user_sessions
            ALTER COLUMN scope DROP DEFAULT,
            ALTER COLUMN scope TYPE text USING array_to_string(scope, ' '),
            ALTER COLUMN scope SET DEFAULT ''
        """,
    )

    assert (
        Difference(
            "changed",
            "column user_sessions.scope",
            "column user_sessions.scope has type text, expected text[]",
        )
        in differences
    )
    # A text column cannot keep the text[] default, so that differs as well.
    assert (
        Difference(
            "changed",
            "column user_sessions.scope",
            "column user_sessions.scope has default ''::text, expected '{}'::text[]",
        )
        in differences
    )
    # The change-notification trigger reads scope, so it had to go first.
    assert (
        Difference(
            "missing",
            "trigger user_sessions_notify_update on user_sessions",
            "trigger user_sessions_notify_update on user_sessions is missing",
        )
        in differences
    )
    assert len(differences) == 3


def test_unrelated_objects_ignored(db: ScratchDatabase) -> None:
    differences = verify_after(
        db,
        """
        CREATE TABLE app_notes (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            body text NOT NULL CHECK (body <> '')
        );
        CREATE INDEX idx_app_notes_body ON app_notes (body);
        CREATE FUNCTION app_note_count() RETURNS bigint
            LANGUAGE sql AS 'SELECT count(*) FROM app_notes';
        CREATE TRIGGER app_notes_set_updated_at
            BEFORE UPDATE ON app_notes
            FOR EACH ROW EXECUTE FUNCTION mcp_authdb_set_updated_at();
        """,
    )

    assert differences == []


def test_empty_database_lists_everything(empty_db: ScratchDatabase) -> None:
    with empty_db.connect() as conn:
        differences = verify_schema(conn)

    objects = [difference.object for difference in differences]
    assert objects == [
        "table oauth_clients",
        "index idx_oauth_clients_source_created",
        "index idx_oauth_clients_unused",
        "table oauth_codes",
        "index idx_oauth_codes_expires",
        "table oauth_grants",
        "index idx_oauth_grants_client_id",
        "table oauth_pending_authorizations",
        "index idx_oauth_pending_expires",
        "table request_logs",
        "index idx_request_logs_created_brin",
        "index idx_request_logs_user_created",
        "table user_sessions",
        "index idx_user_sessions_access_token_hash",
        "index idx_user_sessions_ends",
        "index idx_user_sessions_expires",
        "index idx_user_sessions_family_id",
        "index idx_user_sessions_refresh_token_hash",
        "index idx_user_sessions_user_id",
        "trigger user_sessions_notify_delete on user_sessions",
        "trigger user_sessions_notify_truncate on user_sessions",
        "trigger user_sessions_notify_update on user_sessions",
        "trigger user_sessions_set_updated_at on user_sessions",
        "function cleanup_expired_sessions()",
        "function cleanup_expired_sessions_batch(integer)",
        "procedure cleanup_expired_sessions_in_batches(integer, bigint)",
        "function cleanup_oauth_state(interval)",
        "function cleanup_request_logs_batch(interval, integer)",
        "procedure cleanup_request_logs_in_batches(interval, integer, bigint)",
        "function mcp_authdb_notify_session_change()",
        "function mcp_authdb_notify_sessions_truncated()",
        "function mcp_authdb_set_updated_at()",
    ]
    assert {difference.kind for difference in differences} == {"missing"}
    assert "table user_sessions is missing" in [str(d) for d in differences]


@pytest.mark.parametrize("autocommit", [False, True])
def test_connection_left_as_found(db: ScratchDatabase, autocommit: bool) -> None:
    with db.connect(autocommit=autocommit) as conn:
        conn.execute("SET search_path TO public")
        if not autocommit:
            conn.commit()

        differences = verify_schema(conn)

        assert differences == []
        assert conn.info.transaction_status == IDLE
        assert conn.autocommit is autocommit
        row = conn.execute("SHOW search_path").fetchone()
        assert row == ("public",)
        assert scratch_schemas(conn) == []


def test_failed_check_rolled_back(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        conn.execute("SET default_transaction_read_only = on")
        conn.commit()

        with pytest.raises(SchemaCheckError) as excinfo:
            verify_schema(conn)

        assert excinfo.value.sqlstate == "25006"
        assert "against the primary" in str(excinfo.value)
        assert conn.info.transaction_status == IDLE
        assert scratch_schemas(conn) == []


def test_connection_in_transaction_rejected(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        conn.execute("SELECT 1")

        with pytest.raises(SchemaCheckError, match="outside a transaction"):
            verify_schema(conn)


def test_live_schema_follows_search_path(empty_db: ScratchDatabase) -> None:
    with empty_db.connect(autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
    # search_path set in the URL, as a deployment would set it.
    url = make_conninfo(empty_db.url, options="-c search_path=app")
    target = resolve_target(url, empty_db.settings)

    with connect(target, autocommit=True) as conn:
        migrate(conn)
        differences = verify_schema(conn)
    with empty_db.connect() as conn:
        public_differences = verify_schema(conn)

    assert differences == []
    assert "table user_sessions is missing" in [str(d) for d in public_differences]


def test_search_path_without_schema(db: ScratchDatabase) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute("SET search_path TO no_such_schema")

        with pytest.raises(SchemaCheckError) as excinfo:
            verify_schema(conn)

        assert "'no_such_schema' names no schema" in str(excinfo.value)
        assert conn.info.transaction_status == IDLE


@pytest.fixture
def role_without_create(db: ScratchDatabase) -> Iterator[str]:
    """A role of this test's own, without the CREATE privilege on ``db``."""
    role = f"{db.name}_no_create"
    with db.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        yield role
    finally:
        with db.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_missing_create_privilege(
    db: ScratchDatabase, role_without_create: str
) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role_without_create)))

        with pytest.raises(AuthDBError) as excinfo:
            verify_schema(conn)

        error = excinfo.value
        assert isinstance(error, SchemaCheckError)
        assert error.sqlstate == "42501"
        assert "CREATE privilege" in str(error)
        assert f"GRANT CREATE ON DATABASE {db.name} TO" in str(error)
        assert isinstance(error.__cause__, psycopg.errors.InsufficientPrivilege)
        assert conn.info.transaction_status == IDLE
