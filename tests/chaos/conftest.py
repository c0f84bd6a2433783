"""Fixtures of the chaos suite, and the table of what it survived printed at the end of the run."""

from __future__ import annotations

import os
import random

import pytest

from .harness import Chaos, Figures

_RESULTS: list[Figures] = []


@pytest.fixture
def chaos(tmp_path, store_url, request):
    """A Chaos world on a fresh database of each store. The seed is random per run (printed, and
    fixed with CHAOS_SEED=... to replay a failure)."""
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1_000_000))
    print(f"\n{request.node.name}: CHAOS_SEED={seed}")
    c = Chaos(tmp_path, store_url, seed)
    yield c
    c.cleanup()


@pytest.fixture(scope="session")
def chaos_results():
    """Record a scenario's figures: printed now (pytest -s) and in the table at the end."""

    def record(fig: Figures) -> None:
        print(fig.line())
        _RESULTS.append(fig)

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("chaos: what was survived")
    cols = ["scenario", "store", "items", "kills", "db_faults", "crashes", "calls", "reruns",
            "effect_attempts", "effects", "rolled_back", "resolved", "dead", "max_attempts", "seconds"]
    rows = [[f.scenario, f.store, f.items, f.kills, f.db_faults, f.crashes, f.calls, f.reruns,
             f.effect_attempts, f.effects, f.rolled_back, f.resolved, f.dead, f.max_attempts_seen,
             f"{f.seconds:.1f}"] for f in _RESULTS]
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    tr.write_line("  ".join(str(c).rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        tr.write_line("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))
    for f in _RESULTS:
        if f.extra:
            tr.write_line(f"{f.scenario}/{f.store}: " + ", ".join(f"{k}={v}" for k, v in f.extra.items()))
