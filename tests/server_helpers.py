"""Helpers for tests that serve an ASGI app in the test's own event loop.

Each test serves its app with uvicorn on a free port of 127.0.0.1 and calls it
over real HTTP, with the MCP SDK's client where it speaks MCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx2
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.settings import AuthSettings
from pydantic import AnyHttpUrl

# The token keys of servers whose sessions the test makes itself.
KEYS = "k1:" + "s" * 43
# The authorization server that the resource's auth settings name. Nothing
# listens there, and no test contacts it.
ORIGIN = "http://127.0.0.1:9"
RESOURCE = ORIGIN + "/mcp"


@contextlib.asynccontextmanager
async def serving(
    app: Any, *, lifespan: Literal["on", "off"] = "on"
) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1; yield its base URL.

    The server runs as a task of the current event loop and stops when the
    block ends. Raises what uvicorn raised if it stopped before it started.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def mcp_client(base_url: str, token: str, mode: str) -> AsyncIterator[Client]:
    """Connect the SDK's client to ``base_url + "/mcp"`` with a bearer token.

    ``mode`` is the client's protocol mode, such as ``"legacy"`` or ``"auto"``.
    """
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers) as http,
        Client(
            streamable_http_client(base_url + "/mcp", http_client=http), mode=mode
        ) as client,
    ):
        yield client


def resource_auth_settings() -> AuthSettings:
    """Build the auth settings of a resource server at :data:`RESOURCE`.

    The server checks each token's resource, and :data:`ORIGIN` is its
    authorization server.
    """
    return AuthSettings(
        issuer_url=AnyHttpUrl(ORIGIN),
        resource_server_url=AnyHttpUrl(RESOURCE),
        validate_token_resource=True,
    )
