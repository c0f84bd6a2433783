"""Plain data shared by every layer: items, their states, what a handler's run came to."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

#: (item id, claim token): names one claim of an item
Token = tuple[int, int]


class State(str, enum.Enum):  # noqa: UP042 (str() and format() stay as they are)
    """Where an item is in its life: pending → in_progress → resolved (or dead / cancelled)."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    RESOLVED = "resolved"
    DEAD = "dead"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


STATES: tuple[str, ...] = tuple(s.value for s in State)
FINISHED_STATES: tuple[str, ...] = ("resolved", "dead", "cancelled")


def error_headline(error: str | None) -> str:
    """The line of an item's last_error that says what went wrong: in a traceback, the exception's
    first line (the one after the last frame's indented lines), otherwise the first line."""
    lines = [line for line in (error or "").strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Traceback (most recent call last)"):
        frames = [n for n, line in enumerate(lines) if line[:1].isspace()]
        if frames and frames[-1] + 1 < len(lines):
            return lines[frames[-1] + 1].strip()
    return lines[0].strip()


@dataclass(slots=True)
class Item:
    """One record to process. `attempts` is 1 on the first run."""

    id: int
    queue: str
    payload: Any
    key: str | None = None
    attempts: int = 0
    state: State = State.PENDING
    created_at: dt.datetime | None = None
    priority: int = 0
    run_at: dt.datetime | None = None
    dedup_key: str | None = None
    last_error: str | None = None
    max_attempts: int | None = None
    lease_owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    #: fences this claim: only the holder of the token can resolve the item
    claim_token: int | None = field(default=None, repr=False)
    #: its last run ended with its worker's lease expiring (the worker crashed, was killed or lost
    #: the database): a worker runs such an item alone, so a poison item takes nothing with it
    rescued: bool = False

    def __hash__(self) -> int:
        """By id and claim, so items can key a dict (a BatchErrors) or fill a set."""
        return hash((self.id, self.claim_token))


class NewItem(NamedTuple):
    """A validated submission, ready for a store (payload already JSON text). A tuple: cheap to
    build by the hundred thousand."""

    queue: str
    payload_json: str
    key: str | None = None
    dedup_key: str | None = None
    run_at: float | None = None  # unix seconds; None means now
    priority: int = 0


@dataclass(slots=True, frozen=True)
class Rate:
    """A rate limit: at most `count` starts per `period` seconds ("50/s" → Rate(50, 1.0))."""

    count: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds between two starts at the steady rate."""
        return self.period / self.count

    @property
    def burst(self) -> int:
        """Starts allowed at once after a quiet spell: a tenth of a period's, at least one, so
        a claim of a batch never takes a whole period's allowance in one go."""
        return max(1, self.count // 10)

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.period, f"{self.period:g}s")
        return f"{self.count}/{unit}"


@dataclass(slots=True, frozen=True)
class Limits:
    """Flow control a claim obeys, across every worker (the store enforces it)."""

    max_in_progress: int | None = None
    key_concurrency: int | None = None
    rate_limit: Rate | None = None
    key_rate_limit: Rate | None = None
    fair: bool = False

    @property
    def per_key(self) -> bool:
        """Whether the claim must look at keys one by one."""
        return bool(self.key_concurrency or self.key_rate_limit or self.fair)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("max_in_progress", "key_concurrency", "rate_limit", "key_rate_limit"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value) if isinstance(value, Rate) else value
        if self.fair:
            out["fair"] = True
        return out


@dataclass(slots=True, frozen=True)
class Claim:
    """What one claim asks a store for."""

    queue: str
    limit: int
    lease_seconds: float
    max_attempts: int
    ordered: bool = False
    #: flow control; None: none (the plain claim, one statement)
    limits: Limits | None = None
    #: how many of `limit` the worker can start at once (None: all); the rest would wait in it.
    #: Under max_in_progress an item waiting in one worker holds a slot another could run it in.
    start: int | None = None


@dataclass(slots=True)
class Outcomes:
    """The results of handler runs, gathered so a store can apply them in one go.

    Each entry names the item id and the claim token it was handled under.
    """

    resolved: list[tuple[int, int]] = field(default_factory=list)
    #: (id, token, delay_seconds, error)
    retried: list[tuple[int, int, float, str]] = field(default_factory=list)
    #: (id, token, error)
    failed: list[tuple[int, int, str]] = field(default_factory=list)
    #: (id, token): claimed but never started; back to pending without spending an attempt
    released: list[tuple[int, int]] = field(default_factory=list)
    #: (id, token, seconds, scope): the handler raised Backoff: back to pending after `seconds`
    #: without spending an attempt, and its key (scope "key") or queue ("queue") held as long
    backedoff: list[tuple[int, int, float, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.resolved) + len(self.retried) + len(self.failed) + len(self.released) + len(self.backedoff)

    def extend(self, other: Outcomes) -> None:
        self.resolved.extend(other.resolved)
        self.retried.extend(other.retried)
        self.failed.extend(other.failed)
        self.released.extend(other.released)
        self.backedoff.extend(other.backedoff)


@dataclass(slots=True, frozen=True)
class QueueOptions:
    """How a processor handles its queue."""

    queue: str
    batch_size: int = 100
    concurrency: int = 4
    lease_seconds: float = 30.0
    max_attempts: int = 5
    batch: bool = False
    ordered: bool = False
    transactional: bool = False
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    #: a handler running longer is given up on: cancelled (async) or abandoned (thread), and its item retried
    timeout_seconds: float | None = None
    #: flow control across every worker (max_in_progress, key_concurrency, rate limits, fair)
    limits: Limits | None = None


@dataclass(slots=True, frozen=True)
class RowsTable:
    """A table of the application's own whose rows are processed in place (`@app.rows`): its
    status column says which rows need processing (`pending`), are being processed (`working`),
    are done, or are dead (attempts spent). Other status values belong to the application (a
    cancelled order): conveyor never claims such a row and never overwrites one. `key` names the
    column whose rows are processed one at a time, in primary key order."""

    table: str
    status: str
    pending: str | int
    working: str | int
    done: str | int
    dead: str | int
    key: str | None = None

    @property
    def values(self) -> dict[str, str | int]:
        """The status values by the item state each stands for."""
        return {"pending": self.pending, "in_progress": self.working, "resolved": self.done, "dead": self.dead}


@dataclass(frozen=True)
class Processor:
    """A handler and how it runs."""

    options: QueueOptions
    handler: Callable[..., Any]
    is_async: bool
    #: set for a processor of the application's own rows (`@app.rows`); its queue is the table
    rows: RowsTable | None = None

    @property
    def queue(self) -> str:
        return self.options.queue
