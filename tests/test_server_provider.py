"""The OAuth provider on real PostgreSQL, with the Authlib upstream on 127.0.0.1.

Most tests call the provider's SDK-facing methods in ``asyncio.run``. The
consent page and form get Starlette requests built as a browser would send
them, the upstream's authorize step runs over real HTTP in a worker thread,
and the callback gets a Starlette request built from the upstream's
redirect, with the binding cookie that approval set. One
test serves the SDK's auth routes with uvicorn on 127.0.0.1 and signs in
through them with real HTTP requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import http.cookies
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx2
import pytest
from mcp.server.auth.provider import (
    AuthorizationParams,
    AuthorizeError,
    RegistrationError,
    TokenError,
)
from mcp.server.auth.routes import create_auth_routes
from mcp.server.auth.settings import ClientRegistrationOptions, RevocationOptions
from mcp.shared.auth import InvalidRedirectUriError, OAuthClientInformationFull
from pydantic import AnyHttpUrl, AnyUrl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mcp_authdb.db import resolve_target
from mcp_authdb.db.pool import AsyncDatabase
from mcp_authdb.server import consent as consent_module
from mcp_authdb.server.client_metadata import ClientMetadataFetcher
from mcp_authdb.server.consent import BINDING_COOKIE, CONSENT_PATH, CSRF_COOKIE
from mcp_authdb.server.crypto import Encryptor
from mcp_authdb.server.oauth_store import OAuthStore, PendingAuthorization
from mcp_authdb.server.provider import (
    AuthDBAuthorizationCode,
    AuthDBClientInformation,
    AuthDBProvider,
    ProviderSettings,
    RegistrationRateLimited,
    registration_source,
)
from mcp_authdb.server.upstream import DEFAULT_SCOPES, UpstreamClient
from mcp_authdb.store import AsyncSessionStore, TokenHasher, TokenKeys, TokenKind
from mcp_authdb.store.tokens import new_token
from server_helpers import answer_consent_async, consent_form, serving
from upstream_server import UpstreamServer, upstream_server

from conftest import ScratchDatabase

T = TypeVar("T")

HASHER = TokenHasher(TokenKeys.parse("k1:" + "p" * 43))
KEY = b"e" * 32
ISSUER = "http://127.0.0.1:9"  # named in responses, never contacted
RESOURCE = ISSUER + "/mcp"
SCOPES = ("content:read", "content:search")
VERIFIER = "v" * 43
CHALLENGE = (
    base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest())
    .rstrip(b"=")
    .decode()
)
REDIRECT = "http://127.0.0.1:3000/callback"


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with upstream_server(users={"alice": "plus", "bob": "free"}) as server:
        yield server


@dataclasses.dataclass
class Harness:
    provider: AuthDBProvider
    store: OAuthStore
    sessions: AsyncSessionStore
    upstream: UpstreamServer


@contextlib.asynccontextmanager
async def harness(
    db: ScratchDatabase,
    upstream: UpstreamServer,
    resource: str = RESOURCE,
    **settings: Any,
) -> AsyncIterator[Harness]:
    target = resolve_target(db.url, db.settings)
    async with (
        AsyncDatabase(target, db.settings) as database,
        UpstreamClient(upstream.config()) as upstream_client,
    ):
        store = OAuthStore(database, Encryptor(KEY), HASHER)
        sessions = AsyncSessionStore(database, HASHER, refresh_grace=timedelta(0))
        async with ClientMetadataFetcher(store) as documents:
            provider = AuthDBProvider(
                store=store,
                sessions=sessions,
                upstream=upstream_client,
                documents=documents,
                settings=ProviderSettings(
                    **{"issuer": ISSUER, "scopes": SCOPES, **settings},
                    resource=resource,
                ),
            )
            yield Harness(provider, store, sessions, upstream)


async def register(
    h: Harness, client_id: str = "client-a", **fields: Any
) -> AuthDBClientInformation:
    info = OAuthClientInformationFull(
        client_id=client_id,
        redirect_uris=[AnyUrl(REDIRECT)],
        token_endpoint_auth_method="none",
        scope=" ".join(SCOPES),
        **fields,
    )
    await h.provider.register_client(info)
    client = await h.provider.get_client(client_id)
    assert client is not None
    return client


def params(
    *,
    state: str | None = "client-state",
    redirect_uri: str = "http://127.0.0.1:45678/callback",
    resource: str | None = RESOURCE,
    scopes: list[str] | None = None,
    code_challenge: str = CHALLENGE,
) -> AuthorizationParams:
    return AuthorizationParams(
        state=state,
        scopes=scopes if scopes is not None else ["content:read"],
        code_challenge=code_challenge,
        redirect_uri=AnyUrl(redirect_uri),
        redirect_uri_provided_explicitly=True,
        resource=resource,
    )


# The binding cookie that approval set, by the upstream state it approved.
BINDINGS: dict[str, str] = {}
# callback_request() sends the cookie of BINDINGS unless told otherwise.
_APPROVED_COOKIE = object()


def cookie_header(cookies: dict[str, str]) -> list[tuple[bytes, bytes]]:
    if not cookies:
        return []
    text = "; ".join(f"{name}={value}" for name, value in cookies.items())
    return [(b"cookie", text.encode())]


def get_request(
    path: str, query: dict[str, str], cookies: dict[str, str] | None = None
) -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": path,
            "query_string": urlencode(query).encode(),
            "headers": [
                (b"accept", b"application/json"),
                *cookie_header(cookies or {}),
            ],
        }
    )


def form_request(
    fields: dict[str, str],
    cookies: dict[str, str],
    extra_headers: dict[str, str] | None = None,
) -> Request:
    body = urlencode(fields).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [
        (b"content-type", b"application/x-www-form-urlencoded"),
        (b"content-length", str(len(body)).encode()),
        *cookie_header(cookies),
        *[
            (name.lower().encode(), value.encode())
            for name, value in (extra_headers or {}).items()
        ],
    ]
    scope = {
        "type": "http",
        "method": "POST",
        "path": CONSENT_PATH,
        "query_string": b"",
        "headers": headers,
    }
    return Request(scope, receive)


def set_cookies(response: Response) -> dict[str, http.cookies.Morsel[str]]:
    """Return the cookies that ``response`` sets or deletes, by name."""
    found: dict[str, http.cookies.Morsel[str]] = {}
    for name, value in response.raw_headers:
        if name == b"set-cookie":
            parsed: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
            parsed.load(value.decode())
            found.update(parsed)
    return found


async def open_consent(h: Harness, consent_url: str) -> tuple[Response, dict[str, str]]:
    """GET the consent page; return it and the form's hidden fields."""
    assert consent_url.startswith(ISSUER + CONSENT_PATH + "?"), consent_url
    query = dict(parse_qsl(urlsplit(consent_url).query))
    page = await h.provider.consent_page(get_request(CONSENT_PATH, query))
    assert page.status_code == 200, page.body
    _, fields = consent_form(consent_url, bytes(page.body).decode())
    assert set_cookies(page)[CSRF_COOKIE].value == fields["csrf_token"]
    return page, fields


