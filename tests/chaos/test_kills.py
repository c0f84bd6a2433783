"""Chaos 1: SIGKILL a random worker process every 0.5-1.5 s while three drain the queues; restart it.

The three workers are separate `conveyor worker` processes that this test kills (SIGKILL, no
warning, no cleanup) and restarts itself, so it knows exactly what it killed. Leases are 1 s, so a
killed worker's items are rescued within about a second and a half and run again.
"""

from __future__ import annotations

import random
import time

import pytest

from .harness import Figures

ITEMS = 5000  # as issue 4 asks: half plain handlers, half transactional
WORKERS = 3
DEADLINE = 90.0


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sigkill_random_workers_while_draining(chaos, chaos_results):
    half = ITEMS // 2
    chaos.prepare({"plain": [{"n": i} for i in range(half)], "tx": [{"n": i} for i in range(ITEMS - half)]})
    # a drain of ~8-15 s, room for several kills (on SQLite the transactional work runs inside the
    # write lock, one handler at a time, so less of it per call)
    params = dict(lease=1, batch=20, concurrency=3, work=0.01 if chaos.kind == "postgres" else 0.004)
    rng = random.Random(chaos.seed)
    fig = Figures("1 sigkill", chaos.kind)

    workers = [chaos.worker("--stop-when-empty", **params) for _ in range(WORKERS)]
    next_kill = time.monotonic() + rng.uniform(0.5, 1.5)
    deadline = time.monotonic() + DEADLINE
    while True:
        for p in workers:
            if p.poll() is not None and p.returncode != 0:
                chaos.fail_with(f"worker {p.pid} died by itself with {p.returncode}", p)
        if all(p.poll() is not None for p in workers):
            break  # every worker found the queues empty and stopped
        now = time.monotonic()
        if now > deadline:
            chaos.fail_with(f"not drained within {DEADLINE}s after {fig.kills} kills")
        if now >= next_kill:
            if chaos.has_work():
                n = rng.randrange(WORKERS)
                victim = workers[n]
                if victim.poll() is None:
                    victim.kill()
                    victim.wait()
                    fig.kills += 1
                workers[n] = chaos.worker("--stop-when-empty", **params)  # restart it
            next_kill = now + rng.uniform(0.5, 1.5)
        time.sleep(0.02)

    chaos.verify(fig)
    assert fig.kills >= 3, f"the drain was too quick to kill anything much ({fig.kills} kills)"
    chaos_results(fig)
