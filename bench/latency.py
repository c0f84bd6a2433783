"""Latency: how long an item waits between submit (in one process) and its handler starting (in
another), with idle workers and a trickle of submissions.

Per store, in one invocation:
  conveyor  2 worker processes (`app.run_worker(processes=2)`), idle; ANOTHER process calls
            `app.submit` once every --interval-ms (5 ms) for --seconds (10 s). The payload carries
            time.time_ns() taken just before the submit; the handler appends time.time_ns() - t to
            a per-process file opened O_APPEND. Wall clock (time_ns) because perf_counter is not
            comparable across processes.
  raw       the same submitter (the App's submit, same schema); 2 bare processes that claim with the
            store's statement (SQLite: polled every 1 ms; PostgreSQL: LISTEN + claim), recording
            now - t for every row claimed, then resolving it.
  minimal   the minimal bare loop (bench.minimal: one table, one partial index): a submitter doing
            one autocommit INSERT per item (PostgreSQL: INSERT and NOTIFY in one statement); 2
            processes claiming 100 at a time with its one-statement claim (SQLite: polled every
            1 ms; PostgreSQL: LISTEN + claim), recording now - t at claim, then resolving.
Counts are checked from the store (app.stats()): every submitted item resolved, nothing else; and
one latency sample per item. Figures: p50/p95/p99/max in ms, and each one's ratio to raw's and
to the minimal loop's (minimal_*; --no-minimal skips that run).

    python -m bench.latency [--store sqlite|postgres|all] [--seconds 10] [--interval-ms 5]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from rich.console import Console
from rich.table import Table

import conveyor

from . import minimal, raw_serve
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

console = Console(width=max(150, Console().width))
PROCESSES = 2
STATS = ("p50", "p95", "p99", "max")


def _appender(folder: str):
    """A function writing one integer per line to <folder>/lat.<pid>, opened O_APPEND (safe from
    many threads: each line is one write())."""
    fds: dict[int, int] = {}

    def write(i: int, ns: int) -> None:
        pid = os.getpid()
        fd = fds.get(pid)
        if fd is None:
            fd = fds[pid] = os.open(os.path.join(folder, f"lat.{pid}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, b"%d %d\n" % (i, ns))

    return write


def _read(folder: str) -> dict[int, int]:
    """{item number: latency ns} from every process's file."""
    out: dict[int, int] = {}
    for path in glob.glob(os.path.join(folder, "lat.*")):
        with open(path, "rb") as f:
            xs = f.read().split()
        out.update(zip(map(int, xs[0::2]), map(int, xs[1::2])))
    return out


def _submitter(url: str, seconds: float, interval: float, out: Any, store: str | None = None) -> None:
    """Submit one item per interval on an absolute schedule (a late tick submits at once, no burst
    catch-up beyond that); report (count, worst slip in ms)."""
    try:
        out.put(_submit_loop(url, seconds, interval, store))
    except BaseException:  # noqa: BLE001 - report it to the parent instead of hanging it
        import traceback

        out.put(("error", traceback.format_exc(), None))


def _submit_loop(url: str, seconds: float, interval: float, store: str | None = None) -> tuple[int, float]:
    """Through the App's submit; with `store`, through the minimal loop's insert instead."""
    if store is None:
        app = conveyor.App(url)
        submit, close = (lambda payload: app.submit(QUEUE, payload)), app.close
    else:
        submit, close = minimal.submitter(store, url)
    n = int(seconds / interval)
    slip = 0.0
    took: list[int] = []  # each submit call's own duration (ns): BEGIN … INSERT … COMMIT (and NOTIFY)
    t0 = time.perf_counter() + 0.05
    for i in range(n):
        due = t0 + i * interval
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        else:
            slip = max(slip, -wait)
        t = time.time_ns()
        submit({"t": t, "i": i})
        took.append(time.time_ns() - t)
    close()
    return n, slip * 1000, took


def _submit_trickle(url: str, seconds: float, interval: float, store: str | None = None) -> tuple[int, float, list[int]]:
    import multiprocessing

    q = multiprocessing.get_context("fork").Queue()
    p = start_process(_submitter, url, seconds, interval, q, store)
    n, slip, took = q.get(timeout=seconds + 120)
    p.join()
    if n == "error":
        raise RuntimeError(f"the submitter process failed:\n{slip}")
    return n, slip, took


