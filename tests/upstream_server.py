"""An OAuth 2.0 server that replaces Drupal Simple OAuth 5 in tests.

It is built with Authlib's RFC 6749 grants and RFC 7636 PKCE, and served on
127.0.0.1 by uvicorn in a background thread, so tests talk to it over real
HTTP. Like Simple OAuth 5 with the Drupal JSON-RPC module, it has:

- ``GET /oauth/authorize``: the authorization code grant. It approves the
  signed-in test user at once (no login page) and redirects to the
  registered redirect URI with ``code`` and ``state``. PKCE with S256 is
  required.
- ``POST /oauth/token``: ``authorization_code`` and ``refresh_token``. The
  client is confidential and authenticates with ``client_secret_post`` (or
  public with ``none`` when built with ``client_secret=None``). Every refresh
  returns a new refresh token, and the old refresh and access tokens stop
  working, as in the RefreshTokenGrant of league/oauth2-server, the library
  under Simple OAuth.
- ``GET /oauth/userinfo``: ``sub`` and ``subscription_level`` of the token's
  user.
- ``POST /jsonrpc``: JSON-RPC 2.0 with the method ``content.search``, which
  requires a valid bearer token with the scope ``content:search``.

Use :func:`upstream_server`::

    with upstream_server(users={"alice": "plus"}, access_lifetime=2) as upstream:
        client = UpstreamClient(upstream.config())
        params = upstream.authorize(client.authorization_url(...))
        ...
        assert upstream.calls["refresh"] == 1

``calls`` counts requests by endpoint: ``authorize``, ``token`` (every token
endpoint request), ``code`` and ``refresh`` (token requests by grant type),
``userinfo`` and ``jsonrpc``. :meth:`UpstreamServer.inject` makes the next
request to an endpoint fail, stall or send a large body.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx2
import uvicorn
from authlib.oauth2.rfc6749 import (  # type: ignore[import-untyped]
    AuthorizationCodeGrant,
    AuthorizationCodeMixin,
    AuthorizationServer,
    ClientMixin,
    InvalidRequestError,
    OAuth2Error,
    OAuth2Payload,
    OAuth2Request,
    RefreshTokenGrant,
    TokenMixin,
    scope_to_list,
)
from authlib.oauth2.rfc6750 import BearerTokenGenerator  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import CodeChallenge  # type: ignore[import-untyped]
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mcp_authdb.server.upstream import DEFAULT_SCOPES, UpstreamConfig

CLIENT_ID = "mcp-authdb-test"
DEFAULT_REDIRECT_URI = "http://127.0.0.1/oauth/callback"
DEFAULT_ACCESS_LIFETIME_S = 300
DEFAULT_REFRESH_LIFETIME_S = 14 * 24 * 3600
CODE_LIFETIME_S = 60
ENDPOINTS = ("authorize", "token", "userinfo", "jsonrpc")
# The corpus that content.search looks through.
ARTICLES = (
    ("node/1", "Getting started with Drupal"),
    ("node/2", "OAuth 2.0 for Drupal sites"),
    ("node/3", "Writing a search page"),
    ("node/4", "Subscription levels explained"),
    ("node/5", "Caching search results"),
)


@dataclasses.dataclass
class Injection:
    """What the next request to one endpoint gets instead of its normal response.

    The handler waits ``delay_s`` seconds first. With ``status`` None it then
    responds normally. Otherwise it sends ``status`` with ``body``, and a dict
    body is sent as JSON. With ``chunked`` the body goes in chunks without a
    Content-Length.
    """

    status: int | None = None
    body: bytes | dict[str, Any] = b""
    delay_s: float = 0.0
    chunked: bool = False
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Code(AuthorizationCodeMixin):  # type: ignore[misc]
    code: str
    user_id: str
    scope: str
    redirect_uri: str
    code_challenge: str | None
    code_challenge_method: str | None
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclasses.dataclass
class _Token(TokenMixin):  # type: ignore[misc]
    access_token: str
    refresh_token: str | None
    user_id: str
    scope: str
    access_expires_at: float
    refresh_expires_at: float
    revoked: bool = False

    def check_client(self, client: Any) -> bool:
        return True

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return max(0, int(self.access_expires_at - time.time()))

    def is_expired(self) -> bool:
        return time.time() >= self.access_expires_at

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> str:
        return self.user_id


class _Client(ClientMixin):  # type: ignore[misc]
    """The one client of the server: this project's MCP server."""

    def __init__(self, upstream: UpstreamServer) -> None:
        self._upstream = upstream

    def get_client_id(self) -> str:
        return self._upstream.client_id

    def get_default_redirect_uri(self) -> str:
        return self._upstream.redirect_uri

    def get_allowed_scope(self, scope: str | None) -> str | None:
        requested = scope_to_list(scope) or list(self._upstream.scopes)
        if not set(requested) <= set(self._upstream.scopes):
            return None
        return " ".join(requested)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri == self._upstream.redirect_uri

    def check_client_secret(self, client_secret: str) -> bool:
        expected = self._upstream.client_secret
        return expected is not None and secrets.compare_digest(
            client_secret.encode(), expected.encode()
        )

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self._upstream.client_secret is None:
            return method == "none"
        return method == "client_secret_post"

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


