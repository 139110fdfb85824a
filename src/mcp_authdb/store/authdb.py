"""Everything an MCP server needs from PostgreSQL, opened and closed together.

:class:`AsyncAuthDB` (asyncio) and :class:`AuthDB` (threads) bundle the parts
of the library that a server process runs once:

- the connection pool (:class:`~mcp_authdb.db.pool.AsyncDatabase`), or the
  embedded development server when ``DATABASE_URL`` is unset;
- the token keys and the session store;
- the token cache and the listener that empties it when another process
  revokes a session, unless the cache is turned off;
- the request log writer, unless turned off;
- the cleanup scheduler, unless ``SESSION_CLEANUP_INTERVAL`` is 0.

Each part is also usable alone; this module only wires them. Opening checks
every setting first, then starts the parts in dependency order; closing stops
them in reverse order and writes the queued request log rows. The schema must
already be migrated (``mcp-authdb migrate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Self

from mcp_authdb.db import open_target
from mcp_authdb.db.pool import AsyncDatabase, Database
from mcp_authdb.db.settings import Settings, parse_flag, parse_whole_number_in_range
from mcp_authdb.store.cache import DEFAULT_TTL, TokenCache
from mcp_authdb.store.listener import AsyncSessionListener, SessionListener
from mcp_authdb.store.request_log import AsyncRequestLog, RequestLog
from mcp_authdb.store.request_log_sanitize import DEFAULT_MAX_PARAMETERS_BYTES
from mcp_authdb.store.scheduler import (
    AsyncCleanupScheduler,
    CleanupSchedule,
    CleanupScheduler,
)
from mcp_authdb.store.session_store import (
    DEFAULT_REFRESH_GRACE,
    DEFAULT_REPLAY_WINDOW,
    AsyncSessionStore,
    SessionStore,
)
from mcp_authdb.store.tokens import TokenHasher

# Upper bounds of the settings below, to catch a value given in the wrong
# unit (milliseconds for seconds) rather than to limit real deployments.
MAX_CACHE_TTL_S = 3600
MAX_REFRESH_GRACE_S = 3600
MAX_REPLAY_WINDOW_S = 365 * 86400
MAX_PARAMETERS_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class AuthDBOptions:
    """The library settings of one server process, beyond the connection.

    ``cache_ttl`` is how long a validated access token is served from memory
    (None turns the cache off). ``refresh_grace`` and ``replay_window`` are
    those of the session store. ``request_log`` turns the writer on;
    ``secret_keys`` adds parameter names whose values the writer redacts, and
    ``max_parameters_bytes`` caps each row's parameters. ``schedule`` is the
    cleanup schedule.
    """

    cache_ttl: timedelta | None = DEFAULT_TTL
    refresh_grace: timedelta = DEFAULT_REFRESH_GRACE
    replay_window: timedelta = DEFAULT_REPLAY_WINDOW
    request_log: bool = True
    secret_keys: tuple[str, ...] = ()
    max_parameters_bytes: int = DEFAULT_MAX_PARAMETERS_BYTES
    schedule: CleanupSchedule = dataclasses.field(default_factory=CleanupSchedule)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AuthDBOptions:
        """Read the options from ``environ`` (default: ``os.environ``).

        Empty variables count as unset. An invalid value raises
        :class:`~mcp_authdb.errors.ConfigurationError` naming the variable.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        ttl_s = parse_whole_number_in_range(
            "MCP_AUTHDB_TOKEN_CACHE_TTL",
            get("MCP_AUTHDB_TOKEN_CACHE_TTL"),
            int(DEFAULT_TTL.total_seconds()),
            0,
            MAX_CACHE_TTL_S,
            "the seconds a validated token is served from memory (0 turns the "
            "cache off)",
        )
        grace_ms = parse_whole_number_in_range(
            "MCP_AUTHDB_REFRESH_GRACE_MS",
            get("MCP_AUTHDB_REFRESH_GRACE_MS"),
            int(DEFAULT_REFRESH_GRACE / timedelta(milliseconds=1)),
            0,
            MAX_REFRESH_GRACE_S * 1000,
            "the milliseconds during which a rotated refresh token still works",
        )
        replay_s = parse_whole_number_in_range(
            "MCP_AUTHDB_REPLAY_WINDOW",
            get("MCP_AUTHDB_REPLAY_WINDOW"),
            int(DEFAULT_REPLAY_WINDOW.total_seconds()),
            1,
            MAX_REPLAY_WINDOW_S,
            "the seconds a rotated refresh token is remembered to detect replays",
        )
        max_bytes = parse_whole_number_in_range(
            "MCP_AUTHDB_REQUEST_LOG_MAX_PARAMETERS_BYTES",
            get("MCP_AUTHDB_REQUEST_LOG_MAX_PARAMETERS_BYTES"),
            DEFAULT_MAX_PARAMETERS_BYTES,
            256,
            MAX_PARAMETERS_BYTES,
            "the largest stored parameters of one request, in bytes",
        )
        secret_keys = get("MCP_AUTHDB_REQUEST_LOG_SECRET_KEYS") or ""
        return cls(
            cache_ttl=timedelta(seconds=ttl_s) if ttl_s else None,
            refresh_grace=timedelta(milliseconds=grace_ms),
            replay_window=timedelta(seconds=replay_s),
            request_log=parse_flag(
                "MCP_AUTHDB_REQUEST_LOG", get("MCP_AUTHDB_REQUEST_LOG"), True
            ),
            secret_keys=tuple(k.strip() for k in secret_keys.split(",") if k.strip()),
            max_parameters_bytes=max_bytes,
            schedule=CleanupSchedule.from_env(env),
        )

    def store_options(self) -> dict[str, Any]:
        """Return the session store's keyword arguments from these options."""
        return {
            "refresh_grace": self.refresh_grace,
            "replay_window": self.replay_window,
        }

    def request_log_options(self) -> dict[str, Any]:
        """Return the request log writer's keyword arguments from these options."""
        return {
            "extra_secret_keys": self.secret_keys,
            "max_parameters_bytes": self.max_parameters_bytes,
        }


