"""SQLite's statements, by name: the same names as postgres_queries where the two do the same
thing. Parameters are positional (`?`, or `?N` where a statement uses one several times). Times
are unix seconds (REAL) from SQLite's own clock (NOW)."""

from __future__ import annotations

from .common import ITEM_COLUMNS

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
    (
        3,
        "indexes for browsing items newest first (list_items)",
        # Both are in rowid (= id) order within their columns. Finished items of a queue and state
        # (pending and running ones are read in id order from conveyor_items_status, where their
        # finished_at is NULL). Its condition names finished_at, not state: a claim changes state
        # but not finished_at, so SQLite knows a claim cannot add an entry and skips the index;
        # measured, 20k items, 2 worker processes, 6 interleaved rounds: CPU per item 20.7 → 21.8 µs,
        # where `WHERE state IN ('resolved', 'dead', 'cancelled')` cost 20.0 → 23.9 µs (-17% drain).
        # A key's items whatever their state: key and id never change and SQLite only maintains the
        # indexes whose columns an UPDATE changes, so claims and settles never touch it (measured:
        # no change). Building them on a large table holds the write lock for as long as that takes.
        """
        CREATE INDEX IF NOT EXISTS conveyor_items_browse ON conveyor_items (queue, state)
            WHERE finished_at IS NOT NULL;
        CREATE INDEX IF NOT EXISTS conveyor_items_key_history ON conveyor_items (queue, key)
            WHERE key IS NOT NULL;
        """,
    ),
    (
        4,
        "fewer index writes per item: no index over every row",
        # A claim and a resolve used to touch seven index entries per item (pending -, leases +,
        # status -+ on the claim; leases -, status -+, browse + on the resolve). conveyor_items_status
        # covered every row so that counts, purge and the throughput figure had an index; each of
        # those now reads a partial index instead: pending items from conveyor_items_pending,
        # running ones from conveyor_items_running (which also tells their queue), finished ones
        # from conveyor_items_finished. Five entries per item remain.
        # The partial indexes end with `state`, which their condition fixes: SQLite does not take a
        # partial index's condition as covered, so without the column a count or a list of ids read
        # the table row of every entry (a count over a million pending rows: a million row reads).
        """
        DROP INDEX IF EXISTS conveyor_items_status;
        DROP INDEX IF EXISTS conveyor_items_leases;
        DROP INDEX IF EXISTS conveyor_items_pending;
        CREATE INDEX conveyor_items_pending ON conveyor_items (queue, priority DESC, run_at, id, key, state)
            WHERE state = 'pending';
        CREATE INDEX IF NOT EXISTS conveyor_items_running ON conveyor_items (queue, lease_expires_at, state)
            WHERE state = 'in_progress';
        CREATE INDEX IF NOT EXISTS conveyor_items_finished ON conveyor_items (queue, state, finished_at)
            WHERE finished_at IS NOT NULL;
        """,
    ),
    (
        5,
        "periodic schedules: each one's last tick",
        # One row per schedule (app.periodic), advanced by a compare-and-set on `version` in the
        # transaction that submits its tick's item (see stores/schedules.py). Items are purged and
        # pruned; this row stays, so a tick is never submitted twice.
        """
        CREATE TABLE IF NOT EXISTS conveyor_periodic (
            queue      TEXT    NOT NULL,
            name       TEXT    NOT NULL,
            schedule   TEXT    NOT NULL,
            last_tick  REAL    NOT NULL,
            next_tick  REAL,
            version    INTEGER NOT NULL DEFAULT 1,
            updated_at REAL    NOT NULL,
            PRIMARY KEY (queue, name)
        )
        """,
    ),
    (
        6,
        "flow control: pauses and holds, and the rate limiters' state",
        # A row per paused or held queue (scope 'queue', key '') or key (scope 'key'): claims skip
        # what is paused, or held until later. A rate limiter's state (GCRA: the theoretical arrival
        # time of the next start, unix seconds) per queue or key, written by limited claims only.
        """
        CREATE TABLE IF NOT EXISTS conveyor_controls (
            queue      TEXT NOT NULL,
            scope      TEXT NOT NULL CHECK (scope IN ('queue', 'key')),
            key        TEXT NOT NULL,
            paused     INTEGER NOT NULL DEFAULT 0,
            held_until REAL,
            reason     TEXT,
            updated_at REAL NOT NULL,
            PRIMARY KEY (queue, scope, key)
        );
        CREATE TABLE IF NOT EXISTS conveyor_rates (
            queue TEXT NOT NULL,
            scope TEXT NOT NULL CHECK (scope IN ('queue', 'key')),
            key   TEXT NOT NULL,
            tat   REAL NOT NULL,
            PRIMARY KEY (queue, scope, key)
        );
        """,
    ),
]

