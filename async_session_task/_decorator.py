"""``task(app, **options)``: ``@app.task(base=AsyncSessionTask, **options)``, typed.

The result is an ``AsyncSessionTask[P, R]`` for an ``async def`` body taking ``P`` and
returning ``R`` (docs/typed-tasks.md); with ``bind=True`` the body's first parameter is the
task itself.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, Literal, TypeVar, overload

from ._task import AsyncSessionTask
from ._typed import P

R = TypeVar("R")


@overload
def task(
    app: Any, *, bind: Literal[True], **options: Any
) -> Callable[[Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]], AsyncSessionTask[P, R]]: ...


@overload
def task(
    app: Any, *, bind: Literal[False] = False, **options: Any
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], AsyncSessionTask[P, R]]: ...


def task(app: Any, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """Register an ``async def`` body as ``@app.task(base=AsyncSessionTask, **options)``.

    ``@task(app)`` and ``@task(app, bind=True, autocommit=True, ...)``; every Celery and
    ``AsyncSessionTask`` option is passed on as it is.
    """

    def register(fun: Callable[..., Any]) -> Any:
        return app.task(base=AsyncSessionTask, **options)(fun)

    return register
