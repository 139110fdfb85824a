"""Benchmark of the session store: validations, sign-ins, refreshes, latency.

One run, on one PostgreSQL server reached through a Unix socket or a loopback
address, measures with ``--clients`` concurrent clients (default 4). The
clients are asyncio tasks of this process that share one
:class:`~mcp_authdb.db.pool.AsyncDatabase` with one pooled connection per
client, and each yields to the event loop after every call, as a server does
between requests. Measured:

1. Validations per second of :meth:`AsyncSessionStore.validate`, without a
   cache (``validate, cache off``) and with a
   :class:`~mcp_authdb.store.cache.TokenCache` kept current by an
   :class:`~mcp_authdb.store.listener.AsyncSessionListener`
   (``validate, cache on``). The tokens are ``--tokens`` access tokens made
   by :meth:`AsyncSessionStore.create`, which each client cycles through from
   its own starting point, so every call, cached or not, computes the token's
   HMAC. With the cache, every token is validated once before the
   measurement, and the measured window lasts at least the cache's ttl (5 s),
   so that each entry expires and is fetched again once in it, as in a
   steady state. Two baselines run on the same server, from
   ``pool_benchmark.py``:
   ``pgbench -S -M prepared -c N -j 2 -T S`` on a database initialized by
   ``pgbench -i`` (scale 1), and ``pool loop``, tasks that look the same
   tokens' rows up by hash on a plain ``psycopg_pool.AsyncConnectionPool``
   (``async with pool.connection() as conn: await conn.execute(...)``).
2. Sign-ins per second: each client calls ``create()`` for new users.
3. Refreshes per second: each client refreshes its own chain, always with the
   newest refresh token.

These six variants run in ``--rounds`` rounds, each measuring every variant
once in the order above, so that a change in the machine's load affects all
of them alike. The table gives the median over the rounds with the lowest and
highest value, and the ratios "cache on / pgbench" and "cache off / pool
loop" as the median of each round's ratio.

4. Validation latency, cache off, p50 and p99, with one client and with
   ``--clients`` clients, at each size of ``--sizes`` (default 10k, 100k and
   1M rows in ``user_sessions``). Each size has a scratch database of its
   own, and the latency runs are interleaved like the throughput variants:
   each of the ``--rounds`` rounds measures every size once, in an order
   rotated from round to round, and the table
   gives medians over the rounds, and the ratio of the p99 at the largest
   size to the p99 at the smallest as the median of each round's ratio.

   Each database gets ``--tokens`` sessions made by
   :meth:`AsyncSessionStore.create`, whose access tokens are the ones
   validated, and filler rows inserted with SQL up to its size: random
   hashes in the stored format (``key_id:`` and the unpadded base64url of 32
   bytes), sign-ins spread over 30 days, most of them rotated, some revoked.
   Around the fill, the indexes other than the primary key are dropped and
   created again, so at every size they are freshly built, and denser than
   indexes grown by inserts in random order; then the table is vacuumed and
   analyzed. In each round, the tokens' ``last_used_at`` is cleared, the
   table vacuumed, and every token validated once, which records
   ``last_used_at`` in the same statement. These first validations are
   reported as "first use", and the runs that follow find nothing to touch,
   because the touch interval (60 s) has not passed. The vacuum of each
   round skips the indexes (``INDEX_CLEANUP OFF``), whose whole reading in
   every round would add I/O that grows with the size.

   After the latency rounds, the lookups of the first 200 tokens at each
   size are explained (``EXPLAIN (ANALYZE, BUFFERS)`` of the pool loop's
   statement), which gives the buffers and the server's execution time of
   one lookup without the round trip and the client.

The throughput rounds run in the database of ``--throughput-rows`` rows
(default 100k, the size of pgbench's table at scale 1), after the latency
rounds.

The run works in scratch databases of its own, named ``--database`` with
``_ROWS`` appended for each size, and ``--pgbench-database``. They are
dropped if they exist, and created on the server of ``--url``, whose role
needs CREATEDB. All are dropped at the end, also after an error, an
interrupt or ``--time-limit``, unless ``--keep-databases`` is given. The
token keys are random and live only for the run.

Example; on a virtual machine with 2 CPUs it took 3 minutes, and 1 minute
with ``--quick``:

    DATABASE_URL='postgresql:///postgres?host=/var/run/postgresql' \\
        .venv/bin/python bench/session_benchmark.py --output /tmp/session_bench.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import math
import os
import secrets
import shlex
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import pool_benchmark
from mcp_authdb.db import ConnectionTarget, Settings, connect, resolve_target
from mcp_authdb.db.migrations import migrate
from mcp_authdb.db.pool import AsyncDatabase
from mcp_authdb.store.cache import CacheStats, TokenCache
from mcp_authdb.store.listener import AsyncSessionListener
from mcp_authdb.store.session_store import AsyncSessionStore
from mcp_authdb.store.sessions import IssuedTokens
from mcp_authdb.store.tokens import MAX_KEYS, TokenHasher, TokenKey, TokenKeys

DEFAULT_URL = "postgresql:///postgres?host=/var/run/postgresql"
DEFAULT_DATABASE = "mcp_authdb_session_bench"
DEFAULT_PGBENCH_DATABASE = "mcp_authdb_session_pgbench"
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
# Measured seconds of each throughput variant and each latency run.
DEFAULT_SECONDS = 3.0
QUICK_SECONDS = 1.0

# Calls made before each measurement starts, while statements get prepared
# and caches fill, in seconds.
WARM_UP_S = 0.3
# How long the listener may take to run LISTEN before the run fails.
LISTEN_TIMEOUT_S = 10.0
# How long the clients may take to finish their last call after the stop request.
STOP_TIMEOUT_S = 10.0
# The statement timeout of the fill and of VACUUM, in milliseconds.
FILL_TIMEOUT_MS = 600_000
# Rows inserted by one fill statement.
FILL_CHUNK_ROWS = 200_000
# maintenance_work_mem of the fill's index builds.
FILL_MAINTENANCE_MEMORY = "256MB"
# Tokens whose lookup is explained to measure its cost on the server.
EXPLAINED_LOOKUPS = 200

VALIDATE_OFF = "validate, cache off"
VALIDATE_ON = "validate, cache on"
PGBENCH = "pgbench -S -M prepared"
POOL_LOOP = "pool loop"
CREATE = "create"
REFRESH = "refresh"
VARIANTS = (VALIDATE_OFF, VALIDATE_ON, PGBENCH, POOL_LOOP, CREATE, REFRESH)

# (numerator, denominator, aim): the ratios of medians the report checks.
RATIO_AIMS = ((VALIDATE_ON, PGBENCH, 1.0), (VALIDATE_OFF, POOL_LOOP, 3.0))
# The largest p99 at the largest size, as a multiple of the p99 at the
# smallest size, that the report counts as flat.
LATENCY_AIM = 1.5

# Filler rows. The sign-ins are spread over the last 30 days, each with an
# access lifetime of 1 hour and a refresh lifetime of 30 days. 60 % were
# rotated within that hour, which keeps them for a replay window of 1 day,
# and 2 % were revoked. Each hash is the SHA-256 of a random UUID, in the stored
# format.
_FILL = """
INSERT INTO user_sessions (
    user_id, access_token_hash, refresh_token_hash, expires_at,
    refresh_expires_at, scope, subscription_level, created_at, updated_at,
    family_id, rotated_at, revoked_at, last_used_at
)
SELECT 'filler-user-' || floor(random() * %(users)s)::int,
       %(key_prefix)s || rtrim(translate(encode(
           sha256(uuid_send(gen_random_uuid())), 'base64'), '+/', '-_'), '='),
       %(key_prefix)s || rtrim(translate(encode(
           sha256(uuid_send(gen_random_uuid())), 'base64'), '+/', '-_'), '='),
       CASE WHEN revoked THEN least(created + interval '1 hour', used)
            ELSE created + interval '1 hour' END,
       CASE WHEN revoked THEN used
            WHEN rotated THEN used + interval '1 day'
            ELSE created + interval '30 days' END,
       CASE WHEN random() < 0.5 THEN '{content:read}'::text[]
            ELSE '{content:read,content:search}'::text[] END,
       CASE WHEN random() < 0.8 THEN 'free' ELSE 'pro' END,
       created,
       used,
       gen_random_uuid(),
       CASE WHEN rotated THEN used END,
       CASE WHEN revoked THEN used END,
       used
