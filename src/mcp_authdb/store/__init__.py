"""The library over the schema: sessions and their tokens, the token cache,
the request log and scheduled cleanup. :class:`AsyncAuthDB` opens them all."""

from __future__ import annotations

from mcp_authdb.store.authdb import AsyncAuthDB, AuthDB, AuthDBOptions
from mcp_authdb.store.cache import TokenCache
from mcp_authdb.store.cleanup import (
    CleanupProgress,
    CleanupResult,
    delete_expired_sessions,
    delete_expired_sessions_async,
)
from mcp_authdb.store.listener import AsyncSessionListener, SessionListener
from mcp_authdb.store.request_log import AsyncRequestLog, RequestLog
from mcp_authdb.store.request_log_core import RequestLogStats
from mcp_authdb.store.scheduler import (
    AsyncCleanupScheduler,
    CleanupSchedule,
    CleanupScheduler,
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
    "AsyncAuthDB",
    "AsyncCleanupScheduler",
    "AsyncRequestLog",
    "AsyncSessionListener",
    "AsyncSessionStore",
    "AuthDB",
    "AuthDBOptions",
    "CleanupProgress",
    "CleanupResult",
    "CleanupSchedule",
    "CleanupScheduler",
    "IssuedTokens",
    "RequestLog",
    "RequestLogStats",
    "Session",
    "SessionCache",
    "SessionListener",
    "SessionStats",
    "SessionStore",
    "TokenCache",
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
