"""mcp-authdb: the PostgreSQL foundation of OAuth-protected MCP servers."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from mcp_authdb.errors import (
    AuthDBError,
    ConfigurationError,
    ConnectionFailedError,
    DatabaseError,
    EmbeddedServerError,
    InvalidGrantError,
    InvalidValueError,
    MigrationError,
    SchemaCheckError,
)

try:
    __version__ = version("mcp-authdb")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "AuthDBError",
    "ConfigurationError",
    "ConnectionFailedError",
    "DatabaseError",
    "EmbeddedServerError",
    "InvalidGrantError",
    "InvalidValueError",
    "MigrationError",
    "SchemaCheckError",
    "__version__",
]
