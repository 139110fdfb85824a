"""Connection settings read from the environment.

The variable names are the ones of the specification, so a deployment that
already sets them keeps working:

- ``DATABASE_URL``: where PostgreSQL is. Unset means the embedded development
  server in ``MCP_AUTHDB_DATA_DIR``.
- ``DB_SSL_MODE``: the weakest libpq ``sslmode`` allowed for TCP connections.
- ``DB_CONNECTION_POOL_SIZE``: the maximum number of pooled connections.
- ``DB_COMMAND_TIMEOUT``: the statement timeout, in milliseconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

from mcp_authdb.errors import ConfigurationError

# libpq's sslmode values, weakest first.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

DEFAULT_SSL_MODE = "require"
DEFAULT_POOL_SIZE = 20
DEFAULT_COMMAND_TIMEOUT_MS = 5000

_URL_PASSWORD = re.compile(r"(://[^:/@?#]*:)[^@/?#]*(@)")
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def mask_password(text: str) -> str:
    """Replace the password of a connection URL or conninfo string with ``***``."""
    text = _URL_PASSWORD.sub(r"\1***\2", text)
    return _CONNINFO_PASSWORD.sub(r"\1***", text)


def ssl_mode_rank(mode: str) -> int:
    """Return the strength of a libpq sslmode: 0 for disable, 5 for verify-full."""
    return SSL_MODES.index(mode)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The database settings of one process.

    ``repr`` masks the password of ``database_url``, so a settings object can
    be logged.
    """

    database_url: str | None = None
    ssl_mode: str = DEFAULT_SSL_MODE
    pool_size: int = DEFAULT_POOL_SIZE
    command_timeout_ms: int = DEFAULT_COMMAND_TIMEOUT_MS
    data_dir: Path | None = None

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
        if self.command_timeout_ms < 1:
            raise ConfigurationError(
                f"DB_COMMAND_TIMEOUT={self.command_timeout_ms} is invalid; "
                "set the statement timeout in milliseconds, at least 1"
            )

    def __repr__(self) -> str:
        url = None if self.database_url is None else mask_password(self.database_url)
        return (
            f"Settings(database_url={url!r}, ssl_mode={self.ssl_mode!r}, "
            f"pool_size={self.pool_size}, "
            f"command_timeout_ms={self.command_timeout_ms}, "
            f"data_dir={self.data_dir!r})"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``environ`` (default: ``os.environ``).

        Empty variables count as unset. Raises :class:`ConfigurationError`
        naming the variable and its value when one is invalid.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        data_dir = get("MCP_AUTHDB_DATA_DIR")
        return cls(
            database_url=get("DATABASE_URL"),
            ssl_mode=get("DB_SSL_MODE") or DEFAULT_SSL_MODE,
            pool_size=_parse_int(
                "DB_CONNECTION_POOL_SIZE", get("DB_CONNECTION_POOL_SIZE"),
                DEFAULT_POOL_SIZE,
            ),
            command_timeout_ms=_parse_int(
                "DB_COMMAND_TIMEOUT", get("DB_COMMAND_TIMEOUT"),
                DEFAULT_COMMAND_TIMEOUT_MS,
            ),
            data_dir=Path(data_dir).expanduser() if data_dir else None,
        )

    def replace(self, **changes: object) -> Settings:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _parse_int(name: str, value: str | None, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigurationError(
            f"{name}={value!r} is not a whole number; unset it to use {default}"
        ) from None
