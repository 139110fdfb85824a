"""The session store on real PostgreSQL: sign-in, validation, refresh, revocation.

Most tests drive :class:`AsyncSessionStore` with ``asyncio.run`` inside a
plain test function; :class:`SessionStore` runs the same operations, and
its own tests cover each method once and concurrent refreshes from threads.
Expiries are moved relative to the database's ``now()``, because the store
compares with the database clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from mcp_authdb.db.connection import resolve_target
from mcp_authdb.db.pool import AsyncDatabase, Database, Operation, Query
from mcp_authdb.errors import (
    ConnectionFailedError,
    InvalidGrantError,
    InvalidValueError,
)
from mcp_authdb.store import (
    AsyncSessionStore,
    IssuedTokens,
    Session,
    SessionCache,
    SessionStats,
    SessionStore,
    TokenHasher,
    TokenKeys,
    TokenKind,
    delete_expired_sessions,
    new_token,
)
from mcp_authdb.store.cache import TokenCache

from conftest import ScratchDatabase

T = TypeVar("T")

KEY_1 = "k1:" + "q" * 43
KEY_2 = "k2:" + "r" * 43
HASHER = TokenHasher(TokenKeys.parse(KEY_1))
SHORT_GRACE = timedelta(seconds=0.2)


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


@contextlib.asynccontextmanager
async def async_store(
    db: ScratchDatabase,
    hasher: TokenHasher = HASHER,
    *,
    url: str | None = None,
    **options: Any,
) -> AsyncIterator[AsyncSessionStore]:
    """Open a pool on ``db`` and yield a store over it."""
    target = resolve_target(url or db.url, db.settings)
    async with AsyncDatabase(target, db.settings) as database:
        yield AsyncSessionStore(database, hasher, **options)


@contextlib.contextmanager
def sync_store(
    db: ScratchDatabase, hasher: TokenHasher = HASHER, **options: Any
) -> Iterator[SessionStore]:
    target = resolve_target(db.url, db.settings)
    with Database(target, db.settings) as database:
        yield SessionStore(database, hasher, **options)


def closed_async_store(db: ScratchDatabase) -> AsyncSessionStore:
    """Return a store whose pool never opens: any SQL it sent would fail."""
    target = resolve_target(db.url, db.settings)
    return AsyncSessionStore(AsyncDatabase(target, db.settings, wait_s=0.2), HASHER)


def rows_by_id(db: ScratchDatabase) -> dict[int, dict[str, Any]]:
    """Return every user_sessions row, with the database's now() as db_now."""
    with db.connect() as conn, conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute("SELECT *, now() AS db_now FROM user_sessions ORDER BY id")
        return {row["id"]: row for row in cursor.fetchall()}


def execute(db: ScratchDatabase, query: str, params: Any = None) -> int:
    with db.connect() as conn:
        return conn.execute(query, params).rowcount


def assert_revoked(row: dict[str, Any]) -> None:
    assert row["revoked_at"] is not None
    assert row["expires_at"] <= row["db_now"]
    assert row["refresh_expires_at"] <= row["db_now"]


# create and validate -------------------------------------------------------


def test_create_returns_tokens_and_session(db: ScratchDatabase) -> None:
    async def scenario() -> tuple[IssuedTokens, Session | None]:
        async with async_store(db) as store:
            issued = await store.create(
                "user-1",
                scopes=["content:read", "content:search"],
                subscription_level="pro",
                access_lifetime=timedelta(minutes=10),
                refresh_lifetime=timedelta(days=2),
            )
            return issued, await store.validate(issued.access_token)

    issued, validated = run(scenario)
    session = issued.session
    row = rows_by_id(db)[session.session_id]
    now = row["db_now"]

    assert issued.access_token.startswith("mcpat_")
    assert issued.refresh_token.startswith("mcprt_")
    assert session.user_id == "user-1"
    assert session.scopes == ("content:read", "content:search")
    assert session.subscription_level == "pro"
    assert isinstance(session.family_id, uuid.UUID)
    assert session.last_used_at is None
    assert timedelta(minutes=9) < session.expires_at - now <= timedelta(minutes=10)
    assert timedelta(days=1) < session.refresh_expires_at - now <= timedelta(days=2)
    for instant in (session.expires_at, session.refresh_expires_at):
        assert instant.tzinfo is UTC
    assert session.created_at.tzinfo is UTC
    assert row["access_token_hash"] == HASHER.hash(issued.access_token)
    assert row["refresh_token_hash"] == HASHER.hash(issued.refresh_token)
    assert row["family_id"] == session.family_id
    assert validated is not None
    assert validated.session_id == session.session_id
    assert validated.user_id == "user-1"
    assert validated.last_used_at is not None
    assert validated.last_used_at.tzinfo is UTC


def test_create_runs_then_in_its_transaction(db: ScratchDatabase) -> None:
    execute(db, "CREATE TABLE session_notes (session_id bigint, note text)")

    def note(text: str) -> Callable[[Session], Operation[object]]:
        def operation(session: Session) -> Operation[object]:
            yield Query(
                "INSERT INTO session_notes VALUES (%s, %s)", (session.session_id, text)
            )
            if text == "refused":
                raise LookupError("the caller refuses this session")
            return None

        return operation

    async def scenario() -> IssuedTokens:
        async with async_store(db) as store:
            with pytest.raises(LookupError, match="refuses"):
                await store.create("user-1", then=note("refused"))
            return await store.create("user-2", then=note("kept"))

    issued = run(scenario)

    # The refused sign-in left neither its session nor its note behind.
    assert [row["user_id"] for row in rows_by_id(db).values()] == ["user-2"]
    with db.connect() as conn:
        notes = conn.execute("SELECT session_id, note FROM session_notes").fetchall()
    assert notes == [(issued.session.session_id, "kept")]


def test_revoke_token_ignores_codes_and_states(db: ScratchDatabase) -> None:
    async def scenario() -> list[int]:
        async with async_store(db) as store:
            await store.create("user-1")
            return [
                await store.revoke_token(new_token(kind))
                for kind in (TokenKind.CODE, TokenKind.STATE)
            ]

    assert run(scenario) == [0, 0]


def test_issued_tokens_repr_hides_tokens(db: ScratchDatabase) -> None:
    async def scenario() -> IssuedTokens:
        async with async_store(db) as store:
            return await store.create("user-1")

    issued = run(scenario)

    assert issued.access_token not in repr(issued)
    assert issued.refresh_token not in repr(issued)
    assert "user-1" in repr(issued)


