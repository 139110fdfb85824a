"""The data layer over the schema: writing user sessions and deleting expired ones."""

from __future__ import annotations

from mcp_authdb.store.cleanup import (
    CleanupProgress,
    CleanupResult,
    delete_expired_sessions,
    delete_expired_sessions_async,
)
from mcp_authdb.store.sessions import insert_session

__all__ = [
    "CleanupProgress",
    "CleanupResult",
    "delete_expired_sessions",
    "delete_expired_sessions_async",
    "insert_session",
]