# -- flow control -------------------------------------------------------------------------------
# Every claim skips a paused or held queue (one primary-key probe, evaluated once per statement)
# and paused or held keys: the per-row probe runs only while the queue has such a key at all (an
# uncorrelated EXISTS, evaluated once per statement), so a queue without key controls pays nothing
# per item. ?2: now; ?6: the queue.
_STOPPED = "(paused = 1 OR held_until > ?2)"
QUEUE_GOES = f"NOT EXISTS (SELECT 1 FROM conveyor_controls WHERE queue = ?6 AND scope = 'queue' AND key = '' AND {_STOPPED})"


def _key_goes(alias: str) -> str:
    return (f"({alias}.key IS NULL OR NOT EXISTS (SELECT 1 FROM conveyor_controls WHERE queue = ?6 AND scope = 'key' "
            f"AND {_STOPPED}) OR NOT EXISTS (SELECT 1 FROM conveyor_controls AS k WHERE k.queue = ?6 "
            f"AND k.scope = 'key' AND k.key = {alias}.key AND (k.paused = 1 OR k.held_until > ?2)))")

_CLAIM_SET = """
UPDATE conveyor_items
   SET state = 'in_progress', attempts = attempts + 1, lease_owner = ?1,
       lease_expires_at = ?2 + ?3, claim_token = ?4, max_attempts = ?5, updated_at = ?2
 WHERE id IN ({candidates})
RETURNING """ + ITEM_COLUMNS

CLAIM = _CLAIM_SET.format(candidates=f"""
       SELECT id FROM conveyor_items AS c INDEXED BY conveyor_items_pending
        WHERE c.queue = ?6 AND c.state = 'pending' AND c.run_at <= ?2 AND {QUEUE_GOES} AND {_key_goes("c")}
        ORDER BY c.priority DESC, c.run_at, c.id
        LIMIT ?7""")
# [owner, now, lease, token, max_attempts, -, -, ids as a JSON array]: the items a limited claim
# picked (stores.controls), read in this same write transaction
CLAIM_IDS = _CLAIM_SET.format(candidates="SELECT value FROM json_each(?8)")

