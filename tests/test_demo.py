"""`conveyor demo` end to end, as a user runs it, checked from the database; `--compare`; and proof
that the demo's own checks can fail.

The tests run the real command in a subprocess (on a fresh SQLite file and on PostgreSQL), then read
the demo's tables with their own SQL, not the demo's report: every order has exactly one driver, no
driver holds two orders at once, and no order is left waiting or being assigned. The demo stops its
workers once the database says every order is assigned and every trip delivered, so a test waits on
that condition through the command itself, never on a sleep.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from typing import Any

import pytest

import conveyor
from conveyor.demo.verify import verify

pytestmark = pytest.mark.slow

CHECKS = [
    "every order assigned, none left waiting or assigning",
    "every order has exactly one driver",
    "no double booking",
    "every trip delivered, every driver free again",
]


def demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    env.pop("CONVEYOR_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "conveyor", "demo", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_passed(proc: subprocess.CompletedProcess[str]) -> None:
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr}"
    for check in CHECKS:
        assert re.search(rf"✓ {re.escape(check)}", out), f"check {check!r} not passed:\n{out}"
    assert "✗" not in out
    assert "all checks passed" in out
    assert "Traceback" not in proc.stderr, proc.stderr


def deliveries_queue(out: str) -> str:
    found = re.search(r"trips end on queue (\S+)", out)
    assert found, out
    return found.group(1)


class Database:
    """The demo's database, read with the test's own SQL (`?` placeholders on both stores)."""

    def __init__(self, url: str):
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            self.conn: Any = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None, timeout=30)
        else:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)

    def rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(sql if self.sqlite else sql.replace("?", "%s"), args).fetchall())

    def close(self) -> None:
        self.conn.close()


def all_items(app: conveyor.App, queue: str) -> list[conveyor.Item]:
    items: list[conveyor.Item] = []
    while page := app.items(queue, before_id=items[-1].id if items else None, limit=1000):
        items += page
    return items


def assert_database_holds_a_correct_run(url: str, orders: int, deliveries: str) -> None:
    """What every run must leave, read from the database alone."""
    db = Database(url)
    app = conveyor.App(url)
    try:
        # no order left waiting or being assigned: every one of them assigned
        statuses = dict(db.rows("SELECT status, count(*) FROM demo_orders WHERE id > 0 GROUP BY status"))
        assert statuses == {"assigned": orders}, statuses

        # every order has exactly one driver: one on its row, and booked once (one trip queued for it)
        without = db.rows("SELECT id FROM demo_orders WHERE id > 0 AND driver_id IS NULL")
        assert without == [], without
        trips = collections.Counter(item.payload["order_id"] for item in all_items(app, deliveries))
        assert trips, "no trips queued"
        assert {k: n for k, n in trips.items() if n != 1} == {}, "orders booked more than once"
        assert set(range(1, orders + 1)) <= set(trips)
        ids = {r[0] for r in db.rows("SELECT id FROM demo_orders WHERE driver_id IS NOT NULL")}
        assert set(trips) == ids  # a trip for each order with a driver, and none for another
        made = dict(db.rows("SELECT id, deliveries FROM demo_drivers"))
        held = collections.Counter(r[0] for r in db.rows("SELECT driver_id FROM demo_orders WHERE driver_id IS NOT NULL"))
        assert {d: n for d, n in made.items() if n != held.get(d, 0)} == {}, (made, held)

        # no driver holds two orders at once: each driver's trips, in booking order, never overlap
        by_driver: dict[int, list[tuple[float, float | None, int]]] = collections.defaultdict(list)
        for order_id, driver, assigned_at, delivered_at in db.rows(
                "SELECT id, driver_id, assigned_at, delivered_at FROM demo_orders WHERE driver_id IS NOT NULL"):
            by_driver[driver].append((assigned_at, delivered_at, order_id))
        overlaps = []
        for driver, mine in by_driver.items():
            mine.sort()
            for (_, end, a), (start, _, b) in zip(mine, mine[1:]):
                if end is None or end > start:
                    overlaps.append((driver, a, b))
        assert overlaps == []
        assert db.rows("SELECT id FROM demo_orders WHERE driver_id IS NOT NULL AND delivered_at IS NULL") == []
        assert db.rows("SELECT id FROM demo_drivers WHERE NOT available OR current_order IS NOT NULL") == []
    finally:
        app.close()
        db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_demo_end_to_end(backend, request):
    size = ["--orders", "300", "--drivers", "20", "--workers", "2"]  # scarce: batches wait for drivers
    if backend == "sqlite":
        proc = demo(*size)  # no --db: a fresh SQLite file in a temporary folder, its path printed
        found = re.search(r"database: sqlite:///(\S+)", proc.stdout)
        assert found, proc.stdout
        try:
            assert_passed(proc)
            assert_database_holds_a_correct_run(f"sqlite:///{found.group(1)}", 300, deliveries_queue(proc.stdout))
        finally:
            shutil.rmtree(os.path.dirname(found.group(1)), ignore_errors=True)
    else:
        url = request.getfixturevalue("pg_database")
        first = demo("--db", url, *size)
        assert_passed(first)
        assert_database_holds_a_correct_run(url, 300, deliveries_queue(first.stdout))
        proc = demo("--db", url, *size)  # a second run on the same database starts the world afresh
        assert_passed(proc)
        assert_database_holds_a_correct_run(url, 300, deliveries_queue(proc.stdout))
    assert re.search(r"orders\s+│\s+300\s", proc.stdout), proc.stdout
    assert "(adopted)" in proc.stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_compare_prints_both_configurations_side_by_side(backend, request):
    size = ["--orders", "300", "--drivers", "40", "--workers", "2"]
    url = request.getfixturevalue("pg_database") if backend == "postgres" else None
    proc = demo("--compare", *size, *(["--db", url] if url else []))
    folder = re.search(r"database: (/\S+)/compare-<n>\.db", proc.stdout)
    try:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        out = proc.stdout
        header = next(line for line in out.splitlines() if "one at a time" in line and "asynchronous" in line)
        assert header.index("one at a time") < header.index("asynchronous")
        assert re.search(r"1 × 1 × 1\s+│\s+2 × \d+ × 1", out), out
        for row in ("assigned per second", "lag p50", "lag p95", "lag max"):
            assert re.search(rf"{row}[^│]*│\s+(≥ )?[\d,]+( ms)?\s+│\s+(≥ )?[\d,]+( ms)?\s+│", out), f"{row}:\n{out}"
        waiting = re.search(r"still waiting at the end\s+│\s+([\d,]+)\s+│\s+([\d,]+)\s+│", out)
        assert waiting, out
        assert "✓ both runs" in out and "✗" not in out
        assert "Traceback" not in proc.stderr, proc.stderr
    finally:
        if folder:
            shutil.rmtree(folder.group(1), ignore_errors=True)


def test_without_scipy_the_demo_says_what_to_install():
    code = "import sys; sys.modules['scipy'] = None; from conveyor.cli import main; main(['demo'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'conveyor[demo]'" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_checks_catch_a_double_booking_a_waiting_order_and_a_missing_driver(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    proc = demo("--db", url, "--orders", "120", "--drivers", "12", "--workers", "2")
    assert_passed(proc)
    deliveries = deliveries_queue(proc.stdout)
    app = conveyor.App(url)
    db = Database(url)
    try:
        assert all(c.ok for c in verify(app, db.conn, deliveries, 120))

        # double booking: move an order onto another driver whose trip was under way at that moment
        rows = db.rows("SELECT id, driver_id, assigned_at, delivered_at FROM demo_orders WHERE id > 0 ORDER BY assigned_at")
        a, b = next((a, b) for a in rows for b in rows if a[1] != b[1] and a[2] < b[2] < a[3])
        db.rows("UPDATE demo_orders SET driver_id = ? WHERE id = ?", (a[1], b[0]))
        checks = {c.name: c for c in verify(app, db.conn, deliveries, 120)}
        booking = next(c for name, c in checks.items() if name.startswith("no double booking"))
        assert not booking.ok
        assert f"driver {a[1]}" in booking.detail
        assert checks["every order assigned, none left waiting or assigning"].ok  # only what was broken
        db.rows("UPDATE demo_orders SET driver_id = ? WHERE id = ?", (b[1], b[0]))
        assert all(c.ok for c in verify(app, db.conn, deliveries, 120))

        # an order left waiting, and one without its driver
        db.rows("UPDATE demo_orders SET status = 'needs_assignment' WHERE id = 7")
        db.rows("UPDATE demo_orders SET driver_id = NULL WHERE id = 9")
        checks = {c.name: c for c in verify(app, db.conn, deliveries, 120)}
        waiting = checks["every order assigned, none left waiting or assigning"]
        assert not waiting.ok and "needs_assignment" in waiting.detail
        driver = checks["every order has exactly one driver"]
        assert not driver.ok and "[9]" in driver.detail
    finally:
        db.close()
        app.close()
