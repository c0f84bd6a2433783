"""Store conformance: claiming (steps 1 and 2), including ordered queues and concurrent claimers."""

from __future__ import annotations

import threading
import time

from conveyor import State

from .helpers import claim, new, submit, tokens


def test_claim_order_is_priority_then_run_at_then_id(store):
    now = time.time()
    specs = [  # (label, priority, run_at)
        ("low-old", 0, now - 30),
        ("high-new", 5, now - 1),
        ("high-old", 5, now - 20),
        ("mid", 2, now - 10),
        ("low-new-a", 0, now - 5),
        ("low-new-b", 0, now - 5),  # same run_at as a: submission (id) order breaks the tie
        ("negative", -1, now - 100),
    ]
    store.submit_many([new("q", label, priority=p, run_at=r) for label, p, r in specs])
    got = [it.payload for it in claim(store, limit=10)]
    assert got == ["high-old", "high-new", "mid", "low-old", "low-new-a", "low-new-b", "negative"]


def test_claim_respects_limit_and_queue(store):
    submit(store, "q", n=7)
    submit(store, "other", n=3)
    first = claim(store, "q", limit=3)
    second = claim(store, "q", limit=3)
    third = claim(store, "q", limit=3)
    assert [len(first), len(second), len(third)] == [3, 3, 1]
    assert all(it.queue == "q" for it in first + second + third)
    assert claim(store, "q", limit=3) == []
    assert store.stats(["other"])["other"]["pending"] == 3


def test_claim_on_empty_or_unknown_queue_returns_nothing(store):
    assert claim(store, "nothing-here") == []


def test_future_run_at_is_not_claimed(store):
    (later,) = store.submit_many([new("q", "later", run_at=time.time() + 60)])
    (now_,) = submit(store, n=1)
    got = claim(store, limit=10)
    assert [it.id for it in got] == [now_]
    assert store.get(later).state == State.PENDING and store.get(later).attempts == 0


def test_claim_marks_items_in_progress_with_a_lease(store):
    ids = submit(store, n=3)
    before = time.time()
    got = claim(store, limit=3, lease=30, owner="worker-A")
    assert [it.id for it in got] == ids
    for it in got:
        assert it.state == State.IN_PROGRESS
        assert it.attempts == 1
        assert it.lease_owner == "worker-A"
        assert it.claim_token is not None
        assert before + 29 <= it.lease_expires_at.timestamp() <= time.time() + 31
        stored = store.get(it.id)
        assert stored.state == State.IN_PROGRESS and stored.attempts == 1
        assert stored.lease_owner == "worker-A"
        assert stored.claim_token == it.claim_token
    assert store.stats(["q"])["q"]["in_progress"] == 3


def test_each_claim_gets_a_fresh_token(store):
    a, b = submit(store, n=2)
    (ca,) = claim(store, limit=1)
    (cb,) = claim(store, limit=1)
    assert (ca.id, cb.id) == (a, b)
    assert ca.claim_token != cb.claim_token
    # the same item claimed again (after a release) gets a new token; the old one is refused
    assert store.release([(a, ca.claim_token)]) == []
    (again,) = claim(store, limit=1)
    assert again.id == a and again.claim_token != ca.claim_token
    assert store.resolve([(a, ca.claim_token)]) == [a]
    assert store.resolve([(a, again.claim_token)]) == []


def test_attempts_count_up_across_claims(store):
    (a,) = submit(store, n=1)
    for attempt in (1, 2, 3):
        (it,) = claim(store, limit=1)
        assert it.attempts == attempt
        assert store.retry([(a, it.claim_token, 0.0, f"attempt {attempt} failed")]) == []


def test_two_claims_never_return_the_same_item(store):
    submit(store, n=20)
    seen: list[int] = []
    while batch := claim(store, limit=3):
        seen += [it.id for it in batch]
    assert len(seen) == 20 and len(set(seen)) == 20


