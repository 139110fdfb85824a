"""Benchmark of the MCP server: authenticated tool calls against a bare SDK server.

Two HTTP servers run side by side on 127.0.0.1, each in its own process with
the same uvicorn settings: one worker, the default event loop, no access
log. Both are built on the same MCP SDK ``MCPServer``, with stateless
streamable HTTP and JSON responses:

- ``auth``: ``python -m mcp_authdb serve`` on a scratch database, with its
  defaults: bearer validation through the session store with the token cache
  on, and the request log writing one request_logs row per MCP request;
- ``bare``: this script run as ``serve-bare``, an ``MCPServer`` with only a
  ``whoami`` tool that returns the same ``WhoAmI`` model with fixed values,
  no auth and no request log.

The upstream OAuth provider of ``auth`` is the Authlib stand-in of the tests
(``tests/upstream_server.py``), served in a thread of this process only
while the user ``alice`` signs in once through the SDK's own OAuth client
(registration, authorization code with PKCE, token). The access token is
then used for every call.

The load generator is this process: ``--clients`` asyncio tasks, each with
its own ``httpx2.AsyncClient`` (one keep-alive connection), send raw
JSON-RPC ``tools/call`` POSTs for ``whoami`` with the headers and the
``_meta`` that the SDK's client sends at protocol version 2026-07-28, which
needs no ``initialize`` in stateless mode. Each response must be HTTP 200
with a tool result that is not an error and names the expected user.

Each window runs ``--warm-up`` seconds unmeasured, then ``--duration``
seconds measured: the calls completed inside are counted, and their
latencies, from the request to the whole response, give p50 and p99. Each of
``--rounds`` rounds measures every client count of ``--clients`` on both
servers, bare and auth alternating in an order that flips from round to
round, so that a change in the machine's load hits both alike. The report
gives each round and, per client count, the medians over the rounds and the
median of the per-round ratio auth/bare and of the per-round added p50 and
p99. CPU per call is the server process's user and system time in the
window over its calls; for the load generator, this process's.

At the end, the auth server is stopped with SIGTERM, which makes the request
log writer flush, and the request_logs rows of ``whoami`` are counted
against the authenticated calls sent. The index scans of user_sessions over
the run show whether bearer validation was served from the token cache.

``--py-spy DIR`` adds one unmeasured window per server at ``--profile-clients``
clients after the rounds, with ``py-spy record`` attached to the server, and
writes the collapsed stacks to ``DIR/auth.txt`` and ``DIR/bare.txt``, with a
table of where the auth server's samples go.

The scratch database ``--database`` is created afresh on the server of
``--url`` and dropped at the end, unless ``--database-url`` names an existing
database, which is used as it is and kept. Only Unix sockets and loopback
addresses are accepted.

Example; on a virtual machine with 2 CPUs it took about 2 minutes:

    .venv/bin/python bench/server_benchmark.py --output /tmp/server_bench.txt
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import html
import importlib
import itertools
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

import httpx2
import uvicorn
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

import pool_benchmark
import session_benchmark
from mcp_authdb import __version__
from mcp_authdb.db import ConnectionTarget, Settings, connect, resolve_target
from mcp_authdb.server.consent import CONSENT_PATH
from mcp_authdb.server.tools import WHOAMI_DESCRIPTION, WhoAmI

DEFAULT_URL = "postgresql:///postgres?host=/var/run/postgresql"
DEFAULT_DATABASE = "mcp_authdb_server_bench"
DEFAULT_CLIENTS = (1, 4, 16)
DEFAULT_ROUNDS = 3
DEFAULT_DURATION_S = 5.0
DEFAULT_WARM_UP_S = 1.0
# The auth server's throughput, as a fraction of the bare server's, that the
# report counts as met.
RATE_AIM = 0.8

HOST = "127.0.0.1"
MCP_PATH = "/mcp"
BARE_SERVER_COMMAND = "serve-bare"
PROTOCOL_VERSION = "2026-07-28"
USER_ID = "alice"
SUBSCRIPTION_LEVEL = "plus"
TOOL = "whoami"
# The redirect URI of the benchmark's OAuth client. Nothing listens there: the
# headless browser stops at the redirect to it and reads the code.
CLIENT_REDIRECT_URI = "http://127.0.0.1:1/callback"
# A hidden field of the server's consent form.
HIDDEN_INPUT = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 30.0
# How long the clients may take to finish their last call after a window.
DRAIN_TIMEOUT_S = 30.0
# Seconds uvicorn waits for open requests at shutdown, as `mcp-authdb serve`.
GRACEFUL_SHUTDOWN_S = 10
PY_SPY_RATE_HZ = 200

# Variables that would change either server's behaviour. They are removed from
# the environment the servers inherit, and the benchmark sets the ones it needs.
_SERVER_VARIABLE_PREFIXES = (
    "DB_",
    "MCP_AUTHDB_",
    "DRUPAL_",
    "UPSTREAM_",
    "OAUTH_",
    "TOKEN_",
    "SESSION_",
)

# The parts of the auth server's profile that the report breaks out. Each has a
# label and a pattern of its frames ("function (file:line)"). The optional
# third pattern names the work the part wraps: a sample with such a frame below
# the part's innermost frame does not count for the part.
PROFILE_PARTS: tuple[tuple[str, str, str | None], ...] = (
    (
        "bearer validation (BearerAuthBackend.authenticate)",
        r"^BearerAuthBackend\.authenticate ",
        None,
    ),
    (
        "- token hash and cache lookup (AsyncSessionStore.validate)",
        r"^AsyncSessionStore\.validate ",
        None,
    ),
    (
        "- audience check (_issued_for_this_resource)",
        r"^BearerAuthBackend\._issued_for_this_resource ",
        None,
    ),
    (
        "the SDK's three auth middlewares, without what they wrap",
        r"^(Authentication|AuthContext|RequireAuth)Middleware\.__call__ ",
        r"^(BearerAuthBackend\.authenticate|ExceptionMiddleware\.__call__"
        r"|StreamableHTTPASGIApp\.__call__) ",
    ),
    (
        "request log middleware, without the tool call it wraps",
        r"^request_logging_middleware\.<locals>\.log_request ",
        r"^ServerRunner\._on_request\.<locals>\._inner ",
    ),
    ("- sanitizing and queuing the row (log)", r"^_RequestLogBase\.log ", None),
    ("- response size (JSON of the result)", r"^_response_size ", None),
    ("- Prometheus metrics", r"^Metrics\.observe_request ", None),
    ("request log writer task (COPY)", r"^AsyncRequestLog\._run ", None),
    ("for scale: the SDK's tool call handler", r"^MCPServer\._handle_call_tool ", None),
)


class BenchmarkError(Exception):
    """A server misbehaved or a check of the run failed."""


@dataclasses.dataclass(frozen=True)
class Window:
    """One measured window of one server at one client count."""

    server: str
    clients: int
    round_number: int
    calls: int
    elapsed_s: float
    latencies_ns: list[int]
    server_cpu_s: float
    client_cpu_s: float
    # Every call the window completed, the warm-up and the drain included.
    calls_sent: int
    response_bytes: int

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed_s

    def percentile(self, fraction: float) -> float:
        """Return the nearest-rank percentile of the latencies, in milliseconds."""
        ordered = sorted(self.latencies_ns)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[rank - 1] / 1e6

    @property
    def server_cpu_us_per_call(self) -> float:
        return 1e6 * self.server_cpu_s / self.calls if self.calls else math.nan

    @property
    def client_cpu_us_per_call(self) -> float:
        return 1e6 * self.client_cpu_s / self.calls if self.calls else math.nan


@dataclasses.dataclass
class Target:
    """A running server under test and the headers of its calls."""

    name: str
    process: ServerProcess
    headers: dict[str, str]


class ServerProcess:
    """One server subprocess listening on 127.0.0.1, its output kept in a file."""

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], port: int, log: Path
    ) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.port = port
        self.log_path = log
        self.base_url = f"http://{HOST}:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, is_ready: Callable[[str], bool]) -> None:
        """Start the process and wait until ``is_ready(base_url)`` returns True.

        Transport errors of ``is_ready`` count as not ready.
        """
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(
                    f"the {self.name} server exited with {self.process.returncode}:"
                    f"\n{self.output()}"
                )
            with contextlib.suppress(httpx2.TransportError):
                if is_ready(self.base_url):
                    return
            time.sleep(0.1)
        raise BenchmarkError(
            f"the {self.name} server was not ready within {START_TIMEOUT_S:g} s:"
            f"\n{self.output()}"
        )

    def stop(self) -> int | None:
        """Stop the process with SIGTERM, then SIGKILL after a timeout.

        Return the exit code, or None when the process never started or was killed.
        """
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            progress(f"the {self.name} server ignored SIGTERM; killing it")
            self.process.kill()
            self.process.wait()
            return None

    def cpu_seconds(self) -> float:
        """Return the user and system CPU time of the process so far, in seconds."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        # utime and stime are fields 14 and 15 of proc(5), counted from the
        # state, field 3, which is the first after the command name.
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report and write it to ``--output``."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == [BARE_SERVER_COMMAND]:
        return serve_bare(arguments[1:])

    args = parse_args(arguments)
    session_benchmark.check_local(args.database_url or args.url)
    settings = Settings.from_env().replace(database_url=args.url)
    report = describe_run(arguments, args)
    for line in report:
        print(line, file=sys.stderr)
    started = time.monotonic()
    try:
        with session_benchmark.time_limit(args.time_limit):
            report += run_benchmark(args, settings)
    except session_benchmark.TimeLimitExceeded as exc:
        raise SystemExit(str(exc)) from None
    except BenchmarkError as exc:
        raise SystemExit(f"the benchmark failed: {exc}") from None
    report.append("")
    report.append(f"load average after: {pool_benchmark.load_average()}")
    report.append(f"total run time: {time.monotonic() - started:.0f} s")

    text = "\n".join(report) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure authenticated tool calls per second of `mcp-authdb "
        "serve`, with the request log on, against a bare MCPServer with the "
        "same tool and no auth, and the latency that auth and logging add.",
    )

    parser.add_argument(
        "--url",
        default=os.environ.get("DATABASE_URL") or DEFAULT_URL,
        help="PostgreSQL URL of the server on which the scratch database is "
        f"created, on a Unix socket or loopback (default: DATABASE_URL, or "
        f"{DEFAULT_URL})",
    )
    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="name of the scratch database, dropped and created again, and "
        "dropped at the end (default: %(default)s)",
    )
    parser.add_argument(
        "--database-url",
        help="use this existing database instead of a scratch database; it is "
        "migrated by the server and kept",
    )

    parser.add_argument(
        "--clients",
        type=pool_benchmark.positive_int,
        nargs="+",
        default=list(DEFAULT_CLIENTS),
        help="concurrent clients, each with its own connection; every count "
        "is measured in every round (default: 1 4 16)",
    )
    parser.add_argument(
        "--rounds",
        type=pool_benchmark.positive_int,
        default=DEFAULT_ROUNDS,
        help="rounds, each measuring both servers at every client count "
        f"(default: {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--duration",
        type=pool_benchmark.positive_float,
        default=DEFAULT_DURATION_S,
        help="measured seconds of each window, one server at one client count "
        f"in one round (default: {DEFAULT_DURATION_S:g})",
    )
    parser.add_argument(
        "--warm-up",
        type=float,
        default=DEFAULT_WARM_UP_S,
        help="unmeasured seconds of calls before each window (default: "
        f"{DEFAULT_WARM_UP_S:g})",
    )

    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        help="after the rounds, profile each server for one window with "
        "py-spy and write the collapsed stacks to DIR",
    )
    parser.add_argument(
        "--profile-clients",
        type=pool_benchmark.positive_int,
        default=4,
        help="clients of the profiled windows (default: 4)",
    )

    parser.add_argument(
        "--time-limit",
        type=pool_benchmark.positive_float,
        default=600.0,
        help="seconds after which the run stops its servers, drops its "
        "database and fails (default: 600)",
    )
    parser.add_argument(
        "--logs",
        metavar="DIR",
        help="copy the output of both servers to DIR/auth.log and DIR/bare.log",
    )
    parser.add_argument("--output", metavar="PATH", help="also write the report here")

    args = parser.parse_args(argv)
    if args.warm_up < 0:
        parser.error(f"--warm-up={args.warm_up:g} is negative; pass 0 or more")

    args.clients = sorted(set(args.clients))
    if args.py_spy and shutil.which("py-spy") is None and not local_py_spy().exists():
        parser.error(
            "--py-spy needs py-spy; install it with .venv/bin/pip install py-spy"
        )

    return args


