"""The embedded store: one SQLite file, shared safely by many threads and processes.

All of SQLite's SQL lives here. Writes run inside BEGIN IMMEDIATE, which takes SQLite's single
write lock up front, so a claim's read-then-update can never interleave with another writer's: that
is SQLite's stand-in for PostgreSQL's FOR UPDATE SKIP LOCKED. WAL mode lets readers (status, the
dashboard) run beside the writer. Times are unix seconds (REAL) from this machine's clock, which is
the database's clock for an embedded file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import weakref
from typing import Any, AsyncIterator, Iterator, Sequence
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import orjson

_dumps = lambda value: orjson.dumps(value).decode()  # noqa: E731

from ..codec import encode_rows
from ..errors import ItemNotFound, StoreError, UsageError, shown
from ..model import Claim, Item, NewItem, Outcomes, Token
from .common import ITEM_COLUMNS, new_token, refused, row_to_item, shape_stats

BUSY_TIMEOUT_MS = 60_000

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "items table and its indexes",
        """
        CREATE TABLE conveyor_items (
            id               INTEGER PRIMARY KEY AUTOINCREMENT,
            queue            TEXT    NOT NULL,
            payload          TEXT    NOT NULL,
            key              TEXT,
            dedup_key        TEXT,
            state            TEXT    NOT NULL DEFAULT 'pending'
                             CHECK (state IN ('pending','in_progress','resolved','dead','cancelled')),
            priority         INTEGER NOT NULL DEFAULT 0,
            run_at           REAL    NOT NULL,
            attempts         INTEGER NOT NULL DEFAULT 0,
            max_attempts     INTEGER,
            lease_owner      TEXT,
            lease_expires_at REAL,
            claim_token      INTEGER,
            last_error       TEXT,
            created_at       REAL    NOT NULL,
            updated_at       REAL    NOT NULL,
            finished_at      REAL
        );
        -- claim: only pending rows live here, so claim cost does not grow with resolved history
        CREATE INDEX conveyor_items_pending ON conveyor_items (queue, priority DESC, run_at, id, key)
            WHERE state = 'pending';
        -- rescue of expired leases
        CREATE INDEX conveyor_items_leases ON conveyor_items (lease_expires_at)
            WHERE state = 'in_progress';
        -- ordered queues: the earliest unfinished item of a key
        CREATE INDEX conveyor_items_keyed ON conveyor_items (queue, key, id)
            WHERE key IS NOT NULL AND state IN ('pending', 'in_progress');
        -- stats counts, throughput and purge
        CREATE INDEX conveyor_items_status ON conveyor_items (queue, state, finished_at);
        CREATE UNIQUE INDEX conveyor_items_dedup ON conveyor_items (queue, dedup_key)
            WHERE dedup_key IS NOT NULL;
        """,
    ),
    (
        2,
        "rescued: the item's last run ended with its lease expiring",
        # Recorded as a fact rather than read from last_error's wording: a worker runs such an
        # item alone (see worker.lanes.is_suspect). Items rescued before this migration keep it.
        """
        ALTER TABLE conveyor_items ADD COLUMN rescued INTEGER NOT NULL DEFAULT 0;
        UPDATE conveyor_items SET rescued = 1
         WHERE state IN ('pending', 'in_progress') AND last_error LIKE 'lease expired%';
        """,
    ),
]

_CLAIM_SET = """
UPDATE conveyor_items
   SET state = 'in_progress', attempts = attempts + 1, lease_owner = ?1,
       lease_expires_at = ?2 + ?3, claim_token = ?4, max_attempts = ?5, updated_at = ?2
 WHERE id IN ({candidates})
