"""The migration runner: applies the package's migration files in order.

Each migration runs in its own transaction together with its ledger row in
``mcp_authdb_migrations``, so a migration is either applied and recorded or
not applied at all, even when the runner is killed. A session-level advisory
lock lets any number of runners start at once: one applies, the others wait
and then find nothing left to do.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime
from typing import Any

import psycopg

from mcp_authdb.errors import MigrationError
from mcp_authdb.sql import Migration, load_migrations

logger = logging.getLogger(__name__)

LEDGER_TABLE = "mcp_authdb_migrations"
# The key of the advisory lock held while migrating: the bytes "mcpauthd" read
# as a big-endian integer. Every mcp-authdb runner uses the same key.
ADVISORY_LOCK_KEY = int.from_bytes(b"mcpauthd", "big")
DEFAULT_LOCK_TIMEOUT_S = 60.0
_LOCK_POLL_S = 0.1

_CREATE_LEDGER = f"""
CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamp with time zone NOT NULL DEFAULT now()
)
"""


@dataclasses.dataclass(frozen=True)
class AppliedMigration:
    """A row of the ledger."""

    version: int
    name: str
    checksum: str
    applied_at: datetime


@dataclasses.dataclass(frozen=True)
class MigrationStatus:
    """The migrations of a database: applied, pending, and unknown to this version."""

    applied: list[AppliedMigration]
    pending: list[Migration]
    # Versions in the ledger with no file: applied by a newer mcp-authdb.
    unknown: list[AppliedMigration]

    @property
    def is_current(self) -> bool:
        return not self.pending


def read_status(conn: psycopg.Connection[Any]) -> MigrationStatus:
    """Compare the ledger with the migration files, without changing anything.

    Raises :class:`MigrationError` naming the file when an applied migration's
    file has changed since it was applied.
    """
    return _compare(load_migrations(), _read_ledger(conn))


def migrate(
    conn: psycopg.Connection[Any],
    *,
    dry_run: bool = False,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> list[Migration]:
    """Apply the pending migrations in order and return them.

    ``conn`` must not be inside a transaction; it is switched to autocommit.
    With ``dry_run`` nothing is written and the pending migrations are
    returned.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise MigrationError(
            "migrate needs a connection outside a transaction; commit or roll "
            "back first"
        )
    conn.autocommit = True
    if dry_run:
        return read_status(conn).pending

    _lock(conn, lock_timeout_s)
    try:
        # CREATE TABLE IF NOT EXISTS checks the CREATE privilege even when the
        # table exists, so an up-to-date database must not need it.
        if not _ledger_exists(conn):
            conn.execute(_CREATE_LEDGER)
        status = read_status(conn)
        for migration in status.pending:
            _apply(conn, migration)
        return status.pending
    finally:
        _unlock(conn)


def _apply(conn: psycopg.Connection[Any], migration: Migration) -> None:
    began = time.perf_counter()
    try:
        with conn.transaction():
            # The file is sent as one simple query: several statements, no
            # parameters, so psql and the runner execute the same text.
            conn.execute(migration.sql.encode())
            conn.execute(
                f"INSERT INTO {LEDGER_TABLE} (version, name, checksum)"
                " VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
    except psycopg.Error as exc:
        detail = exc.diag.message_primary or str(exc)
        hint = ""
        if isinstance(exc, psycopg.errors.QueryCanceled):
            hint = (
                "; raise DB_COMMAND_TIMEOUT for this run, and look in "
                "pg_stat_activity for a session holding a lock on the table"
            )
        raise MigrationError.from_driver(
            f"migration {migration.filename} failed and was rolled back: "
            f"{detail} (SQLSTATE {exc.sqlstate}); the database is as it was "
            f"before this migration{hint}",
            exc,
        ) from exc
    logger.info(
        "applied migration %s in %.0f ms",
        migration.filename,
        (time.perf_counter() - began) * 1000,
        extra={"action": "migrate.apply", "version": migration.version},
    )


def _lock(conn: psycopg.Connection[Any], timeout_s: float) -> None:
    # pg_try_advisory_lock in a loop rather than pg_advisory_lock: a blocking
    # wait would be cancelled by statement_timeout, and a loop can log that
    # it is waiting.
    deadline = time.monotonic() + timeout_s
    waiting_logged = False
    while True:
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,)
        ).fetchone()
        if row and row[0]:
            return
        if not waiting_logged:
            waiting_logged = True
            logger.info(
                "another migrator holds the migration lock; waiting up to %.0f s",
                timeout_s,
                extra={"action": "migrate.lock_wait"},
            )
        if time.monotonic() >= deadline:
            raise MigrationError(
                f"another migrator held the migration lock for more than "
                f"{timeout_s:.0f} s; find it in pg_stat_activity or raise "
                "MCP_AUTHDB_LOCK_TIMEOUT"
            )
        time.sleep(_LOCK_POLL_S)


def _unlock(conn: psycopg.Connection[Any]) -> None:
    if conn.closed:
        return
    try:
        conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    except psycopg.Error:
        # The lock belongs to the session, so closing the connection frees it.
        logger.warning(
            "could not release the migration lock; closing the connection frees it",
            extra={"action": "migrate.unlock_failed"},
        )


def _ledger_exists(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", (LEDGER_TABLE,)).fetchone()
    return row is not None and row[0] is not None


def _read_ledger(conn: psycopg.Connection[Any]) -> list[AppliedMigration]:
    if not _ledger_exists(conn):
        return []
    rows = conn.execute(
        f"SELECT version, name, checksum, applied_at FROM {LEDGER_TABLE}"
        " ORDER BY version"
    ).fetchall()
    return [AppliedMigration(*row) for row in rows]


def _compare(
    migrations: list[Migration], ledger: list[AppliedMigration]
) -> MigrationStatus:
    files = {migration.version: migration for migration in migrations}
    applied_versions = {row.version for row in ledger}
    unknown = []
    for row in ledger:
        migration = files.get(row.version)
        if migration is None:
            unknown.append(row)
        elif migration.checksum != row.checksum:
            raise MigrationError(
                f"migration file {migration.filename} has changed since it was "
                f"applied on {row.applied_at:%Y-%m-%d %H:%M:%S %Z} (checksum "
                f"{row.checksum[:12]}, file now {migration.checksum[:12]}); "
                "restore the file as it was applied, and put the change in a new "
                "migration"
            )
    pending = [m for m in migrations if m.version not in applied_versions]
    return MigrationStatus(
        applied=[row for row in ledger if row.version in files],
        pending=pending,
        unknown=unknown,
    )
