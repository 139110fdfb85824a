"""The consent step of a sign-in, and the cookie that binds it to one browser.

This server signs every client's users in at the upstream provider with one
fixed client id, so an upstream that approves that client silently would
approve any client's request. Without a step of its own, anyone could
register a client with their own redirect URI, start ``/authorize``, and
send the resulting upstream link to a user who is signed in upstream. That
user's authorization code would then go to the attacker's redirect URI. So
``/authorize`` stores the pending authorization under a new consent request
id and sends the user to ``GET /oauth/consent?request=<id>``, a page that
names the client and the host its code will be sent to:

- Deny deletes the pending authorization and redirects to the client with
  ``error=access_denied``.
- Approve replaces the row's key with the hash of a new upstream ``state``,
  stores the hash of a new browser binding value, sets that value as the
  cookie :data:`BINDING_COOKIE`, and redirects to the upstream provider.
- ``/oauth/callback`` takes the pending authorization only when the
  ``state`` and the cookie both match, so a link opened in another browser
  gets HTTP 400.

The form carries a CSRF token that must equal the cookie :data:`CSRF_COOKIE`,
which the page sets with ``SameSite=Strict``, so another site cannot submit
the form in the user's name. Consent request ids, states and binding values
are tokens of ``new_token(TokenKind.STATE)``, stored as keyed hashes only.
"""

from __future__ import annotations

import dataclasses
import hmac
import html
import secrets
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.responses import HTMLResponse, Response

from mcp_authdb.db.pool import Operation, Query
from mcp_authdb.server.oauth_store import (
    OAuthStore,
    PendingAuthorization,
    upstream_verifier_context,
)
from mcp_authdb.store.tokens import TokenKind, new_token

CONSENT_PATH = "/oauth/consent"
# The cookie that binds an approved sign-in to the browser that approved it.
# Its path covers the consent page, which sets it, and the callback, which
# reads it. Over https both cookies get the __Host- prefix, which browsers
# accept only with Secure, Path=/ and no Domain, so that no other host, a
# sibling subdomain included, can plant one (see cookie_name()).
# NOTE: one cookie name serves every sign-in, so when one browser approves two
# sign-ins before either returns, the first one's callback gets HTTP 400.
BINDING_COOKIE = "mcp_authdb_signin"
BINDING_COOKIE_PATH = "/oauth"
# The cookie that the consent form's CSRF token must equal.
CSRF_COOKIE = "mcp_authdb_consent_csrf"
HOST_PREFIX = "__Host-"
# The consent form's field names and the values of its two buttons.
REQUEST_FIELD = "request"
CSRF_FIELD = "csrf_token"
DECISION_FIELD = "decision"
APPROVE = "approve"
DENY = "deny"

# The CSP has no form-action, because browsers apply it to the redirects that
# follow a form submission as well. Those go to the upstream provider
# (approve) or to any client redirect URI, custom schemes included (deny).
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    # same-origin, not no-referrer, because under no-referrer a browser sends
    # the form's POST with "Origin: null" and is_same_origin_post() needs the
    # real origin.
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


@dataclasses.dataclass(frozen=True)
class ConsentRequest:
    """A pending authorization waiting for the user's decision."""

    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ApprovedRequest:
    """An approved authorization: the upstream state and verifier to use.

    ``repr`` leaves the state and verifier out.
    """

    client_id: str
    state: str = dataclasses.field(repr=False)
    upstream_verifier: str = dataclasses.field(repr=False)


# Each statement matches only a row that is unexpired and in the right step.
# Consent requests have consented_at NULL, and approved ones have it set.
_FIND_CONSENT = """
SELECT client_id, redirect_uri, scopes
FROM oauth_pending_authorizations
WHERE state_hash = ANY(%s::text[])
  AND consented_at IS NULL
  AND expires_at > now()
LIMIT 1
"""

