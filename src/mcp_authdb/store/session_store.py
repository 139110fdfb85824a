"""The session store: sign-in, token validation, refresh, revocation, listing.

:class:`AsyncSessionStore` runs on an :class:`~mcp_authdb.db.pool.AsyncDatabase`
and :class:`SessionStore` on a :class:`~mcp_authdb.db.pool.Database`. Both
check their input, run the operations of
:mod:`mcp_authdb.store.session_operations`, and turn the outcome into a
return value, a log line or an error in :class:`_StoreCore`, which they
share. A store keeps no state between calls besides its settings, so one
store can serve every task or thread of a process.

Tokens exist only in the :class:`~mcp_authdb.store.sessions.IssuedTokens`
that :meth:`AsyncSessionStore.create` and :meth:`AsyncSessionStore.refresh`
return; the database stores their keyed hashes (see
:mod:`mcp_authdb.store.tokens`). Logs name session ids, family ids, user ids
and counts, never a token, a hash or a key.

With a ``cache``, :meth:`AsyncSessionStore.validate` looks the token up in
it before the database, and caches what the database returned. The store
invalidates a user's cached sessions after it revoked or changed them. Other
processes learn of changes through the ``mcp_authdb_sessions`` notifications
that the schema's triggers send.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, NoReturn, Protocol, TypeVar

from mcp_authdb.db.pool import AsyncDatabase, Database, Operation
from mcp_authdb.errors import DatabaseError, InvalidGrantError, InvalidValueError
from mcp_authdb.store.session_operations import (
    MAX_REVOKE_PASSES,
    VALIDATE,
    NewPair,
    Rejection,
    Revocation,
    ValidatedSession,
    count_sessions,
    insert_session_row,
    list_live_sessions,
    refresh_session,
    revoke_session_family,
    revoke_token_family,
    revoke_user_sessions,
    set_level,
    touch_session,
    validated_session,
)
from mcp_authdb.store.sessions import (
    DEFAULT_SUBSCRIPTION_LEVEL,
    IssuedTokens,
    Session,
    SessionStats,
    validate_interval,
    validate_lifetimes,
    validate_limit,
    validate_scope,
    validate_session_id,
    validate_subscription_level,
    validate_user_id,
)
from mcp_authdb.store.tokens import TokenHasher, TokenKind, new_token, token_kind

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ACCESS_LIFETIME = timedelta(hours=1)
DEFAULT_REFRESH_LIFETIME = timedelta(days=30)
DEFAULT_REFRESH_GRACE = timedelta(seconds=1)
DEFAULT_REPLAY_WINDOW = timedelta(days=1)
DEFAULT_TOUCH_INTERVAL = timedelta(seconds=60)
DEFAULT_LIST_LIMIT = 100

# SQLSTATE 40P01: PostgreSQL rolled the transaction back to break a deadlock,
# so running it again is safe. Two replays of one family, or a replay and a
# revocation of the same user, can lock the same rows in opposite orders.
_DEADLOCK = "40P01"
_DEADLOCK_ATTEMPTS = 3


class SessionCache(Protocol):
    """The interface of a cache of validated access tokens.

    :class:`~mcp_authdb.store.cache.TokenCache` implements it. ``key`` is the
    token's hash under the newest key, never the token.
    """

    def begin_lookup(self) -> Any:
        """Return a stamp, taken before a lookup, to pass to :meth:`put`."""

    def get(self, key: str) -> Session | None:
        """Return the cached session of ``key``, or None."""

    def put(
        self, key: str, session: Session, db_now: datetime, *, stamp: Any = None
    ) -> object:
        """Cache ``session``, found when the database's clock read ``db_now``.

        A cache drops the session when ``stamp`` is older than an
        invalidation of its user.
        """

    def invalidate_user(self, user_id: str) -> object:
        """Drop every cached session of ``user_id``."""


@dataclasses.dataclass(frozen=True)
class _NewTokens:
    """A token pair made for one call, with the row values it needs."""

    access_token: str
    refresh_token: str
    pair: NewPair
    family_id: uuid.UUID

    def issued(self, session: Session) -> IssuedTokens:
        return IssuedTokens(self.access_token, self.refresh_token, session)


@dataclasses.dataclass(frozen=True)
class _Lookup:
    """An access-token validation: its cache key, cache stamp and operation."""

    key: str
    stamp: Any
    candidates: list[str]


class _StoreCore:
    """Settings, input checks and outcome handling of both session stores.

    Every method here is free of I/O. The stores call a ``_plan_*`` method,
    run the operation it returns, and pass the outcome to the matching
    method that logs it and builds the return value.
    """

    def __init__(
        self,
        hasher: TokenHasher,
        *,
        cache: SessionCache | None,
        refresh_grace: timedelta,
        replay_window: timedelta,
        touch_interval: timedelta,
    ) -> None:
        if not isinstance(hasher, TokenHasher):
            raise InvalidValueError(
                f"hasher is a {type(hasher).__name__}, not a TokenHasher; build "
                "it with TokenHasher.from_env(settings)"
            )
        self.hasher = hasher
        self.cache = cache
        self.refresh_grace = validate_interval(
            "refresh_grace", refresh_grace, allow_zero=True
        )
        self.replay_window = validate_interval(
            "replay_window", replay_window, allow_zero=False
        )
        self.touch_interval = validate_interval(
            "touch_interval", touch_interval, allow_zero=True
        )
        # Ids of the sessions whose last_used_at this process is writing.
        self._touching: set[int] = set()
        self._touch_lock = threading.Lock()
        if self.replay_window < self.refresh_grace:
            raise InvalidValueError(
                f"replay_window={self.replay_window!r} is shorter than "
                f"refresh_grace={self.refresh_grace!r}; a rotated refresh token "
                "must be kept at least as long as it may be used again"
            )

    def _new_tokens(self, access: timedelta, refresh: timedelta) -> _NewTokens:
        """Make a token pair with the lifetimes ``access`` and ``refresh``."""
        access_token = new_token(TokenKind.ACCESS)
        refresh_token = new_token(TokenKind.REFRESH)
        pair = NewPair(
            access_hash=self.hasher.hash(access_token),
            refresh_hash=self.hasher.hash(refresh_token),
            access_lifetime=access,
            refresh_lifetime=refresh,
        )
        return _NewTokens(access_token, refresh_token, pair, uuid.uuid4())

    def _plan_create(
        self,
        user_id: str,
        scopes: Iterable[str],
        subscription_level: str,
        access_lifetime: timedelta,
        refresh_lifetime: timedelta,
        then: Callable[[Session], Operation[object]] | None,
    ) -> tuple[_NewTokens, Callable[[], Operation[Session]]]:
        validate_user_id(user_id)
        scope_list = validate_scope(scopes)
        validate_subscription_level(subscription_level)
        tokens = self._new_tokens(
            *validate_lifetimes(access_lifetime, refresh_lifetime)
        )

        def operation() -> Operation[Session]:
            session = yield from insert_session_row(
                user_id, scope_list, subscription_level, tokens.pair, tokens.family_id
            )
            if then is not None:
                yield from then(session)
            return session

        return tokens, operation

    def _created(self, tokens: _NewTokens, session: Session) -> IssuedTokens:
        logger.debug(
            "created session %d in family %s for user %r",
            session.session_id,
            session.family_id,
            session.user_id,
            extra={"action": "sessions.create", "session_id": session.session_id},
        )
        return tokens.issued(session)

    def _validation_batch_options(self) -> dict[str, Any]:
        # Concurrent validations share one statement through the pool's
        # lookup batcher, which saves a round trip and most of the client's
        # per-statement cost for each caller beyond the first.
        return {
            "key_column": 0,
            "keys_param": "candidates",
            "params": {"touch_interval": self.touch_interval},
        }

    def _cache_key(self, access_token: object) -> str | None:
        """Return the hash that keys the cache, None for a malformed token."""
        return self.hasher.newest_hash(access_token, TokenKind.ACCESS)

    def _cached(self, key: str) -> Session | None:
        return None if self.cache is None else self.cache.get(key)

    def _plan_validate(self, access_token: object, key: str) -> _Lookup:
        # Only a cache miss gets here, so the hashes under older keys are
        # made now. The stamp is taken before the database is read, so that
        # an invalidation during the lookup makes the cache drop the session
        # that the lookup returns.
        candidates = self.hasher.candidates(access_token, TokenKind.ACCESS)
        stamp = None if self.cache is None else self.cache.begin_lookup()
        return _Lookup(key=key, stamp=stamp, candidates=candidates)

    def _plan_touch(
        self, found: ValidatedSession | None
    ) -> Callable[[], Operation[datetime | None]] | None:
        if found is None or not found.touch_due:
            return None
        session_id = found.session.session_id
        interval = self.touch_interval

        # Concurrent validations of one token all find the touch due. One of
        # them writes it, so the others skip theirs.
        with self._touch_lock:
            if session_id in self._touching:
                return None
            self._touching.add(session_id)

        def operation() -> Operation[datetime | None]:
            return touch_session(session_id, interval)

        return operation

    def _touch_done(self, found: ValidatedSession) -> None:
        with self._touch_lock:
            self._touching.discard(found.session.session_id)

    def _validated(
        self,
        lookup: _Lookup,
        found: ValidatedSession | None,
        touched_at: datetime | None = None,
    ) -> Session | None:
        if found is None:
            return None
        session = found.session
        if touched_at is not None:
            session = dataclasses.replace(session, last_used_at=touched_at)
        if self.cache is not None:
            self.cache.put(lookup.key, session, found.database_now, stamp=lookup.stamp)
        return session

    def _plan_refresh(
        self,
        refresh_token: object,
        access_lifetime: timedelta,
        refresh_lifetime: timedelta,
    ) -> tuple[_NewTokens, Callable[[], Operation[Session | Rejection]]]:
        access, refresh = validate_lifetimes(access_lifetime, refresh_lifetime)
        candidates = self.hasher.candidates(refresh_token, TokenKind.REFRESH)
        if not candidates:
            self._reject(Rejection("unknown"))
        tokens = self._new_tokens(access, refresh)
        grace = self.refresh_grace
        replay_window = self.replay_window

        def operation() -> Operation[Session | Rejection]:
            return refresh_session(
                candidates,
                tokens.pair,
                grace=grace,
                replay_window=replay_window,
                new_family_id=tokens.family_id,
            )

        return tokens, operation

    @staticmethod
    def _plan_replay_revocation(
        replay: Rejection,
    ) -> Callable[[], Operation[Revocation]]:
        """Return the second revocation of a replayed refresh token's family.

        The refresh's transaction already revoked the rows it could see. This
        one runs after it, with the user lock exclusive, and catches a row
        that a concurrent refresh of the family committed meanwhile.
        """
        session_id = replay.session_id or 0

        def operation() -> Operation[Revocation]:
            return revoke_session_family(session_id)

        return operation

    @staticmethod
    def _swept(replay: Rejection, sweep: Revocation) -> Rejection:
        first = replay.revocation or Revocation(0, frozenset())
        return dataclasses.replace(replay, revocation=first.then(sweep))

    def _refreshed(
        self, tokens: _NewTokens, outcome: Session | Rejection
    ) -> IssuedTokens:
        if isinstance(outcome, Rejection):
            self._reject(outcome)
        logger.debug(
            "refreshed into session %d in family %s for user %r",
            outcome.session_id,
            outcome.family_id,
            outcome.user_id,
            extra={"action": "sessions.refresh", "session_id": outcome.session_id},
        )
        return tokens.issued(outcome)

    def _reject(self, rejection: Rejection) -> NoReturn:
        """Raise InvalidGrantError for ``rejection``, after logging it."""
        session = f"session {rejection.session_id}"
        revoked = 0
        if rejection.revocation is not None:
            revoked = rejection.revocation.rows
            self._after_revocation(
                rejection.revocation, f"family {rejection.family_id}"
            )
            logger.warning(
                "the refresh token of %s of user %r was used again after its "
                "rotation; revoked %d rows of family %s",
                session,
                rejection.user_id,
                revoked,
                rejection.family_id,
                extra={
                    "action": "sessions.refresh.replayed",
                    "session_id": rejection.session_id,
                    "revoked": revoked,
                },
            )
            message = (
                f"the refresh token of {session} was already exchanged, so "
                f"every session of its sign-in was revoked ({revoked} rows); "
                "sign in again"
            )
        else:
            logger.info(
                "rejected a refresh token: %s (session %s)",
                rejection.reason,
                rejection.session_id,
                extra={
                    "action": "sessions.refresh.rejected",
                    "reason": rejection.reason,
                    "session_id": rejection.session_id,
                },
            )
            message = {
                "unknown": "the refresh token is malformed, or no session has it",
                "expired": f"the refresh token of {session} has expired",
                "revoked": f"the refresh token of {session} was revoked",
            }[rejection.reason] + "; sign in again"
        raise InvalidGrantError(
            message,
            reason=rejection.reason,
            session_id=rejection.session_id,
            revoked=revoked,
        )

    def _plan_revoke_token(
        self, token: object
    ) -> Callable[[], Operation[Revocation]] | None:
        kind = token_kind(token)
        if kind is not TokenKind.ACCESS and kind is not TokenKind.REFRESH:
            return None
        candidates = self.hasher.candidates(token, kind)
        column = (
            "access_token_hash" if kind is TokenKind.ACCESS else "refresh_token_hash"
        )
        return lambda: revoke_token_family(candidates, column)

    def _plan_revoke_session(
        self, session_id: int
    ) -> Callable[[], Operation[Revocation]]:
        checked = validate_session_id(session_id)
        return lambda: revoke_session_family(checked)

    def _plan_revoke_user(self, user_id: str) -> Callable[[], Operation[Revocation]]:
        validate_user_id(user_id)
        return lambda: revoke_user_sessions(user_id)

    def _revoked(self, revocation: Revocation, target: str) -> int:
        self._after_revocation(revocation, target)
        if revocation.rows:
            logger.info(
                "revoked %d session rows: %s",
                revocation.rows,
                target,
                extra={"action": "sessions.revoke", "revoked": revocation.rows},
            )
        return revocation.rows

    def _after_revocation(self, revocation: Revocation, target: str) -> None:
        """Drop the revoked users' cached sessions; warn of an incomplete pass."""
        self._invalidate(revocation.user_ids)
        if not revocation.complete:
            logger.warning(
                "revoking %s: refreshes kept adding rows for %d passes, so rows "
                "added by the last of them may be live; revoke it again",
                target,
                MAX_REVOKE_PASSES,
                extra={"action": "sessions.revoke.incomplete"},
            )

    def _plan_set_level(
        self, user_id: str, subscription_level: str
    ) -> Callable[[], Operation[int]]:
        validate_user_id(user_id)
        validate_subscription_level(subscription_level)
        return lambda: set_level(user_id, subscription_level)

    def _level_set(self, user_id: str, level: str, changed: int) -> int:
        if changed:
            self._invalidate([user_id])
            logger.info(
                "set subscription level %r on %d session rows of user %r",
                level,
                changed,
                user_id,
                extra={"action": "sessions.set_level", "changed": changed},
            )
        return changed

    def _plan_list(
        self, user_id: str | None, limit: int
    ) -> Callable[[], Operation[list[Session]]]:
        if user_id is not None:
            validate_user_id(user_id)
        checked_limit = validate_limit(limit)
        return lambda: list_live_sessions(user_id, checked_limit)

    def _invalidate(self, user_ids: Iterable[str]) -> None:
        if self.cache is None:
            return
        for user_id in user_ids:
            self.cache.invalidate_user(user_id)

    @staticmethod
    def _retry_after_deadlock(exc: DatabaseError, attempt: int) -> bool:
        if exc.sqlstate != _DEADLOCK or attempt >= _DEADLOCK_ATTEMPTS:
            return False
        logger.warning(
            "a session change was rolled back to break a deadlock; running it "
            "again (attempt %d of %d)",
            attempt + 1,
            _DEADLOCK_ATTEMPTS,
            extra={"action": "sessions.deadlock_retry"},
        )
        return True


