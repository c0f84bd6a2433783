"""Rows processed in place (`@app.rows`): the application's own table, marked by its own status
column, with the guarantees items have. Every test runs on both stores against a real database; the
application's side (its inserts, its updates, a customer cancelling an order) is a connection of its
own, as it would be in production. The worker-process tests start real processes and SIGKILL them.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
from waiting import wait_until

import conveyor

STATUS = dict(status="status", pending="new", working="assigning", done="assigned", dead="unassignable")


class Side:
    """The application's own connection to its database (autocommit), `?` placeholders on both."""

    def __init__(self, url: str):
        self.url = url
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            self.conn: Any = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None, timeout=30)
        else:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)

    def run(self, sql: str, args: Any = ()) -> list[tuple]:
        if not self.sqlite:
            sql = sql.replace("?", "%s")
        cur = self.conn.execute(sql, args) if args else self.conn.execute(sql)
        return list(cur.fetchall()) if cur.description else []

    def statuses(self) -> dict[Any, str]:
        return dict(self.run("SELECT id, status FROM orders"))

    def close(self) -> None:
        self.conn.close()


def create_orders(side: Side, rows: list[tuple[int, str]]) -> None:
    """orders(id, restaurant_id, status, driver, note) with the given (restaurant_id, status) rows,
    and the handlers' effect table (no key: a duplicate would show)."""
    pk = "INTEGER PRIMARY KEY" if side.sqlite else "bigserial PRIMARY KEY"
    side.run(f"CREATE TABLE orders (id {pk}, restaurant_id INTEGER, status TEXT NOT NULL, driver TEXT, note TEXT)")
    side.run("CREATE TABLE effects (order_id BIGINT NOT NULL, attempt INTEGER NOT NULL)")
    insert_orders(side, rows)


def insert_orders(side: Side, rows: list[tuple[int, str]]) -> None:
    if side.sqlite:
        side.conn.executemany("INSERT INTO orders (restaurant_id, status) VALUES (?, ?)", rows)
    else:
        with side.conn.cursor() as cur:
            cur.executemany("INSERT INTO orders (restaurant_id, status) VALUES (%s, %s)", rows)


@pytest.fixture
def side(store_url):
    s = Side(store_url)
    if not s.sqlite:  # one database per run: leave it as a fresh one would be
        s.run("DROP TABLE IF EXISTS orders, effects, orders2 CASCADE")
        s.run("DROP FUNCTION IF EXISTS orders_conveyor_wake() CASCADE")
        if s.run("SELECT to_regclass('conveyor_adopted')")[0][0]:
            s.run("DELETE FROM conveyor_adopted")
    yield s
    s.close()


def ph(conn: Any) -> str:
    """The placeholder of a handler's connection."""
    return "?" if isinstance(conn, sqlite3.Connection) else "%s"


def record_effect(conn: Any, item: conveyor.Item) -> None:
    conn.execute(f"INSERT INTO effects (order_id, attempt) VALUES ({ph(conn)}, {ph(conn)})", (item.id, item.attempts))


def effects(side: Side) -> list[Any]:
    return sorted(r[0] for r in side.run("SELECT order_id FROM effects"))


def run_in_thread(app: conveyor.App, **options: Any) -> tuple[Any, threading.Thread, dict]:
    worker = app.worker(**options)
    out: dict = {}

    def main() -> None:
        try:
            out["counts"] = worker.run(install_signal_handlers=False)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            out["error"] = exc

    t = threading.Thread(target=main, daemon=True)
    t.start()
    return worker, t, out


# -- declaring and adopting --------------------------------------------------------------------

