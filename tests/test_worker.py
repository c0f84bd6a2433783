"""The worker, in process: handlers run once, retry, dead-letter, keep order, respect concurrency,
commit transactional effects with the resolution, keep leases alive, stop gracefully, wake fast.

Workers run in a thread of the test process and are waited on (never a fixed long sleep); handlers
report through events and lists guarded by locks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid

import pytest
from waiting import wait_until

import conveyor
from conveyor import Fail, Retry, State
from conveyor.worker import Worker

FAST = {"backoff_base": 0.05, "backoff_max": 0.2}


class WorkerThread:
    """A Worker running in a thread; `join` returns its counts or re-raises what it raised."""

    def __init__(self, app, queues=None, **kw):
        self.worker = app.worker(queues, **kw)
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.worker.run(install_signal_handlers=False)
        except BaseException as exc:  # noqa: BLE001 - re-raised in join
            self.error = exc

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def join(self, timeout: float = 30.0) -> dict:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.worker.stop(force=True)
            self.thread.join(5)
            raise AssertionError(f"worker still running after {timeout}s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def stop(self, timeout: float = 30.0) -> dict:
        self.worker.stop()
        return self.join(timeout)


def drain(app, queues=None, timeout: float = 30.0, **kw) -> dict:
    """Run a worker until the queues are empty; return its counts."""
    return WorkerThread(app, queues, stop_when_empty=True, **kw).start().join(timeout)


class Peak:
    """Counts handlers running at once and remembers the most seen. With `target`, `reached` is set
    once that many run at once: handlers that `hold` until then make the overlap certain, where a
    short sleep only makes it likely (and not on a busy machine). If it never comes, the first hold
    to time out says so (`reached` stays unset) and later ones no longer wait."""

    HOLD = 10.0  # seconds

    def __init__(self, target: int | None = None):
        self.lock = threading.Lock()
        self.now = 0
        self.max = 0
        self.target = target
        self.reached = threading.Event()
        self.gave_up = threading.Event()

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.max = max(self.max, self.now)
            if self.target is not None and self.now >= self.target:
                self.reached.set()

    def hold(self) -> None:
        """In a handler: wait until `target` handlers run at once."""
        if not self.gave_up.is_set() and not self.reached.wait(self.HOLD):
            self.gave_up.set()

    async def hold_async(self) -> None:
        """`hold` for async handlers, without blocking the event loop the others run on."""
        deadline = time.monotonic() + self.HOLD
        while not (self.reached.is_set() or self.gave_up.is_set()):
            if time.monotonic() > deadline:
                self.gave_up.set()
            await asyncio.sleep(0.002)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


# -- the basics -------------------------------------------------------------------------------

def test_every_item_is_handled_exactly_once(app):
    seen = collections.Counter()
    lock = threading.Lock()

    @app.processor("orders", batch_size=25, concurrency=4)
    def handle(item):
        assert item.attempts == 1 and item.state == State.IN_PROGRESS and item.queue == "orders"
        with lock:
            seen[item.payload["i"]] += 1

    app.submit_many("orders", [{"i": i} for i in range(300)])
    counts = drain(app)
    assert seen == collections.Counter(range(300))
    assert counts["resolved"] == 300 and counts["claimed"] == 300
    s = app.stats()["orders"]
    assert (s["resolved"], s["pending"], s["in_progress"], s["dead"]) == (300, 0, 0, 0)


def test_worker_serves_several_queues(app):
    seen = {"a": [], "b": []}

    @app.processor("a")
    def handle_a(item):
        seen["a"].append(item.payload)

    @app.processor("b")
    def handle_b(item):
        seen["b"].append(item.payload)

    app.submit_many("a", list(range(10)))
    app.submit_many("b", list(range(5)))
    drain(app)
    assert sorted(seen["a"]) == list(range(10)) and sorted(seen["b"]) == list(range(5))


def test_worker_only_runs_the_queues_asked_for(app):
    @app.processor("a")
    def handle_a(item):
        pass

    @app.processor("b")
    def handle_b(item):
        raise AssertionError("queue b was not asked for")

    app.submit_many("a", [1, 2])
    app.submit_many("b", [1])
    drain(app, ["a"])
    assert app.stats()["a"]["resolved"] == 2
    assert app.stats()["b"]["pending"] == 1


# -- failures, retries, dead letters ----------------------------------------------------------

def test_raising_handler_is_retried_with_backoff_and_resolved_later(app):
    calls: dict[int, list[tuple[int, float]]] = collections.defaultdict(list)

    @app.processor("q", max_attempts=5, **FAST)
    def handle(item):
        calls[item.id].append((item.attempts, time.monotonic()))
        if item.attempts < 3:
            raise RuntimeError(f"flaky on attempt {item.attempts}")

    ids = [app.submit("q", i) for i in range(5)]
    counts = drain(app)
    for i in ids:
        assert [a for a, _ in calls[i]] == [1, 2, 3]
        times = [t for _, t in calls[i]]
        # backoff after attempt 1 is at least base/2, after attempt 2 at least base
        assert times[1] - times[0] >= 0.02 and times[2] - times[1] >= 0.045
        item = app.get(i)
        assert item.state == State.RESOLVED and item.attempts == 3
        assert "RuntimeError: flaky on attempt 2" in item.last_error
    assert counts["retried"] == 10 and counts["resolved"] == 5


def test_dead_after_max_attempts_with_the_traceback_kept(app):
    calls = collections.Counter()

    @app.processor("q", max_attempts=3, **FAST)
    def handle(item):
        calls[item.id] += 1
        raise ValueError(f"boom on {item.id}")

    a = app.submit("q", {"x": 1})
    drain(app)
    item = app.get(a)
    assert calls[a] == 3
    assert item.state == State.DEAD and item.attempts == 3
    assert "Traceback" in item.last_error
    assert f"ValueError: boom on {a}" in item.last_error
    assert "handle" in item.last_error  # the frame of the handler is in it
    assert app.stats()["q"]["dead"] == 1


def test_retry_signal_sets_the_delay(app):
    starts: list[float] = []

    @app.processor("q", max_attempts=2, backoff_base=60)  # the backoff would be far longer
    def handle(item):
        starts.append(time.monotonic())
        if item.attempts == 1:
            raise Retry(delay=0.3, reason="not yet")

    a = app.submit("q", 1)
    drain(app, timeout=20)
    assert len(starts) == 2
    assert starts[1] - starts[0] >= 0.25
    assert starts[1] - starts[0] < 10  # Retry's delay, not the 60 s backoff
    item = app.get(a)
    assert item.state == State.RESOLVED and item.attempts == 2
    assert "not yet" in item.last_error


def test_retry_signal_spends_attempts(app):
    calls = []

    @app.processor("q", max_attempts=2)
    def handle(item):
        calls.append(item.attempts)
        raise Retry(delay=0)

    a = app.submit("q", 1)
    drain(app)
    assert calls == [1, 2]
    assert app.get(a).state == State.DEAD


def test_fail_signal_dead_letters_at_once(app):
    calls = []

    @app.processor("q", max_attempts=5)
    def handle(item):
        calls.append(item.id)
        raise Fail("customer does not exist")

    a = app.submit("q", 1)
    drain(app)
    item = app.get(a)
    assert calls == [a]
    assert item.state == State.DEAD and item.attempts == 1
    assert "customer does not exist" in item.last_error


def test_a_handlers_exception_never_stops_the_worker(app):
    class Weird(BaseException):
        pass

    errors = [RuntimeError("plain"), SystemExit(3), Weird("odd"), ZeroDivisionError("math")]
    handled = []

    @app.processor("q", max_attempts=1, concurrency=2)
    def handle(item):
        n = item.payload
        if n % 2:
            raise errors[(n // 2) % len(errors)]
        handled.append(n)

    app.submit_many("q", list(range(20)))
    drain(app)
    assert sorted(handled) == list(range(0, 20, 2))
    s = app.stats()["q"]
    assert s["resolved"] == 10 and s["dead"] == 10


# -- async handlers ---------------------------------------------------------------------------

def test_async_handlers_run_concurrently_and_resolve(app):
    peak = Peak(target=5)
    seen = collections.Counter()

    @app.processor("q", concurrency=5)
    async def handle(item):
        with peak:
            await peak.hold_async()  # the first five hold until all five run at once
            await asyncio.sleep(0.01)
        seen[item.payload] += 1

    app.submit_many("q", list(range(30)))
    drain(app)
    assert seen == collections.Counter(range(30))
    assert peak.max == 5, f"{peak.max} handlers ran at once, concurrency is 5"
    assert app.stats()["q"]["resolved"] == 30


def test_async_handler_failures_retry_and_dead_letter(app):
    calls = collections.Counter()

    @app.processor("q", max_attempts=2, **FAST)
    async def handle(item):
        calls[item.payload] += 1
        await asyncio.sleep(0)
        if item.payload == "always":
            raise RuntimeError("async boom")
        if item.attempts == 1:
            raise Retry(delay=0)

    a = app.submit("q", "always")
    b = app.submit("q", "once")
    drain(app)
    assert calls == {"always": 2, "once": 2}
    assert app.get(a).state == State.DEAD and "async boom" in app.get(a).last_error
    assert app.get(b).state == State.RESOLVED


# -- batch handlers ---------------------------------------------------------------------------

def test_batch_handler_receives_lists(app):
    batches: list[list[int]] = []

    @app.processor("q", batch=True, batch_size=10, concurrency=2)
    def handle(items):
        assert isinstance(items, list)
        batches.append([it.payload for it in items])

    app.submit_many("q", list(range(35)))
    drain(app)
    assert all(1 <= len(b) <= 10 for b in batches)
    assert sorted(p for b in batches for p in b) == list(range(35))
    assert app.stats()["q"]["resolved"] == 35


def test_raising_batch_handler_retries_the_whole_batch(app):
    failed: list[int] = []
    lock = threading.Lock()

    @app.processor("q", batch=True, batch_size=5, concurrency=1, **FAST)
    def handle(items):
        with lock:
            if not failed:
                failed.extend(it.id for it in items)
                raise RuntimeError("the whole batch failed")

    ids = [app.submit("q", i) for i in range(12)]
    drain(app)
    assert len(failed) == 5
    for i in ids:
        item = app.get(i)
        assert item.state == State.RESOLVED
        assert item.attempts == (2 if i in failed else 1)


def test_async_batch_handler(app):
    batches = []

    @app.processor("q", batch=True, batch_size=4)
    async def handle(items):
        await asyncio.sleep(0)
        batches.append(len(items))

    app.submit_many("q", list(range(10)))
    drain(app)
    assert sum(batches) == 10 and max(batches) <= 4


def test_batch_handler_fail_dead_letters_the_batch(app):
    @app.processor("q", batch=True, batch_size=10)
    def handle(items):
        raise Fail("bad batch")

    ids = [app.submit("q", i) for i in range(3)]
    drain(app)
    assert all(app.get(i).state == State.DEAD for i in ids)


def test_batch_errors_settle_each_named_item_and_resolve_the_rest(app):
    """One batch of 6: item 1 raises (retried), item 2 is failed (dead), items 3 and 4 share a
    Retry(delay=0) (retried); the other two resolve at their first attempt."""
    seen: dict[int, int] = collections.Counter()

    @app.processor("q", batch=True, batch_size=6, concurrency=1, **FAST)
    def handle(items):
        for it in items:
            seen[it.payload] += 1
        if items[0].attempts > 1:
            return
        by = {it.payload: it for it in items}
        again = Retry(delay=0)
        raise conveyor.BatchErrors({by[1]: ValueError("no driver near"), by[2].id: Fail("bad address"),
                                    by[3]: again, by[4]: again})

    ids = [app.submit("q", i) for i in range(6)]
    drain(app)
    items = {app.get(i).payload: app.get(i) for i in ids}
    assert {p: (it.state, it.attempts) for p, it in items.items()} == {
        0: (State.RESOLVED, 1), 1: (State.RESOLVED, 2), 2: (State.DEAD, 1),
        3: (State.RESOLVED, 2), 4: (State.RESOLVED, 2), 5: (State.RESOLVED, 1)}
    assert "Fail: bad address" in items[2].last_error
    assert seen == {0: 1, 1: 2, 2: 1, 3: 2, 4: 2, 5: 1}


def test_batch_errors_naming_an_item_outside_the_batch_fail_the_whole_batch(app):
    @app.processor("q", batch=True, batch_size=3, max_attempts=1)
    def handle(items):
        raise conveyor.BatchErrors({10**9: ValueError("not mine")})

    ids = [app.submit("q", i) for i in range(3)]
    drain(app)
    for i in ids:
        item = app.get(i)
        assert item.state == State.DEAD
        assert f"BatchErrors names item(s) {10**9} that are not in this batch" in item.last_error


@pytest.mark.parametrize("errors, message", [
    ({}, "non-empty mapping"), ([1], "non-empty mapping"), ({"7": ValueError()}, "is not an item or an item id"),
    ({True: ValueError()}, "is not an item or an item id"), ({7: "boom"}, "not an exception")])
def test_batch_errors_refuse_what_is_not_items_and_exceptions(errors, message):
    with pytest.raises((ValueError, TypeError), match=message):
        conveyor.BatchErrors(errors)


def test_transactional_batch_errors_commit_the_others_with_their_writes(app, effects):
    """The handler writes for the items that worked and names the one that did not: the writes
    commit with the others' resolution; the named item is retried alone and then written."""
    @app.processor("q", transactional=True, batch=True, batch_size=4, **FAST)
    def handle(items, conn):
        bad = [it for it in items if it.payload == 2 and it.attempts == 1]
        for it in items:
            if it not in bad:
                conn.execute(effects.insert, (it.id, it.attempts))
        if bad:
            raise conveyor.BatchErrors({bad[0]: RuntimeError("card declined")})

    ids = [app.submit("q", i) for i in range(4)]
    drain(app)
    assert effects.rows() == sorted([(ids[0], 1), (ids[1], 1), (ids[2], 2), (ids[3], 1)])
    assert [app.get(i).state for i in ids] == [State.RESOLVED] * 4
    assert "card declined" in app.get(ids[2]).last_error


