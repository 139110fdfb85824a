"""The MCP tools of the server: ``whoami``, ``usage`` and ``content_search``.

Their names, arguments and result fields are the public contract with MCP
clients. Every tool reads the caller from the access token that the SDK's
bearer middleware stores for the request (``get_access_token()``), which
:class:`~mcp_authdb.server.provider.AuthDBProvider` builds from the user
session and its grant.

- ``whoami`` returns the caller's user id, subscription level, scopes,
  session expiry and client id.
- ``usage`` sums up the caller's own request_logs rows of the last days.
- ``content_search`` calls ``content.search`` on the upstream provider's
  JSON-RPC endpoint with the grant's upstream access token, refreshed first
  when it is due. It needs the scope ``ToolSettings.search_scope`` and at
  least the subscription level ``ToolSettings.search_level``. A caller
  without them gets a tool error naming what is needed and what they have,
  and the request log row gets the status ``forbidden``.

A failure the caller can act on is a ``ToolError``: the client receives a
result with ``isError`` and the message. No message or log line contains a
token.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from mcp_authdb.db.pool import AsyncDatabase, Operation, Query
from mcp_authdb.errors import AuthDBError, InvalidValueError
from mcp_authdb.server.oauth_store import (
    GrantNotFoundError,
    OAuthStore,
    RefreshTimeoutError,
    UpstreamTokens,
)
from mcp_authdb.server.observability import mark_forbidden
from mcp_authdb.server.provider import AuthDBAccessToken
from mcp_authdb.server.upstream import JsonRpcError, UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

DEFAULT_SEARCH_SCOPE = "content:search"
MIN_USAGE_DAYS = 1
MAX_USAGE_DAYS = 90
# The usage report lists at most this many methods, the busiest first.
MAX_USAGE_METHODS = 100
MAX_SEARCH_LIMIT = 50
MAX_QUERY_LENGTH = 1000
REDACTED = "[REDACTED]"

WHOAMI_DESCRIPTION = (
    "Return who you are: user id, subscription level, the scopes and expiry of "
    "this access token, and the OAuth client you signed in with."
)
USAGE_DESCRIPTION = (
    f"Return your own MCP requests of the last `days` days ({MIN_USAGE_DAYS} to "
    f"{MAX_USAGE_DAYS}, default 7): the number of requests, errors and refusals, "
    "and the median, 95th percentile and maximum duration in milliseconds, in "
    "total and by method. Requests of the last few seconds may be missing, "
    "because request logs are written in batches."
)
CONTENT_SEARCH_DESCRIPTION = (
    "Search the content of the upstream site for `query`, returning at most "
    "`limit` results (1 to {max_limit}, default 10). Needs the scope {scope} and "
    "a high enough subscription level."
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolSettings:
    """The server settings that the tools use.

    ``subscription_levels`` lists the levels from lowest to highest, and
    ``content_search`` needs ``search_level`` or a higher one.
    ``refresh_threshold`` is the fraction of the upstream access token's
    lifetime after which it is refreshed before use (0 < x <= 1).
    Invalid values raise :class:`InvalidValueError` naming the field.
    """

    subscription_levels: tuple[str, ...]
    search_level: str
    refresh_threshold: float
    search_scope: str = DEFAULT_SEARCH_SCOPE

    def __post_init__(self) -> None:
        levels = self.subscription_levels
        if not levels or any(not level for level in levels):
            raise InvalidValueError(
                f"subscription_levels={levels!r} must list at least one level, "
                "lowest first, with no empty name"
            )
        if len(set(levels)) != len(levels):
            raise InvalidValueError(
                f"subscription_levels={levels!r} names a level twice; list each "
                "level once, lowest first"
            )
        if self.search_level not in levels:
            raise InvalidValueError(
                f"search_level={self.search_level!r} is not one of the "
                f"subscription levels {', '.join(levels)}"
            )
        if not 0 < self.refresh_threshold <= 1:
            raise InvalidValueError(
                f"refresh_threshold={self.refresh_threshold!r} is outside (0, 1]; "
                "pass the fraction of the upstream token's lifetime after which "
                "it is refreshed, such as 0.9"
            )
        if not self.search_scope:
            raise InvalidValueError("search_scope must not be empty")

    def level_rank(self, level: str) -> int | None:
        """Return the position of ``level`` in the ordered levels, or None."""
        try:
            return self.subscription_levels.index(level)
        except ValueError:
            return None


class WhoAmI(BaseModel):
    """The caller, as the access token of the request describes them."""

    user_id: str = Field(description="The user id from the upstream provider.")
    subscription_level: str = Field(description="The user's subscription level.")
    scopes: list[str] = Field(description="The scopes of this access token.")
    session_expires_at: str | None = Field(
        description="When this access token expires, ISO 8601 in UTC; null "
        "when it does not expire."
    )
    client_id: str = Field(description="The OAuth client the user signed in with.")


class MethodUsage(BaseModel):
    """The caller's requests of one method: a tool name, or an MCP method."""

    method: str
    requests: int
    errors: int = Field(description="Requests with the status error.")
    forbidden: int = Field(
        description="Requests rejected for a missing scope or subscription level."
    )
    p50_duration_ms: float | None = Field(description="Median duration.")
    p95_duration_ms: float | None = Field(description="95th percentile duration.")
    max_duration_ms: int | None