def _summary(ns, prefix: str = "") -> dict[str, float | None]:
    ms = [x / 1e6 for x in ns]
    return {prefix + k: (None if not ms else round(percentile(ms, q) if q < 100 else max(ms), 3))
            for k, q in zip(STATS, (50, 95, 99, 100))}


def _split(lat: dict[int, int], took: list[int], prefix: str) -> dict:
    """The latency, plus its two parts: the submit call itself (the submitter's transaction, its
    commit's fsync included) and the rest, from the submit's return to the handler's start (the
    wake-up and claim path, the part a queue library controls)."""
    out = _summary(list(lat.values()), prefix)
    out.update({f"{prefix}submit_call_{k}": v for k, v in _summary(took).items() if k in ("p50", "p99")})
    after = [ns - took[i] for i, ns in lat.items() if i < len(took)]
    out.update({f"{prefix}after_submit_{k}": v for k, v in _summary(after).items() if k in ("p50", "p95", "p99")})
    return out


def _check(app: conveyor.App, expected: int, samples: int, what: str) -> dict:
    s = app.stats([QUEUE])[QUEUE]
    if s["resolved"] != expected or s["total"] != expected or samples != expected:
        raise RuntimeError(f"{what}: the store holds {s} and {samples} latency samples were written; "
                           f"expected {expected} resolved and as many samples")
    return s


