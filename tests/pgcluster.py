"""Helpers of the connection tests: clusters on 127.0.0.1, error chains.

The embedded server listens on a Unix socket only and its binaries have no
SSL, so these tests start clusters of their own from the machine's PostgreSQL
(``/usr/lib/postgresql/<N>/bin``). Where none is installed, the tests that
need one are skipped, or fail when the environment variable CI is set. Each
cluster has a role ``app`` with a SCRAM password and accepts TCP connections
from 127.0.0.1 only.

Test modules load the fixtures with ``pytest_plugins = ["pgcluster"]`` and
also import helpers by name, which imports this module before pytest can
rewrite its asserts. It has none, and the marker PYTEST_DONT_REWRITE stops
pytest from warning about that.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import psycopg
import pytest
import trustme
from psycopg import sql
from psycopg.conninfo import make_conninfo

from mcp_authdb.db.embedded import (
    DEFAULT_SERVER_USER,
    LocalCluster,
    ServerUser,
    ensure_system_user,
)

MACHINE_BINARIES_GLOB = "/usr/lib/postgresql/*/bin"
ROLE = "app"
DATABASE = "postgres"


def machine_binaries() -> Path | None:
    """Return the ``bin`` folder of the newest machine PostgreSQL, or None."""
    found = []
    for bin_dir in Path("/").glob(MACHINE_BINARIES_GLOB.lstrip("/")):
        version = re.fullmatch(r"\d+", bin_dir.parent.name)
        if version and (bin_dir / "postgres").is_file():
            found.append((int(version.group()), bin_dir))
    return max(found)[1] if found else None


def error_text(exc: BaseException) -> str:
    """Return ``str`` and ``repr`` of ``exc`` and of each error chained to it.

    Both ``__cause__`` and ``__context__`` are followed, the latter even when
    ``raise ... from None`` hides it from tracebacks.
    """
    parts = []
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        parts += [str(current), repr(current)]
        pending += [current.__cause__, current.__context__]
    return "\n".join(parts)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def new_password() -> str:
    """Return a random password with characters that URLs must percent-encode."""
    return f"pw-{secrets.token_hex(8)}/+@:"


@dataclasses.dataclass
class TcpCluster:
    """A running cluster of the tests, with the password of its role ``app``."""

    cluster: LocalCluster
    password: str

    @property
    def port(self) -> int:
        return self.cluster.port

    def url(self, *, password: str | None = None, **params: str) -> str:
        """Return a TCP URL for role ``app``, with ``params`` as query parameters."""
        secret = quote(self.password if password is None else password, safe="")
        query = f"?{urlencode(params)}" if params else ""
        return f"postgresql://{ROLE}:{secret}@127.0.0.1:{self.port}/{DATABASE}{query}"

    def socket_conninfo(self, **params: str) -> str:
        """Return a Unix-socket conninfo for the superuser, which the socket trusts."""
        return make_conninfo(self.cluster.conninfo(DATABASE), **params)


@dataclasses.dataclass
class ServerCertificates:
    """A certificate authority of the test and the server certificate it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def server_user() -> ServerUser:
    """Return the user to run clusters as: the caller, or a system user for root."""
    if os.geteuid() != 0:
        return ServerUser.current()
    name = os.environ.get("MCP_AUTHDB_EMBEDDED_USER") or DEFAULT_SERVER_USER
    return ensure_system_user(name)


def write_certificates(
    folder: Path, ca: trustme.CA, user: ServerUser
) -> ServerCertificates:
    """Write ``ca`` and a server certificate for 127.0.0.1 and localhost.

    The server's files belong to ``user`` and the key has mode 0600, because
    PostgreSQL rejects a key that other users can read.
    """
    folder.mkdir(mode=0o700)
    files = ServerCertificates(
        ca_file=folder / "ca.crt",
        cert_file=folder / "server.crt",
        key_file=folder / "server.key",
    )
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(files.ca_file))
    files.cert_file.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files.key_file))
    files.key_file.chmod(0o600)
    if os.geteuid() == 0:
        for path in (folder, files.cert_file, files.key_file):
            os.chown(path, user.uid, user.gid)
    return files


def start_cluster(
    folder: Path, bin_dir: Path, certificates: ServerCertificates | None = None
) -> TcpCluster:
    """Create and start a cluster in ``folder`` listening on 127.0.0.1.

    With ``certificates`` the server has SSL on and accepts TCP connections
    over SSL only, otherwise it has SSL off.
    """
    folder.mkdir()
    folder.chmod(0o755)
    user = server_user()
    settings = {"listen_addresses": "'127.0.0.1'", "fsync": "off"}
    host_type = "host"
    if certificates is not None:
        host_type = "hostssl"
        settings |= {
            "ssl": "on",
            "ssl_cert_file": f"'{certificates.cert_file}'",
            "ssl_key_file": f"'{certificates.key_file}'",
        }
    cluster = LocalCluster(
        bin_dir,
        folder / "pgdata",
        folder / "run",
        user=user,
        port=free_port(),
        settings=settings,
    )
    cluster.init()

    # initdb trusts every connection. The TCP line requires the SCRAM password.
    (cluster.pgdata / "pg_hba.conf").write_text(
        f"local all all trust\n{host_type} all all 127.0.0.1/32 scram-sha-256\n"
    )
    cluster.start()

    password = new_password()
    try:
        with psycopg.connect(cluster.conninfo(DATABASE), autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(ROLE), sql.Literal(password)
                )
            )
    except BaseException:
        cluster.stop()
        raise
    return TcpCluster(cluster=cluster, password=password)


@pytest.fixture(scope="session")
def cluster_folder() -> Iterator[Path]:
    """A temporary folder that the clusters' server user may enter."""
    folder = Path(tempfile.mkdtemp(prefix="mcp-authdb-tcp-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_bin_dir() -> Path:
    bin_dir = machine_binaries()
    if bin_dir is None:
        message = (
            f"no PostgreSQL server binaries in {MACHINE_BINARIES_GLOB}; install "
            "PostgreSQL (for example the Debian package postgresql) to run the "
            "tests that need a server on TCP"
        )
        # CI installs PostgreSQL, so there a missing binary is a failure.
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return bin_dir


@pytest.fixture(scope="session")
def plain_cluster(cluster_folder: Path, pg_bin_dir: Path) -> Iterator[TcpCluster]:
    """A cluster on 127.0.0.1 with SSL off."""
    tcp = start_cluster(cluster_folder / "plain", pg_bin_dir)
    try:
        yield tcp
    finally:
        tcp.cluster.stop()


@pytest.fixture(scope="session")
def ssl_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_certificates(cluster_folder: Path, ssl_ca: trustme.CA) -> ServerCertificates:
    return write_certificates(cluster_folder / "ssl", ssl_ca, server_user())


@pytest.fixture(scope="session")
def ssl_cluster(
    cluster_folder: Path, pg_bin_dir: Path, server_certificates: ServerCertificates
) -> Iterator[TcpCluster]:
    """A cluster on 127.0.0.1 with SSL on, signed by ``ssl_ca``."""
    tcp = start_cluster(cluster_folder / "tls", pg_bin_dir, server_certificates)
    try:
        yield tcp
    finally:
        tcp.cluster.stop()
