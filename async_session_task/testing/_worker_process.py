"""A real ``celery worker`` in a subprocess for a test, and broker settings that need no
server (``async_session_task.testing`` names them)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Lines a worker writes when a loop, a connection or a session was not shut down properly.
SHUTDOWN_PROBLEMS = (
    "Event loop is closed",
    "was not closed",
    "never awaited",
    "still registered at shutdown",
    "Unclosed",
    "Task was destroyed but it is pending",
)


def file_broker_settings(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Celery settings for a broker and result backend that need no server.

    kombu's filesystem transport carries the messages (control commands such as ``ping``
    included) and Celery's file backend stores the results, both in ``folder``, which the
    test process and its workers must share. For ``app.conf.update(...)``; slower than
    Redis, and for one machine only. The transport is kombu's, except that a message file
    appears only once it is complete (see ``_filebroker``).
    """
    root = Path(folder)
    messages, control, results = root / "messages", root / "control", root / "results"
    for path in (messages, control, results):
        path.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport": "async_session_task._filebroker:Transport",
        "broker_transport_options": {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "control_folder": str(control),
            # The transport polls its folder; the default (1 s) makes every ping slow.
            "polling_interval": 0.05,
        },
        "result_backend": f"file://{results}",
    }


@dataclass
class WorkerProcess:
    """A running ``celery worker`` started by ``worker_process``."""

    app: Any
    nodename: str
    queue: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        """Everything the worker has written to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def ping(self, timeout: float = 1.0) -> bool:
        replies = self.app.control.ping(destination=[self.nodename], timeout=timeout)
        return any(self.nodename in reply for reply in replies)

    def send(self, task: Any, *args: Any, **options: Any) -> Any:
        """Send ``task`` (or a task name) with ``args`` to this worker's queue, through
        ``app``'s broker (which may differ from the broker the task's own app uses)."""
        name = task if isinstance(task, str) else task.name
        return self.app.send_task(name, args, queue=self.queue, **options)

    def child_pids(self) -> list[int]:
        stats = self.app.control.inspect(destination=[self.nodename], timeout=2).stats() or {}
        pool = stats.get(self.nodename, {}).get("pool", {})
        return [int(pid) for pid in pool.get("processes", [])]

    def shutdown_problems(self) -> list[str]:
        """Log lines that tell of a loop, connection or session not shut down properly."""
        return [
            line
            for line in self.log.splitlines()
            if any(problem in line for problem in SHUTDOWN_PROBLEMS)
        ]

    def stop(self, timeout: float = 60.0) -> int:
        """Warm shutdown (SIGTERM): running tasks finish, then the worker exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"worker {self.nodename} did not stop:\n{self.log}") from None


@contextlib.contextmanager
def worker_process(
    app: Any,
    module: str,
    *,
    pool: str = "prefork",
    concurrency: int = 2,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    name: str | None = None,
    startup_timeout: float = 60.0,
) -> Iterator[WorkerProcess]:
    """Run ``celery -A module worker`` in a subprocess on a queue of its own.

    ``app`` is the same Celery app in the calling process (used to ping the worker and to
    send tasks); ``module`` is its import path, as for ``celery -A``. ``name`` (random by
    default) names the queue ``q-<name>`` and the node ``w-<name>@<host>``. The worker is ready
    when it answers a ping; on exit it gets a warm shutdown and is waited for.
    """
    name = name or uuid.uuid4().hex[:12]
    queue = f"q-{name}"
    nodename = f"w-{name}@{os.uname().nodename}"
    with tempfile.TemporaryDirectory(prefix="ast-worker-") as tmp:
        log_path = Path(tmp) / "worker.log"
        command = [
            sys.executable, "-m", "celery", "-A", module, "worker",
            "-P", pool, "-c", str(concurrency), "-Q", queue, "-n", nodename,
            "--without-gossip", "--without-mingle", "-l", "INFO", *args,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        worker = WorkerProcess(app, nodename, queue, process, log_path)
        try:
            deadline = time.monotonic() + startup_timeout
            while not worker.ping():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {nodename} did not start:\n{worker.log}")
            yield worker
        finally:
            worker.stop()
