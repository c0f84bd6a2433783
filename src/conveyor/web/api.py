"""The HTTP API under /v1 (intake, items, queues), health and metrics: a thin shell over App.

With an app (`conveyor serve MODULE:APP`) the server knows its queues, and a queue it does not know
is a 404; without one it serves whatever the database holds. A table processed in place
(@app.rows) shows in the stats as a table; its rows are the application's, so it takes no submits
and no requeues here. Pause and resume are routes beside requeue; what else the store reports of a
queue (its limits, say) passes through the queue stats as the store gives it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import TypeAdapter

from ..app import App
from ..errors import UsageError, shown
from ..model import STATES, NewItem
from . import errors
from .auth import Tokens
from .live import LiveStats
from .metrics import exposition, registry_for
from .middleware import MAX_BODY, BodyLimit, TokenGate
from .models import (
    TEXT_MAX,
    Cancelled,
    History,
    ItemOut,
    ItemPage,
    KeyBody,
    NewItemBody,
    Paused,
    Problem,
    Queues,
    RequeueBody,
    Requeued,
    Submitted,
    SubmittedMany,
)

PAGE_MAX = 1000
ONE = TypeAdapter(NewItemBody)
MANY = TypeAdapter(list[NewItemBody])
QueueName = Annotated[str, Path(min_length=1, max_length=200, description="The queue's name")]
State = Literal["pending", "in_progress", "resolved", "dead", "cancelled"]
assert set(State.__args__) == set(STATES)  # type: ignore[attr-defined]
REFUSALS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (400, 401, 403, 404, 409, 413, 422)}
SUBMIT_SCHEMA = {"oneOf": [{"$ref": "#/components/schemas/NewItemBody"},
                           {"type": "array", "items": {"$ref": "#/components/schemas/NewItemBody"}}]}


def _no_nul(value: str | None, field: str) -> None:
    if value is not None and "\x00" in value:
        raise errors.Refused(400, f"{field}: must not contain NUL characters", field)


def _utc(moment: dt.datetime | None) -> dt.datetime | None:
    """A run_at without a zone is UTC (the server's local time would surprise a remote client)."""
    return moment.replace(tzinfo=dt.UTC) if moment is not None and moment.tzinfo is None else moment


def create_app(app: App, *, known_queues: bool = False, tokens: Tokens | None = None, max_body: int = MAX_BODY,
               sample: bool = True) -> Any:
    """The ASGI application of `conveyor serve` over `app`. known_queues: the app's processors are
    the queues served (others are refused); else every queue the database holds. sample: keep the
    charts' history (a background read every 2 s)."""
    from .dashboard import add_dashboard, sign_in_page

    tokens = tokens or Tokens()
    live = LiveStats(app, sorted(app.processors) if known_queues else None)
    registry = registry_for(live)
    rows_tables = {q for q, p in app.processors.items() if p.rows is not None}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if sample:
            live.start()
        try:
            yield
        finally:
            live.stop()

    api = FastAPI(title="conveyor", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Submit items, browse them, requeue and cancel them. With tokens set, send "
                              "`Authorization: Bearer TOKEN` (a read-only token may only GET).")
    api.state.live = live
    api.state.app = app
    api.state.tokens = tokens
    errors.install(api)

    def check_queue(queue: str, where: str = "path.queue", writing: bool = False) -> str:
        _no_nul(queue, where)
        try:
            from ..app import check_queue_name

            check_queue_name(queue)
        except UsageError as exc:
            raise errors.Refused(400, f"{where}: {exc}", where) from None
        if known_queues and queue not in app.processors:
            raise errors.Refused(404, f"{where}: unknown queue {shown(queue)}: this server's app has "
                                      f"{', '.join(sorted(app.processors)) or 'no queues'}", where)
        if writing and queue in rows_tables:
            raise errors.Refused(409, f"{where}: {shown(queue)} is a table processed in place: its rows are "
                                      "the application's (insert rows, or set their status, in the table itself)", where)
        return queue

    # -- intake ---------------------------------------------------------------------------------
    @api.post("/v1/queues/{queue}/items", status_code=201, response_model=Submitted | SubmittedMany, responses=REFUSALS,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": SUBMIT_SCHEMA}}}},
              summary="Submit one item, or a list (all or nothing)")
    async def submit(request: Request, queue: QueueName,
                     idempotency_key: Annotated[str | None, Header(max_length=TEXT_MAX)] = None) -> Any:
        """One item (an object) or a list of them, stored in one transaction: a list is stored
        whole or not at all. `Idempotency-Key` is the dedup key of a single item, and of a list
        item n (without its own) `KEY/n`: a repeated request stores nothing new (a single item's id
        is that of the item stored first; a list's ids are null)."""
        check_queue(queue, writing=True)
        _no_nul(idempotency_key, "header.idempotency-key")
        if idempotency_key == "":
            raise errors.Refused(400, "header.idempotency-key: must not be empty", "header.idempotency-key")
        raw = await request.body()
        try:
            body = json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "it nests too deep"
            raise errors.Refused(400, f"body: not valid JSON ({reason})", "body") from None
        if isinstance(body, list):
            entries = MANY.validate_python(body)
            return await run_in_threadpool(_submit_many, app, queue, entries, idempotency_key)
        entry = ONE.validate_python(body)
        if idempotency_key is not None and entry.dedup_key not in (None, idempotency_key):
            raise errors.Refused(400, "header.idempotency-key: differs from the body's dedup_key", "header.idempotency-key")
        try:
            item_id = await run_in_threadpool(
                app.submit, queue, entry.payload, key=entry.key, dedup_key=entry.dedup_key or idempotency_key,
                run_at=_utc(entry.run_at), priority=entry.priority)
        except UsageError as exc:
            raise errors.Refused(400, str(exc), "body") from None
        return Submitted(id=item_id)

    # -- items ----------------------------------------------------------------------------------
    @api.get("/v1/items/{id}", response_model=ItemOut, responses=REFUSALS, summary="One item, whole")
    def get_item(id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> ItemOut:  # noqa: A002 - the route's own name
        return ItemOut.of(app.get(id))

    @api.get("/v1/items", response_model=ItemPage, responses=REFUSALS, summary="Items, newest first, a page at a time")
    def list_items(queue: Annotated[str | None, Query(max_length=200)] = None, state: State | None = None,
                   key: Annotated[str | None, Query(max_length=TEXT_MAX)] = None,
                   after: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="The `next` of the previous page")] = None,
                   limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 50) -> ItemPage:
        """Keyset pages by id, newest first: each reads an index in id order, never the whole table.
        `after` is the last id of the previous page (its `next`)."""
        if queue is not None:
            check_queue(queue, "query.queue")
        _no_nul(key, "query.key")
        page = app.items(queue, state=state, key=key, before_id=after, limit=limit)
        return ItemPage(items=[ItemOut.of(it) for it in page], next=page[-1].id if len(page) == limit else None)

    @api.post("/v1/items/{id}/cancel", response_model=Cancelled, responses=REFUSALS, summary="Cancel a pending or running item")
    def cancel(id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> Cancelled:  # noqa: A002
        if known_queues:
            check_queue(app.get(id).queue, "path.id")
        try:
            app.cancel(id)
        except UsageError as exc:
            if type(exc) is UsageError:  # pending or running only: the item's state is the conflict
                raise errors.Refused(409, str(exc), "path.id") from None
            raise
        return Cancelled(id=id)

    # -- queues ---------------------------------------------------------------------------------
    @api.get("/v1/queues", response_model=Queues, responses=REFUSALS, summary="Counts by state per queue")
    def queues() -> Queues:
        return Queues.model_validate({"queues": live.read()})

    @api.post("/v1/queues/{queue}/requeue", response_model=Requeued, responses=REFUSALS,
              summary="Dead and cancelled items back to pending")
    def requeue(queue: QueueName, body: RequeueBody | None = None) -> Requeued:
        check_queue(queue, writing=True)
        return Requeued(requeued=app.requeue(queue, None if body is None else body.ids))

    @api.post("/v1/queues/{queue}/pause", response_model=Paused, responses=REFUSALS,
              summary="Claim nothing more of a queue (or of one key of it) on any worker")
    def pause(queue: QueueName, body: KeyBody | None = None) -> Paused:
        check_queue(queue)
        key = None if body is None else body.key
        _no_nul(key, "body.key")
        app.pause(queue, key=key)
        return Paused(queue=queue, key=key, paused=True)

    @api.post("/v1/queues/{queue}/resume", response_model=Paused, responses=REFUSALS, summary="Undo a pause")
    def resume(queue: QueueName, body: KeyBody | None = None) -> Paused:
        check_queue(queue)
        key = None if body is None else body.key
        _no_nul(key, "body.key")
        return Paused(queue=queue, key=key, paused=False, was=app.resume(queue, key=key))

    @api.get("/v1/history", response_model=History, responses=REFUSALS,
             summary="The dashboard's charts: throughput and lag per queue over the last minutes")
    def history() -> dict[str, Any]:
        return live.history()

    # -- health and metrics ---------------------------------------------------------------------
    @api.get("/healthz", summary="The process is up (no token needed)")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @api.get("/readyz", responses={503: {"model": Problem}}, summary="The database answers")
    def readyz() -> dict[str, bool]:
        app.migrate()  # with the schema current (always, once open): one read of the migrations table
        return {"ready": True}

    @api.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(exposition(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    base_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, plus the submit body's models (the route reads its body itself, to
        tell a list from one item and name the field at fault) and the bearer scheme."""
        schema = api.openapi_schema
        if schema is None:
            schema = base_openapi()
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(
                MANY.json_schema(ref_template="#/components/schemas/{model}")["$defs"])
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            if tokens.enabled:
                schema["security"] = [{"bearer": []}]
        return schema

    api.openapi = openapi  # type: ignore[method-assign]
    add_dashboard(api, app, known_queues)
    gated = TokenGate(api, tokens, sign_in_page)
    return BodyLimit(gated, max_body)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _submit_many(app: App, queue: str, entries: list[NewItemBody], idempotency_key: str | None) -> SubmittedMany:
    items: list[NewItem] = []
    for n, e in enumerate(entries):
        dedup = e.dedup_key or (None if idempotency_key is None else f"{idempotency_key}/{n}")
        try:
            items.append(app.new_item(queue, e.payload, e.key, dedup, _utc(e.run_at), e.priority, f"body[{n}]"))
        except UsageError as exc:
            raise errors.Refused(400, str(exc), f"body[{n}]") from None
    ids: list[int | None] = []
    stored = app.submit_items(items, on_ids=ids.extend) if items else 0
    return SubmittedMany(stored=stored, ids=ids)
