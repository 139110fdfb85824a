"""The OAuth state of the server in PostgreSQL: clients, pending
authorizations, authorization codes and grants.

Every statement is written once, as an operation for
:mod:`mcp_authdb.db.pool`, and :class:`OAuthStore` runs them on an
:class:`~mcp_authdb.db.pool.AsyncDatabase`. The tables are those of migration
``0005_oauth.sql``:

- ``oauth_clients``: clients registered by Dynamic Client Registration
  (``kind = 'registered'``) and cached Client ID Metadata Documents
  (``kind = 'metadata_document'``).
- ``oauth_pending_authorizations``: authorization requests that
  ``/authorize`` stores until the upstream provider redirects back. A row is
  keyed by the hash of the consent request id until the user approves the
  client. Then it is keyed by the hash of the upstream ``state`` and contains
  the hash of the approving browser's binding cookie.
- ``oauth_codes``: authorization codes given to clients, keyed by hash,
  single use. A used code stays, marked with the session family it created,
  until it expires, so that a second use can revoke that family.
- ``oauth_grants``: the OAuth facts of one user session family (client,
  resource, upstream tokens), keyed by ``user_sessions.family_id``.

States and codes are tokens made by ``new_token(TokenKind.STATE)`` and
``new_token(TokenKind.CODE)``. The tables store only their keyed hashes, and
lookups try the hash under every key of the :class:`TokenHasher`. Secrets
(client secrets, the upstream PKCE verifier, upstream tokens) are stored
encrypted by :class:`Encryptor`, each bound to a context naming its purpose
and owner, so a ciphertext moved to another row fails to decrypt.

Expiries of pending authorizations and codes are compared with the
database's ``now()``. Upstream token lifetimes come from the application's
clock, because the application sets ``issued_at`` when the upstream provider
responds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql as pgsql

from mcp_authdb.db.pool import AsyncDatabase, Operation, Query
from mcp_authdb.errors import AuthDBError, DatabaseError, InvalidValueError
from mcp_authdb.server.crypto import Encryptor
from mcp_authdb.store.tokens import TokenHasher, TokenKind, token_kind

logger = logging.getLogger(__name__)

CLIENT_KIND_REGISTERED = "registered"
CLIENT_KIND_METADATA_DOCUMENT = "metadata_document"
# Dynamic Client Registration is rate-limited per source over this window.
REGISTRATION_WINDOW = timedelta(hours=1)
# The length of oauth_clients.registered_from, enough for any IPv6 address.
MAX_SOURCE_LENGTH = 64
# The maximum length of oauth_clients.client_id, by its CHECK constraint.
MAX_CLIENT_ID_LENGTH = 2048
# How often a caller that waits for another caller's upstream refresh reads
# the grant again, in seconds.
REFRESH_POLL_S = 0.05
# How long a caller waits for another caller's upstream refresh by default,
# in seconds: above the upstream client's default timeout of 10 s.
DEFAULT_REFRESH_WAIT_S = 30.0


class GrantNotFoundError(AuthDBError):
    """A user session family has no grant, or its grant has no upstream tokens.

    ``family_id`` is the family that was looked up.
    """

    def __init__(self, message: str, *, family_id: uuid.UUID) -> None:
        super().__init__(message)
        self.family_id = family_id


class RefreshTimeoutError(AuthDBError):
    """Another caller's upstream refresh of a family did not end in time.

    ``family_id`` is the family whose tokens were being refreshed.
    """

    def __init__(self, message: str, *, family_id: uuid.UUID) -> None:
        super().__init__(message)
        self.family_id = family_id


@dataclasses.dataclass
class _RefreshAttempt:
    """The outcome of one pass of :meth:`OAuthStore.refresh_upstream`.

    ``result`` contains tokens that needed no refresh. ``fresh`` contains
    refreshed tokens, with ``old_access`` (the encrypted access token they
    replace) and ``user_id``. All are None when another caller is refreshing.
    """

    result: UpstreamTokens | None = None
    fresh: UpstreamTokens | None = None
    old_access: bytes | None = None
    user_id: str | None = None


@dataclasses.dataclass(frozen=True)
class StoredClient:
    """A row of ``oauth_clients`` with its client secret decrypted.

    ``metadata`` is the client's ``OAuthClientInformationFull`` as JSON,
    without ``client_secret``. ``kind`` is ``"registered"`` or
    ``"metadata_document"``. ``document_expires_at`` is when a metadata
    document must be fetched again, and None for a registered client.
    ``repr`` leaves the secret out.
    """

    client_id: str
    metadata: dict[str, Any]
    client_secret: str | None = dataclasses.field(repr=False)
    kind: str
    created_at: datetime
    document_expires_at: datetime | None


@dataclasses.dataclass(frozen=True)
class PendingAuthorization:
    """An authorization request waiting for the upstream provider's callback.

    ``client_state`` is the MCP client's ``state``, returned to it unchanged.
    ``upstream_verifier`` is this server's PKCE verifier towards the upstream
    provider; ``repr`` leaves it out. ``expires_at`` must be timezone-aware.
    """

    client_id: str
    redirect_uri: str
    redirect_uri_provided_explicitly: bool
    client_state: str | None
    scopes: tuple[str, ...]
    code_challenge: str
    resource: str
    upstream_verifier: str = dataclasses.field(repr=False)
    expires_at: datetime


@dataclasses.dataclass(frozen=True)
class UpstreamTokens:
    """The upstream provider's tokens for one user. ``repr`` leaves them out.

    ``issued_at`` is when the upstream provider issued the access token, by
    the application's clock, and ``expires_at`` when it expires (None when
    the provider sent no expiry). Both are timezone-aware.
    """

    access_token: str = dataclasses.field(repr=False)
    refresh_token: str | None = dataclasses.field(repr=False)
    issued_at: datetime
    expires_at: datetime | None


@dataclasses.dataclass(frozen=True)
class StoredCode:
    """An authorization code's facts, as stored under the code's hash.

    ``upstream`` contains the user's upstream tokens, which move to the grant
    when the code is exchanged. ``expires_at`` must be timezone-aware.
    ``used_at`` and ``family_id`` are None until the code is exchanged, and
    then record when and for which session family.
    :meth:`OAuthStore.put_code` ignores them.
    """

    client_id: str
    redirect_uri: str
    redirect_uri_provided_explicitly: bool
    scopes: tuple[str, ...]
    code_challenge: str
    resource: str
    user_id: str
    subscription_level: str
    upstream: UpstreamTokens | None
    expires_at: datetime
    used_at: datetime | None = None
    family_id: uuid.UUID | None = None


@dataclasses.dataclass(frozen=True)
class Grant:
    """The OAuth facts of one user session family.

    ``client_id`` and ``resource`` never change after the code exchange.
    ``upstream`` contains the latest upstream tokens, or None when the upstream
    provider gave none.
    """

    family_id: uuid.UUID
    client_id: str
    resource: str
    user_id: str
    upstream: UpstreamTokens | None


# Advisory lock keys share PostgreSQL's one 64-bit key space with the session
# store's per-user locks, so the text hashed here starts with its own prefix.
_LOCK_SOURCE = (
    "SELECT pg_advisory_xact_lock("
    "hashtextextended('mcp-authdb registration source ' || %s, 0))"
)

_COUNT_REGISTRATIONS = """
SELECT count(*)
FROM oauth_clients
WHERE registered_from = %s
  AND created_at > now() - %s::interval
