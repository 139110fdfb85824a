"""Settings from the environment: defaults, validation, password masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp_authdb.db.settings import (
    Settings,
    mask_password,
    passwords_in,
    scrub_message,
    ssl_mode_rank,
)
from mcp_authdb.errors import ConfigurationError
from pgcluster import error_text

PASSWORD = "Sekr3t-9f2c"


def settings_error(**environ: str) -> str:
    """Return the message of the error that ``Settings.from_env`` raises."""
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(environ)
    return str(info.value)


def test_defaults() -> None:
    settings = Settings.from_env({})

    assert settings.database_url is None
    assert settings.ssl_mode == "require"
    assert settings.pool_size == 20
    assert settings.command_timeout_ms == 5000
    assert settings.data_dir is None


def test_reads_every_variable(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://app@dbhost:6543/app",
            "DB_SSL_MODE": "verify-full",
            "DB_CONNECTION_POOL_SIZE": "7",
            "DB_COMMAND_TIMEOUT": "250",
            "MCP_AUTHDB_DATA_DIR": str(tmp_path),
        }
    )

    assert settings.database_url == "postgresql://app@dbhost:6543/app"
    assert settings.ssl_mode == "verify-full"
    assert settings.pool_size == 7
    assert settings.command_timeout_ms == 250
    assert settings.data_dir == tmp_path


def test_blank_means_unset() -> None:
    names = [
        "DB_SSL_MODE",
        "DB_CONNECTION_POOL_SIZE",
        "DB_COMMAND_TIMEOUT",
        "MCP_AUTHDB_DATA_DIR",
    ]

    settings = Settings.from_env(dict.fromkeys(names, "  "))

    assert settings == Settings()


def test_blank_database_url_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="DATABASE_URL is set but empty"):
        Settings.from_env({"DATABASE_URL": "  "})


def test_values_are_stripped() -> None:
    settings = Settings.from_env(
        {"DB_CONNECTION_POOL_SIZE": " 5\n", "DB_SSL_MODE": " verify-ca "}
    )

    assert settings.pool_size == 5
    assert settings.ssl_mode == "verify-ca"


def test_data_dir_expands_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")

    settings = Settings.from_env({"MCP_AUTHDB_DATA_DIR": "~/authdb"})

    assert settings.data_dir == Path("/home/someone/authdb")


def test_data_dir_may_not_exist_yet(tmp_path: Path) -> None:
    settings = Settings.from_env({"MCP_AUTHDB_DATA_DIR": str(tmp_path / "new")})

    assert settings.data_dir == tmp_path / "new"


def test_data_dir_file_rejected(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("")

    message = settings_error(MCP_AUTHDB_DATA_DIR=str(not_a_folder))

    assert f"MCP_AUTHDB_DATA_DIR={str(not_a_folder)!r}" in message
    assert "is not a folder" in message
    assert "set it to a folder" in message


@pytest.mark.parametrize("value", ["strict", "REQUIRE", "verify_full", "on"])
def test_ssl_mode_invalid(value: str) -> None:
    message = settings_error(DB_SSL_MODE=value)

    assert f"DB_SSL_MODE={value!r}" in message
    assert "is not a libpq sslmode" in message
    assert "disable, allow, prefer, require, verify-ca, verify-full" in message


@pytest.mark.parametrize("value", ["many", "1.5", "1_000", "0x10", "\u0665", "5s"])
@pytest.mark.parametrize("name", ["DB_CONNECTION_POOL_SIZE", "DB_COMMAND_TIMEOUT"])
def test_number_not_whole(name: str, value: str) -> None:
    message = settings_error(**{name: value})

    assert f"{name}={value!r}" in message
    assert "is not a whole number" in message
    assert "or unset it to use" in message


def test_timeout_unit_named() -> None:
    message = settings_error(DB_COMMAND_TIMEOUT="5s")

    assert "milliseconds" in message
    assert "unset it to use 5000" in message


@pytest.mark.parametrize(
    ("name", "value", "fix"),
    [
        ("DB_CONNECTION_POOL_SIZE", "0", "at least 1"),
        ("DB_CONNECTION_POOL_SIZE", "-4", "at least 1"),
        ("DB_COMMAND_TIMEOUT", "0", "from 1 to 2147483647"),
        ("DB_COMMAND_TIMEOUT", "-1", "from 1 to 2147483647"),
        ("DB_COMMAND_TIMEOUT", "2147483648", "from 1 to 2147483647"),
    ],
)
def test_number_out_of_range(name: str, value: str, fix: str) -> None:
    message = settings_error(**{name: value})

    assert f"{name}={value} is invalid" in message
    assert fix in message


def test_timeout_maximum_accepted() -> None:
    settings = Settings.from_env({"DB_COMMAND_TIMEOUT": "2147483647"})

    assert settings.command_timeout_ms == 2147483647


def test_replace_checks_fields() -> None:
    with pytest.raises(ConfigurationError, match="DB_CONNECTION_POOL_SIZE=0"):
        Settings().replace(pool_size=0)


def test_ssl_mode_rank_order() -> None:
    ranks = [ssl_mode_rank(mode) for mode in ("disable", "prefer", "verify-full")]

    assert ranks == sorted(ranks)


@pytest.mark.parametrize(
    ("url", "problem", "fix"),
    [
        ("garbage", 'missing "=" after "garbage"', "write it as postgresql://"),
        ("mysql://app@dbhost/app", "scheme 'mysql'", "use postgresql://"),
        (
            "postgresql+psycopg://app@dbhost/app",
            "scheme 'postgresql+psycopg'",
            "remove the driver name",
        ),
        ("postgresql://dbhost/app?bogus=1", '"bogus"', "write it as postgresql://"),
        ("postgresql://dbhost:abc/app", "port 'abc'", "from 1 to 65535"),
        ("postgresql://dbhost:0/app", "port '0'", "from 1 to 65535"),
        ("postgresql://dbhost:65536/app", "port '65536'", "from 1 to 65535"),
        ("postgresql://dbhost:\u0665/app", "port '\u0665'", "from 1 to 65535"),
        ("host=a,b port=5432,x", "port 'x'", "from 1 to 65535"),
        (
            "postgresql://dbhost/app?connect_timeout=soon",
            "connect_timeout='soon'",
            "connect_timeout=10",
        ),
        ("postgresql://dbhost/app?sslmode=strict", "sslmode='strict'", "verify-full"),
        (
            "postgresql://dbhost/app?sslmode=prefer",
            "sslmode=prefer, weaker than DB_SSL_MODE=require",
            "remove sslmode from DATABASE_URL",
        ),
    ],
)
def test_database_url_invalid(url: str, problem: str, fix: str) -> None:
    message = settings_error(DATABASE_URL=url)

    assert message.startswith("DATABASE_URL")
    assert problem in message
    assert fix in message


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("postgresql://app:pa@ss@dbhost/app", "as %40"),
        ("postgresql://app:pa/ss@dbhost/app", "as %2F"),
    ],
)
def test_database_url_raw_special(url: str, fix: str) -> None:
    message = settings_error(DATABASE_URL=url)

    assert fix in message
    assert "pa@ss" not in message
    assert "pa/ss" not in message
    assert "postgresql://app:***@dbhost/app" in message


def test_database_url_weak_when_allowed() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://dbhost/app?sslmode=disable",
            "DB_SSL_MODE": "disable",
        }
    )

    assert settings.ssl_mode == "disable"


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_database_url_stronger_accepted(mode: str) -> None:
    url = f"postgresql://dbhost/app?sslmode={mode}"

    settings = Settings.from_env({"DATABASE_URL": url})

    assert settings.database_url == url


def test_database_url_conninfo_accepted() -> None:
    settings = Settings.from_env({"DATABASE_URL": "host=dbhost port=5432 dbname=app"})

    assert settings.database_url == "host=dbhost port=5432 dbname=app"


@pytest.mark.parametrize(
    ("text", "password"),
    [
        ("postgresql://app:Sekr3t@dbhost/app", "Sekr3t"),
        ("postgres://:Sekr3t@dbhost/app", "Sekr3t"),
        ("postgresql://app:Sek%2Fr3t@dbhost/app", "Sek%2Fr3t"),
        ("postgresql://app:Sek@r3t@dbhost/app", "Sek@r3t"),
        ("postgresql://app:Sek/r3t@dbhost/app", "Sek/r3t"),
        ("postgresql://app:Sek r3t@dbhost/app", "Sek r3t"),
        ("postgresql://dbhost/app?password=Sekr3t&sslmode=require", "Sekr3t"),
        ("postgresql://dbhost/app?sslpassword=Sekr3t", "Sekr3t"),
        ("host=dbhost password=Sekr3t dbname=app", "Sekr3t"),
        ("host=dbhost password = 'Sek r3t' dbname=app", "Sek r3t"),
        ("host=dbhost password='Sek\\'r3t' dbname=app", "Sek\\'r3t"),
        ("host=dbhost sslpassword=Sekr3t", "Sekr3t"),
        ('message quoting "postgresql://app:Sekr3t@dbhost/app" here', "Sekr3t"),
    ],
)
def test_mask_password(text: str, password: str) -> None:
    masked = mask_password(text)

    assert password not in masked
    assert "***" in masked


def test_mask_keeps_the_rest() -> None:
    url = "postgresql://app:Sekr3t@dbhost:5432/app?password=x&sslmode=require"
    conninfo = "host=dbhost password='a b' dbname=app"

    assert mask_password(url) == (
        "postgresql://app:***@dbhost:5432/app?password=***&sslmode=require"
    )
    assert mask_password(conninfo) == "host=dbhost password=*** dbname=app"


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://app@dbhost:5432/app",
        "postgresql://dbhost:5432/app?sslmode=require",
        "host=dbhost dbname=app passfile=/etc/pgpass",
    ],
)
def test_mask_without_password(text: str) -> None:
    assert mask_password(text) == text


def test_passwords_in_decodes() -> None:
    found = passwords_in("postgresql://app:Sek%2Fr3t@dbhost/app")

    assert "Sek%2Fr3t" in found
    assert "Sek/r3t" in found


def test_passwords_in_conninfo_quotes() -> None:
    found = passwords_in("host=dbhost password='Sek\\'r3t'")

    assert "Sek'r3t" in found


def test_scrub_message_quoted_token() -> None:
    # libpq quotes only the bad token, so masking URLs alone would miss it.
    url = "postgresql://app:Sek%zzr3t@dbhost/app"

    message = scrub_message('invalid percent-encoded token: "Sek%zzr3t"', url)

    assert message == 'invalid percent-encoded token: "***"'


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{PASSWORD}@dbhost/app",
        f"host=dbhost user=app password={PASSWORD} dbname=app",
        f"postgresql://dbhost/app?user=app&password={PASSWORD}",
    ],
)
def test_repr_hides_password(url: str) -> None:
    settings = Settings(database_url=url)

    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    assert "dbhost" in repr(settings)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{PASSWORD}@[::1/app",
        f"postgresql://app:{PASSWORD}%zz@dbhost/app",
        f"postgresql://app:{PASSWORD} x@dbhost/app",
        f"postgresql://app:{PASSWORD}@dbhost/app?bogus=1",
        f"postgresql://app:{PASSWORD}@dbhost:abc/app",
        f"postgresql://app:{PASSWORD}@dbhost/app?sslmode=disable",
        f"postgresql://dbhost/app?password={PASSWORD}%zz",
        f"postgresql://app:ab/{PASSWORD}@dbhost/app",
        f"postgresql://app:ab@{PASSWORD}@dbhost/app",
        f"mysql://app:{PASSWORD}@dbhost/app",
        f"host=dbhost password={PASSWORD} garbage",
        f"host=dbhost password='{PASSWORD}",
    ],
)
def test_invalid_url_hides_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"DATABASE_URL": url})

    assert "DATABASE_URL" in str(info.value)
    assert PASSWORD not in error_text(info.value)
