"""`conveyor serve` under load: submits over HTTP next to the App's own calls, in the same run, and
the dashboard's reads over a table of a million items. It prints numbers; it is not a test.

    python -m bench.serve [--store sqlite|postgres|all] [--seconds 5] [--big 1000000]

- single submits: 16 client threads, each with a keep-alive connection, POST one item at a time
  for --seconds; next to 16 threads calling app.submit in this process on the same store.
- lists: POST lists of 1,000 (one client), next to app.submit_many of 1,000.
- dashboard: with --big items in the table (most resolved, some pending, dead and cancelled), the
  response time of each route the dashboard polls (p50 / p99 over 200 requests), through the server
  (whose stats are shared for a second between viewers) and of the uncached App.stats() read below it.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

import conveyor

from .common import pg_database, sqlite_database

CLIENTS = 16
LIST = 1000
DASHBOARD_ROUTES = ["/v1/queues", "/v1/history", "/v1/items?state=dead&limit=10", "/v1/items?limit=25",
                    "/v1/items?queue=orders&state=pending&limit=25", "/metrics"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "conveyor", "--db", url, "--log-level", "warning", "serve",
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("conveyor serve did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def concurrent_rate(seconds: float, make: Callable[[], Callable[[int], Any]], threads: int = CLIENTS) -> float:
    """Calls per second of `threads` threads each calling its own make()(n) for `seconds`."""
    counts = [0] * threads
    stop = threading.Event()

    def run(k: int) -> None:
        call = make()
        n = 0
        while not stop.is_set():
            call(n)
            n += 1
        counts[k] = n

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - started)


def submits(url: str, seconds: float) -> dict[str, float]:
    app = conveyor.App(url)
    app.migrate()
    server = Server(url)
    try:
        def http_one() -> Callable[[int], Any]:
            client = httpx.Client(base_url=server.base)
            return lambda n: client.post("/v1/queues/orders/items", json={"payload": {"order_id": n}}).raise_for_status()

        def app_one() -> Callable[[int], Any]:
            return lambda n: app.submit("orders", {"order_id": n})

        out = {"http single/s": concurrent_rate(seconds, http_one), "app.submit single/s": concurrent_rate(seconds, app_one)}
        body = [{"payload": {"order_id": n}} for n in range(LIST)]
        payloads = [{"order_id": n} for n in range(LIST)]
        client = httpx.Client(base_url=server.base, timeout=60)
        post_list = lambda: client.post("/v1/queues/orders/items", json=body).raise_for_status()  # noqa: E731
        for name, call in (("http lists of 1,000 items/s", post_list),
                           ("app.submit_many 1,000 items/s", lambda: app.submit_many("orders", payloads))):
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                call()
                n += 1
            out[name] = n * LIST / (time.perf_counter() - started)
        return out
    finally:
        server.stop()
        app.close()


def fill_big(app: conveyor.App, n: int) -> None:
    """n items: 95% resolved, the rest pending, with some dead and cancelled (by the store's calls)."""
    from conveyor.model import Claim

    chunk = 100_000
    for start in range(0, n, chunk):
        app.submit_many("orders", ({"order_id": i} for i in range(start, min(n, start + chunk))))
    store = app.store
    resolved = int(n * 0.95)
    while resolved > 0:
        batch = store.claim(Claim("orders", min(10_000, resolved), 30.0, 1), "bench")
        if not batch:
            break
        with store.transaction():
            dead, rest = batch[:20], batch[20:]
            store.fail([(it.id, it.claim_token, "RuntimeError: bench") for it in dead])
            store.resolve([(it.id, it.claim_token) for it in rest])
        resolved -= len(batch)
    for it in app.items("orders", state="pending", limit=50):
        app.cancel(it.id)


def percentiles(samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {statistics.median(samples) * 1000:6.1f} ms   p99 {p99 * 1000:6.1f} ms"


def dashboard(url: str, big: int, requests: int = 200) -> list[str]:
    app = conveyor.App(url)
    started = time.perf_counter()
    fill_big(app, big)
    lines = [f"filled {big:,} items in {time.perf_counter() - started:.0f} s: {app.stats()['orders']}"]
    server = Server(url)
    try:
        with httpx.Client(base_url=server.base, timeout=30) as client:
            for route in DASHBOARD_ROUTES:
                times = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    client.get(route).raise_for_status()
                    times.append(time.perf_counter() - t0)
                lines.append(f"  GET {route:48} {percentiles(times)}")
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            app.stats()
            times.append(time.perf_counter() - t0)
        lines.append(f"  App.stats() uncached (what one refresh costs the database)  {percentiles(times)}")
    finally:
        server.stop()
        app.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--big", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"conveyor serve bench: {os.cpu_count()} cores, {CLIENTS} clients, {args.seconds:g} s per figure")
    for store in (["sqlite", "postgres"] if args.store == "all" else [args.store]):
        for what in ("submits", "dashboard"):
            database = sqlite_database() if store == "sqlite" else pg_database(suffix=what)
            with database as where:
                url = f"sqlite:///{where}" if store == "sqlite" else where
                if what == "submits":
                    for name, value in submits(url, args.seconds).items():
                        print(f"{store:8} {name:32} {value:10,.0f}")
                else:
                    for line in dashboard(url, args.big):
                        print(f"{store:8} {line}")


if __name__ == "__main__":
    main()