# -- ordered queues ---------------------------------------------------------------------------

def test_ordered_keeps_per_key_order_and_never_overlaps_a_key(app):
    lock = threading.Lock()
    running: set[str] = set()
    overlaps: list[str] = []
    done: dict[str | None, list[int]] = collections.defaultdict(list)
    peak = Peak(target=2)

    @app.processor("ledger", ordered=True, concurrency=4, batch_size=10, **FAST)
    def handle(item):
        key, seq = item.payload["key"], item.payload["seq"]
        with peak:
            if key is not None:
                with lock:
                    if key in running:
                        overlaps.append(key)
                    running.add(key)
            try:
                if key == "k0" and seq == 0:
                    peak.hold()  # held until another handler runs beside it
                time.sleep(0.002)
                if seq % 5 == 2 and item.attempts == 1:
                    raise RuntimeError("fail once: later items of the key must wait for the retry")
                with lock:
                    done[key].append(seq)
            finally:
                if key is not None:
                    with lock:
                        running.discard(key)

    keys = ["k0", "k1", "k2", "k3", "k4", None]
    payloads = [{"key": k, "seq": s} for s in range(12) for k in keys]
    app.submit_many("ledger", payloads, key=lambda p: p["key"])
    drain(app, timeout=60)
    assert overlaps == []
    for k in keys[:-1]:
        assert done[k] == list(range(12)), (k, done[k])
    assert sorted(done[None]) == list(range(12))
    assert peak.max > 1  # different keys did run in parallel
    assert app.stats()["ledger"]["resolved"] == len(payloads)


