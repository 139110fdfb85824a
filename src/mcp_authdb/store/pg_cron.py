"""Cleanup jobs in pg_cron, the job scheduler that runs inside PostgreSQL.

Two named jobs per application database, both run by pg_cron's background
worker at the same cron schedule:

- the session job runs ``CALL cleanup_expired_sessions_in_batches(N)``, which
  deletes the sessions that have ended, committing after each batch of N;
- the request log job runs ``CALL cleanup_request_logs_in_batches(retention,
  N)``, which deletes the rows older than the retention, committing after each
  batch of N. It exists only while a retention is set.

pg_cron keeps its jobs in one database per server, named by the server
setting ``cron.database_name`` (default ``postgres``), and the extension can
only be created there. Jobs for another database on the same server are
registered from that database with ``cron.schedule_in_database``, which only
a superuser, or a role granted EXECUTE on it, may call. Job names contain the
application database's name, so several databases can share one pg_cron.

Registering again with the same names updates the jobs in place (pg_cron 1.3
and later upsert on job name and user), so :func:`install_cleanup_jobs` is
idempotent. pg_cron runs each command as one top-level statement, so the
``COMMIT`` inside the procedures is allowed. A test runs
the commands that way, and a manual run confirmed it with pg_cron 1.4 in its
default mode, where it connects through libpq.
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime, timedelta
from typing import Any

import psycopg

from mcp_authdb.errors import (
    AuthDBError,
    ConfigurationError,
    DatabaseError,
    InvalidValueError,
)
from mcp_authdb.store.cleanup import MAX_BATCH_SIZE

DEFAULT_CRON_SCHEDULE = "17 3 * * *"
SESSION_JOB_PREFIX = "mcp-authdb-sessions"
REQUEST_LOG_JOB_PREFIX = "mcp-authdb-request-logs"
# cron.job.jobname is of type name, which PostgreSQL cuts at 63 bytes.
MAX_JOB_NAME_BYTES = 63
MAX_SCHEDULE_LENGTH = 100
# The error of a pg_cron function called while pg_cron is not preloaded.
_NOT_PRELOADED = "can only be loaded via shared_preload_libraries"

# The SQL objects that the job commands call, from the migrations.
_CLEANUP_FUNCTIONS = (
    "cleanup_expired_sessions_in_batches(integer,bigint)",
    "cleanup_request_logs_in_batches(interval,integer,bigint)",
)

_LIST_JOBS = """
SELECT j.jobid, j.jobname, j.schedule, j.command, j.database, j.username,
       j.active, last_run.status, last_run.return_message, last_run.start_time
