"""`conveyor serve` as a command: what it needs said in one line."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from conveyor.cli import main


def test_without_the_web_extra_one_line_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "from conveyor.cli import main; main(['--db', sys.argv[1], 'serve'])")
    run = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'x.db'}"], capture_output=True, text=True,
                         timeout=60, env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'conveyor[web]'" in lines[0], run.stderr


def test_a_public_host_without_tokens_refuses_to_start(tmp_path):
    result = CliRunner().invoke(main, ["--db", f"sqlite:///{tmp_path / 'x.db'}", "serve", "--host", "0.0.0.0"],
                                env={"CONVEYOR_API_TOKENS": ""})
    assert result.exit_code == 2 and "--insecure" in result.output


def test_a_bad_env_token_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["--db", f"sqlite:///{tmp_path / 'x.db'}", "serve"],
                                env={"CONVEYOR_API_TOKENS": "admin:abc"})
    assert result.exit_code == 2 and "scope must be read or write" in result.output
