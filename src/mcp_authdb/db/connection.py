"""Opening connections: SSL policy, statement timeout, safe error messages.

Every connection the project opens goes through :func:`resolve_target`, which
turns a ``DATABASE_URL`` and the settings into a libpq conninfo string:

- TCP connections use at least ``DB_SSL_MODE``. A URL asking for a weaker
  ``sslmode`` is rejected rather than silently upgraded or downgraded.
- Unix-socket connections stay local, where libpq does not use SSL.
- ``statement_timeout`` is set at connection start from ``DB_COMMAND_TIMEOUT``,
  so it bounds every statement, the first one included. Behind a transaction
  pooler (``DB_TRANSACTION_POOLER``) the pool sets it per transaction instead.
- ``connect_timeout``, unless the URL sets it, is ``DB_COMMAND_TIMEOUT``
  rounded up to whole seconds, at least 2, so that a server that never
  responds gives an error instead of a hang.
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
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap, Dumper, PyFormat
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.datetime import DatetimeBinaryDumper, DatetimeDumper

from mcp_authdb.db.settings import Settings, parse_database_url, scrub_message
from mcp_authdb.errors import ConnectionFailedError, InvalidValueError

logger = logging.getLogger(__name__)

APPLICATION_NAME = "mcp-authdb"
# psycopg, which enforces connect_timeout itself, raises shorter values to 2.
MIN_CONNECT_TIMEOUT_S = 2
# A long DB_COMMAND_TIMEOUT, raised for one large migration, must not make an
# unreachable server hang the process for as long.
MAX_CONNECT_TIMEOUT_S = 30

# Parts of libpq's messages when the server's certificate fails verification.
_CERTIFICATE_FAILURES = (
    "certificate verify failed",
    "root certificate file",
    "server certificate for",
)

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

    Raises :class:`ConfigurationError` when the URL cannot be parsed, has a
    port or ``connect_timeout`` that is not a number, or requests a weaker
    ``sslmode`` than ``settings.ssl_mode``.
    """
    params = parse_database_url(url, settings.ssl_mode)
    ssl_mode = str(params.get("sslmode") or settings.ssl_mode)

    hosts = _hosts_of(params)
    local_socket = all(_is_socket(host) for host in hosts) and not params.get(
        "hostaddr"
    )

    extra: dict[str, Any] = {"sslmode": ssl_mode}
    if not settings.transaction_pooler:
        # A pooler in transaction mode refuses startup options; the pool sets
        # the timeout in each transaction instead.
        extra["options"] = _with_statement_timeout(
            params.get("options"), settings.command_timeout_ms
        )
    if "connect_timeout" not in params:
        extra["connect_timeout"] = min(
            MAX_CONNECT_TIMEOUT_S,
            max(MIN_CONNECT_TIMEOUT_S, math.ceil(settings.command_timeout_ms / 1000)),
        )
    if "application_name" not in params:
        extra["application_name"] = APPLICATION_NAME

    return ConnectionTarget(
        conninfo=make_conninfo(url, **extra),
        description=_describe(params, hosts),
        local_socket=local_socket,
        ssl_mode=ssl_mode,
    )


# The connect functions raise their error after the except block, so that it
# has no driver error as __context__. Its message already carries the
# driver's detail, with the password masked.


