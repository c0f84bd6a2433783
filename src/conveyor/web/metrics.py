"""/metrics for Prometheus, from the database at scrape time, so every worker on every machine is
counted, with nothing for workers to send:

    conveyor_items{queue,state}                  gauge: items by state (a rows table: its rows)
    conveyor_oldest_pending_age_seconds{queue}   gauge: how long the oldest due pending item waits
    conveyor_items_submitted_total{queue}        counter
    conveyor_items_resolved_total{queue}         counter
    conveyor_items_dead_total{queue}             counter

The counters are kept by this process from the counts' growth between two reads (LiveStats, at
most one read a second): items stay in the table until purged, so the growth of a queue's total,
of its resolved and of its dead counts is what was submitted, resolved and dead-lettered in
between. A purge or a requeue between two reads hides as many as it removed from that interval
(rate() over minutes absorbs it; workers prune items days old). They start at what the table holds.

What the database does not keep comes from the workers, through prometheus_client's multiprocess
directory (see conveyor.worker.figures) when $PROMETHEUS_MULTIPROC_DIR is set for them and for serve:

    conveyor_handler_duration_seconds{queue}     histogram: handler run time
    conveyor_lag_seconds{queue}                  histogram: due time → handler start
    conveyor_items_retried_total{queue}          counter
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..model import STATES
from .live import LiveStats

COUNTED = {"submitted": "total", "resolved": "resolved", "dead": "dead"}


class DatabaseCollector(Collector):
    def __init__(self, live: LiveStats):
        self.live = live
        self._lock = threading.Lock()
        self._last: dict[str, dict[str, int]] = {}
        self._totals: dict[str, dict[str, int]] = {}

    def describe(self) -> list[Metric]:
        return []  # nothing read at registration: the database is read at scrape time

    def _count(self, stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
        with self._lock:
            for queue, entry in stats.items():
                last = self._last.setdefault(queue, {})
                totals = self._totals.setdefault(queue, {})
                for name, column in COUNTED.items():
                    now = int(entry[column])
                    totals[name] = totals.get(name, now) + max(0, now - last.get(column, now))
                    last[column] = now
            return {q: dict(t) for q, t in self._totals.items()}

    def collect(self) -> Iterator[Metric]:
        stats = self.live.read()
        items = GaugeMetricFamily("conveyor_items", "Items by queue and state (a rows table: its rows)",
                                  labels=["queue", "state"])
        oldest = GaugeMetricFamily("conveyor_oldest_pending_age_seconds",
                                   "Age of the oldest due pending item (0 when none waits)", labels=["queue"])
        for queue, entry in stats.items():
            for state in STATES:
                items.add_metric([queue, state], entry[state])
            if entry.get("rows"):
                items.add_metric([queue, "other"], entry.get("other", 0))
            oldest.add_metric([queue], entry["oldest_pending_seconds"] or 0.0)
        yield items
        yield oldest
        totals = self._count(stats)
        for name in COUNTED:
            family = CounterMetricFamily(f"conveyor_items_{name}", f"Items {name} (from the database's counts)",
                                         labels=["queue"])
            for queue, counts in totals.items():
                family.add_metric([queue], counts[name])
            yield family


def registry_for(live: LiveStats) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(live))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
