"""The assembled server app, served by uvicorn on 127.0.0.1 and called over HTTP.

Each test runs the app from :func:`build_app` with its lifespan on a real
PostgreSQL database, and a stand-in upstream (or, in development mode, the
built-in identity provider). The public URL of most tests is
``https://mcp.example.com/mcp``: the server listens on 127.0.0.1 but
advertises that URL, and no request ever goes to mcp.example.com.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import psycopg
import pytest
import uvicorn

from mcp_authdb.errors import ConfigurationError
from mcp_authdb.server.app import (
    OAUTH_CLEANUP_LOCK_KEY,
    build_app,
    source_address,
)
from mcp_authdb.server.config import ServerConfig
from server_helpers import answer_consent
from upstream_server import UpstreamServer, loopback_socket, upstream_server

from conftest import ScratchDatabase

PUBLIC_URL = "https://mcp.example.com/mcp"
ISSUER = "https://mcp.example.com"
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}
MCP_ACCEPT = "application/json, text/event-stream"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}


@dataclasses.dataclass
class RunningServer:
    """An app served on 127.0.0.1, and an HTTP client pointed at it."""

    base_url: str
    config: ServerConfig
    http: httpx2.Client


def secret_env() -> dict[str, str]:
    return {
        "MCP_AUTHDB_TOKEN_KEYS": "k1:" + secrets.token_urlsafe(32),
        "DB_ENCRYPTION_KEY": secrets.token_hex(32),
    }


@contextlib.contextmanager
def serve_app(
    db: ScratchDatabase,
    extra_env: dict[str, str],
    *,
    public_url: str | None = PUBLIC_URL,
    dev: bool = False,
    upstream: UpstreamServer | None = None,
) -> Iterator[RunningServer]:
    """Build the app from the environment and serve it until the block ends."""
    sock = loopback_socket()
    port = sock.getsockname()[1]
    env = db.env(**extra_env)
    if public_url is not None:
        env["MCP_AUTHDB_PUBLIC_URL"] = public_url
    if upstream is not None:
        env.update(upstream.env())
    # The database settings come from env, MCP_AUTHDB_DATA_DIR included.
    config = ServerConfig.from_env(env, dev=dev, port=port)
    app = build_app(config)

    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="on",
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="app-under-test"
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=10)
            raise RuntimeError("the app did not start; see the log above")
        time.sleep(0.02)

    base_url = f"http://127.0.0.1:{port}"
    try:
        with httpx2.Client(base_url=base_url, timeout=10) as http:
            yield RunningServer(base_url=base_url, config=config, http=http)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
    assert not thread.is_alive(), "the app did not stop"


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with upstream_server(redirect_uri=ISSUER + "/oauth/callback") as server:
        yield server


@pytest.fixture
def running(db: ScratchDatabase, upstream: UpstreamServer) -> Iterator[RunningServer]:
    with serve_app(db, secret_env(), upstream=upstream) as server:
        yield server


def register(
    server: RunningServer, *, forwarded_for: str | None = None, **metadata: Any
) -> httpx2.Response:
    body = {
        "redirect_uris": ["http://127.0.0.1:3000/callback"],
        "client_name": "test client",
        "token_endpoint_auth_method": "none",
        **metadata,
    }
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    return server.http.post("/register", json=body, headers=headers)


def count_clients(db: ScratchDatabase) -> int:
    with db.connect() as conn:
        row = conn.execute("SELECT count(*) FROM oauth_clients").fetchone()
    assert row is not None
    return int(row[0])


# Metadata


def test_authorization_server_metadata(running: RunningServer) -> None:
    response = running.http.get("/.well-known/oauth-authorization-server")

    assert response.status_code == 200
    metadata = response.json()
    assert metadata["issuer"] == ISSUER
    assert metadata["authorization_endpoint"] == ISSUER + "/authorize"
    assert metadata["token_endpoint"] == ISSUER + "/token"
    assert metadata["registration_endpoint"] == ISSUER + "/register"
    assert metadata["revocation_endpoint"] == ISSUER + "/revoke"
    assert metadata["response_types_supported"] == ["code"]
    assert metadata["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert "none" in metadata["token_endpoint_auth_methods_supported"]
    assert "client_secret_post" in metadata["token_endpoint_auth_methods_supported"]
    assert metadata["client_id_metadata_document_supported"] is True
    assert metadata["authorization_response_iss_parameter_supported"] is True
    assert metadata["scopes_supported"] == list(running.config.scopes)


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-protected-resource/mcp",
    ],
)
def test_protected_resource_metadata(running: RunningServer, path: str) -> None:
    response = running.http.get(path)

    assert response.status_code == 200
    metadata = response.json()
    assert metadata["resource"] == PUBLIC_URL
    assert metadata["authorization_servers"] == [ISSUER]
    assert metadata["bearer_methods_supported"] == ["header"]
    assert metadata["scopes_supported"] == list(running.config.scopes)


def test_metadata_ignores_forged_headers(running: RunningServer) -> None:
    forged = {
        "Host": "evil.example",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Prefix": "/evil",
        "Forwarded": "host=evil.example;proto=http",
    }

    server_metadata = running.http.get(
        "/.well-known/oauth-authorization-server", headers=forged
    ).json()
    resource_metadata = running.http.get(
        "/.well-known/oauth-protected-resource/mcp", headers=forged
    ).json()
    challenge = running.http.post(
        "/mcp", json=INITIALIZE, headers={**forged, "Accept": MCP_ACCEPT}
    )

    assert "evil" not in str(server_metadata)
    assert server_metadata["issuer"] == ISSUER
    assert resource_metadata["resource"] == PUBLIC_URL
    assert "evil" not in challenge.headers["www-authenticate"]


def test_metadata_allows_cross_origin(running: RunningServer) -> None:
    response = running.http.get(
        "/.well-known/oauth-protected-resource/mcp",
        headers={"Origin": "http://localhost:6274"},
    )

    assert response.headers["access-control-allow-origin"] == "*"


# The MCP endpoint


def test_mcp_without_token_is_401(running: RunningServer) -> None:
    response = running.http.post(
        "/mcp", json=INITIALIZE, headers={"Accept": MCP_ACCEPT}
    )

    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert (
        'resource_metadata="https://mcp.example.com/.well-known/'
        'oauth-protected-resource/mcp"'
    ) in challenge
    assert response.json()["error"] == "invalid_token"


def test_mcp_with_unknown_token_is_401(running: RunningServer) -> None:
    response = running.http.post(
        "/mcp",
        json=INITIALIZE,
        headers={"Accept": MCP_ACCEPT, "Authorization": "Bearer mcpat_" + "A" * 43},
    )

    assert response.status_code == 401


# /register


def test_register_public_client(running: RunningServer, db: ScratchDatabase) -> None:
    response = register(running)

    assert response.status_code == 201
    client = response.json()
    assert client["client_id"]
    assert "client_secret" not in client
    assert client["scope"] == " ".join(running.config.scopes)
    assert count_clients(db) == 1


def test_register_body_too_large(running: RunningServer, db: ScratchDatabase) -> None:
    response = register(running, client_name="x" * 20_000)

    assert response.status_code == 413
    assert response.json()["error"] == "invalid_client_metadata"
    assert "16384 bytes" in response.json()["error_description"]
    assert count_clients(db) == 0


def test_register_chunked_body_too_large(running: RunningServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"redirect_uris": ["http://127.0.0.1/cb"], "client_name": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}'

    response = running.http.post(
        "/register", content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 413


def test_register_rate_limited(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    env = {**secret_env(), "MCP_AUTHDB_REGISTRATION_LIMIT": "2"}
    with serve_app(db, env, upstream=upstream) as server:
        first = register(server)
        second = register(server)
        third = register(server)

    assert first.status_code == 201
    assert second.status_code == 201
    assert third.status_code == 429
    assert third.headers["retry-after"] == "3600"
    assert third.json()["error"] == "too_many_requests"
    assert count_clients(db) == 2


def test_register_limit_ignores_untrusted_forwarding(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    env = {**secret_env(), "MCP_AUTHDB_REGISTRATION_LIMIT": "1"}
    with serve_app(db, env, upstream=upstream) as server:
        first = register(server, forwarded_for="203.0.113.1")
        second = register(server, forwarded_for="203.0.113.2")

    assert first.status_code == 201
    assert second.status_code == 429
    with db.connect() as conn:
        rows = conn.execute("SELECT registered_from FROM oauth_clients").fetchall()
    assert rows == [("127.0.0.1",)]


def test_register_limit_per_forwarded_source(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    env = {
        **secret_env(),
        "MCP_AUTHDB_REGISTRATION_LIMIT": "1",
        "MCP_AUTHDB_TRUSTED_PROXIES": "127.0.0.1",
    }
    with serve_app(db, env, upstream=upstream) as server:
        first = register(server, forwarded_for="203.0.113.1")
        again = register(server, forwarded_for="203.0.113.1")
        other = register(server, forwarded_for="198.51.100.7, 203.0.113.1")

    assert first.status_code == 201
    assert again.status_code == 429
    # The proxy appends the address it saw. The entry on its left is the
    # client's own unchecked claim, so it is ignored.
    assert other.status_code == 429
    with db.connect() as conn:
        rows = conn.execute("SELECT registered_from FROM oauth_clients").fetchall()
    assert rows == [("203.0.113.1",)]


def test_register_invalid_metadata_is_400(running: RunningServer) -> None:
    response = running.http.post(
        "/register", content=b"not json", headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_client_metadata"


# /token


def token_request(server: RunningServer, **form: str) -> httpx2.Response:
    body = {
        "grant_type": "authorization_code",
        "code": "mcpac_" + "A" * 43,
        "code_verifier": "v" * 43,
        "client_id": "unknown-client",
        "redirect_uri": "http://127.0.0.1:3000/callback",
        **form,
    }
    return server.http.post("/token", data=body)


def test_token_rejects_other_resource(running: RunningServer) -> None:
    response = token_request(running, resource="https://other.example/mcp")

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_target"
    assert "https://mcp.example.com/mcp" in response.json()["error_description"]
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("resource", [PUBLIC_URL, PUBLIC_URL + "/"])
def test_token_passes_own_resource(running: RunningServer, resource: str) -> None:
    response = token_request(running, resource=resource)

    # The request reaches the SDK's handler, which rejects the unknown client.
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_token_rejects_one_bad_resource_of_two(running: RunningServer) -> None:
    response = running.http.post(
        "/token",
        content=(
            "grant_type=refresh_token&refresh_token=x&client_id=c"
            f"&resource={PUBLIC_URL}&resource=https%3A%2F%2Fother.example%2F"
        ),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_target"


def test_token_body_too_large(running: RunningServer) -> None:
    response = token_request(running, padding="x" * 20_000)

    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"


def test_token_rejects_json_body(running: RunningServer) -> None:
    response = running.http.post(
        "/token",
        json={"grant_type": "refresh_token", "resource": "https://other.example/"},
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "x-www-form-urlencoded" in response.json()["error_description"]


def test_token_preflight_passes(running: RunningServer) -> None:
    response = running.http.options(
        "/token",
        headers={
            "Origin": "http://localhost:6274",
            "Access-Control-Request-Method": "POST",
        },
    )

    assert response.status_code == 200
    assert "POST" in response.headers["access-control-allow-methods"]


# Other routes


def test_health(running: RunningServer) -> None:
    response = running.http.get("/health")

    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_metrics(running: RunningServer) -> None:
    response = running.http.get("/metrics")

    assert response.status_code == 200
    assert "mcp_authdb_requests" in response.text


def test_callback_with_unknown_state(running: RunningServer) -> None:
    response = running.http.get(
        "/oauth/callback", params={"code": "x", "state": "mcpst_" + "A" * 43}
    )

    assert response.status_code == 400


def test_dev_routes_absent_outside_dev(running: RunningServer) -> None:
    response = running.http.get("/dev/oauth/authorize")

    assert response.status_code == 404


def test_authorize_redirects_to_consent(
    running: RunningServer, upstream: UpstreamServer
) -> None:
    client_id = register(running).json()["client_id"]

    response = running.http.get(
        "/authorize",
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": "http://127.0.0.1:3000/callback",
            "code_challenge": "c" * 43,
            "code_challenge_method": "S256",
            "state": "client-state",
            "resource": PUBLIC_URL,
        },
    )

    assert response.status_code == 302
    consent_url = response.headers["location"]
    assert consent_url.startswith(ISSUER + "/oauth/consent?request=mcpst_")
    page = running.http.get(urlsplit(consent_url).path, params={"x": "1"})
    assert page.status_code == 400
    assert page.headers["x-frame-options"] == "DENY"

    approved = answer_consent(running.http, consent_url)
    assert approved.status_code == 303
    location = approved.headers["location"]
    assert location.startswith(upstream.base_url + "/oauth/authorize?")
    query = parse_qs(urlsplit(location).query)
    assert query["redirect_uri"] == [ISSUER + "/oauth/callback"]
    assert query["state"][0].startswith("mcpst_")
    cookie = approved.headers["set-cookie"]
    assert cookie.startswith("__Host-mcp_authdb_signin=")
    assert "Path=/;" in cookie
    assert "Secure" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie


def test_consent_page_not_frameable(
    running: RunningServer, upstream: UpstreamServer
) -> None:
    client_id = register(running).json()["client_id"]
    response = running.http.get(
        "/authorize",
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": "http://127.0.0.1:3000/callback",
            "code_challenge": "c" * 43,
            "code_challenge_method": "S256",
            "resource": PUBLIC_URL,
        },
    )
    parts = urlsplit(response.headers["location"])

    page = running.http.get(f"{parts.path}?{parts.query}")

    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert "127.0.0.1" in page.text


def test_consent_post_over_limit(running: RunningServer) -> None:
    limit = running.config.registration_max_bytes

    response = running.http.post(
        "/oauth/consent", content=b"a" * (limit + 1), headers=_FORM
    )

    assert response.status_code == 413


# The OAuth state cleanup


def metric_value(server: RunningServer, name: str, labels: str) -> float:
    text = server.http.get("/metrics").text
    match = re.search(
        rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M
    )
    return float(match[1]) if match else 0.0


def wait_for(condition: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not become true in time")
        time.sleep(0.05)


def seed_expired_pending(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO oauth_clients (client_id, metadata, kind, first_session_at)"
            " VALUES ('c1', '{}', 'registered', now())"
        )
        conn.execute(
            "INSERT INTO oauth_pending_authorizations (state_hash, client_id,"
            " redirect_uri, redirect_uri_provided_explicitly, scopes,"
            " code_challenge, resource, upstream_verifier_encrypted, expires_at)"
            " VALUES ('h1', 'c1', 'http://127.0.0.1/cb', true, '{}', 'c', 'r',"
            " '\\x00', now() - interval '1 minute')"
        )
        conn.commit()


def count_pending(db: ScratchDatabase) -> int:
    with db.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM oauth_pending_authorizations"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_cleanup_deletes_expired_state(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    seed_expired_pending(db)
    env = {**secret_env(), "TOKEN_CLEANUP_INTERVAL": "1"}

    with serve_app(db, env, upstream=upstream) as server:
        wait_for(lambda: count_pending(db) == 0)
        wait_for(
            lambda: (
                metric_value(
                    server, "mcp_authdb_oauth_cleanup_runs_total", 'outcome="completed"'
                )
                >= 1
            )
        )


def test_cleanup_skips_while_locked(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    seed_expired_pending(db)
    env = {**secret_env(), "TOKEN_CLEANUP_INTERVAL": "1"}

    with db.connect(autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (OAUTH_CLEANUP_LOCK_KEY,))
        with serve_app(db, env, upstream=upstream) as server:
            wait_for(
                lambda: (
                    metric_value(
                        server,
                        "mcp_authdb_oauth_cleanup_runs_total",
                        'outcome="skipped"',
                    )
                    >= 1
                )
            )
            assert count_pending(db) == 1


def test_cleanup_off(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    seed_expired_pending(db)
    env = {**secret_env(), "TOKEN_CLEANUP_INTERVAL": "0"}

    with serve_app(db, env, upstream=upstream) as server:
        time.sleep(1.5)
        completed = metric_value(
            server, "mcp_authdb_oauth_cleanup_runs_total", 'outcome="completed"'
        )

    assert count_pending(db) == 1
    assert completed == 0


# The lifespan


def connections_to(db: ScratchDatabase) -> int:
    with psycopg.connect(db.url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_lifespan_closes_connections(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    with serve_app(db, secret_env(), upstream=upstream) as server:
        assert server.http.get("/health").status_code == 200
        assert connections_to(db) >= 1

    wait_for(lambda: connections_to(db) == 0)


def test_missing_encryption_key_fails_at_build(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    env = db.env(**upstream.env(), MCP_AUTHDB_TOKEN_KEYS="k1:" + "a" * 43)
    env.pop("DB_ENCRYPTION_KEY", None)
    config = ServerConfig.from_env(env, dev=False, settings=db.settings)

    with pytest.raises(ConfigurationError, match="DB_ENCRYPTION_KEY"):
        build_app(config)


# Development mode, through the whole sign-in


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign_in(server: RunningServer, level: str) -> dict[str, Any]:
    """Run the authorization code flow with plain HTTP; return the token response."""
    redirect_uri = "http://127.0.0.1:3000/callback"
    client_id = register(server).json()["client_id"]
    verifier, challenge = pkce_pair()

    authorize = server.http.get(
        "/authorize",
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": "s1",
            "resource": server.config.resource,
            "scope": "content:read content:search",
        },
    )
    assert authorize.status_code == 302, authorize.text
    approved = answer_consent(server.http, authorize.headers["location"])
    assert approved.status_code == 303, approved.text
    login_url = approved.headers["location"]
    assert login_url.startswith(server.base_url + "/dev/oauth/authorize?")
    login_query = {k: v[0] for k, v in parse_qs(urlsplit(login_url).query).items()}

    login = server.http.post(
        "/dev/oauth/authorize",
        data={**login_query, "user_id": "dev-alice", "subscription_level": level},
    )
    assert login.status_code in (302, 303), login.text
    callback = login.headers["location"]
    assert callback.startswith(server.base_url + "/oauth/callback?")

    back = server.http.get(callback)
    assert back.status_code == 302, back.text
    client_redirect = urlsplit(back.headers["location"])
    assert client_redirect.geturl().startswith(redirect_uri)
    result = {k: v[0] for k, v in parse_qs(client_redirect.query).items()}
    assert result["state"] == "s1"
    assert result["iss"] == server.config.issuer

    token = server.http.post(
        "/token",
        data={
            "grant_type": "authorization_code",
            "code": result["code"],
            "code_verifier": verifier,
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "resource": server.config.resource,
        },
    )
    assert token.status_code == 200, token.text
    tokens: dict[str, Any] = token.json()
    return tokens


def mcp_post(
    server: RunningServer, token: str, body: dict[str, Any], **headers: str
) -> httpx2.Response:
    return server.http.post(
        "/mcp",
        json=body,
        headers={
            "Accept": MCP_ACCEPT,
            "Authorization": f"Bearer {token}",
            "MCP-Protocol-Version": "2025-06-18",
            **headers,
        },
    )


def test_dev_sign_in_and_mcp_call(db: ScratchDatabase, tmp_path: Path) -> None:
    env = {"MCP_AUTHDB_DATA_DIR": str(tmp_path)}
    with serve_app(db, env, public_url=None, dev=True) as server:
        tokens = sign_in(server, "plus")
        access = tokens["access_token"]

        initialize = mcp_post(server, access, INITIALIZE)
        whoami = mcp_post(
            server,
            access,
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "whoami", "arguments": {}},
            },
        )
        rebinding = mcp_post(server, access, INITIALIZE, Host="evil.example")
        foreign_origin = mcp_post(
            server, access, INITIALIZE, Origin="https://evil.example"
        )

    assert initialize.status_code == 200, initialize.text
    assert initialize.json()["result"]["serverInfo"]["name"] == "mcp-authdb"
    assert whoami.status_code == 200, whoami.text
    assert "dev-alice" in whoami.text
    assert rebinding.status_code == 421
    assert foreign_origin.status_code == 403
    # Development mode keeps its keys in the data folder.
    assert (tmp_path / "encryption-key").is_file()
    assert (tmp_path / "token-keys").is_file()


def test_dev_routes_served_in_dev(db: ScratchDatabase, tmp_path: Path) -> None:
    env = {"MCP_AUTHDB_DATA_DIR": str(tmp_path)}
    with serve_app(db, env, public_url=None, dev=True) as server:
        response = server.http.get("/dev/oauth/authorize")

    assert response.status_code == 400


# Source address


def scope_of(peer: str | None, *forwarded: str) -> dict[str, Any]:
    return {
        "type": "http",
        "client": None if peer is None else (peer, 50000),
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    }


@pytest.fixture
def proxied_config() -> ServerConfig:
    env = {
        "DRUPAL_BASE_URL": "https://drupal.test",
        "OAUTH_CLIENT_ID": "mcp",
        "MCP_AUTHDB_TRUSTED_PROXIES": "10.0.0.0/8,::1",
    }
    return ServerConfig.from_env(env, dev=False)


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("198.51.100.1", (), "198.51.100.1"),
        ("198.51.100.1", ("203.0.113.9",), "198.51.100.1"),
        ("10.0.0.2", (), "10.0.0.2"),
        ("10.0.0.2", ("203.0.113.9",), "203.0.113.9"),
        ("10.0.0.2", ("1.1.1.1, 203.0.113.9",), "203.0.113.9"),
        ("10.0.0.2", ("203.0.113.9, 10.0.0.3",), "203.0.113.9"),
        ("10.0.0.2", ("203.0.113.9", "10.0.0.3"), "203.0.113.9"),
        ("10.0.0.2", ("garbage, 10.0.0.3",), "10.0.0.3"),
        ("10.0.0.2", ("10.0.0.4, 10.0.0.3",), "10.0.0.4"),
        ("10.0.0.2", ("203.0.113.9:4711",), "203.0.113.9"),
        ("10.0.0.2", ("[2001:db8::1]:4711",), "2001:db8::1"),
        ("::1", ("2001:DB8::1",), "2001:db8::1"),
        ("::ffff:10.0.0.2", ("203.0.113.9",), "203.0.113.9"),
        (None, ("203.0.113.9",), "unknown"),
    ],
)
def test_source_address(
    proxied_config: ServerConfig,
    peer: str | None,
    forwarded: tuple[str, ...],
    expected: str,
) -> None:
    assert source_address(scope_of(peer, *forwarded), proxied_config) == expected
