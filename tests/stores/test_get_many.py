"""Store conformance: get_many, the items with these ids in one query."""

from __future__ import annotations

from conveyor import State

from .helpers import claim, submit


def ids(items) -> list[int]:
    return [it.id for it in items]


def test_get_many_returns_the_items_that_exist_in_the_order_asked(store):
    a, b, c = submit(store, n=3)
    store.cancel(b)
    assert ids(store.get_many([c, 999_999, a, c])) == [c, a]
    assert store.get_many([]) == []
    assert store.get_many([999_999]) == []
    assert store.get_many([b]) == [store.get(b)] and store.get_many([b])[0].state == State.CANCELLED


def test_get_many_reads_every_field_as_get_does(store):
    a, b = submit(store, n=2)
    (running,) = claim(store, limit=1)
    assert running.id == a
    assert store.get_many([b, a]) == [store.get(b), store.get(a)]
    assert store.get_many([a])[0].state == State.IN_PROGRESS and store.get_many([a])[0].payload == {"n": 0}