# Ordered queues: only the head of each key (its lowest unfinished id) may start, and only when it
# is pending, due, and no other item of its key is running (a requeued dead item can be later in
# id yet running). The heads are found by a skip-scan of the keyed index (one seek per distinct
# key, recursive CTE), so a claim costs O(keys · log n) however deep each key's backlog is, instead
# of a subquery per blocked pending item. Items without a key are independent, claimed like any
# queue's (that branch scans the pending index, filtering on the key column it carries).
_KEYED = "INDEXED BY conveyor_items_keyed WHERE queue = ?6 AND key IS NOT NULL AND state IN ('pending', 'in_progress')"
CLAIM_ORDERED = f"""
WITH RECURSIVE keys(k) AS (
     SELECT (SELECT key FROM conveyor_items {_KEYED} ORDER BY key LIMIT 1)
     UNION ALL
     SELECT (SELECT key FROM conveyor_items {_KEYED} AND key > keys.k ORDER BY key LIMIT 1)
       FROM keys WHERE keys.k IS NOT NULL),
heads(id) AS (
     SELECT (SELECT id FROM conveyor_items {_KEYED} AND key = keys.k ORDER BY id LIMIT 1)
       FROM keys WHERE keys.k IS NOT NULL)
""" + _CLAIM_SET.format(candidates=f"""
       SELECT id FROM (
           SELECT c.id, c.priority, c.run_at FROM heads JOIN conveyor_items AS c ON c.id = heads.id
            WHERE c.state = 'pending' AND c.run_at <= ?2 AND {QUEUE_GOES} AND {_key_goes("c")}
              AND NOT EXISTS (
                  SELECT 1 FROM conveyor_items AS o INDEXED BY conveyor_items_keyed
                   WHERE o.queue = c.queue AND o.key = c.key AND o.key IS NOT NULL
                     AND o.state IN ('pending', 'in_progress') AND o.state = 'in_progress')
           UNION ALL
           SELECT * FROM (
               SELECT id, priority, run_at FROM conveyor_items INDEXED BY conveyor_items_pending
                WHERE queue = ?6 AND state = 'pending' AND run_at <= ?2 AND key IS NULL AND {QUEUE_GOES}
                ORDER BY priority DESC, run_at, id LIMIT ?7))
        ORDER BY priority DESC, run_at, id
        LIMIT ?7""")

INSERT = """
INSERT INTO conveyor_items (queue, payload, key, dedup_key, priority, run_at, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
"""

# [[payload, queue, key, priority, run_at], ...]: items without dedup keys, so nothing conflicts
# [[payload], ...]: one queue's items, no keys, one run_at and priority (Store.submit_payloads)
INSERT_PAYLOADS = """
INSERT INTO conveyor_items (queue, payload, priority, run_at, created_at, updated_at)
SELECT ?2, value -> 0, ?3, ?4, ?5, ?5 FROM json_each(?1) ORDER BY key
"""

INSERT_BATCH = """
INSERT INTO conveyor_items (queue, payload, key, priority, run_at, created_at, updated_at)
SELECT value ->> 1, value -> 0, value ->> 2, value ->> 3, value ->> 4, ?2, ?2
  FROM json_each(?1) ORDER BY key
"""

NOW = "(julianday('now') - 2440587.5) * 86400.0"  # the database clock, unix seconds
CLOCK = f"SELECT {NOW}"

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
# [ids as a JSON array, now, token]: the items of one claim (a claim gives its whole batch one
# token), so the fence is a plain comparison and the ids a rowid IN list, not a join on
# [id, token] pairs: a resolve, the hottest settle, measured 17.0 -> 14.5 us per item (median of 5,
# batches of 100, every index in place). A flush groups its items by token.
RESOLVE = (f"{_SETTLE} state = 'resolved', finished_at = ?2, updated_at = ?2, {_SETTLE_CLEAR} "
           "WHERE id IN (SELECT value FROM json_each(?1)) AND claim_token = ?3 AND state = 'in_progress' RETURNING id")
RETRY = f"""
{_SETTLE}
       state = CASE WHEN attempts >= coalesce(max_attempts, 1) THEN 'dead' ELSE 'pending' END,
       finished_at = CASE WHEN attempts >= coalesce(max_attempts, 1) THEN ?2 END,
       run_at = ?2 + b.b2, last_error = b.b3, rescued = 0, updated_at = ?2, {_SETTLE_CLEAR}
  {_BATCH} {_FENCE}"""
FAIL = (f"{_SETTLE} state = 'dead', finished_at = ?2, updated_at = ?2, last_error = b.b2, rescued = 0, {_SETTLE_CLEAR} "
        f"{_BATCH} {_FENCE}")
RELEASE = f"{_SETTLE} state = 'pending', attempts = max(attempts - 1, 0), updated_at = ?2, {_SETTLE_CLEAR} {_BATCH} {_FENCE}"
EXTEND_LEASES = f"{_SETTLE} lease_expires_at = ?2 {_BATCH} {_FENCE}"

