"""PostgreSQL-only behaviour: many processes draining one queue, connections killed and the server
restarted under running workers, ordered claims racing, the claim plan, fork safety, wake-ups.

Store behaviour shared with SQLite lives in tests/stores/ (the conformance suite); these tests cover
what only a client/server database can get wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg
import psycopg.rows
import pytest
from waiting import wait_until

import conveyor
from conveyor.errors import ItemNotFound, StoreError, UsageError
from conveyor.model import Claim, NewItem, Outcomes
from conveyor.stores.postgres import PostgresStore
from conveyor.stores.postgres_queries import CLAIM, CLAIM_ORDERED, COPY_FROM
from conveyor.stores.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pg_url(pg_database):
    with admin(pg_database) as conn:
        if conn.execute("SELECT to_regclass('conveyor_items')").fetchone()[0]:
            conn.execute("TRUNCATE conveyor_items RESTART IDENTITY")
    return pg_database


@pytest.fixture
def store(pg_url):
    s = PostgresStore(pg_url)
    s.migrate()
    yield s
    s.close()


def admin(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, application_name="conveyor-test-admin")


def new(queue="q", payload=None, **kw) -> NewItem:
    return NewItem(queue=queue, payload_json=json.dumps(payload), **kw)


# -- submit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, COPY_FROM + 50])
def test_submit_ids_and_dedup_skips_match_sqlite(store, tmp_path, n):
    """Both submit paths (one statement; COPY) report ids and dedup skips in input order exactly
    where SQLite does: duplicates within the batch and against stored items."""
    store.submit_many([new(payload="old", dedup_key="d1")])
    batch = [new(payload={"n": i}, dedup_key=(f"d{i % 7}" if i % 3 == 0 else None), key=f"k{i % 2}",
                 run_at=(time.time() + 60 if i == 4 else None), priority=i % 3) for i in range(n)]
    lite = SQLiteStore(f"sqlite:///{tmp_path / 'x.db'}")
    lite.submit_many([new(payload="old", dedup_key="d1")])
    expected = [i is None for i in lite.submit_many(batch)]
    lite.close()
    got = store.submit_many(batch)
    assert [i is None for i in got] == expected
    stored = [i for i in got if i is not None]
    assert len(set(stored)) == len(stored)
    for i, item_id in enumerate(got):
        if item_id is not None:
            item = store.get(item_id)
            assert (item.payload, item.key, item.dedup_key, item.priority) == (
                {"n": i}, batch[i].key, batch[i].dedup_key, batch[i].priority)
    assert store.get(got[4]).run_at.timestamp() == pytest.approx(batch[4].run_at, abs=0.001)


def test_bulk_submit_is_all_or_nothing(store):
    bad = [new(payload={"n": i}) for i in range(COPY_FROM + 10)]
    bad[-1] = NewItem(queue="q", payload_json="{not json")
    with pytest.raises(UsageError):
        store.submit_many(bad)
    assert store.stats().get("q", {}).get("total", 0) == 0
    assert store.submit_many([new()])[0] is not None  # the connection is usable afterwards


# -- transactional submit (submit_many / find_dedup on the caller's connection) -----------------


def test_submit_on_callers_connection_is_rolled_back_with_it(store, pg_url):
    with psycopg.connect(pg_url) as conn:  # not autocommit: the caller's own transaction
        conn.execute("CREATE TABLE IF NOT EXISTS orders_tx (id int)")
        conn.commit()
        conn.execute("INSERT INTO orders_tx VALUES (1)")
        (item_id,) = store.submit_many([new(payload="tx", dedup_key="d-tx")], conn=conn)
        big = store.submit_many([new(payload={"n": i}) for i in range(COPY_FROM + 5)], conn=conn)
        assert item_id is not None and None not in big
        assert store.find_dedup("q", "d-tx", conn=conn) == item_id  # the caller's transaction sees it
        assert store.find_dedup("q", "d-tx") is None  # nobody else does yet
        assert store.stats().get("q", {}).get("total", 0) == 0
        conn.rollback()
        assert store.find_dedup("q", "d-tx", conn=conn) is None
    assert store.stats().get("q", {}).get("total", 0) == 0
    with pytest.raises(ItemNotFound):
        store.get(item_id)
    assert store.claim(Claim("q", 10, 30.0, 5), "w") == []


def _listening(conn: psycopg.Connection, app_name: str = "conveyor") -> int:
    """How many of this database's sessions (of `app_name`) have LISTENed: one per idle worker
    waiting for NOTIFY, one per store that waited for a change."""
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name = %s AND query ILIKE 'LISTEN%%'", (app_name,)).fetchone()[0]


def test_submit_on_callers_connection_commits_with_it_and_wakes_an_idle_worker(store, pg_url, slow_poll):
    """The idle worker here polls once a minute (slow_poll): it sees the item within seconds only
    because the commit's NOTIFY woke it."""
    handled: list = []
    app = conveyor.App(pg_url)

    @app.processor("q", batch_size=10)
    def handle(item):
        handled.append(item.payload)

    listener = PostgresStore(pg_url)
    worker = app.worker(["q"])
    lane = worker.lanes["q"]
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True)
    try:
        with admin(pg_url) as watch:
            listener.wait_for_change(0.01)  # subscribed before the submit
            before = _listening(watch)
            thread.start()
            # the worker found nothing and LISTENs: a NOTIFY sent from now on reaches it
            wait_until(lambda: lane.dry and _listening(watch) > before, what="the worker to listen, idle")
            with psycopg.connect(pg_url) as conn:
                conn.execute("SELECT 1")  # the caller's transaction is open
                (item_id,) = store.submit_many([new(payload="committed", key="K")], conn=conn)
                assert listener.wait_for_change(0.3) is False  # NOTIFY is held until commit
                # wake the worker by hand: it claims while the item is uncommitted, and finds nothing
                polled = lane.poll_at
                app.wakeup.set()
                wait_until(lambda: lane.poll_at != polled, what="the woken worker's claim to come back empty")
                assert handled == []
                conn.commit()
                assert listener.wait_for_change(30) is True
        wait_until(lambda: handled == ["committed"], timeout=20, what="the NOTIFY to wake the worker for the committed item")
        wait_until(lambda: store.get(item_id).state == conveyor.State.RESOLVED, what="the item to be resolved")
    finally:
        worker.stop()
        thread.join(30)
        listener.close()
        app.close()


