"""Client ID Metadata Documents: clients whose client_id is an https URL.

An MCP client may skip registration and use as its ``client_id`` the https URL
of a JSON document that contains its metadata (the OAuth Client ID Metadata
Document draft, which the MCP authorization specification adopts). This
server fetches that document when the client first shows up, checks it, and
caches it in the ``oauth_clients`` table for the lifetime that its
``Cache-Control: max-age`` sets, clamped to between one minute and one day.

Fetching a URL that any client names makes this server send requests on a
client's behalf, so :class:`ClientMetadataFetcher` limits them:

- Only https, with no redirects followed, a 5 s deadline for the whole
  request, and at most 64 KiB read (streamed, so a larger body is never
  held in memory).
- The host name is resolved once, and every address it resolves to must be
  public (not private, loopback, link-local, reserved, multicast or
  unspecified) unless ``allow_private`` is set. The connection goes to one
  of those checked addresses, so a DNS answer that changes between the
  check and the connection cannot point the request at an internal address.
- Proxies from the environment are not used, because a proxy would make the
  connection on its own. Connections are not reused, so every request
  verifies the certificate for its own host name.
- A URL that failed is not fetched again for a minute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, Self
from urllib.parse import SplitResult, urlsplit

import httpx2
from mcp.server.auth.errors import stringify_pydantic_error
from mcp.shared.auth import JWT_BEARER_GRANT_TYPE, OAuthClientInformationFull
from pydantic import ValidationError

from mcp_authdb.errors import AuthDBError
from mcp_authdb.server.redirects import redirect_uri_problem

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
MAX_DOCUMENT_BYTES = 64 * 1024
MIN_CACHE_LIFETIME = timedelta(seconds=60)
MAX_CACHE_LIFETIME = timedelta(hours=24)
DEFAULT_CACHE_LIFETIME = timedelta(hours=1)
MIN_AGE_S = int(MIN_CACHE_LIFETIME.total_seconds())
MAX_AGE_S = int(MAX_CACHE_LIFETIME.total_seconds())
# After a document is rejected, its URL is rejected without a request for
# FAILURE_LIFETIME_S seconds. At most MAX_REMEMBERED_FAILURES URLs are kept.
FAILURE_LIFETIME_S = 60.0
MAX_REMEMBERED_FAILURES = 1024

Resolver = Callable[[str, int], Awaitable[list[str]]]


class ClientMetadataError(AuthDBError):
    """A client ID metadata document could not be fetched or is invalid."""


class _RegisteredClientError(Exception):
    """Error for a document URL client id that is stored as another kind of client."""


class StoredDocument(Protocol):
    """The fields of a cached client that the fetcher reads."""

    @property
    def metadata(self) -> dict[str, Any]: ...

    @property
    def kind(self) -> str: ...

    @property
    def document_expires_at(self) -> datetime | None: ...


class DocumentCache(Protocol):
    """The document cache: an :class:`~mcp_authdb.server.oauth_store.OAuthStore`."""

    async def get_client(self, client_id: str) -> StoredDocument | None: ...

    async def put_metadata_document(
        self, client_id: str, metadata: dict[str, Any], expires_at: datetime
    ) -> None: ...


@dataclasses.dataclass(frozen=True)
class MetadataDocument:
    """A fetched and checked document.

    ``metadata`` is an ``OAuthClientInformationFull`` dumped to JSON types,
    with ``token_endpoint_auth_method`` set to ``none``. ``lifetime`` is how
    long it may be cached.
    """

    metadata: dict[str, Any]
    lifetime: timedelta


def is_client_id_url(client_id: str) -> bool:
    """Return whether ``client_id`` names a metadata document: an https URL.

    The URL may still be invalid, which :func:`check_client_id_url` checks.
    """
    return client_id[:8].lower() == "https://"


def check_client_id_url(url: str) -> SplitResult:
    """Check that ``url`` may be a client_id; return its parts.

    The document draft requires the https scheme, a host, a path other than
    ``/``, no ``.`` or ``..`` path segments, no userinfo and no fragment.
    Raises :class:`ClientMetadataError` naming the rule broken.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a port out of range
    except ValueError as exc:
        raise ClientMetadataError(
            f"client_id {url!r} is not a valid URL: {exc}"
        ) from exc
    if parts.scheme != "https":
        raise ClientMetadataError(
            f"client_id {url!r} is not an https URL; metadata documents are "
            "fetched over https only"
        )
    if not parts.hostname:
        raise ClientMetadataError(f"client_id {url!r} has no host")
    if "@" in parts.netloc:
        raise ClientMetadataError(f"client_id {url!r} contains userinfo; remove it")
    if parts.fragment or "#" in url:
        raise ClientMetadataError(f"client_id {url!r} has a fragment; remove it")
    if parts.path in ("", "/"):
        raise ClientMetadataError(
            f"client_id {url!r} has no path; a metadata document URL needs one"
        )
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        raise ClientMetadataError(
            f"client_id {url!r} has a '.' or '..' path segment; remove it"
        )
    return parts


