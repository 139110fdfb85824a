"""The development identity provider, served by uvicorn on 127.0.0.1.

The routes are driven with a real HTTP client, and the whole sign-in runs
through UpstreamClient configured the way ``serve --dev`` configures it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from starlette.applications import Starlette

from mcp_authdb.errors import ConfigurationError
from mcp_authdb.server.dev_idp import DevIdentityProvider, dev_idp_routes
from mcp_authdb.server.oauth_store import UpstreamTokens
from mcp_authdb.server.upstream import (
    JsonRpcError,
    UpstreamClient,
    UpstreamConfig,
    UpstreamError,
    new_pkce_pair,
)
from upstream_server import loopback_socket, serve_in_thread

T = TypeVar("T")

# What an attacker might put in the parameters of a link to the login page.
NASTY_STATE = '"><script>alert(1)</script>&x=1'
NASTY_SCOPE = "content:read <b>bold</b>"


@dataclasses.dataclass
class DevServer:
    base_url: str
    callback: str

    def config(self) -> UpstreamConfig:
        """Return the config ``serve --dev`` builds: DRUPAL_BASE_URL at /dev."""
        return UpstreamConfig.from_env(
            {
                "DRUPAL_BASE_URL": self.base_url + "/dev",
                "OAUTH_CLIENT_ID": "mcp-authdb-dev",
            },
            default_redirect_uri=self.callback,
        )


@contextlib.contextmanager
def start(
    access_lifetime_s: int = 3600, signing_key: bytes | None = None
) -> Iterator[DevServer]:
    """Serve a new provider whose public URL is its own server's /mcp."""
    sock = loopback_socket()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    provider = DevIdentityProvider(
        base_url + "/mcp", access_lifetime_s=access_lifetime_s, signing_key=signing_key
    )
    with serve_in_thread(Starlette(routes=provider.routes()), sock):
        yield DevServer(base_url, base_url + "/oauth/callback")


@pytest.fixture
def dev() -> Iterator[DevServer]:
    with start() as server:
        yield server


def http() -> httpx2.Client:
    return httpx2.Client(follow_redirects=False, trust_env=False, timeout=5)


def authorize_params(server: DevServer, **changes: str | None) -> dict[str, str]:
    _, challenge = new_pkce_pair()
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": "mcp-authdb-dev",
        "redirect_uri": server.callback,
        "scope": "content:read content:search",
        "state": "state-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(changes)
    return {key: value for key, value in params.items() if value is not None}


def submit_login(
    server: DevServer, params: dict[str, str], user_id: str, level: str
) -> httpx2.Response:
    with http() as client:
        return client.post(
            server.base_url + "/dev/oauth/authorize",
            data={**params, "user_id": user_id, "subscription_level": level},
        )


def location_query(response: httpx2.Response) -> dict[str, str]:
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    return {key: values[0] for key, values in query.items()}


