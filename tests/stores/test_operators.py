"""Store conformance: what operators do (cancel, requeue, purge, stats, has_work)."""

from __future__ import annotations

import time

import pytest

from conveyor import ItemNotFound, State, UsageError

from .helpers import claim, new, submit, tokens, wait_until

STATS_KEYS = {"pending", "in_progress", "resolved", "dead", "cancelled", "total",
              "oldest_pending_seconds", "resolved_last_minute"}


# -- cancel -----------------------------------------------------------------------------------

def test_cancel_pending_item(store):
    a, b = submit(store, n=2)
    store.cancel(a)
    item = store.get(a)
    assert item.state == State.CANCELLED and item.finished_at is not None
    assert [it.id for it in claim(store)] == [b]


def test_cancel_in_progress_item_refuses_its_result(store):
    (a,) = submit(store, n=1)
    got = claim(store)
    store.cancel(a)
    assert store.get(a).state == State.CANCELLED
    assert store.resolve(tokens(got)) == [a]
    assert store.retry([(a, got[0].claim_token, 0.0, "x")]) == [a]
    assert store.extend_leases(tokens(got), 60) == [a]
    assert store.get(a).state == State.CANCELLED
    assert store.rescue_expired() == []


@pytest.mark.parametrize("final", ["resolved", "dead", "cancelled"])
def test_cancel_finished_item_is_a_usage_error(store, final):
    (a,) = submit(store, n=1)
    got = claim(store)
    if final == "resolved":
        store.resolve(tokens(got))
    elif final == "dead":
        store.fail([(a, got[0].claim_token, "no")])
    else:
        store.cancel(a)
    with pytest.raises(UsageError, match=str(a)) as info:
        store.cancel(a)
    assert not isinstance(info.value, ItemNotFound)
    assert store.get(a).state == State(final)


def test_cancel_unknown_item_raises_item_not_found(store):
    with pytest.raises(ItemNotFound, match="424242"):
        store.cancel(424242)


# -- requeue ----------------------------------------------------------------------------------

def _finish(store, queue, how):
    """One item of `queue` brought to state `how` (resolved/dead/cancelled); returns its id."""
    (i,) = submit(store, queue, n=1)
    if how == "cancelled":
        store.cancel(i)
        return i
    got = [it for it in claim(store, queue, limit=100) if it.id == i]
    if how == "resolved":
        store.resolve(tokens(got))
    else:
        store.fail([(i, got[0].claim_token, "gave up")])
    return i


def test_requeue_sends_dead_and_cancelled_back_with_fresh_attempts(store):
    dead = _finish(store, "q", "dead")
    cancelled = _finish(store, "q", "cancelled")
    resolved = _finish(store, "q", "resolved")
    other_dead = _finish(store, "other", "dead")
    assert store.requeue("q") == 2
    for i in (dead, cancelled):
        item = store.get(i)
        assert item.state == State.PENDING and item.attempts == 0 and item.finished_at is None
    assert store.get(resolved).state == State.RESOLVED
    assert store.get(other_dead).state == State.DEAD
    got = claim(store, limit=10)
    assert sorted(it.id for it in got) == sorted([dead, cancelled])
    assert all(it.attempts == 1 for it in got)


def test_requeue_by_ids(store):
    a = _finish(store, "q", "dead")
    b = _finish(store, "q", "dead")
    assert store.requeue("q", [b]) == 1
    assert (store.get(a).state, store.get(b).state) == (State.DEAD, State.PENDING)
    assert store.requeue("q", []) == 0
    assert store.requeue("other", [a]) == 0  # ids of another queue are not touched
    assert store.get(a).state == State.DEAD


def test_requeue_leaves_pending_and_in_progress_alone(store):
    a, b = submit(store, n=2)
    (it,) = claim(store, limit=1)
    assert store.requeue("q") == 0
    assert store.get(a).state == State.IN_PROGRESS and store.get(b).state == State.PENDING
    assert store.resolve(tokens([it])) == []


# -- purge ------------------------------------------------------------------------------------

GAP = 0.8  # seconds between the old items' finish and the fresh one's


