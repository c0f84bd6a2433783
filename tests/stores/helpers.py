"""Small helpers for the store conformance suite: build submissions and claims, wait on state.

Everything here goes through the Store protocol, so every store runs the same tests.
"""

from __future__ import annotations

import json
from typing import Any

from waiting import wait_until  # noqa: F401 - the conformance suite's tests import it from here

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
