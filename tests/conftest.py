"""Shared fixtures: a real database per test, for every store.

`store_url` is parametrized over the stores: a fresh SQLite file per test, and one PostgreSQL
database per test run (emptied between tests). PostgreSQL tests fail in CI when the server is
missing and skip elsewhere, saying how to start it.
"""

from __future__ import annotations

import os
import uuid

import pytest

import conveyor

PG_ADMIN_URL = os.environ.get("CONVEYOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_HINT = (
    "PostgreSQL is not reachable at 127.0.0.1:5432; start it with "
    "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
    "(or set CONVEYOR_TEST_PG to an admin URL)"
)

STORES = ["sqlite", "postgres"]


def _pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3, autocommit=True):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return f"{PG_HINT} ({type(exc).__name__}: {exc})"


@pytest.fixture(scope="session")
def pg_database():
    """One PostgreSQL database for this test run, dropped afterwards. Yields its URL."""
    problem = _pg_available()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    import psycopg

    name = f"conveyor_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_reset(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('conveyor_items')").fetchone()[0]
        if exists:
            conn.execute("TRUNCATE conveyor_items RESTART IDENTITY")
        for table in ("conveyor_controls", "conveyor_rates", "conveyor_periodic"):  # flow control, schedules
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]:
                conn.execute(f"TRUNCATE {table}")


@pytest.fixture(params=STORES)
def store_url(request, tmp_path):
    """A database URL with an empty conveyor schema, for each store."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'conveyor.db'}"
    else:
        url = request.getfixturevalue("pg_database")
        _pg_reset(url)
        yield url


@pytest.fixture
def store(store_url):
    from conveyor.stores import open_store

    s = open_store(store_url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def app(store_url):
    a = conveyor.App(store_url)
    yield a
    a.close()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'conveyor.db'}"


@pytest.fixture
def slow_poll(monkeypatch):
    """Idle workers of this test re-poll their queues once a minute instead of every half second, so
    an item an idle worker starts within seconds was started by a wake-up (a submit in this process,
    a NOTIFY, stop()), never found by a poll: a missing wake-up fails the test instead of hiding
    behind the next poll. Applies to Workers created after the fixture."""
    import conveyor.worker.lanes
    import conveyor.worker.loop

    monkeypatch.setattr(conveyor.worker.lanes, "POLL_MIN", 60.0)
    monkeypatch.setattr(conveyor.worker.lanes, "IDLE_MAX", 60.0)
    monkeypatch.setattr(conveyor.worker.loop, "IDLE_MAX", 60.0)
