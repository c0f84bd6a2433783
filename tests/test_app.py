"""App: the public API, its validation of a user's input, and submitting."""

from __future__ import annotations

import datetime as dt
import time

import pytest

import conveyor
from conveyor import App, State, UsageError


def test_public_api_is_pinned():
    assert conveyor.__all__ == [
        "App",
        "Backoff",
        "BatchErrors",
        "ConveyorError",
        "Fail",
        "Item",
        "ItemNotFound",
        "LeaseLost",
        "QueueOptions",
        "Retry",
        "State",
        "StoreError",
        "UsageError",
        "__version__",
    ]
    for name in conveyor.__all__:
        assert hasattr(conveyor, name), name


def test_error_tree():
    assert issubclass(conveyor.UsageError, conveyor.ConveyorError)
    assert issubclass(conveyor.UsageError, ValueError)
    assert issubclass(conveyor.ItemNotFound, conveyor.UsageError)
    assert issubclass(conveyor.StoreError, conveyor.ConveyorError)
    assert issubclass(conveyor.LeaseLost, conveyor.ConveyorError)
    assert not issubclass(conveyor.Retry, conveyor.ConveyorError)
    assert not issubclass(conveyor.Fail, conveyor.ConveyorError)
    assert conveyor.LeaseLost([3, 4]).item_ids == [3, 4]
    with pytest.raises(ValueError):
        conveyor.Retry(delay=-1)


# -- database URLs ----------------------------------------------------------------------------

@pytest.mark.parametrize("url, words", [
    ("mysql://user@host/db", ["scheme", "mysql"]),
    ("just-a-path.db", ["scheme", "just-a-path.db"]),
])
def test_bad_url_is_a_usage_error_naming_the_problem(url, words):
    with pytest.raises(UsageError) as info:
        App(url).stats()
    for word in words:
        assert word in str(info.value)


def test_empty_url_is_a_usage_error():
    from conveyor.stores import open_store

    with pytest.raises(UsageError, match="empty"):
        open_store("  ")


def test_sqlite_url_with_missing_folder(tmp_path):
    app = App(f"sqlite:///{tmp_path}/no/such/folder/c.db")
    with pytest.raises(UsageError, match="folder"):
        app.submit("q", 1)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://", "sqlite:///"])
def test_sqlite_url_without_a_shareable_file_is_refused(url):
    with pytest.raises(UsageError, match="file"):
        App(url).stats()


def test_sqlite_url_with_a_host_is_refused(tmp_path):
    with pytest.raises(UsageError, match="host"):
        App(f"sqlite://somehost/{tmp_path}/c.db").stats()


