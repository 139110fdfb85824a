"""ServerConfig.from_env: every server variable, its default and its errors."""

from __future__ import annotations

from datetime import timedelta
from ipaddress import ip_network
from pathlib import Path

import pytest

from mcp_authdb.db.settings import Settings
from mcp_authdb.errors import ConfigurationError
from mcp_authdb.server.config import (
    DEV_CLIENT_ID,
    ServerConfig,
    is_loopback_host,
    parse_public_url,
)

# An upstream that is never contacted: the config only parses it.
UPSTREAM = {"DRUPAL_BASE_URL": "https://drupal.test", "OAUTH_CLIENT_ID": "mcp"}
PUBLIC = {**UPSTREAM, "MCP_AUTHDB_PUBLIC_URL": "https://mcp.example.com/mcp"}
DATABASE = Settings(database_url="postgresql://u@db.test/app")


def config(env: dict[str, str], *, dev: bool = False, **kwargs: object) -> ServerConfig:
    settings = kwargs.pop("settings", DATABASE)
    return ServerConfig.from_env(env, dev=dev, settings=settings, **kwargs)  # type: ignore[arg-type]


def error_of(env: dict[str, str], *, dev: bool = False, **kwargs: object) -> str:
    with pytest.raises(ConfigurationError) as caught:
        config(env, dev=dev, **kwargs)
    return str(caught.value)


def test_defaults_without_public_url() -> None:
    cfg = config(UPSTREAM)

    assert cfg.host == "127.0.0.1"
    assert cfg.port == 8000
    assert cfg.resource == "http://127.0.0.1:8000/mcp"
    assert cfg.issuer == "http://127.0.0.1:8000"
    assert cfg.mcp_path == "/mcp"
    assert cfg.callback_url == "http://127.0.0.1:8000/oauth/callback"
    assert cfg.trusted_proxies == ()
    assert cfg.registration_limit == 20
    assert cfg.registration_max_bytes == 16384
    assert cfg.unused_client_age == timedelta(days=1)
    assert cfg.refresh_threshold == 0.9
    assert cfg.cleanup_interval == timedelta(hours=1)
    assert cfg.access_token_lifetime == timedelta(hours=1)
    assert cfg.refresh_token_lifetime == timedelta(days=30)
    assert cfg.subscription_levels == ("free", "plus", "pro")
    assert cfg.search_level == "plus"
    assert cfg.dev is False


def test_public_url_gives_issuer_resource_path() -> None:
    cfg = config({**PUBLIC, "MCP_AUTHDB_HOST": "0.0.0.0"})

    assert cfg.resource == "https://mcp.example.com/mcp"
    assert cfg.issuer == "https://mcp.example.com"
    assert cfg.mcp_path == "/mcp"
    assert cfg.callback_url == "https://mcp.example.com/oauth/callback"
    assert cfg.upstream.redirect_uri == "https://mcp.example.com/oauth/callback"


def test_public_url_keeps_path_and_port() -> None:
    url = parse_public_url("HTTPS://MCP.Example.com:8443/Tools/mcp/")

    assert url.resource == "https://mcp.example.com:8443/Tools/mcp/"
    assert url.issuer == "https://mcp.example.com:8443"
    assert url.path == "/Tools/mcp/"
    assert url.port == 8443


def test_public_url_drops_default_port() -> None:
    url = parse_public_url("https://mcp.example.com:443/mcp")

    assert url.resource == "https://mcp.example.com/mcp"
    assert url.netloc == "mcp.example.com"


def test_public_url_ipv6_loopback() -> None:
    url = parse_public_url("http://[::1]:9000/mcp")

    assert url.issuer == "http://[::1]:9000"
    assert url.host == "::1"
    assert url.is_loopback


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("http://mcp.example.com/mcp", "plain http is allowed only on a loopback"),
        ("ftp://mcp.example.com/mcp", "the scheme must be https"),
        ("mcp.example.com/mcp", "the scheme must be https"),
        ("https://mcp.example.com", "it has no path"),
        ("https://mcp.example.com/", "it has no path"),
        ("https://mcp.example.com/mcp?x=1", "query string"),
        ("https://mcp.example.com/mcp#top", "fragment"),
        ("https://user:pw@mcp.example.com/mcp", "user name or password"),
        ("https:///mcp", "it has no host"),
        ("https://mcp.example.com:99999/mcp", "the port is not a number"),
        ("https://mcp.example.com:0/mcp", "the port 0"),
        ("https://mcp.example.com/token", "taken by one of the server's own routes"),
        ("https://mcp.example.com/oauth/mcp", "taken by one of the server's own"),
        ("https://mcp.example.com/dev/mcp", "taken by one of the server's own"),
        ("https://mcp.example.com/.well-known/x", "taken by one of the server's own"),
        ("https://mcp.example.com/m cp", "white space"),
    ],
)
def test_public_url_rejected(value: str, problem: str) -> None:
    message = error_of({**UPSTREAM, "MCP_AUTHDB_PUBLIC_URL": value})

    assert "MCP_AUTHDB_PUBLIC_URL" in message
    assert problem in message
    assert "https://mcp.example.com/mcp" in message  # the example of a fix


