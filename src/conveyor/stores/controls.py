"""Flow control, enforced by the store so that it holds across every worker and machine.

A claim with limits (`Claim.limits`: max_in_progress, key_concurrency, rate limits, fair) runs
here, inside the claim's transaction, after taking the queue's claim lock (PostgreSQL: the
advisory lock ordered claims take; SQLite: the write lock every claim holds), so no two limited
claims of a queue interleave: each one sees what the previous one took, and never overshoots.

1. a paused or held queue claims nothing;
2. `max_in_progress` caps the batch at what is left of it (items of the queue in progress now):
   what the worker can start now, and half of the rest to wait in it (`share`);
3. `rate_limit` caps it at what the queue's rate allows now (GCRA: a theoretical arrival time per
   queue or key, kept in conveyor_rates; `Rate.burst` starts at once, then one per interval);
4. with per-key limits, candidates are the queue's next items in claim order (priority, run_at,
   id; CANDIDATE_DEPTH batches deep) and are picked in that order; with `fair`, each key's first
   few pending items (its share of the batch, over at most MAX_KEYS keys found by a skip-scan),
   picked round the keys, one of each in turn; either way each key is held to `key_concurrency`
   minus its items in progress and to what its `key_rate_limit` allows, and paused and held keys
   are left out;
5. the rate limiters advance by what was taken.
Plain claims (no limits) stay one statement; they skip paused and held queues and keys too (see
QUEUE_GOES in the dialects' queries).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

from ..model import Claim, Limits, Rate

#: keys a fair claim looks at, at most (the skip-scan reads one index entry per key)
MAX_KEYS = 1000
#: a per-key claim without fair reads this many batches of the queue's next items, at most
CANDIDATE_DEPTH = 4


def allowed(rate: Rate, tat: float | None, now: float) -> int:
    """How many starts the rate allows at `now`, given its limiter's theoretical arrival time."""
    tau = (rate.burst - 1) * rate.interval
    base = now if tat is None or tat < now else tat
    if base - now > tau + 1e-9:
        return 0
    return int((now + tau - base) / rate.interval + 1e-9) + 1


def advanced(rate: Rate, tat: float | None, now: float, taken: int) -> float:
    """The limiter's theoretical arrival time once `taken` more have started."""
    return max(tat if tat is not None else now, now) + taken * rate.interval


def share(free: int, start: int) -> int:
    """How many of `free` slots of max_in_progress a claim may take when its worker can start
    `start` items now: those, and half of the rest to wait in the worker; the other half stays for
    workers with hands free."""
    now = min(free, start)
    return now + max(0, free - now) // 2


def limited_claim(store: Any, conn: Any, claim: Claim, owner: str) -> list[Any]:
    """The rows of a claim with limits, taken within the caller's transaction."""
    q = store.queries
    limits: Limits = claim.limits  # type: ignore[assignment]
    store._claim_lock(claim)
    counted = limits.max_in_progress is not None
    state = conn.execute(q.LIMIT_STATE[counted], (claim.queue,) * (1 + counted)).fetchone()
    n, now, queue_tat = _room(store, conn, claim, state)
    if n <= 0:
        return []
    plain = dataclasses.replace(claim, limit=n, limits=None)
    if claim.ordered or not limits.per_key:
        rows = store._claim_rows(conn, plain, owner)
        key_counts: dict[str, int] = {}
        key_tats: dict[str, float] = {}
    else:
        picks, key_tats = _pick(store, conn, claim.queue, limits, n, now)
        rows = store._claim_ids(conn, plain, owner, picks) if picks else []
        key_counts = {}
        for row in rows:
            if row[3] is not None:  # ITEM_COLUMNS: id, queue, payload, key, ...
                key_counts[row[3]] = key_counts.get(row[3], 0) + 1
    _advance(store, conn, claim, len(rows), now, queue_tat)
    if limits.key_rate_limit is not None and key_counts:
        _set_rates(conn, q, claim.queue, "key", {key: advanced(limits.key_rate_limit, key_tats.get(key), now, taken)
                                                 for key, taken in key_counts.items()})
    return list(rows)


def limited_rows_claim(store: Any, conn: Any, claim: Claim, owner: str, claim_rows: Any) -> list[Any]:
    """A rows table's claim with max_in_progress or rate_limit (per-key limits are the queues'),
    within the caller's transaction: as limited_claim, the table's working rows counting as in
    progress. `claim_rows(n)` makes the plain claim of n rows."""
    base = store.base
    base._claim_lock(claim)
    state = conn.execute(store.sql.limit_state[claim.limits.max_in_progress is not None]).fetchone()  # type: ignore[union-attr]
    n, now, queue_tat = _room(base, conn, claim, state)
    if n <= 0:
        return []
    rows = claim_rows(n)
    _advance(base, conn, claim, len(rows), now, queue_tat)
    return rows


