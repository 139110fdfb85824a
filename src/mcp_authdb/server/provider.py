"""The OAuth authorization server that MCP clients sign in at.

:class:`AuthDBProvider` implements the MCP SDK's
``OAuthAuthorizationServerProvider`` protocol over PostgreSQL, so that every
replica serves every request and a restart loses nothing:

- Clients come from Dynamic Client Registration (stored with the client
  secret encrypted) or from Client ID Metadata Documents (an https URL as
  ``client_id``, see :mod:`mcp_authdb.server.client_metadata`).
- ``/authorize`` stores a pending authorization and sends the user to the
  consent page ``/oauth/consent`` (see :mod:`mcp_authdb.server.consent`).
  Approving there binds the sign-in to the browser with a cookie and sends
  the user to the upstream provider.
- :meth:`AuthDBProvider.handle_callback` takes the authorization back when
  the upstream provider redirects to ``/oauth/callback`` in that browser,
  and gives the client an authorization code.
- The code exchange creates a user session (the session store's token pair)
  and the grant of its family in one transaction.
- Access and refresh tokens are those of
  :class:`~mcp_authdb.store.session_store.AsyncSessionStore`, with rotation
  and replay detection.

Logs name client ids, user ids and family ids, never a token, code, state,
client secret, PKCE verifier, consent request id or cookie.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import logging
import re
import secrets
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    AuthorizeError,
    OAuthAuthorizationServerProvider,
    RefreshToken,
    RegistrationError,
    TokenError,
    construct_redirect_uri,
)
from mcp.shared.auth import (
    InvalidRedirectUriError,
    OAuthClientInformationFull,
    OAuthToken,
)
from pydantic import AnyUrl, ValidationError
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from mcp_authdb.db.pool import Operation, Query
from mcp_authdb.errors import InvalidGrantError, InvalidValueError
from mcp_authdb.server import consent
from mcp_authdb.server.client_metadata import (
    ClientMetadataFetcher,
    contains_nul,
    is_client_id_url,
)
from mcp_authdb.server.oauth_store import (
    CLIENT_KIND_REGISTERED,
    OAuthStore,
    PendingAuthorization,
    StoredCode,
    is_storable_client_id,
)
from mcp_authdb.server.redirects import match_redirect_uri, redirect_uri_problem
from mcp_authdb.server.upstream import (
    UpstreamClient,
    UpstreamError,
    pkce_s256_challenge,
)
from mcp_authdb.store.session_store import AsyncSessionStore
from mcp_authdb.store.sessions import Session
from mcp_authdb.store.tokens import TokenKind, new_token

logger = logging.getLogger(__name__)

DEFAULT_PENDING_LIFETIME = timedelta(minutes=10)
DEFAULT_CODE_LIFETIME = timedelta(seconds=60)
DEFAULT_ACCESS_LIFETIME = timedelta(hours=1)
DEFAULT_REFRESH_LIFETIME = timedelta(days=30)
DEFAULT_REGISTRATION_LIMIT = 20
DEFAULT_SUBSCRIPTION_LEVELS = ("free", "plus", "pro")
# How many families' grant facts load_access_token keeps in memory.
GRANT_CACHE_SIZE = 10_000
# Seconds a client waits after the registration limit of its source was hit.
REGISTRATION_RETRY_AFTER_S = 3600
# The width of oauth_pending_authorizations.code_challenge and oauth_codes'.
_MAX_CODE_CHALLENGE_LENGTH = 128
# The maximum length of a client state that /authorize stores and returns.
# RFC 6749 sets no limit, and a state of a few dozen characters is usual.
MAX_CLIENT_STATE_LENGTH = 2048
# An upstream error code is repeated to the client only if it looks like one.
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")

registration_source: ContextVar[str | None] = ContextVar(
    "registration_source", default=None
)
"""The source address of the current registration request.

