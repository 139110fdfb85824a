"""Test fixtures: one real PostgreSQL per test session, a database per test.

With ``DATABASE_URL`` set, the tests use that server and need a role that may
create databases. Without it they start the embedded server in a private
temporary folder. A template database with the migrations applied is built
once per session, and each test that needs the schema gets a clone of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from mcp_authdb.db import Settings, connect, resolve_target
from mcp_authdb.db.embedded import EmbeddedServer
from mcp_authdb.db.migrations import migrate

_counter = itertools.count()


@dataclasses.dataclass
class PostgresServer:
    """The PostgreSQL server of this test session."""

    admin_conninfo: str
    embedded: EmbeddedServer | None

    def url_for(self, dbname: str) -> str:
        """Return a conninfo string for ``dbname``, usable as DATABASE_URL."""
        return make_conninfo(self.admin_conninfo, dbname=dbname)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_conninfo, autocommit=True)


@dataclasses.dataclass
class ScratchDatabase:
    """A database of its own for one test."""

    name: str
    url: str
    settings: Settings

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """Open a connection the way the project does (timeout, SSL policy)."""
        return connect(resolve_target(self.url, self.settings), autocommit=autocommit)

    def run_cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run ``python -m mcp_authdb ARGS`` on this database and wait for it."""
        return subprocess.run(
            [sys.executable, "-m", "mcp_authdb", *args],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def env(self, **extra: str) -> dict[str, str]:
        """Return an environment for a subprocess that uses this database."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
        env["DATABASE_URL"] = self.url
        env.update(extra)
        return env


def _test_settings(url: str) -> Settings:
    return Settings.from_env().replace(database_url=url)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        target = resolve_target(url, Settings.from_env())
        yield PostgresServer(admin_conninfo=target.conninfo, embedded=None)
        return

    # A folder of our own under the shared temporary folder: as root, the
    # server's unprivileged user must be able to enter it.
    data_dir = Path(tempfile.mkdtemp(prefix="mcp-authdb-test-"))
    data_dir.chmod(0o755)
    server = EmbeddedServer(data_dir / "data")
    server.acquire()
    try:
        yield PostgresServer(
            admin_conninfo=server.cluster.conninfo("postgres"), embedded=server
        )
    finally:
        server.release()
        shutil.rmtree(data_dir, ignore_errors=True)


def _create_database(server: PostgresServer, template: str | None = None) -> str:
    name = f"mcp_authdb_test_{os.getpid()}_{next(_counter)}"
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with server.admin() as conn:
        conn.execute(query)
    return name


def _drop_database(server: PostgresServer, name: str) -> None:
    with server.admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


@pytest.fixture(scope="session")
def template_name(pg_server: PostgresServer) -> Iterator[str]:
    """A database with every migration applied, to clone for each test."""
    name = _create_database(pg_server)
    with psycopg.connect(pg_server.url_for(name)) as conn:
        migrate(conn)
    try:
        yield name
    finally:
        _drop_database(pg_server, name)


def _test_database(server: PostgresServer, name: str) -> ScratchDatabase:
    url = server.url_for(name)
    return ScratchDatabase(name=name, url=url, settings=_test_settings(url))


@pytest.fixture
def empty_db(pg_server: PostgresServer) -> Iterator[ScratchDatabase]:
    """A new, empty database."""
    name = _create_database(pg_server)
    try:
        yield _test_database(pg_server, name)
    finally:
        _drop_database(pg_server, name)


@pytest.fixture
def db(pg_server: PostgresServer, template_name: str) -> Iterator[ScratchDatabase]:
    """A new database with the current schema, cloned from the template."""
    name = _create_database(pg_server, template=template_name)
    try:
        yield _test_database(pg_server, name)
    finally:
        _drop_database(pg_server, name)