class _Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._data = dict(pairs)
        self._datalist: dict[str, list[str]] = collections.defaultdict(list)
        for key, value in pairs:
            self._datalist[key].append(value)

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> dict[str, list[str]]:
        return self._datalist


class _Request(OAuth2Request):  # type: ignore[misc]
    """An Authlib request built from a Starlette request whose form was read."""

    def __init__(self, request: Request, form: list[tuple[str, str]]) -> None:
        super().__init__(request.method, str(request.url), headers=request.headers)
        query = list(request.query_params.multi_items())
        self._args = dict(query)
        self._form = dict(form)
        self.payload = _Payload(query + form)

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class _CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_post", "none"]  # noqa: RUF012

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        data = self.request.payload.data
        if data.get("code_challenge_method") != "S256" or not data.get(
            "code_challenge"
        ):
            raise InvalidRequestError(
                "PKCE is required: send code_challenge with code_challenge_method S256",
                redirect_uri=redirect_uri,
            )
        return redirect_uri

    def save_authorization_code(self, code: str, request: Any) -> None:
        upstream: UpstreamServer = self.server.upstream
        data = request.payload.data
        upstream._codes[code] = _Code(
            code=code,
            user_id=request.user,
            scope=request.scope,
            redirect_uri=request.payload.redirect_uri or upstream.redirect_uri,
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
            expires_at=time.time() + CODE_LIFETIME_S,
        )

    def query_authorization_code(self, code: str, client: Any) -> _Code | None:
        found: _Code | None = self.server.upstream._codes.get(code)
        if found is None or time.time() >= found.expires_at:
            return None
        return found

    def delete_authorization_code(self, authorization_code: _Code) -> None:
        self.server.upstream._codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: _Code) -> str:
        return authorization_code.user_id


