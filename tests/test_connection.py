"""Connections: parameters added, statement timeout, datetimes, failures, secrets.

The tests that need a database use the session's server (``db``, ``empty_db``).
Those that need a TCP server use a cluster of their own on 127.0.0.1, and
those about failures use ports on 127.0.0.1 that this module opens or frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mcp_authdb.db import connection
from mcp_authdb.db.connection import connect, connect_async, resolve_target
from mcp_authdb.db.settings import Settings
from mcp_authdb.errors import (
    ConfigurationError,
    ConnectionFailedError,
    InvalidValueError,
)
from pgcluster import TcpCluster, error_text, free_port, new_password

from conftest import ScratchDatabase

pytest_plugins = ["pgcluster"]

NEW_YORK = ZoneInfo("America/New_York")
TIMEOUT_MS = 1500
# The statement timeout of the pg_sleep tests, short to keep them fast.
SLEEP_TIMEOUT_MS = 300


def target_params(url: str, settings: Settings | None = None) -> dict[str, Any]:
    target = resolve_target(url, settings or Settings())
    return conninfo_to_dict(target.conninfo)


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    """Return the captured log lines and every attribute of their records."""
    return caplog.text + "\n".join(repr(vars(record)) for record in caplog.records)


class SilentServer:
    """A TCP listener on 127.0.0.1 that accepts connections and never replies."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _address = self.listener.accept()
                self.accepted.append(client)

    @contextlib.contextmanager
    def running(self) -> Iterator[SilentServer]:
        self.thread.start()
        try:
            yield self
        finally:
            # shutdown() wakes the thread blocked in accept().
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.thread.join(timeout=5)
            for client in self.accepted:
                client.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    with SilentServer().running() as server:
        yield server


# resolve_target


def test_target_default_sslmode() -> None:
    target = resolve_target("postgresql://app@127.0.0.1/app", Settings())

    assert conninfo_to_dict(target.conninfo)["sslmode"] == "require"
    assert target.ssl_mode == "require"
    assert not target.local_socket


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_target_keeps_stronger_sslmode(mode: str) -> None:
    params = target_params(f"postgresql://app@127.0.0.1/app?sslmode={mode}")

    assert params["sslmode"] == mode


@pytest.mark.parametrize(
    ("url_mode", "setting"),
    [
        ("disable", "require"),
        ("allow", "require"),
        ("prefer", "require"),
        ("require", "verify-ca"),
        ("verify-ca", "verify-full"),
    ],
)
def test_target_rejects_weaker_sslmode(url_mode: str, setting: str) -> None:
    url = f"postgresql://app@127.0.0.1/app?sslmode={url_mode}"

    with pytest.raises(ConfigurationError) as info:
        resolve_target(url, Settings(ssl_mode=setting))

    assert f"sslmode={url_mode}" in str(info.value)
    assert f"DB_SSL_MODE={setting}" in str(info.value)


def test_target_ignores_pgsslmode(monkeypatch: pytest.MonkeyPatch) -> None:
    # libpq reads PGSSLMODE only when the conninfo has no sslmode.
    monkeypatch.setenv("PGSSLMODE", "disable")

    params = target_params("postgresql://app@127.0.0.1/app")

    assert params["sslmode"] == "require"


@pytest.mark.parametrize(
    ("url", "local_socket"),
    [
        ("postgresql:///app?host=/var/run/postgresql", True),
        ("host=/tmp/pg port=5433 dbname=app", True),
        ("host=@abstract dbname=app", True),
        ("dbname=app", True),
        ("postgresql://127.0.0.1/app", False),
        ("postgresql://localhost:5433/app", False),
        ("host=/tmp/pg hostaddr=127.0.0.1 dbname=app", False),
        ("host=/tmp/pg,127.0.0.1 dbname=app", False),
    ],
)
def test_target_local_socket(
    url: str, local_socket: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGHOST", raising=False)

    target = resolve_target(url, Settings())

    assert target.local_socket is local_socket


def test_target_pghost_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "127.0.0.1")

    target = resolve_target("dbname=app", Settings())

    assert not target.local_socket
    assert target.description == "127.0.0.1:5432/app"