"""

_INSERT_CLIENT = """
INSERT INTO oauth_clients (
    client_id, metadata, client_secret_encrypted, kind, registered_from
)
VALUES (%s, %s::jsonb, %s, 'registered', %s)
"""

_SELECT_CLIENT = """
SELECT client_id, metadata, client_secret_encrypted, kind, created_at,
       document_expires_at
FROM oauth_clients
WHERE client_id = %s
"""

# A registered client is never turned into a metadata document: DCR client ids
# are UUIDs and metadata document ids are https URLs, so the two never meet.
_UPSERT_METADATA_DOCUMENT = """
INSERT INTO oauth_clients (client_id, metadata, kind, document_expires_at)
VALUES (%s, %s::jsonb, 'metadata_document', %s)
ON CONFLICT (client_id) DO UPDATE
SET metadata = EXCLUDED.metadata,
    document_expires_at = EXCLUDED.document_expires_at
WHERE oauth_clients.kind = 'metadata_document'
"""

_INSERT_PENDING = """
INSERT INTO oauth_pending_authorizations (
    state_hash, client_id, redirect_uri, redirect_uri_provided_explicitly,
    client_state, scopes, code_challenge, resource, upstream_verifier_encrypted,
    expires_at
)
VALUES (%s, %s, %s, %s, %s, %s::text[], %s, %s, %s, %s)
"""

# DELETE ... RETURNING makes the state single use: of two concurrent
# callbacks with one state, only the first DELETE returns the row.
_TAKE_PENDING = """
DELETE FROM oauth_pending_authorizations
WHERE state_hash = ANY(%s::text[])
  AND consented_at IS NULL
  AND expires_at > now()
RETURNING state_hash, client_id, redirect_uri, redirect_uri_provided_explicitly,
          client_state, scopes, code_challenge, resource,
          upstream_verifier_encrypted, expires_at
