"""`conveyor demo --compare`: the same stream of orders, processed twice.

1. one at a time by one loop (the synchronous way): one worker process, batches of one order, one
   handler at a time, so each order is claimed, matched and committed before the next is looked at;
2. asynchronously: several worker processes, each claiming batches and matching a whole batch to
   the free drivers in one transaction.

Both runs get the same world and the same orders (one seed), inserted at the same rate for the same
time. Each is measured when its stream has ended and a second has passed: orders assigned per second,
the lag from insert to assignment, and the orders still waiting. The trips' ends are a queue of
their own in both runs alike: they are the city's clock, not what is compared.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from .handlers import batch_cap
from .run import Monitor, fresh_folder, progress_bars, quiet_workers
from .session import Config, Session
from .verify import Measures, connect, measure, overlaps
from .world import DONE, ORDERS, order_stream, run

RATE = 600.0  # orders per second in the stream
SECONDS = 8.0  # how long the stream lasts
SETTLE = 1.0  # seconds after the last insert at which a run is measured


def configurations(workers: int, drivers: int) -> list[Config]:
    return [
        Config("one at a time", processes=1, batch_size=1, concurrency=1),
        Config("asynchronous", processes=workers, batch_size=batch_cap(32, drivers), concurrency=1),
    ]


def run_compare(url: str | None = None, *, orders: int | None = None, drivers: int | None = None, workers: int = 2,
                rate: float = RATE, seed: int | None = None, console: Console | None = None) -> bool:
    """Run the stream once per configuration and print them side by side; True if both runs ended
    cleanly and neither booked a driver twice."""
    console = console or Console()
    seed = random.randrange(1 << 30) if seed is None else seed
    count = orders or int(rate * SECONDS)
    drivers = drivers or 200
    stream = order_stream(count, seed)
    folder = "" if url else fresh_folder()  # without --db: a fresh SQLite file per configuration
    console.print(f"[bold]conveyor demo --compare[/] · the same {count:,} orders, {rate:,.0f} a second for "
                  f"{count / rate:.1f} s · {drivers:,} drivers · seed {seed}\n"
                  f"database: {url or os.path.join(folder, 'compare-<n>.db')}", highlight=False, soft_wrap=True)
    results: list[tuple[Config, Measures | None, list[str]]] = []
    for n, config in enumerate(configurations(workers, drivers)):
        where = url or f"sqlite:///{os.path.join(folder, f'compare-{n + 1}.db')}"
        session = Session(where, config, drivers=drivers, orders=stream, rate=rate, seed=seed)
        try:
            results.append((config, *_run_one(console, session, count)))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            return False
    console.print(_table(results, count, drivers))
    ok = True
    for config, _, problems in results:
        for p in problems:
            ok = False
            console.print(f"[red]✗[/] {config.name}: {p}", highlight=False)
    if ok:
        console.print("[green]✓[/] both runs: every assigned order has one driver, and no driver's trips overlap "
                      "[dim](read back from the database)[/]", highlight=False)
    return ok


def _run_one(console: Console, session: Session, count: int) -> tuple[Measures | None, list[str]]:
    """One configuration's run: measured SETTLE seconds after its last insert, then stopped."""
    session.prepare()
    conn = connect(session.url)
    problems = []
    m = None
    try:
        with quiet_workers():
            session.start()
            interrupted = True
            try:
                _watch(console, Monitor(conn, session.drivers), session, count)
                interrupted = False
            finally:
                m = measure(conn, now=time.time())
                exitcode = session.stop(interrupted=interrupted)
        session.forget_trips()
        feeder = session.feeder
        if feeder is not None and feeder.error is not None:
            problems.append(f"the order generator failed: {type(feeder.error).__name__}: {feeder.error}")
        if exitcode != 0:
            problems.append(f"the worker side exited with code {exitcode}")
        trips = run(conn, f"SELECT id, driver_id, assigned_at, delivered_at FROM {ORDERS} "
                          "WHERE driver_id IS NOT NULL").fetchall()
        found = overlaps(trips)
        if found:
            problems.append(f"{len(found)} overlapping trip(s), e.g. {found[0]}")
        alone = run(conn, f"SELECT count(*) FROM {ORDERS} WHERE status = ? AND driver_id IS NULL", (DONE,)).fetchone()[0]
        if alone:
            problems.append(f"{alone} order(s) assigned without a driver")
    finally:
        conn.close()
        session.app.close()
    return m, problems


def _watch(console: Console, monitor: Monitor, session: Session, count: int) -> None:
    """Progress until SETTLE seconds after the last insert (or the worker side stopped)."""
    title = f"{session.config.name} · {_shape(session.config)}"

    def over() -> bool:
        feeder = session.feeder
        if feeder is None or feeder.error is not None or not session.side.is_alive():
            return True
        return feeder.finished_at is not None and time.time() >= feeder.finished_at + SETTLE

    if not console.is_terminal:
        console.print(title, highlight=False)
        last = 0.0
        while not over():
            if time.monotonic() - last >= 2.0:
                last = time.monotonic()
                s = monitor.snapshot(session.inserted)
                console.print(f"  inserted {s['inserted']:,} · assigned {s['assigned']:,} · {s['line']}",
                              highlight=False, soft_wrap=True)
            time.sleep(0.05)
        return
    console.print(f"[bold]{title}[/]", highlight=False)
    with progress_bars(console) as progress:
        sub = progress.add_task("inserted", total=count)
        done = progress.add_task("assigned", total=count)
        while True:
            last = over()
            s = monitor.snapshot(session.inserted)
            progress.update(sub, completed=s["inserted"])
            progress.update(done, completed=s["assigned"])
            progress.status = s["line"]
            if last:
                return
            time.sleep(0.1)


def _shape(config: Config) -> str:
    return (f"{config.processes} process{'es' if config.processes > 1 else ''}, batches of "
            f"{config.batch_size}, {config.concurrency} handler{'s' if config.concurrency > 1 else ''} each")


def _table(results: list[tuple[Config, Measures | None, list[str]]], count: int, drivers: int) -> Table:
    table = Table(title=f"the same {count:,} orders, {drivers:,} drivers", title_justify="left")
    table.add_column("")
    for config, _, _ in results:
        table.add_column(config.name, justify="right")
    rows: list[tuple[str, Any]] = [
        ("worker processes × batch × handlers", lambda c, m: f"{c.processes} × {c.batch_size} × {c.concurrency}"),
        ("assigned per second", lambda c, m: f"{m.per_second:,.0f}"),
        ("lag p50 (insert → assigned)", lambda c, m: f"{m.lag_p50} ms"),
        ("lag p95", lambda c, m: f"{m.lag_p95} ms"),
        ("lag max", lambda c, m: f"{m.lag_max} ms"),
        ("still waiting at the end", lambda c, m: f"{m.waiting:,}"),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(c, m) if m is not None else "-" for c, m, _ in results))
    table.caption = "≥: at least (orders still waiting when measured)"
    return table