def test_a_worker_refuses_a_table_that_was_not_adopted_and_adopt_prepares_it(side, store_url):
    create_orders(side, [(1, "new"), (2, "new")])
    app = conveyor.App(store_url)
    app.rows("orders", **STATUS)(lambda item: None)
    with pytest.raises(conveyor.UsageError, match=r"table 'orders' was not adopted: run `conveyor adopt .* --table orders`"):
        app.run_worker(stop_when_empty=True)
    assert side.statuses() == {1: "new", 2: "new"}  # nothing touched
    plan = app.adopt()["orders"]
    assert any("conveyor_pending" in sql and "'new'" in sql for sql in plan), plan
    assert any("conveyor_lease_until" in sql for sql in plan), plan
    app.adopt(apply=True)
    assert app.adopt() == {"orders": []}  # adopted: nothing left to do
    counts = app.run_worker(stop_when_empty=True)
    assert counts["resolved"] == 2
    assert side.statuses() == {1: "assigned", 2: "assigned"}
    # a declaration that differs from the adopted one is refused too
    other = conveyor.App(store_url)
    other.rows("orders", **{**STATUS, "done": "delivered"})(lambda item: None)
    with pytest.raises(conveyor.UsageError, match="was adopted for another declaration"):
        other.run_worker(stop_when_empty=True)
    # undo removes the columns, indexes and record
    app.adopt(undo=True)
    cols = ([r[1] for r in side.run("PRAGMA table_info(orders)")] if side.sqlite else
            [r[0] for r in side.run("SELECT column_name FROM information_schema.columns WHERE table_name = 'orders'")])
    assert not [c for c in cols if c.startswith("conveyor_")], cols
    with pytest.raises(conveyor.UsageError, match="was not adopted"):
        app.run_worker(stop_when_empty=True)
    app.close()
    other.close()


@pytest.mark.parametrize("kwargs, message", [
    (dict(STATUS, status="state"), "has no column 'state'"),
    (dict(STATUS, key="shop"), "has no column 'shop'"),
])
def test_a_missing_column_is_named(side, store_url, kwargs, message):
    create_orders(side, [])
    app = conveyor.App(store_url)
    app.rows("orders", **kwargs)(lambda item: None)
    with pytest.raises(conveyor.UsageError, match=message):
        app.adopt()
    app.close()


def test_a_missing_table_and_a_primary_key_of_two_columns_are_refused(side, store_url):
    app = conveyor.App(store_url)
    app.rows("orders", **STATUS)(lambda item: None)
    with pytest.raises(conveyor.UsageError, match="table 'orders' does not exist"):
        app.adopt()
    side.run("CREATE TABLE orders (a INTEGER, b INTEGER, status TEXT, PRIMARY KEY (a, b))")
    with pytest.raises(conveyor.UsageError, match=r"primary key of several columns \(a, b\)"):
        app.adopt()
    side.run("DROP TABLE orders")
    side.run("CREATE TABLE orders (a INTEGER, status TEXT)")
    with pytest.raises(conveyor.UsageError, match="has no primary key"):
        app.adopt()
    app.close()


@pytest.mark.parametrize("kwargs, message", [
    (dict(STATUS, done="new"), "four different values"),
    (dict(STATUS, pending=""), "pending must be a status value"),
    (dict(STATUS, pending=None), "pending must be a status value"),
    (dict(STATUS, status="conveyor_token"), "conveyor's own"),
    (dict(STATUS, status="status; drop"), "status must name a column"),
    (dict(STATUS, ordered=True), "ordered=True needs key="),
    (dict(STATUS, batch_size=0), "batch_size must be an integer >= 1"),
])
def test_bad_declarations_are_refused_when_declared(kwargs, message):
    app = conveyor.App("sqlite:///unused.db")
    with pytest.raises(conveyor.UsageError, match=message):
        app.rows("orders", **kwargs)
    with pytest.raises(conveyor.UsageError, match="table name must be an identifier"):
        app.rows("orders; drop table x", **STATUS)
    assert app.processors == {}


# -- the four steps, in place ------------------------------------------------------------------

