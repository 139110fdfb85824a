"""The ``mcp-authdb`` command line: a thin face over the database and store layers.

Commands: ``migrate``, ``status``, ``verify`` and ``cleanup`` for the schema
and its data; ``cron install|remove|status`` for cleanup jobs in pg_cron;
``sessions list|revoke|stats`` for operators; ``serve`` for the MCP server.
Many options can also be set from the environment, under the name given in
their help. Exit codes: 0 on success (for ``serve``, a stop by SIGTERM or
Ctrl-C), 1 when ``verify`` finds differences, 2 on any error (bad input or
setting, unreachable database, failed migration, unknown session).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import psycopg
from psycopg.conninfo import make_conninfo

from mcp_authdb import __version__
from mcp_authdb.db import Settings, connect, open_target
from mcp_authdb.db.connection import ConnectionTarget, resolve_target
from mcp_authdb.db.migrations import DEFAULT_LOCK_TIMEOUT_S, migrate, read_status
from mcp_authdb.db.pool import Database, Operation, Query
from mcp_authdb.db.settings import parse_flag, parse_whole_number
from mcp_authdb.db.verify import verify_schema
from mcp_authdb.errors import AuthDBError, ConfigurationError
from mcp_authdb.sql import Migration
from mcp_authdb.store.cleanup import (
    DEFAULT_BATCH_SIZE,
    MAX_BATCH_SIZE,
    CleanupProgress,
    delete_expired_sessions,
)
from mcp_authdb.store.pg_cron import (
    DEFAULT_CRON_SCHEDULE,
    CronJob,
    check_cleanup_functions,
    check_pg_cron,
    install_cleanup_jobs,
    list_cleanup_jobs,
    remove_cleanup_jobs,
)
from mcp_authdb.store.scheduler import (
    DEFAULT_LOG_RETENTION_DAYS,
    MAX_LOG_RETENTION_DAYS,
)
from mcp_authdb.store.session_store import DEFAULT_LIST_LIMIT, SessionStore
from mcp_authdb.store.sessions import (
    MAX_LIST_LIMIT,
    Session,
    validate_user_id,
)
from mcp_authdb.store.tokens import TokenHasher, TokenKey, TokenKeys

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from mcp_authdb.server.config import ServerConfig

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DIFFERENCES = 1
EXIT_ERROR = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_RETENTION_VARIABLE = "MCP_AUTHDB_REQUEST_LOG_RETENTION_DAYS"
# Seconds `serve` waits for open requests to finish after a stop signal.
SERVE_GRACEFUL_SHUTDOWN_S = 10


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    _exit_on_termination()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _configure_logging(args.log_level)
        settings = Settings.from_env()
        if args.data_dir is not None:
            settings = settings.replace(data_dir=args.data_dir)
        command: Callable[[argparse.Namespace, Settings], int] = args.command
        return command(args, settings)
    except AuthDBError as exc:
        _print_error(exc)
        return EXIT_ERROR
    except psycopg.Error as exc:
        # Errors the library does not translate, such as a missing privilege.
        detail = exc.diag.message_primary or str(exc)
        print(
            f"mcp-authdb: error: PostgreSQL rejected a statement: {detail} "
            f"(SQLSTATE {exc.sqlstate}); check the role's privileges and "
            "DB_COMMAND_TIMEOUT",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except OSError as exc:
        print(f"mcp-authdb: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("mcp-authdb: interrupted", file=sys.stderr)
        return 130


def _exit_on_termination() -> None:
    # SIGTERM and SIGHUP become SystemExit, so that the context managers run:
    # they release the embedded server, which the last user stops.
    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, leave)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser, with defaults read from the environment."""
    parser = argparse.ArgumentParser(
        prog="mcp-authdb",
        description=(
            "Manage the PostgreSQL schema of mcp-authdb. The database is "
            "DATABASE_URL, or the embedded development server when it is unset."
        ),
    )
    parser.add_argument("--version", action="version", version=__version__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=_env_flag("MCP_AUTHDB_JSON"),
        help="print the result as JSON on stdout (env MCP_AUTHDB_JSON=1)",
    )
    common.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=(
            "folder of the embedded server, used when DATABASE_URL is unset "
            "(env MCP_AUTHDB_DATA_DIR)"
        ),
    )
    common.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=_env_choice("MCP_AUTHDB_LOG_LEVEL", LOG_LEVELS, "INFO"),
        help="log level on stderr (env MCP_AUTHDB_LOG_LEVEL, default INFO)",
    )
    commands = parser.add_subparsers(title="commands", required=True)

    migrate_parser = commands.add_parser(
        "migrate", parents=[common], help="apply pending migrations in order"
    )
    migrate_parser.add_argument(
        "--dry-run",
        action="store_true",
        default=_env_flag("MCP_AUTHDB_DRY_RUN"),
        help="print the SQL that would run, change nothing (env MCP_AUTHDB_DRY_RUN=1)",
    )
    migrate_parser.add_argument(
        "--lock-timeout",
        type=_positive_float("--lock-timeout"),
        default=_env_number("MCP_AUTHDB_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S),
        metavar="SECONDS",
        help=(
            "how long to wait for another migrator to finish, in seconds "
            f"(env MCP_AUTHDB_LOCK_TIMEOUT, default {DEFAULT_LOCK_TIMEOUT_S:.0f})"
        ),
    )
    migrate_parser.set_defaults(command=run_migrate)

    status_parser = commands.add_parser(
        "status", parents=[common], help="list applied and pending migrations"
    )
    status_parser.set_defaults(command=run_status)

    verify_parser = commands.add_parser(
        "verify",
        parents=[common],
        help="compare the live database with the expected schema",
    )
    verify_parser.set_defaults(command=run_verify)

    cleanup_parser = commands.add_parser(
        "cleanup",
        parents=[common],
        help="delete expired sessions in batches, by the database clock",
    )
    _batch_size_option(cleanup_parser)
    cleanup_parser.set_defaults(command=run_cleanup)

    _add_cron_commands(commands, common)
    _add_sessions_commands(commands, common)
    _add_serve_command(commands, common)
    return parser


def _batch_size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size",
        type=_batch_size("--batch-size"),
        default=_env_batch_size(
            "MCP_AUTHDB_BATCH_SIZE", DEFAULT_BATCH_SIZE, "the rows per batch"
        ),
        metavar="ROWS",
        help=(
            "rows deleted per transaction (env MCP_AUTHDB_BATCH_SIZE, "
            f"default {DEFAULT_BATCH_SIZE})"
        ),
    )