def test_validate_uses_database_clock(db: ScratchDatabase) -> None:
    async def scenario() -> tuple[Session | None, Session | None]:
        async with async_store(db) as store:
            issued = await store.create("user-1")
            execute(
                db,
                "UPDATE user_sessions SET expires_at = now() + interval '1 second'",
            )
            before = await store.validate(issued.access_token)
            await asyncio.sleep(1.2)
            return before, await store.validate(issued.access_token)

    before, after = run(scenario)

    assert before is not None
    assert after is None


def test_concurrent_validations_each_get_their_session(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with async_store(db) as store:
            issued = [await store.create(f"user-{n}") for n in range(12)]
            await store.revoke_user("user-3")
            unknown = new_token(TokenKind.ACCESS)
            tokens = [item.access_token for item in issued] + [unknown]

            found = await asyncio.gather(*(store.validate(t) for t in tokens * 3))

        expected = [f"user-{n}" for n in range(12)] + [None]
        expected[3] = None
        users = [None if session is None else session.user_id for session in found]
        assert users == expected * 3

    run(scenario)


def test_touch_leaves_synchronous_commit_on(db: ScratchDatabase) -> None:
    async def scenario() -> list[tuple[Any, ...]]:
        settings = db.settings.replace(pool_size=1)
        target = resolve_target(db.url, settings)
        async with AsyncDatabase(target, settings) as database:
            store = AsyncSessionStore(database, HASHER)
            issued = await store.create("erin")
            session = await store.validate(issued.access_token)
            assert session is not None
            assert session.last_used_at is not None

            def show() -> Operation[list[tuple[Any, ...]]]:
                result = yield Query("SHOW synchronous_commit")
                return result.rows

            return await database.run(show, transaction=False)

    assert run(scenario) == [("on",)]


def test_validate_rejects_expired_and_revoked(db: ScratchDatabase) -> None:
    async def scenario() -> list[Session | None]:
        async with async_store(db) as store:
            expired = await store.create("user-1")
            revoked = await store.create("user-2")
            execute(
                db,
                "UPDATE user_sessions SET expires_at = now() WHERE id = %s",
                (expired.session.session_id,),
            )
            execute(
                db,
                "UPDATE user_sessions SET revoked_at = now() WHERE id = %s",
                (revoked.session.session_id,),
            )
            return [
                await store.validate(expired.access_token),
                await store.validate(revoked.access_token),
            ]

    assert run(scenario) == [None, None]


def test_validate_touches_once_per_interval(db: ScratchDatabase) -> None:
    async def scenario() -> list[Session | None]:
        async with async_store(db, touch_interval=timedelta(seconds=0.3)) as store:
            issued = await store.create("user-1")
            first = await store.validate(issued.access_token)
            second = await store.validate(issued.access_token)
            await asyncio.sleep(0.4)
            third = await store.validate(issued.access_token)
            return [first, second, third]

    first, second, third = run(scenario)
    stored = next(iter(rows_by_id(db).values()))["last_used_at"]

    assert first is not None
    assert second is not None
    assert third is not None
    assert first.last_used_at is not None
    assert second.last_used_at == first.last_used_at
    assert third.last_used_at is not None
    assert third.last_used_at - first.last_used_at >= timedelta(seconds=0.3)
    assert stored == third.last_used_at


def test_validate_skips_touch_of_locked_row(db: ScratchDatabase) -> None:
    async def scenario() -> tuple[Session | None, float, Session | None]:
        async with async_store(db) as store:
            issued = await store.create("user-1")
            with db.connect() as locker:
                locker.execute("SELECT id FROM user_sessions FOR UPDATE")
                started = time.monotonic()
                while_locked = await store.validate(issued.access_token)
                elapsed = time.monotonic() - started
            return while_locked, elapsed, await store.validate(issued.access_token)

    while_locked, elapsed, after = run(scenario)

    assert while_locked is not None
    assert while_locked.last_used_at is None
    assert elapsed < 2.0
    assert after is not None
    assert after.last_used_at is not None


GARBAGE: list[Any] = [
    None,
    0,
    12345,
    3.25,
    b"mcpat_" + b"A" * 43,
    "",
    "x" * 10240,
    "mcpat_" + "A" * 10240 + "x",
    "mcpat_" + "A" * 10240 + "y",
    "mcpat_" + "\N{LATIN SMALL LETTER E WITH ACUTE}" * 43,
    "mcpat_" + "A" * 20 + "\x00" + "A" * 22,
    "mcprt_" + "A" * 20 + "\x00" + "A" * 22,
    "\x00" * 49,
    "mcpat_" + "A" * 42 + "/",
    "mcpat_" + "\ud800" * 43,
    ["mcpat_" + "A" * 43],
]


@pytest.mark.parametrize("value", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_tokens_send_no_sql(db: ScratchDatabase, value: Any) -> None:
    store = closed_async_store(db)

    async def scenario() -> tuple[Session | None, int, InvalidGrantError]:
        validated = await store.validate(value)
        revoked = await store.revoke_token(value)
        with pytest.raises(InvalidGrantError) as raised:
            await store.refresh(value)
        return validated, revoked, raised.value

    validated, revoked, error = run(scenario)

    assert validated is None
    assert revoked == 0
    assert error.reason == "unknown"


def test_closed_store_would_fail_on_sql(db: ScratchDatabase) -> None:
    # The check of the test above: a call that sends SQL does fail.
    store = closed_async_store(db)

    with pytest.raises(ConnectionFailedError):
        run(lambda: store.validate(new_token(TokenKind.ACCESS)))


def test_unknown_and_misused_tokens_not_found(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with async_store(db) as store:
            issued = await store.create("user-1")
            unknown_access = new_token(TokenKind.ACCESS)
            unknown_refresh = new_token(TokenKind.REFRESH)
            long_a = issued.access_token + "A" * 5000
            long_b = issued.access_token + "B" * 5000

            for value in (unknown_access, issued.refresh_token, long_a, long_b):
                assert await store.validate(value) is None
            for value in (unknown_refresh, issued.access_token, long_a):
                with pytest.raises(InvalidGrantError) as raised:
                    await store.refresh(value)
                assert raised.value.reason == "unknown"
            assert await store.revoke_token(unknown_access) == 0
            assert await store.revoke_token(unknown_refresh) == 0
            assert await store.validate(issued.access_token) is not None

    run(scenario)


# refresh -------------------------------------------------------------------


def test_refresh_rotates_into_same_family(db: ScratchDatabase) -> None:
    async def scenario() -> tuple[IssuedTokens, IssuedTokens, list[Any]]:
        async with async_store(db, replay_window=timedelta(hours=2)) as store:
            issued = await store.create(
                "user-1", scopes=["a:b"], subscription_level="pro"
            )
            refreshed = await store.refresh(
                issued.refresh_token,
                access_lifetime=timedelta(minutes=5),
                refresh_lifetime=timedelta(days=3),
            )
            checks = [
                await store.validate(issued.access_token),
                await store.validate(refreshed.access_token),
            ]
            return issued, refreshed, checks

    issued, refreshed, (old_access, new_access) = run(scenario)
    rows = rows_by_id(db)
    old_row = rows[issued.session.session_id]
    new_row = rows[refreshed.session.session_id]
    now = new_row["db_now"]
    new = refreshed.session

    assert new.session_id != issued.session.session_id
    assert new.family_id == issued.session.family_id
    assert new.user_id == "user-1"
    assert new.scopes == ("a:b",)
    assert new.subscription_level == "pro"
    assert timedelta(minutes=4) < new.expires_at - now <= timedelta(minutes=5)
    assert timedelta(days=2) < new.refresh_expires_at - now <= timedelta(days=3)
    assert refreshed.access_token != issued.access_token
    assert refreshed.refresh_token != issued.refresh_token
    assert old_row["rotated_at"] is not None
    assert old_row["revoked_at"] is None
    assert old_row["refresh_expires_at"] - now <= timedelta(hours=2)
    assert new_row["rotated_at"] is None
    # The old access token keeps working until its own expiry.
    assert old_access is not None
    assert new_access is not None


def test_concurrent_refreshes_all_work(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with async_store(db, refresh_grace=timedelta(seconds=5)) as store:
            issued = await store.create("user-1")
            pairs = await asyncio.gather(
                *(store.refresh(issued.refresh_token) for _ in range(5))
            )

            assert len({pair.access_token for pair in pairs}) == 5
            assert len({pair.session.session_id for pair in pairs}) == 5
            for pair in pairs:
                assert pair.session.family_id == issued.session.family_id
                assert await store.validate(pair.access_token) is not None
            for pair in pairs:
                again = await store.refresh(pair.refresh_token)
                assert await store.validate(again.access_token) is not None

    run(scenario)
    rows = rows_by_id(db)

    assert len(rows) == 11
    assert len({row["family_id"] for row in rows.values()}) == 1
    assert sum(row["rotated_at"] is not None for row in rows.values()) == 6
    assert all(row["revoked_at"] is None for row in rows.values())


def test_refresh_within_grace_adds_sibling(db: ScratchDatabase) -> None:
    async def scenario() -> tuple[list[IssuedTokens], datetime]:
        async with async_store(db, refresh_grace=timedelta(seconds=5)) as store:
            issued = await store.create("user-1")
            first = await store.refresh(issued.refresh_token)
            rotated_at = rows_by_id(db)[issued.session.session_id]["rotated_at"]
            second = await store.refresh(issued.refresh_token)
            return [issued, first, second], rotated_at

    (issued, first, second), rotated_at = run(scenario)
    rows = rows_by_id(db)

    assert first.session.family_id == issued.session.family_id
    assert second.session.family_id == issued.session.family_id
    assert rows[first.session.session_id]["rotated_at"] is None
    assert rows[second.session.session_id]["rotated_at"] is None
    # A sibling leaves the parent's rotation time as it was.
    assert rotated_at is not None
    assert rows[issued.session.session_id]["rotated_at"] == rotated_at


def test_replay_after_grace_revokes_family(db: ScratchDatabase) -> None:
    async def scenario() -> tuple[InvalidGrantError, list[IssuedTokens], Any]:
        async with async_store(db, refresh_grace=SHORT_GRACE) as store:
            bystander = await store.create("user-1")
            issued = await store.create("user-1")
            first = await store.refresh(issued.refresh_token)
            sibling = await store.refresh(issued.refresh_token)
            child = await store.refresh(first.refresh_token)
            await asyncio.sleep(SHORT_GRACE.total_seconds() + 0.1)

            with pytest.raises(InvalidGrantError) as raised:
                await store.refresh(issued.refresh_token)

            family = [issued, first, sibling, child]
            for pair in family:
                assert await store.validate(pair.access_token) is None
            with pytest.raises(InvalidGrantError) as after:
                await store.refresh(sibling.refresh_token)
            assert after.value.reason == "revoked"
            assert await store.validate(bystander.access_token) is not None
            return raised.value, family, bystander

    error, family, bystander = run(scenario)
    rows = rows_by_id(db)

    assert error.reason == "replayed"
    assert error.revoked == 4
    assert error.session_id == family[0].session.session_id
    assert "sign in again" in str(error)
    assert error.__cause__ is None
    assert error.__context__ is None
    for pair in family:
        assert_revoked(rows[pair.session.session_id])
    assert rows[bystander.session.session_id]["revoked_at"] is None


def test_concurrent_replays_rejected_cleanly(db: ScratchDatabase) -> None:
    # Two old tokens of one family replayed at once lock rows in opposite
    # orders; a deadlock, if PostgreSQL detects one, is retried.
    async def scenario() -> list[BaseException | IssuedTokens]:
        async with async_store(db, refresh_grace=SHORT_GRACE) as store:
            issued = await store.create("user-1")
            first = await store.refresh(issued.refresh_token)
            await store.refresh(first.refresh_token)
            await asyncio.sleep(SHORT_GRACE.total_seconds() + 0.1)
            outcomes = await asyncio.gather(
                store.refresh(issued.refresh_token),
                store.refresh(first.refresh_token),
                return_exceptions=True,
            )
            return list(outcomes)

    outcomes = run(scenario)

    for outcome in outcomes:
        assert isinstance(outcome, InvalidGrantError)
        assert outcome.reason in ("replayed", "revoked")
    assert all(row["revoked_at"] is not None for row in rows_by_id(db).values())


async def wait_for_lock_wait(db: ScratchDatabase) -> None:
    """Wait until a backend of ``db`` waits for a row lock."""
    with db.connect(autocommit=True) as observer:
        for _ in range(500):
            row = observer.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            if row is not None and row[0] > 0:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("no backend started waiting for a lock within 5 s")


def test_replay_deadlock_is_retried(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mcp_authdb.store.session_store")

    async def scenario() -> InvalidGrantError:
        async with async_store(db, refresh_grace=SHORT_GRACE) as store:
            issued = await store.create("user-1")
            first = await store.refresh(issued.refresh_token)
            await store.refresh(first.refresh_token)
            await asyncio.sleep(SHORT_GRACE.total_seconds() + 0.1)

            with db.connect() as blocker:
                blocker.execute(
                    "SELECT id FROM user_sessions WHERE id = %s FOR UPDATE",
                    (first.session.session_id,),
                )
                # The replay locks its own row, then waits for the blocker's
                # row while revoking the family.
                replay = asyncio.create_task(store.refresh(issued.refresh_token))
                await wait_for_lock_wait(db)
                # Waiting for the replay's row closes the cycle. PostgreSQL
                # breaks it by aborting the replay, which waited first.
                blocker.execute(
                    "UPDATE user_sessions SET updated_at = now() WHERE id = %s",
                    (issued.session.session_id,),
                )
                blocker.commit()

            with pytest.raises(InvalidGrantError) as raised:
                await replay
            return raised.value

    error = run(scenario)

    assert error.reason == "replayed"
    assert error.revoked == 3
    assert "deadlock" in caplog.text
    assert all(row["revoked_at"] is not None for row in rows_by_id(db).values())


@pytest.mark.parametrize("scope", ["user", "session"])
def test_revocation_stops_refresh_chains(db: ScratchDatabase, scope: str) -> None:
    async def scenario() -> None:
        async with async_store(db, refresh_grace=timedelta(seconds=5)) as store:
            first = await store.create("mallory")
            forks = await asyncio.gather(
                *(store.refresh(first.refresh_token) for _ in range(8))
            )
            revoked = asyncio.Event()
            issued_after: list[IssuedTokens] = []

            async def chain(pair: IssuedTokens) -> None:
                while True:
                    try:
                        pair = await store.refresh(pair.refresh_token)
                    except InvalidGrantError:
                        return
                    if revoked.is_set():
                        issued_after.append(pair)

            chains = [asyncio.create_task(chain(pair)) for pair in forks]
            await asyncio.sleep(0.3)
            if scope == "user":
                await store.revoke_user("mallory")
            else:
                await store.revoke_session(first.session.session_id)
            revoked.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*chains)

            assert issued_after == []
            assert (await store.list_sessions("mallory")) == []
            for pair in forks:
                assert await store.validate(pair.access_token) is None

    run(scenario)


def hold_user_lock(db: ScratchDatabase, user_id: str) -> psycopg.Connection[Any]:
    """Return a connection that holds ``user_id``'s lock shared, as a refresh does."""
    conn = db.connect()
    conn.execute(
        "SELECT pg_advisory_xact_lock_shared("
        "hashtextextended('mcp-authdb user ' || %s, 0))",
        (user_id,),
    )
    return conn


def test_replay_revokes_even_if_caller_gives_up(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with async_store(db, refresh_grace=timedelta(0)) as store:
            first = await store.create("victim")
            stolen = await store.refresh(first.refresh_token)

            # An in-flight refresh of the same user holds the lock, so the
            # second revocation pass waits, and the caller gives up first.
            blocker = hold_user_lock(db, "victim")
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(1):
                        await store.refresh(first.refresh_token)
            finally:
                blocker.close()

            assert await store.validate(stolen.access_token) is None
            with pytest.raises(InvalidGrantError):
                await store.refresh(stolen.refresh_token)

    run(scenario)


def test_revoke_session_follows_new_family(db: ScratchDatabase) -> None:
    with sync_store(db) as store:
        issued = store.create("legacy")
        session_id = issued.session.session_id
        with db.connect(autocommit=True) as conn:
            conn.execute(
                "UPDATE user_sessions SET family_id = NULL WHERE id = %s", (session_id,)
            )

        # The refresh waits for the row while holding the user lock shared;
        # the revocation starts meanwhile and must see the family the
        # refresh gives the row.
        row_holder = db.connect()
        row_holder.execute(
            "SELECT 1 FROM user_sessions WHERE id = %s FOR UPDATE", (session_id,)
        )
        with ThreadPoolExecutor(2) as pool:
            refreshed = pool.submit(store.refresh, issued.refresh_token)
            time.sleep(0.3)
            revoked = pool.submit(store.revoke_session, session_id)
            time.sleep(0.3)
            row_holder.close()
            new_pair = refreshed.result(timeout=10)
            assert revoked.result(timeout=10) == 2

        assert store.validate(new_pair.access_token) is None


def test_concurrent_validations_touch_once(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with async_store(db) as store:
            issued = await store.create("busy")
            sent: list[str] = []
            original = store.database.run

            async def counting_run(operation: Any, **options: Any) -> Any:
                sent.append(operation.__qualname__)
                return await original(operation, **options)

            store.database.run = counting_run  # type: ignore[method-assign]
            found = await asyncio.gather(
                *(store.validate(issued.access_token) for _ in range(50))
            )

        assert all(session is not None for session in found)
        touches = [name for name in sent if name.startswith("_StoreCore._plan_touch")]
        assert len(touches) == 1

    run(scenario)


def test_refresh_of_expired_or_revoked_rejected(db: ScratchDatabase) -> None:
    async def scenario() -> list[InvalidGrantError]:
        async with async_store(db) as store:
            expired = await store.create("user-1")
            revoked = await store.create("user-1")
            execute(
                db,
                "UPDATE user_sessions SET expires_at = now() - interval '1 hour',"
                " refresh_expires_at = now() WHERE id = %s",
                (expired.session.session_id,),
            )
            await store.revoke_session(revoked.session.session_id)
            errors = []
            for pair in (expired, revoked):
                with pytest.raises(InvalidGrantError) as raised:
                    await store.refresh(pair.refresh_token)
                errors.append(raised.value)
            return errors

    expired, revoked = run(scenario)
    rows = rows_by_id(db)

    assert expired.reason == "expired"
    assert revoked.reason == "revoked"
    assert expired.revoked == 0
    assert len(rows) == 2
    assert all(row["rotated_at"] is None for row in rows.values())


def test_expired_access_survives_cleanup_and_refreshes(db: ScratchDatabase) -> None:
    async def scenario() -> tuple[IssuedTokens, IssuedTokens]:
        async with async_store(db) as store:
            refreshable = await store.create("user-1")
            ended = await store.create("user-2")
            return refreshable, ended

    refreshable, ended = run(scenario)
    execute(
        db,
        "UPDATE user_sessions SET expires_at = now() - interval '1 minute'"
        " WHERE id = %s",
        (refreshable.session.session_id,),
    )
    execute(
        db,
        "UPDATE user_sessions SET expires_at = now() - interval '1 minute',"
        " refresh_expires_at = now() - interval '1 minute' WHERE id = %s",
        (ended.session.session_id,),
    )
    with db.connect(autocommit=True) as conn:
        row = conn.execute("SELECT cleanup_expired_sessions()").fetchone()
        batched = delete_expired_sessions(conn, batch_size=1)
        procedure = conn.execute("CALL cleanup_expired_sessions_in_batches(1)")
        procedure_row = procedure.fetchone()

    async def refresh_survivor() -> tuple[Session | None, Session | None]:
        async with async_store(db) as store:
            before = await store.validate(refreshable.access_token)
            refreshed = await store.refresh(refreshable.refresh_token)
            return before, await store.validate(refreshed.access_token)

    before, after = run(refresh_survivor)

    assert row == (1,)
    assert batched.deleted == 0
    assert procedure_row == (0,)
    assert before is None
    assert after is not None
    assert after.family_id == refreshable.session.family_id


# Minimal rows: written with the columns of the first migration only -------

_MINIMAL_INSERT = """
INSERT INTO user_sessions (user_id, access_token_hash, refresh_token_hash, expires_at)
VALUES (%s, %s, %s, now() + %s::interval)
RETURNING id
"""


def insert_minimal_row(db: ScratchDatabase, user_id: str, offset: str) -> IssuedTokens:
    """Insert a row with only the columns of the first migration; return its tokens."""
    access = new_token(TokenKind.ACCESS)
    refresh = new_token(TokenKind.REFRESH)
    with db.connect() as conn:
        row = conn.execute(
            _MINIMAL_INSERT,
            (user_id, HASHER.hash(access), HASHER.hash(refresh), offset),
        ).fetchone()
    assert row is not None
    placeholder = Session(
        session_id=row[0],
        family_id=None,
        user_id=user_id,
        scopes=(),
        subscription_level="free",
        expires_at=datetime.now(UTC),
        refresh_expires_at=datetime.now(UTC),
        created_at=datetime.now(UTC),
        last_used_at=None,
    )
    return IssuedTokens(access, refresh, placeholder)


def test_minimal_rows_end_at_expires_at(db: ScratchDatabase) -> None:
    ended = insert_minimal_row(db, "ended", "-1 second")
    live = insert_minimal_row(db, "live", "1 hour")

    async def scenario() -> tuple[Session | None, InvalidGrantError]:
        async with async_store(db) as store:
            validated = await store.validate(live.access_token)
            with pytest.raises(InvalidGrantError) as raised:
                await store.refresh(ended.refresh_token)
            return validated, raised.value

    validated, error = run(scenario)
    with db.connect() as conn:
        deleted = conn.execute("SELECT cleanup_expired_sessions()").fetchone()
        remaining = [
            row[0] for row in conn.execute("SELECT user_id FROM user_sessions")
        ]

    assert validated is not None
    assert validated.family_id is None
    assert validated.refresh_expires_at == validated.expires_at
    assert error.reason == "expired"
    assert deleted == (1,)
    assert remaining == ["live"]


def test_minimal_row_rotation_keeps_end(db: ScratchDatabase) -> None:
    minimal = insert_minimal_row(db, "user-1", "10 minutes")
    original = rows_by_id(db)[minimal.session.session_id]

    async def scenario() -> IssuedTokens:
        async with async_store(db, refresh_grace=SHORT_GRACE) as store:
            return await store.refresh(minimal.refresh_token)

    refreshed = run(scenario)
    rows = rows_by_id(db)
    old = rows[minimal.session.session_id]

    assert refreshed.session.family_id is not None
    assert old["family_id"] == refreshed.session.family_id
    assert old["rotated_at"] is not None
    assert old["refresh_expires_at"] == original["expires_at"]
    assert max(old["expires_at"], old["refresh_expires_at"]) == original["expires_at"]

    async def replay() -> InvalidGrantError:
        async with async_store(db, refresh_grace=SHORT_GRACE) as store:
            await asyncio.sleep(SHORT_GRACE.total_seconds() + 0.1)
            with pytest.raises(InvalidGrantError) as raised:
                await store.refresh(minimal.refresh_token)
            return raised.value

    error = run(replay)

    assert error.reason == "replayed"
    assert error.revoked == 2


# revocation ----------------------------------------------------------------


def test_revoke_token_revokes_family(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with async_store(db, refresh_grace=timedelta(seconds=5)) as store:
            by_access = await store.create("user-1")
            by_access_child = await store.refresh(by_access.refresh_token)
            by_refresh = await store.create("user-1")
            other = await store.create("user-1")

            assert await store.revoke_token(by_access.access_token) == 2
            assert await store.revoke_token(by_access.access_token) == 0
            assert await store.revoke_token(by_refresh.refresh_token) == 1
            for pair in (by_access, by_access_child, by_refresh):
                assert await store.validate(pair.access_token) is None
            assert await store.validate(other.access_token) is not None

    run(scenario)
    revoked = [row for row in rows_by_id(db).values() if row["revoked_at"]]

    assert len(revoked) == 3
    for row in revoked:
        assert_revoked(row)


def test_revoke_session_and_user_counts(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with async_store(db) as store:
            first = await store.create("user-1")
            await store.refresh(first.refresh_token)
            second = await store.create("user-1")
            other = await store.create("user-2")

            assert await store.revoke_session(first.session.session_id) == 2
            assert await store.revoke_session(first.session.session_id) == 0
            assert await store.revoke_session(999_999) == 0
            assert await store.revoke_user("user-1") == 1
            assert await store.revoke_user("user-1") == 0
            assert await store.revoke_user("nobody") == 0
            assert await store.validate(second.access_token) is None
            assert await store.validate(other.access_token) is not None

    run(scenario)
    with db.connect() as conn:
        deleted = conn.execute("SELECT cleanup_expired_sessions()").fetchone()
        left = [row[0] for row in conn.execute("SELECT user_id FROM user_sessions")]

    # Revoked rows have ended, so the next cleanup deletes them.
    assert deleted == (3,)
    assert left == ["user-2"]


def test_revoke_completes_row_revoked_by_hand(db: ScratchDatabase) -> None:
    async def scenario() -> int:
        async with async_store(db) as store:
            issued = await store.create("user-1")
            execute(db, "UPDATE user_sessions SET revoked_at = now()")
            return await store.revoke_token(issued.refresh_token)

    assert run(scenario) == 1
    assert_revoked(next(iter(rows_by_id(db).values())))


def test_revocation_notifies_listeners(db: ScratchDatabase) -> None:
    with db.connect(autocommit=True) as listener:
        listener.execute("LISTEN mcp_authdb_sessions")

        async def scenario() -> None:
            async with async_store(db) as store:
                await store.create("user-1")
                await store.revoke_user("user-1")

        run(scenario)
        payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]

    assert payloads == ["user-1"]


# listing, subscription levels, stats ----------------------------------------


def test_list_sessions_newest_row_per_family(db: ScratchDatabase) -> None:
    minimal_a = insert_minimal_row(db, "user-1", "1 hour")
    minimal_b = insert_minimal_row(db, "user-1", "1 hour")

    async def scenario() -> dict[str, Any]:
        async with async_store(db) as store:
            rotated = await store.create("user-1")
            plain = await store.create("user-1")
            revoked = await store.create("user-1")
            ended = await store.create("user-1")
            other = await store.create("user-2")
            child = await store.refresh(rotated.refresh_token)
            grandchild = await store.refresh(child.refresh_token)
            await store.revoke_session(revoked.session.session_id)
            execute(
                db,
                "UPDATE user_sessions SET expires_at = now(),"
                " refresh_expires_at = now() WHERE id = %s",
                (ended.session.session_id,),
            )
            return {
                "user": await store.list_sessions("user-1"),
                "all": await store.list_sessions(),
                "one": await store.list_sessions("user-1", limit=1),
                "nobody": await store.list_sessions("nobody"),
                "expected_user": [
                    grandchild.session.session_id,
                    plain.session.session_id,
                    minimal_b.session.session_id,
                    minimal_a.session.session_id,
                ],
                "other": other.session.session_id,
            }

    found = run(scenario)
    user_ids = [session.session_id for session in found["user"]]
    all_ids = [session.session_id for session in found["all"]]

    assert user_ids == found["expected_user"]
    assert set(all_ids) == {*found["expected_user"], found["other"]}
    assert [session.session_id for session in found["one"]] == user_ids[:1]
    assert found["nobody"] == []


def test_set_subscription_level(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with async_store(db) as store:
            first = await store.create("user-1")
            await store.create("user-1")
            other = await store.create("user-2")

            assert await store.set_subscription_level("user-1", "pro") == 2
            assert await store.set_subscription_level("user-1", "pro") == 0
            validated = await store.validate(first.access_token)
            refreshed = await store.refresh(first.refresh_token)
            untouched = await store.validate(other.access_token)

            assert validated is not None
            assert validated.subscription_level == "pro"
            assert refreshed.session.subscription_level == "pro"
            assert untouched is not None
            assert untouched.subscription_level == "free"

    run(scenario)


def test_stats_partition_rows(db: ScratchDatabase) -> None:
    async def scenario() -> tuple[SessionStats, SessionStats]:
        async with async_store(db) as store:
            empty = await store.stats()
            await store.create("live")
            rotated = await store.create("rotated")
            await store.refresh(rotated.refresh_token)
            revoked = await store.create("revoked")
            await store.revoke_session(revoked.session.session_id)
            ended = await store.create("ended")
            refreshable = await store.create("refreshable")
            execute(
                db,
                "UPDATE user_sessions SET expires_at = now() - interval '1 minute'"
                " WHERE id IN (%s, %s, %s)",
                (
                    rotated.session.session_id,
                    ended.session.session_id,
                    refreshable.session.session_id,
                ),
            )
            execute(
                db,
                "UPDATE user_sessions SET refresh_expires_at = now() WHERE id = %s",
                (ended.session.session_id,),
            )
            return empty, await store.stats()

    empty, stats = run(scenario)

    assert empty == SessionStats(live=0, expired=0, revoked=0)
    # live: "live", the rotated family's new row, "refreshable".
    # expired: the rotated row (access expired) and "ended".
    assert stats == SessionStats(live=3, expired=2, revoked=1)
    assert stats.total == len(rows_by_id(db))


# keys ----------------------------------------------------------------------


def test_key_rotation_keeps_old_sessions(db: ScratchDatabase) -> None:
    old_keys = TokenHasher(TokenKeys.parse(KEY_1))
    new_keys = TokenHasher(TokenKeys.parse(f"{KEY_2},{KEY_1}"))
    only_new = TokenHasher(TokenKeys.parse(KEY_2))

    async def scenario() -> dict[str, Any]:
        async with async_store(db, old_keys) as old_store:
            before = await old_store.create("user-1")
        async with async_store(db, new_keys) as new_store:
            validated = await new_store.validate(before.access_token)
            refreshed = await new_store.refresh(before.refresh_token)
            created = await new_store.create("user-2")
        async with async_store(db, old_keys) as old_store:
            old_sees_new = await old_store.validate(created.access_token)
        async with async_store(db, only_new) as dropped_store:
            dropped_sees_old = await dropped_store.validate(before.access_token)
            dropped_sees_new = await dropped_store.validate(created.access_token)
        return {
            "validated": validated,
            "refreshed": refreshed,
            "created": created,
            "old_sees_new": old_sees_new,
            "dropped_sees_old": dropped_sees_old,
            "dropped_sees_new": dropped_sees_new,
            "before": before,
        }

    found = run(scenario)
    rows = rows_by_id(db)

    assert found["validated"] is not None
    assert rows[found["before"].session.session_id]["access_token_hash"].startswith(
        "k1:"
    )
    for pair in (found["refreshed"], found["created"]):
        row = rows[pair.session.session_id]
        assert row["access_token_hash"].startswith("k2:")
        assert row["refresh_token_hash"].startswith("k2:")
    assert found["old_sees_new"] is None
    assert found["dropped_sees_old"] is None
    assert found["dropped_sees_new"] is not None


# secrecy -------------------------------------------------------------------

PASSWORD = "pw-" + "s" * 30


def full_flow(db: ScratchDatabase, url: str | None = None) -> list[str]:
    """Run every store method, replay included; return every token issued."""

    async def scenario() -> list[str]:
        async with async_store(db, url=url, refresh_grace=SHORT_GRACE) as store:
            issued = await store.create("user-1", scopes=["a:b"])
            await store.validate(issued.access_token)
            first = await store.refresh(issued.refresh_token)
            sibling = await store.refresh(issued.refresh_token)
            await asyncio.sleep(SHORT_GRACE.total_seconds() + 0.1)
            with pytest.raises(InvalidGrantError):
                await store.refresh(issued.refresh_token)
            second = await store.create("user-2")
            third = await store.create("user-2")
            await store.set_subscription_level("user-2", "pro")
            await store.list_sessions("user-2")
            await store.stats()
            await store.revoke_token(second.access_token)
            await store.revoke_session(third.session.session_id)
            fourth = await store.create("user-3")
            await store.revoke_user("user-3")
            pairs = [issued, first, sibling, second, third, fourth]
            return [token for p in pairs for token in (p.access_token, p.refresh_token)]

    return run(scenario)


def windows(secret: str, width: int = 20) -> list[str]:
    """Return every substring of ``secret`` that is ``width`` characters long."""
    return [secret[i : i + width] for i in range(len(secret) - width + 1)]


def test_database_holds_no_plaintext_token(db: ScratchDatabase) -> None:
    issued = full_flow(db)
    with db.connect() as conn:
        columns = conn.execute(
            "SELECT table_schema, table_name, column_name"
            " FROM information_schema.columns"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            " AND (data_type IN ('text', 'character varying', 'character', 'json',"
            " 'jsonb', 'ARRAY', 'USER-DEFINED'))"
        ).fetchall()
        values: list[str] = []
        for schema, table, column in columns:
            query = sql.SQL("SELECT {}::text FROM {}.{}").format(
                sql.Identifier(column), sql.Identifier(schema), sql.Identifier(table)
            )
            values.extend(row[0] for row in conn.execute(query) if row[0] is not None)

    assert ("public", "user_sessions", "access_token_hash") in columns
    assert ("public", "user_sessions", "scope") in columns
    assert len(values) > 20
    for token in issued:
        for piece in windows(token):
            assert not any(piece in value for value in values)
    for piece in windows(KEY_1.partition(":")[2]):
        assert not any(piece in value for value in values)


def test_logs_hold_no_token_hash_key_or_password(
    db: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = make_conninfo(db.url, password=PASSWORD)

    issued = full_flow(db, url)
    with db.connect() as conn:
        hashes = [
            value
            for row in conn.execute(
                "SELECT access_token_hash, refresh_token_hash FROM user_sessions"
            )
            for value in row
        ]
    text = caplog.text + "\n".join(
        f"{record.getMessage()} {record.__dict__!r}" for record in caplog.records
    )

    assert "revoked" in text
    assert len(hashes) == len(issued)
    for token in issued:
        for piece in windows(token):
            assert piece not in text
    for stored in hashes:
        for piece in windows(stored.partition(":")[2]):
            assert piece not in text
    for piece in windows(KEY_1.partition(":")[2]):
        assert piece not in text
    assert PASSWORD not in text


# input checks --------------------------------------------------------------

TOKEN = new_token(TokenKind.REFRESH)

# (method, positional arguments, keyword arguments, words the message contains)
BAD_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], list[str]]] = [
    ("create", ("u" * 256,), {}, ["user_id", "256 characters", "maximum of 255"]),
    ("create", ("",), {}, ["user_id", "empty"]),
    ("create", (42,), {}, ["user_id", "int"]),
    ("create", (None,), {}, ["user_id", "NoneType"]),
    ("create", ("u",), {"scopes": "content:read"}, ["scope", "single str"]),
    ("create", ("u",), {"scopes": [1]}, ["scope[0]", "int"]),
    ("create", ("u",), {"scopes": ["a b"]}, ["scope[0]", "RFC 6749"]),
    ("create", ("u",), {"scopes": 5}, ["scope", "int"]),
    ("create", ("u",), {"subscription_level": ""}, ["subscription_level", "empty"]),
    ("create", ("u",), {"subscription_level": "p" * 51}, ["subscription_level", "51"]),
    ("create", ("u",), {"subscription_level": 3}, ["subscription_level", "int"]),
    (
        "create",
        ("u",),
        {"access_lifetime": timedelta(0)},
        ["access_lifetime", "not positive"],
    ),
    (
        "create",
        ("u",),
        {"access_lifetime": timedelta(seconds=-1)},
        ["access_lifetime", "-1", "not positive"],
    ),
    ("create", ("u",), {"access_lifetime": 3600}, ["access_lifetime", "int"]),
    ("create", ("u",), {"access_lifetime": 1.5}, ["access_lifetime", "float"]),
    ("create", ("u",), {"access_lifetime": None}, ["access_lifetime", "NoneType"]),
    (
        "create",
        ("u",),
        {"refresh_lifetime": datetime(2030, 1, 1)},
        ["refresh_lifetime", "2030-01-01", "naive datetime"],
    ),
    (
        "create",
        ("u",),
        {"refresh_lifetime": datetime(2030, 1, 1, tzinfo=UTC)},
        ["refresh_lifetime", "aware datetime", "timedelta"],
    ),
    (
        "create",
        ("u",),
        {"refresh_lifetime": timedelta(days=40_000)},
        ["refresh_lifetime", "maximum"],
    ),
    (
        "create",
        ("u",),
        {"access_lifetime": timedelta(days=2), "refresh_lifetime": timedelta(hours=1)},
        ["access_lifetime=datetime.timedelta(days=2)", "longer than refresh_lifetime"],
    ),
    ("create", ("u",), {"scopes": ["s"] * 101}, ["more than 100 scopes"]),
    ("create", ("u",), {"scopes": iter(int, 1)}, ["more than 100 scopes"]),
    ("create", ("u",), {"scopes": ["s" * 201]}, ["scope[0]", "201 characters"]),
    ("refresh", (TOKEN,), {"access_lifetime": timedelta(0)}, ["access_lifetime"]),
    ("refresh", (None,), {"refresh_lifetime": "30d"}, ["refresh_lifetime", "str"]),
    ("revoke_session", ("1",), {}, ["session_id", "str", "not an int"]),
    ("revoke_session", (True,), {}, ["session_id", "bool"]),
    ("revoke_session", (0,), {}, ["session_id=0", "positive"]),
    ("revoke_session", (-5,), {}, ["session_id=-5", "positive"]),
    ("revoke_user", ("",), {}, ["user_id", "empty"]),
    ("revoke_user", ("u" * 300,), {}, ["user_id", "300 characters"]),
    ("revoke_user", (None,), {}, ["user_id", "NoneType"]),
    ("list_sessions", (), {"limit": 0}, ["limit=0", "from 1 to 10000"]),
    ("list_sessions", (), {"limit": "5"}, ["limit", "str"]),
    ("list_sessions", (), {"limit": 10**6}, ["limit=1000000"]),
    ("list_sessions", ("",), {}, ["user_id", "empty"]),
    ("list_sessions", (7,), {}, ["user_id", "int"]),
    ("set_subscription_level", ("u", ""), {}, ["subscription_level", "empty"]),
    ("set_subscription_level", ("u", "x" * 51), {}, ["subscription_level", "51"]),
    ("set_subscription_level", ("u", None), {}, ["subscription_level", "NoneType"]),
    ("set_subscription_level", ("u\x00", "pro"), {}, ["user_id", "NUL"]),
]


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "words"),
    BAD_CALLS,
    ids=[f"{call[0]}-{index}" for index, call in enumerate(BAD_CALLS)],
)
def test_bad_input_raises_before_sql(
    db: ScratchDatabase,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    words: list[str],
) -> None:
    store = closed_async_store(db)

    with pytest.raises(InvalidValueError) as raised:
        run(lambda: getattr(store, method)(*args, **kwargs))

    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"refresh_grace": timedelta(seconds=-1)}, ["refresh_grace", "0 or more"]),
        ({"replay_window": timedelta(0)}, ["replay_window", "positive"]),
        (
            {"refresh_grace": timedelta(hours=2), "replay_window": timedelta(hours=1)},
            ["replay_window", "shorter than", "refresh_grace"],
        ),
        ({"touch_interval": 60}, ["touch_interval", "int"]),
        ({"hasher": "k1:secret"}, ["hasher", "str", "TokenHasher"]),
    ],
)
def test_store_rejects_bad_settings(
    db: ScratchDatabase, options: dict[str, Any], words: list[str]
) -> None:
    target = resolve_target(db.url, db.settings)
    database = AsyncDatabase(target, db.settings)
    hasher = options.pop("hasher", HASHER)

    with pytest.raises(InvalidValueError) as raised:
        AsyncSessionStore(database, hasher, **options)

    for word in words:
        assert word in str(raised.value)