def test_pending_rows_are_handled_once_in_place_and_other_rows_are_left_alone(side, store_url):
    rows = [(i % 5, "new") for i in range(120)] + [(1, "assigned")] * 10 + [(2, "cancelled")] * 10
    create_orders(side, rows)
    app = conveyor.App(store_url)
    payloads: list[dict] = []

    @app.rows("orders", **STATUS, batch_size=16, transactional=True)
    def assign(item, conn):
        payloads.append(item.payload)
        record_effect(conn, item)
        conn.execute(f"UPDATE orders SET driver = {ph(conn)} WHERE id = {ph(conn)}", (f"d{item.id}", item.id))

    app.adopt(apply=True)
    counts = app.run_worker(stop_when_empty=True)
    assert counts["resolved"] == 120 and counts["lost"] == 0
    assert effects(side) == list(range(1, 121))
    final = side.statuses()
    assert [final[i] for i in range(1, 121)] == ["assigned"] * 120
    assert [final[i] for i in range(121, 141)] == ["assigned"] * 10 + ["cancelled"] * 10
    # the handler's own write to its row committed with the resolution
    assert dict(side.run("SELECT id, driver FROM orders WHERE id <= 3")) == {1: "d1", 2: "d2", 3: "d3"}
    # the payload is the row as the claim left it, without conveyor's columns
    first = next(p for p in payloads if p["id"] == 1)
    assert first == {"id": 1, "restaurant_id": 0, "status": "assigning", "driver": None, "note": None}
    stats = app.stats()["orders"]
    assert (stats["pending"], stats["in_progress"], stats["resolved"], stats["other"], stats["total"]) == (0, 0, 130, 10, 140)
    app.close()


def test_retries_then_the_dead_value_after_max_attempts(side, store_url):
    create_orders(side, [(1, "new"), (2, "new"), (3, "new")])
    app = conveyor.App(store_url)
    calls: dict[int, list[int]] = {}

    @app.rows("orders", **STATUS, max_attempts=3, backoff_base=0.01, backoff_max=0.02)
    def assign(item):
        calls.setdefault(item.id, []).append(item.attempts)
        if item.id == 2:
            raise ValueError("no driver near")
        if item.id == 3 and item.attempts == 1:
            raise conveyor.Retry("later", delay=0.01)

    app.adopt(apply=True)
    counts = app.run_worker(stop_when_empty=True)
    assert calls == {1: [1], 2: [1, 2, 3], 3: [1, 2]}
    assert side.statuses() == {1: "assigned", 2: "unassignable", 3: "assigned"}
    assert counts["dead"] == 1
    attempts, error = side.run("SELECT conveyor_attempts, conveyor_error FROM orders WHERE id = 2")[0]
    assert attempts == 3 and "ValueError: no driver near" in error
    app.close()


def test_a_fail_goes_dead_at_once(side, store_url):
    create_orders(side, [(1, "new")])
    app = conveyor.App(store_url)

    @app.rows("orders", **STATUS)
    def assign(item):
        raise conveyor.Fail("restaurant closed")

    app.adopt(apply=True)
    app.run_worker(stop_when_empty=True)
    assert side.statuses() == {1: "unassignable"}
    assert "Fail: restaurant closed" in side.run("SELECT conveyor_error FROM orders")[0][0]
    app.close()


def test_rows_of_a_key_are_handled_one_at_a_time_in_primary_key_order(side, store_url):
    create_orders(side, [(i % 4, "new") for i in range(80)])
    app = conveyor.App(store_url)
    lock = threading.Lock()
    running: dict[int, int] = {}
    order: dict[int, list[int]] = {}
    overlaps: list[tuple] = []

    @app.rows("orders", **STATUS, key="restaurant_id", concurrency=4, batch_size=20)
    def assign(item):
        key = item.payload["restaurant_id"]
        with lock:
            if running.get(key):
                overlaps.append((key, item.id))
            running[key] = running.get(key, 0) + 1
            order.setdefault(key, []).append(item.id)
        time.sleep(0.001)  # a handler's work: lets another row of the key start if one could
        with lock:
            running[key] -= 1

    app.adopt(apply=True)
    app.run_worker(stop_when_empty=True)
    assert overlaps == []
    assert {k: ids == sorted(ids) and len(ids) == 20 for k, ids in order.items()} == {0: True, 1: True, 2: True, 3: True}
    app.close()


# -- the application keeps writing -------------------------------------------------------------