def test_public_url_hides_password() -> None:
    message = error_of(
        {**UPSTREAM, "MCP_AUTHDB_PUBLIC_URL": "https://u:hunter2@x.example/mcp"}
    )

    assert "user name or password" in message
    assert "hunter2" not in message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"])
def test_http_allowed_on_loopback(host: str) -> None:
    url = parse_public_url(f"http://{host}:8000/mcp")

    assert url.scheme == "http"
    assert url.is_loopback


def test_non_loopback_host_needs_public_url() -> None:
    message = error_of({**UPSTREAM, "MCP_AUTHDB_HOST": "0.0.0.0"})

    assert "MCP_AUTHDB_PUBLIC_URL is not set" in message
    assert "'0.0.0.0'" in message
    assert "https://mcp.example.com/mcp" in message


def test_host_and_port_arguments_win() -> None:
    cfg = config(
        {**UPSTREAM, "MCP_AUTHDB_HOST": "0.0.0.0", "MCP_AUTHDB_PORT": "1"},
        host="::1",
        port=9123,
    )

    assert cfg.host == "::1"
    assert cfg.port == 9123
    assert cfg.resource == "http://[::1]:9123/mcp"


def test_host_from_environment() -> None:
    cfg = config({**UPSTREAM, "MCP_AUTHDB_HOST": "localhost", "MCP_AUTHDB_PORT": "81"})

    assert cfg.resource == "http://localhost:81/mcp"


@pytest.mark.parametrize("value", ["0", "65536", "eighty", "-1"])
def test_port_rejected(value: str) -> None:
    message = error_of({**UPSTREAM, "MCP_AUTHDB_PORT": value})

    assert f"MCP_AUTHDB_PORT={value!r}" in message


def test_port_argument_rejected() -> None:
    message = error_of(UPSTREAM, port=0)

    assert "--port" in message


def test_host_rejected() -> None:
    message = error_of({**UPSTREAM, "MCP_AUTHDB_HOST": "a b"})

    assert "MCP_AUTHDB_HOST='a b'" in message


def test_dev_rejects_non_loopback_host() -> None:
    message = error_of(PUBLIC, dev=True, host="0.0.0.0")

    assert "--dev" in message
    assert "'0.0.0.0'" in message
    assert "127.0.0.1" in message


def test_dev_rejects_public_url() -> None:
    message = error_of(PUBLIC, dev=True)

    assert "--dev" in message
    assert "MCP_AUTHDB_PUBLIC_URL" in message
    assert "https://mcp.example.com/mcp" in message


def test_dev_uses_builtin_identity_provider() -> None:
    env = {
        "DRUPAL_BASE_URL": "https://drupal.example.com",
        "OAUTH_CLIENT_ID": "real-client",
        "OAUTH_CLIENT_SECRET": "real-secret",
        "UPSTREAM_TOKEN_URL": "https://drupal.example.com/other/token",
        "UPSTREAM_USER_ID_CLAIM": "uid",
    }

    cfg = config(env, dev=True, port=9000)

    upstream = cfg.upstream
    assert upstream.authorize_url == "http://127.0.0.1:9000/dev/oauth/authorize"
    assert upstream.token_url == "http://127.0.0.1:9000/dev/oauth/token"
    assert upstream.userinfo_url == "http://127.0.0.1:9000/dev/oauth/userinfo"
    assert upstream.jsonrpc_url == "http://127.0.0.1:9000/dev/jsonrpc"
    assert upstream.client_id == DEV_CLIENT_ID
    assert upstream.client_secret is None
    assert upstream.user_id_claim == "sub"
    assert upstream.redirect_uri == "http://127.0.0.1:9000/oauth/callback"


def test_dev_needs_no_upstream_variables() -> None:
    cfg = config({}, dev=True)

    assert cfg.dev is True
    assert cfg.resource == "http://127.0.0.1:8000/mcp"


