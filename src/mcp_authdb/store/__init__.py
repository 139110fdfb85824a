"""The data layer over the schema: sessions, their tokens, and cleanup."""

from __future__ import annotations

from mcp_authdb.store.cleanup import (
    CleanupProgress,
    CleanupResult,
    delete_expired_sessions,
    delete_expired_sessions_async,
)
from mcp_authdb.store.session_store import (
    AsyncSessionStore,
    SessionCache,
    SessionStore,
)
from mcp_authdb.store.sessions import (
    IssuedTokens,
    Session,
    SessionStats,
    insert_session,
)
from mcp_authdb.store.tokens import (
    ACCESS_TOKEN_PREFIX,
    REFRESH_TOKEN_PREFIX,
    TOKEN_KEYS_VARIABLE,
    TokenHasher,
    TokenKey,
    TokenKeys,
    TokenKind,
    new_token,
    token_kind,
)

__all__ = [
    "ACCESS_TOKEN_PREFIX",
    "REFRESH_TOKEN_PREFIX",
    "TOKEN_KEYS_VARIABLE",
    "AsyncSessionStore",
    "CleanupProgress",
    "CleanupResult",
    "IssuedTokens",
    "Session",
    "SessionCache",
    "SessionStats",
    "SessionStore",
    "TokenHasher",
    "TokenKey",
    "TokenKeys",
    "TokenKind",
    "delete_expired_sessions",
    "delete_expired_sessions_async",
    "insert_session",
    "new_token",
    "token_kind",
]
