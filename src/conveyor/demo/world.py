"""The demo's world: a city, its restaurants and drivers, and the application's two tables.

`demo_orders` is the application's own table of orders, processed in place by conveyor (`@app.rows`):
an order is a row inserted with status `needs_assignment`; a worker claims it (`assigning`), books a
driver, and conveyor sets `assigned` in the same transaction. The row also holds the trip: its
driver, pickup distance, when it was placed, assigned, due and delivered. `demo_drivers` is the
fleet: where each driver is, whether they are free, and the order they hold.

The database itself refuses a double booking, whatever the code above it does: a driver's
`current_order` is unique, and a unique partial index on `demo_orders (driver_id)` over the trips
not yet delivered allows one open trip per driver.

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

CITY = "Lisbon"
CENTER = (38.7223, -9.1393)
KM_PER_DEG_LAT = 110.57
KM_PER_DEG_LON = 111.32 * math.cos(math.radians(CENTER[0]))
SIM_MINUTE = 0.01  # wall seconds per simulated minute: a 15-minute trip takes 0.15 s
SPEED_KM_PER_MIN = 0.5  # 30 km/h through the city
HANDOFF_MIN = 4.0  # pick-up and hand-over
BUSY_SHARE = 0.3  # drivers already out on a trip when the demo starts

#: the orders table and the values of its status column, as the application names them
ORDERS = "demo_orders"
PENDING, WORKING, DONE, DEAD = "needs_assignment", "assigning", "assigned", "unassignable"

RESTAURANTS = [
    "Tasca do Chico", "Pizzaria Roma", "Sushi Bairro", "Burger Cais", "Pastelaria Belem", "Curry Alfama",
    "Taqueria Rato", "Pho Saldanha", "Ramen Chiado", "Kebab Graca", "Padaria Estrela", "Poke Parque",
    "Marisqueira Sol", "Churrasqueira Luz", "Vegan Campo", "Dim Sum Areeiro", "Bifanas Anjos", "Gelataria Baixa",
    "Falafel Arroios", "Tapas Principe", "Bacalhau Sete", "Noodle Oriente", "Salad Lumiar", "Grill Benfica",
]


@dataclass(frozen=True)
class Order:
    """One order of the stream: where it is picked up (its restaurant) and dropped off."""

    id: int
    restaurant: str
    lat: float
    lon: float
    drop_lat: float
    drop_lon: float


def is_sqlite(conn: Any) -> bool:
    return isinstance(conn, sqlite3.Connection)


def run(conn: Any, sql: str, args: Sequence[Any] = ()) -> Any:
    """Execute on either driver: `?` placeholders become psycopg's `%s` when needed."""
    return conn.execute(sql if is_sqlite(conn) else sql.replace("?", "%s"), tuple(args))


