"""Client ID Metadata Documents fetched over real https on 127.0.0.1.

A threaded https server on 127.0.0.1, with a certificate from a trustme CA
made for this module, serves the documents. Host names such as
``client.test`` resolve through a resolver passed to the fetcher. The
autouse fixture ``no_name_resolution`` makes every other name lookup of the
process fail, so no test sends a DNS query. It also means that a fetch that
succeeds for ``client.test`` connected to the address the fetcher checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest
import trustme

from mcp_authdb.db import resolve_target
from mcp_authdb.db.pool import AsyncDatabase
from mcp_authdb.server import client_metadata
from mcp_authdb.server.client_metadata import (
    ClientMetadataError,
    ClientMetadataFetcher,
    address_problem,
    cache_lifetime,
    check_client_id_url,
    is_client_id_url,
    parse_document,
    resolve_host,
)
from mcp_authdb.server.crypto import Encryptor
from mcp_authdb.server.oauth_store import OAuthStore
from mcp_authdb.store import TokenHasher, TokenKeys

from conftest import ScratchDatabase

T = TypeVar("T")

HOST = "client.test"
HASHER = TokenHasher(TokenKeys.parse("k1:" + "m" * 43))


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


@dataclasses.dataclass
class Route:
    """The response of the server on one path."""

    body: bytes
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0  # before the status line
    trickle_s: float = 0.0  # between single bytes of the body
    content_length: bool = True


@dataclasses.dataclass
class SeenRequest:
    path: str
    host: str | None


class DocumentServer:
    """An https server on 127.0.0.1 with a route table and a request log."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[SeenRequest] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(SeenRequest(self.path, self.headers["Host"]))
                route = server.routes.get(self.path) or Route(b"{}", status=404)
                time.sleep(route.delay_s)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.content_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                if not route.trickle_s:
                    self.wfile.write(route.body)
                    return
                for byte in route.body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(route.trickle_s)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that give up close the socket mid-answer

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.socket = context.wrap_socket(
            self._httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), daemon=True
        )

    def url(self, path: str, host: str = HOST) -> str:
        return f"https://{host}:{self.port}{path}"

    def serve_document(self, path: str, host: str = HOST, **fields: Any) -> str:
        """Serve a valid document at ``path``; return its URL, the client_id."""
        url = self.url(path, host)
        document = {
            "client_id": url,
            "client_name": "Test client",
            "redirect_uris": ["http://127.0.0.1:3000/callback"],
            "token_endpoint_auth_method": "none",
            **fields,
        }
        self.routes[path] = Route(
            json.dumps(document).encode(),
            headers={"Content-Type": "application/json"},
        )
        return url

    def __enter__(self) -> DocumentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def server(server_context: ssl.SSLContext) -> Iterator[DocumentServer]:
    with DocumentServer(server_context) as document_server:
        yield document_server


