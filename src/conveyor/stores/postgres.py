"""The scale-out store: PostgreSQL through psycopg 3, shared by any number of worker processes.

Claims lock their rows with FOR UPDATE SKIP LOCKED, so concurrent claimers pass each other instead
of queueing. Every time is judged by the database's clock (statement_timestamp()), never by
Python's, so workers on machines with skewed clocks agree on leases. This module holds the
operations on items (submit by COPY, claims, the one-statement cycle, rescue, listing, stats); the
connections and transactions they run on are in postgres_connections, the statements in
postgres_queries, and what both SQL stores do alike in sql.SQLStore.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from ..codec import encode
from ..errors import StoreError, UsageError
from ..model import Claim, Item, NewItem, Outcomes, Token
from . import postgres_queries as q
from .common import new_token, refused, shape_stats
from .postgres_connections import PostgresConnections, describe

MIGRATIONS = q.MIGRATIONS
COPY_FROM = q.COPY_FROM
__all__ = ["PostgresStore", "describe"]

# payload is JSON, not JSONB: measured, bulk COPY costs the same either way (220 vs 227 ms for 20k),
# but JSON returns the payload text exactly as submitted (key order, like SQLite) and accepts
# "\u0000", which JSONB refuses. Index a JSONB expression if payloads must be queried.


def _bigints(values: Any) -> str:
    """A bigint[] parameter as its text form: one join, instead of psycopg's per-element list
    adaptation (measured: most of the client cost of a settle's parameters)."""
    return "{" + ",".join(map(str, values)) + "}"


def _clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; an error message that contains one must still be stored."""
    return text.replace("\x00", "\\x00") if text else text


def _columns(items: Sequence[NewItem]) -> list[list[Any]]:
    """The items as the parallel arrays INSERT and INSERT_NOTIFY take."""
    return [[it.queue for it in items], [it.payload_json for it in items], [it.key for it in items],
            [it.dedup_key for it in items], [it.priority for it in items], [it.run_at for it in items]]


class PostgresStore(PostgresConnections):
    """Store on a PostgreSQL database. Each thread gets its own connection."""
    # -- submit ---------------------------------------------------------------------------------
    def submit_many(self, items: Sequence[NewItem], conn: Any = None) -> list[int | None]:
        """Store the items in one transaction: ours, or, given `conn`, the caller's (see _callers)."""
        if conn is not None:
            return self._submit_on(self._callers(conn), items)
        if not items:
            return []
        if len(items) < COPY_FROM and not self.read_only:
            self._conn()  # this thread's connection, and its transaction depth
            if not self._local.depth:  # outside any transaction: one autocommit statement, NOTIFY in it
                try:
                    cols = _columns(items)
                    rows = self._execute(q.INSERT_NOTIFY, cols).fetchall()
                except psycopg.DataError as exc:
                    raise UsageError(f"PostgreSQL refused the items: {exc}") from None
                return [item_id if stored else None for item_id, stored, _ in rows]
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
        when = None if run_at is None else dt.datetime.fromtimestamp(run_at, dt.UTC)
        with self.transaction() as own:
            try:
                with own.cursor().copy(sql) as copy:
                    rows: Iterator[tuple[Any, ...]]
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
                theirs = tuple(conn.cursor(row_factory=tuple_row).execute(q.IDENTITY).fetchone() or ())
            except psycopg.Error as exc:
                raise UsageError(f"conn could not be checked against {self.host}: {exc}") from None
            ours = self._one(q.IDENTITY)
            checked = theirs == ours
            if not checked:
                checked = f"database {theirs[0]!r} at port {theirs[1]}"
            self._checked_conns[conn] = checked
        if checked is not True:
            raise UsageError(f"conn is connected to {checked}, not to this store's database {self.host}: "
                             "a transactional submit must run on the same database")
        return conn

    def _insert_small(self, conn: psycopg.Connection[Any], items: Sequence[NewItem]) -> list[int | None]:
        cols = _columns(items)
        cur = conn.cursor(row_factory=tuple_row)  # a caller's connection may have another row factory
        return [item_id if stored else None for item_id, stored in cur.execute(q.INSERT, cols).fetchall()]

    def _insert_copy(self, conn: psycopg.Connection[Any], items: Sequence[NewItem]) -> list[int | None]:
        cur = conn.cursor(row_factory=tuple_row)
        now, ids = cur.execute(q.ALLOCATE, (len(items),)).fetchone() or (None, [])
        run_at = [now if it.run_at is None else dt.datetime.fromtimestamp(it.run_at, dt.UTC) for it in items]
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

    def _claim_ids(self, conn: Any, claim: Claim, owner: str, ids: Sequence[int]) -> list[Any]:
        return self._execute(q.CLAIM_IDS, {"owner": owner, "lease": claim.lease_seconds, "token": new_token(),
                                           "max_attempts": claim.max_attempts, "ids": _bigints(ids)}).fetchall()

    def _pending_keys(self, conn: Any, queue: str, most: int) -> list[str]:
        return [r[0] for r in self._execute(q.PENDING_KEYS, {"queue": queue, "most": most}).fetchall()]

    def _key_heads(self, conn: Any, queue: str, keys: Sequence[str], now: float, most: int) -> list[Any]:
        return self._execute(q.KEY_HEADS_ALL, {"queue": queue, "keys": list(keys), "most": most}).fetchall()

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
        taken by an earlier statement of its transaction (see q.ORDERED_LOCK), and so does a claim
        with limits: a cycle with one runs as a transaction, the settles and plain claims still in
        one statement, then each locking claim in its own statements."""
        locking = [c.ordered or c.limits is not None for c in claims]
        if not outcomes.backedoff and not any(locking):
            return self._cycle(outcomes, claims, owner)
        with self.transaction():  # backoffs also hold keys or queues: statements of their own
            lost, plain = self._cycle(outcomes, [c for c, lock in zip(claims, locking, strict=True) if not lock], owner)
            lost += self.backoff(outcomes.backedoff) if outcomes.backedoff else []
            taken = iter(plain)
            return lost, [self.claim(c, owner) if lock else next(taken) for c, lock in zip(claims, locking, strict=True)]

    def _cycle(self, outcomes: Outcomes, claims: Sequence[Claim], owner: str) -> tuple[list[int], list[list[Item]]]:
        """Settle `outcomes` (but backoffs) and make plain `claims`, in one statement."""
        parts: list[tuple[str, Sequence[Any]]] = [(k, e) for k, e in (("resolve", outcomes.resolved), ("retry", outcomes.retried),
                                     ("fail", outcomes.failed), ("release", outcomes.released)) if e]
        if not parts and not claims:
            return [], []
        shape = (tuple(k for k, _ in parts), len(claims))
        sql = q.cycle(*shape)
        args: dict[str, Any] = {"owner": owner}
        for k, given in parts:
            entries: Sequence[Sequence[Any]] = given
            if k == "retry":
                entries = [(i, t, float(d), e) for i, t, d, e in given]
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
    def _list_queue(self, state: str | None, key: str | None, args: dict[str, Any]) -> list[Any]:
        if key is not None:
            return [row for sql in q.LIST_KEY[state] for row in self._execute(sql, args).fetchall()]
        states = [state] if state else list(q.LIST_STATE)
        return [row for s in states for row in self._execute(q.LIST_STATE[s], args).fetchall()]

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        if queues:
            counts = self._execute(q.COUNTS.format(where="AND queue = ANY(%(q)s)"), {"q": list(queues)}).fetchall()
        else:
            counts = self._execute(q.COUNTS.format(where="")).fetchall()
        names = sorted({c[0] for c in counts} | set(queues or []))
        oldest = [(name, self._one(q.OLDEST, {"q": name})[0]) for name in names]
        recent = [(name, self._one(q.RECENT, (name,))[0]) for name in names]
        return shape_stats(counts, oldest, recent, queues)

    def has_work(self, queues: Sequence[str]) -> bool:
        return bool(self._one(q.HAS_WORK, {"q": list(queues)})[0])
