"""Durations as users write them (7d, 12h, 30m, 45s, 2w, plain seconds, or a timedelta), shared by
the API and the CLI so both accept the same things."""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

from .errors import UsageError, shown

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: a duration longer than this is a mistake (about 10,000 years)
MAX_SECONDS = 10_000 * 365.25 * 86400

Duration = str | dt.timedelta | int | float


def parse_duration(text: str, what: str = "duration") -> float:
    """'7d', '12h', '30m', '45s', '2w' or plain seconds → seconds."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise UsageError(f"{what} {shown(text)} is not a duration: use a number with s, m, h, d or w (e.g. 7d)")
    return _checked(float(m.group(1)) * _UNITS[m.group(2)], text, what)


def to_seconds(value: Any, what: str = "duration") -> float:
    """A duration given as text ('7d'), a timedelta or a number of seconds → seconds (>= 0)."""
    if isinstance(value, str):
        return parse_duration(value, what)
    if isinstance(value, dt.timedelta):
        return _checked(value.total_seconds(), value, what)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _checked(float(value), value, what)
    raise UsageError(
        f"{what} must be a duration such as '7d', '12h', '30m', a timedelta or seconds, not {type(value).__name__}"
    )


def _checked(seconds: float, given: Any, what: str) -> float:
    if math.isnan(seconds):
        raise UsageError(f"{what} must be a duration, not {shown(given)}")
    if seconds < 0:
        raise UsageError(f"{what} must not be negative, not {shown(given)}")
    if seconds > MAX_SECONDS:
        raise UsageError(f"{what} {shown(given)} is too long (over 10,000 years)")
    return seconds


def format_age(seconds: float | None) -> str:
    """A span of seconds as a person reads it: 850 ms, 12.5 s, 3.2 min, 5.0 h ("-": none)."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