def _room(store: Any, conn: Any, claim: Claim, state: Sequence[Any]) -> tuple[int, float, float | None]:
    """How many the queue-wide limits leave a claim (0 if its queue is paused or held), from its
    first read (the clock, whether stopped, what is in progress); with the clock, and the queue
    limiter's state it read."""
    limits: Limits = claim.limits  # type: ignore[assignment]
    now, stopped, running = float(state[0]), state[1], state[2]
    if stopped:
        return 0, now, None
    n = claim.limit
    if limits.max_in_progress is not None:
        n = min(n, share(limits.max_in_progress - int(running), n if claim.start is None else claim.start))
    queue_tat = None
    if limits.rate_limit is not None:
        queue_tat = _tats(store, conn, claim.queue, "queue", [""]).get("")
        n = min(n, allowed(limits.rate_limit, queue_tat, now))
    return n, now, queue_tat


def _advance(store: Any, conn: Any, claim: Claim, taken: int, now: float, queue_tat: float | None) -> None:
    """The queue's rate limiter, past what a claim took."""
    rate = claim.limits.rate_limit if claim.limits is not None else None
    if taken and rate is not None:
        _set_rates(conn, store.queries, claim.queue, "queue", {"": advanced(rate, queue_tat, now, taken)})


def _set_rates(conn: Any, q: Any, queue: str, scope: str, tats: dict[str, float]) -> None:
    conn.execute(q.SET_RATES, (queue, scope, json.dumps(sorted(tats.items()))))


def _tats(store: Any, conn: Any, queue: str, scope: str, keys: Sequence[str]) -> dict[str, float]:
    return {k: float(t) for k, t in conn.execute(store.queries.RATES, (queue, scope, store._id_list(list(keys)))).fetchall()}


def _pick(store: Any, conn: Any, queue: str, limits: Limits, n: int, now: float) -> tuple[list[int], dict[str, float]]:
    """The ids a per-key claim takes, and the key limiters' state it read."""
    q = store.queries
    stopped = {r[0] for r in conn.execute(q.STOPPED_KEYS, (queue, now)).fetchall()}
    if limits.fair:
        # each key's first few: enough for its share of the batch, round the keys
        keys = [k for k in store._pending_keys(conn, queue, MAX_KEYS) if k not in stopped]
        most = max(1, -(-n // max(1, len(keys))))
        if limits.key_concurrency is not None:
            most = min(most, limits.key_concurrency)
        if limits.key_rate_limit is not None:
            most = min(most, limits.key_rate_limit.burst)
        candidates = list(store._key_heads(conn, queue, keys, now, most)) if keys else []
        candidates += conn.execute(q.UNKEYED_HEADS, (queue, now, n)).fetchall()
    else:
        # the queue's next items in claim order, a few batches deep, less paused or held keys: a
        # key at its limit gives way to the next ones (fair=True looks at every key instead)
        candidates = [c for c in conn.execute(q.CANDIDATES, (queue, now, n * CANDIDATE_DEPTH)).fetchall()
                      if c[1] is None or c[1] not in stopped]
        keys = list(dict.fromkeys(c[1] for c in candidates if c[1] is not None))
    room: dict[str | None, float] = {None: math.inf}
    for key in keys:
        room[key] = math.inf
    if limits.key_concurrency is not None:
        running = dict(conn.execute(q.RUNNING_KEYS, (queue,)).fetchall())
        for key in keys:
            room[key] = limits.key_concurrency - running.get(key, 0)
    key_tats: dict[str, float] = {}
    if limits.key_rate_limit is not None and keys:
        key_tats = _tats(store, conn, queue, "key", keys)
        for key in keys:
            room[key] = min(room[key], allowed(limits.key_rate_limit, key_tats.get(key), now))
    order = sorted(candidates, key=lambda c: (-c[2], _sortable(c[3]), c[0]))  # claim order: priority, run_at, id
    picks: list[int] = []
    if limits.fair:
        by_key: dict[Any, list[Any]] = {}
        for c in order:  # each key's candidates in claim order; the keys in the order of their heads
            by_key.setdefault(c[1], []).append(c)
        depth = 0
        while len(picks) < n:
            took = False
            for key, group in by_key.items():
                if depth < len(group) and room.get(key, 0) > 0 and len(picks) < n:
                    picks.append(group[depth][0])
                    room[key] -= 1
                    took = True
            if not took:  # every key is out of candidates or of room: later rounds take nothing either
                break
            depth += 1
    else:
        for c in order:
            if len(picks) >= n:
                break
            if room.get(c[1], 0) > 0:
                picks.append(c[0])
                room[c[1]] -= 1
    return picks, key_tats


def _sortable(run_at: Any) -> float:
    """run_at as the stores return it (unix seconds on SQLite, a datetime on PostgreSQL)."""
    return run_at.timestamp() if hasattr(run_at, "timestamp") else float(run_at)
