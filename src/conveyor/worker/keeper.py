"""A worker's maintenance threads, each a small service with start() and stop():

- the Keeper extends the leases of every item the worker holds (heartbeat), rescues items whose
  lease expired, whoever held them, and, with prune_after, deletes its queues' finished items that
  old; each one statement, safe from any number of workers at once, on the keeper's own connection,
  so a busy or blocked handler never stops the heartbeat;
- the Watchdog gives up on handler runs past timeout_seconds; it touches no database, so a stalled
  database (SQLite's write lock held by a hung transactional handler, say) cannot delay it.

A StoreError is retried on the next round; anything else is a bug: the service stops and keeps it
as `failure`, which the worker's loop raises, so the process stops and says why.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from ..errors import StoreError
from ..model import error_headline
from ..stores.base import WorkerStore
from .lanes import Lane
from .logs import WorkerLog
from .outcomes import OutcomeBuffer, RunState, some
from .runner import cancelled_among


class _Service:
    """A daemon thread running `_round` every so often until stopped; a bug in it is kept."""

    name = "conveyor-service"

    def __init__(self, on_failure: Callable[[], None], log: WorkerLog):
        self.log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_failure = on_failure
        #: the exception that stopped this service (not a StoreError: those are retried)
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug: stop the worker, which raises it
            self.log.error("%s failed: %s: %s", self.name, type(exc).__name__, exc, exc_info=exc)
            self.failure = exc
            self._on_failure()
        finally:
            self._finish()

    def _run(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass


class Keeper(_Service):
    """Heartbeats, rescue of expired leases, pruning."""

    name = "conveyor-keeper"

    def __init__(self, store: WorkerStore, lanes: Sequence[Lane], outcomes: OutcomeBuffer, rescued: threading.Event,
                 on_failure: Callable[[], None], *, heartbeat_interval: float, rescue_interval: float,
                 prune_after: float | None = None, prune_interval: float = 600.0):
        super().__init__(on_failure, outcomes.log)
        self.store = store
        self.lanes = list(lanes)
        self.outcomes = outcomes
        #: set when items were rescued (idle workers here may claim them at once)
        self.rescued = rescued
        self.heartbeat_interval = heartbeat_interval
        self.rescue_interval = rescue_interval
        self.prune_after = prune_after
        self.prune_interval = prune_interval

    def _run(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_interval
        next_rescue = next_prune = time.monotonic()
        trouble = 0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_beat:
                    next_beat = now + self.heartbeat_interval
                    self.beat()
                if now >= next_rescue:
                    next_rescue = now + self.rescue_interval
                    self.rescue()
                if self.prune_after is not None and now >= next_prune:
                    next_prune = now + self.prune_interval
                    self.prune()
                trouble = 0
            except StoreError as exc:  # the keeper outlives a database hiccup
                trouble += 1
                self.log.warning("heartbeat/rescue failed (attempt %d), will retry: %s", trouble, exc)
            self._stop.wait(max(0.01, min(next_beat, next_rescue) - time.monotonic()))

    def _finish(self) -> None:
        self.store.disconnect()

    def beat(self) -> None:
        """Extend the leases of every item held; mark those whose lease was lost."""
        for lane in self.lanes:
            tokens = lane.tokens()
            if not tokens:
                continue
            refused = self.store.extend_leases(tokens, lane.opts.lease_seconds)
            if not refused:
                continue
            # an item settled meanwhile (a transactional commit, say) was refused for being
            # done, not lost: only what we still hold counts
            asked = dict(tokens)
            with lane.lock:
                lost = [(i, asked[i]) for i in refused
                        if i in lane.inflight and lane.inflight[i].claim_token == asked[i]]
                news = [i for i, t in lost if (i, t) not in lane.lost]  # each said once, not every beat
                lane.lost.update(lost)
            if news:
                self.refused(lane, news)

    def refused(self, lane: Lane, item_ids: list[int]) -> None:
        """The heartbeat found items this worker holds no longer leased to it: cancelled by an
        operator (their results will be dropped), or lost (rescued after their lease expired)."""
        log, queue = self.log, lane.opts.queue
        cancelled = cancelled_among(self.store, item_ids, log)
        if cancelled:
            gone = [i for i in item_ids if i in cancelled]
            log.info("heartbeat: item(s) %s of %r cancelled while running; their results will be dropped",
                     some(gone), queue, queue=queue, items=gone)
        lost = [i for i in item_ids if i not in cancelled]
        if lost:
            log.warning("heartbeat: lease lost on item(s) %s of %r", some(lost), queue, queue=queue, items=lost)

    def rescue(self) -> None:
        rescued = self.store.rescue_expired()
        if rescued:
            self.outcomes.count("rescued", len(rescued))
            dead = [i for i, s in rescued if s == "dead"]
            self.log.warning("rescued %d item(s) whose lease expired (%d dead: attempts spent)", len(rescued), len(dead),
                             items=[i for i, _ in rescued])
            self.rescued.set()
            if dead:
                self.report_dead(dead)

    def report_dead(self, item_ids: list[int]) -> None:
        """One line per item a rescue sent to dead: its lease expired during its last attempt."""
        try:
            items = self.store.get_many(item_ids)
        except StoreError as exc:  # the rescue is done: say what is known
            self.log.warning("item(s) %s dead: their lease expired on the last attempt (%s)", some(item_ids), exc,
                             items=item_ids)
            return
        for item in items:
            self.log.warning("item %s of %r is dead after attempt %s/%s: %s", item.id, item.queue, item.attempts,
                             item.max_attempts, error_headline(item.last_error), queue=item.queue, items=[item.id])

    def prune(self) -> None:
        """Keep the hot table small: delete the queues' finished items older than prune_after."""
        assert self.prune_after is not None
        for queue in dict.fromkeys(lane.opts.queue for lane in self.lanes):
            n = self.store.purge(queue, self.prune_after)
            if n:
                self.log.info("pruned %d finished item(s) of %r older than %gs", n, queue, self.prune_after, queue=queue)


class Watchdog(_Service):
    """Gives up on sync handler runs past timeout_seconds: their items are retried, a fresh thread
    takes the place of each abandoned one."""

    name = "conveyor-watchdog"

    def __init__(self, lanes: Sequence[Lane], outcomes: OutcomeBuffer, state: RunState,
                 on_failure: Callable[[], None], interval: float):
        super().__init__(on_failure, outcomes.log)
        self.lanes = list(lanes)
        self.outcomes = outcomes
        self.state = state
        self.interval = interval

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.expire_overdue()

    def expire_overdue(self) -> None:
        for lane in self.lanes:
            for items in lane.expire_overdue():
                timeout = lane.opts.timeout_seconds
                ids = [it.id for it in items]
                self.log.warning("handler for %r ran past timeout_seconds=%g on item(s) %s: abandoned, item(s) retried",
                                 lane.opts.queue, timeout, some(ids), queue=lane.opts.queue, items=ids)
                exc = TimeoutError(f"handler ran past timeout_seconds={timeout:g}; its thread was abandoned")
                self.outcomes.failed(lane.opts, items, exc)
                if not self.state.stopping:
                    lane.add_thread()  # keep `concurrency` threads at work
