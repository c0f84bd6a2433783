"""Steady state: items submitted at a fixed rate while 2 worker processes drain them; lag and
throughput over time.

Per store, in one invocation:
  conveyor  2 worker processes (no-op handler, batch 100, concurrency 4) started idle; ANOTHER
            process submits --rate items/s (default 2,000) for --seconds (60; --quick 15), in
            `app.submit_many` calls every 10 ms on an absolute schedule. Every second the bench
            samples the store (app.stats()): submitted (total), resolved, backlog (pending),
            in progress, lag (age of the oldest due pending item).
  raw       the same submitter; 2 bare processes claiming/resolving with the store's statements
            (bench.raw_serve: SQLite polls every 1 ms, PostgreSQL LISTEN + claim).
After the window the submitter stops, the backlog drains, and the store must hold exactly the
submitted count, all resolved. Summary: throughput over the window (resolved/s), max backlog,
p50/p99/max lag, each with its ratio to raw's.

    python -m bench.steady [--store sqlite|postgres|all] [--rate 2000] [--seconds 60] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

import conveyor

from . import raw_serve
from .common import (
    PG_ADMIN_URL,
    QUEUE,
    base_line,
    fresh_url,
    percentile,
    ratio,
    record,
    run_workers,
    start_process,
    stop_process,
    stores_from,
    wait_until,
)

console = Console(width=max(130, Console().width))
PROCESSES = 2
BATCH = 100
TICK = 0.010


def _submit_at_rate(url: str, rate: float, seconds: float, stop_at: Any, out: Any) -> None:
    try:
        app = conveyor.App(url)
        sent = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        i = 0
        while True:
            now = time.perf_counter()
            if now >= end or stop_at.is_set():
                break
            due = int(rate * (now - t0)) + 1 - sent
            if due > 0:
                due = min(due, int(rate))  # never more than a second's worth in one go
                app.submit_many(QUEUE, [{"order_id": sent + k, "lat": 52.37, "lon": 4.89} for k in range(due)])
                sent += due
            i += 1
            wait = t0 + i * TICK - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        app.close()
        out.put(("ok", sent, time.perf_counter() - t0))
    except BaseException:  # noqa: BLE001 - tell the parent rather than leave it waiting
        import traceback

        out.put(("error", traceback.format_exc(), 0))


def noop_app(url: str, batch_size: int = BATCH, concurrency: int = 4) -> Callable[[], conveyor.App]:
    def make_app() -> conveyor.App:
        app = conveyor.App(url)

        @app.processor(QUEUE, batch_size=batch_size, concurrency=concurrency)
        def noop(item: conveyor.Item) -> None:
            pass

        return app

    return make_app


def steady_run(store: str, url: str, rate: float, seconds: float, raw: bool,
               probe: Callable[[], dict] | None = None, every: float = 1.0, probe_every: int = 1) -> dict:
    """One steady-state window on a fresh database: workers (conveyor's or raw) + the submitter,
    sampled every `every` seconds; `probe()` adds fields to every `probe_every`-th sample."""
    app = noop_app(url)()
    app.migrate()
    app.close()
    if raw:
        procs, stop = raw_serve.start(store, url, PROCESSES, BATCH)
    else:
        workers = run_workers(noop_app(url), PROCESSES)
    try:
        time.sleep(1.0)  # workers up and idle
        ctx = multiprocessing.get_context("fork")
        out, stop_sub = ctx.Queue(), ctx.Event()
        sub = start_process(_submit_at_rate, url, rate, seconds, stop_sub, out)
        samples: list[dict] = []
        t0 = time.monotonic()
        k = 0
        while True:
            k += 1
            target = t0 + k * every
            time.sleep(max(0.0, target - time.monotonic()))
            s = app.stats([QUEUE])[QUEUE]
            sample = {"t": round(time.monotonic() - t0, 2), "submitted": s["total"], "resolved": s["resolved"],
                      "pending": s["pending"], "in_progress": s["in_progress"],
                      "lag_s": s["oldest_pending_seconds"] or 0.0}
            if probe and k % probe_every == 0:
                sample.update(probe())
            samples.append(sample)
            if not sub.is_alive() or time.monotonic() - t0 >= seconds + 5:
                break
        status, sent, sub_seconds = out.get(timeout=60)
        sub.join()
        if status == "error":
            raise RuntimeError(f"the submitter failed:\n{sent}")
        t_end = time.monotonic()
        drained = wait_until(lambda: app.stats([QUEUE])[QUEUE]["resolved"] >= sent, 300, 0.1)
        drain_after = time.monotonic() - t_end
    finally:
        if raw:
            raw_serve.stop_all(procs, stop)
        else:
            stop_process(workers)
    s = app.stats([QUEUE])[QUEUE]
    app.close()
    if not drained or s["resolved"] != sent or s["total"] != sent:
        raise RuntimeError(f"steady ({'raw' if raw else 'conveyor'}): submitted {sent}, the store holds {s}")
    window = [x for x in samples if x["t"] <= seconds + 0.5]
    first, last = window[0], window[-1]
    span = last["t"] - first["t"] or 1.0
    lags = [x["lag_s"] for x in window]
    return {
        "submitted": sent, "submit_per_s": round(sent / sub_seconds, 1),
        "throughput_per_s": round((last["resolved"] - first["resolved"]) / span, 1),
        "max_backlog": max(x["pending"] for x in window),
        "lag_p50_ms": round(1000 * percentile(lags, 50), 1), "lag_p99_ms": round(1000 * percentile(lags, 99), 1),
        "lag_max_ms": round(1000 * max(lags), 1), "drain_after_s": round(drain_after, 2), "series": samples,
    }


SUMMARY = ("throughput_per_s", "max_backlog", "lag_p50_ms", "lag_p99_ms", "lag_max_ms")


def bench_store(store: str, args: argparse.Namespace) -> dict:
    line = base_line("steady", store, args.pg, rate=args.rate, seconds=args.seconds, processes=PROCESSES,
                     batch_size=BATCH, concurrency=4)
    with fresh_url(store, args.pg, args.tmpdir) as url:
        conv = steady_run(store, url, args.rate, args.seconds, raw=False)
    with fresh_url(store, args.pg, args.tmpdir, suffix="raw") as url:
        raw = steady_run(store, url, args.rate, args.seconds, raw=True)
    series = conv.pop("series")
    raw_series = raw.pop("series")
    line.update(conv)
    line.update({f"raw_{k}": v for k, v in raw.items()})
    for k in SUMMARY:
        line[f"{k.removesuffix('_per_s').removesuffix('_ms')}_ratio_to_raw"] = ratio(line[k], line[f"raw_{k}"])
    line["series"] = series
    line["raw_series"] = raw_series
    return line


def series_table(line: dict, step: int = 1) -> Table:
    t = Table(title=f"steady {line['store']}: {line['rate']:,} items/s offered — per-second samples (conveyor | raw)")
    for col in ("t s", "submitted", "resolved", "backlog", "lag ms", "raw resolved", "raw backlog", "raw lag ms"):
        t.add_column(col, justify="right")
    raw = {round(x["t"]): x for x in line["raw_series"]}
    for x in line["series"][::step]:
        r = raw.get(round(x["t"]), {})
        t.add_row(f"{x['t']:.0f}", f"{x['submitted']:,}", f"{x['resolved']:,}", f"{x['pending']:,}",
                  f"{1000 * x['lag_s']:.0f}", *((f"{r['resolved']:,}", f"{r['pending']:,}", f"{1000 * r['lag_s']:.0f}")
                                                if r else ("—", "—", "—")))
    return t


def table(lines: list[dict]) -> Table:
    t = Table(title="steady state: summary (ratio = conveyor / raw)")
    for col in ("store", "rate", "s", "resolved/s", "raw/s", "ratio", "max backlog", "raw", "lag p50 ms", "raw",
                "lag p99 ms", "raw", "p99 ratio"):
        t.add_column(col, justify="left" if col == "store" else "right")
    f = lambda v: "—" if v is None else f"{v:,.0f}"  # noqa: E731
    for r in lines:
        t.add_row(r["store"], f(r["rate"]), f"{r['seconds']:g}", f(r["throughput_per_s"]), f(r["raw_throughput_per_s"]),
                  f"{r['throughput_ratio_to_raw']}", f(r["max_backlog"]), f(r["raw_max_backlog"]),
                  f(r["lag_p50_ms"]), f(r["raw_lag_p50_ms"]), f(r["lag_p99_ms"]), f(r["raw_lag_p99_ms"]),
                  f"{r['lag_p99_ratio_to_raw']}")
    return t


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.steady", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    ap.add_argument("--rate", type=float, default=2000.0, help="items/s submitted (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=None, help="window length (default 60; --quick 15)")
    ap.add_argument("--quick", action="store_true", help="15 s windows")
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (15.0 if args.quick else 60.0)
    lines = []
    for store in stores_from(args.store, args.pg, console):
        console.print(f"[bold]steady[/] {store}: {args.rate:,.0f} items/s for {args.seconds:g} s, conveyor then raw …")
        line = bench_store(store, args)
        record("steady", line)
        console.print(series_table(line))
        lines.append(line)
    console.print(table(lines))
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
