"""``AsyncSessionTask``: a Celery task base whose body is ``async def``.

The Celery face of the package: what Celery calls on a task (``before_start``, ``run``,
``retry``, ``update_state``, ``on_bound``) and what a body reads (``self.session``,
``self.request``). The signals this package connects are all in ``_worker``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import Ignore, Retry
from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncSession

from . import _config
from ._app_patch import forward_to_worker
from ._calling import apublish
from ._drive import await_in_body, in_body
from ._factory import factories
from ._lifespan import lifespan_state, lifespans
from ._on_commit import on_commit
from ._once import AlreadyRun, Once, count
from ._pydantic import result_dumper
from ._registry import runs
from ._run import Run, current_run, in_worker
from ._runtime import get_runtime
from ._typed import P, R, TypedTask

logger = logging.getLogger("async_session_task")


class _DeferredRetry(Retry):  # type: ignore[misc]  # celery is untyped
    """``self.retry()`` called on the loop: published by the worker thread once the run ended
    and its session closed, where the broker connection lives and an eager retry may block."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__(exc=kwargs.get("exc"))
        self.retry_args = args
        self.retry_kwargs = kwargs


class AsyncSessionTask(TypedTask[P, R], Task):  # type: ignore[misc]  # celery is untyped
    """Base for tasks whose body is ``async def`` and uses ``self.session``.

    The body runs on this process's event loop; each run gets its own ``AsyncSession``,
    created on first use of ``self.session`` and closed (rolling back whatever was not
    committed) when the body ends, whatever the outcome.

    Class attributes (also accepted as ``@app.task(...)`` options):

    * ``autocommit``: commit after a successful body, inside the run, so a failed commit
      fails the task and its retry policy applies.
    * ``idempotent``, ``isolation_level``, ``retry_on_conflict``: a run keyed by a marker
      written in its own transaction, the isolation level of its transactions, re-runs of
      the body after a serialization failure or a deadlock (docs/running-once.md).
    * ``async_session_url``, ``async_session_engine_options``, ``async_session_options``,
      ``async_session_maker``, ``async_session_lifespan``: override the ``app.conf``
      settings of the same names.
    """

    abstract = True
    autocommit: ClassVar[bool] = False
    async_session_url: ClassVar[str | None] = None
    async_session_engine_options: ClassVar[dict[str, Any] | None] = None
    async_session_options: ClassVar[dict[str, Any] | None] = None
    async_session_maker: ClassVar[Any] = None
    async_session_lifespan: ClassVar[Any] = None
    idempotent: ClassVar[bool | Callable[..., str]] = False
    isolation_level: ClassVar[str | None] = None
    retry_on_conflict: ClassVar[int] = 0

    _body: Callable[..., Any]
    _once: ClassVar[Once | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._once = Once.of(cls)  # a bad option fails here, where the task is declared
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
        # sees the coroutine object of an async ``run``, docs/internals.md#autoretry) and a
        # direct call all get the body's result or exception, as for any task.
        cls._body = body
        cls.run = _sync_run(function, bound=not isinstance(body, staticmethod))

    @property
    def request(self) -> Any:
        """This run's request, also inside the coroutine and ``session.run_sync()``.

        Celery keeps requests on a stack per thread/greenlet; the coroutine runs in the loop's
        thread, where that stack is empty (docs/internals.md#request-stack), so the run's
        context carries it.
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
            RuntimeError: outside a run of this task, or after its body ended (in
                ``on_success``, ``on_failure``, ``after_return``).
        """
        run = current_run.get()
        if run is None or run.task is not self:
            run = runs.get(self.request)
        if run is None:
            raise RuntimeError(
                f"{self.name}.session exists only during a run of the task: inside its "
                "async def body (and what it awaits), or in before_start (the session is "
                "closed by the time on_success, on_failure and after_return run)."
            )
        return run.session

    @property
    def lifespan_state(self) -> Mapping[str, Any]:
        """What this task's ``async_session_lifespan`` yielded in this process.

        Raises:
            RuntimeError: outside a run, or the task has no lifespan.
        """
        return lifespan_state()

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Celery calls this when a task class is bound to ``app``: set the app up, once."""
        super().on_bound(app)
        forward_to_worker(app)

    # One run's lifecycle in the registry: added here, forgotten on task_postrun.

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Register this run; its session is made on first use."""
        # The factory is resolved now, so a misconfigured task still fails every run.
        runs.add(Run(self, self.request, self._session_maker()))

    def _session_maker(self) -> Callable[[], AsyncSession]:
        maker = factories.maker_for(self)
        return maker if self._once is None else self._once.isolated(maker)

    @staticmethod
    def _forget_run(sender: Any = None, **_: Any) -> None:
        """``task_postrun`` (``_worker`` connects it), sent on every outcome but a killed
        process (docs/internals.md#task-postrun), where ``after_return`` is not
        (docs/internals.md#after-return-skipped, docs/internals.md#eager-propagates)."""
        if isinstance(sender, AsyncSessionTask):
            runs.discard(sender.request)

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

    def delay_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """``delay()``, published when the current run's session commits (``on_commit``).

        The keyword ``durable=True`` is not the body's: it also writes the message to the
        outbox (docs/outbox.md); typed code passes it to :meth:`apply_async_on_commit`.

        Raises:
            RuntimeError: outside a task run; use ``on_commit(sig, session=...)`` there.
        """
        durable = kwargs.pop("durable", None)
        if durable is not None and not isinstance(durable, bool):
            raise TypeError(f"delay_on_commit(durable=...) takes True or False, not {durable!r}")
        return on_commit(self.s(*args, **kwargs), durable=durable)

    def apply_async_on_commit(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        durable: bool | None = None,
        **options: Any,
    ) -> AsyncResult[R]:
        """``apply_async()``, published when the current run's session commits; ``durable``
        as for :meth:`delay_on_commit`."""
        return on_commit(self.signature(args, kwargs, **options), durable=durable)

    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """``delay()`` from async code, without blocking its loop (:func:`apublish`)."""
        return await apublish(self.s(*args, **kwargs))

    async def aapply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        publish_timeout: float | None = None,
        **options: Any,
    ) -> AsyncResult[R]:
        """``apply_async()`` from async code, without blocking its loop (:func:`apublish`)."""
        return await apublish(
            self.signature(args, kwargs), publish_timeout=publish_timeout, **options
        )

    def update_state(self, *args: Any, **kwargs: Any) -> None:
        """Celery's ``Task.update_state``; from the body, run by the worker's thread."""
        in_worker(super().update_state, *args, **kwargs)

    def _run_body(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        request = self.request
        run = runs.get(request)
        owned = run is None
        if run is None:  # called directly, without before_start (docs/internals.md#direct-call)
            run = Run(self, request, self._session_maker())
            runs.add(run)
        try:
            once = self._once
            again = None
            if once is not None:
                run.key = once.key(request, args, kwargs)
                if once.retry_on_conflict:
                    again = functools.partial(self._body, *args, **kwargs)
            body = self._body(*args, **kwargs)
            if not inspect.iscoroutine(body):
                raise TypeError(
                    f"{self.name}: the body returned {type(body).__name__}, not a coroutine; "
                    "an AsyncSessionTask body must be 'async def'."
                )
            try:
                lifespan = lifespans.entering(self)
            except BaseException:
                body.close()
                raise
            execution = run.execute(body, self.autocommit, lifespan, once, again)
            runtime = get_runtime(self.app)
            if runtime.on_loop() and in_body():
                # A nested eager call from inside a body (docs/internals.md#nested-eager): the
                # caller's body awaits this one, and its worker serves both.
                outer = current_run.get()
                run.crossing = None if outer is None else outer.crossing
                return await_in_body(execution)
            soft, hard = _config.time_limits(self, request)
            return runtime.run(execution, holder=run, soft=soft, hard=hard, name=self.name)
        except _DeferredRetry as deferred:
            raise super().retry(*deferred.retry_args, **deferred.retry_kwargs) from None
        except AlreadyRun as done:
            count("skipped")
            logger.info(
                "%s[%s] skipped: its key %r was run already by %s", self.name, request.id,
                done.key, done.holder or "a direct call",
            )  # fmt: skip
            if done.holder == request.id:
                # A redelivery: Ignore stores no state, so the first run's result stays
                # (docs/internals.md#ignore-stores-nothing).
                raise Ignore() from None
            return None
        finally:
            if owned:
                runs.discard(request)


def _sync_run(function: Callable[..., Any], *, bound: bool) -> Callable[..., Any]:
    dump = result_dumper(function)  # pydantic=True (docs/internals.md#pydantic-result)

    @functools.wraps(function)
    def run(self: AsyncSessionTask, *args: Any, **kwargs: Any) -> Any:
        return dump(self._run_body(args, kwargs))

    signature = inspect.signature(function)
    if not bound:  # keep ``self`` first, so Celery's retry sees the body's parameters
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        signature = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
    run.__signature__ = signature  # type: ignore[attr-defined]  # read by inspect.signature
    return run


def async_session_tasks(app: Any) -> list[AsyncSessionTask]:
    """The ``AsyncSessionTask`` tasks of ``app`` (which this finalizes), by name."""
    return [task for _, task in sorted(app.tasks.items()) if isinstance(task, AsyncSessionTask)]
