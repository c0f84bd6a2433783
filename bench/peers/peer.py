"""One peer through one workload, in the peers' venv; the last stdout line is `RESULT {json}`.

    bench/peers/.venv/bin/python -m bench.peers.peer NAME drain   --n 20000 [--batch 100] [--concurrency C]
    bench/peers/.venv/bin/python -m bench.peers.peer NAME latency --seconds 5 [--interval-ms 5]

drain    fresh store; the peer's bulk submit of N orders (bench.common.payloads), timed → submit_per_s;
         ANALYZE on PostgreSQL (autovacuum is off on this machine: it stands in for autoanalyze);
         then P (2) worker processes forked, each running the peer's worker with a no-op handler
         that only bumps a shared counter (bench/peers/probe.py). Drain time: from the first
         handler call (earliest over the processes) until the peer's store shows nothing left to
         do (polled every 5 ms once the counter reached N; Celery keeps no done state, there the
         last handler call ends it) → drain_per_s. Worker start-up is not counted there;
         from_fork_per_s counts from the fork of the worker processes instead, as the minimal,
         raw and conveyor drains do (first fork → last exit).
latency  fresh store; P idle workers; after a warm-up item, ANOTHER process submits 1 item every
         --interval-ms for --seconds with time.time_ns() in the payload; each handler records
         time_ns() - t: submit → handler start p50/p95/p99/max, the submit call's own time, and
         the rest (submit returned → handler start), as bench/latency.py.
Counts are checked from the peer's store (and the counter) before the result is printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time

from ..common import PG_ADMIN_URL, payloads, percentile
from . import probe

PEERS = ("pgqueuer", "procrastinate", "celery", "rq")
REDIS_URL = os.environ.get("CONVEYOR_BENCH_REDIS", "redis://127.0.0.1:6379/5")
STATS = ("p50", "p95", "p99", "max")


def load(name: str, opts: dict):
    return importlib.import_module(f"bench.peers.run_{name}").Peer(opts)


def _fork_workers(peer, processes: int) -> list:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=peer.worker_main, daemon=False) for _ in range(processes)]
    for p in procs:
        p.start()
    return procs


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)


def _died(procs: list) -> str | None:
    dead = [p.exitcode for p in procs if p.exitcode is not None]
    return f"a worker process exited early (exit codes {dead})" if dead else None


def drain(peer, n: int, processes: int, timeout: float) -> dict:
    orders = payloads(n)
    peer.setup()
    procs: list = []
    try:
        submit_s = peer.submit_many(orders)
        peer.after_submit()
        fork_ns = time.time_ns()
        procs = _fork_workers(peer, processes)
        if not probe.wait_for(lambda: probe.counters(probe.FOLDER)[0] >= n or _died(procs), timeout):
            raise RuntimeError(f"{peer.name}: {probe.counters(probe.FOLDER)[0]} of {n} handled after {timeout:.0f} s")
        if _died(procs):
            raise RuntimeError(f"{peer.name}: {_died(procs)}")
        confirmed = peer.remaining() is not None
        if confirmed and not probe.wait_for(lambda: peer.remaining() == 0, 60, 0.005):
            raise RuntimeError(f"{peer.name}: the store still holds {peer.remaining()} unfinished items "
                               "60 s after the last handler call")
        end_ns = time.time_ns()
        handled, first, last = probe.counters(probe.FOLDER)
        _stop(procs)
        procs = []
        store = peer.verify(n)
        if handled != n:
            raise RuntimeError(f"{peer.name}: the handler ran {handled} times for {n} items")
    finally:
        _stop(procs)
        peer.teardown()
    drain_s = ((end_ns if confirmed else last) - first) / 1e9
    from_fork_s = ((end_ns if confirmed else last) - fork_ns) / 1e9
    return {"items": n, "processes": processes, "submit_seconds": round(submit_s, 4), "submit_per_s": round(n / submit_s, 1),
            "drain_seconds": round(drain_s, 4), "drain_per_s": round(n / drain_s, 1),
            "handlers_seconds": round((last - first) / 1e9, 4),
            "from_fork_seconds": round(from_fork_s, 4), "from_fork_per_s": round(n / from_fork_s, 1),
            "drain_end": "store" if confirmed else "last handler call", "store_counts": store}


def _submitter(peer, seconds: float, interval: float, out) -> None:
    try:
        submit, close = peer.submitter()
        n = int(seconds / interval)
        slip, took = 0.0, []
        t0 = time.perf_counter() + 0.05
        for i in range(n):
            wait = t0 + i * interval - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                slip = max(slip, -wait)
            t = time.time_ns()
            submit({"t": t, "i": i})
            took.append(time.time_ns() - t)
        close()
        out.put((n, slip * 1000, took))
    except BaseException:  # noqa: BLE001 - report it rather than leave the parent waiting
        import traceback

        out.put(("error", traceback.format_exc(), None))


def _summary(ns, prefix: str = "", keys=STATS) -> dict:
    ms = [x / 1e6 for x in ns]
    qs = dict(zip(STATS, (50, 95, 99, 100)))
    return {prefix + k: (None if not ms else round(percentile(ms, qs[k]) if qs[k] < 100 else max(ms), 3)) for k in keys}


def latency(peer, seconds: float, interval: float, processes: int) -> dict:
    peer.setup()
    procs: list = []
    try:
        procs = _fork_workers(peer, processes)
        warm = peer.submitter()
        warm[0]({"warm": 1})
        warm[1]()
        if not probe.wait_for(lambda: probe.counters(probe.FOLDER)[0] >= 1 or _died(procs), 60, 0.01) or _died(procs):
            raise RuntimeError(f"{peer.name}: workers did not handle a first item within 60 s ({_died(procs)})")
        time.sleep(1.0)
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        sub = ctx.Process(target=_submitter, args=(peer, seconds, interval, q))
        sub.start()
        n, slip, took = q.get(timeout=seconds + 120)
        sub.join()
        if n == "error":
            raise RuntimeError(f"{peer.name}: the submitter failed:\n{slip}")
        if not probe.wait_for(lambda: probe.counters(probe.FOLDER)[0] >= n + 1, 60, 0.01):
            raise RuntimeError(f"{peer.name}: {probe.counters(probe.FOLDER)[0]} of {n + 1} handled")
        if peer.remaining() is not None and not probe.wait_for(lambda: peer.remaining() == 0, 60, 0.01):
            raise RuntimeError(f"{peer.name}: the store still holds {peer.remaining()} unfinished items")
        _stop(procs)
        procs = []
        store = peer.verify(n + 1)
    finally:
        _stop(procs)
        peer.teardown()
    lat = probe.latencies(probe.FOLDER)
    if len(lat) != n:
        raise RuntimeError(f"{peer.name}: {len(lat)} latency samples for {n} items")
    after = [ns - took[i] for i, ns in lat.items()]
    return {"submitted": n, "interval_ms": interval * 1000, "seconds": seconds, "processes": processes,
            "submit_slip_max_ms": round(slip, 2), **_summary(list(lat.values()), "lat_"),
            **_summary(took, "submit_call_", ("p50", "p99")), **_summary(after, "after_submit_", ("p50", "p99")),
            "store_counts": store}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers.peer", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=PEERS)
    ap.add_argument("workload", choices=("drain", "latency"))
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="the peer's batch size, where it has one")
    ap.add_argument("--concurrency", type=int, default=None, help="per-process concurrency, where the peer has one")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--interval-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="give up a drain after this many seconds")
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    ap.add_argument("--redis", default=REDIS_URL)
    args = ap.parse_args(argv)
    opts = {"pg": args.pg, "redis": args.redis, "batch": args.batch, "concurrency": args.concurrency,
            "latency": args.workload == "latency"}
    peer = load(args.name, opts)
    probe.FOLDER = tempfile.mkdtemp(prefix=f"peer_{args.name}_")
    try:
        if args.workload == "drain":
            out = drain(peer, args.n, args.processes, args.timeout)
        else:
            out = latency(peer, args.seconds, args.interval_ms / 1000, args.processes)
    finally:
        shutil.rmtree(probe.FOLDER, ignore_errors=True)
    out = {"peer": args.name, "workload": args.workload, "store": peer.store, "version": peer.version(),
           "config": peer.config(), **out}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
