"""PgQueuer on PostgreSQL, configured as its own benchmark tool (tools/benchmark.py in its repository)
runs it: the asyncpg driver (one connection per worker process), uvloop, an async entrypoint,
`QueueManager.run(batch_size=B)`; tables installed with the default (durable: all LOGGED) settings.
Bulk submit: one `Queries.enqueue(entrypoints, payloads, priorities)` call (lists: one statement),
payloads the orders' JSON as bytes. Completions go through PgQueuer's status-log buffer (flushed at
B items or 0.1 s), which deletes finished jobs from the `pgqueuer` table: the drain ends when that
table is empty. The runner tries several batch sizes and reports the best.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

from . import probe
from .base import PgPeer

ENTRYPOINT = "noop"


class Peer(PgPeer):
    name = "pgqueuer"
    packages = ("pgqueuer", "asyncpg", "uvloop")

    def __init__(self, opts: dict) -> None:
        super().__init__(opts)
        self.batch = opts.get("batch") or 100
        self.latency = opts.get("latency", False)

    def config(self) -> dict:
        return {"driver": "asyncpg (AsyncpgDriver, 1 connection per process)", "event_loop": "uvloop",
                "entrypoint": "async def", "batch_size": self.batch, "durability": "durable (default)",
                "dequeue_timeout_s": 30, "submit": "Queries.enqueue(lists)"}

    async def _queries(self):
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(self.url)
        return conn, Queries(AsyncpgDriver(conn))

    def setup(self) -> None:
        self.create_database()

        async def install() -> None:
            conn, q = await self._queries()
            await q.install()
            await conn.close()

        asyncio.run(install())

    def submit_many(self, orders: list[dict]) -> float:
        import time

        async def go() -> float:
            conn, q = await self._queries()
            t0 = time.perf_counter()
            data = [json.dumps(p).encode() for p in orders]
            await q.enqueue([ENTRYPOINT] * len(data), data, [0] * len(data))
            seconds = time.perf_counter() - t0
            await conn.close()
            return seconds

        return asyncio.run(go())

    def submitter(self):
        import uvloop

        loop = uvloop.new_event_loop()
        conn, q = loop.run_until_complete(self._queries())

        def submit(payload: dict) -> None:
            loop.run_until_complete(q.enqueue(ENTRYPOINT, json.dumps(payload).encode(), 0))

        def close() -> None:
            loop.run_until_complete(conn.close())
            loop.close()

        return submit, close

    def worker_main(self) -> None:
        import uvloop

        uvloop.run(self._work())

    async def _work(self) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries, QueueManager

        conn = await asyncpg.connect(self.url)
        qm = QueueManager(Queries(AsyncpgDriver(conn)))
        latency = self.latency

        @qm.entrypoint(ENTRYPOINT)
        async def noop(job) -> None:
            if latency:
                p = json.loads(job.payload)
                probe.hit(p.get("t"), p.get("i"))
            else:
                probe.hit()

        await qm.run(batch_size=self.batch, dequeue_timeout=timedelta(seconds=30))

    def remaining(self) -> int:
        return self.sql("SELECT count(*) FROM pgqueuer")[0][0]

    def verify(self, n: int) -> dict:
        rows = dict(self.sql("SELECT status::text, count(*) FROM pgqueuer_log GROUP BY 1"))
        left = self.remaining()
        if left or rows.get("successful") != n:
            raise RuntimeError(f"pgqueuer: {left} jobs left in its queue table, log {rows}; expected {n} successful")
        return {"queue_table": left, "log": rows}
