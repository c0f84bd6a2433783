"""Periodic items across real worker processes: exactly one item per tick, whichever workers run.

Each worker is its own `python -m conveyor worker` process, as on separate machines. Nothing here
bets on timing: the window of ticks checked is bounded by two readings of the database's clock,
and the test waits for the schedule's stored state to pass the window's end, however late the
machine gets there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from waiting import wait_until

import conveyor

APP_MODULE = textwrap.dedent(
    """
    import os
    import conveyor

    _fd = os.open(os.environ["T_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    app = conveyor.App()

    @app.processor("ticks")
    def handle(item):
        os.write(_fd, f"{item.id} {os.getpid()}\\n".encode())

    app.periodic("ticks", every=1, payload={"kind": "summary"})
    """
)
TICKS = 12


class Workers:
    """Worker processes of the app above, each logging to its own file."""

    def __init__(self, tmp_path: Path, url: str):
        self.dir = tmp_path
        (tmp_path / "tickapp.py").write_text(APP_MODULE)
        self.calls = tmp_path / "calls.log"
        self.calls.touch()
        self.env = {**os.environ, "CONVEYOR_DATABASE_URL": url, "T_LOG": str(self.calls),
                    "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self) -> subprocess.Popen:
        log = self.dir / f"worker{len(self.procs)}.log"
        with open(log, "w") as err:
            p = subprocess.Popen([sys.executable, "-m", "conveyor", "--log-level", "info", "worker", "tickapp:app"],
                                 cwd=self.dir, env=self.env, stdout=subprocess.DEVNULL, stderr=err)
        self.procs.append((p, log))
        return p

    def keeping(self) -> int:
        """How many live workers have said they keep the schedule."""
        return sum(1 for p, log in self.procs if p.poll() is None and "keeping periodic 'ticks'" in log.read_text())

    def check_alive(self) -> None:
        for p, log in self.procs:
            if p.poll() is not None and p.returncode != -signal.SIGKILL:
                pytest.fail(f"worker exited with {p.returncode}:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, log in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                pytest.fail(f"worker did not stop on SIGTERM:\n{log.read_text()[-3000:]}")


@pytest.fixture
def workers(tmp_path, store_url):
    w = Workers(tmp_path, store_url)
    yield w
    for p, _ in w.procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def last_tick(app: conveyor.App) -> float:
    states = app.schedules()[1]
    return states[0].last_tick if states else 0.0


@pytest.mark.slow
def test_three_workers_submit_exactly_one_item_per_tick(workers, store_url):
    app = conveyor.App(store_url)
    app.migrate()
    for _ in range(3):
        workers.start()

    def all_keeping():
        workers.check_alive()
        return workers.keeping() == 3

    wait_until(all_keeping, 60, "three workers keeping the schedule", interval=0.05)
    start = app.schedules()[0]  # the database's clock once all three run
    end = start + TICKS

    def passed(moment: float):
        def check():
            workers.check_alive()
            return last_tick(app) >= moment
        return check

    # a worker dies without a word and another starts, mid-window
    wait_until(passed(start + 4), 60, "the fourth tick of the window", interval=0.05)
    workers.procs[0][0].kill()
    workers.start()
    wait_until(passed(int(end)), 60, "the last tick of the window", interval=0.05)
    wait_until(lambda: not app.stats(["ticks"])["ticks"]["pending"], 30, "the ticks' items handled", interval=0.05)
    workers.stop()

    items = app.items("ticks", limit=1000)
    ticks = sorted(it.run_at.timestamp() for it in items)
    window = [t for t in ticks if start < t <= end]
    first = int(start) + 1
    assert window == [float(t) for t in range(first, first + TICKS)], (start, window)
    # and over the whole run: one item per tick, no tick skipped, and the workers ran them
    assert len(set(ticks)) == len(ticks) and ticks == [float(t) for t in range(int(ticks[0]), int(ticks[-1]) + 1)], ticks
    assert len({it.dedup_key for it in items}) == len(items)
    handled = {int(line.split()[0]) for line in workers.calls.read_text().splitlines()}
    assert {it.id for it in items if start < it.run_at.timestamp() <= end} <= handled
    app.close()
