"""Every refusal as one JSON body, `{"error": "...", "field": "..."}`, with a 4xx status: a user's
mistake never becomes a 5xx. StoreError (the database failed) is a 503."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ItemNotFound, StoreError, UsageError


class Refused(Exception):
    """A request refused with this status, naming the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def problem(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic error location as a field name: ('body', 3, 'priority') → body[3].priority."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "tagged-union") or str(part).startswith(("list[", "function-")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_problem(errors: list[Any], prefix: tuple[Any, ...] = ()) -> JSONResponse:
    first = errors[0]
    field = field_of(prefix + tuple(first["loc"]))
    message = f"{field}: {first['msg']}" if field else first["msg"]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return problem(422, message + more, field)


def install(api: FastAPI) -> None:
    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_problem(list(exc.errors()))

    @api.exception_handler(ValidationError)
    async def invalid_body(request: Request, exc: ValidationError) -> JSONResponse:
        return validation_problem(exc.errors(include_url=False), ("body",))

    @api.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return problem(exc.status, exc.message, exc.field, exc.headers)

    @api.exception_handler(ItemNotFound)
    async def not_found(request: Request, exc: ItemNotFound) -> JSONResponse:
        return problem(404, str(exc), "path.id")

    @api.exception_handler(UsageError)
    async def usage(request: Request, exc: UsageError) -> JSONResponse:
        return problem(400, str(exc))

    @api.exception_handler(StoreError)
    async def store_failed(request: Request, exc: StoreError) -> JSONResponse:
        return problem(503, f"the database failed: {exc}")

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
