"""The token cache: lifetimes, bounds, the per-user index and stamped puts.

Most tests move a fake monotonic clock instead of sleeping. The test of the
database clock reads now() from PostgreSQL and waits in real time.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from mcp_authdb.errors import InvalidValueError
from mcp_authdb.store import cache as cache_module
from mcp_authdb.store.cache import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_TTL,
    LookupStamp,
    TokenCache,
)
from mcp_authdb.store.sessions import Session

from conftest import ScratchDatabase

DB_NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def make_session(user_id: str, expires_at: datetime) -> Session:
    return Session(
        session_id=1,
        family_id=None,
        user_id=user_id,
        scopes=("content:read",),
        subscription_level="free",
        expires_at=expires_at,
        refresh_expires_at=expires_at,
        created_at=expires_at - timedelta(hours=1),
        last_used_at=None,
    )


def session(user_id: str = "user-1", lifetime_s: float = 3600.0) -> Session:
    return make_session(user_id, DB_NOW + timedelta(seconds=lifetime_s))


def stores(
    cache: TokenCache,
    key: str,
    stored: Session,
    db_now: datetime = DB_NOW,
    stamp: LookupStamp | None = None,
) -> bool:
    """Put ``stored`` under ``key``; return whether the cache kept it."""
    before = cache.stats().stored
    cache.put(key, stored, db_now, stamp=stamp)
    return cache.stats().stored == before + 1


def invalidate(cache: TokenCache, user_id: str) -> int:
    """Invalidate ``user_id``; return how many entries that removed."""
    before = cache.stats().invalidated
    cache.invalidate_user(user_id)
    return cache.stats().invalidated - before


class FakeClock:
    """A replacement for time.monotonic that moves only in advance()."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(cache_module, "_monotonic", fake)
    yield fake


def active_cache(
    ttl: timedelta = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES
) -> TokenCache:
    return TokenCache(ttl, max_entries, active=True)


def test_put_then_get_hits() -> None:
    cache = active_cache()
    stored = session()

    assert stores(cache, "hash-1", stored)

    assert cache.get("hash-1") is stored
    assert cache.get("hash-2") is None
    stats = cache.stats()
    assert stats.hits == 1
    assert stats.misses == 1
    assert stats.stored == 1
    assert stats.entries == 1


def test_defaults() -> None:
    cache: TokenCache = TokenCache()

    assert cache.ttl == timedelta(seconds=5)
    assert cache.max_entries == 100_000
    assert cache.active is False


def test_inactive_cache_stores_nothing() -> None:
    cache: TokenCache = TokenCache()

    assert not stores(cache, "hash-1", session())

    assert cache.get("hash-1") is None
    assert len(cache) == 0
    assert cache.stats().stored == 0


def test_deactivation_empties_cache() -> None:
    cache = active_cache()
    cache.put("hash-1", session(), DB_NOW)

    cache.active = False

    assert len(cache) == 0
    assert cache.get("hash-1") is None
    cache.active = True
    assert cache.get("hash-1") is None


def test_setting_same_active_keeps_entries() -> None:
    cache = active_cache()
    cache.put("hash-1", session(), DB_NOW)

    cache.active = True

    assert cache.get("hash-1") is not None


def test_entry_expires_after_ttl(clock: FakeClock) -> None:
    cache = active_cache(ttl=timedelta(seconds=5))
    cache.put("hash-1", session(lifetime_s=3600), DB_NOW)

    clock.advance(4.999)
    assert cache.get("hash-1") is not None
    clock.advance(0.001)
    assert cache.get("hash-1") is None

    stats = cache.stats()
    assert stats.expired == 1
    assert stats.entries == 0


def test_entry_expires_at_session_expiry(clock: FakeClock) -> None:
    cache = active_cache(ttl=timedelta(seconds=5))
    cache.put("hash-1", session(lifetime_s=1.5), DB_NOW)

    clock.advance(1.499)
    assert cache.get("hash-1") is not None
    clock.advance(0.001)
    assert cache.get("hash-1") is None


def test_expired_session_not_stored(clock: FakeClock) -> None:
    cache = active_cache()

    assert not stores(cache, "hash-1", session(lifetime_s=0))
    assert not stores(cache, "hash-2", session(lifetime_s=-60))

    assert len(cache) == 0


@pytest.mark.parametrize("skew", [timedelta(days=-3650), timedelta(hours=7)])
def test_expiry_ignores_local_wall_clock(clock: FakeClock, skew: timedelta) -> None:
    # The database clock may be years off the local one: only the remaining
    # lifetime, expires_at - db_now, counts.
    cache = active_cache(ttl=timedelta(seconds=5))
    db_now = datetime.now(UTC) + skew
    stored = make_session("user-1", db_now + timedelta(seconds=2))
    cache.put("hash-1", stored, db_now)

    clock.advance(1.999)
    assert cache.get("hash-1") is stored
    clock.advance(0.001)
    assert cache.get("hash-1") is None


