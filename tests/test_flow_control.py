"""Flow control, enforced through the store: limits hold across worker processes, on both stores.

The handlers record each start and end (wall-clock ns, one O_APPEND line per event, from every
process) so overlaps and rates are measured from outside conveyor. Workers are real processes
where the issue asks for several; the rest run a worker on a thread of the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

import conveyor
from conveyor.model import Claim

APP_MODULE = textwrap.dedent(
    """
    import os, time
    import conveyor

    LOG = os.environ["T_LOG"]
    _fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _opt(name, cast=str):
        value = os.environ.get(name)
        return None if value in (None, "") else cast(value)

    app = conveyor.App(os.environ["T_URL"])

    @app.processor("jobs", batch_size=int(os.environ.get("T_BATCH", "10")), concurrency=int(os.environ.get("T_CONC", "4")),
                   max_in_progress=_opt("T_MAX", int), key_concurrency=_opt("T_KEYCONC", int),
                   rate_limit=_opt("T_RATE"), key_rate_limit=_opt("T_KEYRATE"))
    def handle(item):
        start = time.time_ns()
        os.write(_fd, f"start {start} {item.id} {item.key} {os.getpid()}\\n".encode())
        backoff = item.payload.get("backoff")
        marker = f"{LOG}.backoff.{item.id}"
        if backoff and not os.path.exists(marker):  # once per item (a Backoff gives its attempt back)
            open(marker, "w").close()
            os.write(_fd, f"backoff {time.time_ns()} {item.id} {item.key} {os.getpid()}\\n".encode())
            raise conveyor.Backoff(backoff, scope="key")
        time.sleep(float(os.environ.get("T_SLEEP", "0")))
        os.write(_fd, f"end {time.time_ns()} {item.id} {item.key} {os.getpid()}\\n".encode())
    """
)


class Run:
    """Worker processes of the module above, and what their handlers logged."""

    def __init__(self, tmp_path: Path, url: str):
        self.tmp = tmp_path
        self.url = url
        self.log = tmp_path / "events.log"
        (tmp_path / "flowapp.py").write_text(APP_MODULE)
        self.procs: list[subprocess.Popen] = []

    def start(self, processes: int = 3, **env: str) -> subprocess.Popen:
        n = len(self.procs)
        with open(self.tmp / f"worker{n}.out", "w") as out, open(self.tmp / f"worker{n}.err", "w") as err:
            p = subprocess.Popen(
                [sys.executable, "-m", "conveyor", "worker", "flowapp:app", "--processes", str(processes)],
                cwd=self.tmp, text=True, stdout=out, stderr=err,
                env={**os.environ, "T_URL": self.url, "T_LOG": str(self.log), "PYTHONPATH": str(self.tmp), **env})
        self.procs.append(p)
        return p

    def wait_started(self, workers: int) -> None:
        """Until `workers` worker processes have said they started (each logs it before its first claim)."""
        def started() -> int:
            assert all(p.poll() is None for p in self.procs), self.output()
            return sum(f.read_text().count(" started on ") for f in self.tmp.glob("worker*.err"))
        wait_until(lambda: started() >= workers, 60, f"{workers} workers started")

    def output(self) -> str:
        return "\n".join(f.read_text() for f in sorted(self.tmp.glob("worker*.*")))

    def events(self, kind: str | None = None) -> list[tuple[str, int, int, str, int]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            k, t, i, key, pid = line.split()
            if kind is None or k == kind:
                out.append((k, int(t), int(i), key, int(pid)))
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def run(tmp_path, store_url):
    app = conveyor.App(store_url)
    app.migrate()
    app.close()
    r = Run(tmp_path, store_url)
    yield r
    r.stop()


def overlap(events: list[tuple], key: str | None = None) -> int:
    """The most handlers running at once (of one key, if given), from start and end events."""
    marks = sorted((t, 1 if k == "start" else -1) for k, t, _, kk, _ in events
                   if k in ("start", "end") and (key is None or kk == key))
    most = now = 0
    for _, d in marks:
        now += d
        most = max(most, now)
    return most


def resolved(url: str, queue: str = "jobs") -> int:
    app = conveyor.App(url)
    try:
        return app.stats([queue])[queue]["resolved"]
    finally:
        app.close()


# -- across processes --------------------------------------------------------------------------

def test_max_in_progress_holds_across_three_processes(run, store_url):
    run.start(3, T_MAX="3", T_CONC="8", T_SLEEP="0.05")
    run.wait_started(3)
    app = conveyor.App(store_url)
    app.submit_many("jobs", [{"n": i} for i in range(60)])
    wait_until(lambda: resolved(store_url) == 60, 120, "60 items resolved")
    events = run.events()
    assert overlap(events) <= 3, overlap(events)
    assert overlap(events) == 3  # the limit allowed three, and the work was there to use them
    app.close()


def test_max_in_progress_slots_go_to_processes_with_hands_free(run, store_url):
    """Under max_in_progress=2 a worker of one handler takes one slot, not both (an item waiting in
    it would hold a slot it cannot run): a worker started later gets the other, and two run at once."""
    app = conveyor.App(store_url)
    app.submit_many("jobs", [{"n": i} for i in range(1000)])
    run.start(1, T_MAX="2", T_CONC="1", T_SLEEP="0.05")
    wait_until(lambda: len(run.events("start")) >= 3, 60, "the first worker's handler to run")
    assert app.stats(["jobs"])["jobs"]["in_progress"] == 1  # its one handler's item, none waiting
    run.start(1, T_MAX="2", T_CONC="1", T_SLEEP="0.05")
    pids = lambda: {pid for *_, pid in run.events("start")}  # noqa: E731
    wait_until(lambda: len(pids()) == 2, 60, "the second worker's handler to run")
    wait_until(lambda: overlap(run.events()) >= 2, 60, "two handlers at once")
    assert overlap(run.events()) == 2
    app.close()


def test_a_limited_worker_claims_ahead_only_half_the_slots_left(store_url):
    """A worker of two threads under max_in_progress=3 takes the two it can start and half of the
    one slot left (none): an item waiting in it would hold a slot another worker could run it in."""
    app = conveyor.App(store_url)
    held: list[int] = []  # items in progress (the database's count) as each handler starts

    @app.processor("jobs", batch_size=10, concurrency=2, max_in_progress=3)
    def handle(item):
        held.append(app.stats(["jobs"])["jobs"]["in_progress"])

    app.submit_many("jobs", [{"n": i} for i in range(30)])
    app.run_worker(stop_when_empty=True)
    assert app.stats(["jobs"])["jobs"]["resolved"] == 30
    assert max(held) == 2, held  # the two it can start (3 before: one claimed ahead)
    app.close()


@pytest.mark.parametrize("transactional", [False, True], ids=["plain", "transactional"])
def test_a_worker_whose_items_fill_the_limit_claims_again_as_it_settles_them(store_url, transactional):
    """max_in_progress=3 under eight threads: each settle (by the cycle, or by a transactional run's
    own commit) frees a slot, and the worker claims again at once, not at its next idle poll (every
    0.5 s: 6 items a second, 50 s for these)."""
    app = conveyor.App(store_url)
    handler = (lambda item, conn: None) if transactional else (lambda item: None)
    app.processor("jobs", batch_size=10, concurrency=8, max_in_progress=3, transactional=transactional)(handler)
    app.submit_many("jobs", [{"n": i} for i in range(300)])
    started = time.monotonic()
    app.run_worker(stop_when_empty=True)
    took = time.monotonic() - started
    assert app.stats(["jobs"])["jobs"]["resolved"] == 300
    assert took < 15, f"300 items took {took:.1f} s"
    app.close()


def test_key_concurrency_holds_across_processes(run, store_url):
    app = conveyor.App(store_url)
    app.submit_many("jobs", [{"n": i} for i in range(40)], key=lambda p: f"k{p['n'] % 2}")
    run.start(3, T_KEYCONC="2", T_CONC="8", T_SLEEP="0.05")
    wait_until(lambda: resolved(store_url) == 40, 120, "40 items resolved")
    events = run.events()
    assert max(overlap(events, "k0"), overlap(events, "k1")) == 2
    app.close()


def test_rate_limit_holds_across_three_processes(run, store_url):
    """20/s for 10 s from 3 processes: no 1-second window holds more than 20 starts, give or take
    the limiter's burst at a window's edge (2 for 20/s), and the mean rate is at least 18/s."""
    app = conveyor.App(store_url)
    app.submit_many("jobs", [{"n": i} for i in range(400)])
    run.start(3, T_RATE="20/s", T_CONC="4")
    wait_until(lambda: len(run.events("start")) >= 1, 60, "the first start")
    first = min(t for _, t, *_ in run.events("start"))
    wait_until(lambda: time.time_ns() >= first + 10_500_000_000, 60, "10.5 s of starts")
    starts = sorted(t for _, t, *_ in run.events("start") if t < first + 10_000_000_000)
    worst = max(sum(1 for u in starts if t <= u < t + 1_000_000_000) for t in starts)
    assert worst <= 22, worst
    assert len(starts) / 10 >= 18, len(starts)
    app.close()


def test_backoff_holds_the_key_on_every_worker_and_spends_no_attempt(run, store_url):
    app = conveyor.App(store_url)
    app.submit("jobs", {"n": 0, "backoff": 2}, key="api-a")
    run.start(2, T_CONC="4")
    # the hold takes effect once the worker has settled the Backoff (its next cycle)
    held = wait_until(lambda: [c for c in app.controls() if c["key"] == "api-a" and c["held_until"]], 60, "the hold")
    until_ns = int(held[0]["held_until"] * 1e9)
    app.submit_many("jobs", [{"n": i} for i in range(1, 6)], key="api-a")
    app.submit_many("jobs", [{"n": i} for i in range(6, 11)], key="api-b")
    wait_until(lambda: resolved(store_url) == 11, 60, "every item resolved")
    a_starts = [t for _, t, i, key, _ in run.events("start") if key == "api-a" and i > 1]
    b_starts = [t for _, t, i, key, _ in run.events("start") if key == "api-b"]
    backed_off = run.events("backoff")[0][1]
    assert until_ns - backed_off >= 1_900_000_000  # held for the 2 s the handler asked
    assert min(a_starts) >= until_ns - 100_000_000  # no item of the key started before (0.1 s of clock slack)
    assert min(b_starts) < until_ns  # other keys kept running meanwhile
    first = app.get(1)
    assert first.state == "resolved" and first.attempts == 1  # the backed-off run gave its attempt back
    app.close()


# -- one worker, on a thread ---------------------------------------------------------------------

def worker_thread(app: conveyor.App, **options: Any) -> tuple[Any, threading.Thread]:
    worker = app.worker(**options)
    t = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True)
    t.start()
    return worker, t


def test_fair_claims_go_round_the_keys(store_url):
    app = conveyor.App(store_url)
    started: list[str] = []
    lock = threading.Lock()

    @app.processor("jobs", fair=True, batch_size=100, concurrency=4)
    def handle(item):
        with lock:
            started.append(item.key)

    app.submit_many("jobs", [{"n": i} for i in range(10_000)], key="A")
    app.submit_many("jobs", [{"n": i} for i in range(10)], key="B")
    app.run_worker(stop_when_empty=True)
    last_b = max(i for i, k in enumerate(started) if k == "B")
    a_before = sum(1 for k in started[:last_b] if k == "A")
    assert a_before < 1000, a_before  # without fair=True, every A (10,000) would start first
    app.close()


def test_a_paused_key_starts_nothing_until_resumed_while_other_keys_run(store_url):
    app = conveyor.App(store_url)
    started: list[tuple[str, int]] = []

    @app.processor("jobs", batch_size=10)
    def handle(item):
        started.append((item.key, item.payload["n"]))

    app.pause("jobs", key="tenant-a")
    app.submit_many("jobs", [{"n": i} for i in range(5)], key="tenant-a")
    app.submit_many("jobs", [{"n": i} for i in range(5)], key="tenant-b")
    worker, t = worker_thread(app)
    try:
        wait_until(lambda: sum(1 for k, _ in started if k == "tenant-b") == 5, what="tenant-b's items")
        # one more claim cycle after tenant-b's: a late item of b runs, a's still do not
        app.submit("jobs", {"n": 99}, key="tenant-b")
        wait_until(lambda: ("tenant-b", 99) in started, what="the late item")
        assert not [k for k, _ in started if k == "tenant-a"]
        stats = app.stats(["jobs"])["jobs"]
        assert stats["paused_keys"] == ["tenant-a"] and stats["pending"] == 5
        assert app.resume("jobs", key="tenant-a") is True
        wait_until(lambda: sum(1 for k, _ in started if k == "tenant-a") == 5, what="tenant-a's items after resume")
    finally:
        worker.stop()
        t.join(30)
    assert app.resume("jobs", key="tenant-a") is False
    app.close()


def test_a_paused_queue_starts_nothing_and_status_says_so(store_url, tmp_path):
    app = conveyor.App(store_url)
    done = threading.Event()
    app.processor("jobs")(lambda item: done.set())
    app.submit("jobs", {"n": 1})
    cli = [sys.executable, "-m", "conveyor", "--db", store_url]
    out = subprocess.run([*cli, "pause", "jobs"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "paused 'jobs'" in out.stdout, out.stderr
    worker, t = worker_thread(app)
    try:
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=60)
        assert "jobs: paused" in status.stdout, status.stdout
        assert app.stats(["jobs"])["jobs"]["paused"] is True
        assert not done.is_set()
        out = subprocess.run([*cli, "resume", "jobs"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "resumed 'jobs'" in out.stdout, out.stderr
        assert done.wait(30)
    finally:
        worker.stop()
        t.join(30)
    app.close()


def test_status_with_the_app_names_each_queues_limits(run, store_url):
    """The limits live in the app's code: `conveyor status MODULE:APP` shows them (the run
    fixture's module declares max_in_progress and rate_limit from its environment)."""
    app = conveyor.App(store_url)
    app.submit("jobs", {"n": 1})
    app.close()
    env = {**os.environ, "T_URL": store_url, "T_LOG": str(run.log), "PYTHONPATH": str(run.tmp), "T_MAX": "7",
           "T_RATE": "30/m", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "conveyor", "status", "flowapp:app"], cwd=run.tmp, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "jobs: limited: max_in_progress=7, rate_limit=30/m" in out.stdout, out.stdout