async def answer(h: Harness, consent_url: str, decision: str = "approve") -> Response:
    """Answer the consent page at ``consent_url`` as a browser would."""
    _, fields = await open_consent(h, consent_url)
    return await h.provider.handle_consent(
        form_request(
            {**fields, "decision": decision}, {CSRF_COOKIE: fields["csrf_token"]}
        )
    )


def callback_request(
    query: dict[str, str], cookie: object = _APPROVED_COOKIE
) -> Request:
    """Build the upstream's redirect to the callback, as the browser sends it.

    ``cookie`` is the binding cookie's value, None for none, and by default
    the one that approval set for the query's state.
    """
    if cookie is _APPROVED_COOKIE:
        cookie = BINDINGS.get(query.get("state", ""))
    cookies = {BINDING_COOKIE: cookie} if isinstance(cookie, str) else {}
    return get_request("/oauth/callback", query, cookies)


def redirect_query(response: Response) -> tuple[str, dict[str, str]]:
    assert response.status_code == 302
    location = response.headers["location"]
    return location.split("?")[0], dict(parse_qsl(urlsplit(location).query))


async def upstream_callback(
    h: Harness, client: Any, **overrides: Any
) -> dict[str, str]:
    """Authorize, approve and authorize at the upstream; return the callback query.

    Remembers the binding cookie that approval set in :data:`BINDINGS`.
    """
    url = await h.provider.authorize(client, params(**overrides))
    approved = await answer(h, url)
    assert approved.status_code == 303, approved.body
    binding = set_cookies(approved)[BINDING_COOKIE].value
    query = await asyncio.to_thread(h.upstream.authorize, approved.headers["location"])
    BINDINGS[query["state"]] = binding
    return query


async def sign_in(h: Harness, client: Any, **overrides: Any) -> str:
    """Run the whole authorization; return the provider's authorization code."""
    query = await upstream_callback(h, client, **overrides)
    response = await h.provider.handle_callback(callback_request(query))
    _, result = redirect_query(response)
    return result["code"]


def count(db: ScratchDatabase, table: str) -> int:
    with db.connect() as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


# Clients


