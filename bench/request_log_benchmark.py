"""Benchmark of the request log writer against a raw psycopg COPY of the same rows.

Each repetition writes ``--rows`` rows of one fixed set four ways, in turn,
into an emptied request_logs table:

1. **raw COPY**: one binary ``COPY request_logs (...) FROM STDIN`` of all the
   rows in one transaction, with ``Jsonb`` parameters, timed from the first
   row to the COMMIT. This is the fastest way to load the rows with psycopg,
   without sanitizing, queueing or retries.
2. **RequestLog**: ``log()`` for every row from the main thread, then
   ``flush()``, timed from the first call until every row is committed.
3. **AsyncRequestLog**: the same on an event loop, yielding to the loop every
   100 calls, then ``await flush()``.
4. **RequestLog, queue drain only**: every ``log()`` call first, untimed, then
   ``open()`` and ``flush()``, timed. This isolates the writer's COPY path
   from the cost of sanitizing.

The order of the ways rotates between repetitions. The script prints the
rows per second of each way, per repetition and as medians, the ratio of each
writer's median to the raw COPY's median, and the median of the ratios taken
within each repetition, which is less sensitive to load that changes over
the run. In ways 2 and 3 the caller and the writer share one process, so the
sanitizing in ``log()`` and the writer compete for one Python interpreter.

It then measures what one ``log()`` call costs its caller, in microseconds
(median and p99 of ``--calls`` calls), with the thread writer running. The
calls come once back to back, and once paced at ``--paced-rate`` calls per
second, which leaves the writer thread time between calls as a server would.

The benchmark works in a scratch database of its own (``--database``), dropped
and created again at the start and dropped at the end. It is created on the
server of ``DATABASE_URL``, whose role needs CREATEDB, or on the embedded
server when ``DATABASE_URL`` is unset. Example:

    DATABASE_URL='postgresql:///postgres?host=/var/run/postgresql' \\
        .venv/bin/python bench/request_log_benchmark.py \\
        --output /tmp/request_log_bench.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from mcp_authdb.db import (
    ConnectionTarget,
    Settings,
    connect,
    open_target,
    resolve_target,
)
from mcp_authdb.db.migrations import migrate
from mcp_authdb.db.settings import mask_password
from mcp_authdb.store.request_log import (
    COPY_SQL,
    COPY_TYPES,
    AsyncRequestLog,
    RequestLog,
)

DEFAULT_DATABASE = "mcp_authdb_bench_request_log"
METHODS = ("tools/call", "resources/read", "prompts/get", "tools/list")
# The async caller yields to the event loop after this many log() calls, as
# request handlers do between requests. Yielding after every call would
# measure the event loop more than the writer.
ASYNC_YIELD_EVERY = 100

# One request's values: method, user_id, parameters, response_size,
# duration_ms, status.
Request = tuple[str, str, dict[str, Any], int, int, str]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print its figures and write them to ``--output``."""
    args = parse_args(argv)
    settings = Settings.from_env()
    requests = make_requests(args.rows)
    lines = [f"command: {command_line()}", ""]
    load_before = os.getloadavg()

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    with open_target(settings) as server:
        target = prepare_database(server, settings, args.database)
        try:
            say(f"server: {server_version(target)}; {args.rows} rows per run")
            rates = measure_throughput(target, settings, requests, args, say)
            summarize_throughput(rates, say)
            measure_call_cost(target, settings, requests, args, say)
            load_after = os.getloadavg()
            say("")
            say(
                f"machine: {os.cpu_count()} CPUs; load average {load_before[0]:.2f} "
                f"at the start, {load_after[0]:.2f} at the end"
            )
        finally:
            drop_database(server, args.database)

    if args.output:
        with open(args.output, "w", encoding="utf-8") as output:
            output.write("\n".join(lines) + "\n")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare the request log writer with a raw psycopg COPY.",
    )
    parser.add_argument(
        "--rows",
        type=positive_int,
        default=100_000,
        help="rows written by each way in each repetition (default: 100000)",
    )
    parser.add_argument(
        "--repetitions",
        type=positive_int,
        default=7,
        help="how many times each way is measured, interleaved (default: 7)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="batch_size of the writers (default: the library's default)",
    )
    parser.add_argument(
        "--calls",
        type=positive_int,
        default=50_000,
        help="log() calls timed for the caller's cost (default: 50000)",
    )
    parser.add_argument(
        "--paced-rate",
        type=positive_int,
        default=5_000,
        help="calls per second of the paced caller-cost run (default: 5000)",
    )
    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="scratch database, dropped and created again (default: %(default)s)",
    )
    parser.add_argument("--output", metavar="PATH", help="also write the figures here")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def command_line() -> str:
    """Return the command that ran this script, with DATABASE_URL masked."""
    url = os.environ.get("DATABASE_URL")
    prefix = (
        "env -u DATABASE_URL"
        if url is None
        else f"DATABASE_URL={shlex.quote(mask_password(url))}"
    )
    return f"{prefix} {shlex.join([sys.executable, *sys.argv])}"


