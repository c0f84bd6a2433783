"""What every benchmark shares: the workload's payloads, throw-away databases, and the facts about
the machine a result line records."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import resource
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from queue import Empty
from typing import Any

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
        "code": code_version(),
    }


def code_version() -> str | None:
    """The commit measured, '+dirty' if src/ has uncommitted changes (others edit it while benches run)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 - no git: say nothing rather than fail the run
        return None
    return (head + ("+dirty" if dirty else "")) or None


def cpu_seconds() -> float:
    """User + system CPU of this process and of its waited-for children so far. The difference
    around a drain is the CPU it cost, a figure that a busy machine disturbs far less than items/s."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# -- shared by the suite's workloads (latency, steady, bigtable, horizon, scaling, memory) --------

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STORES = ("sqlite", "postgres")


@contextlib.contextmanager
def fresh_url(store: str, pg_admin: str = PG_ADMIN_URL, tmpdir: str | None = None, suffix: str = "") -> Iterator[str]:
    """A fresh, empty database of either store: a SQLite temp file, or CREATE DATABASE (dropped after)."""
    if store == "sqlite":
        with sqlite_database(tmpdir) as path:
            yield f"sqlite:///{path}"
    else:
        with pg_database(pg_admin, suffix=suffix) as url:
            yield url


def stores_from(choice: str, pg_admin: str = PG_ADMIN_URL, console=None) -> list[str]:
    """'sqlite' | 'postgres' | 'all' → the stores to run; PostgreSQL dropped (with the reason) if down."""
    stores = list(STORES) if choice == "all" else [choice]
    if "postgres" in stores:
        problem = pg_problem(pg_admin)
        if problem:
            if choice == "postgres":
                raise SystemExit(f"{problem}")
            (console.print if console else print)(f"skipping postgres: {problem}")
            stores.remove("postgres")
    return stores


def base_line(workload: str, store: str, pg_admin: str = PG_ADMIN_URL, **params) -> dict:
    """The fields every result line starts with: when, what, where, and how loaded the machine was."""
    import datetime as dt

    line = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "workload": workload, "store": store, **params,
            "loadavg_1m_before": round(os.getloadavg()[0], 2)}
    m = machine()
    if store == "postgres":
        m.pop("sqlite_version")
        with contextlib.suppress(Exception):
            m["pg_version"] = pg_version(pg_admin).split()[0]
    line.update(m)
    return line


def record(workload: str, line: dict, json_out: str | None = None) -> None:
    """Close a result line (load after), append it to results/<workload>.jsonl, print it."""
    import json

    line["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    path = json_out if json_out is not None else os.path.join(RESULTS_DIR, f"{workload}.jsonl")
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)


def percentile(values, q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ratio(a, b, digits: int = 2):
    return None if a is None or b in (None, 0) else round(a / b, digits)


def start_process(target, *args):
    """Fork a process running target(*args) (closures are fine: fork, not spawn)."""
    import multiprocessing

    p = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=False)
    p.start()
    return p


def stop_process(p, timeout: float = 30.0) -> int | None:
    """SIGTERM (conveyor's supervisor and worker stop gracefully on it), then SIGKILL if it lingers."""
    import signal

    if p.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
    p.join(timeout)
    if p.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        p.join(5)
    return p.exitcode


def run_workers(make_app, processes: int):
    """Fork a process running `make_app().run_worker(processes=N)` until SIGTERM. With N == 1 that
    process is the worker itself (its pid is the worker's); with N > 1 it is the supervisor."""

    def main() -> None:
        import logging

        logging.basicConfig(level=logging.WARNING)
        app = make_app()
        app.run_worker(processes=processes)

    return start_process(main)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def run_forked(target: Callable[..., None], args: tuple[Any, ...], processes: int, what: str) -> tuple[float, float]:
    """Run `target(*args, out)` in `processes` forked processes, each putting its count on `out`
    when done: (seconds from the first fork to the last exit, CPU seconds they used). A process
    that dies before reporting stops the run with an error naming `what`, rather than leaving it
    waiting forever for a count that will not come (as a deadlocked raw loop once did)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    c0, t0 = cpu_seconds(), time.perf_counter()
    procs = [ctx.Process(target=target, args=(*args, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    reported = 0
    while reported < processes:
        try:
            out.get(timeout=0.5)
            reported += 1
        except Empty:
            if any(p.exitcode for p in procs):
                for p in procs:
                    p.kill()
                break
    for p in procs:
        p.join()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"{what} process failed: exit codes {[p.exitcode for p in procs]}")
    return seconds, cpu
