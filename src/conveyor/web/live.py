"""What the dashboard and /metrics read over and over, read from the database at most once a second
whatever the number of viewers and scrapers: the queues' stats, and a history of samples taken in
the background for the throughput and lag charts."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from ..app import App
from ..errors import ConveyorError

log = logging.getLogger("conveyor.web")

#: stats younger than this are served from memory
STATS_TTL = 1.0
#: while the sampler runs, requests serve its latest stats unless they are older than this
STALE = 10.0
#: the charts' resolution and span: a sample every 2 s, the last 10 minutes
SAMPLE_EVERY = 2.0
SAMPLES = 300


class LiveStats:
    """App.stats() of the served queues (an app's own, or every queue the database holds), shared
    by every request within STATS_TTL. App.stats counts from partial indexes, so a read stays fast
    with a million items in the table; this keeps a dozen open dashboards from multiplying it."""

    def __init__(self, app: App, queues: list[str] | None):
        self.app = app
        self.queues = queues
        self._lock = threading.Lock()
        self._at = 0.0
        self._stats: dict[str, dict[str, Any]] = {}
        self.samples: collections.deque[tuple[float, dict[str, dict[str, Any]]]] = collections.deque(maxlen=SAMPLES)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, dict[str, Any]]:
        """The latest stats. While the sampler runs it alone queries, so no request waits on the
        database (on SQLite, App.stats over a million finished items takes ~0.35 s: it counts their
        index entries); without it, or when its stats are stale, the request reads them."""
        if self._thread is not None and time.monotonic() - self._at < STALE:
            return self._stats
        return self._refresh(STATS_TTL)

    def _refresh(self, ttl: float) -> dict[str, dict[str, Any]]:
        with self._lock:  # one reader at a time: the others wait for its result instead of querying too
            if time.monotonic() - self._at >= ttl:
                self._stats = self.app.stats(self.queues)
                self._at = time.monotonic()
            return self._stats

    # -- the history ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample_loop, name="conveyor-web-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            # a slow read (App.stats over a million items: 0.35 s on SQLite, 0.8 s on PostgreSQL
            # here) spaces the samples out, so the dashboard never keeps the database a third busy
            self._stop.wait(max(SAMPLE_EVERY, 3 * (time.monotonic() - started)))
        self.app.store.disconnect()

    def sample(self) -> None:
        try:
            stats = self._refresh(0.0)
        except ConveyorError as exc:  # the database is away: a gap in the charts, not a dead sampler
            log.warning("dashboard sample skipped: %s", exc)
            return
        self.samples.append((time.time(), stats))

    def history(self) -> dict[str, Any]:
        """Per queue, items finished per second between samples (resolved and dead) and the oldest
        pending item's age at each sample."""
        samples = list(self.samples)
        names = sorted({q for _, stats in samples for q in stats})
        out: dict[str, dict[str, list[float | None]]] = {q: {"throughput": [], "lag": []} for q in names}
        prev: dict[str, dict[str, Any]] | None = None
        prev_t = 0.0
        for t, stats in samples:
            for q in names:
                now, before = stats.get(q), (prev or {}).get(q)
                rate: float | None = None
                if now is not None and before is not None and t > prev_t:
                    done = (now["resolved"] + now["dead"]) - (before["resolved"] + before["dead"])
                    rate = round(max(0, done) / (t - prev_t), 3)  # a purge between two samples reads as 0
                out[q]["throughput"].append(rate)
                out[q]["lag"].append(None if now is None else now["oldest_pending_seconds"])
            prev, prev_t = stats, t
        return {"t": [round(t, 3) for t, _ in samples], "queues": out}
