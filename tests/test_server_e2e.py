"""The MCP server end to end: two `mcp-authdb serve` processes over one database.

A user signs in through the SDK's own OAuth client, driven headlessly. Its
browser step follows the redirects from this server's /authorize to the
consent page and approves it. It then goes on to the Authlib stand-in for
Drupal, which approves the test user at once, back to this server's
/oauth/callback and on to the client's redirect URI. Both processes have the
same public URL, as replicas behind a load balancer would, and listen on two
loopback ports. The client registers and signs in through the first, calls
tools and refreshes through the second. After the first restarts, every
token still works on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx2
import pytest
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from psycopg.rows import dict_row

from server_helpers import follow_as_browser
from upstream_server import UpstreamServer, upstream_server

from conftest import ScratchDatabase

pytestmark = pytest.mark.slow

# The MCP client's redirect URI. Nothing listens on it, because the headless
# browser stops at the redirect to it and reads the code from the Location
# header.
CLIENT_REDIRECT_URI = "http://127.0.0.1:1/callback"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One `mcp-authdb serve` process, its output kept in a file."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env = env
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mcp_authdb", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"serve exited with {self.process.returncode}:\n{self.output()}"
                )
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"serve did not become healthy:\n{self.output()}")

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def replicas(
    db: ScratchDatabase, upstream: UpstreamServer, tmp_path: Path, **extra: str
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Start two servers over ``db`` with the first one's URL as public URL."""
    first_port, second_port = free_port(), free_port()
    public = f"http://127.0.0.1:{first_port}"
    upstream.redirect_uri = public + "/oauth/callback"
    env = db.env(
        MCP_AUTHDB_PUBLIC_URL=public + "/mcp",
        MCP_AUTHDB_TOKEN_KEYS="k1:" + secrets.token_urlsafe(32),
        DB_ENCRYPTION_KEY=secrets.token_hex(32),
        **upstream.env(),
        **extra,
    )
    env.pop("MCP_AUTHDB_DEV", None)
    servers = (
        ServerProcess(env, first_port, tmp_path / "first.log"),
        ServerProcess(env, second_port, tmp_path / "second.log"),
    )
    started: list[ServerProcess] = []
    try:
        for server in servers:
            server.start()
            started.append(server)
        yield servers
    finally:
        for server in started:
            if server.process is not None and server.process.poll() is None:
                server.stop()


class MemoryStorage:
    """The SDK's TokenStorage, kept in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


async def follow_to_client(url: str) -> str:
    """Open ``url`` as a browser that approves the consent page would.

    Returns the redirect to the client.
    """
    async with httpx2.AsyncClient(timeout=10.0) as http:
        return await follow_as_browser(http, url, CLIENT_REDIRECT_URI)


def oauth_client(
    server_url: str, storage: MemoryStorage, auth_method: str = "client_secret_post"
) -> OAuthClientProvider:
    """The SDK's OAuth client with a headless browser step."""
    redirected: list[str] = []

    async def redirect_handler(authorization_url: str) -> None:
        redirected.append(await follow_to_client(authorization_url))

    async def callback_handler() -> AuthorizationCodeResult:
        query = dict(parse_qsl(urlsplit(redirected.pop()).query))
        assert "error" not in query, query
        return AuthorizationCodeResult(
            code=query["code"], state=query.get("state"), iss=query.get("iss")
        )

    metadata = OAuthClientMetadata.model_validate(
        {
            "client_name": "end-to-end test",
            "redirect_uris": [CLIENT_REDIRECT_URI],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": auth_method,
        }
    )
    return OAuthClientProvider(
        server_url,
        metadata,
        storage,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )


@contextlib.asynccontextmanager
async def mcp_session(
    mcp_url: str, storage: MemoryStorage, auth_method: str = "client_secret_post"
) -> AsyncIterator[Client]:
    """Connect the SDK client to ``mcp_url``, signing in when it must."""
    auth = oauth_client(mcp_url, storage, auth_method)
    async with (
        httpx2.AsyncClient(auth=auth, timeout=30.0) as http,
        Client(streamable_http_client(mcp_url, http_client=http)) as client,
    ):
        yield client


def tool_json(result: Any) -> dict[str, Any]:
    assert not result.is_error, result
    if result.structured_content is not None:
        content = result.structured_content
        return dict(content.get("result", content))
    return dict(json.loads(result.content[0].text))


async def call_with_bearer(
    base_url: str, access_token: str, tool: str, arguments: dict[str, Any]
) -> dict[str, Any]:
    """Call ``tool`` through the SDK client with a fixed bearer token."""
    headers = {"Authorization": f"Bearer {access_token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30.0) as http,
        Client(streamable_http_client(base_url + "/mcp", http_client=http)) as client,
    ):
        return tool_json(await client.call_tool(tool, arguments))


