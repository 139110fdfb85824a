"""The ASGI application of ``mcp-authdb serve``: the MCP endpoint and its OAuth server.

:func:`build_app` assembles the SDK's ``MCPServer`` (streamable HTTP,
stateless, JSON responses) with this package's provider, tools and
observability, and adjusts the SDK's routes:

- ``/.well-known/oauth-authorization-server`` (RFC 8414) serves the SDK's
  metadata plus ``client_id_metadata_document_supported``,
  ``authorization_response_iss_parameter_supported`` and the public client
  authentication method ``none``.
- The protected resource metadata (RFC 9728) is served both at
  ``/.well-known/oauth-protected-resource`` and at that path followed by the
  MCP path, the place RFC 9728 section 3.1 derives from the resource URL.
- ``/register`` rejects bodies over ``MCP_AUTHDB_REGISTRATION_MAX_BYTES``
  with 413, and returns 429 with ``Retry-After`` when the request's source
  address has registered too many clients in the last hour.
- ``/token`` rejects bodies over the same limit with 413, and a ``resource``
  parameter (RFC 8707) naming another resource with 400 ``invalid_target``.
- ``/authorize`` (its POST form) and ``/revoke`` reject bodies over the same
  limit with 413.
- ``/oauth/consent`` is the page where users approve or deny a client before
  they go to the upstream provider. Its POST form rejects bodies over the
  same limit with 413.
- ``/oauth/callback`` is where the upstream provider sends users back.
- ``/health`` and ``/metrics`` are always served. In development mode,
  ``/dev/*`` is the built-in identity provider.

NOTE: ``/metrics`` needs no token, so restrict it at the reverse proxy when
request counts per tool should stay private.

Every advertised URL comes from ``MCP_AUTHDB_PUBLIC_URL``, never from the
``Host`` or ``X-Forwarded-*`` headers of a request. The source address of a
request is its TCP peer, unless the peer is in
``MCP_AUTHDB_TRUSTED_PROXIES``. Then it is the nearest ``X-Forwarded-For``
entry that is not a trusted proxy.

The database, the upstream client and the provider exist only while the app
runs. Its lifespan opens them, starts the OAuth state cleanup, runs the SDK's
session manager, and closes everything in reverse order. An app runs once,
because the SDK's session manager can start only once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs

from mcp.server.auth.handlers.metadata import (
    MetadataHandler,
    ProtectedResourceMetadataHandler,
)
from mcp.server.auth.handlers.register import RegistrationHandler
from mcp.server.auth.handlers.revoke import RevocationHandler
from mcp.server.auth.handlers.token import TokenHandler
from mcp.server.auth.middleware.client_auth import ClientAuthenticator
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    IdentityAssertionParams,
    OAuthAuthorizationServerProvider,
    RefreshToken,
)
from mcp.server.auth.routes import build_metadata
from mcp.server.auth.settings import (
    AuthSettings,
    ClientRegistrationOptions,
    RevocationOptions,
)
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.auth import (
    OAuthClientInformationFull,
    OAuthToken,
    ProtectedResourceMetadata,
)
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, request_response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_authdb import __version__
from mcp_authdb.db.pool import AsyncDatabase, Operation, Query
from mcp_authdb.errors import AuthDBError
from mcp_authdb.server.client_metadata import ClientMetadataFetcher
from mcp_authdb.server.config import CALLBACK_PATH, ServerConfig
from mcp_authdb.server.consent import CONSENT_PATH
from mcp_authdb.server.crypto import Encryptor
from mcp_authdb.server.dev_idp import dev_idp_routes
from mcp_authdb.server.oauth_store import OAuthStore, cleanup_operation
from mcp_authdb.server.observability import (
    Metrics,
    health_endpoint,
    metrics_endpoint,
    request_logging_middleware,
)
from mcp_authdb.server.provider import (
    AuthDBProvider,
    ProviderSettings,
    RegistrationRateLimited,
    registration_source,
)
from mcp_authdb.server.tools import ToolSettings, register_tools
from mcp_authdb.server.upstream import UpstreamClient
from mcp_authdb.store.authdb import AsyncAuthDB, AuthDBOptions
from mcp_authdb.store.tokens import KEY_FILE_NAME, TOKEN_KEYS_VARIABLE, TokenKeys

logger = logging.getLogger(__name__)

SERVER_NAME = "mcp-authdb"
AUTHORIZATION_SERVER_METADATA_PATH = "/.well-known/oauth-authorization-server"
PROTECTED_RESOURCE_METADATA_PATH = "/.well-known/oauth-protected-resource"
TOKEN_PATH = "/token"
REVOCATION_PATH = "/revoke"
REGISTRATION_PATH = "/register"
# The key of the advisory lock taken by a round of the OAuth state cleanup:
# the bytes "mcpoauth" read as a big-endian integer. It differs from the keys
# of the migration and session cleanup locks.
OAUTH_CLEANUP_LOCK_KEY = int.from_bytes(b"mcpoauth", "big")
# The first cleanup round starts after a random part of this fraction of the
# interval, so that replicas started together do not all run at once.
CLEANUP_JITTER = 0.1
# The maximum length of a source address stored with a registration, because
# oauth_clients.registered_from is varchar(64). IPv6 text takes at most 45.
MAX_SOURCE_LENGTH = 64
UNKNOWN_SOURCE = "unknown"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


def build_app(
    config: ServerConfig,
    authdb: AsyncAuthDB | None = None,
    *,
    client_metadata_tls: ssl.SSLContext | None = None,
) -> Starlette:
    """Build the server's Starlette app from ``config`` without connecting.

    ``authdb``, not opened, replaces the one built from ``config`` (its
    database settings and environment). The app's lifespan opens and closes
    it either way. ``client_metadata_tls`` is the TLS context used to fetch
    Client ID Metadata Documents (default: the system's certificate
    authorities), for tests with their own authority. Reading the encryption
    key and the token keys happens here, so a missing key raises
    :class:`~mcp_authdb.errors.ConfigurationError` before the server listens.
    """
    if authdb is None:
        environ = _authdb_environ(config)
        authdb = AsyncAuthDB(
            config.settings, AuthDBOptions.from_env(environ), environ=environ
        )
    encryptor = Encryptor.from_env(config.environ, key_file=config.encryption_key_file)
    metrics = Metrics()
    runtime = _Runtime()
    runtime.client_metadata_tls = client_metadata_tls

    server: MCPServer[Any] = MCPServer(
        SERVER_NAME,
        version=__version__,
        auth_server_provider=_DeferredProvider(runtime),
        auth=_auth_settings(config),
        middleware=[runtime.log_request],
    )
    app = server.streamable_http_app(
        streamable_http_path=config.mcp_path,
        stateless_http=True,
        json_response=True,
        transport_security=TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=config.allowed_hosts,
            allowed_origins=config.allowed_origins,
        ),
        host=config.host,
    )
    app.router.routes[:] = _routes(
        config, app.router.routes, runtime, metrics, authdb, encryptor
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await _start(stack, config, server, authdb, encryptor, metrics, runtime)
            await stack.enter_async_context(server.session_manager.run())
            logger.info(
                "serving the MCP endpoint %s, with the authorization server %s",
                config.resource,
                config.issuer,
                extra={"action": "server.started", "resource": config.resource},
            )
            yield
            logger.info(
                "stopping the MCP endpoint %s",
                config.resource,
                extra={"action": "server.stopping"},
            )

    app.router.lifespan_context = lifespan
    return app


def source_address(scope: Scope, config: ServerConfig) -> str:
    """Return the source address of a request, for per-source limits.

    It is the TCP peer, unless the peer is a trusted proxy. Then the
    ``X-Forwarded-For`` entries are read from the right, the nearest first,
    skipping trusted proxies, and the first other address is the source. An
    entry that is not an IP address ends the walk at the last trusted hop,
    because only a trusted proxy's own entry can be believed. Without a peer
    (a Unix socket), it is ``"unknown"``.
    """
    client = scope.get("client")
    if not client:
        return UNKNOWN_SOURCE
    current = _normalized_address(str(client[0]))
    if current is None:
        return str(client[0])[:MAX_SOURCE_LENGTH]

    forwarded: list[str] = []
    for value in Headers(scope=scope).getlist("x-forwarded-for"):
        forwarded += [entry.strip() for entry in value.split(",")]

    for entry in reversed(forwarded):
        if not config.is_trusted_proxy(current):
            break
        address = _normalized_address(entry)
        if address is None:
            break
        current = address
    return current


def _normalized_address(text: str) -> str | None:
    """Return ``text`` as a canonical IP address, or None when it is not one.

    Accepts ``1.2.3.4``, ``1.2.3.4:port``, ``::1`` and ``[::1]:port``.
    """
    candidate = text.strip()
    if candidate.startswith("["):
        candidate = candidate[1:].partition("]")[0]
    elif candidate.count(":") == 1:
        candidate = candidate.partition(":")[0]
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


class _Runtime:
    """The parts of a running app that the lifespan creates and removes."""

    def __init__(self) -> None:
        self.provider: AuthDBProvider | None = None
        self.database: AsyncDatabase | None = None
        self.client_metadata_tls: ssl.SSLContext | None = None
        self.request_middleware: (
            Callable[
                [ServerRequestContext[Any, Any], CallNext], Awaitable[HandlerResult]
            ]
            | None
        ) = None

    def require_provider(self) -> AuthDBProvider:
        if self.provider is None:
            raise RuntimeError(
                "the OAuth provider is not running; the app's lifespan starts it"
            )
        return self.provider

    async def log_request(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Run the request log middleware, once the lifespan has created it."""
        if self.request_middleware is None:
            return await call_next(ctx)
        return await self.request_middleware(ctx, call_next)


