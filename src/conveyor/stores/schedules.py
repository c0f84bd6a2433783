"""Periodic schedules in the database: their stored state, read with the database's clock, and the
compare-and-set that advances a schedule and submits its ticks' items in one transaction. Mixed
into SQLStore; the statements are the dialect's (SCHEDULES, SCHEDULE_CREATE, SCHEDULE_ADVANCE)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..model import NewItem
from ..periodic import ScheduleState


class ScheduleQueries:
    """The ScheduleStore methods of a SQL store."""

    if TYPE_CHECKING:
        queries: ModuleType

        def _execute(self, sql: str, args: Any = None) -> Any: ...

        def transaction(self) -> contextlib.AbstractContextManager[Any]: ...

        def submit_many(self, items: Sequence[NewItem], conn: Any = None) -> list[int | None]: ...

    def schedules(self) -> tuple[float, list[ScheduleState]]:
        """The database's clock (unix seconds) and every schedule's stored state."""
        now = self._execute(self.queries.CLOCK).fetchone()[0]
        rows = self._execute(self.queries.SCHEDULES).fetchall()
        return float(now), [ScheduleState(*row) for row in rows]

    def advance_schedule(self, queue: str, name: str, version: int | None, last_tick: float, next_tick: float,
                         schedule: str, items: Sequence[NewItem]) -> list[int | None] | None:
        """Record `last_tick` as the schedule's last tick and submit `items`, in one transaction,
        if its stored version is still `version` (None: the schedule is not stored yet). Returns
        the items' ids (None for one whose dedup key was stored already), or None if another
        worker advanced the schedule first (nothing is written then)."""
        q = self.queries
        with self.transaction():
            if version is None:
                row = self._execute(q.SCHEDULE_CREATE, (queue, name, schedule, last_tick, next_tick)).fetchone()
            else:
                row = self._execute(q.SCHEDULE_ADVANCE, (schedule, last_tick, next_tick, queue, name, version)).fetchone()
            if row is None:
                return None
            return self.submit_many(items) if items else []
