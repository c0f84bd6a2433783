"""The scheduler: a worker's thread that keeps the App's periodic schedules (conveyor.periodic).

Each pass reads the database's clock and the schedules' stored state in one go, asks `plan` which
ticks are due, and submits them through the store's compare-and-set (one transaction per
schedule that moved: its state and its items together), so every worker of every machine may run
this at once and each tick is still one item. Then it sleeps until the next tick comes by the
database's clock (measured at the read, so a machine whose own clock is off sleeps the right
time), and at most MAX_WAIT. Its connection is its own, as the keeper's is.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

from ..errors import StoreError
from ..periodic import Periodic, Plan, plan, tick_text
from ..stores.base import ScheduleStore
from .keeper import _Service
from .logs import WorkerLog

MAX_WAIT = 30.0  # seconds between two reads of the schedules at most
MIN_WAIT = 0.005
LATE = 0.002  # seconds added to a wait, so a pass that wakes for a tick finds it due


class Scheduler(_Service):
    """Submits each due tick of `periodics` once across every worker."""

    name = "conveyor-scheduler"

    def __init__(self, store: ScheduleStore, periodics: Sequence[Periodic], wakeup: threading.Event,
                 on_failure: Callable[[], None], log: WorkerLog):
        super().__init__(on_failure, log)
        self.store = store
        self.periodics = list(periodics)
        #: set after a submit (idle workers here may claim the item at once)
        self.wakeup = wakeup
        #: ticks this worker submitted (the others' are not counted here)
        self.submitted = 0

    def _run(self) -> None:
        for p in self.periodics:
            self.log.info("keeping periodic %r of queue %r: %s, catch_up=%s, grace %gs", p.name, p.queue, p.describe(),
                          p.catch_up, p.grace_ms / 1000, queue=p.queue)
        trouble = 0
        while not self._stop.is_set():
            try:
                wait = self.keep()
                trouble = 0
            except StoreError as exc:  # the scheduler outlives a database hiccup
                trouble += 1
                wait = min(5.0, 0.05 * 2 ** min(trouble, 7))
                self.log.warning("periodic schedules: database error (attempt %d), retrying in %.2fs: %s", trouble, wait,
                                 exc)
            self._stop.wait(wait)

    def _finish(self) -> None:
        self.store.disconnect()

    def keep(self) -> float:
        """One pass over the schedules; returns the seconds until the next tick is due."""
        clock, states = self.store.schedules()
        now = math.floor(clock * 1000)
        stored = {(s.queue, s.name): s for s in states}
        wait = MAX_WAIT
        for p in self.periodics:
            state = stored.get((p.queue, p.name))
            last = None if state is None else round(state.last_tick * 1000)
            todo = plan(p, last, now)
            if todo.last is not None:
                ids = self.store.advance_schedule(p.queue, p.name, None if state is None else state.version,
                                                  todo.last / 1000, p.after(todo.last) / 1000, p.describe(),
                                                  [p.item(tick) for tick in todo.ticks])
                if ids is not None:
                    self._report(p, todo, ids)
                if todo.last < p.latest(now):  # more ticks than one pass submits: go on at once
                    wait = 0.0
            wait = min(wait, (p.after(now) - now) / 1000 + LATE)
        return max(MIN_WAIT, wait)

    def _report(self, p: Periodic, todo: Plan, ids: list[int | None]) -> None:
        stored = [i for i in ids if i is not None]
        self.submitted += len(stored)
        if stored:
            self.wakeup.set()
        if todo.missed is not None:
            first, last = todo.missed
            missed = tick_text(first) if first == last else f"{tick_text(first)} to {tick_text(last)}"
            if todo.ticks:
                self.log.info("periodic %r of queue %r: tick(s) %s missed while no worker kept it; caught up with one "
                              "item for %s (catch_up=latest)", p.name, p.queue, missed, tick_text(todo.ticks[-1]),
                              queue=p.queue, items=stored)
            else:
                self.log.info("periodic %r of queue %r: tick(s) %s missed while no worker kept it; skipped (catch_up=none)",
                              p.name, p.queue, missed, queue=p.queue)
        elif stored:
            self.log.debug("periodic %r of queue %r: submitted tick(s) %s", p.name, p.queue,
                           ", ".join(tick_text(t) for t in todo.ticks), queue=p.queue, items=stored)
