"""The scale-out store: PostgreSQL through psycopg 3, shared by any number of worker processes.

Claims lock their rows with FOR UPDATE SKIP LOCKED, so concurrent claimers pass each other instead
of queueing. Every time is judged by the database's clock (statement_timestamp()), never by
Python's, so workers on machines with skewed clocks agree on leases. Each thread has its own
connection (autocommit; explicit BEGIN/COMMIT in transaction()), and a second one for LISTEN. The
statements are in postgres_queries; what both SQL stores do alike is in sql.SQLStore.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import time
import weakref
from typing import Any, AsyncIterator, Iterator, Sequence

import psycopg
import psycopg.types.string
from psycopg.rows import tuple_row

from ..codec import encode
from ..errors import ConveyorError, StoreError, UsageError
from ..model import Claim, Item, NewItem, Outcomes, Token
from . import postgres_queries as q
from .common import new_token, refused, shape_stats
from .sql import _FORK_ORPHANS, SQLStore

WAKE_POLL = 0.005  # seconds between checks of `wake` while waiting for a notification
ANALYZE_AFTER = 10_000  # a transaction that submits this many items refreshes the planner's statistics
CONNECT_TIMEOUT = 5
MIGRATIONS = q.MIGRATIONS
COPY_FROM = q.COPY_FROM

# payload is JSON, not JSONB: measured, bulk COPY costs the same either way (220 vs 227 ms for 20k),
# but JSON returns the payload text exactly as submitted (key order, like SQLite) and accepts
# "\u0000", which JSONB refuses. Index a JSONB expression if payloads must be queried.


def describe(url: str) -> str:
    """The database a URL names, as a log line should say it: the URL without its password."""
    scheme, _, rest = url.partition("://")
    try:
        params = psycopg.conninfo.conninfo_to_dict("postgresql://" + rest)
    except psycopg.Error:
        return "PostgreSQL (malformed URL)"
    user = params.get("user")
    host, port, db = params.get("host") or "localhost", params.get("port") or "5432", params.get("dbname") or ""
    return f"PostgreSQL postgresql://{user + '@' if user else ''}{host}:{port}/{db}"


def _bigints(values: Any) -> str:
    """A bigint[] parameter as its text form: one join, instead of psycopg's per-element list
    adaptation (measured: most of the client cost of a settle's parameters)."""
    return "{" + ",".join(map(str, values)) + "}"


def _rolled_back(exc: BaseException) -> bool:
    """A deadlock or serialization failure (SQLSTATE class 40: psycopg gives each its own class,
    not a common base): the transaction was rolled back, the connection is fine."""
    return (getattr(exc, "sqlstate", None) or "").startswith("40")


def _clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; an error message that contains one must still be stored."""
    return text.replace("\x00", "\\x00") if text else text


class PostgresStore(SQLStore):
    """Store on a PostgreSQL database. Each thread gets its own connection."""

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
            return StoreError(f"PostgreSQL at {self.host} rolled the transaction back ({exc.sqlstate}): {exc}")
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
        known = self._execute(q.KNOWN_ROWS).fetchone()[0]
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

    # -- submit ---------------------------------------------------------------------------------
    def submit_many(self, items: Sequence[NewItem], conn: Any = None) -> list[int | None]:
        """Store the items in one transaction: ours, or, given `conn`, the caller's (see _callers)."""
        if conn is not None:
            return self._submit_on(self._callers(conn), items)
        if not items:
            return []
        with self.transaction() as own:
            try:
                ids = self._insert_small(own, items) if len(items) < COPY_FROM else self._insert_copy(own, items)
            except psycopg.DataError as exc:
                raise UsageError(f"PostgreSQL refused the items: {exc}") from None
            except psycopg.OperationalError as exc:
                raise self._lost(own, exc) from exc
            self._notify({it.queue for it in items})
            self._local.submitted += len(items)
        return ids

    def submit_payloads(self, queue: str, payloads: Sequence[Any], run_at: float | None, priority: int) -> int:
        """COPY, each payload encoded as its row is written: the server stores the rows already sent
        while Python encodes the next ones (measured, 20k items: ~0.2 s, against ~0.3 s for
        encoding everything first). Small batches take submit_many's one-statement path."""
        if len(payloads) < COPY_FROM:
            items = [NewItem(queue, encode(p), None, None, run_at, priority) for p in payloads]
            return sum(1 for i in self.submit_many(items) if i is not None)
        sql = q.COPY_PAYLOADS.format(run_at="" if run_at is None else ", run_at")
        when = None if run_at is None else dt.datetime.fromtimestamp(run_at, dt.timezone.utc)
        with self.transaction() as own:
            try:
                with own.cursor().copy(sql) as copy:
                    if when is None:
                        copy.set_types(q.COPY_PAYLOADS_TYPES[:3])
                        rows = ((queue, encode(p), priority) for p in payloads)
                    else:
                        copy.set_types(q.COPY_PAYLOADS_TYPES)
                        rows = ((queue, encode(p), priority, when) for p in payloads)
                    write = copy.write_row
                    for row in rows:
                        write(row)
            except psycopg.DataError as exc:
                raise UsageError(f"PostgreSQL refused the items: {exc}") from None
            except psycopg.OperationalError as exc:
                raise self._lost(own, exc) from exc
            self._notify((queue,))
            self._local.submitted += len(payloads)
        return len(payloads)

    def _submit_on(self, conn: psycopg.Connection[Any], items: Sequence[NewItem]) -> list[int | None]:
        """Insert on the caller's connection, inside the caller's transaction, without BEGIN or
        COMMIT of ours: the items (and the wake-up NOTIFY, which PostgreSQL sends only at commit)
        exist if and only if the caller commits. A connection in autocommit mode outside any
        transaction gets one of its own around the insert (it commits when this returns, as
        autocommit means). No ANALYZE afterwards: the rows are not committed yet (autovacuum will;
        the claim plans do not depend on it)."""
        if not items:
            return []
        own_tx = conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        try:
            with conn.transaction() if own_tx else contextlib.nullcontext():
                ids = self._insert_small(conn, items) if len(items) < COPY_FROM else self._insert_copy(conn, items)
                conn.execute(q.NOTIFY, (sorted({it.queue for it in items}),))
        except psycopg.DataError as exc:
            raise UsageError(f"PostgreSQL refused the items (the caller's transaction has failed: roll it back): {exc}") from None
        except psycopg.OperationalError as exc:
            raise StoreError(f"PostgreSQL failed on the caller's connection: {exc}") from exc
        return ids

    def _callers(self, conn: Any) -> psycopg.Connection[Any]:
        """Check a caller's connection before running on it: a psycopg Connection, open, not in a
        failed transaction, and on this store's database. The database is compared once per
        connection object (name, server port and postmaster start time: the same server answers
        to localhost, 127.0.0.1 and a socket path alike, so client-side host strings would not do)."""
        if not isinstance(conn, psycopg.Connection):
            raise UsageError(
                f"conn must be a psycopg.Connection to the store's PostgreSQL database ({self.host}), "
                f"not {type(conn).__module__}.{type(conn).__qualname__}"
            )
        if conn.closed:
            raise UsageError("conn is closed: pass an open psycopg connection, inside the transaction to submit in")
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            raise UsageError("conn is in a failed transaction: roll it back before submitting on it")
        checked = self._checked_conns.get(conn)
        if checked is None:
            try:
                theirs = tuple(conn.cursor(row_factory=tuple_row).execute(q.IDENTITY).fetchone())
            except psycopg.Error as exc:
                raise UsageError(f"conn could not be checked against {self.host}: {exc}") from None
            ours = tuple(self._execute(q.IDENTITY).fetchone())
            checked = theirs == ours
            if not checked:
                checked = f"database {theirs[0]!r} at port {theirs[1]}"
            self._checked_conns[conn] = checked
        if checked is not True:
            raise UsageError(f"conn is connected to {checked}, not to this store's database {self.host}: "
                             "a transactional submit must run on the same database")
        return conn

    def _insert_small(self, conn: psycopg.Connection[Any], items: Sequence[NewItem]) -> list[int | None]:
        cols = [[it.queue for it in items], [it.payload_json for it in items], [it.key for it in items],
                [it.dedup_key for it in items], [it.priority for it in items], [it.run_at for it in items]]
        cur = conn.cursor(row_factory=tuple_row)  # a caller's connection may have another row factory
        return [item_id if stored else None for item_id, stored in cur.execute(q.INSERT, cols).fetchall()]

    def _insert_copy(self, conn: psycopg.Connection[Any], items: Sequence[NewItem]) -> list[int | None]:
        cur = conn.cursor(row_factory=tuple_row)
        now, ids = cur.execute(q.ALLOCATE, (len(items),)).fetchone()
        run_at = [now if it.run_at is None else dt.datetime.fromtimestamp(it.run_at, dt.timezone.utc) for it in items]
        dedup = [n for n, it in enumerate(items) if it.dedup_key is not None]
        if len(dedup) < len(items):
            with conn.cursor().copy(q.COPY) as copy:
                copy.set_types(q.COPY_TYPES)
                for n, it in enumerate(items):
                    if it.dedup_key is None:
                        copy.write_row((ids[n], it.queue, it.payload_json, it.key, it.priority, run_at[n], now, now))
        out: list[int | None] = list(ids)
        if dedup:
            conn.execute(q.STAGE)
            with conn.cursor().copy(q.STAGE_COPY) as copy:
                copy.set_types(q.STAGE_TYPES)
                for n in dedup:
                    it = items[n]
                    copy.write_row((ids[n], it.queue, it.payload_json, it.key, it.dedup_key, it.priority, run_at[n]))
            stored = {r[0] for r in cur.execute(q.INSERT_STAGED, (now, now))}
            conn.execute("TRUNCATE conveyor_submit")  # a later batch in this transaction stages afresh
            for n in dedup:
                if ids[n] not in stored:
                    out[n] = None
        return out

    # -- claim and settle -----------------------------------------------------------------------
    def _claim_lock(self, claim: Claim) -> None:
        self._execute(q.ORDERED_LOCK, (claim.queue,))

    def _claim_rows(self, conn: psycopg.Connection[Any], claim: Claim, owner: str) -> list[Any]:
        args = dict(owner=owner, lease=claim.lease_seconds, token=new_token(), max_attempts=claim.max_attempts,
                    queue=claim.queue, limit=claim.limit)
        return self._execute(q.CLAIM_ORDERED if claim.ordered else q.CLAIM, args).fetchall()

    def _fenced(self, sql: str, entries: Sequence[Sequence[Any]], **extra: Any) -> list[int]:
        if not entries:
            return []
        args = dict(
            ids=[e[0] for e in entries], toks=[e[1] for e in entries],
            b2=[_clean(str(e[2])) if len(e) > 2 else None for e in entries],  # retry: delay; fail: error
            b3=[_clean(e[3]) if len(e) > 3 else None for e in entries], **extra,  # retry: error
        )
        with self.transaction():
            rows = self._execute(sql, args).fetchall()
            self._notify({queue for _, queue, wakes in rows if wakes})
        return refused(entries, [r[0] for r in rows])

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
                conn.conveyor_notify = set()  # type: ignore[attr-defined]
                yield conn
                for queue in sorted(conn.conveyor_notify):  # type: ignore[attr-defined]
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

    async def resolve_in(self, conn: psycopg.AsyncConnection[Any], tokens: Sequence[Token]) -> list[int]:
        """Resolve inside async_transaction(); returns the refused ids."""
        if not tokens:
            return []
        args = dict(ids=[e[0] for e in tokens], toks=[e[1] for e in tokens], b2=[None] * len(tokens),
                    b3=[None] * len(tokens))
        cur = await conn.execute(q.RESOLVE, args)
        rows = await cur.fetchall()
        conn.conveyor_notify.update(q for _, q, wakes in rows if wakes)  # type: ignore[attr-defined]
        return refused(tokens, [r[0] for r in rows])

    # -- one cycle in one statement -------------------------------------------------------------
    def settle_and_claim(self, outcomes: Outcomes, claims: Sequence[Claim], owner: str) -> tuple[list[int], list[list[Item]]]:
        """A worker's whole cycle: settle `outcomes` (resolve, retry, fail, release, each fenced by
        its claim token) and make `claims`, atomically. Returns (the refused ids, in the order
        resolved + retried + failed + released; the items claimed, one list per claim).

        Without ordered claims this is ONE statement in autocommit (its own transaction): the
        settles and claims are data-modifying CTEs, the wake-up NOTIFY is sent from the settle's
        RETURNING (PostgreSQL merges repeats within a transaction), so a cycle costs one round
        trip instead of four (BEGIN, settle, claim, COMMIT). The claims share the settle's
        snapshot, so an item the settle put back to pending (a retry with no delay, a release)
        is claimable from the next cycle, not this one. An ordered claim needs its advisory lock
        taken by an earlier statement of its transaction (see q.ORDERED_LOCK), so a cycle with one
        runs as a transaction of separate statements, like the methods it stands for."""
        if any(c.ordered for c in claims):
            with self.transaction():
                lost = self.resolve(outcomes.resolved) if outcomes.resolved else []
                lost += self.retry(outcomes.retried) if outcomes.retried else []
                lost += self.fail(outcomes.failed) if outcomes.failed else []
                lost += self.release(outcomes.released) if outcomes.released else []
                return lost, [self.claim(c, owner) for c in claims]
        parts = [(k, e) for k, e in (("resolve", outcomes.resolved), ("retry", outcomes.retried),
                                     ("fail", outcomes.failed), ("release", outcomes.released)) if e]
        if not parts and not claims:
            return [], []
        shape = (tuple(k for k, _ in parts), len(claims))
        sql = q.cycle(*shape)
        args: dict[str, Any] = {"owner": owner}
        for k, entries in parts:
            if k == "retry":
                entries = [(i, t, float(d), e) for i, t, d, e in entries]
            args[f"ids_{k}"] = _bigints(e[0] for e in entries)
            args[f"toks_{k}"] = _bigints(e[1] for e in entries)
            if k in ("retry", "fail"):
                args[f"b2_{k}"] = [_clean(str(e[2])) for e in entries]
            if k == "retry":
                args[f"b3_{k}"] = [_clean(e[3]) for e in entries]
        for n, c in enumerate(claims):
            args.update({f"lease_{n}": c.lease_seconds, f"token_{n}": new_token(), f"max_attempts_{n}": c.max_attempts,
                         f"queue_{n}": c.queue, f"limit_{n}": c.limit})
        rows = self._execute(sql, args).fetchall()  # its own transaction, or joins the caller's
        accepted: set[int] = set()
        claimed: list[list[Any]] = [[] for _ in claims]
        for row in rows:
            if row[0] < 0:
                accepted.add(row[1])
            else:
                claimed[row[0]].append(row[1:])
        lost = [e[0] for _, entries in parts for e in entries if e[0] not in accepted]
        return lost, [self._items(batch) for batch in claimed]

    # -- leases ---------------------------------------------------------------------------------
    def rescue_expired(self) -> list[tuple[int, str]]:
        with self.transaction():
            rows = self._execute(q.RESCUE).fetchall()
            self._notify({r[2] for r in rows if r[3]})
        return [(r[0], r[1]) for r in rows]

    # -- operators ------------------------------------------------------------------------------
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

    def _list_queue(self, state: str | None, key: str | None, args: dict[str, Any]) -> list[Any]:
        if key is not None:
            return [row for sql in q.LIST_KEY[state] for row in self._execute(sql, args).fetchall()]
        if state is not None and state != "pending":
            return self._execute(q.LIST_STATE[state], args).fetchall()
        recent = self._execute(q.LIST_RECENT[state], args | {"window": q.LIST_WINDOW}).fetchall()
        if len(recent) == args["limit"]:
            return recent
        states = [state] if state else list(q.LIST_STATE)
        return [row for s in states for row in self._execute(q.LIST_STATE[s], args).fetchall()]

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        if queues:
            counts = self._execute(q.COUNTS.format(where="AND queue = ANY(%(q)s)"), {"q": list(queues)}).fetchall()
        else:
            counts = self._execute(q.COUNTS.format(where="")).fetchall()
        names = sorted({c[0] for c in counts} | set(queues or []))
        oldest = [(name, self._execute(q.OLDEST, {"q": name}).fetchone()[0]) for name in names]
        recent = [(name, self._execute(q.RECENT, (name,)).fetchone()[0]) for name in names]
        return shape_stats(counts, oldest, recent, queues)

    def has_work(self, queues: Sequence[str]) -> bool:
        return bool(self._execute(q.HAS_WORK, {"q": list(queues)}).fetchone()[0])

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