def describe_run(arguments: Sequence[str], args: argparse.Namespace) -> list[str]:
    command = shlex.join([".venv/bin/python", "bench/server_benchmark.py", *arguments])
    if "DATABASE_URL" in os.environ:
        command = f"DATABASE_URL={shlex.quote(os.environ['DATABASE_URL'])} {command}"
    now = datetime.datetime.now(datetime.UTC)
    windows = len(args.clients) * args.rounds * 2
    return [
        f"$ {command}",
        f"date: {now:%Y-%m-%d %H:%M} UTC",
        *pool_benchmark.describe_machine(Settings(database_url=args.url))[:2],
        f"MCP SDK {package_version('mcp')}, uvicorn {uvicorn.__version__}, "
        f"httpx2 {httpx2.__version__}",
        f"clients: {' '.join(map(str, args.clients))}; {args.rounds} rounds; "
        f"{windows} windows of {args.warm_up:g} s warm-up and {args.duration:g} s "
        "measured",
        "servers, load generator and PostgreSQL share the machine's CPUs",
        f"load average before: {pool_benchmark.load_average()}",
    ]


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# The bare server.


def serve_bare(argv: Sequence[str]) -> int:
    """Serve the bare MCPServer on 127.0.0.1 until SIGTERM or SIGINT.

    Its uvicorn settings are those of ``mcp-authdb serve``, and its lifespan
    runs outside uvicorn in the same way.
    """
    parser = argparse.ArgumentParser(prog=f"server_benchmark.py {BARE_SERVER_COMMAND}")
    parser.add_argument("--port", type=pool_benchmark.positive_int, required=True)
    args = parser.parse_args(argv)

    server: MCPServer[Any] = MCPServer("bare", version=__version__)

    async def whoami() -> WhoAmI:
        return WhoAmI(
            user_id=USER_ID,
            subscription_level=SUBSCRIPTION_LEVEL,
            scopes=["content:read", "content:search", "content:meta"],
            session_expires_at=datetime.datetime.now(datetime.UTC)
            .replace(microsecond=0)
            .isoformat()
            .replace("+00:00", "Z"),
            client_id="00000000-0000-0000-0000-000000000000",
        )

    server.add_tool(whoami, name=TOOL, description=WHOAMI_DESCRIPTION)
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        json_response=True,
        # The DNS rebinding protection of `mcp-authdb serve` on a loopback address.
        transport_security=TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[f"{HOST}:{args.port}", "127.0.0.1:*", "localhost:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*"],
        ),
        host=HOST,
    )
    config = uvicorn.Config(
        app,
        host=HOST,
        port=args.port,
        lifespan="off",
        proxy_headers=False,
        access_log=False,
        server_header=False,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    uvicorn_server = uvicorn.Server(config)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await uvicorn_server.serve()

    asyncio.run(run())
    return 0


# Setting up the run.


def run_benchmark(args: argparse.Namespace, settings: Settings) -> list[str]:
    """Start both servers, sign in, measure every window, return the report."""
    admin: ConnectionTarget | None = None
    if args.database_url:
        database_url = args.database_url
    else:
        admin = resolve_target(args.url, settings)
        database_url = pool_benchmark.create_database(admin, args.database)
    database = resolve_target(database_url, settings.replace(database_url=database_url))
    work_dir = Path(tempfile.mkdtemp(prefix="mcp-authdb-server-bench-"))
    try:
        return measure_servers(args, database_url, database, work_dir)
    finally:
        if args.logs:
            logs = Path(args.logs)
            logs.mkdir(parents=True, exist_ok=True)
            for log in work_dir.glob("*.log"):
                shutil.copy(log, logs / log.name)
        shutil.rmtree(work_dir, ignore_errors=True)
        if admin is not None:
            try:
                pool_benchmark.drop_database(admin, args.database)
            except Exception as exc:
                print(
                    f"could not drop the scratch database {args.database}: {exc}; "
                    "drop it with DROP DATABASE ... WITH (FORCE)",
                    file=sys.stderr,
                )


def measure_servers(
    args: argparse.Namespace,
    database_url: str,
    database: ConnectionTarget,
    work_dir: Path,
) -> list[str]:
    auth_port, bare_port = free_port(), free_port()
    public_url = f"http://{HOST}:{auth_port}"
    base_env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_SERVER_VARIABLE_PREFIXES) and name != "DATABASE_URL"
    }
    bare = ServerProcess(
        "bare",
        [sys.executable, __file__, BARE_SERVER_COMMAND, "--port", str(bare_port)],
        base_env,
        bare_port,
        work_dir / "bare.log",
    )
    rows_before = count_logged_calls(database)
    scans_before = count_session_scans(database)

    with contextlib.ExitStack() as servers:
        with upstream_stand_in(public_url + "/oauth/callback") as upstream_env:
            auth_env = {
                **base_env,
                "DATABASE_URL": database_url,
                "MCP_AUTHDB_PUBLIC_URL": public_url + MCP_PATH,
                "MCP_AUTHDB_TOKEN_KEYS": "k1:" + secrets.token_urlsafe(32),
                "DB_ENCRYPTION_KEY": secrets.token_hex(32),
                **upstream_env,
            }
            auth = ServerProcess(
                "auth",
                [
                    sys.executable,
                    "-m",
                    "mcp_authdb",
                    "serve",
                    "--port",
                    str(auth_port),
                ],
                auth_env,
                auth_port,
                work_dir / "auth.log",
            )
            servers.callback(stop_server, bare)
            servers.callback(stop_server, auth)
            progress("starting the auth server (migrations) and the bare server")
            auth.start(is_healthy)
            bare.start(answers_tool_call)
            progress("signing in through the SDK's OAuth client")
            access_token = asyncio.run(sign_in(auth.base_url))
        progress("signed in; the upstream stand-in is stopped")

        targets = [
            Target("bare", bare, request_headers(None)),
            Target("auth", auth, request_headers(access_token)),
        ]
        windows = measure_rounds(targets, args)
        profile_lines: list[str] = []
        profiled: list[Window] = []
        if args.py_spy:
            profile_lines, profiled = profile_servers(targets, args)
        # The sign-in called the tool once.
        auth_calls = 1 + sum(
            window.calls_sent
            for window in [*windows, *profiled]
            if window.server == "auth"
        )
        exit_code = auth.stop()
        if exit_code != 0:
            raise BenchmarkError(
                f"the auth server exited with {exit_code} after SIGTERM:\n"
                f"{auth.output()}"
            )
        bare.stop()

    rows = count_logged_calls(database) - rows_before
    scans = count_session_scans(database) - scans_before
    return [
        *summarize_rounds(windows),
        *summarize_medians(windows, args),
        *summarize_checks(auth_calls, rows, scans),
        *profile_lines,
    ]