RESCUE = """
UPDATE conveyor_items
   SET state = CASE WHEN attempts >= coalesce(max_attempts, 1) THEN 'dead' ELSE 'pending' END,
       finished_at = CASE WHEN attempts >= coalesce(max_attempts, 1) THEN ?1 END,
       last_error = 'lease expired: worker ' || coalesce(lease_owner, '?') ||
                    ' stopped heartbeating during attempt ' || attempts ||
                    ' (it crashed, was killed, or lost the database)',
       rescued = 1, claim_token = NULL, run_at = ?1, updated_at = ?1, lease_owner = NULL, lease_expires_at = NULL
 WHERE id IN (SELECT id FROM conveyor_items INDEXED BY conveyor_items_running
               WHERE state = 'in_progress' AND lease_expires_at < ?1)
RETURNING id, state"""

# -- operators ----------------------------------------------------------------------------------
# [ids as a JSON array]: the items with these ids, in no particular order
GET_MANY = f"SELECT {ITEM_COLUMNS} FROM conveyor_items WHERE id IN (SELECT value FROM json_each(?))"
GET = f"SELECT {ITEM_COLUMNS} FROM conveyor_items WHERE id = ?"

# list_items: newest first. Finished items are read in id order from conveyor_items_browse and a
# key's from conveyor_items_key_history, each part stopped at :limit, so such a page costs
# O(limit · log n) however many items the table holds. Pending and running items have no index in
# id order (an index over every row would cost every claim and resolve two more entries): their ids
# are sorted from the pending and running indexes, which cover them (no table read but the page),
# so such a page costs O(backlog) index entries. The indexes are pinned: the planner may otherwise
# walk the table backwards by rowid, filtering, which reads every row when few match.
LIST = f"SELECT {ITEM_COLUMNS} FROM conveyor_items WHERE id < :before ORDER BY id DESC LIMIT :limit"
_LIST_PART = (f"SELECT {ITEM_COLUMNS} FROM conveyor_items INDEXED BY {{index}} WHERE queue = :queue AND {{where}} "
              "AND id < :before ORDER BY id DESC LIMIT :limit")
_LIST_SORTED = (f"SELECT {ITEM_COLUMNS} FROM conveyor_items WHERE id IN ("
                "SELECT id FROM conveyor_items INDEXED BY {index} WHERE queue = :queue AND state = '{state}' "
                "AND id < :before ORDER BY id DESC LIMIT :limit) ORDER BY id DESC")
_LIST_STATE = {
    "pending": _LIST_SORTED.format(index="conveyor_items_pending", state="pending"),
    "in_progress": _LIST_SORTED.format(index="conveyor_items_running", state="in_progress"),
} | {
    # the index's condition, word for word (finished items, and only they, have a finished_at)
    state: _LIST_PART.format(index="conveyor_items_browse", where=f"state = '{state}' AND finished_at IS NOT NULL")
    for state in ("resolved", "dead", "cancelled")
}
_LIST_KEY = _LIST_PART.format(index="conveyor_items_key_history", where="key = :key {state}")
#: one queue's page of list_items, by (state or None, keyed): one part, or every state's merged
LIST_QUEUE: dict[tuple[str | None, bool], str] = {
    (state, True): _LIST_KEY.format(state="" if state is None else f"AND state = '{state}'")
    for state in (None, *_LIST_STATE)
} | {(state, False): sql for state, sql in _LIST_STATE.items()} | {
    (None, False): " UNION ALL ".join(f"SELECT * FROM ({part})" for part in _LIST_STATE.values())
    + " ORDER BY id DESC LIMIT :limit"
}
# Pending items (or all of a queue's) are usually among the newest: look there first, walking the
# primary key down from :before, at most LIST_WINDOW rows; the sorted index read only if that
# window holds fewer than a page.
LIST_WINDOW = 2000
LIST_RECENT = {
    state: f"SELECT * FROM (SELECT {ITEM_COLUMNS} FROM conveyor_items WHERE id < :before ORDER BY id DESC "
           f"LIMIT :window) AS recent WHERE queue = :queue {where} ORDER BY id DESC LIMIT :limit"
    for state, where in ((None, ""), ("pending", "AND state = 'pending'"))
}
# every queue name: a loose scan, one probe per name of each partial index that has queue first
_MIN_QUEUE = "(SELECT min(queue) FROM conveyor_items INDEXED BY {index} WHERE {where}{after})"
_QUEUE_AFTER = ", ".join(_MIN_QUEUE.format(index=i, where=w, after="{after}") for i, w in (
    ("conveyor_items_pending", "state = 'pending'"), ("conveyor_items_running", "state = 'in_progress'"),
    ("conveyor_items_finished", "finished_at IS NOT NULL")))
