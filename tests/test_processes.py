"""Multi-process guarantees, with real worker processes on a real database, nothing mocked.

Every worker here is a separate OS process (`python -m conveyor worker ...` or a small script), so
what is tested is what users run: claims racing across processes, SIGKILL, SIGTERM, SIGINT, a
crashing child under the supervisor. Each handler call is recorded OUTSIDE conveyor (one
O_APPEND write of "item_id pid" per call to a log file), so "handled exactly once" is checked
against an independent witness, and resolution is checked through the store.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from waiting import wait_until

import conveyor
from conveyor.model import Claim

# The app the worker processes import. Its behaviour comes from environment variables so that one
# module serves every test: the lease, batch size, concurrency, a per-item sleep, an item that
# crashes its process on its first attempt, a file whose appearance a handler waits for (HOLD:
# the test says when a handler may return, instead of betting on a sleep), and a number of
# processes that must have started handling before any goes on (SHARE: the work is certainly
# shared, however late the machine starts a process).
APP_MODULE = textwrap.dedent(
    """
    import os, time
    import conveyor

    LOG = os.environ["T_LOG"]
    SLEEP = float(os.environ.get("T_SLEEP", "0"))
    CRASH_ITEM = int(os.environ.get("T_CRASH_ITEM", "0"))
    HOLD = os.environ.get("T_HOLD")
    HOLD_AFTER = int(os.environ.get("T_HOLD_AFTER", "0"))  # calls in this process that do not hold
    SHARE = int(os.environ.get("T_SHARE", "0"))
    _fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _shared, _calls = [], []

    def _wait(ready, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _pids():
        with open(LOG) as f:
            return {line.split()[1] for line in f}

    app = conveyor.App()

    @app.processor(
        "jobs",
        batch_size=int(os.environ.get("T_BATCH", "100")),
        concurrency=int(os.environ.get("T_CONCURRENCY", "4")),
        lease_seconds=float(os.environ.get("T_LEASE", "30")),
    )
    def handle(item):
        os.write(_fd, f"{item.id} {os.getpid()}\\n".encode())
        if item.id == CRASH_ITEM and item.attempts == 1:
            os._exit(3)
        if SHARE and not _shared:
            _wait(lambda: len(_pids()) >= SHARE)
            _shared.append(True)
        _calls.append(item.id)
        if HOLD and len(_calls) > HOLD_AFTER:
            _wait(lambda: os.path.exists(HOLD), timeout=120)
        if SLEEP:
            time.sleep(SLEEP)
    """
)

POLL = 0.05


class Env:
    """A temporary directory holding the app module and the handler-call log."""

    def __init__(self, tmp_path: Path, url: str):
        self.dir = tmp_path
        self.url = url
        self.log = tmp_path / "calls.log"
        self.log.touch()
        (tmp_path / "procapp.py").write_text(APP_MODULE)
        self.procs: list[subprocess.Popen] = []

    def env(self, **params: object) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("CONVEYOR_DATABASE_URL", None)
        env["PYTHONPATH"] = os.pathsep.join([str(self.dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["T_LOG"] = str(self.log)
        for k, v in params.items():
            env[f"T_{k.upper()}"] = str(v)
        return env

    def worker(self, *args: str, log_level: str = "warning", stderr_to: Path | None = None,
               **params: object) -> subprocess.Popen:
        """`conveyor worker procapp:app ARGS`; its stderr piped, or written to `stderr_to` (a file
        the test can read while the worker runs)."""
        cmd = [sys.executable, "-m", "conveyor", "--db", self.url, "--log-level", log_level,
               "worker", "procapp:app", *args]
        err = open(stderr_to, "w") if stderr_to else subprocess.PIPE  # noqa: SIM115 - closed below
        try:
            p = subprocess.Popen(cmd, cwd=self.dir, env=self.env(**params),
                                 stdout=subprocess.PIPE, stderr=err, text=True)
        finally:
            if stderr_to:
                err.close()
        self.procs.append(p)
        return p

    def hold(self) -> Path:
        """A file for HOLD: handlers wait until it exists (`release()` creates it)."""
        return self.dir / "hold"

    def release(self) -> None:
        self.hold().touch()

    def script(self, code: str, **params: object) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=self.dir, env=self.env(**params),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def calls(self) -> list[tuple[int, int]]:
        """(item id, pid) of every handler call so far."""
        out = []
        for line in self.log.read_text().splitlines():
            item_id, pid = line.split()
            out.append((int(item_id), int(pid)))
        return out

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except Exception:  # noqa: BLE001
                pass


@pytest.fixture
def env(tmp_path, store_url):
    e = Env(tmp_path, store_url)
    yield e
    e.cleanup()


@pytest.fixture
def app(store_url):
    a = conveyor.App(store_url)
    a.migrate()
    yield a
    a.close()


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll `predicate` every 50 ms until it returns something truthy; fail after `timeout` s
    (or at once if `proc` exited meanwhile)."""

    def ready():
        value = predicate()
        if not value and proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited with {proc.returncode} while waiting for {what}\n{out}\n{(err or '')[-3000:]}")
        return value

    return wait_until(ready, timeout, what, interval=POLL)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"process did not exit within {timeout}s\n{(err or '')[-3000:]}")
    return out, err