def test_target_statement_timeout() -> None:
    params = target_params(
        "postgresql://app@127.0.0.1/app", Settings(command_timeout_ms=1234)
    )

    assert params["options"] == "-c statement_timeout=1234"


def test_target_keeps_url_options() -> None:
    url = make_conninfo(
        "postgresql://app@127.0.0.1/app",
        options="-c search_path=auth -c statement_timeout=0",
    )

    params = target_params(url, Settings(command_timeout_ms=1234))

    assert params["options"] == (
        "-c search_path=auth -c statement_timeout=0 -c statement_timeout=1234"
    )


@pytest.mark.parametrize(
    ("timeout_ms", "seconds"),
    [
        (1, "2"),
        (1999, "2"),
        (2500, "3"),
        (5000, "5"),
        (30_000, "30"),
        (2_147_483_647, "30"),
    ],
)
def test_target_connect_timeout(timeout_ms: int, seconds: str) -> None:
    params = target_params(
        "postgresql://app@127.0.0.1/app", Settings(command_timeout_ms=timeout_ms)
    )

    assert params["connect_timeout"] == seconds


def test_target_keeps_url_connect_timeout() -> None:
    params = target_params("postgresql://app@127.0.0.1/app?connect_timeout=30")

    assert params["connect_timeout"] == "30"


def test_target_application_name() -> None:
    default = target_params("postgresql://app@127.0.0.1/app")
    chosen = target_params("postgresql://app@127.0.0.1/app?application_name=web")

    assert default["application_name"] == "mcp-authdb"
    assert chosen["application_name"] == "web"


@pytest.mark.parametrize(
    ("url", "description"),
    [
        ("postgresql://app:pw@127.0.0.1:6543/app", "127.0.0.1:6543/app"),
        ("postgresql://app@127.0.0.1/app", "127.0.0.1:5432/app"),
        ("host=/tmp/pg port=5433 dbname=app", "socket /tmp/pg:5433/app"),
        ("host=a,b port=5433, dbname=app", "a:5433,b:5432/app"),
    ],
)
def test_target_description(url: str, description: str) -> None:
    target = resolve_target(url, Settings())

    assert target.description == description


def test_target_repr_hides_password() -> None:
    password = new_password()
    url = f"postgresql://app:{quote(password, safe='')}@127.0.0.1/app"

    target = resolve_target(url, Settings())

    assert conninfo_to_dict(target.conninfo)["password"] == password
    assert password not in repr(target)
    assert password not in str(target)
    assert password not in target.description


@pytest.mark.parametrize(
    "url",
    ["garbage", "mysql://app@127.0.0.1/app", "postgresql://127.0.0.1:none/app"],
)
def test_target_rejects_bad_url(url: str) -> None:
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        resolve_target(url, Settings())


# The session's server


def test_statement_timeout_cancels(empty_db: ScratchDatabase) -> None:
    settings = empty_db.settings.replace(command_timeout_ms=SLEEP_TIMEOUT_MS)
    target = resolve_target(empty_db.url, settings)

    with connect(target, autocommit=True) as conn:
        # The first statement of the connection: the timeout is set at start.
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            conn.execute("SELECT pg_sleep(30)")
        elapsed = time.monotonic() - started
        after = conn.execute("SELECT 1").fetchone()

    assert "canceling statement due to statement timeout" in str(info.value)
    assert SLEEP_TIMEOUT_MS / 1000 <= elapsed < 10
    assert after == (1,)


def test_statement_timeout_in_transaction(empty_db: ScratchDatabase) -> None:
    settings = empty_db.settings.replace(command_timeout_ms=SLEEP_TIMEOUT_MS)

    with connect(resolve_target(empty_db.url, settings)) as conn:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        conn.rollback()
        after = conn.execute("SELECT 2").fetchone()

    assert after == (2,)


def test_statement_timeout_shown(empty_db: ScratchDatabase) -> None:
    settings = empty_db.settings.replace(command_timeout_ms=TIMEOUT_MS)

    with connect(resolve_target(empty_db.url, settings)) as conn:
        timeout_setting = conn.execute("SHOW statement_timeout").fetchone()

    assert timeout_setting == (f"{TIMEOUT_MS}ms",)


