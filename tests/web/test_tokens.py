"""Bearer tokens: none, 401; read-only, no writes; the dashboard's cookie session; no token in any
log line; and the refusal to serve a public address open."""

from __future__ import annotations

import logging

import pytest

from conveyor.errors import UsageError
from conveyor.web.auth import Tokens, is_loopback, parse_env_tokens
from tests.web.conftest import client_for

WRITE_TOKEN = "w-0123456789abcdef-secret"
READ_TOKEN = "r-fedcba9876543210-secret"


@pytest.fixture
def guarded(app):
    with client_for(app, tokens=Tokens([WRITE_TOKEN], [READ_TOKEN])) as c:
        yield c


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_without_a_token_everything_but_healthz_is_401(guarded):
    for path in ("/v1/queues", "/v1/items", "/v1/items/1", "/metrics", "/readyz", "/openapi.json", "/static/dashboard.js",
                 "/v1/history"):
        r = guarded.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert guarded.post("/v1/queues/q/items", json={"payload": 1}).status_code == 401
    assert guarded.get("/v1/queues", headers=bearer("wrong")).status_code == 401
    assert guarded.get("/v1/queues", headers={"Authorization": f"Basic {WRITE_TOKEN}"}).status_code == 401
    assert guarded.get("/healthz").status_code == 200
    page = guarded.get("/")
    assert page.status_code == 401 and 'action="/session"' in page.text and "queues" not in page.text.lower()


def test_a_read_only_token_reads_but_cannot_cancel_or_submit(app, guarded):
    item_id = app.submit("q", {})
    assert guarded.get(f"/v1/items/{item_id}", headers=bearer(READ_TOKEN)).status_code == 200
    r = guarded.post(f"/v1/items/{item_id}/cancel", headers=bearer(READ_TOKEN))
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    assert guarded.post("/v1/queues/q/items", json={"payload": 1}, headers=bearer(READ_TOKEN)).status_code == 403
    assert app.get(item_id).state == "pending"
    assert guarded.post(f"/v1/items/{item_id}/cancel", headers=bearer(WRITE_TOKEN)).status_code == 200
    assert app.get(item_id).state == "cancelled"


def test_the_dashboard_signs_in_with_a_cookie_not_a_url(app, guarded):
    assert guarded.post("/session", data={"token": "nope"}).status_code == 401
    r = guarded.post("/session", data={"token": READ_TOKEN}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and READ_TOKEN not in cookie
    page = guarded.get("/")
    assert page.status_code == 200 and 'data-can-write="no"' in page.text
    assert guarded.get("/v1/queues").status_code == 200
    item_id = app.submit("q", {})
    assert guarded.post(f"/v1/items/{item_id}/cancel", headers={"X-Conveyor-Dashboard": "1"}).status_code == 403
    guarded.post("/session", data={"token": WRITE_TOKEN})
    # a write from a signed-in browser must carry the dashboard's header (no cross-site form can)
    assert guarded.post(f"/v1/items/{item_id}/cancel").status_code == 403
    assert guarded.post(f"/v1/items/{item_id}/cancel", headers={"X-Conveyor-Dashboard": "1"}).status_code == 200
    guarded.post("/session/end", headers={"X-Conveyor-Dashboard": "1"})
    guarded.cookies.clear()
    assert guarded.get("/v1/queues").status_code == 401


def test_no_token_in_any_log_line(app, guarded, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    guarded.post("/v1/queues/q/items", json={"payload": 1}, headers=bearer(WRITE_TOKEN))
    guarded.get("/v1/queues", headers=bearer(READ_TOKEN))
    guarded.post("/v1/items/1/cancel", headers=bearer(READ_TOKEN))
    guarded.get("/v1/queues", headers=bearer("w-wrong-" + WRITE_TOKEN))
    guarded.post("/session", data={"token": WRITE_TOKEN})
    out = capsys.readouterr()
    text = caplog.text + out.out + out.err + repr(Tokens([WRITE_TOKEN], [READ_TOKEN]))
    assert WRITE_TOKEN not in text and READ_TOKEN not in text


def test_env_tokens_format():
    assert parse_env_tokens("write:aaa, read:bbb ccc") == (["aaa", "ccc"], ["bbb"])
    with pytest.raises(UsageError, match="scope"):
        parse_env_tokens("admin:xyz")
    with pytest.raises(UsageError, match="token may hold"):
        parse_env_tokens("read:")
    tokens = Tokens.from_options(["t1"], [], "read:t2")
    assert tokens.scope_of("t1") == "write" and tokens.scope_of("t2") == "read" and tokens.scope_of("t3") is None


def test_a_public_address_without_tokens_is_refused(app):
    from conveyor.web.server import serve

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(UsageError, match="--insecure"):
        serve(app, known_queues=False, host="0.0.0.0", port=0, tokens=Tokens(), insecure=False, max_body=1000)
