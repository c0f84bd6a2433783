"""The API's request and response bodies (pydantic): what /openapi.json describes."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictInt, StrictStr

from ..app import INT64_MAX, INT64_MIN
from ..model import STATES, Item

#: key, dedup_key and Idempotency-Key: PostgreSQL's btree refuses index entries past ~2,700 bytes
TEXT_MAX = 1000
Text = Annotated[StrictStr, Field(min_length=1, max_length=TEXT_MAX)]
Priority = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
ItemId = Annotated[int, Field(ge=1, le=INT64_MAX)]


class NewItemBody(BaseModel):
    """One item to submit. run_at: an ISO 8601 time (UTC when it names no zone) or unix seconds;
    omitted, the item is due now."""

    model_config = ConfigDict(extra="forbid")

    payload: JsonValue = Field(description="Any JSON value; integers must fit in 64 bits")
    key: Text | None = Field(None, description="Ordering key: items of one key run one at a time on an ordered queue")
    dedup_key: Text | None = Field(None, description="Stored once per queue: a repeat returns the first")
    priority: Priority = Field(0, description="Higher first")
    run_at: dt.datetime | None = Field(None, description="Not before this time")


class Submitted(BaseModel):
    id: int


class SubmittedMany(BaseModel):
    stored: int = Field(description="Items stored; the rest were already stored under their dedup key")
    ids: list[int | None] = Field(description="Each item's new id, null where its dedup key was already stored")


class ItemOut(BaseModel):
    id: int
    queue: str
    state: str = Field(json_schema_extra={"enum": list(STATES)})
    key: str | None
    dedup_key: str | None
    priority: int
    attempts: int
    max_attempts: int | None
    run_at: dt.datetime | None
    created_at: dt.datetime | None
    finished_at: dt.datetime | None
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    last_error: str | None
    payload: Any

    @classmethod
    def of(cls, item: Item) -> ItemOut:
        return cls(id=item.id, queue=item.queue, state=str(item.state), key=item.key, dedup_key=item.dedup_key,
                   priority=item.priority, attempts=item.attempts, max_attempts=item.max_attempts, run_at=item.run_at,
                   created_at=item.created_at, finished_at=item.finished_at, lease_owner=item.lease_owner,
                   lease_expires_at=item.lease_expires_at, last_error=item.last_error, payload=item.payload)


class ItemPage(BaseModel):
    items: list[ItemOut] = Field(description="Newest first")
    next: int | None = Field(description="Pass as `after` for the next page; null on the last page")


class QueueStats(BaseModel):
    """A queue's counts by state (a table processed in place: its rows by what their status value
    stands for, `rows` true, `other` its rows of the application's own statuses). Keys the store
    adds later (a paused flag, a rate limit) pass through as they are."""

    model_config = ConfigDict(extra="allow")

    pending: int
    in_progress: int
    resolved: int
    dead: int
    cancelled: int
    total: int
    oldest_pending_seconds: float | None
    resolved_last_minute: int
    rows: bool = False


class Queues(BaseModel):
    queues: dict[str, QueueStats]


class RequeueBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[ItemId] | None = Field(None, max_length=10_000,
                                     description="Only these dead or cancelled items (default: all of the queue's)")


class KeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: Text | None = Field(None, description="Only this key of the queue (default: the whole queue)")


class Paused(BaseModel):
    queue: str
    key: str | None
    paused: bool = Field(description="Whether it is paused now (resume: false, and `was` says if it had been)")
    was: bool | None = None


class Requeued(BaseModel):
    requeued: int


class Cancelled(BaseModel):
    id: int
    state: str = "cancelled"


class History(BaseModel):
    """Samples taken every few seconds by this server: per queue, items finished per second and the
    oldest pending item's age, over the last minutes."""

    t: list[float] = Field(description="Unix seconds of each sample")
    queues: dict[str, dict[str, list[float | None]]]


class Problem(BaseModel):
    error: str = Field(description="What is wrong, naming the field")
    field: str | None = Field(None, description="The field, as body.priority, query.limit, path.id or header.idempotency-key")
