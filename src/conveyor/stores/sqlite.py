"""The embedded store: one SQLite file, shared safely by many threads and processes.

Writes run inside BEGIN IMMEDIATE, which takes SQLite's single write lock up front, so a claim's
read-then-update can never interleave with another writer's: that is SQLite's stand-in for
PostgreSQL's FOR UPDATE SKIP LOCKED. WAL mode lets readers (status, the dashboard) run beside the
writer. Times are unix seconds (REAL) from SQLite's own clock. The statements are in
sqlite_queries; what both SQL stores do alike is in sql.SQLStore.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import orjson

from ..codec import encode_rows
from ..errors import ConveyorError, StoreError, UsageError, shown
from ..model import Claim, Item, NewItem, Outcomes, Token
from . import sqlite_queries as q
from .common import new_token, refused, shape_stats
from .sql import SQLStore

BUSY_TIMEOUT_MS = 60_000
#: the WAL file is cut back to this size when a checkpoint starts it over: a reader that held a
#: snapshot open (a long report) lets the WAL grow past every checkpoint, and without a limit the
#: file keeps that size on disk after the reader is gone
WAL_KEPT_BYTES = 64 * 1024 * 1024
MIGRATIONS = q.MIGRATIONS


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def sqlite_path(url: str) -> str:
    """sqlite:///relative.db, sqlite:////absolute.db → a filesystem path."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"SQLite URL {shown(url)} names a host ({shown(parts.netloc)}); use sqlite:///path/to/file.db")
    path = unquote(parts.path)
    if path.startswith("/"):
        path = path[1:]  # sqlite:///x.db → x.db ; sqlite:////abs/x.db → /abs/x.db
    if not path or path == ":memory:":
        raise UsageError(
            f"SQLite URL {shown(url)} names no file: conveyor needs a file that workers can share, e.g. sqlite:///conveyor.db"
        )
    return path


def describe(url: str) -> str:
    """The database a URL names, as a log line should say it: the file's absolute path."""
    return f"SQLite file {os.path.abspath(sqlite_path(url))}"


_ON_OFF = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def sqlite_options(url: str) -> dict[str, bool]:
    """The URL's query options: `writer_queue=on|off` (default on; see _WRITE_QUEUE_SUFFIX)."""
    options = {"writer_queue": True}
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name not in options:
            raise UsageError(f"SQLite URL {shown(url)} has an unknown option {shown(name)}; known: {', '.join(options)}")
        if value.lower() not in _ON_OFF:
            raise UsageError(f"SQLite URL {shown(url)}: {name} must be on or off, not {shown(value)}")
        options[name] = _ON_OFF[value.lower()]
    return options


# Writers queue for SQLite's write lock on a lock file beside the database (flock, one open file
# per thread): a writer that finds the lock taken sleeps in the kernel and wakes the moment the
# holder lets go. Left to SQLite alone, a writer that finds the lock taken polls it from the busy
# handler, sleeping 1, 2, 5, 10 … ms between tries, so the lock sat idle for milliseconds at a time
# while 2 worker processes took turns (measured, 20k no-op items, 2 processes, batch 100: drain
# 24-32k → 35-44k items/s over three interleaved rounds). SQLite's own lock stays the authority:
# a process that does not know the lock file (another program, the sqlite3 shell) still gets and
# respects the write lock as before, and busy_timeout still bounds waiting for it. The price is
# paid by such programs: they still poll, and find the lock free less often while workers are
# saturated (measured, a 4 s saturated drain: their longest wait 1.0-2.9 s, against 0.2-0.3 s with
# the queue off). `?writer_queue=off` on the URL turns the queue off for a store.
_WRITE_QUEUE_SUFFIX = "-conveyor-lock"
_queue_files: weakref.WeakSet[Any] = weakref.WeakSet()


def _close_inherited_queue_files() -> None:
    """In a forked child: drop the parent's lock-file descriptors. flock belongs to the open file,
    which fork shares, so a child holding a copy would keep a lock its parent took alive after the
    parent died."""
    for f in list(_queue_files):
        with contextlib.suppress(Exception):
            f.close()


os.register_at_fork(after_in_child=_close_inherited_queue_files)


