"""The minimal bare loop: the ceiling conveyor's drain is compared against.

Not conveyor's statements (that is the raw loop, bench.raw_sqlite / bench.raw_postgres) but the least
a durable job queue can do: one table, one partial index on the pending ids, a claim and a resolve in
one statement each.

    q(id, payload, status, lease_owner, lease_expires_at, attempts, updated_at)
    CREATE INDEX q_pending ON q(id) WHERE status = 'pending'

Each of P processes loops until a claim comes back empty:
  SQLite      BEGIN IMMEDIATE; UPDATE q SET status='running', lease_owner=?, lease_expires_at=?,
              attempts=attempts+1, updated_at=? WHERE id IN (SELECT id FROM q INDEXED BY q_pending
              WHERE status='pending' ORDER BY id LIMIT ?) RETURNING id, payload; COMMIT
              then  UPDATE q SET status='done', updated_at=? WHERE id IN (SELECT value FROM
              json_each(?)) AND lease_owner=?   (its own autocommit transaction)
              WAL, synchronous=NORMAL (conveyor's settings); id INTEGER PRIMARY KEY, payload TEXT
  PostgreSQL  the same claim with FOR UPDATE SKIP LOCKED in the subquery, one autocommit statement;
              the resolve with id = ANY(%s::bigint[]); durable defaults (fsync, synchronous_commit);
              id bigserial, payload text (the JSON text as submitted, unvalidated), timestamps
              timestamptz from now()
The payloads are the throughput workload's (bench.common.payloads), inserted in one transaction,
then ANALYZE. The loop fetches each claimed row (id, payload) and does not decode the payload.

    python -m bench.minimal [--store sqlite|postgres|all] [--items 20000] [--processes 2] [--batch-size 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from typing import Any

from .common import PG_ADMIN_URL, payloads, pg_database, pg_problem, run_forked, sqlite_database

LEASE_SECONDS = 30.0

SQLITE_SCHEMA = """
CREATE TABLE q (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
                lease_owner TEXT, lease_expires_at REAL, attempts INTEGER NOT NULL DEFAULT 0, updated_at REAL);
