"""Backoff between attempts: exponential, capped, with full jitter on the upper half."""

from __future__ import annotations

import random


def backoff_delay(attempts: int, base: float = 1.0, cap: float = 300.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before the next attempt, after `attempts` runs have failed.

    The ceiling grows as base * 2**(attempts-1), capped at `cap`; the delay is drawn uniformly
    from [ceiling/2, ceiling], so retries of many items spread out instead of stampeding.
    """
    if attempts < 1:
        attempts = 1
    ceiling = min(cap, base * (2 ** min(attempts - 1, 62)))
    r = (rng or random).random()
    return ceiling / 2 + r * ceiling / 2
