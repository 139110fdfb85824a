"""Client of the upstream OAuth provider that users sign in at.

The upstream is Drupal Simple OAuth by default: an OAuth 2.0 authorization
server with the authorization code grant (PKCE S256), refresh tokens that it
rotates on every use, a userinfo endpoint, and a JSON-RPC 2.0 endpoint that
serves content. :class:`UpstreamConfig` reads where it is and who this server
is to it from the environment, and :class:`UpstreamClient` makes the calls.

Every response body is read with a size cap (1 MiB by default), and every
call has a total time limit. Redirects are never followed. No error message
or log line of this module contains a token, the client secret, a code or a
PKCE verifier.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import itertools
import json
import logging
import math
import re
import secrets
import time
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import httpx2

from mcp_authdb.db.settings import parse_flag
from mcp_authdb.errors import AuthDBError, ConfigurationError
from mcp_authdb.server.oauth_store import UpstreamTokens
from mcp_authdb.store.sessions import (
    SUBSCRIPTION_LEVEL_MAX_LENGTH,
    USER_ID_MAX_LENGTH,
)

logger = logging.getLogger(__name__)

DEFAULT_SCOPES = (
    "content:read",
    "content:search",
    "content:meta",
    "jsonrpc:discovery",
    "jsonrpc:execute",
)
DEFAULT_USER_ID_CLAIM = "sub"
DEFAULT_LEVEL_CLAIM = "subscription_level"
DEFAULT_LEVEL = "free"
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 300.0
MAX_RESPONSE_BYTES = 1024 * 1024

# The paths of Drupal Simple OAuth and of the Drupal JSON-RPC module, below
# DRUPAL_BASE_URL.
AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_PATH = "/oauth/token"
USERINFO_PATH = "/oauth/userinfo"
JSONRPC_PATH = "/jsonrpc"

# scope-token of RFC 6749, section 3.3.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
# How many characters of an upstream's error text a message repeats.
_ERROR_TEXT_LENGTH = 200
# The maximum token lifetime accepted from the upstream provider. A longer
# expires_in, up to infinity, is cut to this.
MAX_EXPIRES_IN = timedelta(days=365)
# RFC 6749, appendix A.12 and A.17: access and refresh tokens are 1*VSCHAR,
# the printable ASCII characters and space.
_VSCHAR_TOKEN = re.compile(r"[\x20-\x7e]+")
_LOOPBACK_NAMES = ("localhost",)


class UpstreamError(AuthDBError):
    """A call to the upstream provider failed.

    ``error`` is the OAuth ``error`` code the upstream sent (such as
    ``invalid_grant``), or None when it sent none. ``status_code`` is the
    HTTP status of its response, or None when no response arrived (timeout,
    connection failure). The message never contains a token, the client
    secret, a code or a PKCE verifier.
    """

    def __init__(
        self, message: str, *, error: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.error = error
        self.status_code = status_code


class JsonRpcError(UpstreamError):
    """The JSON-RPC endpoint returned an error object for the call.

    ``code`` and ``rpc_message`` are the error object's ``code`` and
    ``message``, and ``data`` is its optional ``data`` member.
    """

    def __init__(self, message: str, *, code: int, rpc_message: str, data: Any) -> None:
        super().__init__(message, error=str(code), status_code=200)
        self.code = code
        self.rpc_message = rpc_message
        self.data = data


@dataclasses.dataclass(frozen=True)
class UpstreamIdentity:
    """The user signed in at the upstream, as its userinfo endpoint describes them.

    ``scopes`` are the scopes in the userinfo ``scope`` claim, empty when the
    upstream sends none.
    """

    user_id: str
    subscription_level: str
    scopes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    """The upstream provider's endpoints and this server's client settings there.

    Building one checks every field and raises :class:`ConfigurationError`
    naming the environment variable of a bad value. ``repr`` leaves the
    client secret out.
    """

    authorize_url: str
    token_url: str
    userinfo_url: str
    jsonrpc_url: str
    client_id: str
    redirect_uri: str
    client_secret: str | None = dataclasses.field(default=None, repr=False)
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    user_id_claim: str = DEFAULT_USER_ID_CLAIM
    level_claim: str = DEFAULT_LEVEL_CLAIM
    default_level: str = DEFAULT_LEVEL
    timeout_s: float = DEFAULT_TIMEOUT_S
    pkce: bool = True
    max_response_bytes: int = MAX_RESPONSE_BYTES

    def __post_init__(self) -> None:
        for name, url in (
            ("UPSTREAM_AUTHORIZE_URL", self.authorize_url),
            ("UPSTREAM_TOKEN_URL", self.token_url),
            ("UPSTREAM_USERINFO_URL", self.userinfo_url),
            ("UPSTREAM_JSONRPC_URL", self.jsonrpc_url),
            ("OAUTH_REDIRECT_URI", self.redirect_uri),
        ):
            check_url(name, url)

        if not self.client_id:
            raise ConfigurationError(
                "OAUTH_CLIENT_ID is empty; set it to the client id of this server "
                "at the upstream provider"
            )
        if self.client_secret == "":
            raise ConfigurationError(
                "OAUTH_CLIENT_SECRET is empty; set it to the client secret, or "
                "unset it when the upstream client is public"
            )
        if not self.scopes:
            raise ConfigurationError(
                "UPSTREAM_SCOPES is empty; set it to space-separated scopes, or "
                "unset it to use " + " ".join(DEFAULT_SCOPES)
            )
        for scope in self.scopes:
            if not _SCOPE_TOKEN.fullmatch(scope):
                raise ConfigurationError(
                    f"UPSTREAM_SCOPES contains {scope!r}, which is not an OAuth "
                    "scope; use printable ASCII without quotes or backslashes, "
                    "separated by spaces"
                )
        for name, claim in (
            ("UPSTREAM_USER_ID_CLAIM", self.user_id_claim),
            ("UPSTREAM_LEVEL_CLAIM", self.level_claim),
        ):
            if not claim:
                raise ConfigurationError(
                    f"{name} is empty; set it to the name of a userinfo claim"
                )
        if not 1 <= len(self.default_level) <= SUBSCRIPTION_LEVEL_MAX_LENGTH:
            raise ConfigurationError(
                f"UPSTREAM_DEFAULT_LEVEL={self.default_level!r} is invalid; set it "
                f"to a level name of 1 to {SUBSCRIPTION_LEVEL_MAX_LENGTH} "
                f"characters, or unset it to use {DEFAULT_LEVEL!r}"
            )
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ConfigurationError(
                f"UPSTREAM_TIMEOUT={self.timeout_s} is out of range; set it to "
                f"seconds above 0 and at most {MAX_TIMEOUT_S:g}, or unset it to "
                f"use {DEFAULT_TIMEOUT_S:g}"
            )
        if self.max_response_bytes < 1:
            raise ConfigurationError(
                f"max_response_bytes={self.max_response_bytes} is invalid; it "
                "must be at least 1"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], *, default_redirect_uri: str
    ) -> UpstreamConfig:
        """Read the upstream settings from ``environ``.

        ``DRUPAL_BASE_URL`` gives the default of the four endpoint URLs,
        each of which its own variable overrides, so it may be unset only
        when all four are set. ``default_redirect_uri`` is used when
        ``OAUTH_REDIRECT_URI`` is unset: the callback route of this server's
        public URL. Empty variables count as unset. Raises
        :class:`ConfigurationError` naming the variable of a missing or
        invalid value, without echoing the client secret.
        """

        def get(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        base = get("DRUPAL_BASE_URL")
        if base is not None:
            check_url("DRUPAL_BASE_URL", base)
            base = base.rstrip("/")

        def endpoint(name: str, path: str) -> str:
            value = get(name)
            if value is not None:
                return value
            if base is None:
                raise ConfigurationError(
                    f"DRUPAL_BASE_URL is not set, so {name} has no default; set "
                    "DRUPAL_BASE_URL to the upstream's address, such as "
                    "https://drupal.example.com, or set all four of "
                    "UPSTREAM_AUTHORIZE_URL, UPSTREAM_TOKEN_URL, "
                    "UPSTREAM_USERINFO_URL and UPSTREAM_JSONRPC_URL"
                )
            return base + path

        authorize_url = endpoint("UPSTREAM_AUTHORIZE_URL", AUTHORIZE_PATH)
        token_url = endpoint("UPSTREAM_TOKEN_URL", TOKEN_PATH)
        userinfo_url = endpoint("UPSTREAM_USERINFO_URL", USERINFO_PATH)
        jsonrpc_url = endpoint("UPSTREAM_JSONRPC_URL", JSONRPC_PATH)

        client_id = get("OAUTH_CLIENT_ID")
        if client_id is None:
            raise ConfigurationError(
                "OAUTH_CLIENT_ID is not set; set it to the client id of this "
                "server at the upstream provider (in Drupal: Simple OAuth > "
                "Clients)"
            )

        scopes_text = get("UPSTREAM_SCOPES")
        return cls(
            authorize_url=authorize_url,
            token_url=token_url,
            userinfo_url=userinfo_url,
            jsonrpc_url=jsonrpc_url,
            client_id=client_id,
            client_secret=get("OAUTH_CLIENT_SECRET"),
            redirect_uri=get("OAUTH_REDIRECT_URI") or default_redirect_uri,
            scopes=tuple(scopes_text.split()) if scopes_text else DEFAULT_SCOPES,
            user_id_claim=get("UPSTREAM_USER_ID_CLAIM") or DEFAULT_USER_ID_CLAIM,
            level_claim=get("UPSTREAM_LEVEL_CLAIM") or DEFAULT_LEVEL_CLAIM,
            default_level=get("UPSTREAM_DEFAULT_LEVEL") or DEFAULT_LEVEL,
            timeout_s=_parse_seconds("UPSTREAM_TIMEOUT", get("UPSTREAM_TIMEOUT")),
            pkce=parse_flag("UPSTREAM_PKCE", get("UPSTREAM_PKCE"), default=True),
        )


def check_url(name: str, url: str) -> None:
    """Raise :class:`ConfigurationError` unless ``url`` is fit for an endpoint.

    It must be an absolute https URL, or an http URL whose host is loopback
    (127.0.0.0/8, ::1 or localhost), without a fragment. ``name`` is the
    environment variable named in the message.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigurationError(
            f"{name}={_url_for_message(url)!r} is not a valid URL ({exc}); write "
            "it as https://host/path"
        ) from None

    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(
            f"{name}={_url_for_message(url)!r} is not an absolute http(s) URL; "
            "write it as https://host/path"
        )
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigurationError(
            f"{name}={_url_for_message(url)!r} uses http on a host that is not "
            "loopback, which would send tokens in clear text; use https"
        )
    if parts.fragment:
        raise ConfigurationError(
            f"{name}={_url_for_message(url)!r} has a fragment; remove the part from '#'"
        )