def test_ordered_slow_key_does_not_hold_up_other_keys(app):
    slow_started = threading.Event()
    slow_release = threading.Event()

    @app.processor("ledger", ordered=True, concurrency=4, lease_seconds=30)
    def handle(item):
        if item.key == "slow":
            slow_started.set()
            assert slow_release.wait(60)

    app.submit("ledger", "slow", key="slow")
    fast = [app.submit("ledger", i, key="fast") for i in range(5)]
    w = WorkerThread(app, stop_when_empty=True).start()
    try:
        assert slow_started.wait(30)
        # the fast key's items follow each other while the slow key's item is still running (held
        # until released below: without that, the fast key would wait for it and time out here)
        wait_until(lambda: all(app.get(i).state == State.RESOLVED for i in fast),
                   what="the other key's items to be handled while one key is busy")
    finally:
        slow_release.set()
        w.join()


# -- concurrency ------------------------------------------------------------------------------

@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_is_respected(app, concurrency):
    peak = Peak(target=concurrency)

    @app.processor("q", concurrency=concurrency, batch_size=50)
    def handle(item):
        with peak:
            peak.hold()  # the first ones hold until `concurrency` run at once ...
            time.sleep(0.01)  # ... and all stay a while: a handler too many would show in peak.max

    app.submit_many("q", list(range(4 * concurrency + 2)))
    drain(app)
    assert peak.max == concurrency, f"{peak.max} handlers ran at once, concurrency is {concurrency}"
    assert app.stats()["q"]["resolved"] == 4 * concurrency + 2


