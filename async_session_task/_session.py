"""One ``AsyncSession`` per run: the registry that holds it and the context that finds it."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession


class Run:
    """One execution of a task body: its request and its session.

    The session is made by ``maker`` on first use, then is the same object for the rest of
    the run: a body that never touches the database pays neither for making the session nor
    for closing it (an ``AsyncSession`` costs more to close than to make, even unused).
    """

    __slots__ = ("_maker", "_session", "request", "task")

    def __init__(
        self,
        task: Any,
        request: Any,
        session: AsyncSession | None = None,
        *,
        maker: Callable[[], AsyncSession] | None = None,
    ) -> None:
        self.task = task
        self.request = request
        self._session = session
        self._maker = maker

    @property
    def session(self) -> AsyncSession:
        """This run's session, made on first access."""
        session = self._session
        if session is None:
            assert self._maker is not None, "a Run has a session or a maker"
            session = self._session = self._maker()
        return session

    @property
    def opened_session(self) -> AsyncSession | None:
        """The session if it was made already, without making one."""
        return self._session


#: The run whose coroutine is executing. Set on the event loop, in the run's own context,
#: so it is seen by every coroutine the body awaits and inside ``session.run_sync()``
#: (SQLAlchemy hands the greenlet the same context); Celery's request stack is not (TRAPS 6).
current_run: ContextVar[Run | None] = ContextVar("async_session_task.run", default=None)


def current_session() -> AsyncSession:
    """Return the ``AsyncSession`` of the task run that is executing.

    Works from any coroutine the task body awaits, however deep, so an existing
    repository layer can use it unchanged.

    Raises:
        RuntimeError: outside the ``async def`` body of an ``AsyncSessionTask``.
    """
    run = current_run.get()
    if run is None:
        raise RuntimeError(
            "current_session() was called outside a task run: a session exists only while "
            "the async def body of an AsyncSessionTask (and what it awaits) is running."
        )
    return run.session


class Registry:
    """The live runs of this process, keyed by task id.

    Two runs may share a task id: ``self.retry()`` publishes the next run before the current
    one has been cleaned up, and a redelivery under ``acks_late`` repeats it (TRAPS 7). Each
    run has its own request object, which is alive for the whole run, so the key pairs the
    task id with that object's identity, and the entry keeps the object alive so the pair
    cannot be reused while the entry exists.
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
        """Remove the run of ``request``; idempotent, and a missing entry is fine (TRAPS 3)."""
        return self._runs.pop((request.id, id(request)), None)

    def __len__(self) -> int:
        return len(self._runs)


runs = Registry()
