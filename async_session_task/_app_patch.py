"""The patch of the user's app: its blocking broker and result calls, made from a body, are run
by the worker's thread or greenlet (docs/internals.md#app-patch).

The most invasive thing the package does, so it lives alone: ``AsyncSessionTask.on_bound``
applies it once per app.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

from celery._state import _task_stack

from ._run import current_run, hands_back, in_worker

#: Set on an app whose calls are forwarded (``on_bound`` runs for every task class).
_FORWARDED = "_async_session_task_forwarded"


def forward_to_worker(app: Any) -> None:
    """Patch the user's app, once, so that its blocking broker and result calls made from a
    body are run by the worker's thread or greenlet, which owns their connections and may
    block (docs/internals.md#app-patch). Three attributes of ``app`` are replaced:

    * ``app.send_task``: every ``delay``, ``apply_async`` and canvas, handed to the worker
      with the running task as the parent;
    * ``app.producer_or_acquire``: a group takes no producer on the loop's thread, each
      message takes its own in the worker;
    * ``app.AsyncResult``: a subclass whose ``get()`` is handed to the worker (joining a
      subtask leaves the loop free, docs/internals.md#join-subtask).

    Each wraps what the app had (instrumentation may have replaced it first). Idempotent:
    a private marker on the app says it was done."""
    if vars(app).get(_FORWARDED):
        return
    setattr(app, _FORWARDED, True)
    send_task = app.send_task

    @functools.wraps(send_task)
    def forwarded(*args: Any, **kwargs: Any) -> Any:
        return in_worker(_as_parent, send_task, *args, **kwargs)

    app.send_task = forwarded

    # A group acquires one producer for all its messages, then publishes each through
    # send_task. From a body that producer would be taken on the loop's thread and used in
    # the worker's (a green pool's queue, taken from a real thread, never returns on
    # eventlet): there each message takes its own, in the worker.
    producer_or_acquire = app.producer_or_acquire

    @functools.wraps(producer_or_acquire)
    def producer_or_acquire_in_worker(producer: Any = None) -> Any:
        if producer is None and hands_back():
            return contextlib.nullcontext(None)
        return producer_or_acquire(producer)

    app.producer_or_acquire = producer_or_acquire_in_worker

    class AsyncResult(app.AsyncResult):  # type: ignore[misc]  # built per app, untyped
        def get(self, *args: Any, **kwargs: Any) -> Any:
            return in_worker(super().get, *args, **kwargs)

    app.AsyncResult = AsyncResult


def _as_parent(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the running task on Celery's task stack, so ``send_task`` names it
    as the parent (and root) of what it publishes. Where the body runs inline, its
    greenlet has an empty stack of its own (Celery keys the stack by greenlet)."""
    run = current_run.get()
    if run is None or _task_stack.top is not None:
        return fn(*args, **kwargs)
    _task_stack.push(run.task)
    try:
        return fn(*args, **kwargs)
    finally:
        _task_stack.pop()