class _DeferredProvider(
    OAuthAuthorizationServerProvider[AuthorizationCode, RefreshToken, AccessToken]
):
    """The SDK provider protocol, forwarded to the provider the lifespan creates.

    The SDK needs a provider when the app is built, but the provider needs the
    database, which the lifespan opens.
    """

    def __init__(self, runtime: _Runtime) -> None:
        self._runtime = runtime

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return await self._runtime.require_provider().get_client(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        await self._runtime.require_provider().register_client(client_info)

    async def authorize(
        self, client: OAuthClientInformationFull, params: AuthorizationParams
    ) -> str:
        return await self._runtime.require_provider().authorize(client, params)

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> AuthorizationCode | None:
        provider = self._runtime.require_provider()
        return await provider.load_authorization_code(client, authorization_code)

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        provider = self._runtime.require_provider()
        return await provider.exchange_authorization_code(
            client,
            authorization_code,  # type: ignore[arg-type]
        )

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> RefreshToken | None:
        provider = self._runtime.require_provider()
        return await provider.load_refresh_token(client, refresh_token)

    async def exchange_refresh_token(
        self,
        client: OAuthClientInformationFull,
        refresh_token: RefreshToken,
        scopes: list[str],
    ) -> OAuthToken:
        provider = self._runtime.require_provider()
        return await provider.exchange_refresh_token(
            client,
            refresh_token,  # type: ignore[arg-type]
            scopes,
        )

    async def load_access_token(self, token: str) -> AccessToken | None:
        return await self._runtime.require_provider().load_access_token(token)

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        await self._runtime.require_provider().revoke_token(token)  # type: ignore[arg-type]

    async def exchange_identity_assertion(
        self, client: OAuthClientInformationFull, params: IdentityAssertionParams
    ) -> OAuthToken:
        provider = self._runtime.require_provider()
        return await provider.exchange_identity_assertion(client, params)


def _auth_settings(config: ServerConfig) -> AuthSettings:
    # Strings, not AnyHttpUrl objects: AuthSettings keeps an empty path
    # empty, so the issuer gets no trailing slash that RFC 8414's exact
    # comparison of issuers would trip on.
    return AuthSettings.model_validate(
        {
            "issuer_url": config.issuer,
            "resource_server_url": config.resource,
            # The provider's load_access_token accepts only tokens of this
            # resource, comparing strings; the SDK's own check would parse
            # the URL again on every request.
            "validate_token_resource": False,
            "client_registration_options": _registration_options(config),
            "revocation_options": RevocationOptions(enabled=True),
        }
    )


def _registration_options(config: ServerConfig) -> ClientRegistrationOptions:
    scopes = list(config.scopes)
    return ClientRegistrationOptions(
        enabled=True, valid_scopes=scopes, default_scopes=scopes
    )


def _routes(
    config: ServerConfig,
    sdk_routes: list[BaseRoute],
    runtime: _Runtime,
    metrics: Metrics,
    authdb: AsyncAuthDB,
    encryptor: Encryptor,
) -> list[BaseRoute]:
    """Return the app's routes: the SDK's, some replaced, and this server's."""
    by_path = {route.path: route for route in sdk_routes if isinstance(route, Route)}
    provider = _DeferredProvider(runtime)
    for path in ("/authorize", REVOCATION_PATH, config.mcp_path):
        if path not in by_path:
            # A newer SDK may have renamed a route; failing here beats serving
            # an authorization server with a missing endpoint.
            raise RuntimeError(f"the MCP SDK app has no route {path}")

    limit = config.registration_max_bytes
    registration = RegistrationHandler(provider, options=_registration_options(config))
    token = TokenHandler(provider, ClientAuthenticator(provider))
    revocation = RevocationHandler(provider, ClientAuthenticator(provider))
    resource_metadata = ProtectedResourceMetadataHandler(
        ProtectedResourceMetadata.model_validate(
            {
                "resource": config.resource,
                "authorization_servers": [config.issuer],
                "scopes_supported": list(config.scopes),
                "bearer_methods_supported": ["header"],
                "resource_name": SERVER_NAME,
            }
        )
    )

    async def callback(request: Request) -> Response:
        return await runtime.require_provider().handle_callback(request)

    async def consent_page(request: Request) -> Response:
        return await runtime.require_provider().consent_page(request)

    async def consent_decision(request: Request) -> Response:
        return await runtime.require_provider().handle_consent(request)

    routes: list[BaseRoute] = [
        _get_route(
            AUTHORIZATION_SERVER_METADATA_PATH,
            MetadataHandler(_authorization_server_metadata(config)).handle,
        ),
        _get_route(PROTECTED_RESOURCE_METADATA_PATH, resource_metadata.handle),
        _get_route(
            PROTECTED_RESOURCE_METADATA_PATH + config.mcp_path, resource_metadata.handle
        ),
        Route(
            "/authorize",
            endpoint=_BodyLimitedGuard(by_path["/authorize"].app, config, limit),
            methods=sorted(by_path["/authorize"].methods or ["GET", "POST"]),
        ),
        Route(
            TOKEN_PATH,
            endpoint=_cors(
                _TokenGuard(request_response(token.handle), config, limit),
                ["POST", "OPTIONS"],
            ),
            methods=["POST", "OPTIONS"],
        ),
        Route(
            REGISTRATION_PATH,
            endpoint=_cors(
                _RegistrationGuard(
                    request_response(registration.handle), config, limit
                ),
                ["POST", "OPTIONS"],
            ),
            methods=["POST", "OPTIONS"],
        ),
        Route(
            REVOCATION_PATH,
            endpoint=_cors(
                _RevocationGuard(request_response(revocation.handle), config, limit),
                ["POST", "OPTIONS"],
            ),
            methods=["POST", "OPTIONS"],
        ),
        by_path[config.mcp_path],
        Route(CONSENT_PATH, endpoint=consent_page, methods=["GET"]),
        Route(
            CONSENT_PATH,
            endpoint=_BodyLimitedGuard(
                request_response(consent_decision), config, limit
            ),
            methods=["POST"],
        ),
        Route(CALLBACK_PATH, endpoint=callback, methods=["GET"]),
        Route(
            "/health",
            endpoint=health_endpoint(lambda: runtime.database),
            methods=["GET"],
        ),
        Route("/metrics", endpoint=metrics_endpoint(metrics, authdb), methods=["GET"]),
    ]
    if config.dev:
        # A key derived from the encryption key keeps the provider's tokens,
        # stored encrypted as upstream tokens, valid across restarts.
        routes += dev_idp_routes(
            config.resource,
            redirect_uri=config.upstream.redirect_uri,
            signing_key=encryptor.derive_key("development identity provider"),
        )
    return routes


def _get_route(path: str, handler: Callable[[Request], Awaitable[Response]]) -> Route:
    return Route(
        path,
        endpoint=_cors(request_response(handler), ["GET", "OPTIONS"]),
        methods=["GET", "OPTIONS"],
    )


def _cors(app: ASGIApp, methods: list[str]) -> ASGIApp:
    # The same policy as the SDK's routes: browser-based clients such as the
    # MCP Inspector call the OAuth endpoints from another origin.
    return CORSMiddleware(
        app=app,
        allow_origins="*",
        allow_methods=methods,
        allow_headers=[MCP_PROTOCOL_VERSION_HEADER],
    )


def _authorization_server_metadata(config: ServerConfig) -> Any:
    metadata = build_metadata(
        _auth_settings(config).issuer_url,
        None,
        _registration_options(config),
        RevocationOptions(enabled=True),
    )
    auth_methods = list(metadata.token_endpoint_auth_methods_supported or [])
    # Public clients, and every client identified by a metadata document,
    # authenticate with PKCE alone.
    if "none" not in auth_methods:
        auth_methods.append("none")
    return metadata.model_copy(
        update={
            "client_id_metadata_document_supported": True,
            "authorization_response_iss_parameter_supported": True,
            "token_endpoint_auth_methods_supported": auth_methods,
            "revocation_endpoint_auth_methods_supported": auth_methods,
        }
    )


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """Read the whole request body, or return None past ``limit`` bytes.

    A disconnect before the end returns the bytes read so far. The handler then
    fails on the truncated body, and its response goes to a closed connection.
    """
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(body)
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _declared_length(scope: Scope) -> int | None:
    text = Headers(scope=scope).get("content-length")
    if text is None or not text.isascii() or not text.isdecimal():
        return None
    return int(text)


async def _send_json(
    send: Send,
    status: int,
    body: Mapping[str, object],
    headers: Mapping[str, str] | None = None,
) -> None:
    response = JSONResponse(dict(body), status_code=status, headers=dict(headers or {}))
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class _BodyLimitedGuard:
    """ASGI wrapper that reads a POST body with a size limit.

    It wraps /authorize as it is, because the SDK's handler turns a form
    field over Starlette's part size limit into ``server_error``, and is the
    base class of the other guards.

    It reads POST requests only. Other methods (the CORS preflight) pass
    unchanged.
    Subclasses check the body in :meth:`handle` and pass the request on with
    the body replayed.
    """

    error_code = "invalid_request"

    def __init__(self, app: ASGIApp, config: ServerConfig, max_bytes: int) -> None:
        self.app = app
        self.config = config
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return

        declared = _declared_length(scope)
        body = None
        if declared is None or declared <= self.max_bytes:
            body = await _read_body(receive, self.max_bytes)
        if body is None:
            logger.info(
                "rejected a %s request from %s: the body is over %d bytes",
                scope["path"],
                source_address(scope, self.config),
                self.max_bytes,
                extra={"action": "server.body_too_large", "path": scope["path"]},
            )
            await _send_json(
                send,
                413,
                {
                    "error": self.error_code,
                    "error_description": (
                        f"the request body is larger than {self.max_bytes} bytes"
                    ),
                },
                _NO_STORE,
            )
            return

        await self.handle(scope, body, receive, send)

    async def handle(
        self, scope: Scope, body: bytes, receive: Receive, send: Send
    ) -> None:
        """Check ``body`` and pass the request on, with ``receive`` past the body."""
        await self.app(scope, _replay(body, receive), send)


class _TokenGuard(_BodyLimitedGuard):
    """Guard that rejects a token request for another server's ``resource``.

    Under RFC 8707 section 2, a token request may name the resource it
    requests a token for, and one this server does not serve gets
    ``invalid_target``.
    Only form-encoded bodies (RFC 6749 section 3.2) are accepted, so that a
    ``resource`` cannot slip past this check in another encoding.
    """

    async def handle(
        self, scope: Scope, body: bytes, receive: Receive, send: Send
    ) -> None:
        content_type = Headers(scope=scope).get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != _FORM_CONTENT_TYPE:
            await _send_json(
                send,
                400,
                {
                    "error": "invalid_request",
                    "error_description": (
                        f"send the token request as {_FORM_CONTENT_TYPE}"
                    ),
                },
                _NO_STORE,
            )
            return

        form = parse_qs(
            body.decode("latin-1"), keep_blank_values=True, errors="replace"
        )
        resource = self.config.resource
        for requested in form.get("resource", []):
            if requested.removesuffix("/") != resource.removesuffix("/"):
                await _send_json(
                    send,
                    400,
                    {
                        "error": "invalid_target",
                        "error_description": (
                            f"the resource {requested[:200]!r} is not served "
                            f"here; request {resource}"
                        ),
                    },
                    _NO_STORE,
                )
                return

        await self.app(scope, _replay(body, receive), send)


class _RevocationGuard(_BodyLimitedGuard):
    """Guard that lets a public client revoke without a ``client_secret`` field.

    RFC 7009 section 2.1 requires only the ``client_id`` of a public client,
    but the SDK's revocation handler requires the field to be present. An
    empty one is added when it is missing, and the SDK's client
    authentication still requires the real secret from a confidential client.
    """

    async def handle(
        self, scope: Scope, body: bytes, receive: Receive, send: Send
    ) -> None:
        form = parse_qs(body.decode("latin-1"), keep_blank_values=True)
        if "client_secret" in form:
            await self.app(scope, _replay(body, receive), send)
            return

        body += b"&client_secret=" if body else b"client_secret="
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name.lower() != b"content-length"
        ]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, _replay(body, receive), send)