def jobs(app: conveyor.App) -> dict:
    return app.stats(["jobs"])["jobs"]


def submit(app: conveyor.App, n: int) -> list[int]:
    assert app.submit_many("jobs", [{"n": i} for i in range(n)]) == n
    # ids of this test's items (SQLite and a freshly truncated PostgreSQL both start at 1)
    ids = sorted(range(1, n + 1))
    assert app.get(ids[0]).queue == "jobs" and app.get(ids[-1]).queue == "jobs"
    return ids


# -- 1. exactly once across processes ----------------------------------------------------------
@pytest.mark.slow
def test_four_processes_drain_5000_items_each_handled_exactly_once(env, app):
    n = 5000
    ids = submit(app, n)
    # each process's first handler waits until two processes handle items: however late the
    # machine starts the others, the first cannot drain the queue alone
    p = env.worker("--processes", "4", "--stop-when-empty", batch=50, concurrency=4, share=2)
    out, err = finish(p, timeout=120)
    assert p.returncode == 0, err[-3000:]

    calls = env.calls()
    counted = collections.Counter(i for i, _ in calls)
    twice = {i: c for i, c in counted.items() if c != 1}
    assert not twice, f"items handled more than once: {list(twice.items())[:10]}"
    assert sorted(counted) == ids
    pids = {pid for _, pid in calls}
    assert len(pids) >= 2, f"expected several worker processes to share the work, got pids {pids}"
    s = jobs(app)
    assert (s["resolved"], s["pending"], s["in_progress"], s["dead"]) == (n, 0, 0, 0)


# -- 2. SIGKILL loses nothing ------------------------------------------------------------------
@pytest.mark.slow
def test_sigkilled_worker_loses_nothing(env, app):
    n = 200  # 10 s of work for the first worker: it is killed long before it could finish
    ids = submit(app, n)
    first = env.worker(batch=10, concurrency=2, lease=1.0, sleep=0.1)
    # wait until items are in flight and some were handled, then kill without warning
    wait_for(lambda: jobs(app)["in_progress"] > 0 and len(env.calls()) >= 3, 60, "items in progress", first)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert first.returncode == -signal.SIGKILL

    before = {i: app.get(i) for i in ids}
    stranded = {i for i, it in before.items() if it.state == conveyor.State.IN_PROGRESS}
    done_before = {i for i, it in before.items() if it.state == conveyor.State.RESOLVED}
    assert stranded, "the kill should have left items in progress"
    assert all(before[i].attempts == 1 for i in stranded)
    calls_before = env.calls()

    second = env.worker("--stop-when-empty", batch=10, concurrency=2, lease=1.0)
    _, err = finish(second, timeout=60)
    assert second.returncode == 0, err[-3000:]

    after = {i: app.get(i) for i in ids}
    assert all(it.state == conveyor.State.RESOLVED for it in after.values()), \
        {i: str(it.state) for i, it in after.items() if it.state != conveyor.State.RESOLVED}
    for i in stranded:  # rescued after the lease expired, handled again on attempt 2
        assert after[i].attempts == 2, (i, after[i].attempts)
        assert "lease expired" in (after[i].last_error or ""), after[i].last_error
    for i in set(ids) - stranded:
        assert after[i].attempts == 1, (i, after[i].attempts, after[i].last_error)
    for i in done_before:  # resolved once: the store's resolution was not repeated
        assert after[i].finished_at == before[i].finished_at

    killed_pid = first.pid
    later = env.calls()[len(calls_before):]
    assert {pid for _, pid in later} == {second.pid}
    handled_by_second = collections.Counter(i for i, _ in later)
    assert all(c == 1 for c in handled_by_second.values()), handled_by_second
    # the second worker handled exactly what the first had not resolved
    assert set(handled_by_second) == set(ids) - done_before
    # items called twice overall are only those stranded by the kill
    counted = collections.Counter(i for i, _ in env.calls())
    assert {i for i, c in counted.items() if c > 1} <= stranded
    assert {pid for i, pid in calls_before} == {killed_pid}


