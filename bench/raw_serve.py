"""Raw-SQL reference *workers* for the workloads where items arrive over time (latency, steady): the
store's own claim and batched resolve statements (imported through bench.raw_sqlite /
bench.raw_postgres, which take them from conveyor.stores.*) in a bare loop, no conveyor layers.

Each process loops one transaction that resolves what it claimed last time and claims the next
batch; when the claim comes back empty (and nothing is held) it waits for new items:
  - SQLite: polls the claim statement every millisecond (a bare poll loop; no data_version trick);
  - PostgreSQL: LISTEN on conveyor's channel (the App's submit NOTIFYs it at commit), then claims.
Items are submitted by the App (app.submit / submit_many) into a database migrated by the App, so
the submitter is the very same in the conveyor run and in the raw run.

`on_rows(rows)` is called with the claimed rows before they are resolved (the latency workload
records its "handler start" there).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from . import raw_postgres, raw_sqlite
from .common import QUEUE

PAYLOAD, TOKEN = 2, 15  # ITEM_COLUMNS: payload is the 3rd column, claim_token the last
POLL = 0.001


def payload_of(row: Any) -> Any:
    p = row[PAYLOAD]
    return json.loads(p) if isinstance(p, (str, bytes)) else p


def serve_sqlite(path: str, batch_size: int, stop: Any, on_rows: Callable | None = None) -> int:
    conn = raw_sqlite.connect(path)
    owner = f"raw:{os.getpid()}"
    held: list[int] = []
    token = 0
    resolved = 0
    while True:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        if held:
            resolved += len(conn.execute(raw_sqlite.RESOLVE_SQL, (json.dumps(held), now, token)).fetchall())
        token = secrets.randbits(63)
        rows = conn.execute(raw_sqlite.CLAIM_SQL, (owner, now, raw_sqlite.LEASE_SECONDS, token,
                                                   raw_sqlite.MAX_ATTEMPTS, QUEUE, batch_size)).fetchall()
        conn.execute("COMMIT")
        if rows:
            if on_rows:
                on_rows(rows)
            held = [r[0] for r in rows]
            continue
        held = []
        if stop.is_set():
            break
        time.sleep(POLL)
    conn.close()
    return resolved


def serve_postgres(url: str, batch_size: int, stop: Any, on_rows: Callable | None = None) -> int:
    import psycopg

    owner = f"raw:{os.getpid()}"
    ids: list[int] = []
    toks: list[int] = []
    resolved = 0
    with psycopg.connect(url) as conn, psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN conveyor_items")
        while True:
            with conn.transaction():
                if ids:
                    none = [None] * len(ids)
                    resolved += len(conn.execute(raw_postgres.RESOLVE_SQL,
                                                 {"ids": ids, "toks": toks, "b2": none, "b3": none}).fetchall())
                rows = conn.execute(raw_postgres.CLAIM_SQL, {
                    "owner": owner, "lease": raw_postgres.LEASE_SECONDS, "token": secrets.randbits(63),
                    "max_attempts": raw_postgres.MAX_ATTEMPTS, "queue": QUEUE, "limit": batch_size}).fetchall()
            if rows:
                if on_rows:
                    on_rows(rows)
                ids = [r[0] for r in rows]
                toks = [r[TOKEN] for r in rows]
                continue
            ids, toks = [], []
            if stop.is_set():
                break
            # wait for a NOTIFY (or re-check the stop flag every 50 ms); drain the burst
            for _ in listener.notifies(timeout=0.05, stop_after=1):
                pass
            for _ in listener.notifies(timeout=0):
                pass
    return resolved


def start(store: str, url: str, processes: int, batch_size: int, on_rows_factory: Callable[[], Callable] | None = None):
    """Fork `processes` raw workers; returns (processes, stop event). Set the event to stop them
    (each finishes what it holds, then exits)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    path = url.removeprefix("sqlite:///")

    def main() -> None:
        on_rows = on_rows_factory() if on_rows_factory else None
        if store == "sqlite":
            serve_sqlite(path, batch_size, stop, on_rows)
        else:
            serve_postgres(url, batch_size, stop, on_rows)

    procs = [ctx.Process(target=main) for _ in range(processes)]
    for p in procs:
        p.start()
    return procs, stop


def stop_all(procs: list, stop: Any, timeout: float = 30.0) -> None:
    stop.set()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(5)
