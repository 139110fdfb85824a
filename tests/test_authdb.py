"""AsyncAuthDB and AuthDB on real PostgreSQL: every part opened and wired together."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from mcp_authdb.errors import ConfigurationError
from mcp_authdb.store.authdb import AsyncAuthDB, AuthDB, AuthDBOptions

from conftest import ScratchDatabase

KEYS = "k1:" + "s" * 43


def environment(db: ScratchDatabase, **extra: str) -> dict[str, str]:
    env = db.env(MCP_AUTHDB_TOKEN_KEYS=KEYS, SESSION_CLEANUP_INTERVAL="0")
    env.update(extra)
    return env


def test_async_flow_validates_logs_and_closes(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with AsyncAuthDB.from_env(environment(db)) as authdb:
            assert authdb.listener is not None
            assert await authdb.listener.wait_listening(10)
            issued = await authdb.sessions.create("alice", scopes=["content:read"])

            first = await authdb.sessions.validate(issued.access_token)
            second = await authdb.sessions.validate(issued.access_token)
            assert first is not None
            assert second == first
            assert authdb.cache is not None
            assert authdb.cache.stats().hits == 1

            assert authdb.request_log is not None
            authdb.request_log.log("tools/call", user_id="alice", status="ok")

    asyncio.run(scenario())

    with db.connect() as conn:
        rows = conn.execute(
            "SELECT user_id, method, status FROM request_logs"
        ).fetchall()
    assert rows == [("alice", "tools/call", "ok")]


def test_revoke_in_one_process_reaches_another(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        env = environment(db)
        async with AsyncAuthDB.from_env(env) as first:
            assert first.listener is not None
            assert await first.listener.wait_listening(10)
            issued = await first.sessions.create("bob")
            assert await first.sessions.validate(issued.access_token) is not None

            with AuthDB.from_env(env) as second:
                assert second.sessions.revoke_user("bob") == 1

            deadline = time.monotonic() + 5
            while await first.sessions.validate(issued.access_token) is not None:
                assert time.monotonic() < deadline, "the revocation never arrived"
                await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_parts_can_be_turned_off(db: ScratchDatabase) -> None:
    env = environment(db, MCP_AUTHDB_TOKEN_CACHE_TTL="0", MCP_AUTHDB_REQUEST_LOG="0")

    with AuthDB.from_env(env) as authdb:
        issued = authdb.sessions.create("carol")
        assert authdb.sessions.validate(issued.access_token) is not None
        assert authdb.cache is None
        assert authdb.listener is None
        assert authdb.request_log is None
        assert authdb.scheduler is None


def test_scheduler_starts_when_periodic(db: ScratchDatabase) -> None:
    env = environment(db, SESSION_CLEANUP_INTERVAL="3600")

    with AuthDB.from_env(env) as authdb:
        assert authdb.scheduler is not None
        assert authdb.scheduler.stats.running is False


def test_missing_keys_stop_before_connecting(db: ScratchDatabase) -> None:
    env = environment(db)
    del env["MCP_AUTHDB_TOKEN_KEYS"]

    with pytest.raises(ConfigurationError, match="MCP_AUTHDB_TOKEN_KEYS"):
        AuthDB.from_env(env)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MCP_AUTHDB_TOKEN_CACHE_TTL", "-1"),
        ("MCP_AUTHDB_TOKEN_CACHE_TTL", "5000"),
        ("MCP_AUTHDB_REFRESH_GRACE_MS", "1.5"),
        ("MCP_AUTHDB_REPLAY_WINDOW", "0"),
        ("MCP_AUTHDB_REQUEST_LOG", "maybe"),
        ("MCP_AUTHDB_REQUEST_LOG_MAX_PARAMETERS_BYTES", "10"),
    ],
)
def test_invalid_option_names_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        AuthDBOptions.from_env({name: value})

    assert name in str(caught.value)
    assert repr(value) in str(caught.value)


def test_options_from_env() -> None:
    options = AuthDBOptions.from_env(
        {
            "MCP_AUTHDB_TOKEN_CACHE_TTL": "2",
            "MCP_AUTHDB_REFRESH_GRACE_MS": "1500",
            "MCP_AUTHDB_REPLAY_WINDOW": "600",
            "MCP_AUTHDB_REQUEST_LOG_SECRET_KEYS": "session_cookie, pin",
        }
    )

    assert options.cache_ttl == timedelta(seconds=2)
    assert options.refresh_grace == timedelta(milliseconds=1500)
    assert options.replay_window == timedelta(minutes=10)
    assert options.secret_keys == ("session_cookie", "pin")
    assert options.request_log is True


def test_truncate_empties_other_caches(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        env = environment(db, MCP_AUTHDB_TOKEN_CACHE_TTL="600")
        async with AsyncAuthDB.from_env(env) as authdb:
            assert authdb.listener is not None
            assert await authdb.listener.wait_listening(10)
            issued = await authdb.sessions.create("dave")
            assert await authdb.sessions.validate(issued.access_token) is not None

            with db.connect(autocommit=True) as conn:
                conn.execute("TRUNCATE user_sessions")

            deadline = time.monotonic() + 5
            while await authdb.sessions.validate(issued.access_token) is not None:
                assert time.monotonic() < deadline, "the cache kept the session"
                await asyncio.sleep(0.01)

    asyncio.run(scenario())
