"""Rows processed in place (`@app.rows`) against conveyor's own queue, in one run, per store.

  queue      --pending items (the throughput workload's payloads) submitted with submit_many, then
             drained by --processes worker processes (no-op handler, batch --batch-size);
  rows 50k   a table of the application's own holding just those --pending rows, all with the
             pending status value, adopted, then drained in place by the same workers;
  rows 1M    the same --pending rows as the newest of a --table-rows row table (the rest done long
             ago: the shape of an orders table after a while), adopted, drained the same way.
Figures: rows/s for each, rows/queue, and the 1M table's rate over the small table's (the target:
>= 0.8 and no slower with 1M rows). With --latency-seconds > 0, insert → handler start latency:
idle workers on the adopted table while another process inserts one pending row every 5 ms (the
row is the submission; on PostgreSQL adopt's trigger wakes the workers), next to bench.latency's
submit → handler start for conveyor's queue, same run.

    python -m bench.rows [--store sqlite|postgres|all] [--pending 50000] [--table-rows 1000000]
                         [--processes 2] [--batch-size 100] [--latency-seconds 10]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

import conveyor

from . import latency
from .common import QUEUE, base_line, fresh_url, payloads, ratio, record, run_workers, start_process, stores_from, wait_until

console = Console(width=max(130, Console().width))
TABLE = "orders"
STATUS = dict(status="status", pending="needs_assignment", working="assigning", done="assigned", dead="unassignable")


def noop(item: conveyor.Item) -> None:
    pass


class Side:
    """The application's own connection (autocommit)."""

    def __init__(self, url: str):
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            self.conn: Any = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
            self.conn.execute("PRAGMA journal_mode = WAL")
        else:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)

    def create(self, total: int, pending: int) -> float:
        """orders(id, order_id, lat, lon, status, t): `total` rows, the newest `pending` of them
        pending, the rest done. Returns the seconds the insert took."""
        t0 = time.perf_counter()
        if self.sqlite:
            self.conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, order_id INTEGER, lat REAL, lon REAL, "
                              "status TEXT NOT NULL, t INTEGER)")
            self.conn.execute("BEGIN")
            ps = payloads(min(total, 100_000))
            rows = ((p["order_id"], p["lat"], p["lon"], "assigned" if i < total - pending else "needs_assignment")
                    for i, p in ((i, ps[i % len(ps)]) for i in range(total)))
            self.conn.executemany("INSERT INTO orders (order_id, lat, lon, status) VALUES (?, ?, ?, ?)", rows)
            self.conn.execute("COMMIT")
            self.conn.execute("ANALYZE")
        else:
            self.conn.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, order_id integer, lat double precision, "
                              "lon double precision, status text NOT NULL, t bigint)")
            self.conn.execute(
                "INSERT INTO orders (order_id, lat, lon, status) SELECT i, 52.5 + random() / 10, 13.4 + random() / 10, "
                "CASE WHEN i < %s THEN 'assigned' ELSE 'needs_assignment' END FROM generate_series(0, %s) AS i",
                (total - pending, total - 1))
            self.conn.execute("ANALYZE orders")
        return time.perf_counter() - t0

    def count(self, status: str) -> int:
        sql = "SELECT count(*) FROM orders WHERE status = ?"
        if not self.sqlite:
            sql = sql.replace("?", "%s")
        return int(self.conn.execute(sql, (status,)).fetchone()[0])

    def close(self) -> None:
        self.conn.close()


def rows_app(url: str, batch_size: int, handler: Callable[..., None] = noop) -> conveyor.App:
    app = conveyor.App(url)
    app.rows(TABLE, **STATUS, batch_size=batch_size, concurrency=4)(handler)
    return app


def drain_queue(url: str, args: argparse.Namespace) -> dict:
    app = conveyor.App(url)
    app.processor(QUEUE, batch_size=args.batch_size, concurrency=4)(noop)
    app.submit_many(QUEUE, payloads(args.pending))
    t0 = time.perf_counter()
    app.run_worker([QUEUE], processes=args.processes, stop_when_empty=True, install_signal_handlers=False)
    seconds = time.perf_counter() - t0
    done = app.stats([QUEUE])[QUEUE]["resolved"]
    app.close()
    if done != args.pending:
        raise RuntimeError(f"queue drain: {done} of {args.pending} resolved")
    return {"seconds": round(seconds, 3), "per_s": round(args.pending / seconds)}


def drain_rows(url: str, args: argparse.Namespace, total: int) -> dict:
    side = Side(url)
    insert_s = side.create(total, args.pending)
    app = rows_app(url, args.batch_size)
    t0 = time.perf_counter()
    app.adopt(apply=True)
    adopt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    app.run_worker(processes=args.processes, stop_when_empty=True, install_signal_handlers=False)
    seconds = time.perf_counter() - t0
    app.close()
    left, working = side.count("needs_assignment"), side.count("assigning")
    side.close()
    if left or working:
        raise RuntimeError(f"rows drain: {left} pending and {working} working left")
    return {"rows": total, "seconds": round(seconds, 3), "per_s": round(args.pending / seconds),
            "insert_s": round(insert_s, 2), "adopt_s": round(adopt_s, 2)}


