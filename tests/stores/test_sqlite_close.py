"""SQLite only: closing the store while another thread is using it.

A sqlite3 connection closed under a statement running in another thread crashes the process
(SIGSEGV), so this runs in a child process and checks how it ended."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