class SQLiteStore(SQLStore):
    """Store on one SQLite file. Each thread gets its own connection."""

    queries = q
    driver_error = sqlite3.Error
    closes_others = False  # closing a sqlite3 connection under a running statement crashes the process

    def __init__(self, url: str, read_only: bool = False):
        super().__init__(url, read_only)
        self.path = sqlite_path(url)
        self.where = f"SQLite database {os.path.abspath(self.path)}"
        self._writer_queue = sqlite_options(url)["writer_queue"]
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise UsageError(f"cannot open SQLite database {shown(self.path, 400)}: folder {shown(folder, 400)} does not exist")
        if read_only and not os.path.isfile(self.path):
            raise UsageError(f"no SQLite database at {os.path.abspath(self.path)} (this command reads and never creates "
                             "one: check --db or $CONVEYOR_DATABASE_URL)")

    # -- connections ----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._connect_read_only()
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_KEPT_BYTES}")
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"cannot open SQLite database {self.path!r}: {exc}") from None
        if str(mode).lower() != "wal":
            raise StoreError(f"SQLite database {self.path!r} could not switch to WAL mode (got {mode!r})")
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        """A connection that can neither write nor create: mode=ro, or, where even that cannot open
        a WAL database (its -shm file cannot be created: a read-only folder or file system, where
        nothing can change the file either), immutable=1."""
        uri = "file:" + quote(os.path.abspath(self.path)) + "?mode=ro"
        error: Exception | None = None
        for extra in ("", "&immutable=1"):
            try:
                conn = sqlite3.connect(uri + extra, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.DatabaseError as exc:
                error = exc
        raise UsageError(f"cannot read SQLite database {os.path.abspath(self.path)}: {error}") from None

    def _failed(self, exc: BaseException) -> ConveyorError:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return StoreError(f"{self.where} is locked or unavailable: {exc}")
        return StoreError(f"{self.where}: {exc}")

    def disconnect(self) -> None:
        turn = getattr(self._local, "queue_file", None)
        self._local.queue_file = False
        if turn and os.getpid() == self._pid:
            turn.close()
        super().disconnect()

    @staticmethod
    def _clock(conn: sqlite3.Connection) -> float:
        """The database's clock in unix seconds: SQLite's own (its VFS asks the OS, with millisecond
        resolution), not this process's time.time(), which a library or test may shift. Read inside
        the transaction it is used in, so time spent waiting for the write lock is not lost."""
        return conn.execute(q.CLOCK).fetchone()[0]

    # -- transactions ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writer_turn(self) -> Iterator[None]:
        turn = self._queue_file()
        if turn is None:
            yield
            return
        fcntl.flock(turn, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)

    def _begin(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"{self.where} is locked or unavailable: {exc}") from exc

    def _commit(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"{self.where}: commit failed: {exc}") from exc

    def _rollback(self, conn: sqlite3.Connection, exc: BaseException) -> BaseException | None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return self._failed(exc) if isinstance(exc, sqlite3.Error) else None

    def _queue_file(self) -> Any:
        """This thread's open lock file (see _WRITE_QUEUE_SUFFIX), or None with writer_queue=off
        or where it cannot be created (a read-only folder): writers then wait in SQLite's busy
        handler alone."""
        f = getattr(self._local, "queue_file", False)
        if f is False:
            f = None
            if self._writer_queue:
                try:
                    # the resolved path: two paths to one file (a symlink, a relative path) share it
                    f = open(os.path.realpath(self.path) + _WRITE_QUEUE_SUFFIX, "ab")  # noqa: SIM115 - lives as long as the thread's connection
                except OSError:
                    pass
                else:
                    _queue_files.add(f)
            self._local.queue_file = f
        return f

    # -- schema ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _migration_transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        # without the writer queue: a caller may hold the write lock already (submit with conn=),
        # and SQLite's own lock makes migrations one process at a time
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _run_script(self, conn: sqlite3.Connection, script: str) -> None:
        for statement in script.split(";"):  # executescript() would commit on its own
            if statement.strip():
                conn.execute(statement)

    def _callers(self, conn: Any) -> sqlite3.Connection:
        """Check that a caller's connection is sqlite3 and open on this store's file."""
        if not isinstance(conn, sqlite3.Connection):
            raise UsageError(f"conn must be a sqlite3.Connection to {self.path!r}, not {type(conn).__name__}")
        try:
            files = [row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"]
        except sqlite3.ProgrammingError as exc:
            raise UsageError(f"conn is not usable: {exc}") from None
        if not files or os.path.realpath(files[0]) != os.path.realpath(self.path):
            raise UsageError(f"conn is open on {files[0] if files else 'no file'!r}, not on this store's {self.path!r}")
        self._conn()  # make sure the schema exists (checked without taking the write lock)
        return conn

    # -- submit ---------------------------------------------------------------------------------
    def submit_many(self, items: Sequence[NewItem], conn: Any = None) -> list[int | None]:
        if conn is not None and conn is not getattr(self._local, "conn", None):
            # The caller's own connection and transaction: insert there, commit nothing. The items
            # exist if and only if the caller commits.
            callers = self._callers(conn)
            return self._insert_rows(callers, items, self._clock(callers))
        with self.transaction() as own:
            now = self._clock(own)
            if any(it.dedup_key is not None for it in items):
                return self._insert_rows(own, items, now)
            # No dedup keys, so no conflicts: inside our write lock AUTOINCREMENT hands out the next
            # len(items) ids in order. The batch travels as one JSON document that SQLite takes
            # apart in C (twice the speed of binding row by row); each payload is spliced in as the
            # JSON it already is.
            before = own.execute(q.LAST_ID).fetchone()
            doc = "[" + ",".join(
                f"[{it.payload_json},{_dumps((it.queue, it.key, it.priority, now if it.run_at is None else it.run_at))[1:]}"
                for it in items) + "]"
            own.execute(q.INSERT_BATCH, (doc, now))
        first = (before[0] if before else 0) + 1
        return list(range(first, first + len(items)))

    def submit_payloads(self, queue: str, payloads: Sequence[Any], run_at: float | None, priority: int) -> int:
        """One JSON document of every payload (a single orjson call, see codec.encode_rows) that
        SQLite takes apart in C: no Python work per item. Encoded before the write lock is taken."""
        doc = encode_rows(payloads)
        with self.transaction() as own:
            now = self._clock(own)
            return own.execute(q.INSERT_PAYLOADS, (doc, queue, priority, now if run_at is None else run_at, now)).rowcount

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, items: Sequence[NewItem], now: float) -> list[int | None]:
        """Row by row, learning each id (or None where a dedup key already exists)."""
        cur = conn.cursor()
        ids: list[int | None] = []
        for it in items:
            cur.execute(q.INSERT, (it.queue, it.payload_json, it.key, it.dedup_key, it.priority,
                                   now if it.run_at is None else it.run_at, now, now))
            ids.append(cur.lastrowid if cur.rowcount == 1 else None)
        return ids

    # -- claim and settle -----------------------------------------------------------------------
    def _claim_rows(self, conn: sqlite3.Connection, claim: Claim, owner: str) -> list[Any]:
        sql = q.CLAIM_ORDERED if claim.ordered else q.CLAIM
        rows = conn.execute(sql, (owner, self._clock(conn), claim.lease_seconds, new_token(), claim.max_attempts,
                                  claim.queue, claim.limit)).fetchall()
        if rows:
            self._local.last_change = time.monotonic()  # busy: keep idle polling brisk (wait_for_change)
        return rows

    def _claim_ids(self, conn: sqlite3.Connection, claim: Claim, owner: str, ids: Sequence[int]) -> list[Any]:
        return conn.execute(q.CLAIM_IDS, (owner, self._clock(conn), claim.lease_seconds, new_token(), claim.max_attempts,
                                          None, None, orjson.dumps(list(ids)).decode())).fetchall()

    def _pending_keys(self, conn: sqlite3.Connection, queue: str, most: int) -> list[str]:
        return [r[0] for r in conn.execute(q.PENDING_KEYS, (queue, most))]

    def _key_heads(self, conn: sqlite3.Connection, queue: str, keys: Sequence[str], now: float, most: int) -> list[Any]:
        """One indexed query per key: SQLite runs in this process, so a query costs microseconds."""
        window = max(q.KEY_WINDOW, 4 * most)
        return [row for key in keys for row in conn.execute(q.KEY_HEADS, (queue, key, now, most, window))]

    def _hold_extra(self, now: float) -> tuple[Any, ...]:
        return (now,)

    def settle_and_claim(self, outcomes: Outcomes, claims: Sequence[Claim], owner: str) -> tuple[list[int], list[list[Item]]]:
        """A worker's whole cycle in one write transaction; rows become Items after the commit,
        so the write lock is held for SQL only."""
        with self.transaction() as conn:
            now = self._clock(conn)
            lost = self._resolve_on(conn, outcomes.resolved, now)
            lost += self._fenced_on(conn, q.RETRY, outcomes.retried, now)
            lost += self._fenced_on(conn, q.FAIL, outcomes.failed, now)
            lost += self._fenced_on(conn, q.RELEASE, outcomes.released, now)
            lost += self._backoff_on(conn, outcomes.backedoff) if outcomes.backedoff else []
            batches = [self._claim_any(conn, c, owner) for c in claims]
        return lost, [self._items(rows) for rows in batches]

    def _fenced(self, sql: str, entries: Sequence[Sequence[Any]], **extra: Any) -> list[int]:
        """A batch settle in a transaction of its own (or the caller's); `lease` (extend_leases)
        is added to the clock."""
        if not entries:
            return []
        with self.transaction() as own:
            return self._fenced_on(own, sql, entries, self._clock(own) + extra.get("lease", 0.0))

    @staticmethod
    def _fenced_on(conn: sqlite3.Connection, sql: str, entries: Sequence[Sequence[Any]], at: float) -> list[int]:
        """Settling statements take the whole batch as one JSON array of [id, token, ...] and
        return the ids they accepted: one statement per flush, an exact list of refused items."""
        if not entries:
            return []
        return refused(entries, [r[0] for r in conn.execute(sql, (orjson.dumps(entries).decode(), at))])

    def resolve(self, tokens: Sequence[Token]) -> list[int]:
        if not tokens:
            return []
        with self.transaction() as own:
            return self._resolve_on(own, tokens, self._clock(own))

    @staticmethod
    def _resolve_on(conn: sqlite3.Connection, tokens: Sequence[Token], at: float) -> list[int]:
        """One RESOLVE per claim token among the tokens (a flush usually holds one or two claims'
        items); returns the refused ids, in the order given."""
        if not tokens:
            return []
        by_token: dict[int, list[int]] = {}
        for item_id, token in tokens:
            by_token.setdefault(token, []).append(item_id)
        accepted: list[int] = []
        for token, ids in by_token.items():
            accepted += [r[0] for r in conn.execute(q.RESOLVE, (orjson.dumps(ids).decode(), at, token))]
        return refused(tokens, accepted)

    def rescue_expired(self) -> list[tuple[int, str]]:
        with self.transaction() as conn:
            return [(r[0], r[1]) for r in conn.execute(q.RESCUE, (self._clock(conn),)).fetchall()]

    # -- async transactional handlers -----------------------------------------------------------
    @contextlib.asynccontextmanager
    async def async_transaction(self) -> AsyncIterator[sqlite3.Connection]:
        """A write transaction on a connection of its own, for one async transactional handler.
        SQLite has no async driver: the handler gets the sqlite3 connection (its calls are quick,
        local work), while waiting for the write lock and committing run off the event loop."""
        conn = await asyncio.to_thread(self._connect)
        try:
            await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            await asyncio.to_thread(conn.execute, "COMMIT")
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc
        finally:
            conn.close()

    async def resolve_in(self, conn: sqlite3.Connection, tokens: Sequence[Token]) -> list[int]:
        """Resolve inside an async_transaction(); returns the refused ids."""
        return self._resolve_on(conn, tokens, self._clock(conn))

    # -- operators ------------------------------------------------------------------------------
    def _id_list(self, ids: Sequence[int]) -> Any:
        return _dumps(list(ids))

    def _list_queue(self, state: str | None, key: str | None, args: dict[str, Any]) -> list[Any]:
        return self._execute(q.LIST_QUEUE[state, key is not None], args).fetchall()

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        conn = self._conn()
        now = self._clock(conn)
        if queues:
            counts = conn.execute(q.COUNTS.format(where=q.COUNTS_OF), (_dumps(list(queues)),)).fetchall()
        else:
            counts = conn.execute(q.COUNTS.format(where="")).fetchall()
        names = sorted({c[0] for c in counts} | set(queues or []))
        oldest = []
        recent = []
        for name in names:
            first = conn.execute(q.OLDEST, (name, now)).fetchone()[0]
            oldest.append((name, None if first is None else now - first))
            recent.append((name, conn.execute(q.RECENT, (name, now - 60)).fetchone()[0]))
        return shape_stats(counts, oldest, recent, queues)

    def has_work(self, queues: Sequence[str]) -> bool:
        return bool(self._execute(q.HAS_WORK, (_dumps(list(queues)),)).fetchone()[0])

    # -- wake-ups -------------------------------------------------------------------------------
    def wait_for_change(self, timeout: float, wake: Any = None) -> bool:
        """Poll PRAGMA data_version (bumped by every commit from another connection): cheap, needs
        no lock. Polls every millisecond for a second after the last change seen, then every 2 ms,
        and every 5 ms after 10 s of quiet, so an idle worker costs ~1% of a core yet wakes within
        a few milliseconds of a submit from any process."""
        conn = self._conn()
        now = time.monotonic()
        deadline = now + timeout
        start = conn.execute("PRAGMA data_version").fetchone()[0]
        last = getattr(self._local, "last_change", 0.0)
        while True:
            if conn.execute("PRAGMA data_version").fetchone()[0] != start:
                self._local.last_change = time.monotonic()
                return True
            if wake is not None and wake.is_set():
                return False
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                return False
            quiet = now - last
            time.sleep(min(0.001 if quiet < 1 else 0.002 if quiet < 10 else 0.005, left))
