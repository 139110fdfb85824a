"""Checking a live database against the schema this version expects.

:func:`verify_schema` builds ``schema.sql`` in a scratch schema, inside a
transaction that is always rolled back, reads that schema and the live one from
the system catalogs, and lists every difference as a plain sentence. The
expected schema is not kept by hand a second time: it is whatever
``schema.sql`` builds on the same server, so both sides are rendered by the
same PostgreSQL version.

The live schema is ``current_schema()``, where the migrations install. In it,
:func:`verify_schema` compares:

- tables, and their columns: type, NOT NULL, default, identity, generation
  expression and collation;
- constraints, by name, as ``pg_get_constraintdef`` renders them;
- indexes that do not back a constraint: table, uniqueness, method, key
  columns or expressions in order, predicate, and the whole definition;
- triggers: table, function, timing, events, row or statement, enabled;
- functions and procedures, by name and argument types: kind, arguments,
  result type, language, volatility, STRICT, SECURITY DEFINER, SET options
  and body.

Objects of the live schema count as extra only when they belong to an
expected table (a column, constraint, index or trigger) or share the name of
an expected function. Other tables and functions of the application in the
same schema are ignored, and so is the migration ledger. Column order is
recorded in a :class:`SchemaSnapshot` but is not reported as a difference.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from mcp_authdb.db.migrations import LEDGER_TABLE
from mcp_authdb.errors import SchemaCheckError
from mcp_authdb.sql import load_schema

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The scratch schema gets a random suffix because a second CREATE SCHEMA of
# an uncommitted name waits for the first transaction to end, so concurrent
# checks on one database would queue behind each other.
SCRATCH_SCHEMA_PREFIX = "mcp_authdb_verify_"

MISSING = "missing"
EXTRA = "extra"
CHANGED = "changed"


@dataclasses.dataclass(frozen=True)
class Difference:
    """One way in which the live schema differs from the expected one."""

    # "missing", "extra" or "changed".
    kind: str
    # The object's kind and name, such as "index idx_user_sessions_expires".
    object: str
    # A whole sentence that names the object and, for a change, both values.
    message: str

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column as the catalogs render it."""

    name: str
    type: str
    not_null: bool
    default: str | None
    # "" for an ordinary column, else "ALWAYS" or "BY DEFAULT".
    identity: str
    # "(expression) STORED" or "(expression) VIRTUAL" for a generated column.
    generated: str | None
    # Set only when it is not the default collation of the column's type.
    collation: str | None


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A table constraint other than NOT NULL, as ``pg_get_constraintdef``."""

    name: str
    table: str
    definition: str


@dataclasses.dataclass(frozen=True)
class Index:
    """An index that does not back a constraint."""

    name: str
    table: str
    unique: bool
    method: str
    # Key columns or expressions, in order.
    columns: tuple[str, ...]
    predicate: str | None
    # The whole CREATE INDEX statement, which also carries sort order,
    # operator classes and INCLUDE columns.
    definition: str


@dataclasses.dataclass(frozen=True)
class Trigger:
    """A user-defined trigger of a table."""

    name: str
    table: str
    function: str
    timing: str
    events: tuple[str, ...]
    level: str
    enabled: str
    definition: str


@dataclasses.dataclass(frozen=True)
class Function:
    """A function or procedure, identified by ``signature``."""

    # Name and argument types, such as "cleanup_expired_sessions_batch(integer)".
    signature: str
    name: str
    kind: str
    arguments: str
    result: str | None
    language: str
    volatility: str
    strict: bool
    security_definer: bool
    config: tuple[str, ...]
    # prosrc, or the text of a BEGIN ATOMIC body.
    body: str


@dataclasses.dataclass(frozen=True)
class Table:
    """A table with its columns, in column order, constraints and triggers."""

    name: str
    kind: str
    unlogged: bool
    columns: tuple[Column, ...]
    constraints: Mapping[str, Constraint]
    triggers: Mapping[str, Trigger]


@dataclasses.dataclass(frozen=True)
class SchemaSnapshot:
    """The catalog entries of one schema. Equal snapshots mean equal schemas.

    Expressions are rendered with the search path set to that schema alone, so
    the schema's name does not appear in them and two schemas compare equal.
    """

    tables: Mapping[str, Table]
    indexes: Mapping[str, Index]
    functions: Mapping[str, Function]


def verify_schema(conn: psycopg.Connection[Any]) -> list[Difference]:
    """Compare ``current_schema()`` with ``schema.sql`` and list the differences.

    An empty list means that the live schema matches. ``conn`` must be idle,
    in autocommit mode or not. It is left idle with its settings unchanged,
    and nothing is written because the scratch schema is rolled back.

    Raises :class:`SchemaCheckError` when the connection is inside a
    transaction, when the role lacks the CREATE privilege on the database,
    or when PostgreSQL rejects a statement.
    """
    status = conn.info.transaction_status
    if status != psycopg.pq.TransactionStatus.IDLE:
        raise SchemaCheckError(
            "verify_schema needs an idle connection outside a transaction, but "
            f"its status is {status.name}. Commit or roll back first, or open a "
            "new connection"
        )

    began = time.perf_counter()
    scratch = SCRATCH_SCHEMA_PREFIX + secrets.token_hex(6)
    try:
        with conn.transaction(force_rollback=True):
            target = _read_target(conn)
            live = snapshot_schema(conn, target.schema)
            _build_expected_schema(conn, target, scratch)
            expected = snapshot_schema(conn, scratch)
    except psycopg.Error as exc:
        raise _check_error(exc) from exc

    differences = compare_snapshots(expected, live)
    logger.info(
        "checked schema %s against schema.sql in %.0f ms: %d differences",
        target.schema,
        (time.perf_counter() - began) * 1000,
        len(differences),
        extra={"action": "verify.done", "differences": len(differences)},
    )
    return differences


def snapshot_schema(conn: psycopg.Connection[Any], schema_name: str) -> SchemaSnapshot:
    """Read the tables, indexes and functions of ``schema_name`` from the catalogs.

    The migration ledger is left out. A schema that does not exist gives an
    empty snapshot. The reads run in a transaction, or a savepoint inside the
    caller's transaction, that is rolled back to restore ``search_path``.
    """
    with conn.transaction(force_rollback=True):
        # Catalog functions qualify a name only when the search path does
        # not reach it, so with this schema alone on the path no expression
        # mentions the schema's name.
        conn.execute(
            "SELECT set_config('search_path', quote_ident(%s), true)", (schema_name,)
        )
        table_rows = conn.execute(
            _TABLES_QUERY, {"schema": schema_name, "ledger": LEDGER_TABLE}
        ).fetchall()
        params = {"tables": [row[0] for row in table_rows]}
        columns = _group_by_table(
            conn.execute(_COLUMNS_QUERY, params).fetchall(),
            lambda row: Column(*row[1:]),
        )
        constraints = _group_by_table(
            conn.execute(_CONSTRAINTS_QUERY, params).fetchall(),
            lambda row: Constraint(name=row[1], table=row[0], definition=row[2]),
        )
        triggers = _group_by_table(
            conn.execute(_TRIGGERS_QUERY, params).fetchall(), _trigger_from_row
        )
        tables = {
            name: Table(
                name=name,
                kind=_TABLE_KINDS[relkind],
                unlogged=relpersistence == "u",
                columns=tuple(columns.get(name, [])),
                constraints={c.name: c for c in constraints.get(name, [])},
                triggers={t.name: t for t in triggers.get(name, [])},
            )
            for _oid, name, relkind, relpersistence in table_rows
        }
        indexes = {
            row[0]: _index_from_row(row) for row in conn.execute(_INDEXES_QUERY, params)
        }
        functions = {
            row[0]: _function_from_row(row)
            for row in conn.execute(_FUNCTIONS_QUERY, {"schema": schema_name})
        }
    return SchemaSnapshot(tables=tables, indexes=indexes, functions=functions)


def compare_snapshots(
    expected: SchemaSnapshot, live: SchemaSnapshot
) -> list[Difference]:
    """List how ``live`` differs from ``expected``, table by table, then functions.

    Extra objects count only when they belong to an expected table or share
    the name of an expected function.
    """
    differences: list[Difference] = []
    for name in sorted(expected.tables):
        differences.extend(_compare_table(expected, live, name))
    differences.extend(_compare_functions(expected.functions, live.functions))
    return differences


@dataclasses.dataclass(frozen=True)
class _CheckTarget:
    # current_schema(), then current_user and current_database() quoted as
    # SQL identifiers, so that a hint can show a statement to run.
    schema: str
    role: str
    database: str


def _read_target(conn: psycopg.Connection[Any]) -> _CheckTarget:
    row = conn.execute(
        "SELECT current_schema(), current_setting('search_path'),"
        " quote_ident(current_user), quote_ident(current_database())"
    ).fetchone()
    assert row is not None
    schema, search_path, role, database = row
    if schema is None:
        raise SchemaCheckError(
            f"search_path {search_path!r} names no schema that exists and that "
            f"role {role} may use, so there is no schema to check. Set "
            "search_path to the schema that the migrations installed into"
        )
    return _CheckTarget(schema=schema, role=role, database=database)


def _build_expected_schema(
    conn: psycopg.Connection[Any], target: _CheckTarget, scratch: str
) -> None:
    try:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(scratch)))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SchemaCheckError.from_driver(
            f"role {target.role} lacks the CREATE privilege on database "
            f"{target.database}, which the check needs to build schema.sql in "
            "a scratch schema that it always rolls back. Run the check as a "
            "role that has it, such as the database owner, or run GRANT CREATE "
            f"ON DATABASE {target.database} TO {target.role}",
            exc,
        ) from exc

    conn.execute("SELECT set_config('search_path', quote_ident(%s), true)", (scratch,))
    # Sent as one simple query with no parameters, because the file contains
    # several statements, as the migration runner sends a migration.
    conn.execute(load_schema().encode())
    logger.debug(
        "built schema.sql in scratch schema %s",
        scratch,
        extra={"action": "verify.build_expected"},
    )


def _check_error(exc: psycopg.Error) -> SchemaCheckError:
    detail = exc.diag.message_primary or str(exc)
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        message = (
            f"could not build schema.sql in a scratch schema: {detail}. The "
            "check writes a scratch schema that it rolls back, so it needs a "
            "server and session that accept writes. Run it against the primary, "
            "with default_transaction_read_only off"
        )
    elif exc.sqlstate:
        message = (
            f"could not check the schema: {detail} (SQLSTATE {exc.sqlstate}). "
            "Nothing was changed"
        )
    else:
        message = f"could not check the schema: {detail}. Nothing was changed"
    return SchemaCheckError.from_driver(message, exc)


# Trigger bits of pg_trigger.tgtype, from PostgreSQL's catalog/pg_trigger.h.
_TRIGGER_ROW = 1 << 0
_TRIGGER_BEFORE = 1 << 1
_TRIGGER_INSTEAD = 1 << 6
_TRIGGER_EVENTS = (
    (1 << 2, "INSERT"),
    (1 << 4, "UPDATE"),
    (1 << 3, "DELETE"),
    (1 << 5, "TRUNCATE"),
)
_TRIGGER_ENABLED = {
    "O": "enabled",
    "D": "disabled",
    "R": "enabled for replica sessions only",
    "A": "enabled always, replica sessions included",
}
_TABLE_KINDS = {"r": "table", "p": "partitioned table"}
_FUNCTION_KINDS = {"f": "function", "p": "procedure"}
_VOLATILITIES = {"i": "IMMUTABLE", "s": "STABLE", "v": "VOLATILE"}


def _index_from_row(row: tuple[Any, ...]) -> Index:
    name, table, unique, method, columns, predicate, definition = row
    return Index(
        name=name,
        table=table,
        unique=unique,
        method=method,
        columns=tuple(columns),
        predicate=predicate,
        definition=definition,
    )


def _trigger_from_row(row: tuple[Any, ...]) -> Trigger:
    table, name, function, tgtype, tgenabled, definition = row
    if tgtype & _TRIGGER_INSTEAD:
        timing = "INSTEAD OF"
    elif tgtype & _TRIGGER_BEFORE:
        timing = "BEFORE"
    else:
        timing = "AFTER"
    return Trigger(
        name=name,
        table=table,
        function=function,
        timing=timing,
        events=tuple(event for bit, event in _TRIGGER_EVENTS if tgtype & bit),
        level="ROW" if tgtype & _TRIGGER_ROW else "STATEMENT",
        enabled=_TRIGGER_ENABLED.get(tgenabled, f"enabled as {tgenabled!r}"),
        definition=definition,
    )


def _function_from_row(row: tuple[Any, ...]) -> Function:
    (signature, name, prokind, arguments, result, language, provolatile,
     strict, security_definer, config, body) = row  # fmt: skip
    return Function(
        signature=signature,
        name=name,
        kind=_FUNCTION_KINDS[prokind],
        arguments=arguments,
        result=result,
        language=language,
        volatility=_VOLATILITIES[provolatile],
        strict=strict,
        security_definer=security_definer,
        config=tuple(config or ()),
        body=body,
    )


def _group_by_table(
    rows: Sequence[tuple[Any, ...]], build: Callable[[tuple[Any, ...]], T]
) -> dict[str, list[T]]:
    groups: dict[str, list[T]] = {}
    for row in rows:
        groups.setdefault(row[0], []).append(build(row))
    return groups


# The tables of the schema %(schema)s, leaving out the ledger table
# %(ledger)s. Kinds: r ordinary, p partitioned. The other queries take the
# oids it returns as %(tables)s.
_TABLES_QUERY = """
SELECT c.oid, c.relname, c.relkind, c.relpersistence
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s
  AND c.relkind IN ('r', 'p')
  AND c.relname <> %(ledger)s
