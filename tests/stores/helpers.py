"""Small helpers for the store conformance suite: build submissions and claims, wait on state.

Everything here goes through the Store protocol, so every store runs the same tests.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from conveyor.model import Claim, NewItem

OWNER = "test-worker"


def new(queue: str = "q", payload: Any = None, *, key: str | None = None, dedup_key: str | None = None,
        run_at: float | None = None, priority: int = 0) -> NewItem:
    """A submission; run_at is unix seconds (None: now)."""
    return NewItem(queue=queue, payload_json=json.dumps(payload), key=key, dedup_key=dedup_key,
                   run_at=run_at, priority=priority)


def submit(store, queue: str = "q", n: int = 1, **kw: Any) -> list[int]:
    """Submit n items ({"n": i} payloads) and return their ids."""
    ids = store.submit_many([new(queue, {"n": i}, **kw) for i in range(n)])
    assert None not in ids
    return ids


def claim(store, queue: str = "q", limit: int = 10, *, lease: float = 30.0, max_attempts: int = 5,
          ordered: bool = False, owner: str = OWNER):
    return store.claim(Claim(queue, limit, lease, max_attempts, ordered), owner)


def tokens(items) -> list[tuple[int, int]]:
    return [(it.id, it.claim_token) for it in items]


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