async def resolve_host(host: str, port: int) -> list[str]:
    """Resolve ``host`` to its IP addresses, in the resolver's order.

    Raises :class:`ClientMetadataError` when the name does not resolve.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ClientMetadataError(f"could not resolve host {host!r}: {exc}") from exc
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def address_problem(address: str) -> str | None:
    """Return why a document may not be fetched from ``address``, or None.

    Rejected are private, loopback, link-local, reserved, multicast and
    unspecified addresses, and any other address that is not globally
    reachable (such as 100.64.0.0/10). An IPv4 address mapped into IPv6
    (``::ffff:10.0.0.1``) is checked as the IPv4 address.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for label, flag in (
        ("loopback", ip.is_loopback),
        ("private", ip.is_private),
        ("link-local", ip.is_link_local),
        ("reserved", ip.is_reserved),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
    ):
        if flag:
            return f"{address} is a {label} address"
    if not ip.is_global:
        return f"{address} is not a globally reachable address"
    return None


def cache_lifetime(cache_control: str | None) -> timedelta:
    """Return how long to cache a document with this ``Cache-Control`` value.

    ``max-age`` gives the lifetime, ``no-store`` and ``no-cache`` the
    minimum, and a missing or malformed value the default of one hour. The
    result is at least one minute, so a client cannot make this server fetch
    on every request, and at most one day, so a changed document is seen.
    """
    lifetime = DEFAULT_CACHE_LIFETIME
    for directive in (cache_control or "").split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return MIN_CACHE_LIFETIME
        if name == "max-age":
            try:
                seconds = int(value.strip().strip('"'))
            except ValueError:
                continue
            # Clamp before calling timedelta(), which raises OverflowError for
            # values such as 99999999999999999999.
            lifetime = timedelta(seconds=max(MIN_AGE_S, min(MAX_AGE_S, seconds)))
    return lifetime