@pytest.fixture(scope="module")
def trust(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture(autouse=True)
def no_name_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail every lookup of a host name; IP literals still resolve."""
    real_getaddrinfo = socket.getaddrinfo

    def literal_only(
        host: Any,
        port: Any,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> Any:
        flags |= socket.AI_NUMERICHOST
        return real_getaddrinfo(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", literal_only)


class Resolver:
    """A resolver for the fetcher with fixed results, which counts its calls."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise ClientMetadataError(f"could not resolve host {host!r}")
        return self.answers[host]


def local_resolver() -> Resolver:
    return Resolver({HOST: ["127.0.0.1"], "other.test": ["127.0.0.1"]})


class NullCache:
    """A document cache that is always empty, for tests of fetch() alone."""

    async def get_client(self, client_id: str) -> None:
        return None

    async def put_metadata_document(
        self, client_id: str, metadata: dict[str, Any], expires_at: datetime
    ) -> None:
        raise AssertionError("fetch() must not write the cache")


def fetcher(
    trust: ssl.SSLContext,
    *,
    store: Any = None,
    resolver: Resolver | None = None,
    allow_private: bool = True,
    **options: Any,
) -> ClientMetadataFetcher:
    return ClientMetadataFetcher(
        store if store is not None else NullCache(),
        allow_private=allow_private,
        verify=trust,
        resolver=resolver or local_resolver(),
        **options,
    )


async def fetch_error(fetcher: ClientMetadataFetcher, url: str) -> str:
    async with fetcher:
        with pytest.raises(ClientMetadataError) as info:
            await fetcher.fetch(url)
    return str(info.value)


# Fetching


def test_fetch_valid_document(server: DocumentServer, trust: ssl.SSLContext) -> None:
    url = server.serve_document("/client.json", scope="content:read")
    server.routes["/client.json"].headers["Cache-Control"] = "public, max-age=120"
    resolver = local_resolver()

    async def scenario() -> Any:
        async with fetcher(trust, resolver=resolver) as documents:
            return await documents.fetch(url)

    document = run(scenario)

    assert document.metadata["client_id"] == url
    assert document.metadata["redirect_uris"] == ["http://127.0.0.1:3000/callback"]
    assert document.metadata["token_endpoint_auth_method"] == "none"
    assert document.metadata["scope"] == "content:read"
    assert document.metadata["client_name"] == "Test client"
    assert document.lifetime == timedelta(seconds=120)
    assert resolver.calls == [HOST]
    assert server.requests == [SeenRequest("/client.json", f"{HOST}:{server.port}")]


def test_fetch_keeps_query(server: DocumentServer, trust: ssl.SSLContext) -> None:
    url = server.serve_document("/clients?id=7")

    async def scenario() -> Any:
        async with fetcher(trust) as documents:
            return await documents.fetch(url)

    assert run(scenario).metadata["client_id"] == url
    assert server.requests[0].path == "/clients?id=7"


def test_fetch_ip_literal_url(server: DocumentServer, trust: ssl.SSLContext) -> None:
    url = server.serve_document("/client.json", host="127.0.0.1")
    resolver = local_resolver()

    async def scenario() -> Any:
        async with fetcher(trust, resolver=resolver) as documents:
            return await documents.fetch(url)

    assert run(scenario).metadata["client_id"] == url
    assert resolver.calls == []


def test_fetch_checks_certificate_name(
    server: DocumentServer, trust: ssl.SSLContext
) -> None:
    # other.test resolves to the server, whose certificate names client.test.
    url = server.serve_document("/client.json", host="other.test")

    message = run(lambda: fetch_error(fetcher(trust), url))

    assert "certificate" in message.lower()
    assert server.requests == []


def test_fetch_untrusted_certificate(server: DocumentServer) -> None:
    url = server.serve_document("/client.json")

    message = run(lambda: fetch_error(fetcher(ssl.create_default_context()), url))

    assert "certificate verify failed" in message


def test_redirect_not_followed(server: DocumentServer, trust: ssl.SSLContext) -> None:
    server.serve_document("/elsewhere.json")
    server.routes["/client.json"] = Route(
        b"", status=302, headers={"Location": server.url("/elsewhere.json")}
    )

    message = run(lambda: fetch_error(fetcher(trust), server.url("/client.json")))

    assert "redirect (HTTP 302)" in message
    assert "not followed" in message
    assert [seen.path for seen in server.requests] == ["/client.json"]


def test_error_status_rejected(server: DocumentServer, trust: ssl.SSLContext) -> None:
    message = run(lambda: fetch_error(fetcher(trust), server.url("/missing.json")))

    assert "responded with HTTP 404, not 200" in message


def test_declared_size_too_large(server: DocumentServer, trust: ssl.SSLContext) -> None:
    url = server.url("/big.json")
    server.routes["/big.json"] = Route(b" " * (64 * 1024 + 1))

    message = run(lambda: fetch_error(fetcher(trust), url))

    assert f"is {64 * 1024 + 1} bytes, more than {64 * 1024}" in message


def test_streamed_size_too_large(server: DocumentServer, trust: ssl.SSLContext) -> None:
    url = server.url("/big.json")
    server.routes["/big.json"] = Route(b" " * (200 * 1024), content_length=False)

    message = run(lambda: fetch_error(fetcher(trust), url))

    assert f"is larger than {64 * 1024} bytes" in message


def test_size_limit_is_exact(server: DocumentServer, trust: ssl.SSLContext) -> None:
    url = server.serve_document("/client.json")
    route = server.routes["/client.json"]
    route.body = route.body.ljust(64 * 1024)
    route.content_length = False

    async def scenario() -> Any:
        async with fetcher(trust) as documents:
            return await documents.fetch(url)

    assert run(scenario).metadata["client_id"] == url


def test_encoded_body_rejected(server: DocumentServer, trust: ssl.SSLContext) -> None:
    url = server.serve_document("/client.json")
    server.routes["/client.json"].headers["Content-Encoding"] = "gzip"

    message = run(lambda: fetch_error(fetcher(trust), url))

    assert "Content-Encoding 'gzip'" in message


def test_slow_server_times_out(server: DocumentServer, trust: ssl.SSLContext) -> None:
    url = server.serve_document("/client.json")
    server.routes["/client.json"].delay_s = 3.0

    started = time.monotonic()
    message = run(lambda: fetch_error(fetcher(trust, timeout_s=0.5), url))
    elapsed = time.monotonic() - started

    assert "took longer than 0.5 s" in message or "timed out" in message.lower()
    assert elapsed < 2.5


def test_trickling_body_times_out(
    server: DocumentServer, trust: ssl.SSLContext
) -> None:
    # Each byte arrives well within the read timeout, but the whole body
    # would take 20 s: the deadline covers the whole request.
    url = server.serve_document("/client.json")
    server.routes["/client.json"].trickle_s = 0.1

    started = time.monotonic()
    message = run(lambda: fetch_error(fetcher(trust, timeout_s=1.0), url))
    elapsed = time.monotonic() - started

    assert "took longer than 1 s" in message
    assert elapsed < 3.0


# Private addresses


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "::",
        "fc00::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
    ],
)
def test_private_address_refused(
    server: DocumentServer, trust: ssl.SSLContext, address: str
) -> None:
    url = server.serve_document("/client.json")
    resolver = Resolver({HOST: [address]})

    message = run(
        lambda: fetch_error(fetcher(trust, resolver=resolver, allow_private=False), url)
    )

    assert f"host '{HOST}' resolves to" in message
    assert "public addresses only" in message
    assert resolver.calls == [HOST]
    assert server.requests == []