def test_expiry_across_time_zones(clock: FakeClock) -> None:
    # The same instant written in two zones: the lifetime is 3 s, not 3 h.
    cache = active_cache(ttl=timedelta(seconds=60))
    expires_at = (DB_NOW + timedelta(seconds=3)).astimezone(
        timezone(timedelta(hours=3))
    )
    cache.put("hash-1", make_session("user-1", expires_at), DB_NOW)

    clock.advance(2.9)
    assert cache.get("hash-1") is not None
    clock.advance(0.1)
    assert cache.get("hash-1") is None


def test_expiry_by_database_clock(db: ScratchDatabase) -> None:
    cache = active_cache(ttl=timedelta(seconds=30))
    with db.connect(autocommit=True) as conn:
        stamp = cache.begin_lookup()
        row = conn.execute(
            "SELECT now(), now() + interval '300 milliseconds'"
        ).fetchone()
        assert row is not None
        db_now, expires_at = row
        stored = make_session("user-1", expires_at)
        cache.put("hash-1", stored, db_now, stamp=stamp)

        # Each get() follows a reading of the database clock, so a hit after
        # a reading at or past expires_at would serve an expired session.
        hits = 0
        while True:
            clock_row = conn.execute("SELECT clock_timestamp()").fetchone()
            assert clock_row is not None
            if cache.get("hash-1") is None:
                break
            assert clock_row[0] < expires_at
            hits += 1
            assert time.monotonic() - stamp.started < 5
            time.sleep(0.005)
    lifetime_s = time.monotonic() - stamp.started

    assert hits > 0
    assert lifetime_s >= 0.3
    assert lifetime_s < 1.0


def test_eviction_removes_oldest() -> None:
    cache = active_cache(max_entries=3)
    for number in range(1, 5):
        cache.put(f"hash-{number}", session(f"user-{number}"), DB_NOW)

    assert len(cache) == 3
    assert cache.get("hash-1") is None
    assert cache.get("hash-2") is not None
    assert cache.get("hash-4") is not None
    assert cache.stats().evicted == 1
    # The evicted entry left the per-user index too.
    assert invalidate(cache, "user-1") == 0


def test_put_again_makes_entry_newest() -> None:
    cache = active_cache(max_entries=2)
    cache.put("hash-1", session("user-1"), DB_NOW)
    cache.put("hash-2", session("user-2"), DB_NOW)

    cache.put("hash-1", session("user-1"), DB_NOW)
    cache.put("hash-3", session("user-3"), DB_NOW)

    assert cache.get("hash-1") is not None
    assert cache.get("hash-2") is None
    assert cache.get("hash-3") is not None


def test_put_removes_expired_oldest_first(clock: FakeClock) -> None:
    cache = active_cache(ttl=timedelta(seconds=1), max_entries=10)
    cache.put("hash-1", session("user-1"), DB_NOW)
    cache.put("hash-2", session("user-2"), DB_NOW)
    clock.advance(2)

    cache.put("hash-3", session("user-3"), DB_NOW)

    assert len(cache) == 1
    stats = cache.stats()
    assert stats.expired == 2
    assert stats.evicted == 0


def test_eviction_at_scale_keeps_bound() -> None:
    cache = active_cache(max_entries=1000)
    for number in range(5000):
        cache.put(f"hash-{number}", session(f"user-{number % 7}"), DB_NOW)

    assert len(cache) == 1000
    assert cache.get("hash-3999") is None
    assert cache.get("hash-4000") is not None
    assert cache.stats().evicted == 4000
    removed = sum(invalidate(cache, f"user-{n}") for n in range(7))
    assert removed == 1000
    assert len(cache) == 0


def test_invalidate_user_removes_only_theirs() -> None:
    cache = active_cache()
    cache.put("hash-a1", session("alice"), DB_NOW)
    cache.put("hash-a2", session("alice"), DB_NOW)
    cache.put("hash-b1", session("bob"), DB_NOW)

    removed = invalidate(cache, "alice")

    assert removed == 2
    assert cache.get("hash-a1") is None
    assert cache.get("hash-a2") is None
    assert cache.get("hash-b1") is not None
    assert cache.stats().invalidated == 2
    assert invalidate(cache, "alice") == 0
    assert invalidate(cache, "nobody") == 0


def test_key_moving_to_other_user() -> None:
    cache = active_cache()
    cache.put("hash-1", session("alice"), DB_NOW)
    cache.put("hash-1", session("bob"), DB_NOW)

    assert invalidate(cache, "alice") == 0
    assert cache.get("hash-1") is not None
    assert invalidate(cache, "bob") == 1


def test_clear_removes_everything() -> None:
    cache = active_cache()
    cache.put("hash-1", session("alice"), DB_NOW)
    cache.put("hash-2", session("bob"), DB_NOW)

    cache.clear()

    assert len(cache) == 0
    assert cache.get("hash-1") is None
    assert invalidate(cache, "alice") == 0
    assert cache.active is True
    assert stores(cache, "hash-1", session("alice"))


def test_stamp_before_invalidation_is_stale() -> None:
    cache = active_cache()
    stamp = cache.begin_lookup()

    cache.invalidate_user("alice")

    assert not stores(cache, "hash-a", session("alice"), stamp=stamp)
    assert cache.get("hash-a") is None
    assert stores(cache, "hash-b", session("bob"), stamp=stamp)
    assert stores(cache, "hash-a", session("alice"), stamp=cache.begin_lookup())
    assert cache.stats().stale_puts == 1


