"""SQLite's statements for rows processed in place (`@app.rows`): built per adopted table from its
declaration, since the table, its columns and its status values are the application's. Parameters
are named (`:name`); times are unix seconds (REAL) from SQLite's own clock, as for items."""

from __future__ import annotations

import datetime as dt
import sqlite3
from typing import Any

import orjson

from ..errors import UsageError, shown
from ..model import RowsTable
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
from .sqlite_queries import NOW

# the columns adopt adds: what conveyor keeps of a row's claim, beside the application's columns
COLUMN_TYPES = {
    "conveyor_token": "INTEGER",
    "conveyor_owner": "TEXT",
    "conveyor_lease_until": "REAL",
    "conveyor_attempts": "INTEGER NOT NULL DEFAULT 0",
    "conveyor_run_at": "REAL",
    "conveyor_error": "TEXT",
    "conveyor_rescued": "INTEGER NOT NULL DEFAULT 0",
}
assert tuple(COLUMN_TYPES) == CONVEYOR_COLUMNS
SPELLING = Spelling(arg=lambda name: f":{name}", later=lambda name: f"{NOW} + :{name}", now=NOW, greatest="max",
                    true="1", false="0")

ADOPTED_TABLE = """CREATE TABLE IF NOT EXISTS conveyor_adopted (
    table_name TEXT PRIMARY KEY, declaration TEXT NOT NULL, adopted_at REAL NOT NULL)"""
ADOPTED_ALL = "SELECT table_name, declaration FROM conveyor_adopted ORDER BY table_name"
HAS_ADOPTED = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'conveyor_adopted'"


def ids_param(ids: list[Any]) -> str:
    return orjson.dumps(ids).decode()


def when(value: Any) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.UTC)


def describe_table(conn: sqlite3.Connection, table: str) -> TableInfo | None:
    """The table's columns and single-column primary key; None if there is no such table."""
    if "." in table:
        raise UsageError(f"table {shown(table)}: a SQLite table name has no schema part")
    rows = conn.execute("SELECT name, type, pk FROM pragma_table_info(?)", (table,)).fetchall()
    if not rows:
        return None
    pks = [(pk, name, kind) for name, kind, pk in rows if pk]
    if not pks:
        raise UsageError(f"table {shown(table)} has no primary key: rows processed in place are named by theirs")
    if len(pks) > 1:
        names = ", ".join(name for _, name, _ in sorted(pks))
        raise UsageError(f"table {shown(table)} has a primary key of several columns ({names}): "
                         "rows processed in place need a single-column primary key")
    indexes = {r[0] for r in conn.execute("SELECT name FROM pragma_index_list(?)", (table,))}
    return TableInfo(pk=pks[0][1], pk_type=pks[0][2] or "", columns=[r[0] for r in rows], indexes=indexes)


def adopt_ddl(rows: RowsTable, info: TableInfo, declaration: str | None) -> list[str]:
    """What adopting the table still needs, statement by statement (nothing already there);
    `declaration` None: it is recorded already."""
    t, s, p = quote(rows.table), quote(rows.status), quote(info.pk)
    out = [f"ALTER TABLE {t} ADD COLUMN {name} {kind}" for name, kind in COLUMN_TYPES.items()
           if name not in info.columns]
    pending_cols = f"{p}, conveyor_run_at" + (f", {quote(rows.key)}" if rows.key else "")
    for name, sql in index_ddl(rows, pending_cols, p, s):
        if name not in info.indexes:
            out.append(sql)
    if declaration is None:
        return out
    out.append(ADOPTED_TABLE)
    out.append(f"INSERT OR REPLACE INTO conveyor_adopted (table_name, declaration, adopted_at) "
               f"VALUES ({literal(rows.table)}, {literal(declaration)}, {NOW})")
    return out


def index_ddl(rows: RowsTable, pending_cols: str, p: str, s: str) -> list[tuple[str, str]]:
    t = quote(rows.table)
    pend, work = literal(rows.pending), literal(rows.working)
    out = [
        (index_name(rows, "pending"),
         f"CREATE INDEX {quote(index_name(rows, 'pending'))} ON {t} ({pending_cols}) WHERE {s} = {pend}"),
        (index_name(rows, "working"),
         f"CREATE INDEX {quote(index_name(rows, 'working'))} ON {t} (conveyor_lease_until) WHERE {s} = {work}"),
    ]
    if rows.key:
        out.append((index_name(rows, "keyed"),
                    f"CREATE INDEX {quote(index_name(rows, 'keyed'))} ON {t} ({quote(rows.key)}, {p}) "
                    f"WHERE {s} IN ({pend}, {work})"))
    return out


