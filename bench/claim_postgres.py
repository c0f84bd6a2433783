"""How long one claim takes on PostgreSQL with a deep backlog: N pending items spread over K keys,
claimed (batch 100) by conveyor's store, plain and ordered. Each claim is rolled back, so every
repetition sees the same backlog; the figure is the median.

Run: python -m bench.claim_postgres [--items 10000 100000] [--keys 50] [--repeat 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from conveyor.model import Claim, NewItem
from conveyor.stores.postgres import PostgresStore

from .common import PG_ADMIN_URL, QUEUE, pg_database


class _Rollback(Exception):
    pass


def time_claim(store: PostgresStore, claim: Claim, repeat: int) -> tuple[float, int]:
    times, got = [], 0
    for _ in range(repeat):
        try:
            with store.transaction():
                t0 = time.perf_counter()
                got = len(store.claim(claim, "bench"))
                times.append(time.perf_counter() - t0)
                raise _Rollback
        except _Rollback:
            pass
    return 1000 * statistics.median(times), got


def run(n: int, keys: int, repeat: int, admin_url: str = PG_ADMIN_URL) -> dict:
    with pg_database(admin_url, suffix="claim") as url:
        store = PostgresStore(url)
        try:
            store.migrate()
            store.submit_many([NewItem(queue=QUEUE, payload_json=json.dumps({"n": i}), key=f"k{i % keys}")
                               for i in range(n)])
            out = {"items": n, "keys": keys}
            for ordered in (False, True):
                ms, got = time_claim(store, Claim(QUEUE, 100, 30.0, 5, ordered=ordered), repeat)
                out["ordered_ms" if ordered else "plain_ms"] = round(ms, 2)
                out["ordered_got" if ordered else "plain_got"] = got
            return out
        finally:
            store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--keys", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    args = ap.parse_args()
    for n in args.items:
        print(json.dumps(run(n, args.keys, args.repeat, args.pg)))


if __name__ == "__main__":
    main()
