"""One coroutine run on the loop for a caller in another thread or greenlet."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Coroutine
from contextvars import Context, ContextVar
from typing import Any, TypeVar

from . import _bridge
from ._waiters import Waiter

T = TypeVar("T")

#: The call whose coroutine is running (set in that coroutine's context).
current_call: ContextVar[Call | None] = ContextVar("async_session_task.call", default=None)

_Request = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class Call:
    """The coroutine, the asyncio task running it, and the caller waiting for it.

    Unlike ``run_coroutine_threadsafe``, cancelling a :class:`Call` cancels the asyncio task
    and the caller then waits for that task to finish, so the body's ``finally`` blocks and
    the session cleanup have run before the caller moves on (TRAPS 17).

    While it waits, the caller also runs the sync functions the coroutine hands back with
    :func:`in_worker`: Celery's publishing and result-store calls must run in the worker's
    own thread or greenlet, where its broker connections live (a gevent or eventlet socket
    used from the loop's thread fails: "Cannot switch to a different thread") and where
    Celery's task stack names the parent of the tasks they publish.
    """

    __slots__ = (
        "_cancelled",
        "_context",
        "_coro",
        "_done",
        "_error",
        "_loop",
        "_requests",
        "_task",
        "_value",
        "_waiter",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        context: Context,
        waiter: Waiter,
    ) -> None:
        self._loop = loop
        self._coro = coro
        self._context = context
        self._waiter = waiter
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._requests: collections.deque[_Request] = collections.deque()

    # -- on the loop --

    def start(self) -> None:
        if self._cancelled:
            self._coro.close()
            self._finish()
            return
        self._context.run(current_call.set, self)
        # A context per run (TRAPS 19): ContextVars never leak from one run to the next.
        self._task = self._loop.create_task(self._run(self._coro), context=self._context)

    async def _run(self, coro: Coroutine[Any, Any, Any]) -> None:
        # The caller is woken as the coroutine ends, rather than by a done callback of the
        # task, which would cost the loop one more pass; so the outcome is kept here.
        try:
            self._value = await coro
        except BaseException as exc:
            self._error = exc
            if not isinstance(exc, Exception):
                raise  # the task ends cancelled (or the loop stops), as it would have
        finally:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self._waiter.notify()

    def cancel(self) -> None:
        if self._task is None:
            self._cancelled = True
        else:
            self._task.cancel()

    def forward(self, fn: Callable[..., T], args: Any, kwargs: Any) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self._loop.create_future()
        self._requests.append((fn, args, kwargs, future))
        self._waiter.notify()
        return future

    # -- in the caller --

    def wait(self, timeout: float | None = None) -> bool:
        """Serve forwarded functions until the coroutine is done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if self._waiter.wait(remaining):
                self._serve()
        return True

    def _serve(self) -> None:
        while self._requests:
            fn, args, kwargs, future = self._requests.popleft()
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                self._loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                self._loop.call_soon_threadsafe(_settle, future, result, None)

    def result(self) -> Any:
        if self._task is None:
            raise asyncio.CancelledError
        if self._error is not None:
            raise self._error
        return self._value


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def in_worker(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` in the worker thread or greenlet that waits for the running body.

    From anywhere else (outside a body, or inside ``session.run_sync()``), ``fn`` is
    called right here.
    """
    call = current_call.get()
    if call is None or not _bridge.in_body():
        return fn(*args, **kwargs)
    return _bridge.await_in_body(call.forward(fn, args, kwargs))