def parse_document(url: str, body: bytes) -> dict[str, Any]:
    """Check the document ``body`` fetched from ``url``; return its metadata.

    The body must be a JSON object whose ``client_id`` equals ``url``
    exactly, with a non-empty ``redirect_uris`` that
    :func:`~mcp_authdb.server.redirects.redirect_uri_problem` accepts, no
    ``client_secret``, and a ``token_endpoint_auth_method`` of ``none`` or
    none at all, because a secret published in a document is no secret.
    ``grant_types``, when given, must include ``authorization_code`` and not
    the JWT bearer grant; ``response_types`` must include ``code``. No string
    may contain a NUL character, which PostgreSQL cannot store. Raises
    :class:`ClientMetadataError` naming the field and the rule.
    """
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ClientMetadataError(
            f"the document at {url!r} is not JSON: {exc}"
        ) from exc
    if not isinstance(document, dict):
        raise ClientMetadataError(f"the document at {url!r} is not a JSON object")

    client_id = document.get("client_id")
    if client_id != url:
        raise ClientMetadataError(
            f"the document at {url!r} has client_id {client_id!r}; it must be "
            "the document's URL, character for character"
        )
    _check_redirect_uris(url, document.get("redirect_uris"))
    method = document.get("token_endpoint_auth_method")
    if method not in (None, "none"):
        raise ClientMetadataError(
            f"the document at {url!r} has token_endpoint_auth_method {method!r}; "
            "clients with a metadata document are public, so use 'none'"
        )
    for field in ("client_secret", "client_secret_expires_at"):
        if field in document:
            raise ClientMetadataError(
                f"the document at {url!r} contains {field}; a published document "
                "must not contain a secret"
            )

    try:
        info = OAuthClientInformationFull.model_validate(
            {**document, "token_endpoint_auth_method": "none"}
        )
    except ValidationError as exc:
        raise ClientMetadataError(
            f"the document at {url!r} is not valid client metadata: "
            f"{stringify_pydantic_error(exc)}"
        ) from exc
    if "authorization_code" not in info.grant_types:
        raise ClientMetadataError(
            f"the document at {url!r} has grant_types {info.grant_types!r}, "
            "which must include 'authorization_code'"
        )
    if JWT_BEARER_GRANT_TYPE in info.grant_types:
        raise ClientMetadataError(
            f"the document at {url!r} requests the grant {JWT_BEARER_GRANT_TYPE!r}, "
            "which this server does not allow"
        )
    if "code" not in info.response_types:
        raise ClientMetadataError(
            f"the document at {url!r} has response_types {info.response_types!r}, "
            "which must include 'code'"
        )
    metadata = info.model_dump(mode="json", exclude_none=True)
    if contains_nul(metadata):
        raise ClientMetadataError(
            f"the document at {url!r} contains a NUL character (\\u0000), which "
            "PostgreSQL cannot store; remove it"
        )
    return metadata


def contains_nul(value: object) -> bool:
    """Return whether a JSON value has a NUL character in any string or key.

    PostgreSQL's ``text`` and ``jsonb`` reject NUL, so such a value cannot be
    stored.
    """
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(
            contains_nul(key) or contains_nul(item) for key, item in value.items()
        )
    if isinstance(value, list | tuple):
        return any(contains_nul(item) for item in value)
    return False


def _check_redirect_uris(url: str, value: object) -> None:
    if not isinstance(value, list) or not value:
        raise ClientMetadataError(
            f"the document at {url!r} has no redirect_uris; it needs a "
            "non-empty list of redirect URIs"
        )
    for uri in value:
        if not isinstance(uri, str):
            raise ClientMetadataError(
                f"the document at {url!r} has a redirect URI that is not a "
                f"string: {uri!r}"
            )
        problem = redirect_uri_problem(uri)
        if problem is not None:
            raise ClientMetadataError(f"the document at {url!r}: {problem}")