def test_a_row_the_application_cancels_while_its_handler_runs_stays_cancelled(side, store_url):
    """On PostgreSQL with a transactional handler: its writes roll back. On SQLite a transactional
    handler holds the write lock (the application's UPDATE would wait for it), so the handler here
    is a plain one and its result is dropped."""
    create_orders(side, [(1, "new"), (2, "new")])
    app = conveyor.App(store_url)
    started, release = threading.Event(), threading.Event()
    transactional = not side.sqlite

    def assign(item, conn=None):
        if item.id == 1:
            started.set()
            assert release.wait(30)
        if conn is not None:
            record_effect(conn, item)

    app.rows("orders", **STATUS, transactional=transactional, batch_size=1, concurrency=2)(
        assign if transactional else (lambda item: assign(item)))
    app.adopt(apply=True)
    worker, thread, out = run_in_thread(app, stop_when_empty=True)
    assert started.wait(30)
    side.run("UPDATE orders SET status = 'cancelled', note = 'customer cancelled' WHERE id = 1")
    release.set()
    thread.join(60)
    assert not thread.is_alive() and "error" not in out, out
    assert side.statuses() == {1: "cancelled", 2: "assigned"}
    assert side.run("SELECT note FROM orders WHERE id = 1") == [("customer cancelled",)]
    assert out["counts"]["lost"] == 1 and out["counts"]["resolved"] == 1
    if transactional:
        assert effects(side) == [2]  # row 1's effect rolled back
    app.close()


def test_new_rows_wake_an_idle_worker(side, store_url):
    """A row inserted with the pending value is the submission: an idle worker picks it up. On
    PostgreSQL adopt's trigger sends the wake-up a submit sends (checked on a listening connection
    of the test's own); SQLite's workers notice any commit to the file."""
    create_orders(side, [])
    app = conveyor.App(store_url)
    handled = threading.Event()
    app.rows("orders", **STATUS)(lambda item: handled.set())
    app.adopt(apply=True)
    listener = None
    if not side.sqlite:
        import psycopg

        listener = psycopg.connect(store_url, autocommit=True)
        listener.execute("LISTEN conveyor_items")
    worker, thread, out = run_in_thread(app)
    try:
        insert_orders(side, [(1, "new")])  # no submit: the row is the submission
        assert handled.wait(30)
        if listener is not None:
            got = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
            assert got == ["orders"]
            side.run("UPDATE orders SET note = 'x'")  # not entering the pending value: no wake-up
            side.run("UPDATE orders SET status = 'delivered'")
            assert [n.payload for n in listener.notifies(timeout=0.5)] == []
            side.run("UPDATE orders SET status = 'new'")  # back to pending (the application retries it)
            assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["orders"]
    finally:
        worker.stop()
        thread.join(30)
        if listener is not None:
            listener.close()
    assert "error" not in out, out
    app.close()


def test_a_crew_runs_queue_items_and_rows_side_by_side(side, store_url):
    create_orders(side, [(1, "new"), (2, "new")])
    app = conveyor.App(store_url)
    seen: list[tuple[str, Any]] = []
    lock = threading.Lock()

    @app.processor("emails")
    def email(item):
        with lock:
            seen.append(("emails", item.payload["to"]))

    @app.rows("orders", **STATUS)
    def assign(item):
        with lock:
            seen.append(("orders", item.id))

    app.adopt(apply=True)
    app.submit("emails", {"to": "a@example.com"})
    counts = app.run_worker(stop_when_empty=True)
    assert sorted(seen, key=str) == sorted([("emails", "a@example.com"), ("orders", 1), ("orders", 2)], key=str)
    assert counts["resolved"] == 3
    app.close()


# -- real processes ----------------------------------------------------------------------------

APP_MODULE = textwrap.dedent(
    """
    import os, sqlite3, time
    import conveyor

    app = conveyor.App(os.environ["T_URL"])
    HOLD = os.environ.get("T_HOLD")  # a handler of a row with this id writes STARTED, then hangs

    @app.rows("orders", status="status", pending="new", working="assigning", done="assigned",
              dead="unassignable", transactional=True, batch_size=int(os.environ.get("T_BATCH", "50")),
              lease_seconds=float(os.environ.get("T_LEASE", "30")), concurrency=4)
    def assign(item, conn):
        if HOLD and str(item.id) == HOLD and item.attempts == 1:
            open(os.environ["T_STARTED"], "w").close()
            time.sleep(600)
        p = "?" if isinstance(conn, sqlite3.Connection) else "%s"
        conn.execute(f"INSERT INTO effects (order_id, attempt) VALUES ({p}, {p})", (item.id, item.attempts))
        conn.execute(f"UPDATE orders SET driver = {p} WHERE id = {p}", (f"d{os.getpid()}", item.id))
    """
)


