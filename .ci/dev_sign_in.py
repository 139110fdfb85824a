"""Sign in to a running `mcp-authdb serve --dev` and call its tools.

CI runs the README's main job, `serve --dev`, in the background and then
this script, which plays an MCP client and its user. The SDK's OAuth client
registers, the script approves the server's consent page and fills in the
development identity provider's sign-in form with a user id and the level
`plus`. Then it calls the tools `whoami` and `content_search`. It exits 0
when every step succeeds.

Usage: python .ci/dev_sign_in.py [MCP_URL]   (default http://127.0.0.1:8000/mcp)
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import sys
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

import httpx2
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

REDIRECT_URI = "http://127.0.0.1:1/callback"
USER_ID = "ci-user"
CONSENT_PATH = "/oauth/consent"
HIDDEN_INPUT = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


class MemoryStorage:
    """The SDK's token storage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


async def sign_in_as_user(authorization_url: str) -> str:
    """Follow the sign-in as a browser would and return the redirect to the client."""
    async with httpx2.AsyncClient(timeout=10.0) as http:
        url = authorization_url
        for _ in range(10):
            response = await http.get(url)
            if response.status_code == 200:
                form = {
                    html.unescape(name): html.unescape(value)
                    for name, value in HIDDEN_INPUT.findall(response.text)
                }
                if urlsplit(url).path == CONSENT_PATH:
                    # The server's consent page: approve. The client keeps the
                    # CSRF cookie for this POST and the binding cookie for the
                    # callback.
                    form["decision"] = "approve"
                else:
                    # The development sign-in form: submit as USER_ID, level plus.
                    form.update(user_id=USER_ID, subscription_level="plus")
                response = await http.post(url.split("?")[0], data=form)
            if response.status_code not in (302, 303, 307):
                raise SystemExit(
                    f"sign-in stopped at {url}: HTTP {response.status_code}"
                )
            url = urljoin(url, response.headers["location"])
            if url.startswith(REDIRECT_URI):
                return url
    raise SystemExit(
        "the sign-in did not redirect back to the client within 10 requests"
    )


async def main(mcp_url: str) -> None:
    redirected: list[str] = []

    async def redirect_handler(authorization_url: str) -> None:
        redirected.append(await sign_in_as_user(authorization_url))

    async def callback_handler() -> AuthorizationCodeResult:
        query = dict(parse_qsl(urlsplit(redirected.pop()).query))
        if "code" not in query:
            raise SystemExit(f"the sign-in failed: {query.get('error')}")
        return AuthorizationCodeResult(
            code=query["code"], state=query.get("state"), iss=query.get("iss")
        )

    metadata = OAuthClientMetadata.model_validate(
        {"client_name": "CI", "redirect_uris": [REDIRECT_URI]}
    )
    auth = OAuthClientProvider(
        mcp_url,
        metadata,
        MemoryStorage(),
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )
    async with (
        httpx2.AsyncClient(auth=auth, timeout=30.0) as http,
        Client(streamable_http_client(mcp_url, http_client=http)) as client,
    ):
        me = result_json(await client.call_tool("whoami", {}))
        found = result_json(await client.call_tool("content_search", {"query": "sign"}))

    if me.get("user_id") != USER_ID or me.get("subscription_level") != "plus":
        raise SystemExit(f"whoami returned {me}")
    items = found.get("results", {}).get("items", [])
    print(f"signed in as {me['user_id']} ({me['subscription_level']}); ", end="")
    print(f"content_search returned {len(items)} items")


def result_json(result: Any) -> dict[str, Any]:
    """Return a tool result as a dict, or exit on a tool error."""
    if result.is_error:
        raise SystemExit(f"tool error: {result.content[0].text}")
    if result.structured_content is not None:
        return dict(result.structured_content.get("result", result.structured_content))
    return dict(json.loads(result.content[0].text))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/mcp"))