ORDER BY c.relname
"""

# PostgreSQL 18 also records NOT NULL as pg_constraint rows of contype 'n',
# with generated names. Nullability is compared through attnotnull instead,
# and a NOT VALID one counts as allowing NULL because old rows may hold NULL.
_COLUMNS_QUERY = """
SELECT c.relname,
       a.attname,
       format_type(a.atttypid, a.atttypmod),
       a.attnotnull AND NOT EXISTS (
           SELECT FROM pg_constraint nn
           WHERE nn.conrelid = a.attrelid
             AND nn.contype = 'n'
             AND nn.conkey = ARRAY[a.attnum]
             AND NOT nn.convalidated
       ),
       CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END,
       CASE a.attidentity
           WHEN 'a' THEN 'ALWAYS' WHEN 'd' THEN 'BY DEFAULT' ELSE ''
       END,
       CASE a.attgenerated
           WHEN 's' THEN '(' || pg_get_expr(d.adbin, d.adrelid) || ') STORED'
           WHEN 'v' THEN '(' || pg_get_expr(d.adbin, d.adrelid) || ') VIRTUAL'
       END,
       CASE WHEN a.attcollation <> t.typcollation
           THEN a.attcollation::regcollation::text
       END
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = ANY(%(tables)s::oid[])
  AND a.attnum > 0
  AND NOT a.attisdropped
