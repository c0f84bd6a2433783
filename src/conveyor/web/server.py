"""Running the ASGI application under uvicorn, after the checks that must pass before it binds."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from ..app import App
from ..errors import UsageError
from .api import create_app
from .auth import Tokens, is_loopback

log = logging.getLogger("conveyor.web")


def serve(app: App, *, known_queues: bool, host: str, port: int, tokens: Tokens, insecure: bool, max_body: int) -> None:
    if not tokens.enabled and not is_loopback(host) and not insecure:
        raise UsageError(f"--host {host} is reachable from other machines, and no token is set: give --token "
                         "(and --read-token), or set $CONVEYOR_API_TOKENS, or pass --insecure to serve it open")
    app.migrate()  # a bad URL or an unreachable database fails here, before the port is bound
    asgi: Any = create_app(app, known_queues=known_queues, tokens=tokens, max_body=max_body)
    log.info("conveyor serve on http://%s:%s for %s (%s)", host if ":" not in host else f"[{host}]", port,
             app.describe_database(), "tokens required" if tokens.enabled else "open: no token set")
    # uvicorn's access log names method, path and status only: no header (so no token) is ever logged
    uvicorn.run(asgi, host=host, port=port, log_config=None, server_header=False, proxy_headers=False)
