"""Flow control's cost when the limit does not bind: the same drain with and without each option.

Per store, in one run, rounds interleaved (A B C ... A B C ...): N items (keyed over 50 keys, so the
per-key options have keys to look at) drained by 2 worker processes, no-op handler, batch 100:

  none              no flow control (the one-statement claim)
  max_in_progress   max_in_progress=1_000_000
  rate_limit        rate_limit="1000000/s"
  key_concurrency   key_concurrency=1_000_000
  key_rate_limit    key_rate_limit="1000000/s"
  fair              fair=True
  paused_other_key  none, while another key of the queue is paused (the per-row probe of claims)

Figures: the median items/s of each, and its ratio to `none` (the target: within 10%, >= 0.9).

    python -m bench.flow [--store sqlite|postgres|all] [--items 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

import conveyor

from .common import PG_ADMIN_URL, base_line, fresh_url, payloads, ratio, record, stores_from

console = Console(width=max(120, Console().width))
QUEUE = "flow"
CASES: dict[str, dict[str, Any]] = {
    "none": {},
    "max_in_progress": {"max_in_progress": 1_000_000},
    "rate_limit": {"rate_limit": "1000000/s"},
    "key_concurrency": {"key_concurrency": 1_000_000},
    "key_rate_limit": {"key_rate_limit": "1000000/s"},
    "fair": {"fair": True},
    "paused_other_key": {},
}


def noop(item: conveyor.Item) -> None:
    pass


def drain(store: str, pg: str, n: int, case: str) -> float:
    with fresh_url(store, pg, suffix="flow") as url:
        app = conveyor.App(url)
        app.processor(QUEUE, batch_size=100, concurrency=4, **CASES[case])(noop)
        app.submit_many(QUEUE, payloads(n), key=lambda p: f"k{p['order_id'] % 50}")
        if case == "paused_other_key":
            app.pause(QUEUE, key="not-in-this-drain")
        t0 = time.perf_counter()
        app.run_worker(processes=2, stop_when_empty=True, install_signal_handlers=False)
        seconds = time.perf_counter() - t0
        done = app.stats([QUEUE])[QUEUE]["resolved"]
        app.close()
    if done != n:
        raise RuntimeError(f"{case}: {done} of {n} resolved")
    return n / seconds


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.flow", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    args = ap.parse_args(argv)
    lines = []
    for store in stores_from(args.store, args.pg, console):
        line = base_line("flow", store, args.pg, items=args.items, rounds=args.rounds, processes=2, batch_size=100)
        rates: dict[str, list[float]] = {case: [] for case in CASES}
        for r in range(args.rounds):
            for case in CASES:
                rates[case].append(drain(store, args.pg, args.items, case))
                console.print(f"{store} round {r + 1}: {case:17s} {rates[case][-1]:>9,.0f} items/s")
        line["per_s"] = {case: round(statistics.median(v)) for case, v in rates.items()}
        line["ratio"] = {case: ratio(line["per_s"][case], line["per_s"]["none"]) for case in CASES}
        record("flow", line)
        lines.append(line)
    t = Table(title="flow control, limits not binding: drain items/s (median) and ratio to none", title_justify="left")
    t.add_column("store")
    for case in CASES:
        t.add_column(case, justify="right")
    for ln in lines:
        t.add_row(ln["store"], *[f"{ln['per_s'][c]:,} ({ln['ratio'][c]}×)" for c in CASES])
    console.print(t)
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
