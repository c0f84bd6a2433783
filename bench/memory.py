"""Memory: one worker process's resident memory (VmRSS from /proc/<pid>/status) at start and after
it has handled 1,000,000 items, sampled every 100,000.

Per store, in one invocation: a fresh database; ONE worker process (`app.run_worker(processes=1)`
in a fresh interpreter started by the bench, so its RSS is the worker's alone; no-op handler, batch 100, concurrency 4)
started and
warmed up with one item; then the bench submits --chunk (100,000) items at a time with
`app.submit_many`, waits until the store says they are all resolved (app.stats()), and reads the
worker's VmRSS; until --items (1,000,000; --quick 300,000). At the end the store must hold exactly
--items + 1 items, all resolved.

Figures: RSS at start (idle, after the warm-up item), after the first chunk (caches, connections and
statement caches are warm by then), and at the end; growth = end - after-first-chunk, in MB and %
("flat" = within 5% and 5 MB). No raw ratio: a bare loop's RSS is not a reference for conveyor's.

    python -m bench.memory [--store sqlite|postgres|all] [--items 1000000] [--chunk 100000] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from .common import PG_ADMIN_URL, QUEUE, base_line, fresh_url, payloads, record, stores_from, wait_until
from .steady import noop_app

console = Console(width=max(110, Console().width))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run(url: str, items: int, chunk: int) -> dict:
    app = noop_app(url)()
    app.migrate()
    app.close()
    # the worker runs in a fresh interpreter, not a fork of this one: a fork would start with (and
    # count in its RSS) whatever this process has touched (earlier workloads, matplotlib, ...)
    worker = subprocess.Popen([sys.executable, "-m", "bench.memory", "--worker", url],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    samples: list[dict] = []
    try:
        app.submit(QUEUE, {"warm": 1})
        if not wait_until(lambda: app.stats([QUEUE])[QUEUE]["resolved"] == 1, 30):
            raise RuntimeError("the worker did not start within 30 s")
        time.sleep(0.5)
        samples.append({"items": 0, "rss_mb": round(rss_kb(worker.pid) / 1024, 1), "seconds": 0.0})
        orders = payloads(chunk)
        done = 0
        t0 = time.perf_counter()
        while done < items:
            n = min(chunk, items - done)
            app.submit_many(QUEUE, orders[:n])
            done += n
            # has_work (pending or in progress left?) is cheap; stats' full count is checked at the end
            if not wait_until(lambda: not app.store.has_work([QUEUE]), 600, 0.1):
                raise RuntimeError(f"the worker did not drain {done} items within 10 minutes")
            if worker.poll() is not None:
                raise RuntimeError(f"the worker process died (exit code {worker.returncode})")
            samples.append({"items": done, "rss_mb": round(rss_kb(worker.pid) / 1024, 1),
                            "seconds": round(time.perf_counter() - t0, 1)})
            console.print(f"    {done:>9,} items: RSS {samples[-1]['rss_mb']:.1f} MB")
        elapsed = time.perf_counter() - t0
    finally:
        worker.terminate()  # SIGTERM: a graceful stop
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    s = app.stats([QUEUE])[QUEUE]
    app.close()
    if s["resolved"] != items + 1 or s["total"] != items + 1:
        raise RuntimeError(f"memory: the store holds {s}; expected {items + 1} resolved and nothing else")
    start, first, end = samples[0]["rss_mb"], samples[1]["rss_mb"], samples[-1]["rss_mb"]
    growth = end - first
    return {"rss_start_mb": start, "rss_after_first_chunk_mb": first, "rss_end_mb": end,
            "growth_mb": round(growth, 1), "growth_pct": round(100 * growth / first, 1),
            "growth_from_start_mb": round(end - start, 1), "max_rss_mb": max(x["rss_mb"] for x in samples),
            "flat": abs(growth) <= max(5.0, 0.05 * first), "items_per_s": round(items / elapsed, 1),
            "samples": samples}


def table(lines: list[dict]) -> Table:
    t = Table(title="memory: one worker's RSS (MB) while it handles the items (no-op handler)")
    for col in ("store", "items", "start", "after 1st chunk", "end", "max", "growth MB", "growth %", "flat?", "items/s"):
        t.add_column(col, justify="left" if col == "store" else "right")
    for r in lines:
        t.add_row(r["store"], f"{r['items']:,}", f"{r['rss_start_mb']:.1f}", f"{r['rss_after_first_chunk_mb']:.1f}",
                  f"{r['rss_end_mb']:.1f}", f"{r['max_rss_mb']:.1f}", f"{r['growth_mb']:+.1f}", f"{r['growth_pct']:+.1f}",
                  "yes" if r["flat"] else "NO", f"{r['items_per_s']:,.0f}")
    return t


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    ap.add_argument("--items", type=int, default=None, help="items in all (default 1,000,000; --quick 300,000)")
    ap.add_argument("--chunk", type=int, default=100_000, help="items per submit and per RSS sample")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)  # internal: be the measured worker
    args = ap.parse_args(argv)
    if args.worker:
        noop_app(args.worker)().run_worker(processes=1)
        return []
    args.items = args.items or (300_000 if args.quick else 1_000_000)
    chunk = min(args.chunk, max(1, args.items // 3))
    lines = []
    for store in stores_from(args.store, args.pg, console):
        console.print(f"[bold]memory[/] {store}: {args.items:,} items in chunks of {chunk:,}, 1 worker process …")
        line = base_line("memory", store, args.pg, items=args.items, chunk=chunk, processes=1, batch_size=100,
                         concurrency=4)
        with fresh_url(store, args.pg, args.tmpdir) as url:
            line.update(run(url, args.items, chunk))
        record("memory", line)
        lines.append(line)
    console.print(table(lines))
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
