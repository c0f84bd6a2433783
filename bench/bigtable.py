"""Big table: the throughput run (bench.throughput) with 1,000,000 resolved items already in the
table, next to the same run on an empty table, in one invocation.

Per store:
  empty   bench.throughput.one_round: fresh database, submit N (20,000) items through the App,
          drain with 2 worker processes (no-op handler, batch 100); then the raw loop on its own
          fresh database (bench.raw_sqlite / bench.raw_postgres)
  big     fresh database, `app.migrate()`, then --rows (1,000,000) rows in the store's schema with
          state='resolved' (finished over the last day), bulk-inserted by one INSERT … SELECT over a
          generated series (SQLite: recursive CTE; PostgreSQL: generate_series), then ANALYZE
          (PostgreSQL: VACUUM ANALYZE, the state autovacuum leaves a table in) and a checkpoint
          (SQLite: wal_checkpoint), so the drain does not pay for flushing the fill. Then the same
          submit + drain through conveyor, checked from app.stats() (resolved = rows + N, nothing
          else), then the raw loop on the same big table (N more items inserted with the store's
          INSERT, drained by the bare claim/resolve loop).
Figures: submit/s and drain/s, empty vs big (big_ratio = big / empty; the target is ≥ 0.9), and
each drain's ratio to the raw loop on the same table.

    python -m bench.bigtable [--store sqlite|postgres|all] [--rows 1000000] [--items 20000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace

from rich.console import Console
from rich.table import Table

import conveyor

from . import raw_postgres, raw_sqlite, throughput
from .common import PG_ADMIN_URL, QUEUE, base_line, fresh_url, payloads, ratio, record, stores_from

console = Console(width=max(120, Console().width))

_SQLITE_FILL = """
WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < ?1)
INSERT INTO conveyor_items (queue, payload, state, priority, run_at, attempts, max_attempts, created_at,
                            updated_at, finished_at)
SELECT ?2, json_object('order_id', i, 'lat', round(52.30 + (i * 7919 % 10000) / 50000.0, 6),
                       'lon', round(4.80 + (i * 104729 % 10000) / 40000.0, 6)),
       'resolved', 0, ?3 - 86400 + i * (86400.0 / ?1), 1, 5, ?3 - 86400 + i * (86400.0 / ?1),
       ?3 - 86400 + i * (86400.0 / ?1) + 0.01, ?3 - 86400 + i * (86400.0 / ?1) + 0.01
  FROM g"""

_PG_FILL = """
INSERT INTO conveyor_items (queue, payload, state, priority, run_at, attempts, max_attempts, created_at,
                            updated_at, finished_at)
SELECT %(queue)s, json_build_object('order_id', i, 'lat', round(52.30 + (i * 7919 %% 10000) / 50000.0, 6),
                                  'lon', round(4.80 + (i * 104729 %% 10000) / 40000.0, 6)),
       'resolved', 0, t, 1, 5, t, t + interval '10 ms', t + interval '10 ms'
  FROM generate_series(1::bigint, %(n)s::bigint) AS i,
       LATERAL (SELECT now() - interval '1 day' + i * (interval '1 day' / %(n)s)) AS s(t)"""


def prefill(store: str, url: str, rows: int) -> float:
    """rows resolved items, straight into the store's table; returns seconds (insert + analyze)."""
    t0 = time.perf_counter()
    if store == "sqlite":
        conn = raw_sqlite.connect(url.removeprefix("sqlite:///"))
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_SQLITE_FILL, (rows, QUEUE, time.time()))
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the fill's WAL is not the drain's to copy back
        conn.close()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_PG_FILL, {"queue": QUEUE, "n": rows})
            conn.execute("VACUUM ANALYZE conveyor_items")
            # flush the fill's dirty pages now: otherwise the drain pays for writing them out (measured:
            # raw loop on the big table 15.2-15.4k/s without, 17.9-18.8k/s with)
            conn.execute("CHECKPOINT")
    return time.perf_counter() - t0


