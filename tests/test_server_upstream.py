"""UpstreamConfig and UpstreamClient, against the Authlib stand-in for Drupal.

Every request goes over real HTTP to a server on 127.0.0.1 that the test
starts; no test reaches any other address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest

from mcp_authdb.errors import ConfigurationError
from mcp_authdb.server.oauth_store import UpstreamTokens
from mcp_authdb.server.upstream import (
    DEFAULT_SCOPES,
    MAX_EXPIRES_IN,
    JsonRpcError,
    UpstreamClient,
    UpstreamConfig,
    UpstreamError,
    new_pkce_pair,
    pkce_s256_challenge,
)
from upstream_server import (
    Injection,
    UpstreamServer,
    loopback_socket,
    upstream_server,
)

T = TypeVar("T")

# An address that is never contacted: the config tests only parse it.
DRUPAL = "https://drupal.example.com"


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with upstream_server(users={"alice": "plus", "bob": None}) as server:
        yield server


def run(config: UpstreamConfig, body: Callable[[UpstreamClient], Awaitable[T]]) -> T:
    """Run ``body`` with a client of ``config`` on a new event loop."""

    async def main() -> T:
        async with UpstreamClient(config) as client:
            return await body(client)

    return asyncio.run(main())


async def sign_in(upstream: UpstreamServer, client: UpstreamClient) -> UpstreamTokens:
    """Run the authorization code flow with PKCE and return the tokens."""
    verifier, challenge = new_pkce_pair()
    url = client.authorization_url(state="state-1", code_challenge=challenge)
    params = await asyncio.to_thread(upstream.authorize, url)
    return await client.exchange_code(params["code"], code_verifier=verifier)


# Configuration from the environment.


def test_config_derives_urls_from_base() -> None:
    config = UpstreamConfig.from_env(
        {"DRUPAL_BASE_URL": DRUPAL + "/", "OAUTH_CLIENT_ID": "mcp"},
        default_redirect_uri="https://mcp.example.com/oauth/callback",
    )

    assert config.authorize_url == DRUPAL + "/oauth/authorize"
    assert config.token_url == DRUPAL + "/oauth/token"
    assert config.userinfo_url == DRUPAL + "/oauth/userinfo"
    assert config.jsonrpc_url == DRUPAL + "/jsonrpc"
    assert config.redirect_uri == "https://mcp.example.com/oauth/callback"
    assert config.client_secret is None
    assert config.scopes == DEFAULT_SCOPES
    assert config.user_id_claim == "sub"
    assert config.level_claim == "subscription_level"
    assert config.default_level == "free"
    assert config.timeout_s == 10.0
    assert config.pkce is True


def test_config_reads_every_override() -> None:
    env = {
        "UPSTREAM_AUTHORIZE_URL": "https://login.example.com/authorize",
        "UPSTREAM_TOKEN_URL": "https://login.example.com/token",
        "UPSTREAM_USERINFO_URL": "https://login.example.com/me",
        "UPSTREAM_JSONRPC_URL": "https://api.example.com/rpc",
        "OAUTH_CLIENT_ID": "mcp",
        "OAUTH_CLIENT_SECRET": "s3cret-value",
        "OAUTH_REDIRECT_URI": "https://mcp.example.com/cb",
        "UPSTREAM_SCOPES": "  content:read   content:search ",
        "UPSTREAM_USER_ID_CLAIM": "uid",
        "UPSTREAM_LEVEL_CLAIM": "plan",
        "UPSTREAM_DEFAULT_LEVEL": "basic",
        "UPSTREAM_TIMEOUT": "2.5",
        "UPSTREAM_PKCE": "off",
    }

    config = UpstreamConfig.from_env(env, default_redirect_uri="https://unused/cb")

    assert config.authorize_url == "https://login.example.com/authorize"
    assert config.token_url == "https://login.example.com/token"
    assert config.userinfo_url == "https://login.example.com/me"
    assert config.jsonrpc_url == "https://api.example.com/rpc"
    assert config.client_secret == "s3cret-value"
    assert config.redirect_uri == "https://mcp.example.com/cb"
    assert config.scopes == ("content:read", "content:search")
    assert config.user_id_claim == "uid"
    assert config.level_claim == "plan"
    assert config.default_level == "basic"
    assert config.timeout_s == 2.5
    assert config.pkce is False
    assert "s3cret-value" not in repr(config)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"DRUPAL_BASE_URL": None}, "DRUPAL_BASE_URL"),
        ({"OAUTH_CLIENT_ID": None}, "OAUTH_CLIENT_ID"),
        ({"DRUPAL_BASE_URL": "http://drupal.example.com"}, "DRUPAL_BASE_URL"),
        ({"DRUPAL_BASE_URL": "ftp://drupal.example.com"}, "DRUPAL_BASE_URL"),
        ({"DRUPAL_BASE_URL": "https://drupal.example.com:x"}, "DRUPAL_BASE_URL"),
        ({"UPSTREAM_TOKEN_URL": "http://10.0.0.5/token"}, "UPSTREAM_TOKEN_URL"),
        ({"OAUTH_REDIRECT_URI": "http://mcp.example.com/cb"}, "OAUTH_REDIRECT_URI"),
        ({"UPSTREAM_SCOPES": 'content:read "quoted"'}, "UPSTREAM_SCOPES"),
        ({"UPSTREAM_TIMEOUT": "ten"}, "UPSTREAM_TIMEOUT"),
        ({"UPSTREAM_TIMEOUT": "0"}, "UPSTREAM_TIMEOUT"),
        ({"UPSTREAM_TIMEOUT": "301"}, "UPSTREAM_TIMEOUT"),
        ({"UPSTREAM_PKCE": "maybe"}, "UPSTREAM_PKCE"),
        ({"UPSTREAM_DEFAULT_LEVEL": "x" * 51}, "UPSTREAM_DEFAULT_LEVEL"),
    ],
)
def test_config_rejects_invalid_value(
    changes: dict[str, str | None], named: str
) -> None:
    env = {"DRUPAL_BASE_URL": DRUPAL, "OAUTH_CLIENT_ID": "mcp"}
    for name, value in changes.items():
        if value is None:
            del env[name]
        else:
            env[name] = value

    with pytest.raises(ConfigurationError) as caught:
        UpstreamConfig.from_env(env, default_redirect_uri="https://mcp.example.com/cb")

    assert named in str(caught.value)


def test_config_allows_http_on_loopback() -> None:
    config = UpstreamConfig.from_env(
        {"DRUPAL_BASE_URL": "http://127.0.0.1:8080", "OAUTH_CLIENT_ID": "mcp"},
        default_redirect_uri="http://localhost:8000/oauth/callback",
    )

    assert config.token_url == "http://127.0.0.1:8080/oauth/token"


def test_config_error_hides_url_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        UpstreamConfig.from_env(
            {"DRUPAL_BASE_URL": "http://user:pa55word@drupal.example.com"},
            default_redirect_uri="https://mcp.example.com/cb",
        )

    assert "pa55word" not in str(caught.value)


def test_proxy_variables_skip_loopback() -> None:
    loopback = UpstreamConfig.from_env(
        {"DRUPAL_BASE_URL": "http://127.0.0.1:8080", "OAUTH_CLIENT_ID": "mcp"},
        default_redirect_uri="http://127.0.0.1:8000/oauth/callback",
    )
    remote = UpstreamConfig.from_env(
        {"DRUPAL_BASE_URL": DRUPAL, "OAUTH_CLIENT_ID": "mcp"},
        default_redirect_uri="https://mcp.example.com/oauth/callback",
    )

    async def trust_env(config: UpstreamConfig) -> bool:
        async with UpstreamClient(config) as client:
            return client._http.trust_env

    assert asyncio.run(trust_env(loopback)) is False
    assert asyncio.run(trust_env(remote)) is True


# The authorization URL.


def test_authorization_url_has_oauth_parameters(upstream: UpstreamServer) -> None:
    config = upstream.config(
        authorize_url=upstream.base_url + "/oauth/authorize?tenant=a"
    )
    _, challenge = new_pkce_pair()

    url = run(
        config,
        lambda client: _sync(
            client.authorization_url(state="st&ate", code_challenge=challenge)
        ),
    )

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert (
        f"{parts.scheme}://{parts.netloc}{parts.path}"
        == config.authorize_url.split("?")[0]
    )
    assert query["tenant"] == ["a"]
    assert query["response_type"] == ["code"]
    assert query["client_id"] == [upstream.client_id]
    assert query["redirect_uri"] == [upstream.redirect_uri]
    assert query["scope"] == [" ".join(DEFAULT_SCOPES)]
    assert query["state"] == ["st&ate"]
    assert query["code_challenge"] == [challenge]
    assert query["code_challenge_method"] == ["S256"]
    assert "client_secret" not in query


def test_authorization_url_without_pkce(upstream: UpstreamServer) -> None:
    config = upstream.config(pkce=False)

    url = run(
        config,
        lambda client: _sync(
            client.authorization_url(
                state="s", code_challenge="ignored", scopes=["content:read"]
            )
        ),
    )

    query = parse_qs(urlsplit(url).query)
    assert query["scope"] == ["content:read"]
    assert "code_challenge" not in query
    assert "code_challenge_method" not in query


def test_authorization_url_requires_challenge(upstream: UpstreamServer) -> None:
    with pytest.raises(ValueError, match="code_challenge"):
        run(
            upstream.config(),
            lambda client: _sync(
                client.authorization_url(state="s", code_challenge=None)
            ),
        )


def test_pkce_pair_matches_rfc_7636_example() -> None:
    # RFC 7636, appendix B.
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"

    assert (
        pkce_s256_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )
    new_verifier, new_challenge = new_pkce_pair()
    assert len(new_verifier) == 43
    assert pkce_s256_challenge(new_verifier) == new_challenge


def test_upstream_denied_authorization(upstream: UpstreamServer) -> None:
    upstream.deny_next_authorization()
    _, challenge = new_pkce_pair()

    url = run(
        upstream.config(),
        lambda client: _sync(
            client.authorization_url(state="s", code_challenge=challenge)
        ),
    )
    params = upstream.authorize(url)

    assert params["error"] == "access_denied"
    assert params["state"] == "s"
    assert "code" not in params


def test_upstream_requires_pkce(upstream: UpstreamServer) -> None:
    url = run(
        upstream.config(pkce=False),
        lambda client: _sync(client.authorization_url(state="s", code_challenge=None)),
    )
    params = upstream.authorize(url)

    assert params["error"] == "invalid_request"
    assert params["state"] == "s"
    assert "code" not in params


# Code exchange and refresh.


def test_exchange_code_with_pkce(upstream: UpstreamServer) -> None:
    started = time.time()

    tokens = run(upstream.config(), lambda client: sign_in(upstream, client))

    assert upstream.is_access_token_active(tokens.access_token)
    assert tokens.refresh_token is not None
    assert upstream.is_refresh_token_active(tokens.refresh_token)
    assert tokens.issued_at.tzinfo is not None
    assert abs(tokens.issued_at.timestamp() - started) < 5
    assert tokens.expires_at is not None
    assert tokens.expires_at - tokens.issued_at == timedelta(
        seconds=upstream.access_lifetime
    )
    assert upstream.calls["authorize"] == 1
    assert upstream.calls["code"] == 1
    assert upstream.calls["refresh"] == 0


def test_exchange_code_wrong_verifier(upstream: UpstreamServer) -> None:
    async def body(client: UpstreamClient) -> None:
        _, challenge = new_pkce_pair()
        url = client.authorization_url(state="s", code_challenge=challenge)
        params = await asyncio.to_thread(upstream.authorize, url)
        other_verifier, _ = new_pkce_pair()
        await client.exchange_code(params["code"], code_verifier=other_verifier)

    with pytest.raises(UpstreamError) as caught:
        run(upstream.config(), body)

    assert caught.value.error == "invalid_grant"
    assert caught.value.status_code == 400


def test_exchange_code_twice_fails(upstream: UpstreamServer) -> None:
    async def body(client: UpstreamClient) -> None:
        verifier, challenge = new_pkce_pair()
        url = client.authorization_url(state="s", code_challenge=challenge)
        params = await asyncio.to_thread(upstream.authorize, url)
        await client.exchange_code(params["code"], code_verifier=verifier)
        await client.exchange_code(params["code"], code_verifier=verifier)

    with pytest.raises(UpstreamError) as caught:
        run(upstream.config(), body)

    assert caught.value.error == "invalid_grant"
    assert upstream.calls["code"] == 2


def test_exchange_code_wrong_client_secret(upstream: UpstreamServer) -> None:
    async def body(client: UpstreamClient) -> None:
        await sign_in(upstream, client)

    with pytest.raises(UpstreamError) as caught:
        run(upstream.config(client_secret="not-the-secret"), body)

    assert caught.value.error == "invalid_client"


def test_refresh_rotates_tokens(upstream: UpstreamServer) -> None:
    async def body(client: UpstreamClient) -> tuple[UpstreamTokens, UpstreamTokens]:
        first = await sign_in(upstream, client)
        return first, await client.refresh(first)

    first, second = run(upstream.config(), body)

    assert first.refresh_token is not None
    assert second.refresh_token is not None
    assert second.access_token != first.access_token
    assert second.refresh_token != first.refresh_token
    assert upstream.is_access_token_active(second.access_token)
    assert upstream.is_refresh_token_active(second.refresh_token)
    assert not upstream.is_refresh_token_active(first.refresh_token)
    assert not upstream.is_access_token_active(first.access_token)
    assert second.issued_at >= first.issued_at
    assert upstream.calls["refresh"] == 1


def test_refresh_with_rotated_token_fails(upstream: UpstreamServer) -> None:
    async def body(client: UpstreamClient) -> None:
        first = await sign_in(upstream, client)
        await client.refresh(first)
        await client.refresh(first)

    with pytest.raises(UpstreamError) as caught:
        run(upstream.config(), body)

    assert caught.value.error == "invalid_grant"
    assert upstream.calls["refresh"] == 2


def test_refresh_keeps_old_refresh_token(
    upstream: UpstreamServer,
) -> None:
    async def body(client: UpstreamClient) -> tuple[UpstreamTokens, UpstreamTokens]:
        first = await sign_in(upstream, client)
        upstream.inject(
            "token",
            Injection(
                status=200,
                body={"access_token": "new-access", "token_type": "bearer"},
            ),
        )
        return first, await client.refresh(first)

    first, second = run(upstream.config(), body)

    assert second.access_token == "new-access"
    assert second.refresh_token == first.refresh_token
    assert second.expires_at is None


def test_refresh_without_refresh_token(upstream: UpstreamServer) -> None:
    tokens = UpstreamTokens(
        access_token="a",
        refresh_token=None,
        issued_at=datetime.now(UTC),
        expires_at=None,
    )

    with pytest.raises(UpstreamError) as caught:
        run(upstream.config(), lambda client: client.refresh(tokens))

    assert caught.value.error == "invalid_grant"
    assert upstream.calls["token"] == 0


def test_refresh_after_access_token_expires() -> None:
    with upstream_server(access_lifetime=1) as upstream:

        async def body(client: UpstreamClient) -> tuple[bool, bool]:
            first = await sign_in(upstream, client)
            await asyncio.sleep(1.1)
            expired = upstream.is_access_token_active(first.access_token)
            second = await client.refresh(first)
            return expired, upstream.is_access_token_active(second.access_token)

        expired_still_active, new_active = run(upstream.config(), body)

    assert not expired_still_active
    assert new_active


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"token_type": "Bearer"}, "no access_token"),
        ({"access_token": "a", "token_type": "mac"}, "token_type"),
        ({"access_token": "a", "expires_in": "soon"}, "expires_in"),
        ({"access_token": "a", "refresh_token": 5}, "refresh_token"),
        (["not", "an", "object"], "not an object"),
    ],
)
def test_token_response_invalid(
    upstream: UpstreamServer, body: Any, expected: str
) -> None:
    async def call(client: UpstreamClient) -> None:
        verifier, _ = new_pkce_pair()
        upstream.inject(
            "token",
            Injection(
                status=200,
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            ),
        )
        await client.exchange_code("code", code_verifier=verifier)

    with pytest.raises(UpstreamError, match=expected):
        run(upstream.config(), call)


def exchange_with_token_body(upstream: UpstreamServer, body: bytes) -> UpstreamTokens:
    """Return the tokens of a code exchange whose token response is ``body``."""
    upstream.inject(
        "token",
        Injection(status=200, body=body, headers={"Content-Type": "application/json"}),
    )

    async def call(client: UpstreamClient) -> UpstreamTokens:
        verifier, _ = new_pkce_pair()
        return await client.exchange_code("code", code_verifier=verifier)

    return run(upstream.config(), call)


@pytest.mark.parametrize(
    "expires_in",
    [b"1e308", b"Infinity", str(10**12).encode(), str(10**400).encode()],
    ids=["1e308", "infinity", "10**12", "10**400"],
)
def test_token_expires_in_capped(upstream: UpstreamServer, expires_in: bytes) -> None:
    body = b'{"access_token": "a", "expires_in": ' + expires_in + b"}"

    tokens = exchange_with_token_body(upstream, body)

    assert tokens.expires_at is not None
    assert tokens.expires_at - tokens.issued_at == MAX_EXPIRES_IN


def test_token_expires_in_nan_rejected(upstream: UpstreamServer) -> None:
    with pytest.raises(UpstreamError, match="expires_in nan"):
        exchange_with_token_body(upstream, b'{"access_token": "a", "expires_in": NaN}')


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("access_token", r"A\ud800"),
        ("access_token", r"A\u0000B"),
        ("access_token", r"caf\u00e9"),
        ("access_token", r"A\nB"),
        ("refresh_token", r"R\ud800"),
        ("refresh_token", r"R\u0000"),
    ],
)
def test_token_unusable_characters_rejected(
    upstream: UpstreamServer, field: str, value: str
) -> None:
    fields = {"access_token": "a", "refresh_token": "r", field: value}
    body = "{" + ", ".join(f'"{k}": "{v}"' for k, v in fields.items()) + "}"

    with pytest.raises(UpstreamError, match=field):
        exchange_with_token_body(upstream, body.encode())


# Userinfo.


def test_userinfo_maps_default_claims(upstream: UpstreamServer) -> None:
    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(upstream, client)
        return await client.userinfo(tokens.access_token)

    identity = run(upstream.config(), body)

    assert identity.user_id == "alice"
    assert identity.subscription_level == "plus"
    assert upstream.calls["userinfo"] == 1


@pytest.mark.parametrize(
    "claims", [{"sub": "bob"}, {"sub": "bob", "subscription_level": ""}]
)
def test_userinfo_missing_level_gives_default(
    upstream: UpstreamServer, claims: dict[str, Any]
) -> None:
    upstream.set_user("bob", claims=claims)

    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(upstream, client)
        return await client.userinfo(tokens.access_token)

    identity = run(upstream.config(default_level="basic"), body)

    assert identity.user_id == "bob"
    assert identity.subscription_level == "basic"


def test_userinfo_configured_claim_names(upstream: UpstreamServer) -> None:
    upstream.set_user(
        "carol",
        claims={"sub": "ignored", "uid": 42, "plan": "pro", "scope": "a b"},
    )

    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(upstream, client)
        return await client.userinfo(tokens.access_token)

    identity = run(upstream.config(user_id_claim="uid", level_claim="plan"), body)

    assert identity.user_id == "42"
    assert identity.subscription_level == "pro"
    assert identity.scopes == ("a", "b")


def test_userinfo_missing_user_id(upstream: UpstreamServer) -> None:
    upstream.set_user("dave", claims={"subscription_level": "plus"})

    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(upstream, client)
        return await client.userinfo(tokens.access_token)

    with pytest.raises(UpstreamError) as caught:
        run(upstream.config(), body)

    assert "'sub'" in str(caught.value)
    assert "UPSTREAM_USER_ID_CLAIM" in str(caught.value)


@pytest.mark.parametrize(
    ("claims", "variable"),
    [
        ({"sub": ["alice"]}, "UPSTREAM_USER_ID_CLAIM"),
        ({"sub": True}, "UPSTREAM_USER_ID_CLAIM"),
        ({"sub": "x" * 256}, "UPSTREAM_USER_ID_CLAIM"),
        ({"sub": "erin", "subscription_level": 3}, "UPSTREAM_LEVEL_CLAIM"),
        ({"sub": "erin", "subscription_level": "x" * 51}, "UPSTREAM_LEVEL_CLAIM"),
    ],
)
def test_userinfo_invalid_claim(
    upstream: UpstreamServer, claims: dict[str, Any], variable: str
) -> None:
    upstream.set_user("erin", claims=claims)

    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(upstream, client)
        return await client.userinfo(tokens.access_token)

    with pytest.raises(UpstreamError, match=variable):
        run(upstream.config(), body)


@pytest.mark.parametrize(
    ("body", "variable"),
    [
        (rb'{"sub": "ali\u0000ce"}', "UPSTREAM_USER_ID_CLAIM"),
        (rb'{"sub": "x\ud800"}', "UPSTREAM_USER_ID_CLAIM"),
        (rb'{"sub": "a\u0007b"}', "UPSTREAM_USER_ID_CLAIM"),
        (rb'{"sub": "   "}', "UPSTREAM_USER_ID_CLAIM"),
        (rb'{"sub": "\t\n"}', "UPSTREAM_USER_ID_CLAIM"),
        (rb'{"sub": "bob", "subscription_level": "pro\u0000"}', "UPSTREAM_LEVEL_CLAIM"),
        (rb'{"sub": "bob", "subscription_level": "\ud800"}', "UPSTREAM_LEVEL_CLAIM"),
    ],
)
def test_userinfo_unstorable_claim_rejected(
    upstream: UpstreamServer, body: bytes, variable: str
) -> None:
    upstream.inject("userinfo", Injection(status=200, body=body))

    with pytest.raises(UpstreamError, match=variable):
        run(upstream.config(), lambda client: client.userinfo("token"))


def test_userinfo_deeply_nested_json(upstream: UpstreamServer) -> None:
    body = b'{"sub": "bob", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    upstream.inject("userinfo", Injection(status=200, body=body))

    with pytest.raises(UpstreamError, match="without a JSON body"):
        run(upstream.config(), lambda client: client.userinfo("token"))


def test_unencodable_access_token_not_sent(upstream: UpstreamServer) -> None:
    with pytest.raises(UpstreamError, match="not encodable") as caught:
        run(upstream.config(), lambda client: client.userinfo("A\ud800"))

    assert "\ud800" not in str(caught.value)
    assert upstream.calls["userinfo"] == 0


def test_userinfo_invalid_token(upstream: UpstreamServer) -> None:
    with pytest.raises(UpstreamError) as caught:
        run(upstream.config(), lambda client: client.userinfo("not-a-token"))

    assert caught.value.status_code == 401
    assert caught.value.error == "invalid_token"
    assert "not-a-token" not in str(caught.value)


# JSON-RPC.


def test_jsonrpc_returns_result(upstream: UpstreamServer) -> None:
    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(upstream, client)
        return await client.call_jsonrpc(
            tokens.access_token, "content.search", {"query": "drupal", "limit": 1}
        )

    result = run(upstream.config(), body)

    assert result["total"] == 2
    assert len(result["items"]) == 1
    assert "Drupal" in result["items"][0]["title"]
    assert upstream.calls["jsonrpc"] == 1


def test_jsonrpc_error_object(upstream: UpstreamServer) -> None:
    async def body(client: UpstreamClient) -> Any:
        tokens = await sign_in(upstream, client)
        return await client.call_jsonrpc(tokens.access_token, "content.delete", {})

    with pytest.raises(JsonRpcError) as caught:
        run(upstream.config(), body)

    assert caught.value.code == -32601
    assert caught.value.rpc_message == "Method not found"
    assert "content.delete" in str(caught.value)


def test_jsonrpc_scope_denied(upstream: UpstreamServer) -> None:
    async def body(client: UpstreamClient) -> Any:
        verifier, challenge = new_pkce_pair()
        url = client.authorization_url(
            state="s", code_challenge=challenge, scopes=["content:read"]
        )
        params = await asyncio.to_thread(upstream.authorize, url)
        tokens = await client.exchange_code(params["code"], code_verifier=verifier)
        return await client.call_jsonrpc(
            tokens.access_token, "content.search", {"query": "x"}
        )

    with pytest.raises(JsonRpcError) as caught:
        run(upstream.config(), body)

    assert caught.value.code == -32000


def test_jsonrpc_rejected_token(upstream: UpstreamServer) -> None:
    with pytest.raises(UpstreamError) as caught:
        run(
            upstream.config(),
            lambda client: client.call_jsonrpc("expired", "content.search", {}),
        )

    assert not isinstance(caught.value, JsonRpcError)
    assert caught.value.status_code == 401
    assert caught.value.error == "invalid_token"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"jsonrpc": "2.0", "id": 999, "result": 1}, "has id 999"),
        ({"jsonrpc": "1.0", "id": 1, "result": 1}, "no JSON-RPC 2.0 response"),
        ({"jsonrpc": "2.0", "id": 1}, "neither a result nor an error"),
    ],
)
def test_jsonrpc_malformed_response(
    upstream: UpstreamServer, body: dict[str, Any], expected: str
) -> None:
    upstream.inject("jsonrpc", Injection(status=200, body=body))

    with pytest.raises(UpstreamError, match=expected):
        run(
            upstream.config(),
            lambda client: client.call_jsonrpc("token", "content.search", {}),
        )


# Transport limits and failures.


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_response_refused(upstream: UpstreamServer, chunked: bool) -> None:
    big = b'{"padding": "' + b"x" * (1024 * 1024) + b'"}'
    upstream.inject("userinfo", Injection(status=200, body=big, chunked=chunked))

    with pytest.raises(UpstreamError, match="1048576 byte limit"):
        run(upstream.config(), lambda client: client.userinfo("token"))


def test_response_at_limit_accepted(upstream: UpstreamServer) -> None:
    body = b'{"sub": "frank"}'
    upstream.inject("userinfo", Injection(status=200, body=body, chunked=True))

    identity = run(
        upstream.config(max_response_bytes=len(body)),
        lambda client: client.userinfo("token"),
    )

    assert identity.user_id == "frank"


def test_timeout_raises_upstream_error(upstream: UpstreamServer) -> None:
    upstream.inject("jsonrpc", Injection(delay_s=3))
    started = time.monotonic()

    with pytest.raises(UpstreamError, match=r"timed out after 0\.3 s") as caught:
        run(
            upstream.config(timeout_s=0.3),
            lambda client: client.call_jsonrpc("token", "content.search", {}),
        )

    assert time.monotonic() - started < 2
    assert caught.value.status_code is None


def test_connection_refused() -> None:
    # A port that was free a moment ago and has no listener now.
    sock = loopback_socket()
    port = sock.getsockname()[1]
    sock.close()
    base = f"http://127.0.0.1:{port}"
    config = UpstreamConfig.from_env(
        {"DRUPAL_BASE_URL": base, "OAUTH_CLIENT_ID": "mcp"},
        default_redirect_uri="http://127.0.0.1/oauth/callback",
    )

    with pytest.raises(UpstreamError, match="userinfo endpoint failed: ConnectError"):
        run(config, lambda client: client.userinfo("token"))


def test_redirect_not_followed(upstream: UpstreamServer) -> None:
    upstream.inject(
        "userinfo",
        Injection(status=302, headers={"Location": upstream.base_url + "/jsonrpc"}),
    )

    with pytest.raises(UpstreamError, match="redirect status 302") as caught:
        run(upstream.config(), lambda client: client.userinfo("token"))

    assert caught.value.status_code == 302
    assert upstream.calls["jsonrpc"] == 0


def test_server_error_without_json(upstream: UpstreamServer) -> None:
    upstream.inject("token", Injection(status=502, body=b"<html>Bad gateway</html>"))

    with pytest.raises(UpstreamError, match="status 502") as caught:
        run(
            upstream.config(),
            lambda client: client.exchange_code("c", code_verifier="v" * 43),
        )

    assert caught.value.status_code == 502
    assert caught.value.error is None


def test_success_without_json(upstream: UpstreamServer) -> None:
    upstream.inject("userinfo", Injection(status=200, body=b"<html>login</html>"))

    with pytest.raises(UpstreamError, match="without a JSON body"):
        run(upstream.config(), lambda client: client.userinfo("token"))


# Secrets stay out of messages and logs.


def test_no_secret_in_errors_or_logs(
    upstream: UpstreamServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mcp_authdb")
    assert upstream.client_secret is not None
    secret = upstream.client_secret
    errors: list[UpstreamError] = []
    hidden: list[str] = [secret]
    reprs: list[str] = [repr(upstream.config())]

    async def body(client: UpstreamClient) -> None:
        verifier, challenge = new_pkce_pair()
        state = "state-" + challenge[:10]
        url = client.authorization_url(state=state, code_challenge=challenge)
        params = await asyncio.to_thread(upstream.authorize, url)
        code = params["code"]
        hidden.extend([verifier, state, code])

        # The upstream repeats the code, verifier and secret in its error.
        upstream.fail_next_token(
            error="invalid_grant",
            description=f"bad code {code} verifier {verifier} secret {secret}",
        )
        try:
            await client.exchange_code(code, code_verifier=verifier)
        except UpstreamError as exc:
            errors.append(exc)

        tokens = await client.exchange_code(code, code_verifier=verifier)
        assert tokens.refresh_token is not None
        hidden.extend([tokens.access_token, tokens.refresh_token])

        upstream.fail_next_token(
            description=f"refresh {tokens.refresh_token} secret {secret}"
        )
        try:
            await client.refresh(tokens)
        except UpstreamError as exc:
            errors.append(exc)

        upstream.inject(
            "jsonrpc",
            Injection(
                status=200,
                body={
                    "jsonrpc": "2.0",
                    "id": 1,
                    "error": {"code": -1, "message": f"token {tokens.access_token}"},
                },
            ),
        )
        try:
            await client.call_jsonrpc(tokens.access_token, "content.search", {})
        except UpstreamError as exc:
            errors.append(exc)

        try:
            await client.userinfo(tokens.access_token + "x")
        except UpstreamError as exc:
            errors.append(exc)
        reprs.append(repr(tokens))

    run(upstream.config(), body)

    assert len(errors) == 4
    assert "***" in str(errors[0])
    assert isinstance(errors[2], JsonRpcError)
    assert errors[2].rpc_message == "token ***"
    texts = [str(error) for error in errors] + [repr(error) for error in errors]
    texts += [record.getMessage() for record in caplog.records]
    texts += reprs
    for value in hidden:
        for text in texts:
            assert value not in text
    assert any(record.name.startswith("mcp_authdb") for record in caplog.records)


def _sync(value: T) -> Awaitable[T]:
    """Wrap a plain value as an awaitable, for run() with a sync method."""

    async def wrapped() -> T:
        return value

    return wrapped()
