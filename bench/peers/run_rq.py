"""RQ on Redis (db 5 by default): `SimpleWorker` (runs the job in the worker process; RQ's default
Worker forks a work horse per job, which its docs describe as the price of isolation), one per worker
process, without the scheduler; results kept as RQ keeps them by default (result_ttl 500 s), so
finished jobs land in the queue's FinishedJobRegistry. Bulk submit: `Queue.enqueue_many` of
`Queue.prepare_data` items (one Redis pipeline). The drain ends when the queue and its
StartedJobRegistry are empty; the FinishedJobRegistry must then hold every job. Redis here runs
without persistence (save "", appendonly no).
"""

from __future__ import annotations

import time

from . import probe
from .base import RedisPeer

QUEUE = "orders"


def noop(payload: dict) -> None:
    probe.hit(payload.get("t"), payload.get("i"))


class Peer(RedisPeer):
    name = "rq"
    packages = ("rq", "redis")

    def config(self) -> dict:
        return {"redis": self.url, "worker": "SimpleWorker",
                "with_scheduler": False, "result_ttl": "500 s (default)", "submit": "Queue.enqueue_many(prepare_data)"}

    def queue(self):
        from rq import Queue

        return Queue(QUEUE, connection=self.redis())

    def submit_many(self, orders: list[dict]) -> float:
        from rq import Queue

        q = self.queue()
        q.connection.ping()
        t0 = time.perf_counter()
        for i in range(0, len(orders), 10_000):
            q.enqueue_many([Queue.prepare_data(noop, args=(p,)) for p in orders[i:i + 10_000]])
        return time.perf_counter() - t0

    def submitter(self):
        q = self.queue()

        def submit(payload: dict) -> None:
            q.enqueue(noop, payload)

        return submit, lambda: None

    def worker_main(self) -> None:
        from rq import SimpleWorker

        q = self.queue()
        SimpleWorker([q], connection=q.connection).work(burst=False, logging_level="WARNING", with_scheduler=False)

    def remaining(self) -> int:
        from rq.registry import StartedJobRegistry

        q = self.queue()
        return q.count + StartedJobRegistry(queue=q).count

    def verify(self, n: int) -> dict:
        from rq.registry import FailedJobRegistry, FinishedJobRegistry

        q = self.queue()
        counts = {"queued": q.count, "finished": FinishedJobRegistry(queue=q).count,
                  "failed": FailedJobRegistry(queue=q).count}
        if counts != {"queued": 0, "finished": n, "failed": 0}:
            raise RuntimeError(f"rq: {counts}; expected {n} finished and nothing else")
        return counts
