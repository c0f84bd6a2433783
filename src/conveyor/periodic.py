"""Periodic items: a schedule that submits one item to a queue per tick, with the tick as its run_at.

A schedule's ticks lie on a fixed grid: for `every=`, the multiples of the interval since the unix
epoch, shifted by `offset`; for `cron=`, the times the cron line names (croniter, in `timezone`).
Ticks are whole milliseconds, so every machine computes the same ones. Workers keep the schedules
(worker/scheduler.py), judging by the database's clock which tick is due; the schedule's last tick,
stored in the database, is advanced by a compare-and-set in the transaction that submits the tick's
item, so each tick is submitted once however many workers race for it, and an item purged later is
never submitted again. This module is plain data and arithmetic: what a schedule is, where its
ticks fall, and which ticks a worker should submit now (`plan`).
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from dataclasses import dataclass
from typing import Any, NamedTuple

from .durations import to_seconds
from .errors import UsageError, shown
from .model import NewItem

#: how late a worker may get to a tick and still count it on time (not missed), unless grace= says
DEFAULT_GRACE = 10.0
#: `every=` may not be shorter: each tick costs every worker a read and one of them a transaction
MIN_EVERY = 1.0
#: what to do with ticks missed while no worker kept the schedule
CATCH_UP = ("latest", "none")
#: ticks one pass of a worker submits at most (the next pass goes on from there)
MAX_TICKS = 1000
_NAME = re.compile(r"^[^\s\x00-\x1f]{1,200}$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class ScheduleState(NamedTuple):
    """A schedule as the database holds it: the last tick decided (submitted, or skipped as
    missed), the next one, and a version that each advance bumps (the compare-and-set)."""

    queue: str
    name: str
    schedule: str
    last_tick: float
    next_tick: float | None
    version: int
    updated_at: float


class Plan(NamedTuple):
    """What one pass of a worker does for a schedule: submit `ticks` (ms), and record `last` (ms)
    as the schedule's last tick (None: nothing to do). `missed`: (first, last) of the ticks missed
    while no worker kept the schedule, if any."""

    ticks: list[int]
    last: int | None
    missed: tuple[int, int] | None = None


def tick_time(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


def tick_text(ms: int) -> str:
    """A tick as ISO 8601 in UTC, to the millisecond where it has any: 2026-05-01T12:05:00Z."""
    moment = tick_time(ms)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{ms % 1000:03d}Z" if ms % 1000 else "Z")


def _seconds_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Periodic:
    """One schedule: the item it submits to `queue` each tick, and where its ticks fall."""

    queue: str
    name: str
    payload_json: str
    key: str | None
    priority: int
    every_ms: int | None
    offset_ms: int
    cron: str | None
    timezone: str
    catch_up: str
    grace_ms: int

    def describe(self) -> str:
        """The schedule in a few words, as logs and `conveyor status` show it."""
        if self.every_ms is not None:
            offset = f" +{_seconds_text(self.offset_ms / 1000)}" if self.offset_ms else ""
            return f"every {_seconds_text(self.every_ms / 1000)}{offset}"
        return f"cron {self.cron}" + ("" if self.timezone == "UTC" else f" ({self.timezone})")

    def latest(self, now_ms: int) -> int:
        """The latest tick at or before `now_ms`."""
        if self.every_ms is not None:
            return (now_ms - self.offset_ms) // self.every_ms * self.every_ms + self.offset_ms
        now = self._moment(now_ms)
        before = _croniter(self.cron, now).get_prev(dt.datetime)
        at = _croniter(self.cron, before).get_next(dt.datetime)  # croniter's prev is strictly before
        return _ms(at if at <= now else before)

    def after(self, tick_ms: int) -> int:
        """The first tick after `tick_ms`."""
        if self.every_ms is not None:
            return self.latest(tick_ms) + self.every_ms
        return _ms(_croniter(self.cron, self._moment(tick_ms)).get_next(dt.datetime))

    def _moment(self, ms: int) -> dt.datetime:
        return tick_time(ms).astimezone(zoneinfo.ZoneInfo(self.timezone))

    def dedup_key(self, tick_ms: int) -> str:
        """The tick's item's dedup key: the same on every machine, so a tick is one item even if
        the schedule's stored state were lost."""
        return f"periodic:{self.name}:{tick_text(tick_ms)}"

    def item(self, tick_ms: int) -> NewItem:
        return NewItem(self.queue, self.payload_json, self.key, self.dedup_key(tick_ms), tick_ms / 1000, self.priority)


def plan(p: Periodic, last: int | None, now: int) -> Plan:
    """Which ticks to submit now (all times in ms): `last` is the schedule's last tick as stored
    (None: a new schedule), `now` the database's clock.

    - A new schedule starts with its current tick if that came at most `grace` ago, else with
      the next one.
    - Ticks reached within `grace` are on time: each is submitted (however many, so a worker that
      was busy for a moment still gives one item per tick).
    - Once the oldest tick not yet submitted is more than `grace` old, the schedule was not kept
      (no worker ran): the ticks since are missed and collapse into one, the latest, submitted
      with catch_up="latest" and dropped with catch_up="none" (unless it is itself on time).
    """
    latest = p.latest(now)
    if last is not None and latest <= last:
        return Plan([], None)
    on_time = now - latest <= p.grace_ms
    if last is None:
        return Plan([latest] if on_time else [], latest)
    first = p.after(last)
    if now - first <= p.grace_ms:
        ticks = [first]
        while len(ticks) < MAX_TICKS and (tick := p.after(ticks[-1])) <= latest:
            ticks.append(tick)
        return Plan(ticks, ticks[-1])
    if p.catch_up == "latest" or on_time:
        return Plan([latest], latest, None if first == latest else (first, _before(p, latest)))
    return Plan([], latest, (first, latest))


