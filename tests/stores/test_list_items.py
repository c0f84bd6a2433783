"""Store conformance: browsing items newest first (list_items), by queue, state and key, page by page."""

from __future__ import annotations

import pytest

from conveyor import State, UsageError
from conveyor.stores.common import LIST_MAX

from .helpers import claim, new, submit, tokens


def ids(items) -> list[int]:
    return [it.id for it in items]


def every_state(store, queue: str = "q", key: str | None = None) -> dict[str, list[int]]:
    """Two items of `queue` in each state, reached the way workers and operators reach them (and a
    retried, a released and a requeued item back in pending); returns the ids per state."""
    made = submit(store, queue, 14, key=key)
    got = {it.id: it for it in claim(store, queue, limit=1000)}
    store.release([(i, it.claim_token) for i, it in got.items() if i not in made])  # earlier calls' items
    tok = lambda i: (i, got[i].claim_token)  # noqa: E731
    store.resolve([tok(made[0]), tok(made[1])])
    store.fail([(*tok(made[2]), "Fail: no such customer"), (*tok(made[3]), "Traceback ...\nValueError: x")])
    store.retry([(*tok(made[4]), 0.0, "flaky")])  # back to pending, attempt spent
    store.release([tok(made[5])])  # back to pending, attempt given back
    store.cancel(made[6])  # cancelled while running
    store.fail([(*tok(made[7]), "Fail: will be requeued")])
    store.requeue(queue, [made[7]])  # dead, then pending again
    store.cancel(made[8])
    # made[9], made[10] stay in progress; made[11..13] were claimed too: settle them as pending again
    store.release([tok(i) for i in made[11:14]])
    return {
        "resolved": [made[1], made[0]],
        "dead": [made[3], made[2]],
        "cancelled": [made[8], made[6]],
        "in_progress": [made[10], made[9]],
        "pending": sorted([made[4], made[5], made[7], *made[11:14]], reverse=True),
    }


def test_newest_first_page_by_page(store):
    mine: list[int] = []
    for _ in range(5):  # another queue's items in between, so pages must skip them
        mine += submit(store, "q", 5)
        submit(store, "other", 3)
    newest_first = sorted(mine, reverse=True)
    first = store.list_items("q", limit=10)
    assert ids(first) == newest_first[:10]
    second = store.list_items("q", limit=10, before_id=first[-1].id)
    assert ids(second) == newest_first[10:20]
    third = store.list_items("q", limit=10, before_id=second[-1].id)
    assert ids(third) == newest_first[20:]
    assert store.list_items("q", limit=10, before_id=third[-1].id) == []
    assert len(store.list_items("q")) == 25  # the default page holds 50


def test_items_come_back_whole(store):
    made = every_state(store)
    (dead,) = store.list_items("q", state="dead", limit=1)
    assert dead.id == made["dead"][0] and dead.state == State.DEAD
    assert dead.queue == "q" and dead.payload == {"n": 3} and dead.attempts == 1
    assert dead.last_error == "Traceback ...\nValueError: x"
    assert dead.finished_at is not None and dead.created_at is not None and dead.run_at is not None
    assert dead == store.get(dead.id)


@pytest.mark.parametrize("state", ["pending", "in_progress", "resolved", "dead", "cancelled"])
def test_filter_by_state(store, state):
    made = every_state(store)
    every_state(store, "other")
    assert ids(store.list_items("q", state=state)) == made[state]
    assert ids(store.list_items("q", state=State(state))) == made[state]
    assert all(it.state == State(state) for it in store.list_items("q", state=state))
    # a page of one, then the next
    (first,) = store.list_items("q", state=state, limit=1)
    assert ids(store.list_items("q", state=state, limit=5, before_id=first.id)) == made[state][1:]


def test_a_queue_without_a_state_merges_every_state_newest_first(store):
    made = every_state(store)
    every_state(store, "other")
    everything = sorted((i for group in made.values() for i in group), reverse=True)
    assert ids(store.list_items("q")) == everything
    page = store.list_items("q", limit=4)
    assert ids(page) == everything[:4]
    assert ids(store.list_items("q", limit=4, before_id=page[-1].id)) == everything[4:8]


