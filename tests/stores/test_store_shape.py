"""Every store is a Store, and the dialects name their statements alike."""

from __future__ import annotations

import inspect

from conveyor.stores import postgres_queries, sqlite_queries
from conveyor.stores.base import Store

#: what each dialect's queries module must name (each backend may hold more of its own)
SHARED = {
    "MIGRATIONS", "CLAIM", "CLAIM_ORDERED", "INSERT", "RESOLVE", "RETRY", "FAIL", "RELEASE", "EXTEND_LEASES",
    "RESCUE", "GET", "GET_MANY", "FIND_DEDUP", "HAS_WORK", "CANCEL_SELECT", "CANCEL", "REQUEUE", "REQUEUE_IDS", "PURGE",
    "COUNTS", "OLDEST", "RECENT", "CREATE_MIGRATIONS", "MIGRATIONS_DONE", "RECORD_MIGRATION",
    "HAS_MIGRATIONS_TABLE", "HAS_ITEMS_TABLE", "ANALYZE_AFTER_MIGRATION",
    "CLOCK", "SCHEDULES", "SCHEDULE_CREATE", "SCHEDULE_ADVANCE",
}


def test_each_store_satisfies_the_protocol(store):
    assert isinstance(store, Store)
    for name, member in inspect.getmembers(Store):
        if name.startswith("_") or not callable(member):
            continue
        theirs = getattr(type(store), name)
        ours = inspect.signature(member)
        got = inspect.signature(theirs)
        assert list(got.parameters) == list(ours.parameters), (type(store).__name__, name, got, ours)


def test_both_dialects_name_the_shared_statements():
    for module in (sqlite_queries, postgres_queries):
        missing = SHARED - set(dir(module))
        assert not missing, f"{module.__name__} lacks {sorted(missing)}"
        for name in SHARED - {"MIGRATIONS"}:
            assert isinstance(getattr(module, name), str) and getattr(module, name).strip(), (module.__name__, name)


def test_migrations_are_numbered_in_order():
    for module in (sqlite_queries, postgres_queries):
        versions = [v for v, _, _ in module.MIGRATIONS]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