def test_statement_timeout_beats_url(empty_db: ScratchDatabase) -> None:
    url = make_conninfo(empty_db.url, options="-c statement_timeout=0")
    settings = empty_db.settings.replace(command_timeout_ms=TIMEOUT_MS)

    with connect(resolve_target(url, settings)) as conn:
        timeout_setting = conn.execute("SHOW statement_timeout").fetchone()

    assert timeout_setting == (f"{TIMEOUT_MS}ms",)


@pytest.mark.parametrize("placeholder", ["%s", "%t", "%b"])
def test_naive_datetime_rejected(empty_db: ScratchDatabase, placeholder: str) -> None:
    naive = datetime(2024, 3, 10, 2, 30)

    with empty_db.connect(autocommit=True) as conn:
        with pytest.raises(InvalidValueError, match="has no time zone") as info:
            conn.execute(f"SELECT {placeholder}::timestamptz", [naive])
        after = conn.execute("SELECT 1").fetchone()

    assert isinstance(info.value, ValueError)
    assert "2024-03-10T02:30:00" in str(info.value)
    assert after == (1,)


@pytest.mark.parametrize("placeholder", ["%t", "%b"])
@pytest.mark.parametrize("position", [0, 1])
def test_naive_datetime_in_list_rejected(
    empty_db: ScratchDatabase, placeholder: str, position: int
) -> None:
    # psycopg picks the element dumper from one element only.
    values: list[datetime] = [datetime(2024, 1, 1, tzinfo=UTC)] * 2
    values[position] = datetime(2024, 3, 10, 2, 30)

    with (
        empty_db.connect(autocommit=True) as conn,
        pytest.raises(ValueError, match="has no time zone"),
    ):
        conn.execute(f"SELECT {placeholder}::timestamptz[]", [values])


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("set_types", [False, True])
def test_naive_datetime_copy_rejected(
    empty_db: ScratchDatabase, binary: bool, set_types: bool
) -> None:
    statement = "COPY stamps FROM STDIN" + (" (FORMAT BINARY)" if binary else "")

    with empty_db.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE stamps (at timestamptz)")
        with (
            pytest.raises(ValueError, match="has no time zone"),
            conn.cursor().copy(statement) as copy,
        ):
            if set_types:
                copy.set_types(["timestamptz"])
            copy.write_row([datetime(2024, 3, 10, 2, 30)])
        count = conn.execute("SELECT count(*) FROM stamps").fetchone()

    assert count == (0,)


def test_other_date_types_unchanged(empty_db: ScratchDatabase) -> None:
    with empty_db.connect() as conn:
        row = conn.execute("SELECT %s::date", [date(2024, 3, 10)]).fetchone()

    assert row == (date(2024, 3, 10),)


# Around the changes of daylight saving time in New York in 2024: 2024-03-10
# 02:00 EST became 03:00 EDT, and 2024-11-03 02:00 EDT became 01:00 EST.
DST_INSTANTS = [
    datetime(2024, 3, 10, 6, 59, 59, 999999, tzinfo=UTC),
    datetime(2024, 3, 10, 7, 0, tzinfo=UTC),
    datetime(2024, 3, 10, 1, 30, tzinfo=NEW_YORK),
    datetime(2024, 3, 10, 3, 30, tzinfo=NEW_YORK),
    datetime(2024, 11, 3, 1, 30, tzinfo=NEW_YORK),
    datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=NEW_YORK),
    datetime(2024, 11, 3, 7, 15, tzinfo=timezone(timedelta(hours=5, minutes=30))),
]