# -- 3. a stale claim token cannot resolve ------------------------------------------------------
def _expire_and_rescue(store, item_id: int, timeout: float = 30) -> None:
    def rescued():
        return any(i == item_id for i, _ in store.rescue_expired())
    wait_for(rescued, timeout, f"lease of item {item_id} to expire and be rescued")


def test_stale_claim_token_is_refused_store_level(app):
    store = app.store
    (item_id,) = submit(app, 1)
    claim = Claim("jobs", limit=5, lease_seconds=0.2, max_attempts=5)
    (a,) = store.claim(claim, "worker-A")
    assert a.id == item_id and a.attempts == 1
    _expire_and_rescue(store, item_id)
    assert "lease expired" in app.get(item_id).last_error
    (b,) = store.claim(Claim("jobs", limit=5, lease_seconds=30, max_attempts=5), "worker-B")
    assert b.id == item_id and b.attempts == 2 and b.claim_token != a.claim_token

    # A's late result is refused by every settling call; B still holds the item
    assert store.resolve([(item_id, a.claim_token)]) == [item_id]
    assert store.retry([(item_id, a.claim_token, 0.0, "late")]) == [item_id]
    assert store.fail([(item_id, a.claim_token, "late")]) == [item_id]
    assert store.release([(item_id, a.claim_token)]) == [item_id]
    assert store.extend_leases([(item_id, a.claim_token)], 30) == [item_id]
    it = app.get(item_id)
    assert it.state == conveyor.State.IN_PROGRESS and it.lease_owner == "worker-B"

    assert store.resolve([(item_id, b.claim_token)]) == []
    assert app.get(item_id).state == conveyor.State.RESOLVED
    # and once resolved, even the right token cannot settle it again
    assert store.resolve([(item_id, b.claim_token)]) == [item_id]


STALE_CLAIMER = """
    import json, sys
    from conveyor.model import Claim
    from conveyor.stores import open_store

    store = open_store(__import__("os").environ["T_URL"])
    (a,) = store.claim(Claim("jobs", limit=1, lease_seconds=0.3, max_attempts=5), "process-A")
    print(json.dumps([a.id, a.claim_token]), flush=True)
    sys.stdin.readline()  # the test tells us when B holds the item
    print(json.dumps(store.resolve([(a.id, a.claim_token)])), flush=True)
"""


def test_stale_claim_token_is_refused_across_processes(env, app):
    """Worker A (its own process and store) claims; its lease expires; B (this process) claims
    and resolves; A's late resolve is refused."""
    import json

    (item_id,) = submit(app, 1)
    a_proc = env.script(STALE_CLAIMER, url=env.url)
    line = wait_for(lambda: a_proc.stdout.readline(), 60, "process A's claim", a_proc)
    a_id, a_token = json.loads(line)
    assert a_id == item_id
    _expire_and_rescue(app.store, item_id)
    (b,) = app.store.claim(Claim("jobs", limit=1, lease_seconds=30, max_attempts=5), "process-B")
    assert b.id == item_id
    a_proc.stdin.write("go\n")
    a_proc.stdin.flush()
    out, err = finish(a_proc, 60)
    assert a_proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == [item_id]  # refused: lost
    assert app.get(item_id).state == conveyor.State.IN_PROGRESS
    assert app.store.resolve([(item_id, b.claim_token)]) == []
    it = app.get(item_id)
    assert it.state == conveyor.State.RESOLVED and it.attempts == 2


