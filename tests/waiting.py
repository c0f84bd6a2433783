"""Waiting in tests: on the condition itself, never on a fixed sleep.

A test that sleeps and then asserts is a bet on the machine's speed, lost on a busy 2-core box. Poll
the condition (an item's state, a lock in pg_locks, a flag a worker sets) with `wait_until`: it
returns as soon as the condition holds, so a generous timeout costs nothing when all is well and
only bounds how long a broken build takes to fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

TIMEOUT = 30.0  # seconds: only a failing test waits this long


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition",
               interval: float = 0.005) -> Any:
    """Poll `predicate` until it returns something truthy, and return that; raise AssertionError
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
