"""Running a handler on claimed items: plain, or transactional (its writes and the items'
resolution commit together or not at all), in a thread or on the event loop. What a run comes to
goes to the outcome buffer; a transactional run settles its items itself."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from ..errors import BatchErrors, LeaseLost
from ..model import Item, Processor, QueueOptions, State
from ..stores.base import WorkerStore
from .figures import figures
from .logs import WorkerLog
from .outcomes import OutcomeBuffer, RunState, some, split_batch

#: returned by Runner.run_sync when a transactional run settled its items itself
SETTLED = object()
ROLLED_BACK = "the handler's writes were rolled back"


class _Refused(LeaseLost):
    """A transactional run's resolution was refused by the store (see report_refused)."""


def cancelled_among(store: WorkerStore, item_ids: Sequence[int], log: WorkerLog) -> set[int]:
    """Which of these items, whose results the store refused, an operator cancelled (the others
    lost their lease). Refusals are rare: one lookup; if it fails, none are taken as cancelled."""
    try:
        return {it.id for it in store.get_many(item_ids) if it.state == State.CANCELLED}
    except Exception as exc:  # noqa: BLE001 - only the wording of a log line depends on it
        log.debug("could not look up refused item(s) %s: %s", some(item_ids), exc, items=item_ids)
        return set()


def report_refused(store: WorkerStore, item_ids: Sequence[int], what: str, log: WorkerLog, queue: str | None = None) -> None:
    """Say why the store refused these items' results, and what became of them (`what`):
    cancelled by an operator while they ran (INFO), or their lease was lost (WARNING)."""
    cancelled = cancelled_among(store, item_ids, log)
    if cancelled:
        gone = [i for i in item_ids if i in cancelled]
        log.info("item(s) %s cancelled while running; %s", some(gone), what, queue=queue, items=gone)
    lost = [i for i in item_ids if i not in cancelled]
    if lost:
        log.warning("lease lost on item(s) %s (it expired and the item was rescued; another worker may hold it "
                    "now): %s", some(lost), what, queue=queue, items=lost)


class Lane(Protocol):
    """What a run needs of its lane (lanes.Lane)."""

    processor: Processor
    opts: QueueOptions

    def given_up(self) -> bool: ...

    def settled(self, claims: Sequence[Sequence[Any]]) -> int: ...


