"""Periodic items (app.periodic): where ticks fall, which ticks a worker submits, the store's
compare-and-set, and what registration refuses. The multi-process guarantee (one item per tick
across workers) is in test_periodic_processes.py."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading

import pytest

import conveyor
from conveyor.errors import UsageError
from conveyor.periodic import MAX_TICKS, Periodic, ScheduleState, kept_by, plan, tick_text
from conveyor.worker.logs import WorkerLog
from conveyor.worker.scheduler import Scheduler


def _croniter_or_skip() -> None:
    try:
        import croniter  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("croniter is not installed: pip install -e '.[test,cron]' (make test does)")


def ms(text: str) -> int:
    """An ISO time (UTC) as epoch milliseconds."""
    moment = dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
    return round(moment.timestamp() * 1000)


def every(seconds: float, **options) -> Periodic:
    app = conveyor.App("sqlite:///unused.db")
    return app.periodic("q", every=seconds, **options)


def cron(line: str, **options) -> Periodic:
    _croniter_or_skip()
    return conveyor.App("sqlite:///unused.db").periodic("q", cron=line, **options)


# -- the grid ---------------------------------------------------------------------------------
def test_every_ticks_on_multiples_of_the_interval_since_the_epoch_plus_the_offset():
    p = every(dt.timedelta(minutes=5))
    assert p.every_ms == 300_000 and p.describe() == "every 5m"
    assert p.latest(ms("2026-05-01T12:07:30")) == ms("2026-05-01T12:05:00")
    assert p.latest(ms("2026-05-01T12:05:00")) == ms("2026-05-01T12:05:00")  # a tick is due at its instant
    assert p.after(ms("2026-05-01T12:05:00")) == ms("2026-05-01T12:10:00")
    assert p.after(ms("2026-05-01T12:07:30")) == ms("2026-05-01T12:10:00")
    shifted = every("1h", offset="15m")
    assert shifted.describe() == "every 1h +15m"
    assert shifted.latest(ms("2026-05-01T12:10:00")) == ms("2026-05-01T11:15:00")
    assert shifted.after(ms("2026-05-01T11:15:00")) == ms("2026-05-01T12:15:00")
    assert every(1.5).latest(10_000) == 9_000 and every(90).describe() == "every 90s"


def test_a_ticks_dedup_key_names_the_schedule_and_the_tick_in_utc():
    p = every(1.5, name="half")
    assert p.dedup_key(ms("2026-05-01T12:05:00")) == "periodic:half:2026-05-01T12:05:00Z"
    assert tick_text(ms("2026-05-01T12:05:01") + 500) == "2026-05-01T12:05:01.500Z"
    assert every(60).dedup_key(0) == "periodic:q:1970-01-01T00:00:00Z"  # the name defaults to the queue's
    item = every(60, payload={"kind": "summary"}, key="k", priority=3).item(ms("2026-05-01T12:05:00"))
    assert (item.queue, item.payload_json, item.key, item.priority) == ("q", '{"kind":"summary"}', "k", 3)
    assert item.run_at == ms("2026-05-01T12:05:00") / 1000


def test_cron_ticks_are_the_times_the_line_names():
    p = cron("*/5 * * * *")
    assert p.describe() == "cron */5 * * * *"
    assert p.latest(ms("2026-05-01T12:07:30")) == ms("2026-05-01T12:05:00")
    assert p.latest(ms("2026-05-01T12:05:00")) == ms("2026-05-01T12:05:00")
    assert p.latest(ms("2026-05-01T12:04:59") + 999) == ms("2026-05-01T12:00:00")
    assert p.after(ms("2026-05-01T12:05:00")) == ms("2026-05-01T12:10:00")
    minutely = cron("* * * * *")
    assert minutely.latest(ms("2026-05-01T23:59:59")) == ms("2026-05-01T23:59:00")
    assert minutely.after(ms("2026-05-01T23:59:00")) == ms("2026-05-02T00:00:00")


def test_cron_ticks_follow_the_timezone():
    p = cron("0 9 * * *", timezone="Europe/Paris")
    assert p.describe() == "cron 0 9 * * * (Europe/Paris)"
    assert p.latest(ms("2026-07-01T12:00:00")) == ms("2026-07-01T07:00:00")  # 09:00 summer time
    assert p.latest(ms("2026-01-15T12:00:00")) == ms("2026-01-15T08:00:00")  # 09:00 winter time


# -- which ticks a pass submits ---------------------------------------------------------------
def test_a_new_schedule_starts_with_its_current_tick_only_if_on_time():
    assert plan(every(1), None, 10_500) == ([10_000], 10_000, None)
    assert plan(every(60, grace=5), None, 70_000) == ([], 60_000, None)  # 10 s late: it starts at the next


def test_nothing_is_due_until_the_next_tick():
    assert plan(every(1), 10_000, 10_999) == ([], None, None)
    assert plan(every(1), 12_000, 10_500) == ([], None, None)  # stored ahead of this clock


def test_ticks_reached_within_grace_are_each_submitted():
    assert plan(every(1), 7_000, 10_500) == ([8_000, 9_000, 10_000], 10_000, None)


def test_after_downtime_the_missed_ticks_become_one_catch_up_item():
    # the oldest tick not submitted is more than grace old: nobody kept the schedule
    assert plan(every(1, grace=2), 1_000, 10_500) == ([10_000], 10_000, (2_000, 9_000))
    hourly = every("1h")
    now = ms("2026-05-01T12:30:00")
    assert plan(hourly, ms("2026-05-01T07:00:00"), now) == (
        [ms("2026-05-01T12:00:00")], ms("2026-05-01T12:00:00"), (ms("2026-05-01T08:00:00"), ms("2026-05-01T11:00:00")))
    # one tick, late: submitted late with catch_up="latest"
    assert plan(hourly, ms("2026-05-01T11:00:00"), now) == ([ms("2026-05-01T12:00:00")], ms("2026-05-01T12:00:00"), None)


def test_catch_up_none_skips_missed_ticks_but_not_the_one_on_time():
    skip = every(1, grace=0.2, catch_up="none")
    assert plan(skip, 1_000, 10_500) == ([], 10_000, (2_000, 10_000))
    assert plan(every(1, grace=2, catch_up="none"), 1_000, 10_500) == ([10_000], 10_000, (2_000, 9_000))


def test_a_pass_submits_at_most_max_ticks():
    todo = plan(every(1, grace="1d"), 0, 5_000_000)
    assert len(todo.ticks) == MAX_TICKS and todo.ticks[0] == 1_000 and todo.last == MAX_TICKS * 1_000


def test_a_cron_downtime_collapses_to_the_latest_tick():
    p = cron("*/5 * * * *")
    now = ms("2026-05-01T12:07:00")
    assert plan(p, ms("2026-05-01T11:00:00"), now) == (
        [ms("2026-05-01T12:05:00")], ms("2026-05-01T12:05:00"), (ms("2026-05-01T11:05:00"), ms("2026-05-01T12:00:00")))


# -- which worker keeps which schedule --------------------------------------------------------
def test_a_worker_keeps_its_queues_schedules_and_those_no_processor_here_handles(sqlite_url):
    app = conveyor.App(sqlite_url)

    @app.processor("emails")
    def send(item): ...

    @app.processor("reports")
    def report(item): ...

    mine = app.periodic("reports", every=60)
    elsewhere = app.periodic("billing", every=60)  # handled by another program's workers
    assert app.periodics_for(None) == [mine, elsewhere]
    assert app.periodics_for(["reports"]) == [mine, elsewhere]
    assert app.periodics_for(["emails"]) == [elsewhere]
    assert kept_by([mine, elsewhere], {"emails"}, {"emails"}) == [mine, elsewhere]
    assert app.worker(["emails"]).scheduler.periodics == [elsewhere]
    app.periodics.pop(("billing", "billing"))
    assert app.worker(["emails"]).scheduler is None


def test_several_schedules_of_one_queue_are_told_apart_by_name():
    app = conveyor.App("sqlite:///unused.db")
    app.periodic("reports", every="1h", payload={"kind": "hourly"})
    app.periodic("reports", every="1d", payload={"kind": "daily"}, name="daily")
    assert sorted(app.periodics) == [("reports", "daily"), ("reports", "reports")]
    with pytest.raises(UsageError, match="has a periodic schedule named 'daily' already; give this one another name="):
        app.periodic("reports", every="1w", name="daily")


# -- registration errors ----------------------------------------------------------------------
BAD = [
    ({"every": 0}, "every must be a positive interval, not 0"),
    ({"every": -5}, "every must be a positive interval"),
    ({"every": dt.timedelta(0)}, "every must be a positive interval"),
    ({"every": "0s"}, "every must be a positive interval"),
    ({"every": 0.5}, "every must be at least 1 second"),
    ({"every": "often"}, "is not a duration"),
    ({"every": True}, "every must be an interval"),
    ({}, "give either cron= (a cron line) or every= (an interval)"),
    ({"every": 60, "cron": "* * * * *"}, "give either cron= (a cron line) or every= (an interval), not both"),
    ({"every": 60, "payload": {1, 2}}, "payload is not JSON-serialisable"),
    ({"every": 60, "payload": float("nan")}, "payload is not JSON-serialisable"),
    ({"every": 60, "catch_up": "all"}, "catch_up must be 'latest'"),
    ({"every": 60, "grace": 0}, "grace must be a positive duration"),
    ({"every": 60, "offset": 60}, "offset 60 must be shorter than the interval (1m)"),
    ({"every": 60, "offset": -1}, "offset must not be negative"),
    ({"every": 60, "timezone": "Europe/Paris"}, "timezone= applies to cron= only"),
    ({"every": 60, "name": "two words"}, "name 'two words' is invalid"),
    ({"every": 60, "priority": 2**63}, "does not fit in 64 bits"),
    ({"every": 60, "key": ""}, "key must not be empty"),
]
BAD_CRON = [
    ({"cron": "0 0 30 2 *"}, "cron line '0 0 30 2 *' never fires"),
    ({"cron": "0 0 31 4,6,9,11 *"}, "never fires"),
    ({"cron": "61 * * * *"}, "cron line '61 * * * *' is invalid"),
    ({"cron": "every monday"}, "is invalid"),
    ({"cron": ""}, "cron must be a cron line such as '*/5 * * * *'"),
    ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone 'Mars/Olympus' is not a known time zone"),
    ({"cron": "* * * * *", "offset": 5}, "offset= applies to every= only"),
]


@pytest.mark.parametrize(("options", "message"), BAD + BAD_CRON, ids=[m for _, m in BAD + BAD_CRON])
def test_a_bad_setting_fails_at_registration_with_one_clear_error(options, message):
    if "cron" in options:
        _croniter_or_skip()
    app = conveyor.App("sqlite:///unused.db")
    with pytest.raises(UsageError) as caught:
        app.periodic("reports", **options)
    text = str(caught.value)
    assert message in text and text.startswith("periodic for queue 'reports'") and "\n" not in text, text
    assert app.periodics == {}


@pytest.mark.parametrize("queue", ["", "two words", "x" * 201, "tab\there", 7])
def test_a_bad_queue_name_fails_at_registration(queue):
    with pytest.raises(UsageError, match="is invalid: use 1-200 characters"):
        conveyor.App("sqlite:///unused.db").periodic(queue, every=60)


def test_rows_tables_take_no_periodic_items_whichever_is_declared_first():
    app = conveyor.App("sqlite:///unused.db")

    @app.rows("orders", status="s", pending="p", working="w", done="d", dead="x")
    def handle(item): ...

    with pytest.raises(UsageError, match="'orders' is a table processed in place"):
        app.periodic("orders", every=60)
    app.periodic("invoices", every=60)
    with pytest.raises(UsageError, match="rows processed in place cannot take periodic items"):
        app.rows("invoices", status="s", pending="p", working="w", done="d", dead="x")


def test_cron_without_croniter_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "croniter", None)  # `import croniter` raises ImportError
    with pytest.raises(UsageError) as caught:
        conveyor.App("sqlite:///unused.db").periodic("reports", cron="*/5 * * * *")
    assert str(caught.value) == ("periodic for queue 'reports': cron= needs the croniter package: "
                                 "pip install 'conveyor[cron]'")
    conveyor.App("sqlite:///unused.db").periodic("reports", every=300)  # every= needs nothing extra


# -- the store: state and compare-and-set -----------------------------------------------------
def test_advancing_a_schedule_is_a_compare_and_set_with_its_items(store):
    clock, states = store.schedules()
    assert states == [] and abs(clock - store.schedules()[0]) < 5
    item = every(60, name="s").item(60_000)
    assert store.advance_schedule("q", "s", None, 60.0, 120.0, "every 1m", [item]) == [1]
    assert store.advance_schedule("q", "s", None, 60.0, 120.0, "every 1m", [item]) is None  # created by another
    (state,) = store.schedules()[1]
    assert state[:6] == ("q", "s", "every 1m", 60.0, 120.0, 1) and isinstance(state, ScheduleState)
    later = every(60, name="s").item(120_000)
    assert store.advance_schedule("q", "s", 0, 120.0, 180.0, "every 1m", [later]) is None  # a stale version
    assert store.advance_schedule("q", "s", 1, 120.0, 180.0, "every 1m", [later]) == [2]
    assert store.schedules()[1][0][3:6] == (120.0, 180.0, 2)
    # the tick's dedup key stands even if the state were lost: no second item for it
    assert store.advance_schedule("q", "s", 2, 120.0, 180.0, "every 1m", [later]) == [None]
    assert [it.run_at for it in store.list_items("q")] == [dt.datetime.fromtimestamp(t, dt.UTC) for t in (120, 60)]


def scheduler(app: conveyor.App) -> Scheduler:
    return Scheduler(app.store, list(app.periodics.values()), threading.Event(), lambda: None, WorkerLog("test"))


def run_ats(app: conveyor.App, queue: str) -> list[float]:
    return sorted(it.run_at.timestamp() for it in app.items(queue, limit=1000))


def test_a_purged_ticks_item_is_never_submitted_again(app):
    app.periodic("hourly", every="1h", grace="1h")  # a new schedule: its current tick is on time
    keeper = scheduler(app)
    keeper.keep()
    (item,) = app.items("hourly")
    app.cancel(item.id)
    assert app.purge("hourly", 0) == 1
    keeper.keep()
    keeper.keep()
    assert item.dedup_key not in {it.dedup_key for it in app.items("hourly")}
    (state,) = app.schedules()[1]
    assert state.last_tick >= item.run_at.timestamp()


def test_after_downtime_one_catch_up_item_by_the_databases_clock(app):
    p = app.periodic("ticks", every=1)
    clock, _ = app.schedules()
    # the schedule was last kept 100 s ago, and no worker has run since
    app.store.advance_schedule("ticks", "ticks", None, float(int(clock) - 100), float(int(clock) - 99), "every 1s", [])
    keeper = scheduler(app)
    keeper.keep()
    after, (state,) = app.schedules()
    (run_at,) = run_ats(app, "ticks")
    assert int(clock) <= run_at <= int(after) and run_at == state.last_tick and keeper.submitted == 1
    (item,) = app.items("ticks")
    assert item.dedup_key == p.dedup_key(round(run_at * 1000))


def test_catch_up_none_submits_nothing_for_missed_ticks(app):
    app.periodic("ticks", every="1h", catch_up="none", grace=1)
    clock, _ = app.schedules()
    latest = clock // 3600 * 3600
    app.store.advance_schedule("ticks", "ticks", None, latest - 36000, latest - 32400, "every 1h", [])
    if not 2 < clock - latest < 3598:  # the current tick would be on time, or come before the pass
        pytest.skip("ran within two seconds of an hour's tick")
    scheduler(app).keep()
    assert app.items("ticks") == [] and app.schedules()[1][0].last_tick == latest


def test_a_busy_moment_still_gives_one_item_per_tick(app):
    app.periodic("ticks", every=1)
    clock, _ = app.schedules()
    app.store.advance_schedule("ticks", "ticks", None, float(int(clock) - 4), float(int(clock) - 3), "every 1s", [])
    scheduler(app).keep()
    (state,) = app.schedules()[1]
    assert run_ats(app, "ticks") == [float(t) for t in range(int(clock) - 3, int(state.last_tick) + 1)]


def test_a_cron_schedule_submits_its_current_tick(app):
    p = cron("* * * * *", grace="1m")
    app.periodics[(p.queue, p.name)] = p
    scheduler(app).keep()
    after, (state,) = app.schedules()
    (item,) = app.items("q")
    assert item.run_at.timestamp() == after // 60 * 60 or item.run_at.timestamp() == after // 60 * 60 - 60
    assert item.run_at.second == 0 and item.run_at.timestamp() == state.last_tick
    assert item.dedup_key == f"periodic:q:{item.run_at.strftime('%Y-%m-%dT%H:%M:00Z')}"
    assert state.schedule == "cron * * * * *" and state.next_tick == state.last_tick + 60


def test_a_worker_runs_the_ticks_items_and_status_shows_the_schedule(app, tmp_path):
    seen = []
    done = threading.Event()

    @app.processor("ticks")
    def handle(item):
        seen.append(item)
        done.set()

    app.periodic("ticks", every=1, payload={"kind": "summary"})
    worker = app.worker()
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        assert done.wait(10), "no periodic item ran"
    finally:
        worker.stop()
        thread.join(10)
    assert seen[0].payload == {"kind": "summary"} and seen[0].dedup_key.startswith("periodic:ticks:")
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "conveyor", "--db", app.url, "status"], capture_output=True,
                         text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "periodic schedules" in out.stdout and "every 1s" in out.stdout, out.stdout