ORDER BY c.relname, a.attnum
"""

_CONSTRAINTS_QUERY = """
SELECT c.relname, con.conname, pg_get_constraintdef(con.oid)
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
WHERE con.conrelid = ANY(%(tables)s::oid[])
  AND con.contype <> 'n'
ORDER BY c.relname, con.conname
"""

# An index behind a primary key, unique or exclusion constraint is compared
# as that constraint, so it is not listed twice.
_INDEXES_QUERY = """
SELECT i.relname,
       c.relname,
       x.indisunique,
       am.amname,
       ARRAY(
           SELECT pg_get_indexdef(x.indexrelid, k, true)
           FROM generate_series(1, x.indnkeyatts) AS k
           ORDER BY k
       ),
       pg_get_expr(x.indpred, x.indrelid, true),
       pg_get_indexdef(x.indexrelid, 0, true)
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class c ON c.oid = x.indrelid
JOIN pg_am am ON am.oid = i.relam
WHERE x.indrelid = ANY(%(tables)s::oid[])
  AND NOT EXISTS (
      SELECT FROM pg_constraint con
      WHERE con.conindid = x.indexrelid
        AND con.conrelid = x.indrelid
        AND con.contype IN ('p', 'u', 'x')
  )
ORDER BY i.relname
"""

# Internal triggers implement foreign keys and are compared as those.
_TRIGGERS_QUERY = """
SELECT c.relname,
       tg.tgname,
       tg.tgfoid::regprocedure::text,
       tg.tgtype,
       tg.tgenabled,
       pg_get_triggerdef(tg.oid, true)