class _RegistrationGuard(_BodyLimitedGuard):
    """Guard that passes the source address to the provider and maps its limit to 429.

    The provider reads the source address from the ``registration_source``
    context variable, and raises :class:`RegistrationRateLimited` when that
    address registered too many clients in the last hour.
    """

    error_code = "invalid_client_metadata"

    async def handle(
        self, scope: Scope, body: bytes, receive: Receive, send: Send
    ) -> None:
        source = source_address(scope, self.config)
        reset = registration_source.set(source)
        try:
            await self.app(scope, _replay(body, receive), send)
        except RegistrationRateLimited as exc:
            logger.warning(
                "rejected a client registration from %s: over the limit of %d per hour",
                source,
                self.config.registration_limit,
                extra={"action": "server.registration_limited", "source": source},
            )
            await _send_json(
                send,
                429,
                {
                    "error": "too_many_requests",
                    "error_description": (
                        f"this address registered {self.config.registration_limit} "
                        "clients in the last hour, the maximum; retry after "
                        f"{exc.retry_after_s} seconds, or reuse a registered client"
                    ),
                },
                {**_NO_STORE, "Retry-After": str(exc.retry_after_s)},
            )
        finally:
            registration_source.reset(reset)


def _authdb_environ(config: ServerConfig) -> Mapping[str, str]:
    """Return the environment for the library, with development token keys.

    In development mode with ``DATABASE_URL`` set and no
    ``MCP_AUTHDB_TOKEN_KEYS``, the token keys come from the key file in the
    data folder, as they do with the embedded server.
    """
    environ = config.environ
    if (
        config.key_folder is None
        or config.settings.database_url is None
        or environ.get(TOKEN_KEYS_VARIABLE) is not None
    ):
        return environ

    keys = TokenKeys.from_key_file(config.key_folder / KEY_FILE_NAME)
    encoded = ",".join(f"{key.key_id}:{_base64url(key.secret)}" for key in keys.keys)
    return {**environ, TOKEN_KEYS_VARIABLE: encoded}