# -- transactional handlers -------------------------------------------------------------------

@pytest.fixture
def effects(app):
    """A table of our own on the worker's database, and how to read it."""
    table = f"effects_{uuid.uuid4().hex[:8]}"
    ph = "?" if app.url.startswith("sqlite") else "%s"
    with app.store.transaction() as conn:
        conn.execute(f"CREATE TABLE {table} (item_id INTEGER PRIMARY KEY, attempt INTEGER NOT NULL)")

    class Effects:
        name = table
        insert = f"INSERT INTO {table} (item_id, attempt) VALUES ({ph}, {ph})"

        @staticmethod
        def rows():
            with app.store.transaction() as conn:
                return [tuple(r) for r in conn.execute(f"SELECT item_id, attempt FROM {table} ORDER BY item_id").fetchall()]

    yield Effects
    with app.store.transaction() as conn:
        conn.execute(f"DROP TABLE {table}")


def test_transactional_writes_commit_with_the_resolution(app, effects):
    @app.processor("q", transactional=True, concurrency=2)
    def handle(item, conn):
        conn.execute(effects.insert, (item.id, item.attempts))

    ids = [app.submit("q", i) for i in range(10)]
    counts = drain(app)
    assert effects.rows() == [(i, 1) for i in ids]
    assert all(app.get(i).state == State.RESOLVED for i in ids)
    assert counts["resolved"] == 10


def test_transactional_writes_roll_back_when_the_handler_raises(app, effects):
    @app.processor("q", transactional=True, max_attempts=3, **FAST)
    def handle(item, conn):
        conn.execute(effects.insert, (item.id, item.attempts))
        if item.payload == "dead":
            raise Fail("never mind")
        if item.attempts == 1:
            raise RuntimeError("after writing")

    a = app.submit("q", "flaky")
    b = app.submit("q", "dead")
    drain(app)
    assert effects.rows() == [(a, 2)]  # the first attempt's write was rolled back
    assert app.get(a).state == State.RESOLVED and app.get(a).attempts == 2
    assert app.get(b).state == State.DEAD


def test_transactional_batch_handler(app, effects):
    @app.processor("q", transactional=True, batch=True, batch_size=4)
    def handle(items, conn):
        for it in items:
            conn.execute(effects.insert, (it.id, it.attempts))

    ids = [app.submit("q", i) for i in range(9)]
    drain(app)
    assert effects.rows() == [(i, 1) for i in ids]


async def _execute(conn, sql, args):
    """The handler's connection is async on PostgreSQL (psycopg.AsyncConnection), sync on SQLite."""
    result = conn.execute(sql, args)
    if asyncio.iscoroutine(result):
        await result


def test_async_transactional_batch_errors_commit_the_others_with_their_writes(app, effects):
    @app.processor("q", transactional=True, batch=True, batch_size=3, **FAST)
    async def handle(items, conn):
        for it in items:
            if it.payload != 1:
                await _execute(conn, effects.insert, (it.id, it.attempts))
        if any(it.payload == 1 for it in items):
            raise conveyor.BatchErrors({it: Fail("refused by the bank") for it in items if it.payload == 1})

    ids = [app.submit("q", i) for i in range(3)]
    drain(app)
    assert effects.rows() == [(ids[0], 1), (ids[2], 1)]
    assert [app.get(i).state for i in ids] == [State.RESOLVED, State.DEAD, State.RESOLVED]


def test_async_transactional_writes_commit_with_the_resolution(app, effects):
    running = collections.Counter()

    @app.processor("q", transactional=True, concurrency=3)
    async def handle(item, conn):
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
        await _execute(conn, effects.insert, (item.id, item.attempts))
        await asyncio.sleep(0.01)
        running["now"] -= 1

    ids = [app.submit("q", i) for i in range(12)]
    counts = drain(app)
    assert effects.rows() == [(i, 1) for i in ids]
    assert all(app.get(i).state == State.RESOLVED for i in ids)
    assert counts["resolved"] == 12


def test_async_transactional_writes_roll_back_when_the_handler_raises_or_times_out(app, effects):
    # 1 s is also the budget of the quick runs (an insert): one that overran would be retried too
    @app.processor("q", transactional=True, max_attempts=3, timeout_seconds=1.0, **FAST)
    async def handle(item, conn):
        await _execute(conn, effects.insert, (item.id, item.attempts))
        if item.attempts == 1 and item.payload == "raise":
            raise RuntimeError("after writing")
        if item.attempts == 1 and item.payload == "hang":
            await asyncio.sleep(30)

    a = app.submit("q", "raise")
    b = app.submit("q", "hang")
    drain(app)
    assert effects.rows() == [(a, 2), (b, 2)]  # first attempts' writes were rolled back
    assert "timeout_seconds" in (app.get(b).last_error or "")
    assert app.get(a).state == app.get(b).state == State.RESOLVED


