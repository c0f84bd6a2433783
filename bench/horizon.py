"""Held snapshot: a steady-state run while another connection keeps one read transaction open the
whole time, on either store. A known way database-backed queues slow down in production.

  PostgreSQL  a side session runs BEGIN ISOLATION LEVEL REPEATABLE READ and a SELECT (that takes the
              snapshot: its backend_xmin is recorded to show the horizon is held) and stays idle in
              that transaction: vacuum cannot remove the dead row versions every claim and resolve
              leaves behind, so the table and the claim's index scans grow.
  SQLite      a reader connection runs BEGIN and SELECT count(*) FROM conveyor_items and stays in that
              read transaction: in WAL mode no checkpoint can copy frames past the reader's snapshot
              or start the WAL over, so the WAL file grows for the whole run.

One invocation, per store:
  1. fresh database, `app.migrate()`; the snapshot is taken and held until the end;
  2. bench.steady's run: --rate items/s (2,000) submitted by another process for --seconds (300;
     --quick 60), drained by 2 conveyor worker processes (no-op handler, batch 100); every second
     the store is sampled (app.stats()); every --probe-every seconds (5) a probe connection times
     the worker's claim statement (the store's own, batch 100) in a transaction it then rolls back,
     median of 3 (claim_ms: timed after PostgreSQL's BEGIN or SQLite's BEGIN IMMEDIATE, so it is the
     statement's time, not a wait for the write lock), and
       - PostgreSQL: runs it under EXPLAIN (ANALYZE, BUFFERS) (explain_ms, buffers: shared pages hit
         + read by one claim), reads pg_total_relation_size('conveyor_items') and n_dead_tup;
       - SQLite: reads the size of the WAL file (<db>-wal) and of the database file;
  3. counts checked from the store (every submitted item resolved, nothing else).
Figures (the same on both stores): throughput (resolved/s) in the first and last fifth of the run;
claim latency before the run and after it has drained (start, end), its max over all probes, and
its p99 over the probes of the last fifth (the max when there are fewer than 100 probes); what
grows (PostgreSQL: the table, SQLite: the WAL) at start and end; each end/start ratio. With
--control, the same run without the held transaction follows, and the held run's end figures get a
ratio to the control's.

    python -m bench.horizon [--store sqlite|postgres|all] [--seconds 300] [--quick] [--rate 2000]
                            [--probe-every 5] [--control]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from . import raw_postgres, raw_sqlite
from .common import PG_ADMIN_URL, QUEUE, base_line, fresh_url, percentile, ratio, record, stores_from
from .steady import BATCH, PROCESSES, noop_app, steady_run

console = Console(width=max(160, Console().width))
RATE = 2000.0
PROBE_EVERY = 5
MB = 2**20
# what the held snapshot makes grow, per store: (its name in tables, the prefix of its fields)
GROWS = {"postgres": ("table", "table"), "sqlite": ("WAL", "wal")}
HOLD = {"postgres": "a held REPEATABLE READ snapshot", "sqlite": "a held read transaction"}


def timed_claim(execute: Callable[[], list], begin: Callable[[], Any], rollback: Callable[[], Any]) -> tuple[float, int]:
    """The claim statement 3 times, each in a transaction rolled back after: (median ms, rows got)."""
    times = []
    got = 0
    for _ in range(3):
        begin()
        t0 = time.perf_counter()
        got = len(execute())
        times.append(1000 * (time.perf_counter() - t0))
        rollback()
    return round(statistics.median(times), 2), got


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


class PgProber:
    def __init__(self, url: str):
        self.conn = psycopg.connect(url, autocommit=True)
        self.args = {"owner": "probe", "lease": 30.0, "token": 1, "max_attempts": 5, "queue": QUEUE, "limit": BATCH}

    def __call__(self) -> dict:
        c = self.conn
        claim_ms, got = timed_claim(lambda: c.execute(raw_postgres.CLAIM_SQL, self.args).fetchall(),
                                    lambda: c.execute("BEGIN"), lambda: c.execute("ROLLBACK"))
        c.execute("BEGIN")
        plan = c.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + raw_postgres.CLAIM_SQL, self.args).fetchone()[0]
        c.execute("ROLLBACK")
        plan = plan if isinstance(plan, list) else json.loads(plan)
        top = plan[0]["Plan"]
        size, dead, live = c.execute(
            "SELECT pg_total_relation_size('conveyor_items'), n_dead_tup, n_live_tup "
            "FROM pg_stat_user_tables WHERE relname = 'conveyor_items'").fetchone()
        return {"claim_ms": claim_ms, "claim_got": got,
                "explain_ms": round(plan[0]["Execution Time"], 2),
                "buffers": top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0),
                "table_bytes": size, "dead_tuples": dead, "live_tuples": live}

    def close(self) -> None:
        self.conn.close()


class SqliteProber:
    def __init__(self, path: str):
        self.path = path
        self.conn = raw_sqlite.connect(path)

    def __call__(self) -> dict:
        c = self.conn
        args = ("probe", time.time(), raw_sqlite.LEASE_SECONDS, 1, raw_sqlite.MAX_ATTEMPTS, QUEUE, BATCH)
        claim_ms, got = timed_claim(lambda: c.execute(raw_sqlite.CLAIM_SQL, args).fetchall(),
                                    lambda: c.execute("BEGIN IMMEDIATE"), lambda: c.execute("ROLLBACK"))
        return {"claim_ms": claim_ms, "claim_got": got,
                "wal_bytes": file_size(self.path + "-wal"), "db_bytes": file_size(self.path)}

    def close(self) -> None:
        self.conn.close()


class PgHolder:
    """A session idle in a REPEATABLE READ transaction whose snapshot was taken by a SELECT."""

    def __init__(self, url: str):
        self.url = url
        self.conn = psycopg.connect(url)  # not autocommit: the first statement opens the transaction
        self.conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.conn.execute("SELECT count(*) FROM conveyor_items").fetchone()  # the snapshot is taken here
        self.info = {"holder_backend_xmin": str(self._activity()[1])}

    def _activity(self) -> tuple:
        with psycopg.connect(self.url, autocommit=True) as side:
            return side.execute("SELECT state, backend_xmin FROM pg_stat_activity WHERE pid = %s",
                                (self.conn.info.backend_pid,)).fetchone()

    def state(self) -> str:
        state, xmin = self._activity()
        return f"{state}, backend_xmin {xmin}"

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


class SqliteHolder:
    """A connection inside a read transaction (BEGIN, then a SELECT that reads the table)."""

    def __init__(self, path: str):
        self.path = path
        self.conn = raw_sqlite.connect(path)
        self.conn.execute("BEGIN")
        self.conn.execute("SELECT count(*) FROM conveyor_items").fetchone()  # the read snapshot starts here
        self.info = {"holder_wal_bytes": file_size(path + "-wal")}

    def state(self) -> str:
        return "in a read transaction" if self.conn.in_transaction else "NOT in a transaction"

    def release(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("ROLLBACK")
        self.conn.close()


def size_figures(store: str, start: dict, end: dict) -> dict:
    """What grows under the snapshot, at start and end: the table on PostgreSQL (and the pages one
    claim reads, the dead row versions), the WAL file on SQLite (and the database file)."""
    if store == "postgres":
        return {"buffers_start": start["buffers"], "buffers_end": end["buffers"],
                "table_mb_start": round(start["table_bytes"] / MB, 1), "table_mb_end": round(end["table_bytes"] / MB, 1),
                "table_end_over_start": ratio(end["table_bytes"], start["table_bytes"]),
                "dead_tuples_end": end["dead_tuples"]}
    return {"wal_mb_start": round(start["wal_bytes"] / MB, 1), "wal_mb_end": round(end["wal_bytes"] / MB, 1),
            "wal_end_over_start": ratio(end["wal_bytes"], start["wal_bytes"]),
            "db_mb_start": round(start["db_bytes"] / MB, 1), "db_mb_end": round(end["db_bytes"] / MB, 1)}


def growth(line: dict) -> tuple[str, float, float, float | None]:
    """(what grows, MB at start, MB at end, end/start) of one result line."""
    name, prefix = GROWS[line["store"]]
    return name, line[f"{prefix}_mb_start"], line[f"{prefix}_mb_end"], line[f"{prefix}_end_over_start"]


PROBE_FIELDS = {"postgres": ("explain_ms", "buffers", "table_bytes", "dead_tuples"), "sqlite": ("wal_bytes", "db_bytes")}


def one_run(store: str, url: str, rate: float, seconds: float, probe_every: int, hold: bool) -> dict:
    app = noop_app(url)()
    app.migrate()
    app.close()
    path = url.removeprefix("sqlite:///")
    holder: PgHolder | SqliteHolder | None = None
    prober: PgProber | SqliteProber | None = None
    out: dict = {"held": hold}
    try:
        if hold:
            holder = PgHolder(url) if store == "postgres" else SqliteHolder(path)
            out.update(holder.info)
        prober = PgProber(url) if store == "postgres" else SqliteProber(path)
        start = prober()
        run = steady_run(store, url, rate, seconds, raw=False, probe=prober, every=1.0, probe_every=probe_every)
        end = prober()
        if holder is not None:
            out["holder_state_at_end"] = holder.state()
    finally:
        if prober is not None:
            prober.close()
        if holder is not None:
            holder.release()
    series = run.pop("series")
    out.update(run)
    window = [s for s in series if s["t"] <= seconds + 0.5]
    fifth = max(2, len(window) // 5)
    head, tail = window[:fifth], window[-fifth:]
    rate_of = lambda xs: (xs[-1]["resolved"] - xs[0]["resolved"]) / ((xs[-1]["t"] - xs[0]["t"]) or 1)  # noqa: E731
    probes = [s for s in series if "claim_ms" in s]
    # the probes of the last fifth (the probe after the run if a short run has none there)
    last = [p["claim_ms"] for p in probes if tail[0]["t"] <= p["t"] <= tail[-1]["t"]] or [end["claim_ms"]]
    out.update({
        "throughput_start_per_s": round(rate_of(head), 1), "throughput_end_per_s": round(rate_of(tail), 1),
        "claim_ms_start": start["claim_ms"], "claim_ms_end": end["claim_ms"],
        "claim_ms_max": max([p["claim_ms"] for p in probes] + [end["claim_ms"]]),
        "claim_ms_p99_end": max(last) if len(last) < 100 else round(percentile(last, 99) or 0.0, 2),
        "claim_probes_end": len(last),
        **size_figures(store, start, end),
        "probes": [{k: p[k] for k in ("t", "claim_ms", *PROBE_FIELDS[store], "pending", "resolved", "lag_s")}
                   for p in probes],
        "series": series,
    })
    out["throughput_end_over_start"] = ratio(out["throughput_end_per_s"], out["throughput_start_per_s"])
    out["claim_end_over_start"] = ratio(out["claim_ms_end"], out["claim_ms_start"])
    return out


def bench_store(store: str, pg: str = PG_ADMIN_URL, rate: float = RATE, seconds: float = 300.0,
                probe_every: int = PROBE_EVERY, hold: bool = True, tmpdir: str | None = None,
                workload: str = "horizon") -> dict:
    """One run on a fresh database of `store`, as a result line (not yet recorded)."""
    line = base_line(workload, store, pg, rate=rate, seconds=seconds, processes=PROCESSES, batch_size=BATCH,
                     probe_every=probe_every)
    with fresh_url(store, pg, tmpdir, suffix="horizon") as url:
        line.update(one_run(store, url, rate, seconds, probe_every, hold))
    return line


def probes_table(run: dict, title: str) -> Table:
    mb = lambda v: f"{v / MB:.1f}"  # noqa: E731
    cells: dict[str, list[tuple[str, Callable[[dict], str]]]] = {
        "postgres": [("EXPLAIN ms", lambda p: f"{p['explain_ms']:.2f}"), ("buffers/claim", lambda p: f"{p['buffers']:,}"),
                     ("table MB", lambda p: mb(p["table_bytes"])), ("dead tuples", lambda p: f"{p['dead_tuples']:,}")],
        "sqlite": [("WAL MB", lambda p: mb(p["wal_bytes"])), ("database MB", lambda p: mb(p["db_bytes"]))],
    }
    columns = [("t s", lambda p: f"{p['t']:.0f}"), ("claim ms", lambda p: f"{p['claim_ms']:.2f}"), *cells[run["store"]],
               ("backlog", lambda p: f"{p['pending']:,}"), ("lag ms", lambda p: f"{1000 * p['lag_s']:.0f}"),
               ("resolved", lambda p: f"{p['resolved']:,}")]
    t = Table(title=title)
    for col, _ in columns:
        t.add_column(col, justify="right")
    for p in run["probes"]:
        t.add_row(*(cell(p) for _, cell in columns))
    return t


SUMMARY_COLUMNS = ("store", "seconds", "rate", "resolved/s start → end", "claim ms start → end", "claim p99 at the end",
                   "WAL or table MB start → end")
DETAIL_COLUMNS = ("run", "claim max ms", "buffers/claim start → end", "lag p99 ms")
LEFT = ("store", "run", SUMMARY_COLUMNS[-1])


def times(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def summary_cells(r: dict) -> list[str]:
    """One run in a row of SUMMARY_COLUMNS (a failed run: its error)."""
    if "error" in r:
        return [r["store"], f"error: {r['error'][:80]}", *[""] * (len(SUMMARY_COLUMNS) - 2)]
    name, mb_start, mb_end, mb_ratio = growth(r)
    return [r["store"], f"{r['seconds']:g}", f"{r['rate']:,.0f}",
            f"{r['throughput_start_per_s']:,.0f} → {r['throughput_end_per_s']:,.0f} ({times(r['throughput_end_over_start'])})",
            f"{r['claim_ms_start']:.2f} → {r['claim_ms_end']:.2f} ({times(r['claim_end_over_start'])})",
            f"{r['claim_ms_p99_end']:.2f}", f"{name} {mb_start:,.1f} → {mb_end:,.1f} ({times(mb_ratio)})"]


def detail_cells(r: dict) -> list[str]:
    """The figures of DETAIL_COLUMNS, which the summary leaves out."""
    if "error" in r:
        return [""] * len(DETAIL_COLUMNS)
    buffers = f"{r['buffers_start']:,} → {r['buffers_end']:,}" if "buffers_start" in r else "—"
    return ["held snapshot" if r["held"] else "control (no snapshot)", f"{r['claim_ms_max']:.2f}", buffers,
            f"{r['lag_p99_ms']:,.0f}"]


def table(lines: list[dict], title: str = "held snapshot: start → end of the run (× = end / start)",
          detail: bool = True) -> Table:
    columns = SUMMARY_COLUMNS + (DETAIL_COLUMNS if detail else ())
    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="left" if col in LEFT else "right")
    for r in lines:
        t.add_row(*summary_cells(r), *(detail_cells(r) if detail else []))
    return t


def summary_markdown(lines: list[dict]) -> str:
    """The runs as a markdown table of SUMMARY_COLUMNS."""
    out = ["| " + " | ".join(SUMMARY_COLUMNS) + " |",
           "|" + "|".join("---" if c in LEFT else "---:" for c in SUMMARY_COLUMNS) + "|"]
    out += ["| " + " | ".join(summary_cells(r)) + " |" for r in lines]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.horizon", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    ap.add_argument("--seconds", type=float, default=None, help="run length (default 300; --quick 60)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rate", type=float, default=RATE, help="items/s submitted (default %(default)s)")
    ap.add_argument("--probe-every", type=int, default=PROBE_EVERY, help="seconds between claim probes (default %(default)s)")
    ap.add_argument("--control", action="store_true", help="also run without the held transaction, for a ratio")
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    ap.add_argument("--tmpdir", default=None, help="where the SQLite files go")
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (60.0 if args.quick else 300.0)
    lines = []
    for store in stores_from(args.store, args.pg, console):
        runs = []
        for hold in ([True, False] if args.control else [True]):
            console.print(f"[bold]horizon[/] {store}: {args.rate:,.0f} items/s for {args.seconds:g} s, "
                          f"{'with ' + HOLD[store] if hold else 'WITHOUT a held snapshot'} …")
            runs.append(bench_store(store, args.pg, args.rate, args.seconds, args.probe_every, hold, args.tmpdir))
        if args.control:
            held, ctl = runs
            prefix = GROWS[store][1]
            for k in ("throughput_end_per_s", "claim_ms_end", f"{prefix}_mb_end", "lag_p99_ms"):
                held[f"{k}_ratio_to_control"] = ratio(held[k], ctl[k])
        for line in runs:
            record("horizon", line)
            console.print(probes_table(line, f"horizon probes, {store} ({'held snapshot' if line['held'] else 'control'})"))
        lines += runs
    console.print(table(lines))
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