CREATE INDEX q_pending ON q(id) WHERE status = 'pending'
"""
SQLITE_INSERT = "INSERT INTO q (payload, status, updated_at) VALUES (?, 'pending', ?)"
SQLITE_CLAIM = ("UPDATE q SET status = 'running', lease_owner = ?, lease_expires_at = ?, attempts = attempts + 1, "
                "updated_at = ? WHERE id IN (SELECT id FROM q INDEXED BY q_pending WHERE status = 'pending' "
                "ORDER BY id LIMIT ?) RETURNING id, payload")
SQLITE_RESOLVE = ("UPDATE q SET status = 'done', updated_at = ? WHERE id IN (SELECT value FROM json_each(?)) "
                  "AND lease_owner = ?")

PG_SCHEMA = """
CREATE TABLE q (id bigserial PRIMARY KEY, payload text NOT NULL, status text NOT NULL DEFAULT 'pending',
                lease_owner text, lease_expires_at timestamptz, attempts integer NOT NULL DEFAULT 0,
                updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX q_pending ON q(id) WHERE status = 'pending'
"""
PG_INSERT = "INSERT INTO q (payload) SELECT unnest(%s::text[])"
PG_CLAIM = ("UPDATE q SET status = 'running', lease_owner = %s, lease_expires_at = now() + %s * interval '1 second', "
            "attempts = attempts + 1, updated_at = now() WHERE id IN (SELECT id FROM q WHERE status = 'pending' "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, payload")
PG_RESOLVE = "UPDATE q SET status = 'done', updated_at = now() WHERE id = ANY(%s::bigint[]) AND lease_owner = %s"
PG_SUBMIT = "WITH i AS (INSERT INTO q (payload) VALUES (%s) RETURNING id) SELECT pg_notify('q', '') FROM i"


# -- SQLite --------------------------------------------------------------------------------------

def sqlite_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def sqlite_create(path: str, n: int = 0) -> float:
    """Schema, N payloads in one transaction, ANALYZE. Returns the insert's seconds."""
    conn = sqlite_connect(path)
    conn.executescript(SQLITE_SCHEMA)
    texts = [json.dumps(p, separators=(",", ":")) for p in payloads(n)]
    now = time.time()
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(SQLITE_INSERT, ((t, now) for t in texts))
    conn.execute("COMMIT")
    seconds = time.perf_counter() - t0
    conn.execute("ANALYZE")
    conn.close()
    return seconds


def sqlite_claim(conn: sqlite3.Connection, owner: str, batch_size: int) -> list:
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    rows = conn.execute(SQLITE_CLAIM, (owner, now + LEASE_SECONDS, now, batch_size)).fetchall()
    conn.execute("COMMIT")
    return rows


def sqlite_resolve(conn: sqlite3.Connection, owner: str, rows: list) -> None:
    conn.execute(SQLITE_RESOLVE, (time.time(), json.dumps([r[0] for r in rows]), owner))


def sqlite_loop(path: str, batch_size: int, out: Any) -> None:
    conn = sqlite_connect(path)
    owner = f"min:{os.getpid()}"
    done = 0
    while rows := sqlite_claim(conn, owner, batch_size):
        sqlite_resolve(conn, owner, rows)
        done += len(rows)
    conn.close()
    out.put(done)


def sqlite_counts(path: str) -> dict[str, int]:
    conn = sqlite_connect(path)
    try:
        return dict(conn.execute("SELECT status, count(*) FROM q GROUP BY status").fetchall())
    finally:
        conn.close()


# -- PostgreSQL ----------------------------------------------------------------------------------

def pg_create(url: str, n: int = 0) -> float:
    """Schema, N payloads in one statement, ANALYZE (a fresh table has no statistics). Returns the
    insert's seconds."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PG_SCHEMA)
        texts = [json.dumps(p, separators=(",", ":")) for p in payloads(n)]
        t0 = time.perf_counter()
        if texts:
            conn.execute(PG_INSERT, (texts,))
        seconds = time.perf_counter() - t0
        conn.execute("ANALYZE q")
    return seconds


def pg_connect(url: str):
    import psycopg

    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SET jit = off")
    return conn


def pg_claim(conn, owner: str, batch_size: int) -> list:
    return conn.execute(PG_CLAIM, (owner, LEASE_SECONDS, batch_size)).fetchall()


def pg_resolve(conn, owner: str, rows: list) -> None:
    conn.execute(PG_RESOLVE, ([r[0] for r in rows], owner))


def pg_loop(url: str, batch_size: int, out: Any) -> None:
    owner = f"min:{os.getpid()}"
    done = 0
    with pg_connect(url) as conn:
        while rows := pg_claim(conn, owner, batch_size):
            pg_resolve(conn, owner, rows)
            done += len(rows)
    out.put(done)


def pg_counts(url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM q GROUP BY status").fetchall())


# -- serving: waiting for new items (bench.latency's minimal reference) ----------------------------

POLL = 0.001


def serve(store: str, url: str, batch_size: int, stop: Any, on_rows=None) -> int:
    """Claim and resolve until `stop` is set, waiting for new items when a claim comes back empty:
    SQLite polls the claim every millisecond; PostgreSQL LISTENs on channel q (the submitter's
    insert NOTIFYs it in the same statement) and claims on each notification, re-checking `stop`
    every 50 ms. `on_rows(rows)` sees each claimed batch before it is resolved."""
    owner = f"min:{os.getpid()}"
    done = 0
    if store == "sqlite":
        conn = sqlite_connect(url.removeprefix("sqlite:///"))
        while True:
            rows = sqlite_claim(conn, owner, batch_size)
            if rows:
                if on_rows:
                    on_rows(rows)
                sqlite_resolve(conn, owner, rows)
                done += len(rows)
                continue
            if stop.is_set():
                break
            time.sleep(POLL)
        conn.close()
        return done
    import psycopg

    with pg_connect(url) as conn, psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN q")
        while True:
            rows = pg_claim(conn, owner, batch_size)
            if rows:
                if on_rows:
                    on_rows(rows)
                pg_resolve(conn, owner, rows)
                done += len(rows)
                continue
            if stop.is_set():
                break
            for _ in listener.notifies(timeout=0.05, stop_after=1):
                pass
            for _ in listener.notifies(timeout=0):
                pass
    return done


def submitter(store: str, url: str):
    """(submit(payload dict), close): one autocommit insert per call; on PostgreSQL the insert and
    its NOTIFY are one statement, delivered at its commit."""
    if store == "sqlite":
        conn = sqlite_connect(url.removeprefix("sqlite:///"))

        def submit(payload: dict) -> None:
            conn.execute(SQLITE_INSERT, (json.dumps(payload, separators=(",", ":")), time.time()))

        return submit, conn.close
    conn = pg_connect(url)

    def submit_pg(payload: dict) -> None:
        conn.execute(PG_SUBMIT, (json.dumps(payload, separators=(",", ":")),))

    return submit_pg, conn.close


def create(store: str, url: str) -> None:
    """The empty schema in a fresh database (a sqlite:/// URL or a PostgreSQL one)."""
    if store == "sqlite":
        sqlite_create(url.removeprefix("sqlite:///"))
    else:
        pg_create(url)


def counts(store: str, url: str) -> dict[str, int]:
    return sqlite_counts(url.removeprefix("sqlite:///")) if store == "sqlite" else pg_counts(url)


# -- the drain -----------------------------------------------------------------------------------

def run(store: str, n: int, processes: int, batch_size: int, tmpdir: str | None = None,
        admin_url: str = PG_ADMIN_URL) -> dict:
    """Fresh database, N items, drained by P minimal loops; checked from the table.
    Returns minimal_per_s (drain: first fork → last exit), minimal_cpu_us_per_item, minimal_insert_per_s."""
    if store == "sqlite":
        with sqlite_database(tmpdir) as path:
            insert_s = sqlite_create(path, n)
            seconds, cpu = run_forked(sqlite_loop, (path, batch_size), processes, "minimal SQLite loop")
            got = sqlite_counts(path)
    else:
        with pg_database(admin_url, suffix="min") as url:
            insert_s = pg_create(url, n)
            seconds, cpu = run_forked(pg_loop, (url, batch_size), processes, "minimal PostgreSQL loop")
            got = pg_counts(url)
    if got != {"done": n}:
        raise RuntimeError(f"minimal {store} loop left the table as {got}, expected {{'done': {n}}}")
    return {"minimal_seconds": seconds, "minimal_per_s": n / seconds, "minimal_cpu_us_per_item": 1e6 * cpu / n,
            "minimal_insert_per_s": n / insert_s}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.minimal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args(argv)
    stores = ["sqlite", "postgres"] if args.store == "all" else [args.store]
    if "postgres" in stores and (problem := pg_problem(args.pg)):
        print(f"skipping postgres: {problem}")
        stores.remove("postgres")
    for _ in range(args.repeat):
        for store in stores:
            r = run(store, args.items, args.processes, args.batch_size, args.tmpdir, args.pg)
            print(f"minimal {store} loop: {args.items:,} items, {args.processes} process(es), batch {args.batch_size}: "
                  f"{r['minimal_per_s']:,.0f} items/s ({r['minimal_seconds']:.2f} s), "
                  f"{r['minimal_cpu_us_per_item']:.1f} µs CPU/item; insert {r['minimal_insert_per_s']:,.0f} items/s")


if __name__ == "__main__":
    main()