@pytest.fixture
def procs(tmp_path, store_url):
    (tmp_path / "rowsapp.py").write_text(APP_MODULE)
    started: list[subprocess.Popen] = []

    def start(*args: str, **env: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "conveyor", *args], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "T_URL": store_url, "PYTHONPATH": str(tmp_path), **env})
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def test_a_sigkilled_workers_row_returns_to_pending_and_is_handled_once(side, store_url, procs, tmp_path):
    create_orders(side, [(1, "new"), (2, "new"), (3, "new")])
    marker = tmp_path / "started"
    adopt = procs("adopt", "rowsapp:app", "--apply")
    assert adopt.wait(60) == 0, adopt.communicate()
    victim = procs("worker", "rowsapp:app", T_HOLD="2", T_STARTED=str(marker), T_LEASE="1", T_BATCH="1")
    wait_until(marker.exists, 60, "the handler of row 2 to start")
    assert side.statuses()[2] == "assigning"
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    rescuer = procs("worker", "rowsapp:app", "--stop-when-empty", T_LEASE="1")
    out, err = rescuer.communicate(timeout=120)
    assert rescuer.returncode == 0, err[-3000:]
    assert side.statuses() == {1: "assigned", 2: "assigned", 3: "assigned"}
    # once each; row 2's first attempt never committed, so its effect is the second attempt's
    # (rows 1 and 3 were handled by either worker: the victim may have died holding one of them)
    done = dict(side.run("SELECT order_id, attempt FROM effects"))
    assert effects(side) == [1, 2, 3] and done[2] == 2
    error = side.run("SELECT conveyor_error FROM orders WHERE id = 2")[0][0]
    assert "lease expired" in error and "attempt 1" in error


def test_three_processes_handle_every_pending_row_once_while_the_application_writes(side, store_url, procs):
    """100,000 rows, 1% pending; while 3 worker processes run, the application inserts pending rows
    and updates a column of its own on rows in every state. Every pending row is handled exactly
    once (the effect table), none is left working, and none of the application's writes is lost."""
    statuses = ["new" if i % 100 == 0 else ("assigned" if i % 2 else "delivered") for i in range(100_000)]
    side.run("CREATE TABLE orders (id {} PRIMARY KEY, restaurant_id INTEGER, status TEXT NOT NULL, driver TEXT, "
             "note TEXT)".format("INTEGER" if side.sqlite else "bigserial"))
    side.run("CREATE TABLE effects (order_id BIGINT NOT NULL, attempt INTEGER NOT NULL)")
    if side.sqlite:
        side.run("BEGIN")
        side.conn.executemany("INSERT INTO orders (restaurant_id, status) VALUES (?, ?)",
                              [(i % 50, s) for i, s in enumerate(statuses)])
        side.run("COMMIT")
    else:
        side.run("INSERT INTO orders (restaurant_id, status) SELECT i % 50, "
                 "CASE WHEN i % 100 = 0 THEN 'new' WHEN i % 2 = 1 THEN 'assigned' ELSE 'delivered' END "
                 "FROM generate_series(0, 99999) AS i")
    adopt = procs("adopt", "rowsapp:app", "--apply")
    assert adopt.wait(120) == 0, adopt.communicate()
    workers = procs("worker", "rowsapp:app", "--processes", "3", T_BATCH="20")
    notes: dict[int, str] = {}
    inserted = 0
    for round_ in range(40):
        insert_orders(side, [(round_ % 50, "new")] * 25)
        inserted += 25
        # the application's own column, on rows pending, running and done alike
        last = side.run("SELECT max(id) FROM orders")[0][0]
        for row_id in range(last - 60, last + 1, 3):
            note = f"r{round_}"
            side.run("UPDATE orders SET note = ? WHERE id = ?", (note, row_id))
            notes[row_id] = note
    pending_total = 1000 + inserted

    def finished() -> bool:
        counts = dict(side.run("SELECT status, count(*) FROM orders WHERE status IN ('new', 'assigning') GROUP BY status"))
        return not counts

    wait_until(finished, 300, "every pending row to be handled")
    workers.send_signal(signal.SIGTERM)
    out, err = workers.communicate(timeout=120)
    assert workers.returncode == 0, err[-3000:]
    done = effects(side)
    assert len(done) == pending_total and len(set(done)) == pending_total  # each once
    assert side.run("SELECT count(*) FROM orders WHERE status = 'assigned' AND driver IS NOT NULL")[0][0] == pending_total
    got = dict(side.run("SELECT id, note FROM orders WHERE note IS NOT NULL"))
    assert got == notes
    assert len({r[0] for r in side.run("SELECT driver FROM orders WHERE driver IS NOT NULL")}) >= 2  # shared


