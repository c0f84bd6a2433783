"""Chaos 3: handlers that raise at random, hang past their timeout, or exit their process.

Three queues, one each of a sync, an async and a transactional handler, drained by three worker
processes under the supervisor (which restarts the ones that die):
- 10% of calls raise (retried with backoff; max_attempts 8 makes a death by bad luck negligible);
- 1% of first attempts hang past timeout_seconds (async: cancelled; sync: the thread abandoned,
  its late result dropped; transactional: its writes rolled back);
- 0.4% of first attempts call os._exit() (the process dies with everything it held).
Every item must end resolved, each transactional effect exactly once.

Poison items (an item that exits its process on EVERY attempt) are the second test: they must end
dead after max_attempts, counted by the rescues, without taking innocent items with them.
"""

from __future__ import annotations

import collections
import re

import pytest

from .harness import Figures

PER_QUEUE = 700
MAX_ATTEMPTS = 8
DEADLINE = 100.0


@pytest.mark.slow
@pytest.mark.timeout(160)
def test_handlers_raise_hang_and_exit(chaos, chaos_results):
    chaos.prepare({q: [{"n": i} for i in range(PER_QUEUE)] for q in ("plain", "tx", "async")})
    fig = Figures("3 handler faults", chaos.kind)
    sup = chaos.worker("--processes", "3", "--stop-when-empty", queues="plain,tx,async", lease=1, batch=10,
                       concurrency=4, work=0.002, hang=0.01, hang_for=1.5, timeout=0.4,
                       exit=0.004, max_attempts=MAX_ATTEMPTS, **{"raise": 0.1})
    try:
        sup.wait(DEADLINE)
    except Exception:
        chaos.fail_with(f"not drained within {DEADLINE}s", sup)
    if sup.returncode != 0:
        chaos.fail_with(f"supervisor exited with {sup.returncode}", sup)
    out = chaos.output(sup, tail=10**7)
    fig.crashes = len(re.findall(r"exited with code 3", out))
    assert len(re.findall(r"exited with code", out)) == fig.crashes, \
        f"a worker died otherwise than by a handler's os._exit(3):\n{out[-4000:]}"

    chaos.verify(fig)  # nothing dead: every fault here is survivable
    events = chaos.events()
    kinds = collections.Counter(e.kind for e in events)
    fig.extra.update(raised=kinds["raise"], hung=kinds["hang"], exited=kinds["exit"])
    # each process that a handler exited died once, however many of its handlers were on their way
    # out at that moment (two fated to exit can run at once in one process, a thread and a task)
    exited = {e.pid for e in events if e.kind == "exit"}
    assert fig.crashes == len(exited) >= 1, (fig.crashes, len(exited), kinds)
    assert kinds["hang"] >= 1 and kinds["raise"] >= 50, kinds
    # a hung run goes on to finish (and log `done`) after HANG_FOR, yet none may resolve its item:
    # each was given up on at its timeout and the item resolved by a later attempt
    final = dict(chaos.sql("SELECT id, attempts FROM conveyor_items"))
    overtaken = [(e.item, e.attempt, final[e.item]) for e in events if e.kind == "hang" and final[e.item] <= e.attempt]
    assert not overtaken, f"a hung run resolved its item (item, hung attempt, final attempts): {overtaken[:10]}"
    assert len({e.pid for e in events}) > 3, "no worker process was replaced"
    chaos_results(fig)


class CollateralDeath(AssertionError):
    """Innocent items went dead with a poison item."""


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_poison_item_goes_dead_alone(chaos, chaos_results):
    """One poison item first in line, four innocent items behind it, one claim of 5 items and one
    handler thread. The first crash strands the innocents (never started) with the poison item;
    rescued, each is run alone, so later crashes cost only the poison item's own attempts."""
    chaos.prepare({"plain": [{"poison": True}] + [{"n": i} for i in range(4)]})
    poison = {min(chaos.submitted)}
    fig = Figures("3b poison", chaos.kind)
    sup = chaos.worker("--processes", "2", "--stop-when-empty", queues="plain", lease=1, batch=5,
                       concurrency=1, max_attempts=3)
    try:
        sup.wait(60)
    except Exception:
        chaos.fail_with("not drained within 60s", sup)
    assert sup.returncode == 0, chaos.output(sup)
    fig.crashes = len(re.findall(r"exited with code 3", chaos.output(sup, tail=10**7)))
    rows = {r[0]: r[1:] for r in chaos.sql("SELECT id, state, attempts, last_error FROM conveyor_items")}
    (p,) = poison
    # what works: the poison item ends dead after max_attempts, each crash counted by a rescue
    assert rows[p][0] == "dead" and rows[p][1] == 3 and "lease expired" in rows[p][2], rows[p]
    assert fig.crashes == 3
    called = {e.item for e in chaos.events() if e.kind == "call"}
    innocent_dead = {i: rows[i][:2] for i in rows if i not in poison and rows[i][0] == "dead"}
    fig.extra["innocent_dead_never_called"] = sum(1 for i in innocent_dead if i not in called)
    fig.items, fig.dead = len(rows), sum(1 for r in rows.values() if r[0] == "dead")
    fig.resolved = sum(1 for r in rows.values() if r[0] == "resolved")
    fig.calls = sum(1 for e in chaos.events() if e.kind == "call")
    fig.reruns = fig.calls - fig.items
    chaos_results(fig)
    if innocent_dead:
        raise CollateralDeath(f"innocent items dead with the poison item (state, attempts): {innocent_dead}; "
                              f"never called: {sorted(set(innocent_dead) - called)}\n"
                              f"{chaos.output(sup, tail=200)}")
    chaos.verify(fig, must_die=poison)
