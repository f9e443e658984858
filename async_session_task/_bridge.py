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

from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, TypeVar

from greenlet import getcurrent, greenlet

T = TypeVar("T")


class _BodyGreenlet(greenlet):
    """Steps one body's coroutine; its parent is the greenlet running the event loop."""

    def __init__(self, parent: greenlet) -> None:
        super().__init__(_step, parent)
        # Same contextvars as the asyncio task that drives it, as SQLAlchemy does.
        self.gr_context = parent.gr_context


class _Yield:
    """Awaitable that passes one object the body yielded up to the asyncio task."""

    __slots__ = ("item",)

    def __init__(self, item: Any) -> None:
        self.item = item

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.item)


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
    body = _BodyGreenlet(getcurrent())
    awaitable: Any = body.switch(coro)
    while not body.dead:
        try:
            value = await awaitable
        except BaseException as exc:
            awaitable = body.throw(exc)
        else:
            awaitable = body.switch(value)
    result: T = awaitable
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
