"""The worker's log lines: each carries the worker's name and, where a line is about them, the queue
and the item ids, as fields.

A record gets them as attributes (`worker`, `queue`, `item_ids`: what a structured handler, such as
the CLI's `--log-format json`, prints as fields) and, for a person reading text, as a `key=value`
tail of its message:

    item 17 of 'emails' is dead after attempt 5/5: TimeoutError  [worker=web-1:812:3fa2c1 queue=emails items=17]

Every part of a worker (its loop, lanes, runner, outcome buffer, keeper) logs through the WorkerLog
the Worker made for it, so no line loses which worker, queue and items it speaks of.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

SHOWN_IDS = 10  # item ids named in a line's tail at most (then "+N more")
FIELDS = ("worker", "queue", "item_ids")


def ids_text(item_ids: Iterable[int]) -> str:
    ids = list(item_ids)
    shown = ",".join(map(str, ids[:SHOWN_IDS]))
    return shown + (f",+{len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


class WorkerLog:
    """A logger bound to one worker's name; each call may name a queue and items."""

    def __init__(self, worker: str, logger: logging.Logger | None = None):
        self.worker = worker
        self.logger = logger or logging.getLogger("conveyor.worker")

    def log(self, level: int, msg: str, *args: Any, queue: str | None = None, items: Iterable[int] | None = None,
            exc_info: Any = None, stacklevel: int = 1) -> None:
        if not self.logger.isEnabledFor(level):
            return
        item_ids = list(items) if items is not None else None
        tail = [f"worker={self.worker}"]
        if queue is not None:
            tail.append(f"queue={queue}")
        if item_ids:
            tail.append(f"items={ids_text(item_ids)}")
        fields = f"  [{' '.join(tail)}]"
        extra = {"worker": self.worker, "queue": queue, "item_ids": item_ids, "fields_text": fields}
        # the tail joins the format string: a % in a queue name must stay a %
        self.logger.log(level, msg + (fields.replace("%", "%%") if args else fields), *args, exc_info=exc_info, extra=extra,
                        stacklevel=stacklevel + 1)

    def debug(self, msg: str, *args: Any, **fields: Any) -> None:
        self.log(logging.DEBUG, msg, *args, stacklevel=2, **fields)

    def info(self, msg: str, *args: Any, **fields: Any) -> None:
        self.log(logging.INFO, msg, *args, stacklevel=2, **fields)

    def warning(self, msg: str, *args: Any, **fields: Any) -> None:
        self.log(logging.WARNING, msg, *args, stacklevel=2, **fields)

    def error(self, msg: str, *args: Any, **fields: Any) -> None:
        self.log(logging.ERROR, msg, *args, stacklevel=2, **fields)