class UsageReport(BaseModel):
    """The caller's own requests since ``since``, in total and by method."""

    days: int
    since: str = Field(description="Start of the period, ISO 8601 in UTC.")
    total: MethodUsage = Field(description="All methods together (method '*').")
    methods: list[MethodUsage] = Field(description="By method, busiest first.")
    methods_truncated: bool = Field(
        description=f"True when more than {MAX_USAGE_METHODS} methods were used "
        "and only the busiest are listed."
    )


class ContentSearchResult(BaseModel):
    """The result of the upstream provider's ``content.search``."""

    query: str
    limit: int
    results: Any = Field(description="The result of the upstream content.search.")


# One statement: the total (the empty grouping set, first) and one row per
# method, over the caller's rows, found through idx_request_logs_user_created
# (user_id, created_at). The empty grouping set gives a row even when the
# caller has no rows.
USAGE_SQL = """
SELECT
    GROUPING(method) = 1 AS is_total,
    method,
    count(*) AS requests,
    count(*) FILTER (WHERE status = 'error') AS errors,
    count(*) FILTER (WHERE status = 'forbidden') AS forbidden,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
    max(duration_ms) AS max_ms,
    now() - make_interval(days => %(days)s) AS since
FROM request_logs
WHERE user_id = %(user_id)s
    AND created_at >= now() - make_interval(days => %(days)s)
GROUP BY GROUPING SETS ((method), ())
ORDER BY GROUPING(method) DESC, count(*) DESC, method
LIMIT %(limit)s
"""


def usage_operation(user_id: str, days: int) -> Operation[UsageReport]:
    """Read the usage report of ``user_id`` over the last ``days`` days."""
    result = yield Query(
        USAGE_SQL,
        {"user_id": user_id, "days": days, "limit": MAX_USAGE_METHODS + 2},
    )
    total_row, *method_rows = result.rows
    return UsageReport(
        days=days,
        since=_iso_utc(total_row[8]),
        total=_method_usage("*", total_row),
        methods=[_method_usage(row[1], row) for row in method_rows[:MAX_USAGE_METHODS]],
        methods_truncated=len(method_rows) > MAX_USAGE_METHODS,
    )


def _method_usage(method: str, row: Sequence[Any]) -> MethodUsage:
    return MethodUsage(
        method=method,
        requests=row[2],
        errors=row[3],
        forbidden=row[4],
        p50_duration_ms=None if row[5] is None else round(row[5], 1),
        p95_duration_ms=None if row[6] is None else round(row[6], 1),
        max_duration_ms=row[7],
    )