async def refresh_at(base_url: str, storage: MemoryStorage) -> dict[str, Any]:
    """Refresh the stored tokens at ``base_url``'s token endpoint."""
    assert storage.tokens is not None
    assert storage.client_info is not None
    form = {
        "grant_type": "refresh_token",
        "refresh_token": storage.tokens.refresh_token or "",
        "client_id": storage.client_info.client_id or "",
        "client_secret": storage.client_info.client_secret or "",
    }
    async with httpx2.AsyncClient(timeout=10.0) as http:
        response = await http.post(base_url + "/token", data=form)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    storage.tokens = OAuthToken.model_validate(body)
    return body


def mcp_status(base_url: str, access_token: str) -> int:
    """POST tools/list with ``access_token`` and return the response status.

    The tests expect a rejection, and a 401 must point the client at the
    protected resource metadata.
    """
    response = httpx2.post(
        base_url + "/mcp",
        headers={
            "Authorization": f"Bearer {access_token}",
            "Accept": "application/json, text/event-stream",
        },
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        timeout=10.0,
    )
    if response.status_code == 401:
        assert "resource_metadata=" in response.headers["www-authenticate"]
    return response.status_code


def request_log_rows(db: ScratchDatabase) -> list[dict[str, Any]]:
    with db.connect() as conn, conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute("SELECT * FROM request_logs ORDER BY id")
        return cursor.fetchall()


def wait_for_rows(db: ScratchDatabase, method: str, count: int) -> list[dict[str, Any]]:
    """Wait until the request log writers stored ``count`` rows of ``method``."""
    deadline = time.monotonic() + 10
    while True:
        rows = request_log_rows(db)
        stored = sum(row["method"] == method for row in rows)
        if stored >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_replicas_share_sign_in(db: ScratchDatabase, tmp_path: Path) -> None:
    with (
        upstream_server(users={"alice": "plus"}, access_lifetime=300) as upstream,
        replicas(db, upstream, tmp_path) as (first, second),
    ):
        storage = MemoryStorage()
        secrets_seen: list[str] = [upstream.client_secret or ""]

        async def sign_in_and_use() -> None:
            # Register and sign in through the first replica.
            async with mcp_session(first.url + "/mcp", storage) as client:
                me = tool_json(await client.call_tool("whoami", {}))
            assert me["user_id"] == "alice"
            assert me["subscription_level"] == "plus"
            assert storage.tokens is not None
            assert storage.client_info is not None
            secrets_seen.extend(
                [
                    storage.tokens.access_token,
                    storage.tokens.refresh_token or "",
                    storage.client_info.client_secret or "",
                ]
            )

            # Tools, the upstream call and a refresh through the second.
            first_access = storage.tokens.access_token
            on_second = await call_with_bearer(second.url, first_access, "whoami", {})
            assert on_second["user_id"] == "alice"
            found = await call_with_bearer(
                second.url, first_access, "content_search", {"query": "OAuth"}
            )
            assert found["results"], found
            refreshed = await refresh_at(second.url, storage)
            secrets_seen.extend([refreshed["access_token"], refreshed["refresh_token"]])
            assert refreshed["access_token"] != first_access
            again = await call_with_bearer(
                second.url, refreshed["access_token"], "whoami", {}
            )
            assert again["user_id"] == "alice"

        asyncio.run(sign_in_and_use())
        assert upstream.calls["code"] == 1
        assert upstream.calls["jsonrpc"] == 1

        # Restart the first replica. Every token still works on it.
        assert first.stop() == 0
        first.start()

        async def after_restart() -> None:
            assert storage.tokens is not None
            me = await call_with_bearer(
                first.url, storage.tokens.access_token, "whoami", {}
            )
            assert me["user_id"] == "alice"
            refreshed = await refresh_at(first.url, storage)
            secrets_seen.extend([refreshed["access_token"], refreshed["refresh_token"]])
            me = await call_with_bearer(
                first.url, refreshed["access_token"], "whoami", {}
            )
            assert me["user_id"] == "alice"

        asyncio.run(after_restart())

        rows = wait_for_rows(db, "whoami", 5)
        logs = first.output() + second.output()

    methods = [row["method"] for row in rows]
    assert methods.count("whoami") >= 5
    assert "content_search" in methods
    assert {row["user_id"] for row in rows if row["method"] == "whoami"} == {"alice"}
    for secret in secrets_seen:
        assert secret
        assert secret not in logs
        assert all(secret not in json.dumps(row, default=str) for row in rows)


def test_free_user_search_forbidden(db: ScratchDatabase, tmp_path: Path) -> None:
    with (
        upstream_server(users={"bob": "free"}) as upstream,
        replicas(db, upstream, tmp_path) as (first, _second),
    ):
        storage = MemoryStorage()

        async def search() -> Any:
            async with mcp_session(first.url + "/mcp", storage) as client:
                return await client.call_tool("content_search", {"query": "OAuth"})

        result = asyncio.run(search())
        rows = wait_for_rows(db, "content_search", 1)

    assert result.is_error
    message = result.content[0].text
    assert "plus" in message
    assert "free" in message
    assert upstream.calls["jsonrpc"] == 0
    search_rows = [row for row in rows if row["method"] == "content_search"]
    assert [row["status"] for row in search_rows] == ["forbidden"]
    assert search_rows[0]["user_id"] == "bob"


