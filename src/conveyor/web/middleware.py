"""Two gates every request passes before a route sees it: the body size limit and the tokens."""

from __future__ import annotations

import json
from collections.abc import Sequence
from http.cookies import SimpleCookie
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import READ, SESSION_COOKIE, WRITE, Tokens

#: bodies larger than this are refused with 413 (conveyor serve --max-body)
MAX_BODY = 1024 * 1024
#: routes open without a token: liveness, and the sign-in that takes one
OPEN_PATHS = {"/healthz", "/session"}
#: a cookie-signed-in browser's writes must carry this header, which no cross-site form can set
DASHBOARD_HEADER = b"x-conveyor-dashboard"


async def _send_json(send: Send, status: int, error: str, field: str,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps({"error": error, "field": field}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Refuse a body over `limit` bytes with 413, by its Content-Length or, streamed, as it arrives
    (the whole body is then replayed to the route: at most `limit` bytes are held)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"the request body is larger than {self.limit:,} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_json(send, 400, "Content-Length is not a number", "header.content-length")
                if declared > self.limit:
                    return await _send_json(send, 413, too_big, "body")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _send_json(send, 413, too_big, "body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def request_scope(tokens: Tokens, scope: Scope) -> tuple[str | None, bool]:
    """(write, read or None, whether it came from the dashboard's cookie)."""
    auth = _header(scope, b"authorization")
    if auth is not None:
        kind, _, token = auth.partition(" ")
        return (tokens.scope_of(token.strip()) if kind.lower() == "bearer" else None), False
    cookie = _header(scope, b"cookie")
    if cookie:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(cookie)
        except Exception:  # noqa: BLE001 - a malformed cookie header is no session
            return None, False
        if SESSION_COOKIE in jar:
            return tokens.session_scope(jar[SESSION_COOKIE].value), True
    return None, False


class TokenGate:
    """With tokens set: no token, 401 (the dashboard's page answers with its sign-in form); a
    read-only token, 403 on anything but GET and HEAD. The scope goes to routes in
    scope["state"]["scope"]. Without tokens everything is open and write."""

    def __init__(self, app: ASGIApp, tokens: Tokens, sign_in_page: Any):
        self.app, self.tokens, self.sign_in_page = app, tokens, sign_in_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})
        if not self.tokens.enabled:
            scope["state"]["scope"] = WRITE
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path in OPEN_PATHS:
            scope["state"]["scope"] = None
            return await self.app(scope, receive, send)
        granted, by_cookie = request_scope(self.tokens, scope)
        if granted is None:
            if path == "/" and method in ("GET", "HEAD"):
                return await self.sign_in_page(scope, receive, send)
            return await _send_json(send, 401, "a token is needed: Authorization: Bearer TOKEN", "header.authorization",
                                    [(b"www-authenticate", b'Bearer realm="conveyor"')])
        if method not in ("GET", "HEAD"):
            if granted == READ:
                return await _send_json(send, 403, "this token is read-only: writing needs a --token one",
                                        "header.authorization")
            if by_cookie and _header(scope, DASHBOARD_HEADER) is None:
                return await _send_json(send, 403, "a signed-in browser's write must come from the dashboard",
                                        "header.x-conveyor-dashboard")
        scope["state"]["scope"] = granted
        await self.app(scope, receive, send)