def _add_cron_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    cron_parser = commands.add_parser(
        "cron",
        help="register the cleanup jobs in pg_cron, the scheduler inside PostgreSQL",
        description=(
            "Manage the pg_cron jobs that delete ended sessions and old request "
            "logs. Connect to the database that pg_cron keeps its jobs in "
            "(cron.database_name); --database names the database to clean when "
            "it is another one on the same server."
        ),
    )
    cron_commands = cron_parser.add_subparsers(title="cron commands", required=True)
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "--database",
        type=_database_name,
        default=None,
        metavar="NAME",
        help=(
            "the database whose sessions and request logs the jobs clean "
            "(default: the connected database)"
        ),
    )

    install_parser = cron_commands.add_parser(
        "install",
        parents=[common, target],
        help="create or update the cleanup jobs; running it again updates them",
    )
    install_parser.add_argument(
        "--schedule",
        default=DEFAULT_CRON_SCHEDULE,
        metavar="CRON",
        help=(
            "when both jobs run, as five cron fields, in GMT before pg_cron "
            "1.5 and in cron.timezone (default GMT) from 1.5 on (default "
            f"{DEFAULT_CRON_SCHEDULE!r}, daily at 03:17)"
        ),
    )
    install_parser.add_argument(
        "--log-retention-days",
        type=_log_retention_days("--log-retention-days"),
        default=_env_log_retention_days(),
        metavar="DAYS",
        help=(
            "delete request logs older than this many days; 0 keeps them "
            f"forever and removes the request log job (env "
            f"{LOG_RETENTION_VARIABLE}, default {DEFAULT_LOG_RETENTION_DAYS})"
        ),
    )
    _batch_size_option(install_parser)
    install_parser.set_defaults(command=run_cron_install)

    remove_parser = cron_commands.add_parser(
        "remove",
        parents=[common, target],
        help="remove the cleanup jobs of the database",
    )
    remove_parser.set_defaults(command=run_cron_remove)

    status_parser = cron_commands.add_parser(
        "status",
        parents=[common, target],
        help="list the cleanup jobs and the outcome of their latest run",
    )
    status_parser.set_defaults(command=run_cron_status)