def connect(
    target: ConnectionTarget, *, autocommit: bool = False
) -> psycopg.Connection[Any]:
    """Open a connection to ``target``, or raise :class:`ConnectionFailedError`."""
    _log_transport(target)
    try:
        conn = psycopg.Connection.connect(target.conninfo, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        error = _connection_error(target, exc)
    else:
        _prepare_connection(target, conn)
        return conn
    raise error


async def connect_async(
    target: ConnectionTarget, *, autocommit: bool = False
) -> psycopg.AsyncConnection[Any]:
    """Open an async connection to ``target``.

    Raises :class:`ConnectionFailedError` when it cannot.
    """
    _log_transport(target)
    try:
        conn = await psycopg.AsyncConnection.connect(
            target.conninfo, autocommit=autocommit
        )
    except psycopg.OperationalError as exc:
        error = _connection_error(target, exc)
    else:
        _prepare_connection(target, conn)
        return conn
    raise error


def register_adapters(adapters: AdaptersMap) -> None:
    """Make ``adapters`` reject naive datetimes instead of sending ``timestamp``.

    The rejection is an :class:`InvalidValueError`, also a ``ValueError``. It
    covers query parameters in every format, the elements of lists, and COPY
    rows, with or without ``set_types``.
    """
    adapters.register_dumper(datetime, _AwareDatetimeDumper)
    adapters.register_dumper(datetime, _AwareDatetimeBinaryDumper)


def _reject_naive(obj: datetime) -> None:
    if obj.tzinfo is None or obj.utcoffset() is None:
        raise InvalidValueError(
            f"datetime {obj.isoformat()} has no time zone; PostgreSQL would read "
            "it in the connection's TimeZone. Pass an aware datetime, for "
            "example datetime.now(timezone.utc)"
        )


# psycopg calls upgrade() when a query parameter is naive, but calls dump()
# directly for all but one element of a list and for COPY with set_types(),
# so both methods check.


class _AwareDatetimeDumper(DatetimeDumper):
    def upgrade(self, obj: datetime, format: PyFormat) -> Dumper:
        _reject_naive(obj)
        return self

    def dump(self, obj: datetime) -> Buffer | None:
        _reject_naive(obj)
        return super().dump(obj)


class _AwareDatetimeBinaryDumper(DatetimeBinaryDumper):
    def upgrade(self, obj: datetime, format: PyFormat) -> Dumper:
        _reject_naive(obj)
        return self

    def dump(self, obj: datetime) -> Buffer | None:
        _reject_naive(obj)
        return super().dump(obj)


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
        # libpq reads an empty entry of a port list as the default port.
        host_port = (ports[index] if index < len(ports) else ports[-1]) or "5432"
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
            "connecting to %s over a Unix socket; SSL does not apply to local sockets",
            target.description,
            extra={"action": "db.connect.local_socket"},
        )


def _prepare_connection(
    target: ConnectionTarget,
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
) -> None:
    register_adapters(conn.adapters)
    ssl_in_use = conn.pgconn.ssl_in_use
    logger.debug(
        "connected to %s (SSL in use: %s)",
        target.description,
        ssl_in_use,
        extra={"action": "db.connect.done", "ssl": ssl_in_use},
    )


def _failure_hint(target: ConnectionTarget, detail: str) -> str:
    """Return what to do about a connection failure that libpq reported."""
    if any(text in detail for text in _CERTIFICATE_FAILURES):
        return (
            "the server's certificate could not be verified; set sslrootcert in "
            "DATABASE_URL to the file of the CA that signed it, and for "
            "sslmode=verify-full use a host name the certificate names"
        )
    if "server does not support SSL" in detail:
        return (
            f"sslmode={target.ssl_mode} needs a server with SSL turned on; turn "
            "SSL on in the server, or lower DB_SSL_MODE if this network is trusted"
        )
    if "authentication failed" in detail:
        return "check the user name and password in DATABASE_URL"
    if "timeout expired" in detail:
        timeout = conninfo_to_dict(target.conninfo).get("connect_timeout")
        return (
            f"the connection timed out after connect_timeout={timeout} seconds; "
            "check the host, the port and any firewall between them"
        )
    return "check that the server is running and DATABASE_URL is right"


def _connection_error(
    target: ConnectionTarget, exc: psycopg.OperationalError
) -> ConnectionFailedError:
    detail = scrub_message(str(exc).strip(), target.conninfo)
    hint = _failure_hint(target, detail)
    logger.warning(
        "connection to %s failed: %s",
        target.description,
        detail,
        extra={"action": "db.connect.failed", "sqlstate": exc.sqlstate},
    )
    return ConnectionFailedError.from_driver(
        f"could not connect to PostgreSQL at {target.description}: {detail}; {hint}",
        exc,
    )
