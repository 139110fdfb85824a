"""Redirect URI registration checks and RFC 8252 loopback matching."""

from __future__ import annotations

import pytest

from mcp_authdb.server.redirects import (
    is_loopback_redirect_uri,
    match_redirect_uri,
    redirect_uri_matches,
    redirect_uri_problem,
)

MATCHING = [
    # Loopback http URIs match any port, or none, on the same host.
    ("http://127.0.0.1:3000/callback", "http://127.0.0.1:51234/callback"),
    ("http://127.0.0.1:3000/callback", "http://127.0.0.1/callback"),
    ("http://127.0.0.1/callback", "http://127.0.0.1:8080/callback"),
    ("http://[::1]:3000/cb", "http://[::1]:1/cb"),
    ("http://localhost/cb", "http://localhost:65535/cb"),
    ("http://localhost:80/cb?app=1", "http://localhost:9/cb?app=1"),
    # An empty http path is "/".
    ("http://localhost", "http://localhost:4000/"),
    ("http://127.0.0.1:3000", "http://127.0.0.1:3001/"),
    ("https://app.example.com", "https://app.example.com/"),
    # Everything else: the same string.
    ("https://app.example.com/cb", "https://app.example.com/cb"),
    ("https://app.example.com:8443/cb?x=1", "https://app.example.com:8443/cb?x=1"),
    ("com.example.app:/oauth", "com.example.app:/oauth"),
    ("cursor://anysphere.cursor/oauth", "cursor://anysphere.cursor/oauth"),
    ("http://u:p@127.0.0.1:1/cb", "http://u:p@127.0.0.1:1/cb"),
]

NOT_MATCHING = [
    # Never across loopback hosts.
    ("http://127.0.0.1:3000/cb", "http://localhost:3000/cb"),
    ("http://localhost/cb", "http://127.0.0.1/cb"),
    ("http://[::1]/cb", "http://127.0.0.1/cb"),
    ("http://127.0.0.1/cb", "http://127.0.0.2/cb"),
    ("http://127.0.0.1/cb", "http://evil.example/cb"),
    ("http://localhost/cb", "http://localhost.evil.example/cb"),
    # Never across schemes.
    ("http://127.0.0.1/cb", "https://127.0.0.1/cb"),
    ("https://127.0.0.1/cb", "https://127.0.0.1:9999/cb"),
    ("https://localhost/cb", "https://localhost:1/cb"),
    # Never across paths or queries.
    ("http://127.0.0.1:3000/cb", "http://127.0.0.1:3000/cb/"),
    ("http://127.0.0.1:3000/cb", "http://127.0.0.1:3000/cb2"),
    ("http://127.0.0.1:3000/cb", "http://127.0.0.1:3000/CB"),
    ("http://127.0.0.1:3000/cb", "http://127.0.0.1:3000/cb?x=1"),
    ("http://127.0.0.1:3000/cb?x=1", "http://127.0.0.1:3000/cb?x=2"),
    ("http://127.0.0.1:3000/cb?x=1", "http://127.0.0.1:3000/cb"),
    # Never with userinfo added or changed.
    ("http://127.0.0.1:3000/cb", "http://user@127.0.0.1:3000/cb"),
    ("http://127.0.0.1:3000/cb", "http://127.0.0.1:3000@evil.example/cb"),
    ("http://u:p@127.0.0.1:1/cb", "http://u:p@127.0.0.1:2/cb"),
    ("http://u:p@127.0.0.1:1/cb", "http://127.0.0.1:1/cb"),
    # Never with a fragment.
    ("http://127.0.0.1:3000/cb", "http://127.0.0.1:3000/cb#x"),
    ("https://app.example.com/cb", "https://app.example.com/cb#x"),
    # Non-loopback URIs: exact, ports included.
    ("https://app.example.com/cb", "https://app.example.com:443/cb"),
    ("https://app.example.com/cb", "https://app.example.com:8443/cb"),
    ("https://app.example.com/cb", "https://other.example.com/cb"),
    ("https://app.example.com/cb", "https://app.example.com/cb?x=1"),
    ("com.example.app:/oauth", "com.example.app:/oauth2"),
    # Malformed requested URIs.
    ("http://127.0.0.1:3000/cb", "http://127.0.0.1:99999/cb"),
    ("http://127.0.0.1:3000/cb", "http://127.0.0.1:port/cb"),
]


@pytest.mark.parametrize(("registered", "requested"), MATCHING)
def test_matching_pairs(registered: str, requested: str) -> None:
    assert redirect_uri_matches(registered, requested)


@pytest.mark.parametrize(("registered", "requested"), NOT_MATCHING)
def test_pairs_that_do_not_match(registered: str, requested: str) -> None:
    assert not redirect_uri_matches(registered, requested)


def test_match_returns_registered_uri() -> None:
    registered = ["https://app.example.com/cb", "http://127.0.0.1:3000/cb"]

    found = match_redirect_uri(registered, "http://127.0.0.1:40000/cb")
    missing = match_redirect_uri(registered, "http://127.0.0.1:40000/other")

    assert found == "http://127.0.0.1:3000/cb"
    assert missing is None
    assert match_redirect_uri([], "https://app.example.com/cb") is None


def test_loopback_detection() -> None:
    assert is_loopback_redirect_uri("http://127.0.0.1:1/cb")
    assert is_loopback_redirect_uri("http://[::1]/cb")
    assert is_loopback_redirect_uri("http://LOCALHOST/cb")
    assert not is_loopback_redirect_uri("https://127.0.0.1/cb")
    assert not is_loopback_redirect_uri("http://127.0.0.1/cb#frag")
    assert not is_loopback_redirect_uri("http://10.0.0.1/cb")


VALID = [
    "https://app.example.com/callback",
    "https://app.example.com:8443/callback?x=1",
    "http://127.0.0.1:3000/callback",
    "http://[::1]/callback",
    "http://localhost/callback",
    "com.example.app:/oauth2redirect",
    "cursor://anysphere.cursor-retrieval/oauth/callback",
]

INVALID = [
    ("http://app.example.com/callback", "use https"),
    ("http://10.0.0.5/callback", "use https"),
    ("https://app.example.com/callback#frag", "has a fragment"),
    ("https://app.example.com/callback#", "has a fragment"),
    ("javascript:alert(1)", "'javascript'"),
    ("data:text/html,hi", "'data'"),
    ("file:///etc/passwd", "'file'"),
    ("/relative/callback", "is not absolute"),
    ("https:///callback", "has no host"),
    ("http://127.0.0.1:99999/callback", "is not a valid URI"),
]


@pytest.mark.parametrize("uri", VALID)
def test_registration_accepts(uri: str) -> None:
    assert redirect_uri_problem(uri) is None


@pytest.mark.parametrize(("uri", "expected"), INVALID)
def test_registration_rejects(uri: str, expected: str) -> None:
    problem = redirect_uri_problem(uri)

    assert problem is not None
    assert expected in problem
    assert repr(uri) in problem
