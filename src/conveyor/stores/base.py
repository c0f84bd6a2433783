"""The Store protocol: everything the App and the worker ask of a database, and nothing else.

A store knows SQL, never handlers. Every method is safe to call from many threads (each thread gets
its own connection) and from many processes at once. Methods that change items take the claim
token the item was claimed under and refuse (return as *lost*) any item whose token no longer
matches: that is the fence that keeps a late worker from resolving an item twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..model import Claim, Item, NewItem, Outcomes, Token
from ..periodic import ScheduleState


@runtime_checkable
class WorkerStore(Protocol):
    """What a worker asks of a store: the whole Store does it, and so does a RowsStore (the
    application's own table, processed in place)."""

    url: str

    def migrate(self) -> list[int]:
        """Apply the numbered migrations not applied yet; return the versions applied now."""

    def resolve(self, tokens: Sequence[Token]) -> list[int]:
        """Mark items resolved. Returns the ids refused because their lease was lost."""

    def settle_and_claim(self, outcomes: Outcomes, claims: Sequence[Claim], owner: str) -> tuple[list[int], list[list[Item]]]:
        """A worker's whole cycle, atomically: settle `outcomes` (each fenced by its token), then
        make `claims`. Returns (refused ids, the items claimed per claim). A store does it in as
        few round trips as it can (PostgreSQL: one statement).

        An item this cycle's settles make claimable (released, retried without delay, the next of
        its key) may or may not be taken by this cycle's own claims: SQLite's and ordered claims
        see the settles, a plain PostgreSQL cycle (one statement) sees the data as it was before
        it. Either way the next cycle can take it, and no item is ever claimed twice."""

    def extend_leases(self, tokens: Sequence[Token], lease_seconds: float) -> list[int]:
        """Push the leases of items still being handled; returns the ids whose lease was lost."""

    def rescue_expired(self) -> list[tuple[int, str]]:
        """Items whose lease ran out go back to pending (or dead if their attempts are spent),
        the reason kept in last_error. Returns (id, new state) of each rescued item."""

    def get_many(self, item_ids: Sequence[int]) -> list[Item]:
        """The items with these ids that exist, in the order asked (each once), in one query."""

    def has_work(self, queues: Sequence[str]) -> bool:
        """True while any of these queues holds pending or in-progress items."""

    def purge(self, queue: str, older_than_seconds: float) -> int:
        """Delete resolved, dead and cancelled items finished longer ago than this; returns how many."""

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A write transaction on this thread's connection; store calls made inside join it.
        Yields the driver's own connection."""

    def async_transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """For one async transactional handler: a write transaction on a connection of its own,
        yielding the connection to hand the handler (psycopg.AsyncConnection on PostgreSQL; the
        sqlite3.Connection on SQLite, which has no async driver)."""

    async def resolve_in(self, conn: Any, tokens: Sequence[Token]) -> list[int]:
        """Resolve items inside async_transaction(); returns the refused ids."""

    def wait_for_change(self, timeout: float, wake: Any = None) -> bool:
        """Block up to `timeout` seconds for another connection to change the data (a cheap
        wake-up for idle workers), or until `wake.is_set()` (an Event-like object). True if the
        data changed."""

    def disconnect(self) -> None:
        """Close the calling thread's connection (threads call it as they end)."""


@runtime_checkable
class ScheduleStore(Protocol):
    """What a worker keeping periodic schedules asks of a store (stores/schedules.py)."""

    def schedules(self) -> tuple[float, list[ScheduleState]]:
        """The database's clock (unix seconds) and every periodic schedule's stored state."""

    def advance_schedule(self, queue: str, name: str, version: int | None, last_tick: float, next_tick: float,
                         schedule: str, items: Sequence[NewItem]) -> list[int | None] | None:
        """Compare-and-set: if the schedule's stored version is still `version` (None: not stored
        yet), record `last_tick` (and `next_tick`, `schedule` as status shows them) and submit
        `items`, in one transaction; returns their ids, or None if another worker was first."""

    def disconnect(self) -> None:
        """Close the calling thread's connection."""


@runtime_checkable
class Store(WorkerStore, ScheduleStore, Protocol):
    """Everything the App asks of a database (the worker's part is WorkerStore)."""

    # -- step 0: submit -----------------------------------------------------------------------
    def submit_many(self, items: Sequence[NewItem], conn: Any = None) -> list[int | None]:
        """Store all items in one transaction. Returns, per item, its new id, or None where an
        item with the same (queue, dedup_key) already exists and this one was skipped.

        With `conn` (the driver's connection of the caller, on the same database, inside the
        caller's open transaction) the items are inserted there and nothing is committed: they
        exist if and only if the caller commits."""

    def submit_payloads(self, queue: str, payloads: Sequence[Any], run_at: float | None, priority: int) -> int:
        """Store payloads as items of one queue, all with the same run_at (unix seconds; None: now)
        and priority and no key or dedup key, in one transaction; returns how many were stored.
        The store encodes them (conveyor.codec) as it sends them, so encoding overlaps the
        database's work. A payload that cannot be encoded raises TypeError or ValueError from
        codec.encode, and nothing is stored."""

    def find_dedup(self, queue: str, dedup_key: str, conn: Any = None) -> int | None:
        """The id of the item stored under this dedup key, if any (seen from `conn` if given)."""

    # -- steps 1+2: claim -----------------------------------------------------------------------
    def claim(self, claim: Claim, owner: str) -> list[Item]:
        """Atomically take up to `claim.limit` ready pending items of a queue: in_progress,
        attempts+1, leased to `owner`, fresh claim token. Highest priority first, then oldest."""

    # -- step 4: settle --------------------------------------------------------------------------
    def retry(self, entries: Sequence[tuple[int, int, float, str]]) -> list[int]:
        """(id, token, delay, error): back to pending after `delay` seconds, or dead when the
        item has spent its attempts. Returns the refused ids."""

    def fail(self, entries: Sequence[tuple[int, int, str]]) -> list[int]:
        """(id, token, error): straight to dead. Returns the refused ids."""

    def release(self, tokens: Sequence[Token]) -> list[int]:
        """Claimed but never started: back to pending, the attempt given back. Returns refused ids."""

    # -- operators ------------------------------------------------------------------------------
    def get(self, item_id: int) -> Item:
        """The item with this id, or ItemNotFound."""

    def list_items(self, queue: str | None = None, *, state: str | None = None, key: str | None = None,
                   before_id: int | None = None, limit: int = 50) -> list[Item]:
        """Items newest first (id descending), at most `limit`, optionally of one queue, state and
        key; a page ends at the id below `before_id` (keyset paging: pass the last id seen to get
        the next page). Each page reads an index ordered by id, never the whole table. An unknown
        state is a UsageError naming it."""

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per queue: counts by state, oldest_pending_seconds, resolved_last_minute."""

    def cancel(self, item_id: int) -> None:
        """Pending or in-progress item → cancelled (an in-progress run's result is then refused)."""

    def requeue(self, queue: str, ids: Sequence[int] | None = None) -> int:
        """dead / cancelled → pending with fresh attempts; returns how many."""

    # -- flow control ---------------------------------------------------------------------------
    def backoff(self, entries: Sequence[tuple[int, int, float, str]]) -> list[int]:
        """(id, token, seconds, scope): back to pending after `seconds` without spending an
        attempt; the item's key ("key") or queue ("queue") held as long. Returns refused ids."""

    def pause(self, queue: str, key: str | None = None) -> None:
        """Claim nothing of the queue (or of one key of it) until resumed."""

    def resume(self, queue: str, key: str | None = None) -> bool:
        """Undo pause(); returns whether it was paused."""

    def controls(self) -> list[dict[str, Any]]:
        """What pauses or holds something now: [{queue, key, paused, held_until, reason}]."""

    def clock(self) -> float:
        """The database's clock, unix seconds."""

    def key_ahead(self, queue: str, key: str, item_id: int) -> tuple[int, str] | None:
        """(id, state) of the earliest pending or running item of the key before this one."""

    # -- plumbing -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection this store opened."""