def is_healthy(base_url: str) -> bool:
    response = httpx2.get(base_url + "/health", timeout=1.0, trust_env=False)
    return response.status_code == 200


def answers_tool_call(base_url: str) -> bool:
    response = httpx2.post(
        base_url + MCP_PATH,
        content=call_body(0),
        headers=request_headers(None),
        timeout=1.0,
        trust_env=False,
    )
    check_response("bare", response)
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def stop_server(server: ServerProcess) -> None:
    server.stop()


@contextlib.contextmanager
def upstream_stand_in(redirect_uri: str) -> Iterator[dict[str, str]]:
    """Run the tests' upstream stand-in and yield the variables that point at it."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    # Imported by name, because tests/ is not a package that mypy can resolve
    # from here.
    upstream_module = importlib.import_module("upstream_server")
    with upstream_module.upstream_server(
        users={USER_ID: SUBSCRIPTION_LEVEL}, access_lifetime=3600
    ) as upstream:
        upstream.redirect_uri = redirect_uri
        env: dict[str, str] = upstream.env()
        yield env


class MemoryStorage:
    """The SDK's TokenStorage, kept in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


async def sign_in(base_url: str) -> str:
    """Sign in through the SDK client, call the tool once, return the access token.

    The browser step follows the redirects from /authorize to the consent page,
    approves there, goes on to the stand-in, which approves the user at once,
    and back to the client's redirect URI.
    """
    redirected: list[str] = []

    async def redirect_handler(authorization_url: str) -> None:
        url = authorization_url
        async with httpx2.AsyncClient(timeout=10.0, trust_env=False) as http:
            for _ in range(10):
                response = await http.get(url)
                if response.status_code == 200 and urlsplit(url).path == CONSENT_PATH:
                    # Approve. The client keeps its cookies for the callback.
                    form = {
                        name: html.unescape(value)
                        for name, value in HIDDEN_INPUT.findall(response.text)
                    }
                    response = await http.post(
                        urljoin(url, CONSENT_PATH), data={**form, "decision": "approve"}
                    )
                if response.status_code not in (302, 303, 307):
                    raise BenchmarkError(
                        f"the sign-in stopped at {url} with HTTP "
                        f"{response.status_code}: {response.text[:300]}"
                    )
                url = urljoin(url, response.headers["location"])
                if url.startswith(CLIENT_REDIRECT_URI):
                    redirected.append(url)
                    return
        raise BenchmarkError("the sign-in never redirected to the client")

    async def callback_handler() -> AuthorizationCodeResult:
        query = dict(parse_qsl(urlsplit(redirected.pop()).query))
        if "error" in query:
            raise BenchmarkError(f"the sign-in failed: {query}")
        return AuthorizationCodeResult(
            code=query["code"], state=query.get("state"), iss=query.get("iss")
        )

    metadata = OAuthClientMetadata.model_validate(
        {
            "client_name": "server benchmark",
            "redirect_uris": [CLIENT_REDIRECT_URI],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_post",
        }
    )
    storage = MemoryStorage()
    mcp_url = base_url + MCP_PATH
    auth = OAuthClientProvider(
        mcp_url,
        metadata,
        storage,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )
    async with (
        httpx2.AsyncClient(auth=auth, timeout=30.0, trust_env=False) as http,
        Client(streamable_http_client(mcp_url, http_client=http)) as client,
    ):
        result = await client.call_tool(TOOL, {})
    if result.is_error or result.structured_content is None:
        raise BenchmarkError(f"{TOOL} after the sign-in failed: {result}")
    if result.structured_content.get("user_id") != USER_ID:
        raise BenchmarkError(f"{TOOL} returned {result.structured_content}")
    if storage.tokens is None:
        raise BenchmarkError("the SDK client stored no token after the sign-in")
    return storage.tokens.access_token


