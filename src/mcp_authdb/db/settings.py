"""Connection settings read from the environment.

The variable names are the ones of the specification, so a deployment that
already sets them keeps working:

- ``DATABASE_URL``: where PostgreSQL is, as a libpq URL or conninfo string.
  Unset means the embedded development server in ``MCP_AUTHDB_DATA_DIR``.
- ``DB_SSL_MODE``: the weakest libpq ``sslmode`` allowed for TCP connections.
- ``DB_CONNECTION_POOL_SIZE``: the maximum number of pooled connections.
- ``DB_COMMAND_TIMEOUT``: the statement timeout, in milliseconds.
- ``DB_TRANSACTION_POOLER``: ``true`` when ``DATABASE_URL`` points at a
  pooler in transaction mode, such as PgBouncer; it turns off server-side
  prepared statements and moves the statement timeout from the startup
  parameters into each transaction.
- ``MCP_AUTHDB_DATA_DIR``: the folder of the embedded server's data.

Invalid values raise :class:`ConfigurationError` when the settings are built,
so a misconfigured process stops at start rather than at its first query.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from mcp_authdb.errors import ConfigurationError

# libpq's sslmode values, weakest first.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# The URL schemes libpq accepts; anything else it reads as a conninfo string.
URL_SCHEMES = ("postgresql", "postgres")
URL_EXAMPLE = "postgresql://user:password@host:5432/dbname"

DEFAULT_SSL_MODE = "require"
DEFAULT_POOL_SIZE = 20
DEFAULT_COMMAND_TIMEOUT_MS = 5000
# PostgreSQL keeps statement_timeout in a 32-bit signed integer.
MAX_COMMAND_TIMEOUT_MS = 2**31 - 1

# The password of a URL runs from the ":" after the user name to the last "@"
# of the line, so that one containing a raw "@" or "/" is masked whole. Text
# after a URL without password but with an "@" further on is masked too.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)([^\n]*)(@)")
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)([^&#\s]*)")
# A conninfo keyword starts the string or follows white space, so this does
# not match the query parameters of a URL, which the pattern above handles.
_CONNINFO_PASSWORD = re.compile(
    r"((?<!\S)(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|(?:[^\s'\\]|\\.)+)"
)
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# ASCII only: str.isdigit() and int() also take other scripts' digits.
_DIGITS = re.compile(r"[0-9]+")
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")


def mask_password(text: str) -> str:
    """Replace the passwords in a connection URL or conninfo string with ``***``.

    ``text`` may also be a message that quotes one. Both ``password`` and
    ``sslpassword`` (the passphrase of a client key) count as passwords.
    """
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    text = _QUERY_PASSWORD.sub(r"\1***", text)
    return _CONNINFO_PASSWORD.sub(r"\1***", text)


def passwords_in(conninfo: str) -> list[str]:
    """Return the passwords written in a URL or conninfo string, longest first.

    Each one is given as written and as libpq decodes it, so that a message
    quoting either can be masked. This works on strings that libpq rejects,
    whose error messages may quote a piece of the URL.
    """
    found: set[str] = set()
    for match in _URL_PASSWORD.finditer(conninfo):
        found |= {match[2], unquote(match[2])}
    for match in _QUERY_PASSWORD.finditer(conninfo):
        found |= {match[2], unquote(match[2])}
    for match in _CONNINFO_PASSWORD.finditer(conninfo):
        raw = match[2]
        found |= {raw, re.sub(r"\\(.)", r"\1", raw.strip("'"))}
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        params = {}
    for key in ("password", "sslpassword"):
        if params.get(key):
            found.add(str(params[key]))
    found.discard("")
    return sorted(found, key=len, reverse=True)


def scrub_message(message: str, conninfo: str) -> str:
    """Replace in ``message`` each password of ``conninfo`` and of quoted URLs."""
    for password in passwords_in(conninfo):
        message = message.replace(password, "***")
    return mask_password(message)


def ssl_mode_rank(mode: str) -> int:
    """Return the strength of a libpq sslmode: 0 for disable, 5 for verify-full."""
    return SSL_MODES.index(mode)


def parse_database_url(url: str, ssl_mode: str) -> dict[str, Any]:
    """Parse a libpq URL or conninfo string and check it against ``ssl_mode``.

    Return libpq's parameters. Raise :class:`ConfigurationError` when libpq
    cannot parse ``url``, when a port or ``connect_timeout`` is not a number,
    or when its ``sslmode`` is weaker than ``ssl_mode``. Messages mask the
    password.
    """
    problem = _url_syntax_problem(url)
    params: dict[str, Any] = {}
    if problem is None:
        # The message is built here and raised below, outside the except
        # block, so that the raised error keeps no driver error as context:
        # libpq quotes the whole URL in some of its parse errors.
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            problem = scrub_message(str(exc).strip(), url)
    if problem is not None:
        raise ConfigurationError(
            f"DATABASE_URL {mask_password(url)!r} is invalid: {problem}; "
            f"write it as {URL_EXAMPLE}"
        )

    _check_ports(params)
    _check_connect_timeout(params)
    _check_ssl_mode(params, ssl_mode)
    return params


def _url_syntax_problem(url: str) -> str | None:
    """Return what makes ``url`` a URL that libpq would misread, or None."""
    scheme_match = _URL_SCHEME.match(url)
    if scheme_match is None:
        # A conninfo string such as "host=db dbname=app".
        return None

    scheme = scheme_match[1]
    if scheme not in URL_SCHEMES:
        driver_hint = ""
        if scheme.split("+")[0] in URL_SCHEMES:
            driver_hint = " (remove the driver name after '+')"
        return (
            f"the scheme {scheme!r} is not one libpq reads{driver_hint}; use "
            f"{' or '.join(s + '://' for s in URL_SCHEMES)}"
        )

    # libpq ends the user name and password at the first "@" before the first
    # "/". A raw "@" or "/" in a password makes it read a piece of the
    # password as a host name, port or database name.
    rest = url[scheme_match.end() :]
    authority, _, path = rest.partition("/")
    if authority.count("@") > 1:
        return "the user name or password contains a raw '@'; percent-encode it as %40"
    if "@" not in authority and "@" in path.partition("?")[0]:
        return (
            "an '@' follows the first '/', so the password probably contains "
            "a raw '/'; percent-encode it as %2F"
        )
    return None


def _check_ports(params: Mapping[str, Any]) -> None:
    port_list = str(params.get("port") or "")
    for port in port_list.split(",") if port_list else []:
        # libpq reads an empty entry of a list as the default port.
        if port and (not _DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535):
            raise ConfigurationError(
                f"DATABASE_URL has port {port!r}, which is not a TCP port "
                "number; use a number from 1 to 65535, such as 5432"
            )


def _check_connect_timeout(params: Mapping[str, Any]) -> None:
    timeout = params.get("connect_timeout")
    if timeout is not None and not _DIGITS.fullmatch(str(timeout)):
        raise ConfigurationError(
            f"DATABASE_URL has connect_timeout={timeout!r}, which is not a "
            "whole number of seconds; use for example connect_timeout=10, or "
            "remove it to derive it from DB_COMMAND_TIMEOUT"
        )


def _check_ssl_mode(params: Mapping[str, Any], ssl_mode: str) -> None:
    requested = params.get("sslmode")
    if requested is None:
        return

    requested = str(requested)
    if requested not in SSL_MODES:
        raise ConfigurationError(
            f"DATABASE_URL has sslmode={requested!r}, which is not a libpq "
            f"sslmode; use one of {', '.join(SSL_MODES)}"
        )
    if ssl_mode_rank(requested) < ssl_mode_rank(ssl_mode):
        raise ConfigurationError(
            f"DATABASE_URL has sslmode={requested}, weaker than "
            f"DB_SSL_MODE={ssl_mode}; remove sslmode from DATABASE_URL, or "
            "lower DB_SSL_MODE if this network is trusted"
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    """The database settings of one process.

    Building one checks every field, ``database_url`` against ``ssl_mode``
    included. ``repr`` masks the password of ``database_url``, so a settings
    object can be logged.
    """

    database_url: str | None = None
    ssl_mode: str = DEFAULT_SSL_MODE
    pool_size: int = DEFAULT_POOL_SIZE
    command_timeout_ms: int = DEFAULT_COMMAND_TIMEOUT_MS
    data_dir: Path | None = None
    transaction_pooler: bool = False

    def __post_init__(self) -> None:
        if self.ssl_mode not in SSL_MODES:
            raise ConfigurationError(
                f"DB_SSL_MODE={self.ssl_mode!r} is not a libpq sslmode; "
                f"use one of {', '.join(SSL_MODES)}"
            )
        if self.pool_size < 1:
            raise ConfigurationError(
                f"DB_CONNECTION_POOL_SIZE={self.pool_size} is invalid; "
                "set it to the maximum number of pooled connections, at least 1"
            )
        if not 1 <= self.command_timeout_ms <= MAX_COMMAND_TIMEOUT_MS:
            raise ConfigurationError(
                f"DB_COMMAND_TIMEOUT={self.command_timeout_ms} is invalid; "
                "set the statement timeout in milliseconds, from 1 to "
                f"{MAX_COMMAND_TIMEOUT_MS}"
            )
        data_dir = self.data_dir
        if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
            raise ConfigurationError(
                f"MCP_AUTHDB_DATA_DIR={str(data_dir)!r} is not a folder; set it "
                "to a folder for the embedded server's data, or unset it to use "
                "the default"
            )
        if self.database_url is not None:
            parse_database_url(self.database_url, self.ssl_mode)

    def __repr__(self) -> str:
        url = None if self.database_url is None else mask_password(self.database_url)
        return (
            f"Settings(database_url={url!r}, ssl_mode={self.ssl_mode!r}, "
            f"pool_size={self.pool_size}, "
            f"command_timeout_ms={self.command_timeout_ms}, "
            f"data_dir={self.data_dir!r}, "
            f"transaction_pooler={self.transaction_pooler})"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``environ`` (default: ``os.environ``).

        Empty variables count as unset, except ``DATABASE_URL``: set but
        empty, it most likely comes from a secret that failed to render, and
        falling back to the embedded development server would hide that.
        Raises :class:`ConfigurationError` naming the variable and its value
        when one is invalid.
        """
        env = os.environ if environ is None else environ
        if "DATABASE_URL" in env and not env["DATABASE_URL"].strip():
            raise ConfigurationError(
                "DATABASE_URL is set but empty; set it to "
                f"{URL_EXAMPLE}, or unset it to use the embedded development "
                "server"
            )

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        data_dir = get("MCP_AUTHDB_DATA_DIR")
        return cls(
            database_url=get("DATABASE_URL"),
            ssl_mode=get("DB_SSL_MODE") or DEFAULT_SSL_MODE,
            pool_size=parse_whole_number(
                "DB_CONNECTION_POOL_SIZE",
                get("DB_CONNECTION_POOL_SIZE"),
                DEFAULT_POOL_SIZE,
                "the maximum number of pooled connections",
            ),
            command_timeout_ms=parse_whole_number(
                "DB_COMMAND_TIMEOUT",
                get("DB_COMMAND_TIMEOUT"),
                DEFAULT_COMMAND_TIMEOUT_MS,
                "the statement timeout in milliseconds",
            ),
            data_dir=Path(data_dir).expanduser() if data_dir else None,
            transaction_pooler=parse_flag(
                "DB_TRANSACTION_POOLER", get("DB_TRANSACTION_POOLER")
            ),
        )

    def replace(self, **changes: object) -> Settings:
        """Return a copy with some fields changed, checked like a new one."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def parse_whole_number(name: str, value: str | None, default: int, meaning: str) -> int:
    """Parse the variable ``name`` as a whole number; ``None`` gives ``default``.

    ``meaning`` completes the hint of the error, as in "set it to {meaning}".
    """
    if value is None:
        return default

    # int() would also take "1_000" and non-ASCII digits.
    if not _WHOLE_NUMBER.fullmatch(value):
        raise ConfigurationError(
            f"{name}={value!r} is not a whole number; set it to {meaning}, "
            f"or unset it to use {default}"
        )
    return int(value)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_flag(name: str, value: str | None, default: bool = False) -> bool:
    """Parse the variable ``name`` as true or false; ``None`` gives ``default``."""
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigurationError(
        f"{name}={value!r} is neither true nor false; set it to one of "
        f"{', '.join(_TRUE + _FALSE)}, or unset it to use {str(default).lower()}"
    )


def parse_whole_number_in_range(
    name: str, value: str | None, default: int, low: int, high: int, meaning: str
) -> int:
    """Parse the variable ``name`` as a whole number from ``low`` to ``high``.

    ``None`` gives ``default``; ``meaning`` completes the hint of the error.
    """
    number = parse_whole_number(name, value, default, meaning)
    if not low <= number <= high:
        raise ConfigurationError(
            f"{name}={value!r} is out of range; set it to {meaning}, from {low} "
            f"to {high}, or unset it to use {default}"
        )
    return number
