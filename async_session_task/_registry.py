"""The registry of runs in flight in this process (:data:`runs`), keyed by task id and
request: the Celery face adds a run in ``before_start`` and forgets it on ``task_postrun``
(``_task``); the worker's stats count it, the stall watchdog asks it who holds the loop."""

from __future__ import annotations

import asyncio
import os
from types import FrameType
from typing import Any

from ._run import Run


class Registry:
    """The runs in flight in this process, keyed by task id: a run is added in
    ``before_start`` (or by a direct call), looked up by ``self.session``, forgotten on
    ``task_postrun``; the worker's stats count it, the stall watchdog asks it who holds the
    loop.

    Two runs may share a task id: ``self.retry()`` publishes the next run before the current
    one has been cleaned up, and a redelivery under ``acks_late`` repeats it
    (docs/internals.md#same-task-id). Each run has its own request object, alive for the
    whole run, so the key pairs the task id with that object's identity, and the entry keeps
    the object alive so the pair cannot be reused while the entry exists.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[str | None, int], Run] = {}
        # A forked child must not see (or close) the sessions of its parent.
        os.register_at_fork(after_in_child=self._runs.clear)

    def add(self, run: Run) -> None:
        self._runs[run.request.id, id(run.request)] = run

    def get(self, request: Any) -> Run | None:
        return self._runs.get((request.id, id(request)))

    def discard(self, request: Any) -> Run | None:
        """Remove the run of ``request``; idempotent, and a missing entry is fine: after a
        hard time limit Celery ends the run in the parent
        (docs/internals.md#hard-limit-in-parent)."""
        return self._runs.pop((request.id, id(request)), None)

    def owner_of(self, task: asyncio.Task[Any] | None) -> Run | None:
        """The run that ``task`` (an asyncio task) belongs to, if any."""
        if task is None:
            return None
        for run in list(self._runs.values()):
            crossing = run.crossing
            if (crossing is not None and crossing.task is task) or task in (run.tasks or ()):
                return run
        return None

    def holding(self, task: asyncio.Task[Any] | None) -> tuple[str | None, FrameType | None]:
        """For the stall watchdog, given the loop's current task: the run holding the loop
        (None: no run), and where its body waits if a blocking call switched its greenlet
        out while its task held the loop. Under gevent a patched ``time.sleep`` switches
        the loop thread to its hub, so the thread's stack shows only the hub, while the
        body's greenlet keeps its frame. (A body that awaits gives the loop back: its task
        is then not the current one.)"""
        run = self.owner_of(task)
        if run is None:
            return None, None
        body = run.crossing is not None and run.crossing.task is task
        frame: FrameType | None = getattr(run.greenlet, "gr_frame", None) if body else None
        return repr(run), frame

    def __len__(self) -> int:
        return len(self._runs)


runs = Registry()