FROM (
    SELECT created,
           created + random() * interval '1 hour' AS used,
           random() < 0.6 AS rotated,
           random() < 0.02 AS revoked
    FROM (
        SELECT now() - random() * interval '30 days' AS created
        FROM generate_series(1, %(rows)s)
    ) AS sign_ins
) AS filler
"""

# The indexes of user_sessions that back no constraint, with their definitions.
_SECONDARY_INDEXES = """
SELECT n.nspname, c.relname, pg_get_indexdef(i.indexrelid)
FROM pg_index AS i
JOIN pg_class AS c ON c.oid = i.indexrelid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE i.indrelid = 'user_sessions'::regclass
  AND NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conindid = i.indexrelid)
ORDER BY i.indexrelid
"""

# The lookup of the pool loop, explained: buffers and execution time.
_EXPLAIN_LOOKUP = (
    "EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, FORMAT JSON) " + pool_benchmark.LOOKUP
)

_CLEAR_LAST_USED = """
UPDATE user_sessions SET last_used_at = NULL
WHERE access_token_hash = ANY(%s::text[])
"""


class TimeLimitExceeded(Exception):
    """Raised in the main thread when the run exceeds ``--time-limit``."""


@dataclasses.dataclass(frozen=True)
class Measured:
    """One variant measured once: calls completed, wall time and client CPU."""

    variant: str
    calls: int
    elapsed_s: float
    cpu_s: float
    # Cache hits and misses in the measured window, for "cache on".
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed_s

    @property
    def cpu_us_per_call(self) -> float:
        return 1e6 * self.cpu_s / self.calls if self.calls else math.nan


@dataclasses.dataclass(frozen=True)
class Latency:
    """Validation latencies of one size and client count, in nanoseconds."""

    rows: int
    clients: int
    label: str
    samples: list[int]

    def percentile(self, fraction: float) -> float:
        """Return the nearest-rank percentile, in milliseconds."""
        ordered = sorted(self.samples)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[rank - 1] / 1e6


@dataclasses.dataclass(frozen=True)
class ServerCost:
    """Medians of the server's work for one lookup by hash, at one size."""

    rows: int
    lookups: int
    buffers: float
    execution_ms: float


