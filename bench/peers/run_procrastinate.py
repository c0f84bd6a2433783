"""procrastinate on PostgreSQL: its psycopg 3 connector (PsycopgConnector, an async pool), an async
task (procrastinate runs sync tasks in threads), `run_worker_async(concurrency=C)` with LISTEN/NOTIFY
on (its default), finished jobs kept as `succeeded` (delete_jobs="never", the default). procrastinate
fetches one job per query and finishes it with another, so a worker's concurrency (jobs in flight
at once, each on its own pool connection) is its throughput lever: the runner tries several and
reports the best. Bulk submit: `Task.batch_defer_async(*kwargs)` (one statement for the batch).
The drain ends when no job is `todo` or `doing`.
"""

from __future__ import annotations

import asyncio
import time

from . import probe
from .base import PgPeer


class Peer(PgPeer):
    name = "procrastinate"
    packages = ("procrastinate", "psycopg", "psycopg-pool")

    def __init__(self, opts: dict) -> None:
        super().__init__(opts)
        self.concurrency = opts.get("concurrency") or 1

    def config(self) -> dict:
        return {"connector": "PsycopgConnector (psycopg_pool.AsyncConnectionPool, "
                f"min_size=max_size={self.concurrency + 2})", "task": "async def", "concurrency": self.concurrency,
                "listen_notify": True, "delete_jobs": "never (default)", "submit": "Task.batch_defer_async"}

    def app(self):
        from procrastinate import App, PsycopgConnector

        pool = self.concurrency + 2  # the jobs in flight, the listener, one spare
        app = App(connector=PsycopgConnector(conninfo=self.url, min_size=pool, max_size=pool))

        @app.task(name="noop", queue="orders")
        async def noop(**kwargs) -> None:
            probe.hit(kwargs.get("t"), kwargs.get("i"))

        return app, noop

    def setup(self) -> None:
        self.create_database()

        async def go() -> None:
            app, _ = self.app()
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

        asyncio.run(go())

    def submit_many(self, orders: list[dict]) -> float:
        async def go() -> float:
            app, noop = self.app()
            async with app.open_async():
                t0 = time.perf_counter()
                for i in range(0, len(orders), 10_000):
                    await noop.batch_defer_async(*orders[i:i + 10_000])
                return time.perf_counter() - t0

        return asyncio.run(go())

    def submitter(self):
        loop = asyncio.new_event_loop()
        app, noop = self.app()
        cm = app.open_async()
        loop.run_until_complete(cm.__aenter__())

        def submit(payload: dict) -> None:
            loop.run_until_complete(noop.defer_async(**payload))

        def close() -> None:
            loop.run_until_complete(cm.__aexit__(None, None, None))
            loop.close()

        return submit, close

    def worker_main(self) -> None:
        async def go() -> None:
            app, _ = self.app()
            async with app.open_async():
                await app.run_worker_async(concurrency=self.concurrency, queues=["orders"], listen_notify=True,
                                           install_signal_handlers=True)

        asyncio.run(go())

    def remaining(self) -> int:
        return self.sql("SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')")[0][0]

    def verify(self, n: int) -> dict:
        rows = dict(self.sql("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1"))
        if rows != {"succeeded": n}:
            raise RuntimeError(f"procrastinate: jobs by status {rows}; expected {n} succeeded and nothing else")
        return rows
