"""Store conformance: submitting items, deduplication, reading them back, schema, transactions."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from conveyor import ItemNotFound, State

from .helpers import claim, new, submit


def test_submit_many_returns_ids_in_order(store):
    ids = store.submit_many([new("q", {"n": i}) for i in range(50)])
    assert len(ids) == 50
    assert all(isinstance(i, int) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert [store.get(i).payload for i in ids] == [{"n": i} for i in range(50)]


def test_submitted_item_reads_back_as_pending(store):
    before = time.time()
    (item_id,) = store.submit_many([new("orders", {"order": 7, "tags": ["a", "é"]}, key="r-3", dedup_key="o-7", priority=4)])
    item = store.get(item_id)
    assert item.id == item_id
    assert item.queue == "orders"
    assert item.payload == {"order": 7, "tags": ["a", "é"]}
    assert (item.key, item.dedup_key, item.priority) == ("r-3", "o-7", 4)
    assert item.state == State.PENDING and item.attempts == 0
    assert item.lease_owner is None and item.lease_expires_at is None and item.finished_at is None
    assert before - 1 <= item.created_at.timestamp() <= time.time() + 1
    assert before - 1 <= item.run_at.timestamp() <= time.time() + 1


def test_payloads_of_every_json_type_round_trip(store):
    payloads = [None, 0, -3.5, "text", [1, [2]], {"a": {"b": None}}, True]
    ids = store.submit_many([new("q", p) for p in payloads])
    assert [store.get(i).payload for i in ids] == payloads


def test_run_at_is_kept(store):
    later = time.time() + 3600
    (item_id,) = store.submit_many([new("q", 1, run_at=later)])
    assert abs(store.get(item_id).run_at.timestamp() - later) < 0.01


def test_dedup_skips_second_submission_of_a_key(store):
    first = store.submit_many([new("q", {"v": 1}, dedup_key="d1")])
    again = store.submit_many([new("q", {"v": 2}, dedup_key="d1"), new("q", {"v": 3}, dedup_key="d2")])
    assert again[0] is None and isinstance(again[1], int)
    assert store.find_dedup("q", "d1") == first[0]
    assert store.get(first[0]).payload == {"v": 1}  # the original is untouched
    assert store.stats(["q"])["q"]["pending"] == 2


def test_dedup_within_one_batch(store):
    ids = store.submit_many([new("q", 1, dedup_key="same"), new("q", 2, dedup_key="same"), new("q", 3)])
    assert ids[0] is not None and ids[1] is None and ids[2] is not None
    assert store.find_dedup("q", "same") == ids[0]


def test_dedup_is_per_queue(store):
    (a,) = store.submit_many([new("q1", 1, dedup_key="k")])
    (b,) = store.submit_many([new("q2", 2, dedup_key="k")])
    assert a is not None and b is not None and a != b
    assert store.find_dedup("q1", "k") == a
    assert store.find_dedup("q2", "k") == b
    assert store.find_dedup("q3", "k") is None
    assert store.find_dedup("q1", "other") is None


def test_items_without_dedup_key_never_collide(store):
    ids = store.submit_many([new("q", 1), new("q", 1), new("q", 1)])
    assert None not in ids and len(set(ids)) == 3


def test_get_unknown_id_raises_item_not_found(store):
    with pytest.raises(ItemNotFound):
        store.get(987654)


def test_migrate_is_idempotent(store):
    assert store.migrate() == []
    assert store.migrate() == []
    submit(store, n=1)  # the schema is still usable


def test_transaction_commits_work_done_inside(store):
    (a,) = submit(store, n=1)
    with store.transaction():
        (b,) = store.submit_many([new("q", "inside")])
        claimed = claim(store, limit=1)
        assert [it.id for it in claimed] == [a]
        store.resolve([(a, claimed[0].claim_token)])
    assert store.get(a).state == State.RESOLVED
    assert store.get(b).state == State.PENDING


def test_transaction_rolls_everything_back_on_exception(store):
    (a,) = submit(store, n=1)
    with pytest.raises(RuntimeError, match="boom"), store.transaction():
        store.submit_many([new("q", "inside"), new("q", "inside too", dedup_key="x")])
        claimed = claim(store, limit=5)
        assert len(claimed) == 3  # the transaction sees its own submissions
        raise RuntimeError("boom")
    assert store.get(a).state == State.PENDING and store.get(a).attempts == 0
    assert store.find_dedup("q", "x") is None
    assert store.stats(["q"])["q"]["total"] == 1
    # and the store is usable afterwards, on the same thread
    (b,) = submit(store, n=1)
    assert store.get(b).state == State.PENDING


def test_nested_transaction_joins_the_outer_one(store):
    with pytest.raises(KeyError), store.transaction():
        with store.transaction():
            store.submit_many([new("q", "inner")])
        raise KeyError("outer fails after the inner block finished")
    assert store.stats(["q"])["q"]["total"] == 0


def test_submit_many_is_all_or_nothing_inside_a_transaction(store):
    with pytest.raises(ZeroDivisionError), store.transaction():
        store.submit_many([new("q", i) for i in range(100)])
        store.submit_many([new("q", i) for i in range(100)])
        raise ZeroDivisionError
    assert store.stats() == {}


def test_created_at_is_a_datetime(store):
    (a,) = submit(store, n=1)
    assert isinstance(store.get(a).created_at, dt.datetime)
    assert store.get(a).created_at.tzinfo is not None
