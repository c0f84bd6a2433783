"""One run of the world on a database, as `conveyor demo` and `conveyor demo --compare` make it.

Processes, and why in this order (no connection and no thread may cross a fork):
1. `prepare` builds the world in one transaction on a fresh App, adopts the orders table (conveyor's
   columns, indexes and wake-up beside the application's own), then closes every connection;
2. `start` forks the worker side, which calls `app.run_worker(processes=N)` (with N > 1 that process
   supervises N forked worker processes), and only then starts the order generator's thread;
3. `stop` sends the worker side SIGTERM: workers finish what they run, give back what they had
   claimed but not started, and exit. The caller decides when: once every order is assigned and
   every trip delivered (the demo), or at a fixed moment (the comparison).

The order generator inserts rows into the orders table with status `needs_assignment`, in small
bursts at a steady rate, and does nothing else: no submit. The row is the submission.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..app import App
from .handlers import register
from .world import INSERT_ORDER, Order, reset_world, run_many

TICK = 0.05  # seconds between bursts of new orders


@dataclass(frozen=True)
class Config:
    """How the workers run: worker processes, and in each the batch size and handlers at once."""

    name: str
    processes: int
    batch_size: int
    concurrency: int


class Feeder(threading.Thread):
    """Inserts the orders of the stream at `rate` per second, a burst every TICK, through the
    store's connection (on SQLite it then queues for the write lock like the workers do)."""

    def __init__(self, app: App, orders: list[Order], rate: float):
        super().__init__(name="demo-orders", daemon=True)
        self.app, self.orders, self.rate = app, orders, rate
        self.inserted = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.finished_at: float | None = None  # time.time() of the last insert's commit

    def run(self) -> None:
        try:
            start = time.monotonic()
            while self.inserted < len(self.orders) and not self.stop.is_set():
                due = min(len(self.orders), int((time.monotonic() - start) * self.rate) + 1)
                if due > self.inserted:
                    now = time.time()
                    rows = [(o.id, o.restaurant, o.lat, o.lon, o.drop_lat, o.drop_lon, now)
                            for o in self.orders[self.inserted:due]]
                    with self.app.store.transaction() as conn:
                        run_many(conn, INSERT_ORDER, rows)
                    self.inserted = due
                self.stop.wait(TICK)
            self.finished_at = time.time()
        except BaseException as exc:  # noqa: BLE001 (reported by the caller)
            self.error = exc
        finally:
            self.app.close()


def _workers_main(app: App, processes: int) -> None:
    app.run_worker(processes=processes)


class Session:
    """The world on `url` with `drivers` drivers, its workers run as `config` says, fed `orders`."""

    def __init__(self, url: str, config: Config, *, drivers: int, orders: list[Order], rate: float, seed: int):
        self.url, self.config, self.drivers, self.orders, self.rate, self.seed = url, config, drivers, orders, rate, seed
        self.deliveries = "demo-deliveries-" + dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
        self.app = App(url)
        register(self.app, self.deliveries, drivers=drivers, batch_size=config.batch_size,
                 concurrency=config.concurrency)
        self.side: Any = None
        self.feeder: Feeder | None = None
        self.started = 0.0

    def prepare(self) -> int:
        """Build the world and adopt the orders table; returns how many drivers start out busy."""
        app = self.app
        try:
            for queue, s in app.stats().items():  # earlier runs' finished deliveries
                if queue.startswith("demo-deliveries-") and not s["pending"] and not s["in_progress"]:
                    app.purge(queue, 0)
            with app.store.transaction() as conn:
                busy = reset_world(app, conn, self.deliveries, self.drivers, self.seed)
            app.adopt(apply=True)
        finally:
            app.close()  # nothing may cross the fork in start()
        return busy

    def start(self) -> None:
        self.started = time.monotonic()
        self.side = multiprocessing.get_context("fork").Process(
            target=_workers_main, args=(self.app, self.config.processes), name="conveyor-demo-workers")
        self.side.start()
        self.feeder = Feeder(App(self.url), self.orders, self.rate)
        self.feeder.start()

    @property
    def inserted(self) -> int:
        return self.feeder.inserted if self.feeder else 0

    def stop(self, timeout: float = 60, interrupted: bool = False) -> int | None:
        """Stop the generator and the workers; returns the worker side's exit code. After Ctrl-C
        (`interrupted`) the workers had the SIGINT too (one process group): they are waited for."""
        if self.feeder is not None:
            self.feeder.stop.set()
            self.feeder.join(timeout)
        side = self.side
        if side is None:
            return None
        if interrupted:
            side.join(timeout)
        if side.is_alive():
            side.terminate()  # SIGTERM: finish what runs, give back what was claimed, exit
            side.join(timeout)
        if side.is_alive():
            side.kill()
            side.join(timeout)
        # a SIGTERM that came before the workers set up their handlers ended them by it: then
        # nothing was running yet
        return 0 if side.exitcode == -signal.SIGTERM else side.exitcode

    def forget_trips(self) -> None:
        """Drop this run's deliveries still queued (a run stopped before its trips ended)."""
        app = self.app
        try:
            while pending := app.items(self.deliveries, state="pending", limit=500):
                for item in pending:
                    app.cancel(item.id)
            app.purge(self.deliveries, 0)
        finally:
            app.close()
