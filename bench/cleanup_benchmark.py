"""Benchmark of expired-session cleanup: batched against one plain DELETE.

Each run seeds ``--expired`` expired sessions and ``--live`` live ones, then
measures, under the same concurrent load of session lookups by
``access_token_hash``:

1. lookups with no cleanup running (the idle latency);
2. one ``DELETE FROM user_sessions WHERE expires_at < now()``;
3. for each ``--batch-size``, after seeding the same rows again,
   :func:`mcp_authdb.store.cleanup.delete_expired_sessions`.

It prints rows per second of each cleanup and the lookup latency (p50, p99,
max) during each phase, per run and as medians over the runs.

The benchmark works in a scratch database of its own (``--database``,
default ``mcp_authdb_bench``), dropped and created again at the start and
dropped at the end unless ``--keep-database`` is given. It is created on the
server of ``DATABASE_URL``, whose role needs CREATEDB, or on the embedded
server when ``DATABASE_URL`` is unset.

Example, small enough for a quick check:

    .venv/bin/python bench/cleanup_benchmark.py --expired 20000 --live 2000 \\
        --runs 1 --idle-seconds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mcp_authdb.db import (
    ConnectionTarget,
    Settings,
    connect,
    open_target,
    resolve_target,
)
from mcp_authdb.db.migrations import migrate
from mcp_authdb.store.cleanup import CleanupResult, delete_expired_sessions

logger = logging.getLogger("cleanup_benchmark")

DEFAULT_DATABASE = "mcp_authdb_bench"
# Lookup keys are drawn from this many live sessions, picked at random.
LOOKUP_KEY_SAMPLE = 10_000

# Expired sessions expire in creation order over the past day and live ones
# within the next day, as with one fixed session lifetime, so the heap order
# follows expires_at. Hashes are 64 hex digits, the size of an HMAC-SHA-256.
_SEED = """
INSERT INTO user_sessions (
    user_id, access_token_hash, refresh_token_hash, expires_at, scope,
    subscription_level
)
SELECT 'user-' || (i %% 50000),
       encode(sha256(convert_to(%(kind)s || '-access-' || i, 'UTF8')), 'hex'),
       encode(sha256(convert_to(%(kind)s || '-refresh-' || i, 'UTF8')), 'hex'),
       now() + %(start)s::interval + i * %(step)s::interval,
       '{content:read,content:search}',
       'free'