def undo_ddl(rows: RowsTable, info: TableInfo) -> list[str]:
    t = quote(rows.table)
    out = [f"DROP INDEX IF EXISTS {quote(index_name(rows, kind))}" for kind in ("pending", "working", "keyed")
           if index_name(rows, kind) in info.indexes]
    out += [f"ALTER TABLE {t} DROP COLUMN {name}" for name in COLUMN_TYPES if name in info.columns]
    out.append(f"DELETE FROM conveyor_adopted WHERE table_name = {literal(rows.table)}")
    return out


class Statements:
    """One adopted table's statements."""

    def __init__(self, rows: RowsTable, info: TableInfo):
        t, s, p = quote(rows.table), quote(rows.status), quote(info.pk)
        pend, work = literal(rows.pending), literal(rows.working)
        pending_ix, working_ix = quote(index_name(rows, "pending")), quote(index_name(rows, "working"))
        self.pk = info.pk
        returning = f"RETURNING {p} AS conveyor_pk, *"
        fence = f"{p} IN (SELECT value FROM json_each(:ids)) AND conveyor_token = :token AND {s} = {work}"
        due = (f"c.{s} = {pend} AND (c.conveyor_run_at IS NULL OR c.conveyor_run_at <= {NOW})"
               + controls_filter(rows, "c", NOW, "1", lambda col: f"CAST({col} AS TEXT)"))
        blocked = ""
        if rows.key:
            k = quote(rows.key)
            blocked = (f" AND (c.{k} IS NULL OR NOT EXISTS (SELECT 1 FROM {t} AS o INDEXED BY "
                       f"{quote(index_name(rows, 'keyed'))} WHERE o.{k} = c.{k} AND o.{s} IN ({pend}, {work}) "
                       f"AND (o.{p} < c.{p} OR o.{s} = {work})))")
        claim = (f"UPDATE {t} SET {s} = {work}, conveyor_token = :token, conveyor_owner = :owner, "
                 f"conveyor_lease_until = {NOW} + :lease, conveyor_attempts = conveyor_attempts + 1 "
                 f"WHERE {p} IN (SELECT c.{p} FROM {t} AS c INDEXED BY {pending_ix} WHERE {due}{{blocked}} "
                 f"ORDER BY c.{p} LIMIT :limit) {returning}")
        self.claim = claim.format(blocked="")
        self.claim_ordered = claim.format(blocked=blocked)
        expired = f"SELECT {p} FROM {t} INDEXED BY {working_ix} WHERE {s} = {work} AND conveyor_lease_until < {NOW}"
        settle_statements(self, rows, info.pk, fence, expired, SPELLING, status_literals(rows))
        self.get_many = f"SELECT {p} AS conveyor_pk, * FROM {t} WHERE {p} IN (SELECT value FROM json_each(:ids))"
        self.has_work = (f"SELECT EXISTS (SELECT 1 FROM {t} INDEXED BY {pending_ix} WHERE {s} = {pend}) "
                         f"OR EXISTS (SELECT 1 FROM {t} INDEXED BY {working_ix} WHERE {s} = {work})")
        self.counts = f"SELECT {s}, count(*) FROM {t} GROUP BY {s}"
        self.live_counts = (f"SELECT (SELECT count(*) FROM {t} INDEXED BY {pending_ix} WHERE {s} = {pend}), "
                            f"(SELECT count(*) FROM {t} INDEXED BY {working_ix} WHERE {s} = {work})")
        k = quote(rows.key) if rows.key else "NULL"
        self.keys_of = f"SELECT {p}, CAST({k} AS TEXT) FROM {t} WHERE {p} IN (SELECT value FROM json_each(:ids))"
        self.limit_state = limit_state(rows, f"SELECT count(*) FROM {t} INDEXED BY {working_ix} WHERE {s} = {work}", NOW, "1")


__all__ = ["ADOPTED_ALL", "ADOPTED_TABLE", "CONVEYOR_COLUMNS", "HAS_ADOPTED", "Statements",
           "adopt_ddl", "describe_table", "ids_param", "undo_ddl", "when"]
