"""App: the database URL, the processors registered on it, and the calls users make."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import inspect
import itertools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .codec import check_text, encode_payload, name_the_culprit
from .codec import encode as _encode
from .durations import Duration, format_age, to_seconds
from .errors import StoreError, UsageError, shown
from .model import Item, Limits, NewItem, Processor, QueueOptions, Rate, RowsTable
from .periodic import DEFAULT_GRACE, Periodic, ScheduleState, kept_by, make_periodic
from .stores import Store, describe_database, open_store
from .stores.rows import RowsStore, adopt_statements, adopted_tables, apply_statements, row_counts
from .worker import Crew, Worker, run_supervised

log = logging.getLogger("conveyor")

DEFAULT_URL = "sqlite:///conveyor.db"
#: submit_many and submit_items read and store this many items at a time (memory stays bounded by it)
SUBMIT_CHUNK = 10_000
_QUEUE_NAME = re.compile(r"^[^\s\x00-\x1f]{1,200}$")
#: priority and other integers are stored as signed 64-bit integers on every store
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: run_at must fall in years 1-9999 (what a datetime can hold, and so what an Item can carry)
RUN_AT_MIN = dt.datetime(1, 1, 2, tzinfo=dt.UTC).timestamp()
RUN_AT_MAX = dt.datetime(9999, 12, 30, tzinfo=dt.UTC).timestamp()

KeySpec = str | Callable[[Any], Any] | None


def check_queue_name(queue: Any) -> str:
    if callable(queue) and not isinstance(queue, str):
        raise UsageError("a queue name is missing: write @app.processor(\"queue-name\"), not @app.processor")
    if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
        raise UsageError(f"queue name {shown(queue)} is invalid: use 1-200 characters with no spaces or control characters")
    return check_text(queue, f"queue name {shown(queue)}")


def check_priority(priority: Any, where: str) -> int:
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise UsageError(f"{where}: priority must be an integer, not {shown(priority)}")
    if not INT64_MIN <= priority <= INT64_MAX:
        raise UsageError(f"{where}: priority {shown(priority)} does not fit in 64 bits (-2**63 to 2**63-1)")
    return priority


def to_timestamp(run_at: Any, where: str) -> float | None:
    """run_at may be None (now), an aware datetime, a naive datetime (local time), a timedelta from
    now, or unix seconds; it must fall in the years 1-9999."""
    if run_at is None:
        return None
    try:
        if isinstance(run_at, dt.datetime):
            seconds = run_at.timestamp()
        elif isinstance(run_at, dt.timedelta):
            seconds = time.time() + run_at.total_seconds()
        elif isinstance(run_at, (int, float)) and not isinstance(run_at, bool):
            seconds = float(run_at)
        else:
            raise UsageError(f"{where}: run_at must be a datetime, a timedelta or unix seconds, not {type(run_at).__name__}")
    except (OverflowError, ValueError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{where}: run_at {shown(run_at)} is out of range ({exc})") from None
    if not math.isfinite(seconds) or not RUN_AT_MIN <= seconds <= RUN_AT_MAX:
        raise UsageError(f"{where}: run_at {shown(run_at)} is not a time between the years 1 and 9999")
    return seconds


def _optional_text(value: Any, field: str, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UsageError(f"{where}: {field} must be a string, not {type(value).__name__}")
    text = str(value)
    if not text:
        raise UsageError(f"{where}: {field} must not be empty")
    if "\x00" in text:  # PostgreSQL's text cannot hold it, SQLite's would: refused alike on both
        raise UsageError(f"{where}: {field} {shown(text)} must not contain NUL characters")
    return check_text(text, f"{where}: {field} {shown(text)}")


def _positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def check_handler(fn: Any, options: QueueOptions) -> None:
    """Refuse, at registration, a handler that cannot be called the way its items will call it
    (otherwise every item would spend all its attempts on a TypeError and die)."""
    where = f"processor for queue {shown(options.queue)}"
    if not callable(fn):
        raise UsageError(f"{where}: the handler must be a function, not {type(fn).__name__}")
    arg = "items" if options.batch else "item"
    shape = f"({arg}, conn)" if options.transactional else f"({arg})"
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or extension callable without a signature: trust it
        return
    try:
        signature.bind(*([None] * (2 if options.transactional else 1)))
    except TypeError:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        why = "a transactional handler is called" if options.transactional else (
            "a batch handler is called" if options.batch else "a handler is called")
        raise UsageError(f"{where}: {name}{signature} cannot be called as {name}{shape}: {why} with {shape}") from None


def _chunks(values: Iterable[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    """(index of the first, up to `size` values), lazily: a generator is never read ahead of a chunk."""
    if isinstance(values, (list, tuple)):
        for start in range(0, len(values), size):
            yield start, values[start:start + size]
        return
    it = iter(values)
    start = 0
    while chunk := list(itertools.islice(it, size)):
        yield start, chunk
        start += len(chunk)


def _pick(spec: KeySpec, payload: Any, field: str, where: str) -> str | None:
    value = spec(payload) if callable(spec) else spec
    return _optional_text(value, field, where)


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


def check_table_name(table: Any, where: str) -> str:
    """A table name: an identifier, or schema.identifier (PostgreSQL)."""
    if not isinstance(table, str) or not all(_IDENTIFIER.match(part) for part in table.split(".")) \
            or table.count(".") > 1:
        raise UsageError(f"{where}: the table name must be an identifier (letters, digits, _), optionally "
                         f"schema-qualified (app.orders), not {shown(table)}")
    return table


def check_column(column: Any, what: str, where: str) -> str:
    if not isinstance(column, str) or not _IDENTIFIER.match(column):
        raise UsageError(f"{where}: {what} must name a column (letters, digits, _), not {shown(column)}")
    if column.startswith("conveyor_"):
        raise UsageError(f"{where}: {what} column {shown(column)}: names starting with conveyor_ are conveyor's own")
    return column


def _status_value(value: Any, what: str, where: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise UsageError(f"{where}: {what} must be a status value (a non-empty string or an integer), not {shown(value)}")
    if isinstance(value, str):
        check_text(value, f"{where}: {what}")
    return value


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(value: Any, what: str, where: str) -> Rate:
    """'50/s', '300/m', '1000/h' → Rate(count, period seconds)."""
    m = _RATE.match(value) if isinstance(value, str) else None
    if m is None or int(m.group(1)) < 1:
        raise UsageError(f"{where}: {what} must be a count per second, minute or hour such as '50/s', '300/m' or "
                         f"'1000/h', not {shown(value)}")
    return Rate(int(m.group(1)), _PERIODS[m.group(2)])


def check_limits(where: str, *, ordered: bool, max_in_progress: Any, key_concurrency: Any, rate_limit: Any,
                 key_rate_limit: Any, fair: Any) -> Limits | None:
    """A processor's flow control, each setting checked (one error naming the first that is wrong);
    None when it has none."""
    for name, value in (("max_in_progress", max_in_progress), ("key_concurrency", key_concurrency)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{where}: {name} must be an integer >= 1 or None, not {shown(value)}")
    if not isinstance(fair, bool):
        raise UsageError(f"{where}: fair must be True or False, not {shown(fair)}")
    if ordered and key_concurrency not in (None, 1):
        raise UsageError(f"{where}: ordered=True runs one item of a key at a time: key_concurrency={key_concurrency} "
                         "contradicts it (drop ordered to let several run)")
    if ordered and fair:
        raise UsageError(f"{where}: fair=True with ordered=True: an ordered claim already takes the head of every key")
    limits = Limits(
        max_in_progress=max_in_progress, key_concurrency=None if ordered else key_concurrency,
        rate_limit=None if rate_limit is None else parse_rate(rate_limit, "rate_limit", where),
        key_rate_limit=None if key_rate_limit is None else parse_rate(key_rate_limit, "key_rate_limit", where),
        fair=fair)
    return limits if limits != Limits() else None


def _queue_options(where: str, queue: str, *, batch_size: Any, concurrency: Any, lease_seconds: Any,
                   max_attempts: Any, batch: bool, ordered: bool, transactional: bool, backoff_base: Any,
                   backoff_max: Any, timeout_seconds: Any) -> QueueOptions:
    """A processor's options, each checked (one error naming the first that is wrong)."""
    for name, count, low in (
        ("batch_size", batch_size, 1),
        ("concurrency", concurrency, 1),
        ("max_attempts", max_attempts, 1),
    ):
        if not isinstance(count, int) or isinstance(count, bool) or count < low:
            raise UsageError(f"{where}: {name} must be an integer >= {low}, not {shown(count)}")
    for name, value in (("lease_seconds", lease_seconds), ("backoff_base", backoff_base), ("backoff_max", backoff_max)):
        if not _positive_number(value):
            raise UsageError(f"{where}: {name} must be a number > 0, not {shown(value)}")
    if timeout_seconds is not None and not _positive_number(timeout_seconds):
        raise UsageError(f"{where}: timeout_seconds must be a number > 0 or None, not {shown(timeout_seconds)}")
    return QueueOptions(
        queue=queue, batch_size=batch_size, concurrency=concurrency, lease_seconds=float(lease_seconds),
        max_attempts=max_attempts, batch=batch, ordered=ordered, transactional=transactional,
        backoff_base=float(backoff_base), backoff_max=float(backoff_max),
        timeout_seconds=None if timeout_seconds is None else float(timeout_seconds),
    )


