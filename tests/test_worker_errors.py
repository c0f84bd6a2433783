"""Errors that mean something: the worker retries a StoreError (the database hiccuped) and lets
anything else stop it, saying why once, so a supervisor restarts the process instead of a bug
turning into an endless stream of warnings. Faults are injected into a real store."""

from __future__ import annotations

import logging
import threading

import pytest

import conveyor
from conveyor import StoreError


class Faulty:
    """A real store with one method made to raise: `times` times (None: always)."""

    def __init__(self, store, method: str, exc: BaseException, times: int | None = None):
        self._store, self._method, self._exc, self._left = store, method, exc, times
        self.raised = 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        real = getattr(self._store, name)
        if name != self._method:
            return real

        def faulty(*args, **kwargs):
            with self.lock:
                fire = self._left is None or self._left > 0
                if fire:
                    self.raised += 1
                    if self._left is not None:
                        self._left -= 1
            if fire:
                raise self._exc
            return real(*args, **kwargs)

        return faulty


def worker_on(app, store, **options):
    from conveyor.worker import Worker

    return Worker(store, app.processors_for(None), app.wakeup, **options)


def run_in_thread(worker):
    box: dict = {}

    def main():
        try:
            box["counts"] = worker.run(install_signal_handlers=False)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            box["error"] = exc

    t = threading.Thread(target=main, daemon=True)
    t.start()
    return t, box


def test_a_store_error_in_the_cycle_is_retried_and_nothing_is_lost(app):
    seen = []

    @app.processor("q", batch_size=5)
    def handle(item):
        seen.append(item.id)

    app.submit_many("q", range(20))
    store = Faulty(app.store, "settle_and_claim", StoreError("database hiccup"), times=3)
    t, box = run_in_thread(worker_on(app, store, stop_when_empty=True))
    t.join(60)
    assert not t.is_alive(), "the worker did not finish"
    assert "error" not in box, box
    assert store.raised == 3
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 20
    assert app.stats(["q"])["q"]["resolved"] == 20


def test_a_bug_in_the_cycle_stops_the_worker_and_says_why(app, caplog):
    @app.processor("q")
    def handle(item):
        pass

    app.submit_many("q", range(3))
    store = Faulty(app.store, "settle_and_claim", TypeError("a bug, not the database"))
    worker = worker_on(app, store, stop_when_empty=True)
    t, box = run_in_thread(worker)
    t.join(60)
    assert not t.is_alive(), "a bug must stop the worker, not loop forever"
    assert isinstance(box.get("error"), TypeError), box
    assert store.raised == 1, "a bug is not retried"
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_a_bug_in_the_keeper_stops_the_worker(app):
    started = threading.Event()

    @app.processor("q", lease_seconds=0.3)
    def handle(item):
        started.set()
        threading.Event().wait(0.5)

    app.submit("q", 1)
    store = Faulty(app.store, "rescue_expired", KeyError("keeper bug"))
    worker = worker_on(app, store)  # runs until stopped: only the keeper's failure can stop it
    t, box = run_in_thread(worker)
    t.join(60)
    alive = t.is_alive()
    if alive:
        worker.stop(force=True)
        t.join(10)
    assert not alive, "the keeper's bug did not stop the worker"
    error = box.get("error")
    assert isinstance(error, RuntimeError) and isinstance(error.__cause__, KeyError), box


def test_a_store_error_in_the_keeper_is_retried(app, caplog):
    caplog.set_level(logging.WARNING, logger="conveyor")

    @app.processor("q", lease_seconds=0.3)
    def handle(item):
        pass

    app.submit_many("q", range(5))
    store = Faulty(app.store, "rescue_expired", StoreError("database hiccup"), times=2)
    worker = worker_on(app, store, stop_when_empty=True, rescue_interval=0.01)
    t, box = run_in_thread(worker)
    t.join(60)
    assert not t.is_alive() and "error" not in box, box
    assert app.stats(["q"])["q"]["resolved"] == 5


@pytest.fixture
def store_with_table_dropped(store_url):
    """A store whose table another connection dropped: every driver error must arrive as
    StoreError (or a UsageError saying what is wrong), never as a raw driver exception."""
    app = conveyor.App(store_url)
    app.submit("q", 1)
    if store_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(app.store.path) as conn:
            conn.execute("DROP TABLE conveyor_items")
    else:
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute("DROP TABLE conveyor_items")
    yield app
    app.close()
    if not store_url.startswith("sqlite"):  # the next test's store migrates afresh
        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS conveyor_migrations")


@pytest.mark.parametrize("call", ["get", "get_many", "stats", "submit", "cancel", "requeue", "has_work", "rescue"])
def test_every_driver_error_is_a_conveyor_error(store_with_table_dropped, call):
    app = store_with_table_dropped
    calls = {
        "get": lambda: app.get(1),
        "get_many": lambda: app.store.get_many([1]),
        "stats": lambda: app.stats(),
        "submit": lambda: app.submit("q", 2),
        "cancel": lambda: app.cancel(1),
        "requeue": lambda: app.store.requeue("q"),
        "has_work": lambda: app.store.has_work(["q"]),
        "rescue": lambda: app.store.rescue_expired(),
    }
    with pytest.raises(conveyor.ConveyorError) as exc:
        calls[call]()
    assert isinstance(exc.value, StoreError), repr(exc.value)
    assert "conveyor_items" in str(exc.value)