def _before(p: Periodic, tick: int) -> int:
    """The tick before `tick`."""
    if p.every_ms is not None:
        return tick - p.every_ms
    return _ms(_croniter(p.cron, p._moment(tick)).get_prev(dt.datetime))


# -- registration ---------------------------------------------------------------------------------
def _ms(moment: dt.datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _croniter(line: Any, start: dt.datetime) -> Any:
    from croniter import croniter  # an optional dependency: checked at registration (_cron_line)

    return croniter(line, start)


def _cron_line(line: Any, timezone: str, where: str) -> str:
    """A cron line croniter accepts and that fires at least once from now on."""
    if not isinstance(line, str) or not line.strip():
        raise UsageError(f"{where}: cron must be a cron line such as '*/5 * * * *', not {shown(line)}")
    try:
        import croniter
    except ImportError:
        raise UsageError(f"{where}: cron= needs the croniter package: pip install 'conveyor[cron]'") from None
    line = " ".join(line.split())
    now = dt.datetime.now(zoneinfo.ZoneInfo(timezone))
    try:
        it = croniter.croniter(line, now)
    except (croniter.CroniterError, ValueError, KeyError) as exc:
        raise UsageError(f"{where}: cron line {shown(line)} is invalid: {exc}") from None
    try:
        it.get_next(dt.datetime)
    except croniter.CroniterBadDateError:
        raise UsageError(f"{where}: cron line {shown(line)} never fires (it names no date that exists)") from None
    return line


def _timezone(timezone: Any, where: str) -> str:
    if isinstance(timezone, dt.tzinfo):
        timezone = str(timezone)
    if not isinstance(timezone, str):
        raise UsageError(f"{where}: timezone must be a name such as 'Europe/Paris', not {shown(timezone)}")
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"{where}: timezone {shown(timezone)} is not a known time zone (e.g. 'UTC', 'Europe/Paris')") from None
    return timezone


def _interval(every: Any, where: str) -> int:
    if isinstance(every, bool):
        raise UsageError(f"{where}: every must be an interval (a timedelta, seconds or '5m'), not {shown(every)}")
    if isinstance(every, (int, float)) and every <= 0 or isinstance(every, dt.timedelta) and every <= dt.timedelta(0):
        raise UsageError(f"{where}: every must be a positive interval, not {shown(every)}")
    seconds = to_seconds(every, f"{where}: every")
    if seconds <= 0:
        raise UsageError(f"{where}: every must be a positive interval, not {shown(every)}")
    if seconds < MIN_EVERY:
        raise UsageError(f"{where}: every must be at least {MIN_EVERY:g} second (each tick costs every worker a "
                         f"database round trip), not {shown(every)}")
    return round(seconds * 1000)


def make_periodic(queue: str, *, cron: Any, every: Any, payload_json: str, key: str | None, priority: int,
                  name: Any, offset: Any, timezone: Any, catch_up: Any, grace: Any, where: str) -> Periodic:
    """A schedule from what app.periodic was given (the queue, payload, key and priority checked
    already), or one UsageError naming the first setting that is wrong."""
    if (cron is None) == (every is None):
        raise UsageError(f"{where}: give either cron= (a cron line) or every= (an interval)"
                         + (", not both" if cron is not None else ""))
    if name is None:
        name = queue
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(f"{where}: name {shown(name)} is invalid: use 1-200 characters with no spaces or control characters")
    if catch_up not in CATCH_UP:
        raise UsageError(f"{where}: catch_up must be 'latest' (one item for the ticks missed while no worker ran) or "
                         f"'none' (skip them), not {shown(catch_up)}")
    grace_seconds = to_seconds(grace, f"{where}: grace")
    if grace_seconds <= 0:
        raise UsageError(f"{where}: grace must be a positive duration, not {shown(grace)}")
    every_ms: int | None = None
    offset_ms = 0
    if every is not None:
        if timezone is not None:
            raise UsageError(f"{where}: timezone= applies to cron= only (every= ticks count from the unix epoch; "
                             "shift them with offset=)")
        every_ms = _interval(every, where)
        if offset is not None:
            offset_ms = round(to_seconds(offset, f"{where}: offset") * 1000)
            if offset_ms >= every_ms:
                raise UsageError(f"{where}: offset {shown(offset)} must be shorter than the interval "
                                 f"({_seconds_text(every_ms / 1000)})")
        zone = "UTC"
    else:
        if offset is not None:
            raise UsageError(f"{where}: offset= applies to every= only (a cron line says when it fires)")
        zone = _timezone("UTC" if timezone is None else timezone, where)
        cron = _cron_line(cron, zone, where)
    return Periodic(queue=queue, name=name, payload_json=payload_json, key=key, priority=priority, every_ms=every_ms,
                    offset_ms=offset_ms, cron=cron, timezone=zone, catch_up=catch_up,
                    grace_ms=max(1, round(grace_seconds * 1000)))


def kept_by(periodics: list[Periodic], worked: set[str], processed: set[str]) -> list[Periodic]:
    """The schedules a worker keeps: those of the queues it works on (`worked`), and those whose
    queue no processor of its App handles (`processed`: their items are for another program's
    workers, and every worker of this App keeps them)."""
    return [p for p in periodics if p.queue in worked or p.queue not in processed]