FROM pg_trigger tg
JOIN pg_class c ON c.oid = tg.tgrelid
WHERE tg.tgrelid = ANY(%(tables)s::oid[])
  AND NOT tg.tgisinternal
ORDER BY c.relname, tg.tgname
"""

# Aggregates and window functions (prokind 'a' and 'w') are not compared.
_FUNCTIONS_QUERY = """
SELECT quote_ident(p.proname) || '(' || coalesce((
           SELECT string_agg(format_type(arg.type_oid, NULL), ', '
                             ORDER BY arg.position)
           FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY
               AS arg(type_oid, position)
       ), '') || ')',
       p.proname,
       p.prokind,
       pg_get_function_arguments(p.oid),
       pg_get_function_result(p.oid),
       l.lanname,
       p.provolatile,
       p.proisstrict,
       p.prosecdef,
       p.proconfig,
       CASE WHEN p.prosqlbody IS NULL THEN p.prosrc
           ELSE pg_get_function_sqlbody(p.oid)
       END
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE n.nspname = %(schema)s
  AND p.prokind IN ('f', 'p')
ORDER BY 1
"""


# An attribute compared by _compare_fields, with the phrase for its live
# value ("has type text") and the one for its expected value ("text[]").
_Field = tuple[str, Callable[[Any], str], Callable[[Any], str]]


def _value_field(attribute: str, label: str, verb: str = "has") -> _Field:
    def describe_live(value: Any) -> str:
        return f"{verb} no {label}" if value is None else f"{verb} {label} {value}"

    def describe_expected(value: Any) -> str:
        return f"no {label}" if value is None else str(value)

    return attribute, describe_live, describe_expected


def _flag_field(attribute: str, when_true: str, when_false: str) -> _Field:
    def describe_live(value: Any) -> str:
        return f"is {when_true}" if value else f"is {when_false}"

    def describe_expected(value: Any) -> str:
        return when_true if value else when_false

    return attribute, describe_live, describe_expected


def _describe_identity(identity: str) -> str:
    return f"GENERATED {identity} AS IDENTITY" if identity else "no identity"


_TABLE_FIELDS: list[_Field] = [
    ("kind", lambda kind: f"is a {kind}", lambda kind: f"a {kind}"),
    _flag_field("unlogged", "UNLOGGED", "logged"),
]

_COLUMN_FIELDS: list[_Field] = [
    _value_field("type", "type"),
    (
        "not_null",
        lambda not_null: "is NOT NULL" if not_null else "allows NULL",
        lambda not_null: "NOT NULL" if not_null else "to allow NULL",
    ),
    _value_field("default", "default"),
    (
        "identity",
        lambda identity: (
            f"is {_describe_identity(identity)}"
            if identity
            else "is not an identity column"
        ),
        _describe_identity,
    ),
    _value_field("generated", "generation expression"),
    _value_field("collation", "collation"),
]

_CONSTRAINT_FIELDS: list[_Field] = [
    ("definition", lambda definition: f"is {definition}", str),
]

_INDEX_FIELDS: list[_Field] = [
    _value_field("table", "table", verb="is on"),
    _flag_field("unique", "UNIQUE", "not unique"),
    _value_field("method", "method", verb="uses"),
    (
        "columns",
        lambda columns: f"has columns ({', '.join(columns)})",
        lambda columns: f"({', '.join(columns)})",
    ),
    _value_field("predicate", "predicate"),
]

_TRIGGER_FIELDS: list[_Field] = [
    _value_field("function", "function", verb="calls"),
    ("timing", lambda timing: f"fires {timing}", str),
    (
        "events",
        lambda events: f"fires on {' OR '.join(events)}",
        lambda events: " OR ".join(events),
    ),
    ("level", lambda level: f"fires FOR EACH {level}", lambda level: level),
    ("enabled", lambda enabled: f"is {enabled}", str),
]

_FUNCTION_FIELDS: list[_Field] = [
    ("kind", lambda kind: f"is a {kind}", lambda kind: f"a {kind}"),
    (
        "arguments",
        lambda arguments: f"has arguments ({arguments})",
        lambda arguments: f"({arguments})",
    ),
    _value_field("result", "result type"),
    _value_field("language", "language", verb="is in"),
    ("volatility", lambda volatility: f"is {volatility}", str),
    _flag_field("strict", "STRICT", "not STRICT"),
    _flag_field("security_definer", "SECURITY DEFINER", "SECURITY INVOKER"),
    (
        "config",
        lambda config: f"has SET options {', '.join(config) or 'none'}",
        lambda config: ", ".join(config) or "none",
    ),
]


def _compare_fields(
    object_name: str,
    subject: str,
    expected: object,
    live: object,
    fields: list[_Field],
) -> list[Difference]:
    differences = []
    for attribute, describe_live, describe_expected in fields:
        expected_value = getattr(expected, attribute)
        live_value = getattr(live, attribute)
        if expected_value != live_value:
            live_phrase = describe_live(live_value)
            expected_phrase = describe_expected(expected_value)
            message = f"{subject} {live_phrase}, expected {expected_phrase}"
            differences.append(Difference(CHANGED, object_name, message))
    return differences


def _compare_definitions(
    object_name: str, subject: str, expected: Index | Trigger, live: Index | Trigger
) -> list[Difference]:
    # The whole definition catches what the separate fields do not show,
    # such as DESC, operator classes, INCLUDE or a trigger's WHEN condition.
    if expected.definition == live.definition:
        return []
    return [
        Difference(
            CHANGED,
            object_name,
            f"{subject} is defined as {live.definition}, expected "
            f"{expected.definition}",
        )
    ]


def _compare_table(
    expected: SchemaSnapshot, live: SchemaSnapshot, name: str
) -> Iterator[Difference]:
    want = expected.tables[name]
    have = live.tables.get(name)
    if have is None:
        # The columns and constraints go with the table, but its indexes and
        # triggers are created by statements of their own, so each is listed.
        yield Difference(MISSING, f"table {name}", f"table {name} is missing")
    else:
        yield from _compare_fields(
            f"table {name}", f"table {name}", want, have, _TABLE_FIELDS
        )
        yield from _compare_columns(name, want.columns, have.columns)
        yield from _compare_constraints(name, want.constraints, have.constraints)

    yield from _compare_indexes(name, expected.indexes, live.indexes)

    yield from _compare_triggers(
        name, want.triggers, {} if have is None else have.triggers
    )


def _compare_columns(
    table: str, expected: Sequence[Column], live: Sequence[Column]
) -> Iterator[Difference]:
    live_by_name = {column.name: column for column in live}
    expected_names = {column.name for column in expected}
    for want in expected:
        name = f"column {table}.{want.name}"
        have = live_by_name.get(want.name)
        if have is None:
            yield Difference(MISSING, name, f"{name} of type {want.type} is missing")
        else:
            yield from _compare_fields(name, name, want, have, _COLUMN_FIELDS)
    for have in live:
        if have.name not in expected_names:
            name = f"column {table}.{have.name}"
            yield Difference(
                EXTRA, name, f"{name} of type {have.type} is not in the expected schema"
            )


def _pair_by_name(
    expected: Mapping[str, T], live: Mapping[str, T]
) -> Iterator[tuple[str, T | None, T | None]]:
    """Yield each name of either side, sorted, with its expected and live object."""
    for name in sorted(expected.keys() | live.keys()):
        yield name, expected.get(name), live.get(name)


def _compare_constraints(
    table: str, expected: Mapping[str, Constraint], live: Mapping[str, Constraint]
) -> Iterator[Difference]:
    for constraint_name, want, have in _pair_by_name(expected, live):
        name = f"constraint {constraint_name} on {table}"
        if have is None:
            assert want is not None
            yield Difference(
                MISSING, name, f"{name} is missing, expected {want.definition}"
            )
        elif want is None:
            yield Difference(
                EXTRA,
                name,
                f"{name} is not in the expected schema, defined as {have.definition}",
            )
        else:
            yield from _compare_fields(name, name, want, have, _CONSTRAINT_FIELDS)


def _compare_indexes(
    table: str, expected: Mapping[str, Index], live: Mapping[str, Index]
) -> Iterator[Difference]:
    # An expected index is listed under its expected table, wherever it is
    # now; an extra one under the table it is on.
    ours = [index for index in expected.values() if index.table == table]
    extra = [
        index
        for index in live.values()
        if index.table == table and index.name not in expected
    ]
    for want in ours:
        name = f"index {want.name}"
        subject = f"{name} on {table}"
        have = live.get(want.name)
        if have is None:
            columns = ", ".join(want.columns)
            yield Difference(MISSING, name, f"{subject} ({columns}) is missing")
            continue
        changes = _compare_fields(name, subject, want, have, _INDEX_FIELDS)
        yield from changes or _compare_definitions(name, subject, want, have)
    for have in extra:
        name = f"index {have.name}"
        yield Difference(
            EXTRA,
            name,
            f"{name} on {table} ({', '.join(have.columns)}) is not in the expected "
            "schema",
        )


def _compare_triggers(
    table: str,
    expected: Mapping[str, Trigger],
    live: Mapping[str, Trigger],
) -> Iterator[Difference]:
    for trigger_name, want, have in _pair_by_name(expected, live):
        name = f"trigger {trigger_name} on {table}"
        if have is None:
            yield Difference(MISSING, name, f"{name} is missing")
        elif want is None:
            yield Difference(EXTRA, name, f"{name} is not in the expected schema")
        else:
            changes = _compare_fields(name, name, want, have, _TRIGGER_FIELDS)
            yield from changes or _compare_definitions(name, name, want, have)


def _compare_functions(
    expected: Mapping[str, Function], live: Mapping[str, Function]
) -> Iterator[Difference]:
    expected_names = {function.name for function in expected.values()}
    for signature in sorted(expected):
        want = expected[signature]
        have = live.get(signature)
        name = f"{want.kind} {signature}"
        if have is None:
            yield Difference(MISSING, name, f"{name} is missing")
            continue
        yield from _compare_fields(name, name, want, have, _FUNCTION_FIELDS)
        if want.body != have.body:
            yield Difference(
                CHANGED, name, f"{name} has a different body than expected"
            )
    for signature in sorted(live.keys() - expected.keys()):
        have = live[signature]
        if have.name in expected_names:
            name = f"{have.kind} {signature}"
            yield Difference(EXTRA, name, f"{name} is not in the expected schema")