def _add_sessions_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    sessions_parser = commands.add_parser(
        "sessions",
        help="list, revoke and count user sessions",
        description=(
            "Operate on user sessions: sign-ins stored in user_sessions, not "
            "MCP transport sessions. These commands read no token and need no "
            "MCP_AUTHDB_TOKEN_KEYS."
        ),
    )
    session_commands = sessions_parser.add_subparsers(
        title="sessions commands", required=True
    )

    list_parser = session_commands.add_parser(
        "list",
        parents=[common],
        help="list live sign-ins, newest first, one line per token family",
    )
    list_parser.add_argument(
        "--user",
        type=_user_id,
        default=None,
        metavar="ID",
        help="only the sessions of this user id",
    )
    list_parser.add_argument(
        "--limit",
        type=_list_limit("--limit"),
        default=DEFAULT_LIST_LIMIT,
        metavar="N",
        help=f"list at most N sessions, 1 to {MAX_LIST_LIMIT} (default "
        f"{DEFAULT_LIST_LIMIT})",
    )
    list_parser.set_defaults(command=run_sessions_list)

    revoke_parser = session_commands.add_parser(
        "revoke",
        parents=[common],
        help="revoke every session of a user, or one session and its family",
        description=(
            "Revoke sessions: their access and refresh tokens stop working at "
            "once. The change fires the database trigger that notifies every "
            "running process on channel mcp_authdb_sessions, so each one drops "
            "the user's sessions from its token cache."
        ),
    )
    subject = revoke_parser.add_mutually_exclusive_group(required=True)
    subject.add_argument(
        "--user",
        type=_user_id,
        metavar="ID",
        help="revoke every session of this user id",
    )
    subject.add_argument(
        "--session",
        type=_session_id("--session"),
        metavar="ID",
        help=(
            "revoke this session (the id that `sessions list` shows) and every "
            "session refreshed from the same sign-in"
        ),
    )
    revoke_parser.set_defaults(command=run_sessions_revoke)

    stats_parser = session_commands.add_parser(
        "stats",
        parents=[common],
        help="count session rows: live, expired (awaiting cleanup) and revoked",
    )
    stats_parser.set_defaults(command=run_sessions_stats)