The application's wrapper around ``/register`` sets it before calling the
SDK's handler, and :meth:`AuthDBProvider.register_client` counts
registrations per source with it.
"""


class RegistrationRateLimited(Exception):
    """The source of a registration request hit its hourly limit.

    Raised by :meth:`AuthDBProvider.register_client` through the SDK's
    registration handler, which does not catch it. The application's wrapper
    turns it into HTTP 429 with ``Retry-After: retry_after_s``.
    """

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            f"too many client registrations from this address; retry after "
            f"{retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class _CodeAlreadyUsed(Exception):
    """Signal that rolls back a session whose code was used meanwhile."""


@dataclasses.dataclass(frozen=True)
class ProviderSettings:
    """The provider's part of the server configuration.

    ``issuer`` is this authorization server's issuer (the public URL's
    origin), sent as ``iss`` in authorization responses (RFC 9207).
    ``resource`` is the MCP endpoint's public URL, the only RFC 8707
    resource tokens are issued for. ``scopes`` are the scopes clients may
    request, and the scopes of a client that registered none.
    ``subscription_levels`` lists the known levels from lowest to highest.
    """

    issuer: str
    resource: str
    scopes: tuple[str, ...]
    pending_lifetime: timedelta = DEFAULT_PENDING_LIFETIME
    code_lifetime: timedelta = DEFAULT_CODE_LIFETIME
    access_lifetime: timedelta = DEFAULT_ACCESS_LIFETIME
    refresh_lifetime: timedelta = DEFAULT_REFRESH_LIFETIME
    registration_limit_per_hour: int = DEFAULT_REGISTRATION_LIMIT
    subscription_levels: tuple[str, ...] = DEFAULT_SUBSCRIPTION_LEVELS

    def __post_init__(self) -> None:
        if not self.scopes:
            raise InvalidValueError(
                "ProviderSettings.scopes is empty; give the scopes clients may "
                "request, such as ('content:read',)"
            )
        if not self.subscription_levels:
            raise InvalidValueError(
                "ProviderSettings.subscription_levels is empty; give the levels "
                "from lowest to highest, such as ('free', 'plus', 'pro')"
            )
        for name in (
            "pending_lifetime",
            "code_lifetime",
            "access_lifetime",
            "refresh_lifetime",
        ):
            value = getattr(self, name)
            if value <= timedelta(0):
                raise InvalidValueError(
                    f"ProviderSettings.{name}={value!r} is not positive; "
                    "give a positive timedelta"
                )


class AuthDBClientInformation(OAuthClientInformationFull):
    """A client of this server, with RFC 8252 loopback redirect matching.

    A registered ``http`` redirect URI on ``127.0.0.1``, ``[::1]`` or
    ``localhost`` matches a requested one with any port. Every other URI
    must be requested exactly (see :mod:`mcp_authdb.server.redirects`).
    """

    def validate_redirect_uri(self, redirect_uri: AnyUrl | None) -> AnyUrl:
        """Return the URI to redirect to: ``redirect_uri`` if it matches.

        Without ``redirect_uri``, returns the only registered URI. Raises
        ``InvalidRedirectUriError`` when the URI matches no registered one,
        or when none was given and the client registered several.
        """
        registered = [str(uri) for uri in self.redirect_uris or []]
        if redirect_uri is not None:
            if match_redirect_uri(registered, str(redirect_uri)) is None:
                raise InvalidRedirectUriError(
                    f"redirect_uri '{redirect_uri}' is not registered for client "
                    f"{self.client_id}; use one of {registered}"
                )
            return redirect_uri
        if self.redirect_uris and len(self.redirect_uris) == 1:
            return self.redirect_uris[0]
        raise InvalidRedirectUriError(
            "redirect_uri is required because the client registered "
            f"{len(registered)} redirect URIs"
        )


class AuthDBAuthorizationCode(AuthorizationCode):
    """An authorization code with the user it signs in."""

    user_id: str
    subscription_level: str


class AuthDBRefreshToken(RefreshToken):
    """A refresh token with its session row and family."""

    user_id: str
    family_id: uuid.UUID
    session_id: int


class AuthDBAccessToken(AccessToken):
    """A valid access token, as the MCP tools see it.

    ``subject`` and ``user_id`` are the upstream user's id, and
    ``expires_at`` is the access token's expiry in epoch seconds. Tools read
    it with ``mcp.server.auth.middleware.auth_context.get_access_token()``.
    """

    user_id: str
    subscription_level: str
    family_id: uuid.UUID
    session_id: int


@dataclasses.dataclass(frozen=True)
class _GrantFacts:
    client_id: str
    resource: str


# The row of a refresh token, if it is not revoked and its family has a
# grant. Rotated rows inside the replay window are found too, so that the
# session store detects the replay and revokes the family.
_FIND_REFRESH = """
SELECT s.id, s.family_id, s.user_id, s.scope,
       coalesce(s.refresh_expires_at, s.expires_at),
       g.client_id, g.resource
FROM user_sessions s
JOIN oauth_grants g ON g.family_id = s.family_id
WHERE s.refresh_token_hash = ANY(%(candidates)s::text[])
  AND s.revoked_at IS NULL
