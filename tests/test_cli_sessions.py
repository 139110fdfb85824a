"""The ``sessions`` commands, run in a subprocess against sessions of a real store."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterator

import psycopg
import pytest

from mcp_authdb.db import resolve_target
from mcp_authdb.db.pool import Database
from mcp_authdb.store.session_store import SessionStore
from mcp_authdb.store.sessions import IssuedTokens
from mcp_authdb.store.tokens import TokenHasher, TokenKey, TokenKeys

from conftest import ScratchDatabase


@dataclasses.dataclass
class Seeded:
    """The sessions the tests start from, and the store that made them."""

    store: SessionStore
    alice_first: IssuedTokens
    alice_refreshed: IssuedTokens
    alice_second: IssuedTokens
    bob: IssuedTokens


@pytest.fixture
def seeded(db: ScratchDatabase, monkeypatch: pytest.MonkeyPatch) -> Iterator[Seeded]:
    """Two sign-ins of alice (one refreshed), one of bob, one ended row.

    MCP_AUTHDB_TOKEN_KEYS is unset for the commands, which must not need it.
    """
    monkeypatch.delenv("MCP_AUTHDB_TOKEN_KEYS", raising=False)
    hasher = TokenHasher(TokenKeys([TokenKey("test", secrets.token_bytes(32))]))
    with Database(resolve_target(db.url, db.settings), db.settings) as database:
        store = SessionStore(database, hasher)
        alice_first = store.create(
            "alice", scopes=["content:read"], subscription_level="pro"
        )
        alice_refreshed = store.refresh(alice_first.refresh_token)
        alice_second = store.create("alice", scopes=["content:read", "content:search"])
        bob = store.create("bob")
        with db.connect() as conn:
            conn.execute(
                "INSERT INTO user_sessions"
                " (user_id, access_token_hash, refresh_token_hash, expires_at)"
                " VALUES ('carol', 'ended-a', 'ended-r', now() - interval '1 hour')"
            )
            conn.commit()
        yield Seeded(store, alice_first, alice_refreshed, alice_second, bob)


def stored_hashes(db: ScratchDatabase) -> list[str]:
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT access_token_hash, refresh_token_hash FROM user_sessions"
        ).fetchall()
    return [value for row in rows for value in row]


def revoked_users(db: ScratchDatabase) -> list[str]:
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT DISTINCT user_id FROM user_sessions WHERE revoked_at IS NOT NULL"
            " ORDER BY user_id"
        ).fetchall()
    return [row[0] for row in rows]


# sessions list


def test_list_shows_one_line_per_family(db: ScratchDatabase, seeded: Seeded) -> None:
    result = db.run_cli("sessions", "list")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "3 live session(s), newest first, times in UTC:"
    assert lines[1].split() == [
        "ID",
        "USER",
        "LEVEL",
        "SCOPES",
        "EXPIRES",
        "REFRESH",
        "UNTIL",
        "LAST",
        "USED",
    ]
    ids = [int(line.split()[0]) for line in lines[2:]]
    assert ids == [
        seeded.bob.session.session_id,
        seeded.alice_second.session.session_id,
        seeded.alice_refreshed.session.session_id,
    ]
    refreshed = lines[4].split()
    assert refreshed[1:4] == ["alice", "pro", "content:read"]
    assert refreshed[-1] == "never"
    assert "carol" not in result.stdout
    for value in stored_hashes(db):
        assert value not in result.stdout


def test_list_json_has_fields_no_hash(db: ScratchDatabase, seeded: Seeded) -> None:
    result = db.run_cli("sessions", "list", "--user", "alice", "--json")

    assert result.returncode == 0, result.stderr
    sessions = json.loads(result.stdout)["sessions"]
    assert [s["session_id"] for s in sessions] == [
        seeded.alice_second.session.session_id,
        seeded.alice_refreshed.session.session_id,
    ]
    newest = sessions[0]
    assert newest["user_id"] == "alice"
    assert newest["scopes"] == ["content:read", "content:search"]
    assert newest["subscription_level"] == "free"
    assert newest["family_id"] == str(seeded.alice_second.session.family_id)
    assert newest["last_used_at"] is None
    assert newest["expires_at"].endswith("+00:00")
    assert set(newest) == {
        "session_id",
        "family_id",
        "user_id",
        "subscription_level",
        "scopes",
        "expires_at",
        "refresh_expires_at",
        "created_at",
        "last_used_at",
    }
    for value in stored_hashes(db):
        assert value not in result.stdout
    assert seeded.bob.access_token not in result.stdout


def test_list_stops_at_limit(db: ScratchDatabase, seeded: Seeded) -> None:
    result = db.run_cli("sessions", "list", "--limit", "1")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 live session(s)")
    assert result.stdout.splitlines()[-1] == "(stopped at --limit 1)"


def test_list_unknown_user_is_empty(db: ScratchDatabase, seeded: Seeded) -> None:
    result = db.run_cli("sessions", "list", "--user", "nobody")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no live session of user 'nobody'")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--limit", "0"), "--limit 0 is out of range"),
        (("--limit", "10001"), "--limit 10001 is out of range"),
        (("--limit", "many"), "--limit 'many' is not a whole number"),
        (("--user", "u" * 300), "300 characters long, over the maximum of 255"),
        (("--user", ""), "user_id is empty"),
    ],
)
def test_list_bad_input_exits_two(
    db: ScratchDatabase, args: tuple[str, ...], expected: str
) -> None:
    result = db.run_cli("sessions", "list", *args)

    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


# sessions revoke


def test_revoke_user_revokes_every_session(db: ScratchDatabase, seeded: Seeded) -> None:
    result = db.run_cli("sessions", "revoke", "--user", "alice")

    assert result.returncode == 0, result.stderr
    # Three rows: both sign-ins, and the refreshed one's old row.
    assert result.stdout.startswith("revoked 3 session row(s) of user 'alice'")
    assert revoked_users(db) == ["alice"]
    assert seeded.store.validate(seeded.alice_second.access_token) is None
    assert seeded.store.validate(seeded.alice_refreshed.access_token) is None
    assert seeded.store.validate(seeded.bob.access_token) is not None


def test_revoke_session_revokes_its_family(db: ScratchDatabase, seeded: Seeded) -> None:
    session_id = seeded.alice_refreshed.session.session_id

    result = db.run_cli("sessions", "revoke", "--session", str(session_id), "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["revoked"] == 2
    assert report["session"] == session_id
    assert report["user"] is None
    assert seeded.store.validate(seeded.alice_refreshed.access_token) is None
    assert seeded.store.validate(seeded.alice_second.access_token) is not None


def test_revoke_again_revokes_nothing(db: ScratchDatabase, seeded: Seeded) -> None:
    session_id = str(seeded.bob.session.session_id)
    first = db.run_cli("sessions", "revoke", "--session", session_id)

    again = db.run_cli("sessions", "revoke", "--session", session_id)
    user_again = db.run_cli("sessions", "revoke", "--user", "bob", "--json")

    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("revoked 1 session row(s)")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"nothing to revoke: session {session_id}")
    assert user_again.returncode == 0, user_again.stderr
    assert json.loads(user_again.stdout)["revoked"] == 0


def test_revoke_unknown_session_exits_two(db: ScratchDatabase, seeded: Seeded) -> None:
    result = db.run_cli("sessions", "revoke", "--session", "999999")

    assert result.returncode == 2
    assert "session 999999 not found" in result.stderr
    assert "mcp-authdb sessions list" in result.stderr
    assert result.stdout == ""
    assert revoked_users(db) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--user", "alice", "--session", "1"), "not allowed with argument"),
        ((), "one of the arguments --user --session is required"),
        (("--session", "0"), "--session 0 is out of range"),
        (("--session", "abc"), "--session 'abc' is not a whole number"),
        (("--user", "x" * 300), "300 characters long"),
    ],
)
def test_revoke_bad_input_exits_two(
    db: ScratchDatabase, seeded: Seeded, args: tuple[str, ...], expected: str
) -> None:
    result = db.run_cli("sessions", "revoke", *args)

    assert result.returncode == 2
    assert expected in result.stderr
    assert revoked_users(db) == []


def test_revoke_notifies_listeners(db: ScratchDatabase, seeded: Seeded) -> None:
    with psycopg.connect(db.url, autocommit=True) as listener:
        listener.execute("LISTEN mcp_authdb_sessions")

        result = db.run_cli("sessions", "revoke", "--user", "bob")
        payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]

    assert result.returncode == 0, result.stderr
    assert payloads == ["bob"]


def test_revoke_help_mentions_notification(db: ScratchDatabase) -> None:
    result = db.run_cli("sessions", "revoke", "--help")

    assert result.returncode == 0
    assert "mcp_authdb_sessions" in result.stdout
    assert "token cache" in result.stdout


# sessions stats


def test_stats_counts_states(db: ScratchDatabase, seeded: Seeded) -> None:
    seeded.store.revoke_user("bob")

    text = db.run_cli("sessions", "stats")
    as_json = db.run_cli("sessions", "stats", "--json")

    assert text.returncode == 0, text.stderr
    # Live: alice's three rows, since the rotated one's access token is still
    # valid. Expired: carol's row. Revoked: bob's.
    assert "3 live, 1 expired, 1 revoked (5 rows)" in text.stdout
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["live"] == 3
    assert report["expired"] == 1
    assert report["revoked"] == 1
    assert report["total"] == 5


def test_commands_ignore_token_keys(db: ScratchDatabase, seeded: Seeded) -> None:
    """A broken MCP_AUTHDB_TOKEN_KEYS does not matter to these commands."""
    for args in (("list",), ("stats",), ("revoke", "--user", "bob")):
        result = db.run_cli("sessions", *args, MCP_AUTHDB_TOKEN_KEYS="not-a-key")

        assert result.returncode == 0, result.stderr