"""

_CODE_COLUMNS = """
client_id, redirect_uri, redirect_uri_provided_explicitly, scopes,
code_challenge, resource, user_id, subscription_level,
upstream_access_encrypted, upstream_refresh_encrypted, upstream_issued_at,
upstream_expires_at, expires_at
"""

_INSERT_CODE = f"""
INSERT INTO oauth_codes (code_hash, {_CODE_COLUMNS})
VALUES (%s, %s, %s, %s, %s::text[], %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""

_PEEK_CODE = f"""
SELECT {_CODE_COLUMNS}, used_at, family_id
FROM oauth_codes
WHERE code_hash = ANY(%s::text[])
LIMIT 1
"""

# One statement marks the code used, but only while unused and unexpired, so
# a code is used at most once: a concurrent UPDATE waits for the row lock and
# then finds used_at set. It writes the grant of the new session family from
# the code and marks the client as having led to a session, so cleanup keeps
# it.
_CONSUME_CODE = f"""
WITH code AS (
    UPDATE oauth_codes
    SET used_at = now(),
        family_id = %(family_id)s
    WHERE code_hash = ANY(%(candidates)s::text[])
      AND used_at IS NULL
      AND expires_at > now()
    RETURNING {_CODE_COLUMNS}, used_at, family_id
),
grant_row AS (
    INSERT INTO oauth_grants (
        family_id, client_id, resource, user_id, upstream_access_encrypted,
        upstream_refresh_encrypted, upstream_issued_at, upstream_expires_at
    )
    SELECT %(family_id)s, client_id, resource, user_id, upstream_access_encrypted,
           upstream_refresh_encrypted, upstream_issued_at, upstream_expires_at
    FROM code
),
client AS (
    UPDATE oauth_clients
    SET first_session_at = now()
    WHERE client_id IN (SELECT client_id FROM code)
      AND first_session_at IS NULL
)
SELECT {_CODE_COLUMNS}, used_at, family_id
FROM code
"""

# The session store revokes a whole family by the id of any one of its rows.
_FAMILY_SESSION = """
SELECT id
FROM user_sessions
WHERE family_id = %s
ORDER BY id
LIMIT 1
"""

_GRANT_COLUMNS = """
family_id, client_id, resource, user_id, upstream_access_encrypted,
upstream_refresh_encrypted, upstream_issued_at, upstream_expires_at
"""

_SELECT_GRANT = f"""
SELECT {_GRANT_COLUMNS}
FROM oauth_grants
WHERE family_id = %s
"""

# A transaction-level advisory lock on the family marks its one refresher.
# The key text has its own prefix, like the registration lock.
_TRY_LOCK_REFRESH = (
    "SELECT pg_try_advisory_xact_lock("
    "hashtextextended('mcp-authdb upstream refresh ' || %s, 0))"
)

# Updates the grant only while it still contains the access token that was
# refreshed, so a later refresh is never overwritten.
_STORE_REFRESHED = """
UPDATE oauth_grants
SET upstream_access_encrypted = %s,
    upstream_refresh_encrypted = %s,
    upstream_issued_at = %s,
    upstream_expires_at = %s,
    updated_at = now()
WHERE family_id = %s
  AND upstream_access_encrypted = %s
"""

_UPDATE_GRANT_TOKENS = """
UPDATE oauth_grants
SET upstream_access_encrypted = %s,
    upstream_refresh_encrypted = %s,
    upstream_issued_at = %s,
    upstream_expires_at = %s,
    updated_at = now()
WHERE family_id = %s
"""

_CLEANUP = "SELECT cleanup_oauth_state(%s::interval)"


def register_client_operation(
    client_id: str,
    metadata_json: str,
    secret_encrypted: bytes | None,
    source: str,
    limit_per_hour: int,
) -> Operation[bool]:
    """Insert a registered client unless ``source`` reached its hourly limit.

    The count and the insert run under a transaction-level advisory lock on
    the source, so concurrent registrations from one source, on any replica,
    are counted one after the other. The count is a later statement than the
    lock, so it reads the rows that the lock's previous holder committed.
    """
    yield Query(_LOCK_SOURCE, (source,))
    result = yield Query(_COUNT_REGISTRATIONS, (source, REGISTRATION_WINDOW))
    if int(result.rows[0][0]) >= limit_per_hour:
        return False

    yield Query(_INSERT_CLIENT, (client_id, metadata_json, secret_encrypted, source))
    return True


def select_client_operation(client_id: str) -> Operation[tuple[Any, ...] | None]:
    """Return the ``oauth_clients`` row of ``client_id``, or None."""
    result = yield Query(_SELECT_CLIENT, (client_id,))
    return result.rows[0] if result.rows else None


def put_metadata_document_operation(
    client_id: str, metadata_json: str, expires_at: datetime
) -> Operation[None]:
    """Insert or update the cached metadata document of ``client_id``."""
    yield Query(_UPSERT_METADATA_DOCUMENT, (client_id, metadata_json, expires_at))


def insert_pending_operation(
    state_hash: str, pending: PendingAuthorization, verifier_encrypted: bytes
) -> Operation[None]:
    """Insert a pending authorization under ``state_hash``."""
    yield Query(
        _INSERT_PENDING,
        (
            state_hash,
            pending.client_id,
            pending.redirect_uri,
            pending.redirect_uri_provided_explicitly,
            pending.client_state,
            list(pending.scopes),
            pending.code_challenge,
            pending.resource,
            verifier_encrypted,
            pending.expires_at,
        ),
    )


def take_pending_operation(
    candidates: Sequence[str],
) -> Operation[tuple[Any, ...] | None]:
    """Delete the unexpired pending authorization under one of the hashes.

    Returns the deleted row, or None when no unexpired row has one of them.
    """
    if not candidates:
        return None
    result = yield Query(_TAKE_PENDING, (list(candidates),))
    return result.rows[0] if result.rows else None


def insert_code_operation(code_hash: str, row: Sequence[Any]) -> Operation[None]:
    """Insert an authorization code's row, in the order of ``_CODE_COLUMNS``."""
    yield Query(_INSERT_CODE, (code_hash, *row))


def peek_code_operation(
    candidates: Sequence[str],
) -> Operation[tuple[Any, ...] | None]:
    """Return the code row under one of the hashes, expired or not, or None."""
    if not candidates:
        return None
    result = yield Query(_PEEK_CODE, (list(candidates),))
    return result.rows[0] if result.rows else None


def family_session_operation(family_id: uuid.UUID) -> Operation[int | None]:
    """Return the id of one ``user_sessions`` row of ``family_id``, or None."""
    result = yield Query(_FAMILY_SESSION, (family_id,))
    return int(result.rows[0][0]) if result.rows else None


def select_grant_operation(family_id: uuid.UUID) -> Operation[tuple[Any, ...] | None]:
    """Return the ``oauth_grants`` row of ``family_id``, or None."""
    result = yield Query(_SELECT_GRANT, (family_id,))
    return result.rows[0] if result.rows else None


def store_refreshed_operation(params: Sequence[Any]) -> Operation[bool]:
    """Store refreshed tokens if the grant still has the old access token.

    ``params`` are those of ``_STORE_REFRESHED``. Returns whether a row
    changed.
    """
    result = yield Query(_STORE_REFRESHED, tuple(params))
    return result.rowcount == 1


def cleanup_operation(unused_age: timedelta) -> Operation[int]:
    """Run ``cleanup_oauth_state`` and return the number of rows it deleted."""
    result = yield Query(_CLEANUP, (unused_age,))
    return int(result.rows[0][0])


class OAuthStore:
    """The OAuth tables, read and written through ``database``.

    ``encryptor`` encrypts and decrypts the stored secrets, and ``hasher``
    hashes states and codes (it should be the session store's, so that one
    key rotation covers every token). Reads that find nothing return None.
    Database failures raise :class:`~mcp_authdb.errors.DatabaseError`, and a
    stored value that does not decrypt raises
    :class:`~mcp_authdb.server.crypto.DecryptionError`.
    ``refresh_wait_s`` bounds how long :meth:`refresh_upstream` waits for
    another caller's refresh, in seconds; set it above the upstream client's
    timeout.
    """

    def __init__(
        self,
        database: AsyncDatabase,
        encryptor: Encryptor,
        hasher: TokenHasher,
        *,
        refresh_wait_s: float = DEFAULT_REFRESH_WAIT_S,
    ) -> None:
        if not refresh_wait_s > 0:
            raise InvalidValueError(
                f"refresh_wait_s={refresh_wait_s} is invalid; pass the seconds to "
                f"wait for another caller's refresh, such as {DEFAULT_REFRESH_WAIT_S:g}"
            )
        self.database = database
        self.encryptor = encryptor
        self.hasher = hasher
        self.refresh_wait_s = refresh_wait_s

    # Clients

    async def register_client(
        self,
        client_id: str,
        metadata: dict[str, Any],
        client_secret: str | None,
        *,
        source: str,
        limit_per_hour: int,
    ) -> bool:
        """Store a client registered by Dynamic Client Registration.

        Returns False, storing nothing, when ``source`` (the request's source
        address) already registered ``limit_per_hour`` clients within the
        last hour, and True when the client was stored. Replicas agree on the
        count because it is taken under a transaction-level advisory lock on
        the source. A ``client_secret`` key in ``metadata`` is not stored;
        ``client_secret`` is stored encrypted. Raises
        :class:`InvalidValueError` for a negative limit or a ``source`` that
        is empty or longer than 64 characters, and
        :class:`DatabaseError` when ``client_id`` exists already.

        NOTE: cleanup deletes unused clients older than its ``unused_age``, so
        with an age under one hour the count misses the deleted ones.
        """
        if not 1 <= len(source) <= MAX_SOURCE_LENGTH:
            raise InvalidValueError(
                f"source has {len(source)} characters; pass the request's source "
                f"address, of 1 to {MAX_SOURCE_LENGTH} characters"
            )
        if limit_per_hour < 0:
            raise InvalidValueError(
                f"limit_per_hour={limit_per_hour} is negative; pass 0 or more "
                "registrations per source per hour"
            )

        stored_metadata = {k: v for k, v in metadata.items() if k != "client_secret"}
        metadata_json = json.dumps(stored_metadata)
        secret_encrypted = None
        if client_secret is not None:
            secret_encrypted = self.encryptor.encrypt(
                client_secret, context=client_secret_context(client_id)
            )

        stored = await self.database.run(
            lambda: register_client_operation(
                client_id, metadata_json, secret_encrypted, source, limit_per_hour
            )
        )
        if not stored:
            logger.warning(
                "rejected a client registration from %s: it reached the limit of "
                "%d registrations per hour",
                source,
                limit_per_hour,
                extra={"action": "oauth.register.rate_limited", "source": source},
            )
        return stored

    async def get_client(self, client_id: str) -> StoredClient | None:
        """Return the client ``client_id``, registered or cached, or None.

        A ``client_id`` that no row can have (see :func:`is_storable_client_id`)
        gives None without a database call.
        """
        if not is_storable_client_id(client_id):
            return None
        row = await self.database.run(
            lambda: select_client_operation(client_id),
            transaction=False,
            idempotent=True,
        )
        if row is None:
            return None

        (stored_id, metadata, secret_encrypted, kind, created_at, expires_at) = row
        secret = None
        if secret_encrypted is not None:
            secret = self.encryptor.decrypt(
                secret_encrypted, context=client_secret_context(stored_id)
            )
        return StoredClient(
            client_id=stored_id,
            metadata=metadata,
            client_secret=secret,
            kind=kind,
            created_at=created_at,
            document_expires_at=expires_at,
        )

    async def put_metadata_document(
        self, client_id: str, metadata: dict[str, Any], expires_at: datetime
    ) -> None:
        """Cache a Client ID Metadata Document until ``expires_at``.

        Inserts the client with ``kind = 'metadata_document'``, or replaces
        the metadata and expiry of the cached one. A registered client of the
        same id is left unchanged.
        """
        _check_aware("expires_at", expires_at)
        metadata_json = json.dumps(metadata)
        await self.database.run(
            lambda: put_metadata_document_operation(
                client_id, metadata_json, expires_at
            )
        )

    # Pending authorizations

    async def put_pending(self, state: str, pending: PendingAuthorization) -> None:
        """Store ``pending`` under the hash of ``state``.

        ``state`` must be a token from ``new_token(TokenKind.STATE)``; it is
        not stored. The upstream verifier is stored encrypted. Raises
        :class:`InvalidValueError` for any other state or a naive
        ``expires_at``.
        """
        _check_kind("state", state, TokenKind.STATE)
        _check_aware("pending.expires_at", pending.expires_at)
        state_hash = self.hasher.hash(state)
        verifier_encrypted = self.encryptor.encrypt(
            pending.upstream_verifier, context=upstream_verifier_context(state_hash)
        )
        await self.database.run(
            lambda: insert_pending_operation(state_hash, pending, verifier_encrypted)
        )

    async def take_pending(self, state: str) -> PendingAuthorization | None:
        """Delete and return the pending authorization of ``state``, not yet approved.

        Returns None when there is none, when it has expired, when it was
        taken already, or when ``state`` is not a well-formed state token
        (then without a database call). Of concurrent calls with one state,
        at most one gets the authorization. An approved authorization is
        never returned: only the consent step's take, which checks the
        browser binding of the approval, may use one up.
        """
        candidates = self.hasher.candidates(state, TokenKind.STATE)
        if not candidates:
            return None

        row = await self.database.run(lambda: take_pending_operation(candidates))
        if row is None:
            return None
        return self.pending_from_row(row)

    def pending_from_row(self, row: Sequence[Any]) -> PendingAuthorization:
        """Build a pending authorization from a row that ``_TAKE_PENDING`` returns.

        The row's columns are those of its ``RETURNING`` clause, in order;
        the upstream verifier is decrypted under the row's key.
        """
        (state_hash, client_id, redirect_uri, explicit, client_state, scopes,
         code_challenge, resource, verifier_encrypted, expires_at) = row  # fmt: skip
        verifier = self.encryptor.decrypt(
            verifier_encrypted, context=upstream_verifier_context(state_hash)
        )
        return PendingAuthorization(
            client_id=client_id,
            redirect_uri=redirect_uri,
            redirect_uri_provided_explicitly=explicit,
            client_state=client_state,
            scopes=tuple(scopes),
            code_challenge=code_challenge,
            resource=resource,
            upstream_verifier=verifier,
            expires_at=expires_at,
        )

    # Authorization codes

    async def put_code(self, code: str, stored: StoredCode) -> None:
        """Store ``stored`` under the hash of ``code``.

        ``code`` must be a token from ``new_token(TokenKind.CODE)``; it is
        not stored. The upstream tokens are stored encrypted for the code's
        user. Raises :class:`InvalidValueError` for any other code or a naive
        datetime.
        """
        _check_kind("code", code, TokenKind.CODE)
        _check_aware("stored.expires_at", stored.expires_at)
        code_hash = self.hasher.hash(code)
        upstream_columns = self._encrypt_upstream(stored.user_id, stored.upstream)
        row = (
            stored.client_id,
            stored.redirect_uri,
            stored.redirect_uri_provided_explicitly,
            list(stored.scopes),
            stored.code_challenge,
            stored.resource,
            stored.user_id,
            stored.subscription_level,
            *upstream_columns,
            stored.expires_at,
        )
        await self.database.run(lambda: insert_code_operation(code_hash, row))

    async def peek_code(self, code: str) -> StoredCode | None:
        """Return the facts of ``code`` without using it up, or None.

        Expired codes are returned too, because the caller checks the expiry
        and reports it, and so are used ones until cleanup deletes them after
        their expiry: their ``family_id`` is set. A malformed code gives None
        without a database call.
        """
        candidates = self.hasher.candidates(code, TokenKind.CODE)
        if not candidates:
            return None

        row = await self.database.run(
            lambda: peek_code_operation(candidates),
            transaction=False,
            idempotent=True,
        )
        return None if row is None else self._code_from_row(row)

    def consume_code_operation(
        self, code: str, family_id: uuid.UUID
    ) -> Operation[StoredCode | None]:
        """Return an operation that uses up ``code`` for the session family.

        In one statement, the operation marks the code's row used by
        ``family_id`` (``used_at`` and ``family_id``) if it is unused and has
        not expired, inserts the grant of ``family_id`` from it, and sets the
        client's ``first_session_at`` if unset. It returns the code's facts,
        or None when the code is unknown, expired or used already, in which
        case it changed nothing. Of concurrent operations with one code, at
        most one gets it.

        Run it inside the session store's ``create(..., then=...)``, so that
        the session, the grant and the code's use commit together. The
        session is created even when this returns None, so the caller must
        raise in that case to roll it back::

            def then(session: Session) -> Operation[StoredCode]:
                stored = yield from store.consume_code_operation(
                    code, session.family_id
                )
                if stored is None:
                    raise CodeAlreadyUsed()  # the caller's own exception
                return stored
        """
        candidates = self.hasher.candidates(code, TokenKind.CODE)

        def operation() -> Operation[StoredCode | None]:
            if not candidates:
                return None
            result = yield Query(
                _CONSUME_CODE, {"candidates": candidates, "family_id": family_id}
            )
            if not result.rows:
                return None
            return self._code_from_row(result.rows[0])

        return operation()

    async def family_session_id(self, family_id: uuid.UUID) -> int | None:
        """Return the id of a ``user_sessions`` row of ``family_id``, or None.

        The session store revokes a whole family by the id of any of its rows.
        """
        return await self.database.run(
            lambda: family_session_operation(family_id),
            transaction=False,
            idempotent=True,
        )

    # Grants

    async def get_grant(self, family_id: uuid.UUID) -> Grant | None:
        """Return the grant of the user session family ``family_id``, or None."""
        row = await self.database.run(
            lambda: select_grant_operation(family_id),
            transaction=False,
            idempotent=True,
        )
        return None if row is None else self._grant_from_row(row)

    async def refresh_upstream(
        self,
        family_id: uuid.UUID,
        refresh: Callable[[UpstreamTokens], Awaitable[UpstreamTokens]],
        threshold: float,
    ) -> UpstreamTokens:
        """Return the grant's upstream tokens, refreshed if they are due.

        The tokens are due when ``threshold`` (between 0 and 1) of the access
        token's lifetime has passed, by the application's clock, and they
        have a refresh token and an expiry. Then ``refresh`` is awaited with
        the stored tokens and its result is stored encrypted and returned.

        Of concurrent callers on any replica, one refreshes: it takes a
        transaction-level advisory lock on the family with
        ``pg_try_advisory_xact_lock`` and keeps its connection and transaction
        during the ``refresh`` call. The others do not wait on the lock. They
        return their connection to the pool and read the grant again every
        :data:`REFRESH_POLL_S` seconds until the lock is free, then return the
        refreshed tokens, or refresh themselves if the refresher failed. So a
        slow upstream provider holds one pooled connection per family, not one
        per caller. Refreshing once matters because upstream providers that
        rotate refresh tokens reject the old one.

        If the refresher's transaction is lost after ``refresh`` returned (a
        dropped connection, or a server or pooler idle-in-transaction
        timeout), the new tokens are stored in a new transaction, but only if
        the stored access token is still the one that was refreshed.

        An exception from ``refresh`` rolls back and propagates, leaving the
        stored tokens unchanged. Raises :class:`GrantNotFoundError` when the
        family has no grant or the grant contains no upstream tokens,
        :class:`RefreshTimeoutError` when another caller's refresh did not end
        within ``refresh_wait_s`` seconds, and :class:`InvalidValueError` for
        a threshold outside (0, 1].
        """
        if not 0 < threshold <= 1:
            raise InvalidValueError(
                f"threshold={threshold} is outside (0, 1]; pass the fraction of "
                "the access token's lifetime after which it is refreshed, such as 0.9"
            )

        deadline = time.monotonic() + self.refresh_wait_s
        while True:
            attempt = _RefreshAttempt()
            try:
                async with (
                    self.database.pool.connection() as conn,
                    conn.transaction(),
                ):
                    await self._refresh_locked(
                        conn, family_id, refresh, threshold, attempt
                    )
            except psycopg.Error as exc:
                if attempt.fresh is None:
                    raise DatabaseError.from_driver(
                        f"refreshing the upstream tokens of family {family_id} "
                        f"failed: {_first_line(exc)} (SQLSTATE {exc.sqlstate})",
                        exc,
                    ) from exc
                await self._store_refreshed(family_id, attempt, exc)
            if attempt.result is not None:
                return attempt.result
            if attempt.fresh is not None:
                return attempt.fresh

            # Another caller holds the lock and is refreshing.
            if time.monotonic() >= deadline:
                raise RefreshTimeoutError(
                    f"another request has been refreshing the upstream tokens of "
                    f"family {family_id} for over {self.refresh_wait_s:g} s; try "
                    "again later",
                    family_id=family_id,
                )
            await asyncio.sleep(REFRESH_POLL_S)

    async def _refresh_locked(
        self,
        conn: psycopg.AsyncConnection[Any],
        family_id: uuid.UUID,
        refresh: Callable[[UpstreamTokens], Awaitable[UpstreamTokens]],
        threshold: float,
        attempt: _RefreshAttempt,
    ) -> None:
        """Refresh under the family's lock, or leave ``attempt`` empty if busy.

        Sets ``attempt.result`` to tokens that need no refresh, or
        ``attempt.fresh`` (with ``attempt.old_access``) to refreshed tokens,
        before they are written.
        """
        if self.database.settings.transaction_pooler:
            # Poolers in transaction mode reject statement_timeout as a
            # startup parameter, so the pool driver sets it per transaction.
            await conn.execute(
                pgsql.SQL("SET LOCAL statement_timeout = {}").format(
                    pgsql.Literal(self.database.settings.command_timeout_ms)
                )
            )

        cursor = await conn.execute(_TRY_LOCK_REFRESH, (str(family_id),))
        lock_row = await cursor.fetchone()
        locked = bool(lock_row and lock_row[0])
        # Read after taking the lock, so a refresh that committed before it is
        # seen.
        cursor = await conn.execute(_SELECT_GRANT, (family_id,))
        row = await cursor.fetchone()
        if row is None:
            raise GrantNotFoundError(
                f"user session family {family_id} has no grant; the user must "
                "sign in again",
                family_id=family_id,
            )
        grant = self._grant_from_row(row)
        if grant.upstream is None:
            raise GrantNotFoundError(
                f"the grant of user session family {family_id} contains no upstream "
                "tokens; the user must sign in again",
                family_id=family_id,
            )

        current = grant.upstream
        if not _refresh_due(current, threshold, datetime.now(UTC)):
            attempt.result = current
            return
        if not locked:
            return

        fresh = await refresh(current)
        _check_aware("issued_at of the refreshed tokens", fresh.issued_at)
        attempt.user_id = grant.user_id
        attempt.old_access = row[4]
        attempt.fresh = fresh
        access, refresh_token, issued_at, expires_at = self._encrypt_upstream(
            grant.user_id, fresh
        )
        await conn.execute(
            _UPDATE_GRANT_TOKENS,
            (access, refresh_token, issued_at, expires_at, family_id),
        )
        logger.info(
            "refreshed the upstream tokens of family %s",
            family_id,
            extra={"action": "oauth.upstream.refreshed", "family_id": str(family_id)},
        )

    async def _store_refreshed(
        self, family_id: uuid.UUID, attempt: _RefreshAttempt, cause: psycopg.Error
    ) -> None:
        """Store refreshed tokens whose refresher's transaction was lost.

        The update applies only while the grant still contains the access
        token that was refreshed, so it never overwrites a later refresh.
        """
        assert attempt.fresh is not None and attempt.user_id is not None
        logger.warning(
            "storing the refreshed upstream tokens of family %s failed (%s, "
            "SQLSTATE %s); storing them again in a new transaction",
            family_id,
            _first_line(cause),
            cause.sqlstate,
            extra={"action": "oauth.upstream.store_retry", "family_id": str(family_id)},
        )
        access, refresh_token, issued_at, expires_at = self._encrypt_upstream(
            attempt.user_id, attempt.fresh
        )
        params = (
            access,
            refresh_token,
            issued_at,
            expires_at,
            family_id,
            attempt.old_access,
        )
        stored = await self.database.run(
            lambda: store_refreshed_operation(params), idempotent=True
        )
        if not stored:
            logger.warning(
                "the upstream tokens of family %s changed during their refresh; "
                "kept the stored tokens",
                family_id,
                extra={
                    "action": "oauth.upstream.refresh_conflict",
                    "family_id": str(family_id),
                },
            )

    # Cleanup

    async def cleanup(self, unused_age: timedelta) -> int:
        """Delete OAuth state that is no longer needed; return the rows deleted.

        Runs ``cleanup_oauth_state``, which deletes expired pending
        authorizations and codes (used or not), grants whose family has no
        session row left, registered clients older than ``unused_age`` that
        never led to a session, and metadata documents that expired more than
        ``unused_age`` ago. A client with a live session family, or with an
        unexpired pending authorization or code, is kept. Raises
        :class:`InvalidValueError` for a negative ``unused_age``.
        """
        if unused_age < timedelta(0):
            raise InvalidValueError(
                f"unused_age={unused_age} is negative; pass how long an unused "
                "client is kept, such as timedelta(days=1)"
            )
        deleted = await self.database.run(lambda: cleanup_operation(unused_age))
        logger.debug(
            "deleted %d rows of OAuth state",
            deleted,
            extra={"action": "oauth.cleanup", "deleted": deleted},
        )
        return deleted

    # Rows

    def _encrypt_upstream(
        self, user_id: str, tokens: UpstreamTokens | None
    ) -> tuple[bytes | None, bytes | None, datetime | None, datetime | None]:
        if tokens is None:
            return None, None, None, None

        _check_aware("upstream issued_at", tokens.issued_at)
        if tokens.expires_at is not None:
            _check_aware("upstream expires_at", tokens.expires_at)
        access = self.encryptor.encrypt(
            tokens.access_token, context=upstream_access_context(user_id)
        )
        refresh = None
        if tokens.refresh_token is not None:
            refresh = self.encryptor.encrypt(
                tokens.refresh_token, context=upstream_refresh_context(user_id)
            )
        return access, refresh, tokens.issued_at, tokens.expires_at

    def _decrypt_upstream(
        self,
        user_id: str,
        access: bytes | None,
        refresh: bytes | None,
        issued_at: datetime | None,
        expires_at: datetime | None,
    ) -> UpstreamTokens | None:
        if access is None or issued_at is None:
            return None
        refresh_token = None
        if refresh is not None:
            refresh_token = self.encryptor.decrypt(
                refresh, context=upstream_refresh_context(user_id)
            )
        return UpstreamTokens(
            access_token=self.encryptor.decrypt(
                access, context=upstream_access_context(user_id)
            ),
            refresh_token=refresh_token,
            issued_at=issued_at,
            expires_at=expires_at,
        )

    def _code_from_row(self, row: Sequence[Any]) -> StoredCode:
        (client_id, redirect_uri, explicit, scopes, code_challenge, resource,
         user_id, level, access, refresh, issued_at, upstream_expires_at,
         expires_at, used_at, family_id) = row  # fmt: skip
        return StoredCode(
            client_id=client_id,
            redirect_uri=redirect_uri,
            redirect_uri_provided_explicitly=explicit,
            scopes=tuple(scopes),
            code_challenge=code_challenge,
            resource=resource,
            user_id=user_id,
            subscription_level=level,
            upstream=self._decrypt_upstream(
                user_id, access, refresh, issued_at, upstream_expires_at
            ),
            expires_at=expires_at,
            used_at=used_at,
            family_id=family_id,
        )

    def _grant_from_row(self, row: Sequence[Any]) -> Grant:
        (family_id, client_id, resource, user_id, access, refresh, issued_at,
         expires_at) = row  # fmt: skip
        return Grant(
            family_id=family_id,
            client_id=client_id,
            resource=resource,
            user_id=user_id,
            upstream=self._decrypt_upstream(
                user_id, access, refresh, issued_at, expires_at
            ),
        )


def is_storable_client_id(client_id: str) -> bool:
    """Return whether ``oauth_clients.client_id`` can store ``client_id``.

    The column rejects an empty id, one over :data:`MAX_CLIENT_ID_LENGTH`
    characters, and one with a NUL character, which PostgreSQL text rejects.
    Such an id names no client.
    """
    return 1 <= len(client_id) <= MAX_CLIENT_ID_LENGTH and "\x00" not in client_id


def client_secret_context(client_id: str) -> str:
    """Return the encryption context of a client's secret."""
    return "client-secret:" + client_id


def upstream_verifier_context(state_hash: str) -> str:
    """Return the encryption context of a pending authorization's verifier."""
    return "upstream-verifier:" + state_hash


def upstream_access_context(user_id: str) -> str:
    """Return the encryption context of a user's upstream access token."""
    return "upstream-access:" + user_id


def upstream_refresh_context(user_id: str) -> str:
    """Return the encryption context of a user's upstream refresh token."""
    return "upstream-refresh:" + user_id


def _refresh_due(tokens: UpstreamTokens, threshold: float, now: datetime) -> bool:
    """Return whether ``threshold`` of the access token's lifetime has passed.


    Tokens without an expiry or without a refresh token are never due,
    because there is nothing to compute or nothing to refresh with.
    """
    if tokens.expires_at is None or tokens.refresh_token is None:
        return False
    lifetime = tokens.expires_at - tokens.issued_at
    return now >= tokens.issued_at + lifetime * threshold


def _check_kind(name: str, value: str, kind: TokenKind) -> None:
    if token_kind(value) is not kind:
        raise InvalidValueError(
            f"the {name} ({type(value).__name__}) is not a token made by "
            f"new_token(TokenKind.{kind.name})"
        )


def _check_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidValueError(
            f"{name}={value.isoformat()} has no time zone; pass an aware "
            "datetime, such as datetime.now(UTC)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
