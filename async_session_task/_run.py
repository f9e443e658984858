"""Sessions and runs: one ``AsyncSession`` per run, and the registry of runs in flight (the
session factories they take their sessions from are ``_factory.factories``).

The lifecycle of one run, as the task class drives it:

1. ``before_start`` registers a :class:`Run` in :data:`runs` (keyed by task id and request).
2. :meth:`Run.execute` awaits the body on the loop with the run as :data:`current_run`; its
   session is made on first use. When the body ends, whatever the outcome, the asyncio tasks
   the run started are ended and the session is closed (what was not committed is rolled
   back), before the worker sees the result.
3. ``task_postrun`` removes the run from :data:`runs`: Celery sends it for every outcome,
   while ``after_return`` is skipped for RETRY, IGNORED and REJECTED
   (docs/internals.md#after-return-skipped, docs/internals.md#task-postrun).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextvars import Context, ContextVar
from types import CoroutineType, FrameType
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.session import _SessionCloseState

from ._crossing import Crossing
from ._drive import drive

T = TypeVar("T")
logger = logging.getLogger("async_session_task")

#: Seconds a run waits, as it ends, for the asyncio tasks it started and left running to
#: end once cancelled.
LEFT_TASKS_GRACE = 10.0


class Run:
    """One execution of a task body: its request, its session, the tasks it started.

    The session is made by ``maker`` on first use, then is the same object for the rest of
    the run: a body that never touches the database pays neither for making the session nor
    for closing it (an ``AsyncSession`` costs more to close than to make, even unused).
    """

    __slots__ = (
        "_maker", "_session", "crossing", "ended", "greenlet", "lifespan_state", "request",
        "task", "tasks",
    )  # fmt: skip

    def __init__(
        self, task: Any, request: Any, maker: Callable[[], AsyncSession] | None = None
    ) -> None:
        self.task = task
        self.request = request
        self._maker = maker
        self._session: AsyncSession | None = None
        #: How the body reaches the worker that waits for it (None: the loop runs there).
        self.crossing: Crossing | None = None
        #: The greenlet stepping the body while it runs (for the stall watchdog).
        self.greenlet: Any = None
        #: The asyncio tasks the run's coroutines started, with their coroutine's name
        #: (None until the first: most runs start none).
        self.tasks: dict[asyncio.Task[Any], str] | None = None
        #: What the task's lifespan yielded (None: the task has none), as ``lifespan_state()``.
        self.lifespan_state: Mapping[str, Any] | None = None
        self.ended = False

    def __repr__(self) -> str:
        return f"{self.task.name}[{self.request.id}]"

    @property
    def session(self) -> AsyncSession:
        """This run's session, made on first access.

        Raises:
            RuntimeError: the run has ended (docs/internals.md#outliving-tasks).
        """
        if self.ended:
            raise RuntimeError(
                f"The run of {self!r} has ended and its session is closed: await the work "
                "in the body before it returns, or open a session of its own "
                "(async with your async_sessionmaker() as session)."
            )
        session = self._session
        if session is None:
            assert self._maker is not None, "a Run has a maker"
            session = self._session = self._maker()
        return session

    @property
    def opened_session(self) -> AsyncSession | None:
        """The session if it was made already, without making one."""
        return self._session

    async def execute(
        self,
        body: Coroutine[Any, Any, Any],
        autocommit: bool,
        lifespan: Awaitable[Mapping[str, Any]] | None = None,
    ) -> Any:
        """The run on the loop, top to bottom: enter the task's ``lifespan`` (if it has one;
        its state is then :attr:`lifespan_state`), await ``body`` as this run, commit if
        ``autocommit``, then end the run, whatever the outcome."""
        if lifespan is not None:
            try:
                self.lifespan_state = await lifespan
            except BaseException:
                body.close()  # never started: no "was never awaited" warning on top
                raise
        token = current_run.set(self)
        try:
            result = await drive(body, self)
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()  # never awaited: no "was never awaited" warning on top
                raise TypeError(
                    f"{self.task.name}: the body returned {type(result).__name__} instead of "
                    "its value; await it: 'return await ...'."
                )
            if autocommit and self._session is not None:  # an unused session: nothing to do
                # Driven as the body is: what the commit publishes (on_commit) is handed to
                # the worker (docs/on-commit.md#where-it-publishes).
                await drive(self._session.commit())
            return result
        finally:
            current_run.reset(token)
            await self._end()

    async def _end(self) -> None:
        self.ended = True  # from here on, current_session() and self.session refuse
        tasks, self.tasks = self.tasks or {}, None
        pending = {task: name for task, name in tasks.items() if not task.done()}
        if pending:
            # They would use the session while it closes, or after (docs/internals.md
            # #gather-on-session, docs/internals.md#outliving-tasks): a run owns the tasks
            # it starts, as an asyncio.TaskGroup would.
            logger.warning(
                "%r ended with %d asyncio task(s) it started still running (%s): they are "
                "cancelled. Await them in the body (asyncio.gather, asyncio.TaskGroup); "
                "work that must outlive the run needs a session of its own.",
                self,
                len(pending),
                ", ".join(sorted(set(pending.values()))),
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(list(pending), timeout=LEFT_TASKS_GRACE)
        session, self._session = self._session, None
        if session is not None:
            # Rolls back what was not committed and returns the connection to the pool; and
            # closes for good, as with close_resets_only=False: a reference kept past the run
            # (a call_later callback, a lifespan's consumer) cannot begin a transaction and
            # hold a connection (docs/internals.md#close-resets-only). A body's own close()
            # stays a reset.
            session.sync_session._close_state = _SessionCloseState.ACTIVE
            await session.close()


#: The run whose coroutine is executing. Set on the event loop, in the run's own context,
#: so it is seen by every coroutine the body awaits or starts and inside
#: ``session.run_sync()`` (SQLAlchemy hands the greenlet the same context); Celery's request
#: stack is not (docs/internals.md#request-stack).
current_run: ContextVar[Run | None] = ContextVar("async_session_task.run", default=None)


def current_session() -> AsyncSession:
    """Return the ``AsyncSession`` of the task run that is executing.

    Works from any coroutine the task body awaits or starts, however deep, so an existing
    repository layer can use it unchanged.

    Raises:
        RuntimeError: outside the ``async def`` body of an ``AsyncSessionTask``, or after
            its run ended.
    """
    run = current_run.get()
    if run is None:
        raise RuntimeError(
            "current_session() was called outside a task run: a session exists only while "
            "the async def body of an AsyncSessionTask (and what it awaits) is running."
        )
    return run.session


def hands_back() -> bool:
    """True where :func:`in_worker` hands its call to the worker waiting for the run."""
    run = current_run.get()
    return run is not None and run.crossing is not None and run.crossing.hands_back()


def in_worker(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` in the worker thread or greenlet that waits for the running run: Celery's
    broker and result connections belong there (docs/internals.md#publish-from-spawned-task).
    Anywhere else, ``fn`` is called right here."""
    run = current_run.get()
    crossing = None if run is None else run.crossing
    if crossing is None:
        return fn(*args, **kwargs)
    return crossing.call_in_worker(fn, *args, **kwargs)