class Runner:
    """Runs handlers for the lanes of one worker."""

    def __init__(self, store: WorkerStore, outcomes: OutcomeBuffer, wake: threading.Event, state: RunState):
        self.store = store
        self.outcomes = outcomes
        #: set when a transactional run settled items (an ordered key may move on)
        self.wake = wake
        self.state = state
        #: handler durations and lags for /metrics, when a metrics directory is set (worker.figures)
        self.figures = figures()

    def run_sync(self, lane: Lane, items: list[Item]) -> BaseException | None | object:
        if self.figures is None:
            return self._run_sync(lane, items)
        started, t0 = time.time(), time.perf_counter()
        try:
            return self._run_sync(lane, items)
        finally:
            self.figures.ran(lane.opts.queue, items, started, time.perf_counter() - t0)

    async def run_async(self, lane: Lane, items: list[Item]) -> None:
        if self.figures is None:
            return await self._run_async(lane, items)
        started, t0 = time.time(), time.perf_counter()
        try:
            return await self._run_async(lane, items)
        finally:
            self.figures.ran(lane.opts.queue, items, started, time.perf_counter() - t0)

    def _run_sync(self, lane: Lane, items: list[Item]) -> BaseException | None | object:
        """Run a sync handler; returns its exception, None on success, or SETTLED when a
        transactional run settled the items itself."""
        arg: Any = items if lane.opts.batch else items[0]
        if lane.opts.transactional:
            return self._run_transactional(lane, items, arg)
        try:
            lane.processor.handler(arg)
        except BaseException as exc:  # noqa: BLE001 (a handler's failure never stops the worker)
            return exc
        return None

    def _run_transactional(self, lane: Lane, items: list[Item], arg: Any) -> BaseException | None | object:
        """The handler's writes and the items' resolution commit together, or not at all."""
        store = self.store
        done: list[Item] = items
        failures: list[tuple[BaseException, list[Item]]] = []
        try:
            with store.transaction() as conn:
                try:
                    lane.processor.handler(arg, conn)
                except BatchErrors as exc:  # the others resolve with the handler's writes
                    done, failures = split_batch(items, exc)
                if lane.given_up():
                    raise LeaseLost([it.id for it in items], "handler ran past timeout_seconds: its writes are rolled back")
                lost = store.resolve([(it.id, it.claim_token) for it in done]) if done else []  # type: ignore[misc]
                if lost:
                    raise _Refused(lost)
        except _Refused as exc:
            report_refused(store, exc.item_ids, ROLLED_BACK, self.state.log, lane.opts.queue)
            self._release_the_rest(lane, items, exc.item_ids)
            done = items
        except LeaseLost as exc:
            self.state.log.warning("%s", exc, queue=lane.opts.queue, items=exc.item_ids)
            self.outcomes.count("lost", len(items))
            done = items
        except BaseException as exc:  # noqa: BLE001 (the handler's: recorded for a retry)
            return exc
        else:
            self.outcomes.count("resolved", len(done))
            self._failures(lane, failures)
        self._settled_itself(lane, done)
        return SETTLED

    def _failures(self, lane: Lane, failures: list[tuple[BaseException, list[Item]]]) -> None:
        """The items a transactional batch's BatchErrors named: settled by the cycle, as if each
        had raised its exception alone."""
        for error, group in failures:
            self.outcomes.failed(lane.opts, group, error)

    def _release_the_rest(self, lane: Lane, items: list[Item], refused: Sequence[int]) -> None:
        """A transactional batch whose resolution was refused for some items rolled back for all:
        the others go back to pending at once, their attempt given back (they did nothing wrong),
        instead of waiting in progress for their lease to expire as if this worker had died."""
        lost = set(refused)
        self.outcomes.count("lost", len(lost))
        rest = [it for it in items if it.id not in lost]
        if rest:
            self.state.log.info("released %d other item(s) of the batch (%s): their resolution was rolled back with "
                                "it", len(rest), some([it.id for it in rest]), queue=lane.opts.queue,
                                items=[it.id for it in rest])
            self.outcomes.released(rest)

    def _settled_itself(self, lane: Lane, items: list[Item]) -> None:
        lane.settled([(it.id, it.claim_token) for it in items])  # the next of a key, or of a limit, may start now
        self.wake.set()

    async def _run_async(self, lane: Lane, items: list[Item]) -> None:
        arg: Any = items if lane.opts.batch else items[0]
        try:
            if lane.opts.transactional:
                await self._run_async_transactional(lane, items, arg)
                return
            await self._bounded(lane, lane.processor.handler(arg))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and self.state.forced:
                raise
            self.outcomes.failed(lane.opts, items, exc)
        else:
            self.outcomes.resolved(items)

    @staticmethod
    async def _bounded(lane: Lane, coro: Any) -> Any:
        """Await a handler, cancelling it past timeout_seconds."""
        timeout = lane.opts.timeout_seconds
        if timeout is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError:
            raise TimeoutError(f"handler ran past timeout_seconds={timeout:g} and was cancelled") from None

    async def _run_async_transactional(self, lane: Lane, items: list[Item], arg: Any) -> None:
        """As _run_transactional, on a connection of the handler's own (async where the driver is)."""
        store = self.store
        done: list[Item] = items
        failures: list[tuple[BaseException, list[Item]]] = []
        try:
            async with store.async_transaction() as conn:
                try:
                    await self._bounded(lane, lane.processor.handler(arg, conn))
                except BatchErrors as exc:  # the others resolve with the handler's writes
                    done, failures = split_batch(items, exc)
                lost = await store.resolve_in(conn, [(it.id, it.claim_token) for it in done]) if done else []  # type: ignore[misc]
                if lost:
                    raise _Refused(lost)
        except _Refused as exc:
            await asyncio.to_thread(report_refused, store, exc.item_ids, ROLLED_BACK, self.state.log, lane.opts.queue)
            self._release_the_rest(lane, items, exc.item_ids)
            done = items
        else:
            self.outcomes.count("resolved", len(done))
            self._failures(lane, failures)
        # any other exception propagates to run_async, which records it for a retry
        self._settled_itself(lane, done)
