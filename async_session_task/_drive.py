"""Bodies stepped from greenlets, so blocking code inside them can await on the loop.

On the loop, every body coroutine, and every asyncio task a run starts, is stepped from a
greenlet of its own (:func:`drive`), and each object it yields is handed, unchanged, to the
asyncio task above it. Blocking code called inside (an eager task call, Celery's publishing),
in the body's greenlet or one below it (SQLAlchemy's, inside ``session.run_sync()``), can
then hand a coroutine up instead of blocking the loop (:func:`await_in_body`), as SQLAlchemy
runs its sync ORM core on async drivers (``greenlet_spawn``). See
docs/internals.md#nested-eager and docs/internals.md#publish-from-run-sync.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet

T = TypeVar("T")


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