SILENT_WORKER = """
    import json, os, sys
    sys.path.insert(0, os.getcwd())
    import threading, time
    import procapp

    procapp.app.url = os.environ["T_URL"]
    # this worker never heartbeats nor rescues: its lease runs out under the handler
    w = procapp.app.worker(stop_when_empty=True, heartbeat_interval=3600.0, rescue_interval=3600.0,
                           shutdown_timeout=600.0)

    def stop_once_the_handler_runs():  # it claims nothing more while its one item runs
        # the handler's start, not the claim: a stop between the two would release the item unstarted
        while not procapp._calls:
            time.sleep(0.005)
        w.stop()

    threading.Thread(target=stop_once_the_handler_runs, daemon=True).start()
    print(json.dumps(w.run(install_signal_handlers=False)), flush=True)
"""


@pytest.mark.slow
def test_handler_outliving_its_lease_cannot_resolve_end_to_end(env, app):
    """A worker whose heartbeat is off handles an item for longer than its lease; a second
    worker rescues and resolves it; the first one's late result is refused and counted lost."""
    import json

    (item_id,) = submit(app, 1)
    # the slow handler returns only once the rescuer is done, however long that takes to start
    slow = env.script(SILENT_WORKER, url=env.url, lease=0.5, hold=env.hold(), concurrency=1, batch=1)
    wait_for(lambda: len(env.calls()) == 1, 30, "the slow handler to start", slow)
    rescuer = env.worker("--stop-when-empty", lease=0.5, concurrency=1, batch=1)
    _, err = finish(rescuer, 60)
    assert rescuer.returncode == 0, err[-3000:]
    resolved_by_b = app.get(item_id)
    assert resolved_by_b.state == conveyor.State.RESOLVED and resolved_by_b.attempts == 2
    assert "lease expired" in resolved_by_b.last_error

    env.release()
    out, err = finish(slow, 60)
    assert slow.returncode == 0, err[-3000:]
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["lost"] == 1 and counts["resolved"] == 0, counts
    it = app.get(item_id)
    assert it.state == conveyor.State.RESOLVED and it.finished_at == resolved_by_b.finished_at
    assert sorted(pid for _, pid in env.calls()) == sorted([slow.pid, rescuer.pid])


# -- 4. SIGTERM gives back what has not started -------------------------------------------------
@pytest.mark.slow
def test_sigterm_releases_unstarted_items_and_finishes_running_ones(env, app):
    n = 40
    ids = submit(app, n)
    # one handler thread: two items run through, the third holds until released below, and the
    # batch's other 17 wait their turn; the signal comes while the third runs
    p = env.worker("--shutdown-timeout", "60", batch=20, concurrency=1, hold=env.hold(), hold_after=2)
    wait_for(lambda: len(env.calls()) == 3, 30, "two items handled and a third running", p)
    p.send_signal(signal.SIGTERM)
    # the unstarted items go back at once, while the running one still runs
    wait_for(lambda: jobs(app)["in_progress"] == 1, 30, "the unstarted items to be released", p)
    env.release()
    _, err = finish(p, 60)
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err

    called = collections.Counter(i for i, _ in env.calls())
    assert len(called) == 3 and all(c == 1 for c in called.values()), called
    s = jobs(app)
    assert s["in_progress"] == 0, s
    assert s["resolved"] == len(called), (s, sorted(called))
    for i in ids:
        it = app.get(i)
        if i in called:  # started before the signal: finished and resolved
            assert it.state == conveyor.State.RESOLVED and it.attempts == 1, (i, it)
        else:  # claimed or not, never started: pending, no attempt spent
            assert it.state == conveyor.State.PENDING and it.attempts == 0, (i, it)
            assert it.lease_owner is None
    assert s["pending"] == n - len(called)


