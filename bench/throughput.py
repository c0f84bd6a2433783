"""Throughput: how fast conveyor submits and drains a backlog of no-op items, next to a raw-SQL loop
running the same claim and resolve statements with nothing around them.

For each store, in one invocation:
  1. submit  fresh database; `app.submit_many` of N orders          → submit_per_s
  2. drain   `app.run_worker(processes=P, stop_when_empty=True)`
             with a no-op handler; checked from app.stats()          → drain_per_s
  3. raw     fresh database, same N items; P processes looping the
             store's claim + batched resolve through the bare driver → raw_per_s
  4. minimal fresh database, same N items; P processes looping the minimal
             bare loop (bench.minimal: one table, one partial index,
             claim and resolve in one statement each)               → minimal_per_s
ratio_to_raw = drain_per_s / raw_per_s: the share of the bare SQL's speed conveyor keeps.
ratio_to_minimal = drain_per_s / minimal_per_s: the share of the ceiling (a minimal durable queue
on the same database) conveyor reaches; raw_ratio_to_minimal the same for the raw loop.
drain_cpu_us_per_item / raw_cpu_us_per_item: client-side CPU (user+sys of the worker processes)
per item; steadier than items/s when other work shares the machine (PostgreSQL's server CPU is
not included).

    python -m bench.throughput [--store sqlite|postgres|all] [--items 20000] [--processes 2]
                               [--batch-size 100] [--concurrency 4] [--repeat 3]
                               [--json-out bench/results/throughput.jsonl]

Each figure is the median of --repeat runs (each on its own fresh database, conveyor and raw
interleaved so drift in the machine hits both); every run's value is kept in the *_runs lists.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import statistics
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

import conveyor

from . import minimal, raw_postgres, raw_sqlite
from .common import (
    PG_ADMIN_URL,
    QUEUE,
    cpu_seconds,
    machine,
    payloads,
    pg_database,
    pg_problem,
    pg_version,
    sqlite_database,
)

OTHER_STATES = ("pending", "in_progress", "dead", "cancelled")
console = Console(width=max(160, Console().width))


def postgres_store_problem() -> str | None:
    """None if conveyor's PostgreSQL store can be imported, else why not."""
    try:
        importlib.import_module("conveyor.stores.postgres")
        return None
    except Exception as exc:  # noqa: BLE001 - not written yet, or broken: either way, skip it
        return f"conveyor.stores.postgres is not importable ({type(exc).__name__}: {exc})"


def run_conveyor(url: str, n: int, processes: int, batch_size: int, concurrency: int,
                 resolved_before: int = 0) -> dict[str, Any]:
    """Submit N items through the App, drain them with P worker processes, check the store (which
    held `resolved_before` resolved items and nothing else before: bench.bigtable's prefill)."""
    app = conveyor.App(url)

    @app.processor(QUEUE, batch_size=batch_size, concurrency=concurrency)
    def noop(item: conveyor.Item) -> None:
        pass

    try:
        app.migrate()
        orders = payloads(n)
        t0 = time.perf_counter()
        stored = app.submit_many(QUEUE, orders)
        submit_s = time.perf_counter() - t0
        if stored != n:
            raise RuntimeError(f"submit_many stored {stored} of {n} items")

        c0, t0 = cpu_seconds(), time.perf_counter()
        app.run_worker(processes=processes, stop_when_empty=True)
        drain_s = time.perf_counter() - t0
        drain_cpu = cpu_seconds() - c0

        stats = app.stats([QUEUE])[QUEUE]
        want = resolved_before + n
        if stats["resolved"] != want or stats["total"] != want or any(stats[s] for s in OTHER_STATES):
            raise RuntimeError(f"after the drain the store holds {stats}; expected {want} resolved and nothing else")
    finally:
        app.close()
    return {"submit_seconds": submit_s, "submit_per_s": n / submit_s,
            "drain_seconds": drain_s, "drain_per_s": n / drain_s, "drain_cpu_us_per_item": 1e6 * drain_cpu / n}


def one_round(store: str, args: argparse.Namespace, skipped: str | None) -> dict[str, Any]:
    n, p, b = args.items, args.processes, args.batch_size
    out: dict[str, Any] = {}
    if store == "sqlite":
        with sqlite_database(args.tmpdir) as path:
            out.update(run_conveyor(f"sqlite:///{path}", n, p, b, args.concurrency))
        out.update(raw_sqlite.run(n, p, b, args.tmpdir))
        out.update(minimal.run("sqlite", n, p, b, tmpdir=args.tmpdir))
    else:
        if skipped is None:
            with pg_database(args.pg) as url:
                out.update(run_conveyor(url, n, p, b, args.concurrency))
        out.update(raw_postgres.run(n, p, b, args.pg))
        out.update(minimal.run("postgres", n, p, b, admin_url=args.pg))
    return out


