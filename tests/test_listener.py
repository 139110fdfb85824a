"""Session listeners against real PostgreSQL: notifications, losses, recovery.

Connection losses are real. Either the listener's backend is terminated with
pg_terminate_backend, or a private server restarts, or the traffic goes
through a TCP proxy on 127.0.0.1. The proxy can freeze a connection, as a
path that dies without closing the socket, or reject new ones, as during an
outage. Async
listeners run in ``asyncio.run`` inside plain tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mcp_authdb.db import ConnectionTarget, Settings, resolve_target
from mcp_authdb.errors import InvalidValueError
from mcp_authdb.store.cache import TokenCache
from mcp_authdb.store.listener import (
    CHANNEL,
    LISTENER_APPLICATION_NAME,
    AsyncSessionListener,
    SessionListener,
)
from mcp_authdb.store.sessions import Session, insert_session
from pgcluster import start_cluster

from conftest import ScratchDatabase

pytest_plugins = ["pgcluster"]

LISTENER_LOGGER = "mcp_authdb.store.listener"
# Bounds for waits that normally end within milliseconds.
WAIT_S = 10.0
IN_AN_HOUR = timedelta(hours=1)


def make_session(user_id: str, expires_at: datetime) -> Session:
    return Session(
        session_id=1,
        family_id=None,
        user_id=user_id,
        scopes=(),
        subscription_level="free",
        expires_at=expires_at,
        refresh_expires_at=expires_at,
        created_at=expires_at - IN_AN_HOUR,
        last_used_at=None,
    )


def fill(cache: TokenCache, entries: dict[str, str]) -> None:
    """Cache a session of user ``entries[key]`` under each ``key``."""
    now = datetime.now(UTC)
    for key, user_id in entries.items():
        cache.put(key, make_session(user_id, now + IN_AN_HOUR), now)
        assert cache.get(key) is not None


def cached_keys(cache: TokenCache, keys: list[str]) -> list[str]:
    return [key for key in keys if cache.get(key) is not None]


def wait_until(condition: Callable[[], bool], description: str) -> float:
    """Poll ``condition`` until true; return the seconds it took."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > WAIT_S:
            raise AssertionError(f"timed out after {WAIT_S} s: {description}")
        time.sleep(0.002)
    return time.monotonic() - began


async def wait_until_async(condition: Callable[[], bool], description: str) -> float:
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > WAIT_S:
            raise AssertionError(f"timed out after {WAIT_S} s: {description}")
        await asyncio.sleep(0.002)
    return time.monotonic() - began


def target_of(db: ScratchDatabase) -> ConnectionTarget:
    return resolve_target(db.url, db.settings)


def notify(db: ScratchDatabase, payload: str) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def terminate(db: ScratchDatabase, pid: int | None) -> None:
    assert pid is not None
    with db.connect(autocommit=True) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    assert row == (True,)


def insert_live_session(
    conn: psycopg.Connection[Any], user_id: str, number: int
) -> None:
    insert_session(
        conn,
        user_id=user_id,
        access_token_hash=f"access-{user_id}-{number}",
        refresh_token_hash=f"refresh-{user_id}-{number}",
        expires_at=datetime.now(UTC) + IN_AN_HOUR,
    )


class LoopbackProxy:
    """A TCP proxy on 127.0.0.1 to the test server, which fails on demand.

    :meth:`freeze` stops forwarding on the open connections but keeps their
    sockets open, as a path that died without a reset. While ``reject_new``
    is set, new connections are closed at once, as during an outage.
    :meth:`drop` closes the open connections.
    """

    def __init__(self, upstream_family: int, upstream_address: Any) -> None:
        self.upstream_family = upstream_family
        self.upstream_address = upstream_address
        self.reject_new = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def freeze(self) -> None:
        with self._lock:
            for link in self._links:
                link.frozen = True

    def drop(self) -> None:
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self.drop()
        self._acceptor.join(5)

    def _accept(self) -> None:
        self._listener.settimeout(0.05)
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.reject_new:
                client.close()
                continue
            upstream = socket.socket(self.upstream_family, socket.SOCK_STREAM)
            try:
                upstream.connect(self.upstream_address)
            except OSError:
                client.close()
                upstream.close()
                continue
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=link.pump, daemon=True).start()


