"""Drain throughput through the public API only: submit N items, then time workers draining them.

Because it uses nothing but `conveyor.App`, `@app.processor`, `submit_many` and `run_worker`, the
same file times any checkout of conveyor: put that checkout's `src` first on PYTHONPATH to compare
two versions of the engine in one run, turn by turn (A B A B ...), e.g.

    PYTHONPATH=/path/to/old/src python bench/drain.py --store sqlite
    PYTHONPATH=src              python bench/drain.py --store sqlite

It prints one JSON line: the store, the items, the processes, the drain's seconds and items/s (the
submit is not timed), and the conveyor module it ran (so a mixed-up PYTHONPATH shows).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid

import conveyor

PG_ADMIN_URL = os.environ.get("CONVEYOR_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def noop(item: conveyor.Item) -> None:
    pass


def fresh_database(store: str, folder: str) -> tuple[str, object]:
    """A new empty database URL, and what to call to drop it afterwards."""
    if store == "sqlite":
        return f"sqlite:///{folder}/drain.db", lambda: None
    import psycopg

    name = f"conveyor_drain_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{PG_ADMIN_URL.rpartition('/')[0]}/{name}", drop


def main() -> None:
    ap = argparse.ArgumentParser(prog="python bench/drain.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url, drop = fresh_database(args.store, folder)
        try:
            app = conveyor.App(url)
            app.processor("drain", batch_size=args.batch_size, concurrency=args.concurrency)(noop)
            app.submit_many("drain", ({"n": i} for i in range(args.items)))
            start = time.perf_counter()
            app.run_worker(["drain"], processes=args.processes, stop_when_empty=True, install_signal_handlers=False)
            seconds = time.perf_counter() - start
            left = app.stats(["drain"])["drain"]
            app.close()
        finally:
            drop()  # type: ignore[operator]
    if left["resolved"] != args.items:
        raise SystemExit(f"drain incomplete: {left}")
    print(json.dumps({"store": args.store, "items": args.items, "processes": args.processes,
                      "seconds": round(seconds, 3), "items_per_s": round(args.items / seconds),
                      "conveyor": os.path.dirname(conveyor.__file__)}))


if __name__ == "__main__":
    main()