def test_conveyor_adopt_prints_then_applies_then_undoes(side, store_url, procs):
    create_orders(side, [(1, "new")])
    shown = procs("adopt", "rowsapp:app")
    out, err = shown.communicate(timeout=60)
    assert shown.returncode == 0, err
    assert "statement(s) needed by table 'orders'" in out and "--apply" in out
    assert "conveyor_token" in out
    applied = procs("adopt", "rowsapp:app", "--apply")
    out, err = applied.communicate(timeout=60)
    assert applied.returncode == 0 and "applied to table 'orders'" in out, err
    again = procs("adopt", "rowsapp:app")
    out, _ = again.communicate(timeout=60)
    assert "adopted already, nothing to do" in out
    status = procs("--db", store_url, "status", "--json")
    out, err = status.communicate(timeout=60)
    assert status.returncode == 0, err
    assert '"orders"' in out and '"rows": true' in out
    undo = procs("adopt", "rowsapp:app", "--undo")
    out, err = undo.communicate(timeout=60)
    assert undo.returncode == 0 and "removed from table 'orders'" in out, err
    both = procs("adopt", "rowsapp:app", "--apply", "--undo")
    out, err = both.communicate(timeout=60)
    assert both.returncode == 2 and "exclude each other" in err


def test_postgres_enum_status_uuid_key_and_a_schema_qualified_table(side, store_url):
    if side.sqlite:
        pytest.skip("PostgreSQL only: enum types, uuid keys and schemas")
    side.run("DROP SCHEMA IF EXISTS shop CASCADE")
    side.run("CREATE SCHEMA shop")
    side.run("CREATE TYPE shop.order_state AS ENUM ('new', 'assigning', 'assigned', 'unassignable', 'cancelled')")
    side.run("CREATE TABLE shop.orders (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), restaurant_id int, "
             "status shop.order_state NOT NULL DEFAULT 'new')")
    side.run("INSERT INTO shop.orders (restaurant_id) SELECT i % 3 FROM generate_series(1, 30) AS i")
    app = conveyor.App(store_url)
    seen: list[Any] = []

    @app.rows("shop.orders", **STATUS, key="restaurant_id", max_attempts=2, backoff_base=0.01)
    def assign(item):
        seen.append(item.id)
        if item.payload["restaurant_id"] == 0 and item.attempts == 1:
            raise ValueError("once")  # a retry: the CASE over enum values must be of the enum type

    with pytest.raises(conveyor.UsageError, match="enum without the value"):
        bad = conveyor.App(store_url)
        bad.rows("shop.orders", **{**STATUS, "dead": "lost"})(lambda item: None)
        bad.adopt()
    app.adopt(apply=True)
    app.run_worker(stop_when_empty=True)
    import uuid

    assert len(set(seen)) == 30 and all(isinstance(i, uuid.UUID) for i in seen)
    assert side.run("SELECT status::text, count(*) FROM shop.orders GROUP BY 1") == [("assigned", 30)]
    assert app.stats()["shop.orders"]["resolved"] == 30
    app.adopt(undo=True)
    assert side.run("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'shop.orders'::regclass AND NOT tgisinternal") == [(0,)]
    side.run("DROP SCHEMA shop CASCADE")
    app.close()


