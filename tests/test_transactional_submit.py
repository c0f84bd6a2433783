"""app.submit(..., conn=) enqueues inside the caller's own transaction, on every store: the item
exists if and only if the caller commits."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

import conveyor
from conveyor import State, UsageError


def caller_connection(url: str):
    """The caller's own connection to the store's database, with a transaction open."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        conn.execute("BEGIN")
        return conn
    return psycopg.connect(url)  # psycopg opens a transaction on the first statement


@pytest.fixture
def orders(app):
    """A table of the caller's, on the same database."""
    with app.store.transaction() as conn:
        conn.execute("CREATE TABLE caller_orders (id INTEGER PRIMARY KEY, note TEXT)")
    yield
    with app.store.transaction() as conn:
        conn.execute("DROP TABLE caller_orders")


def ph(url: str) -> str:
    return "?" if url.startswith("sqlite") else "%s"


def test_rolled_back_submit_stores_nothing(app, orders):
    conn = caller_connection(app.url)
    conn.execute(f"INSERT INTO caller_orders (id, note) VALUES (1, {ph(app.url)})", ("x",))
    item_id = app.submit("orders", {"order": 1}, conn=conn)
    assert isinstance(item_id, int)
    assert app.stats().get("orders", {}).get("total", 0) == 0  # not visible before the commit
    conn.rollback()
    conn.close()
    assert app.stats().get("orders", {}).get("total", 0) == 0


def test_committed_submit_is_stored_with_the_callers_writes_and_handled(app, orders):
    handled = []

    @app.processor("orders")
    def handle(item):
        handled.append(item.payload["order"])

    conn = caller_connection(app.url)
    conn.execute(f"INSERT INTO caller_orders (id, note) VALUES (7, {ph(app.url)})", ("x",))
    first = app.submit("orders", {"order": 7}, conn=conn, dedup_key="order-7")
    again = app.submit("orders", {"order": 7}, conn=conn, dedup_key="order-7")  # seen inside the transaction
    stored = app.submit_many("orders", [{"order": 8}, {"order": 9}], conn=conn)
    conn.commit()
    conn.close()
    assert first == again and stored == 2
    assert app.get(first).state == State.PENDING
    app.run_worker(stop_when_empty=True, install_signal_handlers=False)
    assert sorted(handled) == [7, 8, 9]
    with app.store.transaction() as own:
        assert [tuple(r) for r in own.execute("SELECT id FROM caller_orders").fetchall()] == [(7,)]


def test_a_connection_of_the_wrong_kind_or_database_is_refused(app, tmp_path):
    with pytest.raises(UsageError, match="conn"):
        app.submit("orders", {}, conn=object())
    if app.url.startswith("sqlite"):
        other = sqlite3.connect(tmp_path / "other.db")
    else:
        other = psycopg.connect(app.url.rsplit("/", 1)[0] + "/postgres")
    with pytest.raises(UsageError):
        app.submit("orders", {}, conn=other)
    other.close()
    assert conveyor.App(app.url).stats().get("orders", {}).get("total", 0) == 0