def test_filter_by_key(store):
    a = every_state(store, key="a")
    b = every_state(store, key="b")
    unkeyed = submit(store, "q", 3)
    assert ids(store.list_items("q", key="a")) == sorted((i for g in a.values() for i in g), reverse=True)
    for state in a:
        assert ids(store.list_items("q", key="b", state=state)) == b[state]
    page = store.list_items("q", key="b", limit=3)
    every_b = sorted((i for g in b.values() for i in g), reverse=True)
    assert ids(page) == every_b[:3]
    assert ids(store.list_items("q", key="b", limit=3, before_id=page[-1].id)) == every_b[3:6]
    assert store.list_items("q", key="nobody") == []
    assert not set(unkeyed) & set(ids(store.list_items("q", limit=LIST_MAX, key="a")))


def test_without_a_queue(store):
    q = every_state(store, "q", key="k")
    other = every_state(store, "other", key="k")
    everything = sorted((i for made in (q, other) for g in made.values() for i in g), reverse=True)
    assert ids(store.list_items(limit=5)) == everything[:5]
    assert ids(store.list_items(limit=5, before_id=everything[4])) == everything[5:10]
    assert ids(store.list_items(state="dead")) == sorted(q["dead"] + other["dead"], reverse=True)
    assert ids(store.list_items(state="dead", limit=1, before_id=other["dead"][1])) == [q["dead"][0]]
    assert ids(store.list_items(key="k", state="cancelled")) == sorted(q["cancelled"] + other["cancelled"], reverse=True)
    assert ids(store.list_items(state="resolved", queue="nothing here")) == []


def test_old_pending_items_behind_many_newer_finished_ones_are_found(store):
    """Pending items older than a long run of finished ones (delayed or retried items, say): a store
    that looks only among the newest items first must go on to find them."""
    old = submit(store, "q", 3, run_at=4_000_000_000)  # far in the future: never claimed here
    newer = submit(store, "q", 2500)
    while got := claim(store, "q", limit=1000):
        store.resolve(tokens(got))
    assert ids(store.list_items("q", state="pending")) == sorted(old, reverse=True)
    assert ids(store.list_items("q", limit=2501)) == sorted(newer, reverse=True) + [old[-1]]
    assert ids(store.list_items("q", state="resolved", limit=3)) == sorted(newer, reverse=True)[:3]


@pytest.mark.parametrize("bad", ["bogus", "PENDING", "", 3])
def test_unknown_state_is_a_usage_error_naming_it(store, bad):
    with pytest.raises(UsageError, match=f"unknown state {bad!r}"):
        store.list_items("q", state=bad)


@pytest.mark.parametrize("field, value", [("limit", 0), ("limit", -1), ("limit", LIST_MAX + 1), ("limit", "10"),
                                          ("limit", True), ("before_id", 0), ("before_id", "7"), ("key", 5)])
def test_bad_paging_arguments_are_usage_errors_naming_them(store, field, value):
    with pytest.raises(UsageError, match=field):
        store.list_items("q", **{field: value})


def test_list_items_on_an_empty_store(store):
    assert store.list_items() == []
    assert store.list_items("q") == []
    assert store.list_items("q", state="pending", key="k") == []
    assert store.list_items(state="dead") == []
    store.submit_many([new("q", 1)])
    assert len(store.list_items(before_id=10**12)) == 1


def test_a_database_from_before_the_browse_indexes_gets_them(store, store_url):
    """The migration that adds list_items' indexes, applied to a database already holding items."""
    from conveyor.stores import open_store

    made = every_state(store, key="k")
    version = next(v for v, _, sql in store.queries.MIGRATIONS if "conveyor_items_browse" in sql)
    with store.transaction() as conn:  # back to the schema before it
        conn.execute("DROP INDEX conveyor_items_browse")
        conn.execute("DROP INDEX conveyor_items_key_history")
        conn.execute(f"DELETE FROM conveyor_migrations WHERE version = {version}")
    store.close()
    again = open_store(store_url)
    try:
        assert again.migrate() == [version]
        for state, expected in made.items():
            assert ids(again.list_items("q", state=state)) == expected
            assert ids(again.list_items("q", state=state, key="k")) == expected
    finally:
        again.close()
