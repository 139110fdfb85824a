"""Helpers for tests that serve an ASGI app in the test's own event loop.

Each test serves its app with uvicorn on a free port of 127.0.0.1 and calls it
over real HTTP, with the MCP SDK's client where it speaks MCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import httpx2
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.settings import AuthSettings
from pydantic import AnyHttpUrl

from mcp_authdb.server.consent import (
    BINDING_COOKIE,
    CONSENT_PATH,
    CSRF_COOKIE,
    cookie_name,
)

# The token keys of servers whose sessions the test makes itself.
KEYS = "k1:" + "s" * 43
# The authorization server that the resource's auth settings name. Nothing
# listens on this port, and no test contacts it.
ORIGIN = "http://127.0.0.1:9"
RESOURCE = ORIGIN + "/mcp"


@contextlib.asynccontextmanager
async def serving(
    app: Any, *, lifespan: Literal["on", "off"] = "on"
) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1; yield its base URL.

    The server runs as a task of the current event loop and stops when the
    block ends. Raises what uvicorn raised if it stopped before it started.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def mcp_client(base_url: str, token: str, mode: str) -> AsyncIterator[Client]:
    """Connect the SDK's client to ``base_url + "/mcp"`` with a bearer token.

    ``mode`` is the client's protocol mode, such as ``"legacy"`` or ``"auto"``.
    """
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers) as http,
        Client(
            streamable_http_client(base_url + "/mcp", http_client=http), mode=mode
        ) as client,
    ):
        yield client


def resource_auth_settings() -> AuthSettings:
    """Build the auth settings of a resource server at :data:`RESOURCE`.

    The server checks each token's resource, and :data:`ORIGIN` is its
    authorization server.
    """
    return AuthSettings(
        issuer_url=AnyHttpUrl(ORIGIN),
        resource_server_url=AnyHttpUrl(RESOURCE),
        validate_token_resource=True,
    )


class _ConsentFormParser(HTMLParser):
    """Collects the consent form's action and hidden fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.action = values.get("action")
        elif tag == "input" and values.get("type") == "hidden":
            self.fields[values.get("name") or ""] = values.get("value") or ""


def consent_form(page_url: str, page: str) -> tuple[str, dict[str, str]]:
    """Parse the consent page; return the form's absolute URL and hidden fields."""
    parser = _ConsentFormParser()
    parser.feed(page)
    assert parser.action is not None, page
    return urljoin(page_url, parser.action), parser.fields


def is_consent_page(url: str) -> bool:
    """Return whether ``url`` is a consent page of this project's server."""
    return urlsplit(url).path == CONSENT_PATH


def answer_consent(
    http: httpx2.Client, consent_url: str, decision: str = "approve"
) -> httpx2.Response:
    """Submit the consent form at ``consent_url`` as a browser would.

    GETs the page at the URL's path on ``http``'s base URL, then POSTs its
    form with ``decision`` and the page's CSRF cookie. The binding cookie
    that approval sets goes into ``http``'s cookie jar without its Secure
    flag. The callback over plain HTTP then sends it, as a browser at an
    https public URL would. Returns the POST's response, which is a 303 to
    the upstream after approval.
    """
    parts = urlsplit(consent_url)
    page = http.get(f"{parts.path}?{parts.query}")
    assert page.status_code == 200, page.text
    action, fields = consent_form(consent_url, page.text)
    # An https public URL gives __Host- cookies with the path /.
    secure = cookie_name(CSRF_COOKIE, secure=True) in page.cookies
    csrf_cookie = cookie_name(CSRF_COOKIE, secure=secure)
    binding_cookie = cookie_name(BINDING_COOKIE, secure=secure)
    csrf = page.cookies.get(csrf_cookie)
    assert csrf is not None, page.headers
    response = http.post(
        urlsplit(action).path,
        data={**fields, "decision": decision},
        headers={"Cookie": f"{csrf_cookie}={csrf}"},
    )
    binding = response.cookies.get(binding_cookie)
    if binding is not None:
        http.cookies.delete(binding_cookie)
        http.cookies.set(binding_cookie, binding, path="/" if secure else "/oauth")
    return response


async def answer_consent_async(
    http: httpx2.AsyncClient, consent_url: str, decision: str = "approve"
) -> httpx2.Response:
    """Submit the consent form like :func:`answer_consent`, asynchronously."""
    page = await http.get(consent_url)
    assert page.status_code == 200, page.text
    action, fields = consent_form(consent_url, page.text)
    return await http.post(action, data={**fields, "decision": decision})


async def follow_as_browser(http: httpx2.AsyncClient, url: str, stop: str) -> str:
    """Follow redirects from ``url`` as a browser would; return the one to ``stop``.

    The consent page on the way is approved, and ``http`` keeps the cookies
    from the consent POST to the callback. Every other response must be a
    redirect. Raises ``AssertionError`` after 10 steps.
    """
    for _ in range(10):
        if is_consent_page(url):
            response = await answer_consent_async(http, url)
        else:
            response = await http.get(url)
        assert response.status_code in (302, 303, 307), response.text
        url = urljoin(url, response.headers["location"])
        if url.startswith(stop):
            return url
    raise AssertionError(f"the sign-in never redirected to {stop}")
