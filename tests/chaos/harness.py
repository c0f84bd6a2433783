"""The chaos harness: worker processes on a real database, faults injected from outside, and an
independent witness of every handler call and every effect.

Every worker is a real OS process (`python -m conveyor worker chaosapp:app ...`). The handlers in
`chaosapp` write one O_APPEND line per event to a log file OUTSIDE conveyor:

    call   QUEUE ID ATTEMPT PID     the handler started (item.attempts is ATTEMPT)
    effect QUEUE ID ATTEMPT PID     a transactional handler is about to write its effect row
    done   QUEUE ID ATTEMPT PID     the handler is returning normally
    exit / hang / raise ...         the handler is about to exit its process / hang / raise

and the transactional handler writes its effect, (item_id, attempt, pid), into `chaos_effects`
through the connection conveyor hands it. What each run does (work, raise, hang, exit the process)
is drawn from (seed, item id, attempt), so a failing run can be replayed from its seed.

`Chaos.verify()` then checks, from the database and the log, what the guarantees promise.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import conveyor

APP_MODULE = textwrap.dedent(
    '''
    import asyncio, os, random, sqlite3, time
    import conveyor

    E = os.environ
    SEED = E.get("T_SEED", "0")
    WORK = float(E.get("T_WORK", "0"))          # seconds of work per call
    RAISE = float(E.get("T_RAISE", "0"))        # chance that a call raises
    HANG = float(E.get("T_HANG", "0"))          # chance that a first attempt hangs past its timeout
    EXIT = float(E.get("T_EXIT", "0"))          # chance that a first attempt exits its process
    HANG_FOR = float(E.get("T_HANG_FOR", "3"))
    TIMEOUT = float(E.get("T_TIMEOUT", "0")) or None
    QUEUES = E.get("T_QUEUES", "plain,tx").split(",")
    _fd = os.open(E["T_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(kind, item):
        os.write(_fd, f"{kind} {item.queue} {item.id} {item.attempts} {os.getpid()}\\n".encode())

    def fate(item):
        """(exit, hang, raise) for this run, replayable from the seed."""
        if isinstance(item.payload, dict) and item.payload.get("poison"):
            return True, False, False  # kills its process on every attempt
        rng = random.Random(f"{SEED}:{item.id}:{item.attempts}")
        first = item.attempts == 1
        ex, hang, boom = rng.random(), rng.random(), rng.random()
        return first and ex < EXIT, first and hang < HANG, boom < RAISE

    app = conveyor.App()
    opts = dict(
        batch_size=int(E.get("T_BATCH", "20")), concurrency=int(E.get("T_CONCURRENCY", "4")),
        lease_seconds=float(E.get("T_LEASE", "1")), max_attempts=int(E.get("T_MAX_ATTEMPTS", "20")),
        backoff_base=0.05, backoff_max=0.5, timeout_seconds=TIMEOUT,
    )

    def run(item, effect=None):
        note("call", item)
        ex, hang, boom = fate(item)
        if WORK:
            time.sleep(WORK)
        if effect is not None:
            effect()
        if ex:
            note("exit", item)
            os._exit(3)
        if hang:
            note("hang", item)
            time.sleep(HANG_FOR)
        if boom:
            note("raise", item)
            raise RuntimeError(f"chaos: item {item.id} attempt {item.attempts} raised")
        note("done", item)

    if "plain" in QUEUES:
        @app.processor("plain", **opts)
        def plain(item):
            run(item)

    if "tx" in QUEUES:
        @app.processor("tx", transactional=True, **opts)
        def tx(item, conn):
            def effect():
                note("effect", item)
                mark = "?" if isinstance(conn, sqlite3.Connection) else "%s"
                conn.execute(f"INSERT INTO chaos_effects (item_id, attempt, pid) VALUES ({mark}, {mark}, {mark})",
                             (item.id, item.attempts, os.getpid()))
            run(item, effect)

    if "async" in QUEUES:
        @app.processor("async", **opts)
        async def aplain(item):
            note("call", item)
            ex, hang, boom = fate(item)
            if WORK:
                await asyncio.sleep(WORK)
            if ex:
                note("exit", item)
                os._exit(3)
            if hang:
                note("hang", item)
                await asyncio.sleep(HANG_FOR)
            if boom:
                note("raise", item)
                raise RuntimeError(f"chaos: item {item.id} attempt {item.attempts} raised")
            note("done", item)
    '''
)

# Runs the conveyor CLI with Python's wall clock shifted by T_SKEW seconds: a worker on a machine
# whose clock is wrong. (time.monotonic, which conveyor uses for its own timers, is left alone.)
SKEW_MODULE = textwrap.dedent(
    '''
    import os, runpy, sys, time
    _skew = float(os.environ["T_SKEW"])
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _skew
    time.time_ns = lambda: _time_ns() + int(_skew * 1e9)
    sys.argv[0] = "conveyor"
    runpy.run_module("conveyor", run_name="__main__", alter_sys=True)
    '''
)

EFFECTS_SQLITE = ("CREATE TABLE chaos_effects (id INTEGER PRIMARY KEY AUTOINCREMENT, item_id INTEGER NOT NULL, "
                  "attempt INTEGER NOT NULL, pid INTEGER NOT NULL)")
EFFECTS_PG = ("CREATE TABLE chaos_effects (id BIGSERIAL PRIMARY KEY, item_id BIGINT NOT NULL, "
              "attempt INTEGER NOT NULL, pid INTEGER NOT NULL)")


@dataclass
class Event:
    kind: str
    queue: str
    item: int
    attempt: int
    pid: int


@dataclass
class Figures:
    """What one scenario survived, for the printout and the summary table."""

    scenario: str
    store: str
    items: int = 0
    kills: int = 0  # worker processes SIGKILLed by the test
    db_faults: int = 0  # PostgreSQL backends terminated / SQLite write-lock holds
    db_fault_seconds: float = 0.0
    crashes: int = 0  # processes that exited by themselves (os._exit in a handler)
    calls: int = 0
    reruns: int = 0  # calls - items
    effect_attempts: int = 0
    effects: int = 0
    rolled_back: int = 0  # effect_attempts - effects
    resolved: int = 0
    dead: int = 0
    max_attempts_seen: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"items={self.items}", f"kills={self.kills}", f"db_faults={self.db_faults}",
                 f"crashes={self.crashes}", f"calls={self.calls}", f"reruns={self.reruns}",
                 f"effect_attempts={self.effect_attempts}", f"effects={self.effects}",
                 f"rolled_back={self.rolled_back}", f"resolved={self.resolved}", f"dead={self.dead}",
                 f"max_attempts={self.max_attempts_seen}", f"time={self.seconds:.1f}s"]
        parts += [f"{k}={v}" for k, v in self.extra.items()]
        return f"[chaos {self.scenario} / {self.store}] " + " ".join(parts)


class Chaos:
    """One scenario's world: a database, worker processes, the witness log."""

    def __init__(self, tmp_path: Path, url: str, seed: int):
        self.dir = tmp_path
        self.url = url
        self.kind = "sqlite" if url.startswith("sqlite") else "postgres"
        self.seed = seed
        self.log = tmp_path / "events.log"
        self.log.touch()
        (tmp_path / "chaosapp.py").write_text(APP_MODULE)
        (tmp_path / "skewed.py").write_text(SKEW_MODULE)
        self.procs: list[subprocess.Popen] = []
        self.submitted: dict[int, str] = {}  # item id -> queue
        self._conn: Any = None
        self._n = 0
        self.t0 = time.monotonic()

    # -- the database, as the test sees it ---------------------------------------------------------
    def connect(self) -> Any:
        """A fresh connection of the test's own (not counted among the workers')."""
        if self.kind == "sqlite":
            from conveyor.stores.sqlite import sqlite_path

            conn = sqlite3.connect(sqlite_path(self.url), timeout=60, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 60000")
            return conn
        import psycopg

        return psycopg.connect(self.url, autocommit=True, application_name="chaos-harness")

    def sql(self, query: str, args: Any = ()) -> list[tuple]:
        if self._conn is None:
            self._conn = self.connect()
        if self.kind == "postgres":
            query = query.replace("?", "%s")
        try:
            return list(self._conn.execute(query, args).fetchall())
        except Exception:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
            raise

    def prepare(self, queues: dict[str, list[Any]]) -> None:
        """Migrate, (re)create the effects table, and submit the items: {queue: payloads}."""
        app = conveyor.App(self.url)
        try:
            app.migrate()
            conn = self.connect()
            try:
                conn.execute("DROP TABLE IF EXISTS chaos_effects")
                conn.execute(EFFECTS_SQLITE if self.kind == "sqlite" else EFFECTS_PG)
            finally:
                conn.close()
            for queue, payloads in queues.items():
                before = {r[0] for r in self.sql("SELECT id FROM conveyor_items WHERE queue = ?", (queue,))}
                assert app.submit_many(queue, payloads) == len(payloads)
                ids = {r[0] for r in self.sql("SELECT id FROM conveyor_items WHERE queue = ?", (queue,))} - before
                assert len(ids) == len(payloads)
                self.submitted.update((i, queue) for i in ids)
        finally:
            app.close()  # the test holds no conveyor connection while the workers run
        self.t0 = time.monotonic()

    def has_work(self) -> bool:
        return bool(self.sql("SELECT count(*) FROM conveyor_items WHERE state IN ('pending', 'in_progress')")[0][0])

    def states(self) -> dict[str, int]:
        return dict(self.sql("SELECT state, count(*) FROM conveyor_items GROUP BY state"))

    # -- processes -------------------------------------------------------------------------------
    def env(self, params: dict[str, Any]) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("CONVEYOR_DATABASE_URL", None)
        env["PYTHONPATH"] = os.pathsep.join([str(self.dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["T_LOG"] = str(self.log)
        env["T_SEED"] = str(self.seed)
        env["COLUMNS"] = "400"  # log lines unwrapped, so a test can grep them
        for k, v in params.items():
            env[f"T_{k.upper()}"] = str(v)
        return env

    def worker(self, *args: str, skew: float | None = None, **params: Any) -> subprocess.Popen:
        """Start `conveyor worker chaosapp:app ARGS` (its output to a file, never a pipe that could fill)."""
        self._n += 1
        entry = [sys.executable, "-m", "conveyor"] if skew is None else [sys.executable, str(self.dir / "skewed.py")]
        if skew is not None:
            params = dict(params, skew=skew)
        cmd = [*entry, "--db", self.url, "--log-level", "warning", "worker", "chaosapp:app", *args]
        out = open(self.dir / f"worker-{self._n}.log", "wb")  # noqa: SIM115 (the child keeps it)
        p = subprocess.Popen(cmd, cwd=self.dir, env=self.env(params), stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        out.close()
        p.output = self.dir / f"worker-{self._n}.log"  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    @staticmethod
    def output(p: subprocess.Popen, tail: int = 4000) -> str:
        return Path(p.output).read_text(errors="replace")[-tail:]  # type: ignore[attr-defined]

    def children(self, p: subprocess.Popen) -> list[int]:
        """Pids of a supervisor's worker processes."""
        try:
            text = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def wait_all(self, procs: list[subprocess.Popen], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.fail_with(f"worker {p.pid} still running after {timeout}s", p)
            if p.returncode != 0:
                self.fail_with(f"worker {p.pid} exited with {p.returncode}", p)

    def fail_with(self, message: str, p: subprocess.Popen | None = None) -> None:
        states = {}
        with contextlib.suppress(Exception):
            states = self.states()
        pytest.fail(f"{message} (seed {self.seed}, states {states})\n" + (self.output(p) if p else ""))

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    p.wait(10)
            else:
                # the supervisor's children live in their own process groups: make sure none is left
                pass
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    # -- the witness -------------------------------------------------------------------------------
    def events(self) -> list[Event]:
        out = []
        for line in self.log.read_text().splitlines():
            kind, queue, item, attempt, pid = line.split()
            out.append(Event(kind, queue, int(item), int(attempt), int(pid)))
        return out

    # -- the verdict -------------------------------------------------------------------------------
    def verify(self, fig: Figures, *, may_die: set[int] | None = None, must_die: set[int] | None = None) -> Figures:
        """Assert the guarantees after a scenario and fill in the figures.

        - every submitted item is resolved or dead: none lost, none pending or in progress;
        - no claim was run twice (each (item, attempt) called at most once) and nothing ran after
          an item's final claim (no call with an attempt above the item's final attempts);
        - every resolved item was resolved by a run that completed: a `done` with its final attempt;
        - transactional items: exactly one effect each if resolved, written by the resolving
          attempt; none if dead; no stray effects;
        - dead items are exactly `must_die` plus any of `may_die`, each with its reason kept.
        """
        fig.seconds = time.monotonic() - self.t0
        rows = self.sql("SELECT id, queue, state, attempts, last_error FROM conveyor_items")
        items = {r[0]: r for r in rows}
        assert set(items) == set(self.submitted), (
            f"items lost or appeared: missing {sorted(set(self.submitted) - set(items))[:20]}, "
            f"unexpected {sorted(set(items) - set(self.submitted))[:20]}")
        by_state = collections.Counter(r[2] for r in rows)
        stuck = [(r[0], r[2], r[3]) for r in rows if r[2] not in ("resolved", "dead")]
        assert not stuck, f"items not finished (seed {self.seed}): {len(stuck)}, e.g. {stuck[:10]}; states {dict(by_state)}"

        events = self.events()
        calls = [e for e in events if e.kind == "call"]
        per_claim = collections.Counter((e.item, e.attempt) for e in calls)
        twice = [(k, n) for k, n in per_claim.items() if n > 1]
        assert not twice, f"one claim handled more than once (item, attempt): {twice[:10]}"
        unknown = {e.item for e in events} - set(items)
        assert not unknown, f"handler called for items never submitted: {sorted(unknown)[:10]}"
        late = [(e.item, e.attempt, items[e.item][3]) for e in calls if e.attempt > items[e.item][3]]
        assert not late, f"handler ran after an item's final claim (item, attempt, final attempts): {late[:10]}"
        done = {(e.item, e.attempt) for e in events if e.kind == "done"}
        unfinished = [r[0] for r in rows if r[2] == "resolved" and (r[0], r[3]) not in done]
        assert not unfinished, (
            f"resolved without a completed run of its final attempt (resolved twice or by a lost lease?): "
            f"{[(i, items[i][3]) for i in unfinished[:10]]}")

        effects = self.sql("SELECT item_id, attempt, pid FROM chaos_effects")
        fx = collections.defaultdict(list)
        for item_id, attempt, _pid in effects:
            fx[item_id].append(attempt)
        stray = [i for i in fx if self.submitted.get(i) != "tx"]
        assert not stray, f"effects for non-transactional or unknown items: {stray[:10]}"
        tx = [r for r in rows if r[1] == "tx"]
        dup = {r[0]: fx[r[0]] for r in tx if len(fx[r[0]]) > 1}
        assert not dup, f"effects duplicated (item: attempts that committed): {list(dup.items())[:10]}"
        missing = [r[0] for r in tx if r[2] == "resolved" and fx[r[0]] != [r[3]]]
        assert not missing, (f"resolved transactional items whose effect is missing or came from another attempt: "
                             f"{[(i, items[i][3], fx[i]) for i in missing[:10]]}")
        dead_fx = [r[0] for r in tx if r[2] == "dead" and fx[r[0]]]
        assert not dead_fx, f"dead transactional items with committed effects: {dead_fx[:10]}"

        dead = {r[0] for r in rows if r[2] == "dead"}
        must_die = must_die or set()
        allowed = must_die | (may_die or set())
        assert must_die <= dead, f"items that should be dead are not: {[(i, items[i][2:4]) for i in must_die - dead]}"
        assert dead <= allowed, (f"items dead that should have been resolved (seed {self.seed}): "
                                 f"{[(i, items[i][3], (items[i][4] or '')[-200:]) for i in sorted(dead - allowed)[:5]]}")
        assert all(items[i][4] for i in dead), "a dead item without its reason"

        fig.items = len(items)
        fig.calls = len(calls)
        fig.reruns = len(calls) - len(items)
        fig.effect_attempts = sum(1 for e in events if e.kind == "effect")
        fig.effects = len(effects)
        fig.rolled_back = fig.effect_attempts - fig.effects
        fig.resolved = by_state["resolved"]
        fig.dead = by_state["dead"]
        fig.max_attempts_seen = max((r[3] for r in rows), default=0)
        return fig


def pg_terminate(chaos: Chaos, rng: random.Random) -> int:
    """Terminate a random share (at least one) of the workers' PostgreSQL connections."""
    dbname = chaos.url.rsplit("/", 1)[1]
    pids = [r[0] for r in chaos.sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = ? AND application_name = 'conveyor' "
        "AND pid <> pg_backend_pid()", (dbname,))]
    if not pids:
        return 0
    victims = rng.sample(pids, max(1, round(len(pids) * rng.uniform(0.3, 1.0))))
    n = 0
    for pid in victims:
        if chaos.sql("SELECT pg_terminate_backend(?)", (pid,))[0][0]:
            n += 1
    return n


def sqlite_hold_lock(chaos: Chaos, seconds: float, queued: bool = True) -> None:
    """Take SQLite's write lock from another connection and sit on it. `queued`: wait for it in
    conveyor's writer queue (the lock file), as a conveyor writer whose transaction hangs would;
    else as a program that knows nothing of it, polling SQLite's lock (it gets in only when the
    workers leave a gap, which under a saturated drain may take seconds)."""
    from conveyor.stores.sqlite import _WRITE_QUEUE_SUFFIX, sqlite_path

    conn = chaos.connect()
    turn = open(sqlite_path(chaos.url) + _WRITE_QUEUE_SUFFIX, "ab") if queued else None  # noqa: SIM115
    try:
        if turn is not None:
            fcntl.flock(turn, fcntl.LOCK_EX)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE chaos_effects SET pid = pid WHERE 0")
        time.sleep(seconds)
        conn.execute("COMMIT")
    finally:
        conn.close()
        if turn is not None:
            turn.close()  # closing lets go of the flock