@pytest.mark.parametrize("placeholder", ["%t", "%b"])
def test_aware_datetime_same_instant(
    empty_db: ScratchDatabase, placeholder: str
) -> None:
    with empty_db.connect() as conn:
        conn.execute("SET TimeZone = 'America/New_York'")
        conn.execute("CREATE TABLE stamps (id int PRIMARY KEY, at timestamptz)")
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO stamps VALUES (%s, {placeholder})",
                list(enumerate(DST_INSTANTS)),
            )
        stored = conn.execute("SELECT at FROM stamps ORDER BY id").fetchall()
        epochs = conn.execute(
            "SELECT extract(epoch FROM at) FROM stamps ORDER BY id"
        ).fetchall()
        local = conn.execute("SELECT at::text FROM stamps ORDER BY id").fetchall()

    assert [row[0] for row in stored] == DST_INSTANTS
    assert [row[0] for row in epochs] == [
        Decimal(str(value.timestamp())).quantize(Decimal("0.000001"))
        for value in DST_INSTANTS
    ]
    assert local[0] == ("2024-03-10 01:59:59.999999-05",)
    assert local[1] == ("2024-03-10 03:00:00-04",)
    assert local[4] == ("2024-11-03 01:30:00-04",)
    assert local[5] == ("2024-11-03 01:30:00-05",)


def test_aware_datetime_other_zone_reads(empty_db: ScratchDatabase) -> None:
    with empty_db.connect() as conn:
        conn.execute("SET TimeZone = 'America/New_York'")
        conn.execute("CREATE TABLE stamps (id int PRIMARY KEY, at timestamptz)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO stamps VALUES (%s, %s)", list(enumerate(DST_INSTANTS))
            )
        conn.commit()

    with empty_db.connect() as conn:
        conn.execute("SET TimeZone = 'UTC'")
        utc_text = conn.execute("SELECT at::text FROM stamps ORDER BY id").fetchall()

    assert utc_text[0] == ("2024-03-10 06:59:59.999999+00",)
    assert utc_text[5] == ("2024-11-03 06:30:00+00",)


def test_connect_async(empty_db: ScratchDatabase) -> None:
    settings = empty_db.settings.replace(command_timeout_ms=TIMEOUT_MS)
    target = resolve_target(empty_db.url, settings)

    async def run() -> tuple[Any, BaseException | None]:
        async with await connect_async(target) as conn:
            cursor = await conn.execute("SHOW statement_timeout")
            timeout_setting = await cursor.fetchone()
            try:
                await conn.execute("SELECT %s", [datetime(2024, 1, 1)])
            except ValueError as exc:
                return timeout_setting, exc
        return timeout_setting, None

    timeout_setting, naive_error = asyncio.run(run())

    assert timeout_setting == (f"{TIMEOUT_MS}ms",)
    assert isinstance(naive_error, ValueError)


