"""The crossing between a worker's thread or greenlet, which waits, and a body on the loop.

A :class:`Crossing` is one coroutine run for one waiting caller. Unlike
``run_coroutine_threadsafe``, cancelling it cancels the asyncio task and the caller then
waits for that task to end, so the body's ``finally`` blocks and the session cleanup have
run before the caller moves on (docs/internals.md#cancel-then-wait). While it waits, the
caller runs the sync functions the body hands back (:meth:`Crossing.call_in_worker`):
Celery's broker and result connections belong to the worker's thread or greenlet
(docs/internals.md#publish-from-spawned-task). The body hands them up from its greenlet, or
one below it, through ``_drive``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Coroutine
from contextvars import Context
from typing import Any, TypeVar

from ._drive import await_in_body, in_body
from ._waiters import Waiter, settle

T = TypeVar("T")

_Request = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class Crossing:
    """One coroutine on the loop, the asyncio task running it, and the caller waiting for it.

    ``waiter`` is None where the caller runs the loop itself (a prefork child, solo): the
    coroutine then stops the loop as it ends, and functions handed back run where they are.
    """

    __slots__ = ("_error", "_loop", "_requests", "_value", "_waiter", "cancelled", "done", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, waiter: Waiter | None) -> None:
        self._loop = loop
        self._waiter = waiter
        self.task: asyncio.Task[None] | None = None
        #: Set once the coroutine has ended (or was cancelled before it started).
        self.done = False
        #: Why the run was cancelled, if it was: the caller raises accordingly.
        self.cancelled: BaseException | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        self._requests: collections.deque[_Request] = collections.deque()

    # -- on the loop --

    def start(self, coro: Coroutine[Any, Any, Any], context: Context) -> None:
        if self.cancelled is not None:
            coro.close()
            self._finish()
            return
        # A context per run: ContextVars never leak from one run to the next
        # (docs/internals.md#context-per-run).
        # Made directly, not through the loop's task factory: this is the run's own task,
        # not one the run started.
        self.task = asyncio.Task(self._run(coro), loop=self._loop, context=context)

    async def _run(self, coro: Coroutine[Any, Any, Any]) -> None:
        # The caller is woken as the coroutine ends, rather than by a done callback of the
        # task, which would cost the loop one more pass; so the outcome is kept here.
        try:
            self._value = await coro
        except asyncio.CancelledError as exc:
            self._error = exc
            raise  # the task ends cancelled
        except BaseException as exc:
            # SystemExit and KeyboardInterrupt too: raised in the caller, as from a sync
            # task, never left to stop the loop (docs/internals.md#base-exception-in-body).
            self._error = exc
        finally:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        if self._waiter is None:
            self._loop.stop()
        else:
            self._waiter.notify()

    def cancel(self, reason: BaseException) -> None:
        """Cancel the coroutine at its current await (on the loop's thread)."""
        if self.cancelled is None:
            self.cancelled = reason
        if self.task is not None:
            self.task.cancel()

    def abandon(self, error: BaseException) -> None:
        """The loop is gone: wake the caller with ``error`` (from any thread)."""
        if not self.done:
            self._error = error
            self._finish()

    def hands_back(self) -> bool:
        """True where :meth:`call_in_worker` hands its call to the waiting worker: in a
        driven greenlet or one below it, with a worker waiting in another thread or greenlet."""
        return self._waiter is not None and in_body()

    def call_in_worker(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """From the body, call ``fn`` in the worker thread or greenlet that waits for it.

        Where the caller runs the loop, or outside any body, ``fn`` is called right here.
        """
        waiter = self._waiter
        if waiter is None or not in_body():
            return fn(*args, **kwargs)
        future: asyncio.Future[T] = self._loop.create_future()
        self._requests.append((fn, args, kwargs, future))
        waiter.notify()
        return await_in_body(future)

    # -- in the caller --

    def wait(self, timeout: float | None = None) -> bool:
        """Serve functions handed back until the coroutine is done; False on timeout."""
        assert self._waiter is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if self._waiter.wait(remaining):
                self._serve()
        return True

    def close(self) -> None:
        """The caller stops waiting: later wake-ups are dropped."""
        if self._waiter is not None:
            self._waiter.close()

    def _serve(self) -> None:
        while self._requests:
            fn, args, kwargs, future = self._requests.popleft()
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                self._loop.call_soon_threadsafe(settle, future, None, exc)
            else:
                self._loop.call_soon_threadsafe(settle, future, result, None)

    def result(self) -> Any:
        """The coroutine's value; its exception, or ``CancelledError``, raised."""
        if self._error is not None:
            try:
                raise self._error
            finally:  # no cycle through this frame's traceback
                self._error = None
        if self.task is None or self.task.cancelled():
            raise asyncio.CancelledError
        return self._value