def make_requests(count: int) -> list[Request]:
    """Return ``count`` requests shaped like MCP tool calls, none alike."""
    return [
        (
            METHODS[i % len(METHODS)],
            f"user-{i % 1000}",
            {
                "name": "search_documents",
                "arguments": {
                    "query": f"postgres copy performance {i}",
                    "limit": 10,
                    "filters": {"lang": "en", "tags": ["db", "perf"]},
                },
            },
            512 + i % 4096,
            i % 250,
            "ok" if i % 50 else "error",
        )
        for i in range(count)
    ]


def prepare_database(
    server: ConnectionTarget, settings: Settings, name: str
) -> ConnectionTarget:
    """Create the scratch database afresh, migrate it, and return its target."""
    if name == conninfo_to_dict(server.conninfo).get("dbname"):
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
    return target


def drop_database(server: ConnectionTarget, name: str) -> None:
    with connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


def server_version(target: ConnectionTarget) -> str:
    with connect(target, autocommit=True) as conn:
        row = conn.execute("SELECT version()").fetchone()
    return str(row[0]) if row else "unknown"


def empty_table(target: ConnectionTarget) -> None:
    with connect(target, autocommit=True) as conn:
        conn.execute("TRUNCATE request_logs")
        # Without the privilege the figures may be noisier.
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute("CHECKPOINT")


