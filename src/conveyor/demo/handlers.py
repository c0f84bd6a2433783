"""The demo's two processors: `assign` matches a claimed batch of orders to the free drivers,
`deliver` ends trips and frees their drivers.

Why the booking is correct under concurrency
--------------------------------------------
`assign` is a transactional batch handler of the orders table, processed in place: conveyor claims a
batch of `needs_assignment` rows (now `assigning`), calls the handler on the connection of the
transaction that will set them `assigned`, and commits the handler's writes with that change:

1. match one batch at a time: on SQLite the transaction already holds the database's one write lock
   (BEGIN IMMEDIATE); on PostgreSQL a transaction-level advisory lock, taken first, does the same for
   matchers (deliveries go on meanwhile). Then read the free drivers: nobody else books them until
   this transaction ends. Not `SELECT ... FOR UPDATE` on the free drivers: under READ COMMITTED a row
   it re-checks and skips (a driver booked meanwhile) stays locked, so a delivery freeing that
   driver waits for the matcher while the matcher waits for the delivery: a deadlock;
2. match the batch to them by least total pickup distance (an optimal assignment,
   `scipy.optimize.linear_sum_assignment`), not each order to its nearest driver in turn;
3. book each driver with a guarded `UPDATE ... WHERE id = ? AND available` and write the driver onto
   the order's row; a unique index allows one open trip per driver, whatever the code above did;
4. submit each trip's end to the deliveries queue with `run_at` = when it ends. The submit joins the
   same transaction (an outbox): bookings, trips and the orders' `assigned` commit together or not at
   all, so a driver can never be booked and forgotten, nor an order assigned without a driver.

`deliver` (transactional too) stamps `delivered_at` and frees the driver at the drop-off point. A
later booking of that driver can only read it free after that commit, and takes its `assigned_at`
after its guarded UPDATE succeeded, so the trips of one driver never overlap in time.

Why a batch is assigned whole or not at all
-------------------------------------------
conveyor settles the rows of a batch together: when the handler returns, every row of the batch
becomes `assigned`, in the transaction that holds the handler's writes; when it raises, none does
and the writes roll back. A batch cannot end with some rows assigned and the others waiting again.
Writing `needs_assignment` back onto some rows from the handler does not do it either: the
resolution is fenced by the working value, so conveyor refuses those rows and rolls back the whole
transaction, assignments and all.

So a batch is served whole. When fewer drivers are free than the batch holds orders, the handler
books nothing and raises `Retry`, with the time until enough trips should have ended: the batch's
orders wait (`needs_assignment` again, not claimed before then) and are matched then, against the
drivers free at that moment. Serving part of the batch is not plainly better either: the least-cost
part is the orders nearest the free drivers, so the far ones could be left waiting again and again.
To keep the wait rare and short, a batch holds at most an eighth of the fleet (`batch_cap`), and
under light load claims are small anyway: a claim takes only the orders that are waiting.

Each statement serves the whole batch: the bookings and the orders' drivers are one statement each
over the batch's rows, the trips' ends one submit (`App.submit_items`: one item per trip, each due
when its trip ends). On PostgreSQL, where round trips cost most, a submit per trip held the
matching twice as long: `--compare`'s asynchronous run assigned 290 orders a second, against 510.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..app import App
from ..codec import encode
from ..errors import Retry
from ..model import NewItem
from .world import (
    DEAD,
    DONE,
    KM_PER_DEG_LAT,
    KM_PER_DEG_LON,
    ORDERS,
    PENDING,
    SIM_MINUTE,
    WORKING,
    is_sqlite,
    run,
    run_many,
    trip_minutes,
)

#: orders wait this long at most before their batch is matched again (trips end all the time)
WAIT_MAX = 0.25
#: a trip's end is handled a little after it is due (the deliveries queue's claim): wait that too
DELIVERY_LAG = 0.015

_FREE_DRIVERS = "SELECT id, lat, lon FROM demo_drivers WHERE available ORDER BY id"
_ONE_MATCHER = "SELECT pg_advisory_xact_lock(hashtext('conveyor demo: matching'))"  # PostgreSQL
_BOOK = "UPDATE demo_drivers SET available = FALSE, current_order = ? WHERE id = ? AND available"
_ASSIGN = f"UPDATE {ORDERS} SET driver_id = ?, pickup_km = ?, assigned_at = ?, due_at = ? WHERE id = ?"
# when the n-th next trip ends (the partial index demo_orders_open_trip holds one entry per busy driver)
_NTH_DUE = (f"SELECT due_at FROM {ORDERS} WHERE driver_id IS NOT NULL AND delivered_at IS NULL "
            "ORDER BY due_at LIMIT 1 OFFSET ?")
_DELIVERED = f"UPDATE {ORDERS} SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL"
_FREE = """
UPDATE demo_drivers SET available = TRUE, current_order = NULL, lat = ?, lon = ?, deliveries = deliveries + 1
 WHERE id = ? AND current_order = ?"""


def batch_cap(batch_size: int, drivers: int) -> int:
    """The batch size to claim: at most an eighth of the fleet (see the module's docstring)."""
    return max(1, min(batch_size, drivers // 8))


def match(orders: list[dict[str, Any]], drivers: list[tuple[int, float, float]]) -> list[tuple[int, int, float]]:
    """(order index, driver index, pickup km) for each order, each driver used at most once, with the
    least total pickup distance. Needs len(orders) <= len(drivers)."""
    olat = np.array([o["lat"] for o in orders])[:, None]
    olon = np.array([o["lon"] for o in orders])[:, None]
    dlat = np.array([d[1] for d in drivers])[None, :]
    dlon = np.array([d[2] for d in drivers])[None, :]
    cost = np.hypot((olat - dlat) * KM_PER_DEG_LAT, (olon - dlon) * KM_PER_DEG_LON)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c), float(cost[r, c])) for r, c in zip(rows, cols)]