def _inserter(url: str, seconds: float, interval: float, out: Any) -> None:
    """One pending row per interval, on an absolute schedule, each carrying time_ns() in `t`."""
    side = Side(url)
    sql = "INSERT INTO orders (order_id, lat, lon, status, t) VALUES (?, 0, 0, 'needs_assignment', ?)"
    if not side.sqlite:
        sql = sql.replace("?", "%s")
    n = int(seconds / interval)
    took = []
    t0 = time.perf_counter() + 0.05
    for i in range(n):
        wait = t0 + i * interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t = time.time_ns()
        side.conn.execute(sql, (i, t))
        took.append(time.time_ns() - t)
    side.close()
    out.put((n, took))


def insert_latency(url: str, args: argparse.Namespace) -> dict:
    import multiprocessing

    side = Side(url)
    side.create(0, 0)
    folder = tempfile.mkdtemp(prefix="conveyor_rows_lat_")
    write = latency._appender(folder)

    def handle(item: conveyor.Item) -> None:
        t = item.payload.get("t")
        if t is not None:
            write(item.payload["order_id"], time.time_ns() - t)

    try:
        app = rows_app(url, args.batch_size, handle)
        app.adopt(apply=True)
        app.close()
        workers = run_workers(lambda: rows_app(url, args.batch_size, handle), args.processes)
        try:
            time.sleep(1.0)  # workers up and idle
            q = multiprocessing.get_context("fork").Queue()
            p = start_process(_inserter, url, args.latency_seconds, 0.005, q)
            n, took = q.get(timeout=args.latency_seconds + 120)
            p.join()
            if not wait_until(lambda: side.count("assigned") >= n, 60):
                raise RuntimeError("inserted rows were not all handled within 60 s")
        finally:
            from .common import stop_process

            stop_process(workers)
        samples = latency._read(folder)
        side.close()
        if len(samples) != n:
            raise RuntimeError(f"insert latency: {len(samples)} samples for {n} rows")
        return {"inserted": n, **latency._split(samples, took, "")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_store(store: str, args: argparse.Namespace) -> dict:
    line = base_line("rows", store, args.pg, pending=args.pending, table_rows=args.table_rows,
                     processes=args.processes, batch_size=args.batch_size)
    console.print(f"[bold]{store}[/]: queue drain of {args.pending:,} items …")
    with fresh_url(store, args.pg, suffix="rowsq") as url:
        line["queue"] = drain_queue(url, args)
    for label, total in (("rows_small", args.pending), ("rows_big", args.table_rows)):
        console.print(f"[bold]{store}[/]: {args.pending:,} pending rows of a {total:,}-row table …")
        with fresh_url(store, args.pg, suffix="rows") as url:
            line[label] = drain_rows(url, args, total)
    line["rows_small_over_queue"] = ratio(line["rows_small"]["per_s"], line["queue"]["per_s"])
    line["rows_big_over_queue"] = ratio(line["rows_big"]["per_s"], line["queue"]["per_s"])
    line["big_over_small"] = ratio(line["rows_big"]["per_s"], line["rows_small"]["per_s"])
    if args.latency_seconds > 0:
        console.print(f"[bold]{store}[/]: insert → handler start, {args.latency_seconds:g} s …")
        with fresh_url(store, args.pg, suffix="rowslat") as url:
            line["insert_latency"] = insert_latency(url, args)
        console.print(f"[bold]{store}[/]: submit → handler start (conveyor's queue), same run …")
        with fresh_url(store, args.pg, suffix="rowslatq") as url:
            line["submit_latency"] = latency.run_conveyor(url, args.latency_seconds, 0.005)
    record("rows", line)
    return line


def table(lines: list[dict]) -> Table:
    t = Table(title="rows in place vs conveyor's queue (same run)", title_justify="left")
    for col in ("store", "queue/s", "rows/s (50k table)", "× queue", "rows/s (1M table)", "× queue", "1M / 50k",
                "insert→start p50/p99 ms", "submit→start p50/p99 ms"):
        t.add_column(col, justify="right")
    for ln in lines:
        ins, sub = ln.get("insert_latency"), ln.get("submit_latency")
        lat = (lambda d: "—" if not d else f"{d['p50']:.2f} / {d['p99']:.2f}")
        t.add_row(ln["store"], f"{ln['queue']['per_s']:,}", f"{ln['rows_small']['per_s']:,}",
                  f"{ln['rows_small_over_queue']}×", f"{ln['rows_big']['per_s']:,}", f"{ln['rows_big_over_queue']}×",
                  f"{ln['big_over_small']}×", lat(ins), lat(sub))
    return t


def main(argv: list[str] | None = None) -> list[dict]:
    from .common import PG_ADMIN_URL

    ap = argparse.ArgumentParser(prog="python -m bench.rows", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    ap.add_argument("--pending", type=int, default=50_000)
    ap.add_argument("--table-rows", type=int, default=1_000_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--latency-seconds", type=float, default=10.0, help="0 skips the latency runs")
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    args = ap.parse_args(argv)
    if args.table_rows < args.pending:
        raise SystemExit("--table-rows must be at least --pending")
    lines = [bench_store(store, args) for store in stores_from(args.store, args.pg, console)]
    console.print(table(lines))
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
