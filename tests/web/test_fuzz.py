"""Property-based fuzzing from /openapi.json (schemathesis): whatever a client sends, the answer is
never a 5xx, what it says matches the schema, and whatever was stored reads back as sent."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conveyor.web import create_app  # noqa: E402

#: per operation and store: enough to reach every field with wrong and odd values, in seconds
EXAMPLES = 30


#: every operation of /openapi.json (checked against it below, so a new route is fuzzed too)
OPERATIONS = [
    ("/v1/queues/{queue}/items", "POST"), ("/v1/items/{id}", "GET"), ("/v1/items", "GET"),
    ("/v1/items/{id}/cancel", "POST"), ("/v1/queues", "GET"), ("/v1/queues/{queue}/requeue", "POST"),
    ("/v1/queues/{queue}/pause", "POST"), ("/v1/queues/{queue}/resume", "POST"), ("/v1/history", "GET"),
    ("/healthz", "GET"), ("/readyz", "GET"), ("/metrics", "GET"),
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def check_stored(app, case, response) -> None:
    """A submit that succeeded stored each item as sent."""
    if not (case.method == "POST" and case.path.endswith("/items") and response.status_code == 201):
        return
    sent = case.body if isinstance(case.body, list) else [case.body]
    body = response.json()
    ids = body["ids"] if "ids" in body else [body["id"]]
    for entry, item_id in zip(sent, ids):
        if item_id is not None and entry.get("dedup_key") is None and "Idempotency-Key" not in (case.headers or {}):
            item = app.get(item_id)
            assert item.payload == json.loads(json.dumps(entry["payload"]))
            assert item.key == entry.get("key") and item.priority == entry.get("priority", 0)


@pytest.mark.parametrize("path, method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_no_5xx_and_nothing_garbled(app, path, method):
    app.submit("seed", {"n": 1})
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(app, sample=False))
    assert {(p, m.upper()) for p, ops in schema.raw_schema["paths"].items() for m in ops} == set(OPERATIONS)

    @given(case=schema[path][method].as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def fuzz(case):
        response = case.call()
        case.validate_response(response, checks=CHECKS)
        check_stored(app, case, response)

    fuzz()
