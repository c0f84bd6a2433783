"""Chaos 2: the database misbehaves while three worker processes (under the supervisor) drain.

Faults come every 0.3-0.6 s for the first three, then every 0.5-1.2 s:
- PostgreSQL: a random share of the workers' connections (application_name 'conveyor' on the test
  database; never the test's own) is killed with pg_terminate_backend: in the middle of claims,
  settles, heartbeats, LISTEN waits and transactional handlers.
- SQLite: another connection takes the write lock (BEGIN IMMEDIATE) and sits on it for 1-2 s,
  longer than the 1 s lease: every writer in every process waits, heartbeats stall, leases run
  out. The first three and every other one after queue on conveyor's lock file first, as a hung
  conveyor writer would; the rest come as a foreign program that polls SQLite's lock.

No worker process may die of it, and the verdict is the same as ever: every item resolved, each
transactional effect exactly once.
"""

from __future__ import annotations

import random
import re
import time

import pytest

from .harness import Figures, pg_terminate, sqlite_hold_lock

ITEMS = 4000
DEADLINE = 90.0


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_database_trouble_while_draining(chaos, chaos_results):
    half = ITEMS // 2
    chaos.prepare({"plain": [{"n": i} for i in range(half)], "tx": [{"n": i} for i in range(ITEMS - half)]})
    rng = random.Random(chaos.seed)
    fig = Figures("2 db trouble", chaos.kind)
    sup = chaos.worker("--processes", "3", "--stop-when-empty", lease=1, batch=20, concurrency=2,
                       work=0.006 if chaos.kind == "postgres" else 0.002)

    deadline = time.monotonic() + DEADLINE
    next_fault = time.monotonic() + rng.uniform(0.3, 0.6)
    terminated = 0
    while sup.poll() is None:
        now = time.monotonic()
        if now > deadline:
            chaos.fail_with(f"not drained within {DEADLINE}s after {fig.db_faults} faults", sup)
        if now >= next_fault and chaos.has_work():
            if chaos.kind == "postgres":
                killed = pg_terminate(chaos, rng)
                if killed:
                    fig.db_faults += 1
                    terminated += killed
            else:
                hold = rng.uniform(1.0, 2.0)
                # the first three queue as a conveyor writer would (promptly in), then every other
                # one is a foreign program that polls for the lock and may wait for a gap
                sqlite_hold_lock(chaos, hold, queued=fig.db_faults < 3 or fig.db_faults % 2 == 0)
                fig.db_faults += 1
                fig.db_fault_seconds += hold
            # the first three come quickly, whatever the drain's speed (on SQLite progress is
            # made only between holds, so three faults land before the work runs out)
            gap = rng.uniform(0.3, 0.6) if fig.db_faults < 3 else rng.uniform(0.5, 1.2)
            next_fault = time.monotonic() + gap
        time.sleep(0.02)
    if sup.returncode != 0:
        chaos.fail_with(f"supervisor exited with {sup.returncode}", sup)

    out = chaos.output(sup, tail=10**7)
    fig.crashes = len(re.findall(r"exited with code", out))
    assert fig.crashes == 0, f"worker processes died of database trouble:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    chaos.verify(fig)
    if chaos.kind == "postgres":
        fig.extra["connections_terminated"] = terminated
    else:
        fig.extra["lock_held_seconds"] = round(fig.db_fault_seconds, 1)
    assert fig.db_faults >= 3, f"the drain was too quick to hurt ({fig.db_faults} faults)"
    chaos_results(fig)
