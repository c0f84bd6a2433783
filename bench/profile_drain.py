"""Profile conveyor's SQLite drain: N no-op items submitted, then drained by P worker processes.

    .venv/bin/py-spy record --subprocesses --threads --format raw -o bench/results/drain.folded \\
        -- .venv/bin/python -m bench.profile_drain --items 100000 --processes 2
    .venv/bin/py-spy record --subprocesses -o bench/results/drain.svg -- .venv/bin/python -m bench.profile_drain
    .venv/bin/python -m bench.profile_drain --summarize bench/results/drain.folded   # top functions

Only the drain is worth reading in the profile (the submit runs first, in the parent process, and
shows up as submit_many / new_item frames).
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import conveyor

from .common import QUEUE, payloads, sqlite_database

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^)]*?)(?::(?P<line>\d+))?\)$")


def drain(n: int, processes: int, batch_size: int, concurrency: int) -> None:
    with sqlite_database() as path:
        app = conveyor.App(f"sqlite:///{path}")

        @app.processor(QUEUE, batch_size=batch_size, concurrency=concurrency)
        def noop(item: conveyor.Item) -> None:
            pass

        app.submit_many(QUEUE, payloads(n))
        t0 = time.perf_counter()
        app.run_worker(processes=processes, stop_when_empty=True)
        seconds = time.perf_counter() - t0
        stats = app.stats([QUEUE])[QUEUE]
        app.close()
    assert stats["resolved"] == n, stats
    print(f"drained {n} items with {processes} process(es) in {seconds:.2f} s: {n / seconds:,.0f} items/s")


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m["file"].split("site-packages/")[-1].split("/src/")[-1].split("/lib/python3")[-1]
    return f"{m['func']} ({file})"


def _role(thread: str) -> str:
    name = thread.split(": ", 1)[1] if ": " in thread else "?"
    if name == "MainThread":
        return "cycle (worker MainThread)"
    if name.startswith("conveyor-") and name != "conveyor-keeper":
        return "lane threads"
    return name


def summarize(path: str, top: int = 15) -> None:
    """From py-spy's raw format (record --subprocesses --threads --format raw): the worker
    processes' samples split by thread role, then the top functions (own time, with line) overall
    and in the cycle thread. The parent process (submit, supervisor) is left out."""
    own: collections.Counter[str] = collections.Counter()
    cycle: collections.Counter[str] = collections.Counter()
    funcs: collections.Counter[str] = collections.Counter()
    roles: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            procs = [fr for fr in frames if fr.startswith("process ")]
            threads = [fr for fr in frames if fr.startswith("thread ")]
            body = [fr for fr in frames if not fr.startswith(("process ", "thread "))]
            if len(procs) < 2 or not body:
                continue  # the parent: submit and supervisor
            n = int(count)
            total += n
            role = _role(threads[0]) if threads else "?"
            roles[role] += n
            leaf = body[-1].strip()
            own[f"{role[:5]} | {leaf}"] += n
            funcs[_name(leaf)] += n
            if role.startswith("cycle"):
                cycle[leaf] += n
    if not total:
        print("no worker-process samples found")
        return
    print(f"{total} samples in worker processes")
    print("\n-- by thread role --")
    for name, n in roles.most_common():
        print(f"{100 * n / total:5.1f}%  {name}")
    print("\n-- top functions by own samples (all worker threads) --")
    for name, n in funcs.most_common(top):
        print(f"{100 * n / total:5.1f}%  {name}")
    print("\n-- top lines by own samples, by role --")
    for name, n in own.most_common(top):
        print(f"{100 * n / total:5.1f}%  {name}")
    c = sum(cycle.values())
    print(f"\n-- cycle thread: top lines ({c} samples, % of the cycle thread) --")
    for name, n in cycle.most_common(top):
        print(f"{100 * n / c:5.1f}%  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--summarize", metavar="FOLDED", help="print the top functions of a py-spy raw profile")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize, args.top)
    else:
        drain(args.items, args.processes, args.batch_size, args.concurrency)


if __name__ == "__main__":
    main()
