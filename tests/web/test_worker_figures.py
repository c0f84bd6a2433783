"""The workers' own figures (handler duration, lag, retries) reach /metrics: a real worker process
writes them to the multiprocess directory, and serve's /metrics, given the same directory, shows
them summed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import conveyor

from .conftest import client_for

WORKER = textwrap.dedent(
    """
    import sys
    import conveyor

    app = conveyor.App(sys.argv[1])

    @app.processor("jobs", backoff_base=0.01, backoff_max=0.02)
    def handle(item):
        if item.payload["n"] == 0 and item.attempts == 1:
            raise ValueError("once")

    app.run_worker(stop_when_empty=True)
    """
)


def sample(text: str, name: str) -> float:
    m = re.search(rf'^{name}\{{queue="jobs"\}} ([0-9.e+]+)$', text, re.M)
    assert m, f"{name} not in /metrics:\n{text}"
    return float(m.group(1))


def test_worker_figures_reach_metrics_through_the_multiprocess_directory(app, tmp_path, monkeypatch):
    folder = tmp_path / "prom"
    folder.mkdir()
    app.submit_many("jobs", [{"n": i} for i in range(5)])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = subprocess.run([sys.executable, str(script), app.url], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert app.stats(["jobs"])["jobs"]["resolved"] == 5
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    with client_for(conveyor.App(app.url)) as client:
        text = client.get("/metrics").text
    assert sample(text, "conveyor_handler_duration_seconds_count") == 6  # 5 items, one of them run twice
    assert sample(text, "conveyor_lag_seconds_count") == 6
    assert sample(text, "conveyor_items_retried_total") == 1