def count_rows(target: ConnectionTarget) -> int:
    with connect(target, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM request_logs").fetchone()
    return int(row[0]) if row else 0


def writer_options(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.batch_size is None else {"batch_size": args.batch_size}


def run_raw_copy(
    target: ConnectionTarget, settings: Settings, requests: list[Request], _: Any
) -> float:
    with connect(target) as conn:
        began = time.perf_counter()
        now = datetime.now(UTC)
        with conn.cursor().copy(COPY_SQL) as copy:
            copy.set_types(COPY_TYPES)
            for method, user_id, parameters, size, duration, status in requests:
                copy.write_row(
                    (user_id, method, Jsonb(parameters), size, duration, status, now)
                )
        conn.commit()
        return time.perf_counter() - began


def run_thread_writer(
    target: ConnectionTarget,
    settings: Settings,
    requests: list[Request],
    args: argparse.Namespace,
) -> float:
    writer = RequestLog(
        target, settings, max_queue_rows=len(requests), **writer_options(args)
    )
    writer.open()
    try:
        began = time.perf_counter()
        log = writer.log
        for method, user_id, parameters, size, duration, status in requests:
            log(
                method,
                user_id=user_id,
                parameters=parameters,
                response_size=size,
                duration_ms=duration,
                status=status,
            )
        if not writer.flush(timeout_s=120):
            raise RuntimeError("the thread writer did not finish within 120 s")
        return time.perf_counter() - began
    finally:
        check_stats(writer.close(), len(requests))


def run_thread_drain(
    target: ConnectionTarget,
    settings: Settings,
    requests: list[Request],
    args: argparse.Namespace,
) -> float:
    writer = RequestLog(
        target, settings, max_queue_rows=len(requests), **writer_options(args)
    )
    try:
        log = writer.log
        for method, user_id, parameters, size, duration, status in requests:
            log(
                method,
                user_id=user_id,
                parameters=parameters,
                response_size=size,
                duration_ms=duration,
                status=status,
            )
        began = time.perf_counter()
        writer.open()
        if not writer.flush(timeout_s=120):
            raise RuntimeError("the thread writer did not finish within 120 s")
        return time.perf_counter() - began
    finally:
        check_stats(writer.close(), len(requests))


def run_async_writer(
    target: ConnectionTarget,
    settings: Settings,
    requests: list[Request],
    args: argparse.Namespace,
) -> float:
    async def run() -> float:
        writer = AsyncRequestLog(
            target, settings, max_queue_rows=len(requests), **writer_options(args)
        )
        await writer.open()
        try:
            began = time.perf_counter()
            log = writer.log
            for index, (
                method,
                user_id,
                parameters,
                size,
                duration,
                status,
            ) in enumerate(requests):
                log(
                    method,
                    user_id=user_id,
                    parameters=parameters,
                    response_size=size,
                    duration_ms=duration,
                    status=status,
                )
                if index % ASYNC_YIELD_EVERY == ASYNC_YIELD_EVERY - 1:
                    # A server's handlers yield to the loop between requests.
                    await asyncio.sleep(0)
            if not await writer.flush(timeout_s=120):
                raise RuntimeError("the async writer did not finish within 120 s")
            return time.perf_counter() - began
        finally:
            check_stats(await writer.aclose(), len(requests))

    return asyncio.run(run())


def check_stats(stats: Any, expected: int) -> None:
    if stats.written != expected or stats.dropped_total:
        raise RuntimeError(f"the writer wrote {stats}, expected {expected} rows")


WAYS: dict[str, Callable[..., float]] = {
    "raw COPY": run_raw_copy,
    "RequestLog (thread)": run_thread_writer,
    "AsyncRequestLog": run_async_writer,
    "RequestLog, queue drain only": run_thread_drain,
}


def measure_throughput(
    target: ConnectionTarget,
    settings: Settings,
    requests: list[Request],
    args: argparse.Namespace,
    say: Callable[[str], None],
) -> dict[str, list[float]]:
    """Measure each way ``--repetitions`` times, in rotating order."""
    names = list(WAYS)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(args.repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            empty_table(target)
            elapsed = WAYS[name](target, settings, requests, args)
            stored = count_rows(target)
            if stored != len(requests):
                raise RuntimeError(f"{name} stored {stored} rows, not {len(requests)}")
            rate = len(requests) / elapsed
            rates[name].append(rate)
            say(f"repetition {repetition + 1}: {name}: {rate:,.0f} rows/s")
    return rates


def summarize_throughput(
    rates: dict[str, list[float]], say: Callable[[str], None]
) -> None:
    """Print the median rates, their ratio, and the median per-repetition ratio.

    The per-repetition ratio divides each way's rate by the raw COPY's rate of
    the same repetition, which cancels load that drifts between repetitions.
    """
    raw_rates = rates["raw COPY"]
    raw = statistics.median(raw_rates)
    say("")
    say(
        "| way | rows/s, median [min-max] | median vs raw COPY "
        "| per-repetition ratio, median [min-max] |"
    )
    say("|---|---:|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        ratios = [value / base for value, base in zip(values, raw_rates, strict=True)]
        say(
            f"| {name} | {median:,.0f} [{min(values):,.0f}-{max(values):,.0f}] "
            f"| {median / raw:.2f} | {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f}-{max(ratios):.2f}] |"
        )


def measure_call_cost(
    target: ConnectionTarget,
    settings: Settings,
    requests: list[Request],
    args: argparse.Namespace,
    say: Callable[[str], None],
) -> None:
    """Time single log() calls with the thread writer running."""
    say("")
    say("| log() calls | median us | p99 us | max us |")
    say("|---|---:|---:|---:|")
    for label, rate in (
        ("back to back", None),
        (f"{args.paced_rate}/s", args.paced_rate),
    ):
        empty_table(target)
        writer = RequestLog(target, settings, **writer_options(args))
        writer.open()
        try:
            durations = time_calls(writer, requests, args.calls, rate)
            writer.flush(timeout_s=120)
        finally:
            check_stats(writer.close(), args.calls)
        cuts = statistics.quantiles(durations, n=100, method="inclusive")
        say(
            f"| {label} | {statistics.median(durations):.1f} | {cuts[98]:.1f} "
            f"| {max(durations):.1f} |"
        )


def time_calls(
    writer: RequestLog, requests: list[Request], calls: int, rate: int | None
) -> list[float]:
    """Return the duration of each of ``calls`` log() calls, in microseconds."""
    durations = []
    interval = 1.0 / rate if rate else 0.0
    next_call = time.perf_counter()
    for index in range(calls):
        method, user_id, parameters, size, duration, status = requests[
            index % len(requests)
        ]
        if interval:
            # Sleeping releases the GIL, as a server waiting for its next
            # request does.
            next_call += interval
            pause = next_call - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        began = time.perf_counter_ns()
        writer.log(
            method,
            user_id=user_id,
            parameters=parameters,
            response_size=size,
            duration_ms=duration,
            status=status,
        )
        durations.append((time.perf_counter_ns() - began) / 1000)
    return durations


if __name__ == "__main__":
    sys.exit(main())