def test_loopback_literal_refused(
    server: DocumentServer, trust: ssl.SSLContext
) -> None:
    url = server.serve_document("/client.json", host="127.0.0.1")

    message = run(lambda: fetch_error(fetcher(trust, allow_private=False), url))

    assert "127.0.0.1 is a loopback address" in message
    assert server.requests == []


def test_any_private_answer_refuses(trust: ssl.SSLContext) -> None:
    # One public and one private address: nothing may be contacted, so the
    # download step is replaced by a trap.
    resolver = Resolver({HOST: ["93.184.216.34", "10.1.2.3"]})
    documents = fetcher(trust, resolver=resolver, allow_private=False)
    contacted: list[Any] = []

    async def trap(*args: Any) -> Any:
        contacted.append(args)
        raise AssertionError("no address may be contacted")

    documents._download = trap  # type: ignore[method-assign,assignment]

    message = run(lambda: fetch_error(documents, f"https://{HOST}/client.json"))

    assert "10.1.2.3 is a private address" in message
    assert contacted == []


def test_public_addresses_allowed() -> None:
    assert address_problem("93.184.216.34") is None
    assert address_problem("2606:4700:4700::1111") is None
    assert address_problem("::ffff:93.184.216.34") is None
    assert address_problem("not-an-ip") == "'not-an-ip' is not an IP address"


