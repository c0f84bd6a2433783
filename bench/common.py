"""What every benchmark shares: the workload's payloads, throw-away databases, and the facts about
the machine a result line records."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import sqlite3
import tempfile
from typing import Iterator

PG_ADMIN_URL = os.environ.get("CONVEYOR_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
QUEUE = "orders"


def payloads(n: int) -> list[dict]:
    """N delivery orders: an id and a pickup point scattered over a city (deterministic)."""
    return [
        {"order_id": i, "lat": round(52.30 + (i * 7919 % 10_000) / 50_000, 6),
         "lon": round(4.80 + (i * 104_729 % 10_000) / 40_000, 6)}
        for i in range(n)
    ]


@contextlib.contextmanager
def sqlite_database(tmpdir: str | None = None) -> Iterator[str]:
    """A fresh SQLite file in a temp folder; yields its path and removes the folder after."""
    folder = tempfile.mkdtemp(prefix="conveyor_bench_", dir=tmpdir)
    try:
        yield os.path.join(folder, "bench.db")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def pg_url(admin_url: str, name: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


@contextlib.contextmanager
def pg_database(admin_url: str = PG_ADMIN_URL, suffix: str = "") -> Iterator[str]:
    """CREATE DATABASE conveyor_bench_<pid>[_suffix]; yields its URL and drops it after."""
    import psycopg

    name = f"conveyor_bench_{os.getpid()}{'_' + suffix if suffix else ''}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_url(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_problem(admin_url: str = PG_ADMIN_URL) -> str | None:
    """None if PostgreSQL answers at admin_url, else why not and how to start it."""
    try:
        import psycopg

        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return (f"PostgreSQL is not reachable at {admin_url} ({type(exc).__name__}: {exc}); start it with "
                "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`")


def pg_version(admin_url: str = PG_ADMIN_URL) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        return conn.execute("SELECT current_setting('server_version')").fetchone()[0]


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "sqlite_version": sqlite3.sqlite_version,
        "cores": os.cpu_count(),
        "platform": platform.platform(terse=True),
    }


def cpu_seconds() -> float:
    """User + system CPU of this process and of its waited-for children so far. The difference
    around a drain is the CPU it cost, a figure that a busy machine disturbs far less than items/s."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