def _base64url(secret: bytes) -> str:
    return base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")


async def _start(
    stack: contextlib.AsyncExitStack,
    config: ServerConfig,
    server: MCPServer[Any],
    authdb: AsyncAuthDB,
    encryptor: Encryptor,
    metrics: Metrics,
    runtime: _Runtime,
) -> None:
    """Open the parts of the server in dependency order, each closed by ``stack``."""
    await authdb.open()
    stack.push_async_callback(authdb.close)
    database = authdb.database
    assert database is not None  # open() sets it

    oauth_store = OAuthStore(database, encryptor, authdb.hasher)
    upstream = await stack.enter_async_context(UpstreamClient(config.upstream))
    fetcher_options: dict[str, Any] = {"allow_private": config.dev}
    if runtime.client_metadata_tls is not None:
        fetcher_options["verify"] = runtime.client_metadata_tls
    fetcher = await stack.enter_async_context(
        ClientMetadataFetcher(oauth_store, **fetcher_options)
    )
    provider = AuthDBProvider(
        store=oauth_store,
        sessions=authdb.sessions,
        upstream=upstream,
        documents=fetcher,
        settings=_provider_settings(config),
    )
    register_tools(
        server,
        database=database,
        oauth_store=oauth_store,
        upstream=upstream,
        settings=ToolSettings(
            subscription_levels=config.subscription_levels,
            search_level=config.search_level,
            refresh_threshold=config.refresh_threshold,
        ),
    )

    runtime.provider = provider
    runtime.database = database
    runtime.request_middleware = request_logging_middleware(authdb.request_log, metrics)
    stack.callback(_stop_runtime, runtime)

    if config.cleanup_interval is not None:
        task = asyncio.create_task(
            _cleanup_loop(database, config.cleanup_interval, config, metrics),
            name="mcp-authdb-oauth-cleanup",
        )
        stack.push_async_callback(_cancel, task)


