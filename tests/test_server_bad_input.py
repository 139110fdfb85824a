"""Bad input to the OAuth server, sent over real HTTP to the assembled app.

Each test serves the app of :func:`build_app` on 127.0.0.1 with the Authlib
upstream stand-in and sends one kind of bad request. It checks the error code
that the RFC names, and that the stored OAuth and session state changed no
more than the RFC allows. Cases tested elsewhere are not repeated: an unknown
bearer token, an unknown well-formed state and oversized ``/register`` and
``/token`` bodies are in ``test_server_app.py``, and a refresh token of a
revoked sign-in is in ``test_server_e2e.py``. A few codes differ from the
RFC because the MCP SDK's handlers choose them; a ``NOTE`` marks each.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from server_helpers import answer_consent
from test_server_app import (
    INITIALIZE,
    ISSUER,
    MCP_ACCEPT,
    RunningServer,
    secret_env,
    serve_app,
)
from upstream_server import UpstreamServer, upstream_server

from conftest import ScratchDatabase

REDIRECT = "http://127.0.0.1:3000/callback"
VERIFIER = "v" * 43
CHALLENGE = (
    base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest())
    .rstrip(b"=")
    .decode()
)
TABLES = (
    "oauth_clients",
    "oauth_pending_authorizations",
    "oauth_codes",
    "oauth_grants",
    "user_sessions",
)
# The server's default refresh grace: for this long after a rotation, the old
# refresh token still refreshes, into a sibling pair of the same family.
REFRESH_GRACE_S = 1.0


@pytest.fixture
def running(db: ScratchDatabase, upstream: UpstreamServer) -> Iterator[RunningServer]:
    # Without the cleanup task, rows change only through the requests sent.
    env = {**secret_env(), "TOKEN_CLEANUP_INTERVAL": "0"}
    with serve_app(db, env, upstream=upstream) as server:
        yield server


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with upstream_server(redirect_uri=ISSUER + "/oauth/callback") as server:
        yield server


def snapshot(db: ScratchDatabase) -> dict[str, list[tuple[Any, ...]]]:
    """Return every row of the OAuth and session tables, in a stable order."""
    with db.connect() as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in TABLES
        }


def register(server: RunningServer) -> str:
    response = server.http.post(
        "/register",
        json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["client_id"])


def authorize(server: RunningServer, client_id: str, **params: str) -> httpx2.Response:
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "code_challenge": CHALLENGE,
        "code_challenge_method": "S256",
        "state": "client-state",
        **params,
    }
    return server.http.get("/authorize", params=query)


def upstream_query(
    server: RunningServer, upstream: UpstreamServer, client_id: str
) -> dict[str, str]:
    """Authorize, approve and authorize at the upstream; return the callback query.

    The binding cookie of the approval stays in ``server.http``'s cookie jar.
    """
    response = authorize(server, client_id)
    assert response.status_code == 302, response.text
    approved = answer_consent(server.http, response.headers["location"])
    assert approved.status_code == 303, approved.text
    return upstream.authorize(approved.headers["location"])


def callback(server: RunningServer, query: dict[str, str]) -> httpx2.Response:
    return server.http.get(
        "/oauth/callback", params=query, headers={"Accept": "application/json"}
    )


def redirect_params(response: httpx2.Response) -> dict[str, list[str]]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return parse_qs(urlsplit(location).query)


def sign_in(server: RunningServer, upstream: UpstreamServer, client_id: str) -> str:
    """Run the whole authorization; return the authorization code."""
    response = callback(server, upstream_query(server, upstream, client_id))
    return redirect_params(response)["code"][0]


def exchange(
    server: RunningServer,
    client_id: str,
    code: str,
    *,
    verifier: str = VERIFIER,
    redirect_uri: str = REDIRECT,
) -> httpx2.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "redirect_uri": redirect_uri,
        "client_id": client_id,
    }
    return server.http.post("/token", data=form)


def refresh(server: RunningServer, client_id: str, token: str) -> httpx2.Response:
    form = {"grant_type": "refresh_token", "refresh_token": token}
    return server.http.post("/token", data={**form, "client_id": client_id})


def tokens(server: RunningServer, upstream: UpstreamServer) -> tuple[str, Any]:
    """Register a client and sign in; return the client id and the tokens."""
    client_id = register(server)
    response = exchange(server, client_id, sign_in(server, upstream, client_id))
    assert response.status_code == 200, response.text
    return client_id, response.json()


def call_mcp(server: RunningServer, access_token: str) -> httpx2.Response:
    headers = {"Accept": MCP_ACCEPT, "Authorization": f"Bearer {access_token}"}
    return server.http.post("/mcp", json=INITIALIZE, headers=headers)


def error_of(response: httpx2.Response) -> str:
    return str(response.json()["error"])


# State at /oauth/callback (the upstream's state) and /authorize (the client's)


def test_callback_reused_state(
    running: RunningServer, upstream: UpstreamServer, db: ScratchDatabase
) -> None:
    client_id = register(running)
    query = upstream_query(running, upstream, client_id)
    first = callback(running, query)
    before = snapshot(db)

    again = callback(running, query)

    assert first.status_code == 302
    assert again.status_code == 400
    assert error_of(again) == "invalid_request"
    assert snapshot(db) == before
    assert len(before["oauth_codes"]) == 1


def test_callback_expired_state(
    running: RunningServer, upstream: UpstreamServer, db: ScratchDatabase
) -> None:
    client_id = register(running)
    query = upstream_query(running, upstream, client_id)
    with db.connect() as conn:
        conn.execute(
            "UPDATE oauth_pending_authorizations "
            "SET expires_at = now() - interval '1 s'"
        )
        conn.commit()
    before = snapshot(db)

    response = callback(running, query)

    assert response.status_code == 400
    assert error_of(response) == "invalid_request"
    assert snapshot(db) == before
    assert before["oauth_codes"] == []


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("x", id="short"),
        pytest.param("mcpst_" + "A" * 42 + "\x00", id="nul"),
        pytest.param("mcpac_" + "A" * 43, id="code-not-state"),
        pytest.param("s" * 10_000, id="long"),
    ],
)
def test_callback_wrong_state(
    running: RunningServer,
    upstream: UpstreamServer,
    db: ScratchDatabase,
    state: str | None,
) -> None:
    client_id = register(running)
    query = upstream_query(running, upstream, client_id)
    if state is None:
        del query["state"]
    else:
        query["state"] = state
    before = snapshot(db)

    response = callback(running, query)

    assert response.status_code == 400
    assert error_of(response) == "invalid_request"
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("state", "described"),
    [
        pytest.param("a\x00b", "NUL", id="nul"),
        pytest.param("s" * 2049, "2049 characters", id="long"),
    ],
)
def test_authorize_bad_client_state(
    running: RunningServer, db: ScratchDatabase, state: str, described: str
) -> None:
    client_id = register(running)
    before = snapshot(db)

    response = authorize(running, client_id, state=state)

    # RFC 6749 section 4.1.2.1: the client and redirect URI are valid, so the
    # error goes back to the client, with its state.
    params = redirect_params(response)
    assert params["error"] == ["invalid_request"]
    assert described in params["error_description"][0]
    assert snapshot(db) == before


# Authorization codes at /token


def test_reused_code_revokes_first_tokens(
    running: RunningServer, upstream: UpstreamServer, db: ScratchDatabase
) -> None:
    client_id = register(running)
    code = sign_in(running, upstream, client_id)
    first = exchange(running, client_id, code)
    assert first.status_code == 200, first.text
    issued = first.json()
    assert call_mcp(running, issued["access_token"]).status_code == 200

    again = exchange(running, client_id, code)

    # RFC 6749 sections 4.1.2 and 10.5: deny the second use and revoke the
    # tokens issued at the first.
    assert again.status_code == 400
    assert error_of(again) == "invalid_grant"
    assert call_mcp(running, issued["access_token"]).status_code == 401
    after_refresh = refresh(running, client_id, issued["refresh_token"])
    assert after_refresh.status_code == 400
    assert error_of(after_refresh) == "invalid_grant"
    rows = snapshot(db)
    assert len(rows["user_sessions"]) == 1
    assert len(rows["oauth_grants"]) == 1
    assert len(rows["oauth_codes"]) == 1
    with db.connect() as conn:
        revoked = conn.execute(
            "SELECT count(*) FROM user_sessions WHERE revoked_at IS NOT NULL"
        ).fetchone()
    assert revoked == (1,)


def test_pkce_mismatch_keeps_code(
    running: RunningServer, upstream: UpstreamServer, db: ScratchDatabase
) -> None:
    client_id = register(running)
    code = sign_in(running, upstream, client_id)
    before = snapshot(db)

    wrong = exchange(running, client_id, code, verifier="w" * 43)

    # RFC 7636 section 4.6: a verifier that does not match is invalid_grant.
    assert wrong.status_code == 400
    assert error_of(wrong) == "invalid_grant"
    assert snapshot(db) == before
    assert exchange(running, client_id, code).status_code == 200


def test_token_redirect_uri_mismatch(
    running: RunningServer, upstream: UpstreamServer, db: ScratchDatabase
) -> None:
    client_id = register(running)
    code = sign_in(running, upstream, client_id)
    before = snapshot(db)

    response = exchange(
        running, client_id, code, redirect_uri="http://127.0.0.1:3000/other"
    )

    assert response.status_code == 400
    # NOTE: RFC 6749 section 5.2 names invalid_grant for a redirect URI that
    # differs from the authorization request's. The MCP SDK's token handler
    # (mcp 2.3) returns invalid_request.
    assert error_of(response) == "invalid_request"
    assert "redirect_uri" in response.json()["error_description"]
    assert snapshot(db) == before


def test_authorize_redirect_uri_mismatch(
    running: RunningServer, db: ScratchDatabase
) -> None:
    client_id = register(running)
    before = snapshot(db)

    response = authorize(running, client_id, redirect_uri="https://evil.example/cb")

    # RFC 6749 section 4.1.2.1: with an invalid redirect URI the server must
    # not redirect, so the error is the response itself.
    assert response.status_code == 400
    assert error_of(response) == "invalid_request"
    assert "location" not in response.headers
    assert snapshot(db) == before


# Unknown clients


UNKNOWN_CLIENT_IDS = [
    pytest.param("unknown-client", id="unknown"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("https://app.example.com/\x00.json", id="nul-url"),
    pytest.param("c" * 2049, id="long"),
]


@pytest.mark.parametrize("client_id", UNKNOWN_CLIENT_IDS)
def test_unknown_client_everywhere(
    running: RunningServer, db: ScratchDatabase, client_id: str
) -> None:
    before = snapshot(db)

    authorized = authorize(running, client_id)
    exchanged = exchange(running, client_id, "mcpac_" + "A" * 43)
    refreshed = refresh(running, client_id, "mcprt_" + "A" * 43)
    revoked = running.http.post(
        "/revoke",
        data={"token": "mcpat_" + "A" * 43, "client_id": client_id},
    )

    # An unknown client gets no redirect (RFC 6749 section 4.1.2.1), and
    # client authentication fails at /token with 401 invalid_client (RFC 6749
    # section 5.2).
    assert authorized.status_code == 400
    assert error_of(authorized) == "invalid_request"
    assert "location" not in authorized.headers
    for response in (exchanged, refreshed):
        assert response.status_code == 401, response.text
        assert error_of(response) == "invalid_client"
    # NOTE: RFC 7009 section 2.2.1 points to RFC 6749 section 5.2, whose code
    # for a failed client authentication is invalid_client. The MCP SDK's
    # revocation handler (mcp 2.3) returns unauthorized_client.
    assert revoked.status_code == 401, revoked.text
    assert error_of(revoked) == "unauthorized_client"
    assert snapshot(db) == before


def test_registration_nul_metadata(running: RunningServer, db: ScratchDatabase) -> None:
    response = running.http.post(
        "/register",
        json={"redirect_uris": [REDIRECT], "client_name": "evil\x00name"},
    )

    # RFC 7591 section 3.2.2: invalid metadata is invalid_client_metadata.
    assert response.status_code == 400
    assert error_of(response) == "invalid_client_metadata"
    assert snapshot(db)["oauth_clients"] == []


# Bearer tokens at /mcp


def assert_invalid_token(response: httpx2.Response) -> None:
    # RFC 6750 section 3.1: a token that is expired, revoked or malformed is
    # invalid_token, with 401 and a Bearer challenge.
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert error_of(response) == "invalid_token"


def test_expired_bearer_token(
    running: RunningServer, upstream: UpstreamServer, db: ScratchDatabase
) -> None:
    _, issued = tokens(running, upstream)
    with db.connect() as conn:
        conn.execute("UPDATE user_sessions SET expires_at = now() - interval '1 s'")
        conn.commit()
    before = snapshot(db)

    response = call_mcp(running, issued["access_token"])

    assert_invalid_token(response)
    assert snapshot(db) == before


def test_revoked_bearer_token(
    running: RunningServer, upstream: UpstreamServer, db: ScratchDatabase
) -> None:
    client_id, issued = tokens(running, upstream)
    revoked = running.http.post(
        "/revoke",
        data={
            "token": issued["access_token"],
            "client_id": client_id,
            "client_secret": "",
        },
    )
    assert revoked.status_code == 200, revoked.text
    before = snapshot(db)

    response = call_mcp(running, issued["access_token"])

    assert_invalid_token(response)
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("garbage", id="short"),
        pytest.param("mcpat_" + "!" * 43, id="bad-characters"),
        pytest.param("mcprt_" + "A" * 43, id="refresh-token"),
        pytest.param("mcpat_" + "A" * 10_000, id="long"),
    ],
)
def test_malformed_bearer_token(
    running: RunningServer, upstream: UpstreamServer, db: ScratchDatabase, token: str
) -> None:
    _, issued = tokens(running, upstream)
    before = snapshot(db)

    response = call_mcp(running, token)

    assert_invalid_token(response)
    assert snapshot(db) == before
    assert call_mcp(running, issued["access_token"]).status_code == 200


# Refresh


def test_concurrent_refresh_one_family(
    running: RunningServer, upstream: UpstreamServer, db: ScratchDatabase
) -> None:
    client_id, issued = tokens(running, upstream)
    old = issued["refresh_token"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: refresh(running, client_id, old), range(6)))

    # Within the refresh grace each refresh of one token gives a new pair of
    # the same family (the session store's documented rule), and each works.
    ok = [response.json() for response in responses if response.status_code == 200]
    rejected = [response for response in responses if response.status_code != 200]
    assert ok
    for response in rejected:
        assert response.status_code == 400
        assert error_of(response) == "invalid_grant"
    for pair in ok:
        assert call_mcp(running, pair["access_token"]).status_code == 200
    rows = snapshot(db)["user_sessions"]
    assert len(rows) == 1 + len(ok)
    with db.connect() as conn:
        families = conn.execute(
            "SELECT count(DISTINCT family_id) FROM user_sessions"
        ).fetchone()
    assert families == (1,)

    # After the grace, the old token is a replay: RFC 9700 section 4.14.2
    # has the server revoke the family, every branch included.
    time.sleep(REFRESH_GRACE_S + 0.2)
    replay = refresh(running, client_id, old)

    assert replay.status_code == 400
    assert error_of(replay) == "invalid_grant"
    for pair in ok:
        assert call_mcp(running, pair["access_token"]).status_code == 401
    with db.connect() as conn:
        live = conn.execute(
            "SELECT count(*) FROM user_sessions WHERE revoked_at IS NULL"
        ).fetchone()
    assert live == (0,)


# Oversized bodies


@pytest.mark.parametrize("path", ["/revoke", "/authorize"])
def test_oversized_form_body(
    running: RunningServer, db: ScratchDatabase, path: str
) -> None:
    client_id = register(running)
    before = snapshot(db)

    response = running.http.post(
        path,
        data={"client_id": client_id, "token": "x", "padding": "x" * 2_000_000},
    )

    assert response.status_code == 413
    assert error_of(response) == "invalid_request"
    assert "16384 bytes" in response.json()["error_description"]
    assert snapshot(db) == before
