"""Store conformance: settling claimed items (step 4), fenced by the claim token."""

from __future__ import annotations

import time

import pytest

from conveyor import State

from .helpers import claim, submit, tokens

STALE = 12345  # a token no claim hands out in practice


def test_resolve_marks_items_resolved(store):
    ids = submit(store, n=3)
    got = claim(store, limit=3)
    before = time.time()
    assert store.resolve(tokens(got)) == []
    for i in ids:
        item = store.get(i)
        assert item.state == State.RESOLVED
        assert item.attempts == 1
        assert item.lease_owner is None and item.lease_expires_at is None
        assert before - 1 <= item.finished_at.timestamp() <= time.time() + 1
    s = store.stats(["q"])["q"]
    assert (s["resolved"], s["in_progress"], s["pending"]) == (3, 0, 0)


def test_settling_nothing_is_a_no_op(store):
    assert store.resolve([]) == []
    assert store.retry([]) == []
    assert store.fail([]) == []
    assert store.release([]) == []
    assert store.extend_leases([], 30) == []


@pytest.mark.parametrize("action", ["resolve", "retry", "fail", "release", "extend"])
def test_stale_token_is_refused_and_item_unchanged(store, action):
    a, b = submit(store, n=2)
    got = {it.id: it for it in claim(store, limit=2)}
    before = store.get(a)
    good = (b, got[b].claim_token)
    stale = (a, got[a].claim_token ^ 1)
    call = {
        "resolve": lambda: store.resolve([stale, good]),
        "retry": lambda: store.retry([(*stale, 0.0, "x"), (*good, 0.0, "x")]),
        "fail": lambda: store.fail([(*stale, "x"), (*good, "x")]),
        "release": lambda: store.release([stale, good]),
        "extend": lambda: store.extend_leases([stale, good], 120),
    }[action]
    assert call() == [a]
    after = store.get(a)
    assert (after.state, after.attempts, after.claim_token, after.last_error, after.lease_expires_at) == (
        before.state, before.attempts, before.claim_token, before.last_error, before.lease_expires_at)
    # the entry with the right token went through
    b_after = store.get(b)
    expected = {"resolve": State.RESOLVED, "retry": State.PENDING, "fail": State.DEAD,
                "release": State.PENDING, "extend": State.IN_PROGRESS}[action]
    assert b_after.state == expected


def test_unknown_id_is_refused(store):
    assert store.resolve([(999_999, STALE)]) == [999_999]


def test_resolving_twice_is_refused_the_second_time(store):
    (a,) = submit(store, n=1)
    got = claim(store)
    assert store.resolve(tokens(got)) == []
    assert store.resolve(tokens(got)) == [a]
    assert store.retry([(a, got[0].claim_token, 0.0, "late")]) == [a]
    assert store.fail([(a, got[0].claim_token, "late")]) == [a]
    assert store.get(a).state == State.RESOLVED and store.get(a).last_error is None


def test_refused_ids_keep_the_order_asked(store):
    ids = submit(store, n=4)
    got = claim(store, limit=4)
    mixed = [(ids[3], STALE), (ids[0], got[0].claim_token), (ids[2], STALE), (ids[1], STALE)]
    assert store.resolve(mixed) == [ids[3], ids[2], ids[1]]


def test_retry_goes_back_to_pending_after_the_delay(store):
    (a,) = submit(store, n=1)
    (it,) = claim(store)
    before = time.time()
    assert store.retry([(a, it.claim_token, 30.0, "Traceback: boom")]) == []
    item = store.get(a)
    assert item.state == State.PENDING
    assert item.attempts == 1
    assert item.last_error == "Traceback: boom"
    assert item.lease_owner is None and item.finished_at is None
    assert before + 29 <= item.run_at.timestamp() <= time.time() + 31
    assert claim(store) == []  # not due yet


def test_retry_with_no_delay_is_claimable_again_with_attempts_counted(store):
    (a,) = submit(store, n=1)
    (it,) = claim(store)
    store.retry([(a, it.claim_token, 0.0, "again")])
    (again,) = claim(store)
    assert again.id == a and again.attempts == 2 and again.last_error == "again"


def test_retry_dead_letters_when_attempts_are_spent(store):
    (a,) = submit(store, n=1)
    for attempt in (1, 2):
        (it,) = claim(store, max_attempts=3)
        store.retry([(a, it.claim_token, 0.0, f"failure {attempt}")])
        assert store.get(a).state == State.PENDING
    (it,) = claim(store, max_attempts=3)
    assert it.attempts == 3
    assert store.retry([(a, it.claim_token, 0.0, "failure 3")]) == []
    item = store.get(a)
    assert item.state == State.DEAD
    assert item.last_error == "failure 3"
    assert item.finished_at is not None
    assert claim(store) == []
    assert store.stats(["q"])["q"]["dead"] == 1


def test_retry_with_max_attempts_one_dead_letters_at_once(store):
    (a,) = submit(store, n=1)
    (it,) = claim(store, max_attempts=1)
    store.retry([(a, it.claim_token, 0.0, "only chance")])
    assert store.get(a).state == State.DEAD


def test_fail_sends_straight_to_dead_with_the_reason(store):
    (a,) = submit(store, n=1)
    (it,) = claim(store, max_attempts=10)
    assert store.fail([(a, it.claim_token, "Fail: customer unknown")]) == []
    item = store.get(a)
    assert item.state == State.DEAD
    assert item.attempts == 1
    assert item.last_error == "Fail: customer unknown"
    assert item.finished_at is not None
    assert item.lease_owner is None


def test_release_gives_the_attempt_back(store):
    a, b = submit(store, n=2)
    got = claim(store, limit=2)
    assert store.release(tokens(got)) == []
    for i in (a, b):
        item = store.get(i)
        assert item.state == State.PENDING
        assert item.attempts == 0
        assert item.lease_owner is None and item.lease_expires_at is None
    again = claim(store, limit=2)
    assert [(it.id, it.attempts) for it in again] == [(a, 1), (b, 1)]


def test_release_after_earlier_attempts_only_gives_back_the_last(store):
    (a,) = submit(store, n=1)
    (it,) = claim(store)
    store.retry([(a, it.claim_token, 0.0, "first failed")])
    (it,) = claim(store)
    store.release(tokens([it]))
    assert store.get(a).attempts == 1


def test_settlements_of_one_batch_apply_together(store):
    ids = submit(store, n=4)
    got = claim(store, limit=4)
    t = dict(tokens(got))
    assert store.resolve([(ids[0], t[ids[0]]), (ids[1], t[ids[1]])]) == []
    assert store.retry([(ids[2], t[ids[2]], 60.0, "later")]) == []
    assert store.fail([(ids[3], t[ids[3]], "no")]) == []
    assert [store.get(i).state for i in ids] == [State.RESOLVED, State.RESOLVED, State.PENDING, State.DEAD]


def test_a_large_batch_settles_in_one_call(store):
    from .helpers import new

    store.submit_many([new("q", i) for i in range(1500)])
    got = claim(store, limit=1500)
    assert len(got) == 1500
    assert store.resolve(tokens(got)) == []
    assert store.stats(["q"])["q"]["resolved"] == 1500