def test_dev_accepts_loopback_public_url() -> None:
    cfg = config({"MCP_AUTHDB_PUBLIC_URL": "http://localhost:8000/tools"}, dev=True)

    assert cfg.resource == "http://localhost:8000/tools"
    assert cfg.upstream.token_url == "http://localhost:8000/dev/oauth/token"


def test_upstream_errors_pass_through() -> None:
    message = error_of({"MCP_AUTHDB_PUBLIC_URL": "https://mcp.example.com/mcp"})

    assert "DRUPAL_BASE_URL" in message


def test_key_folder_only_for_embedded_or_dev(tmp_path: Path) -> None:
    embedded = Settings(data_dir=tmp_path)

    assert config(UPSTREAM).key_folder is None
    assert config(UPSTREAM).encryption_key_file is None
    assert config(UPSTREAM, settings=embedded).key_folder == tmp_path
    assert config(UPSTREAM, dev=True).key_folder is not None
    assert config(UPSTREAM, settings=embedded).encryption_key_file == (
        tmp_path / "encryption-key"
    )


def test_trusted_proxies() -> None:
    cfg = config(
        {**UPSTREAM, "MCP_AUTHDB_TRUSTED_PROXIES": "10.0.0.5, 10.1.0.0/16,::1"}
    )

    assert cfg.trusted_proxies == (
        ip_network("10.0.0.5/32"),
        ip_network("10.1.0.0/16"),
        ip_network("::1/128"),
    )
    assert cfg.is_trusted_proxy("10.0.0.5")
    assert cfg.is_trusted_proxy("10.1.200.3")
    assert cfg.is_trusted_proxy("::1")
    assert not cfg.is_trusted_proxy("10.0.0.6")
    assert not cfg.is_trusted_proxy("not-an-address")


@pytest.mark.parametrize("value", ["10.0.0.300", "proxy.internal", "10.0.0.1,,"])
def test_trusted_proxies_rejected(value: str) -> None:
    message = error_of({**UPSTREAM, "MCP_AUTHDB_TRUSTED_PROXIES": value})

    assert "MCP_AUTHDB_TRUSTED_PROXIES" in message
    assert "10.0.0.5,10.1.0.0/16" in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MCP_AUTHDB_REGISTRATION_LIMIT", "0", "out of range"),
        ("MCP_AUTHDB_REGISTRATION_LIMIT", "many", "not a whole number"),
        ("MCP_AUTHDB_REGISTRATION_MAX_BYTES", "100", "out of range"),
        ("MCP_AUTHDB_REGISTRATION_MAX_BYTES", "9999999", "out of range"),
        ("MCP_AUTHDB_UNUSED_CLIENT_AGE", "5", "out of range"),
        ("TOKEN_CLEANUP_INTERVAL", "-1", "out of range"),
        ("TOKEN_CLEANUP_INTERVAL", "1h", "not a whole number"),
        ("MCP_AUTHDB_ACCESS_TOKEN_LIFETIME", "10", "out of range"),
        ("MCP_AUTHDB_REFRESH_TOKEN_LIFETIME", "abc", "not a whole number"),
        ("TOKEN_REFRESH_THRESHOLD", "1", "above 0 and below 1"),
        ("TOKEN_REFRESH_THRESHOLD", "0", "above 0 and below 1"),
        ("TOKEN_REFRESH_THRESHOLD", "nan", "above 0 and below 1"),
        ("TOKEN_REFRESH_THRESHOLD", "ninety", "above 0 and below 1"),
    ],
)
def test_number_rejected(name: str, value: str, expected: str) -> None:
    message = error_of({**UPSTREAM, name: value})

    assert f"{name}={value!r}" in message
    assert expected in message


def test_numbers_from_environment() -> None:
    cfg = config(
        {
            **UPSTREAM,
            "MCP_AUTHDB_REGISTRATION_LIMIT": "3",
            "MCP_AUTHDB_REGISTRATION_MAX_BYTES": "2048",
            "MCP_AUTHDB_UNUSED_CLIENT_AGE": "600",
            "TOKEN_REFRESH_THRESHOLD": "0.5",
            "TOKEN_CLEANUP_INTERVAL": "0",
            "MCP_AUTHDB_ACCESS_TOKEN_LIFETIME": "120",
            "MCP_AUTHDB_REFRESH_TOKEN_LIFETIME": "7200",
        }
    )

    assert cfg.registration_limit == 3
    assert cfg.registration_max_bytes == 2048
    assert cfg.unused_client_age == timedelta(minutes=10)
    assert cfg.refresh_threshold == 0.5
    assert cfg.cleanup_interval is None
    assert cfg.access_token_lifetime == timedelta(minutes=2)
    assert cfg.refresh_token_lifetime == timedelta(hours=2)