def count_logged_calls(database: ConnectionTarget) -> int:
    with connect(database) as conn:
        exists = conn.execute("SELECT to_regclass('request_logs')").fetchone()
        if exists is None or exists[0] is None:
            return 0
        row = conn.execute(
            "SELECT count(*) FROM request_logs WHERE method = %s", (TOOL,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def count_session_scans(database: ConnectionTarget) -> int:
    """Return the scans of user_sessions so far (0 before the migrations).

    The statistics of a backend reach these counters when its transaction
    ends, at the latest when it exits, so read them after the server stopped.
    """
    query = """
        SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0)
        FROM pg_stat_user_tables WHERE relname = 'user_sessions'
    """
    with connect(database) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(query).fetchone()
    return 0 if row is None else int(row[0])


# The load generator.


def request_headers(access_token: str | None) -> dict[str, str]:
    """Return the headers of the SDK client's tools/call POST."""
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": PROTOCOL_VERSION,
        "mcp-method": "tools/call",
        "mcp-name": TOOL,
    }
    if access_token is not None:
        headers["authorization"] = f"Bearer {access_token}"
    return headers


def call_body(request_id: int) -> bytes:
    """Return the SDK client's tools/call request for the tool, as JSON."""
    message = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {
            "name": TOOL,
            "arguments": {},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": PROTOCOL_VERSION,
                "io.modelcontextprotocol/clientInfo": {
                    "name": "mcp",
                    "version": "0.1.0",
                },
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }
    return json.dumps(message, separators=(",", ":")).encode()


def check_response(server: str, response: httpx2.Response) -> None:
    """Raise BenchmarkError unless ``response`` is a successful tool result."""
    if response.status_code != 200:
        raise BenchmarkError(
            f"the {server} server returned HTTP {response.status_code}: "
            f"{response.text[:300]}"
        )
    result = response.json().get("result")
    if not isinstance(result, dict) or result.get("isError") is True:
        raise BenchmarkError(
            f"the {server} server returned no tool result: {response.text[:300]}"
        )
    content = result.get("structuredContent")
    if not isinstance(content, dict) or content.get("user_id") != USER_ID:
        raise BenchmarkError(
            f"the {server} server's result does not name {USER_ID}: "
            f"{response.text[:300]}"
        )


async def run_window(
    target: Target, clients: int, warm_up_s: float, duration_s: float
) -> tuple[int, float, list[int], float, float, int, int]:
    """Drive ``target`` with ``clients`` clients for one window.

    Returns the calls completed in the measured part, its length in seconds,
    their latencies in nanoseconds, the server's and this process's CPU
    seconds in it, every call completed, and the size of the last response
    body in bytes.
    """
    url = target.process.base_url + MCP_PATH
    window: dict[str, int] = {}
    stop = asyncio.Event()
    latencies: list[int] = []
    sent = 0
    response_bytes = 0

    async def client(number: int) -> None:
        nonlocal sent, response_bytes
        request_ids = itertools.count(number * 1_000_000_000)
        async with httpx2.AsyncClient(
            headers=target.headers, timeout=REQUEST_TIMEOUT_S, trust_env=False
        ) as http:
            while not stop.is_set():
                body = call_body(next(request_ids))
                began = time.perf_counter_ns()
                response = await http.post(url, content=body)
                ended = time.perf_counter_ns()
                check_response(target.name, response)
                sent += 1
                response_bytes = len(response.content)
                started_inside = "start" in window and began >= window["start"]
                if started_inside and ended <= window.get("end", ended):
                    latencies.append(ended - began)

    tasks = [asyncio.create_task(client(number)) for number in range(clients)]
    try:
        await asyncio.sleep(warm_up_s)
        server_cpu = target.process.cpu_seconds()
        client_cpu = time.process_time()
        window["start"] = time.perf_counter_ns()
        await asyncio.sleep(duration_s)
        window["end"] = time.perf_counter_ns()
        server_cpu = target.process.cpu_seconds() - server_cpu
        client_cpu = time.process_time() - client_cpu
        stop.set()
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await asyncio.gather(*tasks)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed_s = (window["end"] - window["start"]) / 1e9
    return (
        len(latencies),
        elapsed_s,
        latencies,
        server_cpu,
        client_cpu,
        sent,
        response_bytes,
    )


def measure_window(
    target: Target, clients: int, round_number: int, args: argparse.Namespace
) -> Window:
    calls, elapsed_s, latencies, server_cpu, client_cpu, sent, size = asyncio.run(
        run_window(target, clients, args.warm_up, args.duration)
    )
    window = Window(
        server=target.name,
        clients=clients,
        round_number=round_number,
        calls=calls,
        elapsed_s=elapsed_s,
        latencies_ns=latencies,
        server_cpu_s=server_cpu,
        client_cpu_s=client_cpu,
        calls_sent=sent,
        response_bytes=size,
    )
    if not calls:
        raise BenchmarkError(
            f"no call to the {target.name} server completed in a window of "
            f"{args.duration:g} s"
        )
    progress(
        f"round {round_number + 1}, {clients} clients, {target.name}: "
        f"{window.rate:,.0f} calls/s, p50 {window.percentile(0.5):.2f} ms, "
        f"p99 {window.percentile(0.99):.2f} ms, server CPU "
        f"{window.server_cpu_us_per_call:,.0f} us/call"
    )
    return window


def measure_rounds(targets: list[Target], args: argparse.Namespace) -> list[Window]:
    """Measure every client count on both servers in each round.

    The order of the two servers alternates from one pair of windows to the
    next, so that neither always runs first.
    """
    windows = []
    flips = itertools.count()
    for round_number in range(args.rounds):
        for clients in args.clients:
            ordered = targets if next(flips) % 2 == 0 else targets[::-1]
            for target in ordered:
                windows.append(measure_window(target, clients, round_number, args))
    return windows


# Profiling.


def local_py_spy() -> Path:
    return Path(sys.executable).parent / "py-spy"


def profile_servers(
    targets: list[Target], args: argparse.Namespace
) -> tuple[list[str], list[Window]]:
    """Profile one window of each server with py-spy.

    Returns the report's lines and the profiled windows.
    """
    output_dir = Path(args.py_spy)
    output_dir.mkdir(parents=True, exist_ok=True)
    py_spy = str(local_py_spy()) if local_py_spy().exists() else "py-spy"
    profiled: dict[str, tuple[Path, Window]] = {}
    for target in targets:
        stacks = output_dir / f"{target.name}.txt"
        seconds = max(1, math.ceil(args.warm_up + args.duration))
        recorder = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(target.process.pid),
                "--rate",
                str(PY_SPY_RATE_HZ),
                "--duration",
                str(seconds),
                "--format",
                "raw",
                "--gil",
                "--output",
                str(stacks),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        progress(f"profiling the {target.name} server with py-spy")
        window = measure_window(target, args.profile_clients, -1, args)
        try:
            _, errors = recorder.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            raise BenchmarkError("py-spy did not finish its recording") from None
        if recorder.returncode != 0 or not stacks.exists():
            raise BenchmarkError(
                f"py-spy failed with {recorder.returncode}: {errors.decode()[-500:]}"
            )
        profiled[target.name] = (stacks, window)
    windows = [window for _, window in profiled.values()]
    return summarize_profile(profiled, args), windows


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    """Read py-spy's collapsed stacks: frames from the root to the leaf, count."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdecimal():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def count_part(
    stacks: list[tuple[list[str], int]], include: str, exclude: str | None
) -> int:
    """Count the samples with a frame matching ``include``.

    A sample whose frames below the innermost such frame match ``exclude``
    does not count.
    """
    included = re.compile(include)
    excluded = None if exclude is None else re.compile(exclude)
    count = 0
    for frames, samples in stacks:
        matches = [i for i, frame in enumerate(frames) if included.search(frame)]
        if not matches:
            continue
        below = frames[matches[-1] + 1 :]
        if excluded is not None and any(excluded.search(f) for f in below):
            continue
        count += samples
    return count


def summarize_profile(
    profiled: dict[str, tuple[Path, Window]], args: argparse.Namespace
) -> list[str]:
    lines = [
        "",
        f"## Profile: py-spy at {PY_SPY_RATE_HZ} Hz with --gil, one window per "
        f"server, {args.profile_clients} clients",
        "",
        "Only samples of the thread holding the GIL count, so system calls and "
        "waits are left out. Time per call is samples / rate / calls in the "
        "recording. The servers run slower while py-spy samples them.",
        "",
    ]
    stacks_of = {name: read_stacks(path) for name, (path, _) in profiled.items()}

    def us_per_call(name: str, samples: int) -> float:
        calls = profiled[name][1].calls_sent
        return 1e6 * samples / PY_SPY_RATE_HZ / calls if calls else math.nan

    for name, (path, window) in profiled.items():
        total = sum(count for _, count in stacks_of[name])
        lines.append(
            f"- {name}: {total:,} samples in {path}, {window.calls_sent:,} calls, "
            f"{us_per_call(name, total):,.0f} us with the GIL per call; "
            f"{window.server_cpu_us_per_call:,.0f} us server CPU per call"
        )
    auth_total = sum(count for _, count in stacks_of["auth"]) or 1
    lines += [
        "",
        "| part | share of auth samples | auth us/call | bare us/call |",
        "|---|---:|---:|---:|",
    ]
    for label, include, exclude in PROFILE_PARTS:
        auth = count_part(stacks_of["auth"], include, exclude)
        bare = count_part(stacks_of["bare"], include, exclude)
        lines.append(
            f"| {label} | {100 * auth / auth_total:.1f} % | "
            f"{us_per_call('auth', auth):,.0f} | {us_per_call('bare', bare):,.0f} |"
        )
    lines += ["", "Leaf functions with the most samples (self time), auth server:"]
    leaves: collections.Counter[str] = collections.Counter()
    for frames, samples in stacks_of["auth"]:
        leaves[frames[-1]] += samples
    for frame, count in leaves.most_common(12):
        lines.append(f"- {100 * count / auth_total:.1f} % {frame}")
    return lines


# The report.


def summarize_rounds(windows: list[Window]) -> list[str]:
    lines = [
        "",
        "## Every window",
        "",
        "| round | clients | server | calls/s | p50 ms | p99 ms | server CPU us/call "
        "| load generator CPU us/call |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for window in sorted(windows, key=lambda w: (w.clients, w.round_number, w.server)):
        lines.append(
            f"| {window.round_number + 1} | {window.clients} | {window.server} | "
            f"{window.rate:,.0f} | {window.percentile(0.5):.2f} | "
            f"{window.percentile(0.99):.2f} | {window.server_cpu_us_per_call:,.0f} | "
            f"{window.client_cpu_us_per_call:,.0f} |"
        )
    return lines


def paired(windows: list[Window], clients: int) -> list[tuple[Window, Window]]:
    """Return the (bare, auth) windows of each round at ``clients`` clients."""
    by_round: dict[int, dict[str, Window]] = collections.defaultdict(dict)
    for window in windows:
        if window.clients == clients:
            by_round[window.round_number][window.server] = window
    return [(pair["bare"], pair["auth"]) for _, pair in sorted(by_round.items())]


def spread(values: Sequence[float], digits: int) -> str:
    return (
        f"{statistics.median(values):,.{digits}f} "
        f"[{min(values):,.{digits}f}-{max(values):,.{digits}f}]"
    )


def summarize_medians(windows: list[Window], args: argparse.Namespace) -> list[str]:
    lines = [
        "",
        f"## Medians over {args.rounds} rounds, [lowest-highest]",
        "",
        "Ratio, added p50 and added p99 are the medians of the per-round values "
        "(auth window minus bare window of the same round).",
        "",
        "| clients | bare calls/s | auth calls/s | auth/bare | bare p50 ms | "
        "auth p50 ms | added p50 ms | bare p99 ms | auth p99 ms | added p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for clients in args.clients:
        pairs = paired(windows, clients)
        ratios = [auth.rate / bare.rate for bare, auth in pairs]
        added_p50 = [
            auth.percentile(0.5) - bare.percentile(0.5) for bare, auth in pairs
        ]
        added_p99 = [
            auth.percentile(0.99) - bare.percentile(0.99) for bare, auth in pairs
        ]
        lines.append(
            f"| {clients} | {spread([b.rate for b, _ in pairs], 0)} | "
            f"{spread([a.rate for _, a in pairs], 0)} | "
            f"{statistics.median(ratios):.2f}x "
            f"[{min(ratios):.2f}-{max(ratios):.2f}] | "
            f"{statistics.median(b.percentile(0.5) for b, _ in pairs):.2f} | "
            f"{statistics.median(a.percentile(0.5) for _, a in pairs):.2f} | "
            f"{spread(added_p50, 2)} | "
            f"{statistics.median(b.percentile(0.99) for b, _ in pairs):.2f} | "
            f"{statistics.median(a.percentile(0.99) for _, a in pairs):.2f} | "
            f"{spread(added_p99, 2)} |"
        )
        met = "met" if statistics.median(ratios) >= RATE_AIM else "missed"
        verdicts.append(f"{clients} clients: {met}")
    lines += [
        "",
        f"aim, auth at least {RATE_AIM:g}x the bare rate: {'; '.join(verdicts)}",
        "",
        "Server CPU per call, medians over the rounds. Their ratio bare/auth "
        "estimates the rate ratio when the server's CPU is the limit, with the "
        "clients on other cores.",
        "",
        "| clients | bare server CPU us/call | auth server CPU us/call | "
        "added server CPU us/call | bare/auth | response bytes bare / auth |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for clients in args.clients:
        pairs = paired(windows, clients)
        bare_cpu = statistics.median(b.server_cpu_us_per_call for b, _ in pairs)
        auth_cpu = statistics.median(a.server_cpu_us_per_call for _, a in pairs)
        lines.append(
            f"| {clients} | {bare_cpu:,.0f} | {auth_cpu:,.0f} | "
            f"{auth_cpu - bare_cpu:,.0f} | {bare_cpu / auth_cpu:.2f}x | "
            f"{pairs[0][0].response_bytes} / "
            f"{pairs[0][1].response_bytes} |"
        )
    return lines


def summarize_checks(auth_calls: int, rows: int, scans: int) -> list[str]:
    """Report the request_logs rows written and the session lookups made."""
    verdict = (
        "every authenticated call was logged"
        if rows == auth_calls
        else f"MISMATCH: {auth_calls - rows:+,} calls without a row"
    )
    cached = (
        "bearer validation was served from the token cache"
        if scans * 10 < auth_calls
        else "bearer validation was NOT served from the token cache"
    )
    return [
        "",
        "## Checks on the auth server, after its stop with SIGTERM",
        "",
        f"- authenticated {TOOL} calls completed: {auth_calls:,} (the sign-in's "
        "and every window's, warm-up and drain included); request_logs rows of "
        f"{TOOL} written: {rows:,}: {verdict}",
        f"- scans of user_sessions during the run: {scans:,}, so {cached} "
        "(MCP_AUTHDB_TOKEN_CACHE_TTL unset: the default ttl of 5 s)",
    ]


if __name__ == "__main__":
    sys.exit(main())