def test_stores_check_database_kind(db: ScratchDatabase) -> None:
    target = resolve_target(db.url, db.settings)

    with pytest.raises(InvalidValueError, match="not an AsyncDatabase"):
        AsyncSessionStore(Database(target, db.settings), HASHER)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match="not a Database"):
        SessionStore(AsyncDatabase(target, db.settings), HASHER)  # type: ignore[arg-type]


# the token cache -----------------------------------------------------------


def test_cache_serves_and_is_invalidated(db: ScratchDatabase) -> None:
    cache = TokenCache(active=True)
    typed: SessionCache = cache  # TokenCache implements the store's interface

    async def scenario() -> None:
        async with async_store(db, cache=typed) as store:
            issued = await store.create("user-1")
            first = await store.validate(issued.access_token)

            assert first is not None
            assert cache.get(HASHER.hash(issued.access_token)) == first

            # Revoked behind the store's back, with no listener running: the
            # cache still serves the session, which shows that it is asked.
            execute(db, "UPDATE user_sessions SET revoked_at = now()")
            assert await store.validate(issued.access_token) == first

            assert await store.revoke_user("user-1") == 1
            assert cache.get(HASHER.hash(issued.access_token)) is None
            assert await store.validate(issued.access_token) is None

    run(scenario)


# the blocking store --------------------------------------------------------


