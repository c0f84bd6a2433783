"""What handler runs came to, gathered between two cycles so one store call settles many of them,
and the worker's counters.

Handler threads, event-loop tasks, the watchdog and the cycle all record here; the cycle takes the
lot (`take`) and, if the store fails, puts it back in front (`restore`).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import Backoff, BatchErrors, Fail, Retry, UsageError
from ..model import Item, Outcomes, QueueOptions
from .backoff import backoff_delay
from .figures import figures
from .logs import WorkerLog

COUNTERS = ("claimed", "resolved", "retried", "dead", "released", "backedoff", "lost", "rescued")


@dataclass
class RunState:
    """The worker's switches, read by every lane and runner: stop claiming and starting; give up on
    running handlers at once (a second signal); and the worker's log, which every part writes to."""

    stopping: bool = False
    forced: bool = False
    log: WorkerLog = field(default_factory=lambda: WorkerLog("worker"))


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).strip()


def which(items: list[Item]) -> str:
    """The items of one run, for a log line: an id, or a batch's size."""
    return str(items[0].id) if len(items) == 1 else f"batch of {len(items)}"


def some(ids: Sequence[int], most: int = 20) -> str:
    """Ids for a log line: all of up to `most`, else the first ones and how many more."""
    shown = ", ".join(map(str, list(ids)[:most]))
    return shown if len(ids) <= most else f"{shown} and {len(ids) - most} more"


def split_batch(items: list[Item], exc: BatchErrors) -> tuple[list[Item], list[tuple[BaseException, list[Item]]]]:
    """The items a BatchErrors leaves resolved, and the others grouped by their exception. A
    BatchErrors naming an item not in the batch is a UsageError (the whole batch fails with it)."""
    by_id = {it.id: it for it in items}
    strangers = [i for i in exc.errors if i not in by_id]
    if strangers:
        wrong = UsageError(f"BatchErrors names item(s) {some(strangers)} that are not in this batch "
                           f"(its items: {some(list(by_id))}): the whole batch fails with it")
        wrong.__cause__ = exc
        raise wrong
    groups: dict[int, tuple[BaseException, list[Item]]] = {}
    for item_id, error in exc.errors.items():
        groups.setdefault(id(error), (error, []))[1].append(by_id[item_id])
    return [it for it in items if it.id not in exc.errors], list(groups.values())


class OutcomeBuffer:
    """Outcomes waiting to be settled, and counts of what this worker did."""

    def __init__(self, wake: threading.Event, log: WorkerLog):
        self.log = log
        #: set when outcomes are worth a cycle (the first one, or enough to fill a settle)
        self.wake = wake
        self._out = Outcomes()
        self._lock = threading.Lock()
        self._first = 0.0
        #: outcomes that make a cycle worth running at once (the cycle sets it from what runs)
        self.flush_at = 1
        self.counts = {key: 0 for key in COUNTERS}
        self.figures = figures()

    # -- recording (any thread) -------------------------------------------------------------------
    def _add(self, add: Any, n: int) -> None:
        with self._lock:
            before = len(self._out)
            add(self._out)
            if before == 0:
                self._first = time.monotonic()
        if before == 0 or before + n >= self.flush_at:
            self.wake.set()

    def resolved(self, items: list[Item]) -> None:
        """The hot path: a handler returned."""
        with self._lock:
            before = len(self._out)
            self._out.resolved.extend([(it.id, it.claim_token) for it in items])  # type: ignore[misc]
            if before == 0:
                self._first = time.monotonic()
        if before == 0 or before + len(items) >= self.flush_at:
            self.wake.set()

    def released(self, items: list[Item]) -> None:
        """Claimed but never started: back to pending, the attempt given back."""
        self._add(lambda o: o.released.extend((it.id, it.claim_token) for it in items), len(items))

    def failed(self, opts: QueueOptions, items: list[Item], exc: BaseException) -> None:
        """A handler raised (or was given up on): Fail → dead, anything else → retry with backoff,
        or dead once the attempts are spent (the store decides, by the item's attempts). A
        BatchErrors: each item it names as if it had raised its exception alone, the rest resolved."""
        if isinstance(exc, BatchErrors):
            try:
                rest, groups = split_batch(items, exc)
            except UsageError as wrong:
                exc = wrong
            else:
                if rest:
                    self.resolved(rest)
                for error, group in groups:
                    self.failed(opts, group, error)
                return
        toks = [(it.id, it.claim_token) for it in items]
        log, fields = self.log, {"queue": opts.queue, "items": [it.id for it in items]}
        if isinstance(exc, Fail):
            log.debug("handler for %r failed item %s (attempt %s): %s", opts.queue, which(items),
                      items[0].attempts, exc.reason, **fields)
            reason = f"Fail: {exc.reason}"
            self._add(lambda o: o.failed.extend((i, t, reason) for i, t in toks), len(items))
            return
        if isinstance(exc, Backoff):
            held = opts.queue if exc.scope == "queue" else "its key"
            log.info("handler for %r backed off item %s for %gs (%s held; no attempt spent): %s", opts.queue,
                     which(items), exc.seconds, held, exc.reason, **fields)
            entries_b = [(i, t, exc.seconds, exc.scope) for i, t in toks]
            self._add(lambda o: o.backedoff.extend(entries_b), len(items))
            return
        if isinstance(exc, Retry):
            text = f"Retry: {exc.reason}"
            log.debug("handler for %r asked for a retry of item %s (attempt %s/%s)%s: %s", opts.queue,
                      which(items), items[0].attempts, opts.max_attempts,
                      "" if exc.delay is None else f" in {exc.delay:g}s", exc.reason, **fields)
        else:
            text = error_text(exc)
            first = items[0]
            log.warning("handler for %r raised on item %s (attempt %s/%s): %s",
                        opts.queue, which(items), first.attempts, opts.max_attempts, f"{type(exc).__name__}: {exc}",
                        **fields)
        entries = []
        for (i, t), it in zip(toks, items):
            delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else backoff_delay(
                it.attempts, opts.backoff_base, opts.backoff_max)
            entries.append((i, t, delay, text))
        if self.figures is not None:  # the store sends an item with its attempts spent to dead instead
            self.figures.retried(opts.queue, sum(1 for it in items if it.attempts < (it.max_attempts or opts.max_attempts)))
        self._add(lambda o: o.retried.extend(entries), len(items))

    def count(self, key: str, n: int) -> None:
        with self._lock:
            self.counts[key] += n

    # -- the cycle --------------------------------------------------------------------------------
    def take(self) -> Outcomes:
        with self._lock:
            out, self._out = self._out, Outcomes()
        return out

    def restore(self, out: Outcomes) -> None:
        """A settle failed: put its outcomes back in front of any gathered since."""
        if not out:
            return
        with self._lock:
            out.extend(self._out)
            self._out = out
            self._first = time.monotonic()

    def waiting(self) -> tuple[int, float]:
        """How many outcomes wait, and since when (monotonic)."""
        with self._lock:
            return len(self._out), self._first
