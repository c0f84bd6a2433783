"""`conveyor serve`: the HTTP intake API under /v1, the live dashboard at /, and /metrics, in one
ASGI application over an App (the same calls the CLI makes). Needs the `web` extra."""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - said in one line by the CLI
    raise ImportError(f"conveyor serve needs the web extra: pip install 'conveyor[web]' ({exc.name} is missing)") from exc

from .api import create_app
from .auth import Tokens

__all__ = ["Tokens", "create_app"]
