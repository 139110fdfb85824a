"""The ``mcp-authdb`` command line: a thin face over the database layer.

Every option can also be set from the environment, under the name given in
its help. Exit codes: 0 on success, 1 when ``verify`` finds differences, 2 on
any error (bad setting, unreachable database, failed migration).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import psycopg

from mcp_authdb import __version__
from mcp_authdb.db import Settings, connect, open_target
from mcp_authdb.db.connection import ConnectionTarget
from mcp_authdb.db.migrations import DEFAULT_LOCK_TIMEOUT_S, migrate, read_status
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

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DIFFERENCES = 1
EXIT_ERROR = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
    cleanup_parser.add_argument(
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
    cleanup_parser.set_defaults(command=run_cleanup)
    return parser


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
