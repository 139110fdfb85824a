"""The request log writers against real PostgreSQL: batching, sanitizing, outages.

Faults that PostgreSQL cannot produce on demand, such as a connection that
breaks right after COMMIT reached the server, are made by a psycopg
connection subclass that closes its own socket at that moment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import json
import logging
import math
import socket
import statistics
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from mcp_authdb.db import Settings, resolve_target
from mcp_authdb.db.connection import ConnectionTarget
from mcp_authdb.errors import InvalidValueError
from mcp_authdb.store.request_log import (
    DROP_CLOSE_TIMEOUT,
    DROP_CLOSED,
    DROP_QUEUE_FULL,
    DROP_REJECTED,
    AsyncRequestLog,
    RequestLog,
    RequestLogStats,
)
from mcp_authdb.store.request_log_sanitize import (
    INT4_MAX,
    METHOD_MAX_LENGTH,
    REDACTED,
    STATUS_MAX_LENGTH,
    USER_ID_MAX_LENGTH,
)
from mcp_authdb.store.tokens import TokenKind

from conftest import ScratchDatabase

# Timings small enough to keep the tests fast.
FAST: dict[str, Any] = {
    "max_delay_s": 0.05,
    "min_backoff_s": 0.01,
    "max_backoff_s": 0.05,
}

ROW_COLUMNS = (
    "user_id, method, parameters, response_size, duration_ms, status, created_at"
)


def target_of(db: ScratchDatabase) -> ConnectionTarget:
    return resolve_target(db.url, db.settings)


def stored_rows(db: ScratchDatabase) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(
            f"SELECT {ROW_COLUMNS} FROM request_logs ORDER BY id"
        ).fetchall()


def count_rows(db: ScratchDatabase) -> int:
    with db.connect() as conn:
        row = conn.execute("SELECT count(*) FROM request_logs").fetchone()
    assert row is not None
    return int(row[0])


def wait_for_rows(db: ScratchDatabase, count: int, timeout_s: float = 5.0) -> float:
    """Wait until the table has ``count`` rows; return the seconds it took."""
    began = time.monotonic()
    while count_rows(db) < count:
        assert time.monotonic() - began < timeout_s, f"fewer than {count} rows"
        time.sleep(0.01)
    return time.monotonic() - began


def check_invariant(stats: RequestLogStats) -> None:
    settled_drops = stats.dropped.get(DROP_REJECTED, 0) + stats.dropped.get(
        DROP_CLOSE_TIMEOUT, 0
    )
    assert stats.queued == stats.written + settled_drops + stats.queue_depth


# Rows arrive, both writers.


def test_thread_writer_stores_rows(db: ScratchDatabase) -> None:
    before = dt.datetime.now(dt.UTC)
    with RequestLog(target_of(db), db.settings, **FAST) as writer:
        writer.log(
            "tools/call",
            user_id="user-1",
            parameters={"name": "search", "arguments": {"q": "x", "limit": 3}},
            response_size=512,
            duration_ms=12,
            status="ok",
        )
        writer.log("tools/list")
    after = dt.datetime.now(dt.UTC)

    rows = stored_rows(db)
    assert len(rows) == 2
    first, second = rows
    assert first[:6] == (
        "user-1",
        "tools/call",
        {"name": "search", "arguments": {"q": "x", "limit": 3}},
        512,
        12,
        "ok",
    )
    assert before <= first[6] <= after
    assert second[:6] == (None, "tools/list", None, None, None, None)

    stats = writer.stats()
    assert stats.queued == 2
    assert stats.written == 2
    assert stats.dropped == {}
    assert stats.queue_depth == 0


def test_async_writer_stores_rows(db: ScratchDatabase) -> None:
    created = dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)

    async def scenario() -> RequestLogStats:
        async with AsyncRequestLog(target_of(db), db.settings, **FAST) as writer:
            for index in range(5):
                writer.log(
                    "resources/read",
                    user_id=f"user-{index}",
                    parameters=[index],
                    created_at=created,
                )
        return writer.stats()

    stats = asyncio.run(scenario())

    rows = stored_rows(db)
    assert [row[0] for row in rows] == [f"user-{i}" for i in range(5)]
    assert [row[2] for row in rows] == [[i] for i in range(5)]
    assert {row[6] for row in rows} == {created}
    assert stats.written == 5
    assert stats.batches == 1
    check_invariant(stats)


def test_async_writer_accepts_rows_from_threads(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with AsyncRequestLog(target_of(db), db.settings, **FAST) as writer:

            def log_rows() -> None:
                for _ in range(20):
                    writer.log("tools/call", user_id="t")

            await asyncio.to_thread(log_rows)
            assert await writer.flush(timeout_s=5)

    asyncio.run(scenario())

    assert count_rows(db) == 20


# Batching.


def test_batch_written_when_size_reached(db: ScratchDatabase) -> None:
    writer = RequestLog(target_of(db), db.settings, batch_size=10, max_delay_s=60)
    writer.open()
    try:
        for index in range(10):
            writer.log("tools/call", parameters={"i": index})
        wait_for_rows(db, 10)

        for index in range(5):
            writer.log("tools/call", parameters={"i": 10 + index})
        time.sleep(0.3)
        # Five rows are neither a full batch nor 60 s old.
        assert count_rows(db) == 10
    finally:
        stats = writer.close()

    assert count_rows(db) == 15
    assert stats.batches == 2
    assert stats.written == 15


def test_batch_written_after_max_delay(db: ScratchDatabase) -> None:
    writer = RequestLog(target_of(db), db.settings, batch_size=1000, max_delay_s=0.5)
    writer.open()
    try:
        began = time.monotonic()
        for _ in range(3):
            writer.log("tools/call")
        assert count_rows(db) == 0

        wait_for_rows(db, 3)
        waited = time.monotonic() - began
    finally:
        writer.close()

    assert waited >= 0.45
    assert waited < 5


def test_async_batches_by_size_and_time(db: ScratchDatabase) -> None:
    async def scenario() -> RequestLogStats:
        writer = AsyncRequestLog(
            target_of(db), db.settings, batch_size=4, max_delay_s=0.3
        )
        await writer.open()
        try:
            for _ in range(8):
                writer.log("tools/call")
            await asyncio.to_thread(wait_for_rows, db, 8)
            writer.log("tools/call")
            began = time.monotonic()
            await asyncio.to_thread(wait_for_rows, db, 9)
            assert time.monotonic() - began >= 0.25
            return writer.stats()
        finally:
            await writer.aclose()

    stats = asyncio.run(scenario())

    assert stats.batches == 3
    assert stats.written == 9


def test_close_flushes_queued_rows(db: ScratchDatabase) -> None:
    writer = RequestLog(target_of(db), db.settings, batch_size=1000, max_delay_s=60)
    writer.open()
    for index in range(50):
        writer.log("tools/call", parameters={"i": index})

    stats = writer.close()

    assert count_rows(db) == 50
    assert stats.written == 50
    assert stats.queue_depth == 0


def test_aclose_flushes_queued_rows(db: ScratchDatabase) -> None:
    async def scenario() -> RequestLogStats:
        writer = AsyncRequestLog(
            target_of(db), db.settings, batch_size=1000, max_delay_s=60
        )
        await writer.open()
        for index in range(50):
            writer.log("tools/call", parameters={"i": index})
        return await writer.aclose()

    stats = asyncio.run(scenario())

    assert count_rows(db) == 50
    assert stats.written == 50
    assert stats.queue_depth == 0


def test_log_after_close_is_dropped(db: ScratchDatabase) -> None:
    writer = RequestLog(target_of(db), db.settings, **FAST)
    writer.open()
    writer.close()

    writer.log("tools/call")

    stats = writer.stats()
    assert stats.dropped == {DROP_CLOSED: 1}
    assert stats.queued == 0
    assert count_rows(db) == 0


def test_transaction_pooler_mode_writes(db: ScratchDatabase) -> None:
    settings = db.settings.replace(transaction_pooler=True)
    target = resolve_target(db.url, settings)

    with RequestLog(target, settings, **FAST) as writer:
        writer.log("tools/call", parameters={"a": 1})

    assert count_rows(db) == 1


def test_closed_idle_connection_is_replaced_quietly(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mcp_authdb.store.request_log")
    with RequestLog(target_of(db), db.settings, **FAST) as writer:
        writer.log("tools/call")
        assert writer.flush(timeout_s=5)
        with db.connect(autocommit=True) as conn:
            terminated = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        assert terminated == [(True,)]

        writer.log("tools/call")
        assert writer.flush(timeout_s=5)

    assert count_rows(db) == 2
    stats = writer.stats()
    assert stats.failed_attempts == 1
    assert "reconnecting" in caplog.text
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []


# Sanitizing: each case is logged and read back in order.


class Opaque:
    """An object whose repr contains a secret, which must never be stored."""

    def __repr__(self) -> str:
        return "Opaque(password='hunter2')"


@dataclasses.dataclass
class Case:
    name: str
    kwargs: dict[str, Any]
    # Expected stored values by column name; created_at is checked apart.
    expected: dict[str, Any]


def wrap_in_lists(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


def nested(depth: int) -> Any:
    return wrap_in_lists("leaf", depth)


def circular() -> dict[str, Any]:
    value: dict[str, Any] = {"name": "loop"}
    value["self"] = value
    return value


class Name(str):
    """A str subclass, which the JSON encoder would write like a str."""


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


TOKEN = "mcpat_" + "A" * 43
CODE_TOKEN = TokenKind.CODE.prefix + "C" * 43
STATE_TOKEN = TokenKind.STATE.prefix + "S" * 43
TEN_MB = 10 * 1024 * 1024
AWARE = dt.datetime(2026, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))
NAIVE = dt.datetime(2026, 5, 6, 7, 8, 9)

CASES = [
    Case(
        "secret keys",
        {
            "parameters": {
                "password": "hunter2",
                "Client-Secret": "s1",
                "access_token": "a1",
                "refresh_token": "r1",
                "id_token": "i1",
                "Authorization": "Bearer b1",
                "code": "c1",
                "api_key": "k1",
                "apiKey": "k2",
                "Cookie": "sid=1",
                "x_signature": "sig",
            }
        },
        {
            "parameters": {
                "password": REDACTED,
                "Client-Secret": REDACTED,
                "access_token": REDACTED,
                "refresh_token": REDACTED,
                "id_token": REDACTED,
                "Authorization": REDACTED,
                "code": REDACTED,
                "api_key": REDACTED,
                "apiKey": REDACTED,
                "Cookie": REDACTED,
                "x_signature": REDACTED,
            }
        },
    ),
    Case(
        "keys that only look secret",
        {"parameters": {"max_tokens": 5, "token_type": "bearer", "zip_code": "1"}},
        {"parameters": {"max_tokens": 5, "token_type": "bearer", "zip_code": "1"}},
    ),
    Case(
        "nested secrets",
        {
            "parameters": {
                "a": [{"b": {"password": {"deep": "x"}}}],
                "headers": {"Set-Cookie": "y", "accept": "json"},
                "client": {"credentials": ["u", "p"]},
            }
        },
        {
            "parameters": {
                "a": [{"b": {"password": REDACTED}}],
                "headers": {"Set-Cookie": REDACTED, "accept": "json"},
                "client": {"credentials": REDACTED},
            }
        },
    ),
    Case(
        "more secret key names",
        {
            "parameters": {
                "passcode": "1",
                "accessKey": "2",
                "aws_access_key_id": "3",
                "AWS_SECRET_ACCESS_KEY": "4",
                "id_token_hint": "5",
                "tokens": ["6"],
                "signature": "7",
                "sig": "8",
                "pin": 9,
                "otp": "10",
                "session": "11",
                "jwt": "12",
                "assertion": "13",
                "client_assertion": "14",
                "code_verifier": "15",
                "\uff30\uff21\uff33\uff33\uff37\uff2f\uff32\uff24": "16",
            }
        },
        {
            "parameters": {
                "passcode": REDACTED,
                "accessKey": REDACTED,
                "aws_access_key_id": REDACTED,
                "AWS_SECRET_ACCESS_KEY": REDACTED,
                "id_token_hint": REDACTED,
                "tokens": REDACTED,
                "signature": REDACTED,
                "sig": REDACTED,
                "pin": REDACTED,
                "otp": REDACTED,
                "session": REDACTED,
                "jwt": REDACTED,
                "assertion": REDACTED,
                "client_assertion": REDACTED,
                "code_verifier": REDACTED,
                "\uff30\uff21\uff33\uff33\uff37\uff2f\uff32\uff24": REDACTED,
            }
        },
    ),
    Case(
        "key names that stay",
        {
            "parameters": {
                "key": "k",
                "cache_key": "c",
                "sort_key": "s",
                "session_state": "st",
                "pinned": True,
                "description": "basic",
                "kind": "Bearer",
            }
        },
        {
            "parameters": {
                "key": "k",
                "cache_key": "c",
                "sort_key": "s",
                "session_state": "st",
                "pinned": True,
                "description": "basic",
                "kind": "Bearer",
            }
        },
    ),
    Case(
        "authorization schemes in text",
        {
            "method": "call Basic Zm9vOmJhcg==",
            "user_id": "bearer u1-0123456",
            "status": "BEARER s3cr3t-token, retry",
            "parameters": {
                "header": "Authorization: Bearer abc.def-ghi",
                "lines": ["basic\tdXNlcjpwYXNz", "x (Bearer tok_12345678) y"],
                "prose": "the basic plan, a Bearer of news, Basic Subscription",
            },
        },
        {
            "method": f"call Basic {REDACTED}",
            "user_id": f"bearer {REDACTED}",
            "status": f"BEARER {REDACTED}, retry",
            "parameters": {
                "header": f"Authorization: Bearer {REDACTED}",
                "lines": [f"basic\t{REDACTED}", f"x (Bearer {REDACTED}) y"],
                "prose": "the basic plan, a Bearer of news, Basic Subscription",
            },
        },
    ),
    Case(
        "secrets in URLs and query strings",
        {
            "parameters": {
                "callback": "https://app.example/cb?code=abc&state=x",
                "target": "postgresql://u:PW@db.example/app",
                "empty_user": "redis://:PW@cache.example:6379/0",
                "redirect": "https://a.example/x?next=https://b.example/"
                "?access_token=T&id_token=I&ok=1",
                "form": "client_secret=s&grant_type=authorization_code",
                "extra": "/hook?x-signature=abc&n=1",
                "clean": "http://host.example:8080/p?q=1#top",
                "https://u:PW@key.example/": 1,
            },
            "status": "failed: postgresql://app:PW@h/db",
        },
        {
            "parameters": {
                "callback": f"https://app.example/cb?code={REDACTED}&state=x",
                "target": f"postgresql://u:{REDACTED}@db.example/app",
                "empty_user": f"redis://:{REDACTED}@cache.example:6379/0",
                "redirect": "https://a.example/x?next=https://b.example/"
                f"?access_token={REDACTED}&id_token={REDACTED}&ok=1",
                "form": f"client_secret={REDACTED}&grant_type=authorization_code",
                "extra": f"/hook?x-signature={REDACTED}&n=1",
                "clean": "http://host.example:8080/p?q=1#top",
                f"https://u:{REDACTED}@key.example/": 1,
            },
            "status": f"failed: postgresql://app:{REDACTED}@h/db",
        },
    ),
    Case(
        "secret pairs in free text",
        {
            "parameters": {
                "env": "PASSWORD=hunter2 HOME=/root DATABASE_URL=postgres://x",
                "quoted": 'api_key = "a b c" next',
                "open_quote": "token='abc def",
                "empty": 'password="" x',
                "plain": "a=b and c = d, zip_code=12345",
                "after_newline": "x\ncode=abc",
                "fullwidth": "\uff30\uff21\uff33\uff33\uff37\uff2f\uff32\uff24=x",
            },
            "user_id": "user sig=abc",
        },
        {
            "parameters": {
                "env": f"PASSWORD={REDACTED} HOME=/root DATABASE_URL={REDACTED}",
                "quoted": f'api_key = "{REDACTED}" next',
                "open_quote": f"token='{REDACTED}",
                "empty": 'password="" x',
                "plain": "a=b and c = d, zip_code=12345",
                "after_newline": f"x\ncode={REDACTED}",
                "fullwidth": "\uff30\uff21\uff33\uff33\uff37\uff2f\uff32\uff24="
                + REDACTED,
            },
            "user_id": f"user sig={REDACTED}",
        },
    ),
    Case(
        "secret pairs in lists",
        {
            "parameters": {
                "headers": [
                    ["Authorization", "Bearer x"],
                    ("Cookie", "sid=1"),
                    ["Accept", "json"],
                    ["token", {"n": 1}],
                ],
                "three": ["password", "a", "b"],
                "pair_of_lists": [["password"], "a"],
            }
        },
        {
            "parameters": {
                "headers": [
                    ["Authorization", REDACTED],
                    ["Cookie", REDACTED],
                    ["Accept", "json"],
                    ["token", REDACTED],
                ],
                "three": ["password", "a", "b"],
                "pair_of_lists": [["password"], "a"],
            }
        },
    ),
    Case(
        "long text column with a URL password",
        {"user_id": "postgresql://user:" + "p" * 300},
        {"user_id": f"postgresql://user:{REDACTED}…[cut from 318 chars]"},
    ),
    Case(
        "str subclasses and enums",
        {
            "parameters": {
                Name("Password"): "p",
                "name": Name("n"),
                "color": Color.RED,
                "level": Level.HIGH,
            }
        },
        {
            "parameters": {
                "Password": REDACTED,
                "name": "n",
                "color": "red",
                "level": 3,
            }
        },
    ),
    Case(
        "library token in a value",
        {"parameters": {"note": f"use {TOKEN} here"}, "status": TOKEN},
        {"parameters": {"note": f"use {REDACTED} here"}, "status": REDACTED},
    ),
    Case(
        "code and state tokens in text",
        {
            "parameters": {"note": f"code {CODE_TOKEN} state {STATE_TOKEN}"},
            "status": CODE_TOKEN,
            "method": STATE_TOKEN,
        },
        {
            "parameters": {"note": f"code {REDACTED} state {REDACTED}"},
            "status": REDACTED,
            "method": REDACTED,
        },
    ),
    Case(
        "NUL characters",
        {"method": "tools\x00call", "parameters": {"k\x00": "v\x00w"}},
        {"method": "tools\ufffdcall", "parameters": {"k\ufffd": "v\ufffdw"}},
    ),
    Case(
        "emoji",
        {"method": "tools/😀", "parameters": {"e": "😀 café ∑"}, "user_id": "ü😀"},
        {"method": "tools/😀", "parameters": {"e": "😀 café ∑"}, "user_id": "ü😀"},
    ),
    Case(
        "surrogates",
        {
            "parameters": {"pair": "\ud83d\ude00", "lone": "x\udc00y"},
            "status": "s\ud800",
        },
        {"parameters": {"pair": "😀", "lone": "x\ufffdy"}, "status": "s\ufffd"},
    ),
    Case(
        "bytes",
        {"parameters": {"b": b"\x00\x01\xff", "m": memoryview(b"abcd")}},
        {
            "parameters": {
                "b": "[unsupported: bytes, 3 bytes]",
                "m": "[unsupported: memoryview, 4 bytes]",
            }
        },
    ),
    Case(
        "NaN and infinities",
        {"parameters": [math.nan, math.inf, -math.inf, Decimal("NaN"), 1.5]},
        {"parameters": ["NaN", "Infinity", "-Infinity", "NaN", 1.5]},
    ),
    Case(
        "sets, tuples and standard types",
        {
            "parameters": {
                "set": {3, 1, 2},
                "tuple": (1, "a"),
                "when": AWARE,
                "day": dt.date(2026, 1, 2),
                "id": uuid.UUID(int=1),
                "price": Decimal("1.50"),
                "wait": dt.timedelta(seconds=1.5),
            }
        },
        {
            "parameters": {
                "set": [1, 2, 3],
                "tuple": [1, "a"],
                "when": "2026-05-06T07:08:09+02:00",
                "day": "2026-01-02",
                "id": "00000000-0000-0000-0000-000000000001",
                "price": "1.50",
                "wait": 1.5,
            }
        },
    ),
    Case(
        "objects",
        {"parameters": {"obj": Opaque(), "fn": len, "big": 2**2000}},
        {
            "parameters": {
                "obj": "[unsupported: test_request_log.Opaque]",
                "fn": "[unsupported: builtin_function_or_method]",
                "big": "[unsupported: int of 2001 bits]",
            }
        },
    ),
    Case(
        "circular reference",
        {"parameters": circular()},
        {"parameters": {"name": "loop", "self": "[circular]"}},
    ),
    Case(
        "keys that are not strings",
        {"parameters": {1: "a", None: "b", False: "c", 2.5: "d", (1, 2): "e"}},
        {
            "parameters": {
                "1": "a",
                "null": "b",
                "false": "c",
                "2.5": "d",
                "[unsupported: tuple]": "e",
            }
        },
    ),
    Case(
        "depth limit",
        {"parameters": nested(30)},
        {"parameters": wrap_in_lists("[nested deeper than 20]", 20)},
    ),
    Case(
        "scalar parameters",
        {"parameters": "plain text"},
        {"parameters": "plain text"},
    ),
    Case(
        "long text columns",
        {
            "method": "m" * 150,
            "status": "s" * 60,
            "user_id": "u" * 300,
        },
        {
            "method": "m" * (METHOD_MAX_LENGTH - 21) + "…[cut from 150 chars]",
            "status": "s" * (STATUS_MAX_LENGTH - 20) + "…[cut from 60 chars]",
            "user_id": "u" * (USER_ID_MAX_LENGTH - 21) + "…[cut from 300 chars]",
        },
    ),
    Case(
        "text columns that are not text",
        {"method": None, "user_id": 42, "status": ["a", 1]},
        {"method": "", "user_id": "42", "status": '["a",1]'},
    ),
    Case(
        "numbers out of range",
        {"response_size": -5, "duration_ms": 2**40},
        {"response_size": None, "duration_ms": INT4_MAX},
    ),
    Case(
        "numbers that are not whole",
        {"response_size": 12.6, "duration_ms": dt.timedelta(milliseconds=1500)},
        {"response_size": 13, "duration_ms": 1500},
    ),
    Case(
        "numbers that are not numbers",
        {"response_size": "12", "duration_ms": math.nan},
        {"response_size": None, "duration_ms": None},
    ),
    Case(
        "numbers of other types",
        {"response_size": True, "duration_ms": Decimal("2.5")},
        {"response_size": None, "duration_ms": 2},
    ),
    Case(
        "aware created_at",
        {"created_at": AWARE},
        {"created_at": AWARE},
    ),
    Case(
        "naive created_at is read as local time",
        {"created_at": NAIVE},
        {"created_at": NAIVE.astimezone(dt.UTC)},
    ),
]

COLUMN_INDEX = {
    "user_id": 0,
    "method": 1,
    "parameters": 2,
    "response_size": 3,
    "duration_ms": 4,
    "status": 5,
    "created_at": 6,
}


def test_sanitizing_cases_are_stored(db: ScratchDatabase) -> None:
    cases = [
        *CASES,
        Case("created_at that is not a datetime", {"created_at": "yesterday"}, {}),
    ]
    before = dt.datetime.now(dt.UTC)
    with RequestLog(
        target_of(db), db.settings, extra_secret_keys=["X-Signature"], **FAST
    ) as writer:
        for case in cases:
            kwargs = dict(case.kwargs)
            method = kwargs.pop("method", "tools/call")
            writer.log(method, **kwargs)
    after = dt.datetime.now(dt.UTC)

    rows = stored_rows(db)
    assert len(rows) == len(cases)
    for case, row in zip(cases, rows, strict=True):
        for column, expected in case.expected.items():
            assert row[COLUMN_INDEX[column]] == expected, f"{case.name}: {column}"
        if "created_at" not in case.expected:
            assert before <= row[6] <= after, case.name
    assert writer.stats().dropped == {}


@pytest.mark.parametrize("char", ["x", "é"])
def test_ten_megabyte_parameter_is_cut(db: ScratchDatabase, char: str) -> None:
    blob = char * (TEN_MB // len(char.encode()))
    limit = 4096
    with RequestLog(
        target_of(db), db.settings, max_parameters_bytes=limit, **FAST
    ) as writer:
        began = time.perf_counter()
        writer.log("tools/call", parameters={"name": "upload", "blob": blob})
        cost = time.perf_counter() - began

    parameters = stored_rows(db)[0][2]
    assert parameters["[truncated]"] is True
    # Compact JSON: {"name":"upload","blob":"..."} is 27 bytes around the blob.
    assert TEN_MB + 27 <= parameters["original_bytes"] <= TEN_MB + 40
    assert parameters["preview"].startswith('{"name":"upload","blob":"' + char * 4)
    compact = json_bytes(parameters)
    assert limit - 16 <= compact <= limit
    # Only the kept part is converted, so the call costs far less than
    # copying 10 MB would.
    assert cost < 0.2


@pytest.mark.parametrize(
    "parameters",
    [
        {f"key-{index}": index for index in range(1_000_000)},
        {"ids": set(range(1_000_000))},
    ],
    ids=["dict", "set"],
)
def test_million_items_are_cut_quickly(
    db: ScratchDatabase, parameters: dict[str, Any]
) -> None:
    with RequestLog(target_of(db), db.settings, **FAST) as writer:
        began = time.perf_counter()
        writer.log("tools/call", parameters=parameters)
        cost = time.perf_counter() - began

    stored = stored_rows(db)[0][2]
    assert stored["[truncated]"] is True
    # Each item not visited counts as at least four bytes in an object and
    # one in an array.
    assert stored["original_bytes_at_least"] >= 1_000_000
    first_key = next(iter(parameters))
    assert stored["preview"].startswith(f'{{"{first_key}":')
    # Walking every item took over a second; the part that fits takes a few
    # milliseconds. The bound leaves room for a loaded machine.
    assert cost < 0.3


def test_cut_text_hides_url_password(db: ScratchDatabase) -> None:
    # The @ after the password lies beyond the part that is kept.
    url = "postgresql://app:" + "p" * 20_000 + "@db.example/app"
    with RequestLog(target_of(db), db.settings, **FAST) as writer:
        writer.log("tools/call", parameters={"url": url})

    stored = stored_rows(db)[0][2]
    assert stored["[truncated]"] is True
    assert stored["preview"].startswith('{"url":"postgresql://app:[REDACTED]')
    assert "pppp" not in stored["preview"]


def test_parameters_with_many_values_are_cut(db: ScratchDatabase) -> None:
    items = [f"item-{index}-é" for index in range(300_000)]
    with RequestLog(target_of(db), db.settings, **FAST) as writer:
        writer.log("tools/call", parameters={"items": items})

    parameters = stored_rows(db)[0][2]
    assert parameters["[truncated]"] is True
    # Counting stops after 10,000 values, so only a lower bound is known.
    assert "original_bytes" not in parameters
    assert parameters["original_bytes_at_least"] > 100_000
    assert parameters["preview"].startswith('{"items":["item-0-é","item-1-é"')


def json_bytes(value: Any) -> int:
    return len(
        json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    )


# Rejected rows, full queues, log messages.


def test_rejected_rows_are_isolated(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    with db.connect() as conn:
        conn.execute(
            "ALTER TABLE request_logs ADD CONSTRAINT test_reject "
            "CHECK (method <> 'reject-me')"
        )
        conn.commit()
    caplog.set_level(logging.DEBUG, logger="mcp_authdb.store.request_log")
    bad = {0, 50, 99}

    with RequestLog(target_of(db), db.settings, batch_size=100, **FAST) as writer:
        for index in range(100):
            writer.log(
                "reject-me" if index in bad else "tools/call",
                user_id="user-7",
                parameters={"i": index, "password": "hunter2", "note": "private-note"},
            )
        writer.log("tools/call", parameters={"i": 100})

    stored = [row[2]["i"] for row in stored_rows(db)]
    assert stored == [index for index in range(101) if index not in bad]
    stats = writer.stats()
    assert stats.dropped == {DROP_REJECTED: 3}
    assert stats.written == 98
    check_invariant(stats)

    rejected = [
        r for r in caplog.records if r.__dict__.get("action") == "request_log.rejected"
    ]
    assert len(rejected) == 2
    assert "23514" in rejected[0].getMessage()
    assert "'reject-me'" in rejected[0].getMessage()
    assert "user-7" in rejected[0].getMessage()
    assert "2 more" in rejected[1].getMessage()
    assert "hunter2" not in caplog.text
    assert "private-note" not in caplog.text


def test_full_queue_drops_and_counts(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcp_authdb.store.request_log")
    writer = RequestLog(
        target_of(db), db.settings, batch_size=10, max_queue_rows=10, **FAST
    )
    for index in range(25):
        writer.log("tools/call", parameters={"i": index})

    stats = writer.stats()
    assert stats.queued == 10
    assert stats.dropped == {DROP_QUEUE_FULL: 15}
    assert stats.queue_depth == 10

    writer.open()
    final = writer.close()

    assert [row[2]["i"] for row in stored_rows(db)] == list(range(10))
    assert final.written == 10
    assert final.dropped == {DROP_QUEUE_FULL: 15}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("queue is full" in message for message in messages) == 1
    assert sum("dropped 14 more rows" in message for message in messages) == 1


def test_queue_byte_limit_drops(db: ScratchDatabase) -> None:
    writer = RequestLog(
        target_of(db), db.settings, max_queue_bytes=5_000, batch_size=10, **FAST
    )
    for index in range(10):
        writer.log("tools/call", parameters={"i": index, "text": "a" * 1000})

    stats = writer.stats()
    assert 1 <= stats.queued <= 4
    assert stats.dropped == {DROP_QUEUE_FULL: 10 - stats.queued}
    writer.open()
    writer.close()
    assert count_rows(db) == stats.queued


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 that accepts connections and never responds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(10)
    try:
        yield listener
    finally:
        listener.close()


def silent_target(listener: socket.socket) -> tuple[ConnectionTarget, Settings]:
    port = listener.getsockname()[1]
    settings = Settings(ssl_mode="disable")
    url = f"postgresql://app@127.0.0.1:{port}/logs?connect_timeout=3"
    return resolve_target(url, settings), settings


def test_log_returns_while_connect_hangs(silent_server: socket.socket) -> None:
    target, settings = silent_target(silent_server)
    writer = RequestLog(target, settings, batch_size=1, max_delay_s=0.01)
    writer.open()
    writer.log("tools/call")
    # Once the listener has the connection, the writer thread waits inside
    # connect for a response that never comes.
    accepted, _ = silent_server.accept()
    try:
        durations = []
        for index in range(2000):
            began = time.perf_counter()
            writer.log("tools/call", parameters={"i": index})
            durations.append(time.perf_counter() - began)

        assert statistics.median(durations) < 0.001
        # A blocked call would wait for connect_timeout, 3 s.
        assert max(durations) < 0.5
        stats = writer.stats()
        assert stats.queued == 2001
        assert stats.written == 0

        began = time.perf_counter()
        stats = writer.close(timeout_s=0.3)
        assert time.perf_counter() - began < 1.5
        # The row in the hanging attempt is settled when the attempt ends.
        assert stats.dropped == {DROP_CLOSE_TIMEOUT: 2000}
        assert stats.queue_depth == 1
    finally:
        accepted.close()
        # The attempt now fails at once, and the thread ends.
        writer.close(timeout_s=5)

    final = writer.stats()
    assert final.dropped == {DROP_CLOSE_TIMEOUT: 2001}
    assert final.queue_depth == 0
    check_invariant(final)


def test_async_log_returns_while_connect_hangs(
    silent_server: socket.socket,
) -> None:
    target, settings = silent_target(silent_server)

    async def scenario() -> tuple[list[float], RequestLogStats, float]:
        writer = AsyncRequestLog(target, settings, batch_size=1, max_delay_s=0.01)
        await writer.open()
        writer.log("tools/call")
        accepted, _ = await asyncio.to_thread(silent_server.accept)
        try:
            durations = []
            for index in range(2000):
                began = time.perf_counter()
                writer.log("tools/call", parameters={"i": index})
                durations.append(time.perf_counter() - began)
                if index % 100 == 0:
                    await asyncio.sleep(0)
            began = time.perf_counter()
            stats = await writer.aclose(timeout_s=0.3)
            return durations, stats, time.perf_counter() - began
        finally:
            accepted.close()

    durations, stats, closing = asyncio.run(scenario())

    assert statistics.median(durations) < 0.001
    assert max(durations) < 0.5
    assert closing < 1.5
    # The task was cancelled in its connection attempt, and every row counted.
    assert stats.dropped == {DROP_CLOSE_TIMEOUT: 2001}
    assert stats.queue_depth == 0


def test_failure_warnings_are_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mcp_authdb.store.request_log")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now, so every attempt is refused at once.
    password = "pw-Very-Secret-42"
    url = f"postgresql://app:{password}@127.0.0.1:{port}/logs"
    settings = Settings(ssl_mode="disable")
    writer = RequestLog(
        resolve_target(url, settings),
        settings,
        min_backoff_s=0.01,
        max_backoff_s=0.02,
        report_interval_s=0.25,
        max_delay_s=0.01,
    )
    writer.open()
    writer.log("tools/call", parameters={"password": "hunter2", "q": "private-query"})
    time.sleep(1.2)
    stats = writer.close(timeout_s=0.2)

    assert stats.failed_attempts >= 10
    assert stats.dropped == {DROP_CLOSE_TIMEOUT: 1}
    failures = [
        r
        for r in caplog.records
        if r.__dict__.get("action") == "request_log.write_failed"
    ]
    # The first failure, then one summary per 0.25 s and a final one.
    assert 2 <= len(failures) <= 7
    assert "Connection refused" in failures[0].getMessage()
    assert "more failed attempts" in failures[-1].getMessage()
    assert "close timeout" in caplog.text
    assert password not in caplog.text
    assert "hunter2" not in caplog.text
    assert "private-query" not in caplog.text


# A connection lost around COMMIT: every row is stored exactly once.


def losing_connection_class(faults: list[str]) -> type[psycopg.Connection[Any]]:
    """Return a connection class that breaks at its next COMMITs.

    Each COMMIT takes the next fault: "after" sends the COMMIT and loses the
    connection before reading the result, "before" loses it without sending.
    """

    class LosingConnection(psycopg.Connection[Any]):
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            if query == "COMMIT" and faults:
                fault = faults.pop(0)
                if fault == "after":
                    super().execute(query, *args, **kwargs)
                self.close()
                raise psycopg.OperationalError("connection lost (test fault)")
            return super().execute(query, *args, **kwargs)

    return LosingConnection


def losing_async_connection_class(
    faults: list[str],
) -> type[psycopg.AsyncConnection[Any]]:
    """The asyncio counterpart of :func:`losing_connection_class`."""

    class LosingAsyncConnection(psycopg.AsyncConnection[Any]):
        async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            if query == "COMMIT" and faults:
                fault = faults.pop(0)
                if fault == "after":
                    await super().execute(query, *args, **kwargs)
                await self.close()
                raise psycopg.OperationalError("connection lost (test fault)")
            return await super().execute(query, *args, **kwargs)

    return LosingAsyncConnection


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        ("after", "committed before the connection was lost"),
        ("before", "did not commit"),
    ],
)
def test_lost_commit_stores_rows_once(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture, fault: str, outcome: str
) -> None:
    caplog.set_level(logging.INFO, logger="mcp_authdb.store.request_log")
    faults = [fault]

    class FaultyRequestLog(RequestLog):
        _connection_class = losing_connection_class(faults)

    with FaultyRequestLog(target_of(db), db.settings, batch_size=10, **FAST) as writer:
        for index in range(25):
            writer.log("tools/call", parameters={"i": index})

    assert faults == []
    assert [row[2]["i"] for row in stored_rows(db)] == list(range(25))
    stats = writer.stats()
    assert stats.written == 25
    assert stats.failed_attempts >= 1
    assert "while committing 10 request log rows" in caplog.text
    assert outcome in caplog.text


def test_async_lost_commit_stores_rows_once(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcp_authdb.store.request_log")
    faults = ["after", "before"]

    class FaultyAsyncRequestLog(AsyncRequestLog):
        _connection_class = losing_async_connection_class(faults)

    async def scenario() -> RequestLogStats:
        async with FaultyAsyncRequestLog(
            target_of(db), db.settings, batch_size=10, **FAST
        ) as writer:
            for index in range(25):
                writer.log("tools/call", parameters={"i": index})
        return writer.stats()

    stats = asyncio.run(scenario())

    assert faults == []
    assert [row[2]["i"] for row in stored_rows(db)] == list(range(25))
    assert stats.written == 25
    assert "committed before the connection was lost" in caplog.text
    assert "did not commit" in caplog.text


# Options.


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("batch_size", 0),
        ("batch_size", 1.5),
        ("max_delay_s", 0),
        ("max_delay_s", "1"),
        ("max_queue_rows", 10),
        ("max_queue_bytes", 0),
        ("max_backoff_s", 0.01),
        ("report_interval_s", -1),
        ("max_parameters_bytes", 10),
        ("max_depth", 0),
        ("extra_secret_keys", "token"),
    ],
)
def test_invalid_option_is_rejected(
    db: ScratchDatabase, option: str, value: object
) -> None:
    options: dict[str, Any] = {option: value}
    if option == "max_queue_rows":
        options["batch_size"] = 100

    with pytest.raises(InvalidValueError, match=option):
        RequestLog(target_of(db), db.settings, **options)