def test_purge_deletes_only_finished_items_older_than_the_cutoff(store):
    old = [_finish(store, "q", how) for how in ("resolved", "dead", "cancelled")]
    old_finished = max(store.get(i).finished_at.timestamp() for i in old)
    wait_until(lambda: time.time() - old_finished > GAP, what="the old items to age")
    fresh = _finish(store, "q", "resolved")
    other = _finish(store, "other", "resolved")
    unfinished = submit(store, "q", n=2)
    assert len(claim(store, "q", limit=1)) == 1  # one pending, one in progress
    # cut just after the old items: the purge's clock reads later than this line's, by however long
    # the machine takes to get there, and the fresh item stays as long as that is under GAP
    cutoff_age = time.time() - (old_finished + 0.05)
    assert store.purge("q", cutoff_age) == 3
    for i in old:
        with pytest.raises(ItemNotFound):
            store.get(i)
    assert store.get(fresh).state == State.RESOLVED
    assert store.get(other).state == State.RESOLVED
    assert {store.get(i).state for i in unfinished} == {State.PENDING, State.IN_PROGRESS}
    # with no age limit every finished item of the queue goes, unfinished ones stay
    assert store.purge("q", 0) == 1
    assert store.stats(["q"])["q"]["total"] == 2
    assert store.purge("q", 3600) == 0


def test_purge_with_no_age_limit_takes_an_item_finished_this_instant(store):
    # the database clock has millisecond steps on SQLite: "older than 0 s" must include "now"
    for _ in range(5):
        done = _finish(store, "q", "resolved")
        assert store.purge("q", 0) == 1
        with pytest.raises(ItemNotFound):
            store.get(done)


def test_purge_of_an_empty_queue_is_zero(store):
    assert store.purge("nothing", 0) == 0


# -- stats ------------------------------------------------------------------------------------

def test_stats_shape_and_counts(store):
    now = time.time()
    ids = store.submit_many([new("q", i, run_at=now - 10) for i in range(6)])
    store.submit_many([new("other", "x")])
    got = claim(store, "q", limit=4)
    store.resolve(tokens(got[:2]))
    store.fail([(got[2].id, got[2].claim_token, "no")])
    store.cancel(ids[-1])  # not claimed: the claim took the four oldest
    s = store.stats()
    assert set(s) == {"q", "other"}
    q = s["q"]
    assert set(q) == STATS_KEYS
    assert (q["pending"], q["in_progress"], q["resolved"], q["dead"], q["cancelled"], q["total"]) == (1, 1, 2, 1, 1, 6)
    assert q["resolved_last_minute"] == 2
    assert 9 <= q["oldest_pending_seconds"] < 60
    assert s["other"]["pending"] == 1 and s["other"]["total"] == 1
    assert 0 <= s["other"]["oldest_pending_seconds"] < 30


def test_stats_of_named_queues(store):
    submit(store, "a", n=2)
    submit(store, "b", n=1)
    s = store.stats(["a", "empty"])
    assert set(s) == {"a", "empty"}
    assert s["a"]["pending"] == 2
    assert set(s["empty"]) == STATS_KEYS
    assert s["empty"]["total"] == 0 and s["empty"]["oldest_pending_seconds"] is None
    assert s["empty"]["resolved_last_minute"] == 0


def test_stats_of_an_empty_store(store):
    assert store.stats() == {}


def test_oldest_pending_ignores_items_not_due_yet(store):
    store.submit_many([new("q", "later", run_at=time.time() + 600)])
    s = store.stats(["q"])["q"]
    assert s["pending"] == 1 and s["oldest_pending_seconds"] is None


def test_oldest_pending_is_the_age_of_the_oldest_due_item(store):
    now = time.time()
    store.submit_many([new("q", 1, run_at=now - 100), new("q", 2, run_at=now - 5)])
    age = store.stats(["q"])["q"]["oldest_pending_seconds"]
    assert 99 <= age < 160


# -- has_work ---------------------------------------------------------------------------------

def test_has_work(store):
    assert store.has_work(["q"]) is False
    (a,) = submit(store, "q", n=1)
    assert store.has_work(["q"]) is True
    assert store.has_work(["other"]) is False
    assert store.has_work(["other", "q"]) is True
    got = claim(store)
    assert store.has_work(["q"]) is True  # in progress still counts
    store.retry([(a, got[0].claim_token, 600.0, "later")])
    assert store.has_work(["q"]) is True  # waiting for its retry still counts
    store.cancel(a)
    assert store.has_work(["q"]) is False
    (b,) = submit(store, "q", n=1)
    store.resolve(tokens(claim(store)))
    assert store.has_work(["q"]) is False
    assert store.get(b).state == State.RESOLVED
