"""`mcp-authdb serve` in a subprocess: start, migrate, serve, stop, and refuse."""

from __future__ import annotations

import json
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx2
import pytest

from upstream_server import UpstreamServer, upstream_server

from conftest import ScratchDatabase

START_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class ServeProcess:
    """A running ``python -m mcp_authdb serve --json`` and its output."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mcp_authdb", "serve", "--json", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._stdout_reader = threading.Thread(
            target=self._read, args=(self.process.stdout, self._lines), daemon=True
        )
        self._stdout_reader.start()
        self._stderr_reader = threading.Thread(
            target=self._collect, args=(self.process.stderr,), daemon=True
        )
        self._stderr_reader.start()

    @staticmethod
    def _read(stream: IO[str], lines: queue.Queue[str | None]) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    def _collect(self, stream: IO[str]) -> None:
        for line in stream:
            self._stderr.append(line)

    def announcement(self) -> dict[str, Any]:
        """Wait for the JSON object the server prints once it listens."""
        text = ""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"serve did not start in time; stderr:\n{self.stderr}"
                ) from None
            if line is None:
                raise AssertionError(f"serve ended before it listened:\n{self.stderr}")
            text += line
            if line.rstrip() == "}":
                announced: dict[str, Any] = json.loads(text)
                return announced

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.wait()

    def wait(self) -> int:
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        self._stdout_reader.join(timeout=5)
        self._stderr_reader.join(timeout=5)
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self.process.stdout.close()
        self.process.stderr.close()
        return code

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with upstream_server() as server:
        yield server


def serve_env(
    db: ScratchDatabase, upstream: UpstreamServer, **extra: str
) -> dict[str, str]:
    return db.env(
        **upstream.env(),
        MCP_AUTHDB_TOKEN_KEYS="k1:" + secrets.token_urlsafe(32),
        DB_ENCRYPTION_KEY=secrets.token_hex(32),
        **extra,
    )


def run_serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_authdb", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly(
    db: ScratchDatabase, upstream: UpstreamServer, signum: int
) -> None:
    port = free_port()
    server = ServeProcess(["--port", str(port)], serve_env(db, upstream))
    try:
        announced = server.announcement()
        health = httpx2.get(f"http://127.0.0.1:{port}/health", timeout=10)
        metadata = httpx2.get(
            f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp",
            timeout=10,
        )
    finally:
        code = server.stop(signum)

    assert announced == {
        "mcp_url": f"http://127.0.0.1:{port}/mcp",
        "issuer": f"http://127.0.0.1:{port}",
        "dev": False,
    }
    assert health.status_code == 200
    assert metadata.json()["resource"] == f"http://127.0.0.1:{port}/mcp"
    assert code == 0, server.stderr
    assert f"stopped after {signal.Signals(signum).name}" in server.stderr
    assert "Traceback" not in server.stderr


def test_serve_migrates_first(
    empty_db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    port = free_port()
    server = ServeProcess(["--port", str(port)], serve_env(empty_db, upstream))
    try:
        server.announcement()
        health = httpx2.get(f"http://127.0.0.1:{port}/health", timeout=10)
    finally:
        code = server.stop()

    assert health.status_code == 200, health.text
    assert code == 0
    assert "before serving" in server.stderr
    with empty_db.connect() as conn:
        row = conn.execute("SELECT to_regclass('oauth_clients')").fetchone()
    assert row is not None
    assert row[0] == "oauth_clients"


def test_replicas_start_together(
    empty_db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    ports = [free_port(), free_port()]
    env = serve_env(empty_db, upstream)
    servers = [ServeProcess(["--port", str(port)], env) for port in ports]
    try:
        for server in servers:
            server.announcement()
        health = [
            httpx2.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
            for port in ports
        ]
    finally:
        codes = [server.stop() for server in servers]

    assert health == [200, 200]
    assert codes == [0, 0], [server.stderr for server in servers]


def test_serve_dev_with_data_folder(db: ScratchDatabase, tmp_path: Path) -> None:
    port = free_port()
    env = db.env(MCP_AUTHDB_DATA_DIR=str(tmp_path))
    server = ServeProcess(["--dev", "--port", str(port)], env)
    try:
        announced = server.announcement()
        login = httpx2.get(f"http://127.0.0.1:{port}/dev/oauth/userinfo", timeout=10)
    finally:
        code = server.stop()

    assert announced["dev"] is True
    assert login.status_code == 401  # the route exists, and wants a token
    assert code == 0, server.stderr
    assert f"give your MCP client the URL http://127.0.0.1:{port}/mcp" in (
        server.stderr
    )
    assert (tmp_path / "encryption-key").is_file()
    assert (tmp_path / "token-keys").is_file()


def test_serve_dev_from_environment(db: ScratchDatabase, tmp_path: Path) -> None:
    env = db.env(MCP_AUTHDB_DATA_DIR=str(tmp_path), MCP_AUTHDB_DEV="1")

    result = run_serve("--host", "0.0.0.0", env=env)

    assert result.returncode == 2
    assert "--dev listens on loopback addresses only" in result.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_serve_dev_rejects_other_hosts(
    db: ScratchDatabase, tmp_path: Path, host: str
) -> None:
    env = db.env(MCP_AUTHDB_DATA_DIR=str(tmp_path))

    result = run_serve("--dev", "--host", host, env=env)

    assert result.returncode == 2
    assert "--dev listens on loopback addresses only" in result.stderr
    assert repr(host) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "encryption-key").exists()


def test_serve_dev_rejects_public_url(db: ScratchDatabase, tmp_path: Path) -> None:
    env = db.env(
        MCP_AUTHDB_DATA_DIR=str(tmp_path),
        MCP_AUTHDB_PUBLIC_URL="https://mcp.example.com/mcp",
    )

    result = run_serve("--dev", env=env)

    assert result.returncode == 2
    assert "--dev serves loopback URLs only" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_rejects_http_public_url(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    env = serve_env(db, upstream, MCP_AUTHDB_PUBLIC_URL="http://mcp.example.com/mcp")

    result = run_serve("--host", "0.0.0.0", env=env)

    assert result.returncode == 2
    assert "mcp-authdb: error: MCP_AUTHDB_PUBLIC_URL=" in result.stderr
    assert "plain http is allowed only on a loopback host" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_requires_encryption_key(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    env = serve_env(db, upstream)
    del env["DB_ENCRYPTION_KEY"]

    result = run_serve("--port", str(free_port()), env=env)

    assert result.returncode == 2
    assert "DB_ENCRYPTION_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_unreachable_database(
    db: ScratchDatabase, upstream: UpstreamServer
) -> None:
    # A port that was free a moment ago: nothing listens there.
    env = serve_env(
        db,
        upstream,
        DATABASE_URL=f"postgresql://u@127.0.0.1:{free_port()}/app?sslmode=require",
        DB_COMMAND_TIMEOUT="2000",
    )

    result = run_serve("--port", str(free_port()), env=env)

    assert result.returncode == 2
    assert "mcp-authdb: error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_port_in_use(db: ScratchDatabase, upstream: UpstreamServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = run_serve("--port", str(port), env=serve_env(db, upstream))

    assert result.returncode == 2
    assert f"could not listen on 127.0.0.1 port {port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_serve_rejects_bad_port(port: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mcp_authdb", "serve", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "--port" in result.stderr
