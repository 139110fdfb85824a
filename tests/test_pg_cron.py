"""The pg_cron commands on a private cluster that preloads a real pg_cron.

The cluster keeps pg_cron's jobs in database ``app``, which is migrated.
Database ``other`` is migrated too and cleaned by jobs registered from
``app``; database ``bare`` has no schema. Without the pg_cron files of the
machine's PostgreSQL (the Debian package postgresql-<N>-cron) the tests are
skipped with that reason; CI installs the package first.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from mcp_authdb.db.embedded import LocalCluster
from mcp_authdb.db.migrations import migrate
from mcp_authdb.store.pg_cron import (
    MAX_JOB_NAME_BYTES,
    job_names,
    request_log_command,
    session_cleanup_command,
)
from pgcluster import free_port, server_user

from conftest import ScratchDatabase

pytest_plugins = ["pgcluster"]

CRON_DATABASE = "app"
OTHER_DATABASE = "other"
BARE_DATABASE = "bare"
LIMITED_ROLE = "cron_limited"


@dataclasses.dataclass
class CronCluster:
    cluster: LocalCluster

    def conninfo(self, dbname: str = CRON_DATABASE, **params: str) -> str:
        return psycopg.conninfo.make_conninfo(self.cluster.conninfo(dbname), **params)

    def connect(self, dbname: str = CRON_DATABASE) -> psycopg.Connection[Any]:
        return psycopg.connect(self.conninfo(dbname), autocommit=True)

    def run_cli(
        self,
        db: ScratchDatabase,
        *args: str,
        dbname: str = CRON_DATABASE,
        **params: str,
    ) -> subprocess.CompletedProcess[str]:
        return db.run_cli(*args, DATABASE_URL=self.conninfo(dbname, **params))

    def jobs(self) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            return conn.execute(
                "SELECT jobid, jobname, schedule, command, database, username"
                " FROM cron.job ORDER BY jobname"
            ).fetchall()


def pg_cron_files(bin_dir: Path) -> list[Path]:
    """Return the pg_cron files that the machine's PostgreSQL is missing."""
    out = subprocess.run(
        [str(bin_dir / "pg_config"), "--pkglibdir", "--sharedir"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    expected = [Path(out[0]) / "pg_cron.so", Path(out[1]) / "extension/pg_cron.control"]
    return [path for path in expected if not path.is_file()]


def wait_for_launcher(conn: psycopg.Connection[Any]) -> None:
    """Wait for pg_cron's launcher, which starts once its database exists."""
    deadline = time.monotonic() + 30
    while not conn.execute(
        "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'pg_cron launcher'"
    ).fetchone():
        assert time.monotonic() < deadline, "pg_cron's launcher did not start"
        time.sleep(0.1)


def new_cron_cluster(folder: Path, bin_dir: Path, cron_database: str) -> LocalCluster:
    """Create and start a cluster that preloads pg_cron, or skip without pg_cron."""
    missing = pg_cron_files(bin_dir)
    if missing:
        major = bin_dir.parent.name
        pytest.skip(
            f"pg_cron is not installed for PostgreSQL {major} (missing "
            f"{', '.join(map(str, missing))}); install the package "
            f"postgresql-{major}-cron to run these tests"
        )
    folder.mkdir()
    folder.chmod(0o755)
    run_dir = folder / "run"
    cluster = LocalCluster(
        bin_dir,
        folder / "pgdata",
        run_dir,
        user=server_user(),
        port=free_port(),
        settings={
            "fsync": "off",
            "shared_preload_libraries": "'pg_cron'",
            "cron.database_name": f"'{cron_database}'",
            # Jobs connect through the socket rather than TCP to localhost.
            "cron.host": f"'{run_dir}'",
        },
    )
    cluster.init()
    cluster.start()
    return cluster


@pytest.fixture(scope="module")
def cron_cluster(cluster_folder: Path, pg_bin_dir: Path) -> Iterator[CronCluster]:
    cluster = new_cron_cluster(cluster_folder / "pg_cron", pg_bin_dir, CRON_DATABASE)
    try:
        with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
            for name in (CRON_DATABASE, OTHER_DATABASE, BARE_DATABASE):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(LIMITED_ROLE))
            )
        for name in (CRON_DATABASE, OTHER_DATABASE):
            with psycopg.connect(cluster.conninfo(name)) as conn:
                migrate(conn)
        with psycopg.connect(cluster.conninfo(CRON_DATABASE), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_cron")
            conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA cron TO {}").format(
                    sql.Identifier(LIMITED_ROLE)
                )
            )
            wait_for_launcher(conn)
        yield CronCluster(cluster)
    finally:
        cluster.stop()


