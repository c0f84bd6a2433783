"""SQLite's write-ahead log after a reader held a snapshot open: the WAL grows past every
checkpoint meanwhile (nothing the reader may still read can be overwritten), and once the reader
is gone the file is cut back when a checkpoint starts the log over, instead of keeping its peak
size on disk."""

from __future__ import annotations

import os
import sqlite3

import conveyor
from conveyor.stores import sqlite as sqlite_store


def test_the_wal_is_cut_back_after_a_held_snapshot_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "WAL_KEPT_BYTES", 1024 * 1024)  # 1 MiB, so a small test shows it
    path = tmp_path / "wal.db"
    app = conveyor.App(f"sqlite:///{path}")
    app.migrate()
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM conveyor_items").fetchone()  # a snapshot held open
    for _ in range(4):
        app.submit_many("q", [{"b": "x" * 400, "n": i} for i in range(5_000)])
    wal = f"{path}-wal"
    held = os.path.getsize(wal)
    assert held > 8 * 1024 * 1024, held  # it grew past the checkpoints meanwhile
    reader.execute("COMMIT")
    reader.close()
    for _ in range(5):  # writes once the reader is gone: a checkpoint completes, the log starts over
        app.submit_many("q", [{"n": i} for i in range(2_000)])
    assert os.path.getsize(wal) <= 1024 * 1024, os.path.getsize(wal)
    app.close()