def raw_on_big(store: str, url: str, rows: int, n: int, processes: int, batch_size: int, conveyor_ran: bool = True) -> dict:
    """N more pending items (the store's INSERT), drained by the raw loop on the same big table."""
    now = time.time()
    texts = [json.dumps(p, separators=(",", ":")) for p in payloads(n)]
    if store == "sqlite":
        path = url.removeprefix("sqlite:///")
        conn = raw_sqlite.connect(path)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(raw_sqlite.INSERT_SQL, [(QUEUE, t, None, None, 0, now, now, now) for t in texts])
        conn.execute("COMMIT")
        conn.close()
        seconds, cpu = raw_sqlite.drain(path, processes, batch_size)
        got = raw_sqlite.counts(path)
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(raw_postgres.INSERT_SQL, ([QUEUE] * n, texts, [None] * n, [None] * n, [0] * n, [None] * n))
        seconds, cpu = raw_postgres.drain(url, processes, batch_size)
        got = raw_postgres.counts(url)
    if got != {"resolved": rows + (2 if conveyor_ran else 1) * n}:
        raise RuntimeError(f"raw loop on the big table left {got}, expected {{'resolved': {rows + 2 * n}}}")
    return {"raw_per_s": n / seconds, "raw_cpu_us_per_item": 1e6 * cpu / n}


def bench_store(store: str, args: argparse.Namespace) -> dict:
    line = base_line("bigtable", store, args.pg, rows=args.rows, items=args.items, processes=args.processes,
                     batch_size=args.batch_size, concurrency=args.concurrency)
    targs = SimpleNamespace(items=args.items, processes=args.processes, batch_size=args.batch_size,
                            concurrency=args.concurrency, tmpdir=args.tmpdir, pg=args.pg)
    empty = throughput.one_round(store, targs, None)
    line.update({f"empty_{k}": round(empty[k], 1) for k in ("submit_per_s", "drain_per_s", "raw_per_s",
                                                             "drain_cpu_us_per_item", "raw_cpu_us_per_item")})
    with fresh_url(store, args.pg, args.tmpdir, suffix="big") as url:
        app = conveyor.App(url)
        app.migrate()
        app.close()
        line["prefill_seconds"] = round(prefill(store, url, args.rows), 1)
        big = throughput.run_conveyor(url, args.items, args.processes, args.batch_size, args.concurrency,
                                      resolved_before=args.rows)
        big.update(raw_on_big(store, url, args.rows, args.items, args.processes, args.batch_size))
    line.update({f"big_{k}": round(v, 1) for k, v in big.items()})
    line["big_ratio_submit"] = ratio(line["big_submit_per_s"], line["empty_submit_per_s"])
    line["big_ratio_drain"] = ratio(line["big_drain_per_s"], line["empty_drain_per_s"])
    line["big_ratio_raw"] = ratio(line["big_raw_per_s"], line["empty_raw_per_s"])
    line["empty_ratio_to_raw"] = ratio(line["empty_drain_per_s"], line["empty_raw_per_s"])
    line["big_ratio_to_raw"] = ratio(line["big_drain_per_s"], line["big_raw_per_s"])
    return line


def table(lines: list[dict]) -> Table:
    t = Table(title="big table: throughput with N resolved rows already stored vs an empty table")
    for col in ("store", "rows", "submit/s empty", "big", "×", "drain/s empty", "big", "× (≥0.9)", "raw/s empty",
                "big", "×", "drain/raw empty", "big"):
        t.add_column(col, justify="left" if col == "store" else "right")
    f = lambda v: "—" if v is None else f"{v:,.0f}"  # noqa: E731
    for r in lines:
        t.add_row(r["store"], f(r["rows"]), f(r["empty_submit_per_s"]), f(r["big_submit_per_s"]), str(r["big_ratio_submit"]),
                  f(r["empty_drain_per_s"]), f(r["big_drain_per_s"]), str(r["big_ratio_drain"]),
                  f(r["empty_raw_per_s"]), f(r["big_raw_per_s"]), str(r["big_ratio_raw"]),
                  str(r["empty_ratio_to_raw"]), str(r["big_ratio_to_raw"]))
    return t


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.bigtable", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    ap.add_argument("--rows", type=int, default=1_000_000, help="resolved rows stored first (default %(default)s)")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="same sizes (the 1M-row fill is the point)")
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args(argv)
    lines = []
    for store in stores_from(args.store, args.pg, console):
        console.print(f"[bold]bigtable[/] {store}: {args.rows:,} resolved rows + {args.items:,} items, "
                      f"{args.processes} processes, batch {args.batch_size} …")
        line = bench_store(store, args)
        record("bigtable", line)
        lines.append(line)
    console.print(table(lines))
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