RETURNING """ + ITEM_COLUMNS

_CLAIM_SQL = _CLAIM_SET.format(candidates="""
       SELECT id FROM conveyor_items AS c INDEXED BY conveyor_items_pending
        WHERE c.queue = ?6 AND c.state = 'pending' AND c.run_at <= ?2
        ORDER BY c.priority DESC, c.run_at, c.id
        LIMIT ?7""")

# Ordered queues: only the head of each key (its lowest unfinished id) may start, and only when it
# is pending, due, and no other item of its key is running (a requeued dead item can be later in
# id yet running). The heads are found by a skip-scan of the keyed index (one seek per distinct
# key, recursive CTE), so a claim costs O(keys · log n) however deep each key's backlog is, instead
# of a subquery per blocked pending item. Items without a key are independent, claimed like any
# queue's (that branch scans the pending index, filtering on the key column it carries).
_KEYED = "INDEXED BY conveyor_items_keyed WHERE queue = ?6 AND key IS NOT NULL AND state IN ('pending', 'in_progress')"
_CLAIM_ORDERED_SQL = """
WITH RECURSIVE keys(k) AS (
     SELECT (SELECT key FROM conveyor_items {keyed} ORDER BY key LIMIT 1)
     UNION ALL
     SELECT (SELECT key FROM conveyor_items {keyed} AND key > keys.k ORDER BY key LIMIT 1)
       FROM keys WHERE keys.k IS NOT NULL),
heads(id) AS (
     SELECT (SELECT id FROM conveyor_items {keyed} AND key = keys.k ORDER BY id LIMIT 1)
       FROM keys WHERE keys.k IS NOT NULL)
