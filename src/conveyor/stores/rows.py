"""Rows processed in place: the application's own table, marked by its own status column.

A RowsStore is the Store a worker runs one `@app.rows` processor on. Its items are the table's
rows: claiming sets the status column to the working value and resolving to the done value, so the
application sees the truth in its own column. What conveyor keeps of a claim lives in columns that
`conveyor adopt` adds to the row (conveyor_token, _owner, _lease_until, _attempts, _run_at, _error,
_rescued): a claim and a resolve each write the one row, as for conveyor's own items, where a side
table keyed by table and primary key would write two rows per transition (and a join per claim).

Every settle is fenced three ways: the row's primary key, the claim's token, and the working status
value. A row the application moved meanwhile (status = 'cancelled') is refused, its handler's
transactional writes are rolled back, and the application's change stands.

The statements are the dialect's (sqlite_rows, postgres_rows); what is alike lives here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from types import ModuleType
from typing import Any

from ..errors import ConveyorError, UsageError, shown
from ..model import Claim, Item, Outcomes, QueueOptions, RowsTable, State, Token
from .common import new_token, refused
from .controls import limited_rows_claim
from .rows_sql import CONVEYOR_COLUMNS, TableInfo, index_name

_HIDDEN = frozenset(CONVEYOR_COLUMNS) | {"conveyor_pk"}
# what a settle entry carries after (id, token), by outcome (a backoff's scope: see _settle_on)
_RETRY, _FAIL, _BACKOFF = ("delay", "error"), ("error",), ("delay",)


def declaration(rows: RowsTable) -> str:
    """The declaration as adopt records it: a worker checks its own against it."""
    return json.dumps(asdict(rows), sort_keys=True)


def dialect_of(base: Any) -> ModuleType:
    """The rows statements of the store's dialect."""
    from .sqlite import SQLiteStore

    if isinstance(base, SQLiteStore):
        from . import sqlite_rows

        return sqlite_rows
    from . import postgres_rows

    return postgres_rows


