"""`--processes N`: N worker processes under a supervisor that restarts a crashed child.

Children are forked (before the parent opens any connection), each in its own process group so a
terminal's Ctrl-C reaches only the supervisor, which then asks every child to stop gracefully
(SIGTERM; a second Ctrl-C forces them). A child whose supervisor dies stops by itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import UsageError
from .loop import Worker
from .outcomes import COUNTERS

log = logging.getLogger("conveyor.supervisor")

RESTART_BACKOFF_MAX = 10.0


def _child_main(make_worker: Callable[[], Worker], results: Any) -> None:
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()
    worker = make_worker()

    def watch_parent() -> None:
        while not worker.stopping:
            if os.getppid() != parent:
                log.warning("supervisor %s is gone: stopping", parent)
                worker.stop()
                return
            time.sleep(0.5)

    threading.Thread(target=watch_parent, daemon=True).start()
    try:
        counts = worker.run(install_signal_handlers=True)
    except UsageError as exc:
        log.error("%s", exc)
        os._exit(2)
    except BaseException:
        log.exception("worker process failed")
        os._exit(1)
    results.put(counts)
    os._exit(0)


def run_supervised(make_worker: Callable[[], Worker], *, processes: int, stop_when_empty: bool = False) -> dict[str, int]:
    """Run `processes` workers, each made by `make_worker()` in its own forked process; restart any
    that die unexpectedly; return when all have stopped: the counts of the workers that stopped
    cleanly, summed, with `processes` and `restarts`. The caller makes sure no database connection
    is open when this forks."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.SimpleQueue()
    totals = {key: 0 for key in COUNTERS}
    args = (make_worker, results)
    children: dict[int, Any] = {}
    started: dict[int, float] = {}
    done: set[int] = set()
    crashes: dict[int, int] = {}
    restarts = 0
    stopping = {"n": 0}

    def spawn(slot: int) -> None:
        p = ctx.Process(target=_child_main, args=args, name=f"conveyor-worker-{slot}", daemon=False)
        p.start()
        children[slot] = p
        started[slot] = time.monotonic()

    def on_signal(signum: int, frame: Any) -> None:
        stopping["n"] += 1
        sig = signal.SIGTERM if stopping["n"] == 1 else signal.SIGINT
        log.info("supervisor: %s, stopping %d worker process(es)", signal.Signals(signum).name, len(children))
        for slot, p in children.items():
            if slot not in done and p.pid and p.is_alive():
                for _ in range(1 if stopping["n"] == 1 else 2):
                    try:
                        os.kill(p.pid, sig)
                    except ProcessLookupError:
                        pass

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        for slot in range(processes):
            spawn(slot)
        log.info("supervisor %s: %d worker process(es) started", os.getpid(), processes)
        while len(done) < processes:
            live = [p.sentinel for s, p in children.items() if s not in done]
            multiprocessing.connection.wait(live, timeout=0.5)
            while not results.empty():
                for key, n in results.get().items():
                    totals[key] = totals.get(key, 0) + n
            for slot, p in list(children.items()):
                if slot in done or p.is_alive():
                    continue
                code = p.exitcode
                p.join()
                if stopping["n"] or (stop_when_empty and code == 0) or code == 2:
                    done.add(slot)
                    if code == 2:
                        log.error("worker process %s exited on a usage error; not restarting", p.pid)
                    continue
                ran = time.monotonic() - started[slot]
                crashes[slot] = crashes.get(slot, 0) + 1 if ran < 5 else 1
                delay = min(RESTART_BACKOFF_MAX, 0.1 * 2 ** (crashes[slot] - 1))
                log.warning("worker process %s exited with code %s; restarting in %.1fs", p.pid, code, delay)
                time.sleep(delay)
                if not stopping["n"]:
                    restarts += 1
                    spawn(slot)
                else:
                    done.add(slot)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    while not results.empty():
        for key, n in results.get().items():
            totals[key] = totals.get(key, 0) + n
    return {**totals, "processes": processes, "restarts": restarts}