def test_url_defaults_to_the_environment(monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", url)
    assert App().url == url
    monkeypatch.delenv("CONVEYOR_DATABASE_URL")
    assert App().url == "sqlite:///conveyor.db"


# -- submit -----------------------------------------------------------------------------------

def test_submit_returns_the_new_id(app):
    a = app.submit("orders", {"order_id": 7}, key="restaurant-3", priority=2)
    b = app.submit("orders", {"order_id": 8})
    assert isinstance(a, int) and b != a
    item = app.get(a)
    assert (item.queue, item.payload, item.key, item.priority, item.state) == (
        "orders", {"order_id": 7}, "restaurant-3", 2, State.PENDING)


def test_submit_with_a_stored_dedup_key_returns_the_existing_id(app):
    a = app.submit("orders", {"v": 1}, dedup_key="order-7")
    assert app.submit("orders", {"v": 2}, dedup_key="order-7") == a
    assert app.get(a).payload == {"v": 1}
    assert app.stats()["orders"]["total"] == 1
    other = app.submit("refunds", {"v": 3}, dedup_key="order-7")
    assert other != a


def test_int_key_is_stored_as_text(app):
    a = app.submit("q", 1, key=42)
    assert app.get(a).key == "42"


def test_submit_many_counts_stored_items(app):
    assert app.submit_many("q", [{"i": i} for i in range(25)]) == 25
    assert app.submit_many("q", []) == 0
    assert app.stats()["q"]["pending"] == 25


def test_submit_many_with_key_and_dedup_callables(app):
    payloads = [{"shop": f"s{i % 3}", "order": i} for i in range(9)]
    n = app.submit_many("q", payloads, key=lambda p: p["shop"], dedup_key=lambda p: f"order-{p['order']}")
    assert n == 9
    # resubmitting the same orders stores nothing new; a new one is stored
    n2 = app.submit_many("q", payloads + [{"shop": "s9", "order": 99}], key=lambda p: p["shop"],
                         dedup_key=lambda p: f"order-{p['order']}")
    assert n2 == 1
    store = app.store
    for p in payloads:
        item = store.get(store.find_dedup("q", f"order-{p['order']}"))
        assert item.key == p["shop"] and item.payload == p


def test_submit_many_with_fixed_key(app):
    app.submit_many("q", [1, 2], key="same")
    ids = [it.id for it in app.store.claim(conveyor.model.Claim("q", 10, 30, 5), "t")]
    assert [app.get(i).key for i in ids] == ["same", "same"]


def test_run_at_as_timedelta_datetime_and_seconds(app):
    now = time.time()
    a = app.submit("q", "td", run_at=dt.timedelta(hours=1))
    b = app.submit("q", "aware", run_at=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30))
    c = app.submit("q", "naive-local", run_at=dt.datetime.now() + dt.timedelta(minutes=10))
    d = app.submit("q", "seconds", run_at=now + 120)
    e = app.submit("q", "past", run_at=dt.timedelta(seconds=-5))
    expected = {a: 3600, b: 1800, c: 600, d: 120, e: -5}
    for item_id, offset in expected.items():
        assert abs(app.get(item_id).run_at.timestamp() - (now + offset)) < 5, item_id
    claimed = app.store.claim(conveyor.model.Claim("q", 10, 30, 5), "t")
    assert [it.id for it in claimed] == [e]


def test_submit_many_run_at_applies_to_all(app):
    app.submit_many("q", [1, 2, 3], run_at=dt.timedelta(hours=1))
    assert app.store.claim(conveyor.model.Claim("q", 10, 30, 5), "t") == []
    assert app.stats()["q"]["pending"] == 3


# -- bad input: one clear error, nothing stored -----------------------------------------------

class NotJSON:
    pass


@pytest.mark.parametrize("payload", [NotJSON(), {"when": dt.datetime.now()}, float("nan"), {1j: 2}, b"bytes"])
def test_payload_not_json_serialisable(app, payload):
    with pytest.raises(UsageError, match="JSON"):
        app.submit("q", payload)
    assert app.stats() == {}


def test_one_bad_payload_stores_nothing_of_the_batch(app):
    with pytest.raises(UsageError, match="item 2"):
        app.submit_many("q", [1, 2, NotJSON(), 4])
    assert app.stats() == {}


@pytest.mark.parametrize("bad", [NotJSON(), float("nan"), 2**64, {"when": dt.datetime.now()}])
def test_one_bad_payload_stores_nothing_of_a_bulk_batch(app, bad):
    # large enough for the stores' bulk paths (PostgreSQL's COPY, SQLite's one JSON document):
    # the bad payload is met mid-stream, the batch is rolled back, and the error names it
    payloads: list = [{"i": i} for i in range(1000)]
    payloads[700] = bad
    with pytest.raises(UsageError, match="item 700"):
        app.submit_many("q", payloads)
    assert app.stats() == {}
    assert app.submit_many("q", payloads[:700]) == 700  # the connection is fine afterwards


BULK_PAYLOADS = ["text", "", 0, -7, 2**63 - 1, 1.5, 1e-300, None, True, False, [], {}, [1, [None, "x"]],
                 {"nested": {"a": [1.25, None]}, "ünïcode": "日本", "quote\"": "back\\slash"}, "nul \u0000 inside"]


@pytest.mark.parametrize("size", [len(BULK_PAYLOADS), 40 * len(BULK_PAYLOADS)])
def test_submit_many_round_trips_every_kind_of_payload(app, size):
    payloads = (BULK_PAYLOADS * 40)[:size]
    later = time.time() + 3600
    assert app.submit_many("q", payloads, priority=3, run_at=later) == size
    items = [app.get(i) for i in sorted(_ids(app, "q"))]
    assert [it.payload for it in items] == payloads
    assert {it.priority for it in items} == {3}
    assert all(abs(it.run_at.timestamp() - later) < 0.01 for it in items)
    assert {it.state for it in items} == {State.PENDING} and {it.key for it in items} == {None}


