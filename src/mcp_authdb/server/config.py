"""The settings of ``mcp-authdb serve``, read from the environment.

:meth:`ServerConfig.from_env` reads every server variable, checks it, and
raises :class:`~mcp_authdb.errors.ConfigurationError` naming the variable, the
value and the fix, so a misconfigured server stops before it listens.

The public URL is the MCP endpoint as clients reach it, for example
``https://mcp.example.com/mcp``. Every URL the server advertises is derived
from it, never from the ``Host`` or ``X-Forwarded-*`` headers of a request:

- the *resource* (RFC 8707, RFC 9728) is the public URL;
- the *issuer* (RFC 8414) is its origin, ``https://mcp.example.com``, so the
  OAuth endpoints live at the root (``/authorize``, ``/token``, ...);
- the MCP endpoint is served at its path, ``/mcp``;
- the upstream redirects users back to ``{issuer}/oauth/callback``.

A reverse proxy in front of the server must therefore forward paths
unchanged. Without ``MCP_AUTHDB_PUBLIC_URL`` the server must listen on a
loopback address, and the public URL is ``http://{host}:{port}/mcp``.

The variables, with their defaults:

- ``MCP_AUTHDB_PUBLIC_URL``: the MCP endpoint's public URL; https unless its
  host is loopback.
- ``MCP_AUTHDB_HOST`` (``127.0.0.1``), ``MCP_AUTHDB_PORT`` (``8000``): where
  the server listens.
- ``MCP_AUTHDB_TRUSTED_PROXIES`` (none): addresses or networks of reverse
  proxies whose ``X-Forwarded-For`` gives the source address of a request.
- ``MCP_AUTHDB_ALLOWED_HOSTS``, ``MCP_AUTHDB_ALLOWED_ORIGINS`` (none): more
  ``Host`` and ``Origin`` values the MCP endpoint accepts, besides those of
  the public URL (DNS rebinding protection).
- ``MCP_AUTHDB_REGISTRATION_LIMIT`` (``20``): client registrations per source
  address and hour.
- ``MCP_AUTHDB_REGISTRATION_MAX_BYTES`` (``16384``): the largest request body
  of ``/register`` and ``/token``.
- ``MCP_AUTHDB_UNUSED_CLIENT_AGE`` (``86400``): seconds after which a
  registered client that never signed a user in is deleted.
- ``TOKEN_REFRESH_THRESHOLD`` (``0.9``): the fraction of an upstream access
  token's lifetime after which it is refreshed before use.
- ``TOKEN_CLEANUP_INTERVAL`` (``3600``): seconds between cleanups of expired
  OAuth state; ``0`` turns them off.
- ``MCP_AUTHDB_ACCESS_TOKEN_LIFETIME`` (``3600``),
  ``MCP_AUTHDB_REFRESH_TOKEN_LIFETIME`` (``2592000``): lifetimes, in seconds,
  of the tokens this server issues.
- ``MCP_AUTHDB_SUBSCRIPTION_LEVELS`` (``free,plus,pro``): the levels, lowest
  first; ``MCP_AUTHDB_SEARCH_LEVEL`` (``plus``): the lowest level that may
  use ``content_search``.

The upstream variables are read by
:meth:`~mcp_authdb.server.upstream.UpstreamConfig.from_env`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from mcp_authdb.db.embedded import default_data_dir
from mcp_authdb.db.settings import (
    Settings,
    mask_password,
    parse_whole_number_in_range,
)
from mcp_authdb.errors import AuthDBError, ConfigurationError
from mcp_authdb.server.upstream import UpstreamConfig
from mcp_authdb.store.sessions import MAX_LIFETIME, validate_subscription_level

PUBLIC_URL_VARIABLE = "MCP_AUTHDB_PUBLIC_URL"
HOST_VARIABLE = "MCP_AUTHDB_HOST"
PORT_VARIABLE = "MCP_AUTHDB_PORT"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MCP_PATH = "/mcp"
DEFAULT_REGISTRATION_LIMIT = 20
MAX_REGISTRATION_LIMIT = 100_000
DEFAULT_REGISTRATION_MAX_BYTES = 16 * 1024
MIN_REGISTRATION_MAX_BYTES = 1024
MAX_REGISTRATION_MAX_BYTES = 1024 * 1024
DEFAULT_UNUSED_CLIENT_AGE_S = 86_400
MIN_UNUSED_CLIENT_AGE_S = 60
DEFAULT_REFRESH_THRESHOLD = 0.9
DEFAULT_CLEANUP_INTERVAL_S = 3600
MAX_CLEANUP_INTERVAL_S = 365 * 86_400
DEFAULT_ACCESS_TOKEN_LIFETIME_S = 3600
DEFAULT_REFRESH_TOKEN_LIFETIME_S = 30 * 86_400
DEFAULT_SUBSCRIPTION_LEVELS = ("free", "plus", "pro")
DEFAULT_SEARCH_LEVEL = "plus"

# The path under which the development identity provider is mounted.
DEV_IDP_PATH = "/dev"
CALLBACK_PATH = "/oauth/callback"
# The name of the encryption key file in the data folder, used when
# DB_ENCRYPTION_KEY is unset with the embedded server or in development mode.
ENCRYPTION_KEY_FILE_NAME = "encryption-key"
# The OAuth client id the server uses towards the development identity
# provider, which accepts any client id.
DEV_CLIENT_ID = "mcp-authdb-dev"

# Paths of the server's own routes, which the MCP endpoint may not take.
RESERVED_PATHS = frozenset(
    {
        "/authorize",
        "/token",
        "/register",
        "/revoke",
        "/health",
        "/metrics",
        CALLBACK_PATH,
    }
)
RESERVED_PREFIXES = ("/.well-known/", "/oauth/", DEV_IDP_PATH + "/")
# The variables of the upstream provider. Development mode replaces them all
# with the built-in identity provider's, so that a shell prepared for Drupal
# cannot point a development server at it.
_UPSTREAM_PREFIXES = ("DRUPAL_", "UPSTREAM_", "OAUTH_")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LEVEL_SEPARATOR = re.compile(r"\s*,\s*")


@dataclasses.dataclass(frozen=True)
class PublicURL:
    """The MCP endpoint's public URL and what derives from it.

    ``resource`` is the URL with its scheme and host in lower case and a
    default port removed. ``issuer`` is its origin, and ``path`` the path
    the MCP endpoint is served at. ``host`` has no brackets, ``port`` is
    the effective port, and ``netloc`` is the host and port as written in
    ``resource``.
    """

    resource: str
    issuer: str
    scheme: str
    host: str
    port: int
    netloc: str
    path: str

    @property
    def callback_url(self) -> str:
        """The redirect URI registered at the upstream provider."""
        return self.issuer + CALLBACK_PATH

    @property
    def is_loopback(self) -> bool:
        """Whether the URL's host is a loopback address or ``localhost``."""
        return is_loopback_host(self.host)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Every setting of one server process, checked.

    ``environ`` is the environment from which the other parts read their own
    variables: the library's ``AuthDBOptions``, the token keys and the
    encryption key. ``repr`` leaves it out because it contains secrets.
    ``key_folder``
    is where the encryption key file lives when ``DB_ENCRYPTION_KEY`` is unset
    (the embedded server, or development mode), else None. ``cleanup_interval``
    is None when the OAuth state cleanup is off.
    """

    public_url: PublicURL
    host: str
    port: int
    dev: bool
    settings: Settings
    upstream: UpstreamConfig
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    extra_allowed_hosts: tuple[str, ...]
    extra_allowed_origins: tuple[str, ...]
    registration_limit: int
    registration_max_bytes: int
    unused_client_age: timedelta
    refresh_threshold: float
    cleanup_interval: timedelta | None
    access_token_lifetime: timedelta
    refresh_token_lifetime: timedelta
    subscription_levels: tuple[str, ...]
    search_level: str
    key_folder: Path | None
    environ: Mapping[str, str] = dataclasses.field(repr=False)

    @property
    def issuer(self) -> str:
        """The authorization server's issuer: the public URL's origin."""
        return self.public_url.issuer

    @property
    def resource(self) -> str:
        """The protected resource: the public URL."""
        return self.public_url.resource

    @property
    def mcp_path(self) -> str:
        """The path the MCP endpoint is served at."""
        return self.public_url.path

    @property
    def callback_url(self) -> str:
        """The URL to which the upstream provider redirects users after sign-in."""
        return self.public_url.callback_url

    @property
    def encryption_key_file(self) -> Path | None:
        """The encryption key file to use when ``DB_ENCRYPTION_KEY`` is unset."""
        if self.key_folder is None:
            return None
        return self.key_folder / ENCRYPTION_KEY_FILE_NAME

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes clients may request: those requested from the upstream."""
        return tuple(self.upstream.scopes)

    @property
    def allowed_hosts(self) -> list[str]:
        """``Host`` header values the MCP endpoint accepts (``host:*``: any port)."""
        public = self.public_url
        hosts = [public.netloc]
        if public.port == _DEFAULT_PORTS[public.scheme]:
            # The netloc leaves the default port out, and clients may spell it.
            hosts.append(f"{public.netloc}:{public.port}")
        if is_loopback_host(self.host):
            hosts += ["127.0.0.1:*", "localhost:*", "[::1]:*"]
        return [*hosts, *self.extra_allowed_hosts]

    @property
    def allowed_origins(self) -> list[str]:
        """``Origin`` header values the MCP endpoint accepts (``:*``: any port)."""
        origins = [self.issuer]
        if is_loopback_host(self.host):
            origins += ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
        return [*origins, *self.extra_allowed_origins]

    def is_trusted_proxy(self, address: str) -> bool:
        """Return whether ``address`` is in ``MCP_AUTHDB_TRUSTED_PROXIES``."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        dev: bool,
        host: str | None = None,
        port: int | None = None,
        settings: Settings | None = None,
    ) -> ServerConfig:
        """Read and check the server settings from ``environ`` (default: os.environ).

        ``host`` and ``port``, when given (command-line options), replace
        ``MCP_AUTHDB_HOST`` and ``MCP_AUTHDB_PORT``. ``settings`` are the
        database settings, by default ``Settings.from_env(environ)``. With
        ``dev``, the host and the public URL must be loopback, and the
        upstream is the built-in development identity provider at
        ``{issuer}/dev``, and the upstream variables are ignored. Empty
        variables count as unset. Raises :class:`ConfigurationError` naming
        the variable, its value and the fix.
        """
        env = dict(os.environ if environ is None else environ)

        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        if settings is None:
            settings = Settings.from_env(env)
        bind_host = _parse_host(host if host is not None else get(HOST_VARIABLE))
        bind_port = port if port is not None else _parse_port(get(PORT_VARIABLE))
        _check_port(bind_port)
        if dev:
            _check_dev_host(bind_host)
        public_url = _public_url(get(PUBLIC_URL_VARIABLE), bind_host, bind_port)
        if dev:
            _check_dev_public_url(public_url)

        levels = _parse_levels(get("MCP_AUTHDB_SUBSCRIPTION_LEVELS"))
        search_level = get("MCP_AUTHDB_SEARCH_LEVEL") or DEFAULT_SEARCH_LEVEL
        if search_level not in levels:
            raise ConfigurationError(
                f"MCP_AUTHDB_SEARCH_LEVEL={search_level!r} is not one of the "
                f"subscription levels {', '.join(levels)} "
                "(MCP_AUTHDB_SUBSCRIPTION_LEVELS); set it to one of them"
            )

        access_s = _seconds(
            get,
            "MCP_AUTHDB_ACCESS_TOKEN_LIFETIME",
            DEFAULT_ACCESS_TOKEN_LIFETIME_S,
            60,
            "the lifetime of an access token in seconds",
        )
        refresh_s = _seconds(
            get,
            "MCP_AUTHDB_REFRESH_TOKEN_LIFETIME",
            DEFAULT_REFRESH_TOKEN_LIFETIME_S,
            60,
            "the lifetime of a refresh token in seconds",
        )
        if refresh_s < access_s:
            raise ConfigurationError(
                f"MCP_AUTHDB_REFRESH_TOKEN_LIFETIME={refresh_s} is shorter than "
                f"MCP_AUTHDB_ACCESS_TOKEN_LIFETIME={access_s}; a refresh token "
                "must last at least as long as the access token it renews"
            )
        cleanup_s = parse_whole_number_in_range(
            "TOKEN_CLEANUP_INTERVAL",
            get("TOKEN_CLEANUP_INTERVAL"),
            DEFAULT_CLEANUP_INTERVAL_S,
            0,
            MAX_CLEANUP_INTERVAL_S,
            "the seconds between cleanups of expired OAuth state (0 turns them off)",
        )

        upstream_env = _dev_upstream_env(env, public_url) if dev else env
        upstream = UpstreamConfig.from_env(
            upstream_env, default_redirect_uri=public_url.callback_url
        )
        if upstream.default_level not in levels:
            raise ConfigurationError(
                f"UPSTREAM_DEFAULT_LEVEL={upstream.default_level!r} is not one of the "
                f"subscription levels {', '.join(levels)} "
                "(MCP_AUTHDB_SUBSCRIPTION_LEVELS); set it to one of them"
            )

        key_folder = None
        if dev or settings.database_url is None:
            key_folder = (settings.data_dir or default_data_dir()).absolute()

        return cls(
            public_url=public_url,
            host=bind_host,
            port=bind_port,
            dev=dev,
            settings=settings,
            upstream=upstream,
            trusted_proxies=_parse_proxies(get("MCP_AUTHDB_TRUSTED_PROXIES")),
            extra_allowed_hosts=_parse_list(
                "MCP_AUTHDB_ALLOWED_HOSTS",
                get("MCP_AUTHDB_ALLOWED_HOSTS"),
                "Host header values, such as mcp.internal:8000 or mcp.internal:*",
            ),
            extra_allowed_origins=_parse_list(
                "MCP_AUTHDB_ALLOWED_ORIGINS",
                get("MCP_AUTHDB_ALLOWED_ORIGINS"),
                "origins, such as https://app.example.com",
            ),
            registration_limit=parse_whole_number_in_range(
                "MCP_AUTHDB_REGISTRATION_LIMIT",
                get("MCP_AUTHDB_REGISTRATION_LIMIT"),
                DEFAULT_REGISTRATION_LIMIT,
                1,
                MAX_REGISTRATION_LIMIT,
                "the client registrations allowed per source address and hour",
            ),
            registration_max_bytes=parse_whole_number_in_range(
                "MCP_AUTHDB_REGISTRATION_MAX_BYTES",
                get("MCP_AUTHDB_REGISTRATION_MAX_BYTES"),
                DEFAULT_REGISTRATION_MAX_BYTES,
                MIN_REGISTRATION_MAX_BYTES,
                MAX_REGISTRATION_MAX_BYTES,
                "the largest client registration request body in bytes",
            ),
            unused_client_age=timedelta(
                seconds=_seconds(
                    get,
                    "MCP_AUTHDB_UNUSED_CLIENT_AGE",
                    DEFAULT_UNUSED_CLIENT_AGE_S,
                    MIN_UNUSED_CLIENT_AGE_S,
                    "the seconds after which a registered client that never "
                    "signed a user in is deleted",
                )
            ),
            refresh_threshold=_parse_threshold(get("TOKEN_REFRESH_THRESHOLD")),
            cleanup_interval=timedelta(seconds=cleanup_s) if cleanup_s else None,
            access_token_lifetime=timedelta(seconds=access_s),
            refresh_token_lifetime=timedelta(seconds=refresh_s),
            subscription_levels=levels,
            search_level=search_level,
            key_folder=key_folder,
            environ=MappingProxyType(env),
        )


def is_loopback_host(host: str) -> bool:
    """Return whether ``host`` is ``localhost`` or a loopback address.

    ``host`` is a name or an address, an IPv6 address with or without brackets.
    """
    bare = host.strip("[]").lower()
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def _parse_host(value: str | None) -> str:
    host = value or DEFAULT_HOST
    if any(c.isspace() for c in host) or "/" in host:
        raise ConfigurationError(
            f"{HOST_VARIABLE}={host!r} is not a host name or address; set it "
            "to the address to listen on, such as 127.0.0.1 or 0.0.0.0"
        )
    return host.strip("[]")


def _parse_port(value: str | None) -> int:
    return parse_whole_number_in_range(
        PORT_VARIABLE,
        value,
        DEFAULT_PORT,
        1,
        65535,
        "the TCP port to listen on",
    )


def _check_port(port: int) -> None:
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigurationError(
            f"the port {port!r} is out of range; listen on a TCP port from 1 "
            f"to 65535 (--port or {PORT_VARIABLE})"
        )


def _public_url(value: str | None, host: str, port: int) -> PublicURL:
    if value is None:
        if not is_loopback_host(host):
            raise ConfigurationError(
                f"{PUBLIC_URL_VARIABLE} is not set, and it is required when the "
                f"server listens on {host!r}, which is not a loopback address; "
                "set it to the MCP endpoint's URL as clients reach it, such as "
                "https://mcp.example.com/mcp"
            )
        netloc_host = f"[{host}]" if ":" in host else host
        value = f"http://{netloc_host}:{port}{DEFAULT_MCP_PATH}"
    return parse_public_url(value)


def parse_public_url(value: str) -> PublicURL:
    """Parse and validate a public URL, following the rules in the module docs.

    It must be https unless its host is loopback, and have a path of its
    own that is not one of the server's routes. It may not have a user,
    password, query or fragment. Raises :class:`ConfigurationError` naming
    ``MCP_AUTHDB_PUBLIC_URL``.
    """

    def invalid(problem: str) -> ConfigurationError:
        return ConfigurationError(
            f"{PUBLIC_URL_VARIABLE}={mask_password(value)!r} is invalid: {problem}; "
            "set it to "
            "the MCP endpoint's URL as clients reach it, such as "
            "https://mcp.example.com/mcp"
        )

    if any(c.isspace() or ord(c) < 0x20 for c in value):
        raise invalid("it contains white space or a control character")
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise invalid("the scheme must be https, or http on a loopback host")
    if parts.username is not None or parts.password is not None:
        raise invalid("it may not contain a user name or password")
    if parts.query or value.endswith("?"):
        raise invalid("it may not have a query string")
    if parts.fragment or "#" in value:
        raise invalid("it may not have a fragment")
    host = (parts.hostname or "").lower()
    if not host:
        raise invalid("it has no host")
    try:
        port = parts.port
    except ValueError:
        raise invalid("the port is not a number from 0 to 65535") from None
    if port == 0:
        raise invalid("the port 0 is not a port clients can connect to")
    if scheme == "http" and not is_loopback_host(host):
        raise invalid(
            "plain http is allowed only on a loopback host; use https, and "
            "terminate TLS at the server's reverse proxy"
        )

    path = parts.path
    if path in ("", "/"):
        raise invalid(
            f"it has no path; add the MCP endpoint's path, such as {DEFAULT_MCP_PATH}"
        )
    if path in RESERVED_PATHS or path.startswith(RESERVED_PREFIXES):
        raise invalid(
            f"the path {path!r} is taken by one of the server's own routes; use "
            f"another path, such as {DEFAULT_MCP_PATH}"
        )

    if port is None:
        port = _DEFAULT_PORTS[scheme]
    netloc = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    issuer = f"{scheme}://{netloc}"
    return PublicURL(
        resource=issuer + path,
        issuer=issuer,
        scheme=scheme,
        host=host,
        port=port,
        netloc=netloc,
        path=path,
    )


def _check_dev_host(host: str) -> None:
    if not is_loopback_host(host):
        raise ConfigurationError(
            f"--dev listens on loopback addresses only, and the host is {host!r}; "
            f"use 127.0.0.1 (--host or {HOST_VARIABLE}), because the development "
            "identity provider signs in anyone without a password"
        )


def _check_dev_public_url(public_url: PublicURL) -> None:
    if not public_url.is_loopback:
        raise ConfigurationError(
            f"--dev serves loopback URLs only, and {PUBLIC_URL_VARIABLE} is "
            f"{public_url.resource!r}; unset it, or set a URL on 127.0.0.1, "
            "because the development identity provider signs in anyone "
            "without a password"
        )


def _dev_upstream_env(env: Mapping[str, str], public_url: PublicURL) -> dict[str, str]:
    upstream_env = {
        name: value
        for name, value in env.items()
        if not name.startswith(_UPSTREAM_PREFIXES)
    }
    upstream_env["DRUPAL_BASE_URL"] = public_url.issuer + DEV_IDP_PATH
    upstream_env["OAUTH_CLIENT_ID"] = DEV_CLIENT_ID
    return upstream_env


def _seconds(
    get: Callable[[str], str | None], name: str, default: int, low: int, meaning: str
) -> int:
    high = int(MAX_LIFETIME.total_seconds())
    return parse_whole_number_in_range(name, get(name), default, low, high, meaning)


def _parse_threshold(value: str | None) -> float:
    if value is None:
        return DEFAULT_REFRESH_THRESHOLD
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not (math.isfinite(threshold) and 0 < threshold < 1):
        raise ConfigurationError(
            f"TOKEN_REFRESH_THRESHOLD={value!r} is invalid; set it to the "
            "fraction of an upstream access token's lifetime after which it is "
            f"refreshed, above 0 and below 1, or unset it to use "
            f"{DEFAULT_REFRESH_THRESHOLD}"
        )
    return threshold


def _parse_levels(value: str | None) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_SUBSCRIPTION_LEVELS
    levels = tuple(_LEVEL_SEPARATOR.split(value.strip()))
    for level in levels:
        if not _is_valid_level(level):
            raise ConfigurationError(
                f"MCP_AUTHDB_SUBSCRIPTION_LEVELS={value!r} contains an empty or "
                "invalid level; list the levels from lowest to highest, separated "
                "by commas, such as free,plus,pro"
            )
    if len(set(levels)) != len(levels):
        raise ConfigurationError(
            f"MCP_AUTHDB_SUBSCRIPTION_LEVELS={value!r} names a level twice; list "
            "each level once, from lowest to highest"
        )
    return levels


def _is_valid_level(level: str) -> bool:
    try:
        validate_subscription_level(level)
    except AuthDBError:
        return False
    return level != ""


def _parse_list(name: str, value: str | None, example: str) -> tuple[str, ...]:
    if value is None:
        return ()
    entries = tuple(entry.strip() for entry in value.split(","))
    for entry in entries:
        if not entry or any(c.isspace() or ord(c) < 0x20 for c in entry):
            raise ConfigurationError(
                f"{name}={value!r} contains an empty or invalid entry; list "
                f"{example}, separated by commas"
            )
    return entries


def _parse_proxies(
    value: str | None,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if value is None:
        return ()
    networks = []
    for entry in value.split(","):
        text = entry.strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigurationError(
                f"MCP_AUTHDB_TRUSTED_PROXIES contains {text!r}, which is not an "
                "IP address or network; list the addresses of the reverse proxies "
                "in front of the server, separated by commas, such as "
                "10.0.0.5,10.1.0.0/16"
            ) from None
    return tuple(networks)
