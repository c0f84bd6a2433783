"""Lanes: one processor's share of a worker, with the threads or tasks that run its handler.

A lane holds the items claimed for its queue until they are settled, hands them to `concurrency`
handler threads (sync handlers) or event-loop tasks (async ones), and keeps back an item whose last
worker died holding it, so the Worker can run it alone.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..model import Claim, Item, Processor, Token
from .outcomes import OutcomeBuffer, RunState
from .runner import SETTLED, Runner

IDLE_MAX = 0.5  # longest idle sleep between claims when no wake-up arrives
POLL_MIN = 0.005  # first re-poll of a queue that came back short, doubling up to IDLE_MAX


class Lane:
    """One processor's share of a worker: its in-flight items and the runners that handle them."""

    def __init__(self, processor: Processor, runner: Runner, outcomes: OutcomeBuffer, state: RunState):
        self.runner = runner
        self.outcomes = outcomes
        self.state = state
        self.processor = processor
        self.opts = processor.options
        self.claim = Claim(self.opts.queue, self.opts.batch_size, self.opts.lease_seconds,
                           self.opts.max_attempts, self.opts.ordered, self.opts.limits)
        # a rate-limited queue's claims come back short by design: poll at the pace of its rate
        rates = [r.interval for r in (self.opts.limits.rate_limit, self.opts.limits.key_rate_limit) if r] \
            if self.opts.limits else []
        self.poll_max = max(POLL_MIN, min([IDLE_MAX, *rates]))
        b, c = self.opts.batch_size, self.opts.concurrency
        self.capacity = (c + 1) * b if self.opts.batch else c + b
        #: a claim that came back short may have been held back by this worker's own items (the
        #: next of a key behind one it runs, or a limit's slots it fills): settling them frees it
        limits = self.opts.limits
        self.slots_freed_by_settling = self.opts.ordered or bool(
            limits and (limits.max_in_progress or limits.key_concurrency))
        self.inflight: dict[int, Item] = {}
        self.lock = threading.Lock()
        #: (id, token) of claims whose lease the heartbeat found lost: not worth starting
        self.lost: set[tuple[int, int]] = set()
        #: the last claim came back short: claim again on a change, or at poll_at (backing off)
        self.dry = False
        self.poll_at = 0.0
        self.poll_gap = POLL_MIN
        self.handoff = Handoff()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.async_q: asyncio.Queue[Any] | None = None
        self.threads: list[threading.Thread] = []
        #: thread ident → (monotonic start, items) of the sync handler runs under way
        self.running: dict[int, tuple[float, list[Item]]] = {}
        #: threads given up on by timeout: their late results are dropped, then they retire
        self.abandoned: set[int] = set()
        #: a claimed item whose last worker died holding it, waiting to run alone (Worker._run_suspect)
        self.suspects: collections.deque[Item] = collections.deque()

    # -- claiming -------------------------------------------------------------------------------
    def wanted(self) -> int:
        """How many items to claim now (0: not now)."""
        free = self.capacity - len(self.inflight)
        b = self.opts.batch_size
        if self.opts.batch:
            return b if free >= b else 0
        if not self.inflight:
            return min(b, free)
        return min(b, free) if free >= max(1, b // 2) else 0

    def claim_of(self, n: int) -> Claim:
        """The claim for `n` items; under max_in_progress it says how many of them can start now."""
        limits = self.opts.limits
        if limits is None or limits.max_in_progress is None:
            return self.claim if n == self.claim.limit else dataclasses.replace(self.claim, limit=n)
        hands = self.opts.concurrency * (self.opts.batch_size if self.opts.batch else 1)
        return dataclasses.replace(self.claim, limit=n, start=max(0, hands - len(self.inflight)))

    def tokens(self) -> list[Token]:
        with self.lock:
            return [(i, it.claim_token) for i, it in self.inflight.items()]  # type: ignore[misc]

    def accept(self, items: list[Item], asked: int, suspect_held: bool) -> None:
        """Take claimed items into flight and hand them to the runners. `suspect_held`: some lane
        of the worker already holds a suspect back to run alone."""
        with self.lock:
            for it in items:
                self.inflight[it.id] = it
        if len(items) < asked:
            self.mark_dry()
        else:
            self.dry, self.poll_gap = False, POLL_MIN
        if any(is_suspect(it) for it in items):
            # Hold one suspect to run alone; give the others back unstarted (their attempt
            # refunded), so a crash while the one runs strands nothing else.
            suspects = [it for it in items if is_suspect(it)]
            items = [it for it in items if not is_suspect(it)]
            if not suspect_held:
                self.suspects.append(suspects.pop(0))
            if suspects:
                self.outcomes.released(suspects)
        self.dispatch(items)

    def dispatch(self, items: list[Item]) -> None:
        if not items:
            return
        units: list[Any] = [items] if self.opts.batch else items
        if self.processor.is_async:
            loop, q = self.loop, self.async_q
            assert loop is not None and q is not None, "start_tasks() was not called"
            loop.call_soon_threadsafe(_put_all, q, units)
        else:
            self.handoff.put_many(units)

    def mark_dry(self) -> None:
        self.dry = True
        self.poll_at = time.monotonic() + self.poll_gap
        self.poll_gap = min(self.poll_max, self.poll_gap * 2)

    def ready(self, now: float) -> bool:
        """Worth a claim now: not dry, or dry long enough to poll (delayed items come due silently)."""
        return not self.dry or now >= self.poll_at

    def settled(self, claims: Sequence[Sequence[Any]]) -> int:
        """Forget settled claims, each given as (id, token, ...). Matching the token too matters: a
        rescued item may be claimed again by this same worker while its old run still finishes.
        Where this lane's own items held its next claims back (the next of a key, a limit's
        slots), it is worth a claim again at once. Returns how many were held."""
        held = 0
        with self.lock:
            for entry in claims:
                i, token = entry[0], entry[1]
                it = self.inflight.get(i)
                if it is not None and it.claim_token == token:
                    del self.inflight[i]
                    held += 1
                self.lost.discard((i, token))
        if held and self.slots_freed_by_settling:
            self.dry = False
        return held

    # -- running --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the handler threads (sync handlers; async ones run as tasks: start_tasks)."""
        if self.processor.is_async:
            return
        for _ in range(self.opts.concurrency):
            self.add_thread()

    def start_tasks(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[None]]:
        """On the worker's event loop (called in its thread): the queue and `concurrency` tasks."""
        self.loop = loop
        self.async_q = asyncio.Queue()
        return [loop.create_task(self.task_main()) for _ in range(self.opts.concurrency)]

    def stop_runners(self) -> None:
        """Tell the threads or tasks to finish once idle."""
        if not self.processor.is_async:
            self.handoff.close()
        elif self.loop is not None and self.async_q is not None:
            for _ in range(self.opts.concurrency):
                self.loop.call_soon_threadsafe(self.async_q.put_nowait, None)

    def join_threads(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout=timeout)

    def add_thread(self) -> None:
        t = threading.Thread(target=self._thread_main, name=f"conveyor-{self.opts.queue}-{len(self.threads)}", daemon=True)
        t.start()
        self.threads.append(t)

    def _thread_main(self) -> None:
        me = threading.get_ident()
        timed = self.opts.timeout_seconds is not None
        while True:
            unit = self.handoff.get()
            if unit is None:
                break
            items = unit if isinstance(unit, list) else [unit]
            if self.state.stopping or all((it.id, it.claim_token) in self.lost for it in items):
                self.outcomes.released(items)
                continue
            if timed:  # the watchdog's bookkeeping, only where there is a timeout to watch
                with self.lock:
                    self.running[me] = (time.monotonic(), items)
            exc = self.runner.run_sync(self, items)
            if timed:
                with self.lock:
                    self.running.pop(me, None)
                    given_up = me in self.abandoned
                    self.abandoned.discard(me)  # a thread started later may get the same ident
                if given_up:
                    self.state.log.warning("handler for %r returned after its timeout: result dropped, thread retired",
                                           self.opts.queue, queue=self.opts.queue, items=[it.id for it in items])
                    break
            if exc is None:
                self.outcomes.resolved(items)
            elif exc is not SETTLED:
                self.outcomes.failed(self.opts, items, exc)  # type: ignore[arg-type]
        self.runner.store.disconnect()

    def given_up(self) -> bool:
        """True in a handler thread that timed out (checked before a transactional commit)."""
        with self.lock:
            return threading.get_ident() in self.abandoned

    def expire_overdue(self) -> list[list[Item]]:
        """Give up on sync handler runs past timeout_seconds; returns their items."""
        timeout = self.opts.timeout_seconds
        if timeout is None or not self.running:
            return []
        now = time.monotonic()
        overdue: list[list[Item]] = []
        with self.lock:
            for ident, (started, items) in list(self.running.items()):
                if now - started > timeout:
                    del self.running[ident]
                    self.abandoned.add(ident)
                    overdue.append(items)
        return overdue

    async def task_main(self) -> None:
        assert self.async_q is not None
        while True:
            unit = await self.async_q.get()
            if unit is None:
                break
            items = unit if isinstance(unit, list) else [unit]
            if self.state.stopping:
                self.outcomes.released(items)
                continue
            await self.runner.run_async(self, items)

    def drain_unstarted(self) -> list[Item]:
        """Take back what no runner has started yet (at shutdown)."""
        taken: list[Item] = list(self.suspects)
        self.suspects.clear()
        for unit in self.handoff.drain():
            taken.extend(unit if isinstance(unit, list) else [unit])
        return taken


class Handoff:
    """Work for handler threads: many units put with one wake-up, taken one at a time, so a slow
    item never holds up others while a thread is free. A woken thread wakes the next idle one only
    while work is left over, so quick handlers don't pay for waking threads they don't need."""

    def __init__(self) -> None:
        self._units: collections.deque[Any] = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        #: threads waiting that nobody has woken yet: the waker counts a thread off as it wakes
        #: it, not the thread once it runs again, which may take a while (it needs the GIL).
        #: Counted by the woken thread, a busy thread would keep "waking" the same sleepers on
        #: every unit it takes (measured: 98% of takes did, a fifth of a drain's Python time).
        self._idle = 0
        self._closed = False

    def _wake_one(self) -> None:
        if self._idle:
            self._idle -= 1
            self._cv.notify(1)

    def put_many(self, units: list[Any]) -> None:
        with self._cv:
            self._units.extend(units)
            self._wake_one()

    def get(self) -> Any:
        """The next unit, or None once closed and empty."""
        with self._cv:
            while not self._units:
                if self._closed:
                    return None
                self._idle += 1
                self._cv.wait()
            unit = self._units.popleft()
            if self._units:
                self._wake_one()
            return unit

    def drain(self) -> list[Any]:
        with self._cv:
            units = list(self._units)
            self._units.clear()
        return units

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._idle = 0
            self._cv.notify_all()


def _put_all(q: asyncio.Queue[Any], units: list[Any]) -> None:
    for unit in units:
        q.put_nowait(unit)


def is_suspect(item: Item) -> bool:
    """Claimed again after its last worker died holding it (rescued after its lease expired)."""
    return item.attempts > 1 and item.rescued