def test_sync_store_every_method(db: ScratchDatabase) -> None:
    with sync_store(db, refresh_grace=SHORT_GRACE) as store:
        issued = store.create("user-1", scopes=["a:b"], subscription_level="pro")
        validated = store.validate(issued.access_token)
        refreshed = store.refresh(issued.refresh_token)
        listed = store.list_sessions("user-1")
        changed = store.set_subscription_level("user-1", "team")
        stats = store.stats()
        time.sleep(SHORT_GRACE.total_seconds() + 0.1)
        with pytest.raises(InvalidGrantError) as replayed:
            store.refresh(issued.refresh_token)
        other = store.create("user-2")
        by_token = store.revoke_token(other.refresh_token)
        third = store.create("user-3")
        by_session = store.revoke_session(third.session.session_id)
        store.create("user-4")
        by_user = store.revoke_user("user-4")
        garbage = store.validate("mcpat_" + "\x00" * 43)
        after = store.validate(refreshed.access_token)

    assert validated is not None
    assert validated.scopes == ("a:b",)
    assert refreshed.session.family_id == issued.session.family_id
    assert [session.session_id for session in listed] == [refreshed.session.session_id]
    assert changed == 2
    assert stats == SessionStats(live=2, expired=0, revoked=0)
    assert replayed.value.reason == "replayed"
    assert replayed.value.revoked == 2
    assert (by_token, by_session, by_user) == (1, 1, 1)
    assert garbage is None
    assert after is None


def test_sync_concurrent_refreshes_all_work(db: ScratchDatabase) -> None:
    with sync_store(db, refresh_grace=timedelta(seconds=5)) as store:
        issued = store.create("user-1")
        with ThreadPoolExecutor(max_workers=5) as pool:
            pairs = list(pool.map(store.refresh, [issued.refresh_token] * 5))

        assert len({pair.session.session_id for pair in pairs}) == 5
        for pair in pairs:
            assert store.validate(pair.access_token) is not None
            assert store.refresh(pair.refresh_token) is not None


def test_bad_sync_input_raises_before_sql(db: ScratchDatabase) -> None:
    target = resolve_target(db.url, db.settings)
    store = SessionStore(Database(target, db.settings, wait_s=0.2), HASHER)

    with pytest.raises(InvalidValueError, match="user_id"):
        store.create("u" * 256)
    with pytest.raises(InvalidValueError, match="access_lifetime"):
        store.refresh(TOKEN, access_lifetime=timedelta(seconds=-1))
    assert store.validate(None) is None
    assert store.revoke_token(b"bytes") == 0
    with pytest.raises(ConnectionFailedError):
        store.validate(new_token(TokenKind.ACCESS))