def test_revoked_refresh_rejected_everywhere(
    db: ScratchDatabase, tmp_path: Path
) -> None:
    with (
        upstream_server() as upstream,
        replicas(db, upstream, tmp_path) as (first, second),
    ):
        storage = MemoryStorage()

        async def sign_in() -> None:
            async with mcp_session(first.url + "/mcp", storage) as client:
                tool_json(await client.call_tool("whoami", {}))

        asyncio.run(sign_in())
        assert storage.tokens is not None
        assert storage.client_info is not None
        access = storage.tokens.access_token
        form = {
            "token": access,
            "client_id": storage.client_info.client_id or "",
            "client_secret": storage.client_info.client_secret or "",
        }
        revoked = httpx2.post(second.url + "/revoke", data=form, timeout=10.0)
        assert revoked.status_code == 200

        for server in (first, second):
            assert mcp_status(server.url, access) == 401

            rejected = httpx2.post(
                server.url + "/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": storage.tokens.refresh_token or "",
                    "client_id": storage.client_info.client_id or "",
                    "client_secret": storage.client_info.client_secret or "",
                },
                timeout=10.0,
            )
            assert rejected.status_code == 400
            assert rejected.json()["error"] == "invalid_grant"


def test_public_client_revokes_without_secret(
    db: ScratchDatabase, tmp_path: Path
) -> None:
    with (
        upstream_server() as upstream,
        replicas(db, upstream, tmp_path) as (first, second),
    ):
        storage = MemoryStorage()

        async def sign_in() -> None:
            async with mcp_session(first.url + "/mcp", storage, "none") as client:
                tool_json(await client.call_tool("whoami", {}))

        asyncio.run(sign_in())
        assert storage.tokens is not None
        assert storage.client_info is not None
        assert storage.client_info.client_secret is None
        access = storage.tokens.access_token

        metadata = httpx2.get(
            first.url + "/.well-known/oauth-authorization-server", timeout=10.0
        ).json()
        assert "none" in metadata["revocation_endpoint_auth_methods_supported"]

        # RFC 7009 section 2.1: a public client sends its client_id only.
        revoked = httpx2.post(
            second.url + "/revoke",
            data={"token": access, "client_id": storage.client_info.client_id or ""},
            timeout=10.0,
        )
        assert revoked.status_code == 200, revoked.text

        assert mcp_status(first.url, access) == 401


def well_known(url: str, name: str) -> str:
    """Insert ``/.well-known/NAME`` between the host and the path of ``url``.

    RFC 8414 section 3.1 and RFC 9728 section 3.1 build metadata URLs this
    way.
    """
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}/.well-known/{name}{path}"


def test_discovery_follows_rfc_9728_and_8414(
    db: ScratchDatabase, tmp_path: Path
) -> None:
    with (
        upstream_server() as upstream,
        replicas(db, upstream, tmp_path) as (first, second),
    ):
        public = first.url + "/mcp"
        for server in (first, second):
            # RFC 9728 section 5.1: the 401 names the resource metadata.
            challenge = httpx2.post(
                server.url + "/mcp",
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                headers={"Accept": "application/json, text/event-stream"},
                timeout=10.0,
            )
            assert challenge.status_code == 401
            header = challenge.headers["www-authenticate"]
            assert header.startswith("Bearer ")
            advertised = header.split('resource_metadata="')[1].split('"')[0]
            assert advertised == well_known(public, "oauth-protected-resource")

            # RFC 9728 sections 2 and 3.3: resource is the URL the client
            # uses, exactly, and the document is JSON.
            response = httpx2.get(server.url + urlsplit(advertised).path, timeout=10.0)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/json")
            resource_metadata = response.json()
            assert resource_metadata["resource"] == public
            issuers = resource_metadata["authorization_servers"]
            assert issuers == [first.url]

            # RFC 8414 sections 2, 3.1 and 3.3: the issuer of the document
            # is the one its URL was built from, with no query or fragment.
            # The document contains the required members.
            issuer = issuers[0]
            response = httpx2.get(
                server.url
                + urlsplit(well_known(issuer, "oauth-authorization-server")).path,
                timeout=10.0,
            )
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/json")
            metadata = response.json()
            assert metadata["issuer"] == issuer
            assert "?" not in issuer
            assert "#" not in issuer
            for member in (
                "authorization_endpoint",
                "token_endpoint",
                "registration_endpoint",
                "revocation_endpoint",
            ):
                assert metadata[member].startswith(issuer + "/"), member
            assert "code" in metadata["response_types_supported"]
            assert metadata["code_challenge_methods_supported"] == ["S256"]
            assert metadata["client_id_metadata_document_supported"] is True
