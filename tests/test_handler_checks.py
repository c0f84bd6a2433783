"""@app.processor refuses, at decoration time, a handler its items could never call: otherwise every
item of it spends all its attempts on a TypeError and dies."""

from __future__ import annotations

import functools

import pytest

import conveyor
from conveyor import UsageError


@pytest.fixture
def app(sqlite_url):
    return conveyor.App(sqlite_url)


def test_non_callable_handler_is_refused(app):
    with pytest.raises(UsageError, match="must be a function, not int"):
        app.processor("q")(42)
    assert "q" not in app.processors


def test_decorator_without_queue_name_says_so(app):
    with pytest.raises(UsageError, match="queue name is missing"):
        @app.processor
        def handle(item):
            pass


@pytest.mark.parametrize("options, handler, shape", [
    ({}, lambda: None, r"\(item\)"),
    ({}, lambda item, extra: None, r"\(item\)"),
    ({}, lambda **kw: None, r"\(item\)"),
    ({"batch": True}, lambda: None, r"\(items\)"),
    ({"transactional": True}, lambda item: None, r"\(item, conn\)"),
    ({"transactional": True, "batch": True}, lambda items: None, r"\(items, conn\)"),
    ({"transactional": True}, lambda item, conn, more: None, r"\(item, conn\)"),
])
def test_handler_that_cannot_take_its_arguments_is_refused(app, options, handler, shape):
    with pytest.raises(UsageError, match=shape):
        app.processor("q", **options)(handler)
    assert "q" not in app.processors


@pytest.mark.parametrize("options, handler", [
    ({}, lambda item: None),
    ({}, lambda item, extra=1: None),
    ({}, lambda *args: None),
    ({"batch": True}, lambda items: None),
    ({"transactional": True}, lambda item, conn: None),
    ({"transactional": True}, lambda *a, **k: None),
])
def test_handlers_that_fit_are_accepted(app, options, handler):
    assert app.processor("q", **options)(handler) is handler
    assert app.processors["q"].handler is handler


def test_async_handlers_methods_and_partials_are_checked_too(app):
    async def needs_two(item, conn):
        pass

    with pytest.raises(UsageError, match=r"\(item\)"):
        app.processor("a")(needs_two)

    class Handler:
        def __call__(self, item):
            pass

        def method(self, item):
            pass

    app.processor("b")(Handler())
    app.processor("c")(Handler().method)
    app.processor("d", transactional=True)(functools.partial(needs_two))
    with pytest.raises(UsageError, match=r"\(item\)"):
        app.processor("e")(functools.partial(needs_two))
    assert sorted(app.processors) == ["b", "c", "d"]