# One UPDATE makes approval single use. Of two concurrent approvals, the
# second waits for the row lock and then finds the key changed. The verifier
# is replaced too, because its ciphertext is bound to the row's key.
_APPROVE = """
UPDATE oauth_pending_authorizations
SET state_hash = %(state_hash)s,
    upstream_verifier_encrypted = %(verifier_encrypted)s,
    binding_hash = %(binding_hash)s,
    consented_at = now()
WHERE state_hash = ANY(%(candidates)s::text[])
  AND consented_at IS NULL
  AND expires_at > now()
RETURNING client_id
"""

# DELETE ... RETURNING makes the state single use. Only this statement takes an
# approved row, and only with the browser binding of the approval.
_TAKE_APPROVED = """
DELETE FROM oauth_pending_authorizations
WHERE state_hash = ANY(%s::text[])
  AND binding_hash = ANY(%s::text[])
  AND consented_at IS NOT NULL
  AND expires_at > now()
RETURNING state_hash, client_id, redirect_uri, redirect_uri_provided_explicitly,
          client_state, scopes, code_challenge, resource,
          upstream_verifier_encrypted, expires_at
"""

_FIND_APPROVED_CLIENT = """
SELECT client_id
FROM oauth_pending_authorizations
WHERE state_hash = ANY(%s::text[])
  AND consented_at IS NOT NULL
  AND expires_at > now()
LIMIT 1
"""


def _first_row(sql: str, params: Any) -> Operation[tuple[Any, ...] | None]:
    result = yield Query(sql, params)
    return result.rows[0] if result.rows else None


class ConsentStore:
    """The consent step's reads and writes of ``oauth_pending_authorizations``.

    It uses the database, encryptor and hasher of ``store``. Every method
    that gets a malformed token returns None without a database call.
    """

    def __init__(self, store: OAuthStore) -> None:
        self.store = store

    def _candidates(self, token: str | None) -> list[str]:
        return self.store.hasher.candidates(token, TokenKind.STATE)

    async def find(self, request_id: str | None) -> ConsentRequest | None:
        """Return the unexpired consent request ``request_id``, or None."""
        candidates = self._candidates(request_id)
        if not candidates:
            return None
        row = await self.store.database.run(
            lambda: _first_row(_FIND_CONSENT, (candidates,)),
            transaction=False,
            idempotent=True,
        )
        if row is None:
            return None
        client_id, redirect_uri, scopes = row
        return ConsentRequest(client_id, redirect_uri, tuple(scopes))

    async def deny(self, request_id: str | None) -> PendingAuthorization | None:
        """Delete the consent request ``request_id``; return what it contained.

        Returns None when it is unknown, expired, already approved or
        already denied.
        """
        if request_id is None:
            return None
        return await self.store.take_pending(request_id)

    async def approve(
        self, request_id: str | None, binding: str
    ) -> ApprovedRequest | None:
        """Approve the consent request ``request_id`` for the browser ``binding``.

        Stores the hash of ``binding`` (a ``new_token(TokenKind.STATE)``) and
        re-keys the row by a new upstream state with a new upstream PKCE
        verifier, which it returns. Returns None, changing nothing, when the
        request is unknown, expired, already approved or denied.
        """
        candidates = self._candidates(request_id)
        if not candidates:
            return None
        hasher = self.store.hasher
        state = new_token(TokenKind.STATE)
        state_hash = hasher.hash(state)
        verifier = secrets.token_urlsafe(32)
        values = {
            "state_hash": state_hash,
            "verifier_encrypted": self.store.encryptor.encrypt(
                verifier, context=upstream_verifier_context(state_hash)
            ),
            "binding_hash": hasher.hash(binding),
            "candidates": candidates,
        }
        row = await self.store.database.run(lambda: _first_row(_APPROVE, values))
        if row is None:
            return None
        return ApprovedRequest(str(row[0]), state, verifier)

    async def take(
        self, state: str | None, binding: str | None
    ) -> PendingAuthorization | None:
        """Delete and return the approved authorization of ``state`` and ``binding``.

        Returns None, changing nothing, when no unexpired approved
        authorization has both, so a callback in a browser without the
        matching cookie cannot use up the authorization of the browser that
        has it.
        """
        state_candidates = self._candidates(state)
        binding_candidates = self._candidates(binding)
        if not state_candidates or not binding_candidates:
            return None
        row = await self.store.database.run(
            lambda: _first_row(_TAKE_APPROVED, (state_candidates, binding_candidates))
        )
        if row is None:
            return None
        return self.store.pending_from_row(row)

    async def approved_client(self, state: str | None) -> str | None:
        """Return the client of the unexpired approved authorization of ``state``.

        Returns None when there is none. The provider calls it only to log
        why it rejected a callback.
        """
        candidates = self._candidates(state)
        if not candidates:
            return None
        row = await self.store.database.run(
            lambda: _first_row(_FIND_APPROVED_CLIENT, (candidates,)),
            transaction=False,
            idempotent=True,
        )
        return None if row is None else str(row[0])


