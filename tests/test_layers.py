"""The package's layers import only downwards: sql, db, store, server, then the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import mcp_authdb

PACKAGE_DIR = Path(mcp_authdb.__file__).parent

# Each layer with the project modules it may import besides its own.
ALLOWED = {
    "mcp_authdb.sql": {"mcp_authdb.errors"},
    "mcp_authdb.db": {"mcp_authdb.errors", "mcp_authdb.sql"},
    "mcp_authdb.store": {"mcp_authdb.errors", "mcp_authdb.sql", "mcp_authdb.db"},
    "mcp_authdb.server": {
        "mcp_authdb.errors",
        "mcp_authdb.sql",
        "mcp_authdb.db",
        "mcp_authdb.store",
    },
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.startswith("mcp_authdb.")}


def layer_of(module: str) -> str | None:
    return next(
        (
            layer
            for layer in ALLOWED
            if module == layer or module.startswith(layer + ".")
        ),
        None,
    )


def test_layers_import_downwards() -> None:
    violations = []
    for layer, allowed in ALLOWED.items():
        folder = PACKAGE_DIR / layer.removeprefix("mcp_authdb.")
        for path in sorted(folder.rglob("*.py")):
            for module in imported_modules(path):
                if layer_of(module) == layer:
                    continue
                if not any(
                    module == ok or module.startswith(ok + ".") for ok in allowed
                ):
                    violations.append(f"{path.relative_to(PACKAGE_DIR)}: {module}")

    assert violations == []


def test_every_layer_has_modules() -> None:
    for layer in ALLOWED:
        folder = PACKAGE_DIR / layer.removeprefix("mcp_authdb.")
        assert list(folder.glob("*.py")), f"{layer} has no modules"