FROM cron.job AS j
LEFT JOIN LATERAL (
    SELECT r.status, r.return_message, r.start_time
    FROM cron.job_run_details AS r
    WHERE r.jobid = j.jobid
    ORDER BY r.runid DESC
    LIMIT 1
) AS last_run ON true
WHERE j.jobname = ANY(%s)
ORDER BY j.jobname, j.username
"""


@dataclasses.dataclass(frozen=True)
class CronJobNames:
    """The pg_cron job names of one application database."""

    sessions: str
    request_logs: str

    def all(self) -> list[str]:
        return [self.sessions, self.request_logs]


@dataclasses.dataclass(frozen=True)
class CronJob:
    """A row of ``cron.job``, with the outcome of its latest run if any.

    ``last_status`` is pg_cron's run status (``succeeded``, ``failed``,
    ``running``, ``starting``) and ``last_message`` its return message.
    """

    job_id: int
    name: str
    schedule: str
    command: str
    database: str
    username: str
    active: bool
    last_status: str | None
    last_message: str | None
    last_run_at: datetime | None


def job_names(database: str) -> CronJobNames:
    """Return the job names for ``database``, each at most 63 bytes long.

    A name that would be longer ends with a hash of the whole database name
    instead of its tail, so that different databases keep different names.
    """
    return CronJobNames(
        sessions=_job_name(SESSION_JOB_PREFIX, database),
        request_logs=_job_name(REQUEST_LOG_JOB_PREFIX, database),
    )


def _job_name(prefix: str, database: str) -> str:
    name = f"{prefix}@{database}"
    if len(name.encode()) <= MAX_JOB_NAME_BYTES:
        return name
    digest = hashlib.sha256(database.encode()).hexdigest()[:12]
    room = MAX_JOB_NAME_BYTES - len(f"{prefix}@~{digest}".encode())
    head = database.encode()[:room].decode(errors="ignore")
    return f"{prefix}@{head}~{digest}"


def session_cleanup_command(batch_size: int) -> str:
    """Return the command of the session job."""
    _validate_batch_size(batch_size)
    return f"CALL cleanup_expired_sessions_in_batches({batch_size})"


def request_log_command(retention: timedelta, batch_size: int) -> str:
    """Return the command of the request log job: delete rows older than retention.

    ``retention`` is written in whole seconds.
    """
    _validate_batch_size(batch_size)
    seconds = int(retention.total_seconds())
    if seconds < 1:
        raise InvalidValueError(
            f"log retention {retention} is shorter than a second; pass a "
            "positive number of days"
        )
    return (
        "CALL cleanup_request_logs_in_batches("
        f"make_interval(secs => {seconds}), {batch_size})"
    )


def _validate_batch_size(batch_size: object) -> None:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size <= MAX_BATCH_SIZE
    ):
        raise InvalidValueError(
            f"batch_size={batch_size!r} is invalid; pass a number of rows from "
            f"1 to {MAX_BATCH_SIZE}"
        )


def check_pg_cron(conn: psycopg.Connection[Any], *, require_worker: bool = True) -> str:
    """Check that pg_cron is set up for the jobs of ``conn``; return its version.

    ``conn`` must be in autocommit mode. Raises :class:`ConfigurationError`
    saying what to do when the extension is missing from the server, not
    created in this database, or kept in another database
    (``cron.database_name``). With ``require_worker`` it also raises when
    pg_cron's background worker is not running, so that no job would run.
    Listing and removing jobs works without the worker, but removing needs
    pg_cron in ``shared_preload_libraries``, which :func:`remove_cleanup_jobs`
    reports.
    """
    current = _scalar(conn, "SELECT current_database()")
    version = _scalar(
        conn, "SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'"
    )
    if version is None:
        raise ConfigurationError(_missing_extension_message(conn, str(current)))
    if not require_worker:
        return str(version)

    launcher_database = _launcher_database(conn)
    if launcher_database is None:
        if _is_preloaded(conn) is False:
            raise _not_loaded(str(current))
        raise ConfigurationError(
            f"pg_cron {version} is installed, but its background worker is not "
            "running right now, so no job would run; look for pg_cron errors "
            "in the server log, then run this command again"
        )
    if launcher_database not in (_UNKNOWN, current):
        raise ConfigurationError(
            f"pg_cron's background worker reads its jobs from database "
            f"{launcher_database!r} (cron.database_name), not {current!r}; run "
            f"this command with DATABASE_URL naming database "
            f"{launcher_database!r}, and --database {current} to clean this one"
        )
    return str(version)


def _is_preloaded(conn: psycopg.Connection[Any]) -> bool | None:
    """Tell whether shared_preload_libraries lists pg_cron; None if unreadable."""
    try:
        libraries = _scalar(conn, "SELECT current_setting('shared_preload_libraries')")
    except psycopg.errors.InsufficientPrivilege:
        return None
    return "pg_cron" in [name.strip() for name in str(libraries).split(",")]


def _not_loaded(database: str) -> ConfigurationError:
    return ConfigurationError(
        f"pg_cron is installed in database {database!r}, but not "
        "loaded, so its functions fail and no job runs; add pg_cron to "
        "shared_preload_libraries in postgresql.conf and restart PostgreSQL"
    )


_UNKNOWN = object()


def _launcher_database(conn: psycopg.Connection[Any]) -> object:
    """Return the database of pg_cron's launcher, None without one, or _UNKNOWN.

    Roles without pg_read_all_stats see no backend_type of others' processes.
    """
    may_read = _scalar(
        conn,
        "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')"
        " FROM pg_roles WHERE rolname = current_user",
    )
    if not may_read:
        return _UNKNOWN
    return _scalar(
        conn,
        "SELECT datname FROM pg_stat_activity"
        " WHERE backend_type = 'pg_cron launcher' LIMIT 1",
    )


def _missing_extension_message(conn: psycopg.Connection[Any], current: str) -> str:
    available = _scalar(
        conn,
        "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_cron'",
    )
    server_version = _scalar(conn, "SELECT current_setting('server_version_num')")
    major = int(str(server_version)) // 10000
    if available is None:
        return (
            "pg_cron is not installed on this PostgreSQL server; install it (on "
            f"Debian and Ubuntu the package postgresql-{major}-cron, on a "
            "managed service its pg_cron option), add pg_cron to "
            "shared_preload_libraries, restart PostgreSQL, and run CREATE "
            "EXTENSION pg_cron in the database named by cron.database_name"
        )

    try:
        cron_database = _scalar(
            conn, "SELECT current_setting('cron.database_name', true)"
        )
    except psycopg.errors.InsufficientPrivilege:
        return (
            f"pg_cron {available} is available but not created in database "
            f"{current!r}; ask a superuser to run CREATE EXTENSION pg_cron in "
            "the database named by cron.database_name, then run this command "
            "connected to that database"
        )
    if cron_database is None:
        return (
            f"pg_cron {available} is available but not loaded; add pg_cron to "
            "shared_preload_libraries in postgresql.conf, restart PostgreSQL, "
            "and run CREATE EXTENSION pg_cron in the database named by "
            "cron.database_name (default postgres)"
        )
    if cron_database != current:
        return (
            f"pg_cron keeps its jobs in database {cron_database!r} "
            f"(cron.database_name), not {current!r}; run this command with "
            f"DATABASE_URL naming database {cron_database!r} and --database "
            f"{current}, or set cron.database_name = '{current}' and restart "
            "PostgreSQL"
        )
    load = ""
    if _is_preloaded(conn) is False:
        load = (
            "add pg_cron to shared_preload_libraries in postgresql.conf, "
            "restart PostgreSQL, then "
        )
    return (
        f"pg_cron {available} is available but not created in database "
        f"{current!r}; {load}run CREATE EXTENSION pg_cron there as a "
        "superuser, and run this command again"
    )


def check_cleanup_functions(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`ConfigurationError` unless the jobs' SQL objects exist.

    ``conn`` must be connected to the database that the jobs clean.
    """
    database = _scalar(conn, "SELECT current_database()")
    for signature in _CLEANUP_FUNCTIONS:
        if _scalar(conn, "SELECT to_regprocedure(%s)", (signature,)) is None:
            raise ConfigurationError(
                f"database {database!r} has no {signature}; apply the "
                "migrations there first, with `mcp-authdb migrate`"
            )


