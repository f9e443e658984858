"""The lifespan of a worker process: clients made once on its loop and shared by its runs.

``async_session_lifespan`` names a callable that takes the Celery app and returns an async
context manager, the shape of FastAPI's ``lifespan``. It is entered on the process's event
loop at the first run of a task that sets it, and what it yields is :func:`lifespan_state`
for every run after; at shutdown it is exited on the same loop, before the engines are
disposed (``_worker`` registers both in that order), within :data:`EXIT_GRACE` seconds.

The context manager is entered and exited by one asyncio task of its own, in a context of
its own: what it starts (a task group, a cancel scope, a client's background task) is
entered and left in the same task, and belongs to no run, so no run ends it. Runs wait for
it to be entered (shielded: a run cancelled meanwhile does not cancel the startup).

A lifespan whose startup raises is logged once; every run of a task that uses it then fails
with that error, in that process, until the worker is restarted. A forked child starts
without its parent's lifespans (docs/internals.md#fork).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextvars import Context
from typing import Any, TypeVar

from . import _config
from ._run import current_run

T = TypeVar("T")
logger = logging.getLogger("async_session_task")

#: Seconds a lifespan's exit may take at shutdown before it is cancelled.
EXIT_GRACE = 5.0
#: Seconds a lifespan whose exit was cancelled may take to finish before it is left behind.
EXIT_CANCEL_GRACE = 1.0


def lifespan_state() -> Mapping[str, Any]:
    """Return the mapping the ``async_session_lifespan`` yielded in this process (empty if it
    yielded nothing).

    Works from any coroutine a task body awaits or starts, like :func:`current_session`.

    Raises:
        RuntimeError: outside the ``async def`` body of an ``AsyncSessionTask``, or the
            task has no ``async_session_lifespan``.
    """
    run = current_run.get()
    if run is not None and run.lifespan_state is not None:
        return run.lifespan_state
    if run is None:
        raise RuntimeError(
            "lifespan_state() was called outside a task run: the lifespan's state is "
            "available to the async def body of an AsyncSessionTask and what it awaits."
        )
    raise RuntimeError(
        f"Task {run.task.name!r} has no lifespan: set app.conf.async_session_lifespan (or the "
        "task's async_session_lifespan option) to a callable taking the Celery app and "
        "returning an async context manager, e.g. 'myproject.worker:lifespan'."
    )


def _name(factory: Callable[..., Any]) -> str:
    module = getattr(factory, "__module__", None)
    name = getattr(factory, "__qualname__", None) or repr(factory)
    return f"{module}:{name}" if module else name


class Lifespan:
    """One entered lifespan: the asyncio task holding it open, and what it yielded."""

    def __init__(self, factory: Callable[[Any], Any], app: Any) -> None:
        self.name = _name(factory)
        self.loop = asyncio.get_running_loop()
        self.state: Mapping[str, Any] | None = None
        self.error: BaseException | None = None
        self._ready = self.loop.create_future()
        self._stop = asyncio.Event()
        # A context of its own: no run's ContextVars (nor its trace) reach the lifespan,
        # and the task factory does not count it among a run's tasks.
        self._task = self.loop.create_task(self._hold(factory, app), context=Context())

    async def _hold(self, factory: Callable[[Any], Any], app: Any) -> None:
        try:
            async with factory(app) as state:
                if state is not None and not isinstance(state, Mapping):
                    raise TypeError(f"it yielded {type(state).__name__}, not a mapping or None")
                self.state = {} if state is None else state
                self._ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if self._ready.done():
                logger.exception("The lifespan %s failed while exiting.", self.name)
            else:
                self.error = exc
                logger.error(
                    "The lifespan %s failed at startup in process %d (%s: %s): every run of "
                    "the tasks that use it fails in this process until the worker restarts.",
                    self.name,
                    os.getpid(),
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
                self._ready.set_result(None)
            if not isinstance(exc, Exception):
                raise

    async def entered(self) -> Mapping[str, Any]:
        """Wait until the lifespan is entered; its state, or the startup error."""
        await asyncio.shield(self._ready)
        if self.error is not None:
            raise RuntimeError(
                f"The lifespan {self.name} failed at startup: {type(self.error).__name__}: "
                f"{self.error} (restart the worker once the cause is fixed)."
            ) from self.error
        assert self.state is not None
        return self.state

    async def exit(self) -> None:
        """Leave the context manager on this loop, within :data:`EXIT_GRACE` seconds."""
        self._stop.set()
        done, _ = await asyncio.wait({self._task}, timeout=EXIT_GRACE)
        if not done:
            logger.warning(
                "The lifespan %s did not exit within %.0f s: it is cancelled.",
                self.name,
                EXIT_GRACE,
            )
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=EXIT_CANCEL_GRACE)


class Lifespans:
    """The lifespans entered in this process, by their callable."""

    def __init__(self) -> None:
        self._entered: dict[Callable[[Any], Any], Lifespan] = {}
        self._factories: dict[type[Any], Callable[[Any], Any] | None] = {}
        self._substitute: Mapping[str, Any] | None = None
        os.register_at_fork(after_in_child=self.forget)

    def factory_of(self, task: Any) -> Callable[[Any], Any] | None:
        """The lifespan callable of ``task``'s class (None: none set), resolved once.

        Raises:
            celery.exceptions.ImproperlyConfigured: the setting does not resolve.
        """
        cls = type(task)
        if cls not in self._factories:
            self._factories[cls] = _config.lifespan_of(task)
        return self._factories[cls]

    def entering(self, task: Any) -> Coroutine[Any, Any, Mapping[str, Any]] | None:
        """What enters ``task``'s lifespan on the loop (:meth:`enter`), for the run to await
        first; None where there is none, so a run without one pays nothing.

        Raises:
            celery.exceptions.ImproperlyConfigured: the setting does not resolve.
        """
        if self._substitute is None and self.factory_of(task) is None:
            return None
        return self.enter(task)

    async def enter(self, task: Any) -> Mapping[str, Any]:
        """On the loop: enter ``task``'s lifespan if this process has not yet; its state."""
        if self._substitute is not None:
            return self._substitute
        factory = self.factory_of(task)
        assert factory is not None
        lifespan = self._entered.get(factory)
        if lifespan is None or lifespan.loop is not asyncio.get_running_loop():
            lifespan = self._entered[factory] = Lifespan(factory, task.app)
        return await lifespan.entered()

    async def exit(self) -> None:
        """On the loop, before it stops: exit every lifespan, the last entered first."""
        entered, self._entered = list(self._entered.values()), {}
        for lifespan in reversed(entered):
            await lifespan.exit()

    def forget(self) -> None:
        """Drop the lifespans without exiting them (a forked child, a lost loop)."""
        self._entered = {}
        self._factories = {}

    @contextlib.contextmanager
    def substitute(self, state: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
        """Within the block, runs see ``state`` as their lifespan's, and no configured
        lifespan is entered."""
        saved, self._substitute = self._substitute, state
        try:
            yield state
        finally:
            self._substitute = saved


lifespans = Lifespans()
