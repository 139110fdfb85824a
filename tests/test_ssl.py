"""SSL policy against real servers on 127.0.0.1, one with SSL on and one without.

The server certificate is signed by a CA made for the session with trustme.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mcp_authdb.db.connection import connect, resolve_target
from mcp_authdb.db.settings import Settings
from mcp_authdb.errors import ConnectionFailedError
from pgcluster import ServerCertificates, TcpCluster

pytest_plugins = ["pgcluster"]


@pytest.fixture(autouse=True)
def isolated_libpq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep libpq from ~/.postgresql files and PGSSL* variables of this machine.

    With a root.crt there, sslmode=require would also verify the certificate.
    """
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL"):
        monkeypatch.delenv(name, raising=False)


def backend_ssl(conn: psycopg.Connection[Any]) -> bool | None:
    """Return whether pg_stat_ssl shows SSL for this connection's backend."""
    row = conn.execute(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    ).fetchone()
    return None if row is None else bool(row[0])


def test_require_uses_ssl(ssl_cluster: TcpCluster) -> None:
    settings = Settings.from_env({"DATABASE_URL": ssl_cluster.url()})
    target = resolve_target(ssl_cluster.url(), settings)

    with connect(target) as conn:
        ssl = backend_ssl(conn)
        ssl_in_use = conn.pgconn.ssl_in_use

    assert settings.ssl_mode == "require"
    assert target.ssl_mode == "require"
    assert ssl is True
    assert ssl_in_use


def test_verify_full_right_ca(
    ssl_cluster: TcpCluster, server_certificates: ServerCertificates
) -> None:
    url = ssl_cluster.url(
        sslmode="verify-full", sslrootcert=str(server_certificates.ca_file)
    )

    with connect(resolve_target(url, Settings())) as conn:
        ssl = backend_ssl(conn)

    assert ssl is True


def test_verify_full_from_setting(
    ssl_cluster: TcpCluster, server_certificates: ServerCertificates
) -> None:
    url = ssl_cluster.url(sslrootcert=str(server_certificates.ca_file))
    target = resolve_target(url, Settings(ssl_mode="verify-full"))

    with connect(target) as conn:
        ssl = backend_ssl(conn)

    assert conninfo_to_dict(target.conninfo)["sslmode"] == "verify-full"
    assert ssl is True


def test_verify_full_wrong_ca(ssl_cluster: TcpCluster, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    url = ssl_cluster.url(sslmode="verify-full", sslrootcert=str(other_ca))

    with pytest.raises(ConnectionFailedError) as info:
        connect(resolve_target(url, Settings()))

    assert "certificate verify failed" in str(info.value)
    assert "set sslrootcert in DATABASE_URL" in str(info.value)
    assert f"127.0.0.1:{ssl_cluster.port}" in str(info.value)


def test_verify_full_wrong_name(
    ssl_cluster: TcpCluster, server_certificates: ServerCertificates
) -> None:
    # hostaddr makes libpq connect to 127.0.0.1 without resolving the host
    # name, which it still checks against the certificate.
    url = make_conninfo(
        ssl_cluster.url(
            sslmode="verify-full", sslrootcert=str(server_certificates.ca_file)
        ),
        host="wrong-name.invalid",
        hostaddr="127.0.0.1",
    )

    with pytest.raises(ConnectionFailedError) as info:
        connect(resolve_target(url, Settings()))

    assert 'does not match host name "wrong-name.invalid"' in str(info.value)
    assert "use a host name the certificate names" in str(info.value)


def test_verify_full_without_root_cert(ssl_cluster: TcpCluster) -> None:
    url = ssl_cluster.url(sslmode="verify-full")

    with pytest.raises(ConnectionFailedError) as info:
        connect(resolve_target(url, Settings()))

    assert "root certificate file" in str(info.value)
    assert "set sslrootcert in DATABASE_URL" in str(info.value)


def test_require_without_ssl_fails(plain_cluster: TcpCluster) -> None:
    target = resolve_target(plain_cluster.url(), Settings())

    with pytest.raises(ConnectionFailedError) as info:
        connect(target)

    assert "server does not support SSL" in str(info.value)
    assert "sslmode=require" in str(info.value)
    assert "lower DB_SSL_MODE" in str(info.value)


def test_socket_skips_ssl(ssl_cluster: TcpCluster) -> None:
    # The server has SSL on, but libpq never uses SSL over a Unix socket.
    target = resolve_target(
        ssl_cluster.socket_conninfo(), Settings(ssl_mode="verify-full")
    )

    with connect(target) as conn:
        ssl = backend_ssl(conn)

    assert target.local_socket
    assert ssl is False