def test_resolver_result_used_once(
    server: DocumentServer, trust: ssl.SSLContext
) -> None:
    # A resolver whose second answer points elsewhere (DNS rebinding) is
    # asked once per fetch, and the connection goes to its first answer.
    url = server.serve_document("/client.json")
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    async def scenario() -> Any:
        documents = ClientMetadataFetcher(
            NullCache(), allow_private=True, verify=trust, resolver=rebinding
        )
        async with documents:
            return await documents.fetch(url)

    assert run(scenario).metadata["client_id"] == url
    assert next(answers) == ["10.0.0.1"]
    assert len(server.requests) == 1


def test_resolve_host_literal() -> None:
    assert run(lambda: resolve_host("127.0.0.1", 443)) == ["127.0.0.1"]


def test_resolve_host_failure() -> None:
    # The autouse fixture makes every name lookup fail without a query.
    with pytest.raises(ClientMetadataError, match="could not resolve host"):
        run(lambda: resolve_host("client.test", 443))


# Document and URL checks


def document(url: str, **fields: Any) -> bytes:
    base: dict[str, Any] = {
        "client_id": url,
        "redirect_uris": ["https://app.example.com/callback"],
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


URL = "https://app.example.com/client.json"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"not json", "is not JSON"),
        (b"[1, 2]", "is not a JSON object"),
        (document(URL + "?x"), "must be the document's URL"),
        (document("https://app.example.com/Client.json"), "must be the document's"),
        (document(URL, client_id=None), "has client_id None"),
        (document(URL, redirect_uris=None), "has no redirect_uris"),
        (document(URL, redirect_uris=[]), "has no redirect_uris"),
        (document(URL, redirect_uris="https://a.example/cb"), "has no redirect_uris"),
        (document(URL, redirect_uris=[7]), "is not a string: 7"),
        (document(URL, redirect_uris=["http://app.example.com/cb"]), "use https"),
        (document(URL, redirect_uris=["https://a.example/cb#f"]), "has a fragment"),
        (
            document(URL, token_endpoint_auth_method="client_secret_post"),
            "token_endpoint_auth_method 'client_secret_post'",
        ),
        (document(URL, client_secret="s3cret"), "contains client_secret"),
        (document(URL, grant_types=["refresh_token"]), "'authorization_code'"),
        (
            document(
                URL,
                grant_types=[
                    "authorization_code",
                    "urn:ietf:params:oauth:grant-type:jwt-bearer",
                ],
            ),
            "does not allow",
        ),
        (document(URL, response_types=["token"]), "must include 'code'"),
        (document(URL, logo_uri="not a url"), "is not valid client metadata"),
        (document(URL, client_name="a\x00b"), "contains a NUL character"),
        (document(URL, scope="read\x00"), "contains a NUL character"),
    ],
)
def test_invalid_documents(body: bytes, expected: str) -> None:
    with pytest.raises(ClientMetadataError) as info:
        parse_document(URL, body)

    assert expected in str(info.value)
    assert URL in str(info.value)


def test_document_defaults() -> None:
    metadata = parse_document(URL, document(URL))

    assert metadata["token_endpoint_auth_method"] == "none"
    assert metadata["grant_types"] == ["authorization_code", "refresh_token"]
    assert "client_secret" not in metadata


def test_document_secret_never_echoed() -> None:
    with pytest.raises(ClientMetadataError) as info:
        parse_document(URL, document(URL, client_secret="hunter2-secret"))

    assert "hunter2-secret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://app.example.com/client.json", "is not an https URL"),
        ("https://app.example.com", "has no path"),
        ("https://app.example.com/", "has no path"),
        ("https://user:pw@app.example.com/c.json", "contains userinfo"),
        ("https://app.example.com/c.json#top", "has a fragment"),
        ("https://app.example.com/a/../c.json", "'..' path segment"),
        ("https://app.example.com/./c.json", "'..' path segment"),
        ("https://app.example.com:99999/c.json", "is not a valid URL"),
        ("https:///c.json", "has no host"),
    ],
)
def test_invalid_client_id_urls(url: str, expected: str) -> None:
    with pytest.raises(ClientMetadataError) as info:
        check_client_id_url(url)

    assert expected in str(info.value)


