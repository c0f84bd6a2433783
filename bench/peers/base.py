"""What the peers share: a fresh PostgreSQL database per run (dropped after), or a flushed Redis db."""

from __future__ import annotations

import os
from importlib.metadata import version

from ..common import pg_url


class PgPeer:
    """A peer on its own database, `peers_<name>_<pid>`: CREATE DATABASE in setup, DROP in teardown."""

    name = "?"
    store = "postgres"
    packages: tuple[str, ...] = ()

    def __init__(self, opts: dict) -> None:
        self.opts = opts
        self.admin = opts["pg"]
        self.db = f"peers_{self.name}_{os.getpid()}"
        self.url = pg_url(self.admin, self.db)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)

    def create_database(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        self._admin(f'CREATE DATABASE "{self.db}"')

    def teardown(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')

    def sql(self, query: str, *params):
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    def after_submit(self) -> None:
        # autovacuum is off on this machine; on a default server autoanalyze would have run by now
        self.sql("ANALYZE")

    def version(self) -> str:
        return " ".join(f"{p} {version(p)}" for p in self.packages)


class RedisPeer:
    """A peer on one Redis db number (default 5), FLUSHDB'd (that db only) before and after."""

    name = "?"
    store = "redis"
    packages: tuple[str, ...] = ()

    def __init__(self, opts: dict) -> None:
        self.opts = opts
        self.url = opts["redis"]
        if self.url.rstrip("/").rsplit("/", 1)[-1] in ("", "0") or not self.url.rstrip("/").rsplit("/", 1)[-1].isdigit():
            raise SystemExit(f"{self.url}: give a non-zero Redis db number (…/5): the run FLUSHDBs it")

    def redis(self):
        from redis import Redis

        return Redis.from_url(self.url)

    def setup(self) -> None:
        self.redis().flushdb()

    def teardown(self) -> None:
        self.redis().flushdb()

    def after_submit(self) -> None:
        pass

    def version(self) -> str:
        from redis import Redis

        info = Redis.from_url(self.url).info("server")
        return " ".join(f"{p} {version(p)}" for p in self.packages) + f" (server {info['redis_version']})"
