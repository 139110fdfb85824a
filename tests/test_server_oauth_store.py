"""The OAuth store on real PostgreSQL: clients, states, codes, grants, cleanup.

Tests drive :class:`OAuthStore` with ``asyncio.run`` inside plain test
functions. Concurrency tests open two pools on one database, standing in for
two replicas, so that competing calls run on separate connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest

from mcp_authdb.db.connection import resolve_target
from mcp_authdb.db.pool import AsyncDatabase, Operation
from mcp_authdb.errors import DatabaseError, InvalidValueError
from mcp_authdb.server.crypto import DecryptionError, Encryptor
from mcp_authdb.server.oauth_store import (
    Grant,
    GrantNotFoundError,
    OAuthStore,
    PendingAuthorization,
    RefreshTimeoutError,
    StoredCode,
    UpstreamTokens,
)
from mcp_authdb.store import (
    AsyncSessionStore,
    IssuedTokens,
    Session,
    TokenHasher,
    TokenKeys,
    TokenKind,
    new_token,
)

from conftest import ScratchDatabase

T = TypeVar("T")

KEY_1 = "k1:" + "q" * 43
KEY_2 = "k2:" + "r" * 43
HASHER = TokenHasher(TokenKeys.parse(KEY_1))
ENCRYPTOR = Encryptor(bytes(range(32)))
RESOURCE = "http://127.0.0.1:8000/mcp"
# A documentation address (RFC 5737), used only as a value of registered_from.
SOURCE = "192.0.2.10"
METADATA = {
    "redirect_uris": ["http://127.0.0.1:3000/callback"],
    "token_endpoint_auth_method": "none",
    "grant_types": ["authorization_code", "refresh_token"],
    "client_name": "Test client",
}


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


@contextlib.asynccontextmanager
async def open_store(
    db: ScratchDatabase, hasher: TokenHasher = HASHER
) -> AsyncIterator[OAuthStore]:
    """Open a pool on ``db`` and yield a store over it."""
    target = resolve_target(db.url, db.settings)
    async with AsyncDatabase(target, db.settings) as database:
        yield OAuthStore(database, ENCRYPTOR, hasher)


def query(db: ScratchDatabase, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own and return its rows."""
    with db.connect(autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def count(db: ScratchDatabase, table: str) -> int:
    return int(query(db, f"SELECT count(*) FROM {table}")[0][0])


def pending_for(client_id: str, *, expires_in: float = 600) -> PendingAuthorization:
    return PendingAuthorization(
        client_id=client_id,
        redirect_uri="http://127.0.0.1:3000/callback",
        redirect_uri_provided_explicitly=True,
        client_state="client-state-1",
        scopes=("content:read", "content:search"),
        code_challenge="E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        resource=RESOURCE,
        upstream_verifier="upstream-verifier-" + "v" * 40,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
    )


def upstream_tokens(
    *,
    access: str = "upstream-access-1",
    refresh: str | None = "upstream-refresh-1",
    age: float = 0,
    lifetime: float | None = 3600,
) -> UpstreamTokens:
    issued_at = datetime.now(UTC) - timedelta(seconds=age)
    return UpstreamTokens(
        access_token=access,
        refresh_token=refresh,
        issued_at=issued_at,
        expires_at=None
        if lifetime is None
        else issued_at + timedelta(seconds=lifetime),
    )


def code_for(
    client_id: str,
    *,
    user_id: str = "user-1",
    upstream: UpstreamTokens | None = None,
    expires_in: float = 60,
) -> StoredCode:
    return StoredCode(
        client_id=client_id,
        redirect_uri="http://127.0.0.1:3000/callback",
        redirect_uri_provided_explicitly=True,
        scopes=("content:read", "content:search"),
        code_challenge="E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        resource=RESOURCE,
        user_id=user_id,
        subscription_level="plus",
        upstream=upstream,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
    )


async def register(
    store: OAuthStore, client_id: str = "client-1", secret: str | None = None
) -> None:
    stored = await store.register_client(
        client_id, METADATA, secret, source=SOURCE, limit_per_hour=1000
    )
    assert stored


class CodeAlreadyUsed(Exception):
    """Raised by the test's ``then`` hook to roll back a sign-in."""


def consume_then(
    store: OAuthStore, code: str, results: list[StoredCode]
) -> Callable[[Session], Operation[object]]:
    """Build the ``then`` hook of a code exchange, as the provider writes it."""

    def then(session: Session) -> Operation[object]:
        assert session.family_id is not None
        stored = yield from store.consume_code_operation(code, session.family_id)
        if stored is None:
            raise CodeAlreadyUsed()
        results.append(stored)
        return stored

    return then


# Clients


def test_register_and_get_client(db: ScratchDatabase) -> None:
    async def scenario() -> Any:
        async with open_store(db) as store:
            metadata = {**METADATA, "client_secret": "must-not-be-stored"}
            stored = await store.register_client(
                "client-1",
                metadata,
                "client-secret-1",
                source=SOURCE,
                limit_per_hour=5,
            )
            return stored, await store.get_client("client-1")

    stored, client = run(scenario)

    assert stored is True
    assert client is not None
    assert client.client_id == "client-1"
    assert client.metadata == METADATA
    assert client.client_secret == "client-secret-1"
    assert client.kind == "registered"
    assert client.document_expires_at is None
    assert client.created_at.tzinfo is not None
    assert "client-secret-1" not in repr(client)
    [(raw_secret, raw_metadata, source)] = query(
        db,
        "SELECT client_secret_encrypted, metadata::text, registered_from "
        "FROM oauth_clients",
    )
    assert b"client-secret-1" not in bytes(raw_secret)
    assert "must-not-be-stored" not in raw_metadata
    assert source == SOURCE


def test_public_client_has_no_secret(db: ScratchDatabase) -> None:
    async def scenario() -> Any:
        async with open_store(db) as store:
            await register(store, "public-1")
            return await store.get_client("public-1")

    client = run(scenario)

    assert client is not None
    assert client.client_secret is None
    assert query(db, "SELECT client_secret_encrypted FROM oauth_clients") == [(None,)]


def test_unknown_client_is_none(db: ScratchDatabase) -> None:
    async def scenario() -> Any:
        async with open_store(db) as store:
            return await store.get_client("nobody")

    assert run(scenario) is None


def test_duplicate_client_id_rejected(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with open_store(db) as store:
            await register(store, "client-1")
            await register(store, "client-1")

    with pytest.raises(DatabaseError) as raised:
        run(scenario)

    assert raised.value.sqlstate == "23505"


def test_secret_moved_to_other_client_fails(db: ScratchDatabase) -> None:
    async def setup() -> None:
        async with open_store(db) as store:
            await register(store, "client-a", "secret-a")
            await register(store, "client-b", "secret-b")

    async def read_b() -> Any:
        async with open_store(db) as store:
            return await store.get_client("client-b")

    run(setup)
    query(
        db,
        "UPDATE oauth_clients SET client_secret_encrypted = ("
        "SELECT client_secret_encrypted FROM oauth_clients WHERE client_id = "
        "'client-a') WHERE client_id = 'client-b'",
    )

    with pytest.raises(DecryptionError) as raised:
        run(read_b)

    assert "secret-a" not in str(raised.value)
    assert "client-b" not in str(raised.value)


def test_registration_limit_per_source(db: ScratchDatabase) -> None:
    async def scenario() -> list[bool]:
        async with open_store(db) as store:
            outcomes = []
            for number in range(4):
                outcomes.append(
                    await store.register_client(
                        f"client-{number}",
                        METADATA,
                        None,
                        source=SOURCE,
                        limit_per_hour=3,
                    )
                )
            outcomes.append(
                await store.register_client(
                    "other-source",
                    METADATA,
                    None,
                    source="192.0.2.11",
                    limit_per_hour=3,
                )
            )
            return outcomes

    outcomes = run(scenario)

    assert outcomes == [True, True, True, False, True]
    assert count(db, "oauth_clients") == 4
    assert query(db, "SELECT 1 FROM oauth_clients WHERE client_id = 'client-3'") == []


def test_registrations_older_than_hour_not_counted(db: ScratchDatabase) -> None:
    async def register_three() -> list[bool]:
        async with open_store(db) as store:
            return [
                await store.register_client(
                    f"{prefix}-{number}",
                    METADATA,
                    None,
                    source=SOURCE,
                    limit_per_hour=2,
                )
                for prefix in ["later"]
                for number in range(3)
            ]

    query(
        db,
        "INSERT INTO oauth_clients (client_id, metadata, kind, registered_from, "
        "created_at) SELECT 'old-' || n, '{}', 'registered', %s, "
        "now() - interval '61 minutes' FROM generate_series(1, 5) AS n",
        (SOURCE,),
    )

    assert run(register_three) == [True, True, False]


def test_zero_limit_rejects_all(db: ScratchDatabase) -> None:
    async def scenario() -> bool:
        async with open_store(db) as store:
            return await store.register_client(
                "client-1", METADATA, None, source=SOURCE, limit_per_hour=0
            )

    assert run(scenario) is False
    assert count(db, "oauth_clients") == 0


@pytest.mark.parametrize(
    ("source", "limit", "message"),
    [
        pytest.param(SOURCE, -1, "limit_per_hour=-1", id="negative-limit"),
        pytest.param("", 5, "source has", id="empty-source"),
        pytest.param("x" * 65, 5, "source has", id="long-source"),
    ],
)
def test_invalid_registration_arguments_rejected(
    db: ScratchDatabase, source: str, limit: int, message: str
) -> None:
    async def scenario() -> bool:
        async with open_store(db) as store:
            return await store.register_client(
                "client-1", METADATA, None, source=source, limit_per_hour=limit
            )

    with pytest.raises(InvalidValueError, match=message):
        run(scenario)
    assert count(db, "oauth_clients") == 0


def test_concurrent_registrations_respect_limit(db: ScratchDatabase) -> None:
    # Two pools stand in for two replicas. 24 registrations from one source
    # race for a limit of 5, and the advisory lock makes them count in turn.
    async def scenario() -> list[bool]:
        async with open_store(db) as first, open_store(db) as second:
            calls = [
                store.register_client(
                    f"client-{number}-{replica}",
                    METADATA,
                    None,
                    source=SOURCE,
                    limit_per_hour=5,
                )
                for number in range(12)
                for replica, store in enumerate((first, second))
            ]
            return list(await asyncio.gather(*calls))

    outcomes = run(scenario)

    assert outcomes.count(True) == 5
    assert count(db, "oauth_clients") == 5


def test_metadata_document_upsert(db: ScratchDatabase) -> None:
    url = "https://client.example/metadata.json"
    first_expiry = datetime.now(UTC) + timedelta(hours=1)
    second_expiry = datetime.now(UTC) + timedelta(hours=2)

    async def scenario() -> Any:
        async with open_store(db) as store:
            await store.put_metadata_document(url, {"client_id": url}, first_expiry)
            first = await store.get_client(url)
            await store.put_metadata_document(
                url, {"client_id": url, "client_name": "New"}, second_expiry
            )
            return first, await store.get_client(url)

    first, second = run(scenario)

    assert first.kind == "metadata_document"
    assert first.metadata == {"client_id": url}
    assert first.document_expires_at == first_expiry
    assert first.client_secret is None
    assert second.metadata == {"client_id": url, "client_name": "New"}
    assert second.document_expires_at == second_expiry
    assert second.created_at == first.created_at
    assert count(db, "oauth_clients") == 1


def test_metadata_document_leaves_registered_client(db: ScratchDatabase) -> None:
    async def scenario() -> Any:
        async with open_store(db) as store:
            await register(store, "client-1", "secret-1")
            await store.put_metadata_document(
                "client-1", {"client_id": "client-1"}, datetime.now(UTC)
            )
            return await store.get_client("client-1")

    client = run(scenario)

    assert client.kind == "registered"
    assert client.metadata == METADATA
    assert client.client_secret == "secret-1"


def test_naive_expiry_rejected(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with open_store(db) as store:
            await store.put_metadata_document("https://a.example/c", {}, datetime.now())

    with pytest.raises(InvalidValueError, match="no time zone"):
        run(scenario)


# Pending authorizations


def test_pending_taken_once(db: ScratchDatabase) -> None:
    state = new_token(TokenKind.STATE)
    pending = pending_for("client-1")

    async def scenario() -> Any:
        async with open_store(db) as store:
            await register(store)
            await store.put_pending(state, pending)
            return await store.take_pending(state), await store.take_pending(state)

    first, second = run(scenario)

    assert first == pending
    assert second is None
    assert count(db, "oauth_pending_authorizations") == 0


def test_approved_pending_not_taken(db: ScratchDatabase) -> None:
    # An approved sign-in is used up only with its browser binding, which
    # the consent step checks; take_pending must not get around that.
    state = new_token(TokenKind.STATE)

    async def scenario() -> Any:
        async with open_store(db) as store:
            await register(store)
            await store.put_pending(state, pending_for("client-1"))
            query(
                db,
                "UPDATE oauth_pending_authorizations "
                "SET consented_at = now(), binding_hash = 'k1:binding'",
            )
            return await store.take_pending(state)

    assert run(scenario) is None
    assert count(db, "oauth_pending_authorizations") == 1


def test_pending_stores_hash_and_ciphertext(db: ScratchDatabase) -> None:
    state = new_token(TokenKind.STATE)
    pending = pending_for("client-1")

    async def scenario() -> None:
        async with open_store(db) as store:
            await register(store)
            await store.put_pending(state, pending)

    run(scenario)

    [(state_hash, verifier)] = query(
        db,
        "SELECT state_hash, upstream_verifier_encrypted "
        "FROM oauth_pending_authorizations",
    )
    assert state_hash == HASHER.hash(state)
    assert state not in state_hash
    assert pending.upstream_verifier.encode() not in bytes(verifier)
    assert pending.upstream_verifier not in repr(pending)


def test_expired_pending_not_taken(db: ScratchDatabase) -> None:
    state = new_token(TokenKind.STATE)

    async def scenario() -> Any:
        async with open_store(db) as store:
            await register(store)
            await store.put_pending(state, pending_for("client-1", expires_in=-1))
            return await store.take_pending(state)

    assert run(scenario) is None
    # Cleanup deletes it; taking it leaves it in place.
    assert count(db, "oauth_pending_authorizations") == 1


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("not-a-token", id="malformed"),
        pytest.param(new_token(TokenKind.ACCESS), id="access-token"),
        pytest.param(new_token(TokenKind.CODE), id="code"),
    ],
)
def test_take_pending_other_values_none(db: ScratchDatabase, value: str) -> None:
    async def scenario() -> Any:
        async with open_store(db) as store:
            return await store.take_pending(value)

    assert run(scenario) is None


def test_put_pending_needs_state_token(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with open_store(db) as store:
            await register(store)
            await store.put_pending(new_token(TokenKind.CODE), pending_for("client-1"))

    with pytest.raises(InvalidValueError, match=r"TokenKind\.STATE"):
        run(scenario)


def test_pending_found_after_key_rotation(db: ScratchDatabase) -> None:
    state = new_token(TokenKind.STATE)
    rotated = TokenHasher(TokenKeys.parse(f"{KEY_2},{KEY_1}"))

    async def scenario() -> Any:
        async with open_store(db) as store:
            await register(store)
            await store.put_pending(state, pending_for("client-1"))
        async with open_store(db, rotated) as store:
            return await store.take_pending(state)

    assert run(scenario) is not None


def test_verifier_moved_to_other_state_fails(db: ScratchDatabase) -> None:
    state_a = new_token(TokenKind.STATE)
    state_b = new_token(TokenKind.STATE)

    async def setup() -> None:
        async with open_store(db) as store:
            await register(store)
            await store.put_pending(state_a, pending_for("client-1"))
            await store.put_pending(state_b, pending_for("client-1"))

    async def take_b() -> Any:
        async with open_store(db) as store:
            return await store.take_pending(state_b)

    run(setup)
    query(
        db,
        "UPDATE oauth_pending_authorizations SET upstream_verifier_encrypted = ("
        "SELECT upstream_verifier_encrypted FROM oauth_pending_authorizations "
        "WHERE state_hash = %s) WHERE state_hash = %s",
        (HASHER.hash(state_a), HASHER.hash(state_b)),
    )

    with pytest.raises(DecryptionError, match="upstream-verifier"):
        run(take_b)


def test_concurrent_take_pending_single_winner(db: ScratchDatabase) -> None:
    states = [new_token(TokenKind.STATE) for _ in range(5)]

    async def scenario() -> list[list[PendingAuthorization | None]]:
        async with open_store(db) as first, open_store(db) as second:
            await register(first)
            for state in states:
                await first.put_pending(state, pending_for("client-1"))
            rounds = []
            for state in states:
                takes = [store.take_pending(state) for store in (first, second) * 3]
                rounds.append(list(await asyncio.gather(*takes)))
            return rounds

    rounds = run(scenario)

    for outcomes in rounds:
        winners = [outcome for outcome in outcomes if outcome is not None]
        assert len(winners) == 1
    assert count(db, "oauth_pending_authorizations") == 0


# Authorization codes


def test_peek_code_does_not_use_it(db: ScratchDatabase) -> None:
    code = new_token(TokenKind.CODE)
    stored = code_for("client-1", upstream=upstream_tokens())

    async def scenario() -> Any:
        async with open_store(db) as store:
            await register(store)
            await store.put_code(code, stored)
            return await store.peek_code(code), await store.peek_code(code)

    first, second = run(scenario)

    assert first == stored
    assert second == stored
    [(code_hash, access, refresh)] = query(
        db,
        "SELECT code_hash, upstream_access_encrypted, upstream_refresh_encrypted "
        "FROM oauth_codes",
    )
    assert code_hash == HASHER.hash(code)
    assert b"upstream-access-1" not in bytes(access)
    assert b"upstream-refresh-1" not in bytes(refresh)


def test_peek_returns_expired_code(db: ScratchDatabase) -> None:
    code = new_token(TokenKind.CODE)
    stored = code_for("client-1", expires_in=-5)

    async def scenario() -> Any:
        async with open_store(db) as store:
            await register(store)
            await store.put_code(code, stored)
            return await store.peek_code(code)

    peeked = run(scenario)

    assert peeked == stored
    assert peeked.upstream is None
    assert peeked.expires_at < datetime.now(UTC)


def test_peek_other_values_none(db: ScratchDatabase) -> None:
    async def scenario() -> Any:
        async with open_store(db) as store:
            return [
                await store.peek_code("mcpac_short"),
                await store.peek_code(new_token(TokenKind.STATE)),
                await store.peek_code(new_token(TokenKind.CODE)),
            ]

    assert run(scenario) == [None, None, None]


def test_peek_used_code_names_family(db: ScratchDatabase) -> None:
    code = new_token(TokenKind.CODE)

    async def scenario() -> tuple[Any, Any]:
        async with open_store(db) as store:
            await register(store)
            await store.put_code(code, code_for("client-1"))
            issued = await AsyncSessionStore(store.database, HASHER).create(
                "user-1", then=consume_then(store, code, [])
            )
            peeked = await store.peek_code(code)
            assert issued.session.family_id is not None
            return peeked, await store.family_session_id(issued.session.family_id)

    peeked, session_id = run(scenario)

    assert peeked.used_at is not None
    [(family_id, row_id)] = query(db, "SELECT family_id, id FROM user_sessions")
    assert peeked.family_id == family_id
    assert session_id == row_id


def test_family_session_id_unknown(db: ScratchDatabase) -> None:
    async def scenario() -> Any:
        async with open_store(db) as store:
            return await store.family_session_id(uuid.uuid4())

    assert run(scenario) is None


def test_impossible_client_ids_unknown(db: ScratchDatabase) -> None:
    async def scenario() -> list[Any]:
        async with open_store(db) as store:
            return [
                await store.get_client(client_id)
                for client_id in ("", "a\x00b", "\x00", "c" * 2049)
            ]

    assert run(scenario) == [None, None, None, None]


def test_put_code_needs_code_token(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with open_store(db) as store:
            await register(store)
            await store.put_code(new_token(TokenKind.STATE), code_for("client-1"))

    with pytest.raises(InvalidValueError, match=r"TokenKind\.CODE"):
        run(scenario)


def test_code_exchange_writes_grant(db: ScratchDatabase) -> None:
    code = new_token(TokenKind.CODE)
    tokens = upstream_tokens()
    stored = code_for("client-1", upstream=tokens)
    consumed: list[StoredCode] = []

    async def scenario() -> tuple[IssuedTokens, Grant | None]:
        async with open_store(db) as store:
            await register(store)
            await store.put_code(code, stored)
            sessions = AsyncSessionStore(store.database, HASHER)
            issued = await sessions.create(
                stored.user_id,
                scopes=stored.scopes,
                subscription_level=stored.subscription_level,
                then=consume_then(store, code, consumed),
            )
            assert issued.session.family_id is not None
            return issued, await store.get_grant(issued.session.family_id)

    issued, grant = run(scenario)

    [used] = consumed
    assert used.family_id == issued.session.family_id
    assert used.used_at is not None
    assert dataclasses.replace(used, used_at=None, family_id=None) == stored
    assert grant == Grant(
        family_id=issued.session.family_id,  # type: ignore[arg-type]
        client_id="client-1",
        resource=RESOURCE,
        user_id="user-1",
        upstream=tokens,
    )
    # The used code stays until it expires, marked with its family.
    [(used_at, family_id)] = query(db, "SELECT used_at, family_id FROM oauth_codes")
    assert used_at is not None
    assert family_id == issued.session.family_id
    [(first_session_at,)] = query(db, "SELECT first_session_at FROM oauth_clients")
    assert first_session_at is not None


def test_used_code_rolls_back_session(db: ScratchDatabase) -> None:
    code = new_token(TokenKind.CODE)
    consumed: list[StoredCode] = []

    async def scenario() -> None:
        async with open_store(db) as store:
            await register(store)
            await store.put_code(code, code_for("client-1"))
            sessions = AsyncSessionStore(store.database, HASHER)
            then = consume_then(store, code, consumed)
            await sessions.create("user-1", then=then)
            await sessions.create("user-1", then=then)

    with pytest.raises(CodeAlreadyUsed):
        run(scenario)

    assert len(consumed) == 1
    assert count(db, "user_sessions") == 1
    assert count(db, "oauth_grants") == 1


def test_expired_code_not_consumed(db: ScratchDatabase) -> None:
    code = new_token(TokenKind.CODE)

    async def scenario() -> None:
        async with open_store(db) as store:
            await register(store)
            await store.put_code(code, code_for("client-1", expires_in=-1))
            sessions = AsyncSessionStore(store.database, HASHER)
            await sessions.create("user-1", then=consume_then(store, code, []))

    with pytest.raises(CodeAlreadyUsed):
        run(scenario)

    assert count(db, "user_sessions") == 0
    assert count(db, "oauth_grants") == 0
    assert count(db, "oauth_codes") == 1
    assert query(db, "SELECT first_session_at FROM oauth_clients") == [(None,)]


def test_malformed_code_consumes_nothing(db: ScratchDatabase) -> None:
    async def scenario() -> Any:
        async with open_store(db) as store:
            operation = store.consume_code_operation("mcpac_bad", uuid.uuid4())
            return await store.database.run(lambda: operation)

    assert run(scenario) is None


def test_concurrent_code_exchange_single_winner(db: ScratchDatabase) -> None:
    codes = [new_token(TokenKind.CODE) for _ in range(4)]

    async def scenario() -> list[list[IssuedTokens | BaseException]]:
        async with open_store(db) as first, open_store(db) as second:
            await register(first)
            for code in codes:
                await first.put_code(code, code_for("client-1"))
            rounds = []
            for code in codes:
                exchanges = [
                    AsyncSessionStore(store.database, HASHER).create(
                        "user-1", then=consume_then(store, code, [])
                    )
                    for store in (first, second) * 2
                ]
                rounds.append(
                    list(await asyncio.gather(*exchanges, return_exceptions=True))
                )
            return rounds

    rounds = run(scenario)

    for outcomes in rounds:
        issued = [o for o in outcomes if isinstance(o, IssuedTokens)]
        rejected = [o for o in outcomes if isinstance(o, CodeAlreadyUsed)]
        assert len(issued) == 1, outcomes
        assert len(rejected) == 3, outcomes
    assert count(db, "user_sessions") == len(codes)
    assert count(db, "oauth_grants") == len(codes)
    marked = query(
        db,
        "SELECT count(*) FROM oauth_codes c JOIN user_sessions s "
        "ON s.family_id = c.family_id WHERE c.used_at IS NOT NULL",
    )
    assert marked == [(len(codes),)]


# Grants and upstream refresh


def insert_grant(
    db: ScratchDatabase, store_tokens: UpstreamTokens | None, user_id: str = "user-1"
) -> uuid.UUID:
    """Write a client, a code and its grant through the store; return the family."""
    code = new_token(TokenKind.CODE)

    async def scenario() -> uuid.UUID:
        async with open_store(db) as store:
            if await store.get_client("client-1") is None:
                await register(store)
            await store.put_code(
                code, code_for("client-1", user_id=user_id, upstream=store_tokens)
            )
            family_id = uuid.uuid4()
            await store.database.run(
                lambda: store.consume_code_operation(code, family_id)
            )
            return family_id

    return run(scenario)


def refresh_without_upstream_call(
    db: ScratchDatabase, family_id: uuid.UUID, threshold: float
) -> UpstreamTokens:
    """Return what ``refresh_upstream`` returns with a callback that must not run.

    The callback fails the test if the store calls it.
    """

    async def refresh(current: UpstreamTokens) -> UpstreamTokens:
        raise AssertionError("refresh must not be called")

    async def scenario() -> UpstreamTokens:
        async with open_store(db) as store:
            return await store.refresh_upstream(family_id, refresh, threshold)

    return run(scenario)


def test_get_grant_unknown_is_none(db: ScratchDatabase) -> None:
    async def scenario() -> Any:
        async with open_store(db) as store:
            return await store.get_grant(uuid.uuid4())

    assert run(scenario) is None


def test_upstream_tokens_repr_hides_tokens() -> None:
    text = repr(upstream_tokens())

    assert "upstream-access-1" not in text
    assert "upstream-refresh-1" not in text
    assert "issued_at" in text


def test_tokens_bound_to_user(db: ScratchDatabase) -> None:
    family_a = insert_grant(db, upstream_tokens(access="access-a"), user_id="user-a")
    family_b = insert_grant(db, upstream_tokens(access="access-b"), user_id="user-b")
    query(
        db,
        "UPDATE oauth_grants SET upstream_access_encrypted = (SELECT "
        "upstream_access_encrypted FROM oauth_grants WHERE family_id = %s) "
        "WHERE family_id = %s",
        (family_a, family_b),
    )

    async def scenario() -> Any:
        async with open_store(db) as store:
            return await store.get_grant(family_b)

    with pytest.raises(DecryptionError, match="upstream-access"):
        run(scenario)


def test_fresh_tokens_not_refreshed(db: ScratchDatabase) -> None:
    tokens = upstream_tokens(age=3000, lifetime=3600)
    family_id = insert_grant(db, tokens)
    calls: list[UpstreamTokens] = []

    async def refresh(current: UpstreamTokens) -> UpstreamTokens:
        calls.append(current)
        return upstream_tokens(access="new")

    async def scenario() -> UpstreamTokens:
        async with open_store(db) as store:
            return await store.refresh_upstream(family_id, refresh, 0.9)

    assert run(scenario) == tokens
    assert calls == []


def test_due_tokens_refreshed_and_stored(db: ScratchDatabase) -> None:
    tokens = upstream_tokens(age=3000, lifetime=3600)
    family_id = insert_grant(db, tokens)
    fresh = upstream_tokens(access="access-2", refresh="refresh-2")
    calls: list[UpstreamTokens] = []

    async def refresh(current: UpstreamTokens) -> UpstreamTokens:
        calls.append(current)
        return fresh

    async def scenario() -> tuple[UpstreamTokens, Grant | None]:
        async with open_store(db) as store:
            returned = await store.refresh_upstream(family_id, refresh, 0.5)
            return returned, await store.get_grant(family_id)

    returned, grant = run(scenario)

    assert calls == [tokens]
    assert returned == fresh
    assert grant is not None
    assert grant.upstream == fresh
    [(updated_at, created_at)] = query(
        db, "SELECT updated_at, created_at FROM oauth_grants"
    )
    assert updated_at > created_at


@pytest.mark.parametrize(
    "tokens",
    [
        pytest.param(upstream_tokens(refresh=None, age=7200), id="no-refresh-token"),
        pytest.param(upstream_tokens(lifetime=None, age=7200), id="no-expiry"),
    ],
)
def test_tokens_without_means_not_refreshed(
    db: ScratchDatabase, tokens: UpstreamTokens
) -> None:
    family_id = insert_grant(db, tokens)

    assert refresh_without_upstream_call(db, family_id, 0.5) == tokens


def test_failed_refresh_keeps_tokens(db: ScratchDatabase) -> None:
    tokens = upstream_tokens(age=3500, lifetime=3600)
    family_id = insert_grant(db, tokens)

    async def refresh(current: UpstreamTokens) -> UpstreamTokens:
        raise RuntimeError("upstream said invalid_grant")

    async def scenario() -> Any:
        async with open_store(db) as store:
            with pytest.raises(RuntimeError, match="invalid_grant"):
                await store.refresh_upstream(family_id, refresh, 0.9)
            return await store.get_grant(family_id)

    grant = run(scenario)

    assert grant.upstream == tokens
    # The connection went back to the pool outside a transaction.
    assert query(db, "SELECT count(*) FROM pg_locks WHERE locktype = 'tuple'") == [(0,)]


def test_concurrent_refresh_calls_upstream_once(db: ScratchDatabase) -> None:
    family_id = insert_grant(db, upstream_tokens(age=3500, lifetime=3600))
    calls: list[UpstreamTokens] = []

    async def refresh(current: UpstreamTokens) -> UpstreamTokens:
        calls.append(current)
        # Long enough for the other callers to reach the row lock.
        await asyncio.sleep(0.3)
        return upstream_tokens(access=f"access-{len(calls) + 1}")

    async def scenario() -> list[UpstreamTokens]:
        async with open_store(db) as first, open_store(db) as second:
            refreshes = [
                store.refresh_upstream(family_id, refresh, 0.9)
                for store in (first, second) * 2
            ]
            return list(await asyncio.gather(*refreshes))

    results = run(scenario)

    assert len(calls) == 1
    assert {result.access_token for result in results} == {"access-2"}


def test_refresh_waiters_hold_no_connections(db: ScratchDatabase) -> None:
    family_id = insert_grant(db, upstream_tokens(age=3500, lifetime=3600))
    other_family = insert_grant(db, upstream_tokens(access="other"), user_id="user-2")
    small_pool = dataclasses.replace(db.settings, pool_size=2)
    target = resolve_target(db.url, small_pool)
    calls: list[UpstreamTokens] = []
    release = asyncio.Event()

    async def refresh(current: UpstreamTokens) -> UpstreamTokens:
        calls.append(current)
        await release.wait()
        return upstream_tokens(access="access-2")

    async def scenario() -> tuple[Grant | None, list[UpstreamTokens]]:
        async with AsyncDatabase(target, small_pool) as database:
            store = OAuthStore(database, ENCRYPTOR, HASHER)
            refreshes = [
                asyncio.create_task(store.refresh_upstream(family_id, refresh, 0.9))
                for _ in range(6)
            ]
            while not calls:
                await asyncio.sleep(0.01)
            # Let the other callers find the refresh in progress.
            await asyncio.sleep(0.3)
            try:
                # The refresher uses one of the two connections and the
                # waiters use none, so another family's read gets the other.
                other = await asyncio.wait_for(store.get_grant(other_family), 2)
            finally:
                release.set()
            return other, list(await asyncio.gather(*refreshes))

    other, results = run(scenario)

    assert other is not None
    assert other.upstream is not None
    assert other.upstream.access_token == "other"
    assert len(calls) == 1
    assert {result.access_token for result in results} == {"access-2"}


def test_refresh_wait_is_bounded(db: ScratchDatabase) -> None:
    family_id = insert_grant(db, upstream_tokens(age=3500, lifetime=3600))
    release = asyncio.Event()

    async def refresh(current: UpstreamTokens) -> UpstreamTokens:
        await release.wait()
        return upstream_tokens(access="access-2")

    async def scenario() -> UpstreamTokens:
        async with open_store(db) as first, open_store(db) as second:
            impatient = OAuthStore(
                second.database, ENCRYPTOR, HASHER, refresh_wait_s=0.3
            )
            refresher = asyncio.create_task(
                first.refresh_upstream(family_id, refresh, 0.9)
            )
            await asyncio.sleep(0.2)
            try:
                with pytest.raises(RefreshTimeoutError) as raised:
                    await impatient.refresh_upstream(family_id, refresh, 0.9)
                assert raised.value.family_id == family_id
            finally:
                release.set()
            return await refresher

    assert run(scenario).access_token == "access-2"


def test_refresh_wait_must_be_positive(db: ScratchDatabase) -> None:
    async def scenario() -> None:
        async with open_store(db) as store:
            OAuthStore(store.database, ENCRYPTOR, HASHER, refresh_wait_s=0)

    with pytest.raises(InvalidValueError, match="refresh_wait_s=0"):
        run(scenario)


def test_refreshed_tokens_kept_when_connection_lost(db: ScratchDatabase) -> None:
    family_id = insert_grant(db, upstream_tokens(age=3500, lifetime=3600))
    fresh = upstream_tokens(access="access-2", refresh="refresh-2")

    async def refresh(current: UpstreamTokens) -> UpstreamTokens:
        # The refresher's backend has the family's advisory lock. Ending it
        # loses the transaction in which the new tokens were to be stored.
        terminated = query(
            db,
            "SELECT pg_terminate_backend(pid) FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted",
        )
        assert terminated == [(True,)]
        return fresh

    async def scenario() -> tuple[UpstreamTokens, Grant | None]:
        async with open_store(db) as store:
            returned = await store.refresh_upstream(family_id, refresh, 0.9)
            return returned, await store.get_grant(family_id)

    returned, grant = run(scenario)

    assert returned == fresh
    assert grant is not None
    assert grant.upstream == fresh


def test_refresh_without_grant_raises(db: ScratchDatabase) -> None:
    family_id = uuid.uuid4()

    with pytest.raises(GrantNotFoundError) as raised:
        refresh_without_upstream_call(db, family_id, 0.9)

    assert raised.value.family_id == family_id


def test_refresh_of_grant_without_tokens_raises(db: ScratchDatabase) -> None:
    family_id = insert_grant(db, None)

    with pytest.raises(GrantNotFoundError, match="contains no upstream tokens"):
        refresh_without_upstream_call(db, family_id, 0.9)


@pytest.mark.parametrize("threshold", [0, -0.5, 1.5])
def test_refresh_threshold_checked(db: ScratchDatabase, threshold: float) -> None:
    with pytest.raises(InvalidValueError, match="threshold"):
        refresh_without_upstream_call(db, uuid.uuid4(), threshold)


# Cleanup


def insert_client(
    db: ScratchDatabase,
    client_id: str,
    *,
    kind: str = "registered",
    age: str = "2 days",
    used: bool = False,
    document_expired: str | None = None,
) -> None:
    query(
        db,
        "INSERT INTO oauth_clients (client_id, metadata, kind, created_at, "
        "first_session_at, document_expires_at) VALUES (%s, '{}', %s, "
        "now() - %s::interval, CASE WHEN %s THEN now() END, "
        "now() - %s::interval)",
        (client_id, kind, age, used, document_expired),
    )


def insert_family(
    db: ScratchDatabase,
    client_id: str,
    *,
    refresh_ends_in: str,
    revoked: bool = False,
) -> uuid.UUID:
    """Write a session row and its grant; the access token has expired."""
    family_id = uuid.uuid4()
    query(
        db,
        "INSERT INTO user_sessions (user_id, access_token_hash, "
        "refresh_token_hash, expires_at, refresh_expires_at, family_id, "
        "revoked_at) VALUES ('user-1', 'a-' || %s, 'r-' || %s, "
        "now() - interval '1 hour', now() + %s::interval, %s, "
        "CASE WHEN %s THEN now() END)",
        (str(family_id), str(family_id), refresh_ends_in, family_id, revoked),
    )
    query(
        db,
        "INSERT INTO oauth_grants (family_id, client_id, resource, user_id) "
        "VALUES (%s, %s, %s, 'user-1')",
        (family_id, client_id, RESOURCE),
    )
    return family_id


def cleanup(db: ScratchDatabase, unused_age: timedelta = timedelta(days=1)) -> int:
    async def scenario() -> int:
        async with open_store(db) as store:
            return await store.cleanup(unused_age)

    return run(scenario)


def client_ids(db: ScratchDatabase) -> set[str]:
    return {row[0] for row in query(db, "SELECT client_id FROM oauth_clients")}


def test_cleanup_deletes_expired_states_and_codes(db: ScratchDatabase) -> None:
    insert_client(db, "client-1", used=True)
    for offset, name in [("-1 minute", "old"), ("1 minute", "new")]:
        query(
            db,
            "INSERT INTO oauth_pending_authorizations (state_hash, client_id, "
            "redirect_uri, redirect_uri_provided_explicitly, scopes, "
            "code_challenge, resource, upstream_verifier_encrypted, expires_at) "
            "VALUES (%s, 'client-1', 'x', true, '{}', 'c', 'r', '\\x00', "
            "now() + %s::interval)",
            (name, offset),
        )
        query(
            db,
            "INSERT INTO oauth_codes (code_hash, client_id, redirect_uri, "
            "redirect_uri_provided_explicitly, scopes, code_challenge, resource, "
            "user_id, subscription_level, expires_at) VALUES (%s, 'client-1', "
            "'x', true, '{}', 'c', 'r', 'u', 'free', now() + %s::interval)",
            (name, offset),
        )

    deleted = cleanup(db)

    assert deleted == 2
    assert query(db, "SELECT state_hash FROM oauth_pending_authorizations") == [
        ("new",)
    ]
    assert query(db, "SELECT code_hash FROM oauth_codes") == [("new",)]


def test_cleanup_deletes_used_codes_once_expired(db: ScratchDatabase) -> None:
    insert_client(db, "client-1", used=True)
    for offset, name in [("-1 minute", "old"), ("1 minute", "new")]:
        query(
            db,
            "INSERT INTO oauth_codes (code_hash, client_id, redirect_uri, "
            "redirect_uri_provided_explicitly, scopes, code_challenge, resource, "
            "user_id, subscription_level, expires_at, used_at, family_id) "
            "VALUES (%s, 'client-1', 'x', true, '{}', 'c', 'r', 'u', 'free', "
            "now() + %s::interval, now(), %s)",
            (name, offset, uuid.uuid4()),
        )

    deleted = cleanup(db)

    assert deleted == 1
    assert query(db, "SELECT code_hash FROM oauth_codes") == [("new",)]


def test_cleanup_deletes_grants_without_sessions(db: ScratchDatabase) -> None:
    insert_client(db, "client-1", used=True)
    live_family = insert_family(db, "client-1", refresh_ends_in="1 day")
    ended = insert_family(db, "client-1", refresh_ends_in="-1 day")
    query(db, "DELETE FROM user_sessions WHERE family_id = %s", (ended,))

    deleted = cleanup(db)

    assert deleted == 1
    assert query(db, "SELECT family_id FROM oauth_grants") == [(live_family,)]


def test_cleanup_deletes_unused_registered_clients(db: ScratchDatabase) -> None:
    insert_client(db, "old-unused", age="2 days")
    insert_client(db, "young-unused", age="1 hour")
    insert_client(db, "old-used", age="30 days", used=True)

    deleted = cleanup(db)

    assert deleted == 1
    assert client_ids(db) == {"young-unused", "old-used"}


def test_cleanup_keeps_client_with_live_session(db: ScratchDatabase) -> None:
    # These clients never set first_session_at, so only a live session keeps one.
    insert_client(db, "live", age="30 days")
    insert_family(db, "live", refresh_ends_in="1 day")
    insert_client(db, "revoked", age="30 days")
    insert_family(db, "revoked", refresh_ends_in="1 day", revoked=True)
    insert_client(db, "ended", age="30 days")
    insert_family(db, "ended", refresh_ends_in="-1 minute")

    deleted = cleanup(db)

    assert deleted == 2
    assert client_ids(db) == {"live"}
    # The grants of deleted clients go with them.
    assert count(db, "oauth_grants") == 1


def test_cleanup_keeps_client_during_sign_in(db: ScratchDatabase) -> None:
    state = new_token(TokenKind.STATE)
    code = new_token(TokenKind.CODE)

    async def scenario() -> None:
        async with open_store(db) as store:
            await register(store, "signing-in")
            await register(store, "exchanging")
            await store.put_pending(state, pending_for("signing-in"))
            await store.put_code(code, code_for("exchanging"))

    run(scenario)
    query(db, "UPDATE oauth_clients SET created_at = now() - interval '2 days'")

    assert cleanup(db) == 0
    assert client_ids(db) == {"signing-in", "exchanging"}


def test_cleanup_of_metadata_documents(db: ScratchDatabase) -> None:
    metadata = "metadata_document"
    insert_client(db, "https://a.example/expired-long-ago", kind=metadata,
                  document_expired="2 days")  # fmt: skip
    insert_client(db, "https://b.example/expired-recently", kind=metadata,
                  document_expired="1 hour")  # fmt: skip
    insert_client(db, "https://c.example/current", kind=metadata,
                  document_expired="-1 hour")  # fmt: skip
    insert_client(db, "https://d.example/in-use", kind=metadata, used=True,
                  document_expired="2 days")  # fmt: skip
    insert_family(db, "https://d.example/in-use", refresh_ends_in="1 day")
    insert_client(db, "https://e.example/used-before", kind=metadata, used=True,
                  document_expired="2 days")  # fmt: skip
    insert_family(db, "https://e.example/used-before", refresh_ends_in="-1 day")

    deleted = cleanup(db)

    assert deleted == 2
    assert client_ids(db) == {
        "https://b.example/expired-recently",
        "https://c.example/current",
        "https://d.example/in-use",
    }


def test_cleanup_age_is_respected(db: ScratchDatabase) -> None:
    insert_client(db, "two-days", age="2 days")

    assert cleanup(db, timedelta(days=3)) == 0
    assert cleanup(db, timedelta(days=1)) == 1


def test_cleanup_rejects_negative_age(db: ScratchDatabase) -> None:
    with pytest.raises(InvalidValueError, match="negative"):
        cleanup(db, timedelta(seconds=-1))

    with (
        pytest.raises(psycopg.errors.InvalidParameterValue),
        db.connect() as conn,
    ):
        conn.execute("SELECT cleanup_oauth_state(interval '-1 second')")


def test_client_deletion_cascades(db: ScratchDatabase) -> None:
    state = new_token(TokenKind.STATE)
    code = new_token(TokenKind.CODE)

    async def scenario() -> None:
        async with open_store(db) as store:
            await register(store)
            await store.put_pending(state, pending_for("client-1"))
            await store.put_code(code, code_for("client-1"))

    run(scenario)
    insert_family(db, "client-1", refresh_ends_in="1 day")
    query(db, "DELETE FROM oauth_clients")

    assert count(db, "oauth_pending_authorizations") == 0
    assert count(db, "oauth_codes") == 0
    assert count(db, "oauth_grants") == 0