def install_cleanup_jobs(
    conn: psycopg.Connection[Any],
    *,
    database: str | None = None,
    schedule: str = DEFAULT_CRON_SCHEDULE,
    log_retention: timedelta | None,
    batch_size: int,
) -> list[CronJob]:
    """Register or update the cleanup jobs of ``database``; return them.

    ``conn`` is connected to pg_cron's database, in autocommit mode;
    ``database`` defaults to that same database. Without ``log_retention``
    the request log job is removed, so request logs are kept. Both changes
    commit together. Raises :class:`InvalidValueError` for a schedule that
    pg_cron rejects, and :class:`DatabaseError` when the role may not
    schedule jobs in another database.
    """
    schedule = _validate_schedule(schedule)
    session_command = session_cleanup_command(batch_size)
    log_command = (
        None
        if log_retention is None
        else request_log_command(log_retention, batch_size)
    )
    current = str(_scalar(conn, "SELECT current_database()"))
    target = database or current
    names = job_names(target)

    with conn.transaction():
        _schedule(conn, names.sessions, schedule, session_command, target, current)
        if log_command is None:
            _unschedule(conn, [names.request_logs], current)
        else:
            _schedule(conn, names.request_logs, schedule, log_command, target, current)
    return list_cleanup_jobs(conn, database=target)