FROM generate_series(1, %(count)s) AS i
"""

_LOOKUP = """
SELECT id, user_id, expires_at, scope, subscription_level
FROM user_sessions
WHERE access_token_hash = %s AND expires_at > now()
"""


@dataclasses.dataclass(frozen=True)
class Latency:
    """Lookup latencies of one phase: percentiles in milliseconds, and counts."""

    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    misses: int

    @classmethod
    def of(cls, seconds: list[float], misses: int) -> Latency:
        if len(seconds) < 2:
            return cls(len(seconds), float("nan"), float("nan"), float("nan"), misses)
        cuts = statistics.quantiles(seconds, n=100, method="inclusive")
        return cls(
            count=len(seconds),
            p50_ms=cuts[49] * 1000,
            p99_ms=cuts[98] * 1000,
            max_ms=max(seconds) * 1000,
            misses=misses,
        )


@dataclasses.dataclass(frozen=True)
class Phase:
    """One measured phase: a cleanup, or none, and the lookups meanwhile.

    The plain DELETE counts as one batch, and the idle phase as none.
    """

    name: str
    cleanup: CleanupResult
    lookups: Latency


class LookupLoad:
    """Threads that look sessions up by access_token_hash at a steady rate.

    Each thread has its own connection. ``rate`` is lookups per second per
    thread; 0 means as fast as possible.
    """

    def __init__(
        self, target: ConnectionTarget, keys: list[str], threads: int, rate: float
    ) -> None:
        self.target = target
        self.keys = keys
        self.threads = threads
        self.rate = rate
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._misses = 0
        self._errors: list[BaseException] = []

    @contextmanager
    def measure(self) -> Iterator[list[Latency]]:
        """Run the lookups for the duration of the block.

        The yielded list receives the phase's latencies when the block ends.
        """
        self._stop.clear()
        self._latencies = []
        self._misses = 0
        self._errors = []
        # The block starts once every thread is connected, so that the phase
        # measures lookups only, not connection set-up.
        connected = threading.Barrier(self.threads + 1, timeout=30)
        workers = [
            threading.Thread(target=self._work, args=(seed, connected), daemon=True)
            for seed in range(self.threads)
        ]
        for worker in workers:
            worker.start()
        outcome: list[Latency] = []
        try:
            connected.wait()
            yield outcome
        except threading.BrokenBarrierError:
            pass  # A thread failed to connect; its error is raised below.
        finally:
            self._stop.set()
            for worker in workers:
                worker.join(timeout=30)
        if self._errors:
            raise RuntimeError("a lookup thread failed") from self._errors[0]
        outcome.append(Latency.of(self._latencies, self._misses))

    def _work(self, seed: int, connected: threading.Barrier) -> None:
        chooser = random.Random(seed)
        interval = 1 / self.rate if self.rate > 0 else 0.0
        latencies: list[float] = []
        misses = 0
        try:
            with connect(self.target, autocommit=True) as conn:
                connected.wait()
                next_start = time.monotonic()
                while not self._stop.is_set():
                    key = chooser.choice(self.keys)
                    began = time.monotonic()
                    row = conn.execute(_LOOKUP, (key,)).fetchone()
                    latencies.append(time.monotonic() - began)
                    if row is None:
                        misses += 1
                    next_start += interval
                    pause = next_start - time.monotonic()
                    if pause > 0:
                        self._stop.wait(pause)
        except BaseException as exc:
            # A thread that fails before the barrier breaks it, so the
            # measurement stops instead of waiting.
            connected.abort()
            with self._lock:
                self._errors.append(exc)
        with self._lock:
            self._latencies.extend(latencies)
            self._misses += misses


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figures; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    settings = Settings.from_env()

    with open_target(settings) as server:
        target = prepare_database(server, settings, args.database, args.setup_sql)
        try:
            runs = [
                run_once(target, args, number) for number in range(1, args.runs + 1)
            ]
        finally:
            if not args.keep_database:
                drop_database(server, args.database)

    print_summary(runs, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as output:
            json.dump(
                [[dataclasses.asdict(phase) for phase in run] for run in runs],
                output,
                indent=2,
            )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare batched session cleanup with one plain DELETE.",
    )
    parser.add_argument(
        "--expired",
        type=positive_int,
        default=1_000_000,
        help="expired sessions to seed before each cleanup (default: 1000000)",
    )
    parser.add_argument(
        "--live",
        type=positive_int,
        default=100_000,
        help="live sessions to seed, never deleted (default: 100000)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        nargs="+",
        default=[1000],
        help="rows per batch of the batched cleanup; several values are each "
        "measured in every run (default: 1000)",
    )

    parser.add_argument(
        "--runs",
        type=positive_int,
        default=3,
        help="how many times to repeat the whole measurement (default: 3)",
    )

    parser.add_argument(
        "--lookup-threads",
        type=positive_int,
        default=3,
        help="concurrent lookup threads, each with its own connection (default: 3)",
    )
    parser.add_argument(
        "--lookup-rate",
        type=float,
        default=200.0,
        help="lookups per second per thread; 0 means as fast as possible "
        "(default: 200)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="seconds of lookups with no cleanup running (default: 10)",
    )
    parser.add_argument(
        "--busy-core-control",
        action="store_true",
        help="also measure the lookups for --idle-seconds while another process "
        "keeps one CPU core busy, with no cleanup running",
    )

    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="scratch database, dropped and created again (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-database",
        action="store_true",
        help="keep the scratch database at the end",
    )
    parser.add_argument(
        "--setup-sql",
        metavar="PATH",
        help="SQL file to run in the scratch database after the migrations, for "
        "example a proposed definition of cleanup_expired_sessions_batch",
    )

    parser.add_argument("--json", metavar="PATH", help="also write raw figures here")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def prepare_database(
    server: ConnectionTarget, settings: Settings, name: str, setup_sql: str | None
) -> ConnectionTarget:
    """Create the scratch database afresh, migrate it, and return its target.

    ``setup_sql`` names an SQL file run after the migrations, if any.
    """
    server_database = conninfo_to_dict(server.conninfo).get("dbname")
    if name == server_database:
        raise SystemExit(
            f"--database {name} is the database of DATABASE_URL; the benchmark "
            "drops its scratch database, so name another one"
        )
    drop_database(server, name)
    with connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    target = resolve_target(make_conninfo(server.conninfo, dbname=name), settings)
    with connect(target) as conn:
        migrate(conn)
        if setup_sql is not None:
            with open(setup_sql, encoding="utf-8") as file:
                # Sent as one simple query, as the migration runner does.
                conn.execute(file.read().encode())
    return target


def drop_database(server: ConnectionTarget, name: str) -> None:
    with connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


def run_once(
    target: ConnectionTarget, args: argparse.Namespace, number: int
) -> list[Phase]:
    """Measure the idle lookups, the plain DELETE and each batch size once."""
    print(f"run {number}: seeding", file=sys.stderr)
    keys = seed(target, args.expired, args.live)
    load = LookupLoad(target, keys, args.lookup_threads, args.lookup_rate)
    phases = [measure_idle(load, args.idle_seconds)]
    if args.busy_core_control:
        phases.append(measure_idle(load, args.idle_seconds, busy_core=True))
    phases.append(measure_plain_delete(target, load, args.expired))
    for batch_size in args.batch_size:
        print(f"run {number}: seeding for batch size {batch_size}", file=sys.stderr)
        seed(target, args.expired, args.live)
        phases.append(measure_batched(target, load, args.expired, batch_size))
    for phase in phases:
        print(f"run {number}: {format_phase(phase)}", file=sys.stderr)
    return phases


def seed(target: ConnectionTarget, expired: int, live: int) -> list[str]:
    """Replace all sessions with fresh ones; return lookup keys of live ones.

    The table is vacuumed and analyzed, and a checkpoint is taken, so that
    every cleanup starts from the same state and no checkpoint of the seed's
    writes falls into a measurement.
    """
    with connect(target, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 0")
        conn.execute("TRUNCATE user_sessions")
        # Expired: from one day ago up to one minute ago. Live: from one hour
        # ahead up to one day ahead.
        conn.execute(
            _SEED,
            {
                "kind": "expired",
                "start": "-1 day",
                "step": f"{(86400 - 60) / expired} seconds",
                "count": expired,
            },
        )
        conn.execute(
            _SEED,
            {
                "kind": "live",
                "start": "1 hour",
                "step": f"{(86400 - 3600) / live} seconds",
                "count": live,
            },
        )
        conn.execute("VACUUM (ANALYZE) user_sessions")
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            logger.warning("no privilege for CHECKPOINT; figures may be noisier")
        rows = conn.execute(
            "SELECT access_token_hash FROM user_sessions WHERE expires_at > now()"
            " ORDER BY random() LIMIT %s",
            (LOOKUP_KEY_SAMPLE,),
        ).fetchall()
    return [row[0] for row in rows]


def measure_idle(load: LookupLoad, seconds: float, *, busy_core: bool = False) -> Phase:
    """Measure the lookups with no cleanup running.

    With ``busy_core``, another process keeps one CPU core busy meanwhile. This
    control shows the slowdown that any busy core causes, with no lock and no
    disk write involved.
    """
    busy = None
    if busy_core:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        began = time.monotonic()
        with load.measure() as outcome:
            time.sleep(seconds)
        elapsed = time.monotonic() - began
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()

    name = "idle, one core busy" if busy_core else "idle"
    idle = CleanupResult(deleted=0, batches=0, elapsed_s=elapsed)
    return Phase(name, idle, outcome[0])


def measure_plain_delete(
    target: ConnectionTarget, load: LookupLoad, expected: int
) -> Phase:
    with connect(target, autocommit=True) as conn:
        # One statement deletes everything, so the statement timeout that
        # bounds each batch would cancel it.
        conn.execute("SET statement_timeout = 0")
        with load.measure() as outcome:
            began = time.monotonic()
            cursor = conn.execute("DELETE FROM user_sessions WHERE expires_at < now()")
            elapsed = time.monotonic() - began
    check_deleted("plain DELETE", cursor.rowcount, expected)
    plain = CleanupResult(deleted=cursor.rowcount, batches=1, elapsed_s=elapsed)
    return Phase("plain DELETE", plain, outcome[0])


def measure_batched(
    target: ConnectionTarget, load: LookupLoad, expected: int, batch_size: int
) -> Phase:
    # The project's statement timeout stays on: each batch must fit in it.
    with connect(target, autocommit=True) as conn, load.measure() as outcome:
        result = delete_expired_sessions(conn, batch_size=batch_size)
    check_deleted(f"batch size {batch_size}", result.deleted, expected)
    return Phase(f"batched, batch size {batch_size}", result, outcome[0])


def check_deleted(name: str, deleted: int, expected: int) -> None:
    if deleted != expected:
        raise RuntimeError(f"{name} deleted {deleted} sessions, expected {expected}")


def format_phase(phase: Phase) -> str:
    lookups = phase.lookups
    text = (
        f"{phase.name}: lookups p50 {lookups.p50_ms:.2f} ms, p99 "
        f"{lookups.p99_ms:.2f} ms, max {lookups.max_ms:.1f} ms "
        f"({lookups.count} lookups, {lookups.misses} misses)"
    )
    cleanup = phase.cleanup
    if cleanup.batches:
        text += (
            f"; deleted {cleanup.deleted} in {cleanup.elapsed_s:.2f} s = "
            f"{cleanup.rows_per_second:,.0f} rows/s"
        )
    return text


def print_summary(runs: list[list[Phase]], args: argparse.Namespace) -> None:
    """Print the medians over the runs as a Markdown table."""

    def median(name: str, field: str) -> float:
        values = []
        for run in runs:
            phase = next(phase for phase in run if phase.name == name)
            value = (
                phase.cleanup.rows_per_second
                if field == "rows_per_second"
                else getattr(phase.lookups, field)
            )
            values.append(value)
        return statistics.median(values)

    plain_rate = median("plain DELETE", "rows_per_second")
    idle_p99 = median("idle", "p99_ms")
    print(
        f"\n{args.expired} expired, {args.live} live, {args.runs} runs, "
        f"{args.lookup_threads} lookup threads at "
        f"{args.lookup_rate or 'unlimited'} lookups/s each; medians over the runs; "
        f"cleanup functions {args.setup_sql or 'as migrated'}\n"
    )
    print(
        "| phase | rows/s | rate vs plain DELETE | lookup p50 ms | lookup p99 ms "
        "| p99 vs idle | lookup max ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for phase in runs[0]:
        name = phase.name
        rate = median(name, "rows_per_second")
        p99 = median(name, "p99_ms")
        rate_text = ratio_text = "-"
        if phase.cleanup.batches:
            rate_text = f"{rate:,.0f}"
            ratio_text = f"{rate / plain_rate:.2f}"
        print(
            f"| {name} | {rate_text} | {ratio_text} | {median(name, 'p50_ms'):.2f} "
            f"| {p99:.2f} | {p99 / idle_p99:.2f} | {median(name, 'max_ms'):.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