@dataclasses.dataclass(frozen=True)
class Setup:
    """The inputs of a measurement: a scratch database, its tokens, the shape."""

    target: ConnectionTarget
    settings: Settings
    hasher: TokenHasher
    tokens: list[str]
    # Rows in the database's user_sessions once it was filled.
    rows: int
    clients: int
    seconds: float
    latency_seconds: float
    pool_bench: pool_benchmark.Bench


@dataclasses.dataclass(frozen=True)
class Run:
    """The calls, CPU time and latencies of one measurement's window."""

    calls: int
    elapsed_s: float
    cpu_s: float
    latencies_ns: list[int]
    # The return values of drive()'s probe at the start and at the end of the
    # measured window.
    probed: tuple[object, object] = (None, None)


Step = Callable[[], Awaitable[None]]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report and write it to ``--output``."""
    args = parse_args(argv)
    check_local(args.url)
    settings = Settings.from_env().replace(
        database_url=args.url, pool_size=args.clients
    )
    server = resolve_target(args.url, settings)
    pgbench = pool_benchmark.find_pgbench(args.pgbench, settings)
    if pgbench is None:
        raise SystemExit(
            "pgbench was not found; install PostgreSQL's client programs or pass "
            "--pgbench PATH"
        )

    report = describe_run(argv, args, server)
    for line in report:
        print(line, file=sys.stderr)
    started = time.monotonic()
    try:
        with time_limit(args.time_limit):
            try:
                report += run_benchmark(server, settings, pgbench, args)
            finally:
                # The time limit is off first, so that the drop always runs.
                signal.alarm(0)
                if not args.keep_databases:
                    drop_scratch_databases(server, args)
    except TimeLimitExceeded as exc:
        raise SystemExit(str(exc)) from None
    report.append("")
    report.append(f"load average after: {pool_benchmark.load_average()}")
    report.append(f"total run time: {time.monotonic() - started:.0f} s")

    text = "\n".join(report) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the session store: validations with and without "
        "the cache against pgbench and a plain pool loop, sign-ins, refreshes, "
        "and validation latency as the table grows.",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("DATABASE_URL") or DEFAULT_URL,
        help="PostgreSQL URL of the server, on a Unix socket or loopback "
        f"(default: DATABASE_URL, or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--clients",
        type=pool_benchmark.positive_int,
        default=4,
        help="concurrent clients, asyncio tasks on one AsyncDatabase with a "
        "pool of as many connections; also pgbench's -c (default: 4)",
    )
    parser.add_argument(
        "--rounds",
        type=pool_benchmark.positive_int,
        default=3,
        help="rounds of the throughput variants and of the latency runs, each "
        "measuring every variant and every size once (default: 3)",
    )
    parser.add_argument(
        "--seconds",
        type=pool_benchmark.positive_float,
        help="measured seconds of each throughput variant in each round, also "
        "pgbench's -T, rounded to whole seconds (default: 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--latency-seconds",
        type=pool_benchmark.positive_float,
        help="measured seconds of each latency run (default: 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--tokens",
        type=pool_benchmark.positive_int,
        default=2000,
        help="sessions made by the store whose access tokens are validated "
        "(default: 2000)",
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        help="rows in user_sessions at which latency is measured, "
        "comma-separated (default: 10000,100000,1000000; with --quick "
        "10000,100000)",
    )
    parser.add_argument(
        "--throughput-rows",
        type=pool_benchmark.positive_int,
        default=100_000,
        help="rows in user_sessions during the throughput rounds (default: 100000)",
    )
    parser.add_argument(
        "--keys",
        type=key_count,
        default=1,
        help=f"token keys, 1 to {MAX_KEYS}; a validation hashes the token once "
        "per key (default: 1)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run for a check: 1 s per measurement and sizes up to "
        "100000 rows, unless --seconds, --latency-seconds or --sizes is given",
    )
    parser.add_argument(
        "--time-limit",
        type=pool_benchmark.positive_float,
        default=600.0,
        help="seconds after which the run stops, drops its databases and "
        "fails (default: 600)",
    )
    parser.add_argument(
        "--pgbench",
        metavar="PATH",
        help="the pgbench program (default: the newest in "
        f"{pool_benchmark.MACHINE_BINARIES_GLOB}, or the one on PATH)",
    )
    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="name prefix of the scratch databases of the store, one per size, "
        "named PREFIX_ROWS, dropped and created again (default: %(default)s)",
    )
    parser.add_argument(
        "--pgbench-database",
        default=DEFAULT_PGBENCH_DATABASE,
        help="scratch database of pgbench, dropped and created again "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--keep-databases",
        action="store_true",
        help="keep both scratch databases at the end",
    )
    parser.add_argument("--output", metavar="PATH", help="also write the report here")
    args = parser.parse_args(argv)

    if args.seconds is None:
        args.seconds = QUICK_SECONDS if args.quick else DEFAULT_SECONDS
    if args.latency_seconds is None:
        args.latency_seconds = QUICK_SECONDS if args.quick else DEFAULT_SECONDS
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    if args.sizes[0] < args.tokens or args.throughput_rows < args.tokens:
        parser.error(
            f"every size in --sizes and --throughput-rows must be at least "
            f"--tokens ({args.tokens}), because the store's sessions are part of "
            "the rows"
        )
    if args.pgbench_database.startswith(args.database + "_"):
        parser.error(
            f"--pgbench-database must not start with {args.database}_, which "
            "names the scratch databases of the store"
        )
    return args


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of row counts, such as "
            "10000,100000"
        ) from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be at least 1")
    return sizes


def key_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_KEYS:
        raise argparse.ArgumentTypeError(
            f"{value} keys is invalid; pass 1 to {MAX_KEYS}"
        )
    return value


def check_local(url: str) -> None:
    """Exit unless every host of ``url`` is a Unix socket or a loopback address."""
    params = conninfo_to_dict(url)
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    addresses = str(params.get("hostaddr") or "").split(",")
    for host in [*hosts, *addresses]:
        if host == "" or host.startswith(("/", "@")) or host == "localhost":
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


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeLimitExceeded in the main thread after ``seconds``.

    SIGTERM raises SystemExit, so that the cleanup of the caller runs then too.
    """

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeLimitExceeded(
            f"the run took longer than --time-limit={seconds:g} s; pass a "
            "larger limit, or fewer --rounds or --sizes"
        )

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous_alarm = signal.signal(signal.SIGALRM, expired)
    previous_term = signal.signal(signal.SIGTERM, terminated)
    signal.alarm(max(1, math.ceil(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_alarm)
        signal.signal(signal.SIGTERM, previous_term)


def describe_run(
    argv: Sequence[str] | None, args: argparse.Namespace, server: ConnectionTarget
) -> list[str]:
    arguments = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join([".venv/bin/python", "bench/session_benchmark.py", *arguments])
    if "DATABASE_URL" in os.environ:
        command = f"DATABASE_URL={shlex.quote(os.environ['DATABASE_URL'])} {command}"
    with connect(server) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    server_version = row[0] if row else "unknown"
    now = datetime.datetime.now(datetime.UTC)
    return [
        f"$ {command}",
        f"date: {now:%Y-%m-%d %H:%M} UTC",
        *pool_benchmark.describe_machine(Settings(database_url=args.url))[:2],
        f"nproc: {os.cpu_count()}; PostgreSQL {server_version} at {server.description}",
        f"clients: {args.clients} asyncio tasks in one process on one AsyncDatabase "
        f"(pool of {args.clients} connections), each yielding to the event loop "
        f"after every call; pgbench -S -M prepared -c {args.clients} -j 2 "
        f"-T {max(1, round(args.seconds))} at scale 1 (100,000 rows)",
        f"token keys: {args.keys}; tokens validated: {args.tokens}",
        f"load average before: {pool_benchmark.load_average()}",
    ]


def drop_scratch_databases(server: ConnectionTarget, args: argparse.Namespace) -> None:
    names = [scratch_name(args, rows) for rows in scratch_sizes(args)]
    for name in [*names, args.pgbench_database]:
        try:
            pool_benchmark.drop_database(server, name)
        except Exception as exc:
            print(
                f"could not drop the scratch database {name}: {exc}; drop it "
                "with DROP DATABASE ... WITH (FORCE)",
                file=sys.stderr,
            )


def scratch_sizes(args: argparse.Namespace) -> list[int]:
    """Return the row counts that get a scratch database of the store."""
    return sorted({*args.sizes, args.throughput_rows})


def scratch_name(args: argparse.Namespace, rows: int) -> str:
    return f"{args.database}_{rows}"


def run_benchmark(
    server: ConnectionTarget,
    settings: Settings,
    pgbench: Path,
    args: argparse.Namespace,
) -> list[str]:
    """Prepare the scratch databases, run every measurement, return the tables."""
    pgbench_conninfo = pool_benchmark.prepare_pgbench_database(
        server, args.pgbench_database, pgbench, True
    )
    hasher = make_hasher(args.keys)
    setups: dict[int, Setup] = {}
    for size in scratch_sizes(args):
        setups[size] = prepare_setup(
            server, settings, hasher, pgbench, pgbench_conninfo, args, size
        )

    latency_rounds: list[list[Latency]] = []
    for number in range(args.rounds):
        # The order of the sizes rotates from round to round, so that no size
        # always runs right after the same other one.
        shift = number % len(args.sizes)
        measured: list[Latency] = []
        for size in [*args.sizes[shift:], *args.sizes[:shift]]:
            measured += measure_latency(setups[size], number)
        latency_rounds.append(measured)
    costs = [measure_server_cost(setups[size]) for size in args.sizes]
    throughput_setup = setups[args.throughput_rows]
    rounds = measure_throughput(throughput_setup, args)

    return [
        *summarize_throughput(rounds, throughput_setup.rows, args),
        *summarize_latency(latency_rounds, args),
        *summarize_server_cost(costs),
    ]


def prepare_setup(
    server: ConnectionTarget,
    settings: Settings,
    hasher: TokenHasher,
    pgbench: Path,
    pgbench_conninfo: str,
    args: argparse.Namespace,
    rows: int,
) -> Setup:
    """Create the scratch database of ``rows`` rows, with tokens made by the store."""
    name = scratch_name(args, rows)
    target = resolve_target(pool_benchmark.create_database(server, name), settings)
    with connect(target) as conn:
        migrate(conn)
    progress(f"{name}: signing in {args.tokens} users through the store")
    tokens = asyncio.run(create_tokens(target, settings, hasher, args))
    setup = Setup(
        target=target,
        settings=settings,
        hasher=hasher,
        tokens=tokens,
        rows=rows,
        clients=args.clients,
        seconds=args.seconds,
        latency_seconds=args.latency_seconds,
        pool_bench=pool_benchmark.Bench(
            target=target,
            settings=settings,
            pgbench_conninfo=pgbench_conninfo,
            pgbench=pgbench,
            keys=[hasher.hash(token) for token in tokens],
            clients=args.clients,
            seconds=args.seconds,
            pgbench_threads=2,
        ),
    )
    filled = fill_to(setup, rows)
    return dataclasses.replace(setup, rows=filled)


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def make_hasher(count: int) -> TokenHasher:
    keys = [TokenKey(f"bench{i}", secrets.token_bytes(32)) for i in range(count)]
    return TokenHasher(TokenKeys(keys))


async def create_tokens(
    target: ConnectionTarget,
    settings: Settings,
    hasher: TokenHasher,
    args: argparse.Namespace,
) -> list[str]:
    """Sign ``args.tokens`` users in with ``args.clients`` concurrent clients."""
    async with AsyncDatabase(target, settings, min_size=args.clients) as database:
        store = AsyncSessionStore(database, hasher)
        numbers = iter(range(args.tokens))
        tokens: list[str] = []

        async def client() -> None:
            for number in numbers:
                issued = await store.create(
                    f"bench-user-{number}", scopes=("content:read",)
                )
                tokens.append(issued.access_token)

        await asyncio.gather(*(client() for _ in range(args.clients)))
    return tokens


# Running clients.


async def drive(
    steps: Sequence[Step],
    warm_up_s: float,
    seconds: float,
    probe: Callable[[], object] = lambda: None,
) -> Run:
    """Run one task per step, each calling its step in a loop, and count the calls.

    Calls that finish in the measured window, which starts after
    ``warm_up_s``, are counted and timed, and ``probe`` is called when the
    window starts and ends. A step that raises ends the run with its
    exception.
    """
    counting = False
    stop = False
    calls = 0
    latencies: list[int] = []

    async def client(step: Step) -> None:
        nonlocal calls
        while not stop:
            began = time.perf_counter_ns()
            await step()
            if counting:
                latencies.append(time.perf_counter_ns() - began)
                calls += 1
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(client(step)) for step in steps]
    try:
        await sleep_unless_failed(tasks, warm_up_s)
        counting = True
        probed_before = probe()
        began, cpu_began = time.perf_counter(), time.process_time()
        await sleep_unless_failed(tasks, seconds)
        counting = False
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - cpu_began
        probed_after = probe()
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), STOP_TIMEOUT_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return Run(calls, elapsed, cpu, latencies, (probed_before, probed_after))


