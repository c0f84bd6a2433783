"""A user's mistake through the API: one UsageError naming what is wrong, the same on every store,
and nothing stored. Values that used to be accepted and then broke reading the item back are
refused at submit."""

from __future__ import annotations

import datetime as dt
import math

import pytest

import conveyor
from conveyor import UsageError


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


BAD_PAYLOADS = [
    pytest.param("\ud800", "lone surrogate", id="lone-surrogate"),
    pytest.param({"name": "caf\udce9"}, "lone surrogate", id="surrogate-in-object"),
    pytest.param({1: "\ud800"}, "lone surrogate", id="surrogate-non-str-key"),
    pytest.param(nested(300), "levels deep", id="nested-300"),
    pytest.param({1: nested(600)}, "levels deep", id="nested-600-non-str-key"),
    pytest.param(nested(5000), "levels deep", id="nested-5000"),
    pytest.param({"n": 2**64}, "64 bits", id="int-beyond-64-bits"),
    pytest.param({"x": math.nan}, "payload", id="nan"),
]


@pytest.mark.parametrize("payload, needle", BAD_PAYLOADS)
def test_bad_payload_is_refused_on_every_submit_path(app, payload, needle):
    for submit in (
        lambda: app.submit("q", payload),
        lambda: app.submit_many("q", [1, payload, 3]),
        lambda: app.submit_many("q", [1, payload], key="k"),
        lambda: app.submit_many("q", iter([1, payload])),
    ):
        with pytest.raises(UsageError, match=needle):
            submit()
    app.submit("q", "fine")  # the store works and holds only that
    assert app.stats(["q"])["q"]["total"] == 1


def test_deepest_allowed_payload_round_trips(app):
    item_id = app.submit("q", nested(254))
    got = app.get(item_id).payload
    depth = 0
    while isinstance(got, list) and got:
        got, depth = got[0], depth + 1
    assert depth == 253  # 254 nested lists: the innermost is empty


@pytest.mark.parametrize("field", ["key", "dedup_key"])
def test_surrogate_in_key_is_refused(app, field):
    with pytest.raises(UsageError, match=f"{field}.*lone surrogate"):
        app.submit("q", 1, **{field: "k\udcff"})
    assert app.stats(["q"])["q"]["total"] == 0


@pytest.mark.parametrize("field", ["key", "dedup_key"])
def test_nul_in_key_is_refused_alike_on_every_store(app, field):
    with pytest.raises(UsageError, match=f"{field}.*NUL"):
        app.submit("q", 1, **{field: "a\x00b"})
    with pytest.raises(UsageError, match=f"{field}.*NUL"):
        app.submit_many("q", [1], **{field: "a\x00b"})
    assert app.stats(["q"])["q"]["total"] == 0


def test_surrogate_in_queue_name_is_refused(app):
    with pytest.raises(UsageError, match="queue name.*lone surrogate"):
        app.submit("q\udcff", 1)


@pytest.mark.parametrize("priority", [2**63, -(2**63) - 1, 10**30])
def test_priority_beyond_64_bits_is_refused(app, priority):
    with pytest.raises(UsageError, match="64 bits"):
        app.submit("q", 1, priority=priority)
    with pytest.raises(UsageError, match="64 bits"):
        app.submit_many("q", [1, 2], priority=priority)
    assert app.stats(["q"])["q"]["total"] == 0


def test_priority_at_64_bit_limits_round_trips(app):
    hi = app.submit("q", 1, priority=2**63 - 1)
    lo = app.submit("q", 1, priority=-(2**63))
    assert app.get(hi).priority == 2**63 - 1
    assert app.get(lo).priority == -(2**63)
    assert isinstance(app.get(hi).priority, int)


@pytest.mark.parametrize("run_at", [math.nan, math.inf, -math.inf, 1e18, -1e18, 1e300,
                                    dt.timedelta(days=10**8)])
def test_run_at_out_of_range_is_refused(app, run_at):
    with pytest.raises(UsageError, match="run_at"):
        app.submit("q", 1, run_at=run_at)
    with pytest.raises(UsageError, match="run_at"):
        app.submit_many("q", [1, 2], run_at=run_at)
    assert app.stats(["q"])["q"]["total"] == 0


def test_run_at_far_but_valid_round_trips(app):
    when = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)
    item_id = app.submit("q", 1, run_at=when)
    assert app.get(item_id).run_at == when


def test_purge_accepts_the_clis_durations(app):
    app.submit("q", 1)
    assert app.purge("q", "7d") == 0
    assert app.purge("q", "12h") == 0
    assert app.purge("q", dt.timedelta(hours=1)) == 0
    for bad in ("soon", "-1d", math.nan, True, None):
        with pytest.raises(UsageError, match="older_than"):
            app.purge("q", bad)


def test_unknown_queue_is_named_by_requeue_and_purge(app):
    with pytest.raises(UsageError, match="'nope' has no items"):
        app.requeue("nope")
    with pytest.raises(UsageError, match="'nope' has no items"):
        app.purge("nope", 0)

    @app.processor("known")
    def handle(item):
        pass

    assert app.requeue("known") == 0  # a queue the app processes is no mistake, even while empty
    assert app.purge("known", 0) == 0


def test_long_values_are_cut_in_messages(app):
    name = "x" * 10_000
    with pytest.raises(UsageError) as exc:
        app.submit(name, 1)
    assert len(str(exc.value)) < 300
    assert "10,000 characters" in str(exc.value)
    with pytest.raises(UsageError) as exc:
        _ = conveyor.App("nosuch://" + "y" * 10_000).store
    assert len(str(exc.value)) < 300


@pytest.mark.parametrize("option, value", [("lease_seconds", math.nan), ("backoff_base", math.inf),
                                           ("timeout_seconds", math.nan), ("batch_size", 0)])
def test_processor_options_must_be_finite(app, option, value):
    with pytest.raises(UsageError, match=option):
        app.processor("q", **{option: value})