@pytest.mark.parametrize("change", ["clear", "deactivate", "activate"])
def test_stamp_before_clear_is_stale(change: str) -> None:
    cache = active_cache()
    if change == "activate":
        cache.active = False
    stamp = cache.begin_lookup()

    if change == "clear":
        cache.clear()
    elif change == "deactivate":
        cache.active = False
        cache.active = True
    else:
        cache.active = True

    assert not stores(cache, "hash-1", session(), stamp=stamp)
    assert stores(cache, "hash-1", session(), stamp=cache.begin_lookup())


def test_forgotten_invalidations_make_old_stamps_stale() -> None:
    cache = active_cache()
    stamp = cache.begin_lookup()
    for number in range(cache_module._REMEMBERED_INVALIDATIONS + 1):
        cache.invalidate_user(f"other-{number}")

    # Which users were invalidated after the stamp is no longer known.
    assert not stores(cache, "hash-1", session("alice"), stamp=stamp)
    assert stores(cache, "hash-1", session("alice"), stamp=cache.begin_lookup())


def test_stamp_start_counts_for_lifetime(clock: FakeClock) -> None:
    cache = active_cache(ttl=timedelta(seconds=5))
    stamp = cache.begin_lookup()
    clock.advance(2)

    cache.put("hash-1", session(lifetime_s=3), DB_NOW, stamp=stamp)

    # Both limits count from the lookup's start: 3 s of lifetime, 1 s left.
    clock.advance(0.999)
    assert cache.get("hash-1") is not None
    clock.advance(0.001)
    assert cache.get("hash-1") is None


def test_stamp_older_than_lifetime_not_stored(clock: FakeClock) -> None:
    cache = active_cache(ttl=timedelta(seconds=5))
    stamp = cache.begin_lookup()
    clock.advance(6)

    assert not stores(cache, "hash-1", session(), stamp=stamp)


def test_naive_datetimes_rejected() -> None:
    cache = active_cache()
    naive = datetime(2030, 1, 1, 12, 0)

    with pytest.raises(InvalidValueError, match=r"db_now=.*not an aware datetime"):
        cache.put("hash-1", session(), naive)
    with pytest.raises(InvalidValueError, match=r"session\.expires_at=.*not an aware"):
        cache.put("hash-1", make_session("user-1", naive), DB_NOW)
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("ttl", "message"),
    [
        (timedelta(0), "ttl=datetime.timedelta(0) is not positive"),
        (timedelta(seconds=-1), "is not positive"),
        (5, "ttl=5 is a int, not a timedelta"),
    ],
)
def test_invalid_ttl(ttl: object, message: str) -> None:
    with pytest.raises(InvalidValueError, match=re.escape(message)):
        TokenCache(ttl)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("max_entries", "message"),
    [
        (0, "max_entries=0 is invalid"),
        (-5, "max_entries=-5 is invalid"),
        (True, "max_entries=True is a bool"),
        (10.0, "max_entries=10.0 is a float"),
    ],
)
def test_invalid_max_entries(max_entries: object, message: str) -> None:
    with pytest.raises(InvalidValueError, match=message):
        TokenCache(max_entries=max_entries)  # type: ignore[arg-type]


def test_concurrent_use_keeps_index_consistent() -> None:
    cache = active_cache(ttl=timedelta(seconds=60), max_entries=500)
    users = [f"user-{n}" for n in range(20)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def work(seed: int) -> None:
        chooser = random.Random(seed)
        try:
            while not stop.is_set():
                key = f"hash-{chooser.randrange(2000)}"
                action = chooser.random()
                if action < 0.5:
                    cache.put(key, session(chooser.choice(users)), DB_NOW)
                elif action < 0.95:
                    cache.get(key)
                elif action < 0.99:
                    cache.invalidate_user(chooser.choice(users))
                else:
                    cache.put(
                        key,
                        session(chooser.choice(users)),
                        DB_NOW,
                        stamp=cache.begin_lookup(),
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()

    assert errors == []
    size = len(cache)
    assert size <= 500
    # Every entry is in the per-user index exactly once.
    assert sum(invalidate(cache, user) for user in users) == size
    assert len(cache) == 0


def test_get_fast_enough_from_asyncio() -> None:
    # The cached path must sustain well over 100,000 lookups per second. A
    # get() took about 0.15 microseconds on a 2-vCPU virtual machine, so this
    # floor leaves a wide margin for slower machines.
    cache = active_cache(ttl=timedelta(seconds=60))
    keys = [f"hash-{n}" for n in range(1000)]
    for key in keys:
        cache.put(key, session(), DB_NOW)

    async def lookups(count: int) -> float:
        began = time.perf_counter()
        for number in range(count):
            if cache.get(keys[number % 1000]) is None:
                raise AssertionError("a cached key missed")
            if number % 100 == 0:
                await asyncio.sleep(0)
        return count / (time.perf_counter() - began)

    rate = asyncio.run(lookups(200_000))

    assert rate > 100_000