def _stop_runtime(runtime: _Runtime) -> None:
    runtime.provider = None
    runtime.database = None
    runtime.request_middleware = None


def _provider_settings(config: ServerConfig) -> ProviderSettings:
    return ProviderSettings(
        issuer=config.issuer,
        resource=config.resource,
        scopes=config.scopes,
        access_lifetime=config.access_token_lifetime,
        refresh_lifetime=config.refresh_token_lifetime,
        registration_limit_per_hour=config.registration_limit,
        subscription_levels=config.subscription_levels,
    )


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _locked_cleanup(unused_age: timedelta) -> Operation[int | None]:
    """Run the OAuth state cleanup under a transaction-level advisory lock.

    Returns the rows deleted, or None when another process holds the lock.
    The lock ends with the transaction, so this also works behind a pooler in
    transaction mode.
    """
    result = yield Query(
        "SELECT pg_try_advisory_xact_lock(%s)", (OAUTH_CLEANUP_LOCK_KEY,)
    )
    if not result.rows[0][0]:
        return None
    deleted: int = yield from cleanup_operation(unused_age)
    return deleted


async def _cleanup_loop(
    database: AsyncDatabase,
    interval: timedelta,
    config: ServerConfig,
    metrics: Metrics,
) -> None:
    """Delete expired OAuth state every ``interval``, until cancelled.

    Failures are logged and counted, and the next round starts one interval
    later.

    """
    interval_s = interval.total_seconds()
    delay = random.uniform(0, interval_s * CLEANUP_JITTER)
    while True:
        await asyncio.sleep(delay)
        delay = interval_s
        try:
            deleted = await database.run(
                functools.partial(_locked_cleanup, config.unused_client_age)
            )
        except AuthDBError as exc:
            metrics.record_oauth_cleanup("failed")
            logger.warning(
                "the OAuth state cleanup failed: %s; retrying in %g s",
                exc,
                interval_s,
                extra={"action": "server.oauth_cleanup.failed"},
            )
            continue
        except Exception:
            metrics.record_oauth_cleanup("failed")
            logger.exception(
                "the OAuth state cleanup failed; retrying in %g s",
                interval_s,
                extra={"action": "server.oauth_cleanup.failed"},
            )
            continue

        if deleted is None:
            metrics.record_oauth_cleanup("skipped")
            logger.debug(
                "skipped the OAuth state cleanup: another process is running it",
                extra={"action": "server.oauth_cleanup.skipped"},
            )
            continue
        metrics.record_oauth_cleanup("completed")
        logger.log(
            logging.INFO if deleted else logging.DEBUG,
            "the OAuth state cleanup deleted %d rows",
            deleted,
            extra={"action": "server.oauth_cleanup.completed", "deleted": deleted},
        )
