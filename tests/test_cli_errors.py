"""The `conveyor` command on a user's mistakes: one line naming what is wrong, exit 2, nothing
stored; and the global options work on either side of the subcommand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from test_cli import app, assert_usage_error, cli, stats  # noqa: F401 - fixtures


def test_non_utf8_input_names_the_line(cli, app, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"name": "ok"}\n{"name": "caf\xe9"}\n')
    assert_usage_error(cli("submit", "emails", "--file", str(bad)), "line 2", "not UTF-8", "0xe9")
    r = subprocess.run([sys.executable, "-m", "conveyor", "--db", app.url, "submit", "emails"],
                       input=b'{"a": 1}\n\xff\xfe\n', capture_output=True, timeout=30)
    assert r.returncode == 2 and b"stdin line 2" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    assert stats(app, "emails")["total"] == 0


@pytest.mark.parametrize("depth", [300, 1000, 100_000])
def test_deep_nesting_is_one_line(cli, app, depth):
    line = "[" * depth + "]" * depth
    r = cli("submit", "emails", input=f'{{"a": 1}}\n{line}\n')
    assert_usage_error(r, "line 2")
    assert "levels" in r.stderr or "too deep" in r.stderr
    assert stats(app, "emails")["total"] == 0


def test_surrogate_escape_in_a_field_value(cli, app):
    r = cli("submit", "emails", "--key-field", "k", input='{"k": "\\ud800"}\n')
    assert_usage_error(r, "line 1", "lone surrogate")
    r = cli("submit", "emails", input='{"k": "\\udcff"}\n')
    assert_usage_error(r, "line 1", "lone surrogate")
    assert stats(app, "emails")["total"] == 0


def test_priority_beyond_64_bits(cli, app):
    assert_usage_error(cli("submit", "emails", "--priority", str(2**63), input="{}\n"), "64 bits")
    assert stats(app, "emails")["total"] == 0


def test_unknown_queue_is_named_by_retry_purge_and_status(cli, app):
    app.submit("emails", {"x": 1})
    assert_usage_error(cli("retry", "emials"), "'emials' has no items")
    assert_usage_error(cli("purge", "emials", "--older-than", "1d"), "'emials' has no items")
    assert_usage_error(cli("status", "--queue", "emials"), "'emials' has no items")
    assert_usage_error(cli("status", "--json", "--queue", "emials"), "'emials' has no items")
    r = cli("retry", "emails")
    assert r.returncode == 0 and "0 item(s)" in r.stdout


def test_square_brackets_in_a_message_are_printed_as_they_are(cli):
    """A message quotes the user's input, which may look like the terminal's markup: `[/x]` once
    raised a MarkupError (a traceback instead of the line), `[b]` vanished from the message."""
    assert_usage_error(cli("items", "[/x] [b]y"), "queue name '[/x] [b]y' is invalid")


def test_long_queue_name_is_cut_in_the_message(cli):
    name = "q" * 10_000
    line = assert_usage_error(cli("submit", name, input="{}\n"), "10,000 characters")
    assert len(line) < 300


def test_global_options_after_the_subcommand(cli, tmp_path):
    import conveyor

    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    app = conveyor.App(url)
    app.submit("emails", {"x": 1})
    r = cli("status", "--json", db=None)  # no --db: the default file in the cwd, which does not exist
    assert r.returncode == 2 and "conveyor.db" in r.stderr
    r = cli("status", "--json", "--db", url, "--log-level", "debug", db=None)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["emails"]["pending"] == 1
    r = cli("--log-level", "warning", "submit", "emails", "--db", url, input="{}\n", db=None)
    assert r.returncode == 0, r.stderr
    assert stats(app, "emails")["total"] == 2
    assert not (tmp_path / "conveyor.db").exists()
    app.close()


def test_status_json_watch_prints_a_line_a_second(app, tmp_path):
    app.submit("emails", {"x": 1})
    proc = subprocess.Popen([sys.executable, "-m", "conveyor", "--db", app.url, "status", "--json", "--watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        app.submit("emails", {"x": 2})
        for _ in range(30):  # each line is a fresh read; the second submit shows within a few
            line = json.loads(proc.stdout.readline())
            if line["emails"]["pending"] == 2:
                break
        else:
            pytest.fail("status --json --watch never showed the second item")
        assert first["emails"]["pending"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read()


def test_demo_ignores_the_environment_database(tmp_path):
    """The demo writes demo data: never into the database $CONVEYOR_DATABASE_URL names."""
    env = {**os.environ, "CONVEYOR_DATABASE_URL": f"sqlite:///{tmp_path / 'production.db'}"}
    r = subprocess.run([sys.executable, "-m", "conveyor", "demo", "--orders", "20", "--drivers", "5", "--workers", "1"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "production.db").exists()
