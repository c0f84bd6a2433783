"""conveyor's exceptions, as one small tree.

    ConveyorError
    ├── UsageError          a user's mistake: bad URL, bad payload, unknown queue ... (CLI exit 2)
    │   └── ItemNotFound    no item with that id
    ├── StoreError          the database failed in a way conveyor could not absorb
    └── LeaseLost           the item's lease was lost: the result of this run is refused

Retry, Fail and Backoff are not errors but signals a handler raises to steer its item; BatchErrors
steers some items of a batch and resolves the rest.
"""

from __future__ import annotations

from typing import Any

#: how much of a user's value an error message echoes
SHOWN_CHARS = 80


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A user's value as an error message quotes it: its repr, cut to `limit` characters with the
    full length said, so a 10,000-character mistake doesn't fill the screen."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = f"{len(value):,} characters" if isinstance(value, (str, bytes)) else f"{len(text):,} characters as text"
    return f"{text[:limit]}… ({length})"


class ConveyorError(Exception):
    """Base of everything conveyor raises."""


class UsageError(ConveyorError, ValueError):
    """A user's mistake, with a message that names what is wrong."""


class ItemNotFound(UsageError, LookupError):
    """No item with the given id."""


class StoreError(ConveyorError):
    """The store failed (the database is unreachable, corrupt, or refused a statement)."""


class LeaseLost(ConveyorError):
    """This worker no longer holds the item: its lease expired and the item was rescued,
    claimed again or cancelled. Whatever this run did is refused."""

    def __init__(self, item_ids: list[int] | int, message: str | None = None):
        ids = [item_ids] if isinstance(item_ids, int) else list(item_ids)
        self.item_ids = ids
        super().__init__(message or f"lease lost on item(s) {', '.join(map(str, ids))}: result refused")


class Retry(Exception):
    """Raise from a handler to run the item again after `delay` seconds (spends an attempt)."""

    def __init__(self, delay: float | None = None, reason: str = "retry requested by handler"):
        if delay is not None and delay < 0:
            raise ValueError("Retry(delay=...) must be >= 0")
        self.delay = delay
        self.reason = reason
        super().__init__(reason)


class Fail(Exception):
    """Raise from a handler to send the item straight to `dead`, with this reason."""

    def __init__(self, reason: str = "failed by handler"):
        self.reason = reason
        super().__init__(reason)


class Backoff(Exception):
    """Raise from a handler when what it calls pushes back (an HTTP 429 with Retry-After): the
    item goes back to pending without spending an attempt, and nothing more of its key
    (scope="key") or of its whole queue (scope="queue") is claimed for `seconds`, by any worker.
    An item without a key, backing off with scope="key", holds only itself."""

    def __init__(self, seconds: float, scope: str = "key", reason: str = "backoff requested by handler"):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 31_536_000:
            raise ValueError(f"Backoff(seconds) must be a number of seconds from 0 to a year, not {seconds!r}")
        if scope not in ("key", "queue"):
            raise ValueError(f"Backoff(scope=...) must be 'key' or 'queue', not {scope!r}")
        self.seconds = float(seconds)
        self.scope = scope
        self.reason = reason
        super().__init__(f"{reason} ({scope}, {seconds:g}s)")


class BatchErrors(Exception):
    """Raise from a batch handler (``batch=True``) when some of its items failed: those named go
    their own way, each as if its handler had raised its exception alone (``Fail`` → dead,
    ``Retry`` / any other exception → retried, ``Backoff`` → held back), and every other item of the
    batch is resolved. Keys are items or item ids, values exceptions. In a transactional batch the
    handler's writes commit with the others' resolution, so write nothing for the items named."""

    def __init__(self, errors: Any):
        if not hasattr(errors, "items") or not errors:
            raise ValueError(f"BatchErrors takes a non-empty mapping of item (or item id) to exception, not {shown(errors)}")
        checked: dict[int, BaseException] = {}
        for key, exc in errors.items():
            item_id = key if isinstance(key, int) else getattr(key, "id", key)
            if isinstance(item_id, bool) or not isinstance(item_id, int):
                raise TypeError(f"BatchErrors: {shown(key)} is not an item or an item id")
            if not isinstance(exc, BaseException):
                raise TypeError(f"BatchErrors: the error of item {item_id} is {shown(exc)}, not an exception")
            checked[item_id] = exc
        self.errors = checked
        ids = list(checked)
        head = ", ".join(map(str, ids[:20])) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
        super().__init__(f"{len(ids)} item(s) of the batch failed: {head}")
