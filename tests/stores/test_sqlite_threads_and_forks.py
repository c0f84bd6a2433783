"""SQLite only: threads and forked processes around one database file.

- Closing the store while another thread is using it: a sqlite3 connection closed under a statement
  running in another thread crashes the process (SIGSEGV), so that runs in a child process.
- Writers queue on a lock file beside the database (flock) before taking SQLite's write lock: a
  transaction holds it, nothing else does, and a forked child never keeps its parent's lock alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from waiting import wait_until

from conveyor.model import NewItem
from conveyor.stores.sqlite import _WRITE_QUEUE_SUFFIX, SQLiteStore

SCRIPT = textwrap.dedent("""
    import sys, threading, time
    import conveyor
    from conveyor.model import NewItem

    app = conveyor.App(sys.argv[1])
    app.store.submit_many([NewItem("q", "1")])
    stop = threading.Event()
    calls = [0]

    def hammer():
        # what a peer thread does all day: short statements on its own connection
        while not stop.is_set():
            app.store.rescue_expired()
            app.store.stats(["q"])
            calls[0] += 1

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 1.5
    closes = 0
    while time.monotonic() < deadline:
        app.close()  # from the main thread, while the others are mid-statement
        closes += 1
        time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert app.store.stats(["q"])["q"]["pending"] == 1  # still usable after close
    app.close()
    print(f"ok {closes} closes, {calls[0]} calls")
""")


def test_closing_the_store_while_other_threads_use_it_does_not_crash(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, f"sqlite:///{tmp_path / 'c.db'}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.startswith("ok "), proc.stdout


def _lock_is_free(path: str) -> bool:
    with open(path + _WRITE_QUEUE_SUFFIX, "ab") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def _lock_waiters(path: str) -> int:
    """How many flock requests on the database's lock file are blocked, waiting for the holder
    (Linux lists them in /proc/locks as `N: -> FLOCK ... MAJ:MIN:INODE ...`)."""
    inode = os.stat(path + _WRITE_QUEUE_SUFFIX).st_ino
    with open("/proc/locks") as f:
        return sum(1 for line in f if " -> FLOCK " in line and line.split()[6].endswith(f":{inode}"))


@pytest.fixture
def sqlite_store(tmp_path):
    store = SQLiteStore(f"sqlite:///{tmp_path / 'q.db'}")
    store.migrate()
    yield store
    store.close()


def test_a_write_transaction_holds_the_queue_lock_and_lets_go_of_it(sqlite_store):
    path = sqlite_store.path
    assert _lock_is_free(path)
    with sqlite_store.transaction():
        assert not _lock_is_free(path)
        with sqlite_store.transaction():  # nested: still held, released only by the outermost
            pass
        assert not _lock_is_free(path)
    assert _lock_is_free(path)
    with pytest.raises(RuntimeError), sqlite_store.transaction():
        raise RuntimeError("rolled back")
    assert _lock_is_free(path)
    sqlite_store.stats()  # reads do not queue
    assert _lock_is_free(path)


def test_writers_in_other_threads_wait_for_the_holder(sqlite_store):
    order: list[str] = []
    inside = threading.Event()

    def other():
        inside.wait()
        sqlite_store.submit_many([NewItem("q", "2")])  # queues behind the holder
        order.append("other committed")

    t = threading.Thread(target=other)
    t.start()
    with sqlite_store.transaction():
        inside.set()
        # the other writer is asleep in the kernel, queued on the lock file behind this transaction
        wait_until(lambda: _lock_waiters(sqlite_store.path), what="the other writer to queue on the lock file")
        order.append("holder committing")
    t.join(10)
    assert order == ["holder committing", "other committed"]
    assert sqlite_store.stats(["q"])["q"]["pending"] == 1


FORK_SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    from conveyor.stores.sqlite import SQLiteStore

    store = SQLiteStore(sys.argv[1])
    store.migrate()
    holding, forked = threading.Event(), threading.Event()

    def hold():
        with store.transaction():  # holds the queue lock while the main thread forks
            holding.set()
            forked.wait()
            os._exit(0)  # the parent dies holding it, without letting go

    threading.Thread(target=hold, daemon=True).start()
    holding.wait()
    child = os.fork()
    if child == 0:
        time.sleep(30)  # a long-lived child: it must not keep the parent's lock alive
        os._exit(0)
    print(child, flush=True)
    forked.set()
    time.sleep(30)
""")


def test_a_forked_child_does_not_keep_a_dead_parents_lock(tmp_path):
    db = tmp_path / "f.db"
    proc = subprocess.Popen([sys.executable, "-c", FORK_SCRIPT, f"sqlite:///{db}"], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        assert proc.wait(30) == 0  # the parent is gone; its child sleeps on
        wait_until(lambda: _lock_is_free(str(db)), what="the lock to die with the process that took it")
        store = SQLiteStore(f"sqlite:///{db}")
        store.submit_many([NewItem("q", "1")])  # and writers get through
        assert store.stats(["q"])["q"]["pending"] == 1
        store.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        proc.kill()


def test_writer_queue_off_takes_no_lock_file(tmp_path):
    store = SQLiteStore(f"sqlite:///{tmp_path / 'off.db'}?writer_queue=off")
    try:
        with store.transaction():
            assert _lock_is_free(store.path)
        store.submit_many([NewItem("q", "1")])
        assert store.stats(["q"])["q"]["pending"] == 1
    finally:
        store.close()


@pytest.mark.parametrize("query, words", [("writer_queue=maybe", ["writer_queue", "on or off"]),
                                          ("journal=wal", ["unknown option", "journal"])])
def test_bad_sqlite_url_options_are_named(tmp_path, query, words):
    from conveyor import UsageError

    with pytest.raises(UsageError) as info:
        SQLiteStore(f"sqlite:///{tmp_path / 'x.db'}?{query}")
    for word in words:
        assert word in str(info.value)