class _Link:
    """One proxied connection, pumped in both directions by one thread."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.frozen = False
        self._closed = threading.Event()

    def pump(self) -> None:
        peers = {self.client: self.upstream, self.upstream: self.client}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                selector.register(sock, selectors.EVENT_READ)
            while not self._closed.is_set():
                if self.frozen:
                    time.sleep(0.01)
                    continue
                for key, _ in selector.select(timeout=0.05):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(65536)
                        if data:
                            peers[source].sendall(data)
                            continue
                    except OSError:
                        pass
                    self.close()
                    return

    def close(self) -> None:
        self._closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def proxy(db: ScratchDatabase) -> Iterator[LoopbackProxy]:
    """A proxy to the test server's Unix socket, or to its TCP address."""
    with db.connect(autocommit=True) as conn:
        host, port = conn.info.host, conn.info.port
    if host.startswith("/"):
        proxy = LoopbackProxy(socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
    else:
        proxy = LoopbackProxy(socket.AF_INET, (host, port))
    try:
        yield proxy
    finally:
        proxy.close()


def proxied_target(db: ScratchDatabase, proxy: LoopbackProxy) -> ConnectionTarget:
    """Return a target that reaches the test database through ``proxy``.

    SSL is off on this hop, so the server must accept the connection without
    SSL, as it does over its Unix socket.
    """
    params = conninfo_to_dict(db.url)
    params.pop("hostaddr", None)
    params.update(host="127.0.0.1", port=str(proxy.port), sslmode="disable")
    url = make_conninfo("", **params)
    settings = db.settings.replace(database_url=url, ssl_mode="disable")
    return resolve_target(url, settings)


def test_cache_inactive_until_listening(db: ScratchDatabase) -> None:
    cache: TokenCache = TokenCache()
    listener = SessionListener(target_of(db), cache)

    assert cache.active is False
    assert listener.listening is False
    with listener:
        assert listener.wait_listening(WAIT_S)
        assert cache.active is True
        assert listener.backend_pid is not None
    assert cache.active is False
    assert listener.listening is False


def test_notify_invalidates_only_that_user(db: ScratchDatabase) -> None:
    cache: TokenCache = TokenCache()
    keys = ["alice-1", "alice-2", "bob-1"]

    async def scenario() -> None:
        async with AsyncSessionListener(target_of(db), cache) as listener:
            assert await listener.wait_listening(WAIT_S)
            fill(cache, {"alice-1": "alice", "alice-2": "alice", "bob-1": "bob"})

            await asyncio.to_thread(notify, db, "alice")
            await wait_until_async(
                lambda: cache.get("alice-1") is None, "alice's invalidation"
            )

            assert cached_keys(cache, keys) == ["bob-1"]
            assert listener.stats().notifications == 1
            assert cache.stats().invalidated == 2

    asyncio.run(scenario())


def test_revoke_through_sql_invalidates(db: ScratchDatabase) -> None:
    cache: TokenCache = TokenCache()
    keys = ["alice-1", "bob-1"]
    with db.connect(autocommit=True) as conn, SessionListener(target_of(db), cache):
        insert_live_session(conn, "alice", 1)
        insert_live_session(conn, "bob", 1)
        wait_until(lambda: cache.active, "the listener")
        fill(cache, {"alice-1": "alice", "bob-1": "bob"})

        # Recording a use changes nothing that a cache holds: no notification.
        conn.execute("UPDATE user_sessions SET last_used_at = now()")
        conn.execute(
            "UPDATE user_sessions SET revoked_at = now() WHERE user_id = 'alice'"
        )
        wait_until(lambda: cache.get("alice-1") is None, "alice's invalidation")

        assert cached_keys(cache, keys) == ["bob-1"]
        assert cache.stats().invalidated == 1


def test_stamped_lookup_racing_revoke_dropped(db: ScratchDatabase) -> None:
    cache: TokenCache = TokenCache()
    listener = SessionListener(target_of(db), cache)
    with db.connect(autocommit=True) as conn, listener:
        insert_live_session(conn, "alice", 1)
        assert listener.wait_listening(WAIT_S)

        # The lookup reads the row before the revocation commits, and stores
        # its result only after the notification has arrived.
        stamp = cache.begin_lookup()
        row = conn.execute(
            "SELECT user_id, expires_at, now() FROM user_sessions"
        ).fetchone()
        assert row is not None
        conn.execute("UPDATE user_sessions SET revoked_at = now()")
        wait_until(lambda: listener.stats().notifications == 1, "the notification")

        cache.put("alice-1", make_session(row[0], row[1]), row[2], stamp=stamp)

        assert cache.get("alice-1") is None
        assert cache.stats().stale_puts == 1


def test_empty_payload_clears_cache(db: ScratchDatabase) -> None:
    cache: TokenCache = TokenCache()
    listener = SessionListener(target_of(db), cache)
    with listener:
        assert listener.wait_listening(WAIT_S)
        fill(cache, {"alice-1": "alice", "bob-1": "bob"})

        notify(db, "")
        wait_until(lambda: len(cache) == 0, "the cache to empty")

        assert cache.active is True


def test_listener_application_name(db: ScratchDatabase) -> None:
    cache: TokenCache = TokenCache()
    listener = SessionListener(target_of(db), cache)
    with listener, db.connect(autocommit=True) as conn:
        assert listener.wait_listening(WAIT_S)
        row = conn.execute(
            "SELECT application_name, query FROM pg_stat_activity WHERE pid = %s",
            (listener.backend_pid,),
        ).fetchone()

    assert row is not None
    assert row[0] == LISTENER_APPLICATION_NAME
    assert row[1] in (f"LISTEN {CHANNEL}", "SELECT 1")


def test_terminated_backend_async(db: ScratchDatabase) -> None:
    cache: TokenCache = TokenCache()

    async def scenario() -> None:
        async with AsyncSessionListener(target_of(db), cache) as listener:
            assert await listener.wait_listening(WAIT_S)
            first_pid = listener.backend_pid
            fill(cache, {"alice-1": "alice"})

            await asyncio.to_thread(terminate, db, first_pid)
            lost_s = await wait_until_async(
                lambda: not cache.active, "the cache to turn off"
            )
            assert len(cache) == 0
            assert cache.get("alice-1") is None
            assert lost_s < 1.0

            await wait_until_async(lambda: listener.listening, "the reconnection")
            assert cache.active is True
            assert listener.backend_pid not in (None, first_pid)
            stats = listener.stats()
            assert stats.connections == 2
            assert stats.losses == 1

            # The new connection listens: a notification still arrives.
            fill(cache, {"alice-2": "alice"})
            await asyncio.to_thread(notify, db, "alice")
            await wait_until_async(
                lambda: cache.get("alice-2") is None, "the invalidation"
            )

    asyncio.run(scenario())


def test_terminated_backend_thread(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LISTENER_LOGGER)
    cache = TokenCache()
    listener = SessionListener(target_of(db), cache)
    with listener:
        assert listener.wait_listening(WAIT_S)
        first_pid = listener.backend_pid
        fill(cache, {"alice-1": "alice"})

        terminate(db, first_pid)
        lost_s = wait_until(lambda: not cache.active, "the cache to turn off")
        assert len(cache) == 0
        assert lost_s < 1.0

        wait_until(lambda: listener.listening, "the reconnection")
        assert cache.active is True
        second_pid = listener.backend_pid
        assert second_pid not in (None, first_pid)

        # A second loss within a minute is logged at DEBUG only.
        terminate(db, second_pid)
        wait_until(lambda: listener.stats().connections == 3, "the reconnection")

    records = [record for record in caplog.records if record.name == LISTENER_LOGGER]
    losses = [r for r in records if "lost the session listener" in r.getMessage()]
    assert [r.levelno for r in losses] == [logging.WARNING, logging.DEBUG]
    recoveries = [r for r in records if "again" in r.getMessage()]
    assert [r.levelno for r in recoveries] == [logging.INFO, logging.DEBUG]
    assert sum(r.levelno >= logging.WARNING for r in records) == 1


def test_outage_revoke_not_served(db: ScratchDatabase, proxy: LoopbackProxy) -> None:
    cache: TokenCache = TokenCache()

    async def scenario() -> None:
        listener = AsyncSessionListener(
            proxied_target(db, proxy), cache, max_backoff_s=0.05
        )
        async with listener:
            assert await listener.wait_listening(WAIT_S)
            conn = await asyncio.to_thread(db.connect, autocommit=True)
            with conn:
                insert_live_session(conn, "alice", 1)
                fill(cache, {"alice-1": "alice"})
                # A lookup that began before the outage and ends after it.
                stamp = cache.begin_lookup()

                proxy.reject_new = True
                proxy.drop()
                await wait_until_async(lambda: not cache.active, "the outage")
                assert cache.get("alice-1") is None
                now = datetime.now(UTC)
                session = make_session("alice", now + IN_AN_HOUR)
                cache.put("alice-1", session, now)
                assert cache.get("alice-1") is None

                # The revocation commits while no connection listens.
                conn.execute("UPDATE user_sessions SET revoked_at = now()")
                await wait_until_async(
                    lambda: listener.stats().failed_attempts >= 2,
                    "failed reconnections",
                )
                assert cache.active is False

                proxy.reject_new = False
                assert await listener.wait_listening(WAIT_S)
                assert cache.active is True
                assert cache.get("alice-1") is None
                cache.put("alice-1", session, now, stamp=stamp)
                assert cache.get("alice-1") is None
                assert cache.stats().stale_puts == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("driver", ["async", "thread"])
def test_frozen_path_detected(
    db: ScratchDatabase, proxy: LoopbackProxy, driver: str
) -> None:
    cache: TokenCache = TokenCache()
    target = proxied_target(db, proxy)
    options = {"check_interval_s": 0.2, "check_timeout_s": 0.3}

    def scenario(backend_pid: Callable[[], int | None]) -> None:
        first_pid = backend_pid()
        fill(cache, {"alice-1": "alice"})

        proxy.freeze()
        # Noticed by the next check, within interval + timeout.
        lost_s = wait_until(lambda: not cache.active, "the frozen path's loss")
        assert len(cache) == 0
        assert lost_s < 0.2 + 0.3 + 0.5

        wait_until(lambda: cache.active, "the reconnection")
        assert backend_pid() not in (None, first_pid)

    if driver == "thread":
        with SessionListener(target, cache, **options) as listener:
            assert listener.wait_listening(WAIT_S)
            scenario(lambda: listener.backend_pid)
        return

    async def run_async() -> None:
        async with AsyncSessionListener(target, cache, **options) as listener:
            assert await listener.wait_listening(WAIT_S)
            # The checks run on this loop, so the scenario waits in a thread.
            await asyncio.to_thread(scenario, lambda: listener.backend_pid)

    asyncio.run(run_async())


def test_failures_logged_rate_limited(
    db: ScratchDatabase, proxy: LoopbackProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LISTENER_LOGGER)
    cache = TokenCache()
    proxy.reject_new = True
    listener = SessionListener(proxied_target(db, proxy), cache, max_backoff_s=0.02)

    with listener:
        wait_until(lambda: listener.stats().failed_attempts >= 10, "10 failures")
        proxy.reject_new = False
        assert listener.wait_listening(WAIT_S)

    records = [record for record in caplog.records if record.name == LISTENER_LOGGER]
    failures = [r for r in records if "could not connect" in r.getMessage()]
    assert failures[0].levelno == logging.WARNING
    assert len(failures) >= 10
    assert all(r.levelno == logging.DEBUG for r in failures[1:])
    assert sum(r.levelno >= logging.WARNING for r in records) == 1
    recoveries = [r for r in records if "failed attempts" in r.getMessage()]
    assert [r.levelno for r in recoveries] == [logging.INFO]


def test_backoff_grows_to_cap(db: ScratchDatabase, proxy: LoopbackProxy) -> None:
    cache: TokenCache = TokenCache()
    proxy.reject_new = True
    listener = SessionListener(proxied_target(db, proxy), cache, max_backoff_s=0.4)

    with listener:
        time.sleep(1.5)
        attempts = listener.stats().failed_attempts

    # Pauses of 0.05-0.1, 0.1-0.2, 0.2-0.4, then 0.2-0.4 s each: about 5 to
    # 10 attempts in 1.5 s, where no backoff would make hundreds.
    assert 3 <= attempts <= 10


def test_stop_prompt_and_idempotent(db: ScratchDatabase) -> None:
    cache: TokenCache = TokenCache()
    listener = SessionListener(target_of(db), cache, check_interval_s=60)
    listener.start()
    assert listener.wait_listening(WAIT_S)

    began = time.monotonic()
    listener.stop()
    stop_s = time.monotonic() - began
    listener.stop()

    assert stop_s < 1.0
    assert cache.active is False
    assert listener.listening is False


def test_stop_prompt_async(db: ScratchDatabase) -> None:
    cache: TokenCache = TokenCache()

    async def scenario() -> float:
        listener = AsyncSessionListener(target_of(db), cache, check_interval_s=60)
        await listener.start()
        assert await listener.wait_listening(WAIT_S)
        began = time.monotonic()
        await listener.stop()
        stop_s = time.monotonic() - began
        await listener.stop()
        return stop_s

    stop_s = asyncio.run(scenario())

    assert stop_s < 1.0
    assert cache.active is False


def test_stop_during_outage(db: ScratchDatabase, proxy: LoopbackProxy) -> None:
    cache: TokenCache = TokenCache()
    proxy.reject_new = True
    listener = SessionListener(proxied_target(db, proxy), cache, max_backoff_s=30)
    listener.start()
    wait_until(lambda: listener.stats().failed_attempts >= 3, "failed attempts")

    began = time.monotonic()
    listener.stop()

    assert time.monotonic() - began < 1.0
    assert cache.active is False


@pytest.mark.parametrize("driver", ["async", "thread"])
def test_stop_during_stuck_check(
    db: ScratchDatabase, proxy: LoopbackProxy, driver: str
) -> None:
    cache = TokenCache()
    target = proxied_target(db, proxy)
    # The check never gets its reply and would wait 60 s for it.
    options = {"check_interval_s": 0.05, "check_timeout_s": 60.0}

    if driver == "thread":
        listener = SessionListener(target, cache, **options)
        listener.start()
        assert listener.wait_listening(WAIT_S)
        proxy.freeze()
        time.sleep(0.2)
        began = time.monotonic()
        listener.stop()
        stop_s = time.monotonic() - began
    else:

        async def scenario() -> float:
            listener = AsyncSessionListener(target, cache, **options)
            await listener.start()
            assert await listener.wait_listening(WAIT_S)
            proxy.freeze()
            await asyncio.sleep(0.2)
            began = time.monotonic()
            await listener.stop()
            return time.monotonic() - began

        stop_s = asyncio.run(scenario())

    assert stop_s < 1.0
    assert cache.active is False


def test_unexpected_error_keeps_listening(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenOnce(TokenCache):
        """A cache whose first invalidation fails, as a bug would."""

        failed = False

        def invalidate_user(self, user_id: str) -> None:
            if not self.failed:
                self.failed = True
                raise RuntimeError("invalidation failed")
            super().invalidate_user(user_id)

    caplog.set_level(logging.WARNING, logger=LISTENER_LOGGER)
    cache = BrokenOnce()
    listener = SessionListener(target_of(db), cache)
    with listener:
        assert listener.wait_listening(WAIT_S)
        fill(cache, {"alice-1": "alice"})

        notify(db, "alice")
        wait_until(lambda: listener.stats().losses == 1, "the failure")
        assert cache.get("alice-1") is None

        wait_until(lambda: listener.listening, "the reconnection")
        fill(cache, {"alice-2": "alice"})
        notify(db, "alice")
        wait_until(lambda: cache.get("alice-2") is None, "the invalidation")

    errors = [
        record
        for record in caplog.records
        if record.name == LISTENER_LOGGER and record.levelno == logging.ERROR
    ]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "invalidation failed" in errors[0].getMessage()


def test_restart_after_stop(db: ScratchDatabase) -> None:
    cache: TokenCache = TokenCache()
    listener = SessionListener(target_of(db), cache)
    for _ in range(2):
        listener.start()
        assert listener.wait_listening(WAIT_S)
        assert cache.active is True
        listener.stop()
        assert cache.active is False

    assert listener.stats().connections == 2


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("check_interval_s", 0, "check_interval_s=0 is invalid"),
        ("check_timeout_s", -1.0, "check_timeout_s=-1.0 is invalid"),
        ("max_backoff_s", float("inf"), "max_backoff_s=inf is invalid"),
        ("check_interval_s", "5", "check_interval_s='5' is a str"),
    ],
)
def test_invalid_options(
    db: ScratchDatabase, option: str, value: object, message: str
) -> None:
    cache: TokenCache = TokenCache()
    options: dict[str, Any] = {option: value}

    with pytest.raises(InvalidValueError, match=message):
        SessionListener(target_of(db), cache, **options)
    with pytest.raises(InvalidValueError, match=message):
        AsyncSessionListener(target_of(db), cache, **options)


@pytest.mark.slow
def test_server_restart(cluster_folder: Path, pg_bin_dir: Path) -> None:
    tcp = start_cluster(cluster_folder / "listener-restart", pg_bin_dir)
    try:
        url = tcp.url(sslmode="disable")
        settings = Settings.from_env({"DATABASE_URL": url, "DB_SSL_MODE": "disable"})
        cache: TokenCache = TokenCache()
        listener = SessionListener(
            resolve_target(url, settings), cache, max_backoff_s=0.2
        )
        with listener:
            assert listener.wait_listening(WAIT_S)
            fill(cache, {"alice-1": "alice"})

            tcp.cluster.stop()
            wait_until(lambda: not cache.active, "the loss")
            assert len(cache) == 0

            tcp.cluster.start()
            wait_until(lambda: cache.active, "the reconnection")
            fill(cache, {"alice-2": "alice", "bob-1": "bob"})
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("SELECT pg_notify(%s, 'alice')", (CHANNEL,))
            wait_until(lambda: cache.get("alice-2") is None, "the invalidation")
            assert cache.get("bob-1") is not None
    finally:
        if tcp.cluster.is_running():
            tcp.cluster.stop()