class AsyncAuthDB:
    """The pool, session store, cache, request log and scheduler of a process.

    Use ``async with AsyncAuthDB.from_env() as authdb:``. Inside the block,
    ``authdb.sessions`` validates and issues tokens, ``authdb.request_log``
    (None when turned off) records requests, and ``authdb.scheduler`` (None
    when ``SESSION_CLEANUP_INTERVAL`` is 0) runs cleanup rounds.
    """

    def __init__(
        self,
        settings: Settings,
        options: AuthDBOptions | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.options = options or AuthDBOptions()
        # Read now, so that a missing key stops the process before it starts
        # anything.
        self.hasher = TokenHasher.from_env(settings, environ)
        self._stack = contextlib.AsyncExitStack()
        self.database: AsyncDatabase | None = None
        self.cache: TokenCache | None = None
        self.listener: AsyncSessionListener | None = None
        self.request_log: AsyncRequestLog | None = None
        self.scheduler: AsyncCleanupScheduler | None = None
        self._sessions: AsyncSessionStore | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Build from the environment; nothing connects until it is opened."""
        return cls(
            Settings.from_env(environ), AuthDBOptions.from_env(environ), environ=environ
        )

    @property
    def sessions(self) -> AsyncSessionStore:
        """The session store; raises RuntimeError before :meth:`open`."""
        if self._sessions is None:
            raise RuntimeError("open the AsyncAuthDB before using its session store")
        return self._sessions

    async def open(self) -> None:
        """Connect and start every part; on failure, stop what had started."""
        try:
            await self._open_parts()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _open_parts(self) -> None:
        stack = self._stack
        options = self.options

        # Starting the embedded server blocks for a few seconds at most, and
        # only at start, so it runs in a worker thread.
        target = await asyncio.to_thread(
            stack.enter_context, open_target(self.settings)
        )
        self.database = await stack.enter_async_context(
            AsyncDatabase(target, self.settings)
        )

        if options.cache_ttl is not None:
            self.cache = TokenCache(options.cache_ttl)
            self.listener = AsyncSessionListener(target, self.cache)
            await stack.enter_async_context(self.listener)

        self._sessions = AsyncSessionStore(
            self.database, self.hasher, cache=self.cache, **options.store_options()
        )

        if options.request_log:
            request_log = AsyncRequestLog(
                target, self.settings, **options.request_log_options()
            )
            await request_log.open()
            stack.push_async_callback(request_log.aclose)
            self.request_log = request_log

        if options.schedule.periodic:
            scheduler = AsyncCleanupScheduler(self.database, options.schedule)
            scheduler.start()
            stack.push_async_callback(scheduler.stop)
            self.scheduler = scheduler

    async def close(self) -> None:
        """Stop every part in reverse order, writing the queued log rows."""
        await self._stack.aclose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AuthDB:
    """The blocking counterpart of :class:`AsyncAuthDB`, with threads.

    Use ``with AuthDB.from_env() as authdb:``; the listener, the request log
    writer and the scheduler run in daemon threads.
    """

    def __init__(
        self,
        settings: Settings,
        options: AuthDBOptions | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.options = options or AuthDBOptions()
        self.hasher = TokenHasher.from_env(settings, environ)
        self._stack = contextlib.ExitStack()
        self.database: Database | None = None
        self.cache: TokenCache | None = None
        self.listener: SessionListener | None = None
        self.request_log: RequestLog | None = None
        self.scheduler: CleanupScheduler | None = None
        self._sessions: SessionStore | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Build from the environment; nothing connects until it is opened."""
        return cls(
            Settings.from_env(environ), AuthDBOptions.from_env(environ), environ=environ
        )

    @property
    def sessions(self) -> SessionStore:
        """The session store; raises RuntimeError before :meth:`open`."""
        if self._sessions is None:
            raise RuntimeError("open the AuthDB before using its session store")
        return self._sessions

    def open(self) -> None:
        """Connect and start every part; on failure, stop what had started."""
        try:
            self._open_parts()
        except BaseException:
            self._stack.close()
            raise

    def _open_parts(self) -> None:
        stack = self._stack
        options = self.options

        target = stack.enter_context(open_target(self.settings))
        self.database = stack.enter_context(Database(target, self.settings))

        if options.cache_ttl is not None:
            self.cache = TokenCache(options.cache_ttl)
            self.listener = stack.enter_context(SessionListener(target, self.cache))

        self._sessions = SessionStore(
            self.database, self.hasher, cache=self.cache, **options.store_options()
        )

        if options.request_log:
            request_log = RequestLog(
                target, self.settings, **options.request_log_options()
            )
            request_log.open()
            stack.callback(request_log.close)
            self.request_log = request_log

        if options.schedule.periodic:
            scheduler = CleanupScheduler(self.database, options.schedule)
            scheduler.start()
            stack.callback(scheduler.stop)
            self.scheduler = scheduler

    def close(self) -> None:
        """Stop every part in reverse order, writing the queued log rows."""
        self._stack.close()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
