"""What both SQL stores do alike: a connection per thread (none ever crosses a fork), nested
transactions, numbered migrations, driver errors turned into conveyor's, and the Store methods that
differ only in their SQL text (the dialect's queries module, the same names in each).

A backend says how to connect, begin, commit and roll back, how to run a batch settle, a claim and a
bulk submit, and how to wait for a change; everything else is here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

from ..errors import ConveyorError, ItemNotFound, StoreError, UsageError
from ..model import Claim, Item, Token
from .common import list_args, newest_first, row_to_item
from .controls import limited_claim
from .schedules import ScheduleQueries

#: a forked child's copies of its parent's connections: kept referenced, never closed (closing
#: would end the parent's session, or crash on a sqlite3 handle another process owns)
_FORK_ORPHANS: list[Any] = []

#: Store methods whose driver errors become StoreError (see SQLStore.__init_subclass__)
TRANSLATED = (
    "migrate", "submit_many", "submit_payloads", "find_dedup", "claim", "resolve", "retry", "fail", "release",
    "settle_and_claim", "extend_leases", "rescue_expired", "get", "get_many", "stats", "has_work", "cancel", "requeue",
    "purge", "wait_for_change", "list_items", "resolve_in", "backoff", "pause", "resume", "controls", "clock", "key_ahead",
    "schedules", "advance_schedule",  # schedules.ScheduleQueries
)


def _translating(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Store method so a driver error leaves it as StoreError, never as the driver's own."""
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def async_wrapper(self: SQLStore, *args: Any, **kwargs: Any) -> Any:
            try:
                return await method(self, *args, **kwargs)
            except self.driver_error as exc:
                raise self._failed(exc) from exc

        return async_wrapper

    @functools.wraps(method)
    def wrapper(self: SQLStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except self.driver_error as exc:
            raise self._failed(exc) from exc

    wrapper.__wrapped_store_method__ = True  # type: ignore[attr-defined]
    return wrapper


class SQLStore(ScheduleQueries):
    """The shared half of a SQL store. Subclasses set `queries`, `driver_error` and `where`."""

    #: the dialect's statements (sqlite_queries, postgres_queries)
    queries: ModuleType
    #: the driver's base exception (sqlite3.Error, psycopg.Error)
    driver_error: type[BaseException] = Exception
    #: the database, as messages name it
    where: str = "?"
    #: a thread may close another live thread's connection (psycopg: yes; sqlite3: crashes)
    closes_others = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in TRANSLATED:
            method = getattr(cls, name, None)
            if method is not None and not getattr(method, "__wrapped_store_method__", False):
                setattr(cls, name, _translating(method))

    def __init__(self, url: str, read_only: bool = False):
        self.url = url
        #: never create, migrate or write (status, items, show)
        self.read_only = read_only
        self._local = threading.local()
        self._lock = threading.Lock()
        #: every open connection, with the thread it belongs to
        self._conns: dict[Any, threading.Thread] = {}
        self._pid = os.getpid()
        self._migrated = False

    # -- what a backend provides --------------------------------------------------------------
    def _connect(self) -> Any:
        """A new connection of the driver's, set up for conveyor."""
        raise NotImplementedError

    def _begin(self, conn: Any) -> None:
        raise NotImplementedError

    def _commit(self, conn: Any) -> None:
        raise NotImplementedError

    def _rollback(self, conn: Any, exc: BaseException) -> BaseException | None:
        """Roll back after `exc` escaped a transaction; returns what to raise instead, if anything."""
        raise NotImplementedError

    def _writer_turn(self) -> contextlib.AbstractContextManager[Any]:
        """Held around a whole write transaction (SQLite: the writer queue)."""
        return contextlib.nullcontext()

    def _failed(self, exc: BaseException) -> ConveyorError:
        """The error a driver error becomes (and what the store does about its connection)."""
        return StoreError(f"{self.where}: {type(exc).__name__}: {exc}".strip())

    def _notify(self, queues: Any) -> None:
        """Wake idle workers on these queues once the current transaction commits (where the
        database can: PostgreSQL's NOTIFY; SQLite's workers notice commits by themselves)."""

    def _fenced(self, sql: str, entries: Sequence[Sequence[Any]], **extra: Any) -> list[int]:
        """Run a batch settle statement over (id, token, ...) entries; returns the refused ids."""
        raise NotImplementedError

    def _claim_rows(self, conn: Any, claim: Claim, owner: str) -> list[Any]:
        raise NotImplementedError

    def _execute(self, sql: str, args: Any = None) -> Any:
        """Run one statement on this thread's connection; returns the cursor."""
        return self._conn().execute(sql, args if args is not None else ())

    # -- connections --------------------------------------------------------------------------
    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # forked: never touch (or close) the parent's connections
            _FORK_ORPHANS.extend(self._conns)
            self._local = threading.local()
            self._conns = {}
            self._lock = threading.Lock()
            self._pid = os.getpid()

    def _register(self, conn: Any) -> Any:
        with self._lock:
            self._conns[conn] = threading.current_thread()
        return conn

    def _forget(self, conn: Any) -> None:
        """Close one connection of this process and stop tracking it."""
        if conn is None:
            return
        with self._lock:
            self._conns.pop(conn, None)
        with contextlib.suppress(Exception):
            conn.close()

    def _conn(self) -> Any:
        """This thread's connection, opened (and the schema migrated or checked) on first use."""
        self._check_fork()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._register(self._connect())
            self._local.conn = conn
            self._local.depth = 0
            # a store migrates on its first connection; migrate() reports what that applied
            if self._migrated:
                self._local.applied = []
            else:
                self._local.applied = self._check_schema() if self.read_only else self._migrate(conn)
        return conn

    def disconnect(self) -> None:
        """Close the calling thread's connection (threads call it as they end)."""
        if os.getpid() != self._pid:
            return
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        self._forget(conn)

    def close(self) -> None:
        """Close this process's connections: every one where the driver allows it; else this
        thread's and those of threads that have ended (a live thread's closes when it lets go)."""
        with self._lock:
            conns, self._conns = self._conns, {}
        self._local = threading.local()
        if os.getpid() != self._pid:
            _FORK_ORPHANS.extend(conns)
            return
        me = threading.current_thread()
        for conn, owner in conns.items():
            if self.closes_others or owner is me or not owner.is_alive():
                with contextlib.suppress(Exception):
                    conn.close()

    # -- transactions -------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A write transaction on this thread's connection; store calls made inside join it.
        Yields the driver's own connection."""
        if self.read_only:
            raise UsageError(f"{self.where} was opened read-only: it cannot be written")
        conn = self._conn()
        local = self._local
        if local.depth:
            local.depth += 1
            try:
                yield conn
            finally:
                if local.conn is conn:
                    local.depth -= 1
            return
        with self._writer_turn():
            self._begin(conn)
            local.depth = 1
            try:
                yield conn
            except BaseException as exc:
                local.depth = 0
                instead = self._rollback(conn, exc)
                if instead is not None:
                    raise instead from exc
                raise
            local.depth = 0
            self._commit(conn)

    # -- schema -------------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        """Apply the numbered migrations not applied yet; return the versions applied now."""
        if self.read_only:
            raise UsageError(f"{self.where} was opened read-only: it cannot be migrated")
        conn = self._conn()
        on_open, self._local.applied = getattr(self._local, "applied", []), []
        return on_open + self._migrate(conn)

    def _exists(self, sql: str) -> bool:
        row = self._execute(sql).fetchone()
        return bool(row and row[0])

    def _versions_done(self) -> set[int]:
        if not self._exists(self.queries.HAS_MIGRATIONS_TABLE):
            return set()
        return {row[0] for row in self._execute(self.queries.MIGRATIONS_DONE)}

    def _migrate(self, conn: Any) -> list[int]:
        q = self.queries
        wanted = {v for v, _, _ in q.MIGRATIONS}
        # fast path, without any lock: every worker checks this on its first connection
        if wanted <= self._versions_done():
            self._migrated = True
            return []
        applied: list[int] = []
        with self._migration_transaction(conn):
            conn.execute(q.CREATE_MIGRATIONS)
            done = {row[0] for row in conn.execute(q.MIGRATIONS_DONE)}  # re-read under the lock
            for version, name, script in q.MIGRATIONS:
                if version not in done:
                    self._run_script(conn, script)
                    conn.execute(q.RECORD_MIGRATION, (version, name))
                    applied.append(version)
        if applied:
            self._execute(q.ANALYZE_AFTER_MIGRATION)
        self._migrated = True
        return applied

    def _migration_transaction(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """A transaction in which migrations run one process at a time."""
        raise NotImplementedError

    def _run_script(self, conn: Any, script: str) -> None:
        conn.execute(script)

    def _check_schema(self) -> list[int]:
        """For a read-only store, in place of migrating: say what is missing, change nothing."""
        wanted = {v for v, _, _ in self.queries.MIGRATIONS}
        if not self._exists(self.queries.HAS_ITEMS_TABLE):
            raise UsageError(f"{self.where} has no conveyor tables (conveyor_items): it is not a conveyor database; "
                             "check --db or $CONVEYOR_DATABASE_URL, or run `conveyor migrate` to create them")
        if not wanted <= self._versions_done():
            raise UsageError(f"{self.where} has an older conveyor schema: run `conveyor migrate` first")
        self._migrated = True
        return []

    # -- claim and settle ---------------------------------------------------------------------
    def _claim_lock(self, claim: Claim) -> None:
        """Taken inside an ordered or limited claim's transaction before it claims (PostgreSQL)."""

    def claim(self, claim: Claim, owner: str) -> list[Item]:
        """Atomically take up to `claim.limit` ready pending items of a queue."""
        with self.transaction() as conn:
            rows = self._claim_any(conn, claim, owner)
        return self._items(rows)

    def _claim_any(self, conn: Any, claim: Claim, owner: str) -> list[Any]:
        """A claim's rows inside the caller's transaction: limited claims through stores.controls."""
        if claim.limits is not None:
            return limited_claim(self, conn, claim, owner)
        if claim.ordered:
            self._claim_lock(claim)
        return self._claim_rows(conn, claim, owner)

    def _claim_ids(self, conn: Any, claim: Claim, owner: str, ids: Sequence[int]) -> list[Any]:
        """Claim exactly these pending items (a limited claim's picks)."""
        raise NotImplementedError

    def _pending_keys(self, conn: Any, queue: str, most: int) -> list[str]:
        """Up to `most` keys with pending or in-progress items of the queue."""
        raise NotImplementedError

    def _key_heads(self, conn: Any, queue: str, keys: Sequence[str], now: float, most: int) -> list[Any]:
        """Each key's first `most` pending due items, as (id, key, priority, run_at)."""
        raise NotImplementedError

    # -- flow control ---------------------------------------------------------------------------
    def backoff(self, entries: Sequence[tuple[int, int, float, str]]) -> list[int]:
        """(id, token, seconds, scope): back to pending after `seconds` without spending an
        attempt, and their key (scope "key") or queue ("queue") held as long. Returns refused ids."""
        if not entries:
            return []
        with self.transaction() as conn:
            return self._backoff_on(conn, entries)

    def _backoff_on(self, conn: Any, entries: Sequence[tuple[int, int, float, str]]) -> list[int]:
        q = self.queries
        lost = self._fenced(q.BACKOFF, [(i, t, float(sec)) for i, t, sec, _ in entries])
        refused_ids = set(lost)
        taken = [e for e in entries if e[0] not in refused_ids]
        if not taken:
            return lost
        where = {row[0]: (row[1], row[2]) for row in conn.execute(q.ITEM_KEYS, (self._id_list([e[0] for e in taken]),))}
        self._hold_on(conn, [(*where[item_id], seconds, scope) for item_id, _, seconds, scope in taken])
        return lost

    def _hold_on(self, conn: Any, backoffs: Sequence[tuple[str, str | None, float, str]]) -> None:
        """Hold what Backoffs name, each (queue, key, seconds, scope): the queue (scope "queue") or
        the key, until the database's clock plus its seconds (the longest, where several name one)."""
        q = self.queries
        now = float(conn.execute(q.CONTROL_NOW).fetchone()[0])
        holds: dict[tuple[str, str, str], float] = {}
        for queue, key, seconds, scope in backoffs:
            if scope == "queue":
                target = (queue, "queue", "")
            elif key is not None:
                target = (queue, "key", key)
            else:
                continue  # an item without a key holds only itself (its run_at)
            holds[target] = max(holds.get(target, 0.0), now + seconds)
        for queue in {t[0] for t in holds}:
            conn.execute(q.FORGET_CONTROLS, (queue, now))
        for (queue, scope, key), until in holds.items():
            conn.execute(q.HOLD, (queue, scope, key, until, "Backoff raised by a handler") + self._hold_extra(now))

    def _hold_extra(self, now: float) -> tuple[Any, ...]:
        """HOLD's parameters after the reason (SQLite: updated_at)."""
        return ()

    def pause(self, queue: str, key: str | None = None) -> None:
        """Claim nothing of the queue (or of one key of it) until resumed; running items finish."""
        with self.transaction():
            self._execute(self.queries.PAUSE, (queue, "queue" if key is None else "key", "" if key is None else key))

    def resume(self, queue: str, key: str | None = None) -> bool:
        """Undo pause(); returns whether it was paused."""
        with self.transaction():
            n = self._execute(self.queries.RESUME, (queue, "queue" if key is None else "key",
                                                    "" if key is None else key)).rowcount
            self._notify([queue])
        return bool(n)

    def clock(self) -> float:
        """The database's clock, unix seconds."""
        return float(self._execute(self.queries.CONTROL_NOW).fetchone()[0])

    def key_ahead(self, queue: str, key: str, item_id: int) -> tuple[int, str] | None:
        """The earliest pending or running item of the key submitted before this one, if any."""
        row = self._execute(self.queries.KEY_AHEAD, (queue, key, item_id)).fetchone()
        return None if row is None else (row[0], row[1])

    def controls(self) -> list[dict[str, Any]]:
        """What pauses or holds something now: [{queue, key (None: the whole queue), paused,
        held_until (unix seconds or None), reason}]."""
        now = self.clock()
        return [{"queue": queue, "key": None if scope == "queue" else key, "paused": bool(paused),
                 "held_until": held if held is not None and held > now else None, "reason": reason}
                for queue, scope, key, paused, held, reason in self._execute(self.queries.CONTROLS, (now,)).fetchall()]

    @staticmethod
    def _items(rows: list[Any]) -> list[Item]:
        """Claimed rows as Items, in claim order: highest priority first, then oldest."""
        times: dict[float, Any] = {}
        items = [row_to_item(r, times) for r in rows]
        items.sort(key=lambda i: (-i.priority, i.run_at, i.id))
        return items

    def resolve(self, tokens: Sequence[Token]) -> list[int]:
        return self._fenced(self.queries.RESOLVE, tokens)

    def retry(self, entries: Sequence[tuple[int, int, float, str]]) -> list[int]:
        return self._fenced(self.queries.RETRY, [(i, t, float(d), e) for i, t, d, e in entries])

    def fail(self, entries: Sequence[tuple[int, int, str]]) -> list[int]:
        return self._fenced(self.queries.FAIL, entries)

    def release(self, tokens: Sequence[Token]) -> list[int]:
        return self._fenced(self.queries.RELEASE, tokens)

    def extend_leases(self, tokens: Sequence[Token], lease_seconds: float) -> list[int]:
        return self._fenced(self.queries.EXTEND_LEASES, tokens, lease=float(lease_seconds))

    # -- operators ----------------------------------------------------------------------------
    def get_many(self, item_ids: Sequence[int]) -> list[Item]:
        if not item_ids:
            return []
        found = {row[0]: row for row in self._execute(self.queries.GET_MANY, (self._id_list(item_ids),))}
        return [row_to_item(found[i]) for i in dict.fromkeys(item_ids) if i in found]

    def get(self, item_id: int) -> Item:
        row = self._execute(self.queries.GET, (item_id,)).fetchone()
        if row is None:
            raise ItemNotFound(f"no item with id {item_id}")
        return row_to_item(row)

    def list_items(self, queue: str | None = None, *, state: str | None = None, key: str | None = None,
                   before_id: int | None = None, limit: int = 50) -> list[Item]:
        state, before = list_args(queue, state, key, before_id, limit)
        args: dict[str, Any] = {"before": before, "limit": limit, "key": key}
        with self._listing():
            if queue is None and state is None and key is None:
                return [row_to_item(r) for r in self._execute(self.queries.LIST, args).fetchall()]
            names = [queue] if queue is not None else [r[0] for r in self._execute(self.queries.QUEUES).fetchall()]
            rows = [row for name in names for row in self._list_page(state, key, args | {"queue": name})]
        return newest_first(rows, limit)

    def _listing(self) -> contextlib.AbstractContextManager[Any]:
        """Around the statements of one list_items page."""
        return contextlib.nullcontext()

    def _list_page(self, state: str | None, key: str | None, args: dict[str, Any]) -> list[Any]:
        """One queue's rows of a list_items page. Pending items (or all of a queue's) are usually
        among the newest rows: LIST_RECENT looks at the newest LIST_WINDOW of them first, and only
        when that holds less than a page do the dialect's indexed reads run (_list_queue)."""
        if key is None and state in self.queries.LIST_RECENT:
            recent = self._execute(self.queries.LIST_RECENT[state], args | {"window": self.queries.LIST_WINDOW}).fetchall()
            if len(recent) == args["limit"]:
                return recent
        return self._list_queue(state, key, args)

    def _list_queue(self, state: str | None, key: str | None, args: dict[str, Any]) -> list[Any]:
        """One queue's rows of a list_items page from its indexes (up to `limit` of each part; the
        caller merges)."""
        raise NotImplementedError

    def _callers(self, conn: Any) -> Any:
        """A caller's connection, checked to be the driver's and on this store's database."""
        raise NotImplementedError

    def _execute_on(self, conn: Any, sql: str, args: Any) -> Any:
        return conn.execute(sql, args)

    def find_dedup(self, queue: str, dedup_key: str, conn: Any = None) -> int | None:
        """The id stored under this dedup key; given `conn`, as the caller's transaction sees it."""
        args = (queue, dedup_key)
        if conn is None:
            row = self._execute(self.queries.FIND_DEDUP, args).fetchone()
        else:
            row = self._execute_on(self._callers(conn), self.queries.FIND_DEDUP, args).fetchone()
        return row[0] if row else None

    def cancel(self, item_id: int) -> None:
        with self.transaction():
            row = self._execute(self.queries.CANCEL_SELECT, (item_id,)).fetchone()
            if row is None:
                raise ItemNotFound(f"no item with id {item_id}")
            state, queue, key = row
            if state not in ("pending", "in_progress"):
                raise UsageError(f"item {item_id} is {state}: only pending or in-progress items can be cancelled")
            self._execute(self.queries.CANCEL, (item_id,))
            if key is not None:
                self._notify([queue])  # the next item of its key may start

    def _id_list(self, ids: Sequence[int]) -> Any:
        """A list of ids as one statement parameter."""
        return list(ids)

    def requeue(self, queue: str, ids: Sequence[int] | None = None) -> int:
        if ids is not None and not ids:
            return 0
        with self.transaction():
            if ids is None:
                n = self._execute(self.queries.REQUEUE, (queue,)).rowcount
            else:
                n = self._execute(self.queries.REQUEUE_IDS, (queue, self._id_list(ids))).rowcount
            if n:
                self._notify([queue])
        return n

    def purge(self, queue: str, older_than_seconds: float) -> int:
        with self.transaction():
            return self._execute(self.queries.PURGE, (queue, float(older_than_seconds))).rowcount