def run_many(conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """One statement over many rows (psycopg pipelines them: one round trip); returns the rows
    changed in all."""
    if is_sqlite(conn):
        return int(conn.executemany(sql, rows).rowcount)
    with conn.cursor() as cur:
        cur.executemany(sql.replace("?", "%s"), rows)
        return int(cur.rowcount)


def km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    return math.hypot((lat1 - lat2) * KM_PER_DEG_LAT, (lon1 - lon2) * KM_PER_DEG_LON)


def around(rng: random.Random, radius_km: float) -> tuple[float, float]:
    """A random point within `radius_km` of the city centre."""
    r, a = radius_km * math.sqrt(rng.random()), rng.random() * 2 * math.pi
    return CENTER[0] + r * math.sin(a) / KM_PER_DEG_LAT, CENTER[1] + r * math.cos(a) / KM_PER_DEG_LON


def restaurant_places(seed: int = 7) -> dict[str, tuple[float, float]]:
    rng = random.Random(seed)
    return {name: around(rng, 4.0) for name in RESTAURANTS}


def order_stream(count: int, seed: int) -> list[Order]:
    """The orders of a run, the same for the same seed: some restaurants twice as busy as others."""
    rng = random.Random(seed + 2)
    places = restaurant_places()
    weights = [2 - n / len(RESTAURANTS) for n in range(len(RESTAURANTS))]
    orders = []
    for order_id in range(1, count + 1):
        name = rng.choices(RESTAURANTS, weights)[0]
        drop = around(rng, 5.0)
        orders.append(Order(order_id, name, *places[name], *drop))
    return orders


def trip_minutes(pickup_km: float, order: dict[str, Any]) -> float:
    """Simulated minutes from booking to hand-over: to the restaurant, then to the customer."""
    return HANDOFF_MIN + (pickup_km + km(order["lat"], order["lon"], order["drop_lat"], order["drop_lon"])) / SPEED_KM_PER_MIN


# -- schema ---------------------------------------------------------------------------------------
# DOUBLE PRECISION: PostgreSQL's REAL is 4 bytes, too coarse for unix seconds; SQLite reads the
# same name as REAL (8 bytes). TRUE/FALSE literals work on both (SQLite >= 3.23). INTEGER PRIMARY
# KEY is SQLite's rowid itself.
SCHEMA = [
    f"DROP TABLE IF EXISTS {ORDERS}",
    "DROP TABLE IF EXISTS demo_assignments",  # an older demo's table
    "DROP TABLE IF EXISTS demo_drivers",
    """CREATE TABLE demo_drivers (
        id            INTEGER PRIMARY KEY,
        name          TEXT NOT NULL,
        lat           DOUBLE PRECISION NOT NULL,
        lon           DOUBLE PRECISION NOT NULL,
        available     BOOLEAN NOT NULL,
        current_order INTEGER UNIQUE,
        deliveries    INTEGER NOT NULL DEFAULT 0,
        CHECK (available = (current_order IS NULL)))""",
    f"""CREATE TABLE {ORDERS} (
        id           INTEGER PRIMARY KEY,
        restaurant   TEXT NOT NULL,
        lat          DOUBLE PRECISION NOT NULL,
        lon          DOUBLE PRECISION NOT NULL,
        drop_lat     DOUBLE PRECISION NOT NULL,
        drop_lon     DOUBLE PRECISION NOT NULL,
        placed_at    DOUBLE PRECISION NOT NULL,
        status       TEXT NOT NULL,
        driver_id    INTEGER REFERENCES demo_drivers (id),
        pickup_km    DOUBLE PRECISION,
        assigned_at  DOUBLE PRECISION,
        due_at       DOUBLE PRECISION,
        delivered_at DOUBLE PRECISION)""",
    # the database itself refuses a second open trip for one driver
    f"CREATE UNIQUE INDEX demo_orders_open_trip ON {ORDERS} (driver_id) WHERE driver_id IS NOT NULL AND delivered_at IS NULL",
]
INSERT_ORDER = (f"INSERT INTO {ORDERS} (id, restaurant, lat, lon, drop_lat, drop_lon, placed_at, status) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?, '{PENDING}')")


def reset_world(app: App, conn: Any, deliveries: str, drivers: int, seed: int) -> int:
    """(Re)create the demo tables and place `drivers` drivers around the city, a share of them busy
    on a trip that started before the demo: an order with an id <= 0, already `assigned`, whose
    delivery is queued like any other. Runs on the store's connection, in the caller's transaction.
    Returns how many drivers are busy."""
    rng = random.Random(seed)
    for statement in SCHEMA:
        run(conn, statement)
    now = time.time()
    busy = 0
    for n in range(1, drivers + 1):
        lat, lon = around(rng, 5.0)
        if rng.random() >= BUSY_SHARE:
            run(conn, "INSERT INTO demo_drivers (id, name, lat, lon, available) VALUES (?, ?, ?, ?, TRUE)",
                (n, f"driver-{n:04d}", lat, lon))
            continue
        busy += 1
        trip, due_at = -n, now + rng.uniform(2, 25) * SIM_MINUTE
        drop = around(rng, 5.0)
        run(conn, "INSERT INTO demo_drivers (id, name, lat, lon, available, current_order) VALUES (?, ?, ?, ?, FALSE, ?)",
            (n, f"driver-{n:04d}", lat, lon, trip))
        run(conn, f"INSERT INTO {ORDERS} (id, restaurant, lat, lon, drop_lat, drop_lon, placed_at, status, driver_id, "
                  f"pickup_km, assigned_at, due_at) VALUES (?, '(before the demo)', ?, ?, ?, ?, ?, '{DONE}', "
                  "?, 0, ?, ?)", (trip, lat, lon, *drop, now, n, now, due_at))
        app.submit(deliveries, {"order_id": trip, "driver_id": n, "lat": drop[0], "lon": drop[1]}, run_at=due_at)
    return busy
