"""`conveyor demo`: orders pour in while worker processes assign each one to exactly one driver.

Processes, and why in this order (no connection and no thread may cross a fork):
1. this process builds the world in one transaction on a fresh App, then closes every connection;
2. it forks the worker side, which calls `app.run_worker(processes=workers, stop_when_empty=True)`
   (with workers > 1 that process supervises `workers` forked worker processes);
3. only then does it start the submitter thread and the progress display.

`stop_when_empty` must not stop the workers between two bursts of orders: the setup stores a *hold*
item in the deliveries queue, due in a day, so the queues are never empty while it is pending. The
submitter cancels it right after its last burst committed; from then on the workers drain every
order and every trip and stop by themselves.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..app import App
from .verify import connect, measure, verify
from .world import CITY, RESTAURANTS, Queues, register, reset_world, restaurant_places, run

ORDERS_PER_SECOND = 250.0  # arrival rate of new orders
TICK = 0.05  # seconds between bursts: ~12 orders per burst at the default rate
BUSY_SHARE = 0.3  # drivers already out on a trip when the demo starts


class Feeder(threading.Thread):
    """Submits orders at a steady rate in small bursts (one `submit_many` each), then lifts the hold."""

    def __init__(self, app: App, queues: Queues, orders: int, rate: float, hold_id: int, seed: int):
        super().__init__(name="demo-feeder", daemon=True)
        self.app, self.queues, self.orders, self.rate, self.hold_id = app, queues, orders, rate, hold_id
        self.rng = random.Random(seed + 2)
        self.places = restaurant_places()
        self.weights = [2 - n / len(RESTAURANTS) for n in range(len(RESTAURANTS))]  # some twice as busy
        self.submitted = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            start = time.monotonic()
            while self.submitted < self.orders and not self.stop.is_set():
                due = min(self.orders, int((time.monotonic() - start) * self.rate) + 1)
                if due > self.submitted:
                    batch = []
                    for order_id in range(self.submitted + 1, due + 1):
                        name = self.rng.choices(RESTAURANTS, self.weights)[0]
                        lat, lon = self.places[name]
                        batch.append({"order_id": order_id, "restaurant": name, "lat": lat, "lon": lon})
                    self.app.submit_many(self.queues.orders, batch, key=lambda p: p["restaurant"])
                    self.submitted = due
                self.stop.wait(TICK)
        except BaseException as exc:  # noqa: BLE001 (reported by the orchestrator)
            self.error = exc
        finally:
            try:
                self.app.cancel(self.hold_id)  # the queues may now run empty: workers stop when done
            finally:
                self.app.close()


def _workers_main(app: App, workers: int) -> None:
    app.run_worker(processes=workers, stop_when_empty=True)


def _purge_old_runs(app: App) -> None:
    """Drop the finished items of earlier demo runs in this database (their queues are idle)."""
    for queue, s in app.stats().items():
        if queue.startswith(("demo-orders-", "demo-deliveries-")) and not s["pending"] and not s["in_progress"]:
            app.purge(queue, 0)


def _setup(app: App, queues: Queues, drivers: int, seed: int) -> tuple[int, int]:
    """The world and the hold item, in one transaction. Returns (hold item id, busy drivers)."""
    with app.store.transaction() as conn:
        busy = reset_world(app, conn, queues, drivers, BUSY_SHARE, seed)
        hold = app.submit(queues.deliveries, {"hold": "lifted by the submitter after its last burst"},
                          run_at=dt.timedelta(days=1))
    return hold, busy


class _Progress(Progress):
    """Two bars and a status line under them."""

    status = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield Text(self.status, style="dim")


class Monitor:
    """Reads progress from the database on its own connection."""

    def __init__(self, conn: Any, drivers: int):
        self.conn, self.drivers = conn, drivers

    def snapshot(self, submitted: int) -> dict[str, Any]:
        c = self.conn
        assigned, retries = run(c, "SELECT count(*), coalesce(sum(attempts - 1), 0) FROM demo_assignments "
                                   "WHERE order_id > 0").fetchone()
        busy = run(c, "SELECT count(*) FROM demo_drivers WHERE NOT available").fetchone()[0]
        recent = [r[0] for r in run(c, "SELECT assigned_at - placed_at FROM demo_assignments "
                                        "WHERE order_id > 0 AND assigned_at > ?", (time.time() - 1.0,))]
        lag = "-" if not recent else f"{statistics.median(recent) * 1000:,.0f} ms"
        return {"assigned": assigned, "line": f"waiting {submitted - assigned:,} · drivers busy "
                f"{busy}/{self.drivers} · lag p50 (last 1 s) {lag} · retries {retries:,}"}


def run_demo(url: str | None = None, *, orders: int = 2000, drivers: int = 50, workers: int = 2,
             rate: float = ORDERS_PER_SECOND, seed: int | None = None, console: Console | None = None) -> bool:
    """Run the food-delivery showcase on `url` (default: a fresh SQLite file in a temporary folder).
    Returns True only if every check made on the database afterwards passes."""
    console = console or Console()
    seed = random.randrange(1 << 30) if seed is None else seed
    if url is None:
        folder = tempfile.mkdtemp(prefix="conveyor-demo-")
        url = f"sqlite:///{os.path.join(folder, 'demo.db')}"
    console.print(f"[bold]conveyor demo[/] · {orders:,} orders · {drivers:,} drivers in {CITY} · "
                  f"{workers} worker process(es)\ndatabase: {url}", highlight=False)

    queues = Queues.for_run(dt.datetime.now().strftime("%Y%m%dT%H%M%S%f"))
    app = App(url)
    register(app, queues, seed=seed)
    _purge_old_runs(app)
    hold_id, busy = _setup(app, queues, drivers, seed)
    app.close()  # nothing may cross the fork below
    console.print(f"{len(RESTAURANTS)} restaurants · {drivers - busy} drivers available, {busy} out on a trip · "
                  f"queues {queues.orders}, "
                  f"{queues.deliveries}", highlight=False, soft_wrap=True)

    quiet = logging.getLogger("conveyor")
    old_level = quiet.level
    if quiet.getEffectiveLevel() > logging.DEBUG:
        quiet.setLevel(logging.WARNING)  # worker start/stop chatter would tear the live display
    started = time.monotonic()
    side = multiprocessing.get_context("fork").Process(target=_workers_main, args=(app, workers),
                                                       name="conveyor-demo-workers")
    side.start()
    feeder = Feeder(App(url), queues, orders, rate, hold_id, seed)
    feeder.start()
    conn = connect(url)
    interrupted = False
    try:
        _watch(console, Monitor(conn, drivers), feeder, side, orders)
    except KeyboardInterrupt:
        interrupted = True
        feeder.stop.set()
        console.print("[yellow]interrupted: letting the workers finish what they hold[/]")
        side.join(60)
    finally:
        feeder.join(10)
        quiet.setLevel(old_level)
    wall = time.monotonic() - started

    try:
        if interrupted:
            return False
        return _report(console, app, conn, queues, orders, drivers, workers, wall, feeder, side.exitcode)
    finally:
        conn.close()
        app.close()


def _watch(console: Console, monitor: Monitor, feeder: Feeder, side: Any, orders: int) -> None:
    """Show progress until the worker side has stopped."""
    if not console.is_terminal:
        last = 0.0
        while side.is_alive():
            side.join(0.2)
            if time.monotonic() - last >= 2.0:
                last = time.monotonic()
                s = monitor.snapshot(feeder.submitted)
                console.print(f"submitted {feeder.submitted:,} · assigned {s['assigned']:,} · {s['line']}",
                              highlight=False, soft_wrap=True)
        return
    columns = (TextColumn("{task.description:>9}"), BarColumn(bar_width=40), MofNCompleteColumn(), TimeElapsedColumn())
    with _Progress(*columns, console=console, refresh_per_second=8) as progress:
        sub = progress.add_task("submitted", total=orders)
        done = progress.add_task("assigned", total=orders)
        while True:
            alive = side.is_alive()
            s = monitor.snapshot(feeder.submitted)
            progress.update(sub, completed=feeder.submitted)
            progress.update(done, completed=s["assigned"])
            progress.status = s["line"]
            if not alive:
                return
            side.join(0.2)


def _report(console: Console, app: App, conn: Any, queues: Queues, orders: int, drivers: int, workers: int,
            wall: float, feeder: Feeder, exitcode: int | None) -> bool:
    m = measure(conn)
    table = Table(title="food delivery · summary", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for name, value in (
        ("orders", f"{orders:,}"),
        ("drivers", f"{drivers:,}"),
        ("worker processes", str(workers)),
        ("wall time", f"{wall:.1f} s"),
        ("orders/s (first placed → last assigned)", f"{m.assigned / m.span:,.0f}" if m.span else "-"),
        ("submit → assignment lag p50", f"{m.lag_p50 * 1000:,.0f} ms"),
        ("submit → assignment lag p95", f"{m.lag_p95 * 1000:,.0f} ms"),
        ("submit → assignment lag max", f"{m.lag_max * 1000:,.0f} ms"),
        ("retries: no driver free", f"{m.retries:,}"),
    ):
        table.add_row(name, value)
    console.print(table)

    ok = True
    problems = []
    if feeder.error is not None:
        problems.append(f"the submitter failed: {type(feeder.error).__name__}: {feeder.error}")
    if exitcode != 0:
        problems.append(f"the worker side exited with code {exitcode}")
    for p in problems:
        ok = False
        console.print(f"[red]✗[/] {p}", highlight=False)
    console.print("[bold]checks, read back from the database:[/]")
    for check in verify(app, conn, queues, orders):
        ok &= check.ok
        mark = "[green]✓[/]" if check.ok else "[red]✗[/]"
        console.print(f" {mark} {check.name} [dim]({check.detail})[/]", highlight=False, soft_wrap=True)
    console.print("[bold green]all checks passed[/]" if ok else "[bold red]some checks failed[/]")
    return ok
