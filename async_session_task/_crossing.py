"""The crossing between a worker's thread or greenlet, which waits, and a body on the loop.

Two halves, one per side of the crossing:

* On the loop, every body coroutine, and every asyncio task a run starts, is stepped from a
  greenlet of its own (:func:`drive`), and each object it yields is handed, unchanged, to the
  asyncio task above it. Blocking code called inside (an eager task call, Celery's
  publishing) can then hand a coroutine up instead of blocking the loop
  (:func:`await_in_body`), as SQLAlchemy runs its sync ORM core on async drivers
  (``greenlet_spawn``). See docs/internals.md#nested-eager.
* In the worker, a :class:`Crossing` is one coroutine run for one waiting caller. Unlike
  ``run_coroutine_threadsafe``, cancelling it cancels the asyncio task and the caller then
  waits for that task to end, so the body's ``finally`` blocks and the session cleanup have
  run before the caller moves on (docs/internals.md#cancel-then-wait). While it waits, the
  caller runs the sync functions the body hands back (:meth:`Crossing.call_in_worker`):
  Celery's broker and result connections belong to the worker's thread or greenlet
  (docs/internals.md#publish-from-spawned-task).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from contextvars import Context
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet

from ._waiters import Waiter

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
                self._loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                self._loop.call_soon_threadsafe(_settle, future, result, None)

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


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class _BodyGreenlet(greenlet):
    """Steps coroutines, one at a time; its parent is the greenlet running the loop.

    Starting a new greenlet and letting it die costs ~8 us, a switch to a live one under
    1 us: so a finished body's greenlet waits in this thread's pool for the next body.
    """

    def __init__(self) -> None:
        super().__init__(_step_bodies)
        #: The ended coroutine's value or exception, until drive() takes it.
        self.outcome: tuple[Any, BaseException | None] = (None, None)


#: What a body greenlet hands up when its coroutine has ended (the outcome is on it).
_FINISHED = object()


class _Nested:
    """An awaitable handed up by blocking code in the body (:func:`await_in_body`), to be
    awaited by the asyncio task, and the greenlet to resume with its outcome; anything else
    a body greenlet hands up is what the coroutine yielded, passed to the task as it is."""

    __slots__ = ("awaitable", "origin")

    def __init__(self, awaitable: Awaitable[Any], origin: greenlet) -> None:
        self.awaitable = awaitable
        self.origin = origin


#: Idle body greenlets of this thread (a greenlet can only be switched to in its own thread).
_idle = threading.local()
#: Idle body greenlets kept per thread; more than this many bodies at once make new ones.
_POOL_SIZE = 64


def _step_bodies(coro: Coroutine[Any, Any, Any]) -> None:
    body: Any = getcurrent()
    while True:
        body.outcome = _outcome_of(coro)
        # Idle in this switch until the next body, holding only the ended coroutine: the
        # outcome travels on the greenlet, not as the switch's argument, which this frame
        # would keep (and with it the last result or traceback) while the greenlet is idle.
        coro = _parent(body).switch(_FINISHED)


def _outcome_of(coro: Coroutine[Any, Any, Any]) -> tuple[Any, BaseException | None]:
    try:
        return _step(coro), None
    except GreenletExit:
        raise  # this greenlet is being collected: let it die
    except BaseException as exc:  # handed to drive(), which raises it
        return None, exc


def _step(coro: Coroutine[Any, Any, Any]) -> Any:
    parent = _parent(getcurrent())
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            item = coro.send(value) if error is None else coro.throw(error)
        except StopIteration as stop:
            return stop.value
        try:
            value, error = parent.switch(item), None
        except BaseException as exc:  # cancellation and errors go back into the body
            value, error = None, exc


@types.coroutine
def drive(coro: Coroutine[Any, Any, T], holder: Any = None) -> Generator[Any, Any, T]:
    """Await ``coro``, stepping it from a greenlet of its own.

    ``holder.greenlet`` (if a holder is given) is that greenlet while ``coro`` runs: the
    stall watchdog shows where it waits when a blocking call switched it out.

    A generator-based coroutine: what the body yields is yielded on to the asyncio task as
    it is, with no awaitable made per suspension (a run suspends at each round trip).
    """
    pool: list[_BodyGreenlet] | None = getattr(_idle, "pool", None)
    if pool is None:
        pool = _idle.pool = []
    body = pool.pop() if pool else _BodyGreenlet()
    body.parent = getcurrent()
    # Same contextvars as the asyncio task that drives it, as SQLAlchemy does.
    body.gr_context = getcurrent().gr_context
    if holder is not None:
        holder.greenlet = body
    # What the body yielded, or a nested call's awaitable (await_in_body).
    item: Any = body.switch(coro)
    while item is not _FINISHED:
        if body.dead:  # ended by GreenletExit, which it returned: as an unpooled greenlet
            ended: T = item
            return ended
        resume: greenlet = body
        try:
            if type(item) is _Nested:
                # Handed up from the body's greenlet or one below it (run_sync()'s):
                # its outcome goes back there.
                resume = item.origin
                sent = yield from item.awaitable.__await__()
            else:
                sent = yield item
        except BaseException as exc:
            item = resume.throw(exc)
        else:
            item = resume.switch(sent)
    if holder is not None:
        holder.greenlet = None
    result: T
    result, error = body.outcome
    # Neither the run's context nor its outcome is kept alive by an idle greenlet.
    body.gr_context, body.outcome = None, (None, None)
    if len(pool) < _POOL_SIZE:
        pool.append(body)
    if error is not None:
        try:
            raise error
        finally:  # no cycle through this frame's traceback
            error = None
    return result


def in_body() -> bool:
    """True where :func:`await_in_body` can suspend: in a driven coroutine's greenlet, or in
    one below it (SQLAlchemy's, inside ``session.run_sync()`` or an ORM event hook)."""
    return _body_of(getcurrent()) is not None


def await_in_body(awaitable: Awaitable[T]) -> T:
    """From blocking code inside a driven body, await ``awaitable`` on the running loop.

    From a greenlet below the body's, the awaitable is handed straight to the loop's
    greenlet and its outcome back to the caller; the greenlets in between stay suspended
    where they are (docs/internals.md#publish-from-run-sync).
    """
    current = getcurrent()
    body = _body_of(current)
    assert body is not None, "await_in_body() is called inside a driven body"
    result: T = _parent(body).switch(_Nested(awaitable, current))
    return result


def _body_of(current: greenlet) -> _BodyGreenlet | None:
    """The driven greenlet ``current`` is, or runs below (None: outside any body)."""
    found: greenlet | None = current
    while found is not None and type(found) is not _BodyGreenlet:
        found = found.parent
    return found


def _parent(body: greenlet) -> greenlet:
    parent = body.parent
    assert parent is not None, "a body greenlet always has the loop's greenlet as parent"
    return parent
