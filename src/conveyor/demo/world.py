"""The demo's world: drivers and restaurants around a city, the two demo tables, and the handlers.

Why the booking is correct under concurrency
--------------------------------------------
A driver is a row in `demo_drivers` with `available` and `current_order`. An order is booked by the
transactional `assign` handler, on the connection conveyor hands it, inside the transaction that also
resolves the order item:

1. pick the nearest available driver (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so two transactions never
   reach for the same row; SQLite: the handler already holds the single write lock of BEGIN IMMEDIATE);
2. book it with a guarded `UPDATE demo_drivers SET available = FALSE ... WHERE id = ? AND available`:
   if another transaction got there first the guard matches no row and the next driver is tried;
3. insert the assignment: `order_id` is the primary key (an order has at most one assignment) and a
   unique partial index on `driver_id WHERE delivered_at IS NULL` refuses a second active order of a
   driver at the database level, whatever the code above did;
4. submit the delivery's completion to the deliveries queue with `run_at` = when the trip ends. The
   submit joins the same transaction (an outbox): booking, assignment, completion and the order's
   resolution commit together or not at all, so a driver can never be booked and forgotten.

The `deliver` handler (transactional too) stamps `delivered_at` and frees the driver in one
transaction. A later booking of that driver can only read `available` after that commit, and it takes
its `assigned_at` after its guarded UPDATE succeeded, so windows of one driver never overlap.

No free driver: the handler raises `Retry(delay=...)` with the time until the next trip is due to end,
the transaction rolls back, and the order waits. The orders queue is `ordered=True` keyed by
restaurant, so a waiting order also holds back the later orders of its restaurant: each restaurant's
orders are assigned in submission order.

SQL: sqlite3 takes `?` parameters, psycopg `%s`; `run()` rewrites the text for the connection it gets.
"""

from __future__ import annotations

import math
import random
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..app import App
from ..errors import Retry

CITY = "Lisbon"
CENTER = (38.7223, -9.1393)
KM_PER_DEG_LAT = 110.57
KM_PER_DEG_LON = 111.32 * math.cos(math.radians(CENTER[0]))
SIM_MINUTE = 0.01  # wall seconds per simulated minute: a 15-minute trip takes 0.15 s
SPEED_KM_PER_MIN = 0.5  # 30 km/h through the city
HANDOFF_MIN = 4.0  # pick-up and hand-over

RESTAURANTS = [
    "Tasca do Chico", "Pizzaria Roma", "Sushi Bairro", "Burger Cais", "Pastelaria Belem", "Curry Alfama",
    "Taqueria Rato", "Pho Saldanha", "Ramen Chiado", "Kebab Graca", "Padaria Estrela", "Poke Parque",
    "Marisqueira Sol", "Churrasqueira Luz", "Vegan Campo", "Dim Sum Areeiro", "Bifanas Anjos", "Gelataria Baixa",
    "Falafel Arroios", "Tapas Principe", "Bacalhau Sete", "Noodle Oriente", "Salad Lumiar", "Grill Benfica",
]


@dataclass(frozen=True)
class Queues:
    """This run's queue names: unique per run, so an earlier run's leftovers are never mixed in."""

    orders: str
    deliveries: str

    @classmethod
    def for_run(cls, tag: str) -> Queues:
        return cls(f"demo-orders-{tag}", f"demo-deliveries-{tag}")


def is_sqlite(conn: Any) -> bool:
    return isinstance(conn, sqlite3.Connection)


def run(conn: Any, sql: str, args: Sequence[Any] = ()) -> Any:
    """Execute on either driver: `?` placeholders become psycopg's `%s` when needed."""
    return conn.execute(sql if is_sqlite(conn) else sql.replace("?", "%s"), tuple(args))


def km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    return math.hypot((lat1 - lat2) * KM_PER_DEG_LAT, (lon1 - lon2) * KM_PER_DEG_LON)


