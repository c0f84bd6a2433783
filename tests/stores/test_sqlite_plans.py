"""SQLite only: the claim and settle statements keep their indexes, also after ANALYZE.

The planner can abandon the partial pending index once ANALYZE has seen a table full of resolved
rows, and then scan the whole table on every claim (design.md, "Lessons measured"). These tests read
the plans SQLite actually chooses for conveyor's own statements.
"""

from __future__ import annotations

import json
import time

import pytest

from conveyor.stores import open_store
from conveyor.stores import sqlite_queries as sq

from .helpers import claim, new, tokens


@pytest.fixture
def busy_store(sqlite_url):
    """A store with thousands of resolved rows, a few pending ones, and fresh ANALYZE statistics."""
    store = open_store(sqlite_url)
    store.migrate()
    store.submit_many([new("q", i, key=f"k{i % 50}") for i in range(6000)])
    while got := claim(store, limit=1000, lease=60):
        store.resolve(tokens(got))
    store.submit_many([new("q", i, key=f"k{i % 3}") for i in range(10)])
    claim(store, limit=2)
    store._conn().execute("ANALYZE")
    yield store
    store.close()


def plan(store, sql: str, args) -> str:
    rows = store._conn().execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()
    return "\n".join(r[-1] for r in rows)


#: partial indexes whose whole length is small by design: the items workers hold right now
IN_FLIGHT = ("USING COVERING INDEX conveyor_items_running", "USING INDEX conveyor_items_running")


def table_scans(text: str) -> list[str]:
    """Plan lines that read the items table (under any alias) from end to end (a scan of the
    in-flight index, which holds only the items being run, is not one)."""
    return [line for line in text.splitlines()
            if line.startswith("SCAN ") and line.split()[1] in ("conveyor_items", "c", "o")
            and not line.endswith(IN_FLIGHT)]


def claim_args():
    return ("owner", time.time(), 30.0, 1, 5, "q", 100)


@pytest.mark.parametrize("sql_name", ["CLAIM", "CLAIM_ORDERED"])
def test_claim_uses_the_partial_pending_index(busy_store, sql_name):
    sql = getattr(sq, sql_name)
    # pinned, not left to the planner: after ANALYZE it may abandon the partial index and scan the
    # table on every claim (design.md, "Lessons measured on this machine")
    assert "INDEXED BY conveyor_items_pending" in sql
    text = plan(busy_store, sql, claim_args())
    # the UPDATE finds the chosen rows by primary key, never by scanning the table
    assert "SEARCH conveyor_items USING INTEGER PRIMARY KEY" in text, text
    assert table_scans(text) == [], text
    if sql_name == "CLAIM_ORDERED":
        assert "INDEX conveyor_items_keyed" in text, text


@pytest.mark.parametrize("name", ["RESOLVE", "RETRY", "FAIL", "RELEASE", "EXTEND_LEASES"])
def test_settle_statements_search_by_primary_key(busy_store, name):
    if name == "RESOLVE":  # one claim's ids and its token
        args: tuple = (json.dumps([1, 3]), time.time(), 2)
    else:
        args = (json.dumps([[1, 2, 0.0, "x"], [3, 4, 0.0, "y"]]), time.time())
    text = plan(busy_store, getattr(sq, name), args)
    assert "SEARCH conveyor_items USING INTEGER PRIMARY KEY" in text, text
    assert table_scans(text) == [], text


def test_rescue_reads_only_the_in_flight_index(busy_store):
    text = plan(busy_store, sq.RESCUE, (time.time(),))
    assert "conveyor_items_running" in text, text
    assert table_scans(text) == [], text


def test_every_index_is_partial_so_no_transition_writes_an_entry_for_every_row(busy_store):
    """An index over every row costs every claim and every resolve an entry update (the one
    conveyor_items_status had cost two each); each index holds only the rows of the states it
    serves, so a claim writes two entries (pending out, running in) and a resolve three (running
    out, finished and browse in), plus the keyed ones for items with a key."""
    conn = busy_store._conn()
    indexes = {name: sql for name, sql in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'conveyor_items' AND sql IS NOT NULL")}
    assert "conveyor_items_status" not in indexes and "conveyor_items_pending" in indexes, indexes
    whole = [name for name, sql in indexes.items() if " WHERE " not in sql.upper().replace("\n", " ")]
    assert whole == [], whole


def test_stats_count_from_covering_indexes(busy_store):
    """Counts read index entries only, never the table's rows (each partial index ends with
    `state` for that: SQLite does not count a partial index's condition as covered)."""
    text = plan(busy_store, sq.COUNTS.format(where=""), ())
    reads = [line for line in text.splitlines() if " conveyor_items " in f" {line} "]
    assert reads and all("USING COVERING INDEX" in line for line in reads), text


def test_claim_still_works_after_analyze(busy_store):
    got = claim(busy_store, limit=100)
    assert len(got) == 8
    assert busy_store.resolve(tokens(got)) == []


def test_first_migrate_of_a_fresh_database_reports_what_it_applied(sqlite_url):
    store = open_store(sqlite_url)
    try:
        applied = store.migrate()
        assert applied and applied == sorted(applied) and applied[0] == 1
        assert store.migrate() == []
    finally:
        store.close()
    again = open_store(sqlite_url)
    try:
        assert again.migrate() == []
    finally:
        again.close()
