"""Helpers for testing ``AsyncSessionTask`` tasks.

* ``rollback_sessions``: run tasks in the test process (``apply()``, eager mode, a direct
  call) with every session bound to one connection whose transaction is rolled back at the
  end, so tests are isolated even when the tasks commit.
* ``worker_process``: a real ``celery worker`` in a subprocess, on a queue of its own.
* ``override_lifespan_state``: runs in the test process see a state of the test's own
  instead of entering the ``async_session_lifespan``.
* ``file_broker_settings``: a broker and result backend in a folder, for workers without a
  server.

The pytest plugin of this package (``async_session_task._pytest_plugin``, registered through
the ``pytest11`` entry point) wraps the first two in fixtures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from async_session_task._lifespan import lifespans

# The public face of private modules, one per kind of state: the rolled-back scope, the
# worker subprocess.
from ._rollback import QueuedCalls, RollbackSessions, rollback_sessions
from ._worker_process import SHUTDOWN_PROBLEMS as SHUTDOWN_PROBLEMS
from ._worker_process import WorkerProcess, file_broker_settings, worker_process

__all__ = [
    "QueuedCalls",
    "RollbackSessions",
    "WorkerProcess",
    "file_broker_settings",
    "override_lifespan_state",
    "rollback_sessions",
    "worker_process",
]


@contextlib.contextmanager
def override_lifespan_state(state: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Within the block, runs in this process (``apply()``, eager mode, a direct call) see
    ``state`` as their ``lifespan_state()``, and no ``async_session_lifespan`` is entered:
    a test substitutes its own clients (a fake HTTP transport, a test Redis database).

    Runs in worker processes are not affected.
    """
    with lifespans.substitute(state):
        yield state
