"""Reproductions found by the chaos suite: timeout_seconds must hold while the database stalls.

A hung handler is given up on at timeout_seconds and its late result refused (each one here hangs
until the watchdog has given up on it, then returns). Chaos 3 on SQLite found hung runs resolving
their items on attempt 1: the timeout check ran on the keeper thread,
right after the heartbeat, and the heartbeat was blocked on the database (the write lock held by a
hung transactional handler, or by anyone else), so the check came only after the hang had ended and
the late result had been accepted. Here: the handler hangs while the database is locked against
writers (SQLite: another connection's BEGIN IMMEDIATE; PostgreSQL: LOCK TABLE ... IN EXCLUSIVE
MODE, which blocks the heartbeat's UPDATE as well) and must still be given up on.
"""

from __future__ import annotations

import threading

from waiting import wait_until

import conveyor
from conveyor.worker import Worker

from .harness import EFFECTS_PG, EFFECTS_SQLITE, Chaos

# The timeout is also the budget of the run after the hang (a transaction begun, one insert,
# committed): a second on a busy machine. Heartbeats every 0.8 s: one is under way (and blocked)
# when the timeout comes due.
TIMEOUT = 1.0
LEASE = 2.4
GIVE_UP = 30.0  # seconds a hung handler waits to be given up on; a broken watchdog fails the test then


def _lock_database(chaos: Chaos, locked: threading.Event, unlock: threading.Event) -> None:
    conn = chaos.connect()
    try:
        if chaos.kind == "sqlite":
            conn.execute("BEGIN IMMEDIATE")
        else:
            conn.execute("BEGIN")
            conn.execute("LOCK TABLE conveyor_items IN EXCLUSIVE MODE")
        locked.set()
        unlock.wait(GIVE_UP + 10)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _hang_until_given_up(worker: Worker, queue: str) -> None:
    """Called in a handler: hang until the watchdog gives up on this run (the handler's thread is
    marked abandoned), then return, late. Waiting for the give-up itself, not for a sleep longer
    than timeout_seconds: the late return certainly comes after it, however slow the machine."""
    lane = worker.lanes[queue]
    try:
        wait_until(lane.given_up, timeout=GIVE_UP, what="the watchdog to give up on the hung handler")
    except AssertionError:
        pass  # return late anyway: the test then finds the late result accepted, and fails


def _run(worker: Worker) -> dict:
    return worker.run(install_signal_handlers=False)


def test_hung_handler_is_given_up_on_while_the_database_is_locked(chaos):
    app = conveyor.App(chaos.url)
    calls: list[int] = []

    @app.processor("plain", lease_seconds=LEASE, timeout_seconds=TIMEOUT, backoff_base=0.01, batch_size=1, concurrency=1)
    def hang(item):
        calls.append(item.attempts)
        if item.attempts == 1:  # the database is locked for as long as the handler hangs
            locked, unlock = threading.Event(), threading.Event()
            locker = threading.Thread(target=_lock_database, args=(chaos, locked, unlock))
            locker.start()
            try:
                assert locked.wait(GIVE_UP)
                _hang_until_given_up(worker, "plain")
            finally:
                unlock.set()
                locker.join()

    worker = app.worker(stop_when_empty=True, shutdown_timeout=5)
    try:
        (item_id,) = [app.submit("plain", {})]
        _run(worker)
        it = app.get(item_id)
    finally:
        app.close()
    assert it.state == conveyor.State.RESOLVED
    assert it.attempts == 2 and calls == [1, 2], (
        f"the run that hung past timeout_seconds={TIMEOUT} resolved the item (attempts {it.attempts}, "
        f"calls {calls}): its late result should have been refused")


def test_hung_transactional_handler_is_given_up_on(chaos):
    """On SQLite the hung handler holds the write lock itself (it runs inside its transaction)."""
    app = conveyor.App(chaos.url)
    app.migrate()
    conn = chaos.connect()
    conn.execute("DROP TABLE IF EXISTS chaos_effects")
    conn.execute(EFFECTS_SQLITE if chaos.kind == "sqlite" else EFFECTS_PG)
    conn.close()

    @app.processor("tx", transactional=True, lease_seconds=LEASE, timeout_seconds=TIMEOUT, backoff_base=0.01,
                   batch_size=1, concurrency=1)
    def book(item, conn):
        mark = "?" if chaos.kind == "sqlite" else "%s"
        conn.execute(f"INSERT INTO chaos_effects (item_id, attempt, pid) VALUES ({mark}, {mark}, 0)",
                     (item.id, item.attempts))
        if item.attempts == 1:
            _hang_until_given_up(worker, "tx")

    worker = app.worker(stop_when_empty=True, shutdown_timeout=5)
    try:
        item_id = app.submit("tx", {})
        _run(worker)
        it = app.get(item_id)
    finally:
        app.close()
    effects = chaos.sql("SELECT item_id, attempt FROM chaos_effects")
    assert it.state == conveyor.State.RESOLVED
    assert (it.attempts, effects) == (2, [(item_id, 2)]), (
        f"the hung attempt committed (attempts {it.attempts}, effects (item, attempt) {effects}): its writes "
        "should have been rolled back at timeout_seconds")


def test_threads_replacing_abandoned_ones_keep_their_results(chaos):
    """Chaos 3 on SQLite found an item stuck in progress forever, its lease kept alive by
    heartbeats: a handler thread abandoned at its timeout retires, and its ident went on marking
    the lane's `abandoned` set; a thread started later can get the same ident (Linux reuses them),
    and every result of that innocent thread was then dropped as "returned after its timeout"
    while its items stayed in flight, heartbeated, never settled."""
    app = conveyor.App(chaos.url)
    hangs = 4

    @app.processor("plain", lease_seconds=5, timeout_seconds=0.15, backoff_base=0.01, batch_size=1, concurrency=1)
    def handler(item):
        if item.id <= hangs and item.attempts == 1:
            _hang_until_given_up(worker, "plain")  # abandoned; a new thread takes over, this one retires

    worker = app.worker(stop_when_empty=True, shutdown_timeout=1)
    try:
        app.submit_many("plain", [{"n": i} for i in range(12)])
        runner = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True)
        runner.start()
        runner.join(GIVE_UP * hangs + 30)
        stuck = runner.is_alive()
        if stuck:
            worker.stop(force=True)
            runner.join(10)
        states = app.stats(["plain"])["plain"]
    finally:
        app.close()
    assert not stuck and states["resolved"] == 12, f"items stuck in progress: {states}"