def test_empty_variables_count_as_unset() -> None:
    cfg = config({**UPSTREAM, "MCP_AUTHDB_PORT": " ", "TOKEN_REFRESH_THRESHOLD": ""})

    assert cfg.port == 8000
    assert cfg.refresh_threshold == 0.9


def test_refresh_shorter_than_access_rejected() -> None:
    message = error_of(
        {
            **UPSTREAM,
            "MCP_AUTHDB_ACCESS_TOKEN_LIFETIME": "7200",
            "MCP_AUTHDB_REFRESH_TOKEN_LIFETIME": "3600",
        }
    )

    assert "MCP_AUTHDB_REFRESH_TOKEN_LIFETIME=3600" in message
    assert "MCP_AUTHDB_ACCESS_TOKEN_LIFETIME=7200" in message


def test_subscription_levels() -> None:
    cfg = config(
        {
            **UPSTREAM,
            "MCP_AUTHDB_SUBSCRIPTION_LEVELS": "basic, team ,enterprise",
            "MCP_AUTHDB_SEARCH_LEVEL": "team",
            "UPSTREAM_DEFAULT_LEVEL": "basic",
        }
    )

    assert cfg.subscription_levels == ("basic", "team", "enterprise")
    assert cfg.search_level == "team"


@pytest.mark.parametrize("value", ["free,,pro", "free,free", "free," + "x" * 51])
def test_subscription_levels_rejected(value: str) -> None:
    message = error_of({**UPSTREAM, "MCP_AUTHDB_SUBSCRIPTION_LEVELS": value})

    assert "MCP_AUTHDB_SUBSCRIPTION_LEVELS" in message


def test_search_level_must_be_a_level() -> None:
    message = error_of({**UPSTREAM, "MCP_AUTHDB_SEARCH_LEVEL": "gold"})

    assert "MCP_AUTHDB_SEARCH_LEVEL='gold'" in message
    assert "free, plus, pro" in message


def test_upstream_default_level_must_be_a_level() -> None:
    message = error_of({**UPSTREAM, "UPSTREAM_DEFAULT_LEVEL": "bronze"})

    assert "UPSTREAM_DEFAULT_LEVEL='bronze'" in message


def test_allowed_hosts_and_origins_public() -> None:
    cfg = config(
        {
            **PUBLIC,
            "MCP_AUTHDB_HOST": "0.0.0.0",
            "MCP_AUTHDB_ALLOWED_HOSTS": "mcp.internal:8000",
            "MCP_AUTHDB_ALLOWED_ORIGINS": "https://app.example.com",
        }
    )

    assert cfg.allowed_hosts == [
        "mcp.example.com",
        "mcp.example.com:443",
        "mcp.internal:8000",
    ]
    assert cfg.allowed_origins == ["https://mcp.example.com", "https://app.example.com"]


def test_allowed_hosts_loopback() -> None:
    cfg = config(UPSTREAM, port=9000)

    assert cfg.allowed_hosts == [
        "127.0.0.1:9000",
        "127.0.0.1:*",
        "localhost:*",
        "[::1]:*",
    ]
    assert "http://localhost:*" in cfg.allowed_origins


def test_allowed_hosts_rejected() -> None:
    message = error_of({**UPSTREAM, "MCP_AUTHDB_ALLOWED_HOSTS": "a,,b"})

    assert "MCP_AUTHDB_ALLOWED_HOSTS" in message


def test_repr_hides_environment() -> None:
    cfg = config({**UPSTREAM, "OAUTH_CLIENT_SECRET": "s3cret-value"})

    assert "s3cret-value" not in repr(cfg)
    assert cfg.environ["OAUTH_CLIENT_SECRET"] == "s3cret-value"


def test_environ_is_a_snapshot() -> None:
    env = dict(UPSTREAM)
    cfg = config(env)
    env["LATER"] = "1"

    assert "LATER" not in cfg.environ


def test_scopes_are_upstream_scopes() -> None:
    cfg = config({**UPSTREAM, "UPSTREAM_SCOPES": "a b"})

    assert cfg.scopes == ("a", "b")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("[::1]", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback_host(host: str, expected: bool) -> None:
    assert is_loopback_host(host) is expected