LIMIT 1
"""


def _find_refresh(candidates: list[str]) -> Operation[tuple[Any, ...] | None]:
    result = yield Query(_FIND_REFRESH, {"candidates": candidates})
    return result.rows[0] if result.rows else None


class AuthDBProvider(
    OAuthAuthorizationServerProvider[
        AuthDBAuthorizationCode, AuthDBRefreshToken, AuthDBAccessToken
    ]
):
    """The SDK's OAuth authorization server provider, over PostgreSQL.

    ``store`` stores clients, pending authorizations, codes and grants,
    ``sessions`` the user sessions (it must use the same database and token
    hasher as ``store``), ``upstream`` signs users in, and ``documents``
    fetches Client ID Metadata Documents. The provider keeps no state besides
    an in-memory cache of grant facts that never change.
    """

    def __init__(
        self,
        *,
        store: OAuthStore,
        sessions: AsyncSessionStore,
        upstream: UpstreamClient,
        documents: ClientMetadataFetcher,
        settings: ProviderSettings,
    ) -> None:
        self.store = store
        self.sessions = sessions
        self.upstream = upstream
        self.documents = documents
        self.settings = settings
        self.consents = consent.ConsentStore(store)
        self._secure_cookies = settings.issuer.startswith("https://")
        self._csrf_key = store.encryptor.derive_key("consent form CSRF tokens")
        self._grants: collections.OrderedDict[uuid.UUID, _GrantFacts] = (
            collections.OrderedDict()
        )

    # Clients

    async def get_client(self, client_id: str) -> AuthDBClientInformation | None:
        """Return the client ``client_id``, or None when it is unknown or rejected.

        An https URL is a Client ID Metadata Document, fetched or read from
        the cache, and any other id is a registered client. A document that
        names no scope, or none of :attr:`ProviderSettings.scopes`, gets
        all of them. Other scopes in it are dropped. An id that no client
        can have (empty, over 2048 characters, or with a NUL character) is
        unknown, without a database call or a fetch.
        """
        if not is_storable_client_id(client_id):
            return None
        if is_client_id_url(client_id):
            metadata = await self.documents.get(client_id)
            if metadata is None:
                return None
            return self._client_from_metadata(
                {**metadata, "scope": self._document_scope(metadata.get("scope"))}
            )

        stored = await self.store.get_client(client_id)
        if stored is None or stored.kind != CLIENT_KIND_REGISTERED:
            return None
        return self._client_from_metadata(
            {
                **stored.metadata,
                "client_id": stored.client_id,
                "client_secret": stored.client_secret,
            }
        )

    def _client_from_metadata(
        self, metadata: dict[str, Any]
    ) -> AuthDBClientInformation | None:
        try:
            return AuthDBClientInformation.model_validate(metadata)
        except ValidationError as exc:
            logger.error(
                "the stored metadata of client %s is invalid, so the client is "
                "rejected: %s",
                metadata.get("client_id"),
                exc,
            )
            return None

    def _document_scope(self, scope: object) -> str:
        allowed = self.settings.scopes
        if isinstance(scope, str):
            requested = [item for item in scope.split() if item in allowed]
            if requested:
                return " ".join(requested)
        return " ".join(allowed)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        """Store a client from Dynamic Client Registration.

        Raises ``RegistrationError`` (``invalid_redirect_uri``) for a
        redirect URI that :func:`~mcp_authdb.server.redirects.redirect_uri_problem`
        rejects, ``RegistrationError`` (``invalid_client_metadata``) for
        metadata with a NUL character, which PostgreSQL cannot store, and
        :class:`RegistrationRateLimited` when the source in
        :data:`registration_source` registered
        :attr:`ProviderSettings.registration_limit_per_hour` clients within
        the last hour. Without a source (a caller other than the
        application's ``/register`` route) all such callers share the source
        ``"unknown"``.
        """
        for uri in client_info.redirect_uris or []:
            problem = redirect_uri_problem(str(uri))
            if problem is not None:
                raise RegistrationError("invalid_redirect_uri", problem)

        source = registration_source.get() or "unknown"
        metadata = client_info.model_dump(
            mode="json", exclude_none=True, exclude={"client_secret"}
        )
        if contains_nul(metadata):
            raise RegistrationError(
                "invalid_client_metadata",
                "the client metadata contains a NUL character (\\u0000); remove it",
            )
        stored = await self.store.register_client(
            client_info.client_id,
            metadata,
            client_info.client_secret,
            source=source,
            limit_per_hour=self.settings.registration_limit_per_hour,
        )
        if not stored:
            raise RegistrationRateLimited(REGISTRATION_RETRY_AFTER_S)
        logger.info(
            "registered client %s (%s) from %s",
            client_info.client_id,
            client_info.client_name or "no name",
            source,
            extra={"action": "oauth.register", "client_id": client_info.client_id},
        )

    # Authorization

    async def authorize(
        self, client: OAuthClientInformationFull, params: AuthorizationParams
    ) -> str:
        """Store a pending authorization; return the URL of its consent page.

        The URL is :data:`~mcp_authdb.server.consent.CONSENT_PATH` on the
        issuer, with a new consent request id that the pending authorization
        is stored under until the user approves or denies it.

        ``params.resource`` must name :attr:`ProviderSettings.resource`
        (ignoring one trailing slash), and a request without one gets it.
        Scopes default to the client's registered scopes. Raises
        ``AuthorizeError`` and stores nothing for a request it rejects:
        ``invalid_target`` for another resource, ``invalid_scope`` for a
        scope not in :attr:`ProviderSettings.scopes`, and ``invalid_request``
        for a code challenge over 128 characters, a ``state`` over 2048
        characters, or a code challenge or ``state`` with a NUL character.
        """
        resource = self._check_resource(params.resource)
        scopes = self._requested_scopes(client, params.scopes)
        _check_authorize_text(params)

        request_id = new_token(TokenKind.STATE)
        pending = PendingAuthorization(
            client_id=client.client_id,
            redirect_uri=str(params.redirect_uri),
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            client_state=params.state,
            scopes=scopes,
            code_challenge=params.code_challenge,
            resource=resource,
            # Never sent upstream: approval replaces it with a new verifier.
            upstream_verifier=secrets.token_urlsafe(32),
            expires_at=datetime.now(UTC) + self.settings.pending_lifetime,
        )
        await self.store.put_pending(request_id, pending)

        logger.info(
            "client %s started a sign-in",
            client.client_id,
            extra={"action": "oauth.authorize", "client_id": client.client_id},
        )
        return consent.consent_url(self.settings.issuer, request_id)

    def _check_resource(self, resource: str | None) -> str:
        expected = self.settings.resource
        if resource is None:
            return expected
        if not _same_resource(resource, expected):
            raise AuthorizeError(
                "invalid_target",
                f"resource {resource!r} is not served here; request {expected!r}",
            )
        return expected

    def _requested_scopes(
        self, client: OAuthClientInformationFull, requested: list[str] | None
    ) -> tuple[str, ...]:
        if requested is None:
            requested = client.scope.split() if client.scope else []
        scopes = [scope for scope in requested if scope]
        if not scopes:
            return self.settings.scopes
        unknown = [scope for scope in scopes if scope not in self.settings.scopes]
        if unknown:
            raise AuthorizeError(
                "invalid_scope",
                f"unknown scopes {unknown}; this server offers "
                f"{list(self.settings.scopes)}",
            )
        return tuple(dict.fromkeys(scopes))

    # Consent

    async def consent_page(self, request: Request) -> Response:
        """Show the consent page of the consent request in ``?request=`` (GET).

        The page names the client, the host of the redirect URI that the
        code goes to, and the scopes, and sets the CSRF cookie that its form
        must match. An unknown, expired, approved or denied request gets
        HTTP 400.
        """
        request_id = request.query_params.get(consent.REQUEST_FIELD)
        found = await self.consents.find(request_id)
        if found is None:
            return _consent_error(request, "invalid_request", _EXPIRED_CONSENT)

        client = await self.get_client(found.client_id)
        assert request_id is not None  # find() returns None for a missing id
        csrf_token = consent.new_csrf_token(self._csrf_key, request_id)
        response = consent.consent_page(
            client_id=found.client_id,
            client_name=client.client_name if client is not None else None,
            redirect_uri=found.redirect_uri,
            scopes=found.scopes,
            request_id=request_id,
            csrf_token=csrf_token,
        )
        consent.set_csrf_cookie(
            response,
            csrf_token,
            secure=self._secure_cookies,
            lifetime=self.settings.pending_lifetime,
        )
        return response

    async def handle_consent(self, request: Request) -> Response:
        """Apply the user's decision from the consent form (POST).

        A POST that a browser marks as sent from another site, or whose CSRF
        token does not equal the CSRF cookie or was made for another consent
        request, gets HTTP 400 and nothing changes. Deny deletes the pending
        authorization and sends the user to the client with
        ``error=access_denied``. Approve sets the browser binding cookie and
        sends the user (303) to the upstream provider. A request that is
        unknown, expired, approved or denied already gets HTTP 400.
        """
        if not consent.is_same_origin_post(request.headers, self.settings.issuer):
            logger.warning(
                "rejected a consent form sent from another site (Origin %r, "
                "Sec-Fetch-Site %r)",
                request.headers.get("origin", "")[:200],
                request.headers.get("sec-fetch-site", "")[:50],
                extra={"action": "oauth.consent.cross_site"},
            )
            return _consent_error(
                request,
                "invalid_request",
                "This consent form was sent from another site. Start the sign-in "
                "again from your MCP client.",
            )

        async with request.form(max_files=0, max_fields=10) as form:
            fields = {
                name: value for name, value in form.items() if isinstance(value, str)
            }
        if not consent.csrf_token_matches(
            self._csrf_key,
            fields.get(consent.REQUEST_FIELD),
            request.cookies.get(
                consent.cookie_name(consent.CSRF_COOKIE, secure=self._secure_cookies)
            ),
            fields.get(consent.CSRF_FIELD),
        ):
            logger.warning(
                "rejected a consent form whose CSRF token is missing or does not "
                "match the cookie",
                extra={"action": "oauth.consent.csrf_mismatch"},
            )
            return _consent_error(
                request,
                "invalid_request",
                "This consent form was not sent from this server's consent page, "
                "or its page has expired. Start the sign-in again from your MCP "
                "client.",
            )

        request_id = fields.get(consent.REQUEST_FIELD)
        decision = fields.get(consent.DECISION_FIELD)
        if decision == consent.DENY:
            response = await self._deny(request, request_id)
        elif decision == consent.APPROVE:
            response = await self._approve(request, request_id)
        else:
            return _consent_error(
                request,
                "invalid_request",
                f"The consent form's decision must be {consent.APPROVE!r} or "
                f"{consent.DENY!r}.",
            )
        consent.clear_csrf_cookie(response, secure=self._secure_cookies)
        return response

    async def _deny(self, request: Request, request_id: str | None) -> Response:
        denied = await self.consents.deny(request_id)
        if denied is None:
            return _consent_error(request, "invalid_request", _EXPIRED_CONSENT)
        logger.info(
            "the user denied client %s",
            denied.client_id,
            extra={"action": "oauth.consent.denied", "client_id": denied.client_id},
        )
        target = construct_redirect_uri(
            denied.redirect_uri,
            error="access_denied",
            error_description="the user denied the request",
            state=denied.client_state,
            iss=self.settings.issuer,
        )
        return RedirectResponse(target, 303, headers={"Cache-Control": "no-store"})

    async def _approve(self, request: Request, request_id: str | None) -> Response:
        binding = consent.new_binding()
        approved = await self.consents.approve(request_id, binding)
        if approved is None:
            return _consent_error(request, "invalid_request", _EXPIRED_CONSENT)
        logger.info(
            "the user approved client %s",
            approved.client_id,
            extra={"action": "oauth.consent.approved", "client_id": approved.client_id},
        )
        target = self.upstream.authorization_url(
            state=approved.state,
            code_challenge=pkce_s256_challenge(approved.upstream_verifier),
        )
        response = RedirectResponse(target, 303, headers={"Cache-Control": "no-store"})
        consent.set_binding_cookie(
            response,
            binding,
            secure=self._secure_cookies,
            lifetime=self.settings.pending_lifetime,
        )
        return response

    # Callback

    async def handle_callback(self, request: Request) -> Response:
        """Finish a sign-in when the upstream redirects back (``/oauth/callback``).

        The approved pending authorization is taken (deleted) by the
        ``state`` parameter and the browser binding cookie that approving it
        set. A missing, unknown, expired or used state, and a missing cookie
        or one that does not match, get HTTP 400 and change nothing, so a
        sign-in link opened in another browser than the one that approved it
        issues no code. Every other response deletes the cookie. When the
        upstream provider sent ``error`` or no code, the user goes back to
        the client with ``error=access_denied``. When exchanging the code or
        reading userinfo fails, the user goes back with
        ``error=server_error``. Otherwise this stores a new authorization code
        and redirects to the client with ``code``, its ``state`` and ``iss``
        (RFC 9207).
        """
        query = request.query_params
        state = query.get("state")
        binding = request.cookies.get(
            consent.cookie_name(consent.BINDING_COOKIE, secure=self._secure_cookies)
        )
        pending = await self.consents.take(state, binding)
        if pending is None:
            return await self._reject_callback(request, state, binding)

        response = await self._finish_callback(query, pending)
        consent.clear_binding_cookie(response, secure=self._secure_cookies)
        return response

    async def _reject_callback(
        self, request: Request, state: str | None, binding: str | None
    ) -> Response:
        client_id = await self.consents.approved_client(state)
        if client_id is None:
            logger.info(
                "rejected an upstream callback with a missing, unknown, expired "
                "or already used state",
                extra={"action": "oauth.callback.unknown_state"},
            )
            return _callback_error_page(
                request,
                "invalid_request",
                "This sign-in link has expired or was already used. Start the "
                "sign-in again from your MCP client.",
            )

        problem = (
            "sent no sign-in cookie"
            if binding is None
            else "sent the sign-in cookie of another sign-in"
        )
        logger.warning(
            "rejected the upstream callback of client %s: the browser %s, so the "
            "link was opened in a browser other than the one that approved it, "
            "perhaps sent by someone else",
            client_id,
            problem,
            extra={"action": "oauth.callback.binding_mismatch", "client_id": client_id},
        )
        return _callback_error_page(
            request,
            "invalid_request",
            "This sign-in was approved in another browser. Start the sign-in "
            "again from your MCP client, and approve it in this browser.",
        )

    async def _finish_callback(
        self, query: QueryParams, pending: PendingAuthorization
    ) -> Response:
        """Issue the code of a taken authorization, or redirect its error."""
        upstream_error = query.get("error")
        if upstream_error is not None:
            code = upstream_error if _ERROR_CODE.fullmatch(upstream_error) else "?"
            logger.info(
                "the upstream provider rejected the sign-in of client %s: %s",
                pending.client_id,
                code,
                extra={"action": "oauth.callback.denied"},
            )
            return self._client_error(
                pending,
                "access_denied",
                f"the upstream provider rejected the sign-in ({code})",
            )

        upstream_code = query.get("code")
        if not upstream_code:
            logger.warning(
                "the upstream provider redirected the sign-in of client %s back "
                "with neither a code nor an error",
                pending.client_id,
                extra={"action": "oauth.callback.no_code"},
            )
            return self._client_error(
                pending, "access_denied", "the upstream provider sent no code"
            )

        try:
            tokens = await self.upstream.exchange_code(
                upstream_code, code_verifier=pending.upstream_verifier
            )
            identity = await self.upstream.userinfo(tokens.access_token)
        except UpstreamError as exc:
            logger.warning(
                "signing in client %s at the upstream provider failed: %s",
                pending.client_id,
                exc,
                extra={"action": "oauth.callback.upstream_failed"},
            )
            return self._client_error(
                pending, "server_error", "signing in at the upstream provider failed"
            )

        code = new_token(TokenKind.CODE)
        stored = StoredCode(
            client_id=pending.client_id,
            redirect_uri=pending.redirect_uri,
            redirect_uri_provided_explicitly=pending.redirect_uri_provided_explicitly,
            scopes=pending.scopes,
            code_challenge=pending.code_challenge,
            resource=pending.resource,
            user_id=identity.user_id,
            subscription_level=self._known_level(identity.subscription_level),
            upstream=tokens,
            expires_at=datetime.now(UTC) + self.settings.code_lifetime,
        )
        await self.store.put_code(code, stored)

        logger.info(
            "user %r signed in for client %s",
            identity.user_id,
            pending.client_id,
            extra={"action": "oauth.callback", "client_id": pending.client_id},
        )
        target = construct_redirect_uri(
            pending.redirect_uri,
            code=code,
            state=pending.client_state,
            iss=self.settings.issuer,
        )
        return RedirectResponse(target, 302, headers={"Cache-Control": "no-store"})

    def _known_level(self, level: str) -> str:
        """Return ``level``, or the lowest level when it is not a known one."""
        if level in self.settings.subscription_levels:
            return level
        lowest = self.settings.subscription_levels[0]
        logger.warning(
            "the upstream provider sent the unknown subscription level %r; "
            "using %r, the lowest of MCP_AUTHDB_SUBSCRIPTION_LEVELS",
            level,
            lowest,
        )
        return lowest

    def _client_error(
        self, pending: PendingAuthorization, error: str, description: str
    ) -> Response:
        target = construct_redirect_uri(
            pending.redirect_uri,
            error=error,
            error_description=description,
            state=pending.client_state,
            iss=self.settings.issuer,
        )
        return RedirectResponse(target, 302, headers={"Cache-Control": "no-store"})

    # Authorization codes

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> AuthDBAuthorizationCode | None:
        """Return the code's facts without using it up, or None.

        Returns None also when the code belongs to another client. Expired codes
        are returned, because the SDK's token handler reports the expiry.
        A code that was used already gives None, so the SDK returns
        ``invalid_grant``, and revokes the session family that its first
        use created (RFC 6749 sections 4.1.2 and 10.5).
        """
        stored = await self.store.peek_code(authorization_code)
        if stored is None or stored.client_id != client.client_id:
            return None
        if stored.family_id is not None:
            await self._revoke_code_family(client, stored.family_id)
            return None
        return AuthDBAuthorizationCode(
            code=authorization_code,
            scopes=list(stored.scopes),
            expires_at=stored.expires_at.timestamp(),
            client_id=stored.client_id,
            code_challenge=stored.code_challenge,
            redirect_uri=AnyUrl(stored.redirect_uri),
            redirect_uri_provided_explicitly=stored.redirect_uri_provided_explicitly,
            resource=stored.resource,
            subject=stored.user_id,
            user_id=stored.user_id,
            subscription_level=stored.subscription_level,
        )

    async def exchange_authorization_code(
        self,
        client: OAuthClientInformationFull,
        authorization_code: AuthDBAuthorizationCode,
    ) -> OAuthToken:
        """Exchange the code for a new user session, its grant and its tokens.

        The session, the grant and marking the code used commit in one
        transaction. Raises ``TokenError("invalid_grant")`` when the code
        expired since it was loaded, changing nothing, and when it was used
        since it was loaded, after revoking the session family of that use.
        Raises ``TokenError("invalid_target")`` when the code was issued for
        another resource.
        """
        if not _same_resource(
            authorization_code.resource or "", self.settings.resource
        ):
            raise TokenError(
                "invalid_target",
                f"the authorization code was issued for the resource "
                f"{authorization_code.resource!r}, not {self.settings.resource!r}",
            )
        code = authorization_code.code

        def consume(session: Session) -> Operation[StoredCode]:
            assert session.family_id is not None  # create() always sets one
            stored = yield from self.store.consume_code_operation(
                code, session.family_id
            )
            if stored is None:
                raise _CodeAlreadyUsed()
            return stored

        try:
            issued = await self.sessions.create(
                authorization_code.user_id,
                scopes=authorization_code.scopes,
                subscription_level=authorization_code.subscription_level,
                access_lifetime=self.settings.access_lifetime,
                refresh_lifetime=self.settings.refresh_lifetime,
                then=consume,
            )
        except _CodeAlreadyUsed:
            used = await self.store.peek_code(code)
            if used is not None and used.family_id is not None:
                await self._revoke_code_family(client, used.family_id)
            else:
                logger.info(
                    "client %s presented an authorization code that expired "
                    "after it was loaded",
                    client.client_id,
                    extra={"action": "oauth.token.code_expired"},
                )
            raise TokenError(
                "invalid_grant", "the authorization code was already used or expired"
            ) from None

        session = issued.session
        logger.info(
            "client %s exchanged a code for session %d in family %s of user %r",
            client.client_id,
            session.session_id,
            session.family_id,
            session.user_id,
            extra={"action": "oauth.token.code", "client_id": client.client_id},
        )
        return self._token_response(issued.access_token, issued.refresh_token, session)

    async def _revoke_code_family(
        self, client: OAuthClientInformationFull, family_id: uuid.UUID
    ) -> None:
        """Revoke the session family created by a code that was used again."""
        session_id = await self.store.family_session_id(family_id)
        revoked = 0
        if session_id is not None:
            revoked = await self.sessions.revoke_session(session_id)
        logger.warning(
            "client %s used an authorization code again, so family %s that its "
            "first use created is revoked: %d sessions revoked",
            client.client_id,
            family_id,
            revoked,
            extra={"action": "oauth.token.code_reused", "client_id": client.client_id},
        )

    def _token_response(
        self, access_token: str, refresh_token: str, session: Session
    ) -> OAuthToken:
        return OAuthToken(
            access_token=access_token,
            token_type="Bearer",
            expires_in=int(self.settings.access_lifetime.total_seconds()),
            scope=" ".join(session.scopes) or None,
            refresh_token=refresh_token,
        )

    # Refresh tokens

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> AuthDBRefreshToken | None:
        """Return the refresh token's session facts, or None.

        Returns None for a malformed or unknown token, a revoked one, one of
        a session without a grant, one issued to another client, and one
        issued for another resource (a server with another public URL that
        shares the database). The SDK returns ``invalid_grant`` for all of
        them. A token rotated within the replay window is returned, so that
        exchanging it again revokes its family.
        """
        candidates = self.sessions.hasher.candidates(refresh_token, TokenKind.REFRESH)
        if not candidates:
            return None
        row = await self.store.database.run(
            lambda: _find_refresh(candidates), transaction=False, idempotent=True
        )
        if row is None:
            return None

        session_id, family_id, user_id, scopes, ends_at, client_id, resource = row
        if client_id != client.client_id:
            logger.warning(
                "client %s presented a refresh token of client %s (family %s)",
                client.client_id,
                client_id,
                family_id,
                extra={"action": "oauth.token.wrong_client"},
            )
            return None
        if not _same_resource(resource, self.settings.resource):
            logger.warning(
                "client %s presented a refresh token of family %s, which was "
                "issued for the resource %s, not this server's %s",
                client.client_id,
                family_id,
                resource,
                self.settings.resource,
                extra={"action": "oauth.token.wrong_resource"},
            )
            return None
        return AuthDBRefreshToken(
            token=refresh_token,
            client_id=client_id,
            scopes=list(scopes),
            expires_at=int(ends_at.timestamp()),
            resource=resource,
            subject=user_id,
            user_id=user_id,
            family_id=family_id,
            session_id=session_id,
        )

    async def exchange_refresh_token(
        self,
        client: OAuthClientInformationFull,
        refresh_token: AuthDBRefreshToken,
        scopes: list[str],
    ) -> OAuthToken:
        """Rotate the refresh token: return a new pair in the same family.

        The session store does not narrow scopes, so the new pair keeps the
        session's scopes even when ``scopes`` requests fewer. The response's
        ``scope`` lists the granted ones. Raises
        ``TokenError("invalid_grant")`` for an expired, revoked or replayed
        token, where a replay has revoked the whole family by then, and,
        changing nothing, for a token issued for another resource.
        """
        resource = refresh_token.resource or ""
        if not _same_resource(resource, self.settings.resource):
            raise TokenError(
                "invalid_grant",
                f"the refresh token was issued for the resource {resource!r}, "
                f"not {self.settings.resource!r}; sign in at that server",
            )
        try:
            issued = await self.sessions.refresh(
                refresh_token.token,
                access_lifetime=self.settings.access_lifetime,
                refresh_lifetime=self.settings.refresh_lifetime,
            )
        except InvalidGrantError as exc:
            raise TokenError("invalid_grant", str(exc)) from None
        return self._token_response(
            issued.access_token, issued.refresh_token, issued.session
        )

    # Access tokens

    async def load_access_token(self, token: str) -> AuthDBAccessToken | None:
        """Return the facts of a valid access token, or None.

        Valid means the session store validates it, its family has a grant,
        and the grant is for :attr:`ProviderSettings.resource` (RFC 8707): a
        token issued by a server with another public URL over the same
        database is not valid here. The grant's client and resource are
        cached per family, since they never change.
        """
        session = await self.sessions.validate(token)
        if session is None or session.family_id is None:
            return None
        facts = await self._grant_facts(session.family_id)
        if facts is None:
            return None
        if not _same_resource(facts.resource, self.settings.resource):
            logger.warning(
                "rejected an access token of session family %s: it was issued "
                "for the resource %s, not %s",
                session.family_id,
                facts.resource,
                self.settings.resource,
                extra={"action": "provider.access_token_other_resource"},
            )
            return None
        return AuthDBAccessToken(
            token=token,
            client_id=facts.client_id,
            scopes=list(session.scopes),
            expires_at=int(session.expires_at.timestamp()),
            resource=facts.resource,
            subject=session.user_id,
            user_id=session.user_id,
            subscription_level=session.subscription_level,
            family_id=session.family_id,
            session_id=session.session_id,
        )

    async def _grant_facts(self, family_id: uuid.UUID) -> _GrantFacts | None:
        facts = self._grants.get(family_id)
        if facts is not None:
            self._grants.move_to_end(family_id)
            return facts
        grant = await self.store.get_grant(family_id)
        if grant is None:
            return None
        facts = _GrantFacts(grant.client_id, grant.resource)
        self._grants[family_id] = facts
        while len(self._grants) > GRANT_CACHE_SIZE:
            self._grants.popitem(last=False)
        return facts

    async def revoke_token(self, token: AuthDBAccessToken | AuthDBRefreshToken) -> None:
        """Revoke the family of ``token``. An unknown token revokes nothing."""
        revoked = await self.sessions.revoke_token(token.token)
        logger.info(
            "client %s revoked a token: %d sessions revoked",
            token.client_id,
            revoked,
            extra={"action": "oauth.revoke", "client_id": token.client_id},
        )


def _check_authorize_text(params: AuthorizationParams) -> None:
    """Raise ``AuthorizeError`` for a challenge or state that cannot be stored."""
    challenge = params.code_challenge
    if len(challenge) > _MAX_CODE_CHALLENGE_LENGTH:
        raise AuthorizeError(
            "invalid_request",
            f"code_challenge is {len(challenge)} characters long; "
            "an S256 challenge is 43",
        )
    if "\x00" in challenge:
        raise AuthorizeError(
            "invalid_request",
            "code_challenge contains a NUL character; send the base64url "
            "S256 challenge",
        )
    state = params.state
    if state is None:
        return
    if len(state) > MAX_CLIENT_STATE_LENGTH:
        raise AuthorizeError(
            "invalid_request",
            f"state is {len(state)} characters long; send at most "
            f"{MAX_CLIENT_STATE_LENGTH}",
        )
    if "\x00" in state:
        raise AuthorizeError(
            "invalid_request",
            "state contains a NUL character; send printable characters only",
        )


def _same_resource(first: str, second: str) -> bool:
    """Return whether two resource URLs are equal, ignoring one trailing slash."""
    return first.removesuffix("/") == second.removesuffix("/")


_EXPIRED_CONSENT = (
    "This consent request has expired or was already answered. Start the "
    "sign-in again from your MCP client."
)


def _consent_error(request: Request, error: str, message: str) -> Response:
    """Return HTTP 400 for the consent page, which may not be framed either."""
    return _callback_error_page(
        request, error, message, headers=consent.PAGE_HEADERS, title="Consent failed"
    )


def _callback_error_page(
    request: Request,
    error: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    title: str = "Sign-in failed",
) -> Response:
    """Return HTTP 400 as JSON to clients that accept JSON, else as HTML."""

    headers = dict(headers or {"Cache-Control": "no-store"})
    if "application/json" in request.headers.get("accept", ""):
        body = {"error": error, "error_description": message}
        return JSONResponse(body, status_code=400, headers=headers)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}"
        f"</title></head><body><h1>{title}</h1><p>{html.escape(message)}"
        "</p></body></html>"
    )
    return HTMLResponse(page, status_code=400, headers=headers)
