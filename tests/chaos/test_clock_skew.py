"""Chaos 4: leases are judged by the database's clock, never a worker's.

Workers run with Python's wall clock shifted by an hour (harness.SKEW_MODULE wraps the CLI and
replaces time.time; libfaketime would do the same from outside, but it is not installed in CI).
- A worker an hour AHEAD must not see its peers' live leases as expired (no early rescue), and a
  worker an hour BEHIND must not write leases its peers see as expired.
- A worker an hour ahead that is SIGKILLed must not leave its items stranded for an hour: its
  leases run out on the database's clock, a normal peer rescues them a second or two later.

PostgreSQL computes every lease time with statement_timestamp(); SQLite with julianday('now'),
SQLite's own clock (it asks the OS through its VFS), never the process's time.time(). A shift of
the OS clock itself (libfaketime) would move SQLite's clock too: for an embedded database the host's
clock is the database's clock, and every process on the host shares it.
"""

from __future__ import annotations

import collections
import time

import pytest
from waiting import wait_until

import conveyor
from conveyor.model import Claim

from .harness import Figures

SKEW = 3600.0


def _wait(predicate, timeout: float) -> bool:
    try:
        return bool(wait_until(predicate, timeout, interval=0.05))
    except AssertionError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_skewed_workers_neither_rescue_early_nor_get_rescued_early(chaos, chaos_results):
    n, held = 24, 8
    chaos.prepare({"plain": [{"n": i} for i in range(n)]})
    fig = Figures("4a clock skew", chaos.kind)
    # a live peer with a normal clock holds some items on a 30 s lease (the test plays it)
    app = conveyor.App(chaos.url)
    try:
        peer = app.store.claim(Claim("plain", limit=held, lease_seconds=30, max_attempts=5), "peer")
        assert len(peer) == held
        # 2 s leases, a heartbeat every 2/3 s: a worker's own items stay its own even when a busy
        # machine delays a heartbeat by a second (an hour's skew, the thing tested, dwarfs both)
        ahead = chaos.worker(skew=SKEW, lease=2, batch=2, concurrency=2, work=0.25)
        behind = chaos.worker(skew=-SKEW, lease=2, batch=2, concurrency=2, work=0.25)
        if not _wait(lambda: chaos.states().get("resolved", 0) >= n - held, 60):
            chaos.fail_with("the skewed workers did not handle their items")
        time.sleep(1.5)  # more rescue passes (every 1 s) by each skewed worker: a window for a wrong one
        for p in (ahead, behind):
            p.terminate()
        chaos.wait_all([ahead, behind], 30)

        rows = {r[0]: r[1:] for r in chaos.sql("SELECT id, state, attempts, lease_owner, claim_token FROM conveyor_items")}
        calls = collections.Counter(e.item for e in chaos.events() if e.kind == "call")
        fig.items, fig.calls = n, sum(calls.values())
        fig.reruns = fig.calls - (n - held)
        fig.resolved = sum(1 for r in rows.values() if r[0] == "resolved")
        fig.seconds = time.monotonic() - chaos.t0
        fig.extra["peer_items_rescued"] = sum(1 for it in peer if rows[it.id][2] != "peer")
        fig.extra["runs_rescued_early"] = sum(1 for i, r in rows.items() if r[1] > 1)
        chaos_results(fig)
        # the peer still holds its items: nobody rescued them, nobody ran them
        for it in peer:
            assert rows[it.id][:4] == ("in_progress", 1, "peer", it.claim_token), (it.id, rows[it.id])
            assert calls[it.id] == 0, f"item {it.id} of a live peer was run by a skewed worker"
        # the skewed workers' own items: each run once, on attempt 1 (none rescued from under them)
        others = set(rows) - {it.id for it in peer}
        assert {i: (rows[i][0], rows[i][1], calls[i]) for i in others} == {i: ("resolved", 1, 1) for i in others}
        assert app.store.resolve([(it.id, it.claim_token) for it in peer]) == []
    finally:
        app.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_killed_skewed_worker_is_rescued_on_the_database_clock(chaos, chaos_results):
    n = 6
    chaos.prepare({"plain": [{"n": i} for i in range(n)]})
    fig = Figures("4b clock skew", chaos.kind)
    ahead = chaos.worker(skew=SKEW, lease=1, batch=n, concurrency=n, work=60)  # hangs on every item
    if not _wait(lambda: len(chaos.events()) >= n, 40):
        chaos.fail_with("the skewed worker did not start its items", ahead)
    now = "statement_timestamp()" if chaos.kind == "postgres" else None
    if now:
        left = chaos.sql(f"SELECT max(extract(epoch FROM lease_expires_at - {now})) FROM conveyor_items")[0][0]
    else:
        left = chaos.sql("SELECT max(lease_expires_at) FROM conveyor_items")[0][0] - time.time()
    fig.extra["lease_left_s"] = round(float(left), 1)
    ahead.kill()
    ahead.wait()
    fig.kills = 1
    t0 = time.monotonic()
    # rescued on the database's clock: a second after the kill (plus the new worker's start), far
    # short of the hour a lease written on the skewed clock would run
    normal = chaos.worker("--stop-when-empty", lease=1)
    finished = _wait(lambda: normal.poll() is not None, 40)
    fig.extra["rescued_after_s"] = round(time.monotonic() - t0, 1) if finished else "never (>40s)"
    fig.items, fig.seconds = n, time.monotonic() - chaos.t0
    fig.calls = sum(1 for e in chaos.events() if e.kind == "call")
    fig.reruns = fig.calls - n
    fig.resolved = chaos.states().get("resolved", 0)
    chaos_results(fig)
    assert float(left) < 5, f"the skewed worker's lease runs {left:.0f}s: written with its own clock"
    assert finished, "the killed skewed worker's items were not rescued within 40 s"
    assert normal.returncode == 0, chaos.output(normal)
    rows = chaos.sql("SELECT state, attempts, last_error FROM conveyor_items")
    assert all(r[0] == "resolved" and r[1] == 2 and "lease expired" in r[2] for r in rows), rows