def test_client_id_url_detection() -> None:
    assert is_client_id_url("https://app.example.com/client.json")
    assert is_client_id_url("HTTPS://app.example.com/client.json")
    assert not is_client_id_url("0b6f2f5e-5f7a-4d5e-9a6e-0d1c2b3a4f5e")
    assert not is_client_id_url("http://app.example.com/client.json")


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 3600),
        ("", 3600),
        ("max-age=600", 600),
        ("public, max-age=7200", 7200),
        ('max-age="900"', 900),
        ("max-age=5", 60),
        ("max-age=0", 60),
        ("max-age=9999999", 86400),
        ("max-age=99999999999999999999", 86400),
        ("max-age=-99999999999999999999", 60),
        ("max-age=abc", 3600),
        ("no-store", 60),
        ("no-cache, max-age=600", 60),
        ("private", 3600),
    ],
)
def test_cache_lifetime(header: str | None, seconds: int) -> None:
    assert cache_lifetime(header) == timedelta(seconds=seconds)


# Caching through the OAuth store


@contextlib.asynccontextmanager
async def oauth_store(db: ScratchDatabase) -> AsyncIterator[OAuthStore]:
    target = resolve_target(db.url, db.settings)
    async with AsyncDatabase(target, db.settings) as database:
        yield OAuthStore(database, Encryptor(b"k" * 32), HASHER)


def expire_document(db: ScratchDatabase, client_id: str) -> None:
    with db.connect() as conn:
        conn.execute(
            "UPDATE oauth_clients SET document_expires_at = now() - interval '1 s' "
            "WHERE client_id = %s",
            (client_id,),
        )


def test_get_caches_document(
    db: ScratchDatabase, server: DocumentServer, trust: ssl.SSLContext
) -> None:
    url = server.serve_document("/client.json")
    server.routes["/client.json"].headers["Cache-Control"] = "max-age=600"

    async def scenario() -> tuple[Any, Any, Any]:
        async with oauth_store(db) as store, fetcher(trust, store=store) as documents:
            first = await documents.get(url)
            second = await documents.get(url)
            return first, second, await store.get_client(url)

    before = datetime.now(UTC)
    first, second, stored = run(scenario)

    assert first is not None
    assert first["client_id"] == url
    assert second == first
    assert len(server.requests) == 1
    assert stored.kind == "metadata_document"
    assert stored.client_secret is None
    lifetime = stored.document_expires_at - before
    assert timedelta(seconds=590) < lifetime < timedelta(seconds=610)


def test_cache_shared_between_fetchers(
    db: ScratchDatabase, server: DocumentServer, trust: ssl.SSLContext
) -> None:
    # Two fetchers stand for two replicas: the second reads the first's row.
    url = server.serve_document("/client.json")

    async def scenario() -> Any:
        async with oauth_store(db) as store:
            async with fetcher(trust, store=store) as documents:
                await documents.get(url)
            async with fetcher(trust, store=store) as documents:
                return await documents.get(url)

    assert run(scenario)["client_id"] == url
    assert len(server.requests) == 1


def test_expired_document_fetched_again(
    db: ScratchDatabase, server: DocumentServer, trust: ssl.SSLContext
) -> None:
    url = server.serve_document("/client.json", client_name="First")

    async def scenario() -> tuple[Any, Any]:
        async with oauth_store(db) as store, fetcher(trust, store=store) as documents:
            first = await documents.get(url)
            expire_document(db, url)
            server.serve_document("/client.json", client_name="Second")
            return first, await documents.get(url)

    first, second = run(scenario)

    assert first["client_name"] == "First"
    assert second["client_name"] == "Second"
    assert len(server.requests) == 2


