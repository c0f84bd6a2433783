"""A hand-driven worker cycle on PostgreSQL, without the worker around it: P processes each loop
"settle what I hold (resolve), claim the next batch" until a claim comes back empty, three ways:

  methods   store.transaction() + store.resolve() + store.claim(): today's Worker._cycle
  combined  store.settle_and_claim(): one statement per cycle (the proposed Worker._cycle)
  raw       bench.raw_postgres.loop, --cycle statement: the bare driver running combined's statement
  raw-tx    bench.raw_postgres.loop, --cycle transaction: the bare driver running methods' statements

Each variant gets a fresh database with the same N items; items/s is the median of --repeat.

Run: python -m bench.cycle_postgres [--items 20000] [--processes 2] [--batch-size 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from conveyor.model import Claim, NewItem, Outcomes
from conveyor.stores.postgres import PostgresStore

from . import raw_postgres
from .common import PG_ADMIN_URL, QUEUE, payloads, pg_database, run_forked


def _loop(url: str, variant: str, batch: int, out: Any) -> None:
    store = PostgresStore(url)
    claim = Claim(QUEUE, batch, 30.0, 5)
    held: list[tuple[int, int]] = []
    done = 0
    while True:
        if variant == "combined":
            lost, (items,) = store.settle_and_claim(Outcomes(resolved=held), [claim], "bench")
        else:
            with store.transaction():
                lost = store.resolve(held) if held else []
                items = store.claim(claim, "bench")
        done += len(held) - len(lost)
        if not items:
            break
        held = [(i.id, i.claim_token) for i in items]
    store.close()
    out.put(done)


def drain(url: str, variant: str, processes: int, batch: int) -> tuple[float, float]:
    if variant.startswith("raw"):
        return raw_postgres.drain(url, processes, batch, "transaction" if variant == "raw-tx" else "statement")
    return run_forked(_loop, (url, variant, batch), processes, f"{variant} loop")


def run_once(variant: str, n: int, processes: int, batch: int, admin_url: str) -> tuple[float, float]:
    with pg_database(admin_url, suffix="cycle") as url:
        if variant.startswith("raw"):
            raw_postgres.create(url, n)
        else:
            store = PostgresStore(url)
            store.submit_many([NewItem(queue=QUEUE, payload_json=json.dumps(p, separators=(",", ":")))
                               for p in payloads(n)])
            store.close()
        seconds, cpu = drain(url, variant, processes, batch)
        got = raw_postgres.counts(url)
    if got != {"resolved": n}:
        raise RuntimeError(f"{variant}: the table holds {got}, expected {n} resolved")
    return n / seconds, 1e6 * cpu / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["methods", "combined", "raw", "raw-tx"])
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    args = ap.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {v: [] for v in args.variants}
    for _ in range(args.repeat):  # interleaved, so drift in the machine hits every variant
        for v in args.variants:
            runs[v].append(run_once(v, args.items, args.processes, args.batch_size, args.pg))
    for v, r in runs.items():
        print(json.dumps({"variant": v, "items": args.items, "processes": args.processes, "batch": args.batch_size,
                          "per_s": round(statistics.median(x[0] for x in r)),
                          "cpu_us_per_item": round(statistics.median(x[1] for x in r), 1),
                          "runs": [round(x[0]) for x in r]}))


if __name__ == "__main__":
    main()
