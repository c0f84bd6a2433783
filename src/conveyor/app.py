"""App: the database URL, the processors registered on it, and the calls users make."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence


from .codec import encode as _encode
from .codec import encode_payload, name_the_culprit
from .errors import UsageError
from .model import Item, NewItem, QueueOptions
from .stores.base import Store, open_store

DEFAULT_URL = "sqlite:///conveyor.db"
_QUEUE_NAME = re.compile(r"^[^\s\x00-\x1f]{1,200}$")

KeySpec = str | Callable[[Any], Any] | None


@dataclass(frozen=True)
class Processor:
    """A handler and how it runs."""

    options: QueueOptions
    handler: Callable[..., Any]
    is_async: bool

    @property
    def queue(self) -> str:
        return self.options.queue


def check_queue_name(queue: Any) -> str:
    if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
        raise UsageError(f"queue name {queue!r} is invalid: use 1-200 characters with no spaces or control characters")
    return queue


def to_timestamp(run_at: Any, where: str) -> float | None:
    """run_at may be None (now), an aware or naive (local) datetime, a timedelta from now, or unix seconds."""
    if run_at is None:
        return None
    if isinstance(run_at, dt.datetime):
        return run_at.timestamp()
    if isinstance(run_at, dt.timedelta):
        return time.time() + run_at.total_seconds()
    if isinstance(run_at, (int, float)) and not isinstance(run_at, bool):
        return float(run_at)
    raise UsageError(f"{where}: run_at must be a datetime, a timedelta or unix seconds, not {type(run_at).__name__}")


def _optional_text(value: Any, field: str, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UsageError(f"{where}: {field} must be a string, not {type(value).__name__}")
    text = str(value)
    if not text:
        raise UsageError(f"{where}: {field} must not be empty")
    return text


def _pick(spec: KeySpec, payload: Any, field: str, where: str) -> str | None:
    value = spec(payload) if callable(spec) else spec
    return _optional_text(value, field, where)


class App:
    """conveyor's entry point: `app = conveyor.App("sqlite:///conveyor.db")`.

    The URL defaults to $CONVEYOR_DATABASE_URL, else sqlite:///conveyor.db. The database is opened
    (and migrated) on first use, not here.
    """

    def __init__(self, url: str | None = None):
        self.url = url or os.environ.get("CONVEYOR_DATABASE_URL") or DEFAULT_URL
        self.processors: dict[str, Processor] = {}
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        #: set by a submit in this process, so idle workers here start at once
        self.wakeup = threading.Event()

    def __repr__(self) -> str:
        return f"<conveyor.App {self.url!r} processors={sorted(self.processors)}>"

    # -- the store ------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = open_store(self.url)
        return self._store

    def close(self) -> None:
        """Close the database connections this App opened."""
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def migrate(self) -> list[int]:
        """Apply pending schema migrations (also done on first use); returns the versions applied."""
        return self.store.migrate()

    # -- processors -----------------------------------------------------------------------------
    def processor(
        self,
        queue: str,
        *,
        batch_size: int = 100,
        concurrency: int = 4,
        lease_seconds: float = 30.0,
        max_attempts: int = 5,
        batch: bool = False,
        ordered: bool = False,
        transactional: bool = False,
        backoff_base: float = 1.0,
        backoff_max: float = 300.0,
        timeout_seconds: float | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as the handler of `queue`."""
        check_queue_name(queue)
        where = f"processor for queue {queue!r}"
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("concurrency", concurrency, 1),
            ("max_attempts", max_attempts, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UsageError(f"{where}: {name} must be an integer >= {low}, not {value!r}")
        for name, value in (("lease_seconds", lease_seconds), ("backoff_base", backoff_base), ("backoff_max", backoff_max)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"{where}: {name} must be a number > 0, not {value!r}")
        if timeout_seconds is not None and (
            not isinstance(timeout_seconds, (int, float)) or isinstance(timeout_seconds, bool) or timeout_seconds <= 0
        ):
            raise UsageError(f"{where}: timeout_seconds must be a number > 0 or None, not {timeout_seconds!r}")
        if queue in self.processors:
            raise UsageError(f"{where}: a processor is already registered for this queue")

        options = QueueOptions(
            queue=queue, batch_size=batch_size, concurrency=concurrency, lease_seconds=float(lease_seconds),
            max_attempts=max_attempts, batch=batch, ordered=ordered, transactional=transactional,
            backoff_base=float(backoff_base), backoff_max=float(backoff_max),
            timeout_seconds=None if timeout_seconds is None else float(timeout_seconds),
        )

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            is_async = asyncio.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
            self.processors[queue] = Processor(options, fn, is_async)
            return fn

        return register

    # -- submit ---------------------------------------------------------------------------------
    def submit(
        self,
        queue: str,
        payload: Any,
        *,
        key: str | None = None,
        dedup_key: str | None = None,
        run_at: dt.datetime | dt.timedelta | float | None = None,
        priority: int = 0,
        conn: Any = None,
    ) -> int:
        """Store one item; returns its id. With a dedup_key already stored in this queue, nothing new
        is stored and the existing item's id is returned.

        conn: your own open connection to the same database (sqlite3.Connection or
        psycopg.Connection); the item is inserted inside your transaction and exists if and only if
        you commit it."""
        item = self._new_item(queue, payload, key, dedup_key, run_at, priority, f"submit to {queue!r}")
        (item_id,) = self.store.submit_many([item]) if conn is None else self.store.submit_many([item], conn=conn)
        self.wakeup.set()
        if item_id is None:
            assert item.dedup_key is not None
            existing = (self.store.find_dedup(item.queue, item.dedup_key) if conn is None
                        else self.store.find_dedup(item.queue, item.dedup_key, conn=conn))
            assert existing is not None
            return existing
        return item_id

    def submit_many(
        self,
        queue: str,
        payloads: Iterable[Any],
        *,
        key: KeySpec = None,
        dedup_key: KeySpec = None,
        run_at: dt.datetime | dt.timedelta | float | None = None,
        priority: int = 0,
        conn: Any = None,
    ) -> int:
        """Store many items in one transaction, all or nothing; returns how many were stored (items
        whose dedup_key is already stored are skipped). `key` and `dedup_key` may be a string or a
        function of the payload. With `conn`, inside your own transaction (see submit)."""
        check_queue_name(queue)
        where = f"submit_many to {queue!r}"
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise UsageError(f"{where}: priority must be an integer, not {priority!r}")
        when = to_timestamp(run_at, where)
        payloads = payloads if isinstance(payloads, (list, tuple)) else list(payloads)
        if key is None and dedup_key is None and conn is None:
            # fast path: the checks above done once, the store encodes the payloads as it sends
            # them (see Store.submit_payloads); on a payload that cannot be encoded nothing is
            # stored, and the slow path names it
            if not payloads:
                return 0
            try:
                stored = self.store.submit_payloads(queue, payloads, when, priority)
            except (TypeError, ValueError):
                name_the_culprit(payloads, where)
                raise
            self.wakeup.set()
            return stored
        if key is None and dedup_key is None:
            try:
                items = [NewItem(queue, _encode(p), None, None, when, priority) for p in payloads]
            except (TypeError, ValueError):
                name_the_culprit(payloads, where)
                raise
        else:
            items = [
                NewItem(queue, encode_payload(p, f"{where}, item {n}"), _pick(key, p, "key", f"{where}, item {n}"),
                        _pick(dedup_key, p, "dedup_key", f"{where}, item {n}"), when, priority)
                for n, p in enumerate(payloads)
            ]
        return self.submit_items(items, conn=conn)

    def submit_items(self, items: Sequence[NewItem], *, chunk: int | None = None,
                     progress: Callable[[int], Any] | None = None, conn: Any = None) -> int:
        """Store already validated items in one transaction (all or nothing), `chunk` at a time,
        calling `progress(n)` after each chunk; returns how many were stored."""
        if not items:
            return 0
        store = self.store
        if conn is not None:
            stored = sum(1 for i in store.submit_many(items, conn=conn) if i is not None)
            self.wakeup.set()
            return stored
        step = chunk or len(items)
        stored = 0
        with store.transaction():
            for start in range(0, len(items), step):
                part = items[start:start + step]
                stored += sum(1 for i in store.submit_many(part) if i is not None)
                if progress:
                    progress(len(part))
        self.wakeup.set()
        return stored

    def _new_item(self, queue: Any, payload: Any, key: Any, dedup_key: Any, run_at: Any, priority: Any, where: str) -> NewItem:
        check_queue_name(queue)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise UsageError(f"{where}: priority must be an integer, not {priority!r}")
        return NewItem(
            queue=queue,
            payload_json=encode_payload(payload, where),
            key=_optional_text(key, "key", where),
            dedup_key=_optional_text(dedup_key, "dedup_key", where),
            run_at=to_timestamp(run_at, where),
            priority=priority,
        )

    # -- operators ------------------------------------------------------------------------------
    def get(self, item_id: int) -> Item:
        return self.store.get(item_id)

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """{queue: {pending, in_progress, resolved, dead, cancelled, total, oldest_pending_seconds,
        resolved_last_minute}}"""
        return self.store.stats(queues)

    def cancel(self, item_id: int) -> None:
        self.store.cancel(item_id)

    def requeue(self, queue: str, ids: Sequence[int] | None = None) -> int:
        """Send dead and cancelled items of a queue back to pending with fresh attempts."""
        check_queue_name(queue)
        n = self.store.requeue(queue, ids)
        self.wakeup.set()
        return n

    def purge(self, queue: str, older_than: dt.timedelta | float) -> int:
        """Delete resolved, dead and cancelled items of a queue finished longer ago than `older_than`."""
        check_queue_name(queue)
        seconds = older_than.total_seconds() if isinstance(older_than, dt.timedelta) else float(older_than)
        if seconds < 0:
            raise UsageError("purge: older_than must not be negative")
        return self.store.purge(queue, seconds)

    # -- workers --------------------------------------------------------------------------------
    def run_worker(
        self,
        queues: Sequence[str] | None = None,
        *,
        processes: int = 1,
        stop_when_empty: bool = False,
        shutdown_timeout: float = 30.0,
        install_signal_handlers: bool = True,
        prune_after: dt.timedelta | float | None = None,
    ) -> Mapping[str, int]:
        """Run workers for the given queues (default: every registered processor) until stopped
        (SIGINT/SIGTERM) or, with stop_when_empty, until those queues have nothing pending or in
        progress. processes > 1 runs that many worker processes under a supervisor. prune_after
        (a timedelta or seconds): the workers also delete their queues' resolved, dead and
        cancelled items once finished that long ago, keeping the table small."""
        from .supervisor import run_supervised
        from .worker import Worker

        if not isinstance(processes, int) or processes < 1:
            raise UsageError(f"processes must be an integer >= 1, not {processes!r}")
        if isinstance(prune_after, dt.timedelta):
            prune_after = prune_after.total_seconds()
        if processes > 1:
            return run_supervised(self, queues, processes=processes, stop_when_empty=stop_when_empty,
                                  shutdown_timeout=shutdown_timeout, prune_after=prune_after)
        worker = Worker(self, queues, stop_when_empty=stop_when_empty, shutdown_timeout=shutdown_timeout,
                        prune_after=prune_after)
        return worker.run(install_signal_handlers=install_signal_handlers)