@pytest.mark.slow
def test_second_sigterm_stops_at_once_and_the_running_item_is_retried(env, app):
    (item,) = submit(app, 1)
    log = env.dir / "worker.err"
    # the handler holds (for two minutes, longer than this test may take) until released, which
    # never happens here
    p = env.worker("--shutdown-timeout", "120", log_level="info", stderr_to=log, batch=1, concurrency=1,
                   lease=1.0, hold=env.hold())
    wait_for(lambda: len(env.calls()) >= 1, 30, "the item running", p)
    p.send_signal(signal.SIGTERM)  # graceful: would wait up to 120 s for the handler
    wait_for(lambda: "signal SIGTERM: finishing in-flight work" in log.read_text(), 30, "the first signal to be taken", p)
    # after the first signal the worker goes on: it still heartbeats the running item's lease
    taken = app.get(item).lease_expires_at

    def heartbeat_since():
        now = app.get(item)
        return now.state == conveyor.State.IN_PROGRESS and taken is not None and now.lease_expires_at > taken

    wait_for(heartbeat_since, 30,
             "a heartbeat after the first signal (the first signal must not stop a worker with a handler running)", p)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)  # the second: stop now
    finish(p, 60)
    took = time.monotonic() - t0
    err = log.read_text()
    assert p.returncode == 0, err[-3000:]
    assert took < 30, f"a second signal must stop the worker at once, not after the handler ({took:.1f}s)"
    assert "Traceback" not in err, err[-3000:]
    it = app.get(item)
    # given up on, not lost: back to pending for a retry, its attempt counted, the reason kept
    assert it.state == conveyor.State.PENDING and it.attempts == 1, it
    assert "shut down" in (it.last_error or ""), it.last_error


# -- 5. the supervisor restarts a crashed child -------------------------------------------------
@pytest.mark.slow
def test_supervisor_restarts_a_crashed_child(env, app):
    n = 60
    ids = submit(app, n)
    crash = ids[7]
    p = env.worker("--processes", "2", "--stop-when-empty", batch=5, concurrency=2, lease=1.0,
                   sleep=0.01, crash_item=crash)
    _, err = finish(p, 90)
    assert p.returncode == 0, err[-3000:]
    assert "exited with code 3" in err, err[-3000:]

    s = jobs(app)
    assert (s["resolved"], s["pending"], s["in_progress"], s["dead"]) == (n, 0, 0, 0), s
    it = app.get(crash)
    assert it.attempts == 2 and "lease expired" in it.last_error, (it.attempts, it.last_error)
    calls = [(i, pid) for i, pid in env.calls() if i == crash]
    assert len(calls) == 2 and calls[0][1] != calls[1][1], calls
    called = collections.Counter(i for i, _ in env.calls())
    assert sorted(called) == ids
    # only items that were in the crashed child's hands ran twice, and each on attempt 2
    for i, c in called.items():
        if c > 1:
            assert c == 2 and app.get(i).attempts == 2, (i, c, app.get(i).attempts)


# -- 6. SIGINT to the supervisor ----------------------------------------------------------------
@pytest.mark.slow
def test_sigint_to_supervisor_stops_children_gracefully(env, app):
    n = 1000  # 10 s of work for the two: the signal comes long before they could finish
    ids = submit(app, n)
    p = env.worker("--processes", "2", "--shutdown-timeout", "10", batch=10, concurrency=2, sleep=0.05)
    both_busy = lambda: jobs(app)["in_progress"] > 0 and len({pid for _, pid in env.calls()}) == 2  # noqa: E731
    wait_for(both_busy, 60, "both worker processes to handle items", p)
    p.send_signal(signal.SIGINT)
    _, err = finish(p, 60)
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]

    s = jobs(app)
    assert s["in_progress"] == 0, s
    called = collections.Counter(i for i, _ in env.calls())
    assert all(c == 1 for c in called.values())
    assert s["resolved"] == len(called) and s["pending"] == n - len(called) > 0, (s, len(called))
    pending = [i for i in ids if i not in called]
    assert all(app.get(i).attempts == 0 for i in pending[:50] + pending[-50:])
    assert len({pid for _, pid in env.calls()}) == 2
