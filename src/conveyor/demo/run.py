"""`conveyor demo`: orders pour into the application's own table while worker processes match them,
a batch at a time, to free drivers; then the outcome is checked from the database.

See session.py for the processes, handlers.py for the matching and why the bookings hold under
concurrency, verify.py for the checks made afterwards, compare.py for `--compare`.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .handlers import batch_cap
from .session import Config, Session
from .verify import connect, measure, verify
from .world import CITY, DONE, ORDERS, PENDING, RESTAURANTS, WORKING, order_stream, run

ORDERS_PER_SECOND = 250.0  # arrival rate of new orders


def fresh_folder() -> str:
    """A new temporary folder for the demo's SQLite files (kept afterwards, to look at)."""
    return tempfile.mkdtemp(prefix="conveyor-demo-")


@contextmanager
def quiet_workers() -> Iterator[None]:
    """Worker start/stop chatter would tear the live display: warnings only, unless debugging."""
    logger = logging.getLogger("conveyor")
    old = logger.level
    if logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


class StatusLine(Progress):
    """Progress bars and a status line under them."""

    status = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield Text(self.status, style="dim")


def progress_bars(console: Console) -> StatusLine:
    columns = (TextColumn("{task.description:>9}"), BarColumn(bar_width=40), MofNCompleteColumn(), TimeElapsedColumn())
    return StatusLine(*columns, console=console, refresh_per_second=8)


class Monitor:
    """Reads progress from the database on its own connection."""

    def __init__(self, conn: Any, drivers: int):
        self.conn, self.drivers = conn, drivers

    def snapshot(self, inserted: int) -> dict[str, Any]:
        """What the database says now; `inserted` is read before it, so an order inserted after it
        was read is not counted as inserted either."""
        c = self.conn
        counts = dict(run(c, f"SELECT status, count(*) FROM {ORDERS} WHERE id > 0 GROUP BY status").fetchall())
        waiting = counts.get(PENDING, 0) + counts.get(WORKING, 0)
        busy, open_trips = run(c, "SELECT count(*), count(current_order) FROM demo_drivers WHERE NOT available").fetchone()
        recent = [r[0] for r in run(c, f"SELECT assigned_at - placed_at FROM {ORDERS} WHERE id > 0 AND assigned_at > ?",
                                    (time.time() - 1.0,))]
        lag = "-" if not recent else f"{statistics.median(recent) * 1000:,.0f} ms"
        return {"inserted": inserted, "assigned": counts.get(DONE, 0), "waiting": waiting, "open_trips": open_trips,
                "line": f"waiting {waiting:,} · drivers busy {busy}/{self.drivers} · lag p50 (last 1 s) {lag}"}


def run_demo(url: str | None = None, *, orders: int = 2000, drivers: int = 50, workers: int = 2,
             rate: float = ORDERS_PER_SECOND, seed: int | None = None, console: Console | None = None) -> bool:
    """Run the food-delivery showcase on `url` (default: a fresh SQLite file in a temporary folder).
    Returns True only if every check made on the database afterwards passes."""
    console = console or Console()
    seed = random.randrange(1 << 30) if seed is None else seed
    url = url or f"sqlite:///{os.path.join(fresh_folder(), 'demo.db')}"
    config = Config("demo", processes=workers, batch_size=32, concurrency=1)
    console.print(f"[bold]conveyor demo[/] · {orders:,} orders · {drivers:,} drivers in {CITY} · "
                  f"{workers} worker process(es), batches of up to {batch_cap(config.batch_size, drivers)} orders "
                  f"matched by least total pickup distance\ndatabase: {url}", highlight=False, soft_wrap=True)
    session = Session(url, config, drivers=drivers, orders=order_stream(orders, seed), rate=rate, seed=seed)
    busy = session.prepare()
    console.print(f"{len(RESTAURANTS)} restaurants · {drivers - busy} drivers available, {busy} out on a trip · "
                  f"orders are rows of table {ORDERS} (adopted), trips end on queue {session.deliveries}",
                  highlight=False, soft_wrap=True)
    conn = connect(url)
    interrupted = False
    with quiet_workers():
        session.start()
        try:
            _watch(console, Monitor(conn, drivers), session, orders)
        except KeyboardInterrupt:
            interrupted = True
            console.print("[yellow]interrupted: letting the workers finish what they hold[/]")
        finally:
            exitcode = session.stop(interrupted=interrupted)
    wall = time.monotonic() - session.started
    try:
        if interrupted:
            return False
        return _report(console, session, conn, orders, wall, exitcode)
    finally:
        conn.close()
        session.app.close()


