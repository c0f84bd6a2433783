"""PostgreSQL connections for a store: one per thread (autocommit, explicit BEGIN/COMMIT in
transaction()), a second one per thread that LISTENs for wake-ups, async connections for async
transactional handlers; what a failed connection becomes (StoreError, the next call reconnects),
NOTIFY at commit, statistics after large submits, and the migration lock. The operations on items
are in postgres.PostgresStore, their statements in postgres_queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import psycopg.types.string
from psycopg.rows import tuple_row

from ..errors import ConveyorError, StoreError, UsageError
from . import postgres_queries as q
from .sql import _FORK_ORPHANS, SQLStore

WAKE_POLL = 0.005  # seconds between checks of `wake` while waiting for a notification
ANALYZE_AFTER = 10_000  # a transaction that submits this many items refreshes the planner's statistics
CONNECT_TIMEOUT = 5


def describe(url: str) -> str:
    """The database a URL names, as a log line should say it: the URL without its password."""
    scheme, _, rest = url.partition("://")
    try:
        params = psycopg.conninfo.conninfo_to_dict("postgresql://" + rest)
    except psycopg.Error:
        return "PostgreSQL (malformed URL)"
    user = str(params.get("user") or "")
    host, port, db = params.get("host") or "localhost", params.get("port") or "5432", params.get("dbname") or ""
    return f"PostgreSQL postgresql://{user + '@' if user else ''}{host}:{port}/{db}"


def _rolled_back(exc: BaseException) -> bool:
    """A deadlock or serialization failure (SQLSTATE class 40: psycopg gives each its own class,
    not a common base): the transaction was rolled back, the connection is fine."""
    return (getattr(exc, "sqlstate", None) or "").startswith("40")


class PostgresConnections(SQLStore):
    """The connection half of PostgresStore: opening, losing and closing connections, transactions,
    wake-ups (NOTIFY at commit, LISTEN to wait)."""

    queries = q
    driver_error = psycopg.Error

    def __init__(self, url: str, read_only: bool = False):
        super().__init__(url, read_only)
        scheme, _, rest = url.partition("://")
        self._conninfo = "postgresql://" + rest  # postgresql+psycopg://, postgres:// → libpq's form
        try:
            params = psycopg.conninfo.conninfo_to_dict(self._conninfo)
        except psycopg.Error as exc:
            raise UsageError(f"PostgreSQL URL is malformed: {exc}") from None
        host, port, db = params.get("host") or "localhost", params.get("port") or "5432", params.get("dbname") or "?"
        self.host = f"{host}:{port}/{db}"
        self.where = f"PostgreSQL database {self.host}"
        self._defaults: dict[str, Any] = {
            k: v for k, v in (("application_name", "conveyor"), ("connect_timeout", CONNECT_TIMEOUT)) if k not in params
        }
        #: idle async connections for async transactional handlers, per event loop id
        self._aidle: dict[int, list[Any]] = {}
        self._reached = False  # once the server has answered, a failed connect is an outage, not a bad URL
        # callers' connections (submit_many / find_dedup with conn=) → True, or what they are on instead
        self._checked_conns: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    # -- connections ----------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, **self._defaults)
            # the server answered: the URL is good, and a failure from here on is an outage (a
            # terminated backend, say), not a usage error that would stop a worker for good
            self._reached = True
            # UTC: Items carry UTC datetimes, like SQLite's. JIT off: compiling costs tens of
            # milliseconds and never pays back on these short statements (it fired on bulk submits).
            conn.execute("SET TimeZone TO 'UTC'")
            conn.execute("SET jit = off")
            if self.read_only:  # status, items, show: whatever they run can change nothing
                conn.execute("SET default_transaction_read_only = on")
            # payload arrives as its JSON text, decoded by common.row_to_item like SQLite's (a JSON
            # string payload would otherwise come back already decoded and be decoded twice)
            conn.adapters.register_loader("json", psycopg.types.string.TextLoader)
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            if self._reached:
                raise StoreError(f"cannot reach PostgreSQL at {self.host}: {reason}") from exc
            raise UsageError(f"cannot connect to PostgreSQL at {self.host}: {reason}") from None
        return conn

    def _failed(self, exc: BaseException) -> ConveyorError:
        """A driver error: the connection it came from is dropped if it failed (the next call
        reconnects). A deadlock or serialization failure (SQLSTATE 40) leaves the connection fine:
        only its transaction was rolled back, so it is kept and the caller retries."""
        conn = getattr(self._local, "conn", None)
        if isinstance(exc, psycopg.OperationalError) and conn is not None:
            return self._lost(conn, exc)
        if _rolled_back(exc):
            return StoreError(f"PostgreSQL at {self.host} rolled the transaction back ({getattr(exc, 'sqlstate', '')}): {exc}")
        return StoreError(f"PostgreSQL at {self.host}: {type(exc).__name__}: {exc}")

    def _lost(self, conn: psycopg.Connection[Any], exc: BaseException) -> StoreError:
        """The connection failed: forget it (the next call reconnects) and say so; see _failed."""
        if _rolled_back(exc) and not conn.closed:
            return StoreError(f"PostgreSQL at {self.host} rolled the transaction back ({exc.sqlstate}): {exc}")  # type: ignore[attr-defined]
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
            self._local.depth = 0
        self._forget(conn)
        return StoreError(f"PostgreSQL at {self.host} failed, connection dropped (the next call reconnects): {exc}")

    def _execute(self, sql: str, args: Any = None) -> psycopg.Cursor[Any]:
        conn = self._conn()
        try:
            return conn.execute(sql, args)
        except psycopg.OperationalError as exc:
            raise self._lost(conn, exc) from exc

    _run = _execute  # the name tests and benchmarks use

    def _one(self, sql: str, args: Any = None) -> tuple[Any, ...]:
        """The one row a statement returns (an aggregate, a RETURNING of one row)."""
        row = self._execute(sql, args).fetchone()
        if row is None:
            raise StoreError(f"PostgreSQL at {self.host} returned no row for a statement that always returns one")
        return tuple(row)

    def _execute_on(self, conn: Any, sql: str, args: Any) -> Any:
        return conn.cursor(row_factory=tuple_row).execute(sql, args)  # a caller's may have another row factory

    def disconnect(self) -> None:
        if os.getpid() != self._pid:
            return
        listener = getattr(self._local, "listener", None)
        self._local.listener = None
        self._forget(listener)
        super().disconnect()

    def close(self) -> None:
        aconns = [c for idle in self._aidle.values() for c in idle]
        self._aidle = {}
        super().close()
        if os.getpid() != self._pid:
            _FORK_ORPHANS.extend(aconns)
            return
        for aconn in aconns:  # their event loops may be gone: close the socket directly
            with contextlib.suppress(Exception):
                aconn.pgconn.finish()

    # -- transactions ---------------------------------------------------------------------------
    def _begin(self, conn: psycopg.Connection[Any]) -> None:
        self._execute("BEGIN")
        self._local.notify, self._local.submitted = set(), 0

    def _rollback(self, conn: psycopg.Connection[Any], exc: BaseException) -> BaseException | None:
        if self._local.conn is conn:
            try:
                conn.execute("ROLLBACK")
            except psycopg.Error as rollback_exc:
                err = self._lost(conn, rollback_exc)
                if isinstance(exc, psycopg.OperationalError):
                    return err
        if isinstance(exc, psycopg.OperationalError):  # the caller's own statement lost the server
            return self._lost(conn, exc) if self._local.conn is conn else StoreError(str(exc))
        return None

    def _commit(self, conn: psycopg.Connection[Any]) -> None:
        local = self._local
        if local.conn is not conn:
            raise StoreError(f"PostgreSQL at {self.host}: the connection was lost inside a transaction, which was rolled back")
        try:
            if local.notify:
                self._execute(q.NOTIFY, (sorted(local.notify),))
            self._execute("COMMIT")
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            raise
        if local.submitted >= ANALYZE_AFTER:
            self._analyze()
            local.submitted = 0

    def _notify(self, queues: Any) -> None:
        """Wake idle workers when the current transaction commits (one notification per queue)."""
        self._local.notify.update(queues)

    def _analyze(self) -> None:
        """Fresh statistics after a large submit that the planner's view of the table does not yet
        account for (a fresh table, or one that grew by a fifth), so claims and stats keep good
        plans without waiting for autovacuum. A small sample is plenty for the few columns the plans
        depend on and keeps this to a few milliseconds. SKIP_LOCKED: if autovacuum or another
        submitter is analyzing right now, theirs will do."""
        known = self._one(q.KNOWN_ROWS)[0]
        if self._local.submitted < max(0.0, known) / 5:
            return
        with self.transaction():
            self._execute(q.ANALYZE_SAMPLE)
            self._execute(q.ANALYZE_AFTER_SUBMIT)

    # -- schema ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _migration_transaction(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        try:
            conn.execute("BEGIN")
            # Workers starting together queue here; each re-reads what the previous one applied.
            conn.execute(q.MIGRATION_LOCK)
            yield
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, psycopg.OperationalError):
                raise self._lost(conn, exc) from exc
            raise StoreError(f"migrating PostgreSQL at {self.host} failed: {exc}") from exc

    # -- async transactional handlers -----------------------------------------------------------
    async def _aconnect(self) -> psycopg.AsyncConnection[Any]:
        try:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True, **self._defaults)
            await conn.execute("SET TimeZone TO 'UTC'")
            await conn.execute("SET jit = off")
        except psycopg.Error as exc:
            raise StoreError(f"cannot reach PostgreSQL at {self.host}: {exc}") from exc
        return conn

    @contextlib.asynccontextmanager
    async def async_transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A transaction on an async connection of its own, for one async transactional handler.
        Idle connections are kept per event loop and reused; one that failed is discarded."""
        loop = asyncio.get_running_loop()
        idle = self._aidle.setdefault(id(loop), [])
        conn = idle.pop() if idle else await self._aconnect()
        healthy = False
        try:
            async with conn.transaction():
                conn.conveyor_notify = set()  # type: ignore[union-attr]
                yield conn
                for queue in sorted(conn.conveyor_notify):  # type: ignore[union-attr]
                    await conn.execute("SELECT pg_notify(%s, %s)", (q.CHANNEL, queue))
            healthy = True
        except psycopg.OperationalError as exc:
            raise StoreError(f"PostgreSQL at {self.host}: {exc}") from exc
        except BaseException:
            healthy = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            raise
        finally:
            if healthy and not conn.closed and os.getpid() == self._pid:
                idle.append(conn)
            else:
                with contextlib.suppress(Exception):
                    await conn.close()

    # -- list_items: one transaction per page, under its planner settings -----------------------
    @contextlib.contextmanager
    def _listing(self) -> Iterator[None]:
        """A page's statements in one transaction of their own (a read-only store may open one),
        planned under LIST_PLANNER; inside a caller's store transaction, as they come."""
        conn = self._conn()
        if self._local.depth:
            yield
            return
        with conn.transaction():
            self._execute(q.LIST_PLANNER)
            yield

    # -- wake-ups -------------------------------------------------------------------------------
    def _listener(self) -> psycopg.Connection[Any]:
        self._check_fork()
        conn = getattr(self._local, "listener", None)
        if conn is None:
            conn = self._register(self._connect())
            try:
                conn.execute(q.LISTEN)
            except psycopg.OperationalError as exc:
                self._forget(conn)
                raise StoreError(f"PostgreSQL at {self.host} failed while subscribing to wake-ups: {exc}") from exc
            self._local.listener = conn
        return conn

    def wait_for_change(self, timeout: float, wake: Any = None) -> bool:
        """Wait for a NOTIFY on the conveyor channel (sent when items become ready), on a listening
        connection this thread keeps open: a notification that arrived since the last call counts
        too, so a submit between a short claim and this wait is never missed. `wake` is polled
        every few milliseconds."""
        conn = self._listener()
        deadline = time.monotonic() + timeout
        try:
            changed = any(True for _ in conn.notifies(timeout=0))
            while not changed:
                if wake is not None and wake.is_set():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                changed = any(True for _ in conn.notifies(timeout=min(WAKE_POLL, left), stop_after=1))
            for _ in conn.notifies(timeout=0):  # swallow the burst: one wake-up is enough
                pass
            return True
        except psycopg.OperationalError as exc:
            self._local.listener = None
            self._forget(conn)
            raise StoreError(f"PostgreSQL at {self.host} failed while waiting for wake-ups: {exc}") from exc
