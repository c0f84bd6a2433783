"""The worker: claim → dispatch → gather outcomes → settle, looping, with leases kept alive.

One worker process runs:
- the *cycle* (the thread that calls `run`): settles the outcomes gathered since the last cycle
  and claims the next batches in one store transaction, then hands items to the lanes;
- one *lane* per processor (lanes.py): `concurrency` threads for sync handlers, or `concurrency`
  tasks on a shared event-loop thread for `async def` handlers, running them through the runner
  (runner.py), which records what each run came to in the outcome buffer (outcomes.py);
- a *keeper* thread (keeper.py): heartbeats and rescue, on its own connection, and a *watchdog*
  thread for timeout_seconds;
- with periodic schedules, a *scheduler* thread (scheduler.py) that submits their ticks.
The worker receives what it uses (a store, the processors, a wake-up event), speaks to the Store
protocol only and never sees SQL. It retries a StoreError (the database hiccuped: nothing is lost,
the cycle is redone); anything else is a bug and stops the process, so a supervisor restarts it
and the log says why once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import StoreError, UsageError
from ..model import Item, Outcomes, Processor, error_headline
from ..periodic import Periodic
from ..stores.base import ScheduleStore, WorkerStore
from .keeper import Keeper, Watchdog
from .lanes import IDLE_MAX, Lane
from .logs import WorkerLog
from .outcomes import OutcomeBuffer, RunState, some
from .runner import Runner, report_refused
from .scheduler import Scheduler

FLUSH_INTERVAL = 0.002  # seconds an outcome may wait for others to share its settle statement
FLUSH_MAX = 1000  # outcomes settled in one statement at most


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs the processors of an App on the chosen queues until stopped."""

    def __init__(
        self,
        store: WorkerStore,
        processors: Sequence[Processor],
        wakeup: threading.Event | None = None,
        *,
        stop_when_empty: bool = False,
        shutdown_timeout: float = 30.0,
        name: str | None = None,
        prune_after: float | None = None,
        heartbeat_interval: float | None = None,
        rescue_interval: float | None = None,
        periodics: Sequence[Periodic] = (),
        schedule_store: ScheduleStore | None = None,
    ):
        if not processors:
            raise UsageError("no processors to run: decorate a handler with @app.processor('queue')")
        if prune_after is not None and (not isinstance(prune_after, (int, float)) or prune_after < 0):
            raise UsageError(f"prune_after must be a number of seconds >= 0, not {prune_after!r}")
        self.store = store
        #: set by a submit in this process (the App's), so idle workers here start at once
        self.wakeup = wakeup if wakeup is not None else threading.Event()
        self.queues = list(dict.fromkeys(p.queue for p in processors))
        self.name = name or worker_name()
        self.stop_when_empty = stop_when_empty
        self.shutdown_timeout = shutdown_timeout
        #: delete this worker's queues' resolved, dead and cancelled items once they are this old
        self.prune_after = prune_after
        #: every line this worker logs names it (and the queue and items it is about): see logs.py
        self.log = WorkerLog(self.name)
        self.state = RunState(log=self.log)
        self.wake = threading.Event()
        self.outcomes = OutcomeBuffer(self.wake, self.log)
        self.runner = Runner(store, self.outcomes, self.wake, self.state)
        self.lanes = {p.queue: Lane(p, self.runner, self.outcomes, self.state) for p in processors}
        self._solo: tuple[Lane, Item] | None = None  # a suspect running alone
        #: the dying items of a cycle whose settle failed (its outcomes go back; the lanes forgot them)
        self._unsettled_dying: dict[int, tuple[Lane, Item, str]] = {}
        self._unsettled_stale: set[tuple[int, int]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        min_lease = min(lane.opts.lease_seconds for lane in self.lanes.values())
        timeouts = [lane.opts.timeout_seconds for lane in self.lanes.values() if lane.opts.timeout_seconds]
        lanes = list(self.lanes.values())
        self.keeper = Keeper(
            store, lanes, self.outcomes, self.wakeup, self._service_failed,
            heartbeat_interval=heartbeat_interval or max(0.05, min_lease / 3),
            rescue_interval=rescue_interval or max(0.25, min(5.0, min_lease / 2)),
            prune_after=prune_after, prune_interval=max(10.0, min(600.0, (prune_after or 0) / 10)))
        # its own thread, touching no database: the keeper can sit blocked in a heartbeat for as
        # long as the database stalls (SQLite's write lock held, by a hung transactional handler
        # say), and a timeout checked there would fire only after the hung run had finished
        self.watchdog = Watchdog(lanes, self.outcomes, self.state, self._service_failed,
                                 interval=max(0.02, min([1.0] + [t / 5 for t in timeouts]))) if timeouts else None
        self.scheduler = self._scheduler(periodics, schedule_store)

    @property
    def counts(self) -> dict[str, int]:
        return self.outcomes.counts

    @property
    def stopping(self) -> bool:
        return self.state.stopping

    def _service_failed(self) -> None:
        self.wake.set()  # the loop sees the failure and raises it

    def _scheduler(self, periodics: Sequence[Periodic], store: ScheduleStore | None) -> Scheduler | None:
        """The thread that keeps `periodics` (on `store`, by default the worker's own), if any."""
        if not periodics:
            return None
        if store is None:
            if not isinstance(self.store, ScheduleStore):
                raise UsageError("periodic schedules need a store that keeps them: pass schedule_store=")
            store = self.store
        return Scheduler(store, periodics, self.wakeup, self._service_failed, self.log)

    def _check_services(self) -> None:
        for service in (self.keeper, self.watchdog, self.scheduler):
            if service is not None and service.failure is not None:
                raise RuntimeError(f"{service.name} failed") from service.failure

    # -- the cycle ------------------------------------------------------------------------------
    def _wants(self) -> list[tuple[Lane, int]]:
        if self.state.stopping or self._alone() or self._suspect_held():
            return []  # nothing new while a suspect waits to run alone, or runs
        now = time.monotonic()
        return [(lane, n) for lane in self.lanes.values() if lane.ready(now) and (n := lane.wanted())]

    def _cycle(self, out: Outcomes) -> list[tuple[Lane, int, list[Item]]]:
        """Settle outcomes, then claim what the freed capacity allows, atomically (one statement
        on PostgreSQL, one transaction on SQLite). If it fails, _step puts the outcomes back."""
        dying: dict[int, tuple[Lane, Item, str]] = {}
        stale: set[tuple[int, int]] = set()
        entries = [e for part in (out.resolved, out.retried, out.failed, out.released, out.backedoff) for e in part]
        if out:
            dying = self._dying(out)
            stale = self._stale(entries)
            for lane in self.lanes.values():
                if lane.inflight:
                    lane.settled(entries)
        wants = self._wants()
        claims = [lane.claim_of(n) for lane, n in wants]
        self._unsettled_dying, self._unsettled_stale = dying, stale
        lost, batches = self.store.settle_and_claim(out, claims, self.name)
        self._unsettled_dying, self._unsettled_stale = {}, set()
        # the store names refused items by id; where one cycle settles two runs of an item (rescued,
        # then claimed again here while its old run finished), the old run's is the refused one
        lost_set = set(lost)
        refused = {(e[0], e[1]) for e in entries if e[0] in lost_set} | stale

        def kept(part: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
            return [e for e in part if (e[0], e[1]) not in refused]

        def last_run(e: Sequence[Any]) -> bool:
            return e[0] in dying and dying[e[0]][1].claim_token == e[1]

        dead = [entry for i, entry in dying.items() if (i, entry[1].claim_token) not in refused]
        self.outcomes.count("resolved", len(kept(out.resolved)))
        self.outcomes.count("released", len(kept(out.released)))
        self.outcomes.count("backedoff", len(kept(out.backedoff)))
        self.outcomes.count("retried", sum(1 for e in kept(out.retried) if not last_run(e)))
        self.outcomes.count("dead", len(dead) + sum(1 for e in kept(out.failed) if not last_run(e)))
        for lane, item, error in dead:
            self.log.warning("item %s of %r is dead after attempt %s/%s: %s", item.id, lane.opts.queue, item.attempts,
                             item.max_attempts or lane.opts.max_attempts, error_headline(error),
                             queue=lane.opts.queue, items=[item.id])
        if refused:
            self.outcomes.count("lost", len(refused))
            report_refused(self.store, list(dict.fromkeys(i for i, _ in sorted(refused))), "its result was dropped",
                           self.log)
        return [(lane, n, items) for (lane, n), items in zip(wants, batches)]

    def _stale(self, entries: Sequence[Sequence[Any]]) -> set[tuple[int, int]]:
        """Outcomes of an old run of an item this worker has claimed again since (it was rescued
        meanwhile), as (id, token): the store refuses them, but would name them only by id."""
        stale = set()
        for lane in self.lanes.values():
            with lane.lock:
                for e in entries:
                    item = lane.inflight.get(e[0])
                    if item is not None and item.claim_token != e[1]:
                        stale.add((e[0], e[1]))
        # a failed cycle's outcomes, back again: the lanes forgot the newer claims they settled
        return stale | {(e[0], e[1]) for e in entries if (e[0], e[1]) in self._unsettled_stale}

    def _dying(self, out: Outcomes) -> dict[int, tuple[Lane, Item, str]]:
        """The outcomes that send their item to dead (a Fail, or a retry of its last attempt, by
        the store's own rule), by id, with the item and the error; read before settling forgets them."""
        if not out.failed and not out.retried:
            return {}
        failed = {e[0] for e in out.failed}
        final = [(i, t, error) for i, t, error in out.failed] + [(i, t, error) for i, t, _, error in out.retried]
        dying = {}
        for lane in self.lanes.values():
            with lane.lock:
                for i, t, error in final:
                    item = lane.inflight.get(i)
                    if item is not None and item.claim_token == t and (
                            i in failed or item.attempts >= (item.max_attempts or 1)):
                        dying[i] = (lane, item, error)
        for i, t, _ in final:  # a failed cycle's outcomes, back again: the lanes forgot their items
            known = self._unsettled_dying.get(i)
            if i not in dying and known is not None and known[1].claim_token == t:
                dying[i] = known
        return dying

    def _inflight_total(self) -> int:
        return sum(len(lane.inflight) for lane in self.lanes.values())

    def run(self, install_signal_handlers: bool = True) -> dict[str, int]:
        """Work until stopped; returns the counts (claimed, resolved, retried, dead, released,
        lost, rescued). Raises what a bug raised, after stopping every thread."""
        restore = self._install_signals() if install_signal_handlers else None
        self._migrate_at_start()
        self.log.info("worker %s started on %s", self.name, ", ".join(self.queues))
        try:
            self._start_runners()
            self._loop()
        finally:
            self._stop_runners()
            if restore:
                restore()
            self.log.info("worker %s stopped: %s", self.name, self.counts)
        return dict(self.counts)

    def _migrate_at_start(self) -> None:
        """The first touch of the database: a hiccup here (a dropped connection) is retried for a
        while, like any in the loop, instead of killing the worker; a usage error is not."""
        for attempt in range(1, 9):
            try:
                self.store.migrate()
                return
            except StoreError as exc:
                if attempt == 8 or self.state.stopping:
                    raise
                self.log.warning("database error at start (attempt %d), retrying: %s", attempt, exc)
                time.sleep(min(2.0, 0.05 * 2 ** attempt))

    def _loop(self) -> None:
        deadline: float | None = None
        trouble = 0  # consecutive database failures
        while True:
            self._check_services()
            if self.state.stopping and deadline is None:
                deadline = time.monotonic() + self.shutdown_timeout
                for lane in self.lanes.values():
                    back = lane.drain_unstarted() if not lane.processor.is_async else list(lane.suspects)
                    lane.suspects.clear()
                    if back:
                        self.outcomes.released(back)
            try:
                outcome = self._step(deadline)
                trouble = 0
            except StoreError as exc:  # the database hiccuped: nothing is lost, the step is redone
                trouble += 1
                pause = min(5.0, 0.05 * 2 ** min(trouble, 10))
                self.log.warning("database error (attempt %d), retrying in %.2fs: %s", trouble, pause, exc)
                if self.state.stopping and (self.state.forced or deadline is not None and time.monotonic() > deadline):
                    self.log.warning("giving up at shutdown: %d item(s) held and %d result(s) unsettled; they will be "
                                "retried once their leases expire (within %gs)", self._inflight_total(),
                                self.outcomes.waiting()[0], self._longest_lease())
                    return
                self.wake.wait(pause)
                self.wake.clear()
                continue
            if outcome == "stop":
                return

    def _step(self, deadline: float | None) -> str:
        """One cycle of the loop: settle, claim, dispatch, then wait. Says 'stop', 'busy' (claimed
        something), 'idle' (nothing in flight) or 'waiting'."""
        out = self.outcomes.take()
        claimed_any = False
        if out or self._wants():
            try:
                cycled = self._cycle(out)
            except BaseException:
                self.outcomes.restore(out)
                raise
            for lane, asked, items in cycled:
                if items:
                    claimed_any = True
                    self.outcomes.count("claimed", len(items))
                    lane.accept(items, asked, self._suspect_held())
                else:
                    lane.mark_dry()
        inflight = self._inflight_total()
        if not self.state.stopping and self._suspect_held():
            self._run_suspect(inflight)
        self.outcomes.flush_at = max(1, min(FLUSH_MAX, inflight))
        if self.state.stopping:
            if inflight == 0:
                return "stop"
            if self.state.forced or deadline is not None and time.monotonic() > deadline:  # a second signal: now
                self._abandon_running()
                return "stop"
        elif (
            self.stop_when_empty and inflight == 0 and not claimed_any
            and all(lane.dry for lane in self.lanes.values()) and not self.store.has_work(self.queues)
        ):
            self.log.info("queues %s are empty: stopping", ", ".join(self.queues))
            return "stop"
        if claimed_any:
            return "busy"
        self._wait()
        return "idle" if inflight == 0 else "waiting"

    def _run_suspect(self, inflight: int) -> None:
        """Run one suspect item, alone in this process. A suspect's last worker died while holding
        it (its lease was rescued), perhaps killed by this very item (a segfault, os._exit, the OOM
        killer). Running it with nothing else in flight and every other outcome already settled
        means that if it kills this worker too, only its own attempt is spent: a poison item goes
        dead after max_attempts without taking innocent batch-mates with it."""
        if inflight != sum(len(lane.suspects) for lane in self.lanes.values()):
            return  # something else still runs or waits: its outcome must be settled first
        if self.outcomes.waiting()[0]:
            return
        lane = next(lane for lane in self.lanes.values() if lane.suspects)
        item = lane.suspects.popleft()
        self.log.warning("running item %s of %r alone: the worker that held it died (attempt %s/%s)",
                         item.id, lane.opts.queue, item.attempts, lane.opts.max_attempts,
                         queue=lane.opts.queue, items=[item.id])
        self._solo = (lane, item)
        lane.dispatch([item])

    def _suspect_held(self) -> bool:
        return any(lane.suspects for lane in self.lanes.values())

    def _alone(self) -> bool:
        """True while a suspect runs alone (until its outcome is settled)."""
        if self._solo is None:
            return False
        lane, item = self._solo
        held = lane.inflight.get(item.id)
        if held is not None and held.claim_token == item.claim_token:
            return True
        self._solo = None
        return False

    def _wait(self) -> None:
        """Sleep until something is worth a cycle: enough outcomes, a wake-up, or new data."""
        pending, first = self.outcomes.waiting()
        if pending:
            # Let outcomes gather for a moment so one statement settles many of them.
            left = first + FLUSH_INTERVAL - time.monotonic()
            if pending < self.outcomes.flush_at and left > 0 and not self.state.stopping:
                self.wake.wait(left)
            self.wake.clear()
            return
        hungry = [lane for lane in self.lanes.values() if lane.dry and lane.wanted()]
        if hungry and not self.state.stopping:
            timeout = min(IDLE_MAX, max(0.0, min(lane.poll_at for lane in hungry) - time.monotonic()))
            changed = self.store.wait_for_change(timeout, _AnyEvent(self.wake, self.wakeup))
            if changed or self.wakeup.is_set():
                self.wakeup.clear()
                for lane in hungry:
                    lane.dry = False
        else:
            self.wake.wait(IDLE_MAX)
        self.wake.clear()

    def _abandon_running(self) -> None:
        """Shutdown timed out, or was forced: the items still running count their attempt and go
        back for a retry (dead if that was their last)."""
        forced = self.state.forced
        why = ("shut down by a forced stop" if forced else f"shut down after {self.shutdown_timeout:g}s") + \
            " while the handler was still running"
        entries = [(i, t, 0.0, f"worker {self.name}: {why}") for lane in self.lanes.values() for i, t in lane.tokens()]
        head = "forced stop" if forced else f"shutdown timeout ({self.shutdown_timeout:g}s)"
        if not entries:
            if forced:
                self.log.warning("%s: no handler was running", head)
            return
        all_ids = [e[0] for e in entries]
        ids = some(all_ids)
        out = Outcomes(retried=entries)
        last = len(self._dying(out))  # their last attempt: dead, each logged by the cycle
        try:
            self._cycle(out)
        except StoreError as exc:  # stopping anyway: say what becomes of them
            self.log.warning("%s: abandoned %d running item(s) (%s) but could not send them back (%s): they will be "
                        "retried once their leases expire (within %gs)", head, len(entries), ids, exc,
                        self._longest_lease(), items=all_ids)
            return
        if last:
            self.log.warning("%s: abandoned %d running item(s) (%s), their attempt spent: %d sent back to pending for a "
                        "retry, %d dead (it was their last)", head, len(entries), ids, len(entries) - last, last,
                        items=all_ids)
        else:
            self.log.warning("%s: abandoned %d running item(s) (%s): sent back to pending for a retry, their attempt "
                        "spent", head, len(entries), ids, items=all_ids)

    def _longest_lease(self) -> float:
        return max(lane.opts.lease_seconds for lane in self.lanes.values())

    # -- runners and keeper ---------------------------------------------------------------------
    def _start_runners(self) -> None:
        if any(lane.processor.is_async for lane in self.lanes.values()):
            ready = threading.Event()
            self._loop_thread = threading.Thread(target=self._loop_main, args=(ready,), name="conveyor-async", daemon=True)
            self._loop_thread.start()
            ready.wait()
        for lane in self.lanes.values():
            lane.start()
        self.keeper.start()
        if self.watchdog is not None:
            self.watchdog.start()
        if self.scheduler is not None:
            self.scheduler.start()

    def _loop_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        tasks = [t for lane in self.lanes.values() if lane.processor.is_async for t in lane.start_tasks(loop)]
        loop.call_soon(ready.set)
        loop.run_forever()
        for t in tasks:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    def _stop_runners(self) -> None:
        self.state.stopping = True
        for lane in self.lanes.values():
            lane.stop_runners()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._loop_thread:
                self._loop_thread.join(timeout=2)
        self.keeper.stop()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        for lane in self.lanes.values():
            lane.join_threads(0.5)

    # -- stopping -------------------------------------------------------------------------------
    def stop(self, force: bool = False) -> None:
        """Ask the worker to stop: claim nothing more, finish what runs (within shutdown_timeout),
        give back what has not started. force=True gives up on running handlers at once."""
        if force:
            self.state.forced = True
            self.shutdown_timeout = 0
        self.state.stopping = True
        self.wake.set()

    def _install_signals(self) -> Callable[[], None] | None:
        return install_stop_signals(self)


def install_stop_signals(target: Any) -> Callable[[], None] | None:
    """SIGINT and SIGTERM stop `target` (a Worker or a Crew): the first gently (in-flight work
    finishes), a second at once. Returns what restores the old handlers; None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handle(signum: int, frame: Any) -> None:
        if target.stopping:
            target.log.warning("second signal: stopping now")
            target.stop(force=True)
        else:
            target.log.info("signal %s: finishing in-flight work, then stopping", signal.Signals(signum).name)
            target.stop()

    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


class _AnyEvent:
    """Looks like one Event, is set when any of several is."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)