def run(server: DevServer, body: Callable[[UpstreamClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with UpstreamClient(server.config()) as client:
            return await body(client)

    return asyncio.run(main())


async def sign_in(
    server: DevServer, client: UpstreamClient, user_id: str, level: str
) -> UpstreamTokens:
    """Sign in through the login form and exchange the code with PKCE."""
    verifier, challenge = new_pkce_pair()
    url = client.authorization_url(state="st", code_challenge=challenge)
    params = {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}
    response = await asyncio.to_thread(submit_login, server, params, user_id, level)
    code = location_query(response)["code"]
    return await client.exchange_code(code, code_verifier=verifier)


# The login page.


def test_login_page_escapes_parameters(dev: DevServer) -> None:
    params = authorize_params(dev, state=NASTY_STATE, scope=NASTY_SCOPE)

    with http() as client:
        response = client.get(dev.base_url + "/dev/oauth/authorize", params=params)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<script>" not in response.text
    assert "<b>" not in response.text
    assert f'value="{html.escape(NASTY_STATE)}"' in response.text
    assert html.escape(NASTY_SCOPE) in response.text
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    for level in ("free", "plus", "pro"):
        assert f'<option value="{level}">' in response.text


def test_login_rejects_foreign_redirect_uri(dev: DevServer) -> None:
    params = authorize_params(dev, redirect_uri="http://127.0.0.1:1/steal")

    with http() as client:
        response = client.get(dev.base_url + "/dev/oauth/authorize", params=params)
    posted = submit_login(dev, params, "alice", "pro")

    assert response.status_code == 400
    assert "Location" not in response.headers
    assert "redirect_uri" in response.text
    assert posted.status_code == 400
    assert "Location" not in posted.headers


def test_login_requires_client_id(dev: DevServer) -> None:
    params = authorize_params(dev, client_id=None)

    with http() as client:
        response = client.get(dev.base_url + "/dev/oauth/authorize", params=params)

    assert response.status_code == 400
    assert "client_id" in response.text


@pytest.mark.parametrize(
    "changes",
    [
        {"code_challenge": None},
        {"code_challenge_method": "plain"},
        {"code_challenge": "short"},
    ],
)
def test_login_requires_pkce(dev: DevServer, changes: dict[str, str | None]) -> None:
    params = authorize_params(dev, **changes)

    with http() as client:
        response = client.get(dev.base_url + "/dev/oauth/authorize", params=params)

    assert response.status_code == 303
    assert response.headers["Location"].startswith(dev.callback + "?")
    query = location_query(response)
    assert query["error"] == "invalid_request"
    assert query["state"] == "state-1"
    assert "code" not in query


def test_login_rejects_other_response_type(dev: DevServer) -> None:
    params = authorize_params(dev, response_type="token")

    with http() as client:
        response = client.get(dev.base_url + "/dev/oauth/authorize", params=params)

    assert location_query(response)["error"] == "unsupported_response_type"


def test_login_post_redirects_with_code_and_state(dev: DevServer) -> None:
    params = authorize_params(dev, state=NASTY_STATE)

    response = submit_login(dev, params, "alice", "plus")

    assert response.status_code == 303
    assert response.headers["Location"].startswith(dev.callback + "?")
    query = location_query(response)
    assert query["state"] == NASTY_STATE
    assert query["code"]
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("user_id", "level"),
    [("", "plus"), ("   ", "plus"), ("x" * 256, "plus"), ("alice", "gold")],
)
def test_login_post_rejects_invalid_form(
    dev: DevServer, user_id: str, level: str
) -> None:
    response = submit_login(dev, authorize_params(dev), user_id, level)

    assert response.status_code == 400
    assert "Location" not in response.headers


def test_non_loopback_public_url_rejected() -> None:
    for public_url in ("https://mcp.example.com/mcp", "http://10.1.2.3:8000/mcp"):
        with pytest.raises(ConfigurationError, match="loopback"):
            dev_idp_routes(public_url)


def test_routes_live_under_dev() -> None:
    routes = dev_idp_routes("http://127.0.0.1:8000/mcp")

    paths = {route.path for route in routes}
    assert paths == {
        "/dev/oauth/authorize",
        "/dev/oauth/token",
        "/dev/oauth/userinfo",
        "/dev/jsonrpc",
    }


# Tokens, userinfo and JSON-RPC through UpstreamClient.


@pytest.mark.parametrize("level", ["free", "plus", "pro"])
def test_userinfo_returns_chosen_level(dev: DevServer, level: str) -> None:
    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(dev, client, "alice", level)
        return await client.userinfo(tokens.access_token)

    identity = run(dev, body)

    assert identity.user_id == "alice"
    assert identity.subscription_level == level
    assert "content:search" in identity.scopes


@pytest.mark.parametrize(("same_key", "accepted"), [(True, True), (False, False)])
def test_tokens_outlive_restart_with_same_key(same_key: bool, accepted: bool) -> None:
    key = b"k" * 32
    with start(signing_key=key) as first:
        tokens = run(first, lambda client: sign_in(first, client, "alice", "plus"))

    # A new provider, as after a restart of serve --dev.
    with start(signing_key=key if same_key else None) as restarted:
        if accepted:
            identity = run(restarted, lambda c: c.userinfo(tokens.access_token))
            assert identity.user_id == "alice"
        else:
            with pytest.raises(UpstreamError):
                run(restarted, lambda c: c.userinfo(tokens.access_token))


def test_token_exchange_checks_pkce(dev: DevServer) -> None:
    async def body(client: UpstreamClient) -> None:
        _, challenge = new_pkce_pair()
        params = authorize_params(dev, code_challenge=challenge)
        response = await asyncio.to_thread(submit_login, dev, params, "alice", "pro")
        code = location_query(response)["code"]
        other_verifier, _ = new_pkce_pair()
        await client.exchange_code(code, code_verifier=other_verifier)

    with pytest.raises(UpstreamError) as caught:
        run(dev, body)

    assert caught.value.error == "invalid_grant"
    assert "code_verifier" in str(caught.value)


def test_code_works_once(dev: DevServer) -> None:
    async def body(client: UpstreamClient) -> None:
        verifier, challenge = new_pkce_pair()
        params = authorize_params(dev, code_challenge=challenge)
        response = await asyncio.to_thread(submit_login, dev, params, "alice", "pro")
        code = location_query(response)["code"]
        await client.exchange_code(code, code_verifier=verifier)
        await client.exchange_code(code, code_verifier=verifier)

    with pytest.raises(UpstreamError) as caught:
        run(dev, body)

    assert caught.value.error == "invalid_grant"


def test_refresh_rotates(dev: DevServer) -> None:
    async def body(client: UpstreamClient) -> tuple[UpstreamTokens, UpstreamTokens]:
        first = await sign_in(dev, client, "bob", "pro")
        second = await client.refresh(first)
        identity = await client.userinfo(second.access_token)
        assert identity.subscription_level == "pro"
        return first, second

    first, second = run(dev, body)

    assert second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    with pytest.raises(UpstreamError) as caught:
        run(dev, lambda client: client.refresh(first))
    assert caught.value.error == "invalid_grant"
    assert second.expires_at is not None
    assert (second.expires_at - second.issued_at).total_seconds() == 3600


def test_access_token_expires() -> None:
    with start(access_lifetime_s=1) as server:

        async def body(client: UpstreamClient) -> None:
            tokens = await sign_in(server, client, "alice", "plus")
            await client.userinfo(tokens.access_token)
            await asyncio.sleep(1.1)
            await client.userinfo(tokens.access_token)

        with pytest.raises(UpstreamError) as caught:
            run(server, body)

    assert caught.value.status_code == 401


def test_tampered_token_rejected(dev: DevServer) -> None:
    async def body(client: UpstreamClient) -> list[int | None]:
        tokens = await sign_in(dev, client, "alice", "free")
        payload, _, mac = tokens.access_token.partition(".")
        assert tokens.refresh_token is not None
        forged = [
            _flip_first(payload) + "." + mac,
            payload + "." + _flip_first(mac),
            tokens.refresh_token,
            "not-a-token",
            payload + ".!!!",
        ]
        statuses = []
        for token in forged:
            try:
                await client.userinfo(token)
            except UpstreamError as exc:
                statuses.append(exc.status_code)
        return statuses

    assert run(dev, body) == [401, 401, 401, 401, 401]


def test_search_returns_items(dev: DevServer) -> None:
    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(dev, client, "alice", "plus")
        return await client.call_jsonrpc(
            tokens.access_token, "content.search", {"query": "search", "limit": 5}
        )

    result = run(dev, body)

    assert result["total"] >= 1
    assert result["items"]
    for item in result["items"]:
        assert "search" in item["title"].lower()


def test_search_refuses_free(dev: DevServer) -> None:
    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(dev, client, "alice", "free")
        return await client.call_jsonrpc(
            tokens.access_token, "content.search", {"query": "search"}
        )

    with pytest.raises(JsonRpcError) as caught:
        run(dev, body)

    assert caught.value.code == -32000
    assert "plus or pro" in caught.value.rpc_message


@pytest.mark.parametrize(
    ("method", "params", "code"),
    [
        ("content.delete", {}, -32601),
        ("content.search", {"query": 5}, -32602),
        ("content.search", {"query": "x", "limit": 0}, -32602),
        ("content.search", {"query": "x", "limit": True}, -32602),
    ],
)
def test_jsonrpc_errors(
    dev: DevServer, method: str, params: dict[str, Any], code: int
) -> None:
    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(dev, client, "alice", "pro")
        return await client.call_jsonrpc(tokens.access_token, method, params)

    with pytest.raises(JsonRpcError) as caught:
        run(dev, body)

    assert caught.value.code == code


def test_jsonrpc_requires_token(dev: DevServer) -> None:
    with http() as client:
        response = client.post(
            dev.base_url + "/dev/jsonrpc",
            json={"jsonrpc": "2.0", "id": 1, "method": "content.search"},
        )

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_token_endpoint_rejects_unknown_grant(dev: DevServer) -> None:
    with http() as client:
        response = client.post(
            dev.base_url + "/dev/oauth/token", data={"grant_type": "password"}
        )

    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"


def test_tokens_do_not_outlive_the_process() -> None:
    first = DevIdentityProvider("http://127.0.0.1:8000/mcp")
    second = DevIdentityProvider("http://127.0.0.1:8000/mcp")

    token = first._sign("access", 60, sub="a", lvl="pro", scp="", cid="c")

    assert first._verify(token, "access") is not None
    assert second._verify(token, "access") is None
    assert first._verify(token, "refresh") is None


def _flip_first(text: str) -> str:
    """Change the first character of a base64url text."""
    return ("B" if text[0] == "A" else "A") + text[1:]