def _translating(method: Callable[..., Any]) -> Callable[..., Any]:
    """A driver error becomes the base store's StoreError (a worker retries those)."""
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def async_wrapper(self: RowsStore, *args: Any, **kwargs: Any) -> Any:
            try:
                return await method(self, *args, **kwargs)
            except ConveyorError:
                raise
            except self.base.driver_error as exc:
                raise self.base._failed(exc) from exc
        return async_wrapper

    @functools.wraps(method)
    def wrapper(self: RowsStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except ConveyorError:
            raise
        except self.base.driver_error as exc:
            raise self.base._failed(exc) from exc
    return wrapper


# -- adoption -----------------------------------------------------------------------------------

def _describe(base: Any, dialect: ModuleType, rows: RowsTable) -> TableInfo:
    info = dialect.describe_table(base._conn(), rows.table)
    if info is None:
        raise UsageError(f"table {shown(rows.table)} does not exist in {base.where}")
    for what, column in (("status", rows.status), ("key", rows.key)):
        if column is not None and column not in info.columns:
            raise UsageError(f"table {shown(rows.table)} has no column {shown(column)} (the {what} column declared "
                             f"by @app.rows); its columns: {', '.join(c for c in info.columns if c not in _HIDDEN)}")
    labels = getattr(dialect, "enum_labels", lambda *a: None)(base._conn(), rows.table, rows.status)
    if labels is not None:
        missing = [str(v) for v in rows.values.values() if str(v) not in labels]
        if missing:
            raise UsageError(f"column {shown(rows.status)} of {shown(rows.table)} is an enum without the value(s) "
                             f"{', '.join(map(shown, missing))} (its values: {', '.join(labels)})")
    return info


def adopt_statements(base: Any, rows: RowsTable, undo: bool = False) -> list[str]:
    """The DDL that adopting the table (or undoing it) still needs, from what the database holds."""
    dialect = dialect_of(base)
    info = _describe(base, dialect, rows)
    if undo:
        return list(dialect.undo_ddl(rows, info))
    recorded = adopted_tables(base).get(rows.table) == rows
    return list(dialect.adopt_ddl(rows, info, None if recorded else declaration(rows)))


def apply_statements(base: Any, statements: Sequence[str]) -> None:
    """Run adopt's statements in one transaction: all of them or none."""
    with base.transaction() as conn:
        for sql in statements:
            conn.execute(sql)


def adopted_tables(base: Any) -> dict[str, RowsTable]:
    """The tables adopted in this database, with their declarations."""
    dialect = dialect_of(base)
    if not base._exists(dialect.HAS_ADOPTED):
        return {}
    return {name: RowsTable(**json.loads(text)) for name, text in base._execute(dialect.ADOPTED_ALL).fetchall()}


def check_adopted(base: Any, rows: RowsTable, command: str) -> TableInfo:
    """The table's description, or a UsageError saying it was not adopted (or was, differently)
    and the command that adopts it."""
    dialect = dialect_of(base)
    info = _describe(base, dialect, rows)
    recorded = adopted_tables(base).get(rows.table)
    problem = None
    if recorded is None:
        problem = "was not adopted"
    elif recorded != rows:
        problem = f"was adopted for another declaration ({declaration(recorded)})"
    else:
        gone = [c for c in CONVEYOR_COLUMNS if c not in info.columns]
        if gone or index_name(rows, "pending") not in info.indexes:
            problem = "is missing what adopt added (" + ", ".join(gone or [index_name(rows, "pending")]) + ")"
    if problem:
        raise UsageError(f"table {shown(rows.table)} {problem}: run `{command}` to see what it needs, "
                         "then again with --apply")
    return info


#: a table of BIG_TABLE rows or more has its done, dead and other rows recounted at most every
#: RECOUNT seconds (counting them reads the whole table: 169 ms for a million rows on SQLite here,
#: 80 ms on PostgreSQL); its pending and working rows, read from their partial indexes, are counted
#: every time
BIG_TABLE = 100_000
RECOUNT = 15.0
#: per store (so per App: a new App counts afresh), per table: when, and what was counted
_settled_counts: weakref.WeakKeyDictionary[Any, dict[str, tuple[float, dict[str, int]]]] = weakref.WeakKeyDictionary()


def row_counts(base: Any, rows: RowsTable) -> dict[str, Any]:
    """A rows table's stats, shaped like a queue's: its rows by what their status value stands
    for; `other` counts rows whose status is the application's own (cancelled, say). On a large
    table, done, dead and other may be up to RECOUNT seconds old (`counted_at` says when)."""
    from .common import empty_queue_stats

    dialect = dialect_of(base)
    info = dialect.describe_table(base._conn(), rows.table)
    stats = empty_queue_stats()
    stats["other"] = 0
    stats["rows"] = True
    if info is None:
        return stats
    statements = dialect.Statements(rows, info)
    memo = _settled_counts.setdefault(base, {})
    kept = memo.get(rows.table)
    if kept is not None and time.monotonic() - kept[0] < RECOUNT:
        pending, working = base._execute(statements.live_counts).fetchone()
        counts = {**kept[1], "pending": pending, "in_progress": working}
        stats["counted_at"] = time.time() - (time.monotonic() - kept[0])
    else:
        names = {str(v): state for state, v in rows.values.items()}
        counts = {}
        for value, n in base._execute(statements.counts).fetchall():
            state = names.get(str(value), "other")
            counts[state] = counts.get(state, 0) + n
        if sum(counts.values()) >= BIG_TABLE:
            memo[rows.table] = (time.monotonic(), {k: v for k, v in counts.items() if k not in ("pending", "in_progress")})
        else:
            memo.pop(rows.table, None)
    for state, n in counts.items():
        stats[state] += n
        stats["total"] += n
    return stats


# -- the store a worker runs on -----------------------------------------------------------------

class RowsStore:
    """The Store protocol over one adopted table, on a base store's connections."""

    def __init__(self, base: Any, rows: RowsTable, options: QueueOptions, command: str = "conveyor adopt MODULE:APP"):
        self.base = base
        self.url = base.url
        self.where = base.where
        self.rows = rows
        self.max_attempts = options.max_attempts
        self.ordered = options.ordered
        #: the command a worker's error names when the table is not adopted
        self.command = command
        self.dialect = dialect_of(base)
        self._sql: Any = None

    def __repr__(self) -> str:
        return f"<RowsStore {self.rows.table!r} on {self.where}>"

    @property
    def sql(self) -> Any:
        if self._sql is None:
            self._sql = self.dialect.Statements(self.rows, check_adopted(self.base, self.rows, self.command))
        return self._sql

    # -- schema ---------------------------------------------------------------------------------
    @_translating
    def migrate(self) -> list[int]:
        """conveyor's own tables, then the check that the table was adopted as declared."""
        applied = self.base.migrate()
        self._sql = None
        _ = self.sql
        return applied

    # -- rows to items --------------------------------------------------------------------------
    def _items(self, cur: Any, rows: list[Any]) -> list[Item]:
        names = [d[0] for d in cur.description]
        key = self.rows.key
        when = self.dialect.when
        items = []
        for row in rows:
            d = dict(zip(names, row))
            payload = {k: v for k, v in d.items() if k not in _HIDDEN}
            status = d.get(self.rows.status)
            items.append(Item(
                id=d["conveyor_pk"], queue=self.rows.table, payload=payload,
                key=None if key is None or d.get(key) is None else str(d[key]),
                attempts=d["conveyor_attempts"], state=self._state(status),
                max_attempts=self.max_attempts, lease_owner=d["conveyor_owner"],
                lease_expires_at=when(d["conveyor_lease_until"]), last_error=d["conveyor_error"],
                claim_token=d["conveyor_token"], rescued=bool(d["conveyor_rescued"]), run_at=when(d["conveyor_run_at"])))
        items.sort(key=lambda it: it.id)
        return items

    def _state(self, status: Any) -> State:
        for state, value in self.rows.values.items():
            if str(value) == str(status):
                return State(state)
        return State.CANCELLED  # the application's own value: conveyor leaves such a row alone

    # -- claim and settle -----------------------------------------------------------------------
    def _claim_on(self, conn: Any, claim: Claim, owner: str) -> list[Item]:
        sql = self.sql.claim_ordered if self.ordered else self.sql.claim
        cur: Any = None

        def claim_rows(n: int) -> list[Any]:
            nonlocal cur
            cur = conn.execute(sql, {"token": new_token(), "owner": owner, "lease": claim.lease_seconds, "limit": n})
            return cur.fetchall()

        rows = claim_rows(claim.limit) if claim.limits is None else limited_rows_claim(self, conn, claim, owner, claim_rows)
        return self._items(cur, rows) if rows else []

    def _by_token(self, conn: Any, sql: str, tokens: Sequence[Sequence[Any]], **args: Any) -> list[int]:
        """One fenced statement per claim token among the entries; returns the refused ids."""
        if not tokens:
            return []
        groups: dict[Any, list[Any]] = {}
        for entry in tokens:
            groups.setdefault(entry[1], []).append(entry[0])
        accepted: list[Any] = []
        for token, ids in groups.items():
            accepted += [r[0] for r in conn.execute(sql, {"ids": self.dialect.ids_param(ids), "token": token, **args})]
        return refused(tokens, accepted)

    def _each(self, conn: Any, sql: str, entries: Sequence[Sequence[Any]], names: Sequence[str], **args: Any) -> list[int]:
        """A statement per entry: (id, token, *values), the values bound to `names` (a retry's
        delay and error, a failure's error, a backoff's delay)."""
        lost = []
        for entry in entries:
            values = {name: float(v) if name == "delay" else _clean(v) for name, v in zip(names, entry[2:])}
            got = conn.execute(sql, {"ids": self.dialect.ids_param([entry[0]]), "token": entry[1], **values, **args}).fetchall()
            if not got:
                lost.append(entry[0])
        return lost

    def _settle_on(self, conn: Any, outcomes: Outcomes) -> list[int]:
        s = self.sql
        lost = self._by_token(conn, s.resolve, outcomes.resolved)
        lost += self._each(conn, s.retry, outcomes.retried, _RETRY, max_attempts=self.max_attempts)
        lost += self._each(conn, s.fail, outcomes.failed, _FAIL)
        lost += self._by_token(conn, s.release, outcomes.released)
        backoffs = outcomes.backedoff
        gone = self._each(conn, s.backoff, backoffs, _BACKOFF)
        lost += gone
        refused_ids = set(gone)
        taken = [e for e in backoffs if e[0] not in refused_ids]
        if taken:  # and the table (scope "queue") or the row's key is held as long, as for items
            keys = dict(conn.execute(s.keys_of, {"ids": self.dialect.ids_param([e[0] for e in taken])}).fetchall())
            self.base._hold_on(conn, [(self.rows.table, keys.get(i), float(sec), scope) for i, _, sec, scope in taken])
        return lost

    @_translating
    def settle_and_claim(self, outcomes: Outcomes, claims: Sequence[Claim], owner: str) -> tuple[list[int], list[list[Item]]]:
        with self.base.transaction() as conn:
            lost = self._settle_on(conn, outcomes) if outcomes else []
            batches = [self._claim_on(conn, c, owner) for c in claims]
        return lost, batches

    @_translating
    def claim(self, claim: Claim, owner: str) -> list[Item]:
        return self.settle_and_claim(Outcomes(), [claim], owner)[1][0]

    @_translating
    def resolve(self, tokens: Sequence[Token]) -> list[int]:
        with self.base.transaction() as conn:
            return self._by_token(conn, self.sql.resolve, tokens)

    @_translating
    def retry(self, entries: Sequence[tuple[int, int, float, str]]) -> list[int]:
        with self.base.transaction() as conn:
            return self._each(conn, self.sql.retry, entries, _RETRY, max_attempts=self.max_attempts)

    @_translating
    def fail(self, entries: Sequence[tuple[int, int, str]]) -> list[int]:
        with self.base.transaction() as conn:
            return self._each(conn, self.sql.fail, entries, _FAIL)

    @_translating
    def release(self, tokens: Sequence[Token]) -> list[int]:
        with self.base.transaction() as conn:
            return self._by_token(conn, self.sql.release, tokens)

    @_translating
    def extend_leases(self, tokens: Sequence[Token], lease_seconds: float) -> list[int]:
        with self.base.transaction() as conn:
            return self._by_token(conn, self.sql.extend, tokens, lease=float(lease_seconds))

    @_translating
    def rescue_expired(self) -> list[tuple[int, str]]:
        with self.base.transaction() as conn:
            got = conn.execute(self.sql.rescue, {"max_attempts": self.max_attempts}).fetchall()
        return [(r[0], "dead" if r[1] else "pending") for r in got]

    # -- transactional handlers -----------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        with self.base.transaction() as conn:
            yield conn

    def async_transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.base.async_transaction()

    @_translating
    async def resolve_in(self, conn: Any, tokens: Sequence[Token]) -> list[int]:
        groups: dict[Any, list[Any]] = {}
        for item_id, token in tokens:
            groups.setdefault(token, []).append(item_id)
        accepted: list[Any] = []
        for token, ids in groups.items():
            cur = conn.execute(self.sql.resolve, {"ids": self.dialect.ids_param(ids), "token": token})
            if inspect.isawaitable(cur):
                cur = await cur
            got = cur.fetchall()
            if inspect.isawaitable(got):
                got = await got
            accepted += [r[0] for r in got]
        return refused(tokens, accepted)

    # -- reads ----------------------------------------------------------------------------------
    @_translating
    def get_many(self, item_ids: Sequence[Any]) -> list[Item]:
        if not item_ids:
            return []
        cur = self.base._execute(self.sql.get_many, {"ids": self.dialect.ids_param(list(item_ids))})
        by_id = {it.id: it for it in self._items(cur, cur.fetchall())}
        return [by_id[i] for i in dict.fromkeys(item_ids) if i in by_id]

    @_translating
    def has_work(self, queues: Sequence[str]) -> bool:
        row = self.base._execute(self.sql.has_work).fetchone()
        return bool(row and row[0])

    @_translating
    def stats(self, queues: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        return {self.rows.table: row_counts(self.base, self.rows)}

    def purge(self, queue: str, older_than_seconds: float) -> int:
        return 0  # the application's rows are its own: conveyor never deletes them

    def wait_for_change(self, timeout: float, wake: Any = None) -> bool:
        return bool(self.base.wait_for_change(timeout, wake))

    def disconnect(self) -> None:
        self.base.disconnect()

    def close(self) -> None:
        self.base.close()


def _clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; an error message that contains one must still be stored."""
    return text.replace("\x00", "\\x00") if text else text