def test_failed_refetch_refuses_client(
    db: ScratchDatabase,
    server: DocumentServer,
    trust: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = server.serve_document("/client.json")

    async def scenario() -> tuple[Any, Any]:
        async with oauth_store(db) as store, fetcher(trust, store=store) as documents:
            first = await documents.get(url)
            expire_document(db, url)
            server.routes["/client.json"] = Route(b"gone", status=410)
            return first, await documents.get(url)

    first, second = run(scenario)

    assert first is not None
    assert second is None
    assert "responded with HTTP 410, not 200" in caplog.text
    assert url in caplog.text


def test_failure_remembered(
    db: ScratchDatabase, server: DocumentServer, trust: ssl.SSLContext
) -> None:
    url = server.url("/missing.json")

    async def scenario() -> list[Any]:
        async with oauth_store(db) as store, fetcher(trust, store=store) as documents:
            return [await documents.get(url) for _ in range(3)]

    assert run(scenario) == [None, None, None]
    assert len(server.requests) == 1


def test_huge_max_age_cached_one_day(
    db: ScratchDatabase, server: DocumentServer, trust: ssl.SSLContext
) -> None:
    url = server.serve_document("/client.json")
    headers = server.routes["/client.json"].headers
    headers["Cache-Control"] = "max-age=99999999999999999999"

    async def scenario() -> tuple[Any, Any]:
        async with oauth_store(db) as store, fetcher(trust, store=store) as documents:
            return await documents.get(url), await store.get_client(url)

    before = datetime.now(UTC)
    found, stored = run(scenario)

    assert found is not None
    lifetime = stored.document_expires_at - before
    assert timedelta(hours=23, minutes=59) < lifetime <= timedelta(hours=24, seconds=5)


def test_unexpected_failure_remembered(
    db: ScratchDatabase,
    server: DocumentServer,
    trust: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = server.serve_document("/client.json")

    def broken(url: str, body: bytes) -> dict[str, Any]:
        raise RuntimeError("a bug while checking the document")

    monkeypatch.setattr(client_metadata, "parse_document", broken)

    async def scenario() -> list[Any]:
        async with oauth_store(db) as store, fetcher(trust, store=store) as documents:
            return [await documents.get(url) for _ in range(3)]

    assert run(scenario) == [None, None, None]
    assert len(server.requests) == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "RuntimeError: a bug while checking the document" in errors[0].message
    assert url in errors[0].message
    assert count_clients(db) == 0


def count_clients(db: ScratchDatabase) -> int:
    with db.connect() as conn:
        row = conn.execute("SELECT count(*) FROM oauth_clients").fetchone()
    assert row is not None
    return int(row[0])


def test_concurrent_gets_fetch_once(
    db: ScratchDatabase, server: DocumentServer, trust: ssl.SSLContext
) -> None:
    url = server.serve_document("/client.json")
    server.routes["/client.json"].delay_s = 0.3

    async def scenario() -> list[Any]:
        async with oauth_store(db) as store, fetcher(trust, store=store) as documents:
            found = await asyncio.gather(*(documents.get(url) for _ in range(5)))
            assert documents._locks == {}
            return list(found)

    found = run(scenario)

    assert all(metadata is not None for metadata in found)
    assert len(server.requests) == 1


def test_invalid_url_refused_without_request(
    db: ScratchDatabase, server: DocumentServer, trust: ssl.SSLContext
) -> None:
    async def scenario() -> Any:
        async with oauth_store(db) as store, fetcher(trust, store=store) as documents:
            return await documents.get(f"https://{HOST}:{server.port}/")

    assert run(scenario) is None
    assert server.requests == []


def test_registered_client_not_replaced(
    db: ScratchDatabase, server: DocumentServer, trust: ssl.SSLContext
) -> None:
    url = server.serve_document("/client.json")

    async def scenario() -> tuple[Any, Any]:
        async with oauth_store(db) as store, fetcher(trust, store=store) as documents:
            await store.register_client(
                url, {"client_id": url}, None, source="127.0.0.1", limit_per_hour=5
            )
            return await documents.get(url), await store.get_client(url)

    found, stored = run(scenario)

    assert found is None
    assert stored.kind == "registered"
    assert server.requests == []
