"""The dashboard at /: one server-rendered page and a small script (static files, no build step),
reading the same /v1 routes as any client. Signing in posts a token once (POST /session) for an
HttpOnly, SameSite=Strict session cookie: the token never appears in a URL, and the script never
holds it."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.types import Receive, Scope, Send

from ..app import App
from .auth import SESSION_COOKIE, WRITE, Tokens

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))


async def sign_in_page(scope: Scope, receive: Receive, send: Send, failed: bool = False) -> None:
    """The page / answers without a session: the sign-in form alone, status 401."""
    request = Request(scope, receive)
    page = templates.TemplateResponse(request, "sign_in.html", {"failed": failed}, status_code=401)
    await page(scope, receive, send)


def add_dashboard(api: FastAPI, app: App, known_queues: bool) -> None:
    api.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @api.get("/", include_in_schema=False, response_class=HTMLResponse)
    def index(request: Request) -> Response:
        tokens: Tokens = api.state.tokens
        return templates.TemplateResponse(request, "index.html", {
            "database": app.describe_database(), "can_write": request.scope["state"]["scope"] == WRITE,
            "signed_in": tokens.enabled, "queues": sorted(app.processors) if known_queues else [],
        })

    @api.post("/session", include_in_schema=False)
    async def sign_in(request: Request) -> Any:
        tokens: Tokens = api.state.tokens
        fields = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (fields.get("token") or [""])[0].strip()
        scope = tokens.scope_of(token) if token else None
        if scope is None:
            return templates.TemplateResponse(request, "sign_in.html", {"failed": True}, status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, tokens.open_session(scope), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    @api.post("/session/end", include_in_schema=False)
    def sign_out(request: Request) -> Any:
        tokens: Tokens = api.state.tokens
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            tokens.close_session(sid)
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response