def around(rng: random.Random, radius_km: float) -> tuple[float, float]:
    """A random point within `radius_km` of the city centre."""
    r, a = radius_km * math.sqrt(rng.random()), rng.random() * 2 * math.pi
    return CENTER[0] + r * math.sin(a) / KM_PER_DEG_LAT, CENTER[1] + r * math.cos(a) / KM_PER_DEG_LON


def restaurant_places(seed: int = 7) -> dict[str, tuple[float, float]]:
    rng = random.Random(seed)
    return {name: around(rng, 4.0) for name in RESTAURANTS}


# -- schema ---------------------------------------------------------------------------------------
# DOUBLE PRECISION: PostgreSQL's REAL is 4 bytes, too coarse for unix seconds; SQLite reads the
# same name as REAL (8 bytes). TRUE/FALSE literals work on both (SQLite >= 3.23).
SCHEMA = [
    "DROP TABLE IF EXISTS demo_assignments",
    "DROP TABLE IF EXISTS demo_drivers",
    """CREATE TABLE demo_drivers (
        id            INTEGER PRIMARY KEY,
        name          TEXT NOT NULL,
        lat           DOUBLE PRECISION NOT NULL,
        lon           DOUBLE PRECISION NOT NULL,
        available     BOOLEAN NOT NULL,
        current_order BIGINT UNIQUE,
        deliveries    INTEGER NOT NULL DEFAULT 0,
        CHECK (available = (current_order IS NULL)))""",
    """CREATE TABLE demo_assignments (
        order_id     BIGINT PRIMARY KEY,
        restaurant   TEXT NOT NULL,
        driver_id    INTEGER NOT NULL REFERENCES demo_drivers (id),
        distance_km  DOUBLE PRECISION NOT NULL,
        placed_at    DOUBLE PRECISION NOT NULL,
        assigned_at  DOUBLE PRECISION NOT NULL,
        due_at       DOUBLE PRECISION NOT NULL,
        delivered_at DOUBLE PRECISION,
        attempts     INTEGER NOT NULL)""",
    # the database itself refuses a second active order for one driver
    "CREATE UNIQUE INDEX demo_assignments_active ON demo_assignments (driver_id) WHERE delivered_at IS NULL",
]


def reset_world(app: App, conn: Any, queues: Queues, drivers: int, busy_share: float, seed: int) -> int:
    """(Re)create the demo tables and place `drivers` drivers around the city, a share of them busy
    on a trip that started before the demo (order ids <= 0), whose completion is queued like any
    other. Runs on the store's connection, in the caller's transaction. Returns how many are busy."""
    rng = random.Random(seed)
    for statement in SCHEMA:
        run(conn, statement)
    now = time.time()
    busy = 0
    for n in range(1, drivers + 1):
        lat, lon = around(rng, 5.0)
        if rng.random() >= busy_share:
            run(conn, "INSERT INTO demo_drivers (id, name, lat, lon, available) VALUES (?, ?, ?, ?, TRUE)",
                (n, f"driver-{n:04d}", lat, lon))
            continue
        busy += 1
        trip, due_at = -n, now + rng.uniform(2, 25) * SIM_MINUTE
        run(conn, "INSERT INTO demo_drivers (id, name, lat, lon, available, current_order) VALUES (?, ?, ?, ?, FALSE, ?)",
            (n, f"driver-{n:04d}", lat, lon, trip))
        run(conn, _ASSIGN, (trip, "(before the demo)", n, 0.0, now, now, due_at, 1))
        drop = around(rng, 5.0)
        app.submit(queues.deliveries, {"order_id": trip, "driver_id": n, "lat": drop[0], "lon": drop[1]},
                   run_at=due_at)
    return busy


# -- handlers -------------------------------------------------------------------------------------
_NEAREST = """
SELECT id, lat, lon FROM demo_drivers
 WHERE available
 ORDER BY ((lat - ?) * ?) * ((lat - ?) * ?) + ((lon - ?) * ?) * ((lon - ?) * ?), id
 LIMIT 1"""
