"""Request logging, Prometheus metrics and the health check of the MCP server.

- :func:`request_logging_middleware` is an MCP server middleware (SDK
  ``ServerMiddleware``). It writes one request_logs row per MCP request and
  counts it in :class:`Metrics`. Notifications have no response and are not
  logged.
- :class:`Metrics` keeps its metrics in a private ``CollectorRegistry``, so
  tests and several apps in one process never collide in the global registry.
- :func:`metrics_endpoint` and :func:`health_endpoint` are Starlette
  endpoints for ``/metrics`` and ``/health``.

A tool that rejects a caller for a missing scope or subscription level calls
:func:`mark_forbidden` before raising its ``ToolError``, so that the row's
status is ``forbidden`` instead of ``error``.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import pydantic_core
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.context import (
    CallNext,
    HandlerResult,
    ServerMiddleware,
    ServerRequestContext,
)
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mcp_authdb.db.migrations import LEDGER_TABLE
from mcp_authdb.db.pool import AsyncDatabase, Operation, Query
from mcp_authdb.errors import AuthDBError
from mcp_authdb.sql import load_migrations
from mcp_authdb.store.authdb import AsyncAuthDB
from mcp_authdb.store.request_log import AsyncRequestLog

logger = logging.getLogger(__name__)

# Values of request_logs.status and of the status label of the metrics.
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_FORBIDDEN = "forbidden"

# Bucket bounds of the request duration histogram, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Clients choose the method and tool names. To bound the number of series, the
# method label takes at most this many distinct values per Metrics object, and
# later names count as "other".
MAX_METHOD_LABELS = 64
OTHER_METHOD_LABEL = "other"
_METHOD_LABEL = re.compile(r"^[A-Za-z0-9_./-]{1,64}$")

# How long /health waits for the database before it returns 503.
HEALTH_TIMEOUT_S = 5.0


@dataclasses.dataclass
class _RequestOutcome:
    """The facts that a tool reports to the middleware about the request in progress."""

    forbidden: bool = False


# Set by the middleware for each request. It stores a mutable object, so that
# a tool reaches the middleware's object even when the SDK runs the tool in a
# copied context.
_current_outcome: contextvars.ContextVar[_RequestOutcome | None] = (
    contextvars.ContextVar("mcp_authdb_request_outcome", default=None)
)


def mark_forbidden() -> None:
    """Mark the MCP request in progress as rejected for lack of scope or level.

    The request's log row and metrics then get the status ``forbidden``.
    Outside :func:`request_logging_middleware` this does nothing.
    """
    outcome = _current_outcome.get()
    if outcome is not None:
        outcome.forbidden = True


class Metrics:
    """The Prometheus metrics of one MCP server app, in a registry of its own.

    ``registry`` contains:

    - ``mcp_authdb_requests_total{method,status}``: MCP requests by outcome;
    - ``mcp_authdb_request_duration_seconds{method}``: their durations;
    - ``mcp_authdb_oauth_cleanup_runs_total{outcome}``: rounds of the OAuth
      state cleanup, counted by the code that runs them through
      :meth:`record_oauth_cleanup`;
    - after :meth:`watch`, the request log and cleanup scheduler counters of
      an :class:`AsyncAuthDB`, read at each scrape.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mcp_authdb_requests",
            "MCP requests handled, by method (the tool name for tools/call) "
            "and status (ok, error, forbidden).",
            ["method", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "mcp_authdb_request_duration_seconds",
            "Time from the start of an MCP request to its result, in seconds.",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.oauth_cleanup_runs = Counter(
            "mcp_authdb_oauth_cleanup_runs",
            "Rounds of the OAuth state cleanup, by outcome (completed, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self._method_labels: set[str] = set()
        self._labels_lock = threading.Lock()
        self._watched: set[int] = set()
        # The children of each (method, status), looked up once: labels() costs
        # more than the increment and the observation together.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe_request(self, method: str, status: str, duration_s: float) -> None:
        """Count one MCP request and record its duration in seconds."""
        children = self._children.get((method, status))
        if children is None:
            label = self._method_label(method)
            children = (
                self.requests.labels(method=label, status=status),
                self.request_duration.labels(method=label),
            )
            if label == method:
                self._children[(method, status)] = children
        counter, histogram = children
        counter.inc()
        histogram.observe(duration_s)

    def record_oauth_cleanup(self, outcome: str) -> None:
        """Count one round of the OAuth state cleanup (``completed`` or ``failed``)."""
        self.oauth_cleanup_runs.labels(outcome=outcome).inc()

    def watch(self, authdb: AsyncAuthDB) -> None:
        """Add the request log and scheduler counters of ``authdb`` to the registry.

        The values are read at each scrape, so ``authdb`` may be opened later.
        Parts that are turned off, or not open yet, give no samples. Watching
        the same object again does nothing.
        """
        if id(authdb) in self._watched:
            return
        self._watched.add(id(authdb))
        self.registry.register(_AuthDBCollector(authdb))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Return the registry in the format that ``accept`` requests, and its type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def _method_label(self, method: str) -> str:
        if not _METHOD_LABEL.match(method):
            return OTHER_METHOD_LABEL
        with self._labels_lock:
            if method in self._method_labels:
                return method
            if len(self._method_labels) >= MAX_METHOD_LABELS:
                return OTHER_METHOD_LABEL
            self._method_labels.add(method)
        return method


class _AuthDBCollector(Collector):
    """The request log and scheduler counters of an AsyncAuthDB, read at scrape time."""

    def __init__(self, authdb: AsyncAuthDB) -> None:
        self._authdb = authdb

    def collect(self) -> Iterable[Metric]:
        metrics: list[Metric] = []
        request_log = self._authdb.request_log
        if request_log is not None:
            stats = request_log.stats()
            depth = GaugeMetricFamily(
                "mcp_authdb_request_log_queue_depth",
                "Request log rows queued and not yet written or dropped.",
                value=stats.queue_depth,
            )
            written = CounterMetricFamily(
                "mcp_authdb_request_log_written",
                "Request log rows committed to request_logs.",
                value=stats.written,
            )
            dropped = CounterMetricFamily(
                "mcp_authdb_request_log_dropped",
                "Request log rows lost, by reason (queue_full, closed, rejected, "
                "close_timeout).",
                labels=["reason"],
            )
            for reason, count in sorted(stats.dropped.items()):
                dropped.add_metric([reason], count)
            metrics += [depth, written, dropped]

        scheduler = self._authdb.scheduler
        if scheduler is not None:
            scheduler_stats = scheduler.stats
            runs = CounterMetricFamily(
                "mcp_authdb_cleanup_runs",
                "Session and request log cleanup rounds of this process, by "
                "outcome; skipped rounds found another process cleaning.",
                labels=["outcome"],
            )
            runs.add_metric(["completed"], scheduler_stats.runs)
            runs.add_metric(["skipped"], scheduler_stats.skips)
            runs.add_metric(["failed"], scheduler_stats.failures)
            metrics.append(runs)
        return metrics


def request_logging_middleware(
    request_log: AsyncRequestLog | None, metrics: Metrics
) -> ServerMiddleware[Any]:
    """Return an MCP server middleware that logs and counts every MCP request.

    For each request (not notification) it queues one request_logs row with:

    - ``method``: the tool name for ``tools/call``, else the MCP method;
    - ``parameters``: the tool's arguments for ``tools/call``, else the
      request's params, without ``_meta`` in both cases. The request log
      writer redacts secrets;
    - ``response_size``: bytes of the JSON-serialized result, NULL when the
      request raised a protocol error;
    - ``duration_ms``, and ``user_id`` from the access token of the request;
    - ``status``: ``forbidden`` after :func:`mark_forbidden`, ``error`` for a
      tool result with ``isError`` or a raised error (protocol errors and
      cancellations included), else ``ok``.

    With ``request_log`` None only the metrics are recorded.
    """

    async def log_request(
        ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if ctx.request_id is None:
            return await call_next(ctx)

        method = _logged_method(ctx.method, ctx.params)
        outcome = _RequestOutcome()
        reset_token = _current_outcome.set(outcome)
        started = time.perf_counter()
        result: HandlerResult = None
        status = STATUS_ERROR
        try:
            result = await call_next(ctx)
            status = _result_status(result)
            return result
        finally:
            duration_s = time.perf_counter() - started
            _current_outcome.reset(reset_token)
            if outcome.forbidden:
                status = STATUS_FORBIDDEN
            metrics.observe_request(method, status, duration_s)
            if request_log is not None:
                request_log.log(
                    method,
                    user_id=_caller_id(),
                    parameters=_logged_parameters(ctx.method, ctx.params),
                    response_size=_response_size(result),
                    duration_ms=duration_s * 1000,
                    status=status,
                )

    return log_request


def _logged_method(method: str, params: Mapping[str, Any] | None) -> str:
    if method == "tools/call" and params is not None:
        name = params.get("name")
        if isinstance(name, str) and name:
            return name
    return method


def _logged_parameters(method: str, params: Mapping[str, Any] | None) -> object:
    if params is None:
        return None
    if method == "tools/call":
        return params.get("arguments")
    return {key: value for key, value in params.items() if key != "_meta"} or None


def _result_status(result: HandlerResult) -> str:
    if isinstance(result, Mapping) and result.get("isError") is True:
        return STATUS_ERROR
    if getattr(result, "is_error", False) is True:
        return STATUS_ERROR
    return STATUS_OK


def _response_size(result: HandlerResult) -> int | None:
    if result is None:
        return None
    # pydantic's serializer writes UTF-8 bytes directly, several times faster
    # than json.dumps on the dicts the SDK returns, and it runs per request.
    try:
        return len(pydantic_core.to_json(result, by_alias=True, exclude_none=True))
    except (TypeError, ValueError):
        return None


def _caller_id() -> str | None:
    token = get_access_token()
    if token is None:
        return None
    user_id = getattr(token, "user_id", None)
    if isinstance(user_id, str):
        return user_id
    return token.subject


def metrics_endpoint(
    metrics: Metrics, authdb: AsyncAuthDB
) -> Callable[[Request], Awaitable[Response]]:
    """Return the ``/metrics`` endpoint: ``metrics.registry`` in text format.

    Adds the request log and scheduler counters of ``authdb`` to ``metrics``
    (see :meth:`Metrics.watch`). The format follows the ``Accept`` header
    (Prometheus text by default, OpenMetrics when the client requests it).
    """
    metrics.watch(authdb)

    async def serve_metrics(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return serve_metrics


DatabaseSource = AsyncDatabase | Callable[[], AsyncDatabase | None]


def health_endpoint(
    database: DatabaseSource,
) -> Callable[[Request], Awaitable[Response]]:
    """Return the ``/health`` endpoint.

    It runs ``SELECT 1`` and compares the migration ledger with the migration
    files of this package. It returns 200 ``{"status": "ok"}`` when both
    succeed and no migration is pending. Otherwise it returns 503
    ``{"status": "unavailable", "reason": ...}``, where the reason names the
    failed check but no host, user or password. The full error is logged when
    the state changes.

    ``database`` is the pool, or a function that returns it at request time
    (None while the app is starting, which gives 503).
    """
    migrations = {m.version: m for m in load_migrations()}
    state = _HealthLog()

    async def check_health(request: Request) -> Response:
        pool = database() if callable(database) else database
        if pool is None:
            return state.unavailable("the server is starting", None)
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                ledger = await pool.run(
                    _read_ledger, transaction=False, idempotent=True
                )
        except TimeoutError as exc:
            return state.unavailable(
                f"the database did not respond within {HEALTH_TIMEOUT_S:g} s", exc
            )
        except AuthDBError as exc:
            return state.unavailable("the database is unreachable", exc)

        reason = _migration_problem(migrations, ledger)
        if reason is not None:
            return state.unavailable(reason, None)
        return state.ok()

    return check_health


class _HealthLog:
    """Builds /health responses and logs each change between healthy and not."""

    def __init__(self) -> None:
        self._last_reason: str | None = None

    def ok(self) -> Response:
        if self._last_reason is not None:
            logger.info(
                "health check passes again", extra={"action": "health.recovered"}
            )
            self._last_reason = None
        return JSONResponse({"status": "ok"})

    def unavailable(self, reason: str, exc: BaseException | None) -> Response:
        if reason != self._last_reason:
            logger.warning(
                "health check failed: %s%s",
                reason,
                f" ({exc})" if exc is not None and str(exc) else "",
                extra={"action": "health.failed"},
            )
            self._last_reason = reason
        return JSONResponse({"status": "unavailable", "reason": reason}, 503)


def _read_ledger() -> Operation[dict[int, str] | None]:
    """Run ``SELECT 1``, then return the ledger's checksums by version.

    Returns None when the ledger table does not exist.
    """
    yield Query("SELECT 1")
    result = yield Query("SELECT to_regclass(%s) IS NOT NULL", (LEDGER_TABLE,))
    if not result.rows[0][0]:
        return None
    result = yield Query(f"SELECT version, checksum FROM {LEDGER_TABLE}")
    return {int(version): str(checksum) for version, checksum in result.rows}


def _migration_problem(
    migrations: Mapping[int, Any], ledger: dict[int, str] | None
) -> str | None:
    """Return why the schema is not current, or None when it is.

    Versions in the ledger with no file here were applied by a newer release,
    which keeps the schema usable by this one, as ``mcp-authdb migrate`` does.
    """
    if ledger is None:
        return "the database is not migrated; run `mcp-authdb migrate`"
    pending = [m.filename for v, m in migrations.items() if v not in ledger]
    if pending:
        return f"migrations pending: {', '.join(pending)}; run `mcp-authdb migrate`"
    changed = [m.filename for v, m in migrations.items() if ledger[v] != m.checksum]
    if changed:
        return f"migration files changed since they were applied: {', '.join(changed)}"
    return None