def test_registered_client_round_trip(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with harness(db, upstream) as h:
            info = OAuthClientInformationFull(
                client_id="confidential",
                client_secret="s3cret-value-of-the-client",
                redirect_uris=[AnyUrl(REDIRECT)],
                token_endpoint_auth_method="client_secret_post",
            )
            await h.provider.register_client(info)
            return await h.provider.get_client("confidential"), (
                await h.provider.get_client("unknown")
            )

    client, unknown = run(scenario)

    assert client is not None
    assert client.client_secret == "s3cret-value-of-the-client"
    assert client.token_endpoint_auth_method == "client_secret_post"
    assert unknown is None
    with db.connect() as conn:
        row = conn.execute(
            "SELECT metadata::text, client_secret_encrypted FROM oauth_clients"
        ).fetchone()
    assert row is not None
    assert "s3cret" not in row[0]
    assert b"s3cret" not in bytes(row[1])


def test_registration_rate_limited(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> None:
        async with harness(db, upstream, registration_limit_per_hour=2) as h:
            token = registration_source.set("192.0.2.7")
            try:
                await register(h, "one")
                await register(h, "two")
                with pytest.raises(RegistrationRateLimited) as info:
                    await register(h, "three")
                assert info.value.retry_after_s == 3600
            finally:
                registration_source.reset(token)
            registration_source.set("192.0.2.8")
            await register(h, "four")

    run(scenario)

    assert count(db, "oauth_clients") == 3


def test_impossible_client_ids_unknown(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    client_ids = ["", "a\x00b", "https://app.example.com/\x00.json", "c" * 2049]

    async def scenario() -> list[Any]:
        async with harness(db, upstream) as h:
            return [await h.provider.get_client(client_id) for client_id in client_ids]

    assert run(scenario) == [None] * len(client_ids)


def test_registration_rejects_nul_metadata(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> RegistrationError:
        async with harness(db, upstream) as h:
            with pytest.raises(RegistrationError) as info:
                await register(h, client_name="evil\x00name")
            return info.value

    raised = run(scenario)

    assert raised.error == "invalid_client_metadata"
    assert "NUL" in (raised.error_description or "")
    assert count(db, "oauth_clients") == 0


def test_registration_rejects_http_redirect(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> None:
        async with harness(db, upstream) as h:
            info = OAuthClientInformationFull(
                client_id="bad",
                redirect_uris=[AnyUrl("http://app.example.com/cb")],
                token_endpoint_auth_method="none",
            )
            with pytest.raises(RegistrationError) as error:
                await h.provider.register_client(info)
            assert error.value.error == "invalid_redirect_uri"
            assert "use https" in (error.value.error_description or "")

    run(scenario)

    assert count(db, "oauth_clients") == 0


def test_redirect_uri_loopback_any_port(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> AuthDBClientInformation:
        async with harness(db, upstream) as h:
            return await register(h)

    client = run(scenario)

    other_port = AnyUrl("http://127.0.0.1:51111/callback")
    assert client.validate_redirect_uri(other_port) == other_port
    assert str(client.validate_redirect_uri(None)) == REDIRECT
    for uri in (
        "http://localhost:3000/callback",
        "http://127.0.0.1:3000/other",
        "https://127.0.0.1:3000/callback",
    ):
        with pytest.raises(InvalidRedirectUriError):
            client.validate_redirect_uri(AnyUrl(uri))


def test_metadata_document_client_from_cache(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    # The document is in the cache already, so no request is made.
    url = "https://app.example.com/client.json"

    async def scenario() -> tuple[Any, Any]:
        async with harness(db, upstream) as h:
            metadata = {
                "client_id": url,
                "redirect_uris": ["https://app.example.com/cb"],
                "token_endpoint_auth_method": "none",
                "scope": "content:read unknown:scope",
            }
            expires = datetime.now(UTC) + timedelta(hours=1)
            await h.store.put_metadata_document(url, metadata, expires)
            other = "https://app.example.com/other.json"
            await h.store.put_metadata_document(
                other, {**metadata, "client_id": other, "scope": None}, expires
            )
            return await h.provider.get_client(url), await h.provider.get_client(other)

    client, other = run(scenario)

    assert client is not None
    assert client.client_id == url
    assert client.scope == "content:read"
    assert client.client_secret is None
    assert other.scope == " ".join(SCOPES)


# Authorization and callback


@pytest.mark.parametrize(
    ("overrides", "error", "described"),
    [
        pytest.param(
            {"resource": "https://other.example/mcp"},
            "invalid_target",
            "https://other.example/mcp",
            id="resource-mismatch",
        ),
        pytest.param({"scopes": ["admin"]}, "invalid_scope", "", id="unknown-scope"),
        pytest.param(
            {"state": "a\x00b"},
            "invalid_request",
            "state contains a NUL",
            id="nul-state",
        ),
        pytest.param(
            {"state": "s" * 2049},
            "invalid_request",
            "state is 2049 characters long",
            id="long-state",
        ),
        pytest.param(
            {"code_challenge": CHALLENGE[:-1] + "\x00"},
            "invalid_request",
            "code_challenge contains a NUL",
            id="nul-challenge",
        ),
        pytest.param(
            {"code_challenge": "c" * 129},
            "invalid_request",
            "129 characters long",
            id="long-challenge",
        ),
    ],
)
def test_authorize_rejected(
    db: ScratchDatabase,
    upstream: UpstreamServer,
    overrides: dict[str, Any],
    error: str,
    described: str,
) -> None:
    async def scenario() -> AuthorizeError:
        async with harness(db, upstream) as h:
            client = await register(h)
            with pytest.raises(AuthorizeError) as info:
                await h.provider.authorize(client, params(**overrides))
            return info.value

    raised = run(scenario)

    assert raised.error == error
    assert described in (raised.error_description or "")
    assert count(db, "oauth_pending_authorizations") == 0


def test_authorize_resource_forms(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> None:
        async with harness(db, upstream) as h:
            client = await register(h)
            await h.provider.authorize(client, params(resource=RESOURCE + "/"))
            await h.provider.authorize(client, params(resource=None))

    run(scenario)

    with db.connect() as conn:
        rows = conn.execute(
            "SELECT resource FROM oauth_pending_authorizations"
        ).fetchall()
    assert rows == [(RESOURCE,), (RESOURCE,)]


def test_authorize_stores_pending(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> str:
        async with harness(db, upstream) as h:
            client = await register(h)
            return await h.provider.authorize(client, params())

    url = run(scenario)

    query = dict(parse_qsl(urlsplit(url).query))
    assert url.startswith(ISSUER + CONSENT_PATH + "?")
    assert query["request"].startswith(TokenKind.STATE.prefix)
    with db.connect() as conn:
        row = conn.execute(
            "SELECT state_hash, client_state, redirect_uri, scopes, "
            "expires_at - now(), consented_at, binding_hash "
            "FROM oauth_pending_authorizations"
        ).fetchone()
    assert row is not None
    assert row[0] == HASHER.hash(query["request"])
    assert row[5] is None
    assert row[6] is None
    assert row[1] == "client-state"
    assert row[2] == "http://127.0.0.1:45678/callback"
    assert row[3] == ["content:read"]
    assert timedelta(minutes=9) < row[4] <= timedelta(minutes=10)


def test_callback_issues_code(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> tuple[Response, Any]:
        async with harness(db, upstream) as h:
            client = await register(h)
            query = await upstream_callback(h, client)
            response = await h.provider.handle_callback(callback_request(query))
            _, result = redirect_query(response)
            return response, await h.provider.load_authorization_code(
                client, result["code"]
            )

    response, code = run(scenario)

    target, query = redirect_query(response)
    assert target == "http://127.0.0.1:45678/callback"
    assert query["state"] == "client-state"
    assert query["iss"] == ISSUER
    assert query["code"].startswith(TokenKind.CODE.prefix)
    assert response.headers["cache-control"] == "no-store"
    assert code.user_id == "alice"
    assert code.subscription_level == "plus"
    assert code.resource == RESOURCE
    assert code.scopes == ["content:read"]
    assert code.code_challenge == CHALLENGE
    assert count(db, "oauth_pending_authorizations") == 0
    assert count(db, "oauth_codes") == 1


def test_callback_state_reused(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> tuple[Response, Response]:
        async with harness(db, upstream) as h:
            client = await register(h)
            query = await upstream_callback(h, client)
            first = await h.provider.handle_callback(callback_request(query))
            second = await h.provider.handle_callback(callback_request(query))
            return first, second

    first, second = run(scenario)

    assert first.status_code == 302
    assert second.status_code == 400
    assert b"expired or was already used" in second.body
    assert count(db, "oauth_codes") == 1
    assert upstream.calls["code"] == 1


def test_callback_unknown_state(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> list[Response]:
        async with harness(db, upstream) as h:
            await register(h)
            return [
                await h.provider.handle_callback(callback_request(query))
                for query in (
                    {"code": "x", "state": new_token(TokenKind.STATE)},
                    {"code": "x", "state": "not-a-state"},
                    {"code": "x"},
                    {"error": "access_denied"},
                )
            ]

    responses = run(scenario)

    assert [response.status_code for response in responses] == [400] * 4
    assert count(db, "oauth_codes") == 0
    assert upstream.calls["token"] == 0


def test_callback_html_page(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> Response:
        async with harness(db, upstream) as h:
            request = Request(
                {
                    "type": "http",
                    "method": "GET",
                    "path": "/oauth/callback",
                    "query_string": b"state=x",
                    "headers": [(b"accept", b"text/html")],
                }
            )
            return await h.provider.handle_callback(request)

    response = run(scenario)

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert b"Sign-in failed" in response.body


def test_callback_expired_state(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> Response:
        async with harness(db, upstream) as h:
            client = await register(h)
            state = new_token(TokenKind.STATE)
            await h.store.put_pending(
                state,
                PendingAuthorization(
                    client_id=client.client_id,
                    redirect_uri=REDIRECT,
                    redirect_uri_provided_explicitly=True,
                    client_state="s",
                    scopes=("content:read",),
                    code_challenge=CHALLENGE,
                    resource=RESOURCE,
                    upstream_verifier="u" * 43,
                    expires_at=datetime.now(UTC) - timedelta(seconds=1),
                ),
            )
            return await h.provider.handle_callback(
                callback_request({"code": "upstream-code", "state": state})
            )

    response = run(scenario)

    assert response.status_code == 400
    assert count(db, "oauth_codes") == 0
    assert upstream.calls["token"] == 0


def test_callback_upstream_denied(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> Response:
        async with harness(db, upstream) as h:
            client = await register(h)
            upstream.deny_next_authorization()
            query = await upstream_callback(h, client, state="client-state-9")
            assert "error" in query
            return await h.provider.handle_callback(callback_request(query))

    response = run(scenario)

    target, query = redirect_query(response)
    assert target == "http://127.0.0.1:45678/callback"
    assert query["error"] == "access_denied"
    assert query["state"] == "client-state-9"
    assert query["iss"] == ISSUER
    assert "code" not in query
    assert count(db, "oauth_pending_authorizations") == 0
    assert count(db, "oauth_codes") == 0


def test_callback_upstream_failure(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> Response:
        async with harness(db, upstream) as h:
            client = await register(h)
            query = await upstream_callback(h, client, state=None)
            upstream.fail_next_token()
            return await h.provider.handle_callback(callback_request(query))

    response = run(scenario)

    _, query = redirect_query(response)
    assert query["error"] == "server_error"
    assert "state" not in query
    assert count(db, "oauth_codes") == 0


def test_unknown_level_becomes_lowest(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    upstream.set_user("carol", "platinum")

    async def scenario() -> Any:
        async with harness(db, upstream) as h:
            client = await register(h)
            code = await sign_in(h, client)
            return await h.provider.load_authorization_code(client, code)

    assert run(scenario).subscription_level == "free"


# Code exchange


async def signed_in_code(h: Harness, client: Any) -> AuthDBAuthorizationCode:
    """Run the whole authorization; return the code the provider loads for it."""
    code = await sign_in(h, client)
    loaded = await h.provider.load_authorization_code(client, code)
    assert loaded is not None
    return loaded


def test_code_single_use(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with harness(db, upstream) as h:
            client = await register(h)
            loaded = await signed_in_code(h, client)
            tokens = await h.provider.exchange_authorization_code(client, loaded)
            with pytest.raises(TokenError) as info:
                await h.provider.exchange_authorization_code(client, loaded)
            after = await h.provider.load_authorization_code(client, loaded.code)
            valid = await h.provider.load_access_token(tokens.access_token)
            return tokens, (info.value, after, valid)

    tokens, (error, after, valid) = run(scenario)

    assert tokens.access_token.startswith(TokenKind.ACCESS.prefix)
    assert tokens.refresh_token is not None
    assert tokens.expires_in == 3600
    assert tokens.scope == "content:read"
    assert error.error == "invalid_grant"
    assert after is None
    # The second use revoked the tokens of the first (RFC 6749 section 10.5).
    assert valid is None
    assert count(db, "user_sessions") == 1
    assert count(db, "oauth_grants") == 1
    # The used code stays, marked, until it expires and cleanup deletes it.
    assert count(db, "oauth_codes") == 1


def test_reused_code_revokes_family(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> dict[str, Any]:
        async with harness(db, upstream) as h:
            client = await register(h)
            loaded = await signed_in_code(h, client)
            tokens = await h.provider.exchange_authorization_code(client, loaded)
            assert tokens.refresh_token is not None
            reloaded = await h.provider.load_authorization_code(client, loaded.code)
            return {
                "reloaded": reloaded,
                "access": await h.provider.load_access_token(tokens.access_token),
                "refresh": await h.provider.load_refresh_token(
                    client, tokens.refresh_token
                ),
            }

    result = run(scenario)

    assert result["reloaded"] is None
    assert result["access"] is None
    assert result["refresh"] is None
    with db.connect() as conn:
        rows = conn.execute("SELECT revoked_at FROM user_sessions").fetchall()
    assert len(rows) == 1
    assert rows[0][0] is not None


def test_concurrent_code_exchange(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> list[Any]:
        async with harness(db, upstream) as h:
            client = await register(h)
            loaded = await signed_in_code(h, client)
            return await asyncio.gather(
                *(
                    h.provider.exchange_authorization_code(client, loaded)
                    for _ in range(4)
                ),
                return_exceptions=True,
            )

    outcomes = run(scenario)

    errors = [outcome for outcome in outcomes if isinstance(outcome, TokenError)]
    assert len(errors) == 3
    assert all(error.error == "invalid_grant" for error in errors)
    assert count(db, "user_sessions") == 1
    assert count(db, "oauth_grants") == 1


def test_expired_code_not_exchanged(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> tuple[Any, TokenError]:
        async with harness(db, upstream) as h:
            client = await register(h)
            code = await sign_in(h, client)
            with db.connect() as conn:
                conn.execute(
                    "UPDATE oauth_codes SET expires_at = now() - interval '1 s'"
                )
            loaded = await h.provider.load_authorization_code(client, code)
            assert loaded is not None
            with pytest.raises(TokenError) as info:
                await h.provider.exchange_authorization_code(client, loaded)
            return loaded, info.value

    loaded, error = run(scenario)

    assert loaded.expires_at < datetime.now(UTC).timestamp()
    assert error.error == "invalid_grant"
    assert count(db, "user_sessions") == 0


def test_code_bound_to_client(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> Any:
        async with harness(db, upstream) as h:
            client_a = await register(h, "client-a")
            client_b = await register(h, "client-b")
            code = await sign_in(h, client_a)
            return await h.provider.load_authorization_code(client_b, code)

    assert run(scenario) is None


def test_code_for_other_resource(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> TokenError:
        async with harness(db, upstream) as h:
            client = await register(h)
            loaded = await signed_in_code(h, client)
            loaded.resource = "https://other.example/mcp"
            with pytest.raises(TokenError) as info:
                await h.provider.exchange_authorization_code(client, loaded)
            return info.value

    assert run(scenario).error == "invalid_target"
    assert count(db, "user_sessions") == 0


# Access and refresh tokens


async def signed_in_tokens(h: Harness, client: Any) -> Any:
    loaded = await signed_in_code(h, client)
    tokens = await h.provider.exchange_authorization_code(client, loaded)
    assert tokens.refresh_token is not None
    return tokens


def test_access_token_facts(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> Any:
        async with harness(db, upstream) as h:
            client = await register(h)
            tokens = await signed_in_tokens(h, client)
            return await h.provider.load_access_token(tokens.access_token)

    token = run(scenario)

    assert token is not None
    assert token.client_id == "client-a"
    assert token.resource == RESOURCE
    assert token.user_id == "alice"
    assert token.subject == "alice"
    assert token.subscription_level == "plus"
    assert token.scopes == ["content:read"]
    assert isinstance(token.family_id, uuid.UUID)
    assert token.expires_at is not None
    assert 3500 < token.expires_at - datetime.now(UTC).timestamp() <= 3600


def test_access_token_without_grant(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with harness(db, upstream) as h:
            issued = await h.sessions.create("dave", scopes=["content:read"])
            return (
                await h.provider.load_access_token(issued.access_token),
                await h.provider.load_access_token("mcpat_" + "x" * 43),
            )

    assert run(scenario) == (None, None)


def test_grant_facts_cached(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with harness(db, upstream) as h:
            client = await register(h)
            tokens = await signed_in_tokens(h, client)
            first = await h.provider.load_access_token(tokens.access_token)
            with db.connect() as conn:
                conn.execute("DELETE FROM oauth_grants")
            cached = await h.provider.load_access_token(tokens.access_token)
            fresh = AuthDBProvider(
                store=h.store,
                sessions=h.sessions,
                upstream=h.provider.upstream,
                documents=h.provider.documents,
                settings=h.provider.settings,
            )
            return (first, cached), await fresh.load_access_token(tokens.access_token)

    (first, cached), uncached = run(scenario)

    assert first is not None
    assert cached is not None
    assert cached.client_id == first.client_id
    assert uncached is None


def test_refresh_rotation_and_replay(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> dict[str, Any]:
        async with harness(db, upstream) as h:
            client = await register(h)
            tokens = await signed_in_tokens(h, client)
            old = await h.provider.load_refresh_token(client, tokens.refresh_token)
            assert old is not None
            rotated = await h.provider.exchange_refresh_token(
                client, old, ["content:read"]
            )
            new_access = await h.provider.load_access_token(rotated.access_token)
            replayed = await h.provider.load_refresh_token(client, tokens.refresh_token)
            assert replayed is not None
            with pytest.raises(TokenError) as info:
                await h.provider.exchange_refresh_token(client, replayed, [])
            return {
                "old": old,
                "rotated": rotated,
                "new_access": new_access,
                "error": info.value,
                "after_replay": await h.provider.load_access_token(
                    rotated.access_token
                ),
                "new_refresh": await h.provider.load_refresh_token(
                    client, rotated.refresh_token or ""
                ),
            }

    result = run(scenario)

    assert result["old"].client_id == "client-a"
    assert result["old"].resource == RESOURCE
    assert result["old"].scopes == ["content:read"]
    assert result["rotated"].refresh_token != result["old"].token
    assert result["new_access"].family_id == result["old"].family_id
    assert result["error"].error == "invalid_grant"
    assert "already exchanged" in (result["error"].error_description or "")
    assert result["after_replay"] is None
    assert result["new_refresh"] is None


def test_refresh_token_for_other_resource(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    # Two servers with different public URLs share one database.
    other = "http://127.0.0.1:9/other/mcp"

    async def scenario() -> dict[str, Any]:
        async with harness(db, upstream) as h:
            client = await register(h)
            tokens = await signed_in_tokens(h, client)
            here = await h.provider.load_refresh_token(client, tokens.refresh_token)
        before = query_sessions(db)
        async with harness(db, upstream, resource=other) as elsewhere:
            loaded = await elsewhere.provider.load_refresh_token(
                client, tokens.refresh_token
            )
            assert here is not None
            with pytest.raises(TokenError) as info:
                await elsewhere.provider.exchange_refresh_token(client, here, [])
        async with harness(db, upstream, resource=RESOURCE + "/") as slashed:
            same = await slashed.provider.load_refresh_token(
                client, tokens.refresh_token
            )
        return {"loaded": loaded, "error": info.value, "same": same, "before": before}

    result = run(scenario)

    assert result["loaded"] is None
    assert result["error"].error == "invalid_grant"
    assert other in (result["error"].error_description or "")
    assert result["same"] is not None
    after = query_sessions(db)
    assert after == result["before"]
    assert len(after) == 1
    assert after[0][1] is None  # not revoked


def test_access_token_for_other_resource(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    # Two servers with different public URLs share one database.
    other = "http://127.0.0.1:9/other/mcp"

    async def scenario() -> dict[str, Any]:
        async with harness(db, upstream) as h:
            client = await register(h)
            tokens = await signed_in_tokens(h, client)
            here = await h.provider.load_access_token(tokens.access_token)
        async with harness(db, upstream, resource=other) as elsewhere:
            there = await elsewhere.provider.load_access_token(tokens.access_token)
        async with harness(db, upstream, resource=RESOURCE + "/") as slashed:
            same = await slashed.provider.load_access_token(tokens.access_token)
        return {"here": here, "there": there, "same": same}

    result = run(scenario)

    assert result["here"] is not None
    assert result["here"].resource == RESOURCE
    assert result["there"] is None
    assert result["same"] is not None


def query_sessions(db: ScratchDatabase) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            "SELECT refresh_token_hash, revoked_at FROM user_sessions ORDER BY id"
        ).fetchall()


def test_refresh_keeps_scopes(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> Any:
        async with harness(db, upstream) as h:
            client = await register(h)
            code = await sign_in(h, client, scopes=list(SCOPES))
            loaded = await h.provider.load_authorization_code(client, code)
            assert loaded is not None
            tokens = await h.provider.exchange_authorization_code(client, loaded)
            assert tokens.refresh_token is not None
            refresh = await h.provider.load_refresh_token(client, tokens.refresh_token)
            assert refresh is not None
            return await h.provider.exchange_refresh_token(
                client, refresh, ["content:read"]
            )

    assert run(scenario).scope == " ".join(SCOPES)


def test_refresh_token_bound_to_client(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        async with harness(db, upstream) as h:
            client_a = await register(h, "client-a")
            client_b = await register(h, "client-b")
            tokens = await signed_in_tokens(h, client_a)
            return (
                await h.provider.load_refresh_token(client_b, tokens.refresh_token),
                await h.provider.load_refresh_token(client_a, tokens.refresh_token),
                await h.provider.load_refresh_token(client_a, "garbage"),
            )

    for_b, for_a, garbage = run(scenario)

    assert for_b is None
    assert for_a is not None
    assert garbage is None


def test_revoke_token(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with harness(db, upstream) as h:
            client = await register(h)
            tokens = await signed_in_tokens(h, client)
            refresh = await h.provider.load_refresh_token(client, tokens.refresh_token)
            assert refresh is not None
            await h.provider.revoke_token(refresh)
            return (
                await h.provider.load_access_token(tokens.access_token),
                await h.provider.load_refresh_token(client, tokens.refresh_token),
            )

    assert run(scenario) == (None, None)


# Through the SDK's HTTP handlers


@contextlib.asynccontextmanager
async def serve(h: Harness) -> AsyncIterator[str]:
    routes = create_auth_routes(
        h.provider,
        AnyHttpUrl(ISSUER),
        client_registration_options=ClientRegistrationOptions(
            enabled=True, valid_scopes=list(SCOPES), default_scopes=list(SCOPES)
        ),
        revocation_options=RevocationOptions(enabled=True),
    )
    routes.append(Route("/oauth/callback", h.provider.handle_callback))
    routes.append(Route(CONSENT_PATH, h.provider.consent_page, methods=["GET"]))
    routes.append(Route(CONSENT_PATH, h.provider.handle_consent, methods=["POST"]))
    async with serving(Starlette(routes=routes), lifespan="off") as base_url:
        yield base_url


def test_sign_in_over_http(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    redirect = "http://127.0.0.1:3000/callback"
    requested = "http://127.0.0.1:40404/callback"

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with (
            harness(db, upstream) as h,
            serve(h) as base,
            httpx2.AsyncClient(base_url=base, trust_env=False) as http,
        ):
            registered = await http.post(
                "/register",
                json={
                    "redirect_uris": [redirect],
                    "token_endpoint_auth_method": "none",
                },
            )
            assert registered.status_code == 201, registered.text
            client_id = registered.json()["client_id"]

            authorized = await http.get(
                "/authorize",
                params={
                    "client_id": client_id,
                    "redirect_uri": requested,
                    "response_type": "code",
                    "code_challenge": CHALLENGE,
                    "state": "xyz",
                    "resource": RESOURCE,
                },
            )
            assert authorized.status_code == 302, authorized.text
            # The consent URL names the issuer, which is served at base here.
            consent_url = authorized.headers["location"].replace(ISSUER, base)
            approved = await answer_consent_async(http, consent_url)
            assert approved.status_code == 303, approved.text
            query = await asyncio.to_thread(
                upstream.authorize, approved.headers["location"]
            )
            callback = await http.get("/oauth/callback", params=query)
            seen["callback"] = callback.headers["location"]
            code = dict(parse_qsl(urlsplit(callback.headers["location"]).query))["code"]

            form = {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": requested,
                "client_id": client_id,
                "code_verifier": VERIFIER,
            }
            seen["token"] = await http.post("/token", data=form)
            tokens = seen["token"].json()

            refresh_form = {
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": client_id,
            }
            seen["refresh"] = await http.post("/token", data=refresh_form)
            seen["replay"] = await http.post("/token", data=refresh_form)

            new_refresh = seen["refresh"].json()["refresh_token"]
            # The SDK's RevocationRequest (mcp 2.3) requires the client_secret
            # field even for a public client, so it is sent empty.
            seen["revoke"] = await http.post(
                "/revoke",
                data={
                    "token": new_refresh,
                    "client_id": client_id,
                    "client_secret": "",
                },
            )
            seen["access"] = await h.provider.load_access_token(
                seen["refresh"].json()["access_token"]
            )
            # Last, because a second use of the code revokes its family.
            seen["again"] = await http.post("/token", data=form)
        return seen

    seen = run(scenario)

    assert seen["callback"].startswith(requested + "?")
    assert seen["token"].status_code == 200
    assert seen["token"].json()["token_type"] == "Bearer"
    assert seen["again"].status_code == 400
    assert seen["again"].json()["error"] == "invalid_grant"
    assert seen["refresh"].status_code == 200
    assert seen["replay"].status_code == 400
    assert seen["replay"].json()["error"] == "invalid_grant"
    assert seen["revoke"].status_code == 200
    assert seen["access"] is None
    assert count(db, "user_sessions") == 2
    with db.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM user_sessions WHERE revoked_at IS NULL"
        ).fetchone()
    assert row == (0,)


def test_no_secret_in_logs(
    db: ScratchDatabase, upstream: UpstreamServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")

    async def scenario() -> list[str]:
        async with harness(db, upstream) as h:
            client = await register(h)
            query = await upstream_callback(h, client)
            response = await h.provider.handle_callback(callback_request(query))
            _, result = redirect_query(response)
            loaded = await h.provider.load_authorization_code(client, result["code"])
            assert loaded is not None
            tokens = await h.provider.exchange_authorization_code(client, loaded)
            assert tokens.refresh_token is not None
            refresh = await h.provider.load_refresh_token(client, tokens.refresh_token)
            assert refresh is not None
            await h.provider.exchange_refresh_token(client, refresh, [])
            return [
                query["state"],
                query["code"],
                result["code"],
                tokens.access_token,
                tokens.refresh_token,
            ]

    secrets_seen = run(scenario)

    # Only this project's loggers: the test's own HTTP client logs the URLs
    # it opens, the upstream's authorize URL with its state among them.
    ours = "\n".join(
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("mcp_authdb")
    )
    assert "signed in for client client-a" in ours
    for value in secrets_seen:
        assert value not in ours


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="scopes is empty"):
        ProviderSettings(issuer=ISSUER, resource=RESOURCE, scopes=())
    with pytest.raises(ValueError, match="code_lifetime"):
        ProviderSettings(
            issuer=ISSUER,
            resource=RESOURCE,
            scopes=DEFAULT_SCOPES,
            code_lifetime=timedelta(0),
        )


# Consent and the browser binding

ATTACKER_REDIRECT = "https://attacker.invalid/cb"


async def register_attacker(h: Harness) -> AuthDBClientInformation:
    info = OAuthClientInformationFull(
        client_id="attacker",
        client_name="Trusted <b>Helper</b> <script>alert(1)</script>",
        redirect_uris=[AnyUrl(ATTACKER_REDIRECT)],
        token_endpoint_auth_method="none",
        scope=" ".join(SCOPES),
    )
    await h.provider.register_client(info)
    client = await h.provider.get_client("attacker")
    assert client is not None
    return client


def pending_rows(db: ScratchDatabase) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            "SELECT state_hash, consented_at IS NOT NULL, binding_hash "
            "FROM oauth_pending_authorizations ORDER BY created_at"
        ).fetchall()


def test_consent_page_escapes_client(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> tuple[Response, dict[str, str]]:
        async with harness(db, upstream) as h:
            client = await register_attacker(h)
            url = await h.provider.authorize(
                client, params(redirect_uri=ATTACKER_REDIRECT, scopes=list(SCOPES))
            )
            return await open_consent(h, url)

    page, fields = run(scenario)

    body = bytes(page.body).decode()
    assert "<script>" not in body
    assert "<b>Helper</b>" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert '<p class="host">attacker.invalid</p>' in body
    assert "<code>attacker</code>" in body
    assert "<code>content:search</code>" in body
    assert fields["request"].startswith(TokenKind.STATE.prefix)
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    csrf = set_cookies(page)[CSRF_COOKIE]
    assert csrf["httponly"] is True
    assert csrf["samesite"] == "strict"
    assert csrf["path"] == CONSENT_PATH
    assert csrf["secure"] == ""


def test_consent_approve_binds_browser(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> tuple[str, Response]:
        async with harness(db, upstream) as h:
            client = await register(h)
            url = await h.provider.authorize(client, params())
            return url, await answer(h, url)

    url, response = run(scenario)

    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith(upstream.base_url + "/oauth/authorize?")
    query = dict(parse_qsl(urlsplit(location).query))
    request_id = dict(parse_qsl(urlsplit(url).query))["request"]
    assert query["state"].startswith(TokenKind.STATE.prefix)
    assert query["state"] != request_id
    assert query["code_challenge_method"] == "S256"
    assert query["client_id"] == upstream.client_id
    binding = set_cookies(response)[BINDING_COOKIE]
    assert binding["httponly"] is True
    assert binding["samesite"] == "lax"
    assert binding["path"] == "/oauth"
    assert binding["max-age"] == "600"
    assert binding["secure"] == ""
    assert set_cookies(response)[CSRF_COOKIE]["max-age"] == "0"
    rows = pending_rows(db)
    assert rows == [(HASHER.hash(query["state"]), True, HASHER.hash(binding.value))]


def test_consent_cookies_secure_on_https(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    # Over https both cookies carry the __Host- prefix, which browsers accept
    # only with Secure, Path=/ and no Domain, so no other host can plant one.
    issuer = "https://mcp.example.com"
    csrf_cookie = "__Host-" + CSRF_COOKIE
    binding_cookie = "__Host-" + BINDING_COOKIE

    async def scenario() -> tuple[Response, Response, Response]:
        async with harness(db, upstream, issuer=issuer) as h:
            client = await register(h)
            url = await h.provider.authorize(client, params())
            query = dict(parse_qsl(urlsplit(url).query))
            page = await h.provider.consent_page(get_request(CONSENT_PATH, query))
            _, fields = consent_form(url, bytes(page.body).decode())
            form = {**fields, "decision": "approve"}
            # The unprefixed name, as a sibling host could set it, is ignored.
            unprefixed = await h.provider.handle_consent(
                form_request(form, {CSRF_COOKIE: fields["csrf_token"]})
            )
            approved = await h.provider.handle_consent(
                form_request(form, {csrf_cookie: fields["csrf_token"]})
            )
            return page, unprefixed, approved

    page, unprefixed, approved = run(scenario)

    assert unprefixed.status_code == 400
    assert approved.status_code == 303
    for response, name in ((page, csrf_cookie), (approved, binding_cookie)):
        cookie = set_cookies(response)[name]
        assert cookie["secure"] is True
        assert cookie["path"] == "/"
        assert not cookie["domain"]


def test_consent_deny(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> Response:
        async with harness(db, upstream) as h:
            client = await register(h)
            url = await h.provider.authorize(client, params(state="client-state-7"))
            return await answer(h, url, "deny")

    response = run(scenario)

    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith("http://127.0.0.1:45678/callback?")
    query = dict(parse_qsl(urlsplit(location).query))
    assert query["error"] == "access_denied"
    assert query["state"] == "client-state-7"
    assert query["iss"] == ISSUER
    assert "code" not in query
    assert BINDING_COOKIE not in set_cookies(response)
    assert count(db, "oauth_pending_authorizations") == 0
    assert upstream.calls["authorize"] == 0


@pytest.mark.parametrize(
    "cookies",
    [{}, {CSRF_COOKIE: "another-token"}],
    ids=["missing-cookie", "other-cookie"],
)
def test_consent_csrf_mismatch(
    db: ScratchDatabase, upstream: UpstreamServer, cookies: dict[str, str]
) -> None:
    async def scenario() -> list[Response]:
        async with harness(db, upstream) as h:
            client = await register(h)
            url = await h.provider.authorize(client, params())
            _, fields = await open_consent(h, url)
            return [
                await h.provider.handle_consent(
                    form_request({**fields, "decision": decision}, cookies)
                )
                for decision in ("approve", "deny")
            ]

    responses = run(scenario)

    assert [response.status_code for response in responses] == [400, 400]
    assert all(BINDING_COOKIE not in set_cookies(r) for r in responses)
    assert [row[1:] for row in pending_rows(db)] == [(False, None)]


@pytest.mark.parametrize(
    ("headers", "accepted"),
    [
        ({"Origin": "https://evil.example"}, False),
        ({"Sec-Fetch-Site": "cross-site"}, False),
        ({"Sec-Fetch-Site": "same-site"}, False),
        ({"Origin": "null"}, False),
        ({"Origin": ISSUER, "Sec-Fetch-Site": "same-origin"}, True),
        ({"Origin": ISSUER}, True),
    ],
)
def test_consent_post_from_another_site(
    db: ScratchDatabase,
    upstream: UpstreamServer,
    headers: dict[str, str],
    accepted: bool,
) -> None:
    # The CSRF cookie may have been planted in the victim's browser; the
    # browser's own origin headers still give a cross-site form away.
    async def scenario() -> Response:
        async with harness(db, upstream) as h:
            client = await register(h)
            url = await h.provider.authorize(client, params())
            _, fields = await open_consent(h, url)
            return await h.provider.handle_consent(
                form_request(
                    {**fields, "decision": "approve"},
                    {CSRF_COOKIE: fields["csrf_token"]},
                    headers,
                )
            )

    response = run(scenario)

    assert response.status_code == (303 if accepted else 400)
    assert (BINDING_COOKIE in set_cookies(response)) is accepted


def test_consent_token_of_another_request(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> Response:
        async with harness(db, upstream) as h:
            client = await register(h)
            _, first = await open_consent(
                h, await h.provider.authorize(client, params())
            )
            _, other = await open_consent(
                h, await h.provider.authorize(client, params())
            )
            # The token and cookie of the first page, sent for the other request.
            return await h.provider.handle_consent(
                form_request(
                    {**other, "csrf_token": first["csrf_token"], "decision": "approve"},
                    {CSRF_COOKIE: first["csrf_token"]},
                )
            )

    response = run(scenario)

    assert response.status_code == 400
    assert BINDING_COOKIE not in set_cookies(response)
    assert [row[1:] for row in pending_rows(db)] == [(False, None), (False, None)]


def test_consent_form_without_token(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> Response:
        async with harness(db, upstream) as h:
            client = await register(h)
            url = await h.provider.authorize(client, params())
            _, fields = await open_consent(h, url)
            csrf = fields.pop("csrf_token")
            return await h.provider.handle_consent(
                form_request({**fields, "decision": "approve"}, {CSRF_COOKIE: csrf})
            )

    response = run(scenario)

    assert response.status_code == 400
    assert [row[1:] for row in pending_rows(db)] == [(False, None)]


def test_consent_unknown_decision(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    async def scenario() -> Response:
        async with harness(db, upstream) as h:
            client = await register(h)
            url = await h.provider.authorize(client, params())
            return await answer(h, url, "maybe")

    response = run(scenario)

    assert response.status_code == 400
    assert [row[1:] for row in pending_rows(db)] == [(False, None)]


def test_consent_expired_request(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> list[Response]:
        async with harness(db, upstream) as h:
            client = await register(h)
            url = await h.provider.authorize(client, params())
            _, fields = await open_consent(h, url)
            with db.connect() as conn:
                conn.execute(
                    "UPDATE oauth_pending_authorizations "
                    "SET expires_at = now() - interval '1 second'"
                )
            query = dict(parse_qsl(urlsplit(url).query))
            cookies = {CSRF_COOKIE: fields["csrf_token"]}
            return [
                await h.provider.consent_page(get_request(CONSENT_PATH, query)),
                await h.provider.handle_consent(
                    form_request({**fields, "decision": "approve"}, cookies)
                ),
                await h.provider.handle_consent(
                    form_request({**fields, "decision": "deny"}, cookies)
                ),
            ]

    responses = run(scenario)

    assert [response.status_code for response in responses] == [400] * 3
    assert b"has expired or was already answered" in responses[0].body
    assert responses[0].headers["x-frame-options"] == "DENY"
    assert [row[1:] for row in pending_rows(db)] == [(False, None)]
    assert upstream.calls["authorize"] == 0


def test_consent_answered_once(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    async def scenario() -> list[Response]:
        async with harness(db, upstream) as h:
            client = await register(h)
            url = await h.provider.authorize(client, params())
            _, fields = await open_consent(h, url)
            cookies = {CSRF_COOKIE: fields["csrf_token"]}
            query = dict(parse_qsl(urlsplit(url).query))
            return [
                await h.provider.handle_consent(
                    form_request({**fields, "decision": decision}, cookies)
                )
                for decision in ("approve", "approve", "deny")
            ] + [await h.provider.consent_page(get_request(CONSENT_PATH, query))]

    responses = run(scenario)

    assert [response.status_code for response in responses] == [303, 400, 400, 400]
    assert [row[1] for row in pending_rows(db)] == [True]


@pytest.mark.parametrize("cookie", [None, "wrong"], ids=["missing", "wrong"])
def test_callback_needs_binding_cookie(
    db: ScratchDatabase,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
    cookie: str | None,
) -> None:
    async def scenario() -> tuple[dict[str, str], Response, Response]:
        async with harness(db, upstream) as h:
            client = await register(h)
            query = await upstream_callback(h, client)
            value = new_token(TokenKind.STATE) if cookie == "wrong" else None
            rejected = await h.provider.handle_callback(callback_request(query, value))
            assert count(db, "oauth_pending_authorizations") == 1
            assert upstream.calls["token"] == 0
            accepted = await h.provider.handle_callback(callback_request(query))
            return query, rejected, accepted

    caplog.set_level("INFO")
    query, rejected, accepted = run(scenario)

    assert rejected.status_code == 400
    assert b"approved in another browser" in rejected.body
    assert set_cookies(rejected) == {}
    assert accepted.status_code == 302
    assert set_cookies(accepted)[BINDING_COOKIE]["max-age"] == "0"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("client-a" in r.getMessage() for r in warnings)
    logged = "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("mcp_authdb")
    )
    assert query["state"] not in logged
    assert query["code"] not in logged
    assert BINDINGS[query["state"]] not in logged


def test_confused_deputy_link_rejected(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    """The attacker approves its own request and sends the upstream link on."""

    async def scenario() -> Response:
        async with harness(db, upstream) as h:
            attacker = await register_attacker(h)
            url = await h.provider.authorize(
                attacker, params(redirect_uri=ATTACKER_REDIRECT)
            )
            approved = await answer(h, url)
            link = approved.headers["location"]
            # The victim's browser: signed in upstream, without the attacker's
            # binding cookie.
            query = await asyncio.to_thread(upstream.authorize, link)
            return await h.provider.handle_callback(callback_request(query, None))

    response = run(scenario)

    assert response.status_code == 400
    assert "location" not in response.headers
    assert count(db, "oauth_codes") == 0
    assert upstream.calls["token"] == 0


def test_confused_deputy_consent_denied(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    """The attacker sends the consent link; the victim sees the host and denies."""

    async def scenario() -> tuple[Response, Response]:
        async with harness(db, upstream) as h:
            attacker = await register_attacker(h)
            url = await h.provider.authorize(
                attacker, params(redirect_uri=ATTACKER_REDIRECT)
            )
            page, _ = await open_consent(h, url)
            return page, await answer(h, url, "deny")

    page, denied = run(scenario)

    assert b'<p class="host">attacker.invalid</p>' in page.body
    location = denied.headers["location"]
    assert location.startswith(ATTACKER_REDIRECT + "?error=access_denied")
    assert "code=" not in location
    assert count(db, "oauth_codes") == 0
    assert upstream.calls["authorize"] == 0


@pytest.mark.parametrize(
    ("redirect_uri", "shown"),
    [
        ("https://client.example/cb", "client.example"),
        ("https://client.example:8443/cb", "client.example:8443"),
        ("http://127.0.0.1:5000/callback", "127.0.0.1:5000"),
        ("http://[::1]:5000/callback", "[::1]:5000"),
        ("com.example.app:/callback", "com.example.app:"),
        # The app registered for the scheme gets the code, not the named host.
        ("web+evil://claude.ai/callback", "web+evil:"),
        ("com.evil.app://trusted.example.com/cb", "com.evil.app:"),
    ],
)
def test_consent_names_what_receives_the_code(redirect_uri: str, shown: str) -> None:
    assert consent_module.redirect_target(redirect_uri) == shown
