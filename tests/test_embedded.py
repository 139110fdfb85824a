"""The embedded development server: start on demand, sharing, stop, folder modes.

These tests ignore DATABASE_URL, because the command line uses the embedded
server exactly when it is unset.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from mcp_authdb.db.embedded import EmbeddedServer, _process_start_time
from mcp_authdb.db.migrations import ADVISORY_LOCK_KEY
from mcp_authdb.sql import load_migrations

pytestmark = pytest.mark.slow


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A folder of the test's own, which an unprivileged user may enter."""
    folder = Path(tempfile.mkdtemp(prefix="mcp-authdb-embedded-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cli_env(data_dir: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DATABASE_URL" and not key.startswith(("DB_", "PG"))
    }
    env["MCP_AUTHDB_DATA_DIR"] = str(data_dir)
    return env


def run_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_authdb", *args],
        env=cli_env(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )


def server_runs(data_dir: Path) -> bool:
    return (data_dir / "pgdata" / "postmaster.pid").exists()


def modes_of(path: Path) -> dict[str, tuple[int, int, int]]:
    """Return mode, owner and group of ``path`` and each of its parents."""
    return {
        str(folder): (
            stat.S_IMODE(folder.stat().st_mode),
            folder.stat().st_uid,
            folder.stat().st_gid,
        )
        for folder in [path, *path.parents]
        if folder.exists()
    }


def test_main_job_on_fresh_folder(base_dir: Path) -> None:
    data_dir = base_dir / "data"

    migrated = run_cli(data_dir, "migrate")
    verified = run_cli(data_dir, "verify")

    assert migrated.returncode == 0, migrated.stderr
    assert str(data_dir) in migrated.stderr
    assert "started" in migrated.stderr
    assert migrated.stderr.count("SSL does not apply") == 1
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "matches the expected schema" in verified.stdout
    assert not server_runs(data_dir)
    assert list((data_dir / "leases").iterdir()) == []


def test_running_server_is_reused(base_dir: Path) -> None:
    data_dir = base_dir / "data"
    server = EmbeddedServer(data_dir)
    server.acquire()
    try:
        result = run_cli(data_dir, "status", "--json")
        still_running = server_runs(data_dir)
        with psycopg.connect(server.conninfo) as conn:
            answer = conn.execute("SELECT 1").fetchone()
    finally:
        server.release()

    assert result.returncode == 0, result.stderr
    assert "already running" in result.stderr
    assert json.loads(result.stdout)["current"] is False
    assert still_running
    assert answer == (1,)
    assert not server_runs(data_dir)


def test_dead_user_does_not_keep_server(base_dir: Path) -> None:
    data_dir = base_dir / "data"
    holder_code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from mcp_authdb.db.embedded import EmbeddedServer
        EmbeddedServer(Path({str(data_dir)!r})).acquire()
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code],
        env=cli_env(data_dir),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    left_running = server_runs(data_dir)

    with EmbeddedServer(data_dir) as server, psycopg.connect(server.conninfo) as conn:
        conn.execute("SELECT 1")

    assert left_running
    assert not server_runs(data_dir)
    assert list((data_dir / "leases").iterdir()) == []


