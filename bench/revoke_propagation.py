"""Benchmark of revocation propagation between two processes through the cache.

Two processes share one database. Each has a session store with a
:class:`~mcp_authdb.store.cache.TokenCache` and a session listener. In each
round, process A (this one) signs a user in. Process B, a second Python process
that this script starts, validates the access token once, which caches it,
and then validates it again and again from its cache. Then
A revokes the token through its store and B keeps validating until a call
returns None. Per round the script records, on the machine's
``CLOCK_MONOTONIC``, which every process on a Linux host shares:

- when A's ``revoke_token`` call began and when it returned, after the
  server acknowledged the COMMIT that sends the notification;
- when B's listener removed the user's entries from B's cache;
- when B's first validation after that returned None, after its database
  lookup.

It prints the median, p99 and max of "commit acknowledged to invalidation"
and "commit acknowledged to first rejection", and how many validations per
second B served from its cache meanwhile. A delay below zero means that B
acted before A's COMMIT acknowledgement arrived. Modes:

- ``async``: B runs an AsyncSessionStore and an AsyncSessionListener on one
  event loop, and yields to the loop after each validation, as a server does
  between requests;
- ``thread``: B runs a SessionStore and a SessionListener thread, and its
  main thread validates in a busy loop. The listener thread then gets the
  GIL only when CPython's switch interval (5 ms by default) makes the main
  thread drop it, so this mode shows the worst case of a CPU-bound thread.

The script works in a scratch database (``--database``, default
``mcp_authdb_bench_revoke``), created afresh with the migrations and dropped
at the end, on the server of ``--url`` or ``DATABASE_URL``, whose role needs
CREATEDB. Only a Unix socket or a loopback address is accepted. The token
keys are generated for the run and given to B in its environment.

Example:

    DATABASE_URL='postgresql:///postgres?host=/var/run/postgresql' \\
        .venv/bin/python bench/revoke_propagation.py --rounds 200
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import platform
import random
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import IO, Any

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mcp_authdb.db import ConnectionTarget, Settings, connect, resolve_target
from mcp_authdb.db.migrations import migrate
from mcp_authdb.db.pool import AsyncDatabase, Database
from mcp_authdb.store.cache import TokenCache
from mcp_authdb.store.listener import AsyncSessionListener, SessionListener
from mcp_authdb.store.session_store import AsyncSessionStore, SessionStore
from mcp_authdb.store.tokens import TOKEN_KEYS_VARIABLE, TokenHasher

logger = logging.getLogger("revoke_propagation")

DEFAULT_DATABASE = "mcp_authdb_bench_revoke"
MODES = ("async", "thread")
# B gives up on a round when no rejection came within this many seconds.
ROUND_TIMEOUT_S = 5.0
# Long enough that, within a round, only an invalidation removes an entry.
CACHE_TTL = timedelta(seconds=60)
LOOPBACK_NAMES = ("localhost",)


def monotonic() -> float:
    """Return CLOCK_MONOTONIC, comparable between processes on one Linux host."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclasses.dataclass(frozen=True)
class Round:
    """The timestamps of one round, in seconds of CLOCK_MONOTONIC."""

    revoke_began: float
    commit_acknowledged: float
    invalidated: float | None
    rejected: float | None
    validations: int
    validating_s: float


class TimedCache(TokenCache):
    """A token cache that records when each user was last invalidated."""

    def __init__(self) -> None:
        super().__init__(CACHE_TTL)
        self.invalidated_at: dict[str, float] = {}

    def invalidate_user(self, user_id: str) -> None:
        super().invalidate_user(user_id)
        self.invalidated_at[user_id] = monotonic()


# Process B. It reads one JSON request per line on stdin and writes one JSON
# reply per line on stdout; its logs go to stderr.


class Follower:
    """Process B's side of a round, the same for both modes."""

    def __init__(self, output: IO[str]) -> None:
        self.output = output

    def send(self, message: dict[str, Any]) -> None:
        self.output.write(json.dumps(message) + "\n")
        self.output.flush()

    def ready(self, cache: TimedCache, user_id: str, hits_before: int) -> None:
        if cache.stats().hits != hits_before + 1:
            raise RuntimeError("the second validation was not served from the cache")
        cache.invalidated_at.pop(user_id, None)
        self.send({"ready": True})

    def finish(
        self,
        cache: TimedCache,
        user_id: str,
        rejected: float | None,
        validations: int,
        began: float,
    ) -> None:
        self.send(
            {
                "invalidated": cache.invalidated_at.pop(user_id, None),
                "rejected": rejected,
                "validations": validations,
                "validating_s": monotonic() - began,
            }
        )


