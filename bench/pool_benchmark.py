"""Benchmark of single-row lookups by key, from pgbench to the lookup batcher.

One run measures, on one server and side by side, how many lookups per second
``--clients`` concurrent clients get:

- ``pgbench``: ``pgbench -S -M prepared -c N -j 2 -T S`` on a scratch database
  initialized by ``pgbench -i``, the server's own ceiling for such lookups;
- ``pool loop``: tasks that each take a connection from a plain
  ``psycopg_pool.AsyncConnectionPool`` per lookup and execute the statement;
- ``pool getconn``: the same with ``getconn``/``putconn`` instead of the
  ``connection()`` context manager;
- ``raw prepared``: one ``AsyncConnection`` per task, statements prepared at
  once (``prepare_threshold=0``); ``raw prepared binary`` adds binary results,
  and ``raw unprepared`` never prepares;
- ``pipeline``: every task on one connection in pipeline mode;
- ``run``: :meth:`AsyncDatabase.run` with a one-statement operation,
  ``transaction=False, idempotent=True``; ``run in transaction`` with
  ``transaction=True``;
- ``batcher``: :meth:`AsyncDatabase.lookup_batcher`, which merges the keys of
  concurrent callers into one ``= ANY(...)`` statement; ``batcher, 1 in
  flight`` runs one statement at a time.

Every lookup reads one row of ``user_sessions`` by its unique
``access_token_hash``, with the conditions of a token validation. Every key
exists, so a lookup that finds no row is a miss, and a run with misses stops
with an error. The Python clients run as tasks of one event loop in this
process.

The variants are interleaved: each round measures every variant once, in an
order rotated from round to round, so that a change in the machine's load
affects all of them alike. For each variant, the table gives the median rate
over the rounds with the lowest and highest. It also gives the median over the
rounds of the variant's ratio to the pool loop of the same round, and the
client process's CPU time per lookup. With ``--instructions N``, it adds the
client's CPU instructions per lookup, counted by valgrind's callgrind over N
lookups of each Python variant. Times can vary twofold from round to round on
a shared machine, while that count hardly moves with the load.

The benchmark works in two scratch databases of its own (``--database`` and
``--pgbench-database``), created afresh on the server of ``DATABASE_URL``,
whose role needs CREATEDB, or on the embedded server when ``DATABASE_URL`` is
unset, and dropped at the end unless ``--keep-database`` is given.

Example, small enough for a quick check:

    .venv/bin/python bench/pool_benchmark.py --rows 10000 --rounds 1 --seconds 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mcp_authdb.db import ConnectionTarget, Settings, connect, open_target
from mcp_authdb.db.connection import resolve_target
from mcp_authdb.db.embedded import wheel_binaries
from mcp_authdb.db.migrations import migrate
from mcp_authdb.db.pool import AsyncDatabase, Operation, Query

DEFAULT_DATABASE = "mcp_authdb_pool_bench"
DEFAULT_PGBENCH_DATABASE = "mcp_authdb_pgbench"
MACHINE_BINARIES_GLOB = "/usr/lib/postgresql/*/bin"
# Lookups made before the measurement starts, while prepared statements and
# caches settle: for so many seconds, or so many per client when counting
# instructions.
WARM_UP_S = 0.3
WARM_UP_LOOKUPS = 20
# The variant that the ratios compare with.
BASELINE = "pool loop"

_COLUMNS = (
    "id, family_id, user_id, scope, subscription_level, expires_at, "
    "refresh_expires_at, created_at, last_used_at"
)
_CONDITIONS = "AND expires_at > now() AND revoked_at IS NULL"
LOOKUP = (
    f"SELECT {_COLUMNS} FROM user_sessions WHERE access_token_hash = %s {_CONDITIONS}"
)
BATCH_LOOKUP = (
    f"SELECT access_token_hash, {_COLUMNS} FROM user_sessions "
    f"WHERE access_token_hash = ANY(%(keys)s::text[]) {_CONDITIONS}"
)

# Hashes shaped like the stored ones: a key id, a colon and the unpadded
# base64url of a SHA-256.
_SEED = """
INSERT INTO user_sessions (
    user_id, access_token_hash, refresh_token_hash, expires_at,
    refresh_expires_at, family_id, scope, subscription_level
)
SELECT 'user-' || (i %% 20000),
       'k1:' || rtrim(translate(encode(sha256(convert_to('access-' || i, 'UTF8')),
                                       'base64'), '+/', '-_'), '='),
       'k1:' || rtrim(translate(encode(sha256(convert_to('refresh-' || i, 'UTF8')),
                                       'base64'), '+/', '-_'), '='),
       now() + interval '1 day',
       now() + interval '30 days',
       gen_random_uuid(),
       '{content:read,content:search}',
       'free'