def test_a_refused_row_in_a_transactional_batch_sends_the_others_back_at_once(side, store_url):
    """One row of a transactional batch is cancelled by the application while the batch runs: the
    whole transaction rolls back, and the batch's other rows go back to pending at once (their
    attempt given back), not after their lease expires as if the worker had died."""
    if side.sqlite:
        pytest.skip("on SQLite a transactional handler holds the write lock: the application cannot write meanwhile")
    create_orders(side, [(1, "new"), (2, "new"), (3, "new")])
    app = conveyor.App(store_url)
    started, release = threading.Event(), threading.Event()
    runs: list[list[int]] = []

    @app.rows("orders", **STATUS, batch=True, batch_size=3, transactional=True, lease_seconds=60)
    def assign(items, conn):
        runs.append([it.id for it in items])
        if len(runs) == 1:
            started.set()
            assert release.wait(30)
        for it in items:
            record_effect(conn, it)

    app.adopt(apply=True)
    worker, thread, out = run_in_thread(app, stop_when_empty=True)
    assert started.wait(30)
    side.run("UPDATE orders SET status = 'cancelled' WHERE id = 1")
    t0 = time.monotonic()
    release.set()
    thread.join(60)
    assert not thread.is_alive() and "error" not in out, out
    assert time.monotonic() - t0 < 30  # well within the 60 s lease
    assert side.statuses() == {1: "cancelled", 2: "assigned", 3: "assigned"}
    assert runs[0] == [1, 2, 3] and sorted(runs[1]) == [2, 3]
    assert sorted(side.run("SELECT order_id, attempt FROM effects")) == [(2, 1), (3, 1)]  # the attempt given back
    assert out["counts"]["lost"] == 1 and out["counts"]["released"] == 2
    app.close()


def test_a_backoff_sends_the_row_back_to_pending_without_spending_an_attempt(side, store_url):
    create_orders(side, [(1, "new")])
    app = conveyor.App(store_url)
    runs: list[int] = []

    @app.rows("orders", **STATUS, max_attempts=1)
    def assign(item):
        runs.append(item.attempts)
        if len(runs) == 1:
            raise conveyor.Backoff(0.2)  # with max_attempts=1, a spent attempt would make the row dead

    app.adopt(apply=True)
    counts = app.run_worker(stop_when_empty=True)
    assert runs == [1, 1] and counts["backedoff"] == 1
    assert side.statuses() == {1: "assigned"}
    app.close()


# -- flow control on rows -----------------------------------------------------------------------

def rows_store(app: conveyor.App, table: str = "orders") -> Any:
    from conveyor.stores.rows import RowsStore

    p = app.processors[table]
    return RowsStore(app.store, p.rows, p.options)


def test_a_paused_table_or_key_claims_no_rows_until_resumed(side, store_url):
    from conveyor.model import Claim

    create_orders(side, [(1, "new"), (1, "new"), (2, "new"), (2, "new")])
    app = conveyor.App(store_url)
    app.rows("orders", **STATUS, key="restaurant_id", ordered=False)(lambda item: None)
    app.adopt(apply=True)
    store = rows_store(app)
    claim = Claim("orders", 10, 30.0, 5)
    app.pause("orders")
    assert store.claim(claim, "w") == [] and app.stats()["orders"]["paused"] is True
    app.resume("orders")
    app.pause("orders", key="1")
    assert app.stats()["orders"]["paused_keys"] == ["1"]
    assert sorted(it.id for it in store.claim(claim, "w")) == [3, 4]  # restaurant 2's rows only
    app.resume("orders", key="1")
    assert sorted(it.id for it in store.claim(claim, "w")) == [1, 2]
    app.close()


