"""Sessions and runs: one ``AsyncSession`` per run, and the registry of runs in flight (the
session factories they take their sessions from are ``_factory.factories``).

The lifecycle of one run, as the task class drives it:

1. ``before_start`` registers a :class:`Run` in ``_registry.runs`` (keyed by task id and
   request).
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
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextvars import Context, ContextVar
from types import CoroutineType
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.session import _SessionCloseState

from ._crossing import Crossing
from ._drive import drive
from ._marker import claim
from ._once import AlreadyRun, Once, one_transaction

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
        "_maker", "_session", "crossing", "ended", "greenlet", "key", "lifespan_state",
        "request", "task", "tasks",
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
        #: The idempotency key of the run (None: not idempotent), as its marker holds it.
        self.key: str | None = None

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
        once: Once | None = None,
        again: Callable[[], Coroutine[Any, Any, Any]] | None = None,
    ) -> Any:
        """The run on the loop, top to bottom: enter the task's ``lifespan`` (if it has one;
        its state is then :attr:`lifespan_state`), await ``body`` as this run (after writing
        its marker, if ``once`` gives it a key), commit if ``autocommit``, then end the run,
        whatever the outcome. After a conflict that ``once`` allows to re-run, the attempt's
        tasks and session are ended and ``again()`` makes the next body.

        Raises:
            AlreadyRun: the run's key was run already (the body did not run).
        """
        if lifespan is not None:
            try:
                self.lifespan_state = await lifespan
            except BaseException:
                body.close()  # never started: no "was never awaited" warning on top
                raise
        token = current_run.set(self)
        try:
            attempt = 1
            while True:
                try:
                    return await self._attempt(body, autocommit, once)
                except Exception as exc:
                    if once is None or again is None:
                        raise
                    delay = once.again(exc, attempt, self)
                    if delay is None:
                        raise
                await self._release()  # rolls back; what on_commit queued is dropped with it
                await asyncio.sleep(delay)
                attempt += 1
                body = again()
        finally:
            current_run.reset(token)
            await self._end()

    async def _attempt(
        self, body: Coroutine[Any, Any, Any], autocommit: bool, once: Once | None
    ) -> Any:
        if once is not None and self.key is not None:
            try:
                marked = self.session
                holder = await claim(marked, self.key, self.task.name, self.request.id or "")
            except BaseException:
                body.close()
                raise
            if holder is not None:
                body.close()
                raise AlreadyRun(self.key, holder)
            one_transaction(marked, self)
        result = await drive(body, self)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never awaited: no "was never awaited" warning on top
            raise TypeError(
                f"{self.task.name}: the body returned {type(result).__name__} instead of "
                "its value; await it: 'return await ...'."
            )
        session = self._session
        if autocommit and session is not None and session.in_transaction():
            # Driven as the body is: what the commit publishes (on_commit) is handed to
            # the worker (docs/on-commit.md#where-it-publishes).
            await drive(session.commit())
        return result

    async def _end(self) -> None:
        self.ended = True  # from here on, current_session() and self.session refuse
        await self._release()

    async def _release(self) -> None:
        """End the tasks the run started and close its session (for good)."""
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