def test_transactional_writes_roll_back_when_the_lease_is_lost(app, effects):
    """Item B is cancelled by another transaction (A's) after B was claimed: B's handler still
    runs, but its resolution is refused and its writes must not survive."""
    ran_b = threading.Event()

    @app.processor("q", transactional=True, concurrency=1, batch_size=2, lease_seconds=30)
    def handle(item, conn):
        conn.execute(effects.insert, (item.id, item.attempts))
        if item.payload == "A":
            app.store.cancel(b)  # commits together with A's resolution
        else:
            ran_b.set()

    a = app.submit("q", "A")
    b = app.submit("q", "B")
    counts = drain(app)
    assert ran_b.is_set()
    assert effects.rows() == [(a, 1)]
    assert app.get(a).state == State.RESOLVED
    assert app.get(b).state == State.CANCELLED
    assert counts["lost"] == 1


def test_transactional_writes_roll_back_when_cancelled_while_running(app, effects):
    if app.url.startswith("sqlite"):
        pytest.skip("on SQLite a transactional handler holds the write lock: no other connection "
                    "can take its item while it runs (see the test above for a lost lease there)")
    started = threading.Event()
    cancelled = threading.Event()

    @app.processor("q", transactional=True, lease_seconds=30)
    def handle(item, conn):
        conn.execute(effects.insert, (item.id, item.attempts))
        started.set()
        assert cancelled.wait(10)

    a = app.submit("q", 1)
    w = WorkerThread(app, stop_when_empty=True).start()
    try:
        assert started.wait(10)
        app.cancel(a)  # from the test's own connection, while the handler's transaction is open
    finally:
        cancelled.set()
    counts = w.join()
    assert effects.rows() == []
    assert app.get(a).state == State.CANCELLED
    assert counts["lost"] == 1 and counts["resolved"] == 0


# -- leases -----------------------------------------------------------------------------------

# Leases here are 1 s (a heartbeat every 1/3 s) and the work outlives them twice over: a heartbeat
# may come up to 2/3 s late on a busy machine before the lease runs out under the handler.
LEASE = 1.0


def test_heartbeats_keep_a_long_handler_leased(app):
    lease = LEASE
    calls = []

    @app.processor("q", lease_seconds=lease, max_attempts=3)
    def handle(item):
        calls.append(item.attempts)
        time.sleep(2 * lease)  # the work outlives the lease twice over

    a = app.submit("q", 1)
    counts = drain(app)
    item = app.get(a)
    assert calls == [1]
    assert item.state == State.RESOLVED and item.attempts == 1 and item.last_error is None
    assert counts["rescued"] == 0 and counts["lost"] == 0


def _peer_rescues_while(app, done: threading.Event) -> tuple[list, threading.Thread]:
    """Play a peer worker: rescue expired leases every 50 ms until `done`; returns what it rescued
    and its thread (join it before the app closes)."""
    rescued: list = []

    def loop():
        while not done.wait(0.05):
            rescued.extend(app.store.rescue_expired())

    peer = threading.Thread(target=loop, daemon=True)
    peer.start()
    return rescued, peer


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:  # pure-Python busy loop, holding the GIL as long as it may
        n += 1


@pytest.mark.parametrize("hog", ["async handler blocks the event loop", "sync handler spins the CPU"])
def test_heartbeat_beats_while_the_handler_hogs_its_thread(app, hog):
    lease, calls, done = LEASE, [], threading.Event()

    if hog.startswith("async"):
        @app.processor("q", lease_seconds=lease, max_attempts=3)
        async def handle(item):
            calls.append(item.attempts)
            time.sleep(2 * lease)  # blocks the whole event loop, not just this task
    else:
        @app.processor("q", lease_seconds=lease, max_attempts=3)
        def handle(item):
            calls.append(item.attempts)
            _spin(2 * lease)

    a = app.submit("q", 1)
    rescued, peer = _peer_rescues_while(app, done)
    try:
        counts = drain(app)
    finally:
        done.set()
        peer.join()
    assert calls == [1] and rescued == []  # the peer never found the lease expired
    assert app.get(a).state == State.RESOLVED and app.get(a).attempts == 1
    assert counts["lost"] == 0


def test_worker_prunes_finished_items_older_than_prune_after(app):
    prune_after = 1.0

    @app.processor("q")
    def handle(item):
        if item.payload == "fail":
            raise Fail("dead, and old enough to prune")

    old = [app.submit("q", p) for p in ("a", "b", "fail")]
    drain(app)
    old_finished = max(app.get(i).finished_at.timestamp() for i in old)
    wait_until(lambda: time.time() - old_finished > prune_after + 0.3, what="the old items to age past prune_after")
    # finished just before the pruning worker starts: a second old at its first prune, and the next
    # prune comes only after prune_interval (10 s at least)
    young = [app.submit("q", p) for p in ("c", "d")]
    drain(app)
    fresh = [app.submit("q", p) for p in ("e", "f")]  # finished under the pruning worker
    running = WorkerThread(app, prune_after=prune_after).start()

    def gone(item_id):
        try:
            app.get(item_id)
        except conveyor.ItemNotFound:
            return True
        return False

    wait_until(lambda: all(gone(i) for i in old), what="old finished items pruned")
    wait_until(lambda: all(app.get(i).state == State.RESOLVED for i in fresh), what="fresh items resolved")
    running.stop()
    assert all(app.get(i).state == State.RESOLVED for i in young)
    assert app.stats()["q"]["resolved"] == 4 and app.stats()["q"]["dead"] == 0


def test_worker_rescues_items_of_a_crashed_worker(app):
    from conveyor.model import Claim

    handled = []

    @app.processor("q")  # a long lease of its own: only the crashed worker's may run out
    def handle(item):
        handled.append(item.attempts)

    a = app.submit("q", 1)
    (claimed,) = app.store.claim(Claim("q", 1, 0.3, 5), "crashed")  # and never heard of again
    # expired before the worker starts: its keeper's first rescue pass, at start, finds it
    wait_until(lambda: time.time() > claimed.lease_expires_at.timestamp() + 0.05, what="the crashed lease to expire")
    counts = drain(app, timeout=30)
    assert handled == [2]
    assert counts["rescued"] == 1
    assert app.get(a).state == State.RESOLVED
    assert app.store.resolve([(a, claimed.claim_token)]) == [a]


