"""Invalidating token caches across processes through LISTEN/NOTIFY.

A trigger on ``user_sessions`` sends a notification on the channel
``mcp_authdb_sessions`` when a session is revoked, its expiry is shortened,
its level, scope, user or access token hash changes, or a live session is
deleted. The payload is the row's ``user_id``, and PostgreSQL delivers it
when the transaction commits. A listener keeps one dedicated connection,
outside the pool, that runs ``LISTEN mcp_authdb_sessions``, and calls
:meth:`TokenCache.invalidate_user` for each notification. An empty payload,
which the trigger never sends, empties the whole cache, so an operator can
flush every process's cache with ``NOTIFY mcp_authdb_sessions``.

Notifications sent while no connection listens are lost. So the cache is off
whenever the listener is not listening:

- On a lost connection the cache is emptied and made inactive at once, a
  warning is logged, and the listener reconnects: at once after a connection
  that lasted, then with exponential backoff and jitter up to
  ``max_backoff_s``. Failures are logged at WARNING at most once a minute,
  and at DEBUG in between. An error that is not a database or network
  error, which means a bug, is logged at ERROR each time.
- Once ``LISTEN`` has succeeded again, the cache is emptied once more, which
  also drops the results of lookups stamped before, and made active.
- A path that dies without closing the socket (a half-open TCP connection, a
  frozen server) is noticed by a ``SELECT 1`` every ``check_interval_s``
  seconds: when its reply takes longer than ``check_timeout_s``, the listener
  shuts the socket down and treats the connection as lost.

:class:`AsyncSessionListener` runs as an asyncio task and
:class:`SessionListener` as a daemon thread. Both run the same state machine,
:class:`_ListenerCore`, and differ only in how they wait. Logs name the
server, the backend pid and user ids, never a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import socket
import threading
import time
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mcp_authdb.db.connection import (
    APPLICATION_NAME,
    ConnectionTarget,
    connect,
    connect_async,
)
from mcp_authdb.errors import AuthDBError, InvalidValueError
from mcp_authdb.store.cache import TokenCache

logger = logging.getLogger(__name__)

CHANNEL = "mcp_authdb_sessions"
# The application_name of the listener's connection, unless the URL sets one,
# so that pg_stat_activity distinguishes it from pooled connections.
LISTENER_APPLICATION_NAME = "mcp-authdb-listener"

DEFAULT_CHECK_INTERVAL_S = 5.0
DEFAULT_CHECK_TIMEOUT_S = 5.0
DEFAULT_MAX_BACKOFF_S = 5.0

# The pause after the first failed reconnection; it doubles after each
# further failure, up to max_backoff_s, and jitter takes 0 to 50 % off.
_FIRST_BACKOFF_S = 0.1
# After the loss of a connection that lasted this long, the listener
# reconnects at once. After a shorter one it keeps backing off, so that a
# server that accepts and then drops connections does not make it spin.
_STABLE_CONNECTION_S = 10.0
# Lost connections and failed attempts are logged at WARNING at most this
# often. The ones in between are logged at DEBUG and counted in the next one.
_FAILURE_LOG_INTERVAL_S = 60.0
# The maximum time AsyncSessionListener.stop waits for a query to end after the
# socket was shut down, before it cancels the task.
_STOP_GRACE_S = 1.0

_LISTEN_SQL = f"LISTEN {CHANNEL}"
_CHECK_SQL = "SELECT 1"


@dataclasses.dataclass(frozen=True)
class ListenerStats:
    """Counters of a listener since it was created.

    ``connections`` counts the times ``LISTEN`` succeeded, ``losses`` the
    listening connections lost, ``failed_attempts`` the connection attempts
    that failed before ``LISTEN`` succeeded, and ``notifications`` the
    notifications received.
    """

    connections: int
    losses: int
    failed_attempts: int
    notifications: int


class _SocketWaker:
    """A duplicate of a connection's socket descriptor, to wake its reader.

    Shutting the duplicate down shuts the socket down, so a thread or task
    blocked reading the connection gets end-of-file at once. The duplicate
    stays open until :meth:`close`, so it can never name another file that
    reused the number after libpq closed its own descriptor.
    """

    def __init__(self, fd: int) -> None:
        self._socket = socket.socket(fileno=os.dup(fd))
        self._lock = threading.Lock()
        self._closed = False
        self.reason: str | None = None

    def shutdown(self, reason: str) -> None:
        with self._lock:
            if self._closed or self.reason is not None:
                return
            self.reason = reason
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._socket.close()


class _ListenerCore:
    """The state machine of a listener, shared by the async and thread drivers.

    A driver reports what happened (:meth:`listen_established`,
    :meth:`notified`, :meth:`lost`) and this class updates the cache, logs,
    and returns how long to wait before the next attempt. Its methods are
    called from the driver's thread or task, and :meth:`begin`/:meth:`halt`
    also from the caller's, so the state is guarded by a lock.
    """

    def __init__(
        self,
        target: ConnectionTarget,
        cache: TokenCache,
        *,
        check_interval_s: float,
        check_timeout_s: float,
        max_backoff_s: float,
    ) -> None:
        self.target = _listener_target(target)
        self.cache = cache
        self.check_interval_s = _validate_seconds("check_interval_s", check_interval_s)
        self.check_timeout_s = _validate_seconds("check_timeout_s", check_timeout_s)
        self.max_backoff_s = _validate_seconds("max_backoff_s", max_backoff_s)
        self._lock = threading.Lock()
        self._random = random.Random()

        self.stopping = False
        self.listening = False
        self.backend_pid: int | None = None
        self._connected_at = 0.0
        # Failed attempts since the last stable connection, for the backoff.
        self._failures = 0
        # The current outage: when it began, the attempts that failed in it,
        # and whether its start was logged at WARNING.
        self._outage_began: float | None = None
        self._outage_failures = 0
        self._outage_logged = False
        # Rate limiting of failure messages: when the last WARNING was
        # logged, and how many failures were logged at DEBUG since.
        self._last_warning_at = -math.inf
        self._failures_not_warned = 0

        self._connections = 0
        self._losses = 0
        self._failed_attempts = 0
        self._notifications = 0

    def stats(self) -> ListenerStats:
        with self._lock:
            return ListenerStats(
                connections=self._connections,
                losses=self._losses,
                failed_attempts=self._failed_attempts,
                notifications=self._notifications,
            )

    def begin(self) -> None:
        """Prepare a start: the cache stays inactive until LISTEN succeeds."""
        with self._lock:
            self.stopping = False
            self.cache.active = False

    def halt(self) -> None:
        """Stop for good: empty the cache and make it inactive.

        Once this has run, :meth:`listen_established` no longer activates
        the cache, even if a connection attempt of the driver completes
        later.
        """
        with self._lock:
            self.stopping = True
            self.listening = False
            self.backend_pid = None
            self.cache.active = False

    def listen_established(self, backend_pid: int) -> bool:
        """Activate the cache after LISTEN succeeded; False when stopping."""
        with self._lock:
            if self.stopping:
                return False
            # The setter empties the cache, and so makes the stamps of
            # lookups that began before this point stale.
            self.cache.clear()
            self.cache.active = True
            self.listening = True
            self.backend_pid = backend_pid
            self._connected_at = time.monotonic()
            self._connections += 1

            if self._outage_began is None:
                logger.info(
                    "listening for session changes on %s (backend pid %d); the "
                    "token cache is active",
                    self.target.description,
                    backend_pid,
                    extra={"action": "listener.listening", "pid": backend_pid},
                )
            else:
                # An outage whose start was rate-limited to DEBUG ends there too.
                logger.log(
                    logging.INFO if self._outage_logged else logging.DEBUG,
                    "listening for session changes on %s again (backend pid %d) "
                    "after %.1f s and %d failed attempts; the token cache is "
                    "active again",
                    self.target.description,
                    backend_pid,
                    self._connected_at - self._outage_began,
                    self._outage_failures,
                    extra={"action": "listener.recovered", "pid": backend_pid},
                )
            self._outage_began = None
            self._outage_failures = 0
            self._outage_logged = False
            return True

    def notified(self, user_id: str) -> None:
        """Invalidate the cached sessions of ``user_id``, or all when empty."""
        if user_id:
            self.cache.invalidate_user(user_id)
            logger.debug(
                "session change for user %s: removed their cached tokens",
                user_id,
                extra={"action": "listener.invalidate", "user_id": user_id},
            )
        else:
            self.cache.clear()
            logger.info(
                "received an empty session change notification; emptied the "
                "token cache",
                extra={"action": "listener.clear"},
            )
        with self._lock:
            self._notifications += 1

    def lost(self, exc: BaseException, reason: str | None = None) -> float:
        """Deactivate the cache after a failure; return the pause before retrying.

        ``exc`` is what the connection or its attempt raised, and ``reason``
        replaces its message in the log when the driver shut the socket down
        itself.
        """
        with self._lock:
            was_listening = self.listening
            self.listening = False
            self.backend_pid = None
            self.cache.active = False
            if self.stopping:
                return 0.0

            now = time.monotonic()
            detail = reason or _first_line(exc)
            if was_listening:
                self._losses += 1
                if now - self._connected_at < _STABLE_CONNECTION_S:
                    self._failures += 1
                else:
                    self._failures = 0
                self._outage_began = now
                self._outage_logged = self._log_failure(
                    exc,
                    now,
                    "lost the session listener's connection to %s (%s); the "
                    "token cache is off until it reconnects",
                    self.target.description,
                    detail,
                )
            else:
                self._failed_attempts += 1
                self._failures += 1
                self._outage_failures += 1
                if self._outage_began is None:
                    self._outage_began = now
                logged = self._log_failure(
                    exc,
                    now,
                    "session listener could not connect to %s (%s): attempt %d, "
                    "%.1f s into the outage; retrying with backoff, and the "
                    "token cache is off meanwhile",
                    self.target.description,
                    detail,
                    self._outage_failures,
                    now - self._outage_began,
                )
                self._outage_logged = self._outage_logged or logged
            return self._backoff()

    def _log_failure(
        self, exc: BaseException, now: float, message: str, *args: object
    ) -> bool:
        """Log a failure, at WARNING at most once a minute; return whether it was.

        The failures in between are logged at DEBUG and counted in the next
        WARNING. An unexpected error is logged at ERROR, with its traceback.
        """
        warn = now - self._last_warning_at >= _FAILURE_LOG_INTERVAL_S
        if warn:
            if self._failures_not_warned:
                message += " (%d failures since the last warning)"
                args = (*args, self._failures_not_warned)
            self._last_warning_at = now
            self._failures_not_warned = 0
        else:
            self._failures_not_warned += 1

        # A failure that is not a database or network error is a bug: it gets
        # the traceback, and the listener still retries, because giving up
        # would leave the cache off for good.
        expected = isinstance(exc, psycopg.Error | AuthDBError | OSError)
        if not expected:
            level = logging.ERROR
        elif warn:
            level = logging.WARNING
        else:
            level = logging.DEBUG
        logger.log(
            level,
            message,
            *args,
            exc_info=None if expected else exc,
            extra={"action": "listener.failed"},
        )
        return warn

    def _backoff(self) -> float:
        if self._failures == 0:
            return 0.0
        exponent = min(self._failures - 1, 30)
        ceiling = min(self.max_backoff_s, _FIRST_BACKOFF_S * 2.0**exponent)
        return ceiling * self._random.uniform(0.5, 1.0)


class AsyncSessionListener:
    """Keeps a token cache in step with session changes, as an asyncio task.

    ``target`` is where to listen, usually the pool's ``database.target``.
    Use ``async with`` or :meth:`start` and :meth:`stop`. The cache is
    active only while the listener is listening; see the module docstring.
    Only one listener may drive a cache.
    """

    def __init__(
        self,
        target: ConnectionTarget,
        cache: TokenCache,
        *,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        check_timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
    ) -> None:
        self._core = _ListenerCore(
            target,
            cache,
            check_interval_s=check_interval_s,
            check_timeout_s=check_timeout_s,
            max_backoff_s=max_backoff_s,
        )
        self._task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._listening = asyncio.Event()
        self._waker: _SocketWaker | None = None
        # Whether the task is inside a query, where a cancellation makes
        # psycopg send a cancel request and wait for its outcome.
        self._in_query = False

    @property
    def listening(self) -> bool:
        """Whether LISTEN is in place and the cache is active."""
        return self._core.listening

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the listening connection, if any."""
        return self._core.backend_pid

    def stats(self) -> ListenerStats:
        """Return the listener's counters."""
        return self._core.stats()

    async def start(self) -> None:
        """Start listening in a task of the running loop; no-op when running.

        Returns at once. The cache becomes active when LISTEN has succeeded;
        :meth:`wait_listening` waits for that.
        """
        if self._task is not None and not self._task.done():
            return
        self._core.begin()
        # New events, because an event binds to the loop that first waits on it.
        self._stop_requested = asyncio.Event()
        self._listening = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="mcp-authdb-listener")

    async def stop(self) -> None:
        """Stop listening and close the connection; idempotent.

        The cache is inactive and empty when this returns.
        """
        self._core.halt()
        self._stop_requested.set()
        task, self._task = self._task, None
        if task is None or task.done():
            return

        waker = self._waker
        if waker is not None:
            waker.shutdown("the listener is stopping")
        if self._in_query:
            # The shut-down socket ends the query; cancelling it instead would
            # send a cancel request first.
            await asyncio.wait({task}, timeout=_STOP_GRACE_S)
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "the session listener task failed",
                exc_info=task.exception(),
                extra={"action": "listener.failed"},
            )

    async def wait_listening(self, timeout_s: float | None = None) -> bool:
        """Wait until LISTEN is in place; return False after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._listening.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def __aenter__(self) -> AsyncSessionListener:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        try:
            while not self._core.stopping:
                pause = await self._listen_once()
                if self._core.stopping:
                    return
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_requested.wait(), pause)
        finally:
            # However the task ends, nothing invalidates the cache any more.
            self._listening.clear()
            self._core.halt()

    async def _listen_once(self) -> float:
        """Connect, listen until the connection fails; return the pause after."""
        core = self._core
        try:
            conn = await connect_async(core.target, autocommit=True)
        except Exception as exc:
            return core.lost(exc)
        try:
            waker = _SocketWaker(conn.pgconn.socket)
        except Exception as exc:
            await conn.close()
            return core.lost(exc)

        self._waker = waker
        try:
            self._in_query = True
            await conn.execute(_LISTEN_SQL)
            if not core.listen_established(conn.info.backend_pid):
                return 0.0
            self._listening.set()
            while True:
                self._in_query = False
                async for notify in conn.notifies(timeout=core.check_interval_s):
                    core.notified(notify.payload)
                self._in_query = True
                await self._check(conn, waker)
        except Exception as exc:
            return core.lost(exc, waker.reason)
        finally:
            self._in_query = False
            self._listening.clear()
            self._waker = None
            waker.close()
            await conn.close()

    async def _check(
        self, conn: psycopg.AsyncConnection[Any], waker: _SocketWaker
    ) -> None:
        timeout_s = self._core.check_timeout_s
        handle = asyncio.get_running_loop().call_later(
            timeout_s, waker.shutdown, _check_timed_out(timeout_s)
        )
        try:
            await conn.execute(_CHECK_SQL)
        finally:
            handle.cancel()


class SessionListener:
    """Keeps a token cache in step with session changes, in a daemon thread.

    The blocking counterpart of :class:`AsyncSessionListener`, with the same
    contract. Use ``with`` or :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        target: ConnectionTarget,
        cache: TokenCache,
        *,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        check_timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
    ) -> None:
        self._core = _ListenerCore(
            target,
            cache,
            check_interval_s=check_interval_s,
            check_timeout_s=check_timeout_s,
            max_backoff_s=max_backoff_s,
        )
        self._thread: threading.Thread | None = None
        self._stop_requested = threading.Event()
        self._listening = threading.Event()
        self._waker_lock = threading.Lock()
        self._waker: _SocketWaker | None = None

    @property
    def listening(self) -> bool:
        """Whether LISTEN is in place and the cache is active."""
        return self._core.listening

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the listening connection, if any."""
        return self._core.backend_pid

    def stats(self) -> ListenerStats:
        """Return the listener's counters."""
        return self._core.stats()

    def start(self) -> None:
        """Start listening in a daemon thread; no-op when it runs.

        Returns at once. The cache becomes active when LISTEN has succeeded;
        :meth:`wait_listening` waits for that.
        """
        thread = self._thread
        if thread is not None and thread.is_alive():
            if not self._core.stopping:
                return
            # A thread that stop() left opening a connection must end first,
            # because it deactivates the cache as it exits.
            thread.join()
        self._core.begin()
        self._stop_requested.clear()
        self._thread = threading.Thread(
            target=self._run, name="mcp-authdb-listener", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening and close the connection; idempotent.

        The cache is inactive and empty when this returns. The thread is
        woken at once unless it is opening a connection, which can take up
        to the connection's ``connect_timeout``. This call waits at most
        ``timeout_s`` for the thread. A thread still running then exits when
        its attempt ends, without activating the cache.
        """
        self._core.halt()
        self._stop_requested.set()
        with self._waker_lock:
            if self._waker is not None:
                self._waker.shutdown("the listener is stopping")
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.debug(
                    "the session listener thread is still opening a connection; "
                    "it exits when the attempt ends",
                    extra={"action": "listener.stop_pending"},
                )

    def wait_listening(self, timeout_s: float | None = None) -> bool:
        """Wait until LISTEN is in place; return False after ``timeout_s``."""
        return self._listening.wait(timeout_s)

    def __enter__(self) -> SessionListener:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            while not self._core.stopping:
                pause = self._listen_once()
                if self._core.stopping or self._stop_requested.wait(pause):
                    return
        finally:
            # However the thread ends, nothing invalidates the cache any more.
            self._listening.clear()
            self._core.halt()

    def _listen_once(self) -> float:
        core = self._core
        try:
            conn = connect(core.target, autocommit=True)
        except Exception as exc:
            return core.lost(exc)
        try:
            waker = _SocketWaker(conn.pgconn.socket)
        except Exception as exc:
            conn.close()
            return core.lost(exc)

        with self._waker_lock:
            self._waker = waker
            if self._stop_requested.is_set():
                waker.shutdown("the listener is stopping")
        try:
            conn.execute(_LISTEN_SQL)
            if not core.listen_established(conn.info.backend_pid):
                return 0.0
            self._listening.set()
            while True:
                for notify in conn.notifies(timeout=core.check_interval_s):
                    core.notified(notify.payload)
                self._check(conn, waker)
        except Exception as exc:
            return core.lost(exc, waker.reason)
        finally:
            self._listening.clear()
            with self._waker_lock:
                self._waker = None
                waker.close()
            conn.close()

    def _check(self, conn: psycopg.Connection[Any], waker: _SocketWaker) -> None:
        timeout_s = self._core.check_timeout_s
        timer = threading.Timer(
            timeout_s, waker.shutdown, args=(_check_timed_out(timeout_s),)
        )
        timer.daemon = True
        timer.start()
        try:
            conn.execute(_CHECK_SQL)
        finally:
            timer.cancel()


def _listener_target(target: ConnectionTarget) -> ConnectionTarget:
    params = conninfo_to_dict(target.conninfo)
    if params.get("application_name") != APPLICATION_NAME:
        return target
    return dataclasses.replace(
        target,
        conninfo=make_conninfo(
            target.conninfo, application_name=LISTENER_APPLICATION_NAME
        ),
    )


def _check_timed_out(timeout_s: float) -> str:
    return f"the health check {_CHECK_SQL!r} got no reply within {timeout_s:g} s"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _validate_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValueError(
            f"{name}={value!r} is a {type(value).__name__}, not a number of "
            "seconds; pass a positive number such as 5.0"
        )
    if not math.isfinite(value) or value <= 0:
        raise InvalidValueError(
            f"{name}={value!r} is invalid; pass a positive, finite number of "
            "seconds such as 5.0"
        )
    return float(value)
