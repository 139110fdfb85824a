"""A development identity provider, served by ``mcp-authdb serve --dev``.

It plays the upstream provider so that the whole sign-in works on one
machine without Drupal. Its login page has fields for a user id and a
subscription level, and none for a password. Anyone who can reach it signs
in as anyone, so it serves loopback public URLs only. Its endpoints mirror
those of Drupal Simple OAuth below ``/dev``:

- ``GET /dev/oauth/authorize``: the login page. ``POST``: redirects to the
  redirect URI with ``code`` and ``state``.
- ``POST /dev/oauth/token``: ``authorization_code`` (PKCE S256 required) and
  ``refresh_token``, which rotates the refresh token.
- ``GET`` or ``POST /dev/oauth/userinfo``: ``sub``, ``subscription_level``
  and ``scope``.
- ``POST /dev/jsonrpc``: JSON-RPC 2.0 with ``content.search``, which returns
  a few made-up articles and rejects the ``free`` level.

Codes and tokens are HMAC-signed JSON. The server passes a signing key
derived from its encryption key, so tokens outlive a restart. Without one,
it generates a random key, and the tokens stop working when the process
restarts.
The process remembers used codes and rotated refresh tokens until they
expire, so each works once within it. The provider accepts any client id,
as a public client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
import time
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from mcp_authdb.errors import ConfigurationError
from mcp_authdb.server.upstream import is_loopback_host, pkce_s256_challenge
from mcp_authdb.store.sessions import USER_ID_MAX_LENGTH

logger = logging.getLogger(__name__)

DEV_LEVELS = ("free", "plus", "pro")
DEV_DEFAULT_USER = "dev-user"
CODE_LIFETIME_S = 60
ACCESS_LIFETIME_S = 3600
REFRESH_LIFETIME_S = 30 * 24 * 3600
MAX_SEARCH_LIMIT = 50
CALLBACK_PATH = "/oauth/callback"

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A PKCE code_verifier or code_challenge, RFC 7636, section 4.1.
_PKCE_VALUE = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_ARTICLES = (
    ("dev/1", "Getting started with the development server"),
    ("dev/2", "Signing in through the development identity provider"),
    ("dev/3", "Subscription levels and what they unlock"),
    ("dev/4", "Searching content over JSON-RPC"),
)
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class _AuthorizeRequestError(Exception):
    """An invalid authorization request whose error must not be redirected."""


class DevIdentityProvider:
    """The state of the development identity provider: its key and used tokens.

    ``public_url`` is the MCP server's public URL. The only redirect URI
    accepted is ``redirect_uri``, by default ``{origin}/oauth/callback`` of
    the public URL. ``signing_key`` signs codes and tokens (default: random
    bytes made now). Raises :class:`ConfigurationError` unless the public
    URL is on a loopback host.
    """

    def __init__(
        self,
        public_url: str,
        *,
        redirect_uri: str | None = None,
        access_lifetime_s: int = ACCESS_LIFETIME_S,
        signing_key: bytes | None = None,
    ) -> None:
        parts = urlsplit(public_url)
        if parts.scheme not in _DEFAULT_PORTS or not is_loopback_host(
            parts.hostname or ""
        ):
            raise ConfigurationError(
                f"the development identity provider requires a loopback public URL, "
                f"not {public_url!r}, because it signs in anyone without a "
                "password. Use http://127.0.0.1:PORT/mcp"
            )

        origin = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self.redirect_uri = redirect_uri or origin + CALLBACK_PATH
        self.access_lifetime_s = access_lifetime_s
        self._key = signing_key or secrets.token_bytes(32)
        # Token ids that were used (codes) or rotated (refresh tokens), with
        # the time they expire anyway, after which they are forgotten.
        self._spent: dict[str, float] = {}

    def routes(self) -> list[Route]:
        """Return the Starlette routes, with paths starting ``/dev/``."""
        return [
            Route("/dev/oauth/authorize", self.authorize_page, methods=["GET"]),
            Route("/dev/oauth/authorize", self.authorize_submit, methods=["POST"]),
            Route("/dev/oauth/token", self.token, methods=["POST"]),
            Route("/dev/oauth/userinfo", self.userinfo, methods=["GET", "POST"]),
            Route("/dev/jsonrpc", self.jsonrpc, methods=["POST"]),
        ]

    async def authorize_page(self, request: Request) -> Response:
        """Show the login form for a valid authorization request."""
        params = dict(request.query_params)
        rejection = self._authorize_rejection(params)
        if rejection is not None:
            return rejection

        return HTMLResponse(_login_page(params), headers=_PAGE_HEADERS)

    async def authorize_submit(self, request: Request) -> Response:
        """Issue a code for the user and level of the login form, and redirect."""
        form = await request.form()
        params = {key: value for key, value in form.items() if isinstance(value, str)}
        rejection = self._authorize_rejection(params)
        if rejection is not None:
            return rejection

        user_id = params.get("user_id", "").strip()
        level = params.get("subscription_level", "")
        if not user_id or len(user_id) > USER_ID_MAX_LENGTH:
            return _error_page(
                f"The user id must have 1 to {USER_ID_MAX_LENGTH} characters; go "
                "back and enter one."
            )
        if level not in DEV_LEVELS:
            return _error_page(
                f"The subscription level must be one of {', '.join(DEV_LEVELS)}."
            )

        code = self._sign(
            "code",
            CODE_LIFETIME_S,
            sub=user_id,
            lvl=level,
            scp=params.get("scope", ""),
            cid=params["client_id"],
            cc=params["code_challenge"],
        )
        logger.info("development sign-in of user %r at level %s", user_id, level)
        return _redirect(self.redirect_uri, code=code, state=params.get("state"))

    async def token(self, request: Request) -> Response:
        """Exchange a code or a refresh token for a new token pair."""
        form = await request.form()
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return self._exchange_code(form)
        if grant_type == "refresh_token":
            return self._refresh(form)
        return _oauth_error(
            "unsupported_grant_type",
            "grant_type must be authorization_code or refresh_token",
        )

    async def userinfo(self, request: Request) -> Response:
        """Return the claims of the bearer token's user."""
        claims = self._bearer_claims(request)
        if claims is None:
            return _invalid_token()
        return JSONResponse(
            {
                "sub": claims["sub"],
                "subscription_level": claims["lvl"],
                "scope": claims["scp"],
            },
            headers=_NO_STORE,
        )

    async def jsonrpc(self, request: Request) -> Response:
        """Handle one JSON-RPC 2.0 request. ``content.search`` is the only method."""
        claims = self._bearer_claims(request)
        if claims is None:
            return _invalid_token()

        try:
            message = json.loads(await request.body())
        except ValueError:
            return _rpc_error(None, -32700, "Parse error: the body is not JSON")
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return _rpc_error(None, -32600, "Invalid Request: not JSON-RPC 2.0")

        request_id = message.get("id")
        if message.get("method") != "content.search":
            return _rpc_error(request_id, -32601, "Method not found")
        if claims["lvl"] == "free":
            return _rpc_error(
                request_id,
                -32000,
                "content.search needs the plus or pro level; sign in again and "
                "choose one",
            )

        params = message.get("params")
        if not isinstance(params, dict):
            params = {}
        query = params.get("query")
        limit = params.get("limit", 10)
        if (
            not isinstance(query, str)
            or isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= MAX_SEARCH_LIMIT
        ):
            return _rpc_error(
                request_id,
                -32602,
                f"Invalid params: query must be a string and limit a whole number "
                f"from 1 to {MAX_SEARCH_LIMIT}",
            )
        return JSONResponse(
            {"jsonrpc": "2.0", "id": request_id, "result": _search(query, limit)}
        )

    def _authorize_rejection(self, params: dict[str, str]) -> Response | None:
        """Return the error page or error redirect for an invalid authorization
        request, or None for a valid one."""
        try:
            return self._check_authorize_params(params)
        except _AuthorizeRequestError as exc:
            return _error_page(str(exc))

    def _check_authorize_params(self, params: dict[str, str]) -> Response | None:
        """Validate an authorization request and return an error redirect, or None.

        Raises _AuthorizeRequestError when the client or redirect URI is
        wrong, because then no redirect may be sent (RFC 6749, 4.1.2.1).
        """
        if not params.get("client_id"):
            raise _AuthorizeRequestError("The request has no client_id.")
        if not _same_uri(params.get("redirect_uri", ""), self.redirect_uri):
            raise _AuthorizeRequestError(
                "The redirect_uri is not the callback of this server, "
                f"{self.redirect_uri}."
            )

        state = params.get("state")
        if params.get("response_type") != "code":
            return _redirect(
                self.redirect_uri,
                error="unsupported_response_type",
                error_description="response_type must be code",
                state=state,
            )
        challenge = params.get("code_challenge", "")
        if params.get("code_challenge_method") != "S256" or not _PKCE_VALUE.fullmatch(
            challenge
        ):
            return _redirect(
                self.redirect_uri,
                error="invalid_request",
                error_description="PKCE is required: send a code_challenge with "
                "code_challenge_method S256",
                state=state,
            )
        return None

    def _exchange_code(self, form: Any) -> Response:
        claims = self._verify(form.get("code"), "code")
        if claims is None:
            return _oauth_error("invalid_grant", "the code is invalid, expired or used")
        if form.get("client_id") != claims["cid"]:
            return _oauth_error(
                "invalid_grant", "the code was issued to another client"
            )
        if not _same_uri(form.get("redirect_uri") or "", self.redirect_uri):
            return _oauth_error("invalid_grant", "redirect_uri does not match")

        verifier = form.get("code_verifier")
        if not isinstance(verifier, str) or not _PKCE_VALUE.fullmatch(verifier):
            return _oauth_error(
                "invalid_request", "code_verifier is missing or invalid"
            )
        if not hmac.compare_digest(pkce_s256_challenge(verifier), claims["cc"]):
            return _oauth_error("invalid_grant", "code_verifier does not match")

        self._spend(claims)
        return self._token_response(claims)

    def _refresh(self, form: Any) -> Response:
        claims = self._verify(form.get("refresh_token"), "refresh")
        if claims is None:
            return _oauth_error(
                "invalid_grant", "the refresh token is invalid, expired or used"
            )

        self._spend(claims)
        return self._token_response(claims)

    def _token_response(self, claims: dict[str, Any]) -> Response:
        facts = {key: claims[key] for key in ("sub", "lvl", "scp", "cid")}
        access = self._sign("access", self.access_lifetime_s, **facts)
        refresh = self._sign("refresh", REFRESH_LIFETIME_S, **facts)
        return JSONResponse(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": self.access_lifetime_s,
                "refresh_token": refresh,
                "scope": claims["scp"],
            },
            headers=_NO_STORE,
        )

    def _bearer_claims(self, request: Request) -> dict[str, Any] | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self._verify(token.strip(), "access")

    def _sign(self, kind: str, lifetime_s: int, **facts: Any) -> str:
        claims = {
            "typ": kind,
            "jti": secrets.token_urlsafe(12),
            "exp": time.time() + lifetime_s,
            **facts,
        }
        body = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
        return body + "." + _b64encode(self._mac(body))

    def _verify(self, token: object, kind: str) -> dict[str, Any] | None:
        """Return the claims of a valid, unexpired, unspent ``token`` of ``kind``."""
        if not isinstance(token, str) or token.count(".") != 1:
            return None
        body, _, mac = token.partition(".")
        try:
            valid = hmac.compare_digest(_b64decode(mac), self._mac(body))
            claims = json.loads(_b64decode(body)) if valid else None
        except ValueError:
            return None

        if (
            not isinstance(claims, dict)
            or claims.get("typ") != kind
            or claims["exp"] <= time.time()
            or claims["jti"] in self._spent
        ):
            return None
        return claims

    def _spend(self, claims: dict[str, Any]) -> None:
        now = time.time()
        for jti in [jti for jti, expires in self._spent.items() if expires <= now]:
            del self._spent[jti]
        self._spent[claims["jti"]] = claims["exp"]

    def _mac(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()


def dev_idp_routes(
    public_url: str,
    *,
    redirect_uri: str | None = None,
    signing_key: bytes | None = None,
) -> list[Route]:
    """Return the routes of a new development identity provider.

    See :class:`DevIdentityProvider` for the arguments. Mount them only in
    development mode.
    """
    return DevIdentityProvider(
        public_url, redirect_uri=redirect_uri, signing_key=signing_key
    ).routes()


def _login_page(params: dict[str, str]) -> str:
    hidden_names = (
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    )
    hidden = "\n".join(
        f'<input type="hidden" name="{name}" value="{html.escape(params[name])}">'
        for name in hidden_names
        if name in params
    )
    options = "\n".join(
        f'<option value="{level}">{level}</option>' for level in DEV_LEVELS
    )
    client = html.escape(params["client_id"])
    scopes = html.escape(params.get("scope", "")) or "(none)"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Development sign-in</title>
<style>body {{ font-family: sans-serif; max-width: 32em; margin: 3em auto; }}
label {{ display: block; margin: 1em 0 0.3em; }}</style>
</head>
<body>
<h1>Development sign-in</h1>
<p>This is the development identity provider of <code>mcp-authdb serve --dev</code>.
It signs you in as any user id, without a password.</p>
<p>Client: <code>{client}</code><br>Scopes: <code>{scopes}</code></p>
<form method="post" action="/dev/oauth/authorize">
{hidden}
<label for="user_id">User id</label>
<input id="user_id" name="user_id" value="{DEV_DEFAULT_USER}" required
 maxlength="{USER_ID_MAX_LENGTH}">
<label for="subscription_level">Subscription level</label>
<select id="subscription_level" name="subscription_level">
{options}
</select>
<p><button type="submit">Sign in</button></p>
</form>
</body>
</html>
"""


def _error_page(message: str) -> Response:
    body = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>Sign-in failed</title></head><body><h1>Sign-in failed</h1>"
        f"<p>{html.escape(message)}</p></body></html>\n"
    )
    return HTMLResponse(body, status_code=400, headers=_PAGE_HEADERS)


def _redirect(uri: str, **params: str | None) -> Response:
    query = urlencode({key: value for key, value in params.items() if value})
    separator = "&" if "?" in uri else "?"
    return RedirectResponse(uri + separator + query, status_code=303, headers=_NO_STORE)


def _oauth_error(error: str, description: str) -> Response:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=400,
        headers=_NO_STORE,
    )


def _invalid_token() -> Response:
    return JSONResponse(
        {"error": "invalid_token", "error_description": "the access token is invalid"},
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
        {"id": node, "title": title, "url": f"http://dev.invalid/{node}"}
        for node, title in _ARTICLES
        if all(word in title.lower() for word in words)
    ]
    return {"query": query, "total": len(found), "items": found[:limit]}


def _same_uri(left: str, right: str) -> bool:
    """Compare URIs with scheme and host in lower case and default ports removed."""
    return _normalize_uri(left) == _normalize_uri(right)


def _normalize_uri(uri: str) -> tuple[str, str, int | None, str, str] | None:
    try:
        parts = urlsplit(uri)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    return parts.scheme.lower(), host, port, parts.path, parts.query


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
