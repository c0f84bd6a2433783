"""The `conveyor` command, run as users run it: a subprocess on a real SQLite file.

A user's mistake must end in exit code 2, ONE line on stderr that names what is wrong and where,
no traceback, and nothing half-stored.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import conveyor

APP_MODULE = textwrap.dedent(
    """
    import conveyor

    app = conveyor.App()
    not_an_app = 42

    @app.processor("emails", batch_size=10, concurrency=2)
    def send(item):
        pass
    """
)


@pytest.fixture
def cli(tmp_path, sqlite_url):
    (tmp_path / "cliapp.py").write_text(APP_MODULE)
    (tmp_path / "broken_app.py").write_text("import conveyor\nraise RuntimeError('boom at import')\n")
    env = dict(os.environ)
    env.pop("CONVEYOR_DATABASE_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COLUMNS"] = "200"

    def run(*args: str, input: str | None = None, db: str | None = sqlite_url, timeout: float = 30,
            exe: list[str] | None = None) -> subprocess.CompletedProcess:
        cmd = (exe or [sys.executable, "-m", "conveyor"]) + (["--db", db] if db else []) + list(args)
        return subprocess.run(cmd, cwd=tmp_path, env=env, input=input, capture_output=True, text=True,
                              timeout=timeout)

    return run


@pytest.fixture
def app(sqlite_url):
    a = conveyor.App(sqlite_url)
    yield a
    a.close()


def stats(app: conveyor.App, queue: str) -> dict:
    return app.stats([queue])[queue]


def assert_usage_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one line on stderr containing every needle, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr}"
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- submit ---------------------------------------------------------------------------------------
def test_submit_from_file(cli, app, tmp_path):
    f = write_jsonl(tmp_path / "items.jsonl", [{"to": f"u{i}@x"} for i in range(25)] + [""])
    r = cli("submit", "emails", "--file", str(f))
    assert r.returncode == 0, r.stderr
    assert "submitted 25 item(s) to 'emails'" in r.stdout
    # non-tty: no progress bar, no control characters in either stream
    assert "\x1b" not in r.stdout + r.stderr and "\r" not in r.stdout + r.stderr
    assert r.stderr.strip() == ""
    assert stats(app, "emails")["pending"] == 25
    assert app.get(1).payload == {"to": "u0@x"} and app.get(25).payload == {"to": "u24@x"}


def test_submit_from_stdin_with_key_and_dedup_fields(cli, app):
    rows = [{"user": f"u{i % 3}", "msg": f"m{i}"} for i in range(9)]
    rows.append({"user": "u0", "msg": "m0"})  # a duplicate of the first by msg
    text = "".join(json.dumps(r) + "\n" for r in rows)
    r = cli("submit", "emails", "--file", "-", "--key-field", "user", "--dedup-field", "msg", input=text)
    assert r.returncode == 0, r.stderr
    assert "submitted 9 item(s)" in r.stdout and "1 skipped as duplicates" in r.stdout
    first = app.get(1)
    assert (first.key, first.dedup_key, first.payload) == ("u0", "m0", rows[0])
    assert app.get(5).key == "u1"
    # and '-' is the default
    r = cli("submit", "emails", input=json.dumps({"user": "u9", "msg": "m99"}) + "\n")
    assert r.returncode == 0, r.stderr
    assert stats(app, "emails")["pending"] == 10


def test_submit_numeric_key_field(cli, app):
    r = cli("submit", "emails", "--key-field", "n", input='{"n": 7}\n')
    assert r.returncode == 0, r.stderr
    assert app.get(1).key == "7"


@pytest.mark.parametrize("bad, needle", [
    ('{"to": "c" nope}', "invalid JSON"),
    ('{"other": 1}', "'to'"),
    ('{"to": null}', "'to'"),
    ('{"to": ["a"]}', "'to'"),
    ('[1, 2]', "'to'"),
])
def test_submit_bad_line_stores_nothing(cli, app, tmp_path, bad, needle):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"to": "a"}, {"to": "b"}, bad, {"to": "d"}])
    r = cli("submit", "emails", "--file", str(f), "--key-field", "to")
    line = assert_usage_error(r, str(f), "line 3", needle)
    assert r.stdout == ""
    assert "line 3" in line
    assert app.stats() == {}  # nothing from the file is stored
    s = json.loads(cli("status", "--json").stdout)
    assert s == {}


def test_submit_bad_line_on_stdin_names_stdin(cli, app):
    r = cli("submit", "emails", input='{"a": 1}\n\n{oops\n')
    assert_usage_error(r, "stdin line 3", "invalid JSON")
    assert app.stats() == {}


def test_submit_large_file_is_all_or_nothing(cli, app, tmp_path):
    rows = [{"i": i} for i in range(12_000)]  # more than one storing chunk
    f = write_jsonl(tmp_path / "big.jsonl", rows + ["{bad"])
    assert_usage_error(cli("submit", "emails", "--file", str(f)), "line 12001")
    assert app.stats() == {}
    f = write_jsonl(tmp_path / "big.jsonl", rows)
    r = cli("submit", "emails", "--file", str(f))
    assert r.returncode == 0 and "submitted 12000" in r.stdout, r.stderr
    assert stats(app, "emails")["pending"] == 12_000


def test_submit_missing_file_and_bad_queue(cli, tmp_path):
    assert_usage_error(cli("submit", "emails", "--file", str(tmp_path / "nope.jsonl")), "nope.jsonl")
    assert_usage_error(cli("submit", "bad queue", input="{}\n"), "'bad queue'")


# -- status ---------------------------------------------------------------------------------------
def test_status_table_and_json(cli, app):
    app.submit_many("emails", [{"i": i} for i in range(3)])
    app.submit_many("sms", [{"i": i} for i in range(1234)])
    app.cancel(1)
    r = cli("status")
    assert r.returncode == 0, r.stderr
    assert "emails" in r.stdout and "sms" in r.stdout and "1,234" in r.stdout
    rows = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.split()[1:2] in (["emails"], ["sms"])}
    assert set(rows) == {"emails", "sms"}
    r = cli("status", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = app.stats()
    assert set(got) == {"emails", "sms"}
    for q in want:  # same mapping; the ages move on between the two reads
        for k in ("pending", "in_progress", "resolved", "dead", "cancelled", "total", "resolved_last_minute"):
            assert got[q][k] == want[q][k], (q, k)
        assert set(got[q]) == set(want[q])
    assert got["emails"]["cancelled"] == 1 and got["emails"]["pending"] == 2 and got["sms"]["pending"] == 1234
    r = cli("status", "--json", "--queue", "sms")
    assert list(json.loads(r.stdout)) == ["sms"]


def test_status_on_empty_database(cli):
    assert cli("migrate").returncode == 0
    r = cli("status")
    assert r.returncode == 0, r.stderr
    assert "no items yet" in r.stdout


# -- operators ------------------------------------------------------------------------------------
def test_retry_sends_dead_and_cancelled_back(cli, app):
    app.submit_many("emails", [{"i": i} for i in range(3)])
    app.cancel(2)
    r = cli("retry", "emails")
    assert r.returncode == 0, r.stderr
    assert "1 item(s)" in r.stdout
    s = stats(app, "emails")
    assert (s["pending"], s["cancelled"]) == (3, 0)


def test_retry_dead_items(cli, app):
    @app.processor("emails", max_attempts=1, batch_size=5)
    def boom(item):
        raise conveyor.Fail("bounced")

    app.submit_many("emails", [{"i": i} for i in range(4)])
    app.run_worker(stop_when_empty=True, install_signal_handlers=False)
    assert stats(app, "emails")["dead"] == 4
    r = cli("retry", "emails")
    assert r.returncode == 0 and "4 item(s)" in r.stdout, r.stderr
    s = stats(app, "emails")
    assert (s["pending"], s["dead"]) == (4, 0)
    assert app.get(1).attempts == 0


def test_cancel(cli, app):
    item_id = app.submit("emails", {"x": 1})
    r = cli("cancel", str(item_id))
    assert r.returncode == 0, r.stderr
    assert app.get(item_id).state == conveyor.State.CANCELLED
    assert_usage_error(cli("cancel", str(item_id)), "cancelled")  # already finished
    assert_usage_error(cli("cancel", "999"), "999")
    assert cli("cancel", "abc").returncode == 2


def test_purge(cli, app):
    app.submit_many("emails", [{"i": i} for i in range(3)])
    app.cancel(1)
    app.cancel(2)
    r = cli("purge", "emails", "--older-than", "7d")
    assert r.returncode == 0 and "0 finished" in r.stdout, r.stderr
    r = cli("purge", "emails", "--older-than", "0s")
    assert r.returncode == 0 and "2 finished" in r.stdout, r.stderr
    assert stats(app, "emails")["total"] == 1
    for bad in ("soon", "7y", "-1d"):
        assert_usage_error(cli("purge", "emails", "--older-than", bad), bad)
    assert stats(app, "emails")["total"] == 1


def test_migrate_twice(cli):
    r = cli("migrate")
    assert r.returncode == 0 and "applied migration(s) 1" in r.stdout, (r.stdout, r.stderr)
    r = cli("migrate")
    assert r.returncode == 0 and "up to date" in r.stdout, (r.stdout, r.stderr)


# -- bad input ------------------------------------------------------------------------------------
def test_unknown_url_scheme(cli):
    assert_usage_error(cli("status", db="mysql://x"), "'mysql'")
    assert_usage_error(cli("submit", "emails", input="{}\n", db="mysql://x"), "'mysql'")


def test_sqlite_path_in_missing_folder(cli, tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    url = f"sqlite:///{missing / 'x.db'}"
    assert_usage_error(cli("status", db=url), str(missing))
    assert_usage_error(cli("submit", "emails", input="{}\n", db=url), str(missing))
    assert_usage_error(cli("worker", "cliapp:app", "--stop-when-empty", db=url), str(missing))
    assert not (tmp_path / "no").exists()


def test_db_from_environment(cli, tmp_path):
    env_db = tmp_path / "from_env.db"
    r = subprocess.run([sys.executable, "-m", "conveyor", "migrate"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "CONVEYOR_DATABASE_URL": f"sqlite:///{env_db}"}, timeout=30)
    assert r.returncode == 0, r.stderr
    assert env_db.exists()


@pytest.mark.parametrize("spec, needle", [
    ("cliapp:app --queue nope", "'nope'"),
    ("no_such_module:app", "no_such_module"),
    ("broken_app:app", "boom at import"),
    ("cliapp:missing", "'missing'"),
    ("cliapp:not_an_app", "not a conveyor.App"),
    ("cliapp", "MODULE:APP"),
])
def test_worker_bad_input(cli, spec, needle):
    target, *rest = spec.split()
    r = cli("worker", target, *rest, "--stop-when-empty")
    assert_usage_error(r, needle)


def test_worker_bad_queue_with_processes(cli):
    r = cli("worker", "cliapp:app", "--queue", "nope", "--processes", "2", "--stop-when-empty")
    assert_usage_error(r, "'nope'")


# -- worker ---------------------------------------------------------------------------------------
def test_worker_drains_queue_and_exits(cli, app, tmp_path):
    app.submit_many("emails", [{"i": i} for i in range(50)])
    exe = shutil.which("conveyor", path=str(Path(sys.executable).parent))
    assert exe, "the `conveyor` entry point is not installed next to this Python"
    r = cli("worker", "cliapp:app", "--stop-when-empty", exe=[exe])
    assert r.returncode == 0, r.stderr
    s = stats(app, "emails")
    assert (s["resolved"], s["pending"], s["in_progress"]) == (50, 0, 0)


def test_worker_log_lines_as_json_with_their_fields(cli, app, tmp_path):
    (tmp_path / "failing.py").write_text(textwrap.dedent("""
        import conveyor

        app = conveyor.App()

        @app.processor("emails", max_attempts=1)
        def send(item):
            raise conveyor.Fail("mailbox gone")
    """))
    item_id = app.submit("emails", {"to": "ada"})
    r = cli("worker", "failing:app", "--stop-when-empty", "--log-format", "json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines), lines
    dead = [line for line in lines if "is dead" in line["message"]]
    assert len(dead) == 1, lines
    assert dead[0]["item_ids"] == [item_id] and dead[0]["queue"] == "emails" and dead[0]["level"] == "warning"
    assert dead[0]["message"] == f"item {item_id} of 'emails' is dead after attempt 1/1: Fail: mailbox gone"
    assert dead[0]["worker"] and all(line["worker"] == dead[0]["worker"] for line in lines if line["logger"] == "conveyor.worker")
    text = cli("--log-format", "text", "status")  # the option goes before the command too
    assert text.returncode == 0, text.stderr


def test_help_and_version(cli):
    r = cli("--help", db=None)
    assert r.returncode == 0 and "submit" in r.stdout and "worker" in r.stdout
    r = cli("--version", db=None)
    assert r.returncode == 0 and conveyor.__version__ in r.stdout


# -- what happened: submit's ids, items, show -----------------------------------------------------
def test_submit_prints_the_ids_it_stored(cli, app):
    r = cli("submit", "emails", input='{"to": "a"}\n{"to": "b"}\n{"to": "c"}\n')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(": ids 1, 2, 3"), r.stdout
    r = cli("submit", "emails", input='{"to": "d"}\n')
    assert r.stdout.strip().endswith(": id 4"), r.stdout
    many = "".join(json.dumps({"to": f"u{i}", "n": i % 20}) + "\n" for i in range(25))
    r = cli("submit", "emails", "--dedup-field", "n", input=many)  # 20 new, 5 duplicates
    assert r.returncode == 0, r.stderr
    assert "submitted 20 item(s)" in r.stdout and "5 skipped as duplicates" in r.stdout
    assert r.stdout.strip().endswith(": ids 5 (first) to 24 (last)"), r.stdout
    assert app.get(24).payload == {"to": "u19", "n": 19}
    r = cli("submit", "emails", "--dedup-field", "n", input=many)
    assert "submitted 0 item(s)" in r.stdout and "id" not in r.stdout.split("in ")[-1], r.stdout


def _dead(app, queue: str, error: str) -> int:
    """An item of `queue` failed for good with `error` as its last_error; returns its id."""
    from conveyor.model import Claim

    item_id = app.submit(queue, {"why": "dead"})
    claimed = app.store.claim(Claim(queue, 100, 30, 1), "test")
    (item,) = [it for it in claimed if it.id == item_id]
    assert app.store.fail([(item.id, item.claim_token, error)]) == []
    assert app.store.release([(it.id, it.claim_token) for it in claimed if it is not item]) == []
    return item_id


def table_ids(out: str) -> list[int]:
    """The ids in the first column of a table printed by `conveyor items`."""
    return [int(cells[1]) for cells in map(str.split, out.splitlines()) if cells[1:2] and cells[1].isdigit()]


TRACEBACK = ('Traceback (most recent call last):\n  File "app.py", line 3, in send\n    smtp.send(to)\n'
             'ConnectionError: [Errno 111] refused by [mx.example]\nsecond line of the message')


def test_items_pages_newest_first_and_says_how_to_get_the_next_page(cli, app):
    ids = [app.submit("emails", {"i": i}) for i in range(7)]
    app.submit("sms", {"i": 0})
    pages = []
    before: list[str] = []
    while True:
        r = cli("items", "emails", "--limit", "3", *before)
        assert r.returncode == 0, r.stderr
        rows = table_ids(r.stdout)
        pages.append(rows)
        more = [ln for ln in r.stdout.splitlines() if ln.startswith("more:")]
        if not more:
            break
        assert more == [f"more: conveyor items emails --limit 3 --before {rows[-1]}"]
        before = ["--before", str(rows[-1])]
    assert pages == [ids[::-1][:3], ids[::-1][3:6], ids[::-1][6:]]
    r = cli("items", "emails", "--before", str(ids[0]))
    assert r.returncode == 0 and "no items" in r.stdout, (r.stdout, r.stderr)


def test_items_filters_by_state_and_key_and_shows_the_error_line(cli, app):
    app.submit_many("emails", [{"i": i} for i in range(3)], key="k1")
    dead = _dead(app, "emails", TRACEBACK)
    r = cli("items", "emails", "--state", "dead")
    assert r.returncode == 0, r.stderr
    assert table_ids(r.stdout) == [dead] and "dead" in r.stdout
    # the line that says what went wrong, as written (brackets are not markup), not the traceback's first
    assert "ConnectionError: [Errno 111] refused by [mx.example]" in r.stdout
    assert "Traceback" not in r.stdout and "second line" not in r.stdout
    r = cli("items", "emails", "--key", "k1", "--json")
    assert [it["key"] for it in json.loads(r.stdout)] == ["k1"] * 3
    assert "more:" not in cli("items", "emails", "--limit", "4").stdout


def test_items_json_holds_whole_items(cli, app):
    app.submit("emails", {"to": "ü@x", "n": [1, 2]}, key="k", priority=3)
    dead = _dead(app, "emails", TRACEBACK)
    r = cli("items", "emails", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [it["id"] for it in got] == [dead, 1]
    assert got[0]["last_error"] == TRACEBACK and got[0]["state"] == "dead" and got[0]["attempts"] == 1
    first = got[1]
    assert {"id", "queue", "state", "key", "attempts", "priority", "run_at", "created_at", "finished_at",
            "last_error", "payload"} <= set(first)
    assert (first["payload"], first["key"], first["priority"], first["state"]) == ({"to": "ü@x", "n": [1, 2]}, "k", 3, "pending")
    assert first["finished_at"] is None and first["run_at"].endswith("+00:00")
    assert json.loads(cli("items", "nothing-here", "--json").stdout) == []


@pytest.mark.parametrize("args, needle", [
    (["--state", "bogus"], "'bogus'"),
    (["--limit", "0"], "limit"),
    (["--before", "0"], "before_id"),
])
def test_items_bad_input_is_one_line(cli, app, args, needle):
    app.store.migrate()  # the database exists: the error is about the arguments
    assert_usage_error(cli("items", "emails", *args), needle)
    assert_usage_error(cli("items", "bad queue"), "'bad queue'")


def test_show_prints_one_item_whole(cli, app):
    dead = _dead(app, "emails", TRACEBACK)
    r = cli("show", str(dead))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"item {dead}" in out and "state:     dead" in out and "attempts:  1 of 1" in out
    assert '"why": "dead"' in out  # the payload, pretty
    assert "Traceback (most recent call last)" in out and "second line of the message" in out
    assert out.index("payload:") < out.index("last error:")
    got = json.loads(cli("show", str(dead), "--json").stdout)
    assert got["id"] == dead and got["payload"] == {"why": "dead"} and got["last_error"] == TRACEBACK


def test_show_unknown_id_is_one_line(cli, app):
    app.store.migrate()
    assert_usage_error(cli("show", "424242"), "424242")
    assert_usage_error(cli("show", "424242", "--json"), "424242")