def test_socket_logged_once(
    db: ScratchDatabase,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = resolve_target(db.url, db.settings)
    if not target.local_socket:
        pytest.skip("DATABASE_URL names a TCP server, not a Unix socket")
    monkeypatch.setattr(connection, "_local_socket_logged", False)
    caplog.set_level(logging.INFO, logger="mcp_authdb")

    for _ in range(3):
        with connect(target) as conn:
            conn.execute("SELECT 1")

    records = [
        record
        for record in caplog.records
        if getattr(record, "action", None) == "db.connect.local_socket"
    ]
    assert len(records) == 1
    assert "SSL does not apply" in records[0].getMessage()
    assert target.description in records[0].getMessage()


def test_tcp_not_logged_as_socket(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "_local_socket_logged", False)
    caplog.set_level(logging.INFO, logger="mcp_authdb")
    target = resolve_target(f"postgresql://app@127.0.0.1:{free_port()}/app", Settings())

    with pytest.raises(ConnectionFailedError):
        connect(target)

    actions = [getattr(r, "action", None) for r in caplog.records]
    assert "db.connect.local_socket" not in actions
    assert "db.connect.failed" in actions


# Failures on ports of this test


def test_silent_server_times_out(silent_server: SilentServer) -> None:
    url = f"postgresql://app@127.0.0.1:{silent_server.port}/app"
    target = resolve_target(url, Settings(command_timeout_ms=1000))

    started = time.monotonic()
    with pytest.raises(ConnectionFailedError) as info:
        connect(target)
    elapsed = time.monotonic() - started

    assert 1.5 < elapsed < 6
    assert silent_server.accepted
    assert f"127.0.0.1:{silent_server.port}/app" in str(info.value)
    assert "timeout expired" in str(info.value)
    assert "timed out after connect_timeout=2 seconds" in str(info.value)


def test_silent_server_without_ssl(silent_server: SilentServer) -> None:
    # The URL's connect_timeout wins over the 5 seconds derived from the setting.
    url = f"postgresql://app@127.0.0.1:{silent_server.port}/app?connect_timeout=2"
    target = resolve_target(url, Settings(ssl_mode="disable"))

    started = time.monotonic()
    with pytest.raises(ConnectionFailedError, match="timeout expired"):
        connect(target)
    elapsed = time.monotonic() - started

    assert 1.5 < elapsed < 4.5


def test_closed_port_refused() -> None:
    port = free_port()
    target = resolve_target(f"postgresql://app@127.0.0.1:{port}/app", Settings())

    started = time.monotonic()
    with pytest.raises(ConnectionFailedError) as info:
        connect(target)
    elapsed = time.monotonic() - started

    assert elapsed < 2
    assert f"127.0.0.1:{port}/app" in str(info.value)
    assert "Connection refused" in str(info.value)
    assert "check that the server is running" in str(info.value)


def test_closed_port_async() -> None:
    target = resolve_target(f"postgresql://app@127.0.0.1:{free_port()}/app", Settings())

    with pytest.raises(ConnectionFailedError, match="Connection refused"):
        asyncio.run(connect_async(target))


# Passwords, on a cluster of this test with a SCRAM role


def test_password_connects(plain_cluster: TcpCluster) -> None:
    target = resolve_target(plain_cluster.url(), Settings(ssl_mode="prefer"))

    with connect(target) as conn:
        user = conn.execute("SELECT current_user").fetchone()

    assert user == ("app",)


def test_wrong_password_hidden(
    plain_cluster: TcpCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = new_password()
    target = resolve_target(
        plain_cluster.url(password=wrong), Settings(ssl_mode="prefer")
    )

    with pytest.raises(ConnectionFailedError) as info:
        connect(target)

    text = error_text(info.value) + logged_text(caplog)
    assert "password authentication failed" in str(info.value)
    assert "check the user name and password" in str(info.value)
    assert "db.connect.failed" in logged_text(caplog)
    assert wrong not in text
    assert quote(wrong, safe="") not in text
    assert plain_cluster.password not in text


def test_right_password_not_logged(
    plain_cluster: TcpCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(database_url=plain_cluster.url(), ssl_mode="prefer")
    target = resolve_target(plain_cluster.url(), settings)

    with connect(target) as conn:
        conn.execute("SELECT 1")

    text = logged_text(caplog) + repr(settings) + repr(target)
    assert "db.connect.done" in text
    assert plain_cluster.password not in text
    assert quote(plain_cluster.password, safe="") not in text


def test_refused_hides_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    password = new_password()
    url = f"postgresql://app:{quote(password, safe='')}@127.0.0.1:{free_port()}/app"

    with pytest.raises(ConnectionFailedError) as info:
        connect(resolve_target(url, Settings()))

    text = error_text(info.value) + logged_text(caplog)
    assert password not in text
    assert quote(password, safe="") not in text


@pytest.mark.parametrize(
    "template",
    [
        "postgresql://app:{password}@[::1/app",
        "postgresql://app:{password}%zz@127.0.0.1/app",
        "postgresql://app:{password} x@127.0.0.1/app",
        "postgresql://app:{password}@127.0.0.1:none/app",
        "postgresql://app:{password}@127.0.0.1/app?sslmode=disable",
        "postgresql://app:ab/{password}@127.0.0.1/app",
        "mysql://app:{password}@127.0.0.1/app",
        "host=127.0.0.1 password={password} garbage",
    ],
)
def test_invalid_url_hides_password(
    template: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = f"Sekr3t{new_password()[3:19]}"
    url = template.format(password=password)

    with pytest.raises(ConfigurationError) as info:
        resolve_target(url, Settings())

    assert password not in error_text(info.value)
    assert password not in logged_text(caplog)
