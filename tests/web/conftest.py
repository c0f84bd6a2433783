"""An ASGI client over `conveyor serve`'s application, for each store."""

from __future__ import annotations

import pytest

import conveyor

pytest.importorskip("fastapi", reason="the web tests need the web extra: pip install -e '.[test,web]'")

import warnings  # noqa: E402

with warnings.catch_warnings():  # a newer starlette suggests another httpx package; this one works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from conveyor.web import Tokens, create_app  # noqa: E402


def client_for(app: conveyor.App, **options) -> TestClient:
    return TestClient(create_app(app, sample=False, **options), raise_server_exceptions=False)


@pytest.fixture
def client(app):
    with client_for(app) as c:
        yield c


@pytest.fixture
def known_app(store_url):
    """An App that knows its queues: emails (a processor) and orders (a rows table)."""
    a = conveyor.App(store_url)
    a.processor("emails")(lambda item: None)
    a.rows("orders", status="status", pending="new", working="busy", done="done", dead="failed")(lambda item: None)
    yield a
    a.close()


__all__ = ["Tokens", "client_for"]
