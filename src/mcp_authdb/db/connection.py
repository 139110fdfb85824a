"""Opening connections: SSL policy, statement timeout, safe error messages.

Every connection the project opens goes through :func:`resolve_target`, which
turns a ``DATABASE_URL`` and the settings into a libpq conninfo string:

- TCP connections use at least ``DB_SSL_MODE``. A URL asking for a weaker
  ``sslmode`` is rejected rather than silently upgraded or downgraded.
- Unix-socket connections stay local, where libpq does not use SSL.
- ``statement_timeout`` is set at connection start from ``DB_COMMAND_TIMEOUT``,
  so it bounds every statement, the first one included.
- Naive datetimes are rejected, because PostgreSQL would read them in the
  connection's ``TimeZone`` and shift them.

Messages and logs name host, port and database, never the user's password.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from datetime import datetime
from typing import Any

import psycopg
from psycopg.adapt import AdaptersMap, Dumper, PyFormat
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.datetime import DatetimeBinaryDumper, DatetimeDumper

from mcp_authdb.db.settings import SSL_MODES, Settings, mask_password, ssl_mode_rank
from mcp_authdb.errors import ConfigurationError, ConnectionFailedError

logger = logging.getLogger(__name__)

APPLICATION_NAME = "mcp-authdb"
# libpq's own connect_timeout floor: shorter values are raised to 2 seconds.
MIN_CONNECT_TIMEOUT_S = 2

_local_socket_logged = False


@dataclasses.dataclass(frozen=True)
class ConnectionTarget:
    """A resolved place to connect to, with a conninfo string ready for libpq.

    ``conninfo`` may contain a password: log ``description`` instead, and
    ``repr`` masks it.
    """

    conninfo: str
    description: str
    local_socket: bool
    ssl_mode: str

    def __repr__(self) -> str:
        return (
            f"ConnectionTarget(description={self.description!r}, "
            f"local_socket={self.local_socket}, ssl_mode={self.ssl_mode!r})"
        )


def resolve_target(url: str, settings: Settings) -> ConnectionTarget:
    """Check ``url`` against the SSL policy and add the project's parameters.

    Raises :class:`ConfigurationError` when the URL cannot be parsed or asks
    for a weaker ``sslmode`` than ``settings.ssl_mode``.
    """
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        message = _scrub(str(exc), _password_of(url))
        raise ConfigurationError(
            f"DATABASE_URL {mask_password(url)!r} is invalid: {message}; expected "
            "postgresql://user:password@host:5432/dbname"
        ) from None

    requested = params.get("sslmode")
    if requested is not None:
        requested = str(requested)
        if requested not in SSL_MODES:
            raise ConfigurationError(
                f"DATABASE_URL has sslmode={requested!r}, which is not a libpq "
                f"sslmode; use one of {', '.join(SSL_MODES)}"
            )
        if ssl_mode_rank(requested) < ssl_mode_rank(settings.ssl_mode):
            raise ConfigurationError(
                f"DATABASE_URL asks for sslmode={requested}, weaker than "
                f"DB_SSL_MODE={settings.ssl_mode}; remove sslmode from "
                f"DATABASE_URL, or lower DB_SSL_MODE if this network is trusted"
            )
    ssl_mode = requested or settings.ssl_mode

    hosts = _hosts_of(params)
    local_socket = all(_is_socket(host) for host in hosts) and not params.get(
        "hostaddr"
    )

    extra: dict[str, Any] = {
        "sslmode": ssl_mode,
        "options": _with_statement_timeout(
            params.get("options"), settings.command_timeout_ms
        ),
    }
    if "connect_timeout" not in params:
        extra["connect_timeout"] = max(
            MIN_CONNECT_TIMEOUT_S, math.ceil(settings.command_timeout_ms / 1000)
        )
    if "application_name" not in params:
        extra["application_name"] = APPLICATION_NAME

    return ConnectionTarget(
        conninfo=make_conninfo(url, **extra),
        description=_describe(params, hosts),
        local_socket=local_socket,
        ssl_mode=ssl_mode,
    )


def connect(target: ConnectionTarget, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """Open a connection to ``target``, or raise :class:`ConnectionFailedError`."""
    _log_transport(target)
    try:
        conn = psycopg.Connection.connect(target.conninfo, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise _connection_error(target, exc) from None
    register_adapters(conn.adapters)
    return conn


async def connect_async(
    target: ConnectionTarget, *, autocommit: bool = False
) -> psycopg.AsyncConnection[Any]:
    """Open an async connection to ``target``, or raise :class:`ConnectionFailedError`."""
    _log_transport(target)
    try:
        conn = await psycopg.AsyncConnection.connect(
            target.conninfo, autocommit=autocommit
        )
    except psycopg.OperationalError as exc:
        raise _connection_error(target, exc) from None
    register_adapters(conn.adapters)
    return conn


def register_adapters(adapters: AdaptersMap) -> None:
    """Make ``adapters`` reject naive datetimes instead of sending ``timestamp``."""
    adapters.register_dumper(datetime, _AwareDatetimeDumper)
    adapters.register_dumper(datetime, _AwareDatetimeBinaryDumper)


def _reject_naive(obj: datetime) -> None:
    if obj.tzinfo is None or obj.utcoffset() is None:
        raise ValueError(
            f"datetime {obj.isoformat()} has no time zone; PostgreSQL would read "
            "it in the connection's TimeZone. Pass an aware datetime, for "
            "example datetime.now(timezone.utc)"
        )


class _AwareDatetimeDumper(DatetimeDumper):
    def upgrade(self, obj: datetime, format: PyFormat) -> Dumper:
        _reject_naive(obj)
        return self


class _AwareDatetimeBinaryDumper(DatetimeBinaryDumper):
    def upgrade(self, obj: datetime, format: PyFormat) -> Dumper:
        _reject_naive(obj)
        return self


def _hosts_of(params: dict[str, Any]) -> list[str]:
    # libpq takes an unset host from PGHOST, and with neither it uses the
    # default Unix-socket folder.
    host = str(params.get("host") or os.environ.get("PGHOST") or "")
    return host.split(",") if host else [""]


def _is_socket(host: str) -> bool:
    return host == "" or host.startswith(("/", "@"))


def _describe(params: dict[str, Any], hosts: list[str]) -> str:
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or "(default)"
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    ports = port.split(",")
    places = []
    for index, host in enumerate(hosts):
        host_port = ports[index] if index < len(ports) else ports[-1]
        if _is_socket(host):
            places.append(f"socket {host or '(default folder)'}:{host_port}")
        else:
            places.append(f"{host}:{host_port}")
    return f"{','.join(places)}/{dbname}"


def _with_statement_timeout(options: Any, timeout_ms: int) -> str:
    # A later -c wins over an earlier one, so the setting overrides any
    # statement_timeout already present in the URL's options.
    ours = f"-c statement_timeout={timeout_ms}"
    return f"{options} {ours}" if options else ours


def _log_transport(target: ConnectionTarget) -> None:
    global _local_socket_logged
    if target.local_socket and not _local_socket_logged:
        _local_socket_logged = True
        logger.info(
            "connecting to %s over a Unix socket; SSL does not apply to local "
            "sockets",
            target.description,
            extra={"action": "db.connect.local_socket"},
        )


def _password_of(conninfo: str) -> str | None:
    try:
        password = conninfo_to_dict(conninfo).get("password")
    except psycopg.Error:
        return None
    return str(password) if password else None


def _scrub(message: str, password: str | None) -> str:
    message = mask_password(message)
    if password:
        message = message.replace(password, "***")
    return message


def _connection_error(
    target: ConnectionTarget, exc: psycopg.OperationalError
) -> ConnectionFailedError:
    detail = _scrub(str(exc).strip(), _password_of(target.conninfo))
    hint = "check that the server is running and DATABASE_URL is right"
    if "SSL" in detail or "ssl" in detail:
        hint = (
            f"sslmode={target.ssl_mode} needs a server with SSL turned on; turn "
            "SSL on in the server, or lower DB_SSL_MODE if this network is trusted"
        )
    elif "timeout" in detail:
        hint = (
            "the server did not answer in time; check the host, the port and "
            "any firewall between them"
        )
    error = ConnectionFailedError.from_driver(
        f"could not connect to PostgreSQL at {target.description}: {detail}; {hint}",
        exc,
    )
    logger.warning(
        "connection to %s failed: %s",
        target.description,
        detail,
        extra={"action": "db.connect.failed", "sqlstate": exc.sqlstate},
    )
    return error