class ClientMetadataFetcher:
    """Fetches, checks and caches client ID metadata documents.

    One fetcher serves a process. It owns an ``httpx2.AsyncClient``, so
    close it with :meth:`aclose` or use it as an async context manager.
    ``store`` caches documents across processes (an ``OAuthStore``).
    ``verify`` is the TLS trust, as ``httpx2`` takes it (tests pass an
    ``ssl.SSLContext`` that trusts their own CA). ``resolver`` replaces
    :func:`resolve_host`. ``allow_private`` turns the address check off, for
    tests and development on one machine only.
    """

    def __init__(
        self,
        store: DocumentCache,
        *,
        allow_private: bool = False,
        verify: ssl.SSLContext | bool = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_bytes: int = MAX_DOCUMENT_BYTES,
        resolver: Resolver | None = None,
    ) -> None:
        self.store = store
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._resolve = resolver or resolve_host
        self._client = httpx2.AsyncClient(
            verify=verify,
            trust_env=False,
            follow_redirects=False,
            timeout=httpx2.Timeout(timeout_s),
            limits=httpx2.Limits(max_keepalive_connections=0),
        )
        # URL -> time.monotonic() until which it is rejected without a request.
        self._failures: dict[str, float] = {}
        # URL -> (lock, number of callers holding or waiting for it), so that
        # one URL is fetched by one task at a time.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def get(self, client_id: str) -> dict[str, Any] | None:
        """Return the checked metadata of the document at ``client_id``, or None.

        A cached document that has not expired is returned without a
        request. Otherwise the document is fetched and cached again.

        None means the client is rejected, because the URL is invalid
        (logged at info level), the document could not be fetched or is
        invalid, or a client registered under this id is not a metadata
        document (both logged as warnings). A fetch failure is logged at most
        once a minute per URL, because the URL is then rejected without a
        request. An unexpected exception while fetching or checking the
        document also rejects the client. It is logged as an error with its
        traceback and remembered for a minute like any other failure.
        Database errors propagate.
        """
        try:
            check_client_id_url(client_id)
        except ClientMetadataError as exc:
            logger.info("rejected client_id: %s", exc)
            return None

        try:
            cached = await self._cached(client_id)
            if cached is not None or self._failed_recently(client_id):
                return cached
            async with self._lock(client_id):
                # Another task may have fetched it while this one waited.
                cached = await self._cached(client_id)
                if cached is not None or self._failed_recently(client_id):
                    return cached
                return await self._fetch_and_cache(client_id)
        except _RegisteredClientError as exc:
            logger.warning("rejected client %s: %s", client_id, exc)
            return None

    async def _fetch_and_cache(self, client_id: str) -> dict[str, Any] | None:
        """Fetch the document and cache it. Return None, logged, on rejection."""
        try:
            document = await self.fetch(client_id)
        except ClientMetadataError as exc:
            self._remember_failure(client_id)
            logger.warning(
                "rejected the client with a metadata document at %s: %s",
                client_id,
                exc,
                extra={"action": "oauth.client_metadata.rejected"},
            )
            return None
        except Exception as exc:
            # A bug or a library error on a hostile document must reject the
            # client like any other failure, and be remembered, so that the
            # document is not fetched again on every request.
            self._remember_failure(client_id)
            logger.error(
                "rejected the client with a metadata document at %s because "
                "fetching or checking it failed unexpectedly: %s: %s",
                client_id,
                type(exc).__name__,
                exc,
                exc_info=exc,
                extra={"action": "oauth.client_metadata.failed"},
            )
            return None

        expires_at = datetime.now(UTC) + document.lifetime
        await self.store.put_metadata_document(client_id, document.metadata, expires_at)
        logger.info(
            "cached the client metadata document at %s until %s",
            client_id,
            expires_at.isoformat(timespec="seconds"),
            extra={"action": "oauth.client_metadata.cached"},
        )
        return document.metadata

    async def fetch(self, url: str) -> MetadataDocument:
        """Fetch and check the document at ``url``, without the cache.

        Raises :class:`ClientMetadataError` for an invalid URL, a rejected or
        unresolvable host, a failed or slow request (the deadline covers
        resolution, connection and the whole body), a response other than
        200 (a redirect included), a body over the size limit, and an
        invalid document (see :func:`parse_document`).
        """
        parts = check_client_id_url(url)
        host = parts.hostname or ""
        port = parts.port or 443
        try:
            async with asyncio.timeout(self.timeout_s):
                addresses = await self._addresses(host, port)
                body, cache_control = await self._download(parts, addresses)
        except TimeoutError as exc:
            raise ClientMetadataError(
                f"fetching {url!r} took longer than {self.timeout_s:g} s"
            ) from exc
        return MetadataDocument(
            parse_document(url, body), cache_lifetime(cache_control)
        )

    async def _addresses(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and check every address it has."""
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = await self._resolve(host, port)
        if not addresses:
            raise ClientMetadataError(f"host {host!r} resolved to no address")
        if not self.allow_private:
            for address in addresses:
                problem = address_problem(address)
                if problem is not None:
                    raise ClientMetadataError(
                        f"host {host!r} resolves to {problem}; metadata documents "
                        "are fetched from public addresses only"
                    )
        return addresses

    async def _download(
        self, parts: SplitResult, addresses: list[str]
    ) -> tuple[bytes, str | None]:
        """GET the document from the first address that accepts a connection."""
        last_error: httpx2.HTTPError | None = None
        for address in addresses:
            try:
                return await self._download_from(parts, address)
            except httpx2.ConnectError as exc:
                last_error = exc
        raise ClientMetadataError(
            f"could not connect to {parts.hostname!r} at any of {addresses}: "
            f"{last_error}"
        )

    async def _download_from(
        self, parts: SplitResult, address: str
    ) -> tuple[bytes, str | None]:
        url = parts.geturl()
        # The request goes to the checked address. The Host header and the
        # TLS server name (SNI, and the name the certificate must have) stay
        # the URL's host, so the server and the certificate check see the
        # request that the URL names.
        literal = f"[{address.replace('%', '%25')}]" if ":" in address else address
        target = f"https://{literal}:{parts.port or 443}{parts.path}"
        if parts.query:
            target += f"?{parts.query}"
        headers = {
            "Host": parts.netloc,
            "Accept": "application/json",
            "Accept-Encoding": "identity",
        }
        extensions = {"sni_hostname": parts.hostname or ""}
        try:
            async with self._client.stream(
                "GET", target, headers=headers, extensions=extensions
            ) as response:
                _check_response(
                    url, response.status_code, response.headers, self.max_bytes
                )
                body = await self._read_capped(url, response)
                return body, response.headers.get("Cache-Control")
        except httpx2.ConnectError:
            raise
        except httpx2.HTTPError as exc:
            raise ClientMetadataError(f"fetching {url!r} failed: {exc}") from exc

    async def _read_capped(self, url: str, response: httpx2.Response) -> bytes:
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > self.max_bytes:
                raise ClientMetadataError(
                    f"the document at {url!r} is larger than {self.max_bytes} bytes"
                )
        return bytes(body)

    async def _cached(self, client_id: str) -> dict[str, Any] | None:
        stored = await self.store.get_client(client_id)
        if stored is None:
            return None
        if stored.kind != "metadata_document":
            raise _RegisteredClientError(
                f"it is stored as a {stored.kind} client, not a metadata document"
            )
        expires_at = stored.document_expires_at
        if expires_at is None or expires_at <= datetime.now(UTC):
            return None
        return stored.metadata

    def _failed_recently(self, url: str) -> bool:
        until = self._failures.get(url)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._failures[url]
        return False

    def _remember_failure(self, url: str) -> None:
        now = time.monotonic()
        if len(self._failures) >= MAX_REMEMBERED_FAILURES:
            self._failures = {
                key: until for key, until in self._failures.items() if until > now
            }
        while len(self._failures) >= MAX_REMEMBERED_FAILURES:
            del self._failures[next(iter(self._failures))]
        self._failures[url] = now + FAILURE_LIFETIME_S

    def _lock(self, url: str) -> _UrlLock:
        return _UrlLock(self._locks, url)


class _UrlLock:
    """An asyncio lock per URL, dropped when no task holds or waits for it."""

    def __init__(self, locks: dict[str, tuple[asyncio.Lock, int]], url: str) -> None:
        self._locks = locks
        self._url = url

    async def __aenter__(self) -> None:
        lock, users = self._locks.get(self._url, (asyncio.Lock(), 0))
        self._locks[self._url] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        lock, _ = self._locks[self._url]
        lock.release()
        self._release_user()

    def _release_user(self) -> None:
        lock, users = self._locks[self._url]
        if users <= 1:
            del self._locks[self._url]
        else:
            self._locks[self._url] = (lock, users - 1)


def _check_response(
    url: str, status: int, headers: Mapping[str, str], max_bytes: int
) -> None:
    """Raise :class:`ClientMetadataError` for a response without the document."""

    if 300 <= status < 400:
        raise ClientMetadataError(
            f"{url!r} responded with a redirect (HTTP {status}); redirects are not "
            "followed, so serve the document at its client_id URL"
        )
    if status != 200:
        raise ClientMetadataError(f"{url!r} responded with HTTP {status}, not 200")
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ClientMetadataError(
            f"{url!r} responded with Content-Encoding {encoding!r}; only an "
            "unencoded body is accepted"
        )
    length = headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise ClientMetadataError(
            f"the document at {url!r} is {int(length)} bytes, more than {max_bytes}"
        )
