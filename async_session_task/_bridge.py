"""Drive a coroutine from a greenlet, so blocking code inside it can still await.

A task body that calls another task eagerly (``other.apply()``, ``task_always_eager``) makes
a blocking call on the event loop's own thread; blocking there would wait for a loop that can
no longer run (TRAPS 16). So each body's coroutine is stepped from a greenlet of its own, and
every object it yields is handed, unchanged, to the asyncio task above it. A blocking call
made by the body can then hand up a coroutine instead (:func:`await_in_body`): the task awaits
it on the same loop, with the same engine, and switches back with its result. SQLAlchemy
runs its sync ORM core on async drivers the same way (``greenlet_spawn``).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet

T = TypeVar("T")


class _BodyGreenlet(greenlet):
    """Steps body coroutines, one at a time; its parent is the greenlet running the loop.

    Starting a new greenlet and letting it die costs ~8 us, a switch to a live one under
    1 us: so a finished body's greenlet waits in this thread's pool for the next body.
    """

    def __init__(self) -> None:
        super().__init__(_serve)
        #: The ended body's value or exception, until drive() takes it.
        self.outcome: tuple[Any, BaseException | None] = (None, None)


#: What a body greenlet hands up when the body has ended (its outcome is on the greenlet).
_FINISHED = object()


class _Yield:
    """Awaitable that passes one object the body yielded up to the asyncio task."""

    __slots__ = ("item",)

    def __init__(self, item: Any) -> None:
        self.item = item

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.item)


#: Idle body greenlets of this thread (a greenlet can only be switched to in its own thread).
_idle = threading.local()
#: Idle body greenlets kept per thread; more than this many bodies at once make new ones.
_POOL_SIZE = 64


def _serve(coro: Coroutine[Any, Any, Any]) -> None:
    body: Any = getcurrent()
    while True:
        body.outcome = _run(coro)
        # Idle in this switch until the next body, holding only the ended coroutine: the
        # outcome travels on the greenlet, not as the switch's argument, which this frame
        # would keep (and with it the last result or traceback) while the greenlet is idle.
        coro = _parent().switch(_FINISHED)


def _run(coro: Coroutine[Any, Any, Any]) -> tuple[Any, BaseException | None]:
    try:
        return _step(coro), None
    except GreenletExit:
        raise  # this greenlet is being collected: let it die
    except BaseException as exc:  # handed to drive(), which raises it
        return None, exc


def _step(coro: Coroutine[Any, Any, Any]) -> Any:
    parent = _parent()
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            item = coro.send(value) if error is None else coro.throw(error)
        except StopIteration as stop:
            return stop.value
        try:
            value, error = parent.switch(_Yield(item)), None
        except BaseException as exc:  # cancellation and errors go back into the body
            value, error = None, exc


async def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro``, stepping it from a greenlet of its own."""
    pool: list[_BodyGreenlet] | None = getattr(_idle, "pool", None)
    if pool is None:
        pool = _idle.pool = []
    body = pool.pop() if pool else _BodyGreenlet()
    # No local holds the loop's greenlet: the stall watchdog looks for the body's greenlet
    # among this frame's locals (_watchdog._switched_out_body).
    body.parent = getcurrent()
    # Same contextvars as the asyncio task that drives it, as SQLAlchemy does.
    body.gr_context = getcurrent().gr_context
    # A _Yield of the body, or the coroutine of a nested call (await_in_body).
    awaitable: Any = body.switch(coro)
    while awaitable is not _FINISHED:
        if body.dead:  # ended by GreenletExit, which it returned: as an unpooled greenlet
            ended: T = awaitable
            return ended
        try:
            sent = await awaitable
        except BaseException as exc:
            awaitable = body.throw(exc)
        else:
            awaitable = body.switch(sent)
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
    """True where :func:`await_in_body` can suspend: inside a driven coroutine's greenlet."""
    return isinstance(getcurrent(), _BodyGreenlet)


def await_in_body(awaitable: Awaitable[T]) -> T:
    """From blocking code inside a driven body, await ``awaitable`` on the running loop."""
    result: T = _parent().switch(awaitable)
    return result


def _parent() -> greenlet:
    parent = getcurrent().parent
    assert parent is not None, "a body greenlet always has the loop's greenlet as parent"
    return parent
