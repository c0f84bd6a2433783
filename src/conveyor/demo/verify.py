"""Checks the demo's outcome from the database alone, and measures it.

Each check reads the demo tables (and the queues' counts through `App.stats`) after the run, so it
proves what was stored, not what the processes believed they did.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..app import App
from .world import Queues, run


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def connect(url: str) -> Any:
    """A plain read connection to the demo's database (autocommit), outside conveyor's store."""
    if url.lower().startswith("sqlite:"):
        from ..stores.sqlite import sqlite_path

        return sqlite3.connect(sqlite_path(url), isolation_level=None, timeout=60)
    import psycopg

    return psycopg.connect(re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url), autocommit=True)


def latest_queues(app: App) -> Queues | None:
    """The queues of the most recent demo run stored in this database (their names sort by time)."""
    tags = sorted(q.removeprefix("demo-orders-") for q in app.stats() if q.startswith("demo-orders-"))
    return Queues.for_run(tags[-1]) if tags else None


def _assignments(conn: Any) -> list[tuple[Any, ...]]:
    return run(conn, "SELECT order_id, restaurant, driver_id, assigned_at, delivered_at, due_at "
                     "FROM demo_assignments ORDER BY order_id").fetchall()


def verify(app: App, conn: Any, queues: Queues, orders: int) -> list[Check]:
    """Every check of the run, in the order they are printed."""
    checks = []
    stats = app.stats([queues.orders, queues.deliveries])
    o, d = stats[queues.orders], stats[queues.deliveries]
    unfinished = {k: o[k] for k in ("pending", "in_progress", "dead", "cancelled") if o[k]}
    checks.append(Check(
        "every order resolved", o["resolved"] == orders and not unfinished,
        f"{o['resolved']:,}/{orders:,} resolved" + (f", {unfinished}" if unfinished else ""),
    ))

    rows = _assignments(conn)
    real = [r for r in rows if r[0] > 0]
    ids = [r[0] for r in real]
    missing = sorted(set(range(1, orders + 1)) - set(ids))
    extra = sorted(set(ids) - set(range(1, orders + 1)))
    dupes = len(ids) - len(set(ids))
    checks.append(Check(
        "every order has exactly one assignment", not missing and not extra and not dupes,
        f"{len(set(ids)):,} orders assigned" + (f"; missing {missing[:5]}" if missing else "")
        + (f"; unknown {extra[:5]}" if extra else "") + (f"; {dupes} duplicated" if dupes else ""),
    ))

    by_driver: dict[int, list[tuple[Any, ...]]] = {}
    for r in rows:
        by_driver.setdefault(r[2], []).append(r)
    overlaps, open_trips = [], 0
    for driver, trips in by_driver.items():
        trips.sort(key=lambda r: r[3])
        open_trips += sum(1 for r in trips if r[4] is None)
        for a, b in zip(trips, trips[1:]):
            if a[4] is None or a[4] > b[3]:
                overlaps.append(f"driver {driver}: order {a[0]} still out when order {b[0]} was booked")
    checks.append(Check(
        "no double booking: a driver's trips never overlap", not overlaps,
        f"{len(rows):,} trips of {len(by_driver)} drivers checked"
        + (f"; {len(overlaps)} overlap(s), e.g. {overlaps[0]}" if overlaps else ""),
    ))

    wrong = []
    for i, avail, cur, made in run(conn, "SELECT id, available, current_order, deliveries FROM demo_drivers").fetchall():
        n_trips = len(by_driver.get(i, []))
        if not avail or cur is not None:
            wrong.append(f"driver {i} still holds order {cur}")
        elif made != n_trips:
            wrong.append(f"driver {i} made {made} deliveries but has {n_trips} trips")
    checks.append(Check(
        "every trip delivered, every driver free again", not wrong and not open_trips and d["resolved"] == len(rows),
        f"{d['resolved']:,} deliveries resolved"
        + (f"; {open_trips} trip(s) never delivered" if open_trips else "")
        + (f"; {len(wrong)} driver(s) inconsistent, e.g. {wrong[0]}" if wrong else ""),
    ))

    late = []
    last: dict[str, tuple[int, float]] = {}
    for r in real:  # ordered by order_id = submission order
        prev = last.get(r[1])
        if prev and r[3] <= prev[1]:
            late.append(f"{r[1]}: order {r[0]} assigned before order {prev[0]}")
        last[r[1]] = (r[0], r[3])
    checks.append(Check(
        "each restaurant's orders assigned in submission order", not late,
        f"{len(last)} restaurants" + (f"; {len(late)} out of order, e.g. {late[0]}" if late else ""),
    ))
    return checks


@dataclass(frozen=True)
class Measures:
    assigned: int
    lag_p50: float
    lag_p95: float
    lag_max: float
    retries: int
    span: float  # first order placed → last order assigned


def measure(conn: Any) -> Measures:
    rows = run(conn, "SELECT placed_at, assigned_at, attempts FROM demo_assignments WHERE order_id > 0").fetchall()
    if not rows:
        return Measures(0, 0.0, 0.0, 0.0, 0, 0.0)
    lags = sorted(a - p for p, a, _ in rows)

    def pct(q: float) -> float:
        return lags[min(len(lags) - 1, int(q * len(lags)))]

    return Measures(len(rows), pct(0.50), pct(0.95), lags[-1], sum(n - 1 for *_, n in rows),
                    max(a for _, a, _ in rows) - min(p for p, _, _ in rows))
