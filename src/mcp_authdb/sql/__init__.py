"""The project's SQL, shipped as package data.

``schema.sql`` is the whole current schema; ``migrations/NNNN_name.sql`` are
the ordered steps that build it. Both are plain SQL that ``psql -f`` runs as
well as the migration runner does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from importlib import resources

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclasses.dataclass(frozen=True)
class Migration:
    """One migration file: its version, name, text and SHA-256 checksum."""

    version: int
    name: str
    filename: str
    sql: str
    checksum: str


def load_schema() -> str:
    """Return the text of ``schema.sql``."""
    return resources.files(__name__).joinpath("schema.sql").read_text("utf-8")


def load_migrations() -> list[Migration]:
    """Return the migration files in version order.

    Raises ``RuntimeError`` when a file name does not follow ``NNNN_name.sql``
    or two files share a version, since either means a broken installation.
    """
    folder = resources.files(__name__).joinpath("migrations")
    migrations: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:
            raise RuntimeError(
                f"migration file {entry.name!r} is not named NNNN_name.sql"
            )
        version = int(match.group(1))
        if version in migrations:
            raise RuntimeError(
                f"migration files {migrations[version].filename!r} and "
                f"{entry.name!r} share version {version}"
            )
        data = entry.read_bytes()
        migrations[version] = Migration(
            version=version,
            name=match.group(2),
            filename=entry.name,
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).hexdigest(),
        )
    return [migrations[version] for version in sorted(migrations)]
