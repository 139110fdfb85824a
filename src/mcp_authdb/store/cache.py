"""An in-process cache of validated access tokens.

The session store looks a presented token up in a :class:`TokenCache` before
it queries the database, and stores what the database returned afterwards::

    session = cache.get(key)
    if session is None:
        stamp = cache.begin_lookup()
        session, db_now = ...  # one indexed lookup, and the database's now()
        if session is not None:
            cache.put(key, session, db_now, stamp=stamp)

The key is the token's stored hash under the newest key, never the token.

An entry is served until the first of three events:

- ``ttl`` has passed since it was looked up (5 s by default);
- its session's ``expires_at`` has passed, judged by the database clock. The
  remaining lifetime ``expires_at - db_now`` is counted on this process's
  monotonic clock from the start of the lookup. So the two clocks may
  disagree by any amount without keeping an expired token alive;
- :meth:`TokenCache.invalidate_user` removes it, because a notification
  reported a change to one of the user's sessions, or :meth:`TokenCache.clear`
  or a change of :attr:`TokenCache.active` empties the cache.

A cache is inactive until a session listener (``mcp_authdb.store.listener``)
has its ``LISTEN`` in place, and again whenever that connection is lost:
while inactive, :meth:`TokenCache.get` misses and :meth:`TokenCache.put`
stores nothing, so a revocation that no notification reported can never be
served from the cache.

A lookup that began before an invalidation may return after it, with the
session as it was before the change. :meth:`TokenCache.begin_lookup` returns a
stamp for this: :meth:`TokenCache.put` drops a session whose stamp is older
than the last invalidation of its user, the last :meth:`TokenCache.clear`, or
the last change of ``active``. The stamp also records when the lookup began.
A put without a stamp counts both limits from its own call instead, and
cannot tell a stale result from a fresh one.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from datetime import datetime, timedelta

from mcp_authdb.errors import InvalidValueError
from mcp_authdb.store.sessions import Session

DEFAULT_TTL = timedelta(seconds=5)
DEFAULT_MAX_ENTRIES = 100_000

# How many users' latest invalidations are remembered for stamped puts. When
# an older one is forgotten, every stamp taken before it is treated as stale,
# which costs a cache fill, never a stale entry.
_REMEMBERED_INVALIDATIONS = 4096

_monotonic = time.monotonic


# An entry: the monotonic deadline, the session, and its user_id.
_Entry = tuple[float, Session, str]


@dataclasses.dataclass(frozen=True, slots=True)
class LookupStamp:
    """The cache's state when a database lookup began.

    ``generation`` counts the invalidations, clears and changes of ``active``
    before the lookup, and ``started`` is the ``time.monotonic()`` reading
    when it began.
    """

    generation: int
    started: float


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`TokenCache` since it was created.

    ``hits`` and ``misses`` count :meth:`TokenCache.get` calls, ``stored``
    the entries that :meth:`TokenCache.put` stored and ``stale_puts`` the
    ones it dropped because of an invalidation during their lookup.
    ``invalidated`` counts entries removed by
    :meth:`TokenCache.invalidate_user`, ``evicted`` entries removed to stay
    within ``max_entries``, ``expired`` entries removed after their deadline
    and ``clears`` the times the whole cache was emptied. ``entries`` is the
    current size.
    """

    hits: int
    misses: int
    stored: int
    stale_puts: int
    invalidated: int
    evicted: int
    expired: int
    clears: int
    entries: int
    active: bool


