"""PostgreSQL's statements for rows processed in place (`@app.rows`): built per adopted table from
its declaration. Parameters are named (`%(name)s`); times are the database's
(statement_timestamp()), as for items. The table may be schema-qualified (`app.orders`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..errors import UsageError, shown
from ..model import RowsTable
from .postgres_queries import CHANNEL, EPOCH
from .rows_sql import (
    CONVEYOR_COLUMNS,
    Spelling,
    TableInfo,
    controls_filter,
    index_name,
    limit_state,
    literal,
    quote,
    settle_statements,
    status_literals,
)

COLUMN_TYPES = {
    "conveyor_token": "bigint",
    "conveyor_owner": "text",
    "conveyor_lease_until": "timestamptz",
    "conveyor_attempts": "integer NOT NULL DEFAULT 0",
    "conveyor_run_at": "timestamptz",
    "conveyor_error": "text",
    "conveyor_rescued": "boolean NOT NULL DEFAULT false",
}
assert tuple(COLUMN_TYPES) == CONVEYOR_COLUMNS

NOW = "statement_timestamp()"
SPELLING = Spelling(arg=lambda name: f"%({name})s", later=lambda name: f"{NOW} + %({name})s * interval '1 second'",
                    now=NOW, greatest="greatest", true="true", false="false")
ADOPTED_TABLE = """CREATE TABLE IF NOT EXISTS conveyor_adopted (
    table_name text PRIMARY KEY, declaration text NOT NULL, adopted_at timestamptz NOT NULL DEFAULT now())"""
ADOPTED_ALL = "SELECT table_name, declaration FROM conveyor_adopted ORDER BY table_name"
HAS_ADOPTED = "SELECT to_regclass('conveyor_adopted') IS NOT NULL"


def ids_param(ids: list[Any]) -> list[Any]:
    return ids


def when(value: Any) -> dt.datetime | None:
    return value


def _cast(rows: RowsTable, info: TableInfo) -> str:
    """`::<the status column's type>`: a CASE over the status values is then of the column's type
    (an enum's, say), not text."""
    return f"::{info.types[rows.status]}" if info.types.get(rows.status) else ""


def _schema(table: str) -> str | None:
    return table.rpartition(".")[0] or None


def describe_table(conn: Any, table: str) -> TableInfo | None:
    """The table's columns, single-column primary key (and its type), indexes and triggers; None
    if there is no such table."""
    row = conn.execute("SELECT to_regclass(%s)::oid", (quote(table),)).fetchone()
    if row is None or row[0] is None:
        return None
    oid = row[0]
    columns = {name: kind for name, kind in conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (oid,))}
    pks = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s AND i.indisprimary", (oid,)).fetchall()
    if not pks:
        raise UsageError(f"table {shown(table)} has no primary key: rows processed in place are named by theirs")
    if len(pks) > 1:
        raise UsageError(f"table {shown(table)} has a primary key of several columns "
                         f"({', '.join(sorted(n for n, _ in pks))}): rows processed in place need a single-column one")
    indexes = {r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s", (oid,))}
    triggers = {r[0] for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal", (oid,))}
    return TableInfo(pk=pks[0][0], pk_type=pks[0][1], columns=list(columns), indexes=indexes, triggers=triggers,
                     types=columns)


def enum_labels(conn: Any, table: str, column: str) -> list[str] | None:
    """The labels of the column's type if it is an enum, else None."""
    rows = conn.execute(
        "SELECT e.enumlabel FROM pg_attribute a JOIN pg_enum e ON e.enumtypid = a.atttypid "
        "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s ORDER BY e.enumsortorder", (quote(table), column)).fetchall()
    return [r[0] for r in rows] or None


def _qualified(rows: RowsTable, name: str) -> str:
    schema = _schema(rows.table)
    return f"{quote(schema)}.{quote(name)}" if schema else quote(name)


def _wake_names(rows: RowsTable) -> tuple[str, str]:
    """The wake-up trigger's name and its function's (qualified)."""
    name = index_name(rows, "wake")
    return name, _qualified(rows, name)


def adopt_ddl(rows: RowsTable, info: TableInfo, declaration: str | None) -> list[str]:
    """What adopting the table still needs, statement by statement (nothing already there);
    `declaration` None: it is recorded already."""
    t, s, p = quote(rows.table), quote(rows.status), quote(info.pk)
    values = status_literals(rows, _cast(rows, info))
    pend, work = values["pending"], values["in_progress"]
    missing = [f"ADD COLUMN IF NOT EXISTS {name} {kind}" for name, kind in COLUMN_TYPES.items() if name not in info.columns]
    out = [f"ALTER TABLE {t} " + ", ".join(missing)] if missing else []
    # coalesce(pk, pk): the primary key's own order, but an expression only this index holds, so a
    # claim (ORDER BY the same expression) always walks it, never the primary key's index, which
    # stale statistics (a table analyzed while all its rows were pending) make look as good, and
    # which then walks every done row from the start at every claim
    pending_cols = f"coalesce({p}, {p}), conveyor_run_at" + (f", {quote(rows.key)}" if rows.key else "")
    wanted = [("pending", f"({pending_cols}) WHERE {s} = {pend}"),
              ("working", f"(conveyor_lease_until) WHERE {s} = {work}")]
    if rows.key:
        wanted.append(("keyed", f"({quote(rows.key)}, {p}) WHERE {s} IN ({pend}, {work})"))
    for kind, body in wanted:
        name = index_name(rows, kind)
        if name not in info.indexes:
            out.append(f"CREATE INDEX IF NOT EXISTS {quote(name)} ON {t} {body}")
    trigger, function = _wake_names(rows)
    if trigger not in info.triggers:
        out.append(f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME); RETURN NULL; END $$")
        out.append(f"CREATE OR REPLACE TRIGGER {quote(trigger)} AFTER INSERT OR UPDATE OF {s} ON {t} "
                   f"FOR EACH ROW WHEN (NEW.{s} = {pend}) EXECUTE FUNCTION {function}()")
    if declaration is None:
        return out
    out.append(ADOPTED_TABLE)
    out.append(f"INSERT INTO conveyor_adopted (table_name, declaration) VALUES ({literal(rows.table)}, "
               f"{literal(declaration)}) ON CONFLICT (table_name) DO UPDATE SET declaration = EXCLUDED.declaration, "
               "adopted_at = now()")
    return out


def undo_ddl(rows: RowsTable, info: TableInfo) -> list[str]:
    t = quote(rows.table)
    trigger, function = _wake_names(rows)
    out = []
    if trigger in info.triggers:
        out.append(f"DROP TRIGGER IF EXISTS {quote(trigger)} ON {t}")
    out.append(f"DROP FUNCTION IF EXISTS {function}()")
    out += [f"DROP INDEX IF EXISTS {_qualified(rows, index_name(rows, kind))}" for kind in ("pending", "working", "keyed")
            if index_name(rows, kind) in info.indexes]
    present = [name for name in COLUMN_TYPES if name in info.columns]
    if present:
        out.append(f"ALTER TABLE {t} " + ", ".join(f"DROP COLUMN IF EXISTS {name}" for name in present))
    out.append(f"DELETE FROM conveyor_adopted WHERE table_name = {literal(rows.table)}")
    return out


class Statements:
    """One adopted table's statements."""

    def __init__(self, rows: RowsTable, info: TableInfo):
        t, s, p = quote(rows.table), quote(rows.status), quote(info.pk)
        values = status_literals(rows, _cast(rows, info))
        pend, work = values["pending"], values["in_progress"]
        self.pk = info.pk
        ids = f"%(ids)s::{info.pk_type}[]"
        fence = f"{p} = ANY({ids}) AND conveyor_token = %(token)s AND {s} = {work}"
        blocked = ""
        if rows.key:
            k = quote(rows.key)
            # the row is its key's head: no earlier row of the key waits or runs, and none runs at all
            # (a claim that sees an earlier one still pending skips this one; FOR UPDATE locks only c)
            blocked = (f" AND (c.{k} IS NULL OR NOT EXISTS (SELECT 1 FROM {t} AS o WHERE o.{k} = c.{k} "
                       f"AND o.{s} IN ({pend}, {work}) AND (o.{p} < c.{p} OR o.{s} = {work})))")
        claim = (f"UPDATE {t} AS r SET {s} = {work}, conveyor_token = %(token)s, conveyor_owner = %(owner)s, "
                 f"conveyor_lease_until = {NOW} + %(lease)s * interval '1 second', "
                 "conveyor_attempts = r.conveyor_attempts + 1 "
                 f"FROM (SELECT c.{p} FROM {t} AS c WHERE c.{s} = {pend} "
                 f"AND (c.conveyor_run_at IS NULL OR c.conveyor_run_at <= {NOW})"
                 f"{controls_filter(rows, 'c', EPOCH, 'true', lambda col: f'{col}::text')}{{blocked}} "
                 f"ORDER BY coalesce(c.{p}, c.{p}) LIMIT %(limit)s FOR UPDATE OF c SKIP LOCKED) AS pick "
                 f"WHERE r.{p} = pick.{p} RETURNING r.{p} AS conveyor_pk, r.*")
        self.claim = claim.format(blocked="")
        self.claim_ordered = claim.format(blocked=blocked)
        expired = f"SELECT {p} FROM {t} WHERE {s} = {work} AND conveyor_lease_until < {NOW} FOR UPDATE SKIP LOCKED"
        settle_statements(self, rows, info.pk, fence, expired, SPELLING, values)
        self.get_many = f"SELECT {p} AS conveyor_pk, * FROM {t} WHERE {p} = ANY({ids})"
        self.has_work = (f"SELECT EXISTS (SELECT 1 FROM {t} WHERE {s} = {pend}) "
                         f"OR EXISTS (SELECT 1 FROM {t} WHERE {s} = {work})")
        self.counts = f"SELECT {s}::text, count(*) FROM {t} GROUP BY 1"
        self.live_counts = f"SELECT (SELECT count(*) FROM {t} WHERE {s} = {pend}), (SELECT count(*) FROM {t} WHERE {s} = {work})"
        k = f"{quote(rows.key)}::text" if rows.key else "NULL"
        self.keys_of = f"SELECT {p}, {k} FROM {t} WHERE {p} = ANY({ids})"
        self.limit_state = limit_state(rows, f"SELECT count(*) FROM {t} WHERE {s} = {work}", f"{EPOCH}::float8", "true")