# -- stopping ---------------------------------------------------------------------------------

def test_stop_releases_unstarted_items_and_finishes_running_ones(app):
    started = threading.Event()
    finish = threading.Event()
    calls = []

    @app.processor("q", concurrency=1, batch_size=5)
    def handle(item):
        calls.append(item.id)
        started.set()
        assert finish.wait(20)

    ids = [app.submit("q", i) for i in range(5)]
    w = WorkerThread(app).start()
    try:
        assert started.wait(10)
        wait_until(lambda: app.stats()["q"]["in_progress"] == 5, what="the batch to be claimed")
        w.worker.stop()
        # the four that never started go back at once, while the first one still runs
        wait_until(lambda: app.stats()["q"]["pending"] == 4, what="unstarted items to be released")
        assert app.stats()["q"]["in_progress"] == 1
    finally:
        finish.set()
    counts = w.join()
    first, rest = calls[0], [i for i in ids if i != calls[0]]
    assert calls == [first]
    assert app.get(first).state == State.RESOLVED and app.get(first).attempts == 1
    for i in rest:
        item = app.get(i)
        assert item.state == State.PENDING and item.attempts == 0
    assert counts["released"] == 4 and counts["resolved"] == 1


def _idle(worker: Worker, queue: str = "q") -> bool:
    """The worker's last claim on `queue` came back empty: it is idle, or about to be."""
    return worker.lanes[queue].dry


def test_stop_of_an_idle_worker_is_prompt(app, slow_poll):
    @app.processor("q")
    def handle(item):
        pass

    w = WorkerThread(app).start()
    wait_until(lambda: _idle(w.worker), what="the worker to go idle")
    t0 = time.monotonic()
    w.stop(timeout=30)
    # idle, it would next look at its queue in a minute: stop() woke it
    assert time.monotonic() - t0 < 20


def test_stop_when_empty_waits_for_retries_to_come_due(app):
    calls = []

    @app.processor("q", **FAST)
    def handle(item):
        calls.append(item.attempts)
        if item.attempts == 1:
            raise Retry(delay=0.2)

    app.submit("q", 1)
    drain(app)
    assert calls == [1, 2]


# -- wake-ups ---------------------------------------------------------------------------------

def test_submit_wakes_an_idle_worker(app, slow_poll):
    """An idle worker here polls its queue once a minute (slow_poll): each item starting within
    seconds was started by the submit's wake-up, not found by a poll."""
    started = threading.Event()

    @app.processor("q")
    def handle(item):
        started.set()

    app.migrate()
    w = WorkerThread(app).start()
    try:
        for n in range(2):
            wait_until(lambda: _idle(w.worker) and w.worker._inflight_total() == 0, what="the worker to go idle")
            started.clear()
            app.submit("q", n)
            assert started.wait(20), f"item {n} was not started: the submit did not wake the idle worker"
    finally:
        w.stop(timeout=30)
    assert app.stats()["q"]["resolved"] == 2


def test_worker_stops_when_empty_with_nothing_to_do(app):
    @app.processor("q")
    def handle(item):
        raise AssertionError("nothing was submitted")

    counts = drain(app, timeout=10)
    assert counts["claimed"] == 0


def test_run_worker_in_process(app):
    seen = []

    @app.processor("q")
    def handle(item):
        seen.append(item.payload)

    app.submit_many("q", [1, 2, 3])
    counts = app.run_worker(stop_when_empty=True, install_signal_handlers=False)
    assert sorted(seen) == [1, 2, 3] and counts["resolved"] == 3


def test_items_carry_their_fields_to_the_handler(app):
    got = []

    @app.processor("q")
    def handle(item: conveyor.Item):
        got.append(item)

    a = app.submit("q", {"x": 1}, key="k", dedup_key="d", priority=3)
    drain(app)
    (item,) = got
    assert (item.id, item.queue, item.payload, item.key, item.dedup_key, item.priority, item.attempts) == (
        a, "q", {"x": 1}, "k", "d", 3, 1)
    assert item.created_at is not None and item.lease_owner is not None


# -- what the worker says ---------------------------------------------------------------------

def messages(caplog, level: int) -> list[str]:
    """The conveyor log lines at `level`, without the fields' text tail (`  [worker=… queue=… items=…]`)."""
    return [r.getMessage().split("  [worker=")[0] for r in list(caplog.records)
            if r.name.startswith("conveyor") and r.levelno == level]


def test_a_percent_sign_in_a_queue_name_is_logged_as_it_is(app, caplog):
    """The fields' tail joins the line's format string: a queue named with % must neither break the
    formatting nor be doubled."""
    caplog.set_level(logging.INFO, logger="conveyor")

    @app.processor("disk-100%s", max_attempts=1)
    def handle(item):
        raise Fail("full")

    a = app.submit("disk-100%s", 1)
    drain(app)
    dead = [r.getMessage() for r in caplog.records if "is dead" in r.getMessage()]
    assert dead == [f"item {a} of 'disk-100%s' is dead after attempt 1/1: Fail: full  "
                    f"[worker={dead and dead[0].split('[worker=')[1].split()[0]} queue=disk-100%s items={a}]"], dead


