"""conveyor never silently uses the wrong database: $CONVEYOR_DATABASE_URL is a default, not an
override; workers say which database they use; read-only commands never create or migrate one;
two paths to one SQLite file share its writer queue."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import uuid

import psycopg
import pytest
from conftest import PG_ADMIN_URL

import conveyor
from conveyor.stores import open_store

APP_MODULE = textwrap.dedent(
    """
    import os
    import conveyor

    app = conveyor.App(os.environ["EXPLICIT_URL"])

    @app.processor("emails")
    def send(item):
        pass
    """
)


@pytest.fixture
def run(tmp_path):
    (tmp_path / "explicit_app.py").write_text(APP_MODULE)
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COLUMNS"] = "300"

    def run(*args: str, timeout: float = 60, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "conveyor", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=timeout, env={**env, **extra_env})

    return run


def one_line(text: str) -> str:
    return " ".join(text.split())  # log lines may wrap


def test_worker_keeps_the_apps_explicit_url_over_the_environment(run, tmp_path):
    explicit, other = tmp_path / "explicit.db", tmp_path / "from_env.db"
    app = conveyor.App(f"sqlite:///{explicit}")
    app.submit_many("emails", range(5))
    app.close()
    r = run("worker", "explicit_app:app", "--stop-when-empty",
            EXPLICIT_URL=f"sqlite:///{explicit}", CONVEYOR_DATABASE_URL=f"sqlite:///{other}")
    assert r.returncode == 0, r.stderr
    assert not other.exists(), "the worker opened the environment's database instead of the app's"
    assert f"conveyor worker on SQLite file {explicit}" in one_line(r.stderr)
    app = conveyor.App(f"sqlite:///{explicit}")
    assert app.stats(["emails"])["emails"]["resolved"] == 5
    app.close()


def test_an_explicit_db_option_overrides_the_app_and_says_so(run, tmp_path):
    explicit, chosen = tmp_path / "explicit.db", tmp_path / "chosen.db"
    app = conveyor.App(f"sqlite:///{chosen}")
    app.submit_many("emails", range(3))
    app.close()
    r = run("worker", "explicit_app:app", "--stop-when-empty", "--db", f"sqlite:///{chosen}",
            EXPLICIT_URL=f"sqlite:///{explicit}")
    assert r.returncode == 0, r.stderr
    err = one_line(r.stderr)
    assert f"--db overrides the app's database: using SQLite file {chosen}, not SQLite file {explicit}" in err
    assert f"conveyor worker on SQLite file {chosen}" in err
    app = conveyor.App(f"sqlite:///{chosen}")
    assert app.stats(["emails"])["emails"]["resolved"] == 3
    app.close()


def test_worker_log_names_postgres_without_password(pg_database, run):
    app = conveyor.App(pg_database)
    app.migrate()
    app.close()
    with_password = pg_database.replace("postgres@", "postgres:s3cret-pw@", 1)
    r = run("worker", "explicit_app:app", "--stop-when-empty", EXPLICIT_URL=with_password)
    assert r.returncode == 0, r.stderr
    assert "s3cret-pw" not in r.stderr
    dbname = pg_database.rsplit("/", 1)[1]
    assert f"conveyor worker on PostgreSQL postgresql://postgres@127.0.0.1:5432/{dbname}" in one_line(r.stderr)


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["items", "q"], ["items", "q", "--json"],
                                     ["show", "1"]])
def test_read_only_commands_never_create_a_sqlite_file(run, tmp_path, command):
    missing = tmp_path / "typo.db"
    for args in (["--db", f"sqlite:///{missing}", *command], [*command, "--db", f"sqlite:///{missing}"]):
        r = run(*args)
        assert r.returncode == 2, r
        assert f"no SQLite database at {missing}" in one_line(r.stderr)
        assert "Traceback" not in r.stderr
    assert not missing.exists()
    assert not list(tmp_path.glob("typo.db*"))
    relative = run(*command, CONVEYOR_DATABASE_URL="sqlite:///relative.db")
    assert relative.returncode == 2 and str(tmp_path / "relative.db") in one_line(relative.stderr)
    assert not (tmp_path / "relative.db").exists()


def test_read_only_commands_do_not_migrate_a_foreign_sqlite_file(run, tmp_path):
    import sqlite3

    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    r = run("status", "--db", f"sqlite:///{path}")
    assert r.returncode == 2 and "not a conveyor database" in r.stderr
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"customers"}


@pytest.fixture
def bare_pg_database(pg_database):
    """A PostgreSQL database without conveyor's tables (as somebody's `postgres` database is)."""
    name = f"conveyor_bare_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("command", [["status"], ["items", "q"], ["show", "1"]])
def test_read_only_commands_create_no_table_in_postgres(run, bare_pg_database, command):
    r = run(*command, "--db", bare_pg_database)
    assert r.returncode == 2, r
    assert "has no conveyor tables" in r.stderr and "Traceback" not in r.stderr
    with psycopg.connect(bare_pg_database) as conn:
        n = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'conveyor%'").fetchone()[0]
    assert n == 0


def test_read_only_store_refuses_writes_on_every_store(store_url):
    setup = conveyor.App(store_url)
    setup.submit("q", 1)
    setup.close()
    reader = conveyor.App(store_url, read_only=True)
    assert reader.stats(["q"])["q"]["pending"] == 1
    with pytest.raises(conveyor.UsageError, match="read-only"):
        reader.submit("q", 2)
    with pytest.raises(conveyor.UsageError, match="read-only"):
        reader.migrate()
    reader.close()


def test_a_sqlite_file_on_a_read_only_file_system_can_be_read(tmp_path):
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("unshare -m is needed to mount a read-only folder")
        pytest.skip("needs `unshare -m` (root) to mount a read-only folder; runs in CI")
    folder = tmp_path / "ro"
    folder.mkdir()
    app = conveyor.App(f"sqlite:///{folder / 'c.db'}")
    app.submit_many("emails", range(7))
    app.close()  # WAL checkpointed: only the .db file stays
    for extra in folder.glob("c.db-*"):
        extra.unlink()
    script = (f"mount --bind -o ro {folder} {folder} && "
              f"{sys.executable} -m conveyor --db sqlite:///{folder / 'c.db'} status --json && "
              f"{sys.executable} -m conveyor --db sqlite:///{folder / 'c.db'} items emails --json --limit 3 && "
              f"(touch {folder}/probe 2>/dev/null && echo WRITABLE || true)")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "WRITABLE" not in r.stdout
    assert '"pending": 7' in r.stdout


def test_two_paths_to_one_sqlite_file_share_the_writer_queue(tmp_path):
    real = tmp_path / "data" / "c.db"
    real.parent.mkdir()
    (tmp_path / "link.db").symlink_to(real)
    direct = open_store(f"sqlite:///{real}")
    via_link = open_store(f"sqlite:///{tmp_path / 'link.db'}")
    direct.migrate()
    held, release = threading.Event(), threading.Event()

    def hold():
        with direct.transaction():
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(30)
        lock_file = via_link._queue_file()
        assert lock_file is not None
        with pytest.raises(BlockingIOError):  # the same lock file: the holder's lock is seen
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        release.set()
        t.join(30)
    fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(lock_file, fcntl.LOCK_UN)
    assert os.path.samefile(lock_file.name, real.parent / "c.db-conveyor-lock")
    direct.close()
    via_link.close()