class _RefreshGrant(RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_post", "none"]  # noqa: RUF012
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> _Token | None:
        found: _Token | None = self.server.upstream._by_refresh.get(refresh_token)
        if found is None or found.revoked or time.time() >= found.refresh_expires_at:
            return None
        return found

    def authenticate_user(self, refresh_token: _Token) -> str:
        return refresh_token.user_id

    def revoke_old_credential(self, refresh_token: _Token) -> None:
        refresh_token.revoked = True


class _AuthorizationServer(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, upstream: UpstreamServer) -> None:
        super().__init__(scopes_supported=list(upstream.scopes))
        self.upstream = upstream
        self._client = _Client(upstream)
        self.register_grant(_CodeGrant, [CodeChallenge(required=True)])
        self.register_grant(_RefreshGrant)
        self.register_token_generator(
            "default",
            BearerTokenGenerator(
                access_token_generator=lambda **_: secrets.token_urlsafe(32),
                refresh_token_generator=lambda **_: secrets.token_urlsafe(32),
                expires_generator=lambda client, grant_type: upstream.access_lifetime,
            ),
        )

    def query_client(self, client_id: str) -> _Client | None:
        return self._client if client_id == self.upstream.client_id else None

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        now = time.time()
        record = _Token(
            access_token=token["access_token"],
            refresh_token=token.get("refresh_token"),
            user_id=request.user,
            scope=token.get("scope", ""),
            access_expires_at=now + self.upstream.access_lifetime,
            refresh_expires_at=now + self.upstream.refresh_lifetime,
        )
        self.upstream._by_access[record.access_token] = record
        if record.refresh_token is not None:
            self.upstream._by_refresh[record.refresh_token] = record

    def create_oauth2_request(self, request: Any) -> Any:
        return request

    def handle_response(
        self, status: int, body: Any, headers: list[tuple[str, str]]
    ) -> tuple[int, Any, list[tuple[str, str]]]:
        return status, body, headers

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass


class UpstreamServer:
    """The state of one running stand-in server, shared with the test.

    ``users`` maps user ids to their ``subscription_level`` claim (None: the
    claim is left out). The authorize endpoint approves ``signed_in``, the
    first user unless :meth:`set_user` changed it. ``redirect_uri`` is the one
    registered redirect URI and may be set after start.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str | None],
        access_lifetime: int,
        refresh_lifetime: int,
        client_secret: str | None,
        redirect_uri: str,
        scopes: tuple[str, ...],
    ) -> None:
        if not users:
            raise ValueError("users is empty; give at least one user id")
        if access_lifetime < 1:
            raise ValueError(f"access_lifetime={access_lifetime} must be at least 1")
        self.base_url = ""
        self.client_id = CLIENT_ID
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.scopes = scopes
        self.access_lifetime = access_lifetime
        self.refresh_lifetime = refresh_lifetime
        self.calls: collections.Counter[str] = collections.Counter()
        self._users: dict[str, dict[str, Any]] = {}
        for user_id, level in users.items():
            self.set_user(user_id, level)
        self.signed_in = next(iter(users))
        self._deny_next = False
        self._injections: dict[str, list[Injection]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self._codes: dict[str, _Code] = {}
        self._by_access: dict[str, _Token] = {}
        self._by_refresh: dict[str, _Token] = {}
        self._oauth = _AuthorizationServer(self)

    # Test controls, called from the test's thread.

    def set_user(
        self,
        user_id: str,
        level: str | None = "free",
        *,
        claims: dict[str, Any] | None = None,
    ) -> None:
        """Add or change a user, and approve them at the next authorization.

        The userinfo response of the user is ``{"sub": user_id,
        "subscription_level": level}`` (without the level when it is None),
        or ``claims`` exactly when given.
        """
        if claims is None:
            claims = {"sub": user_id}
            if level is not None:
                claims["subscription_level"] = level
        self._users[user_id] = claims
        self.signed_in = user_id

    def deny_next_authorization(self) -> None:
        """Make the next authorization redirect with ``error=access_denied``."""
        self._deny_next = True

    def inject(self, endpoint: str, injection: Injection) -> None:
        """Queue ``injection`` for the next request to ``endpoint``.

        ``endpoint`` is one of ``authorize``, ``token``, ``userinfo`` and
        ``jsonrpc``. Injections of one endpoint apply in order, one per
        request.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint {endpoint!r} is not one of {ENDPOINTS}")
        with self._lock:
            self._injections[endpoint].append(injection)

    def fail_next_token(
        self, status: int = 400, error: str = "invalid_grant", description: str = ""
    ) -> None:
        """Make the next token request fail with an OAuth error response."""
        body: dict[str, Any] = {"error": error}
        if description:
            body["error_description"] = description
        self.inject("token", Injection(status=status, body=body))

    def revoke_user(self, user_id: str) -> None:
        """Revoke every token of ``user_id``, as an administrator would."""
        for record in list(self._by_access.values()):
            if record.user_id == user_id:
                record.revoked = True

    def is_access_token_active(self, access_token: str) -> bool:
        """Return whether ``access_token`` would be accepted now."""
        return self._access_record(access_token) is not None

    def is_refresh_token_active(self, refresh_token: str) -> bool:
        """Return whether ``refresh_token`` would be accepted now."""
        record = self._by_refresh.get(refresh_token)
        return (
            record is not None
            and not record.revoked
            and time.time() < record.refresh_expires_at
        )

    def config(self, **changes: Any) -> UpstreamConfig:
        """Return an UpstreamConfig for this server, with ``changes`` applied."""
        settings: dict[str, Any] = {
            "authorize_url": self.base_url + "/oauth/authorize",
            "token_url": self.base_url + "/oauth/token",
            "userinfo_url": self.base_url + "/oauth/userinfo",
            "jsonrpc_url": self.base_url + "/jsonrpc",
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uri": self.redirect_uri,
            "scopes": self.scopes,
            "timeout_s": 5.0,
        }
        settings.update(changes)
        return UpstreamConfig(**settings)

    def env(self) -> dict[str, str]:
        """Return the environment variables that point a server at this one."""
        env = {
            "DRUPAL_BASE_URL": self.base_url,
            "OAUTH_CLIENT_ID": self.client_id,
            "OAUTH_REDIRECT_URI": self.redirect_uri,
        }
        if self.client_secret is not None:
            env["OAUTH_CLIENT_SECRET"] = self.client_secret
        return env

    def authorize(self, url: str) -> dict[str, str]:
        """Open the authorization ``url`` as a browser would; return the callback query.

        The authorize endpoint must respond with a redirect to the registered
        redirect URI, which is not followed. The result contains ``code`` and
        ``state``, or ``error`` and ``state``.
        """
        with httpx2.Client(follow_redirects=False, trust_env=False) as client:
            response = client.get(url)
        if response.status_code != 302:
            raise AssertionError(
                f"authorize returned {response.status_code}, not a redirect: "
                f"{response.text[:300]}"
            )
        location = response.headers["Location"]
        if location.split("?")[0] != self.redirect_uri.split("?")[0]:
            raise AssertionError(f"authorize redirected to {location}")
        return dict(parse_qsl(urlsplit(location).query))

    # The endpoints, run in the server's thread.

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/oauth/authorize", self._authorize, methods=["GET"]),
                Route("/oauth/token", self._token, methods=["POST"]),
                Route("/oauth/userinfo", self._userinfo, methods=["GET", "POST"]),
                Route("/jsonrpc", self._jsonrpc, methods=["POST"]),
            ]
        )

    async def _authorize(self, request: Request) -> Response:
        injected = await self._injected("authorize")
        if injected is not None:
            return injected

        oauth_request = _Request(request, [])
        user = None if self._deny_next else self.signed_in
        self._deny_next = False
        try:
            grant = self._oauth.get_consent_grant(oauth_request, end_user=user)
        except OAuth2Error as error:
            return _response(self._oauth.handle_error_response(oauth_request, error))
        return _response(
            self._oauth.create_authorization_response(
                oauth_request, grant_user=user, grant=grant
            )
        )

    async def _token(self, request: Request) -> Response:
        form = await request.form()
        grant_type = form.get("grant_type")
        with self._lock:
            self.calls["token"] += 1
            if grant_type == "authorization_code":
                self.calls["code"] += 1
            elif grant_type == "refresh_token":
                self.calls["refresh"] += 1
        injected = await self._injected("token", counted=True)
        if injected is not None:
            return injected

        pairs = [
            (key, value) for key, value in form.multi_items() if isinstance(value, str)
        ]
        return _response(self._oauth.create_token_response(_Request(request, pairs)))

    async def _userinfo(self, request: Request) -> Response:
        injected = await self._injected("userinfo")
        if injected is not None:
            return injected

        record = self._access_record(_bearer(request))
        if record is None:
            return _invalid_token()
        return JSONResponse(self._users[record.user_id])

    async def _jsonrpc(self, request: Request) -> Response:
        injected = await self._injected("jsonrpc")
        if injected is not None:
            return injected

        record = self._access_record(_bearer(request))
        if record is None:
            return _invalid_token()

        try:
            message = json.loads(await request.body())
        except ValueError:
            return _rpc_error(None, -32700, "Parse error")
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return _rpc_error(None, -32600, "Invalid Request")
        request_id = message.get("id")
        if message.get("method") != "content.search":
            return _rpc_error(request_id, -32601, "Method not found")
        if "content:search" not in record.scope.split():
            return _rpc_error(request_id, -32000, "Access denied: scope content:search")

        params = message.get("params")
        query = params.get("query") if isinstance(params, dict) else None
        limit = params.get("limit", 10) if isinstance(params, dict) else None
        if not isinstance(query, str) or not isinstance(limit, int) or limit < 1:
            return _rpc_error(request_id, -32602, "Invalid params")
        return JSONResponse(
            {"jsonrpc": "2.0", "id": request_id, "result": _search(query, limit)}
        )

    async def _injected(
        self, endpoint: str, *, counted: bool = False
    ) -> Response | None:
        """Count the request and apply the next injection of ``endpoint``, if any.

        Return the injected response, or None to respond normally.
        """
        with self._lock:
            if not counted:
                self.calls[endpoint] += 1
            queue = self._injections[endpoint]
            injection = queue.pop(0) if queue else None
        if injection is None:
            return None

        if injection.delay_s:
            await asyncio.sleep(injection.delay_s)
        if injection.status is None:
            return None

        body = injection.body
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            injection.headers.setdefault("Content-Type", "application/json")
        if injection.chunked:
            return StreamingResponse(
                _chunks(body), status_code=injection.status, headers=injection.headers
            )
        return Response(body, status_code=injection.status, headers=injection.headers)

    def _access_record(self, access_token: str | None) -> _Token | None:
        record = self._by_access.get(access_token or "")
        if record is None or record.revoked or record.is_expired():
            return None
        return record


