"""The SQLite raw-SQL reference loop: conveyor's own claim and resolve statements, driven straight
through sqlite3 by P processes with no conveyor layer (no Items, no threads, no leases kept alive).

Each process loops one BEGIN IMMEDIATE transaction that resolves the batch it claimed last time
(the batched, token-fenced json_each statement) and claims the next batch (UPDATE … RETURNING
through the pinned partial index): the same shape as conveyor's worker cycle, minus everything
around it. What it reaches is the ceiling conveyor's SQLite drain is compared with.

Run alone: python -m bench.raw_sqlite [--items 20000] [--processes 2] [--batch-size 100]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import time
from typing import Any

# The statements themselves come from the store, so the reference never drifts from conveyor.
from conveyor.stores.sqlite import BUSY_TIMEOUT_MS
from conveyor.stores.sqlite_queries import CLAIM, INSERT, MIGRATIONS, RESOLVE

from .common import QUEUE, payloads, run_forked, sqlite_database

CLAIM_SQL = CLAIM
RESOLVE_SQL = RESOLVE
INSERT_SQL = INSERT
LEASE_SECONDS = 30.0
MAX_ATTEMPTS = 5


def connect(path: str) -> sqlite3.Connection:
    """A connection set up as SQLiteStore sets up its own: autocommit, WAL, NORMAL sync, busy wait."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def create(path: str, n: int) -> float:
    """Schema from the store's migrations (then ANALYZE, as migrate does), N items inserted with
    the store's INSERT in one transaction. Returns the insert's seconds."""
    conn = connect(path)
    conn.execute("BEGIN IMMEDIATE")
    for _, _, sql in MIGRATIONS:
        for statement in sql.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    now = time.time()
    rows = [(QUEUE, json.dumps(p, separators=(",", ":")), None, None, 0, now, now, now) for p in payloads(n)]
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(INSERT_SQL, rows)
    conn.execute("COMMIT")
    seconds = time.perf_counter() - t0
    conn.close()
    return seconds


def loop(path: str, batch_size: int, out: Any) -> None:
    """One process: resolve what it holds and claim the next batch, in one transaction, until a
    claim comes back empty. Reports how many items it resolved."""
    conn = connect(path)
    owner = f"raw:{os.getpid()}"
    held: list[int] = []
    token = 0
    resolved = 0
    while True:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        if held:
            resolved += len(conn.execute(RESOLVE_SQL, (json.dumps(held), now, token)).fetchall())
        token = secrets.randbits(63)
        rows = conn.execute(CLAIM_SQL, (owner, now, LEASE_SECONDS, token, MAX_ATTEMPTS, QUEUE, batch_size)).fetchall()
        conn.execute("COMMIT")
        if not rows:
            break
        held = [r[0] for r in rows]  # the batch's ids; the claim gave them all one token
    conn.close()
    out.put(resolved)


def counts(path: str) -> dict[str, int]:
    conn = connect(path)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM conveyor_items GROUP BY state").fetchall())
    finally:
        conn.close()


def drain(path: str, processes: int, batch_size: int) -> tuple[float, float]:
    """Run the loop in `processes` forked processes: (seconds from the first fork to the last exit,
    CPU seconds they used)."""
    return run_forked(loop, (path, batch_size), processes, "raw SQLite loop")


def run(n: int, processes: int, batch_size: int, tmpdir: str | None = None) -> dict:
    """Fresh file, N items, drained by the raw loop; checked from the table. Returns the figures."""
    with sqlite_database(tmpdir) as path:
        insert_s = create(path, n)
        seconds, cpu = drain(path, processes, batch_size)
        got = counts(path)
    if got != {"resolved": n}:
        raise RuntimeError(f"raw SQLite loop left the table as {got}, expected {{'resolved': {n}}}")
    return {"raw_seconds": seconds, "raw_per_s": n / seconds,
            "raw_cpu_us_per_item": 1e6 * cpu / n,
            "raw_insert_per_s": n / insert_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    for _ in range(args.repeat):
        r = run(args.items, args.processes, args.batch_size, )
        print(f"raw SQLite loop: {args.items} items, {args.processes} process(es), "
              f"batch {args.batch_size}: {r['raw_per_s']:,.0f} items/s ({r['raw_seconds']:.2f} s), "
              f"{r['raw_cpu_us_per_item']:.1f} µs CPU/item; insert {r['raw_insert_per_s']:,.0f} items/s")


if __name__ == "__main__":
    main()