def register_tools(
    server: MCPServer[Any],
    *,
    database: AsyncDatabase,
    oauth_store: OAuthStore,
    upstream: UpstreamClient,
    settings: ToolSettings,
) -> None:
    """Add ``whoami``, ``usage`` and ``content_search`` to ``server``."""

    async def whoami() -> WhoAmI:
        token = _caller()
        return WhoAmI(
            user_id=token.user_id,
            subscription_level=token.subscription_level,
            scopes=list(token.scopes),
            session_expires_at=None
            if token.expires_at is None
            else _iso_utc(datetime.fromtimestamp(token.expires_at, UTC)),
            client_id=token.client_id,
        )

    async def usage(days: int = 7) -> UsageReport:
        token = _caller()
        if not MIN_USAGE_DAYS <= days <= MAX_USAGE_DAYS:
            raise ToolError(
                f"days={days} is out of range; pass a whole number of days from "
                f"{MIN_USAGE_DAYS} to {MAX_USAGE_DAYS}"
            )
        try:
            return await database.run(
                lambda: usage_operation(token.user_id, days),
                transaction=False,
                idempotent=True,
            )
        except AuthDBError as exc:
            logger.warning(
                "usage of user %s failed: %s",
                token.user_id,
                exc,
                extra={"action": "tools.usage.failed", "user_id": token.user_id},
            )
            raise ToolError(
                "the usage report is unavailable because the database failed; "
                "try again later"
            ) from exc

    async def content_search(query: str, limit: int = 10) -> ContentSearchResult:
        token = _caller()
        _require_search_access(token, settings)
        text = query.strip()
        if not text:
            raise ToolError("query is empty; pass the words to search for")
        if len(text) > MAX_QUERY_LENGTH:
            raise ToolError(
                f"query is {len(text)} characters long; pass at most {MAX_QUERY_LENGTH}"
            )
        if not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise ToolError(
                f"limit={limit} is out of range; pass a number of results from 1 "
                f"to {MAX_SEARCH_LIMIT}"
            )

        tokens = await _upstream_tokens(token, oauth_store, upstream, settings)
        params = {"query": text, "limit": limit}
        try:
            results = await upstream.call_jsonrpc(
                tokens.access_token, "content.search", params
            )
        except UpstreamError as exc:
            if exc.status_code != 401 or isinstance(exc, JsonRpcError):
                raise _search_failed(token, tokens, exc) from None
            rotated = await _rotated_tokens(token, oauth_store, tokens)
            if rotated is None:
                raise _search_failed(token, tokens, exc) from None
            # A concurrent refresh replaced the access token after this call
            # read it, so the upstream rejected the old one. Retry once.
            logger.info(
                "content.search for user %s retried with the refreshed upstream "
                "access token",
                token.user_id,
                extra={
                    "action": "tools.content_search.retried",
                    "user_id": token.user_id,
                    "family_id": str(token.family_id),
                },
            )
            tokens = rotated
            try:
                results = await upstream.call_jsonrpc(
                    tokens.access_token, "content.search", params
                )
            except UpstreamError as retry_exc:
                raise _search_failed(token, tokens, retry_exc) from None
        return ContentSearchResult(query=text, limit=limit, results=results)

    server.add_tool(whoami, name="whoami", description=WHOAMI_DESCRIPTION)
    server.add_tool(usage, name="usage", description=USAGE_DESCRIPTION)
    server.add_tool(
        content_search,
        name="content_search",
        description=CONTENT_SEARCH_DESCRIPTION.format(
            max_limit=MAX_SEARCH_LIMIT, scope=settings.search_scope
        ),
    )


def _caller() -> AuthDBAccessToken:
    """Return the access token of the request, or raise a ToolError."""
    token = get_access_token()
    if not isinstance(token, AuthDBAccessToken):
        # The bearer middleware rejects requests without a valid token before
        # any tool runs, so only a wiring mistake gets here.
        raise ToolError(
            "this request carries no access token issued by this server; sign in again"
        )
    return token


def _require_search_access(token: AuthDBAccessToken, settings: ToolSettings) -> None:
    """Raise a ToolError, marked forbidden, when the caller may not search."""
    scope = settings.search_scope
    if scope not in token.scopes:
        granted = ", ".join(token.scopes) if token.scopes else "none"
        _forbid(
            token,
            f"content_search needs the scope {scope!r}, and this access token has "
            f"the scopes: {granted}. Sign in again and grant {scope!r}.",
        )

    needed = settings.search_level
    levels = " < ".join(settings.subscription_levels)
    rank = settings.level_rank(token.subscription_level)
    if rank is None:
        _forbid(
            token,
            f"content_search needs the subscription level {needed!r} or higher "
            f"({levels}); your level {token.subscription_level!r} is not one of "
            "these, so it counts as none.",
        )
    if rank < settings.subscription_levels.index(needed):
        _forbid(
            token,
            f"content_search needs the subscription level {needed!r} or higher "
            f"({levels}); your level is {token.subscription_level!r}.",
        )