def test_folder_modes_unchanged(base_dir: Path) -> None:
    parent = base_dir / "home"
    parent.mkdir(mode=0o711)
    parent.chmod(0o711)
    data_dir = parent / "data"
    # The command's own temporary folder: anything it would leave in the
    # shared one, such as a lock file, shows up here.
    temp_dir = base_dir / "tmp"
    temp_dir.mkdir()
    modes_before = modes_of(parent)

    result = subprocess.run(
        [sys.executable, "-m", "mcp_authdb", "migrate"],
        env={**cli_env(data_dir), "TMPDIR": str(temp_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert modes_of(parent) == modes_before
    assert list(temp_dir.iterdir()) == []


def test_root_rejects_unreachable_folder(base_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    private = base_dir / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    data_dir = private / "data"
    modes_before = modes_of(private)

    result = run_cli(data_dir, "migrate")

    assert result.returncode == 2
    assert "cannot enter" in result.stderr
    assert str(private) in result.stderr
    assert modes_of(private) == modes_before
    assert not data_dir.exists()


def test_concurrent_commands_share_one_server(base_dir: Path) -> None:
    data_dir = base_dir / "data"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "mcp_authdb", "migrate", "--json"],
            env=cli_env(data_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    outputs = [process.communicate(timeout=180) for process in processes]

    for process, (_stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    applied = sorted(
        migration["version"]
        for stdout, _ in outputs
        for migration in json.loads(stdout)["applied"]
    )
    assert applied == [m.version for m in load_migrations()]
    assert not server_runs(data_dir)


def test_data_folder_of_other_user_is_rejected(base_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can make a folder owned by another user")
    data_dir = base_dir / "data"
    data_dir.mkdir()
    os.chown(data_dir, 65534, 65534)

    result = run_cli(data_dir, "status")

    assert result.returncode == 2
    assert "belongs to user id 65534" in result.stderr


def test_leftover_partial_init_is_redone(base_dir: Path) -> None:
    # What a process killed during initdb leaves behind.
    data_dir = base_dir / "data"
    data_dir.mkdir(mode=0o755)
    (data_dir / "pgdata.partial").mkdir()
    (data_dir / "pgdata.partial" / "PG_VERSION").write_text("18\n")

    result = run_cli(data_dir, "migrate")

    assert result.returncode == 0, result.stderr
    assert (data_dir / "pgdata" / "PG_VERSION").is_file()
    assert not (data_dir / "pgdata.partial").exists()


def test_damaged_cluster_names_the_fix(base_dir: Path) -> None:
    data_dir = base_dir / "data"
    with (
        EmbeddedServer(data_dir) as server,
        psycopg.connect(server.conninfo, autocommit=True) as conn,
    ):
        conn.execute("DROP DATABASE postgres")

    result = run_cli(data_dir, "status")

    assert result.returncode == 2
    assert "does not accept connections" in result.stderr
    assert f"delete {data_dir}" in result.stderr
    assert not server_runs(data_dir)


def test_sigterm_releases_the_server(base_dir: Path) -> None:
    data_dir = base_dir / "data"
    with EmbeddedServer(data_dir) as server:
        with psycopg.connect(server.conninfo, autocommit=True) as holder:
            # The migrator waits for this lock, so it is busy when signalled.
            holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
            migrator = subprocess.Popen(
                [sys.executable, "-m", "mcp_authdb", "migrate"],
                env=cli_env(data_dir),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert migrator.stderr is not None
            waited = ""
            while "waiting" not in waited:
                line = migrator.stderr.readline()
                assert line, "the migrator ended before waiting for the lock"
                waited += line
            migrator.send_signal(signal.SIGTERM)
            migrator.communicate(timeout=60)
        leases = sorted(path.name for path in (data_dir / "leases").iterdir())

    assert migrator.returncode == 128 + signal.SIGTERM
    assert len(leases) == 1
    assert leases[0].startswith(f"{os.getpid()}-{_process_start_time(os.getpid())}-")
    assert not server_runs(data_dir)


def test_embedded_user_must_exist(base_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    name = "mcp-authdb-no-such-user"

    result = subprocess.run(
        [sys.executable, "-m", "mcp_authdb", "status"],
        env={**cli_env(base_dir / "data"), "MCP_AUTHDB_EMBEDDED_USER": name},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    assert f"MCP_AUTHDB_EMBEDDED_USER={name!r} names no existing user" in (
        result.stderr
    )
    assert subprocess.run(["id", name], capture_output=True).returncode != 0


def test_long_socket_path_creates_nothing(base_dir: Path) -> None:
    data_dir = base_dir / ("d" * 100) / "data"

    result = run_cli(data_dir, "status")

    assert result.returncode == 2
    assert "longer than the 107 bytes" in result.stderr
    assert not (base_dir / ("d" * 100)).exists()


def test_two_servers_in_one_process(base_dir: Path) -> None:
    data_dir = base_dir / "data"
    first = EmbeddedServer(data_dir)
    second = EmbeddedServer(data_dir)
    first.acquire()
    second.acquire()
    try:
        first.release()
        with psycopg.connect(second.conninfo) as conn:
            answer = conn.execute("SELECT 1").fetchone()
    finally:
        second.release()

    assert answer == (1,)
    assert not server_runs(data_dir)


def test_settings_survive_plain_start(base_dir: Path) -> None:
    data_dir = base_dir / "data"
    with EmbeddedServer(data_dir) as server:
        config = (server.cluster.pgdata / "mcp_authdb.conf").read_text()
        hba = (server.cluster.pgdata / "pg_hba.conf").read_text()

    assert "listen_addresses = ''" in config
    assert "unix_socket_permissions = 0700" in config
    host_lines = [line.split() for line in hba.splitlines() if line.startswith("host")]
    assert host_lines
    assert {fields[-1] for fields in host_lines} == {"reject"}


def test_data_folder_with_space_and_quote(base_dir: Path) -> None:
    data_dir = base_dir / "it's a folder" / "data"

    result = run_cli(data_dir, "migrate")

    assert result.returncode == 0, result.stderr
    assert not server_runs(data_dir)


def test_missing_include_line_is_restored(base_dir: Path) -> None:
    data_dir = base_dir / "data"
    with EmbeddedServer(data_dir) as server:
        main_config = server.cluster.pgdata / "postgresql.conf"
    lines = main_config.read_text().splitlines()
    without_include = [
        line for line in lines if not line.startswith("include_if_exists")
    ]
    main_config.write_text("\n".join(without_include) + "\n")

    result = run_cli(data_dir, "status")

    assert result.returncode == 0, result.stderr
    assert "include_if_exists = 'mcp_authdb.conf'" in main_config.read_text()
