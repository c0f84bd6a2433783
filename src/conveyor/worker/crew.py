"""Several workers in one process: the App's queue processors in one, each table of rows processed
in place in another (an item id and a row's primary key are different things, so each worker keeps
its own claims, outcomes and leases). They run side by side on threads and stop together: a
signal stops all of them; a worker that fails stops the others, and its error is raised."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .loop import Worker, install_stop_signals


class Crew:
    """Looks like one Worker (run, stop, counts, stopping) to the App and the supervisor."""

    def __init__(self, workers: Sequence[Worker]):
        self.workers = list(workers)
        self.name = self.workers[0].name
        self.log = self.workers[0].log

    @property
    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for w in self.workers:
            for key, n in w.counts.items():
                total[key] = total.get(key, 0) + n
        return total

    @property
    def stopping(self) -> bool:
        return any(w.stopping for w in self.workers)

    def stop(self, force: bool = False) -> None:
        for w in self.workers:
            w.stop(force=force)

    def run(self, install_signal_handlers: bool = True) -> dict[str, int]:
        """Run every worker until all have stopped; returns the summed counts. Raises the first
        worker's failure, after stopping the others."""
        restore = install_stop_signals(self) if install_signal_handlers else None
        failures: list[BaseException] = []
        done = threading.Event()
        left = [len(self.workers)]
        lock = threading.Lock()

        def main(worker: Worker) -> None:
            try:
                worker.run(install_signal_handlers=False)
            except BaseException as exc:  # noqa: BLE001 - raised again by run()
                with lock:
                    failures.append(exc)
                self.stop()
            finally:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        threads = [threading.Thread(target=main, args=(w,), name=f"conveyor-worker-{n}", daemon=True)
                   for n, w in enumerate(self.workers)]
        try:
            for t in threads:
                t.start()
            while not done.wait(0.2):  # a short wait: the main thread stays free to take signals
                pass
        finally:
            for t in threads:
                t.join()
            if restore:
                restore()
        if failures:
            raise failures[0]
        return self.counts
