"""Held horizon (PostgreSQL only): a steady-state run while another session keeps one REPEATABLE
READ transaction open the whole time, so vacuum cannot remove the dead row versions every claim and
resolve leaves behind. A known way PostgreSQL queues slow down in production.

One invocation:
  1. fresh database, `app.migrate()`; a side session runs BEGIN ISOLATION LEVEL REPEATABLE READ and a
     SELECT (that takes the snapshot: its backend_xmin is recorded to show the horizon is held) and
     stays idle in that transaction until the end;
  2. bench.steady's run: --rate items/s (2,000) submitted by another process for --seconds (300;
     --quick 60), drained by 2 conveyor worker processes (no-op handler, batch 100); every second
     the store is sampled (app.stats()); every --probe-every seconds (5) a probe connection
       - times the worker's claim statement (conveyor.stores.postgres' claim, batch 100) in a
         transaction it then rolls back (claim_ms), and runs it under EXPLAIN (ANALYZE, BUFFERS)
         (explain_ms, buffers: shared pages hit + read by one claim),
       - reads pg_total_relation_size('conveyor_items') and n_dead_tup;
  3. counts checked from the store (every submitted item resolved, nothing else).
Figures: throughput (resolved/s) in the first and last fifth of the run, claim latency at start and
end, table size at start and end, each end/start ratio. With --control, the same run without the
held transaction follows, and the held run's end figures get a ratio to the control's.

    python -m bench.horizon [--seconds 300] [--quick] [--rate 2000] [--probe-every 5] [--control]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import psycopg
from rich.console import Console
from rich.table import Table

from . import raw_postgres
from .common import PG_ADMIN_URL, QUEUE, base_line, fresh_url, ratio, record, stores_from
from .steady import noop_app, steady_run

console = Console(width=max(130, Console().width))


class Prober:
    def __init__(self, url: str):
        self.conn = psycopg.connect(url, autocommit=True)
        self.args = {"owner": "probe", "lease": 30.0, "token": 1, "max_attempts": 5, "queue": QUEUE, "limit": 100}

    def __call__(self) -> dict:
        c = self.conn
        times = []
        got = 0
        for _ in range(3):
            c.execute("BEGIN")
            t0 = time.perf_counter()
            got = len(c.execute(raw_postgres.CLAIM_SQL, self.args).fetchall())
            times.append(1000 * (time.perf_counter() - t0))
            c.execute("ROLLBACK")
        c.execute("BEGIN")
        plan = c.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + raw_postgres.CLAIM_SQL, self.args).fetchone()[0]
        c.execute("ROLLBACK")
        plan = plan if isinstance(plan, list) else json.loads(plan)
        top = plan[0]["Plan"]
        size, dead, live = c.execute(
            "SELECT pg_total_relation_size('conveyor_items'), n_dead_tup, n_live_tup "
            "FROM pg_stat_user_tables WHERE relname = 'conveyor_items'").fetchone()
        return {"claim_ms": round(statistics.median(times), 2), "claim_got": got,
                "explain_ms": round(plan[0]["Execution Time"], 2),
                "buffers": top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0),
                "table_bytes": size, "dead_tuples": dead, "live_tuples": live}

    def close(self) -> None:
        self.conn.close()


def one_run(url: str, args: argparse.Namespace, hold: bool) -> dict:
    app = noop_app(url)()
    app.migrate()
    app.close()
    holder = None
    out: dict = {"held": hold}
    if hold:
        holder = psycopg.connect(url)  # not autocommit: the first statement opens the transaction
        holder.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        holder.execute("SELECT count(*) FROM conveyor_items").fetchone()  # the snapshot is taken here
        with psycopg.connect(url, autocommit=True) as side:
            out["holder_backend_xmin"] = str(side.execute(
                "SELECT backend_xmin FROM pg_stat_activity WHERE pid = %s", (holder.info.backend_pid,)).fetchone()[0])
    prober = Prober(url)
    try:
        start = prober()
        run = steady_run("postgres", url, args.rate, args.seconds, raw=False, probe=prober, every=1.0,
                         probe_every=args.probe_every)
        end = prober()
        if hold:
            with psycopg.connect(url, autocommit=True) as side:
                state = side.execute("SELECT state, backend_xmin FROM pg_stat_activity WHERE pid = %s",
                                     (holder.info.backend_pid,)).fetchone()
            out["holder_state_at_end"] = f"{state[0]}, backend_xmin {state[1]}"
    finally:
        prober.close()
        if holder is not None:
            holder.rollback()
            holder.close()
    series = run.pop("series")
    out.update(run)
    window = [s for s in series if s["t"] <= args.seconds + 0.5]
    fifth = max(2, len(window) // 5)
    head, tail = window[:fifth], window[-fifth:]
    rate = lambda xs: (xs[-1]["resolved"] - xs[0]["resolved"]) / ((xs[-1]["t"] - xs[0]["t"]) or 1)  # noqa: E731
    probes = [s for s in series if "claim_ms" in s]
    out.update({
        "throughput_start_per_s": round(rate(head), 1), "throughput_end_per_s": round(rate(tail), 1),
        "claim_ms_start": start["claim_ms"], "claim_ms_end": end["claim_ms"],
        "claim_ms_max": max([p["claim_ms"] for p in probes] + [end["claim_ms"]]),
        "buffers_start": start["buffers"], "buffers_end": end["buffers"],
        "table_mb_start": round(start["table_bytes"] / 2**20, 1), "table_mb_end": round(end["table_bytes"] / 2**20, 1),
        "dead_tuples_end": end["dead_tuples"],
        "probes": [{k: p[k] for k in ("t", "claim_ms", "explain_ms", "buffers", "table_bytes", "dead_tuples",
                                      "pending", "resolved", "lag_s")} for p in probes],
        "series": series,
    })
    out["throughput_end_over_start"] = ratio(out["throughput_end_per_s"], out["throughput_start_per_s"])
    out["claim_end_over_start"] = ratio(out["claim_ms_end"], out["claim_ms_start"])
    out["table_end_over_start"] = ratio(out["table_mb_end"], out["table_mb_start"])
    return out


def probes_table(run: dict, title: str) -> Table:
    t = Table(title=title)
    for col in ("t s", "claim ms", "EXPLAIN ms", "buffers/claim", "table MB", "dead tuples", "backlog", "lag ms", "resolved"):
        t.add_column(col, justify="right")
    for p in run["probes"]:
        t.add_row(f"{p['t']:.0f}", f"{p['claim_ms']:.2f}", f"{p['explain_ms']:.2f}", f"{p['buffers']:,}",
                  f"{p['table_bytes'] / 2**20:.1f}", f"{p['dead_tuples']:,}", f"{p['pending']:,}",
                  f"{1000 * p['lag_s']:.0f}", f"{p['resolved']:,}")
    return t


def table(lines: list[dict]) -> Table:
    t = Table(title="held horizon (PostgreSQL): start → end of the run (ratio = end / start)")
    for col in ("run", "s", "resolved/s start", "end", "×", "claim ms start", "end", "×", "buffers/claim start", "end",
                "table MB start", "end", "×", "lag p99 ms"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in lines:
        t.add_row("held RR snapshot" if r["held"] else "control (no snapshot)", f"{r['seconds']:g}",
                  f"{r['throughput_start_per_s']:,.0f}", f"{r['throughput_end_per_s']:,.0f}", str(r["throughput_end_over_start"]),
                  f"{r['claim_ms_start']:.2f}", f"{r['claim_ms_end']:.2f}", str(r["claim_end_over_start"]),
                  f"{r['buffers_start']:,}", f"{r['buffers_end']:,}",
                  f"{r['table_mb_start']:.1f}", f"{r['table_mb_end']:.1f}", str(r["table_end_over_start"]),
                  f"{r['lag_p99_ms']:,.0f}")
    return t


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.horizon", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=None, help="run length (default 300; --quick 60)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--probe-every", type=int, default=5, help="seconds between claim probes (default 5)")
    ap.add_argument("--control", action="store_true", help="also run without the held transaction, for a ratio")
    ap.add_argument("--store", choices=("postgres",), default="postgres", help="PostgreSQL only")
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (60.0 if args.quick else 300.0)
    if not stores_from("postgres", args.pg, console):
        return []
    lines = []
    for hold in ([True, False] if args.control else [True]):
        console.print(f"[bold]horizon[/] postgres: {args.rate:,.0f} items/s for {args.seconds:g} s, "
                      f"{'with' if hold else 'WITHOUT'} a held REPEATABLE READ snapshot …")
        line = base_line("horizon", "postgres", args.pg, rate=args.rate, seconds=args.seconds, processes=2,
                         batch_size=100, probe_every=args.probe_every)
        with fresh_url("postgres", args.pg, suffix="horizon") as url:
            line.update(one_run(url, args, hold))
        lines.append(line)
    if args.control:
        held, ctl = lines
        for k in ("throughput_end_per_s", "claim_ms_end", "table_mb_end", "lag_p99_ms"):
            held[f"{k}_ratio_to_control"] = ratio(held[k], ctl[k])
    for line in lines:
        record("horizon", line)
        console.print(probes_table(line, f"horizon probes ({'held snapshot' if line['held'] else 'control'})"))
    console.print(table(lines))
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