async def sleep_unless_failed(tasks: list[asyncio.Task[None]], seconds: float) -> None:
    """Wait ``seconds``, and raise at once the exception of a task that ended."""
    done, _ = await asyncio.wait(
        tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
    )
    for task in done:
        task.result()
        raise RuntimeError("a client task ended before the stop request")


def validation_steps(
    store: AsyncSessionStore, tokens: Sequence[str], clients: int
) -> list[Step]:
    """Return one step per client, each cycling through ``tokens`` from its start."""
    return [
        validation_step(store, tokens, client * len(tokens) // clients)
        for client in range(clients)
    ]


def validation_step(
    store: AsyncSessionStore, tokens: Sequence[str], start: int
) -> Step:
    position = start

    async def step() -> None:
        nonlocal position
        token = tokens[position]
        position = (position + 1) % len(tokens)
        if await store.validate(token) is None:
            raise RuntimeError(
                "validate() returned None for the token of a live session"
            )

    return step


@contextlib.asynccontextmanager
async def open_store(setup: Setup, *, cache: bool) -> AsyncIterator[AsyncSessionStore]:
    """Open a database and a store, with a listening cache if ``cache``."""
    async with AsyncDatabase(
        setup.target, setup.settings, min_size=setup.clients
    ) as database:
        if not cache:
            yield AsyncSessionStore(database, setup.hasher)
            return
        token_cache = TokenCache()
        async with AsyncSessionListener(database.target, token_cache) as listener:
            if not await listener.wait_listening(LISTEN_TIMEOUT_S):
                raise RuntimeError(
                    f"the session listener did not run LISTEN within "
                    f"{LISTEN_TIMEOUT_S:g} s, so the cache stayed inactive"
                )
            yield AsyncSessionStore(database, setup.hasher, cache=token_cache)


# The throughput variants. Each runs its own event loop and connections.


def measure_validate(setup: Setup, *, cache: bool) -> Measured:
    """Measure validations per second, without or with a cache.

    With the cache, every token is validated once first, which fills the
    cache, and the window lasts at least the cache's ttl. So every entry
    expires and is looked up again once in the window, as often as in a
    steady state.
    """
    name = VALIDATE_ON if cache else VALIDATE_OFF

    async def measure() -> Measured:
        async with open_store(setup, cache=cache) as store:
            steps = validation_steps(store, setup.tokens, setup.clients)
            token_cache = store.cache
            if not isinstance(token_cache, TokenCache):
                run = await drive(steps, WARM_UP_S, setup.seconds)
                return Measured(name, run.calls, run.elapsed_s, run.cpu_s)

            await validate_each_once(store, setup.tokens, setup.clients)
            seconds = max(setup.seconds, token_cache.ttl.total_seconds())
            run = await drive(steps, WARM_UP_S, seconds, token_cache.stats)
        before, after = run.probed
        assert isinstance(before, CacheStats) and isinstance(after, CacheStats)
        return Measured(
            name,
            run.calls,
            run.elapsed_s,
            run.cpu_s,
            cache_hits=after.hits - before.hits,
            cache_misses=after.misses - before.misses,
        )

    return asyncio.run(measure())


def measure_create(setup: Setup, round_number: int) -> Measured:
    async def measure() -> Measured:
        async with open_store(setup, cache=False) as store:

            def creator(client: int) -> Step:
                count = 0

                async def step() -> None:
                    nonlocal count
                    count += 1
                    await store.create(
                        f"bench-signin-{round_number}-{client}-{count}",
                        scopes=("content:read",),
                    )

                return step

            steps = [creator(client) for client in range(setup.clients)]
            run = await drive(steps, WARM_UP_S, setup.seconds)
        return Measured(CREATE, run.calls, run.elapsed_s, run.cpu_s)

    return asyncio.run(measure())


def measure_refresh(setup: Setup, round_number: int) -> Measured:
    async def measure() -> Measured:
        async with open_store(setup, cache=False) as store:

            async def refresher(client: int) -> Step:
                issued: IssuedTokens = await store.create(
                    f"bench-refresh-{round_number}-{client}", scopes=("content:read",)
                )

                async def step() -> None:
                    nonlocal issued
                    issued = await store.refresh(issued.refresh_token)

                return step

            steps = [await refresher(client) for client in range(setup.clients)]
            run = await drive(steps, WARM_UP_S, setup.seconds)
        return Measured(REFRESH, run.calls, run.elapsed_s, run.cpu_s)

    return asyncio.run(measure())


def from_pool_benchmark(name: str, measurement: pool_benchmark.Measurement) -> Measured:
    if measurement.misses:
        raise RuntimeError(
            f"{name} found no row for {measurement.misses} of "
            f"{measurement.lookups} keys, which all exist"
        )
    return Measured(name, measurement.lookups, measurement.elapsed_s, measurement.cpu_s)


def measure_variant(setup: Setup, name: str, round_number: int) -> Measured:
    if name == VALIDATE_OFF:
        return measure_validate(setup, cache=False)
    if name == VALIDATE_ON:
        return measure_validate(setup, cache=True)
    if name == PGBENCH:
        return from_pool_benchmark(
            name, pool_benchmark.measure_pgbench(setup.pool_bench)
        )
    if name == POOL_LOOP:
        return from_pool_benchmark(
            name, pool_benchmark.measure_pool_loop(setup.pool_bench)
        )
    if name == CREATE:
        return measure_create(setup, round_number)
    return measure_refresh(setup, round_number)


def measure_throughput(setup: Setup, args: argparse.Namespace) -> list[list[Measured]]:
    progress(f"throughput rounds at {setup.rows:,} rows")
    rounds = []
    for number in range(args.rounds):
        measured = []
        for name in VARIANTS:
            measurement = measure_variant(setup, name, number)
            progress(
                f"round {number + 1}: {name}: {measurement.rate:,.0f}/s, "
                f"{measurement.cpu_us_per_call:.1f} us client CPU per call"
            )
            measured.append(measurement)
        rounds.append(measured)
    return rounds


# Latency as the table grows.


def count_rows(setup: Setup) -> int:
    with connect(setup.target) as conn:
        row = conn.execute("SELECT count(*) FROM user_sessions").fetchone()
    assert row is not None
    return int(row[0])


def fill_to(setup: Setup, rows: int) -> int:
    """Fill user_sessions up to ``rows`` rows, and return the row count.

    The indexes other than the primary key are dropped before the insert and
    created again after it, which is several times faster than inserting
    into them. The table is vacuumed and analyzed afterwards, also when
    nothing was added.
    """
    current = count_rows(setup)
    key_prefix = setup.hasher.keys.newest.key_id + ":"
    with connect(setup.target, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = {FILL_TIMEOUT_MS}")
        conn.execute(f"SET maintenance_work_mem = '{FILL_MAINTENANCE_MEMORY}'")
        if current < rows:
            progress(f"filling user_sessions from {current:,} to {rows:,} rows")
            indexes = conn.execute(_SECONDARY_INDEXES).fetchall()
            for schema, name, _ in indexes:
                drop = sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, name))
                conn.execute(drop)
            while current < rows:
                chunk = min(FILL_CHUNK_ROWS, rows - current)
                params = {
                    "rows": chunk,
                    "users": max(1000, rows // 4),
                    "key_prefix": key_prefix,
                }
                conn.execute(_FILL, params)
                current += chunk
            for _, _, definition in indexes:
                conn.execute(definition)
        conn.execute("VACUUM (ANALYZE) user_sessions")
    return count_rows(setup)


def measure_latency(setup: Setup, round_number: int) -> list[Latency]:
    """Measure the latencies of one round at the size of ``setup``.

    The tokens' ``last_used_at`` is cleared first, so the first validation of
    every token touches its row. The vacuum that follows skips the indexes,
    which it would otherwise read whole in every round, with I/O that grows
    with the size and may overlap the runs that follow.
    """
    with connect(setup.target, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = {FILL_TIMEOUT_MS}")
        conn.execute(_CLEAR_LAST_USED, (setup.pool_bench.keys,))
        conn.execute("VACUUM (INDEX_CLEANUP OFF) user_sessions")
    progress(f"round {round_number + 1}: latency at {setup.rows:,} rows")

    async def measure() -> list[Latency]:
        async with open_store(setup, cache=False) as store:
            first = await validate_each_once(
                store, setup.tokens, setup.clients, check_touch=True
            )
            results = [Latency(setup.rows, setup.clients, "first use", first)]
            for clients in sorted({1, setup.clients}):
                steps = validation_steps(store, setup.tokens, clients)
                run = await drive(steps, WARM_UP_S, setup.latency_seconds)
                results.append(Latency(setup.rows, clients, "", run.latencies_ns))
        return results

    return asyncio.run(measure())


async def validate_each_once(
    store: AsyncSessionStore,
    tokens: Sequence[str],
    clients: int,
    *,
    check_touch: bool = False,
) -> list[int]:
    """Validate every token once with ``clients`` clients, and return the latencies.

    With ``check_touch``, a session without ``last_used_at`` is an error.
    """
    remaining = iter(tokens)
    latencies: list[int] = []

    async def client() -> None:
        for token in remaining:
            began = time.perf_counter_ns()
            session = await store.validate(token)
            latencies.append(time.perf_counter_ns() - began)
            if session is None:
                raise RuntimeError(
                    "validate() returned None for the token of a live session"
                )
            if check_touch and session.last_used_at is None:
                raise RuntimeError("the first validation did not set last_used_at")

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def measure_server_cost(setup: Setup) -> ServerCost:
    """Explain the lookups of the first tokens; return the medians of their cost.

    EXPLAIN ANALYZE runs each lookup on the server, so its execution time and
    the buffers it read show how the lookup itself grows with the table,
    without the round trips and the client, which dominate the latencies.
    """
    buffers: list[int] = []
    execution_ms: list[float] = []
    with connect(setup.target, autocommit=True) as conn:
        for key in setup.pool_bench.keys[:EXPLAINED_LOOKUPS]:
            row = conn.execute(_EXPLAIN_LOOKUP, (key,)).fetchone()
            assert row is not None
            plan = row[0][0]
            top = plan["Plan"]
            buffers.append(top["Shared Hit Blocks"] + top["Shared Read Blocks"])
            execution_ms.append(plan["Execution Time"])
    return ServerCost(
        rows=setup.rows,
        lookups=len(buffers),
        buffers=statistics.median(buffers),
        execution_ms=statistics.median(execution_ms),
    )


# The report.


def summarize_throughput(
    rounds: list[list[Measured]], rows: int, args: argparse.Namespace
) -> list[str]:
    by_variant: dict[str, list[Measured]] = {name: [] for name in VARIANTS}
    for measured in rounds:
        for measurement in measured:
            by_variant[measurement.variant].append(measurement)

    lines = [
        "",
        f"## Throughput: {args.clients} clients, {rows:,} rows at the start, "
        f"{len(rounds)} interleaved rounds of {args.seconds:g} s per variant",
        "",
        "Medians over the rounds, [lowest-highest]. Client CPU is this "
        "process's CPU time per call; for pgbench, that of the pgbench process.",
        "",
        "| variant | calls/s | client CPU us/call |",
        "|---|---:|---:|",
    ]
    for name in VARIANTS:
        rates = [m.rate for m in by_variant[name]]
        cpu = statistics.median(m.cpu_us_per_call for m in by_variant[name])
        lines.append(
            f"| {name} | {statistics.median(rates):,.0f} "
            f"[{min(rates):,.0f}-{max(rates):,.0f}] | {cpu:.1f} |"
        )

    cached = by_variant[VALIDATE_ON]
    hits = sum(m.cache_hits for m in cached)
    lookups = hits + sum(m.cache_misses for m in cached)
    if lookups:
        lines += [
            "",
            f"{VALIDATE_ON}: {100 * hits / lookups:.2f} % of the validations in "
            "the measured windows were cache hits; the others queried the "
            "database.",
        ]

    lines += [
        "",
        "| ratio | median of per-round ratios [lowest-highest] | aim | met |",
        "|---|---:|---:|---|",
    ]
    for numerator, denominator, aim in RATIO_AIMS:
        ratios = [
            a.rate / b.rate
            for a, b in zip(by_variant[numerator], by_variant[denominator], strict=True)
        ]
        median = statistics.median(ratios)
        lines.append(
            f"| {numerator} / {denominator} | {median:.2f}x "
            f"[{min(ratios):.2f}-{max(ratios):.2f}] | >= {aim:g}x | "
            f"{'yes' if median >= aim else 'no'} |"
        )
    return lines


def summarize_latency(
    rounds: list[list[Latency]], args: argparse.Namespace
) -> list[str]:
    lines = [
        "",
        f"## Validation latency, cache off: {len(rounds)} interleaved rounds of "
        f"{args.latency_seconds:g} s per run",
        "",
        "Medians over the rounds; p99 also [lowest-highest]. Each size has a "
        "database of its own, and each round measures every size. "
        '"first use" is the first validation of each token in the round, by '
        f"{args.clients} clients, which also records last_used_at. The other "
        "runs find last_used_at recent and write nothing.",
        "",
        "| rows | clients | run | validations per round | p50 ms | p99 ms |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    runs: dict[tuple[int, int, str], list[Latency]] = {}
    for measured in rounds:
        for latency in measured:
            key = (latency.rows, latency.clients, latency.label)
            runs.setdefault(key, []).append(latency)
    for (rows, clients, label), latencies in sorted(
        runs.items(), key=lambda item: (item[0][0], item[0][2] == "", item[0][1])
    ):
        count = statistics.median(len(latency.samples) for latency in latencies)
        p50 = statistics.median(latency.percentile(0.50) for latency in latencies)
        p99 = [latency.percentile(0.99) for latency in latencies]
        lines.append(
            f"| {rows:,} | {clients} | {label or 'steady'} | {count:,.0f} | "
            f"{p50:.3f} | {statistics.median(p99):.3f} "
            f"[{min(p99):.3f}-{max(p99):.3f}] |"
        )

    sizes = sorted({rows for rows, _, _ in runs})
    if len(sizes) < 2:
        return lines
    lines += [
        "",
        f"| clients | p99 at {sizes[-1]:,} rows / p99 at {sizes[0]:,} rows, "
        "median of per-round ratios [lowest-highest] | aim | met |",
        "|---:|---:|---:|---|",
    ]
    for clients in sorted({clients for _, clients, label in runs if not label}):
        largest = runs[(sizes[-1], clients, "")]
        smallest = runs[(sizes[0], clients, "")]
        ratios = [
            big.percentile(0.99) / small.percentile(0.99)
            for big, small in zip(largest, smallest, strict=True)
        ]
        median = statistics.median(ratios)
        lines.append(
            f"| {clients} | {median:.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] | "
            f"<= {LATENCY_AIM:g}x | {'yes' if median <= LATENCY_AIM else 'no'} |"
        )
    return lines


def summarize_server_cost(costs: list[ServerCost]) -> list[str]:
    lines = [
        "",
        "## One lookup by hash on the server (EXPLAIN ANALYZE), after the "
        "latency rounds",
        "",
        "Medians over the first tokens' lookups, with the statement of the pool loop.",
        "",
        "| rows | lookups | buffers | execution ms |",
        "|---:|---:|---:|---:|",
    ]
    for cost in costs:
        lines.append(
            f"| {cost.rows:,} | {cost.lookups} | {cost.buffers:g} | "
            f"{cost.execution_ms:.3f} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
