"""The worker: claim → dispatch → gather outcomes → settle, looping, with leases kept alive.

One worker process runs:
- the *cycle* (the thread that calls `run`): settles the outcomes gathered since the last cycle
  and claims the next batches in one store transaction, then hands items to the lanes;
- one *lane* per processor (lanes.py): `concurrency` threads for sync handlers, or `concurrency`
  tasks on a shared event-loop thread for `async def` handlers;
- a *keeper* thread (keeper.py): heartbeats (extends the leases of every item held) and rescues
  items whose leases expired, on its own connection, so a busy or blocked handler never stops the
  heartbeat; and a *watchdog* thread for timeout_seconds.
The worker speaks to the Store protocol only; it never sees SQL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any, Sequence

from .errors import Fail, LeaseLost, Retry, StoreError, UsageError
from .model import Claim, Item, Outcomes
from .keeper import keep_leases, watch_timeouts
from .lanes import IDLE_MAX, SETTLED, Lane
from .retry import backoff_delay

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("conveyor.worker")

FLUSH_INTERVAL = 0.002  # seconds an outcome may wait for others to share its settle statement
FLUSH_MAX = 1000  # outcomes settled in one statement at most


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).strip()


class Worker:
    """Runs the processors of an App on the chosen queues until stopped."""

    def __init__(
        self,
        app: "App",
        queues: Sequence[str] | None = None,
        *,
        stop_when_empty: bool = False,
        shutdown_timeout: float = 30.0,
        name: str | None = None,
        prune_after: float | None = None,
    ):
        self.app = app
        if prune_after is not None and (not isinstance(prune_after, (int, float)) or prune_after < 0):
            raise UsageError(f"prune_after must be a number of seconds >= 0, not {prune_after!r}")
        #: delete this worker's queues' resolved, dead and cancelled items once they are this old
        self.prune_after = prune_after
        if not app.processors:
            raise UsageError("no processors are registered on this App: decorate a handler with @app.processor('queue')")
        chosen = list(queues) if queues else list(app.processors)
        unknown = [q for q in chosen if q not in app.processors]
        if unknown:
            raise UsageError(
                f"no processor registered for queue(s) {', '.join(map(repr, unknown))} "
                f"(registered: {', '.join(sorted(app.processors))})"
            )
        self.queues = list(dict.fromkeys(chosen))
        self.name = name or worker_name()
        self.stop_when_empty = stop_when_empty
        self.shutdown_timeout = shutdown_timeout
        self.lanes = {q: Lane(self, app.processors[q]) for q in self.queues}
        self.stopping = False
        self.forced = False
        self.wake = threading.Event()
        self._solo: tuple[Lane, Item] | None = None  # a suspect running alone
        self._out = Outcomes()
        self._out_lock = threading.Lock()
        self._out_first = 0.0
        self._flush_at = 1
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._keeper: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self.counts = {"claimed": 0, "resolved": 0, "retried": 0, "failed": 0, "released": 0, "lost": 0, "rescued": 0}
        min_lease = min(lane.opts.lease_seconds for lane in self.lanes.values())
        self.heartbeat_interval = max(0.05, min_lease / 3)
        self.rescue_interval = max(0.25, min(5.0, min_lease / 2))
        self.prune_interval = max(10.0, min(600.0, (prune_after or 0) / 10))
        timeouts = [lane.opts.timeout_seconds for lane in self.lanes.values() if lane.opts.timeout_seconds]
        self.timeout_check = max(0.02, min([1.0] + [t / 5 for t in timeouts]))

    # -- outcomes (called from runner threads and tasks) ----------------------------------------
    def _record(self, add: Any, n: int) -> None:
        with self._out_lock:
            before = len(self._out)
            add(self._out)
            after = before + n
            if before == 0:
                self._out_first = time.monotonic()
        if before == 0 or after >= self._flush_at:
            self.wake.set()

    def record_resolved(self, items: list[Item]) -> None:
        """The hot path: a handler returned."""
        with self._out_lock:
            before = len(self._out)
            self._out.resolved.extend([(it.id, it.claim_token) for it in items])  # type: ignore[misc]
            if before == 0:
                self._out_first = time.monotonic()
        if before == 0 or before + len(items) >= self._flush_at:
            self.wake.set()

    def record_release(self, items: list[Item]) -> None:
        self._record(lambda o: o.released.extend((it.id, it.claim_token) for it in items), len(items))

    def _record_result(self, lane: Lane, items: list[Item], exc: BaseException | None) -> None:
        toks = [(it.id, it.claim_token) for it in items]
        if exc is None:
            self._record(lambda o: o.resolved.extend(toks), len(items))
        elif isinstance(exc, Fail):
            self._record(lambda o: o.failed.extend((i, t, f"Fail: {exc.reason}") for i, t in toks), len(items))
        else:
            if isinstance(exc, Retry):
                text = f"Retry: {exc.reason}"
            else:
                text = error_text(exc)
                first = items[0]
                log.warning("handler for %r raised on item %s (attempt %s/%s): %s",
                            lane.opts.queue, first.id if len(items) == 1 else f"batch of {len(items)}",
                            first.attempts, lane.opts.max_attempts, f"{type(exc).__name__}: {exc}")
            entries = []
            for (i, t), it in zip(toks, items):
                delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else backoff_delay(
                    it.attempts, lane.opts.backoff_base, lane.opts.backoff_max)
                entries.append((i, t, delay, text))
            self._record(lambda o: o.retried.extend(entries), len(items))

    def run_sync(self, lane: Lane, items: list[Item]) -> BaseException | None | object:
        """Run a sync handler; returns its exception, None on success, or SETTLED when a
        transactional run settled the items itself."""
        arg: Any = items if lane.opts.batch else items[0]
        if lane.opts.transactional:
            return self._run_transactional(lane, items, arg)
        try:
            lane.processor.handler(arg)
        except BaseException as exc:  # a handler's failure never stops the worker
            return exc
        return None

    def _run_transactional(self, lane: Lane, items: list[Item], arg: Any) -> BaseException | None | object:
        """The handler's writes and the items' resolution commit together, or not at all."""
        store = self.app.store
        try:
            with store.transaction() as conn:
                lane.processor.handler(arg, conn)
                if lane.given_up():
                    raise LeaseLost([it.id for it in items], "handler ran past timeout_seconds: its writes are rolled back")
                lost = store.resolve([(it.id, it.claim_token) for it in items])  # type: ignore[misc]
                if lost:
                    raise LeaseLost(lost)
        except LeaseLost as exc:
            log.warning("%s: the handler's writes were rolled back", exc)
            self._count("lost", len(items))
        except BaseException as exc:
            return exc
        else:
            self._count("resolved", len(items))
        lane.settled([(it.id, it.claim_token) for it in items])
        if lane.opts.ordered:
            lane.dry = False  # the next item of this key may start now
        self.wake.set()
        return SETTLED

    def _count(self, key: str, n: int) -> None:
        with self._out_lock:
            self.counts[key] += n

    async def run_async(self, lane: Lane, items: list[Item]) -> None:
        arg: Any = items if lane.opts.batch else items[0]
        try:
            if lane.opts.transactional:
                await self._run_async_transactional(lane, items, arg)
                return
            await self._bounded(lane, lane.processor.handler(arg))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and self.forced:
                raise
            self._record_result(lane, items, exc)
        else:
            self._record_result(lane, items, None)

    @staticmethod
    async def _bounded(lane: Lane, coro: Any) -> Any:
        """Await a handler, cancelling it past timeout_seconds."""
        timeout = lane.opts.timeout_seconds
        if timeout is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"handler ran past timeout_seconds={timeout:g} and was cancelled") from None

    async def _run_async_transactional(self, lane: Lane, items: list[Item], arg: Any) -> None:
        """As _run_transactional, on a connection of the handler's own (async where the driver is)."""
        store = self.app.store
        try:
            async with store.async_transaction() as conn:
                await self._bounded(lane, lane.processor.handler(arg, conn))
                lost = await store.resolve_in(conn, [(it.id, it.claim_token) for it in items])  # type: ignore[misc]
                if lost:
                    raise LeaseLost(lost)
        except LeaseLost as exc:
            log.warning("%s: the handler's writes were rolled back", exc)
            self._count("lost", len(items))
        else:
            self._count("resolved", len(items))
        # any other exception propagates to run_async, which records it for a retry
        lane.settled([(it.id, it.claim_token) for it in items])
        if lane.opts.ordered:
            lane.dry = False
        self.wake.set()

    # -- the cycle ------------------------------------------------------------------------------
    def _take_outcomes(self) -> Outcomes:
        with self._out_lock:
            out, self._out = self._out, Outcomes()
        return out

    def _wants(self) -> list[tuple[Lane, int]]:
        if self.stopping or self._alone() or any(lane.suspects for lane in self.lanes.values()):
            return []  # nothing new while a suspect waits to run alone, or runs
        now = time.monotonic()
        return [(lane, n) for lane in self.lanes.values() if lane.ready(now) and (n := lane.wanted())]

    def _cycle(self, out: Outcomes) -> list[tuple[Lane, int, list[Item]]]:
        """Settle outcomes, then claim what the freed capacity allows, atomically (one statement
        on PostgreSQL, one transaction on SQLite). If it fails, _step puts the outcomes back."""
        if out:
            settled = [e for part in (out.resolved, out.retried, out.failed, out.released) for e in part]
            for lane in self.lanes.values():
                if lane.inflight and lane.settled(settled) and lane.opts.ordered:
                    lane.dry = False  # settling may unblock the next item of a key: claim again
        wants = self._wants()
        claims = [lane.claim if n == lane.claim.limit else Claim(
            lane.claim.queue, n, lane.claim.lease_seconds, lane.claim.max_attempts, lane.claim.ordered)
            for lane, n in wants]
        lost, batches = self.app.store.settle_and_claim(out, claims, self.name)
        lost_set = set(lost)
        for key, entries in (("resolved", out.resolved), ("retried", out.retried),
                             ("failed", out.failed), ("released", out.released)):
            self._count(key, sum(1 for e in entries if e[0] not in lost_set))
        if lost:
            self._count("lost", len(lost))
            log.warning("lease lost on item(s) %s: their results were refused (another worker holds them now)",
                        ", ".join(map(str, sorted(lost)[:20])))
        return [(lane, n, items) for (lane, n), items in zip(wants, batches)]

    def _inflight_total(self) -> int:
        return sum(len(lane.inflight) for lane in self.lanes.values())

    def run(self, install_signal_handlers: bool = True) -> dict[str, int]:
        restore = self._install_signals() if install_signal_handlers else None
        self._migrate_at_start()
        log.info("worker %s started on %s", self.name, ", ".join(self.queues))
        try:
            self._start_runners()
            self._loop()
        finally:
            self._stop_runners()
            if restore:
                restore()
            log.info("worker %s stopped: %s", self.name, self.counts)
        return dict(self.counts)

    def _migrate_at_start(self) -> None:
        """The first touch of the database: a hiccup here (a dropped connection) is retried for a
        while, like any in the loop, instead of killing the worker; a usage error is not."""
        for attempt in range(1, 9):
            try:
                self.app.store.migrate()
                return
            except StoreError as exc:
                if attempt == 8 or self.stopping:
                    raise
                log.warning("database error at start (attempt %d), retrying: %s", attempt, exc)
                time.sleep(min(2.0, 0.05 * 2 ** attempt))

    def _loop(self) -> None:
        deadline: float | None = None
        trouble = 0  # consecutive database failures
        while True:
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.shutdown_timeout
                for lane in self.lanes.values():
                    back = lane.drain_unstarted() if not lane.processor.is_async else list(lane.suspects)
                    lane.suspects.clear()
                    if back:
                        self.record_release(back)
            try:
                outcome = self._step(deadline)
                trouble = 0
            except Exception as exc:  # the database hiccuped: nothing is lost, the step is redone
                trouble += 1
                pause = min(5.0, 0.05 * 2 ** min(trouble, 10))
                log.warning("database error (attempt %d), retrying in %.2fs: %s", trouble, pause,
                            f"{type(exc).__name__}: {exc}".strip())
                if self.stopping and (self.forced or deadline is not None and time.monotonic() > deadline):
                    log.warning("giving up at shutdown: unsettled items will be rescued when their leases expire")
                    return
                self.wake.wait(pause)
                self.wake.clear()
                continue
            if outcome == "stop":
                return

    def _step(self, deadline: float | None) -> str:
        """One cycle of the loop: settle, claim, dispatch, then wait. Says 'stop', 'busy' (claimed
        something), 'idle' (nothing in flight) or 'waiting'."""
        out = self._take_outcomes()
        claimed_any = False
        if out or self._wants():
            try:
                cycled = self._cycle(out)
            except BaseException:
                self._restore_outcomes(out)
                raise
            for lane, asked, items in cycled:
                if items:
                    claimed_any = True
                    self._count("claimed", len(items))
                    lane.accept(items, asked)
                else:
                    lane.mark_dry()
        inflight = self._inflight_total()
        if not self.stopping and any(lane.suspects for lane in self.lanes.values()):
            self._run_suspect(inflight)
        self._flush_at = max(1, min(FLUSH_MAX, inflight))
        if self.stopping:
            if inflight == 0:
                return "stop"
            if self.forced or deadline is not None and time.monotonic() > deadline:  # a second signal: now
                self._abandon_running()
                return "stop"
        elif (
            self.stop_when_empty and inflight == 0 and not claimed_any
            and all(lane.dry for lane in self.lanes.values()) and not self.app.store.has_work(self.queues)
        ):
            log.info("queues %s are empty: stopping", ", ".join(self.queues))
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
        with self._out_lock:
            if self._out:
                return
        lane = next(lane for lane in self.lanes.values() if lane.suspects)
        item = lane.suspects.popleft()
        log.warning("running item %s of %r alone: the worker that held it died (attempt %s/%s)",
                    item.id, lane.opts.queue, item.attempts, lane.opts.max_attempts)
        self._solo = (lane, item)
        lane.dispatch([item])

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

    def _restore_outcomes(self, out: Outcomes) -> None:
        """A settle failed: put its outcomes back in front of any gathered since."""
        if not out:
            return
        with self._out_lock:
            out.extend(self._out)
            self._out = out
            self._out_first = time.monotonic()

    def _wait(self) -> None:
        """Sleep until something is worth a cycle: enough outcomes, a wake-up, or new data."""
        with self._out_lock:
            pending = len(self._out)
            first = self._out_first
        if pending:
            # Let outcomes gather for a moment so one statement settles many of them.
            left = first + FLUSH_INTERVAL - time.monotonic()
            if pending < self._flush_at and left > 0 and not self.stopping:
                self.wake.wait(left)
            self.wake.clear()
            return
        hungry = [lane for lane in self.lanes.values() if lane.dry and lane.wanted()]
        if hungry and not self.stopping:
            timeout = min(IDLE_MAX, max(0.0, min(lane.poll_at for lane in hungry) - time.monotonic()))
            changed = self.app.store.wait_for_change(timeout, self._wakeups())
            if changed or self.app.wakeup.is_set():
                self.app.wakeup.clear()
                for lane in hungry:
                    lane.dry = False
        else:
            self.wake.wait(IDLE_MAX)
        self.wake.clear()

    def _wakeups(self) -> "_AnyEvent":
        return _AnyEvent(self.wake, self.app.wakeup)

    def _abandon_running(self) -> None:
        """Shutdown timed out: the items still running count their attempt and go back for a retry."""
        entries = []
        for lane in self.lanes.values():
            for i, t in lane.tokens():
                entries.append((i, t, 0.0, f"worker {self.name} shut down after {self.shutdown_timeout}s "
                                            "while the handler was still running"))
        if entries:
            log.warning("shutdown timeout: %d item(s) still running are sent back for a retry", len(entries))
            self._cycle(Outcomes(retried=entries))

    # -- runners and keeper ---------------------------------------------------------------------
    def _start_runners(self) -> None:
        if any(lane.processor.is_async for lane in self.lanes.values()):
            ready = threading.Event()
            self._loop_thread = threading.Thread(target=self._loop_main, args=(ready,), name="conveyor-async", daemon=True)
            self._loop_thread.start()
            ready.wait()
        for lane in self.lanes.values():
            lane.start()
        self._keeper_stop = threading.Event()
        self._keeper = threading.Thread(target=keep_leases, args=(self, self._keeper_stop), name="conveyor-keeper",
                                        daemon=True)
        self._keeper.start()
        if any(lane.opts.timeout_seconds for lane in self.lanes.values()):
            # its own thread, touching no database: the keeper can sit blocked in a heartbeat for as
            # long as the database stalls (SQLite's write lock held, by a hung transactional handler
            # say), and a timeout checked there would fire only after the hung run had finished
            self._watchdog = threading.Thread(target=watch_timeouts, args=(self, self._keeper_stop),
                                              name="conveyor-watchdog", daemon=True)
            self._watchdog.start()

    def _loop_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        tasks = []
        for lane in self.lanes.values():
            if lane.processor.is_async:
                lane.async_q = asyncio.Queue()
                tasks += [loop.create_task(lane.task_main()) for _ in range(lane.opts.concurrency)]
        loop.call_soon(ready.set)
        loop.run_forever()
        for t in tasks:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    def _stop_runners(self) -> None:
        self.stopping = True
        for lane in self.lanes.values():
            if lane.processor.is_async:
                if self.loop is not None and lane.async_q is not None:
                    for _ in range(lane.opts.concurrency):
                        self.loop.call_soon_threadsafe(lane.async_q.put_nowait, None)
            else:
                lane.handoff.close()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._loop_thread:
                self._loop_thread.join(timeout=2)
        if self._keeper:
            self._keeper_stop.set()
            self._keeper.join(timeout=5)
        if self._watchdog:
            self._watchdog.join(timeout=5)
        for lane in self.lanes.values():
            for t in lane.threads:
                t.join(timeout=0.5)

    # -- stopping -------------------------------------------------------------------------------
    def stop(self, force: bool = False) -> None:
        """Ask the worker to stop: claim nothing more, finish what runs (within shutdown_timeout),
        give back what has not started. force=True gives up on running handlers at once."""
        if force:
            self.forced = True
            self.shutdown_timeout = 0
        self.stopping = True
        self.wake.set()

    def _install_signals(self):  # type: ignore[no-untyped-def]
        if threading.current_thread() is not threading.main_thread():
            return None

        def handle(signum: int, frame: Any) -> None:
            if self.stopping:
                log.warning("second signal: stopping now")
                self.stop(force=True)
            else:
                log.info("signal %s: finishing in-flight work, then stopping", signal.Signals(signum).name)
                self.stop()

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