async def follow_async(target: ConnectionTarget, settings: Settings) -> None:
    cache = TimedCache()
    hasher = TokenHasher.from_env(settings)
    follower = Follower(sys.stdout)
    async with (
        AsyncDatabase(target, settings) as database,
        AsyncSessionListener(target, cache) as listener,
    ):
        store = AsyncSessionStore(database, hasher, cache=cache)
        if not await listener.wait_listening(10):
            raise RuntimeError("the listener of process B did not start")
        follower.send({"listening": True})
        while line := await asyncio.to_thread(sys.stdin.readline):
            request = json.loads(line)
            token, user_id = request["token"], request["user_id"]
            if await store.validate(token) is None:
                raise RuntimeError("a new token did not validate")
            hits_before = cache.stats().hits
            if await store.validate(token) is None:
                raise RuntimeError("a cached token did not validate")
            follower.ready(cache, user_id, hits_before)

            validations = 0
            began = monotonic()
            rejected = None
            while monotonic() - began < ROUND_TIMEOUT_S:
                if await store.validate(token) is None:
                    rejected = monotonic()
                    break
                validations += 1
                await asyncio.sleep(0)
            follower.finish(cache, user_id, rejected, validations, began)


def follow_thread(target: ConnectionTarget, settings: Settings) -> None:
    cache = TimedCache()
    hasher = TokenHasher.from_env(settings)
    follower = Follower(sys.stdout)
    with (
        Database(target, settings) as database,
        SessionListener(target, cache) as listener,
    ):
        store = SessionStore(database, hasher, cache=cache)
        if not listener.wait_listening(10):
            raise RuntimeError("the listener of process B did not start")
        follower.send({"listening": True})
        while line := sys.stdin.readline():
            request = json.loads(line)
            token, user_id = request["token"], request["user_id"]
            if store.validate(token) is None:
                raise RuntimeError("a new token did not validate")
            hits_before = cache.stats().hits
            if store.validate(token) is None:
                raise RuntimeError("a cached token did not validate")
            follower.ready(cache, user_id, hits_before)

            validations = 0
            began = monotonic()
            rejected = None
            while monotonic() - began < ROUND_TIMEOUT_S:
                if store.validate(token) is None:
                    rejected = monotonic()
                    break
                validations += 1
            follower.finish(cache, user_id, rejected, validations, began)


# Process A.


class FollowerProcess:
    """Process B, started with this script and driven over its stdin and stdout."""

    def __init__(self, url: str, mode: str, keys: str) -> None:
        env = dict(os.environ)
        env[TOKEN_KEYS_VARIABLE] = keys
        env["DATABASE_URL"] = url
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--role", "follower", "--mode", mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def request(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait(10)
            raise RuntimeError(f"process B exited with status {code}; see its errors")
        message: dict[str, Any] = json.loads(line)
        return message

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measure(
    target: ConnectionTarget, settings: Settings, url: str, mode: str, rounds: int
) -> list[Round]:
    """Run ``rounds`` rounds against a new process B in ``mode``."""
    keys = f"bench:{secrets.token_urlsafe(32)}"
    hasher = TokenHasher.from_env(settings, {TOKEN_KEYS_VARIABLE: keys})
    chooser = random.Random(mode)
    results = []
    follower = FollowerProcess(url, mode, keys)
    try:
        if not follower.reply().get("listening"):
            raise RuntimeError("process B did not report its listener")
        with Database(target, settings) as database:
            # A's own cache and listener make A a realistic peer, though A
            # only revokes; its store also invalidates its own cache.
            cache = TokenCache(CACHE_TTL)
            with SessionListener(target, cache) as listener:
                if not listener.wait_listening(10):
                    raise RuntimeError("the listener of process A did not start")
                store = SessionStore(database, hasher, cache=cache)
                for number in range(rounds):
                    results.append(
                        run_round(store, follower, f"bench-user-{number}", chooser)
                    )
    finally:
        follower.close()
    return results


def run_round(
    store: SessionStore,
    follower: FollowerProcess,
    user_id: str,
    chooser: random.Random,
) -> Round:
    issued = store.create(user_id)
    follower.request({"token": issued.access_token, "user_id": user_id})
    if not follower.reply().get("ready"):
        raise RuntimeError("process B did not cache the token")

    # B is validating from its cache by now; a random pause moves the
    # revocation to a random point of its loop.
    time.sleep(chooser.uniform(0.001, 0.003))
    revoke_began = monotonic()
    revoked = store.revoke_token(issued.access_token)
    commit_acknowledged = monotonic()
    if revoked != 1:
        raise RuntimeError(f"revoke_token revoked {revoked} rows, expected 1")

    outcome = follower.reply()
    return Round(
        revoke_began=revoke_began,
        commit_acknowledged=commit_acknowledged,
        invalidated=outcome["invalidated"],
        rejected=outcome["rejected"],
        validations=outcome["validations"],
        validating_s=outcome["validating_s"],
    )