def test_every_worker_log_line_names_the_worker_and_what_it_is_about(app, caplog):
    """Fields on every line a worker logs: its name always; the queue and item ids where the line
    is about items; as record attributes (for a structured handler) and as the message's tail."""
    caplog.set_level(logging.DEBUG, logger="conveyor")

    @app.processor("q", max_attempts=2, **FAST)
    def handle(item):
        if item.payload == "fail":
            raise Fail("customer gone")
        if item.payload == "retry" and item.attempts == 1:
            raise Retry(delay=0, reason="busy")
        raise ValueError("boom")

    ids = {p: app.submit("q", p) for p in ("fail", "retry", "raise")}
    WorkerThread(app, None, stop_when_empty=True, name="w-fields").start().join(30)
    lines = [r for r in list(caplog.records) if r.name == "conveyor.worker"]
    assert len(lines) >= 6, [r.getMessage() for r in lines]  # started, failed, retry, raised x2, dead x3, stopped
    for r in lines:
        assert r.worker == "w-fields", r.getMessage()
        assert r.getMessage().endswith("]") and "  [worker=w-fields" in r.getMessage(), r.getMessage()
    about = {}
    for r in lines:
        if r.item_ids:
            assert r.queue == "q", r.getMessage()
            assert f"queue=q items={','.join(map(str, r.item_ids))}]" in r.getMessage(), r.getMessage()
            for i in r.item_ids:
                about.setdefault(i, []).append(r.getMessage())
    assert set(about) == set(ids.values()), about  # every item's fate was told with its id as a field
    dead = [r for r in lines if "is dead" in r.getMessage()]
    assert sorted(i for r in dead for i in r.item_ids) == sorted(ids.values()), [r.getMessage() for r in dead]


def test_every_item_that_goes_dead_is_logged_and_counted_apart_from_retries(app, caplog):
    caplog.set_level(logging.INFO, logger="conveyor")

    @app.processor("q", max_attempts=2, **FAST)
    def handle(item):
        if item.payload == "fail":
            raise Fail("customer gone\nthe details below")
        raise ValueError(f"boom on {item.id}\nsecond line")

    raising = app.submit("q", "raise")
    failing = app.submit("q", "fail")
    counts = drain(app)
    assert app.get(raising).state == app.get(failing).state == State.DEAD
    warnings = messages(caplog, logging.WARNING)
    assert f"item {raising} of 'q' is dead after attempt 2/2: ValueError: boom on {raising}" in warnings, warnings
    assert f"item {failing} of 'q' is dead after attempt 1/2: Fail: customer gone" in warnings, warnings
    assert sum("is dead" in m for m in warnings) == 2  # each once, none for the first, retried attempt
    assert counts["dead"] == 2 and counts["retried"] == 1, counts


def test_fail_and_retry_outcomes_are_logged_at_debug(app, caplog):
    caplog.set_level(logging.DEBUG, logger="conveyor")

    @app.processor("q", max_attempts=3)
    def handle(item):
        if item.attempts == 1:
            raise Retry(delay=0, reason="supplier busy")
        raise Fail("supplier refused")

    a = app.submit("q", 1)
    counts = drain(app)
    debug = messages(caplog, logging.DEBUG)
    assert any(f"retry of item {a} (attempt 1/3) in 0s: supplier busy" in m for m in debug), debug
    assert any(f"failed item {a} (attempt 2): supplier refused" in m for m in debug), debug
    assert not any("supplier busy" in m for m in messages(caplog, logging.WARNING))
    assert counts["retried"] == 1 and counts["dead"] == 1, counts


def test_an_item_rescued_past_its_attempts_is_logged_as_dead(app, caplog):
    from conveyor.model import Claim

    caplog.set_level(logging.INFO, logger="conveyor")

    @app.processor("q", lease_seconds=0.3, max_attempts=1)
    def handle(item):
        raise AssertionError("a dead item is never handled")

    a = app.submit("q", 1)
    app.store.claim(Claim("q", 1, 0.3, 1), "crashed-worker")  # its only attempt, never finished
    counts = drain(app, timeout=30)
    assert app.get(a).state == State.DEAD and counts["rescued"] == 1
    dead = [m for m in messages(caplog, logging.WARNING) if "is dead" in m]
    assert dead == [f"item {a} of 'q' is dead after attempt 1/1: lease expired: worker crashed-worker "
                    "stopped heartbeating during attempt 1 (it crashed, was killed, or lost the database)"], dead


def test_cancelling_a_running_item_is_reported_as_a_cancel(app, caplog):
    caplog.set_level(logging.INFO, logger="conveyor")
    started = threading.Event()
    cancelled = threading.Event()

    @app.processor("q")
    def handle(item):
        started.set()
        assert cancelled.wait(10)

    a = app.submit("q", 1)
    w = WorkerThread(app, stop_when_empty=True).start()
    try:
        assert started.wait(10)
        app.cancel(a)
    finally:
        cancelled.set()
    counts = w.join()
    assert counts["lost"] == 1 and counts["resolved"] == 0
    assert f"item(s) {a} cancelled while running; its result was dropped" in messages(caplog, logging.INFO)
    assert not [m for m in messages(caplog, logging.WARNING) if "lease lost" in m or "another worker" in m]


