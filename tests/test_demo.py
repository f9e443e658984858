"""The README's first command: ``python3 examples/demo.py``, end to end, as a user runs it."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
TASKS = 60  # two of them (every 25th) fail once on purpose


def run_in_terminal(*args: str, timeout: float) -> tuple[int, str]:
    """Run ``python3 examples/demo.py ARGS`` with its output on a pseudo-terminal."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(DEMO), *args],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        cwd=DEMO.parent.parent,
    )
    os.close(terminal)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = process.wait(timeout)
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, b"".join(chunks).decode(errors="replace")


def summary_numbers(output: str) -> dict[str, int]:
    numbers = {
        "succeeded": r"tasks:\s+(\d+) succeeded",
        "opened": r"sessions:\s+(\d+) opened",
        "closed": r"opened, (\d+) closed",
        "connections": r"connections:\s+(\d+) opened",
        "connections_closed": r"sessions, (\d+) closed at shutdown",
        "retried": r"retried:\s+(\d+) tasks",
        "failed": r"failed:\s+(\d+)",
        "transfers": r"data:\s+(\d+) transfers",
    }
    found = {name: re.search(pattern, output) for name, pattern in numbers.items()}
    missing = [name for name, match in found.items() if match is None]
    assert not missing, f"summary lacks {missing}:\n{output}"
    return {name: int(match.group(1)) for name, match in found.items() if match}


def assert_summary(output: str) -> None:
    numbers = summary_numbers(output)
    assert numbers["succeeded"] == numbers["transfers"] == TASKS, output
    assert numbers["failed"] == 0, output
    # Each retried task ran (at least) twice, each run with a session of its own.
    assert numbers["retried"] >= TASKS // 25, output
    assert numbers["opened"] == numbers["closed"] >= TASKS + numbers["retried"], output
    # The pool is reused: far fewer connections than sessions, all closed at shutdown.
    assert 0 < numbers["connections"] < numbers["opened"], output
    assert numbers["connections_closed"] == numbers["connections"], output
    assert "result:       OK" in output, output


@pytest.mark.timeout(180)
def test_demo_on_sqlite_shows_progress_and_summary() -> None:
    """The embedded default: SQLite, filesystem broker, file results; no server at all."""
    code, output = run_in_terminal("--tasks", str(TASKS), timeout=150)
    assert code == 0, output
    assert "broker:   filesystem://" in output
    assert "sqlite+aiosqlite://" in output
    # On a terminal the progress bar redraws one line.
    assert re.search(r"\r  \[#+\.*\] \d+/60", output), output
    assert f"[{'#' * 30}] {TASKS}/{TASKS}" in output
    assert_summary(output)


@pytest.mark.services
@pytest.mark.timeout(180)
def test_demo_on_postgresql_and_redis(database_url: str) -> None:
    """The same demo on the real setup, given URLs in the environment, output to a pipe."""
    env = {
        **os.environ,
        "DEMO_DATABASE_URL": database_url,
        "DEMO_BROKER_URL": "redis://127.0.0.1:6379/0",
    }
    process = subprocess.run(
        [
            sys.executable,
            str(DEMO),
            "--tasks",
            str(TASKS),
            "--pool",
            "prefork",
            "--concurrency",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    assert "database: postgresql+asyncpg://" in output
    assert "results:  redis://127.0.0.1:6379/0" in output
    assert f"{TASKS}/{TASKS} results" in output  # not a terminal: a line per quarter
    assert_summary(output)