def run_conveyor(url: str, seconds: float, interval: float) -> dict:
    folder = tempfile.mkdtemp(prefix="conveyor_lat_")
    write = _appender(folder)
    try:
        def make_app() -> conveyor.App:
            app = conveyor.App(url)

            @app.processor(QUEUE, batch_size=100, concurrency=4)
            def handle(item: conveyor.Item) -> None:
                t = item.payload.get("t")
                if t is not None:
                    write(item.payload["i"], time.time_ns() - t)

            return app

        app = make_app()
        app.migrate()
        app.close()
        workers = run_workers(make_app, PROCESSES)
        try:
            # warm up: one item through, then let the workers go idle
            app.submit(QUEUE, {"warm": 1})
            if not wait_until(lambda: app.stats([QUEUE])[QUEUE]["resolved"] == 1, 30):
                raise RuntimeError("workers did not start within 30 s")
            app.close()
            time.sleep(1.0)
            n, slip, took = _submit_trickle(url, seconds, interval)
            wait_until(lambda: app.stats([QUEUE])[QUEUE]["resolved"] >= n + 1, 30)
        finally:
            stop_process(workers)
        samples = _read(folder)
        _check(app, n + 1, len(samples) + 1, "conveyor latency")
        app.close()
        return {"submitted": n, "submit_slip_max_ms": round(slip, 2), **_split(samples, took, "")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_raw(store: str, url: str, seconds: float, interval: float) -> dict:
    folder = tempfile.mkdtemp(prefix="conveyor_lat_raw_")
    try:
        def factory():
            write = _appender(folder)

            def on_rows(rows: list) -> None:
                now = time.time_ns()
                for r in rows:
                    p = raw_serve.payload_of(r)
                    if p.get("t") is not None:
                        write(p["i"], now - p["t"])
            return on_rows

        app = conveyor.App(url)
        app.migrate()  # the store's schema; the raw loop runs the store's statements on it
        app.close()
        procs, stop = raw_serve.start(store, url, PROCESSES, 100, factory)
        try:
            time.sleep(1.0)
            n, slip, took = _submit_trickle(url, seconds, interval)
            wait_until(lambda: app.stats([QUEUE])[QUEUE]["in_progress"] + app.stats([QUEUE])[QUEUE]["pending"] == 0
                       and len(_read(folder)) >= n, 30)
        finally:
            raw_serve.stop_all(procs, stop)
        samples = _read(folder)
        _check(app, n, len(samples), "raw latency")
        app.close()
        return {"raw_submitted": n, "raw_submit_slip_max_ms": round(slip, 2), **_split(samples, took, "raw_")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_minimal(store: str, url: str, seconds: float, interval: float) -> dict:
    """The minimal bare loop's latency: its own schema, its own submitter, 2 serving processes."""
    import multiprocessing

    folder = tempfile.mkdtemp(prefix="conveyor_lat_min_")
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    try:
        minimal.create(store, url)

        def main() -> None:
            write = _appender(folder)

            def on_rows(rows: list) -> None:
                now = time.time_ns()
                for r in rows:
                    p = json.loads(r[1])
                    write(p["i"], now - p["t"])

            minimal.serve(store, url, 100, stop, on_rows)

        procs = [ctx.Process(target=main) for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        try:
            time.sleep(1.0)
            n, slip, took = _submit_trickle(url, seconds, interval, store)
            wait_until(lambda: len(_read(folder)) >= n, 30)
        finally:
            raw_serve.stop_all(procs, stop)
        samples = _read(folder)
        got = minimal.counts(store, url)
        if got != {"done": n} or len(samples) != n:
            raise RuntimeError(f"minimal latency: the table holds {got} and {len(samples)} latency samples were "
                               f"written; expected {n} done and as many samples")
        return {"minimal_submitted": n, "minimal_submit_slip_max_ms": round(slip, 2),
                **_split(samples, took, "minimal_")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_store(store: str, args: argparse.Namespace) -> dict:
    interval = args.interval_ms / 1000
    line = base_line("latency", store, args.pg, seconds=args.seconds, interval_ms=args.interval_ms,
                     processes=PROCESSES, batch_size=100, concurrency=4)
    with fresh_url(store, args.pg, args.tmpdir) as url:
        line.update(run_conveyor(url, args.seconds, interval))
    with fresh_url(store, args.pg, args.tmpdir, suffix="raw") as url:
        line.update(run_raw(store, url, args.seconds, interval))
    if getattr(args, "minimal", True):
        with fresh_url(store, args.pg, args.tmpdir, suffix="min") as url:
            line.update(run_minimal(store, url, args.seconds, interval))
        for k in STATS:
            line[f"{k}_ratio_to_minimal"] = ratio(line[k], line[f"minimal_{k}"])
        for k in ("p50", "p99"):
            line[f"after_submit_{k}_ratio_to_minimal"] = ratio(line[f"after_submit_{k}"], line[f"minimal_after_submit_{k}"])
    for k in STATS:
        line[f"{k}_ratio_to_raw"] = ratio(line[k], line[f"raw_{k}"])
    for k in ("p50", "p99"):
        line[f"after_submit_{k}_ratio_to_raw"] = ratio(line[f"after_submit_{k}"], line[f"raw_after_submit_{k}"])
    return line


def table(lines: list[dict]) -> Table:
    t = Table(title="latency: submit (one process) → handler start (another), ms; raw = bare claim loop")
    for col in ("store", "items", "p50", "p95", "p99", "max", "raw p50", "raw p95", "raw p99", "raw max",
                "p50 ×raw", "p99 ×raw", "submit call p50", "after submit p50 / p99", "raw",
                "minimal p50 / p99", "p50 ×min"):
        t.add_column(col, justify="left" if col == "store" else "right")
    f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for r in lines:
        t.add_row(r["store"], str(r["submitted"]), *(f(r[k]) for k in STATS), *(f(r[f"raw_{k}"]) for k in STATS),
                  f(r["p50_ratio_to_raw"]), f(r["p99_ratio_to_raw"]), f(r["submit_call_p50"]),
                  f"{f(r['after_submit_p50'])} / {f(r['after_submit_p99'])}",
                  f"{f(r['raw_after_submit_p50'])} / {f(r['raw_after_submit_p99'])}",
                  f"{f(r.get('minimal_p50'))} / {f(r.get('minimal_p99'))}", f(r.get("p50_ratio_to_minimal")))
    return t


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--interval-ms", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="same as the default (10 s is already quick)")
    ap.add_argument("--no-minimal", dest="minimal", action="store_false",
                    help="skip the minimal bare loop's run (bench.minimal)")
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    ap.add_argument("--tmpdir", default=None)
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    lines = []
    for store in stores_from(args.store, args.pg, console):
        console.print(f"[bold]latency[/] {store}: 1 item / {args.interval_ms:g} ms for {args.seconds:g} s, "
                      f"{PROCESSES} idle worker processes …")
        line = bench_store(store, args)
        record("latency", line)
        lines.append(line)
    console.print(table(lines))
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