def test_the_heartbeat_tells_a_cancel_from_a_lost_lease_and_says_it_once(app, caplog):
    caplog.set_level(logging.INFO, logger="conveyor")
    started = threading.Event()
    done = threading.Event()

    @app.processor("q", lease_seconds=LEASE)
    def handle(item):
        started.set()
        assert done.wait(30)

    a = app.submit("q", 1)
    w = WorkerThread(app, stop_when_empty=True)
    keeper = w.worker.keeper
    beats = []
    real_beat = keeper.beat

    def beat():
        real_beat()
        beats.append(time.monotonic())

    keeper.beat = beat
    w.start()
    said = f"heartbeat: item(s) {a} of 'q' cancelled while running; their results will be dropped"
    try:
        assert started.wait(10)
        app.cancel(a)
        wait_until(lambda: said in messages(caplog, logging.INFO), 15, what="the heartbeat to notice the cancel")
        seen = len(beats)
        wait_until(lambda: len(beats) >= seen + 2, what="two more heartbeats")
    finally:
        done.set()
    counts = w.join()
    assert counts["lost"] == 1
    assert messages(caplog, logging.INFO).count(said) == 1
    assert not [m for m in messages(caplog, logging.WARNING) if "lease lost" in m]


def test_a_transactional_run_cancelled_while_running_says_its_writes_were_rolled_back(app, effects, caplog):
    if app.url.startswith("sqlite"):
        pytest.skip("on SQLite a transactional handler holds the write lock: nothing can cancel its item meanwhile")
    caplog.set_level(logging.INFO, logger="conveyor")
    started = threading.Event()
    cancelled = threading.Event()

    @app.processor("q", transactional=True)
    def handle(item, conn):
        conn.execute(effects.insert, (item.id, item.attempts))
        started.set()
        assert cancelled.wait(10)

    a = app.submit("q", 1)
    w = WorkerThread(app, stop_when_empty=True).start()
    try:
        assert started.wait(10)
        app.cancel(a)
    finally:
        cancelled.set()
    w.join()
    assert effects.rows() == []
    assert (f"item(s) {a} cancelled while running; the handler's writes were rolled back"
            in messages(caplog, logging.INFO))
    assert not [m for m in messages(caplog, logging.WARNING) if "lease lost" in m]


def test_a_lost_lease_is_still_reported_as_one(app, caplog):
    from conveyor.model import Claim

    caplog.set_level(logging.INFO, logger="conveyor")
    runs = []
    peer = []

    @app.processor("q", max_attempts=3)
    def handle(item):
        runs.append(item.attempts)
        # as if this worker stalled: its lease runs out, a rescue takes the item and a peer claims
        # it, all in one transaction, so this worker cannot claim it back in between
        with app.store.transaction():
            assert app.store.extend_leases([(item.id, item.claim_token)], -60) == []
            app.store.rescue_expired()
            peer.extend(app.store.claim(Claim("q", 1, 30, 3), "peer-worker"))

    a = app.submit("q", 1)
    w = WorkerThread(app, stop_when_empty=True).start()
    try:
        said = f"lease lost on item(s) {a} "
        wait_until(lambda: [m for m in messages(caplog, logging.WARNING) if m.startswith(said)], 15,
                   what="the refused result to be reported")
    finally:
        wait_until(lambda: peer or w.error or not w.thread.is_alive(), what="the peer's claim")
        if peer:
            assert app.store.resolve([(a, peer[0].claim_token)]) == []  # the peer finishes: the queue is empty
    counts = w.join()
    assert runs == [1] and [it.id for it in peer] == [a] and app.get(a).state == State.RESOLVED
    assert counts["lost"] == 1 and counts["resolved"] == 0, counts
    lost = [m for m in messages(caplog, logging.WARNING) if m.startswith(f"lease lost on item(s) {a} ")]
    assert lost == [f"lease lost on item(s) {a} (it expired and the item was rescued; another worker may hold it "
                    "now): its result was dropped"], lost
    assert not [m for m in messages(caplog, logging.INFO) if "cancelled" in m]


def test_a_forced_stop_says_what_it_abandoned(app, caplog):
    caplog.set_level(logging.INFO, logger="conveyor")
    started = threading.Event()
    release = threading.Event()

    @app.processor("q", concurrency=1, max_attempts=3)
    def handle(item):
        started.set()
        release.wait(30)

    a = app.submit("q", 1)
    w = WorkerThread(app).start()
    try:
        assert started.wait(10)
        w.worker.stop()  # the first signal: finish what runs ...
        w.worker.stop(force=True)  # ... the second: stop now
        counts = w.join()
    finally:
        release.set()
    item = app.get(a)
    assert item.state == State.PENDING and item.attempts == 1 and "forced stop" in item.last_error
    assert (f"forced stop: abandoned 1 running item(s) ({a}): sent back to pending for a retry, their attempt spent"
            in messages(caplog, logging.WARNING)), messages(caplog, logging.WARNING)
    assert counts["retried"] == 1, counts


def test_a_shutdown_timeout_says_what_it_abandoned_and_kills_a_last_attempt(app, caplog):
    caplog.set_level(logging.INFO, logger="conveyor")
    started = threading.Event()
    release = threading.Event()

    @app.processor("q", concurrency=1, max_attempts=1)
    def handle(item):
        started.set()
        release.wait(30)

    a = app.submit("q", 1)
    w = WorkerThread(app, shutdown_timeout=0.2).start()
    try:
        assert started.wait(10)
        w.worker.stop()  # the handler outlives the shutdown timeout
        counts = w.join()
    finally:
        release.set()
    item = app.get(a)
    assert item.state == State.DEAD and "shut down after 0.2s" in item.last_error, item
    warnings = messages(caplog, logging.WARNING)
    assert (f"shutdown timeout (0.2s): abandoned 1 running item(s) ({a}), their attempt spent: 0 sent back to "
            "pending for a retry, 1 dead (it was their last)" in warnings), warnings
    assert f"item {a} of 'q' is dead after attempt 1/1: worker {w.worker.name}: shut down after 0.2s while the " \
           "handler was still running" in warnings, warnings
    assert counts["dead"] == 1 and counts["retried"] == 0, counts
