"""``celery inspect async_session_stats``: what the runtime of the worker's main process holds.

In a prefork worker the main process never starts a loop; each child has its own, and
reports leaked sessions in its log when it exits (see ``_runtime.shutdown``).
"""

from __future__ import annotations

import os
from typing import Any

from celery.worker.control import inspect_command

from . import _runtime
from ._session import runs


@inspect_command()  # type: ignore[untyped-decorator]  # celery is untyped
def async_session_stats(state: Any, **_: Any) -> dict[str, Any]:
    """Pid, whether an event loop runs, live sessions and engines of this process."""
    runtime = _runtime.current()
    return {
        "pid": os.getpid(),
        "loop_running": runtime is not None,
        "sessions": len(runs),
        "engines": 0 if runtime is None else runtime.engine_count(),
    }