def bench_store(store: str, args: argparse.Namespace) -> dict[str, Any]:
    """One store's result line: medians over the rounds of conveyor (unless its store is missing)
    and of the raw loop."""
    line: dict[str, Any] = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "store": store, "workload": "noop", "items": args.items, "processes": args.processes,
        "batch_size": args.batch_size, "concurrency": args.concurrency, "repeat": args.repeat,
        "loadavg_1m_before": round(os.getloadavg()[0], 2),  # others' load on the machine skews every figure
    }
    skipped = postgres_store_problem() if store == "postgres" else None
    if skipped:
        console.print(f"[yellow]postgres: skipping conveyor's run: {skipped}; running the raw PG loop only[/]")
    rounds = [one_round(store, args, skipped) for _ in range(args.repeat)]
    for key in ("submit_per_s", "drain_per_s", "raw_per_s", "raw_insert_per_s",
                "drain_cpu_us_per_item", "raw_cpu_us_per_item",
                "minimal_per_s", "minimal_insert_per_s", "minimal_cpu_us_per_item"):
        values = [r[key] for r in rounds if key in r]
        line[key] = round(statistics.median(values), 1) if values else None
        if values and args.repeat > 1 and key.endswith("_per_s"):
            line[key.replace("_per_s", "_runs")] = [round(v, 1) for v in values]
    if line["drain_cpu_us_per_item"] and line["raw_cpu_us_per_item"]:
        line["cpu_ratio_to_raw"] = round(line["drain_cpu_us_per_item"] / line["raw_cpu_us_per_item"], 2)
    if skipped:
        line["conveyor_skipped"] = skipped
    else:
        line["ratio_to_raw"] = round(line["drain_per_s"] / line["raw_per_s"], 3)
    line.setdefault("ratio_to_raw", None)
    line["ratio_to_minimal"] = (round(line["drain_per_s"] / line["minimal_per_s"], 3)
                                if line.get("drain_per_s") and line["minimal_per_s"] else None)
    line["raw_ratio_to_minimal"] = (round(line["raw_per_s"] / line["minimal_per_s"], 3)
                                    if line["raw_per_s"] and line["minimal_per_s"] else None)
    if store == "postgres":
        line["raw_sql"] = raw_postgres.SQL_SOURCE
        line["pg_version"] = pg_version(args.pg).split()[0]
    line["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    m = machine()
    if store != "sqlite":
        m.pop("sqlite_version")
    line.update(m)
    return line


def table(lines: list[dict[str, Any]]) -> Table:
    t = Table(title="conveyor throughput (no-op handler, medians)")
    for col in ("store", "version", "items", "P", "batch", "submit/s", "drain/s", "raw/s", "ratio",
                "minimal/s", "× minimal", "raw × minimal", "µs CPU/item", "raw µs CPU/item", "minimal µs CPU/item"):
        t.add_column(col, justify="left" if col == "store" else "right")

    def num(v: Any) -> str:
        return "—" if v is None else f"{v:,.0f}"

    def num1(v: Any) -> str:
        return "—" if v is None else f"{v:,.1f}"

    for r in lines:
        version = r.get("sqlite_version") or r.get("pg_version")
        t.add_row(r["store"], version, f"{r['items']:,}", str(r["processes"]), str(r["batch_size"]),
                  num(r["submit_per_s"]), num(r["drain_per_s"]), num(r["raw_per_s"]),
                  "—" if r["ratio_to_raw"] is None else f"{r['ratio_to_raw']:.2f}",
                  num(r.get("minimal_per_s")),
                  "—" if r.get("ratio_to_minimal") is None else f"{r['ratio_to_minimal']:.2f}",
                  "—" if r.get("raw_ratio_to_minimal") is None else f"{r['raw_ratio_to_minimal']:.2f}",
                  num1(r.get("drain_cpu_us_per_item")), num1(r.get("raw_cpu_us_per_item")),
                  num1(r.get("minimal_cpu_us_per_item")))
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="sqlite")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="rounds per store; figures are medians")
    ap.add_argument("--json-out", default="bench/results/throughput.jsonl",
                    help="append one JSON line per store here ('' for none)")
    ap.add_argument("--pg", default=PG_ADMIN_URL, help="PostgreSQL admin URL (default %(default)s)")
    ap.add_argument("--tmpdir", default=None, help="folder for the SQLite files (default: the system temp)")
    args = ap.parse_args(argv)
    for name in ("items", "processes", "batch_size", "concurrency", "repeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    stores = ["sqlite", "postgres"] if args.store == "all" else [args.store]
    if "postgres" in stores:
        problem = pg_problem(args.pg)
        if problem:
            if args.store == "postgres":
                console.print(f"[red]{problem}[/]")
                return 2
            console.print(f"[yellow]skipping postgres: {problem}[/]")
            stores.remove("postgres")

    lines = []
    for store in stores:
        console.print(f"[bold]{store}[/]: {args.items:,} items, {args.processes} process(es), "
                      f"batch {args.batch_size}, concurrency {args.concurrency} …")
        line = bench_store(store, args)
        lines.append(line)
        if args.json_out:
            os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
            with open(args.json_out, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        print(json.dumps(line))
    console.print(table(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