def _ids(app, queue):
    store = app.store
    if hasattr(store, "path"):
        with store.transaction() as conn:
            return [r[0] for r in conn.execute("SELECT id FROM conveyor_items WHERE queue = ?", (queue,))]
    with store.transaction() as conn:
        return [r[0] for r in conn.execute("SELECT id FROM conveyor_items WHERE queue = %s", (queue,))]


@pytest.mark.parametrize("queue", ["", "has space", "tab\there", "new\nline", 12, None, "x" * 201])
def test_invalid_queue_name(app, queue):
    with pytest.raises(UsageError, match="queue name"):
        app.submit(queue, 1)
    with pytest.raises(UsageError, match="queue name"):
        app.submit_many(queue, [1])
    assert app.stats() == {}


@pytest.mark.parametrize("priority", ["1", 1.5, True, None])
def test_bad_priority(app, priority):
    with pytest.raises(UsageError, match="priority"):
        app.submit("q", 1, priority=priority)
    assert app.stats() == {}


@pytest.mark.parametrize("run_at", ["tomorrow", [1], True, dt.date.today()])
def test_bad_run_at(app, run_at):
    with pytest.raises(UsageError, match="run_at"):
        app.submit("q", 1, run_at=run_at)
    assert app.stats() == {}


@pytest.mark.parametrize("field", ["key", "dedup_key"])
@pytest.mark.parametrize("value", [1.5, ["a"], {"a": 1}, True, ""])
def test_bad_key_types(app, field, value):
    with pytest.raises(UsageError, match=field):
        app.submit("q", 1, **{field: value})
    assert app.stats() == {}


def test_bad_key_from_a_callable_names_the_item(app):
    with pytest.raises(UsageError, match=r"item 1.*key"):
        app.submit_many("q", [{"k": "a"}, {"k": 3.5}], key=lambda p: p["k"])
    assert app.stats() == {}


# -- processors -------------------------------------------------------------------------------


@pytest.fixture
def bare_app(sqlite_url):
    """An App whose database is never opened: registering processors needs none."""
    return App(sqlite_url)

@pytest.mark.parametrize("option, value", [
    ("batch_size", 0), ("batch_size", 1.5), ("batch_size", True), ("batch_size", "10"),
    ("concurrency", 0), ("concurrency", -1),
    ("max_attempts", 0),
    ("lease_seconds", 0), ("lease_seconds", -1), ("lease_seconds", "30"),
    ("backoff_base", 0), ("backoff_max", -5),
])
def test_processor_option_validation(bare_app, option, value):
    with pytest.raises(UsageError, match=option):
        bare_app.processor("q", **{option: value})
    assert "q" not in bare_app.processors


def test_processor_with_bad_queue_name(bare_app):
    with pytest.raises(UsageError, match="queue name"):
        bare_app.processor("bad name")


def test_duplicate_processor_is_refused(bare_app):
    @bare_app.processor("q")
    def first(item):
        pass

    with pytest.raises(UsageError, match="already registered"):
        @bare_app.processor("q")
        def second(item):
            pass

    assert bare_app.processors["q"].handler is first


def test_processor_records_its_options_and_kind(bare_app):
    @bare_app.processor("a", batch_size=7, concurrency=2, lease_seconds=3, max_attempts=9, ordered=True)
    def handle(item):
        pass

    @bare_app.processor("b", batch=True)
    async def handle_b(items):
        pass

    pa, pb = bare_app.processors["a"], bare_app.processors["b"]
    assert pa.options == conveyor.QueueOptions("a", batch_size=7, concurrency=2, lease_seconds=3.0,
                                              max_attempts=9, ordered=True)
    assert pa.is_async is False and pb.is_async is True and pb.options.batch is True
    assert handle.__name__ == "handle"  # the decorator gives the function back


def test_async_transactional_handler_is_registered_as_async(bare_app):
    @bare_app.processor("q", transactional=True)
    async def handle(item, conn):
        pass

    assert bare_app.processors["q"].is_async and bare_app.processors["q"].options.transactional


