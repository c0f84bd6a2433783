"""The HTTP API on both stores, through an ASGI client: what it stores and returns, and every kind
of bad input refused with a 4xx that names the field, nothing stored."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.web.conftest import client_for


def stored(app) -> int:
    return sum(s["total"] for s in app.stats().values() if not s.get("rows"))


def test_submit_one_and_read_it_back(app, client):
    r = client.post("/v1/queues/emails/items", json={"payload": {"to": "a@b"}, "key": "k1", "priority": 3,
                                                     "run_at": "2030-01-01T00:00:00Z"})
    assert r.status_code == 201, r.text
    item_id = r.json()["id"]
    item = client.get(f"/v1/items/{item_id}").json()
    assert item["payload"] == {"to": "a@b"} and item["key"] == "k1" and item["priority"] == 3
    assert item["state"] == "pending" and item["run_at"].startswith("2030-01-01T00:00:00")
    assert app.get(item_id).payload == {"to": "a@b"}


def test_a_naive_run_at_is_utc_and_unix_seconds_work(client):
    a = client.post("/v1/queues/q/items", json={"payload": 1, "run_at": "2031-05-01T12:00:00"}).json()["id"]
    b = client.post("/v1/queues/q/items", json={"payload": 2, "run_at": 1900000000}).json()["id"]
    assert client.get(f"/v1/items/{a}").json()["run_at"].startswith("2031-05-01T12:00:00")
    assert dt.datetime.fromisoformat(client.get(f"/v1/items/{b}").json()["run_at"]).timestamp() == 1900000000


def test_a_list_is_stored_whole_with_ids(app, client):
    r = client.post("/v1/queues/emails/items", json=[{"payload": n} for n in range(5)])
    assert r.status_code == 201
    body = r.json()
    assert body["stored"] == 5 and len(body["ids"]) == 5 and None not in body["ids"]
    assert [app.get(i).payload for i in body["ids"]] == list(range(5))


def test_a_list_with_one_bad_item_stores_nothing(app, client):
    items = [{"payload": n} for n in range(3)] + [{"payload": 2**70}]
    r = client.post("/v1/queues/emails/items", json=items)
    assert r.status_code == 400 and r.json()["field"] == "body[3]"
    assert "64 bits" in r.json()["error"]
    assert stored(app) == 0


def test_idempotency_key_stores_once(app, client):
    first = client.post("/v1/queues/emails/items", json={"payload": 1}, headers={"Idempotency-Key": "abc"})
    again = client.post("/v1/queues/emails/items", json={"payload": 1}, headers={"Idempotency-Key": "abc"})
    assert first.json()["id"] == again.json()["id"]
    assert app.get(first.json()["id"]).dedup_key == "abc"
    listed = [client.post("/v1/queues/emails/items", json=[{"payload": 1}, {"payload": 2}],
                          headers={"Idempotency-Key": "batch"}).json() for _ in range(2)]
    assert listed[0]["stored"] == 2 and listed[1] == {"stored": 0, "ids": [None, None]}
    assert stored(app) == 3
    r = client.post("/v1/queues/emails/items", json={"payload": 1, "dedup_key": "x"}, headers={"Idempotency-Key": "y"})
    assert r.status_code == 400 and r.json()["field"] == "header.idempotency-key"


def test_list_filters_and_pages_by_id(app, client):
    ids = [app.submit("a", {"n": n}, key="k" if n % 2 else None) for n in range(7)]
    app.submit("b", {"n": 99})
    page = client.get("/v1/items?queue=a&limit=3").json()
    assert [it["id"] for it in page["items"]] == ids[::-1][:3] and page["next"] == ids[4]
    rest = client.get(f"/v1/items?queue=a&limit=3&after={page['next']}").json()
    assert [it["id"] for it in rest["items"]] == ids[::-1][3:6]
    keyed = client.get("/v1/items?queue=a&key=k").json()
    assert [it["id"] for it in keyed["items"]] == [i for n, i in enumerate(ids) if n % 2][::-1] and keyed["next"] is None
    assert client.get("/v1/items?state=dead").json()["items"] == []
    assert len(client.get("/v1/items").json()["items"]) == 8


def test_cancel_and_requeue(app, client):
    item_id = app.submit("emails", {})
    assert client.post(f"/v1/items/{item_id}/cancel").json() == {"id": item_id, "state": "cancelled"}
    again = client.post(f"/v1/items/{item_id}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["error"]
    assert client.post("/v1/queues/emails/requeue").json() == {"requeued": 1}
    assert app.get(item_id).state == "pending"
    app.cancel(item_id)
    other = app.submit("emails", {})
    app.cancel(other)
    assert client.post("/v1/queues/emails/requeue", json={"ids": [other]}).json() == {"requeued": 1}
    assert app.get(other).state == "pending" and app.get(item_id).state == "cancelled"
    r = client.post("/v1/queues/nothing-here/requeue")
    assert r.status_code == 400 and "nothing-here" in r.json()["error"]


def test_queues_health_and_metrics(app, client):
    app.submit_many("emails", [{}] * 3)
    assert client.get("/v1/queues").json()["queues"]["emails"]["pending"] == 3
    assert client.get("/healthz").json() == {"ok": True}
    assert client.get("/readyz").json() == {"ready": True}
    text = client.get("/metrics").text
    assert 'conveyor_items{queue="emails",state="pending"} 3.0' in text
    assert 'conveyor_items_submitted_total{queue="emails"} 3.0' in text
    assert "conveyor_oldest_pending_age_seconds" in text
    assert client.get("/openapi.json").json()["paths"]["/v1/queues/{queue}/items"]["post"]


def test_metrics_counters_grow_with_the_table(app, client):
    app.submit_many("emails", [{}] * 2)
    client.get("/metrics")
    app.submit_many("emails", [{}] * 5)
    from conveyor.web import live

    live.STATS_TTL, old = 0.0, live.STATS_TTL
    try:
        text = client.get("/metrics").text
    finally:
        live.STATS_TTL = old
    assert 'conveyor_items_submitted_total{queue="emails"} 7.0' in text


def test_with_an_app_unknown_queues_are_refused(known_app):
    with client_for(known_app, known_queues=True) as client:
        r = client.post("/v1/queues/emial/items", json={"payload": 1})
        assert r.status_code == 404 and r.json()["field"] == "path.queue" and "emails" in r.json()["error"]
        assert client.get("/v1/items?queue=emial").status_code == 404
        assert client.post("/v1/queues/emial/requeue").status_code == 404
        r = client.post("/v1/queues/orders/items", json={"payload": 1})
        assert r.status_code == 409 and "table" in r.json()["error"]
        assert client.post("/v1/queues/emails/items", json={"payload": 1}).status_code == 201
        queues = client.get("/v1/queues").json()["queues"]
        assert set(queues) == {"emails", "orders"} and queues["orders"]["rows"] is True
    assert stored(known_app) == 1


@pytest.mark.parametrize("body, field", [
    (b"{not json", "body"),
    (b'{"payload": NaN}', "body"),
    (b"[" * 5000 + b"]" * 5000, "body"),
    (b'{"payload": 1, "priority": "high"}', "body.priority"),
    (b'{"payload": 1, "priority": 1.5}', "body.priority"),
    (b'{"payload": 1, "priority": 9223372036854775808}', "body.priority"),
    (b'{"payload": 1, "key": 7}', "body.key"),
    (b'{"payload": 1, "key": ""}', "body.key"),
    (b'{"payload": 1, "dedup_key": []}', "body.dedup_key"),
    (b'{"payload": 1, "run_at": "yesterday"}', "body.run_at"),
    (b'{"payload": 1, "colour": "red"}', "body.colour"),
    (b'{"key": "k"}', "body.payload"),
    (b'"just a string"', "body"),
    (b'[{"payload": 1}, {"payload": 2, "priority": "x"}]', "body[1].priority"),
    (b'{"payload": 1, "key": "a\\u0000b"}', "body"),
    (b'{"payload": 123456789012345678901234567890}', "body"),
])
def test_bad_bodies_are_4xx_naming_the_field(app, client, body, field):
    r = client.post("/v1/queues/emails/items", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["field"] == field, r.json()
    assert r.json()["error"]
    assert stored(app) == 0


@pytest.mark.parametrize("method, path, field", [
    ("get", "/v1/items/0", "path.id"),
    ("get", "/v1/items/abc", "path.id"),
    ("get", "/v1/items/99999999999999999999", "path.id"),
    ("get", "/v1/items/12345", "path.id"),
    ("post", "/v1/items/-1/cancel", "path.id"),
    ("post", "/v1/items/777/cancel", "path.id"),
    ("get", "/v1/items?limit=0", "query.limit"),
    ("get", "/v1/items?limit=100000", "query.limit"),
    ("get", "/v1/items?state=lost", "query.state"),
    ("get", "/v1/items?after=x", "query.after"),
    ("get", "/v1/items?queue=a%20b", "query.queue"),
    ("get", "/v1/items?key=a%00b", "query.key"),
    ("post", "/v1/queues/a%20b/items", "path.queue"),
    ("post", "/v1/queues/a%00b/items", "path.queue"),
    ("post", "/v1/queues/" + "q" * 201 + "/items", "path.queue"),
])
def test_bad_ids_queues_and_queries_are_4xx(client, method, path, field):
    kwargs = {"json": {"payload": 1}} if path.endswith("/items") else {}
    r = getattr(client, method)(path, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["field"] == field, r.json()


def test_requeue_body_is_checked(app, client):
    app.submit("emails", {})
    for body in ({"ids": "all"}, {"ids": [0]}, {"ids": [1.5]}, {"what": 1}):
        r = client.post("/v1/queues/emails/requeue", json=body)
        assert r.status_code == 422 and r.json()["field"].startswith("body.") or r.json()["field"] == "body", r.json()


def test_bodies_over_the_limit_are_413(app):
    with client_for(app, max_body=1000) as client:
        r = client.post("/v1/queues/emails/items", json={"payload": "x" * 2000})
        assert r.status_code == 413 and r.json()["field"] == "body"

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(20):
                yield b"x" * 100

        r = client.post("/v1/queues/emails/items", content=chunks())
        assert r.status_code == 413
        assert client.post("/v1/queues/emails/items", json={"payload": "small"}).status_code == 201
    assert stored(app) == 1


def test_unknown_routes_are_json_404(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]


def test_pause_and_resume_a_queue_or_a_key(app, client):
    assert client.post("/v1/queues/emails/pause").json() == {"queue": "emails", "key": None, "paused": True, "was": None}
    assert client.post("/v1/queues/emails/pause", json={"key": "acct-1"}).json()["key"] == "acct-1"
    assert client.post("/v1/queues/emails/resume").json()["was"] is True
    assert client.post("/v1/queues/emails/resume").json()["was"] is False
    assert client.post("/v1/queues/emails/resume", json={"key": "acct-1"}).json()["was"] is True
    for body in ({"key": 5}, {"key": ""}, {"queue": "x"}):
        r = client.post("/v1/queues/emails/pause", json=body)
        assert r.status_code == 422 and r.json()["field"].startswith("body"), r.json()
    assert client.post("/v1/queues/a%20b/pause").json()["field"] == "path.queue"