def is_loopback_host(host: str) -> bool:
    """Return whether ``host`` (a name or an IP address) is this machine."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_pkce_pair() -> tuple[str, str]:
    """Return a new PKCE ``(code_verifier, code_challenge)`` for method S256.

    The verifier is 43 characters of base64url (256 random bits), as RFC
    7636, section 4.1 recommends.
    """
    verifier = secrets.token_urlsafe(32)
    return verifier, pkce_s256_challenge(verifier)


def pkce_s256_challenge(verifier: str) -> str:
    """Return the S256 ``code_challenge`` of ``verifier`` (RFC 7636, 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class UpstreamClient:
    """The calls this server makes to the upstream provider.

    One instance per process: it keeps one HTTP connection pool. Use it as an
    async context manager, or call :meth:`aclose` when done. Methods raise
    :class:`UpstreamError` for any failure: no response within
    ``timeout_s`` (for the whole call), a connection failure, an error or
    redirect status, a body over ``max_response_bytes``, or a body that is not
    the expected JSON.

    Proxy variables (``HTTPS_PROXY``, ``NO_PROXY``) apply unless every
    endpoint is on loopback, because a proxy would reach its own loopback
    instead of this machine's.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        """Create the client. Tests pass a ``transport`` in place of the network."""
        self.config = config
        urls = (
            config.authorize_url,
            config.token_url,
            config.userinfo_url,
            config.jsonrpc_url,
        )
        all_loopback = all(
            is_loopback_host(urlsplit(url).hostname or "") for url in urls
        )
        self._http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(config.timeout_s),
            follow_redirects=False,
            trust_env=not all_loopback,
            transport=transport,
            headers={"Accept": "application/json"},
        )
        self._rpc_ids = itertools.count(1)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def authorization_url(
        self,
        *,
        state: str,
        code_challenge: str | None,
        scopes: Iterable[str] | None = None,
    ) -> str:
        """Return the URL of the upstream's authorize endpoint for one sign-in.

        ``scopes`` defaults to the configured scopes. With PKCE on (the
        default), ``code_challenge`` is required and sent with method S256.
        With PKCE off it is ignored. Query parameters already in the
        configured authorize URL are kept.
        """
        scope_list = tuple(self.config.scopes if scopes is None else scopes)
        params = [
            ("response_type", "code"),
            ("client_id", self.config.client_id),
            ("redirect_uri", self.config.redirect_uri),
            ("scope", " ".join(scope_list)),
            ("state", state),
        ]
        if self.config.pkce:
            if not code_challenge:
                raise ValueError(
                    "code_challenge is required because UPSTREAM_PKCE is on; make "
                    "one with new_pkce_pair()"
                )
            params += [
                ("code_challenge", code_challenge),
                ("code_challenge_method", "S256"),
            ]

        parts = urlsplit(self.config.authorize_url)
        query = parse_qsl(parts.query, keep_blank_values=True) + params
        return urlunsplit(parts._replace(query=urlencode(query)))

    async def exchange_code(
        self, code: str, *, code_verifier: str | None
    ) -> UpstreamTokens:
        """Exchange an authorization code from the upstream's callback for tokens.

        ``code_verifier`` is required and sent when PKCE is on. The
        client authenticates with ``client_secret_post`` when a secret is
        configured. Raises :class:`UpstreamError` with the upstream's
        ``error`` (such as ``invalid_grant``) when it rejects the code.
        """
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.config.redirect_uri,
        }
        hidden = [code]
        if self.config.pkce:
            if not code_verifier:
                raise ValueError(
                    "code_verifier is required because UPSTREAM_PKCE is on; pass "
                    "the verifier of the challenge sent to the authorize endpoint"
                )
            form["code_verifier"] = code_verifier
            hidden.append(code_verifier)

        return await self._token_request(form, hidden, previous_refresh=None)

    async def refresh(self, tokens: UpstreamTokens) -> UpstreamTokens:
        """Get new upstream tokens with the refresh token of ``tokens``.

        The upstream may rotate the refresh token: the new one is returned,
        and the old one stops working. When the response has no refresh
        token, the old one is kept. Raises :class:`UpstreamError` when
        ``tokens`` has no refresh token, or with ``error="invalid_grant"``
        when the upstream rejects it, so the user must sign in again.
        """
        if tokens.refresh_token is None:
            raise UpstreamError(
                "the upstream tokens have no refresh token, so they cannot be "
                "refreshed; the user must sign in again",
                error="invalid_grant",
            )

        form = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
        return await self._token_request(
            form, [tokens.refresh_token], previous_refresh=tokens.refresh_token
        )

    async def userinfo(self, access_token: str) -> UpstreamIdentity:
        """Fetch who owns ``access_token`` from the userinfo endpoint.

        The user id is the claim ``user_id_claim`` (a string, or a number
        turned into one). The level is the claim ``level_claim``, or
        ``default_level`` when that claim is absent, null or empty. Raises
        :class:`UpstreamError` when the user id is missing or either claim
        has an unusable value, naming the claim and the variable to change.
        """
        body = await self._request_json(
            "userinfo endpoint",
            "GET",
            self.config.userinfo_url,
            headers={"Authorization": f"Bearer {access_token}"},
            hidden=[access_token],
        )
        if not isinstance(body, dict):
            raise UpstreamError(
                "the upstream userinfo endpoint returned JSON that is not an "
                "object; check UPSTREAM_USERINFO_URL"
            )

        return UpstreamIdentity(
            user_id=self._user_id_from(body),
            subscription_level=self._level_from(body),
            scopes=_scopes_from(body.get("scope")),
        )

    async def call_jsonrpc(
        self, access_token: str, method: str, params: dict[str, Any]
    ) -> Any:
        """Call ``method`` at the upstream JSON-RPC 2.0 endpoint and return its result.

        The call is authorized with ``access_token`` as a bearer token.
        Raises :class:`JsonRpcError` when the endpoint returns an error
        object, and :class:`UpstreamError` for any other failure, such as
        status 401 (``error="invalid_token"``) for a token it rejects.
        """
        request_id = next(self._rpc_ids)
        payload = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": method,
            "params": params,
        }
        body = await self._request_json(
            "JSON-RPC endpoint",
            "POST",
            self.config.jsonrpc_url,
            headers={"Authorization": f"Bearer {access_token}"},
            json_body=payload,
            hidden=[access_token],
        )
        if not isinstance(body, dict) or body.get("jsonrpc") != "2.0":
            raise UpstreamError(
                f"the upstream JSON-RPC endpoint returned no JSON-RPC 2.0 response "
                f"to {method!r}; check UPSTREAM_JSONRPC_URL"
            )
        if body.get("id") != request_id:
            raise UpstreamError(
                f"the upstream JSON-RPC response to {method!r} has id "
                f"{_printable(body.get('id'))}, expected {request_id}"
            )

        error = body.get("error")
        if error is not None:
            raise _json_rpc_error(method, error, [access_token])
        if "result" not in body:
            raise UpstreamError(
                f"the upstream JSON-RPC response to {method!r} has neither a "
                "result nor an error"
            )
        return body["result"]

    async def _token_request(
        self, form: dict[str, str], hidden: list[str], *, previous_refresh: str | None
    ) -> UpstreamTokens:
        form["client_id"] = self.config.client_id
        if self.config.client_secret is not None:
            form["client_secret"] = self.config.client_secret
            hidden = [*hidden, self.config.client_secret]

        issued_at = datetime.now(UTC)
        body = await self._request_json(
            "token endpoint", "POST", self.config.token_url, form=form, hidden=hidden
        )
        return _tokens_from(body, issued_at, previous_refresh)

    async def _request_json(
        self,
        endpoint: str,
        method: str,
        url: str,
        *,
        hidden: list[str],
        headers: dict[str, str] | None = None,
        form: dict[str, str] | None = None,
        json_body: Any = None,
    ) -> Any:
        """Send one request and return its JSON body, or raise UpstreamError.

        ``hidden`` lists the secret values of the request, which are replaced
        with ``***`` wherever the upstream's error text repeats them.
        """
        started = time.monotonic()
        status, content = await self._send(
            endpoint, method, url, headers=headers, form=form, json_body=json_body
        )
        logger.debug(
            "upstream %s returned status %d in %.0f ms",
            endpoint,
            status,
            (time.monotonic() - started) * 1000,
        )

        try:
            body = json.loads(content) if content else None
        except (ValueError, RecursionError):
            # RecursionError: JSON nested deeper than the parser's limit.
            body = None

        if 300 <= status < 400:
            raise UpstreamError(
                f"the upstream {endpoint} returned redirect status {status}, "
                "which is not followed; set its URL to the final address",
                status_code=status,
            )
        if status >= 400:
            raise _status_error(endpoint, status, body, hidden)
        if body is None:
            raise UpstreamError(
                f"the upstream {endpoint} returned status {status} without a JSON "
                "body; check that its URL points at the provider's endpoint",
                status_code=status,
            )
        return body

    async def _send(
        self,
        endpoint: str,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None,
        form: dict[str, str] | None,
        json_body: Any,
    ) -> tuple[int, bytes]:
        """Send one request and return its status and body, read with the cap."""
        limit = self.config.max_response_bytes
        try:
            with anyio.fail_after(self.config.timeout_s):
                async with self._http.stream(
                    method, url, headers=headers, data=form, json=json_body
                ) as response:
                    declared = response.headers.get("Content-Length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise _too_large(endpoint, limit, response.status_code)

                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise _too_large(endpoint, limit, response.status_code)
                        chunks.append(chunk)
                    return response.status_code, b"".join(chunks)
        except (TimeoutError, httpx2.TimeoutException):
            raise UpstreamError(
                f"the upstream {endpoint} timed out after "
                f"{self.config.timeout_s:g} s; check that it is up, or raise "
                "UPSTREAM_TIMEOUT"
            ) from None
        except httpx2.HTTPError as exc:
            # The message of an httpx2 transport error names the failure, such
            # as a refused connection. It does not contain the request body.
            raise UpstreamError(
                f"the request to the upstream {endpoint} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        except UnicodeError as exc:
            # A header or form value that cannot be encoded. The message of
            # the error quotes the value, which may be a token, so it is left
            # out.
            raise UpstreamError(
                f"the request to the upstream {endpoint} was not sent because a "
                f"header or form value is not encodable ({type(exc).__name__})"
            ) from None

    def _user_id_from(self, claims: dict[str, Any]) -> str:
        claim = self.config.user_id_claim
        value = claims.get(claim)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is None or value == "":
            raise UpstreamError(
                f"the upstream userinfo response has no {claim!r} claim, so the "
                "user cannot be identified; set UPSTREAM_USER_ID_CLAIM to the "
                "claim that carries the user id"
            )
        if not isinstance(value, str) or len(value) > USER_ID_MAX_LENGTH:
            raise UpstreamError(
                f"the upstream userinfo claim {claim!r} is not a string of at most "
                f"{USER_ID_MAX_LENGTH} characters; set UPSTREAM_USER_ID_CLAIM to "
                "the claim that carries the user id"
            )
        if not value.strip() or not _is_storable_text(value):
            raise UpstreamError(
                f"the upstream userinfo claim {claim!r} is blank or contains a "
                "control character or a lone surrogate, so it cannot be a user id; "
                "set UPSTREAM_USER_ID_CLAIM to the claim that carries the user id"
            )
        return value

    def _level_from(self, claims: dict[str, Any]) -> str:
        claim = self.config.level_claim
        value = claims.get(claim)
        if value is None or value == "":
            return self.config.default_level
        if not isinstance(value, str) or len(value) > SUBSCRIPTION_LEVEL_MAX_LENGTH:
            raise UpstreamError(
                f"the upstream userinfo claim {claim!r} is not a string of at most "
                f"{SUBSCRIPTION_LEVEL_MAX_LENGTH} characters; set "
                "UPSTREAM_LEVEL_CLAIM to the claim that carries the level name"
            )
        if not _is_storable_text(value):
            raise UpstreamError(
                f"the upstream userinfo claim {claim!r} contains a control "
                "character or a lone surrogate, so it cannot be a level name; set "
                "UPSTREAM_LEVEL_CLAIM to the claim that carries the level name"
            )
        return value


def _tokens_from(
    body: Any, issued_at: datetime, previous_refresh: str | None
) -> UpstreamTokens:
    """Build UpstreamTokens from a token response body (RFC 6749, 5.1)."""
    if not isinstance(body, dict):
        raise UpstreamError(
            "the upstream token endpoint returned JSON that is not an object"
        )

    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise UpstreamError("the upstream token response has no access_token")
    if not _VSCHAR_TOKEN.fullmatch(access):
        raise UpstreamError(
            "the upstream token response has an access_token with characters "
            "outside printable ASCII, which RFC 6749 does not allow"
        )

    token_type = body.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise UpstreamError(
            f"the upstream token response has token_type {_printable(token_type)}; "
            "only Bearer tokens are supported"
        )

    refresh = body.get("refresh_token")
    if refresh is not None and (
        not isinstance(refresh, str) or not _VSCHAR_TOKEN.fullmatch(refresh)
    ):
        raise UpstreamError(
            "the upstream token response has an invalid refresh_token: it must be "
            "a non-empty string of printable ASCII (RFC 6749)"
        )

    expires_in = body.get("expires_in")
    expires_at = None
    if expires_in is not None:
        if (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or (isinstance(expires_in, float) and math.isnan(expires_in))
        ):
            raise UpstreamError(
                f"the upstream token response has expires_in "
                f"{_printable(expires_in)}, which is not a number of seconds"
            )
        # Compared before float(), which overflows on a huge int.
        seconds = min(max(0, expires_in), MAX_EXPIRES_IN.total_seconds())
        expires_at = issued_at + timedelta(seconds=float(seconds))

    return UpstreamTokens(
        access_token=access,
        refresh_token=refresh if refresh is not None else previous_refresh,
        issued_at=issued_at,
        expires_at=expires_at,
    )


def _status_error(
    endpoint: str, status: int, body: Any, hidden: list[str]
) -> UpstreamError:
    """Build the error of an error status, with the OAuth error when sent."""
    error = None
    description = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            error = _scrub(body["error"], hidden)
        if isinstance(body.get("error_description"), str):
            description = _scrub(body["error_description"], hidden)
    if error is None and status == 401:
        error = "invalid_token"

    message = f"the upstream {endpoint} returned status {status}"
    if error is not None:
        message += f" with error {error!r}"
    if description:
        message += f": {description}"
    return UpstreamError(message, error=error, status_code=status)


def _json_rpc_error(method: str, error: Any, hidden: list[str]) -> JsonRpcError:
    if not isinstance(error, dict):
        error = {}
    code = error.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        code = -32603
    text = error.get("message")
    rpc_message = _scrub(text, hidden) if isinstance(text, str) else ""
    return JsonRpcError(
        f"the upstream JSON-RPC call {method!r} failed with error {code}: "
        f"{rpc_message or '(no message)'}",
        code=code,
        rpc_message=rpc_message,
        data=error.get("data"),
    )


def _too_large(endpoint: str, limit: int, status: int) -> UpstreamError:
    return UpstreamError(
        f"the upstream {endpoint} sent a response over the {limit} byte limit; "
        "the response was not read",
        status_code=status,
    )


def _scrub(text: str, hidden: list[str]) -> str:
    """Return ``text`` shortened and printable, with each hidden value as ``***``."""
    for value in sorted(hidden, key=len, reverse=True):
        if value:
            text = text.replace(value, "***")
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > _ERROR_TEXT_LENGTH:
        text = text[:_ERROR_TEXT_LENGTH] + "..."
    return text


def _printable(value: Any) -> str:
    """Return a short repr of an upstream value for a message."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        # A deeply nested list or dict, or an int over the digit limit of
        # int-to-str conversion.
        return f"(a {type(value).__name__} too large to show)"
    return text if len(text) <= 60 else text[:60] + "..."


def _is_storable_text(value: str) -> bool:
    """Return whether ``value`` has no control character and no lone surrogate.

    PostgreSQL text rejects NUL, UTF-8 cannot encode a lone surrogate, and
    other control characters have no place in an identifier.
    """
    return not any(unicodedata.category(char) in ("Cc", "Cs") for char in value)


def _scopes_from(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list):
        return tuple(item for item in value if isinstance(item, str))
    return ()


def _url_for_message(url: str) -> str:
    """Return ``url`` without user info, query and fragment, which may be secret."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "(unparsable)"


def _parse_seconds(name: str, value: str | None) -> float:
    if value is None:
        return DEFAULT_TIMEOUT_S
    if not _DECIMAL.fullmatch(value):
        raise ConfigurationError(
            f"{name}={value!r} is not a number of seconds; set it to a number "
            f"such as 10 or 2.5, or unset it to use {DEFAULT_TIMEOUT_S:g}"
        )
    return float(value)