def test_worker_needs_processors_and_known_queues(app):
    with pytest.raises(UsageError, match="no processors"):
        app.worker()
    with pytest.raises(UsageError, match="no processors"):
        app.run_worker(install_signal_handlers=False)

    @app.processor("q")
    def handle(item):
        pass

    with pytest.raises(UsageError, match="'nope'"):
        app.worker(["nope"])
    with pytest.raises(UsageError, match="processes"):
        app.run_worker(processes=0, install_signal_handlers=False)


# -- operators through the App ----------------------------------------------------------------

def test_purge_validation(app):
    with pytest.raises(UsageError, match="negative"):
        app.purge("q", -1)
    with pytest.raises(UsageError, match="queue name"):
        app.purge("bad name", 10)
    with pytest.raises(UsageError, match="'q' has no items"):
        app.purge("q", dt.timedelta(days=7))
    app.submit("q", 1)
    assert app.purge("q", dt.timedelta(days=7)) == 0
    assert app.purge("q", "7d") == 0


def test_cancel_and_requeue_through_the_app(app):
    a = app.submit("q", 1)
    app.cancel(a)
    assert app.get(a).state == State.CANCELLED
    assert app.requeue("q") == 1
    assert app.get(a).state == State.PENDING
    with pytest.raises(conveyor.ItemNotFound):
        app.cancel(10**9)


def test_items_pages_newest_first_through_the_app(app):
    ids = [app.submit("q", {"n": n}, key="k" if n % 2 else None) for n in range(7)]
    app.submit("other", 1)
    app.cancel(ids[2])
    page = app.items("q", limit=3)
    assert [it.id for it in page] == ids[::-1][:3]
    assert [it.id for it in app.items("q", limit=3, before_id=page[-1].id)] == ids[::-1][3:6]
    assert [it.id for it in app.items("q", state="cancelled")] == [ids[2]]
    assert [it.id for it in app.items("q", key="k")] == ids[1::2][::-1]
    assert len(app.items()) == 8
    with pytest.raises(UsageError, match="queue name"):
        app.items("bad name")
    with pytest.raises(UsageError, match="'finished'"):
        app.items("q", state="finished")


# -- submitting a stream ----------------------------------------------------------------------

def test_submit_many_of_a_generator_keeps_memory_bounded(app):
    """200,000 payloads from a generator: the store is given them a chunk at a time, so what the
    submit holds at once stays far below what the whole stream takes (~60 MB held as a list)."""
    import tracemalloc

    n = 200_000
    app.migrate()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        stored = app.submit_many("q", ({"i": i} for i in range(n)))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert stored == n
    assert peak < 25e6, f"submit_many held {peak / 1e6:.1f} MB at its peak"
    assert app.stats(["q"])["q"]["pending"] == n
    assert app.get(1).payload == {"i": 0} and app.get(n).payload == {"i": n - 1}


@pytest.mark.parametrize("keyed", [False, True])
def test_a_bad_payload_deep_in_a_generator_stores_nothing_and_is_named(app, keyed):
    """All or nothing across chunks: the bad payload comes after two whole chunks were sent."""
    from conveyor.app import SUBMIT_CHUNK

    bad_at = 2 * SUBMIT_CHUNK + 123

    def stream():
        for i in range(3 * SUBMIT_CHUNK):
            yield NotJSON() if i == bad_at else {"i": i, "k": f"k{i % 7}"}

    with pytest.raises(UsageError, match=f"item {bad_at}\\b"):
        app.submit_many("q", stream(), key=(lambda p: p["k"]) if keyed else None)
    assert app.stats() == {}
    assert app.submit_many("q", ({"i": i} for i in range(5))) == 5  # the connection is fine afterwards


def test_submit_items_streams_and_reports_the_ids_per_chunk(app):
    from conveyor.model import NewItem

    seen: list = []
    items = (NewItem("q", f'{{"i": {i}}}', None, f"d{i % 900}") for i in range(1000))
    assert app.submit_items(items, chunk=300, on_ids=seen.append) == 900
    assert [len(ids) for ids in seen] == [300, 300, 300, 100]
    flat = [i for ids in seen for i in ids]
    assert flat[:900] == sorted(flat[:900]) and flat[900:] == [None] * 100  # duplicates of the first 100
    assert [app.get(i).payload for i in flat[:3]] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert app.submit_items(iter([])) == 0
