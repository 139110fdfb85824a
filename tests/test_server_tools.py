"""The MCP tools against a real server, PostgreSQL and upstream stand-in.

Each scenario serves a real MCPServer (stateless streamable HTTP, JSON
responses) with uvicorn on 127.0.0.1 and calls it with the SDK's client. The
bearer tokens are real user sessions with grants in PostgreSQL, and the
upstream tokens come from the Authlib stand-in of tests/upstream_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult

from mcp_authdb.errors import InvalidValueError
from mcp_authdb.server.crypto import Encryptor
from mcp_authdb.server.oauth_store import OAuthStore, StoredCode, UpstreamTokens
from mcp_authdb.server.observability import Metrics, request_logging_middleware
from mcp_authdb.server.provider import AuthDBAccessToken
from mcp_authdb.server.tools import USAGE_SQL, ToolSettings, register_tools
from mcp_authdb.server.upstream import UpstreamClient, new_pkce_pair
from mcp_authdb.store.authdb import AsyncAuthDB
from mcp_authdb.store.tokens import TokenKind, new_token
from server_helpers import (
    KEYS,
    RESOURCE,
    mcp_client,
    resource_auth_settings,
    serving,
)
from upstream_server import Injection, UpstreamServer, upstream_server

from conftest import ScratchDatabase

CLIENT_ID = "test-mcp-client"
SEARCH_SCOPES = ("content:read", "content:search")
SETTINGS = ToolSettings(
    subscription_levels=("free", "plus", "pro"),
    search_level="plus",
    refresh_threshold=0.5,
)


class SessionVerifier:
    """A token verifier that does what the provider's load_access_token does:
    a real user session, plus the facts of its grant."""

    def __init__(self, authdb: AsyncAuthDB, store: OAuthStore) -> None:
        self.authdb = authdb
        self.store = store
        # Families that should look as if their grant has gone.
        self.orphans: set[uuid.UUID] = set()

    async def verify_token(self, token: str) -> AuthDBAccessToken | None:
        session = await self.authdb.sessions.validate(token)
        if session is None or session.family_id is None:
            return None
        family_id = session.family_id
        if family_id in self.orphans:
            family_id = uuid.uuid4()
        grant = await self.store.get_grant(session.family_id)
        if grant is None:
            return None
        return AuthDBAccessToken(
            token=token,
            client_id=grant.client_id,
            scopes=list(session.scopes),
            expires_at=int(session.expires_at.timestamp()),
            resource=grant.resource,
            subject=session.user_id,
            user_id=session.user_id,
            subscription_level=session.subscription_level,
            family_id=family_id,
            session_id=session.session_id,
        )


@dataclasses.dataclass
class Harness:
    base_url: str
    authdb: AsyncAuthDB
    store: OAuthStore
    upstream: UpstreamServer
    upstream_client: UpstreamClient
    verifier: SessionVerifier

    async def sign_in(
        self,
        user_id: str,
        *,
        scopes: Iterable[str] = SEARCH_SCOPES,
        level: str = "plus",
    ) -> str:
        """Sign ``user_id`` in at the upstream and here; return the access token."""
        self.upstream.set_user(user_id, level)
        verifier, challenge = new_pkce_pair()
        url = self.upstream_client.authorization_url(
            state=new_token(TokenKind.STATE), code_challenge=challenge
        )
        callback = await asyncio.to_thread(self.upstream.authorize, url)
        tokens = await self.upstream_client.exchange_code(
            callback["code"], code_verifier=verifier
        )

        code = new_token(TokenKind.CODE)
        await self.store.put_code(
            code,
            StoredCode(
                client_id=CLIENT_ID,
                redirect_uri="http://127.0.0.1/callback",
                redirect_uri_provided_explicitly=True,
                scopes=tuple(scopes),
                code_challenge="x" * 43,
                resource=RESOURCE,
                user_id=user_id,
                subscription_level=level,
                upstream=tokens,
                expires_at=datetime.now(UTC) + timedelta(minutes=1),
            ),
        )
        issued = await self.authdb.sessions.create(
            user_id,
            scopes=scopes,
            subscription_level=level,
            then=lambda session: self.store.consume_code_operation(
                code, session.family_id or uuid.uuid4()
            ),
        )
        return issued.access_token

    def client(
        self, access_token: str
    ) -> contextlib.AbstractAsyncContextManager[Client]:
        return mcp_client(self.base_url, access_token, "auto")

    async def call(
        self, access_token: str, tool: str, arguments: dict[str, Any]
    ) -> CallToolResult:
        async with self.client(access_token) as client:
            result = await client.call_tool(tool, arguments)
        assert isinstance(result, CallToolResult)
        return result

    async def flush_log(self) -> None:
        assert self.authdb.request_log is not None
        assert await self.authdb.request_log.flush()


@contextlib.asynccontextmanager
async def tool_server(
    db: ScratchDatabase, upstream: UpstreamServer, settings: ToolSettings = SETTINGS
) -> AsyncIterator[Harness]:
    env = db.env(MCP_AUTHDB_TOKEN_KEYS=KEYS, SESSION_CLEANUP_INTERVAL="0")
    async with (
        AsyncAuthDB.from_env(env) as authdb,
        UpstreamClient(upstream.config()) as upstream_client,
    ):
        assert authdb.database is not None
        store = OAuthStore(authdb.database, Encryptor(b"k" * 32), authdb.hasher)
        assert await store.register_client(
            CLIENT_ID,
            {"client_id": CLIENT_ID, "redirect_uris": ["http://127.0.0.1/callback"]},
            None,
            source="127.0.0.1",
            limit_per_hour=100,
        )
        verifier = SessionVerifier(authdb, store)
        server = MCPServer(
            "tools-test",
            token_verifier=verifier,
            auth=resource_auth_settings(),
            middleware=[request_logging_middleware(authdb.request_log, Metrics())],
        )
        register_tools(
            server,
            database=authdb.database,
            oauth_store=store,
            upstream=upstream_client,
            settings=settings,
        )
        app = server.streamable_http_app(stateless_http=True, json_response=True)
        async with serving(app) as base_url:
            yield Harness(base_url, authdb, store, upstream, upstream_client, verifier)


def run_with_server(
    db: ScratchDatabase,
    scenario: Any,
    *,
    settings: ToolSettings = SETTINGS,
    **upstream_options: Any,
) -> Any:
    """Run ``await scenario(harness)`` against a fresh server and upstream."""

    async def main() -> Any:
        with upstream_server(**upstream_options) as upstream:
            async with tool_server(db, upstream, settings) as harness:
                outcome = await scenario(harness)
                await harness.flush_log()
                return outcome

    return asyncio.run(main())


def text_of(result: CallToolResult) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


def log_rows(db: ScratchDatabase, method: str) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            "SELECT status, user_id, response_size, duration_ms FROM request_logs"
            " WHERE method = %s ORDER BY id",
            (method,),
        ).fetchall()


def test_tools_list_schemas(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> dict[str, Any]:
        token = await harness.sign_in("alice")
        async with harness.client(token) as client:
            listed = await client.list_tools()
        return {tool.name: tool.input_schema for tool in listed.tools}

    schemas = run_with_server(db, scenario)

    assert set(schemas) == {"whoami", "usage", "content_search"}
    assert schemas["whoami"]["properties"] == {}
    assert schemas["usage"]["properties"]["days"]["type"] == "integer"
    assert schemas["usage"]["properties"]["days"]["default"] == 7
    assert schemas["content_search"]["required"] == ["query"]
    assert schemas["content_search"]["properties"]["query"]["type"] == "string"
    assert schemas["content_search"]["properties"]["limit"]["default"] == 10


def test_whoami_returns_caller(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> tuple[CallToolResult, Any]:
        token = await harness.sign_in("alice", level="pro")
        session = await harness.authdb.sessions.validate(token)
        return await harness.call(token, "whoami", {}), session

    result, session = run_with_server(db, scenario)

    assert not result.is_error
    expected_expiry = datetime.fromtimestamp(int(session.expires_at.timestamp()), UTC)
    assert result.structured_content == {
        "user_id": "alice",
        "subscription_level": "pro",
        "scopes": list(SEARCH_SCOPES),
        "session_expires_at": expected_expiry.isoformat().replace("+00:00", "Z"),
        "client_id": CLIENT_ID,
    }
    rows = log_rows(db, "whoami")
    assert len(rows) == 1
    status, user_id, response_size, duration_ms = rows[0]
    assert (status, user_id) == ("ok", "alice")
    assert response_size > 0
    assert duration_ms >= 0


def insert_log_rows(db: ScratchDatabase, rows: list[tuple[Any, ...]]) -> None:
    with db.connect() as conn:
        conn.cursor().executemany(
            "INSERT INTO request_logs (user_id, method, status, duration_ms,"
            " created_at) VALUES (%s, %s, %s, %s, now() - %s::interval)",
            rows,
        )
        conn.commit()


def test_usage_counts_only_own_recent_rows(db: ScratchDatabase) -> None:
    insert_log_rows(
        db,
        [
            ("alice", "whoami", "ok", 10, "1 hour"),
            ("alice", "whoami", "ok", 20, "1 day"),
            ("alice", "whoami", "ok", 30, "2 days"),
            ("alice", "whoami", "error", 40, "6 days"),
            ("alice", "content_search", "forbidden", 5, "1 minute"),
            ("alice", "content_search", "ok", None, "1 minute"),
            ("alice", "whoami", "ok", 1000, "8 days"),  # outside 7 days
            ("bob", "whoami", "ok", 9999, "1 hour"),  # someone else
        ],
    )

    async def scenario(harness: Harness) -> tuple[CallToolResult, CallToolResult]:
        token = await harness.sign_in("alice")
        week = await harness.call(token, "usage", {})
        fortnight = await harness.call(token, "usage", {"days": 14})
        return week, fortnight

    week, fortnight = run_with_server(db, scenario)

    assert not week.is_error
    report = week.structured_content
    assert report is not None
    assert report["days"] == 7
    assert report["methods_truncated"] is False
    assert report["total"] == {
        "method": "*",
        "requests": 6,
        "errors": 1,
        "forbidden": 1,
        "p50_duration_ms": 20.0,
        "p95_duration_ms": 38.0,
        "max_duration_ms": 40,
    }
    assert report["methods"] == [
        {
            "method": "whoami",
            "requests": 4,
            "errors": 1,
            "forbidden": 0,
            "p50_duration_ms": 25.0,
            "p95_duration_ms": 38.5,
            "max_duration_ms": 40,
        },
        {
            "method": "content_search",
            "requests": 2,
            "errors": 0,
            "forbidden": 1,
            "p50_duration_ms": 5.0,
            "p95_duration_ms": 5.0,
            "max_duration_ms": 5,
        },
    ]
    since = datetime.fromisoformat(report["since"])
    assert abs(datetime.now(UTC) - timedelta(days=7) - since) < timedelta(minutes=1)
    assert fortnight.structured_content is not None
    assert fortnight.structured_content["total"]["requests"] == 7
    assert fortnight.structured_content["total"]["max_duration_ms"] == 1000


def test_usage_with_no_rows(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> CallToolResult:
        return await harness.call(await harness.sign_in("carol"), "usage", {"days": 1})

    result = run_with_server(db, scenario)

    assert result.structured_content is not None
    assert result.structured_content["total"]["requests"] == 0
    assert result.structured_content["total"]["p50_duration_ms"] is None
    assert result.structured_content["methods"] == []


@pytest.mark.parametrize("days", [0, 91, -3])
def test_usage_rejects_days_out_of_range(db: ScratchDatabase, days: int) -> None:
    async def scenario(harness: Harness) -> CallToolResult:
        token = await harness.sign_in("alice")
        return await harness.call(token, "usage", {"days": days})

    result = run_with_server(db, scenario)

    assert result.is_error
    assert f"days={days} is out of range" in text_of(result)
    assert "from 1 to 90" in text_of(result)
    assert [row[0] for row in log_rows(db, "usage")] == ["error"]


def test_usage_statement_uses_user_index(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute(
            "EXPLAIN " + USAGE_SQL, {"user_id": "alice", "days": 7, "limit": 10}
        ).fetchall()

    assert "idx_request_logs_user_created" in "\n".join(row[0] for row in plan)


def test_content_search_returns_upstream_results(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> CallToolResult:
        token = await harness.sign_in("alice", level="plus")
        return await harness.call(
            token, "content_search", {"query": "drupal", "limit": 1}
        )

    result = run_with_server(db, scenario)

    assert not result.is_error, text_of(result)
    content = result.structured_content
    assert content is not None
    assert content["query"] == "drupal"
    assert content["limit"] == 1
    assert content["results"]["total"] == 2
    assert len(content["results"]["items"]) == 1
    assert [row[0:2] for row in log_rows(db, "content_search")] == [("ok", "alice")]


def test_content_search_needs_scope(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> tuple[CallToolResult, int]:
        token = await harness.sign_in("alice", scopes=["content:read"], level="pro")
        result = await harness.call(token, "content_search", {"query": "drupal"})
        return result, harness.upstream.calls["jsonrpc"]

    result, upstream_calls = run_with_server(db, scenario)

    assert result.is_error
    message = text_of(result)
    assert "needs the scope 'content:search'" in message
    assert "has the scopes: content:read" in message
    assert upstream_calls == 0
    assert [row[0:2] for row in log_rows(db, "content_search")] == [
        ("forbidden", "alice")
    ]


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("free", "your level is 'free'"),
        ("gold", "your level 'gold' is not one of these"),
    ],
)
def test_content_search_needs_level(
    db: ScratchDatabase, level: str, expected: str
) -> None:
    async def scenario(harness: Harness) -> tuple[CallToolResult, int]:
        token = await harness.sign_in("dave", level=level)
        result = await harness.call(token, "content_search", {"query": "drupal"})
        return result, harness.upstream.calls["jsonrpc"]

    result, upstream_calls = run_with_server(db, scenario)

    assert result.is_error
    message = text_of(result)
    assert "needs the subscription level 'plus' or higher (free < plus < pro)" in (
        message
    )
    assert expected in message
    assert upstream_calls == 0
    assert [row[0:2] for row in log_rows(db, "content_search")] == [
        ("forbidden", "dave")
    ]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"query": "   "}, "query is empty"),
        ({"query": "x" * 1001}, "query is 1001 characters long; pass at most 1000"),
        ({"query": "a", "limit": 0}, "limit=0 is out of range"),
        ({"query": "a", "limit": 51}, "limit=51 is out of range"),
    ],
)
def test_content_search_rejects_bad_arguments(
    db: ScratchDatabase, arguments: dict[str, Any], expected: str
) -> None:
    async def scenario(harness: Harness) -> CallToolResult:
        token = await harness.sign_in("alice")
        return await harness.call(token, "content_search", arguments)

    result = run_with_server(db, scenario)

    assert result.is_error
    assert expected in text_of(result)
    assert [row[0] for row in log_rows(db, "content_search")] == ["error"]


def test_content_search_refreshes_due_upstream_token(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> tuple[list[CallToolResult], int]:
        token = await harness.sign_in("alice")
        # Half of the 2 s lifetime passes, with the threshold at 0.5.
        await asyncio.sleep(1.2)
        first = await harness.call(token, "content_search", {"query": "oauth"})
        second = await harness.call(token, "content_search", {"query": "oauth"})
        return [first, second], harness.upstream.calls["refresh"]

    results, refreshes = run_with_server(db, scenario, access_lifetime=2)

    for result in results:
        assert not result.is_error, text_of(result)
    assert refreshes == 1


def test_content_search_failed_refresh_asks_to_sign_in(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> CallToolResult:
        token = await harness.sign_in("alice")
        await asyncio.sleep(1.2)
        harness.upstream.fail_next_token(400, "invalid_grant")
        return await harness.call(token, "content_search", {"query": "oauth"})

    result = run_with_server(db, scenario, access_lifetime=2)

    assert result.is_error
    assert "expired or was revoked; sign in again" in text_of(result)
    assert [row[0] for row in log_rows(db, "content_search")] == ["error"]


def test_content_search_revoked_upstream_token(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> CallToolResult:
        token = await harness.sign_in("alice")
        harness.upstream.revoke_user("alice")
        return await harness.call(token, "content_search", {"query": "oauth"})

    result = run_with_server(db, scenario)

    assert result.is_error
    assert "rejected this session's sign-in (HTTP 401); sign in again" in (
        text_of(result)
    )


def test_content_search_retries_after_rotation(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> tuple[CallToolResult, int, int]:
        token = await harness.sign_in("alice")
        family_id = await family_of(harness, token)
        # The search reads the stored tokens, and the upstream delays its
        # response while another request refreshes the tokens, which revokes
        # the access token that the search sent.
        harness.upstream.inject("jsonrpc", Injection(delay_s=1.0))
        search = asyncio.create_task(
            harness.call(token, "content_search", {"query": "oauth"})
        )
        while harness.upstream.calls["jsonrpc"] == 0:
            await asyncio.sleep(0.01)
        await harness.store.refresh_upstream(
            family_id, harness.upstream_client.refresh, 1e-9
        )
        result = await search
        calls = harness.upstream.calls
        return result, calls["refresh"], calls["jsonrpc"]

    result, refreshes, searches = run_with_server(db, scenario)

    assert not result.is_error, text_of(result)
    assert refreshes == 1
    assert searches == 2


def test_content_search_refresh_wait_bounded(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> CallToolResult:
        token = await harness.sign_in("alice")
        family_id = await family_of(harness, token)
        harness.store.refresh_wait_s = 0.3
        release = asyncio.Event()
        started = asyncio.Event()

        async def slow_refresh(current: UpstreamTokens) -> UpstreamTokens:
            started.set()
            await release.wait()
            return await harness.upstream_client.refresh(current)

        # Half of the 2 s lifetime passes, with the threshold at 0.5.
        await asyncio.sleep(1.2)
        refresher = asyncio.create_task(
            harness.store.refresh_upstream(family_id, slow_refresh, 0.5)
        )
        await started.wait()
        try:
            return await harness.call(token, "content_search", {"query": "oauth"})
        finally:
            release.set()
            await refresher

    result = run_with_server(db, scenario, access_lifetime=2)

    assert result.is_error
    assert "still refreshing its upstream sign-in; try again" in text_of(result)


def test_content_search_errors_hide_tokens(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(harness: Harness) -> tuple[list[CallToolResult], list[str]]:
        token = await harness.sign_in("alice")
        # With the threshold at 1.0 the stored tokens are returned as they are.
        grant_tokens = await harness.store.refresh_upstream(
            await family_of(harness, token), harness.upstream_client.refresh, 1.0
        )
        assert grant_tokens.refresh_token is not None
        secrets = [grant_tokens.access_token, grant_tokens.refresh_token]
        echo = " ".join(secrets)
        harness.upstream.inject(
            "jsonrpc", Injection(status=500, body={"error": "server_error " + echo})
        )
        harness.upstream.inject(
            "jsonrpc",
            Injection(
                status=200,
                body={
                    "jsonrpc": "2.0",
                    "id": 2,
                    "error": {"code": -32000, "message": "bad token " + echo},
                },
            ),
        )
        results = [
            await harness.call(token, "content_search", {"query": "oauth"}),
            await harness.call(token, "content_search", {"query": "oauth"}),
        ]
        return results, secrets

    with caplog.at_level("DEBUG"):
        results, secrets = run_with_server(db, scenario)

    assert "unavailable or returned an invalid response" in text_of(results[0])
    assert "returned an error: bad token" in text_of(results[1])
    assert "(JSON-RPC error -32000)" in text_of(results[1])
    # The Authlib stand-in logs its own tokens at DEBUG, so only the records
    # of this project, the SDK and the HTTP stack are searched.
    logged = "\n".join(
        record.getMessage()
        for record in caplog.records
        if record.name.startswith(("mcp_authdb", "mcp.", "httpx2", "httpcore2"))
    )
    for result in results:
        assert result.is_error
        for secret in secrets:
            assert secret not in text_of(result)
    for secret in secrets:
        assert secret not in logged


async def family_of(harness: Harness, access_token: str) -> uuid.UUID:
    session = await harness.authdb.sessions.validate(access_token)
    assert session is not None
    assert session.family_id is not None
    return session.family_id


def test_content_search_without_grant(db: ScratchDatabase) -> None:
    async def scenario(harness: Harness) -> CallToolResult:
        token = await harness.sign_in("alice")
        harness.verifier.orphans.add(await family_of(harness, token))
        return await harness.call(token, "content_search", {"query": "oauth"})

    result = run_with_server(db, scenario)

    assert result.is_error
    assert "this session has no upstream tokens; sign in again" in (text_of(result))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"subscription_levels": ()}, "must list at least one level"),
        ({"subscription_levels": ("free", "free")}, "names a level twice"),
        ({"search_level": "gold"}, "search_level='gold' is not one of"),
        ({"refresh_threshold": 0.0}, "refresh_threshold=0.0 is outside (0, 1]"),
        ({"refresh_threshold": 1.5}, "refresh_threshold=1.5 is outside (0, 1]"),
        ({"search_scope": ""}, "search_scope must not be empty"),
    ],
)
def test_tool_settings_reject_invalid(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidValueError) as caught:
        dataclasses.replace(SETTINGS, **changes)

    assert expected in str(caught.value)