def _until_drivers_free(conn: Any, needed: int) -> float:
    """Seconds until `needed` more drivers should be free (their trips ended and were handled)."""
    row = run(conn, _NTH_DUE, (needed - 1,)).fetchone()
    wait = WAIT_MAX if row is None else row[0] + DELIVERY_LAG - time.time()
    return min(WAIT_MAX, max(0.005, wait)) + random.uniform(0, 0.005)


def register(app: App, deliveries: str, *, drivers: int, batch_size: int = 32, concurrency: int = 1) -> None:
    """Register the orders table's processor and the deliveries queue's on `app`."""

    @app.rows(ORDERS, status="status", pending=PENDING, working=WORKING, done=DONE, dead=DEAD, batch=True,
              transactional=True, batch_size=batch_cap(batch_size, drivers), concurrency=concurrency,
              max_attempts=1_000_000, lease_seconds=30)
    def assign(items: list[Any], conn: Any) -> None:
        """Match this batch of orders to free drivers, all of them or none (see above)."""
        orders = [item.payload for item in items]
        if not is_sqlite(conn):
            run(conn, _ONE_MATCHER)
        free = run(conn, _FREE_DRIVERS).fetchall()
        if len(free) < len(orders):
            raise Retry(delay=_until_drivers_free(conn, len(orders) - len(free)),
                        reason=f"{len(free)} free driver(s) for {len(orders)} order(s)")
        pairs = [(orders[o], free[d][0], pickup) for o, d, pickup in match(orders, free)]
        if run_many(conn, _BOOK, [(order["id"], driver) for order, driver, _ in pairs]) != len(pairs):
            raise Retry(delay=0.01, reason="a driver was taken by another transaction")  # cannot happen: one matcher
        assigned_at = time.time()  # after the bookings: any earlier trip of these drivers has ended
        trips = [(order, driver, pickup, assigned_at + trip_minutes(pickup, order) * SIM_MINUTE)
                 for order, driver, pickup in pairs]
        run_many(conn, _ASSIGN, [(driver, round(pickup, 3), assigned_at, due_at, order["id"])
                                 for order, driver, pickup, due_at in trips])
        # each trip's end, due when the trip ends, in one statement that joins this transaction:
        # queued only if the bookings commit
        app.submit_items([NewItem(deliveries, encode({"order_id": order["id"], "driver_id": driver,
                                                      "lat": order["drop_lat"], "lon": order["drop_lon"]}),
                                  run_at=due_at) for order, driver, _, due_at in trips])

    @app.processor(deliveries, transactional=True, batch=True, batch_size=50, concurrency=1,
                   max_attempts=100, lease_seconds=30)
    def deliver(items: list[Any], conn: Any) -> None:
        """Trips that ended: stamp the delivery and free the driver at the drop-off point."""
        for item in items:
            trip = item.payload
            delivered_at = time.time()  # before the commit that frees the driver
            run(conn, _DELIVERED, (delivered_at, trip["order_id"]))
            freed = run(conn, _FREE, (trip["lat"], trip["lon"], trip["driver_id"], trip["order_id"])).rowcount
            if freed != 1:
                raise RuntimeError(f"driver {trip['driver_id']} does not hold order {trip['order_id']}")