def summarize(mode: str, rounds: list[Round]) -> list[str]:
    """Return the report lines of one mode."""
    missing_invalidations = sum(r.invalidated is None for r in rounds)
    missing_rejections = sum(r.rejected is None for r in rounds)
    lines = [f"mode {mode}: {len(rounds)} rounds"]

    def delays(name: str, values: list[float]) -> None:
        if len(values) < 2:
            lines.append(f"  {name}: too few values")
            return
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        lines.append(
            f"  {name}: median {statistics.median(values) * 1000:.3f} ms, "
            f"p99 {cuts[98] * 1000:.3f} ms, max {max(values) * 1000:.3f} ms"
        )

    delays(
        "commit acknowledged -> B's cache invalidated",
        [
            r.invalidated - r.commit_acknowledged
            for r in rounds
            if r.invalidated is not None
        ],
    )
    delays(
        "commit acknowledged -> B's first rejection",
        [r.rejected - r.commit_acknowledged for r in rounds if r.rejected is not None],
    )
    delays(
        "revoke call began -> B's cache invalidated",
        [r.invalidated - r.revoke_began for r in rounds if r.invalidated is not None],
    )
    delays(
        "revoke_token call (UPDATE + COMMIT)",
        [r.commit_acknowledged - r.revoke_began for r in rounds],
    )
    validations = sum(r.validations for r in rounds)
    seconds = sum(r.validating_s for r in rounds)
    lines.append(
        f"  B validated from its cache {validations} times in {seconds:.2f} s: "
        f"{validations / seconds:,.0f} validations/s"
    )
    lines.append(
        f"  rounds without invalidation: {missing_invalidations}, "
        f"without rejection within {ROUND_TIMEOUT_S:g} s: {missing_rejections}"
    )
    return lines


# Set-up and command line.


def check_local(url: str) -> None:
    """Exit unless every host of ``url`` is a Unix socket or a loopback address."""
    params = conninfo_to_dict(url)
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    addresses = str(params.get("hostaddr") or "").split(",")
    for host in hosts + addresses:
        if host == "" or host.startswith(("/", "@")) or host in LOOPBACK_NAMES:
            continue
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise SystemExit(
                f"host {host!r} is neither a Unix socket nor a loopback address; "
                "this benchmark runs only against a server on this machine"
            )


def prepare_database(
    server: ConnectionTarget, settings: Settings, name: str
) -> tuple[str, ConnectionTarget]:
    """Create the scratch database afresh and migrate it; return its URL and target."""
    if name == conninfo_to_dict(server.conninfo).get("dbname"):
        raise SystemExit(
            f"--database {name} is the database of the URL; the benchmark drops "
            "its scratch database, so name another one"
        )
    drop_database(server, name)
    with connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(settings.database_url or "", dbname=name)
    target = resolve_target(url, settings.replace(database_url=url))
    with connect(target) as conn:
        migrate(conn)
    return url, target


def drop_database(server: ConnectionTarget, name: str) -> None:
    with connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


def server_version(target: ConnectionTarget) -> str:
    with connect(target, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure how fast a revocation in one process reaches the "
        "token cache of another.",
    )
    parser.add_argument(
        "--url",
        help="PostgreSQL URL of the server, on a Unix socket or loopback "
        "(default: DATABASE_URL)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=200,
        help="revocations measured per mode (default: 200)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        nargs="+",
        default=list(MODES),
        help="how process B runs; several modes are measured one after the "
        "other (default: async thread)",
    )
    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="scratch database, dropped and created again (default: %(default)s)",
    )
    parser.add_argument("--role", choices=("leader", "follower"), default="leader")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, or process B's side of it; return the exit status."""
    args = parse_args(argv)
    # Both processes log to this terminal, so each line starts with the role.
    logging.basicConfig(
        level=logging.WARNING, format=f"{args.role} %(levelname)s %(message)s"
    )
    url = args.url or os.environ.get("DATABASE_URL", "").strip()
    if not url:
        raise SystemExit("set DATABASE_URL or pass --url")
    check_local(url)
    settings = Settings.from_env().replace(database_url=url)
    target = resolve_target(url, settings)

    if args.role == "follower":
        if args.mode == ["async"]:
            asyncio.run(follow_async(target, settings))
        else:
            follow_thread(target, settings)
        return 0

    scratch_url, scratch = prepare_database(target, settings, args.database)
    scratch_settings = settings.replace(database_url=scratch_url)
    try:
        print(
            f"PostgreSQL {server_version(scratch)} at {scratch.description}; "
            f"Python {platform.python_version()}; {os.cpu_count()} CPUs; "
            f"{platform.platform()}"
        )
        for mode in args.mode:
            rounds = measure(scratch, scratch_settings, scratch_url, mode, args.rounds)
            print("\n".join(summarize(mode, rounds)), flush=True)
    finally:
        drop_database(target, args.database)
    return 0


if __name__ == "__main__":
    sys.exit(main())
