"""Worker figures for Prometheus that the database does not keep: how long handlers run, how late
items start (due → handler start), and how many runs asked for a retry.

They reach `conveyor serve`'s /metrics through prometheus_client's multiprocess mode: when
$PROMETHEUS_MULTIPROC_DIR is set (and the `web` extra installed), each worker process writes its
figures to memory-mapped files there, and serve, started with the same directory, sums them at
scrape time. Counts by state, submits, resolutions and deaths come from the database instead (see
conveyor.web.metrics), so they cover workers on every machine; these three cover the workers that
share serve's directory. Without the variable nothing is recorded and nothing is imported.
"""

from __future__ import annotations

import os

from ..model import Item

#: seconds: from a millisecond handler to a slow batch, and from a prompt start to a backlog
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Figures:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.duration = Histogram("conveyor_handler_duration_seconds", "Handler run time, per run (a batch is one run)",
                                  ["queue"], buckets=BUCKETS)
        self.lag = Histogram("conveyor_lag_seconds", "From an item's due time (run_at) to its handler's start",
                             ["queue"], buckets=BUCKETS)
        self.retries = Counter("conveyor_items_retried", "Handler runs that raised and left the item another attempt",
                               ["queue"])

    def ran(self, queue: str, items: list[Item], started: float, seconds: float) -> None:
        self.duration.labels(queue).observe(seconds)
        lag = self.lag.labels(queue)
        for item in items:
            if item.run_at is not None:
                lag.observe(max(0.0, started - item.run_at.timestamp()))

    def retried(self, queue: str, n: int) -> None:
        if n:
            self.retries.labels(queue).inc(n)


_figures: list[Figures | None] = []


def figures() -> Figures | None:
    """The process's Figures, or None when $PROMETHEUS_MULTIPROC_DIR is not set or prometheus_client
    is not installed."""
    if not _figures:
        found: Figures | None = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            try:
                found = Figures()
            except ImportError:
                found = None
        _figures.append(found)
    return _figures[0]


