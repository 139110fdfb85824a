"""Redirect URI checks of the authorization server: registration and matching.

A client registers its redirect URIs once, by dynamic client registration or
in a Client ID Metadata Document, and names one of them in each
authorization request. :func:`match_redirect_uri` finds the registered URI
that a requested one matches, following RFC 8252 section 7.3 for native
apps: a registered ``http`` URI on a loopback host (``127.0.0.1``, ``[::1]``
or ``localhost``) matches the same URI with any port, because a native app
listens on a port the operating system picks at run time. Every other URI
matches only itself, as RFC 6749 section 3.1.2 and the MCP authorization
specification require.

:func:`redirect_uri_problem` is the registration check. Both functions are
pure and take the URI strings that pydantic's ``AnyUrl`` produces, so the
scheme and host are lowercase already.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import SplitResult, urlsplit

# Hosts of the loopback redirect URIs that match any port (RFC 8252 section
# 7.3). ``urlsplit`` gives the IPv6 host without its brackets. Other
# addresses of 127.0.0.0/8 get no port freedom: clients use 127.0.0.1.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

# Schemes a browser runs or reads locally instead of handing the response to
# an app, so the authorization code would not reach the client.
_FORBIDDEN_SCHEMES = frozenset(
    {"javascript", "data", "vbscript", "file", "about", "blob", "filesystem"}
)


class _Parts(NamedTuple):
    """The parts of a URI that redirect matching compares."""

    scheme: str
    userinfo: str | None
    host: str
    path: str
    query: str


def _split(uri: str) -> SplitResult | None:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018  # raises ValueError for a port out of range
    except ValueError:
        return None
    return parts


def _loopback_parts(uri: str) -> _Parts | None:
    """Return the compared parts of a loopback ``http`` URI, else None.

    None also for a URI with a fragment. An empty path counts as ``/``,
    which RFC 3986 section 6.2.3 makes the same resource for ``http``.
    """
    parts = _split(uri)
    if parts is None or parts.scheme.lower() != "http" or parts.fragment:
        return None
    host = (parts.hostname or "").lower()
    if host not in LOOPBACK_HOSTS:
        return None
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
    return _Parts("http", userinfo, host, parts.path or "/", parts.query)


def _same_uri(registered: str, requested: str) -> bool:
    """Compare two URIs as strings, with an empty ``http(s)`` path as ``/``."""
    if registered == requested:
        return True
    first = _split(registered)
    second = _split(requested)
    if first is None or second is None:
        return False
    if first.scheme not in ("http", "https") or not first.netloc:
        return False
    return first._replace(path=first.path or "/") == second._replace(
        path=second.path or "/"
    )


def redirect_uri_matches(registered: str, requested: str) -> bool:
    """Return whether the ``requested`` redirect URI matches ``registered``.

    A registered ``http`` URI on ``127.0.0.1``, ``[::1]`` or ``localhost``
    without userinfo matches the requested URI with the same host, path and
    query and any port, or no port (RFC 8252 section 7.3). Any other URI
    matches only the same string, where an empty ``http``/``https`` path
    equals ``/``. A requested URI with a fragment never matches, because
    RFC 6749 section 3.1.2 forbids fragments in redirect URIs. Hosts,
    schemes, paths, queries and userinfo must always be equal.
    """
    requested_parts = _split(requested)
    if requested_parts is None or requested_parts.fragment:
        return False

    loopback = _loopback_parts(registered)
    if loopback is not None and loopback.userinfo is None:
        return _loopback_parts(requested) == loopback

    return _same_uri(registered, requested)


def match_redirect_uri(registered: Iterable[str], requested: str) -> str | None:
    """Return the first of ``registered`` that ``requested`` matches, or None.

    Matching is :func:`redirect_uri_matches`. The caller sends the user
    agent to ``requested``, not to the registered URI, so that a loopback
    redirect keeps the port the client asked for.
    """
    for uri in registered:
        if redirect_uri_matches(uri, requested):
            return uri
    return None


def is_loopback_redirect_uri(uri: str) -> bool:
    """Return whether ``uri`` is an ``http`` URI on a loopback host."""
    return _loopback_parts(uri) is not None


def redirect_uri_problem(uri: str) -> str | None:
    """Check a redirect URI that a client registers; return why it is invalid.

    Returns None for a valid URI. Valid are: ``https`` URIs with a host,
    ``http`` URIs on ``127.0.0.1``, ``[::1]`` or ``localhost`` (the MCP
    authorization specification allows plain ``http`` only there), and
    private-use schemes of native apps such as ``com.example.app:/callback``
    (RFC 8252 section 7.1). Every redirect URI must be absolute and have no
    fragment (RFC 6749 section 3.1.2). Schemes that a browser handles itself,
    such as ``javascript`` or ``data``, are invalid.
    """
    parts = _split(uri)
    if parts is None:
        return f"redirect URI {uri!r} is not a valid URI; check its port"
    scheme = parts.scheme.lower()
    if not scheme:
        return f"redirect URI {uri!r} is not absolute; give its scheme and host"
    if parts.fragment or uri.endswith("#"):
        return f"redirect URI {uri!r} has a fragment; remove the part from '#'"
    if scheme in _FORBIDDEN_SCHEMES:
        return f"redirect URI {uri!r} uses the scheme {scheme!r}, which is not allowed"
    if scheme == "https" and not parts.hostname:
        return f"redirect URI {uri!r} has no host"
    if scheme == "http" and not is_loopback_redirect_uri(uri):
        return (
            f"redirect URI {uri!r} uses http on a host other than 127.0.0.1, "
            "[::1] or localhost; use https"
        )
    return None