QUEUES = f"""
WITH RECURSIVE names(q) AS (
     SELECT min({_QUEUE_AFTER.format(after="")})
     UNION ALL
     SELECT min({_QUEUE_AFTER.format(after=" AND queue > names.q")}) FROM names WHERE names.q IS NOT NULL)
SELECT q FROM names WHERE q IS NOT NULL"""
FIND_DEDUP = "SELECT id FROM conveyor_items WHERE queue = ? AND dedup_key = ?"
# [queues as a JSON array]: does any of them hold pending or in-progress items (the claim and
# lease indexes answer; nothing reads finished rows)
HAS_WORK = """
SELECT EXISTS (SELECT 1 FROM conveyor_items INDEXED BY conveyor_items_pending
                WHERE queue IN (SELECT value FROM json_each(?1)) AND state = 'pending')
    OR EXISTS (SELECT 1 FROM conveyor_items INDEXED BY conveyor_items_running
                WHERE queue IN (SELECT value FROM json_each(?1)) AND state = 'in_progress')"""
CANCEL_SELECT = "SELECT state, queue, key FROM conveyor_items WHERE id = ?"
CANCEL = f"""UPDATE conveyor_items SET state = 'cancelled', finished_at = {NOW}, updated_at = {NOW},
       claim_token = NULL, {_SETTLE_CLEAR} WHERE id = ?"""
REQUEUE = f"""UPDATE conveyor_items SET state = 'pending', attempts = 0, rescued = 0, run_at = {NOW},
       finished_at = NULL, updated_at = {NOW} WHERE queue = ?1 AND state IN ('dead', 'cancelled')"""
# [queue, ids as a JSON array]
REQUEUE_IDS = REQUEUE + " AND id IN (SELECT value FROM json_each(?2))"
# [queue, seconds]: `<=`, so `older than 0 s` includes items finished this instant (the clock has
# millisecond steps)
PURGE = f"""DELETE FROM conveyor_items WHERE id IN (
       SELECT id FROM conveyor_items INDEXED BY conveyor_items_finished
        WHERE queue = ? AND state IN ('resolved', 'dead', 'cancelled') AND finished_at IS NOT NULL
          AND finished_at <= {NOW} - ?)"""

# -- stats --------------------------------------------------------------------------------------
# {where}: "" (every queue) or COUNTS_OF (the queues in ?1, a JSON array). Each state is counted
# from the partial index that holds it.
COUNTS_OF = "AND queue IN (SELECT value FROM json_each(?1))"
COUNTS = """
SELECT queue, 'pending', count(*) FROM conveyor_items INDEXED BY conveyor_items_pending
 WHERE state = 'pending' {where} GROUP BY queue
UNION ALL
SELECT queue, 'in_progress', count(*) FROM conveyor_items INDEXED BY conveyor_items_running
 WHERE state = 'in_progress' {where} GROUP BY queue
UNION ALL
SELECT queue, state, count(*) FROM conveyor_items INDEXED BY conveyor_items_finished
 WHERE finished_at IS NOT NULL {where} GROUP BY queue, state"""
# [queue, now]
OLDEST = """SELECT min(run_at) FROM conveyor_items INDEXED BY conveyor_items_pending
             WHERE queue = ? AND state = 'pending' AND run_at <= ?"""