def new_binding() -> str:
    """Return a new browser binding value for :data:`BINDING_COOKIE`."""
    return new_token(TokenKind.STATE)


def new_csrf_token(key: bytes, request_id: str) -> str:
    """Return a CSRF token for the consent form and :data:`CSRF_COOKIE`.

    The token is a random nonce and its HMAC under ``key`` over
    ``request_id`` and the nonce, so a token from the page of one consent
    request cannot approve another.
    """
    nonce = secrets.token_urlsafe(16)
    return f"{nonce}.{_csrf_mac(key, request_id, nonce)}"


def csrf_token_matches(
    key: bytes, request_id: str | None, cookie: str | None, field: str | None
) -> bool:
    """Return whether the form's CSRF token equals the cookie's and fits the request.

    Both must be present and equal, and the token must have been made by
    :func:`new_csrf_token` with ``key`` for ``request_id``.
    """
    if not cookie or not field or not request_id:
        return False
    if not secrets.compare_digest(cookie.encode(), field.encode()):
        return False
    nonce, _, mac = field.partition(".")
    expected = _csrf_mac(key, request_id, nonce)
    return secrets.compare_digest(mac.encode(), expected.encode())


def _csrf_mac(key: bytes, request_id: str, nonce: str) -> str:
    message = f"{request_id}\n{nonce}".encode("utf-8", "replace")
    return hmac.new(key, message, "sha256").hexdigest()


def is_same_origin_post(headers: Mapping[str, str], issuer: str) -> bool:
    """Return whether the browser's headers mark this POST as same-origin.

    ``Sec-Fetch-Site``, when sent, must be ``same-origin``. Otherwise
    ``Origin``, when sent, must be the origin of ``issuer``. A request with
    neither header (not from a browser, or from a very old one) passes, and
    its CSRF token still has to match. This check stops a form on another
    site from submitting the consent, even in a browser where an attacker
    planted the CSRF cookie.
    """
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site == "same-origin"
    origin = headers.get("origin")
    if origin is not None:
        return origin == issuer.rstrip("/")
    return True


def cookie_name(name: str, *, secure: bool) -> str:
    """Return the name that cookie ``name`` has over https (``secure``) or http.

    Over https it carries the ``__Host-`` prefix, which binds it to this
    host. Plain http, on loopback only, cannot use the prefix.
    """
    return HOST_PREFIX + name if secure else name


def _cookie_path(path: str, *, secure: bool) -> str:
    # A __Host- cookie must have the path /.
    return "/" if secure else path


def set_binding_cookie(
    response: Response, binding: str, *, secure: bool, lifetime: timedelta
) -> None:
    """Set the binding cookie (:data:`BINDING_COOKIE`) for the callback.

    The cookie is ``SameSite=Lax``, because the upstream provider sends the
    browser back with a top-level GET from its own site, which Lax allows
    and Strict does not.
    """
    response.set_cookie(
        cookie_name(BINDING_COOKIE, secure=secure),
        binding,
        max_age=int(lifetime.total_seconds()),
        path=_cookie_path(BINDING_COOKIE_PATH, secure=secure),
        secure=secure,
        httponly=True,
        samesite="lax",
    )


