"""``AsyncSessionTask``: a Celery task base whose body is ``async def``."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Task, signals
from celery._state import _task_stack
from celery.exceptions import Retry
from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncSession

from . import _bridge
from ._call import in_worker
from ._on_commit import on_commit
from ._runtime import Runtime, get_runtime
from ._session import Run, current_run, runs


class _DeferredRetry(Retry):  # type: ignore[misc]  # celery is untyped
    """``self.retry()`` called on the loop: published by the worker thread once the run ended.

    Publishing there, after the session is closed, keeps the broker connection in the thread
    (or greenlet) that owns it and lets an eager retry run where blocking is allowed.
    """

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__(exc=kwargs.get("exc"))
        self.retry_args = args
        self.retry_kwargs = kwargs


class AsyncSessionTask(Task):  # type: ignore[misc]  # celery is untyped
    """Base for tasks whose body is ``async def`` and uses ``self.session``.

    The body runs on this process's event loop; each run gets its own ``AsyncSession``,
    created on first use of ``self.session`` and closed (rolling back whatever was not
    committed) when the body ends, whatever the outcome.

    Class attributes (also accepted as ``@app.task(...)`` options):

    * ``autocommit``: commit after a successful body, inside the run, so a failed commit
      fails the task and its retry policy applies.
    * ``async_session_url``, ``async_session_engine_options``, ``async_session_options``,
      ``async_session_maker``: override the ``app.conf`` settings of the same names.
    """

    abstract = True
    autocommit: ClassVar[bool] = False
    async_session_url: ClassVar[str | None] = None
    async_session_engine_options: ClassVar[dict[str, Any] | None] = None
    async_session_options: ClassVar[dict[str, Any] | None] = None
    async_session_maker: ClassVar[Any] = None

    _body: Callable[..., Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        body = cls.__dict__.get("run")
        if body is None:
            return
        function = body.__func__ if isinstance(body, staticmethod) else body
        if not inspect.iscoroutinefunction(inspect.unwrap(function)):
            raise TypeError(
                f"{cls.__module__}.{cls.__name__}: an AsyncSessionTask body must be "
                "'async def'. Use a plain @app.task for a sync function."
            )
        # Celery sees a sync ``run``: its tracer, its autoretry wrapper (which only ever
        # sees the coroutine object of an async ``run``, TRAPS 8) and a direct call all get
        # the body's result or exception, as for any task.
        cls._body = body
        cls.run = _sync_run(function, bound=not isinstance(body, staticmethod))

    @property
    def request(self) -> Any:
        """This run's request, also inside the coroutine and ``session.run_sync()``.

        Celery keeps requests on a stack per thread/greenlet; the coroutine runs in the loop's
        thread, where that stack is empty (TRAPS 6), so the run's context carries it.
        """
        request = self.request_stack.top
        if request is None:
            run = current_run.get()
            if run is not None and run.task is self:
                return run.request
            return self._get_request()
        return request

    @property
    def session(self) -> AsyncSession:
        """This run's ``AsyncSession``: the same object for every await of the run.

        Raises:
            RuntimeError: outside a run of this task.
        """
        run = current_run.get()
        if run is None or run.task is not self:
            run = runs.get(self.request)
        if run is None:
            raise RuntimeError(
                f"{self.name}.session exists only during a run of the task: inside its "
                "async def body (and what it awaits), or in before_start/after_return."
            )
        return run.session

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Register this run; its session is made on first use."""
        request = self.request
        # The factory is resolved now, so a misconfigured task still fails every run.
        runs.add(Run(self, request, maker=get_runtime().maker_for(self)))
        _forward_publishing(self.app)

    def retry(self, *args: Any, **kwargs: Any) -> Retry:
        """Celery's ``Task.retry``. Inside the body, the retry is published by the worker
        thread after this run's session is closed, unless ``throw=False``."""
        if current_run.get() is not None and kwargs.get("throw", True) and get_runtime().on_loop():
            request = self.request
            limit = kwargs.get("max_retries")
            limit = self.max_retries if limit is None else limit
            exhausted = limit is not None and request.retries >= limit
            if not exhausted and not request.called_directly:
                raise _DeferredRetry(args, kwargs)
        result: Retry = super().retry(*args, **kwargs)
        return result

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """``delay()``, published when the current run's session commits (``on_commit``).

        Celery's name for it on Django; this one returns the result to come.

        Raises:
            RuntimeError: outside a task run; use ``on_commit(sig, session=...)`` there.
        """
        return on_commit(self.s(*args, **kwargs))

    def apply_async_on_commit(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """``apply_async()``, published when the current run's session commits."""
        return on_commit(self.signature(args, kwargs, **options))

    def update_state(self, *args: Any, **kwargs: Any) -> None:
        """Celery's ``Task.update_state``; from the body, run by the worker's thread."""
        in_worker(super().update_state, *args, **kwargs)

    def _run_body(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        request = self.request
        runtime = get_runtime()
        run = runs.get(request)
        owned = run is None
        if run is None:  # called directly, without before_start (TRAPS 5)
            run = Run(self, request, maker=runtime.maker_for(self))
            runs.add(run)
        try:
            body = self._body(*args, **kwargs)
            if not inspect.iscoroutine(body):
                raise TypeError(
                    f"{self.name}: the body returned {type(body).__name__}, not a coroutine; "
                    "an AsyncSessionTask body must be 'async def'."
                )
            soft, hard = self._time_limits(request, runtime)
            invocation = _invoke(run, body, self.autocommit, soft)
            if runtime.on_loop():
                # A nested eager call from inside a body (TRAPS 16).
                if not _bridge.in_body():
                    invocation.close()
                    raise RuntimeError(
                        f"{self.name} was called eagerly on the event loop, outside a task "
                        "body; await it from the body instead."
                    )
                return _bridge.await_in_body(invocation)
            return runtime.call(
                invocation, contextvars.copy_context(), name=self.name, time_limit=hard
            )
        except _DeferredRetry as deferred:
            raise super().retry(*deferred.retry_args, **deferred.retry_kwargs) from None
        finally:
            if owned:
                runs.discard(request)

    def _time_limits(self, request: Any, runtime: Runtime) -> tuple[float | None, float | None]:
        """(soft, hard) limits in seconds the library enforces for this run, if any.

        Prefork children enforce both themselves; threads, solo, gevent and eventlet have
        no soft limit (gevent only a hard one), so there the library applies them on the loop.
        Eager and direct calls run unlimited, as Celery runs them.
        """
        if runtime.pool_enforces_limits or request.is_eager or request.called_directly:
            return None, None
        hard, soft = request.timelimit or (None, None)
        conf = self.app.conf
        soft = soft or self.soft_time_limit or conf.task_soft_time_limit
        hard = hard or self.time_limit or conf.task_time_limit
        return soft, hard


async def _invoke(
    run: Run, body: Coroutine[Any, Any, Any], autocommit: bool, soft_time_limit: float | None
) -> Any:
    token = current_run.set(run)
    try:
        if soft_time_limit is None:
            result = await _bridge.drive(body)
        else:
            limit = asyncio.timeout(soft_time_limit)
            try:
                async with limit:
                    result = await _bridge.drive(body)
            except TimeoutError:
                if not limit.expired():
                    raise  # the body's own TimeoutError
                raise SoftTimeLimitExceeded(soft_time_limit) from None
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never awaited: no "was never awaited" warning on top
            raise TypeError(
                f"{run.task.name}: the body returned {type(result).__name__} instead of "
                "its value; await it: 'return await ...'."
            )
        session = run.opened_session
        if autocommit and session is not None:  # an unused session has nothing to commit
            # Driven like the body, so that a publish the commit triggers (on_commit) can
            # be handed to the worker's thread (docs/on-commit.md#where-it-publishes).
            await _bridge.drive(session.commit())
        return result
    finally:
        current_run.reset(token)
        # Rolls back what was not committed and returns the connection to the pool. A run
        # is cancelled at most once, so this await is not interrupted by that cancellation.
        session = run.opened_session
        if session is not None:
            await session.close()


def _sync_run(function: Callable[..., Any], *, bound: bool) -> Callable[..., Any]:
    @functools.wraps(function)
    def run(self: AsyncSessionTask, *args: Any, **kwargs: Any) -> Any:
        return self._run_body(args, kwargs)

    signature = inspect.signature(function)
    if not bound:  # keep ``self`` first, so Celery's retry sees the body's parameters
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        signature = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
    run.__signature__ = signature  # type: ignore[attr-defined]  # read by inspect.signature
    return run


def _forward_publishing(app: Any) -> None:
    """Have ``app.send_task`` (every ``delay``, ``apply_async`` and canvas) called from a
    body run by the worker's thread or greenlet (see :class:`~._call.Call`). Idempotent."""
    if "send_task" in vars(app):
        return
    send_task = app.send_task

    @functools.wraps(send_task)
    def forwarded(*args: Any, **kwargs: Any) -> Any:
        return in_worker(_as_parent, send_task, *args, **kwargs)

    app.send_task = forwarded


def _as_parent(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the running task on Celery's task stack, so ``send_task`` names it
    as the parent (and root) of what it publishes. Where the body runs inline, its
    greenlet has an empty stack of its own (Celery keys the stack by greenlet)."""
    run = current_run.get()
    if run is None or _task_stack.top is not None:
        return fn(*args, **kwargs)
    _task_stack.push(run.task)
    try:
        return fn(*args, **kwargs)
    finally:
        _task_stack.pop()


def _forget(sender: Any = None, **_: Any) -> None:
    # task_postrun fires on every outcome but a killed process (TRAPS 4), after_return not
    # for RETRY, IGNORED, REJECTED (TRAPS 1), nor in eager mode for a propagated failure
    # (TRAPS 2), and in a prefork parent after a hard time limit (TRAPS 3): the run is
    # forgotten here only, once, while the tracer still has its request on the stack.
    if isinstance(sender, AsyncSessionTask):
        runs.discard(sender.request)


signals.task_postrun.connect(_forget, weak=False)