def remove_cleanup_jobs(
    conn: psycopg.Connection[Any], *, database: str | None = None
) -> list[str]:
    """Remove the cleanup jobs of ``database`` that the current role owns.

    Returns the names of the jobs removed, none when there were none.
    """
    current = str(_scalar(conn, "SELECT current_database()"))
    target = database or current
    with conn.transaction():
        return _unschedule(conn, job_names(target).all(), current)


def list_cleanup_jobs(
    conn: psycopg.Connection[Any], *, database: str | None = None
) -> list[CronJob]:
    """Return the cleanup jobs of ``database`` that the current role can see."""
    target = database or str(_scalar(conn, "SELECT current_database()"))
    rows = conn.execute(_LIST_JOBS, (job_names(target).all(),)).fetchall()
    return [
        CronJob(
            job_id=int(row[0]),
            name=str(row[1]),
            schedule=str(row[2]),
            command=str(row[3]),
            database=str(row[4]),
            username=str(row[5]),
            active=bool(row[6]),
            last_status=row[7],
            last_message=row[8],
            last_run_at=row[9],
        )
        for row in rows
    ]


def _validate_schedule(schedule: object) -> str:
    if not isinstance(schedule, str) or not schedule.strip():
        raise InvalidValueError(
            f"schedule {schedule!r} is empty or not text; pass five cron "
            f"fields, for example {DEFAULT_CRON_SCHEDULE!r}"
        )
    if len(schedule) > MAX_SCHEDULE_LENGTH or "\x00" in schedule:
        raise InvalidValueError(
            f"schedule {schedule[:40]!r} is not a cron schedule; pass five cron "
            f"fields, for example {DEFAULT_CRON_SCHEDULE!r}"
        )
    return schedule.strip()


def _schedule(
    conn: psycopg.Connection[Any],
    name: str,
    schedule: str,
    command: str,
    target: str,
    current: str,
) -> None:
    try:
        if target == current:
            conn.execute("SELECT cron.schedule(%s, %s, %s)", (name, schedule, command))
        else:
            conn.execute(
                "SELECT cron.schedule_in_database(%s, %s, %s, %s)",
                (name, schedule, command, target),
            )
    except psycopg.errors.InvalidParameterValue as exc:
        raise InvalidValueError(
            f"pg_cron rejected the schedule {schedule!r}: "
            f"{exc.diag.message_primary}; pass five cron fields, for example "
            f"{DEFAULT_CRON_SCHEDULE!r}"
        ) from exc
    except psycopg.Error as exc:
        hint = "grant the role USAGE on schema cron"
        if target != current:
            hint = (
                "scheduling jobs for another database takes a superuser, or "
                "GRANT EXECUTE ON FUNCTION cron.schedule_in_database TO the role"
            )
        raise _function_failure(
            current, f"could not schedule pg_cron job {name!r}", exc, hint
        ) from exc


def _unschedule(
    conn: psycopg.Connection[Any], names: list[str], current: str
) -> list[str]:
    # cron.unschedule(name) raises when the job does not exist, so the jobs
    # are found first. Jobs of other roles stay: their names may match too.
    rows = conn.execute(
        "SELECT jobid, jobname FROM cron.job"
        " WHERE jobname = ANY(%s) AND username = current_user ORDER BY jobname",
        (names,),
    ).fetchall()
    for job_id, name in rows:
        try:
            conn.execute("SELECT cron.unschedule(%s::bigint)", (job_id,))
        except psycopg.Error as exc:
            raise _function_failure(
                current,
                f"could not remove pg_cron job {name!r}",
                exc,
                "remove it as its owner or a superuser",
            ) from exc
    return [str(name) for _, name in rows]


def _function_failure(
    database: str, action: str, exc: psycopg.Error, hint: str
) -> AuthDBError:
    """Build the error for a failed call of a pg_cron function in ``database``."""
    detail = exc.diag.message_primary or str(exc)
    if _NOT_PRELOADED in detail:
        return _not_loaded(database)
    return DatabaseError.from_driver(
        f"{action}: {detail} (SQLSTATE {exc.sqlstate}); {hint}", exc
    )


def _scalar(
    conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()
) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]
