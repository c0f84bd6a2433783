"""Store conformance: the calls the worker makes that the other files don't cover: a whole cycle
(settle_and_claim), the wake-up wait, bulk payload submits, async transactions."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conveyor import State
from conveyor.model import Claim, Outcomes

from .helpers import OWNER, claim, new, submit, tokens

STALE = 12345


def test_a_cycle_settles_every_kind_and_claims(store):
    ids = submit(store, n=8)
    got = claim(store, limit=4)
    (a, ta), (b, tb), (c, tc), (d, td) = tokens(got)
    out = Outcomes(resolved=[(a, ta), (ids[7], STALE)], retried=[(b, tb, 60.0, "boom")], failed=[(c, tc, "Fail: no")],
                   released=[(d, td)])
    lost, batches = store.settle_and_claim(out, [Claim("q", 3, 30.0, 5), Claim("other", 5, 30.0, 5)], OWNER)
    assert lost == [ids[7]]  # the stale token, refused
    assert [len(x) for x in batches] == [3, 0]
    # oldest first; the released item among them where the store lets a cycle take back what it
    # released (see the next test)
    retaken = store.get(d).state == State.IN_PROGRESS
    assert [it.id for it in batches[0]] == ([d] + ids[4:6] if retaken else ids[4:7])
    assert all(it.state == State.IN_PROGRESS and it.claim_token for it in batches[0])
    assert store.get(a).state == State.RESOLVED
    assert store.get(b).state == State.PENDING and store.get(b).last_error == "boom"
    assert store.get(c).state == State.DEAD and store.get(c).last_error == "Fail: no"
    assert store.get(d).attempts == (1 if retaken else 0)  # the release gave its attempt back


def test_a_released_item_is_claimable_by_the_next_cycle_at_the_latest(store):
    """The protocol's promise (Store.settle_and_claim): an item a cycle puts back to pending may
    be taken by that cycle's own claims (SQLite, ordered claims) or not (a plain PostgreSQL cycle
    sees the data as it was before it), but the next cycle takes it, and never twice."""
    (item_id,) = submit(store)
    (it,) = claim(store)
    lost, (first,) = store.settle_and_claim(Outcomes(released=[(it.id, it.claim_token)]), [Claim("q", 5, 30.0, 5)], OWNER)
    assert lost == []
    if not first:
        _, (first,) = store.settle_and_claim(Outcomes(), [Claim("q", 5, 30.0, 5)], OWNER)
    assert [i.id for i in first] == [item_id]
    assert first[0].attempts == 1  # the release gave the attempt back
    _, (again,) = store.settle_and_claim(Outcomes(), [Claim("q", 5, 30.0, 5)], OWNER)
    assert again == []


def test_an_empty_cycle_is_a_no_op(store):
    assert store.settle_and_claim(Outcomes(), [], OWNER) == ([], [])


def test_a_cycle_with_an_ordered_claim_keeps_key_order(store):
    ids = [store.submit_many([new(payload=i, key="k")])[0] for i in range(3)]
    _, (first,) = store.settle_and_claim(Outcomes(), [Claim("q", 10, 30.0, 5, ordered=True)], OWNER)
    assert [i.id for i in first] == ids[:1]
    _, (second,) = store.settle_and_claim(Outcomes(resolved=tokens(first)), [Claim("q", 10, 30.0, 5, ordered=True)],
                                          OWNER)
    if not second:  # see the release test above: the next cycle at the latest
        _, (second,) = store.settle_and_claim(Outcomes(), [Claim("q", 10, 30.0, 5, ordered=True)], OWNER)
    assert [i.id for i in second] == ids[1:2]


def test_wait_for_change_sees_another_connections_commit(store_url, store):
    from conveyor.stores import open_store

    other = open_store(store_url)
    stop = threading.Event()

    def keep_submitting():  # until the waiter has returned: whenever its wait begins, a commit follows
        while not stop.wait(0.01):
            other.submit_many([new(payload=1)])

    try:
        store.wait_for_change(0.0)  # subscribed (PostgreSQL LISTENs on first use)
        assert store.wait_for_change(0.05) is False  # nothing happened
        t = threading.Thread(target=keep_submitting)
        t.start()
        try:
            assert store.wait_for_change(30) is True
        finally:
            stop.set()
            t.join(10)
    finally:
        other.close()


def test_wait_for_change_returns_when_woken(store):
    store.wait_for_change(0.0)
    wake = threading.Event()
    wake.set()
    assert store.wait_for_change(30, wake) is False  # at once, not after 30 s


def test_submit_payloads_stores_one_queue_in_order(store):
    n = store.submit_payloads("bulk", [{"i": i} for i in range(500)], None, 7)
    assert n == 500
    items = claim(store, "bulk", limit=500)
    assert [it.payload["i"] for it in items] == list(range(500))
    assert all(it.priority == 7 and it.key is None for it in items)


def test_submit_payloads_with_a_bad_payload_stores_nothing(store):
    with pytest.raises((TypeError, ValueError)):
        store.submit_payloads("bulk", [1, 2, {1, 2}, 4] * 100, None, 0)
    assert store.stats(["bulk"])["bulk"]["total"] == 0


def test_async_transaction_commits_with_its_resolution(store):
    (item_id,) = submit(store)
    (it,) = claim(store)

    async def run():
        async with store.async_transaction() as conn:
            return await store.resolve_in(conn, [(it.id, it.claim_token)])

    assert asyncio.run(run()) == []
    assert store.get(item_id).state == State.RESOLVED


def test_async_transaction_rolls_back_on_error_and_refuses_stale_tokens(store):
    (item_id,) = submit(store)
    (it,) = claim(store)

    async def fail_inside():
        async with store.async_transaction() as conn:
            await store.resolve_in(conn, [(it.id, it.claim_token)])
            raise RuntimeError("handler failed after resolving")

    with pytest.raises(RuntimeError):
        asyncio.run(fail_inside())
    assert store.get(item_id).state == State.IN_PROGRESS  # rolled back

    async def stale():
        async with store.async_transaction() as conn:
            return await store.resolve_in(conn, [(it.id, STALE)])

    assert asyncio.run(stale()) == [item_id]
