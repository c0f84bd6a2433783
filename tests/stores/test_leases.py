"""Store conformance: heartbeats (extend_leases) and the rescue of expired leases."""

from __future__ import annotations

import time

from conveyor import State

from .helpers import claim, submit, tokens, wait_until

SHORT = 0.2  # seconds: a lease that runs out while the test waits for it


def test_extend_leases_pushes_the_expiry(store):
    ids = submit(store, n=2)
    got = claim(store, limit=2, lease=5)
    old = {it.id: it.lease_expires_at for it in got}
    before = time.time()
    assert store.extend_leases(tokens(got), 600) == []
    for i in ids:
        item = store.get(i)
        assert item.state == State.IN_PROGRESS
        assert item.lease_expires_at > old[i]
        assert before + 599 <= item.lease_expires_at.timestamp() <= time.time() + 601
        assert item.claim_token == got[0].claim_token  # a heartbeat keeps the claim


def test_extend_leases_reports_lost_items(store):
    a, b, c = submit(store, n=3)
    got = {it.id: it for it in claim(store, limit=3)}
    store.cancel(b)
    store.resolve([(c, got[c].claim_token)])
    assert store.extend_leases(tokens(got.values()), 60) == [b, c]
    assert store.get(a).state == State.IN_PROGRESS


def wait_rescued(store, item_id, timeout=30.0):
    """Poll rescue_expired until it returns this item; return its new state."""
    found: dict[int, str] = {}

    def rescued():
        for i, state in store.rescue_expired():
            found[i] = state
        return item_id in found

    wait_until(rescued, timeout=timeout, interval=0.02, what=f"item {item_id} to be rescued")
    return found[item_id]


def test_expired_lease_is_rescued_back_to_pending(store):
    short, long_ = submit(store, n=2)
    (s,) = claim(store, limit=1, lease=SHORT, owner="crashed-worker")
    (l_,) = claim(store, limit=1, lease=600, owner="live-worker")
    assert (s.id, l_.id) == (short, long_)
    assert wait_rescued(store, short) == "pending"
    item = store.get(short)
    assert item.state == State.PENDING
    assert item.attempts == 1  # the lost run counted
    assert "lease" in item.last_error and "crashed-worker" in item.last_error
    assert item.lease_owner is None and item.lease_expires_at is None
    # the live lease is untouched
    assert store.get(long_).state == State.IN_PROGRESS
    assert store.rescue_expired() == []
    # the late worker cannot resolve; a new claimer can
    assert store.resolve(tokens([s])) == [short]
    (again,) = claim(store, limit=1)
    assert again.id == short and again.attempts == 2
    assert store.resolve(tokens([again])) == []
    assert store.get(short).state == State.RESOLVED


def test_expired_lease_with_spent_attempts_goes_dead(store):
    (a,) = submit(store, n=1)
    (it,) = claim(store, lease=SHORT, max_attempts=1)
    assert wait_rescued(store, a) == "dead"
    item = store.get(a)
    assert item.state == State.DEAD
    assert "lease" in item.last_error
    assert item.finished_at is not None
    assert store.resolve(tokens([it])) == [a]
    assert store.extend_leases(tokens([it]), 60) == [a]


def test_heartbeat_keeps_a_short_lease_from_being_rescued(store):
    """A heartbeat outlasts the short lease the item was claimed with. Waited on the clock, not
    slept: the claim's own lease is over when rescue runs, so only the heartbeat can keep the item
    (and the heartbeat's lease is long enough that no pause of this thread can outlast it)."""
    (a,) = submit(store, n=1)
    (it,) = claim(store, lease=SHORT)
    claimed_until = it.lease_expires_at.timestamp()
    for _ in range(3):  # heartbeats keep coming: each one leaves the claim intact
        assert store.extend_leases(tokens([it]), 60) == []
    wait_until(lambda: time.time() > claimed_until + SHORT, what="the claim's own lease to run out")
    assert store.rescue_expired() == []
    item = store.get(a)
    assert item.state == State.IN_PROGRESS and item.lease_expires_at.timestamp() > time.time() + 30
    assert store.resolve(tokens([it])) == []
    assert store.get(a).attempts == 1


def test_rescue_with_nothing_expired_returns_nothing(store):
    submit(store, n=2)
    claim(store, limit=1, lease=600)
    assert store.rescue_expired() == []
