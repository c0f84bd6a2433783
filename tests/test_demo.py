"""`conveyor demo` end to end, as a user runs it, and proof that its checks can fail.

The demo verifies itself from the database; these tests run the real command in a subprocess (on a
fresh SQLite file and on PostgreSQL), then tamper with a finished run's tables to show the checker
notices a double booking and an out-of-order assignment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import conveyor
from conveyor.demo.verify import connect, latest_queues, verify
from conveyor.demo.world import run

pytestmark = pytest.mark.slow

CHECKS = [
    "every order resolved",
    "every order has exactly one assignment",
    "no double booking",
    "every trip delivered, every driver free again",
    "each restaurant's orders assigned in submission order",
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


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_demo_end_to_end(backend, request):
    size = ["--orders", "300", "--drivers", "10", "--workers", "2"]
    if backend == "sqlite":
        proc = demo(*size)  # no --db: a fresh SQLite file in a temporary folder, its path printed
        found = re.search(r"database: sqlite:///(\S+)", proc.stdout)
        assert found, proc.stdout
        try:
            assert_passed(proc)
        finally:
            shutil.rmtree(os.path.dirname(found.group(1)), ignore_errors=True)
    else:
        try:
            import conveyor.stores.postgres  # noqa: F401
        except ImportError as exc:
            pytest.skip(f"conveyor.stores.postgres cannot be imported yet: {exc}")
        url = request.getfixturevalue("pg_database")
        assert_passed(demo("--db", url, *size))
        proc = demo("--db", url, *size)  # a second run on the same database resets the demo tables
        assert_passed(proc)
    assert re.search(r"orders\s+│\s+300\s", proc.stdout), proc.stdout


def test_checks_catch_a_double_booking_and_an_order_swap(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    assert_passed(demo("--db", url, "--orders", "120", "--drivers", "6", "--workers", "2"))
    app = conveyor.App(url)
    conn = connect(url)
    try:
        queues = latest_queues(app)
        assert queues is not None
        assert all(c.ok for c in verify(app, conn, queues, 120))

        # double booking: move an order onto another driver whose trip was under way at that moment
        rows = run(conn, "SELECT order_id, driver_id, assigned_at, delivered_at FROM demo_assignments "
                         "WHERE order_id > 0 ORDER BY assigned_at").fetchall()
        a, b = next((a, b) for a in rows for b in rows
                    if a[1] != b[1] and a[2] < b[2] < a[3])
        run(conn, "UPDATE demo_assignments SET driver_id = ? WHERE order_id = ?", (a[1], b[0]))
        checks = {c.name: c for c in verify(app, conn, queues, 120)}
        booking = next(c for name, c in checks.items() if name.startswith("no double booking"))
        assert not booking.ok
        assert f"driver {a[1]}" in booking.detail
        ordered = checks["each restaurant's orders assigned in submission order"]
        assert ordered.ok  # only what was broken is reported

        # order swap: a restaurant's later order assigned before its earlier one
        first, second = run(conn, "SELECT order_id, assigned_at FROM demo_assignments WHERE restaurant = "
                                  "(SELECT restaurant FROM demo_assignments WHERE order_id = 1) "
                                  "ORDER BY order_id LIMIT 2").fetchall()
        run(conn, "UPDATE demo_assignments SET assigned_at = ? WHERE order_id = ?", (second[1] + 1, first[0]))
        checks = {c.name: c for c in verify(app, conn, queues, 120)}
        assert not checks["each restaurant's orders assigned in submission order"].ok
    finally:
        conn.close()
        app.close()