def _add_serve_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    serve_parser = commands.add_parser(
        "serve",
        parents=[common],
        help="run the MCP server and its OAuth authorization server",
        description=(
            "Apply pending migrations, then serve the MCP endpoint over "
            "streamable HTTP until SIGTERM or Ctrl-C. Users sign in at the "
            "upstream provider (DRUPAL_BASE_URL), or with --dev at a built-in "
            "development identity provider that accepts any user id. The "
            "public URL is MCP_AUTHDB_PUBLIC_URL; see the README for every "
            "variable."
        ),
    )
    serve_parser.add_argument(
        "--dev",
        action="store_true",
        default=_env_flag("MCP_AUTHDB_DEV"),
        help=(
            "development mode: loopback only, the built-in identity provider, "
            "keys in the data folder (env MCP_AUTHDB_DEV=1)"
        ),
    )
    serve_parser.add_argument(
        "--host",
        default=None,
        metavar="ADDRESS",
        help="the address to listen on (env MCP_AUTHDB_HOST, default 127.0.0.1)",
    )
    serve_parser.add_argument(
        "--port",
        type=_port("--port"),
        default=None,
        metavar="PORT",
        help="the TCP port to listen on (env MCP_AUTHDB_PORT, default 8000)",
    )
    serve_parser.add_argument(
        "--lock-timeout",
        type=_positive_float("--lock-timeout"),
        default=_env_number("MCP_AUTHDB_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S),
        metavar="SECONDS",
        help=(
            "how long to wait for another replica's migration, in seconds "
            f"(env MCP_AUTHDB_LOCK_TIMEOUT, default {DEFAULT_LOCK_TIMEOUT_S:.0f})"
        ),
    )
    serve_parser.set_defaults(command=run_serve)


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate, then serve until SIGTERM or SIGINT; a clean stop returns 0.

    Configuration errors stop the command before it migrates or listens. The
    embedded server, when used, stays acquired until the server has stopped.
    """
    # The server modules load the MCP SDK, Starlette and uvicorn, which the
    # other commands do not need, so they are imported only here.
    from mcp_authdb.server.app import build_app
    from mcp_authdb.server.config import ServerConfig

    config = ServerConfig.from_env(
        os.environ, dev=args.dev, host=args.host, port=args.port, settings=settings
    )
    app = build_app(config)

    with open_target(settings) as target:
        with connect(target, autocommit=True) as conn:
            applied = migrate(conn, lock_timeout_s=args.lock_timeout)
        if applied:
            logger.info(
                "applied %d migration(s) to %s before serving",
                len(applied),
                target.description,
                extra={"action": "cli.serve.migrated", "count": len(applied)},
            )
        if config.dev:
            logger.info(
                "development mode: give your MCP client the URL %s. When it "
                "signs in, the built-in identity provider shows a page that "
                "accepts any user id and subscription level, without a password",
                config.resource,
                extra={"action": "cli.serve.dev", "resource": config.resource},
            )
        stop_signal = _run_server(app, config, args)

    if stop_signal is not None:
        logger.info(
            "stopped after %s",
            signal.Signals(stop_signal).name,
            extra={"action": "cli.serve.stopped"},
        )
    return EXIT_OK


def _run_server(
    app: Starlette, config: ServerConfig, args: argparse.Namespace
) -> int | None:
    """Run uvicorn on ``app`` until a stop signal; return the signal, if any.

    The app's lifespan runs here rather than in uvicorn, so that a failure to
    start (an unreachable database, a bad key) propagates as an exception
    that :func:`main` prints without a traceback.
    """
    import uvicorn

    uvicorn_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        lifespan="off",
        # X-Forwarded-For is read by the app, from trusted proxies only, and
        # the access log would write authorization codes and states, which
        # travel in query strings.
        proxy_headers=False,
        access_log=False,
        server_header=False,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=SERVE_GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(uvicorn_config)
    stop_signals: list[int] = []

    def request_stop(signum: int) -> None:
        stop_signals.append(signum)
        server.should_exit = True

    async def serve() -> None:
        # Before uvicorn installs its own handlers, and after it restores
        # these and raises the signal it caught again, a stop signal only
        # sets should_exit, so the lifespan still closes everything.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, request_stop, signum)

        # An error raised inside the lifespan leaves the SDK's task group
        # wrapped in an exception group, so a failure to listen is raised
        # after the lifespan has closed.
        listen_error: OSError | None = None
        async with app.router.lifespan_context(app):
            if server.should_exit:
                return
            announce = asyncio.create_task(_announce(server, config, args.json))
            try:
                await server.serve()
            except SystemExit:
                # uvicorn exits this way when it cannot listen, after logging
                # why (such as "address already in use").
                listen_error = OSError(
                    f"could not listen on {config.host} port {config.port}; see "
                    "the message above, and choose another address or port "
                    "with --host and --port"
                )
            finally:
                announce.cancel()
        if listen_error is not None:
            raise listen_error

    try:
        asyncio.run(serve())
    finally:
        # Closing the event loop reset the signals to their defaults.
        _exit_on_termination()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return stop_signals[0] if stop_signals else None


async def _announce(server: Any, config: ServerConfig, as_json: bool) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    if as_json:
        _print_json(
            {"mcp_url": config.resource, "issuer": config.issuer, "dev": config.dev}
        )
        sys.stdout.flush()


def run_migrate(args: argparse.Namespace, settings: Settings) -> int:
    with open_target(settings) as target, connect(target, autocommit=True) as conn:
        if args.dry_run:
            pending = migrate(conn, dry_run=True)
            _print_dry_run(args.json, target, pending)
            return EXIT_OK

        applied = migrate(conn, lock_timeout_s=args.lock_timeout)
        status = read_status(conn)

    if args.json:
        _print_json(
            {
                "database": target.description,
                "applied": [_migration_json(m) for m in applied],
                "current": status.is_current,
            }
        )
    elif applied:
        print(f"applied {len(applied)} migration(s) to {target.description}:")
        for migration in applied:
            print(f"  {migration.filename}")
    else:
        print(f"{target.description} is up to date; no migration to apply")
    for row in status.unknown:
        logger.warning(
            "the database has migration %04d_%s, which this version does not "
            "know; it was applied by a newer mcp-authdb",
            row.version,
            row.name,
            extra={"action": "cli.migrate.unknown", "version": row.version},
        )
    return EXIT_OK


def run_status(args: argparse.Namespace, settings: Settings) -> int:
    with open_target(settings) as target, connect(target) as conn:
        status = read_status(conn)

    rows: list[dict[str, Any]] = [
        {
            "version": row.version,
            "name": row.name,
            "state": "applied",
            "applied_at": row.applied_at.isoformat(),
        }
        for row in status.applied
    ]
    rows += [
        {"version": m.version, "name": m.name, "state": "pending", "applied_at": None}
        for m in status.pending
    ]
    rows += [
        {
            "version": row.version,
            "name": row.name,
            "state": "unknown",
            "applied_at": row.applied_at.isoformat(),
        }
        for row in status.unknown
    ]
    rows.sort(key=lambda row: int(row["version"]))

    if args.json:
        _print_json(
            {
                "database": target.description,
                "current": status.is_current,
                "migrations": rows,
            }
        )
        return EXIT_OK

    print(f"migrations of {target.description}:")
    for row in rows:
        state = row["state"]
        if state == "applied":
            state = f"applied {row['applied_at']}"
        elif state == "unknown":
            state = f"applied {row['applied_at']} by a newer version (no file here)"
        print(f"  {row['version']:04d}_{row['name']}  {state}")
    pending = len(status.pending)
    print("up to date" if not pending else f"{pending} pending; run mcp-authdb migrate")
    return EXIT_OK


def run_verify(args: argparse.Namespace, settings: Settings) -> int:
    with open_target(settings) as target, connect(target) as conn:
        differences = verify_schema(conn)

    if args.json:
        _print_json(
            {
                "database": target.description,
                "matches": not differences,
                "differences": [
                    {"kind": d.kind, "object": d.object, "message": d.message}
                    for d in differences
                ],
            }
        )
    elif not differences:
        print(f"{target.description} matches the expected schema")
    else:
        print(
            f"{target.description} differs from the expected schema in "
            f"{len(differences)} place(s):"
        )
        for difference in differences:
            print(f"  - {difference.message}")
    return EXIT_DIFFERENCES if differences else EXIT_OK


def run_cleanup(args: argparse.Namespace, settings: Settings) -> int:
    show_progress = not args.json and sys.stderr.isatty()
    with open_target(settings) as target, connect(target, autocommit=True) as conn:
        result = delete_expired_sessions(
            conn,
            batch_size=args.batch_size,
            on_batch=_progress_printer(sys.stderr) if show_progress else None,
        )
    if show_progress:
        print(file=sys.stderr)

    if args.json:
        _print_json(
            {
                "database": target.description,
                "deleted": result.deleted,
                "batches": result.batches,
                "seconds": round(result.elapsed_s, 3),
            }
        )
    else:
        print(
            f"deleted {result.deleted} expired session(s) from "
            f"{target.description} in {result.elapsed_s:.1f} s"
        )
    return EXIT_OK


def run_cron_install(args: argparse.Namespace, settings: Settings) -> int:
    retention_days: int = args.log_retention_days
    with open_target(settings) as target, connect(target, autocommit=True) as conn:
        version = check_pg_cron(conn)
        database = _check_cleaned_database(conn, target, settings, args.database)
        jobs = install_cleanup_jobs(
            conn,
            database=database,
            schedule=args.schedule,
            log_retention=timedelta(days=retention_days) if retention_days else None,
            batch_size=args.batch_size,
        )

    if args.json:
        _print_json(
            {
                "database": target.description,
                "cleaned_database": database,
                "pg_cron_version": version,
                "log_retention_days": retention_days or None,
                "jobs": [_cron_job_json(job) for job in jobs],
            }
        )
        return EXIT_OK
    print(
        f"scheduled {len(jobs)} pg_cron job(s) in {target.description} to clean "
        f"database {database!r}:"
    )
    _print_cron_jobs(jobs)
    if not retention_days:
        print("request logs are kept forever; no request log job")
    return EXIT_OK


def run_cron_remove(args: argparse.Namespace, settings: Settings) -> int:
    with open_target(settings) as target, connect(target, autocommit=True) as conn:
        check_pg_cron(conn, require_worker=False)
        database = args.database or _current_database(conn)
        removed = remove_cleanup_jobs(conn, database=database)

    if args.json:
        _print_json(
            {
                "database": target.description,
                "cleaned_database": database,
                "removed": removed,
            }
        )
    elif removed:
        print(f"removed {len(removed)} pg_cron job(s): {', '.join(removed)}")
    else:
        print(f"no cleanup job for database {database!r} to remove")
    return EXIT_OK


def run_cron_status(args: argparse.Namespace, settings: Settings) -> int:
    with open_target(settings) as target, connect(target, autocommit=True) as conn:
        version = check_pg_cron(conn, require_worker=False)
        database = args.database or _current_database(conn)
        jobs = list_cleanup_jobs(conn, database=database)

    if args.json:
        _print_json(
            {
                "database": target.description,
                "cleaned_database": database,
                "pg_cron_version": version,
                "jobs": [_cron_job_json(job) for job in jobs],
            }
        )
    elif jobs:
        print(f"pg_cron {version} jobs cleaning database {database!r}:")
        _print_cron_jobs(jobs)
    else:
        print(
            f"no cleanup job for database {database!r}; create them with "
            "`mcp-authdb cron install`"
        )
    return EXIT_OK


def _check_cleaned_database(
    conn: psycopg.Connection[Any],
    target: ConnectionTarget,
    settings: Settings,
    database: str | None,
) -> str:
    """Check that the jobs' SQL functions exist where they run; return its name."""
    current = _current_database(conn)
    if database is None or database == current:
        check_cleanup_functions(conn)
        return current
    other = resolve_target(make_conninfo(target.conninfo, dbname=database), settings)
    with connect(other, autocommit=True) as other_conn:
        check_cleanup_functions(other_conn)
    return database


def _current_database(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def _print_cron_jobs(jobs: list[CronJob]) -> None:
    for job in jobs:
        state = "active" if job.active else "inactive"
        last = "never run"
        if job.last_status is not None:
            when = _format_time(job.last_run_at)
            last = f"last run {when} UTC: {job.last_status}"
            if job.last_status == "failed" and job.last_message:
                last += f" ({job.last_message.strip()})"
        print(f"  {job.name} (job {job.job_id}, {state}) at {job.schedule!r}, {last}")
        for line in job.command.splitlines():
            print(f"      {line}")


def _cron_job_json(job: CronJob) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "name": job.name,
        "schedule": job.schedule,
        "command": job.command,
        "database": job.database,
        "username": job.username,
        "active": job.active,
        "last_status": job.last_status,
        "last_message": job.last_message,
        "last_run_at": _iso(job.last_run_at),
    }


def run_sessions_list(args: argparse.Namespace, settings: Settings) -> int:
    with _session_store(settings) as (target, store):
        sessions = store.list_sessions(args.user, limit=args.limit)

    if args.json:
        _print_json(
            {
                "database": target.description,
                "sessions": [_session_json(session) for session in sessions],
            }
        )
        return EXIT_OK
    of_user = "" if args.user is None else f" of user {args.user!r}"
    if not sessions:
        print(f"no live session{of_user} in {target.description}")
        return EXIT_OK
    print(f"{len(sessions)} live session(s){of_user}, newest first, times in UTC:")
    rows = [
        [
            str(session.session_id),
            _printable(session.user_id),
            _printable(session.subscription_level),
            " ".join(session.scopes) or "-",
            _format_time(session.expires_at),
            _format_time(session.refresh_expires_at),
            _format_time(session.last_used_at),
        ]
        for session in sessions
    ]
    headers = ["ID", "USER", "LEVEL", "SCOPES", "EXPIRES", "REFRESH UNTIL", "LAST USED"]
    _print_table(headers, rows)
    if len(sessions) == args.limit:
        print(f"(stopped at --limit {args.limit})")
    return EXIT_OK


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    columns = zip(headers, *rows, strict=True)
    widths = [max(len(cell) for cell in column) for column in columns]
    for row in [headers, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


def _printable(text: str) -> str:
    """Return ``text``, or its repr when it has spaces or control characters."""
    return text if text.isprintable() and " " not in text else repr(text)


def run_sessions_revoke(args: argparse.Namespace, settings: Settings) -> int:
    with _session_store(settings) as (target, store):
        if args.user is not None:
            revoked = store.revoke_user(args.user)
            subject = f"user {args.user!r}"
            exists = True
        else:
            revoked = store.revoke_session(args.session)
            subject = f"session {args.session} and its family"
            exists = bool(revoked) or store.database.run(
                lambda: _session_exists(args.session),
                transaction=False,
                idempotent=True,
            )

    if not exists:
        print(
            f"mcp-authdb: error: session {args.session} not found in "
            f"{target.description}; list sessions with `mcp-authdb sessions list`",
            file=sys.stderr,
        )
        return EXIT_ERROR
    if args.json:
        _print_json(
            {
                "database": target.description,
                "user": args.user,
                "session": args.session,
                "revoked": revoked,
            }
        )
    elif revoked:
        print(
            f"revoked {revoked} session row(s) of {subject}; running processes "
            "drop them from their token caches when the database notifies them"
        )
    else:
        print(f"nothing to revoke: {subject} had no live session")
    return EXIT_OK


def run_sessions_stats(args: argparse.Namespace, settings: Settings) -> int:
    with _session_store(settings) as (target, store):
        stats = store.stats()

    if args.json:
        _print_json(
            {
                "database": target.description,
                "live": stats.live,
                "expired": stats.expired,
                "revoked": stats.revoked,
                "total": stats.total,
            }
        )
    else:
        print(
            f"sessions in {target.description}: {stats.live} live, "
            f"{stats.expired} expired, {stats.revoked} revoked "
            f"({stats.total} rows)"
        )
    return EXIT_OK


@contextlib.contextmanager
def _session_store(
    settings: Settings,
) -> Iterator[tuple[ConnectionTarget, SessionStore]]:
    """Open the database and a session store on it, for one command."""
    # list_sessions, revoke_user, revoke_session and stats never hash a
    # token. The store gets a random key of this process in place of the
    # deployment's keys, so MCP_AUTHDB_TOKEN_KEYS is not needed.
    unused_keys = TokenKeys([TokenKey("cli", secrets.token_bytes(32))])
    with open_target(settings) as target, Database(target, settings) as database:
        yield target, SessionStore(database, TokenHasher(unused_keys))


def _session_exists(session_id: int) -> Operation[bool]:
    result = yield Query("SELECT 1 FROM user_sessions WHERE id = %s", (session_id,))
    return bool(result.rows)


def _session_json(session: Session) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "family_id": None if session.family_id is None else str(session.family_id),
        "user_id": session.user_id,
        "subscription_level": session.subscription_level,
        "scopes": list(session.scopes),
        "expires_at": _iso(session.expires_at),
        "refresh_expires_at": _iso(session.refresh_expires_at),
        "created_at": _iso(session.created_at),
        "last_used_at": _iso(session.last_used_at),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _format_time(value: datetime | None) -> str:
    """Format an aware datetime in UTC to the second, or "never" for None."""
    if value is None:
        return "never"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _progress_printer(stream: TextIO) -> Callable[[CleanupProgress], None]:
    def show(progress: CleanupProgress) -> None:
        stream.write(
            f"\rdeleted {progress.deleted:,} expired sessions "
            f"({progress.rows_per_second:,.0f} rows/s)"
        )
        stream.flush()

    return show


def _print_dry_run(
    as_json: bool, target: ConnectionTarget, pending: list[Migration]
) -> None:
    if as_json:
        _print_json(
            {
                "database": target.description,
                "dry_run": True,
                "pending": [{**_migration_json(m), "sql": m.sql} for m in pending],
            }
        )
        return
    if not pending:
        print(f"-- {target.description} is up to date; no migration would run")
        return
    for migration in pending:
        print(f"-- {migration.filename} (checksum {migration.checksum})")
        print(migration.sql)


def _migration_json(migration: Migration) -> dict[str, Any]:
    return {
        "version": migration.version,
        "name": migration.name,
        "checksum": migration.checksum,
    }


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _print_error(exc: BaseException) -> None:
    print(f"mcp-authdb: error: {exc}", file=sys.stderr)
    cause = exc.__cause__
    while cause is not None:
        print(f"  caused by: {type(cause).__name__}: {cause}", file=sys.stderr)
        cause = cause.__cause__


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mcp-authdb: %(message)s"))
    root = logging.getLogger("mcp_authdb")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # The HTTP client logs every upstream request at INFO, which repeats what
    # this package logs about each sign-in; its warnings still show.
    if logging.getLevelName(level) > logging.DEBUG:
        logging.getLogger("httpx2").setLevel(logging.WARNING)


def _env_flag(name: str) -> bool:
    return parse_flag(name, os.environ.get(name, "").strip() or None)


def _env_choice(name: str, choices: Sequence[str], default: str) -> str:
    value = os.environ.get(name, "").strip().upper()
    if not value:
        return default
    if value not in choices:
        raise ConfigurationError(
            f"{name}={value!r} is invalid; use one of {', '.join(choices)}"
        )
    return value


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigurationError(
            f"{name}={text!r} is not a number; unset it to use {default:g}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{name}={text!r} must be greater than 0")
    return value


def _env_batch_size(name: str, default: int, meaning: str) -> int:
    text = os.environ.get(name, "").strip() or None
    value = parse_whole_number(name, text, default, meaning)
    if not 1 <= value <= MAX_BATCH_SIZE:
        raise ConfigurationError(
            f"{name}={text!r} is out of range; use 1 to {MAX_BATCH_SIZE}"
        )
    return value


def _batch_size(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        # isdecimal() alone would accept digits of other scripts.
        if not (text.isascii() and text.isdecimal()):
            raise argparse.ArgumentTypeError(f"{option} {text!r} is not a whole number")
        value = int(text)
        if not 1 <= value <= MAX_BATCH_SIZE:
            raise argparse.ArgumentTypeError(
                f"{option} {value} is out of range; use 1 to {MAX_BATCH_SIZE}"
            )
        return value

    return parse


def _whole_number(option: str, text: str, low: int, high: int, meaning: str) -> int:
    # isdecimal() alone would accept digits of other scripts.
    if not (text.isascii() and text.isdecimal()):
        raise argparse.ArgumentTypeError(
            f"{option} {text!r} is not a whole number; pass {meaning}"
        )
    value = int(text)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(
            f"{option} {value} is out of range; pass {meaning} from {low} to {high}"
        )
    return value


def _log_retention_days(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _whole_number(
            option, text, 0, MAX_LOG_RETENTION_DAYS, "a number of days"
        )

    return parse


def _env_log_retention_days() -> int:
    text = os.environ.get(LOG_RETENTION_VARIABLE, "").strip() or None
    meaning = "the number of days of request logs to keep (0 keeps them forever)"
    value = parse_whole_number(
        LOG_RETENTION_VARIABLE, text, DEFAULT_LOG_RETENTION_DAYS, meaning
    )
    if not 0 <= value <= MAX_LOG_RETENTION_DAYS:
        raise ConfigurationError(
            f"{LOG_RETENTION_VARIABLE}={text!r} is out of range; set it to "
            f"{meaning}, from 0 to {MAX_LOG_RETENTION_DAYS}"
        )
    return value


def _list_limit(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _whole_number(option, text, 1, MAX_LIST_LIMIT, "a number of sessions")

    return parse


def _session_id(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        # Row ids are bigint.
        return _whole_number(option, text, 1, 2**63 - 1, "a session id")

    return parse


def _user_id(text: str) -> str:
    try:
        validate_user_id(text)
    except AuthDBError as exc:
        # argparse names the option before the message.
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _database_name(text: str) -> str:
    # PostgreSQL cuts identifiers at 63 bytes, so a longer name would quietly
    # name another database.
    if not text or len(text.encode()) > 63 or "\x00" in text:
        raise argparse.ArgumentTypeError(
            f"--database {text[:70]!r} is not a PostgreSQL database name; pass "
            "1 to 63 bytes"
        )
    return text


def _port(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _whole_number(option, text, 1, 65535, "a TCP port")

    return parse


def _positive_float(option: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{option} {text!r} is not a number of seconds"
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{option} {value:g} must be above 0")
        return value

    return parse