def test_key_rate_limit_paces_each_key(store_url):
    app = conveyor.App(store_url)
    starts: dict[str, list[float]] = {"a": [], "b": []}

    @app.processor("jobs", key_rate_limit="5/s", batch_size=20)
    def handle(item):
        starts[item.key].append(time.monotonic())

    app.submit_many("jobs", [{"n": i} for i in range(8)], key="a")
    app.submit_many("jobs", [{"n": i} for i in range(8)], key="b")
    app.run_worker(stop_when_empty=True)
    for key, ts in starts.items():
        assert len(ts) == 8
        # 5/s, burst 1: one start per 0.2 s, so 8 starts span at least 1.4 s (0.1 s of slack)
        assert ts[-1] - ts[0] >= 1.3, (key, ts[-1] - ts[0])
    # the two keys ran side by side, not one after the other
    assert starts["b"][0] < starts["a"][-1]
    app.close()


@pytest.mark.parametrize("options, message", [
    (dict(rate_limit="50/q"), "rate_limit must be a count per second, minute or hour"),
    (dict(key_rate_limit="0/s"), "key_rate_limit must be a count"),
    (dict(max_in_progress=0), "max_in_progress must be an integer >= 1"),
    (dict(key_concurrency=0), "key_concurrency must be an integer >= 1"),
    (dict(ordered=True, key_concurrency=2), "ordered=True runs one item of a key at a time"),
    (dict(ordered=True, fair=True), "fair=True with ordered=True"),
    (dict(fair="yes"), "fair must be True or False"),
])
def test_bad_flow_control_settings_fail_at_registration(options, message):
    app = conveyor.App("sqlite:///unused.db")
    with pytest.raises(conveyor.UsageError, match=message):
        app.processor("jobs", **options)
    assert app.processors == {}


