"""Checks the demo's outcome from the database alone, and measures it.

Each check reads the demo's tables (and the deliveries queue's counts through `App.stats`) after the
run, so it proves what was stored, not what the processes believed they did.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..app import App
from .world import DONE, ORDERS, run


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


def overlaps(trips: list[tuple[Any, ...]]) -> list[str]:
    """(order, driver, assigned_at, delivered_at) rows: where one driver's trips overlap in time."""
    by_driver: dict[int, list[tuple[Any, ...]]] = {}
    for t in trips:
        by_driver.setdefault(t[1], []).append(t)
    found = []
    for driver, mine in by_driver.items():
        mine.sort(key=lambda t: t[2])
        for a, b in zip(mine, mine[1:]):
            if a[3] is None or a[3] > b[2]:
                found.append(f"driver {driver}: order {a[0]} still out when order {b[0]} was booked")
    return found


def verify(app: App, conn: Any, deliveries: str, orders: int) -> list[Check]:
    """Every check of the run, in the order they are printed."""
    checks = []
    statuses = dict(run(conn, f"SELECT status, count(*) FROM {ORDERS} WHERE id > 0 GROUP BY status").fetchall())
    assigned = statuses.pop(DONE, 0)
    checks.append(Check(
        "every order assigned, none left waiting or assigning", assigned == orders and not statuses,
        f"{assigned:,}/{orders:,} assigned" + (f", {statuses}" if statuses else ""),
    ))

    trips = run(conn, f"SELECT id, driver_id, assigned_at, delivered_at FROM {ORDERS} WHERE driver_id IS NOT NULL "
                      "ORDER BY id").fetchall()
    placed = {r[0] for r in run(conn, f"SELECT id FROM {ORDERS} WHERE id > 0").fetchall()}
    driven = [t[0] for t in trips if t[0] > 0]
    missing = sorted(set(range(1, orders + 1)) - set(driven))
    unknown = sorted(placed - set(range(1, orders + 1)))
    made = dict(run(conn, "SELECT id, deliveries FROM demo_drivers").fetchall())
    per_driver: dict[int, int] = {}
    for t in trips:
        per_driver[t[1]] = per_driver.get(t[1], 0) + 1
    # an order booked twice leaves one more delivery than trips with some driver
    twice = [f"driver {d} made {n} deliveries but holds {per_driver.get(d, 0)} orders"
             for d, n in made.items() if n != per_driver.get(d, 0)]
    checks.append(Check(
        "every order has exactly one driver", not missing and not unknown and not twice,
        f"{len(driven):,} orders with a driver" + (f"; without one: {missing[:5]}" if missing else "")
        + (f"; unknown orders {unknown[:5]}" if unknown else "") + (f"; {twice[0]}" if twice else ""),
    ))

    found = overlaps(trips)
    checks.append(Check(
        "no double booking: a driver's trips never overlap", not found,
        f"{len(trips):,} trips of {len(per_driver)} drivers checked"
        + (f"; {len(found)} overlap(s), e.g. {found[0]}" if found else ""),
    ))

    held = [f"driver {i} still holds order {cur}" for i, avail, cur in
            run(conn, "SELECT id, available, current_order FROM demo_drivers").fetchall() if not avail or cur is not None]
    open_trips = sum(1 for t in trips if t[3] is None)
    resolved = app.stats([deliveries])[deliveries]["resolved"]
    checks.append(Check(
        "every trip delivered, every driver free again", not held and not open_trips and resolved == len(trips),
        f"{resolved:,} deliveries resolved for {len(trips):,} trips"
        + (f"; {open_trips} trip(s) never delivered" if open_trips else "")
        + (f"; {len(held)} driver(s) busy, e.g. {held[0]}" if held else ""),
    ))
    return checks


@dataclass(frozen=True)
class Measures:
    assigned: int
    waiting: int
    lag_p50: str
    lag_p95: str
    lag_max: str
    retries: int
    pickup_km: float
    per_second: float


def measure(conn: Any, now: float | None = None) -> Measures:
    """The orders' figures as the database holds them, at `now` (default: the last assignment).
    Lags are insert → assigned, in ms; an order still waiting counts with its wait so far, a lower
    bound, and a percentile that such an order may have pulled down is printed as `≥`. Orders per
    second: those assigned, from the first insert to the last assignment (to `now` while some wait)."""
    rows = run(conn, f"SELECT placed_at, assigned_at, pickup_km, conveyor_attempts FROM {ORDERS} WHERE id > 0").fetchall()
    done = [r for r in rows if r[1] is not None]
    if now is None:
        now = max((r[1] for r in done), default=0.0)
    lags = sorted((a - p if a is not None else now - p, a is None) for p, a, _, _ in rows)

    def pct(q: float) -> str:
        if not lags:
            return "-"
        k = min(len(lags) - 1, int(q * len(lags)))
        bound = any(waiting for _, waiting in lags[:k + 1])
        return ("≥ " if bound else "") + f"{lags[k][0] * 1000:,.0f}"

    # busy until `now` while orders wait; else until the last assignment
    end = now if len(done) < len(rows) else max((r[1] for r in done), default=now)
    span = end - min((r[0] for r in rows), default=now)
    return Measures(
        assigned=len(done), waiting=len(rows) - len(done), lag_p50=pct(0.50), lag_p95=pct(0.95), lag_max=pct(1.0),
        retries=sum(max(0, (r[3] or 0) - 1) for r in done),
        pickup_km=sum(r[2] for r in done) / len(done) if done else 0.0,
        per_second=len(done) / span if span > 0 else 0.0,
    )