# [queue, since]
RECENT = """SELECT count(*) FROM conveyor_items INDEXED BY conveyor_items_finished
             WHERE queue = ? AND state = 'resolved' AND finished_at IS NOT NULL AND finished_at >= ?"""
LAST_ID = "SELECT seq FROM sqlite_sequence WHERE name = 'conveyor_items'"

# -- schema -------------------------------------------------------------------------------------
CREATE_MIGRATIONS = """CREATE TABLE IF NOT EXISTS conveyor_migrations
       (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"""
MIGRATIONS_DONE = "SELECT version FROM conveyor_migrations"
RECORD_MIGRATION = f"INSERT INTO conveyor_migrations (version, name, applied_at) VALUES (?, ?, {NOW})"
HAS_MIGRATIONS_TABLE = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'conveyor_migrations'"
HAS_ITEMS_TABLE = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'conveyor_items'"
ANALYZE_AFTER_MIGRATION = "ANALYZE"

# -- flow control: limited claims (stores.controls), backoffs, pauses ------------------------------
CONTROL_NOW = CLOCK
# [queue (, queue)]: what a limited claim reads first under its lock: the database's clock, whether
# the queue is paused or held, and (True: with max_in_progress) its items in progress
LIMIT_STATE = {counted: f"SELECT {NOW}, EXISTS (SELECT 1 FROM conveyor_controls WHERE queue = ? AND scope = 'queue' "
                        f"AND key = '' AND (paused = 1 OR held_until > {NOW})), "
                        + ("(SELECT count(*) FROM conveyor_items INDEXED BY conveyor_items_running WHERE queue = ? "
                           "AND state = 'in_progress')" if counted else "0")
               for counted in (False, True)}
# [queue, now]
STOPPED_KEYS = "SELECT key FROM conveyor_controls WHERE queue = ? AND scope = 'key' AND (paused = 1 OR held_until > ?)"
# [queue]
RUNNING_KEYS = ("SELECT key, count(*) FROM conveyor_items INDEXED BY conveyor_items_running "
                "WHERE queue = ? AND state = 'in_progress' AND key IS NOT NULL GROUP BY key")
# [queue, most]: the keys with pending or running items, by a skip-scan of the keyed index
PENDING_KEYS = f"""
WITH RECURSIVE keys(k) AS (
     SELECT (SELECT key FROM conveyor_items {_KEYED.replace('?6', '?1')} ORDER BY key LIMIT 1)
     UNION ALL
     SELECT (SELECT key FROM conveyor_items {_KEYED.replace('?6', '?1')} AND key > keys.k ORDER BY key LIMIT 1)
       FROM keys WHERE keys.k IS NOT NULL)
SELECT k FROM keys WHERE k IS NOT NULL LIMIT ?2"""
# [queue, key, now, most]: a key's first pending items in claim order
# The keyed index holds a key's items in id order, not claim order: reading and sorting a key's
# whole backlog cost 28 ms a claim with 100,000 items of one key, and an index in claim order cost
# keyed drains a fifth of their speed. So a key's first due items in id order are read (?5 of them:
# SQLiteStore._key_heads asks for KEY_WINDOW, or 4 times the key's share of the batch if more) and
# sorted into claim order: priority counts among those (PostgreSQL reads an index in claim order).
KEY_WINDOW = 64
KEY_HEADS = (f"SELECT * FROM (SELECT id, key, priority, run_at FROM conveyor_items {_KEYED.replace('?6', '?1')} "
             "AND key = ?2 AND state = 'pending' AND run_at <= ?3 ORDER BY id LIMIT ?5) "
             "ORDER BY priority DESC, run_at, id LIMIT ?4")
# [queue, now, most]
UNKEYED_HEADS = ("SELECT id, key, priority, run_at FROM conveyor_items INDEXED BY conveyor_items_pending "
                 "WHERE queue = ? AND state = 'pending' AND run_at <= ? AND key IS NULL "
                 "ORDER BY priority DESC, run_at, id LIMIT ?")