def _response(result: tuple[int, Any, list[tuple[str, str]]]) -> Response:
    status, body, headers = result
    if isinstance(body, dict):
        return JSONResponse(body, status_code=status, headers=dict(headers))
    return Response(body or b"", status_code=status, headers=dict(headers))


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _invalid_token() -> Response:
    return JSONResponse(
        {"error": "invalid_token", "error_description": "The access token is invalid."},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def _rpc_error(request_id: Any, code: int, message: str) -> Response:
    return JSONResponse(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {"code": code, "message": message},
        }
    )


def _search(query: str, limit: int) -> dict[str, Any]:
    words = query.lower().split()
    found = [
        {"id": node, "title": title, "url": f"https://drupal.test/{node}"}
        for node, title in ARTICLES
        if all(word in title.lower() for word in words)
    ]
    return {"query": query, "total": len(found), "items": found[:limit]}


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 65536):
        yield body[start : start + 65536]


@contextlib.contextmanager
def upstream_server(
    *,
    users: Mapping[str, str | None] | None = None,
    access_lifetime: int = DEFAULT_ACCESS_LIFETIME_S,
    refresh_lifetime: int = DEFAULT_REFRESH_LIFETIME_S,
    client_secret: str | None = "generate",
    redirect_uri: str = DEFAULT_REDIRECT_URI,
    scopes: tuple[str, ...] = DEFAULT_SCOPES,
) -> Iterator[UpstreamServer]:
    """Run a stand-in upstream on 127.0.0.1 with a free port, and stop it on exit.

    ``users`` defaults to ``{"alice": "plus"}``. ``access_lifetime`` and
    ``refresh_lifetime`` are in seconds. ``client_secret="generate"`` makes a
    random secret (a confidential client); None makes a public client.
    """
    if client_secret == "generate":
        client_secret = "upstream-secret-" + secrets.token_urlsafe(24)
    upstream = UpstreamServer(
        users=users if users is not None else {"alice": "plus"},
        access_lifetime=access_lifetime,
        refresh_lifetime=refresh_lifetime,
        client_secret=client_secret,
        redirect_uri=redirect_uri,
        scopes=scopes,
    )
    with serve_in_thread(upstream.app()) as base_url:
        upstream.base_url = base_url
        yield upstream


@contextlib.contextmanager
def serve_in_thread(app: Any, sock: socket.socket | None = None) -> Iterator[str]:
    """Serve the ASGI ``app`` on 127.0.0.1 and yield its base URL.

    ``sock`` is a listening socket bound to 127.0.0.1, for a caller that must
    know the port before it builds ``app``. Without it, a free port is used.
    """
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_level="warning",
        access_log=False,
        ws="none",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run,
        kwargs={"sockets": None if sock is None else [sock]},
        name="uvicorn-test",
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test HTTP server did not start")
        time.sleep(0.01)

    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def loopback_socket() -> socket.socket:
    """Return a listening TCP socket on 127.0.0.1 with a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(100)
    return sock