class TokenCache:
    """A bounded in-process cache of sessions by token hash.

    ``ttl`` (a positive timedelta) caps how long an entry is served after its
    lookup. ``max_entries`` bounds the size; when the cache is full, the
    oldest entry is evicted first, in O(1). A cache starts inactive unless
    ``active`` is true: a :class:`~mcp_authdb.store.listener.SessionListener`
    activates it once its ``LISTEN`` is in place. Pass ``active=True`` only
    when no other process changes sessions, because then nothing reports
    their changes.

    Thread-safe. Writers hold a lock. :meth:`get` takes none, because in
    CPython with the GIL a dict lookup is one atomic step, so a concurrent
    reader sees an entry either before or after a change. Its hit and miss
    counters are plain integer increments, which may lose a count when
    several threads call :meth:`get` at the same moment.

    NOTE: the lock-free :meth:`get` has not been checked on free-threaded
    CPython builds.
    """

    def __init__(
        self,
        ttl: timedelta = DEFAULT_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        active: bool = False,
    ) -> None:
        self._ttl = _validate_ttl(ttl)
        self._ttl_s = ttl.total_seconds()
        self._max_entries = _validate_max_entries(max_entries)
        self._lock = threading.Lock()
        self._active = active

        # Insertion order is age order: a put of an existing key removes the
        # old entry and appends the new one.
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._keys_by_user: dict[str, set[str]] = {}

        # Stamped puts. The generation counts invalidations, clears and
        # changes of `active`. Each user's latest invalidation is kept in
        # generation order, and every stamp older than `_floor` is stale.
        self._generation = 0
        self._floor = 0
        self._user_generations: collections.OrderedDict[str, int] = (
            collections.OrderedDict()
        )

        self._hits = 0
        self._misses = 0
        self._stored = 0
        self._stale_puts = 0
        self._invalidated = 0
        self._evicted = 0
        self._expired = 0
        self._clears = 0

    @property
    def ttl(self) -> timedelta:
        """The maximum time an entry is served after its lookup."""
        return self._ttl

    @property
    def max_entries(self) -> int:
        """The maximum number of entries."""
        return self._max_entries

    @property
    def active(self) -> bool:
        """Whether the cache serves and stores entries.

        Setting it to a new value empties the cache in the same step, so an
        inactive cache never contains an entry, and a lookup stamped before the
        change is not stored after it.
        """
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        with self._lock:
            if value == self._active:
                return
            self._clear_locked()
            self._active = value

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Session | None:
        """Return the cached session of ``key``, or None on a miss."""
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] > _monotonic():
                self._hits += 1
                return entry[1]
            self._drop_expired(key, entry)
        self._misses += 1
        return None

    def begin_lookup(self) -> LookupStamp:
        """Return a stamp to pass to :meth:`put` after the database lookup."""
        return LookupStamp(self._generation, _monotonic())

    def put(
        self,
        key: str,
        session: Session,
        db_now: datetime,
        *,
        stamp: LookupStamp | None = None,
    ) -> None:
        """Store ``session`` under ``key``, unless it must not be served.

        ``db_now`` is the database's ``now()`` in the lookup that returned
        ``session``, an aware datetime. The entry is served for the shorter
        of ``ttl`` and ``session.expires_at - db_now``, counted from
        ``stamp.started``, or from this call without a stamp. Nothing is
        stored while the cache is inactive, when the session has expired by
        then, or when ``stamp`` is older than an invalidation of the
        session's user, a :meth:`clear` or a change of :attr:`active`.

        NOTE: without ``stamp``, an entry may outlive ``expires_at`` by the
        time between the lookup's ``now()`` and this call, and a lookup that
        raced an invalidation stores its stale session for up to ``ttl``.

        Raises :class:`InvalidValueError` when ``db_now`` or
        ``session.expires_at`` has no time zone.
        """
        remaining_s = _remaining_seconds(session.expires_at, db_now)
        now = _monotonic()
        started = now if stamp is None else stamp.started
        deadline = started + min(self._ttl_s, remaining_s)
        if deadline <= now:
            return

        user_id = session.user_id
        with self._lock:
            if not self._active:
                return
            if stamp is not None and self._is_stale(stamp, user_id):
                self._stale_puts += 1
                return

            old = self._entries.pop(key, None)
            if old is not None:
                self._unindex(key, old[2])
            self._make_room(now)
            self._entries[key] = (deadline, session, user_id)
            keys = self._keys_by_user.get(user_id)
            if keys is None:
                self._keys_by_user[user_id] = {key}
            else:
                keys.add(key)
            self._stored += 1

    def invalidate_user(self, user_id: str) -> None:
        """Remove every entry of ``user_id``.

        The call is also recorded, so a lookup of this user that began
        before it and is stored after it with its stamp is dropped.
        """
        with self._lock:
            self._generation += 1
            self._user_generations[user_id] = self._generation
            self._user_generations.move_to_end(user_id)
            if len(self._user_generations) > _REMEMBERED_INVALIDATIONS:
                _, forgotten = self._user_generations.popitem(last=False)
                self._floor = max(self._floor, forgotten)

            keys = self._keys_by_user.pop(user_id, None)
            if keys:
                for key in keys:
                    del self._entries[key]
                self._invalidated += len(keys)

    def clear(self) -> None:
        """Remove every entry, and make every earlier stamp stale."""
        with self._lock:
            self._clear_locked()

    def stats(self) -> CacheStats:
        """Return the counters and the current size."""
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                stored=self._stored,
                stale_puts=self._stale_puts,
                invalidated=self._invalidated,
                evicted=self._evicted,
                expired=self._expired,
                clears=self._clears,
                entries=len(self._entries),
                active=self._active,
            )

    def _clear_locked(self) -> None:
        self._entries.clear()
        self._keys_by_user.clear()
        self._generation += 1
        self._floor = self._generation
        self._user_generations.clear()
        self._clears += 1

    def _is_stale(self, stamp: LookupStamp, user_id: str) -> bool:
        if stamp.generation < self._floor:
            return True
        return self._user_generations.get(user_id, 0) > stamp.generation

    def _make_room(self, now: float) -> None:
        """Remove expired entries from the old end, and the oldest while full.

        Each entry is removed at most once, so the cost is O(1) amortized per
        put.
        """
        entries = self._entries
        while entries:
            oldest_key = next(iter(entries))
            oldest = entries[oldest_key]
            if oldest[0] > now and len(entries) < self._max_entries:
                return
            del entries[oldest_key]
            self._unindex(oldest_key, oldest[2])
            if oldest[0] > now:
                self._evicted += 1
            else:
                self._expired += 1

    def _drop_expired(self, key: str, entry: _Entry) -> None:
        with self._lock:
            # Another thread may have replaced or removed the entry meanwhile.
            if self._entries.get(key) is entry:
                del self._entries[key]
                self._unindex(key, entry[2])
                self._expired += 1

    def _unindex(self, key: str, user_id: str) -> None:
        keys = self._keys_by_user.get(user_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys_by_user[user_id]


def _remaining_seconds(expires_at: datetime, db_now: datetime) -> float:
    for name, value in (("db_now", db_now), ("session.expires_at", expires_at)):
        if not isinstance(value, datetime) or value.utcoffset() is None:
            raise InvalidValueError(
                f"{name}={value!r} is not an aware datetime; pass the value "
                "PostgreSQL returned for a timestamptz, such as now()"
            )
    return (expires_at - db_now).total_seconds()


def _validate_ttl(ttl: object) -> timedelta:
    if not isinstance(ttl, timedelta):
        raise InvalidValueError(
            f"ttl={ttl!r} is a {type(ttl).__name__}, not a timedelta; pass for "
            "example timedelta(seconds=5)"
        )
    if ttl <= timedelta(0):
        raise InvalidValueError(
            f"ttl={ttl!r} is not positive; pass the longest time an entry may "
            "be served, for example timedelta(seconds=5)"
        )
    return ttl


def _validate_max_entries(max_entries: object) -> int:
    if isinstance(max_entries, bool) or not isinstance(max_entries, int):
        raise InvalidValueError(
            f"max_entries={max_entries!r} is a {type(max_entries).__name__}, "
            f"not a whole number; pass at least 1, for example {DEFAULT_MAX_ENTRIES}"
        )
    if max_entries < 1:
        raise InvalidValueError(
            f"max_entries={max_entries} is invalid; pass at least 1, for example "
            f"{DEFAULT_MAX_ENTRIES}"
        )
    return max_entries
