"""Maintenance threads of a worker process, each on its own connection or none:

- the keeper extends the leases of every item the worker holds (heartbeat), rescues items whose
  lease expired, whoever held them, and, with prune_after, deletes finished items that old from its
  queues; each one statement, safe from any number of workers at once;
- the watchdog gives up on handler runs past timeout_seconds; it touches no database, so a stalled
  database (SQLite's write lock held by a hung transactional handler, say) cannot delay it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("conveyor.worker")


def keep_leases(self: "Worker", stop: threading.Event) -> None:
    """Heartbeat and rescue, until `stop` is set."""
    store = self.app.store
    next_beat = time.monotonic() + self.heartbeat_interval
    next_rescue = next_prune = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        try:
            if now >= next_beat:
                next_beat = now + self.heartbeat_interval
                for lane in self.lanes.values():
                    tokens = lane.tokens()
                    if tokens:
                        refused = store.extend_leases(tokens, lane.opts.lease_seconds)
                        if refused:
                            # an item settled meanwhile (a transactional commit, say) was refused
                            # for being done, not lost: only what we still hold counts
                            asked = dict(tokens)
                            with lane.lock:
                                lost = [(i, asked[i]) for i in refused
                                        if i in lane.inflight and lane.inflight[i].claim_token == asked[i]]
                                lane.lost.update(lost)
                            if lost:
                                log.warning("heartbeat: lease lost on item(s) %s", [i for i, _ in lost][:20])
            if now >= next_rescue:
                next_rescue = now + self.rescue_interval
                rescued = store.rescue_expired()
                if rescued:
                    self._count("rescued", len(rescued))
                    dead = sum(1 for _, s in rescued if s == "dead")
                    log.warning("rescued %d item(s) whose lease expired (%d dead: attempts spent)", len(rescued), dead)
                    self.app.wakeup.set()
            if self.prune_after is not None and now >= next_prune:
                next_prune = now + self.prune_interval
                prune(self)
        except Exception as exc:  # the keeper must outlive a database hiccup
            log.warning("heartbeat/rescue failed, will retry: %s", exc)
        stop.wait(max(0.01, min(next_beat, next_rescue) - time.monotonic()))
    self.app.store.disconnect()

def watch_timeouts(self: "Worker", stop: threading.Event) -> None:
    """Give up on overdue handler runs, until `stop` is set."""
    while not self._keeper_stop.wait(self.timeout_check):
        expire_overdue(self)

def expire_overdue(self: "Worker") -> None:
    for lane in self.lanes.values():
        for items in lane.expire_overdue():
            timeout = lane.opts.timeout_seconds
            log.warning("handler for %r ran past timeout_seconds=%g on item(s) %s: abandoned, item(s) retried",
                        lane.opts.queue, timeout, [it.id for it in items][:10])
            exc = TimeoutError(f"handler ran past timeout_seconds={timeout:g}; its thread was abandoned")
            self._record_result(lane, items, exc)
            if not self.stopping:
                lane.add_thread()  # keep `concurrency` threads at work


def prune(self: "Worker") -> None:
    """Keep the hot table small: delete the worker's queues' finished items older than prune_after."""
    assert self.prune_after is not None
    for queue in self.queues:
        n = self.app.store.purge(queue, self.prune_after)
        if n:
            log.info("pruned %d finished item(s) of %r older than %gs", n, queue, self.prune_after)