def test_concurrent_claimers_on_one_store_never_share_an_item(store):
    n_items, n_threads = 400, 4
    store.submit_many([new("q", i) for i in range(n_items)])
    got: dict[int, list[int]] = {t: [] for t in range(n_threads)}
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def run(t: int) -> None:
        try:
            start.wait()
            while batch := claim(store, limit=5, owner=f"thread-{t}"):
                got[t] += [it.id for it in batch]
                assert all(it.lease_owner == f"thread-{t}" for it in batch)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            store.disconnect()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    everything = [i for ids in got.values() for i in ids]
    assert len(everything) == n_items
    assert len(set(everything)) == n_items
    assert store.stats(["q"])["q"]["in_progress"] == n_items


# -- ordered queues ---------------------------------------------------------------------------

def oclaim(store, limit=10, **kw):
    return claim(store, limit=limit, ordered=True, **kw)


def test_ordered_claim_takes_one_item_per_key_in_submission_order(store):
    ids = store.submit_many([
        new("q", "a1", key="a"), new("q", "b1", key="b"), new("q", "a2", key="a"),
        new("q", "n1"), new("q", "b2", key="b"), new("q", "n2"), new("q", "a3", key="a"),
    ])
    first = oclaim(store)
    # one per key, and every key-less item (they are independent)
    assert sorted(it.payload for it in first) == ["a1", "b1", "n1", "n2"]
    assert oclaim(store) == []  # a2, b2 wait for a1, b1
    by_payload = {it.payload: it for it in first}
    store.resolve(tokens([by_payload["a1"]]))
    assert [it.payload for it in oclaim(store)] == ["a2"]
    store.resolve(tokens([by_payload["b1"]]))
    assert [it.payload for it in oclaim(store)] == ["b2"]
    assert oclaim(store) == []
    assert len(ids) == 7


def test_ordered_claim_ignores_priority_within_a_key(store):
    store.submit_many([new("q", "first", key="k", priority=0), new("q", "second", key="k", priority=9)])
    assert [it.payload for it in oclaim(store)] == ["first"]


def test_ordered_key_blocked_while_earlier_item_waits_for_backoff(store):
    store.submit_many([new("q", "k1", key="k"), new("q", "k2", key="k"), new("q", "other", key="o")])
    got = {it.payload: it for it in oclaim(store)}
    assert set(got) == {"k1", "other"}
    assert store.retry([(got["k1"].id, got["k1"].claim_token, 60.0, "later")]) == []
    # k1 is pending but not due: k2 must still wait behind it
    assert oclaim(store) == []
    store.resolve(tokens([got["other"]]))
    assert oclaim(store) == []


def test_ordered_key_blocked_by_a_delayed_first_item(store):
    store.submit_many([new("q", "k1", key="k", run_at=time.time() + 60), new("q", "k2", key="k")])
    assert oclaim(store) == []


def test_ordered_dead_item_unblocks_its_key(store):
    store.submit_many([new("q", "k1", key="k"), new("q", "k2", key="k")])
    (k1,) = oclaim(store)
    assert store.fail([(k1.id, k1.claim_token, "bad")]) == []
    assert [it.payload for it in oclaim(store)] == ["k2"]


def test_ordered_cancelled_item_unblocks_its_key(store):
    a, b = store.submit_many([new("q", "k1", key="k"), new("q", "k2", key="k")])
    store.cancel(a)
    assert [it.id for it in oclaim(store)] == [b]


def test_ordered_requeued_item_runs_after_its_successor_finishes(store):
    # k1 dies, k2 starts; requeueing k1 must not let it overlap the running k2
    store.submit_many([new("q", "k1", key="k"), new("q", "k2", key="k")])
    (k1,) = oclaim(store)
    store.fail([(k1.id, k1.claim_token, "bad")])
    (k2,) = oclaim(store)
    assert store.requeue("q", [k1.id]) == 1
    assert oclaim(store) == []
    store.resolve(tokens([k2]))
    assert [it.id for it in oclaim(store)] == [k1.id]


def test_unordered_claim_ignores_keys(store):
    store.submit_many([new("q", "k1", key="k"), new("q", "k2", key="k")])
    assert [it.payload for it in claim(store, limit=10)] == ["k1", "k2"]