# [queue, scope, keys as a JSON array]
RATES = "SELECT key, tat FROM conveyor_rates WHERE queue = ? AND scope = ? AND key IN (SELECT value FROM json_each(?))"
# [queue, scope, JSON [[key, tat], ...]]: the limiters a claim advanced, in one statement
SET_RATES = ("INSERT INTO conveyor_rates (queue, scope, key, tat) SELECT ?, ?, json_extract(value, '$[0]'), "
             "json_extract(value, '$[1]') FROM json_each(?) WHERE true "
             "ON CONFLICT (queue, scope, key) DO UPDATE SET tat = excluded.tat")
# a Backoff: back to pending after b2 seconds, the attempt given back
BACKOFF = (f"{_SETTLE} state = 'pending', attempts = max(attempts - 1, 0), run_at = ?2 + b.b2, updated_at = ?2, "
           f"{_SETTLE_CLEAR} {_BATCH} {_FENCE}")
# [ids as a JSON array]
ITEM_KEYS = "SELECT id, queue, key FROM conveyor_items WHERE id IN (SELECT value FROM json_each(?))"
# [queue, scope, key, until, reason, now]: a hold never shortens one already there
HOLD = """INSERT INTO conveyor_controls (queue, scope, key, held_until, reason, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT (queue, scope, key) DO UPDATE SET held_until = max(coalesce(conveyor_controls.held_until, 0), excluded.held_until),
       reason = excluded.reason, updated_at = excluded.updated_at"""
# [queue, scope, key]
PAUSE = f"""INSERT INTO conveyor_controls (queue, scope, key, paused, updated_at) VALUES (?, ?, ?, 1, {NOW})
ON CONFLICT (queue, scope, key) DO UPDATE SET paused = 1, updated_at = excluded.updated_at"""
RESUME = f"UPDATE conveyor_controls SET paused = 0, updated_at = {NOW} WHERE queue = ? AND scope = ? AND key = ? AND paused = 1"
# [queue, now]: rows that no longer pause or hold anything
FORGET_CONTROLS = "DELETE FROM conveyor_controls WHERE queue = ? AND paused = 0 AND (held_until IS NULL OR held_until <= ?)"
# [now]: what pauses or holds something now, for status
CONTROLS = ("SELECT queue, scope, key, paused, held_until, reason FROM conveyor_controls "
            "WHERE paused = 1 OR held_until > ? ORDER BY queue, scope, key")

# -- periodic schedules (stores/schedules.py) ---------------------------------------------------
SCHEDULES = "SELECT queue, name, schedule, last_tick, next_tick, version, updated_at FROM conveyor_periodic ORDER BY queue, name"
# [queue, name, schedule, last_tick, next_tick]: no row back if another worker stored it first
SCHEDULE_CREATE = f"""INSERT INTO conveyor_periodic (queue, name, schedule, last_tick, next_tick, updated_at)
VALUES (?, ?, ?, ?, ?, {NOW}) ON CONFLICT (queue, name) DO NOTHING RETURNING version"""
# [schedule, last_tick, next_tick, queue, name, version]: no row back if the version moved on
SCHEDULE_ADVANCE = f"""UPDATE conveyor_periodic SET schedule = ?, last_tick = ?, next_tick = ?, version = version + 1,
       updated_at = {NOW} WHERE queue = ? AND name = ? AND version = ? RETURNING version"""
# [queue, key, id]: the earliest unfinished item of the key before this one (why an ordered item waits)
KEY_AHEAD = ("SELECT id, state FROM conveyor_items INDEXED BY conveyor_items_keyed WHERE queue = ? AND key = ? "
             "AND key IS NOT NULL AND state IN ('pending', 'in_progress') AND id < ? ORDER BY id LIMIT 1")
# [queue, now, most]: the queue's next pending due items in claim order (a limited claim's candidates)
CANDIDATES = ("SELECT id, key, priority, run_at FROM conveyor_items INDEXED BY conveyor_items_pending "
              "WHERE queue = ? AND state = 'pending' AND run_at <= ? ORDER BY priority DESC, run_at, id LIMIT ?")