def task_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], context: Context | None = None
) -> asyncio.Task[Any]:
    """The loop's task factory: a task started during a run belongs to that run.

    Its coroutine is stepped from a greenlet of its own, as the body is, so it can publish
    tasks through the worker (docs/internals.md#publish-from-spawned-task); the run ends it
    before closing the session.
    """
    run = context.run(current_run.get) if context is not None else current_run.get()
    if run is None or run.ended or not isinstance(coro, CoroutineType):
        return asyncio.Task(coro, loop=loop, context=context)
    task = asyncio.Task(_driven(coro), loop=loop, context=context)
    if run.tasks is None:
        run.tasks = {}
    run.tasks[task] = coro.__qualname__
    return task


async def _driven(coro: Coroutine[Any, Any, T]) -> T:
    # asyncio.Task takes a coroutine; drive() is generator-based (Python 3.12 refuses those).
    return await drive(coro)


class Registry:
    """The runs in flight in this process, keyed by task id: a run is added in
    ``before_start`` (or by a direct call), looked up by ``self.session``, forgotten on
    ``task_postrun``; the worker's stats count it, the stall watchdog asks it who holds the
    loop.

    Two runs may share a task id: ``self.retry()`` publishes the next run before the current
    one has been cleaned up, and a redelivery under ``acks_late`` repeats it
    (docs/internals.md#same-task-id). Each run has its own request object, alive for the
    whole run, so the key pairs the task id with that object's identity, and the entry keeps
    the object alive so the pair cannot be reused while the entry exists.
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
        """Remove the run of ``request``; idempotent, and a missing entry is fine: after a
        hard time limit Celery ends the run in the parent
        (docs/internals.md#hard-limit-in-parent)."""
        return self._runs.pop((request.id, id(request)), None)

    def owner_of(self, task: asyncio.Task[Any] | None) -> Run | None:
        """The run that ``task`` (an asyncio task) belongs to, if any."""
        if task is None:
            return None
        for run in list(self._runs.values()):
            crossing = run.crossing
            if (crossing is not None and crossing.task is task) or task in (run.tasks or ()):
                return run
        return None

    def holding(self, task: asyncio.Task[Any] | None) -> tuple[str | None, FrameType | None]:
        """For the stall watchdog, given the loop's current task: the run holding the loop
        (None: no run), and where its body waits if a blocking call switched its greenlet
        out while its task held the loop. Under gevent a patched ``time.sleep`` switches
        the loop thread to its hub, so the thread's stack shows only the hub, while the
        body's greenlet keeps its frame. (A body that awaits gives the loop back: its task
        is then not the current one.)"""
        run = self.owner_of(task)
        if run is None:
            return None, None
        body = run.crossing is not None and run.crossing.task is task
        frame: FrameType | None = getattr(run.greenlet, "gr_frame", None) if body else None
        return repr(run), frame

    def __len__(self) -> int:
        return len(self._runs)


runs = Registry()