def test_submit_on_an_autocommit_connection_commits_at_once(store, pg_url):
    with psycopg.connect(pg_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        ids = store.submit_many([new(payload={"n": i}) for i in range(3)], conn=conn)
        assert store.find_dedup("q", "none", conn=conn) is None
    assert [i.id for i in store.claim(Claim("q", 10, 30.0, 5), "w")] == ids


def test_submit_on_a_wrong_connection_is_a_usage_error(store, pg_url):
    import sqlite3

    lite = sqlite3.connect(":memory:")
    with pytest.raises(UsageError, match="sqlite3.Connection"):
        store.submit_many([new()], conn=lite)
    with pytest.raises(UsageError, match="sqlite3.Connection"):
        store.find_dedup("q", "d", conn=lite)
    lite.close()
    other = pg_url.rpartition("/")[0] + "/postgres"
    with psycopg.connect(other) as conn:
        with pytest.raises(UsageError, match="'postgres'.*same database"):
            store.submit_many([new()], conn=conn)
        with pytest.raises(UsageError, match="same database"):  # cached per connection: still refused
            store.find_dedup("q", "d", conn=conn)
    with psycopg.connect(pg_url) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(UsageError, match="failed transaction"):
            store.submit_many([new()], conn=conn)
    assert store.stats().get("q", {}).get("total", 0) == 0


# -- settle_and_claim: a worker cycle in one statement ------------------------------------------


def test_settle_and_claim_settles_each_kind_fences_lost_tokens_and_claims_per_queue(store, pg_url):
    ids = store.submit_many([new(payload=i) for i in range(5)] + [new("other", payload="o")])
    held = store.claim(Claim("q", 5, 30.0, 1), "w")
    a, b, c, d, e = [(i.id, i.claim_token) for i in held]
    more = store.submit_many([new(payload="next")])
    listener = PostgresStore(pg_url)
    try:
        listener.wait_for_change(0.01)
        out = Outcomes(resolved=[a, (e[0], e[1] + 1)], retried=[(b[0], b[1], 0.0, "again")],
                       failed=[(c[0], c[1], "bad")], released=[d])
        lost, (got_q, got_other) = store.settle_and_claim(
            out, [Claim("q", 10, 30.0, 5), Claim("other", 10, 30.0, 5)], "w2")
        assert lost == [e[0]]  # a stale token is refused, the rest applied
        assert listener.wait_for_change(5) is True  # the release (pending, due) woke idle workers
    finally:
        listener.close()
    states = {i: store.get(i).state.value for i in ids[:5]}
    assert states == {a[0]: "resolved", b[0]: "dead", c[0]: "dead", d[0]: "pending", e[0]: "in_progress"}
    assert store.get(b[0]).last_error == "again" and store.get(c[0]).last_error == "bad"
    # the claims shared the settle's snapshot: the released item comes back in the next cycle
    assert [i.id for i in got_q] == more and [i.payload for i in got_other] == ["o"]
    assert all(i.lease_owner == "w2" for i in got_q + got_other)
    assert got_q[0].claim_token != got_other[0].claim_token
    lost, (again,) = store.settle_and_claim(Outcomes(), [Claim("q", 10, 30.0, 5)], "w2")
    assert lost == [] and [i.id for i in again] == [d[0]] and again[0].attempts == 1
    assert store.settle_and_claim(Outcomes(), [], "w2") == ([], [])


def test_settle_and_claim_with_an_ordered_claim_sees_what_it_settled(store):
    first, second = store.submit_many([new(payload=1, key="K"), new(payload=2, key="K")])
    ordered = Claim("q", 10, 30.0, 5, ordered=True)
    lost, (got,) = store.settle_and_claim(Outcomes(), [ordered], "w")
    assert [i.id for i in got] == [first]
    lost, (got,) = store.settle_and_claim(Outcomes(resolved=[(first, got[0].claim_token)]), [ordered], "w")
    assert lost == [] and [i.id for i in got] == [second]  # the next of K, in the same cycle


def test_settle_and_claim_joins_an_open_store_transaction(store):
    (item_id,) = store.submit_many([new()])
    with pytest.raises(RuntimeError), store.transaction():
        _, (got,) = store.settle_and_claim(Outcomes(), [Claim("q", 10, 30.0, 5)], "w")
        assert [i.id for i in got] == [item_id]
        raise RuntimeError("roll back")
    assert store.get(item_id).state == conveyor.State.PENDING


# -- claim plan --------------------------------------------------------------------------------


def _claim_plan(url: str, ordered: bool) -> str:
    with admin(url) as conn:
        sql = "EXPLAIN " + (CLAIM_ORDERED if ordered else CLAIM)
        args = dict(owner="w", lease=30.0, token=1, max_attempts=5, queue="q", limit=100)
        return "\n".join(r[0] for r in conn.execute(sql, args))


def test_claim_uses_the_partial_index_after_bulk_insert_without_autovacuum(store, pg_url):
    with admin(pg_url) as conn:
        conn.execute("ALTER TABLE conveyor_items SET (autovacuum_enabled = false)")
    try:
        # A deep history of resolved items the planner has not been told about, then a backlog.
        for _ in range(3):
            store.submit_many([new(payload={"n": i}, key=f"k{i % 50}") for i in range(20_000)])
        with admin(pg_url) as conn:
            conn.execute("UPDATE conveyor_items SET state = 'resolved', finished_at = now()")
        store.submit_many([new(payload={"n": i}, key=f"k{i % 50}") for i in range(5_000)])
        for ordered in (False, True):
            plan = _claim_plan(pg_url, ordered)
            for index in (("conveyor_items_keyed", "conveyor_items_unkeyed") if ordered else ("conveyor_items_pending",)):
                assert index in plan, plan
            assert "Seq Scan" not in plan, plan
        items = store.claim(Claim("q", 100, 30.0, 5), "w")
        assert [i.payload["n"] for i in items] == list(range(100))
    finally:
        with admin(pg_url) as conn:
            conn.execute("ALTER TABLE conveyor_items RESET (autovacuum_enabled)")


# -- deadlocks ---------------------------------------------------------------------------------


def _waits_for_a_lock(conn: psycopg.Connection, pid: int) -> bool:
    """True once backend `pid` is blocked on a lock (a row lock held by another transaction)."""
    return bool(conn.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", (pid,)).fetchone()[0])


def test_a_deadlock_rolls_back_and_keeps_the_connection(store, pg_url):
    """A deadlock (two worker cycles can meet in one, see bench/README) aborts only the victim's
    transaction: the store reports it as a StoreError, rolls back, and keeps its connection, where
    a lost connection would be dropped and reopened.

    Staged step by step, each step waiting for the previous one to have happened (no sleeps): the
    other session locks b; the store locks a; the other session asks for a and is seen waiting for
    it in pg_locks; only then does the store ask for b, which closes the cycle."""
    a, b = store.submit_many([new(payload=1), new(payload=2)])
    seen: dict = {}
    holds_a = threading.Event()

    def pid():
        return store._run("SELECT pg_backend_pid()").fetchone()[0]

    def store_side(other_pid: int) -> None:
        try:
            seen["pid_before"] = pid()
            with admin(pg_url) as watcher:
                try:
                    with store.transaction():
                        store._run("UPDATE conveyor_items SET priority = 2 WHERE id = %s", (a,))
                        holds_a.set()
                        wait_until(lambda: _waits_for_a_lock(watcher, other_pid), timeout=30,
                                   what="the other session to wait for item a's row lock")
                        store._run("UPDATE conveyor_items SET priority = 2 WHERE id = %s", (b,))
                except StoreError as exc:
                    seen["error"] = str(exc)
            seen["pid_after"] = pid()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            seen["unexpected"] = repr(exc)
        finally:
            holds_a.set()  # never leave the main thread waiting

    with admin(pg_url) as other:
        other.execute("SET deadlock_timeout = '20s'")  # so the store's session is the one that detects it
        other.execute("BEGIN")
        other.execute("UPDATE conveyor_items SET priority = 1 WHERE id = %s", (b,))
        t = threading.Thread(target=store_side, args=(other.info.backend_pid,))
        t.start()
        assert holds_a.wait(30)
        # blocks until the store's transaction is rolled back by the deadlock and lets go of a
        other.execute("UPDATE conveyor_items SET priority = 1 WHERE id = %s", (a,))
        other.execute("COMMIT")
        t.join(30)
    assert not t.is_alive()
    assert "unexpected" not in seen, seen
    assert "40P01" in seen.get("error", ""), seen
    assert seen["pid_after"] == seen["pid_before"], "the connection was dropped for a deadlock"
    # read after the other session's COMMIT: the store's update of a was rolled back, the other's stands
    assert (store.get(a).priority, store.get(b).priority) == (1, 1)


# -- migrations --------------------------------------------------------------------------------


def test_migrations_after_2_keep_every_count_swap_the_indexes_and_mark_rescued_items(pg_url):
    """A database left at migration 2 (one index over every item), holding items in every state,
    is brought up to date by the next store to open it: the same counts, the finished and running
    items found through the new partial indexes, the old indexes gone, and unfinished items whose
    last run was rescued marked `rescued` (migration 4)."""
    from conveyor.stores.postgres_queries import MIGRATIONS

    with admin(pg_url) as conn:
        conn.execute("DROP TABLE IF EXISTS conveyor_items, conveyor_migrations")
        conn.execute("CREATE TABLE conveyor_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for version, name, sql in MIGRATIONS[:2]:
            conn.execute(sql)
            conn.execute("INSERT INTO conveyor_migrations (version, name) VALUES (%s, %s)", (version, name))
        conn.execute("""INSERT INTO conveyor_items (queue, payload, state, finished_at, lease_expires_at, key)
                        SELECT 'q' || (i % 2), '{}', (ARRAY['pending','in_progress','resolved','dead','cancelled'])[1 + i % 5],
                               CASE WHEN i % 5 >= 2 THEN now() - interval '1 hour' END,
                               CASE WHEN i % 5 = 1 THEN now() + interval '1 hour' END,
                               CASE WHEN i % 3 = 0 THEN 'k' || (i % 7) END
                          FROM generate_series(1, 1000) AS i""")
        conn.execute("UPDATE conveyor_items SET last_error = 'lease expired: worker w stopped heartbeating' "
                     "WHERE id IN (1, 2)")  # in progress, resolved
        expected = {(q, st): n for q, st, n in conn.execute(
            "SELECT queue, state, count(*) FROM conveyor_items GROUP BY queue, state")}
    store = PostgresStore(pg_url)
    try:
        assert store.migrate() == [v for v, _, _ in MIGRATIONS[2:]]
        assert store.get(1).rescued and not store.get(2).rescued and not store.get(6).rescued
        stats = store.stats()
        got = {(q, st): stats[q][st] for q in stats for st in conveyor.model.STATES if stats[q][st]}
        assert got == expected
        assert store.stats(["q1"])["q1"]["dead"] == expected[("q1", "dead")]
        with admin(pg_url) as conn:
            indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'conveyor_items'")}
            assert {"conveyor_items_finished", "conveyor_items_running", "conveyor_items_browse"} <= indexes
            assert not indexes & {"conveyor_items_status", "conveyor_items_leases"}
        dead = [i.id for i in store.list_items("q1", state="dead", limit=1000)]
        assert len(dead) == expected[("q1", "dead")] and dead == sorted(dead, reverse=True)
        assert store.purge("q0", 60) == expected[("q0", "resolved")] + expected[("q0", "dead")] + expected[("q0", "cancelled")]
        assert store.has_work(["q0"])
    finally:
        store.close()


# -- ordered queues ----------------------------------------------------------------------------


def test_ordered_claim_with_a_deep_backlog_takes_the_key_heads_by_skip_scan(store, pg_url):
    """20k pending items over 20 keys: an ordered claim returns exactly the head of each key, and
    its plan finds them by probing the keyed index (one probe per key, a recursive CTE) rather than
    by a scan or an anti-join over the backlog. Timing-free: the plan's shape is the check."""
    keys = 20
    ids = store.submit_many([new(payload={"k": i % keys, "n": i // keys}, key=f"k{i % keys}") for i in range(20_000)])
    plan = _claim_plan(pg_url, ordered=True)
    assert "Recursive Union" in plan, plan
    assert "conveyor_items_keyed" in plan, plan
    assert "Seq Scan" not in plan and "Anti Join" not in plan, plan
    with admin(pg_url) as conn:  # the probes read a handful of index pages, not the backlog
        analyzed = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + CLAIM_ORDERED,
            dict(owner="w", lease=30.0, token=1, max_attempts=5, queue="q", limit=100)))
        conn.execute("UPDATE conveyor_items SET state = 'pending', attempts = 0, claim_token = NULL, "
                     "lease_owner = NULL, lease_expires_at = NULL")
    assert "Seq Scan" not in analyzed, analyzed
    heads = store.claim(Claim("q", 100, 30.0, 5, ordered=True), "w")
    assert sorted(i.id for i in heads) == sorted(ids[:keys])
    assert {i.payload["n"] for i in heads} == {0}
    # while the heads run, nothing of their keys is claimable; key-less items still are
    (free,) = store.submit_many([new(payload="free")])
    assert [i.id for i in store.claim(Claim("q", 100, 30.0, 5, ordered=True), "w")] == [free]
    assert store.resolve([(i.id, i.claim_token) for i in heads[:5]]) == []
    nxt = store.claim(Claim("q", 100, 30.0, 5, ordered=True), "w")
    assert sorted(i.id for i in nxt) == sorted(i.id + keys for i in heads[:5])



def test_fair_claim_reads_a_quiet_key_behind_a_burst_from_its_own_index(store, pg_url):
    """20,000 pending items of key A, then 5 of B (and 40 more keys): a fair claim takes B's first item, and its
    per-key read walks conveyor_items_key_heads (a few pages a key) instead of the claim index
    through A's burst to reach B (which read every page of it: 400 ms a claim at 100,000 items)."""
    from conveyor.model import Limits
    from conveyor.stores.postgres_queries import KEY_HEADS_ALL

    store.submit_many([new(payload={"n": i}, key="A") for i in range(20_000)])
    quiet = store.submit_many([new(payload={"n": i}, key="B") for i in range(5)])
    store.submit_many([new(payload={"n": i}, key=f"k{i % 40}") for i in range(800)])
    keys = ["A", "B", *(f"k{i}" for i in range(40))]
    with admin(pg_url) as conn:  # the statistics a submit leaves (it analyzes after a large one)
        plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + KEY_HEADS_ALL,
                            {"queue": "q", "keys": keys, "most": 3}).fetchone()[0][0]
    text = json.dumps(plan)
    assert "conveyor_items_key_heads" in text and "conveyor_items_pending" not in text, text
    assert plan["Plan"]["Shared Hit Blocks"] + plan["Plan"].get("Shared Read Blocks", 0) < 1000, plan["Plan"]
    taken = store.claim(Claim("q", 50, 30.0, 5, limits=Limits(fair=True)), "w")  # a round of the 42 keys, and more
    assert quiet[0] in {it.id for it in taken}


def test_ordered_claim_waits_for_the_open_claim_and_then_sees_it(pg_url):
    """Deterministic version of the race: ids commit out of order, and a second ordered claim
    starts while the first is still uncommitted. It must wait, then see the first's item running."""
    s1, s2, c1, c2 = (PostgresStore(pg_url) for _ in range(4))
    try:
        s1.migrate()
        ctx = s1.transaction()
        ctx.__enter__()
        (id1,) = s1.submit_many([new(payload=1, key="K")])
        (id2,) = s2.submit_many([new(payload=2, key="K")])  # committed before id1
        assert id1 < id2
        claim = Claim("q", 10, 30.0, 5, ordered=True)
        ctx1 = c1.transaction()
        ctx1.__enter__()
        assert [i.id for i in c1.claim(claim, "c1")] == [id2]
        ctx.__exit__(None, None, None)  # id1 becomes visible while c1's claim is still open
        got: list = []
        t = threading.Thread(target=lambda: got.append(c2.claim(claim, "c2")))
        t.start()
        with admin(pg_url) as conn:
            wait_until(lambda: not t.is_alive() or conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0],
                what="the second claim to wait on the ordered-claim lock (or to return)")
        ctx1.__exit__(None, None, None)
        t.join(10)
        assert got == [[]], "item 1 of K was claimed while item 2 of K was running"
        c1.resolve([(id2, c1.get(id2).claim_token)])
        assert [i.id for i in c2.claim(claim, "c2")] == [id1]
    finally:
        for s in (s1, s2, c1, c2):
            s.close()


def test_ordered_claims_from_many_threads_keep_keys_serial_and_in_order(store, pg_url):
    keys, per_key = 20, 15
    store.submit_many([new(payload={"k": k, "n": n}, key=f"k{k}") for n in range(per_key) for k in range(keys)])
    seen: dict[str, list[int]] = {}
    lock = threading.Lock()
    overlap: list = []
    stop = threading.Event()

    def checker() -> None:
        with admin(pg_url) as conn:
            while not stop.is_set():
                rows = conn.execute("SELECT key FROM conveyor_items WHERE state = 'in_progress' "
                                    "GROUP BY key HAVING count(*) > 1").fetchall()
                overlap.extend(rows)

    def worker(n: int) -> None:
        claim = Claim("q", 7, 30.0, 5, ordered=True)
        idle = 0
        while idle < 20:
            items = store.claim(claim, f"w{n}")
            if not items:
                idle += 1
                time.sleep(0.005)
                continue
            idle = 0
            with lock:
                for it in items:
                    seen.setdefault(it.key, []).append(it.payload["n"])
            time.sleep(0.002)
            assert store.resolve([(it.id, it.claim_token) for it in items]) == []
        store.disconnect()

    check = threading.Thread(target=checker)
    check.start()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    check.join()
    assert overlap == []
    assert seen == {f"k{k}": list(range(per_key)) for k in range(keys)}


# -- connections -------------------------------------------------------------------------------


def _backend_pid(store) -> int:
    with store.transaction() as conn:
        return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_lost_connection_raises_store_error_then_reconnects(store, pg_url):
    (item_id,) = store.submit_many([new()])
    pid = _backend_pid(store)
    with admin(pg_url) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(StoreError, match="127.0.0.1:5432"):
        store.get(item_id)
    assert store.get(item_id).id == item_id
    assert _backend_pid(store) != pid

    # inside a transaction: the transaction fails as a whole, the next one works
    pid = _backend_pid(store)
    with pytest.raises(StoreError), store.transaction():
        with admin(pg_url) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        store.claim(Claim("q", 10, 30.0, 5), "w")
    assert [i.id for i in store.claim(Claim("q", 10, 30.0, 5), "w")] == [item_id]


def test_bad_url_or_unreachable_server_is_a_usage_error(pg_url):
    with pytest.raises(UsageError, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1:1/nowhere"):
        PostgresStore("postgresql://postgres@127.0.0.1:1/nowhere").migrate()
    base = pg_url.rpartition("/")[0]
    with pytest.raises(UsageError, match="no_such_db_for_conveyor"):
        conveyor.App(f"{base}/no_such_db_for_conveyor").stats()
    with pytest.raises(UsageError, match="malformed"):
        PostgresStore("postgresql://[bad")
    with pytest.raises(UsageError, match="sslmode"):
        PostgresStore(f"{pg_url}?sslmode=bogus").migrate()


def test_forked_child_leaves_the_parents_connection_alone(store):
    pid = _backend_pid(store)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            import gc

            store.submit_many([new(payload="from child")])
            gc.collect()
            store.close()
            gc.collect()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _backend_pid(store) == pid  # same connection, still alive
    assert store.stats()["q"]["pending"] == 1


def test_wait_for_change_wakes_on_submit_and_on_wake_event(store, pg_url):
    other = PostgresStore(pg_url)
    try:
        store.wait_for_change(0.01)  # subscribe
        # the submit and the wake-up come while the wait is under way (or just before it: both
        # count); each wait would last a minute without them
        t = threading.Timer(0.2, lambda: other.submit_many([new()]))
        start = time.monotonic()
        t.start()
        assert store.wait_for_change(60) is True
        assert time.monotonic() - start < 30
        t.join()
        wake = threading.Event()
        threading.Timer(0.1, wake.set).start()
        start = time.monotonic()
        assert store.wait_for_change(60, wake) is False
        assert time.monotonic() - start < 30
        assert store.wait_for_change(0.05) is False  # nothing new
    finally:
        other.close()


# -- many processes ----------------------------------------------------------------------------

WORKER_SCRIPT = """
import glob, os, sys, time, conveyor
app = conveyor.App(sys.argv[1])
out = sys.argv[2]
fds = {{}}
shared = set()

def record(text):
    fd = fds.get(os.getpid())
    if fd is None:
        fd = fds[os.getpid()] = os.open(os.path.join(out, f"handled-{{os.getpid()}}.txt"),
                                       os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, text.encode())

def share(n, timeout=60.0):
    # a process's first calls wait until n processes have recorded something: however late the
    # machine starts the others, one process cannot drain the queue alone
    deadline = time.monotonic() + timeout
    while os.getpid() not in shared and time.monotonic() < deadline:
        if len(glob.glob(os.path.join(out, "handled-*.txt"))) >= n:
            shared.add(os.getpid())
        else:
            time.sleep(0.01)

def held(item):
    # items from T_HOLD_FROM on (by payload n) wait for the test's go-ahead, a file named "go": the
    # workers cannot finish before the test has done its damage, however slow the test is to act
    mark = os.environ.get("T_HOLD_FROM")
    if mark is not None and item.payload["n"] >= int(mark):
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(out, "go")) and time.monotonic() < deadline:
            time.sleep(0.01)

{processor}

if __name__ == "__main__":
    app.run_worker(processes=int(sys.argv[3]), stop_when_empty=True)
"""


def run_workers(tmp_path: Path, url: str, processes: int, processor: str, hold_from: int | None = None) -> subprocess.Popen:
    """Start the worker script; with `hold_from`, items from that n on wait in `held` until go()."""
    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT.format(processor=textwrap.dedent(processor)))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    if hold_from is not None:
        env["T_HOLD_FROM"] = str(hold_from)
    return subprocess.Popen([sys.executable, str(script), url, str(tmp_path), str(processes)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def go(tmp_path: Path) -> None:
    (tmp_path / "go").touch()


def handled(tmp_path: Path) -> list[int]:
    ids: list[int] = []
    for f in tmp_path.glob("handled-*.txt"):
        ids += [int(x) for x in f.read_text().split()]
    return ids


@pytest.mark.slow
def test_four_processes_drain_20000_items_each_handled_once(pg_url, tmp_path):
    n = 20_000
    app = conveyor.App(pg_url)
    app.submit_many("orders", [{"n": i} for i in range(n)])
    app.close()
    start = time.monotonic()
    proc = run_workers(tmp_path, pg_url, 4, """
        @app.processor("orders", concurrency=8, batch_size=100)
        def handle(item):
            record(f"{item.id}\\n")
            share(2)
    """)
    out, _ = proc.communicate(timeout=90)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, out
    ids = handled(tmp_path)
    assert len(ids) == n and len(set(ids)) == n, f"{len(ids)} runs of {len(set(ids))} distinct items"
    assert len(list(tmp_path.glob("handled-*.txt"))) > 1, "only one process did any work"
    stats = conveyor.App(pg_url).stats()["orders"]
    assert stats["resolved"] == n and stats["total"] == n
    print(f"4 processes drained {n} items in {elapsed:.1f}s ({n / elapsed:,.0f} items/s)")


def _effects_table(url: str) -> None:
    with admin(url) as conn:
        conn.execute("DROP TABLE IF EXISTS effects")
        conn.execute("CREATE TABLE effects (item_id BIGINT NOT NULL)")  # no unique key: doubles would show


TRANSACTIONAL = """
    @app.processor("pay", concurrency=4, batch_size=50, lease_seconds=2, max_attempts=50,
                   backoff_base=0.05, backoff_max=0.2, transactional=True)
    def pay(item, conn):
        held(item)
        conn.execute("INSERT INTO effects VALUES (%s)", (item.id,))
        record(f"{item.id}\\n")
"""


def _check_exactly_once(url: str, n: int) -> None:
    with admin(url) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM conveyor_items GROUP BY state").fetchall())
        assert states == {"resolved": n}, states
        doubles = conn.execute("SELECT item_id, count(*) FROM effects GROUP BY item_id HAVING count(*) <> 1").fetchall()
        assert doubles == []
        assert conn.execute("SELECT count(DISTINCT item_id) FROM effects").fetchone()[0] == n


def _resolved(conn) -> int:
    return conn.execute("SELECT count(*) FROM conveyor_items WHERE state = 'resolved'").fetchone()[0]


@pytest.mark.slow
def test_workers_survive_killed_connections_and_resolve_each_item_once(pg_url, tmp_path):
    n = 3_000
    _effects_table(pg_url)
    app = conveyor.App(pg_url)
    app.submit_many("pay", [{"n": i} for i in range(n)])
    app.close()
    proc = run_workers(tmp_path, pg_url, 2, TRANSACTIONAL, hold_from=4 * n // 5)  # the last fifth waits for go()
    kills = 0
    with admin(pg_url) as conn:
        db = conn.info.dbname
        for target in (n // 5, 2 * n // 5, 3 * n // 5):
            wait_until(lambda: _resolved(conn) >= target or proc.poll() is not None, timeout=60, what=f"{target} resolved")
            if proc.poll() is not None:
                break
            kills += conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = 'conveyor'", (db,)).fetchone()[0]
    go(tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert kills >= 3, "the workers finished before their connections could be killed"
    _check_exactly_once(pg_url, n)


def _can_restart_server() -> str | None:
    if not (os.environ.get("CI") or os.environ.get("CONVEYOR_TEST_PG_RESTART")):
        return ("restarts the shared PostgreSQL server, disturbing anything else using it: "
                "run with CONVEYOR_TEST_PG_RESTART=1 (always runs in CI)")
    if os.geteuid() != 0 or not shutil.which("pg_ctlcluster") or not os.path.isdir("/etc/postgresql"):
        return "needs root and pg_ctlcluster to restart the server"
    return None


@pytest.mark.slow
def test_workers_survive_a_server_restart(pg_url, tmp_path):
    problem = _can_restart_server()
    if problem:
        pytest.skip(problem)
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    n = 3_000
    _effects_table(pg_url)
    app = conveyor.App(pg_url)
    app.submit_many("pay", [{"n": i} for i in range(n)])
    app.close()
    proc = run_workers(tmp_path, pg_url, 2, TRANSACTIONAL, hold_from=4 * n // 5)  # the last fifth waits for go()
    with admin(pg_url) as conn:
        wait_until(lambda: _resolved(conn) >= n // 4 or proc.poll() is not None, timeout=60, what="a quarter resolved")
    restarted = proc.poll() is None
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True, timeout=60)
    go(tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert restarted, "the workers finished before the server restart"
    _check_exactly_once(pg_url, n)
