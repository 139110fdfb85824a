"""Exceptions raised by mcp-authdb.

Every error the project raises on purpose is an :class:`AuthDBError`, so a
caller can catch one class. Driver errors are re-raised with ``from exc`` and
keep the SQLSTATE and constraint name of the original.
"""

from __future__ import annotations

from typing import Self

import psycopg


class AuthDBError(Exception):
    """Base class of every error raised by mcp-authdb."""


class ConfigurationError(AuthDBError):
    """A setting from the environment or the command line is invalid."""


class InvalidValueError(AuthDBError, ValueError):
    """A value passed to the library does not fit the schema."""


class EmbeddedServerError(AuthDBError):
    """The embedded development PostgreSQL could not be prepared or started."""


class DatabaseError(AuthDBError):
    """PostgreSQL rejected a statement or a connection.

    ``sqlstate`` and ``constraint_name`` come from the driver error that caused
    it, when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        constraint_name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.constraint_name = constraint_name

    @classmethod
    def from_driver(cls, message: str, exc: psycopg.Error) -> Self:
        """Build an error that keeps the useful fields of a psycopg error."""
        diag = exc.diag
        return cls(
            message,
            sqlstate=exc.sqlstate,
            constraint_name=diag.constraint_name if diag else None,
        )


class ConnectionFailedError(DatabaseError):
    """No connection to PostgreSQL could be opened."""


class MigrationError(DatabaseError):
    """A migration could not be applied, or the ledger disagrees with the files."""


class SchemaCheckError(DatabaseError):
    """The schema check itself failed, so nothing was compared.

    ``sqlstate`` is ``42501`` when the role may not create the scratch schema
    that the check builds and rolls back.
    """


class InvalidGrantError(AuthDBError):
    """A refresh token was not accepted, the OAuth error ``invalid_grant``.

    ``reason`` is one of :data:`GRANT_REJECTIONS`: ``"unknown"`` (malformed,
    or no session has it), ``"expired"``, ``"revoked"``, or ``"replayed"``
    (used again after its rotation's grace window). A replay revokes the
    token's whole family before this error is raised, and ``revoked`` counts
    the rows it revoked. ``session_id`` is the id of the token's row, when
    one was found. The message never contains the token.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        session_id: int | None = None,
        revoked: int = 0,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.session_id = session_id
        self.revoked = revoked


GRANT_REJECTIONS = ("unknown", "expired", "revoked", "replayed")