FROM generate_series(1, %(rows)s) AS i
"""

_PGBENCH_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_CALLGRIND_TOTAL = re.compile(r"Collected : (\d+)")
_PGBENCH_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")

Lookup = Callable[[str], Awaitable[bool]]


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One variant measured once: lookups, misses, wall and client CPU time."""

    variant: str
    lookups: int
    misses: int
    elapsed_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.lookups / self.elapsed_s

    @property
    def cpu_us_per_lookup(self) -> float:
        return 1e6 * self.cpu_s / self.lookups if self.lookups else float("nan")


@dataclasses.dataclass(frozen=True)
class Bench:
    """The inputs of every variant: where to connect, the keys, the run's shape."""

    target: ConnectionTarget
    settings: Settings
    pgbench_conninfo: str
    pgbench: Path | None
    keys: list[str]
    clients: int
    seconds: float
    pgbench_threads: int
    # With a count, each Python variant makes exactly this many lookups after
    # a fixed warm-up, instead of running for ``seconds``.
    count: int | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figures; return the exit status."""
    args = parse_args(argv)
    settings = Settings.from_env()
    if args.count_child:
        return count_child(args, settings)

    variants = args.variants or list(VARIANTS)
    report = [f"$ {command_line(argv)}", *describe_machine(settings)]
    instructions: dict[str, float] = {}

    with open_target(settings) as server:
        bench_target = prepare_database(server, settings, args.database, args.rows)
        pgbench = find_pgbench(args.pgbench, settings)
        pgbench_conninfo = prepare_pgbench_database(
            server, args.pgbench_database, pgbench, "pgbench" in variants
        )
        try:
            bench = Bench(
                target=bench_target,
                settings=bench_settings(settings, bench_target, args.clients),
                pgbench_conninfo=pgbench_conninfo,
                pgbench=pgbench,
                keys=load_keys(bench_target),
                clients=args.clients,
                seconds=args.seconds,
                pgbench_threads=args.pgbench_threads,
            )
            report.append(f"load average before: {load_average()}")
            rounds = [
                run_round(bench, rotate(variants, number), number)
                for number in range(args.rounds)
            ]
            report.append(f"load average after: {load_average()}")
            if args.instructions:
                instructions = count_instructions(
                    [name for name in variants if name != "pgbench"], args
                )
        finally:
            if not args.keep_database:
                drop_database(server, args.database)
                drop_database(server, args.pgbench_database)

    report += summarize(rounds, variants, args, instructions)
    text = "\n".join(report) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as output:
            json.dump(
                {
                    "rounds": [
                        [dataclasses.asdict(m) for m in measured] for measured in rounds
                    ],
                    "instructions_per_lookup": instructions,
                },
                output,
                indent=2,
            )
    return 0


def bench_settings(
    settings: Settings, target: ConnectionTarget, clients: int
) -> Settings:
    return settings.replace(database_url=target.conninfo, pool_size=clients)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare ways of running single-row lookups by key.",
    )
    parser.add_argument(
        "--clients",
        type=positive_int,
        default=4,
        help="concurrent clients of every variant (default: 4)",
    )
    parser.add_argument(
        "--seconds",
        type=positive_float,
        default=5.0,
        help="measured seconds of each variant in each round, also pgbench's -T "
        "(default: 5)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=5,
        help="rounds, each measuring every variant once (default: 5)",
    )

    parser.add_argument(
        "--rows",
        type=positive_int,
        default=100_000,
        help="sessions in the lookup table (default: 100000)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        metavar="VARIANT",
        help=f"variants to measure, by name (default: all): {', '.join(VARIANTS)}",
    )

    parser.add_argument(
        "--pgbench-threads",
        type=positive_int,
        default=2,
        help="pgbench's -j (default: 2)",
    )
    parser.add_argument(
        "--pgbench",
        metavar="PATH",
        help="the pgbench program (default: the embedded server's, or the newest "
        f"in {MACHINE_BINARIES_GLOB}, or the one on PATH)",
    )

    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="scratch database of the lookups, dropped and created again "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--pgbench-database",
        default=DEFAULT_PGBENCH_DATABASE,
        help="scratch database for pgbench, dropped and created again "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--keep-database",
        action="store_true",
        help="keep both scratch databases at the end",
    )

    parser.add_argument(
        "--instructions",
        type=positive_int,
        metavar="N",
        help="also count, with valgrind's callgrind, the client's CPU "
        "instructions per lookup of each Python variant over N lookups; "
        "unlike time, the count hardly depends on the machine's load",
    )
    parser.add_argument("--output", metavar="PATH", help="also write the report here")
    # Used by --instructions: run one variant for a number of lookups on the
    # existing scratch database, under valgrind.
    parser.add_argument(
        "--count-child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS
    )
    parser.add_argument("--json", metavar="PATH", help="also write raw figures here")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def command_line(argv: Sequence[str] | None) -> str:
    arguments = sys.argv[1:] if argv is None else list(argv)
    url = os.environ.get("DATABASE_URL")
    prefix = f"DATABASE_URL={shlex.quote(url)} " if url else ""
    program = shlex.join([".venv/bin/python", "bench/pool_benchmark.py", *arguments])
    return prefix + program


def describe_machine(settings: Settings) -> list[str]:
    cpu_model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return [
        f"machine: {os.cpu_count()} CPUs ({cpu_model}), Linux {platform.release()}",
        f"Python {platform.python_version()}, psycopg {psycopg.__version__}, "
        f"psycopg_pool {psycopg_pool.__version__}",
        f"server: {'DATABASE_URL' if settings.database_url else 'embedded'}",
    ]


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def find_pgbench(option: str | None, settings: Settings) -> Path | None:
    """Return the pgbench to run, or None when there is none."""
    if option is not None:
        return Path(option)
    if settings.database_url is None:
        candidate = wheel_binaries() / "pgbench"
        if candidate.is_file():
            return candidate
    found = []
    for bin_dir in Path("/").glob(MACHINE_BINARIES_GLOB.lstrip("/")):
        version = re.fullmatch(r"\d+", bin_dir.parent.name)
        if version and (bin_dir / "pgbench").is_file():
            found.append((int(version.group()), bin_dir / "pgbench"))
    if found:
        return max(found)[1]
    on_path = shutil.which("pgbench")
    return Path(on_path) if on_path else None


def create_database(server: ConnectionTarget, name: str) -> str:
    """Create ``name`` afresh on ``server``; return a conninfo string for it."""
    if name == conninfo_to_dict(server.conninfo).get("dbname"):
        raise SystemExit(
            f"the scratch database {name} is the database of DATABASE_URL; the "
            "benchmark drops its scratch databases, so name another one"
        )
    drop_database(server, name)
    with connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(server.conninfo, dbname=name)


def drop_database(server: ConnectionTarget, name: str) -> None:
    with connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


def prepare_database(
    server: ConnectionTarget, settings: Settings, name: str, rows: int
) -> ConnectionTarget:
    """Create the lookup database: migrations, then ``rows`` live sessions."""
    target = resolve_target(create_database(server, name), settings)
    with connect(target) as conn:
        migrate(conn)
    with connect(target, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 0")
        conn.execute(_SEED, {"rows": rows})
        conn.execute("VACUUM (ANALYZE) user_sessions")
    return target


def prepare_pgbench_database(
    server: ConnectionTarget, name: str, pgbench: Path | None, wanted: bool
) -> str:
    """Create and initialize pgbench's database when pgbench is measured."""
    conninfo = make_conninfo(server.conninfo, dbname=name)
    if not wanted:
        return conninfo
    if pgbench is None:
        raise SystemExit(
            "no pgbench found; pass --pgbench PATH, or leave pgbench out of --variants"
        )
    create_database(server, name)
    subprocess.run(
        [str(pgbench), "--initialize", "--scale=1", "--quiet", conninfo],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return conninfo


def load_keys(target: ConnectionTarget) -> list[str]:
    with connect(target) as conn:
        rows = conn.execute("SELECT access_token_hash FROM user_sessions").fetchall()
    return [row[0] for row in rows]


def rotate(variants: list[str], number: int) -> list[str]:
    shift = number % len(variants)
    return variants[shift:] + variants[:shift]


def run_round(bench: Bench, variants: list[str], number: int) -> list[Measurement]:
    measured = []
    for name in variants:
        measurement = VARIANTS[name](bench)
        if measurement.misses:
            raise RuntimeError(
                f"{name} missed {measurement.misses} of {measurement.lookups} "
                "lookups; every key exists, so the variant is broken"
            )
        print(
            f"round {number + 1}: {name}: {measurement.rate:,.0f} lookups/s, "
            f"{measurement.cpu_us_per_lookup:.1f} us CPU per lookup",
            file=sys.stderr,
        )
        measured.append(measurement)
    return measured


# The variants. Each Python variant opens its connections, lets its clients
# run for WARM_UP_S, then counts lookups for bench.seconds.


async def drive(bench: Bench, name: str, lookup: Lookup) -> Measurement:
    """Run ``bench.clients`` tasks that call ``lookup`` on random keys."""
    if bench.count is not None:
        return await drive_count(bench, name, lookup, bench.count)

    counting = False
    stop = False
    lookups = 0
    misses = 0

    async def client(seed: int) -> None:
        nonlocal lookups, misses
        chooser = random.Random(seed)
        keys = bench.keys
        while not stop:
            found = await lookup(chooser.choice(keys))
            if counting:
                lookups += 1
                misses += not found

    tasks = [asyncio.create_task(client(seed)) for seed in range(bench.clients)]
    try:
        await asyncio.sleep(WARM_UP_S)
        counting = True
        began, cpu_began = time.perf_counter(), time.process_time()
        await asyncio.sleep(bench.seconds)
        counting = False
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - cpu_began
        stop = True
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return Measurement(name, lookups, misses, elapsed, cpu)


async def drive_count(
    bench: Bench, name: str, lookup: Lookup, count: int
) -> Measurement:
    """Make WARM_UP_LOOKUPS lookups per client, then ``count`` in all."""
    misses = 0

    async def client(seed: int, lookups: int) -> None:
        nonlocal misses
        chooser = random.Random(seed)
        for _ in range(lookups):
            misses += not await lookup(chooser.choice(bench.keys))

    clients = range(bench.clients)
    await asyncio.gather(*(client(seed, WARM_UP_LOOKUPS) for seed in clients))
    began, cpu_began = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(seed, count // bench.clients) for seed in clients))
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu_began
    return Measurement(name, count, misses, elapsed, cpu)


def count_child(args: argparse.Namespace, settings: Settings) -> int:
    """Run one variant for a number of lookups on the existing scratch database."""
    name, count = args.count_child[0], int(args.count_child[1])
    with open_target(settings) as server:
        target = resolve_target(
            make_conninfo(server.conninfo, dbname=args.database), settings
        )
        bench = Bench(
            target=target,
            settings=bench_settings(settings, target, args.clients),
            pgbench_conninfo="",
            pgbench=None,
            keys=load_keys(target),
            clients=args.clients,
            seconds=args.seconds,
            pgbench_threads=args.pgbench_threads,
            count=count,
        )
        measurement = VARIANTS[name](bench)
    return 1 if measurement.misses else 0


def count_instructions(
    variants: list[str], args: argparse.Namespace
) -> dict[str, float]:
    """Return the client's CPU instructions per lookup of each variant.

    Each variant runs twice under callgrind: with the warm-up only, and with
    the warm-up and ``args.instructions`` lookups. The difference, divided by
    the lookups, leaves out the start-up and the connections.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit(
            "--instructions needs valgrind; install it (Debian: apt-get install "
            "valgrind) or leave the option out"
        )
    per_lookup = {}
    for name in variants:
        totals = []
        for count in (0, args.instructions):
            command = [
                valgrind,
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                __file__,
                "--database",
                args.database,
                "--clients",
                str(args.clients),
                "--count-child",
                name,
                str(count),
            ]
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=3600
            )
            collected = _CALLGRIND_TOTAL.search(result.stderr)
            if result.returncode != 0 or collected is None:
                raise RuntimeError(
                    f"counting the instructions of {name} failed:\n{result.stderr}"
                )
            totals.append(int(collected.group(1)))
        per_lookup[name] = (totals[1] - totals[0]) / args.instructions
        print(
            f"{name}: {per_lookup[name]:,.0f} instructions per lookup",
            file=sys.stderr,
        )
    return per_lookup


Measure = Callable[[Bench], Measurement]


def variant(name: str) -> Callable[[Measure], Measure]:
    """Register the decorated function as the variant ``name``."""

    def register(function: Measure) -> Measure:
        VARIANTS[name] = function
        return function

    return register


VARIANTS: dict[str, Measure] = {}


@variant("pgbench")
def measure_pgbench(bench: Bench) -> Measurement:
    assert bench.pgbench is not None
    command = [
        str(bench.pgbench),
        "-S",
        "-M",
        "prepared",
        "-c",
        str(bench.clients),
        "-j",
        str(bench.pgbench_threads),
        "-T",
        str(max(1, round(bench.seconds))),
        bench.pgbench_conninfo,
    ]

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        command, check=True, capture_output=True, text=True, timeout=600
    )
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)

    processed = _PGBENCH_PROCESSED.search(result.stdout)
    tps = _PGBENCH_TPS.search(result.stdout)
    if processed is None or tps is None:
        raise RuntimeError(f"unexpected pgbench output:\n{result.stdout}")
    lookups = int(processed.group(1))
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (
        cpu_before.ru_utime + cpu_before.ru_stime
    )
    # pgbench's own rate excludes its connection set-up; the elapsed time is
    # derived from it so that rate matches it.
    return Measurement("pgbench", lookups, 0, lookups / float(tps.group(1)), cpu)


@contextlib.asynccontextmanager
async def plain_pool(bench: Bench) -> AsyncIterator[psycopg_pool.AsyncConnectionPool]:
    pool = psycopg_pool.AsyncConnectionPool(
        bench.target.conninfo,
        min_size=bench.clients,
        max_size=bench.clients,
        kwargs={"autocommit": True},
        open=False,
    )
    await pool.open(wait=True)
    try:
        yield pool
    finally:
        await pool.close()


@variant("pool loop")
def measure_pool_loop(bench: Bench) -> Measurement:
    async def measure() -> Measurement:
        async with plain_pool(bench) as pool:

            async def lookup(key: str) -> bool:
                async with pool.connection() as conn:
                    cursor = await conn.execute(LOOKUP, (key,))
                    return await cursor.fetchone() is not None

            return await drive(bench, "pool loop", lookup)

    return asyncio.run(measure())


@variant("pool getconn")
def measure_pool_getconn(bench: Bench) -> Measurement:
    async def measure() -> Measurement:
        async with plain_pool(bench) as pool:

            async def lookup(key: str) -> bool:
                conn = await pool.getconn()
                try:
                    cursor = await conn.execute(LOOKUP, (key,))
                    return await cursor.fetchone() is not None
                finally:
                    await pool.putconn(conn)

            return await drive(bench, "pool getconn", lookup)

    return asyncio.run(measure())


def raw_variant(
    name: str, *, binary: bool = False, prepare_threshold: int | None = 0
) -> Callable[[Bench], Measurement]:
    def measure_raw(bench: Bench) -> Measurement:
        async def measure() -> Measurement:
            conns = [
                await psycopg.AsyncConnection.connect(
                    bench.target.conninfo,
                    autocommit=True,
                    prepare_threshold=prepare_threshold,
                )
                for _ in range(bench.clients)
            ]
            idle = list(conns)
            try:

                async def lookup(key: str) -> bool:
                    # Each client uses a connection of its own, because
                    # drive() never runs more lookups than connections.
                    conn = idle.pop()
                    try:
                        cursor = conn.cursor(binary=binary)
                        await cursor.execute(LOOKUP, (key,))
                        return await cursor.fetchone() is not None
                    finally:
                        idle.append(conn)

                return await drive(bench, name, lookup)
            finally:
                for conn in conns:
                    await conn.close()

        return asyncio.run(measure())

    return measure_raw


VARIANTS["raw unprepared"] = raw_variant("raw unprepared", prepare_threshold=None)
VARIANTS["raw prepared"] = raw_variant("raw prepared")
VARIANTS["raw prepared binary"] = raw_variant("raw prepared binary", binary=True)


@variant("pipeline")
def measure_pipeline(bench: Bench) -> Measurement:
    async def measure() -> Measurement:
        conn = await psycopg.AsyncConnection.connect(
            bench.target.conninfo, autocommit=True, prepare_threshold=0
        )
        try:
            async with conn.pipeline() as pipeline:

                async def lookup(key: str) -> bool:
                    cursor = conn.cursor()
                    await cursor.execute(LOOKUP, (key,))
                    await pipeline.sync()
                    return await cursor.fetchone() is not None

                return await drive(bench, "pipeline", lookup)
        finally:
            await conn.close()

    return asyncio.run(measure())


def find_session(key: str) -> Operation[bool]:
    result = yield Query(LOOKUP, (key,))
    return bool(result.rows)


def run_variant(name: str, *, transaction: bool) -> Callable[[Bench], Measurement]:
    def measure_run(bench: Bench) -> Measurement:
        async def measure() -> Measurement:
            async with AsyncDatabase(
                bench.target, bench.settings, min_size=bench.clients
            ) as database:

                async def lookup(key: str) -> bool:
                    return await database.run(
                        lambda: find_session(key),
                        transaction=transaction,
                        idempotent=True,
                    )

                return await drive(bench, name, lookup)

        return asyncio.run(measure())

    return measure_run


VARIANTS["run"] = run_variant("run", transaction=False)
VARIANTS["run in transaction"] = run_variant("run in transaction", transaction=True)


def batcher_variant(name: str, **options: Any) -> Callable[[Bench], Measurement]:
    def measure_batcher(bench: Bench) -> Measurement:
        async def measure() -> Measurement:
            async with AsyncDatabase(
                bench.target, bench.settings, min_size=bench.clients
            ) as database:
                batcher = database.lookup_batcher(BATCH_LOOKUP, **options)

                async def lookup(key: str) -> bool:
                    return bool(await batcher.fetch([key]))

                return await drive(bench, name, lookup)

        return asyncio.run(measure())

    return measure_batcher


VARIANTS["batcher"] = batcher_variant("batcher")
VARIANTS["batcher, 1 in flight"] = batcher_variant(
    "batcher, 1 in flight", max_in_flight=1
)


def summarize(
    rounds: list[list[Measurement]],
    variants: list[str],
    args: argparse.Namespace,
    instructions: dict[str, float],
) -> list[str]:
    """Return the Markdown table of medians over the rounds."""
    by_variant: dict[str, list[Measurement]] = {name: [] for name in variants}
    baseline_rates = []
    for measured in rounds:
        for measurement in measured:
            by_variant[measurement.variant].append(measurement)
        baseline_rates.append(
            next((m.rate for m in measured if m.variant == BASELINE), float("nan"))
        )

    lines = [
        "",
        f"{args.clients} clients, {args.rows} rows, {args.rounds} rounds of "
        f"{args.seconds:g} s per variant; medians over the rounds, "
        "[lowest-highest]; ratio: median of each round's rate divided by the "
        f"same round's {BASELINE}",
    ]
    header = "| variant | lookups/s | ratio to pool loop | client CPU us/lookup |"
    rule = "|---|---:|---:|---:|"
    if instructions:
        lines.append(
            f"instructions: the client's, per lookup, over {args.instructions} "
            "lookups under callgrind"
        )
        header += " instructions/lookup |"
        rule += "---:|"
    lines += ["", header, rule]
    for name in variants:
        measured = by_variant[name]
        rates = [m.rate for m in measured]
        ratios = [
            m.rate / base for m, base in zip(measured, baseline_rates, strict=True)
        ]
        cpu = statistics.median(m.cpu_us_per_lookup for m in measured)
        ratio = statistics.median(ratios)
        # Without the pool loop among the variants there is no ratio.
        ratio_text = "-" if math.isnan(ratio) else f"{ratio:.2f}"
        line = (
            f"| {name} | {statistics.median(rates):,.0f} "
            f"[{min(rates):,.0f}-{max(rates):,.0f}] | {ratio_text} | {cpu:.1f} |"
        )
        if instructions:
            count = instructions.get(name)
            line += f" {count:,.0f} |" if count is not None else " - |"
        lines.append(line)
    return lines


if __name__ == "__main__":
    sys.exit(main())