def _finished(snap: dict[str, Any], orders: int) -> bool:
    """Every order inserted, none waiting or being assigned, every trip delivered: the workers may
    stop (an order that went `unassignable` stops nothing: the checks name it)."""
    return snap["inserted"] == orders and not snap["waiting"] and not snap["open_trips"]


def _watch(console: Console, monitor: Monitor, session: Session, orders: int) -> None:
    """Show progress until the run is finished or the worker side has stopped."""
    if not console.is_terminal:
        last = 0.0
        while session.side.is_alive():
            s = monitor.snapshot(session.inserted)
            if _finished(s, orders) or session.feeder and session.feeder.error:
                return
            if time.monotonic() - last >= 2.0:
                last = time.monotonic()
                console.print(f"inserted {s['inserted']:,} · assigned {s['assigned']:,} · {s['line']}",
                              highlight=False, soft_wrap=True)
            session.side.join(0.1)
        return
    with progress_bars(console) as progress:
        sub = progress.add_task("inserted", total=orders)
        done = progress.add_task("assigned", total=orders)
        while True:
            s = monitor.snapshot(session.inserted)
            progress.update(sub, completed=s["inserted"])
            progress.update(done, completed=s["assigned"])
            progress.status = s["line"]
            if _finished(s, orders) or not session.side.is_alive() or session.feeder and session.feeder.error:
                return
            session.side.join(0.1)


def _report(console: Console, session: Session, conn: Any, orders: int, wall: float, exitcode: int | None) -> bool:
    m = measure(conn)
    table = Table(title="food delivery · summary", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for name, value in (
        ("orders", f"{orders:,}"),
        ("drivers", f"{session.drivers:,}"),
        ("worker processes", str(session.config.processes)),
        ("wall time", f"{wall:.1f} s"),
        ("orders/s (first placed → last assigned)", f"{m.per_second:,.0f}"),
        ("insert → assigned lag p50", f"{m.lag_p50} ms"),
        ("insert → assigned lag p95", f"{m.lag_p95} ms"),
        ("insert → assigned lag max", f"{m.lag_max} ms"),
        ("mean pickup distance", f"{m.pickup_km:.2f} km"),
        ("retries: fewer drivers free than orders in the batch", f"{m.retries:,}"),
    ):
        table.add_row(name, value)
    console.print(table)

    ok = True
    problems = []
    feeder = session.feeder
    if feeder is not None and feeder.error is not None:
        problems.append(f"the order generator failed: {type(feeder.error).__name__}: {feeder.error}")
    if exitcode != 0:
        problems.append(f"the worker side exited with code {exitcode}")
    for p in problems:
        ok = False
        console.print(f"[red]✗[/] {p}", highlight=False)
    console.print("[bold]checks, read back from the database:[/]")
    for check in verify(session.app, conn, session.deliveries, orders):
        ok &= check.ok
        mark = "[green]✓[/]" if check.ok else "[red]✗[/]"
        console.print(f" {mark} {check.name} [dim]({check.detail})[/]", highlight=False, soft_wrap=True)
    console.print("[bold green]all checks passed[/]" if ok else "[bold red]some checks failed[/]")
    return ok
