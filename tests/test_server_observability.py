"""Request logging middleware, metrics and health check against real servers.

Each test serves a real MCPServer (stateless streamable HTTP, JSON responses)
with uvicorn on 127.0.0.1, calls it with the SDK's client, and reads the
request_logs rows from a real PostgreSQL database.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.applications import Starlette
from starlette.routing import Route

from mcp_authdb.db import resolve_target
from mcp_authdb.db.pool import AsyncDatabase
from mcp_authdb.server.observability import (
    MAX_METHOD_LABELS,
    OTHER_METHOD_LABEL,
    Metrics,
    health_endpoint,
    mark_forbidden,
    metrics_endpoint,
    request_logging_middleware,
)
from mcp_authdb.store.authdb import AsyncAuthDB
from server_helpers import (
    KEYS,
    RESOURCE,
    mcp_client,
    resource_auth_settings,
    serving,
)

from conftest import ScratchDatabase

CLIENT_MODES = ("legacy", "auto")


class BearerIsUser:
    """A token verifier for tests: the bearer token ``user-X`` is user X."""

    async def verify_token(self, token: str) -> AccessToken | None:
        if not token.startswith("user-"):
            return None
        return AccessToken(
            token=token,
            client_id="test-client",
            scopes=["content:read"],
            resource=RESOURCE,
            subject=token.removeprefix("user-"),
        )


def environment(db: ScratchDatabase) -> dict[str, str]:
    return db.env(MCP_AUTHDB_TOKEN_KEYS=KEYS, SESSION_CLEANUP_INTERVAL="0")


def build_server(authdb: AsyncAuthDB, metrics: Metrics) -> MCPServer:
    """An MCP server with tools that succeed, fail and refuse, and /metrics."""
    server = MCPServer(
        "observability-test",
        token_verifier=BearerIsUser(),
        auth=resource_auth_settings(),
        middleware=[request_logging_middleware(authdb.request_log, metrics)],
    )

    @server.tool()
    async def echo(text: str) -> str:
        token = get_access_token()
        return f"{text} from {token.subject if token else None}"

    @server.tool()
    async def fail() -> str:
        raise ToolError("the test tool fails on purpose")

    @server.tool()
    async def deny() -> str:
        mark_forbidden()
        raise ToolError("the test tool refuses on purpose")

    server.custom_route("/metrics", methods=["GET"])(metrics_endpoint(metrics, authdb))
    return server


def logged_rows(db: ScratchDatabase) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            "SELECT method, status, user_id, parameters, response_size, duration_ms"
            " FROM request_logs ORDER BY id"
        ).fetchall()


def test_middleware_logs_tool_calls_with_status(db: ScratchDatabase) -> None:
    metrics = Metrics()

    async def scenario() -> dict[Any, Any]:
        replies: dict[Any, Any] = {}
        async with AsyncAuthDB.from_env(environment(db)) as authdb:
            server = build_server(authdb, metrics)
            app = server.streamable_http_app(stateless_http=True, json_response=True)
            async with serving(app) as base_url:
                for mode in CLIENT_MODES:
                    async with mcp_client(base_url, f"user-{mode}", mode) as client:
                        replies[mode, "echo"] = await client.call_tool(
                            "echo", {"text": "hi"}
                        )
                        replies[mode, "fail"] = await client.call_tool("fail", {})
                        replies[mode, "deny"] = await client.call_tool("deny", {})
                        replies[mode, "nope"] = await client.call_tool("nope", {})
                async with httpx2.AsyncClient() as http:
                    replies["metrics"] = await http.get(base_url + "/metrics")
            assert authdb.request_log is not None
            assert await authdb.request_log.flush()
        return replies

    replies = asyncio.run(scenario())

    for mode in CLIENT_MODES:
        # The tool saw the caller through the auth contextvar in stateless mode.
        assert replies[mode, "echo"].structured_content == {"result": f"hi from {mode}"}
        assert replies[mode, "fail"].is_error
        assert replies[mode, "deny"].is_error

    rows = logged_rows(db)
    tool_rows = [row for row in rows if row[0] in ("echo", "fail", "deny", "nope")]
    assert [(row[0], row[1], row[2]) for row in tool_rows] == [
        ("echo", "ok", "legacy"),
        ("fail", "error", "legacy"),
        ("deny", "forbidden", "legacy"),
        ("nope", "error", "legacy"),
        ("echo", "ok", "auto"),
        ("fail", "error", "auto"),
        ("deny", "forbidden", "auto"),
        ("nope", "error", "auto"),
    ]
    for method, _, _, parameters, response_size, duration_ms in tool_rows:
        assert parameters == ({"text": "hi"} if method == "echo" else {})
        assert response_size > 0
        assert duration_ms >= 0

    other_methods = {row[0] for row in rows} - {"echo", "fail", "deny", "nope"}
    assert "initialize" in other_methods
    assert "tools/list" in other_methods
    assert "tools/call" not in other_methods
    assert {row[2] for row in rows} == {"legacy", "auto"}

    body = replies["metrics"].text
    assert replies["metrics"].status_code == 200
    assert 'mcp_authdb_requests_total{method="echo",status="ok"} 2.0' in body
    assert 'mcp_authdb_requests_total{method="deny",status="forbidden"} 2.0' in body
    assert 'mcp_authdb_requests_total{method="fail",status="error"} 2.0' in body
    assert 'mcp_authdb_request_duration_seconds_count{method="echo"} 2.0' in body
    assert "mcp_authdb_request_log_queue_depth " in body


def test_middleware_response_size_is_json_bytes(db: ScratchDatabase) -> None:
    async def scenario() -> Any:
        async with AsyncAuthDB.from_env(environment(db)) as authdb:
            server = build_server(authdb, Metrics())
            app = server.streamable_http_app(stateless_http=True, json_response=True)
            async with (
                serving(app) as base_url,
                mcp_client(base_url, "user-sizer", "legacy") as client,
            ):
                small = await client.call_tool("echo", {"text": "a"})
                large = await client.call_tool("echo", {"text": "é" * 1000})
            assert authdb.request_log is not None
            assert await authdb.request_log.flush()
        return small, large

    asyncio.run(scenario())

    sizes = [row[4] for row in logged_rows(db) if row[0] == "echo"]
    assert len(sizes) == 2
    # 1000 two-byte characters, twice (text and structured content), minus
    # the one-byte "a" twice.
    assert sizes[1] - sizes[0] == 2 * (2000 - 1)


def test_middleware_without_request_log_counts_metrics(db: ScratchDatabase) -> None:
    metrics = Metrics()

    async def scenario() -> None:
        async with AsyncAuthDB.from_env(environment(db)) as authdb:
            server = MCPServer(
                "metrics-only",
                token_verifier=BearerIsUser(),
                auth=resource_auth_settings(),
                middleware=[request_logging_middleware(None, metrics)],
            )

            @server.tool()
            async def ping() -> str:
                return "pong"

            app = server.streamable_http_app(stateless_http=True, json_response=True)
            async with (
                serving(app) as base_url,
                mcp_client(base_url, "user-x", "auto") as client,
            ):
                await client.call_tool("ping", {})
            assert authdb.request_log is not None
            assert await authdb.request_log.flush()

    asyncio.run(scenario())

    body, _ = metrics.render(None)
    assert b'mcp_authdb_requests_total{method="ping",status="ok"} 1.0' in body
    assert logged_rows(db) == []


def test_metrics_registries_are_private() -> None:
    first = Metrics()
    second = Metrics()
    first.observe_request("whoami", "ok", 0.01)

    assert b'method="whoami"' in first.render(None)[0]
    assert b'method="whoami"' not in second.render(None)[0]


def test_metrics_method_labels_are_capped() -> None:
    metrics = Metrics()
    for number in range(MAX_METHOD_LABELS + 5):
        metrics.observe_request(f"tool_{number}", "error", 0.001)
    metrics.observe_request("bad name with spaces", "error", 0.001)
    metrics.observe_request("tool_0", "ok", 0.001)

    body = metrics.render(None)[0].decode()
    assert f'method="tool_{MAX_METHOD_LABELS - 1}"' in body
    assert f'method="tool_{MAX_METHOD_LABELS}"' not in body
    assert (
        f'mcp_authdb_requests_total{{method="{OTHER_METHOD_LABEL}",status="error"}}'
        " 6.0" in body
    )
    assert 'mcp_authdb_requests_total{method="tool_0",status="ok"} 1.0' in body


def test_metrics_read_authdb_counters(db: ScratchDatabase) -> None:
    metrics = Metrics()

    async def scenario() -> tuple[bytes, bytes]:
        env = environment(db)
        env["SESSION_CLEANUP_INTERVAL"] = "86400"
        authdb = AsyncAuthDB.from_env(env)
        metrics.watch(authdb)
        metrics.watch(authdb)  # a second watch adds nothing
        before_open = metrics.render(None)[0]
        async with authdb:
            assert authdb.scheduler is not None
            assert authdb.request_log is not None
            result = await authdb.scheduler.run_once()
            assert result.outcome == "completed"
            authdb.request_log.log("tools/call", user_id="u", status="ok")
            assert await authdb.request_log.flush()
            await authdb.request_log.aclose()
            authdb.request_log.log("tools/call", user_id="u", status="ok")
            metrics.record_oauth_cleanup("completed")
            return before_open, metrics.render(None)[0]

    before_open, body = asyncio.run(scenario())

    assert b"mcp_authdb_request_log_queue_depth" not in before_open
    assert b"mcp_authdb_cleanup_runs_total" not in before_open
    text = body.decode()
    assert "mcp_authdb_request_log_queue_depth 0.0" in text
    assert "mcp_authdb_request_log_written_total 1.0" in text
    assert 'mcp_authdb_request_log_dropped_total{reason="closed"} 1.0' in text
    assert 'mcp_authdb_cleanup_runs_total{outcome="completed"} 1.0' in text
    assert 'mcp_authdb_cleanup_runs_total{outcome="failed"} 0.0' in text
    assert 'mcp_authdb_oauth_cleanup_runs_total{outcome="completed"} 1.0' in text


def test_metrics_endpoint_serves_openmetrics() -> None:
    metrics = Metrics()
    metrics.observe_request("whoami", "ok", 0.01)
    authdb = AsyncAuthDB.from_env({"MCP_AUTHDB_TOKEN_KEYS": KEYS})
    app = Starlette(routes=[Route("/metrics", metrics_endpoint(metrics, authdb))])

    async def scenario() -> httpx2.Response:
        async with serving(app) as base_url, httpx2.AsyncClient() as http:
            return await http.get(
                base_url + "/metrics",
                headers={"Accept": "application/openmetrics-text; version=1.0.0"},
            )

    response = asyncio.run(scenario())

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


async def get_health(database: Any) -> httpx2.Response:
    app = Starlette(routes=[Route("/health", health_endpoint(database))])
    async with serving(app) as base_url, httpx2.AsyncClient() as http:
        return await http.get(base_url + "/health")


async def with_pool(db: ScratchDatabase) -> httpx2.Response:
    async with AsyncDatabase(resolve_target(db.url, db.settings), db.settings) as pool:
        return await get_health(pool)


def test_health_ok_on_migrated_database(db: ScratchDatabase) -> None:
    response = asyncio.run(with_pool(db))

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_health_reports_pending_migration(db: ScratchDatabase) -> None:
    with db.connect(autocommit=True) as conn:
        row = conn.execute(
            "DELETE FROM mcp_authdb_migrations WHERE version = 2 RETURNING name"
        ).fetchone()
    assert row is not None

    response = asyncio.run(with_pool(db))

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert f"0002_{row[0]}.sql" in body["reason"]
    assert "mcp-authdb migrate" in body["reason"]


def test_health_reports_changed_migration(db: ScratchDatabase) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "UPDATE mcp_authdb_migrations SET checksum = 'x' WHERE version = 1"
        )

    response = asyncio.run(with_pool(db))

    assert response.status_code == 503
    assert "changed since they were applied" in response.json()["reason"]
    assert "0001_user_sessions.sql" in response.json()["reason"]


def test_health_reports_unmigrated_database(empty_db: ScratchDatabase) -> None:
    response = asyncio.run(with_pool(empty_db))

    assert response.status_code == 503
    assert "not migrated" in response.json()["reason"]


def test_health_reports_unreachable_database(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> httpx2.Response:
        pool = AsyncDatabase(resolve_target(db.url, db.settings), db.settings)
        await pool.open()
        await pool.close()
        return await get_health(pool)

    with caplog.at_level("WARNING", logger="mcp_authdb.server.observability"):
        response = asyncio.run(scenario())

    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "reason": "the database is unreachable",
    }
    assert db.url not in response.text
    assert any("health check failed" in r.getMessage() for r in caplog.records)


def test_health_while_starting() -> None:
    response = asyncio.run(get_health(lambda: None))

    assert response.status_code == 503
    assert response.json()["reason"] == "the server is starting"


def test_health_uses_pool_given_later(db: ScratchDatabase) -> None:
    async def scenario() -> httpx2.Response:
        target = resolve_target(db.url, db.settings)
        async with AsyncDatabase(target, db.settings) as pool:
            return await get_health(lambda: pool)

    response = asyncio.run(scenario())

    assert response.status_code == 200