def test_a_rows_backoff_holds_its_key_on_every_worker(side, store_url):
    """Restaurant 1's row backs off for a minute with scope="key": the key's hold is in
    app.controls(), and a row of restaurant 1 inserted after it never starts, while one of
    restaurant 2 inserted behind it (claims go in primary key order) is assigned."""
    create_orders(side, [(1, "new")])
    app = conveyor.App(store_url)
    started: list[int] = []

    @app.rows("orders", **STATUS, key="restaurant_id", ordered=False)
    def assign(item):
        started.append(item.id)
        if item.payload["restaurant_id"] == 1:
            raise conveyor.Backoff(60, scope="key")

    app.adopt(apply=True)
    worker, thread, out = run_in_thread(app)
    try:
        wait_until(lambda: [(c["queue"], c["key"]) for c in app.controls() if c["held_until"]] == [("orders", "1")],
                   60, "restaurant 1 held")
        insert_orders(side, [(1, "new"), (2, "new")])  # rows 2 and 3
        wait_until(lambda: side.statuses()[3] == "assigned", 60, "restaurant 2's row assigned")
        assert side.statuses() == {1: "new", 2: "new", 3: "assigned"}
        assert started == [1, 3]
    finally:
        worker.stop()
        thread.join(30)
    assert "error" not in out, out
    app.close()


def test_rows_take_max_in_progress_and_rate_limit(side, store_url):
    """max_in_progress=2 under four threads: two rows work at once, never more. rate_limit="20/s"
    (a burst of 2, then one start per 50 ms): 12 rows take at least half a second to start."""
    create_orders(side, [(n % 3, "new") for n in range(12)])
    app = conveyor.App(store_url)
    lock = threading.Lock()
    running: set[int] = set()
    most = [0]
    starts: list[float] = []

    @app.rows("orders", **STATUS, concurrency=4, max_in_progress=2, rate_limit="20/s")
    def assign(item):
        with lock:
            starts.append(time.monotonic())
            running.add(item.id)
            most[0] = max(most[0], len(running))
        time.sleep(0.1)  # two starts of the rate's 50 ms apart overlap: the limit, not luck, keeps it at two
        with lock:
            running.discard(item.id)

    app.adopt(apply=True)
    app.run_worker(stop_when_empty=True)
    assert set(side.statuses().values()) == {"assigned"}
    assert most[0] == 2
    assert max(starts) - min(starts) >= (12 - 2) / 20 - 0.01, max(starts) - min(starts)
    assert app.stats()["orders"]["limits"] == {"max_in_progress": 2, "rate_limit": "20/s"}
    app.close()


def test_rows_refuse_bad_limits_when_declared():
    app = conveyor.App("sqlite:///:memory:")
    with pytest.raises(conveyor.UsageError, match="max_in_progress must be an integer >= 1"):
        app.rows("orders", **STATUS, max_in_progress=0)
    with pytest.raises(conveyor.UsageError, match="rate_limit"):
        app.rows("orders", **STATUS, rate_limit="5/q")


def test_a_large_tables_settled_rows_are_recounted_at_most_every_few_seconds(side, store_url, monkeypatch):
    """Counting done, dead and other rows reads the whole table: a large table (here: any) reuses
    them for RECOUNT seconds, while pending and working rows, read from their partial indexes, are
    counted every time."""
    from conveyor.stores import rows as rows_module

    create_orders(side, [(1, "new"), (1, "assigned"), (1, "delivered")])
    app = conveyor.App(store_url)
    app.rows("orders", **STATUS)(lambda item: None)
    app.adopt(apply=True)
    monkeypatch.setattr(rows_module, "BIG_TABLE", 0)  # what is kept is this App's store's own
    first = app.stats()["orders"]
    assert (first["pending"], first["resolved"], first["other"], first["total"]) == (1, 1, 1, 3)
    side.run("UPDATE orders SET status = 'assigned' WHERE status = 'delivered'")
    insert_orders(side, [(2, "new")])
    kept = app.stats()["orders"]
    assert (kept["pending"], kept["resolved"], kept["other"]) == (2, 1, 1)  # pending now, the rest as counted
    assert kept["counted_at"] <= time.time()
    monkeypatch.setattr(rows_module, "RECOUNT", 0.0)
    fresh = app.stats()["orders"]
    assert (fresh["pending"], fresh["resolved"], fresh["other"], fresh["total"]) == (2, 2, 0, 4)
    app.close()