class App:
    """conveyor's entry point: `app = conveyor.App("sqlite:///conveyor.db")`.

    The URL defaults to $CONVEYOR_DATABASE_URL, else sqlite:///conveyor.db. The database is opened
    (and migrated) on first use, not here.
    """

    def __init__(self, url: str | None = None, *, read_only: bool = False):
        self.url = url or os.environ.get("CONVEYOR_DATABASE_URL") or DEFAULT_URL
        #: never create, migrate or write the database (status, items, show, a dashboard's reads)
        self.read_only = read_only
        self.processors: dict[str, Processor] = {}
        #: periodic schedules by (queue, name): see periodic()
        self.periodics: dict[tuple[str, str], Periodic] = {}
        #: MODULE:APP when the CLI loaded this App (messages then name the exact command to run)
        self.spec: str | None = None
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        #: set by a submit in this process, so idle workers here start at once
        self.wakeup = threading.Event()

    def __repr__(self) -> str:
        return f"<conveyor.App {self.url!r} processors={sorted(self.processors)}>"

    def describe_database(self) -> str:
        """The database this App uses, as a log line says it (a SQLite file's absolute path, a
        PostgreSQL URL without its password)."""
        return describe_database(self.url)

    # -- the store ------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = open_store(self.url, read_only=self.read_only)
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
        max_in_progress: int | None = None,
        key_concurrency: int | None = None,
        rate_limit: str | None = None,
        key_rate_limit: str | None = None,
        fair: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as the handler of `queue`. Flow control, enforced by
        the store across every worker and machine: `max_in_progress` (items of the queue running
        at once), `key_concurrency` (of one key), `rate_limit` / `key_rate_limit` ("50/s", "300/m",
        "1000/h": starts per period, by the database's clock), `fair` (claims go round the keys)."""
        check_queue_name(queue)
        where = f"processor for queue {shown(queue)}"
        options = _queue_options(
            where, queue, batch_size=batch_size, concurrency=concurrency,
            lease_seconds=lease_seconds, max_attempts=max_attempts, batch=batch, ordered=ordered,
            transactional=transactional, backoff_base=backoff_base, backoff_max=backoff_max,
            timeout_seconds=timeout_seconds)
        limits = check_limits(where, ordered=ordered, max_in_progress=max_in_progress, key_concurrency=key_concurrency,
                              rate_limit=rate_limit, key_rate_limit=key_rate_limit, fair=fair)
        return self._registering(dataclasses.replace(options, limits=limits), None)

    def rows(
        self,
        table: str,
        *,
        status: str,
        pending: str | int,
        working: str | int,
        done: str | int,
        dead: str | int,
        key: str | None = None,
        ordered: bool | None = None,
        batch_size: int = 100,
        concurrency: int = 4,
        lease_seconds: float = 30.0,
        max_attempts: int = 5,
        batch: bool = False,
        transactional: bool = False,
        backoff_base: float = 1.0,
        backoff_max: float = 300.0,
        timeout_seconds: float | None = None,
        max_in_progress: int | None = None,
        rate_limit: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as the processor of the application's own `table`,
        processed in place: rows whose `status` column holds `pending` are claimed (status set to
        `working`), handled, and marked `done` (or `dead` once `max_attempts` are spent). The
        handler gets an Item whose `id` is the row's primary key and whose `payload` is the row
        as a dict. With `key` (a column), rows of the same key are handled one at a time in primary
        key order (ordered=False turns that off). The table's name is its queue's name in stats and
        the CLI. `conveyor adopt` prepares the table (columns, indexes, wake-up trigger) first.
        Flow control across every worker: `max_in_progress` (rows working at once) and
        `rate_limit` ("50/s": starts per period); pause and Backoff hold the table or a key."""
        where = f"rows processor for table {shown(table)}"
        rows = RowsTable(
            table=check_table_name(table, where), status=check_column(status, "status", where),
            pending=_status_value(pending, "pending", where), working=_status_value(working, "working", where),
            done=_status_value(done, "done", where), dead=_status_value(dead, "dead", where),
            key=None if key is None else check_column(key, "key", where))
        values = [str(v) for v in rows.values.values()]
        if len(set(values)) < len(values):
            raise UsageError(f"{where}: pending, working, done and dead must be four different values, not "
                             f"{', '.join(map(shown, rows.values.values()))}")
        if ordered and key is None:
            raise UsageError(f"{where}: ordered=True needs key= (the column whose rows are handled one at a time)")
        options = _queue_options(
            where, rows.table, batch_size=batch_size, concurrency=concurrency, lease_seconds=lease_seconds,
            max_attempts=max_attempts, batch=batch, ordered=key is not None if ordered is None else ordered,
            transactional=transactional, backoff_base=backoff_base, backoff_max=backoff_max,
            timeout_seconds=timeout_seconds)
        limits = check_limits(where, ordered=options.ordered, max_in_progress=max_in_progress, key_concurrency=None,
                              rate_limit=rate_limit, key_rate_limit=None, fair=False)
        return self._registering(dataclasses.replace(options, limits=limits), rows)

    def _registering(self, options: QueueOptions, rows: RowsTable | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        queue = options.queue
        if queue in self.processors:
            raise UsageError(f"{'table' if rows else 'queue'} {shown(queue)}: a processor is already registered for it")
        if rows and any(q == queue for q, _ in self.periodics):
            raise UsageError(f"table {shown(queue)}: a periodic schedule submits to a queue of that name; rows "
                             "processed in place cannot take periodic items")

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            check_handler(fn, options)
            is_async = asyncio.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)
            self.processors[queue] = Processor(options, fn, is_async, rows)
            return fn

        return register

    # -- periodic items ---------------------------------------------------------------------------
    def periodic(
        self,
        queue: str,
        *,
        cron: str | None = None,
        every: Duration | None = None,
        payload: Any = None,
        key: str | None = None,
        priority: int = 0,
        name: str | None = None,
        offset: Duration | None = None,
        timezone: str | None = None,
        catch_up: str = "latest",
        grace: Duration = DEFAULT_GRACE,
    ) -> Periodic:
        """Submit one item to `queue` per tick of a schedule: `cron` (a cron line, in `timezone`,
        default UTC; needs conveyor[cron]) or `every` (an interval: a timedelta, seconds or '5m';
        ticks at the multiples of it since the unix epoch, plus `offset`). Each item carries
        `payload`, `key` and `priority`, its tick as run_at, and `periodic:<name>:<tick>` as its
        dedup key; `name` (default: the queue) tells several schedules of one queue apart.

        The App's workers keep the schedule, judging ticks by the database's clock: exactly one
        item per tick across every worker and machine. Ticks missed while no worker ran (the oldest
        more than `grace` late, default 10 s) become one item, for the latest of them, with
        catch_up="latest" (the default), or none with catch_up="none". A worker keeps the schedules
        of the queues it works on, and those whose queue has no processor on this App."""
        check_queue_name(queue)
        where = f"periodic for queue {shown(queue)}" + ("" if name is None else f" named {shown(name)}")
        processor = self.processors.get(queue)
        if processor is not None and processor.rows is not None:
            raise UsageError(f"{where}: {shown(queue)} is a table processed in place (@app.rows); periodic items go "
                             "to a queue")
        periodic = make_periodic(
            queue, cron=cron, every=every, payload_json=encode_payload(payload, where),
            key=_optional_text(key, "key", where), priority=check_priority(priority, where), name=name,
            offset=offset, timezone=timezone, catch_up=catch_up, grace=grace, where=where)
        if (queue, periodic.name) in self.periodics:
            raise UsageError(f"{where}: queue {shown(queue)} has a periodic schedule named {shown(periodic.name)} already; "
                             "give this one another name=")
        self.periodics[(queue, periodic.name)] = periodic
        return periodic

    def periodics_for(self, queues: Sequence[str] | None = None) -> list[Periodic]:
        """The schedules a worker for these queues keeps (default: all of them): those of its
        queues, and those whose queue has no processor on this App."""
        processed = {q for q, p in self.processors.items() if p.rows is None}
        worked = set(queues) if queues else processed
        return kept_by(list(self.periodics.values()), worked, processed)

    def schedules(self) -> tuple[float, list[ScheduleState]]:
        """The database's clock (unix seconds) and the periodic schedules it holds, as workers
        kept them (whatever App declared them): each one's last tick, next tick and description."""
        return self.store.schedules()

    def processors_for(self, queues: Sequence[str] | None = None) -> list[Processor]:
        """The processors a worker for these queues runs (default: all), or a UsageError naming
        what is missing."""
        if not self.processors:
            raise UsageError("no processors are registered on this App: decorate a handler with @app.processor('queue')")
        chosen = list(queues) if queues else list(self.processors)
        unknown = [q for q in chosen if q not in self.processors]
        if unknown:
            raise UsageError(f"no processor registered for queue(s) {', '.join(shown(q) for q in unknown)} "
                             f"(registered: {', '.join(sorted(self.processors))})")
        return [self.processors[q] for q in chosen]

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
        item = self.new_item(queue, payload, key, dedup_key, run_at, priority, f"submit to {shown(queue)}")
        (item_id,) = self.store.submit_many([item]) if conn is None else self.store.submit_many([item], conn=conn)
        self.wakeup.set()
        if item_id is not None:
            return item_id
        # skipped as a duplicate: the item already stored under its dedup key
        existing = None if item.dedup_key is None else self.store.find_dedup(item.queue, item.dedup_key, conn=conn)
        if existing is None:
            raise StoreError(f"submit to {shown(queue)}: the store neither stored the item nor found one "
                             f"under dedup_key {shown(item.dedup_key)}")
        return existing

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
        function of the payload. `payloads` may be a generator: it is read SUBMIT_CHUNK at a time,
        so memory stays bounded however many it yields. With `conn`, inside your own transaction
        (see submit), and read whole first."""
        check_queue_name(queue)
        where = f"submit_many to {shown(queue)}"
        check_priority(priority, where)
        when = to_timestamp(run_at, where)
        if key is None and dedup_key is None and conn is None:
            # fast path: the checks above done once, the store encodes the payloads as it sends
            # them (see Store.submit_payloads); on a payload that cannot be encoded nothing is
            # stored, and its index is named
            return self._submit_payloads(queue, payloads, when, priority, where)
        if key is None and dedup_key is None:  # with conn: in the caller's transaction, read whole
            payloads = payloads if isinstance(payloads, (list, tuple)) else list(payloads)
            try:
                items = [NewItem(queue, _encode(p), None, None, when, priority) for p in payloads]
            except (TypeError, ValueError):
                name_the_culprit(payloads, where)
                raise
            return self.submit_items(items, conn=conn)
        new_items = (
            NewItem(queue, encode_payload(p, f"{where}, item {n}"), _pick(key, p, "key", f"{where}, item {n}"),
                    _pick(dedup_key, p, "dedup_key", f"{where}, item {n}"), when, priority)
            for n, p in enumerate(payloads)
        )
        return self.submit_items(new_items, conn=conn)

    def _submit_payloads(self, queue: str, payloads: Iterable[Any], when: float | None, priority: int,
                         where: str) -> int:
        """submit_many's fast path, a chunk at a time. One chunk is the store's own transaction
        (SQLite encodes it before taking the write lock); more share one transaction."""
        chunks = _chunks(payloads, SUBMIT_CHUNK)
        first = next(chunks, None)
        if first is None:
            return 0
        second = next(chunks, None)
        store = self.store
        start, chunk = first
        try:
            if second is None:
                stored = store.submit_payloads(queue, chunk, when, priority)
            else:
                stored = 0
                with store.transaction():
                    for start, chunk in itertools.chain([first, second], chunks):  # noqa: B007 (named on error)
                        stored += store.submit_payloads(queue, chunk, when, priority)
        except (TypeError, ValueError):
            name_the_culprit(chunk, where, start)
            raise
        self.wakeup.set()
        return stored

    def submit_items(self, items: Iterable[NewItem], *, chunk: int | None = None,
                     progress: Callable[[int], Any] | None = None, conn: Any = None,
                     on_ids: Callable[[list[int | None]], Any] | None = None) -> int:
        """Store already validated items in one transaction (all or nothing), `chunk` at a time
        (default SUBMIT_CHUNK; `items` may be a generator, read a chunk at a time), calling
        `progress(n)` and `on_ids(ids)` after each chunk (ids: each item's new id, None where its
        dedup key was already stored); returns how many were stored. With `conn` (see submit), in
        one call inside the caller's transaction, `items` read whole first."""
        if conn is not None:
            items = items if isinstance(items, (list, tuple)) else list(items)
            if not items:
                return 0
            ids = self.store.submit_many(items, conn=conn)
            if on_ids:
                on_ids(ids)
            self.wakeup.set()
            return sum(1 for i in ids if i is not None)
        chunks = _chunks(items, chunk or SUBMIT_CHUNK)
        first = next(chunks, None)
        if first is None:
            return 0
        store = self.store
        stored = 0
        with store.transaction():
            for _, part in itertools.chain([first], chunks):
                ids = store.submit_many(part)
                stored += sum(1 for i in ids if i is not None)
                if on_ids:
                    on_ids(ids)
                if progress:
                    progress(len(part))
        self.wakeup.set()
        return stored

    def new_item(self, queue: Any, payload: Any, key: Any, dedup_key: Any, run_at: Any, priority: Any, where: str) -> NewItem:
        """One submission checked as submit checks it (a UsageError starting with `where` names
        what is wrong), ready for submit_items."""
        check_queue_name(queue)
        check_priority(priority, where)
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

    def items(self, queue: str | None = None, state: str | None = None, key: str | None = None,
              before_id: int | None = None, limit: int = 50) -> list[Item]:
        """Items newest first, at most `limit`, optionally of one queue, state and key. For the next
        page pass the last id seen as `before_id`."""
        if queue is not None:
            check_queue_name(queue)
        return self.store.list_items(queue, state=state, key=key, before_id=before_id, limit=limit)

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """{queue: {pending, in_progress, resolved, dead, cancelled, total, oldest_pending_seconds,
        resolved_last_minute}}. A table processed in place (adopted, or declared with @app.rows)
        is there too, its rows counted by what their status value stands for, with `rows: True`
        and `other`: rows whose status is the application's own (a cancelled order, say)."""
        stats = self.store.stats(queues)
        declared = {p.queue: p.rows for p in self.processors.values() if p.rows is not None}
        # a table adopted by another app whose name is also a queue of items here: the queue's
        # figures stay (this App does not process that table)
        adopted = {name: rows for name, rows in adopted_tables(self.store).items()
                   if name not in stats or not stats[name]["total"]}
        for name, rows in (adopted | declared).items():
            if queues is None or name in queues:
                stats[name] = row_counts(self.store, rows)
        for control in self.store.controls() if stats else []:
            entry = stats.get(control["queue"])
            if entry is None:
                continue
            if control["key"] is None:
                entry["paused"] = entry.get("paused", False) or control["paused"]
                if control["held_until"]:
                    entry["held_until"] = control["held_until"]
            else:
                field = "paused_keys" if control["paused"] else "held_keys"
                entry.setdefault(field, []).append(control["key"])
        for p in self.processors.values():
            if p.options.limits is not None and p.queue in stats:
                stats[p.queue]["limits"] = p.options.limits.describe()
        return stats

    def adopt(self, table: str | None = None, *, apply: bool = False, undo: bool = False) -> dict[str, list[str]]:
        """What the rows processors' tables (or just `table`'s) still need to be processed in place:
        {table: DDL statements}, read from their declarations and what the database holds (columns
        beside the row, partial indexes, on PostgreSQL a wake-up trigger). apply=True runs them,
        each table's in one transaction; undo=True runs (and returns) what removes them instead."""
        rows = {p.queue: p.rows for p in self.processors.values() if p.rows is not None}
        if not rows:
            raise UsageError("no rows processors are registered on this App: declare one with @app.rows('table', ...)")
        if table is not None and table not in rows:
            raise UsageError(f"no rows processor for table {shown(table)} (declared: {', '.join(sorted(rows))})")
        chosen = [rows[table]] if table is not None else list(rows.values())
        plans = {}
        for spec in chosen:
            if apply or undo:
                self.store.migrate()
            plans[spec.table] = adopt_statements(self.store, spec, undo=undo)
            if apply or undo:
                apply_statements(self.store, plans[spec.table])
        return plans

    def cancel(self, item_id: int) -> None:
        self.store.cancel(item_id)

    # -- flow control ---------------------------------------------------------------------------
    def pause(self, queue: str, key: str | None = None) -> None:
        """Claim nothing more of `queue` (or, with `key`, of that key of it) on any worker until
        resume(); items already running finish."""
        check_queue_name(queue)
        self.store.pause(queue, _optional_text(key, "key", "pause"))

    def resume(self, queue: str, key: str | None = None) -> bool:
        """Undo pause(queue, key); returns whether it was paused."""
        check_queue_name(queue)
        was = self.store.resume(queue, _optional_text(key, "key", "resume"))
        self.wakeup.set()
        return was

    def why(self, item_id: int) -> str | None:
        """Why a pending item is not running yet, in words (None unless it is pending): scheduled
        for later, its queue or key paused or held by a Backoff, behind an earlier item of its key
        (ordered queues), held back by its queue's limits, or waiting for a worker."""
        item = self.get(item_id)
        if item.state != "pending":
            return None
        store, queue = self.store, item.queue
        now = store.clock()
        run_at = item.run_at.timestamp() if item.run_at is not None else now
        reasons = []
        # due within the clock's resolution (SQLite's is a millisecond; a datetime rounds to a
        # microsecond): an item submitted in this millisecond is due, not scheduled
        if run_at > now + 0.001:
            reasons.append(f"scheduled: its run_at comes in {format_age(run_at - now)}")
        for c in store.controls():
            if c["queue"] != queue or c["key"] not in (None, item.key):
                continue
            what = "its queue" if c["key"] is None else f"its key {c['key']!r}"
            if c["paused"]:
                resume = f"conveyor resume {queue}" + ("" if c["key"] is None else f" --key {c['key']}")
                reasons.append(f"paused: {what} is paused ({resume})")
            if c["held_until"]:
                reasons.append(f"held: {what} is held by a Backoff for {format_age(c['held_until'] - now)} more")
        processor = self.processors.get(queue)
        if item.key is not None and (processor is None or processor.options.ordered):
            ahead = store.key_ahead(queue, item.key, item.id)
            if ahead is not None:
                note = "" if processor is not None else " (if its queue is ordered)"
                reasons.append(f"held by its key's order: item {ahead[0]} of key {item.key!r} is {ahead[1]} before it{note}")
        limits = processor.options.limits if processor is not None else None
        if limits is not None and limits.max_in_progress is not None:
            running = self.stats([queue])[queue]["in_progress"]
            if running >= limits.max_in_progress:
                reasons.append(f"limited: max_in_progress={limits.max_in_progress} items of its queue are running")
        if limits is not None and (limits.rate_limit or limits.key_rate_limit):
            reasons.append("may be limited: its queue is rate limited (" + ", ".join(
                f"{k}={v}" for k, v in limits.describe().items() if "rate" in k) + ")")
        if not reasons:
            pending = self.stats([queue])[queue]["pending"]
            reasons.append(f"waiting for a worker: {pending:,} item(s) of {queue!r} are pending")
        return "; ".join(reasons)

    def controls(self) -> list[dict[str, Any]]:
        """What is paused or held now: [{queue, key (None: the whole queue), paused, held_until
        (unix seconds, while a Backoff holds it), reason}]."""
        return self.store.controls()

    def requeue(self, queue: str, ids: Sequence[int] | None = None) -> int:
        """Send dead and cancelled items of a queue back to pending with fresh attempts; returns how
        many. A queue that holds no items at all (and has no processor here) is a UsageError: a
        mistyped name should not look like success."""
        check_queue_name(queue)
        n = self.store.requeue(queue, ids)
        if n == 0:
            self._check_known(queue)
        self.wakeup.set()
        return n

    def purge(self, queue: str, older_than: Duration) -> int:
        """Delete resolved, dead and cancelled items of a queue finished longer ago than
        `older_than`: '7d', '12h', '30m', '45s', '2w', a timedelta or seconds. Returns how many. A
        queue that holds no items (and has no processor here) is a UsageError, as for requeue."""
        check_queue_name(queue)
        seconds = to_seconds(older_than, "purge: older_than")
        n = self.store.purge(queue, seconds)
        if n == 0:
            self._check_known(queue)
        return n

    def _check_known(self, queue: str) -> None:
        if queue not in self.processors and not self.store.stats([queue])[queue]["total"]:
            raise UsageError(f"queue {shown(queue)} has no items in {self.describe_database()}")

    # -- workers --------------------------------------------------------------------------------
    def worker(self, queues: Sequence[str] | None = None, **options: Any) -> Worker:
        """A Worker for this App's processors on `queues` (default: all), on its store, woken by
        its submits; `options` as Worker takes them (stop_when_empty, shutdown_timeout,
        prune_after, name, heartbeat_interval, rescue_interval). run_worker() runs one."""
        chosen = self.processors_for(queues)
        plain = [p for p in chosen if p.rows is None]
        # the periodic schedules go with the first worker, on the App's store
        periodic: dict[str, Any] = {"periodics": self.periodics_for(queues), "schedule_store": self.store}
        workers = [Worker(self.store, plain, self.wakeup, **options, **periodic)] if plain else []
        for p in chosen:
            if p.rows is not None:  # each table on a worker of its own: a row's key is not an item id
                adopt = f"conveyor adopt {self.spec or 'MODULE:APP'} --table {p.queue}"
                store = RowsStore(self.store, p.rows, p.options, command=adopt)
                extra = {} if workers else periodic
                workers.append(Worker(store, [p], threading.Event(), **{**options, "prune_after": None}, **extra))
        return workers[0] if len(workers) == 1 else Crew(workers)  # type: ignore[return-value]

    def run_worker(
        self,
        queues: Sequence[str] | None = None,
        *,
        processes: int = 1,
        stop_when_empty: bool = False,
        shutdown_timeout: float = 30.0,
        install_signal_handlers: bool = True,
        prune_after: Duration | None = None,
    ) -> dict[str, int]:
        """Run workers for the given queues (default: every registered processor) until stopped
        (SIGINT/SIGTERM) or, with stop_when_empty, until those queues have nothing pending or in
        progress. processes > 1 runs that many worker processes under a supervisor. prune_after
        ('7d', a timedelta or seconds): the workers also delete their queues' resolved, dead and
        cancelled items once finished that long ago, keeping the table small.

        Returns what the workers did: {claimed, resolved, retried, dead, released, lost, rescued,
        processes, restarts} (with several processes, summed over those that stopped cleanly)."""
        if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
            raise UsageError(f"processes must be an integer >= 1, not {shown(processes)}")
        prune_seconds = None if prune_after is None else to_seconds(prune_after, "prune_after")
        options = dict(stop_when_empty=stop_when_empty, shutdown_timeout=shutdown_timeout, prune_after=prune_seconds)
        # a bad URL, a missing folder or an unknown queue fails here, before anything is said or started
        worker = self.worker(queues, **options)
        log.info("conveyor worker on %s", self.describe_database())
        if processes == 1:
            return {**worker.run(install_signal_handlers=install_signal_handlers), "processes": 1, "restarts": 0}
        self.migrate()  # once, before the children race for it
        self.close()  # no connection may cross a fork: each child opens its own
        return run_supervised(lambda: self.worker(queues, **options), processes=processes,
                              stop_when_empty=stop_when_empty)
