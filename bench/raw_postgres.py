"""The PostgreSQL raw-SQL reference loop: a claim (UPDATE … RETURNING over a SKIP LOCKED pick
through a partial index on pending items) and a batched, token-fenced resolve, driven straight
through psycopg by P processes with no conveyor layer.

Each process loops one transaction that resolves the batch it claimed last time and claims the
next: the shape of conveyor's worker cycle, minus everything around it. Two shapes (--cycle):
  statement    (default) the store's one-statement cycle (PostgresStore.settle_and_claim's SQL: the
               resolve and the claim as data-modifying CTEs, autocommit): one round trip per cycle
  transaction  BEGIN; the store's resolve; the store's claim; COMMIT: four round trips per cycle
Both run the store's own statements, on connections set up like the store's (UTC, JIT off), batch
100 by default; `raw_cycle` is recorded with each result.

The statements (schema, insert, claim, resolve) are imported from conveyor.stores.postgres, as
raw_sqlite imports SQLite's, so the reference never drifts from the store.

Run alone: python -m bench.raw_postgres [--items 20000] [--processes 2] [--batch-size 100]
(needs PostgreSQL at $CONVEYOR_BENCH_PG, default postgresql://postgres@127.0.0.1:5432/postgres)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from typing import Any

import psycopg

from conveyor.stores import postgres_queries as _store  # the store's own statements, never copies

from .common import PG_ADMIN_URL, QUEUE, payloads, pg_database, run_forked

SCHEMA = ";\n".join(sql for _, _, sql in _store.MIGRATIONS)
CLAIM_SQL = _store.CLAIM
RESOLVE_SQL = _store.RESOLVE
INSERT_SQL = _store.INSERT
CYCLE_SQL = _store.cycle(("resolve",), 1)
SQL_SOURCE = "conveyor.stores.postgres"

LEASE_SECONDS = 30.0
MAX_ATTEMPTS = 5


def create(url: str, n: int) -> float:
    """Schema, then N items in one transaction (the store's INSERT), then ANALYZE
    (design.md's lesson: a fresh table has no statistics). Returns the insert's seconds."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        texts = [json.dumps(p, separators=(",", ":")) for p in payloads(n)]
        t0 = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(INSERT_SQL, ([QUEUE] * n, texts, [None] * n, [None] * n, [0] * n, [None] * n))
        seconds = time.perf_counter() - t0
        conn.execute("ANALYZE conveyor_items")
    return seconds


def loop(url: str, batch_size: int, cycle: str, out: Any) -> None:
    """One process: resolve what it holds and claim the next batch, in one transaction, until a
    claim comes back empty. Reports how many items it resolved."""
    owner = f"raw:{os.getpid()}"
    ids: list[int] = []
    tokens: list[int] = []
    resolved = 0
    claim = {"owner": owner, "lease": LEASE_SECONDS, "max_attempts": MAX_ATTEMPTS, "queue": QUEUE, "limit": batch_size}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TimeZone TO 'UTC'")
        conn.execute("SET jit = off")
        while True:
            try:
                if cycle == "statement":
                    rows = conn.execute(CYCLE_SQL, {
                        "owner": owner, "ids_resolve": "{" + ",".join(map(str, ids)) + "}",
                        "toks_resolve": "{" + ",".join(map(str, tokens)) + "}", "lease_0": LEASE_SECONDS,
                        "token_0": secrets.randbits(63), "max_attempts_0": MAX_ATTEMPTS, "queue_0": QUEUE,
                        "limit_0": batch_size}).fetchall()
                    got = sum(1 for r in rows if r[0] < 0)
                    rows = [r[1:] for r in rows if r[0] >= 0]
                else:
                    with conn.transaction():
                        args = {"ids": ids, "toks": tokens, "b2": None, "b3": None}
                        got = len(conn.execute(RESOLVE_SQL, args).fetchall()) if ids else 0
                        rows = conn.execute(CLAIM_SQL, dict(claim, token=secrets.randbits(63))).fetchall()
            except psycopg.OperationalError as exc:
                if not (exc.sqlstate or "").startswith("40"):
                    raise
                continue  # a deadlock between two cycles: rolled back whole, run it again (as conveyor does)
            resolved += got
            if not rows:
                break
            ids = [r[0] for r in rows]
            tokens = [r[15] for r in rows]  # ITEM_COLUMNS ends with claim_token
    out.put(resolved)


def counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM conveyor_items GROUP BY state").fetchall())


def drain(url: str, processes: int, batch_size: int, cycle: str = "statement") -> tuple[float, float]:
    """Run the loop in `processes` forked processes: (seconds from the first fork to the last exit,
    CPU seconds they used)."""
    return run_forked(loop, (url, batch_size, cycle), processes, "raw PostgreSQL loop")


def run(n: int, processes: int, batch_size: int, admin_url: str = PG_ADMIN_URL, cycle: str = "statement") -> dict:
    """Fresh database, N items, drained by the raw loop; checked from the table."""
    with pg_database(admin_url, suffix="raw") as url:
        insert_s = create(url, n)
        seconds, cpu = drain(url, processes, batch_size, cycle)
        got = counts(url)
    if got != {"resolved": n}:
        raise RuntimeError(f"raw PostgreSQL loop left the table as {got}, expected {{'resolved': {n}}}")
    return {"raw_seconds": seconds, "raw_per_s": n / seconds,
            "raw_cpu_us_per_item": 1e6 * cpu / n,
            "raw_insert_per_s": n / insert_s,
            "raw_sql": SQL_SOURCE, "raw_cycle": cycle}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--cycle", choices=["statement", "transaction"], default="statement")
    ap.add_argument("--pg", default=PG_ADMIN_URL, help="admin URL (a database to CREATE DATABASE from)")
    args = ap.parse_args()
    r = run(args.items, args.processes, args.batch_size, args.pg, args.cycle)
    print(f"raw PostgreSQL loop: {args.items} items, {args.processes} process(es), batch {args.batch_size}: "
          f"{r['raw_cycle']} cycle: {r['raw_per_s']:,.0f} items/s ({r['raw_seconds']:.2f} s); "
          f"insert {r['raw_insert_per_s']:,.0f} items/s")


if __name__ == "__main__":
    main()
