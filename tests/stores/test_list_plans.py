"""list_items reads an index in id order and stops at the page: it never walks or sorts the table.

A table of ~26k items (a queue with 20k finished items, a backlog of pending ones behind another
queue's newer items, a few dead and cancelled ones, keyed items) is browsed every way the CLI and
the HTTP API do, with the statistics as a bulk submit left them (stale: everything was pending
then) and again after ANALYZE. Each statement the store runs is checked: SQLite's EXPLAIN QUERY
PLAN must not scan the items table nor sort what it read from it; PostgreSQL's EXPLAIN ANALYZE
must use no sequential scan, and the rows it read from the table must stay far below its size.
"""

from __future__ import annotations

import json

from conveyor.model import NewItem
from conveyor.stores.postgres_queries import LIST_WINDOW

from .helpers import claim, tokens

BACKLOG = 1500
LIMIT = 50
# (queue, state, key, a walk of one index?); walks read about a page, the others at most the
# newest LIST_WINDOW rows and then one queue's pending backlog
SHAPES = [
    ("big", None, None, False),
    ("big", "pending", None, False),
    ("big", "in_progress", None, True),
    ("big", "resolved", None, True),
    ("big", "dead", None, True),
    ("big", "cancelled", None, True),
    ("big", None, "k3", True),
    ("big", "resolved", "k3", True),
    ("big", "pending", "k3", True),
    ("big", "dead", "k3", True),
    (None, "dead", None, True),
    (None, None, "k3", True),
    (None, None, None, True),
]


def build(store) -> int:
    items = [NewItem("big", json.dumps(i), f"k{i % 20}" if i % 5 == 0 else None) for i in range(20_000)]
    store.submit_many(items)
    first = True
    while got := claim(store, "big", limit=2000, lease=300):
        if first:  # a few go dead or are cancelled, the rest resolve
            store.fail([(it.id, it.claim_token, "Fail: no") for it in got[:30]])
            for it in got[30:40]:
                store.cancel(it.id)
            got, first = got[40:], False
        store.resolve(tokens(got))
    store.submit_many([NewItem("big", json.dumps(i), "k3" if i % 10 == 0 else None) for i in range(BACKLOG)])
    claim(store, "big", limit=40, lease=300)
    store.submit_many([NewItem("other", json.dumps(i)) for i in range(5000)])
    return 20_000 + BACKLOG + 5000


def sqlite_statements(store, call) -> list[str]:
    conn = store._conn()
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        call()
    finally:
        conn.set_trace_callback(None)
    return [s for s in seen if s.lstrip().upper().startswith(("SELECT", "WITH"))]


def sqlite_problems(store, sql: str) -> list[str]:
    """Plan lines that scan the items table, or sort rows read from it (rather than a page). Pending
    and running ids are sorted from the indexes that cover them (no row read but the page's; the
    cost is the queue's backlog of index entries, bounded as on PostgreSQL)."""
    rows = store._conn().execute("EXPLAIN QUERY PLAN " + sql).fetchall()
    detail = {r[0]: r[3] for r in rows}
    ids_only = ("USING COVERING INDEX conveyor_items_pending", "USING COVERING INDEX conveyor_items_running")
    reads_items = {r[1] for r in rows if r[3].startswith(("SEARCH conveyor_items", "SCAN conveyor_items"))
                   and not any(c in r[3] for c in ids_only)}
    bad = [r[3] for r in rows if r[3].startswith("SCAN conveyor_items")]
    bad += [f"{r[3]} (beside {detail.get(r[1], 'top')})" for r in rows
            if r[3].startswith("USE TEMP B-TREE") and r[1] in reads_items]
    return bad


def pg_rows_read(plan: dict) -> tuple[int, list[str]]:
    """Rows the plan read from the items table, and its sequential scans of it."""
    read, seq = 0, []
    stack = [plan["Plan"]]
    while stack:
        node = stack.pop()
        stack.extend(node.get("Plans", []))
        if node.get("Relation Name") == "conveyor_items":
            if node["Node Type"] == "Seq Scan":
                seq.append(node["Node Type"])
            loops = node.get("Actual Loops", 1)
            read += loops * (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
                             + node.get("Rows Removed by Index Recheck", 0))
    return read, seq


def check_shapes(store, total: int, when: str) -> None:
    pg = type(store).__name__ == "PostgresStore"
    for queue, state, key, walk in SHAPES:
        what = f"list_items({queue!r}, state={state!r}, key={key!r}) with {when}"
        call = lambda: store.list_items(queue, state=state, key=key, limit=LIMIT)  # noqa: E731
        if not pg:
            statements = sqlite_statements(store, call)
            assert statements, what
            for sql in statements:
                assert sqlite_problems(store, sql) == [], f"{what}: {sql}"
            continue
        plans: list[dict] = []
        run = store._execute

        def explained(sql, args=None):
            if sql.lstrip().upper().startswith(("SELECT *", "SELECT ID", "WITH")):
                plans.append(json.loads(run("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, args).fetchone()[0])[0])
            return run(sql, args)

        store._execute = explained
        try:
            got = call()
        finally:
            del store._execute
        assert plans, what
        read = sum(pg_rows_read(p)[0] for p in plans)
        seq = [s for p in plans for s in pg_rows_read(p)[1]]
        assert seq == [], f"{what}: {json.dumps(plans)[:3000]}"
        bound = 4 * LIMIT if walk else LIST_WINDOW + BACKLOG + 5 * LIMIT
        assert read <= bound < total / 5, f"{what}: read {read} rows: {json.dumps(plans)[:3000]}"
        assert len(got) == LIMIT or state in ("in_progress", "dead", "cancelled") or key, (what, len(got))


def test_browsing_never_walks_the_table(store):
    total = build(store)
    check_shapes(store, total, "the statistics of the bulk submit")
    if type(store).__name__ == "PostgresStore":
        store._execute("ANALYZE conveyor_items")
    else:
        store._conn().execute("ANALYZE")
    check_shapes(store, total, "fresh statistics")