def test_backoff_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must be 'key' or 'queue'"):
        conveyor.Backoff(1, scope="tenant")
    with pytest.raises(ValueError, match="number of seconds"):
        conveyor.Backoff(-1)


def test_why_an_item_is_not_running(store_url):
    import datetime as dt

    app = conveyor.App(store_url)
    app.processor("jobs", ordered=True, max_in_progress=1)(lambda item: None)
    first = app.submit("jobs", {"n": 1}, key="k")
    second = app.submit("jobs", {"n": 2}, key="k")
    later = app.submit("jobs", {"n": 3}, run_at=dt.timedelta(hours=1))
    assert "waiting for a worker: 3 item(s)" in app.why(first)
    assert f"held by its key's order: item {first} of key 'k' is pending before it" in app.why(second)
    assert "scheduled: its run_at comes in" in app.why(later)
    app.pause("jobs", key="k")
    assert "paused: its key 'k' is paused (conveyor resume jobs --key k)" in app.why(first)
    app.resume("jobs", key="k")
    # a claimed item fills max_in_progress=1: the next is limited
    claimed = app.store.claim(Claim("jobs", 1, 30.0, 5), "test")
    assert [it.id for it in claimed] == [first]
    assert "limited: max_in_progress=1 items of its queue are running" in app.why(later)
    assert app.why(first) is None  # running, not waiting
    out = subprocess.run([sys.executable, "-m", "conveyor", "--db", store_url, "show", str(later)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "waiting:" in out.stdout and "scheduled" in out.stdout, out.stdout + out.stderr
    app.close()


def test_an_item_submitted_this_millisecond_is_due_not_scheduled(store_url):
    """run_at comes back through a datetime (microseconds) from a clock of milliseconds (SQLite):
    an item asked about right after its submit is waiting for a worker, never 'scheduled'."""
    app = conveyor.App(store_url)
    app.processor("jobs")(lambda item: None)
    answers = {app.why(app.submit("jobs", {"n": n})).split(":")[0] for n in range(200)}
    assert answers == {"waiting for a worker"}, answers
    app.close()