def clear_binding_cookie(response: Response, *, secure: bool) -> None:
    """Delete the binding cookie from the browser."""
    response.delete_cookie(
        cookie_name(BINDING_COOKIE, secure=secure),
        path=_cookie_path(BINDING_COOKIE_PATH, secure=secure),
        secure=secure,
        httponly=True,
        samesite="lax",
    )


def set_csrf_cookie(
    response: Response, token: str, *, secure: bool, lifetime: timedelta
) -> None:
    """Set the CSRF cookie (:data:`CSRF_COOKIE`), sent only with same-site requests."""
    response.set_cookie(
        cookie_name(CSRF_COOKIE, secure=secure),
        token,
        max_age=int(lifetime.total_seconds()),
        path=_cookie_path(CONSENT_PATH, secure=secure),
        secure=secure,
        httponly=True,
        samesite="strict",
    )


def clear_csrf_cookie(response: Response, *, secure: bool) -> None:
    """Delete the CSRF cookie from the browser."""
    response.delete_cookie(
        cookie_name(CSRF_COOKIE, secure=secure),
        path=_cookie_path(CONSENT_PATH, secure=secure),
        secure=secure,
        httponly=True,
        samesite="strict",
    )


def consent_url(issuer: str, request_id: str) -> str:
    """Return the consent page's URL for the consent request ``request_id``."""
    return f"{issuer}{CONSENT_PATH}?{urlencode({REQUEST_FIELD: request_id})}"


def redirect_target(redirect_uri: str) -> str:
    """Return the name of the code's receiver for a redirect URI, for the page.

    An http or https URI gives its host, with the port when it has one. Any
    other URI, such as ``com.example.app:/callback`` or
    ``web+app://example.com/cb``, gives its scheme followed by ``:``, because
    the app registered for that scheme receives the code, whatever host the
    URI names.

    """
    parts = urlsplit(redirect_uri)
    if parts.scheme in ("http", "https") and parts.hostname:
        host = parts.hostname
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}:"


def consent_page(
    *,
    client_id: str,
    client_name: str | None,
    redirect_uri: str,
    scopes: Sequence[str],
    request_id: str,
    csrf_token: str,
) -> HTMLResponse:
    """Build the consent page, with every value from the client HTML-escaped."""
    name = html.escape(client_name or "(no name given)")
    host = html.escape(redirect_target(redirect_uri))
    scope_items = "\n".join(f"<li><code>{html.escape(s)}</code></li>" for s in scopes)
    body = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Allow access?</title>
<style>body {{ font-family: sans-serif; max-width: 36em; margin: 3em auto; }}
.host {{ font-size: 1.4em; font-weight: bold; word-break: break-all; }}
code {{ word-break: break-all; }}
button {{ margin-right: 1em; padding: 0.4em 1.2em; }}</style>
</head>
<body>
<h1>Allow access?</h1>
<p>An application that calls itself <strong>{name}</strong>
(client id <code>{html.escape(client_id)}</code>) asks to use this server with
your account.</p>
<p>If you approve, your sign-in goes to:</p>
<p class="host">{host}</p>
<p>Full address: <code>{html.escape(redirect_uri)}</code></p>
<p>Approve only if you started this sign-in yourself and you trust
<strong>{host}</strong>. Anyone who sent you this link can read your data
through it.</p>
<p>Requested scopes:</p>
<ul>
{scope_items}
</ul>
<form method="post" action="{CONSENT_PATH}">
<input type="hidden" name="{REQUEST_FIELD}" value="{html.escape(request_id)}">
<input type="hidden" name="{CSRF_FIELD}" value="{html.escape(csrf_token)}">
<button type="submit" name="{DECISION_FIELD}" value="{APPROVE}">Approve</button>
<button type="submit" name="{DECISION_FIELD}" value="{DENY}">Deny</button>
</form>
</body>
</html>
"""
    return HTMLResponse(body, headers=PAGE_HEADERS)