def _forbid(token: AuthDBAccessToken, message: str) -> NoReturn:
    mark_forbidden()
    logger.info(
        "content_search rejected for user %s: %s",
        token.user_id,
        message,
        extra={"action": "tools.content_search.forbidden", "user_id": token.user_id},
    )
    raise ToolError(message)


async def _upstream_tokens(
    token: AuthDBAccessToken,
    oauth_store: OAuthStore,
    upstream: UpstreamClient,
    settings: ToolSettings,
) -> UpstreamTokens:
    """Return the grant's upstream tokens, refreshed when due, or raise a ToolError."""
    try:
        return await oauth_store.refresh_upstream(
            token.family_id, upstream.refresh, settings.refresh_threshold
        )
    except GrantNotFoundError:
        raise ToolError("this session has no upstream tokens; sign in again") from None
    except RefreshTimeoutError as exc:
        logger.warning(
            "waiting for the upstream refresh of user %s failed: %s",
            token.user_id,
            exc,
            extra={"action": "tools.upstream_tokens.failed", "user_id": token.user_id},
        )
        raise ToolError(
            "another request of this session is still refreshing its upstream "
            "sign-in; try again in a few seconds"
        ) from None
    except UpstreamError as exc:
        _log_upstream_failure(token, "refreshing the upstream tokens", exc)
        if exc.error == "invalid_grant":
            raise ToolError(
                "the sign-in at the upstream provider has expired or was revoked; "
                "sign in again"
            ) from None
        raise ToolError(
            "the upstream provider failed to refresh this session's sign-in; try "
            "again later"
        ) from None
    except AuthDBError as exc:
        logger.warning(
            "reading the upstream tokens of user %s failed: %s",
            token.user_id,
            exc,
            extra={"action": "tools.upstream_tokens.failed", "user_id": token.user_id},
        )
        raise ToolError(
            "this session's upstream sign-in could not be read because the "
            "database failed; try again later"
        ) from None


async def _rotated_tokens(
    token: AuthDBAccessToken, oauth_store: OAuthStore, used: UpstreamTokens
) -> UpstreamTokens | None:
    """Return the grant's stored upstream tokens if their access token changed.

    Returns None when the stored access token is still ``used``'s, when the
    grant has no upstream tokens, or when the database read fails (logged).
    """
    try:
        grant = await oauth_store.get_grant(token.family_id)
    except AuthDBError as exc:
        logger.warning(
            "reading the upstream tokens of user %s again failed: %s",
            token.user_id,
            exc,
            extra={"action": "tools.upstream_tokens.failed", "user_id": token.user_id},
        )
        return None
    if grant is None or grant.upstream is None:
        return None
    if grant.upstream.access_token == used.access_token:
        return None
    return grant.upstream


def _search_failed(
    token: AuthDBAccessToken, tokens: UpstreamTokens, exc: UpstreamError
) -> ToolError:
    """Return the ToolError for a failed ``content.search`` call, and log it."""
    secrets = [tokens.access_token, tokens.refresh_token or ""]
    _log_upstream_failure(token, "content.search", exc, secrets)
    if isinstance(exc, JsonRpcError):
        detail = _redact(exc.rpc_message, secrets)
        return ToolError(
            f"the upstream content search returned an error: {detail} "
            f"(JSON-RPC error {exc.code})"
        )
    if exc.status_code in (401, 403):
        return ToolError(
            f"the upstream provider rejected this session's sign-in (HTTP "
            f"{exc.status_code}); sign in again"
        )
    return ToolError(
        "the upstream content search is unavailable or returned an invalid "
        "response; try again later"
    )


def _log_upstream_failure(
    token: AuthDBAccessToken,
    what: str,
    exc: UpstreamError,
    secrets: Sequence[str] = (),
) -> None:
    logger.warning(
        "%s for user %s failed: %s",
        what,
        token.user_id,
        _redact(str(exc), secrets),
        extra={
            "action": "tools.upstream.failed",
            "user_id": token.user_id,
            "family_id": str(token.family_id),
        },
    )


def _redact(text: str, secrets: Sequence[str]) -> str:
    """Replace each secret in ``text`` with a marker.

    UpstreamError hides the tokens of its own call. This also covers a message
    that quotes other tokens of the grant, such as the refresh token.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