""".format(keyed=_KEYED) + _CLAIM_SET.format(candidates="""
       SELECT id FROM (
           SELECT c.id, c.priority, c.run_at FROM heads JOIN conveyor_items AS c ON c.id = heads.id
            WHERE c.state = 'pending' AND c.run_at <= ?2
              AND NOT EXISTS (
                  SELECT 1 FROM conveyor_items AS o INDEXED BY conveyor_items_keyed
                   WHERE o.queue = c.queue AND o.key = c.key AND o.key IS NOT NULL
                     AND o.state IN ('pending', 'in_progress') AND o.state = 'in_progress')
           UNION ALL
           SELECT * FROM (
               SELECT id, priority, run_at FROM conveyor_items INDEXED BY conveyor_items_pending
                WHERE queue = ?6 AND state = 'pending' AND run_at <= ?2 AND key IS NULL
                ORDER BY priority DESC, run_at, id LIMIT ?7))
        ORDER BY priority DESC, run_at, id
        LIMIT ?7""")

_INSERT_SQL = """
INSERT INTO conveyor_items (queue, payload, key, dedup_key, priority, run_at, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
"""

# [[payload, queue, key, priority, run_at], ...]: items without dedup keys, so nothing conflicts
# [[payload], ...]: one queue's items, no keys, one run_at and priority (Store.submit_payloads)
_INSERT_PAYLOADS_SQL = """
INSERT INTO conveyor_items (queue, payload, priority, run_at, created_at, updated_at)
SELECT ?2, value -> 0, ?3, ?4, ?5, ?5 FROM json_each(?1) ORDER BY key
"""

_INSERT_BATCH_SQL = """
INSERT INTO conveyor_items (queue, payload, key, priority, run_at, created_at, updated_at)
SELECT value ->> 1, value -> 0, value ->> 2, value ->> 3, value ->> 4, ?2, ?2
  FROM json_each(?1) ORDER BY key
"""

_NOW = "(julianday('now') - 2440587.5) * 86400.0"  # the database clock, unix seconds
_CLOCK_SQL = f"SELECT {_NOW}"

_SETTLE_CLEAR = "lease_owner = NULL, lease_expires_at = NULL"

# Settling statements take the whole batch as one JSON array of [id, token, ...] and return the ids
# they accepted: one statement per flush, and an exact list of refused (lease-lost) items.
# NOT INDEXED keeps the planner on the batch-outer, rowid-lookup plan: after ANALYZE it otherwise
# scans conveyor_items_leases (every in-progress row) and re-reads the batch for each one, which is
# O(in-flight x batch) (1000 resolves with 4000 in flight: 1.5 s instead of 6 ms). Rowid lookups
# stay allowed under NOT INDEXED.
_SETTLE = "UPDATE conveyor_items NOT INDEXED SET"
_BATCH = "FROM (SELECT value ->> 0 AS bid, value ->> 1 AS btok, value ->> 2 AS b2, value ->> 3 AS b3 FROM json_each(?1)) AS b"
_FENCE = (
    "WHERE conveyor_items.id = b.bid AND conveyor_items.claim_token = b.btok "
    "AND conveyor_items.state = 'in_progress' RETURNING conveyor_items.id"
)
_RESOLVE_SQL = f"{_SETTLE} state = 'resolved', finished_at = ?2, updated_at = ?2, {_SETTLE_CLEAR} {_BATCH} {_FENCE}"
_RETRY_SQL = f"""
{_SETTLE}
       state = CASE WHEN attempts >= coalesce(max_attempts, 1) THEN 'dead' ELSE 'pending' END,
       finished_at = CASE WHEN attempts >= coalesce(max_attempts, 1) THEN ?2 END,
       run_at = ?2 + b.b2, last_error = b.b3, rescued = 0, updated_at = ?2, {_SETTLE_CLEAR}
  {_BATCH} {_FENCE}"""
_FAIL_SQL = f"{_SETTLE} state = 'dead', finished_at = ?2, updated_at = ?2, last_error = b.b2, rescued = 0, {_SETTLE_CLEAR} {_BATCH} {_FENCE}"
_RELEASE_SQL = f"{_SETTLE} state = 'pending', attempts = max(attempts - 1, 0), updated_at = ?2, {_SETTLE_CLEAR} {_BATCH} {_FENCE}"
_EXTEND_SQL = f"{_SETTLE} lease_expires_at = ?2 {_BATCH} {_FENCE}"

_RESCUE_SQL = """
UPDATE conveyor_items
   SET state = CASE WHEN attempts >= coalesce(max_attempts, 1) THEN 'dead' ELSE 'pending' END,
       finished_at = CASE WHEN attempts >= coalesce(max_attempts, 1) THEN ?1 END,
       last_error = 'lease expired: worker ' || coalesce(lease_owner, '?') ||
                    ' stopped heartbeating during attempt ' || attempts ||
                    ' (it crashed, was killed, or lost the database)',
       rescued = 1, claim_token = NULL, run_at = ?1, updated_at = ?1, lease_owner = NULL, lease_expires_at = NULL
 WHERE id IN (SELECT id FROM conveyor_items INDEXED BY conveyor_items_leases
               WHERE state = 'in_progress' AND lease_expires_at < ?1)
RETURNING id, state"""


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
_queue_files: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _close_inherited_queue_files() -> None:
    """In a forked child: drop the parent's lock-file descriptors. flock belongs to the open file,
    which fork shares, so a child holding a copy would keep a lock its parent took alive after the
    parent died."""
    for f in list(_queue_files):
        with contextlib.suppress(Exception):
            f.close()


os.register_at_fork(after_in_child=_close_inherited_queue_files)


class SQLiteStore:
    """Store on one SQLite file. Each thread gets its own connection."""

    def __init__(self, url: str, read_only: bool = False):
        self.url = url
        self.path = sqlite_path(url)
        self.read_only = read_only
        self._writer_queue = sqlite_options(url)["writer_queue"]
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise UsageError(f"cannot open SQLite database {shown(self.path, 400)}: folder {shown(folder, 400)} does not exist")
        if read_only and not os.path.isfile(self.path):
            raise UsageError(f"no SQLite database at {os.path.abspath(self.path)} (this command reads and never creates "
                             "one: check --db or $CONVEYOR_DATABASE_URL)")
        self._local = threading.local()
        self._lock = threading.Lock()
        #: every open connection, with the thread it belongs to
        self._conns: dict[sqlite3.Connection, threading.Thread] = {}
        self._pid = os.getpid()
        self._migrated = False

    # -- connections ----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._connect_read_only()
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = NORMAL")
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

    def _check_schema(self, conn: sqlite3.Connection) -> list[int]:
        """For a read-only store, in place of migrating: say what is missing, change nothing."""
        if not self._schema_current(conn):
            has_items = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'conveyor_items'").fetchone()
            where = os.path.abspath(self.path)
            if has_items:
                raise UsageError(f"SQLite database {where} has an older conveyor schema: run `conveyor migrate` first")
            raise UsageError(f"SQLite database {where} is not a conveyor database (no conveyor_items table)")
        self._migrated = True
        return []

    def _conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:  # forked: never touch the parent's connections
            self._local = threading.local()
            self._conns = {}
            self._lock = threading.Lock()
            self._pid = os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            self._local.depth = 0
            with self._lock:
                self._conns[conn] = threading.current_thread()
            # a store migrates on its first connection; migrate() reports what that applied
            if self._migrated:
                self._local.applied = []
            else:
                self._local.applied = self._check_schema(conn) if self.read_only else self._migrate(conn)
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise UsageError(f"SQLite database {os.path.abspath(self.path)} was opened read-only: it cannot be written")
        conn = self._conn()
        if self._local.depth:
            self._local.depth += 1
            try:
                yield conn
            finally:
                self._local.depth -= 1
            return
        turn = self._queue_file()
        if turn is not None:
            fcntl.flock(turn, fcntl.LOCK_EX)
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(f"SQLite database {self.path!r} is locked or unavailable: {exc}") from exc
            self._local.depth = 1
            try:
                yield conn
            except BaseException as exc:
                self._local.depth = 0
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise StoreError(f"SQLite database {self.path!r}: {exc}") from exc
                raise
            self._local.depth = 0
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StoreError(f"SQLite database {self.path!r}: commit failed: {exc}") from exc
        finally:
            if turn is not None:
                fcntl.flock(turn, fcntl.LOCK_UN)

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

    def disconnect(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is None or os.getpid() != self._pid:
            return
        self._local.conn = None
        turn = getattr(self._local, "queue_file", None)
        self._local.queue_file = False
        if turn:
            turn.close()
        with self._lock:
            self._conns.pop(conn, None)
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        """Close this thread's connection and those of threads that have ended. A connection of a
        thread still running may be in use right now, and closing a sqlite3 connection under a
        running statement crashes the process: it is only let go of here, and closes when its
        thread is done with it (the last reference goes); the thread opens a new one if it uses
        the store again."""
        with self._lock:
            conns, self._conns = self._conns, {}
        self._local = threading.local()
        if os.getpid() != self._pid:
            return
        me = threading.current_thread()
        for conn, owner in conns.items():
            if owner is me or not owner.is_alive():
                with contextlib.suppress(Exception):
                    conn.close()

    @staticmethod
    def _clock(conn: sqlite3.Connection) -> float:
        """The database's clock in unix seconds: SQLite's own (its VFS asks the OS, with millisecond
        resolution), not this process's time.time(), which a library or test may shift. Read inside
        the transaction it is used in, so time spent waiting for the write lock is not lost."""
        return conn.execute(_CLOCK_SQL).fetchone()[0]

    # -- schema ---------------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        if self.read_only:
            raise UsageError(f"SQLite database {os.path.abspath(self.path)} was opened read-only: it cannot be migrated")
        conn = self._conn()
        on_open, self._local.applied = getattr(self._local, "applied", []), []
        return on_open + self._migrate(conn)

    def _migrate(self, conn: sqlite3.Connection) -> list[int]:
        applied_now: list[int] = []
        if self._schema_current(conn):
            self._migrated = True  # checked without the write lock: a caller may hold it (submit with conn=)
            return applied_now
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS conveyor_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM conveyor_migrations")}
            for version, name, sql in MIGRATIONS:
                if version in done:
                    continue
                for statement in sql.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO conveyor_migrations VALUES (?, ?, ?)", (version, name, time.time()))
                applied_now.append(version)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if applied_now:
            conn.execute("ANALYZE")
        self._migrated = True
        return applied_now

    @staticmethod
    def _schema_current(conn: sqlite3.Connection) -> bool:
        try:
            row = conn.execute("SELECT max(version) FROM conveyor_migrations").fetchone()
        except sqlite3.OperationalError:  # no migrations table yet
            return False
        return row[0] is not None and row[0] >= MIGRATIONS[-1][0]

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
            before = own.execute("SELECT seq FROM sqlite_sequence WHERE name = 'conveyor_items'").fetchone()
            doc = "[" + ",".join(
                f"[{it.payload_json},{_dumps((it.queue, it.key, it.priority, now if it.run_at is None else it.run_at))[1:]}"
                for it in items) + "]"
            own.execute(_INSERT_BATCH_SQL, (doc, now))
        first = (before[0] if before else 0) + 1
        return list(range(first, first + len(items)))

    def submit_payloads(self, queue: str, payloads: Sequence[Any], run_at: float | None, priority: int) -> int:
        """One JSON document of every payload (a single orjson call, see codec.encode_rows) that
        SQLite takes apart in C: no Python work per item. Encoded before the write lock is taken."""
        doc = encode_rows(payloads)
        with self.transaction() as own:
            now = self._clock(own)
            return own.execute(_INSERT_PAYLOADS_SQL, (doc, queue, priority, now if run_at is None else run_at, now)).rowcount

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, items: Sequence[NewItem], now: float) -> list[int | None]:
        """Row by row, learning each id (or None where a dedup key already exists)."""
        cur = conn.cursor()
        ids: list[int | None] = []
        for it in items:
            cur.execute(_INSERT_SQL, (it.queue, it.payload_json, it.key, it.dedup_key, it.priority,
                                      now if it.run_at is None else it.run_at, now, now))
            ids.append(cur.lastrowid if cur.rowcount == 1 else None)
        return ids

    def find_dedup(self, queue: str, dedup_key: str, conn: Any = None) -> int | None:
        row = (self._conn() if conn is None else self._callers(conn)).execute(
            "SELECT id FROM conveyor_items WHERE queue = ? AND dedup_key = ?", (queue, dedup_key)
        ).fetchone()
        return row[0] if row else None

    # -- claim ----------------------------------------------------------------------------------
    def claim(self, claim: Claim, owner: str) -> list[Item]:
        with self.transaction() as conn:
            rows = self._claim_rows(conn, claim, owner)
        return self._items(rows)

    def _claim_rows(self, conn: sqlite3.Connection, claim: Claim, owner: str) -> list[Any]:
        sql = _CLAIM_ORDERED_SQL if claim.ordered else _CLAIM_SQL
        rows = conn.execute(sql, (owner, self._clock(conn), claim.lease_seconds, new_token(), claim.max_attempts,
                                  claim.queue, claim.limit)).fetchall()
        if rows:
            self._local.last_change = time.monotonic()  # busy: keep idle polling brisk (wait_for_change)
        return rows

    @staticmethod
    def _items(rows: list[Any]) -> list[Item]:
        items = [row_to_item(r) for r in rows]
        items.sort(key=lambda i: (-i.priority, i.run_at, i.id))
        return items

    def settle_and_claim(self, outcomes: Outcomes, claims: Sequence[Claim], owner: str) -> tuple[list[int], list[list[Item]]]:
        """A worker's whole cycle in one write transaction; rows become Items after the commit,
        so the write lock is held for SQL only."""
        with self.transaction() as conn:
            now = self._clock(conn)
            lost = self._fenced(_RESOLVE_SQL, outcomes.resolved, now, conn)
            lost += self._fenced(_RETRY_SQL, outcomes.retried, now, conn)
            lost += self._fenced(_FAIL_SQL, outcomes.failed, now, conn)
            lost += self._fenced(_RELEASE_SQL, outcomes.released, now, conn)
            batches = [self._claim_rows(conn, c, owner) for c in claims]
        return lost, [self._items(rows) for rows in batches]

    # -- settle ---------------------------------------------------------------------------------
    def _fenced(self, sql: str, entries: Sequence[Sequence[Any]], when: float | None = None, conn: Any = None,
                offset: float = 0.0) -> list[int]:
        """Run a batch settle statement; `when` defaults to the database clock (+ offset)."""
        if not entries:
            return []
        batch = orjson.dumps(entries).decode()
        if conn is not None:
            at = self._clock(conn) + offset if when is None else when
            return refused(entries, [r[0] for r in conn.execute(sql, (batch, at))])
        with self.transaction() as own:
            at = self._clock(own) + offset if when is None else when
            accepted = [r[0] for r in own.execute(sql, (batch, at))]
        return refused(entries, accepted)

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
        except sqlite3.OperationalError as exc:
            raise StoreError(f"SQLite database {self.path!r}: {exc}") from exc
        finally:
            conn.close()

    async def resolve_in(self, conn: sqlite3.Connection, tokens: Sequence[Token]) -> list[int]:
        """Resolve inside an async_transaction(); returns the refused ids."""
        return self._fenced(_RESOLVE_SQL, tokens, conn=conn)

    def resolve(self, tokens: Sequence[Token]) -> list[int]:
        return self._fenced(_RESOLVE_SQL, tokens)

    def retry(self, entries: Sequence[tuple[int, int, float, str]]) -> list[int]:
        return self._fenced(_RETRY_SQL, entries)

    def fail(self, entries: Sequence[tuple[int, int, str]]) -> list[int]:
        return self._fenced(_FAIL_SQL, entries)

    def release(self, tokens: Sequence[Token]) -> list[int]:
        return self._fenced(_RELEASE_SQL, tokens)

    # -- leases ---------------------------------------------------------------------------------
    def extend_leases(self, tokens: Sequence[Token], lease_seconds: float) -> list[int]:
        return self._fenced(_EXTEND_SQL, tokens, offset=lease_seconds)

    def rescue_expired(self) -> list[tuple[int, str]]:
        with self.transaction() as conn:
            return [(r[0], r[1]) for r in conn.execute(_RESCUE_SQL, (self._clock(conn),)).fetchall()]

    # -- operators ------------------------------------------------------------------------------
    def get(self, item_id: int) -> Item:
        row = self._conn().execute(f"SELECT {ITEM_COLUMNS} FROM conveyor_items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise ItemNotFound(f"no item with id {item_id}")
        return row_to_item(row)

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        conn = self._conn()
        now = self._clock(conn)
        where, args = "", []
        if queues:
            where = f"WHERE queue IN ({','.join('?' * len(queues))})"
            args = list(queues)
        counts = conn.execute(f"SELECT queue, state, count(*) FROM conveyor_items {where} GROUP BY queue, state", args).fetchall()
        queue_names = sorted({c[0] for c in counts} | set(queues or []))
        oldest = []
        recent = []
        for q in queue_names:
            row = conn.execute(
                "SELECT min(run_at) FROM conveyor_items INDEXED BY conveyor_items_pending "
                "WHERE queue = ? AND state = 'pending' AND run_at <= ?", (q, now)
            ).fetchone()
            oldest.append((q, None if row[0] is None else now - row[0]))
            row = conn.execute(
                "SELECT count(*) FROM conveyor_items WHERE queue = ? AND state = 'resolved' AND finished_at >= ?",
                (q, now - 60),
            ).fetchone()
            recent.append((q, row[0]))
        return shape_stats(counts, oldest, recent, queues)

    def has_work(self, queues: Sequence[str]) -> bool:
        conn = self._conn()
        for q in queues:
            for state in ("pending", "in_progress"):
                if conn.execute("SELECT 1 FROM conveyor_items WHERE queue = ? AND state = ? LIMIT 1", (q, state)).fetchone():
                    return True
        return False

    def cancel(self, item_id: int) -> None:
        with self.transaction() as conn:
            row = conn.execute("SELECT state FROM conveyor_items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise ItemNotFound(f"no item with id {item_id}")
            if row[0] not in ("pending", "in_progress"):
                raise UsageError(f"item {item_id} is {row[0]}: only pending or in-progress items can be cancelled")
            now = self._clock(conn)
            conn.execute(
                f"UPDATE conveyor_items SET state = 'cancelled', finished_at = ?, updated_at = ?, claim_token = NULL, {_SETTLE_CLEAR} WHERE id = ?",
                (now, now, item_id),
            )

    def requeue(self, queue: str, ids: Sequence[int] | None = None) -> int:
        sql = (
            f"UPDATE conveyor_items SET state = 'pending', attempts = 0, rescued = 0, run_at = ({_NOW}), finished_at = NULL, "
            f"updated_at = ({_NOW}) WHERE queue = ? AND state IN ('dead', 'cancelled')"
        )
        args: list[Any] = [queue]
        if ids is not None:
            if not ids:
                return 0
            sql += f" AND id IN ({','.join('?' * len(ids))})"
            args += list(ids)
        with self.transaction() as conn:
            return conn.execute(sql, args).rowcount

    def purge(self, queue: str, older_than_seconds: float) -> int:
        with self.transaction() as conn:
            cutoff = self._clock(conn) - older_than_seconds
            return conn.execute(
                "DELETE FROM conveyor_items WHERE queue = ? AND state IN ('resolved', 'dead', 'cancelled') AND finished_at <= ?",
                (queue, cutoff),
            ).rowcount

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