_BOOK = "UPDATE demo_drivers SET available = FALSE, current_order = ? WHERE id = ? AND available"
_ASSIGN = """
INSERT INTO demo_assignments (order_id, restaurant, driver_id, distance_km, placed_at, assigned_at, due_at, attempts)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)"""
_NEXT_DUE = "SELECT min(due_at) FROM demo_assignments WHERE delivered_at IS NULL"
_DELIVERED = "UPDATE demo_assignments SET delivered_at = ? WHERE order_id = ? AND delivered_at IS NULL"
_FREE = """
UPDATE demo_drivers SET available = TRUE, current_order = NULL, lat = ?, lon = ?, deliveries = deliveries + 1
 WHERE id = ? AND current_order = ?"""


def nearest_free_driver(conn: Any, lat: float, lon: float) -> tuple[int, float, float] | None:
    sql = _NEAREST if is_sqlite(conn) else _NEAREST + " FOR UPDATE SKIP LOCKED"
    a, b = KM_PER_DEG_LAT, KM_PER_DEG_LON
    return run(conn, sql, (lat, a, lat, a, lon, b, lon, b)).fetchone()


def register(app: App, queues: Queues, *, concurrency: int = 4, seed: int = 0) -> None:
    """Register this run's two processors on `app`."""

    @app.processor(queues.orders, transactional=True, ordered=True, batch_size=32, concurrency=concurrency,
                   max_attempts=1_000_000, lease_seconds=30)
    def assign(item: Any, conn: Any) -> None:
        """Book the nearest free driver for this order, or wait for one."""
        order = item.payload
        for _ in range(100):  # a guard miss means another transaction took that driver: try the next
            found = nearest_free_driver(conn, order["lat"], order["lon"])
            if found is None:
                due = run(conn, _NEXT_DUE).fetchone()[0]
                wait = 0.02 if due is None else max(0.005, due - time.time())
                raise Retry(delay=wait + random.uniform(0, 0.01), reason="no driver free")
            driver, dlat, dlon = found
            if run(conn, _BOOK, (order["order_id"], driver)).rowcount == 1:
                break
        else:
            raise Retry(delay=0.01, reason="drivers kept being taken by other workers")
        assigned_at = time.time()  # after the booking: any earlier trip of this driver has ended
        pickup = km(dlat, dlon, order["lat"], order["lon"])
        rng = random.Random(order["order_id"] * 7919 + seed)
        drop = around(rng, 5.0)
        trip_min = HANDOFF_MIN + (pickup + km(order["lat"], order["lon"], *drop)) / SPEED_KM_PER_MIN
        due_at = assigned_at + trip_min * SIM_MINUTE
        placed_at = item.created_at.timestamp() if item.created_at else assigned_at
        run(conn, _ASSIGN, (order["order_id"], order["restaurant"], driver, round(pickup, 3), placed_at,
                            assigned_at, due_at, item.attempts))
        # joins this transaction: the trip's completion is queued only if the booking commits
        app.submit(queues.deliveries, {"order_id": order["order_id"], "driver_id": driver,
                                       "lat": drop[0], "lon": drop[1]}, run_at=due_at)

    @app.processor(queues.deliveries, transactional=True, batch=True, batch_size=50, concurrency=1,
                   max_attempts=100, lease_seconds=30)
    def deliver(items: list[Any], conn: Any) -> None:
        """Trips that ended: stamp the delivery and free the driver at the drop-off point."""
        for item in items:
            trip = item.payload
            if "order_id" not in trip:  # the run's hold item: nothing to deliver
                continue
            delivered_at = time.time()  # before the commit that frees the driver
            run(conn, _DELIVERED, (delivered_at, trip["order_id"]))
            freed = run(conn, _FREE, (trip["lat"], trip["lon"], trip["driver_id"], trip["order_id"])).rowcount
            if freed != 1:
                raise RuntimeError(f"driver {trip['driver_id']} does not hold order {trip['order_id']}")