class AsyncSessionStore(_StoreCore):
    """The session store over an :class:`AsyncDatabase`.

    ``refresh_grace`` is how long after a rotation the old refresh token can
    still be refreshed, each time into a new pair that keeps working. It
    covers concurrent and retried refreshes of one token. ``replay_window``
    is how long a rotated row is kept to detect a later replay: presenting
    its refresh token after the grace window revokes the whole family.
    ``touch_interval`` is how often at most ``last_used_at`` is written.
    Raises :class:`InvalidValueError` for a negative duration, a zero
    ``replay_window``, or a ``replay_window`` shorter than ``refresh_grace``.
    """

    def __init__(
        self,
        database: AsyncDatabase,
        hasher: TokenHasher,
        *,
        cache: SessionCache | None = None,
        refresh_grace: timedelta = DEFAULT_REFRESH_GRACE,
        replay_window: timedelta = DEFAULT_REPLAY_WINDOW,
        touch_interval: timedelta = DEFAULT_TOUCH_INTERVAL,
    ) -> None:
        if not isinstance(database, AsyncDatabase):
            raise InvalidValueError(
                f"database is a {type(database).__name__}, not an AsyncDatabase; "
                "use SessionStore with a Database"
            )
        super().__init__(
            hasher,
            cache=cache,
            refresh_grace=refresh_grace,
            replay_window=replay_window,
            touch_interval=touch_interval,
        )
        self.database = database
        self._validation = database.lookup_batcher(
            VALIDATE, **self._validation_batch_options()
        )

    async def create(
        self,
        user_id: str,
        *,
        scopes: Iterable[str] = (),
        subscription_level: str = DEFAULT_SUBSCRIPTION_LEVEL,
        access_lifetime: timedelta = DEFAULT_ACCESS_LIFETIME,
        refresh_lifetime: timedelta = DEFAULT_REFRESH_LIFETIME,
        then: Callable[[Session], Operation[object]] | None = None,
    ) -> IssuedTokens:
        """Sign ``user_id`` in: store a new family's first row, return its tokens.

        The expiries are the database's ``now()`` plus each lifetime. Raises
        :class:`InvalidValueError`, before any SQL, for a ``user_id`` that
        does not fit the column, scopes that are not OAuth scope strings, an
        invalid level, or a lifetime that is not a positive timedelta.

        ``then``, when given, is called with the new row's :class:`Session`
        and its operation runs in the same transaction, after the insert, so
        that rows which belong with the session commit with it or not at all.
        Its result is ignored. An exception it raises rolls the transaction
        back and propagates. Like every operation, it may run more than once
        when the transaction is retried.
        """
        tokens, operation = self._plan_create(
            user_id,
            scopes,
            subscription_level,
            access_lifetime,
            refresh_lifetime,
            then,
        )
        return self._created(tokens, await self._write(operation))

    async def validate(self, access_token: object) -> Session | None:
        """Return the session of a valid access token, or None.

        Valid means: a row has the token's hash under one of the keys, its
        ``expires_at`` is after the database's ``now()``, and it is not
        revoked. Any other value, of any type, gives None; a malformed one
        without a database call. Raises only when the database fails. The
        lookup is one read-only statement, shared with concurrent callers; a
        second statement records ``last_used_at`` at most once per
        ``touch_interval``.
        """
        key = self._cache_key(access_token)
        if key is None:
            return None
        cached = self._cached(key)
        if cached is not None:
            return cached
        lookup = self._plan_validate(access_token, key)
        found = validated_session(await self._validation.fetch(lookup.candidates))
        touch = self._plan_touch(found)
        if touch is None:
            return self._validated(lookup, found)
        assert found is not None  # a touch is planned for a found session only
        try:
            touched_at = await self.database.run(
                touch, transaction=False, idempotent=True
            )
        finally:
            self._touch_done(found)
        return self._validated(lookup, found, touched_at)

    async def refresh(
        self,
        refresh_token: object,
        *,
        access_lifetime: timedelta = DEFAULT_ACCESS_LIFETIME,
        refresh_lifetime: timedelta = DEFAULT_REFRESH_LIFETIME,
    ) -> IssuedTokens:
        """Exchange a refresh token for a new pair in the same family.

        The old access token stays valid until its own expiry. Raises
        :class:`InvalidGrantError` for a malformed, unknown, expired or
        revoked refresh token, and for one presented again after the grace
        window, whose whole family is then revoked before the error is
        raised. Raises :class:`InvalidValueError` for invalid lifetimes.
        """
        tokens, operation = self._plan_refresh(
            refresh_token, access_lifetime, refresh_lifetime
        )
        outcome = await self._write(operation)
        if isinstance(outcome, Rejection) and outcome.reason == "replayed":
            sweep = await self._write(self._plan_replay_revocation(outcome))
            outcome = self._swept(outcome, sweep)
        return self._refreshed(tokens, outcome)

    async def revoke_token(self, token: object) -> int:
        """Revoke the family of an access or refresh token; return rows revoked.

        As RFC 7009 requires, an unknown or malformed token is no error: it
        revokes nothing and returns 0.
        """
        operation = self._plan_revoke_token(token)
        if operation is None:
            return 0
        return self._revoked(await self._write(operation), "family of a token")

    async def revoke_session(self, session_id: int) -> int:
        """Revoke the family of the row ``session_id``; return rows revoked."""
        operation = self._plan_revoke_session(session_id)
        return self._revoked(
            await self._write(operation), f"family of session {session_id}"
        )

    async def revoke_user(self, user_id: str) -> int:
        """Revoke every session of ``user_id``; return rows revoked."""
        operation = self._plan_revoke_user(user_id)
        return self._revoked(await self._write(operation), f"user {user_id!r}")

    async def list_sessions(
        self, user_id: str | None = None, *, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[Session]:
        """Return the live sign-ins of ``user_id`` (all users with None).

        Each family appears once, as its newest live row, newest family first,
        at most ``limit`` of them. Live is defined in :class:`SessionStats`.
        Without ``user_id`` the query reads the whole table.
        """
        operation = self._plan_list(user_id, limit)
        return await self.database.run(operation, transaction=False, idempotent=True)

    async def set_subscription_level(self, user_id: str, level: str) -> int:
        """Set the subscription level of every row of ``user_id``.

        Returns the number of rows changed; rows that already have ``level``
        do not count. Later refreshes copy the new level.
        """
        operation = self._plan_set_level(user_id, level)
        return self._level_set(user_id, level, await self._write(operation))

    async def stats(self) -> SessionStats:
        """Count the rows by state, as :class:`SessionStats` defines them.

        The count reads the whole table.
        """
        return await self.database.run(
            count_sessions, transaction=False, idempotent=True
        )

    async def _write(self, operation: Callable[[], Operation[T]]) -> T:
        attempt = 1
        while True:
            try:
                return await self.database.run(operation)
            except DatabaseError as exc:
                if not self._retry_after_deadlock(exc, attempt):
                    raise
            attempt += 1


class SessionStore(_StoreCore):
    """The session store over a blocking, thread-safe :class:`Database`.

    The methods are those of :class:`AsyncSessionStore`, with the same
    contracts.
    """

    def __init__(
        self,
        database: Database,
        hasher: TokenHasher,
        *,
        cache: SessionCache | None = None,
        refresh_grace: timedelta = DEFAULT_REFRESH_GRACE,
        replay_window: timedelta = DEFAULT_REPLAY_WINDOW,
        touch_interval: timedelta = DEFAULT_TOUCH_INTERVAL,
    ) -> None:
        if not isinstance(database, Database):
            raise InvalidValueError(
                f"database is a {type(database).__name__}, not a Database; "
                "use AsyncSessionStore with an AsyncDatabase"
            )
        super().__init__(
            hasher,
            cache=cache,
            refresh_grace=refresh_grace,
            replay_window=replay_window,
            touch_interval=touch_interval,
        )
        self.database = database
        self._validation = database.lookup_batcher(
            VALIDATE, **self._validation_batch_options()
        )

    def create(
        self,
        user_id: str,
        *,
        scopes: Iterable[str] = (),
        subscription_level: str = DEFAULT_SUBSCRIPTION_LEVEL,
        access_lifetime: timedelta = DEFAULT_ACCESS_LIFETIME,
        refresh_lifetime: timedelta = DEFAULT_REFRESH_LIFETIME,
        then: Callable[[Session], Operation[object]] | None = None,
    ) -> IssuedTokens:
        """Sign ``user_id`` in; see :meth:`AsyncSessionStore.create`."""
        tokens, operation = self._plan_create(
            user_id,
            scopes,
            subscription_level,
            access_lifetime,
            refresh_lifetime,
            then,
        )
        return self._created(tokens, self._write(operation))

    def validate(self, access_token: object) -> Session | None:
        """Return the session of a valid access token, or None.

        See :meth:`AsyncSessionStore.validate`.
        """
        key = self._cache_key(access_token)
        if key is None:
            return None
        cached = self._cached(key)
        if cached is not None:
            return cached
        lookup = self._plan_validate(access_token, key)
        found = validated_session(self._validation.fetch(lookup.candidates))
        touch = self._plan_touch(found)
        if touch is None:
            return self._validated(lookup, found)
        assert found is not None  # a touch is planned for a found session only
        try:
            touched_at = self.database.run(touch, transaction=False, idempotent=True)
        finally:
            self._touch_done(found)
        return self._validated(lookup, found, touched_at)

    def refresh(
        self,
        refresh_token: object,
        *,
        access_lifetime: timedelta = DEFAULT_ACCESS_LIFETIME,
        refresh_lifetime: timedelta = DEFAULT_REFRESH_LIFETIME,
    ) -> IssuedTokens:
        """Exchange a refresh token; see :meth:`AsyncSessionStore.refresh`."""
        tokens, operation = self._plan_refresh(
            refresh_token, access_lifetime, refresh_lifetime
        )
        outcome = self._write(operation)
        if isinstance(outcome, Rejection) and outcome.reason == "replayed":
            sweep = self._write(self._plan_replay_revocation(outcome))
            outcome = self._swept(outcome, sweep)
        return self._refreshed(tokens, outcome)

    def revoke_token(self, token: object) -> int:
        """Revoke a token's family; see :meth:`AsyncSessionStore.revoke_token`."""
        operation = self._plan_revoke_token(token)
        if operation is None:
            return 0
        return self._revoked(self._write(operation), "family of a token")

    def revoke_session(self, session_id: int) -> int:
        """Revoke the family of the row ``session_id``; return rows revoked."""
        operation = self._plan_revoke_session(session_id)
        return self._revoked(self._write(operation), f"family of session {session_id}")

    def revoke_user(self, user_id: str) -> int:
        """Revoke every session of ``user_id``; return rows revoked."""
        operation = self._plan_revoke_user(user_id)
        return self._revoked(self._write(operation), f"user {user_id!r}")

    def list_sessions(
        self, user_id: str | None = None, *, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[Session]:
        """List live sign-ins; see :meth:`AsyncSessionStore.list_sessions`."""
        operation = self._plan_list(user_id, limit)
        return self.database.run(operation, transaction=False, idempotent=True)

    def set_subscription_level(self, user_id: str, level: str) -> int:
        """Set a user's level; see :meth:`AsyncSessionStore.set_subscription_level`."""
        operation = self._plan_set_level(user_id, level)
        return self._level_set(user_id, level, self._write(operation))

    def stats(self) -> SessionStats:
        """Count the rows by state, as :class:`SessionStats` defines them."""
        return self.database.run(count_sessions, transaction=False, idempotent=True)

    def _write(self, operation: Callable[[], Operation[T]]) -> T:
        attempt = 1
        while True:
            try:
                return self.database.run(operation)
            except DatabaseError as exc:
                if not self._retry_after_deadlock(exc, attempt):
                    raise
            attempt += 1