@pytest.fixture
def cron(cron_cluster: CronCluster) -> Iterator[CronCluster]:
    """The cluster, with no job before and after the test."""
    yield cron_cluster
    with cron_cluster.connect() as conn:
        conn.execute("SELECT cron.unschedule(jobid) FROM cron.job")


def test_install_creates_two_jobs(db: ScratchDatabase, cron: CronCluster) -> None:
    result = cron.run_cli(db, "cron", "install", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    names = job_names(CRON_DATABASE)
    assert [job["name"] for job in report["jobs"]] == sorted(names.all())
    assert report["cleaned_database"] == CRON_DATABASE
    assert report["log_retention_days"] == 30
    rows = cron.jobs()
    assert [row[1] for row in rows] == sorted(names.all())
    by_name = {row[1]: row for row in rows}
    assert by_name[names.sessions][2] == "17 3 * * *"
    assert by_name[names.sessions][3] == session_cleanup_command(5000)
    assert by_name[names.request_logs][3] == request_log_command(
        timedelta(days=30), 5000
    )
    assert {row[4] for row in rows} == {CRON_DATABASE}


def test_install_again_updates_in_place(db: ScratchDatabase, cron: CronCluster) -> None:
    first = cron.run_cli(db, "cron", "install")
    before = cron.jobs()

    second = cron.run_cli(
        db,
        "cron",
        "install",
        "--schedule",
        "5 4 * * 0",
        "--log-retention-days",
        "7",
        "--batch-size",
        "100",
    )
    after = cron.jobs()

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert len(after) == 2
    assert [row[0] for row in after] == [row[0] for row in before]
    assert {row[2] for row in after} == {"5 4 * * 0"}
    commands = {row[1]: row[3] for row in after}
    names = job_names(CRON_DATABASE)
    assert commands[names.sessions] == "CALL cleanup_expired_sessions_in_batches(100)"
    assert "make_interval(secs => 604800), 100" in commands[names.request_logs]
    assert "scheduled 2 pg_cron job(s)" in second.stdout
    assert "5 4 * * 0" in second.stdout


def test_zero_retention_drops_log_job(db: ScratchDatabase, cron: CronCluster) -> None:
    cron.run_cli(db, "cron", "install")

    result = cron.run_cli(db, "cron", "install", "--log-retention-days", "0")

    assert result.returncode == 0, result.stderr
    assert [row[1] for row in cron.jobs()] == [job_names(CRON_DATABASE).sessions]
    assert "request logs are kept forever" in result.stdout


def test_retention_days_from_env(db: ScratchDatabase, cron: CronCluster) -> None:
    result = db.run_cli(
        "cron",
        "install",
        "--json",
        DATABASE_URL=cron.conninfo(),
        MCP_AUTHDB_REQUEST_LOG_RETENTION_DAYS="3",
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["log_retention_days"] == 3


def test_remove_deletes_jobs(db: ScratchDatabase, cron: CronCluster) -> None:
    cron.run_cli(db, "cron", "install")

    removed = cron.run_cli(db, "cron", "remove", "--json")
    again = cron.run_cli(db, "cron", "remove")

    assert removed.returncode == 0, removed.stderr
    assert sorted(json.loads(removed.stdout)["removed"]) == sorted(
        job_names(CRON_DATABASE).all()
    )
    assert cron.jobs() == []
    assert again.returncode == 0, again.stderr
    assert "no cleanup job for database 'app' to remove" in again.stdout


def test_status_lists_jobs(db: ScratchDatabase, cron: CronCluster) -> None:
    empty = cron.run_cli(db, "cron", "status")
    cron.run_cli(db, "cron", "install", "--schedule", "0 * * * *")

    listed = cron.run_cli(db, "cron", "status")
    as_json = cron.run_cli(db, "cron", "status", "--json")

    assert empty.returncode == 0, empty.stderr
    assert "no cleanup job for database 'app'" in empty.stdout
    assert listed.returncode == 0, listed.stderr
    assert job_names(CRON_DATABASE).sessions in listed.stdout
    assert "never run" in listed.stdout
    jobs = json.loads(as_json.stdout)["jobs"]
    assert [job["schedule"] for job in jobs] == ["0 * * * *", "0 * * * *"]
    assert all(job["last_status"] is None for job in jobs)


def test_job_commands_clean_like_pg_cron(
    db: ScratchDatabase, cron: CronCluster
) -> None:
    """Run each stored command as pg_cron does: one simple-protocol statement."""
    cron.run_cli(db, "cron", "install", "--batch-size", "2")
    with cron.connect() as conn:
        conn.execute(
            "INSERT INTO user_sessions"
            " (user_id, access_token_hash, refresh_token_hash, expires_at)"
            " SELECT 'u' || n, 'a' || n, 'r' || n,"
            "  now() + CASE WHEN n <= 5 THEN interval '-1 hour'"
            "               ELSE interval '1 hour' END"
            " FROM generate_series(1, 7) AS n"
        )
        conn.execute(
            "INSERT INTO request_logs (method, created_at)"
            " SELECT 'm', now() - CASE WHEN n <= 5 THEN interval '31 days'"
            "                          ELSE interval '1 day' END"
            " FROM generate_series(1, 6) AS n"
        )

    with cron.connect() as conn:
        commands = conn.execute("SELECT command FROM cron.job").fetchall()
        for (command,) in commands:
            result = conn.pgconn.exec_(command.encode())
            assert result.error_message == b""
        sessions = conn.execute("SELECT count(*) FROM user_sessions").fetchone()
        logs = conn.execute("SELECT count(*) FROM request_logs").fetchone()
        conn.execute("TRUNCATE user_sessions, request_logs")

    assert len(commands) == 2
    assert sessions == (2,)
    assert logs == (1,)


def test_install_for_other_database(db: ScratchDatabase, cron: CronCluster) -> None:
    result = cron.run_cli(db, "cron", "install", "--database", OTHER_DATABASE, "--json")
    status = cron.run_cli(db, "cron", "status", "--database", OTHER_DATABASE)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cleaned_database"] == OTHER_DATABASE
    rows = cron.jobs()
    assert [row[1] for row in rows] == sorted(job_names(OTHER_DATABASE).all())
    assert {row[4] for row in rows} == {OTHER_DATABASE}
    assert job_names(OTHER_DATABASE).sessions in status.stdout


def test_other_database_needs_privilege(db: ScratchDatabase, cron: CronCluster) -> None:
    result = cron.run_cli(
        db, "cron", "install", "--database", OTHER_DATABASE, user=LIMITED_ROLE
    )
    own = cron.run_cli(db, "cron", "install", "--json", user=LIMITED_ROLE)

    assert result.returncode == 2
    assert "GRANT EXECUTE ON FUNCTION cron.schedule_in_database" in result.stderr
    assert "Traceback" not in result.stderr
    assert own.returncode == 0, own.stderr
    assert {row[5] for row in cron.jobs()} == {LIMITED_ROLE}


def test_wrong_database_names_cron_database(
    db: ScratchDatabase, cron: CronCluster
) -> None:
    result = cron.run_cli(db, "cron", "install", dbname=OTHER_DATABASE)

    assert result.returncode == 2
    assert "pg_cron keeps its jobs in database 'app'" in result.stderr
    assert "--database other" in result.stderr
    assert cron.jobs() == []


def test_unmigrated_database_is_rejected(
    db: ScratchDatabase, cron: CronCluster
) -> None:
    result = cron.run_cli(db, "cron", "install", "--database", BARE_DATABASE)

    assert result.returncode == 2
    assert "database 'bare' has no cleanup_expired_sessions_in_batches" in result.stderr
    assert "mcp-authdb migrate" in result.stderr
    assert cron.jobs() == []


def test_invalid_schedule_is_rejected(db: ScratchDatabase, cron: CronCluster) -> None:
    result = cron.run_cli(db, "cron", "install", "--schedule", "every day")

    assert result.returncode == 2
    assert "pg_cron rejected the schedule 'every day'" in result.stderr
    assert cron.jobs() == []


def test_server_without_pg_cron_loaded(db: ScratchDatabase) -> None:
    """The test server of ``db`` does not preload pg_cron."""
    with db.connect() as conn:
        available = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_cron'"
        ).fetchone()

    result = db.run_cli("cron", "install")

    assert result.returncode == 2
    if available == (1,):
        assert "pg_cron 1." in result.stderr
        assert "not loaded" in result.stderr
        assert "shared_preload_libraries" in result.stderr
    else:
        assert "pg_cron is not installed on this PostgreSQL server" in result.stderr


def test_install_needs_extension_and_worker(
    db: ScratchDatabase, cluster_folder: Path, pg_bin_dir: Path
) -> None:
    """Install before CREATE EXTENSION, then after pg_cron is no longer loaded."""
    folder = cluster_folder / "pg_cron_unloaded"
    cluster = new_cron_cluster(folder, pg_bin_dir, "postgres")
    url = cluster.conninfo("postgres")
    try:
        with psycopg.connect(url) as conn:
            migrate(conn)
        before = db.run_cli("cron", "install", DATABASE_URL=url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_cron")
            wait_for_launcher(conn)
        installed = db.run_cli("cron", "install", DATABASE_URL=url)
        cluster.stop()
        del cluster.settings["shared_preload_libraries"]
        cluster.start()

        again = db.run_cli("cron", "install", DATABASE_URL=url)
        status = db.run_cli("cron", "status", "--json", DATABASE_URL=url)
        removed = db.run_cli("cron", "remove", DATABASE_URL=url)
    finally:
        cluster.stop()

    assert before.returncode == 2
    assert "available but not created in database 'postgres'" in before.stderr
    assert "run CREATE EXTENSION pg_cron there" in before.stderr
    assert installed.returncode == 0, installed.stderr
    assert again.returncode == 2
    assert "is installed in database 'postgres', but not loaded" in again.stderr
    assert "add pg_cron to shared_preload_libraries" in again.stderr
    # The jobs can be listed, but removing them takes pg_cron's functions.
    assert status.returncode == 0, status.stderr
    assert len(json.loads(status.stdout)["jobs"]) == 2
    assert removed.returncode == 2
    assert "but not loaded" in removed.stderr


def test_job_names_fit_name_type() -> None:
    long_name = "d" * 63
    other_long_name = "d" * 62 + "e"

    names = job_names(long_name)
    other = job_names(other_long_name)

    assert job_names("app").sessions == "mcp-authdb-sessions@app"
    assert job_names("app").request_logs == "mcp-authdb-request-logs@app"
    for name in names.all() + other.all():
        assert len(name.encode()) <= MAX_JOB_NAME_BYTES
    assert names.sessions != other.sessions
    assert names.request_logs != other.request_logs
