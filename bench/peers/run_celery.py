"""Celery with its Redis broker (Redis db 5 by default), set up as Celery's optimizing guide advises for
many short tasks: a large prefetch multiplier (128), results ignored (`task_ignore_result`: no result
backend), and here the solo pool (the task runs in the worker process itself: no IPC to pool
children), one `celery worker -P solo` per process, without gossip, mingle and heartbeat. Acks
early (the default). Submit: `apply_async` per item over one producer (Celery has no bulk
enqueue; `chunks` would change the unit of work). With early acks Redis keeps no done state, so the
drain ends at the last handler call (counted by the shared counter), after checking that the queue
and kombu's unacked hash are empty. Redis here runs without persistence (save "", appendonly no).
"""

from __future__ import annotations

import os
import time

from . import probe
from .base import RedisPeer

PREFETCH = 128


def make_app(url: str):
    from celery import Celery

    app = Celery("bench_peers", broker=url, set_as_current=False)
    app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=PREFETCH, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True, task_default_queue="celery")

    @app.task(name="noop")
    def noop(payload: dict) -> None:
        probe.hit(payload.get("t"), payload.get("i"))

    return app, noop


class Peer(RedisPeer):
    name = "celery"
    packages = ("celery", "kombu", "redis")

    def config(self) -> dict:
        return {"broker": self.url, "pool": "solo", "prefetch_multiplier": PREFETCH,
                "task_ignore_result": True, "acks": "early (default)",
                "flags": "--without-gossip --without-mingle --without-heartbeat",
                "submit": "apply_async per item, one producer"}

    def submit_many(self, orders: list[dict]) -> float:
        app, noop = make_app(self.url)
        with app.producer_or_acquire() as producer:
            noop.apply_async(({"warm": 0},), producer=producer)  # connect before the clock starts
            self.redis().delete("celery")
            t0 = time.perf_counter()
            for p in orders:
                noop.apply_async((p,), producer=producer)
            seconds = time.perf_counter() - t0
        app.close()
        return seconds

    def submitter(self):
        app, noop = make_app(self.url)
        cm = app.producer_or_acquire()
        producer = cm.__enter__()

        def submit(payload: dict) -> None:
            noop.apply_async((payload,), producer=producer)

        def close() -> None:
            cm.__exit__(None, None, None)
            app.close()

        return submit, close

    def worker_main(self) -> None:
        app, _ = make_app(self.url)
        app.worker_main(["worker", "-P", "solo", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                         "--without-heartbeat", "-Q", "celery", "-n", f"w{os.getpid()}@bench"])

    def remaining(self) -> None:
        return None  # early acks: the store cannot tell done from taken

    def verify(self, n: int) -> dict:
        r = self.redis()
        left = {"queue": r.llen("celery"), "unacked": r.hlen("unacked")}
        if any(left.values()):
            raise RuntimeError(f"celery: messages left in Redis {left}")
        return left
