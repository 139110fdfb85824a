"""The database layer: settings, connections, the embedded server, migrations."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mcp_authdb.db.connection import ConnectionTarget, connect, resolve_target
from mcp_authdb.db.embedded import EmbeddedServer
from mcp_authdb.db.settings import Settings

__all__ = ["ConnectionTarget", "Settings", "connect", "open_target", "resolve_target"]


@contextlib.contextmanager
def open_target(settings: Settings) -> Iterator[ConnectionTarget]:
    """Yield where to connect: ``DATABASE_URL``, or the embedded server.

    With no ``DATABASE_URL`` the embedded server in ``settings.data_dir`` is
    started for the duration of the block, unless another process already
    runs it, and stopped afterwards if no other process uses it.
    """
    if settings.database_url is not None:
        yield resolve_target(settings.database_url, settings)
        return
    with EmbeddedServer(settings.data_dir) as server:
        yield resolve_target(server.conninfo, settings)
