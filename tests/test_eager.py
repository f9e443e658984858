"""In-process runs: eager calls, direct calls, hooks and the registry (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, Task
from celery.app.task import Context
from celery.exceptions import Ignore
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from async_session_task import AsyncSessionTask, current_session
from async_session_task._factory import factories
from async_session_task._registry import Registry, runs
from async_session_task._run import Run
from async_session_task._runtime import get_runtime

flag: contextvars.ContextVar[str] = contextvars.ContextVar("flag", default="unset")


def engine_of(task: Any) -> AsyncEngine:
    bind: AsyncEngine = factories.maker_for(task).kw["bind"]
    return bind


def make_app(url: str) -> Celery:
    app = Celery("eager", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.async_session_url = url
    return app


@pytest.fixture(params=["sqlite", "postgresql"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Celery:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'eager.db'}"
    else:
        url = request.getfixturevalue("database_url")
    return make_app(url)


class Tasks:
    """The tasks of one app, defined the way users write them."""

    def __init__(self, app: Celery) -> None:
        self.sessions: list[AsyncSession] = []

        @app.task(bind=True, base=AsyncSessionTask, shared=False)
        async def add(task: AsyncSessionTask, x: int, y: int) -> list[Any]:
            self.sessions.append(task.session)
            value = await task.session.scalar(
                text("select cast(:x as integer) + cast(:y as integer)"), {"x": x, "y": y}
            )
            assert current_session() is task.session
            return [value, task.request.id, list(task.request.args)]

        @app.task(bind=True, base=AsyncSessionTask, shared=False)
        async def fail(task: AsyncSessionTask) -> None:
            self.sessions.append(task.session)
            await task.session.execute(text("select 1"))
            raise ValueError("failed on purpose")

        @app.task(bind=True, base=AsyncSessionTask, shared=False)
        async def nested(task: AsyncSessionTask) -> list[Any]:
            inner = add.apply(args=(1, 2)).get(disable_sync_subtasks=False)
            direct = add(3, 4)
            return [inner, direct[0], task.request.id]

        @app.task(
            bind=True, base=AsyncSessionTask, max_retries=2, default_retry_delay=0, shared=False
        )
        async def retrying(task: AsyncSessionTask) -> int:
            self.sessions.append(task.session)
            if task.request.retries < 2:
                raise task.retry()
            return int(task.request.retries)

        @app.task(
            bind=True, base=AsyncSessionTask, autoretry_for=(KeyError,), max_retries=1, shared=False
        )
        async def autoretrying(task: AsyncSessionTask) -> None:
            self.sessions.append(task.session)
            raise KeyError(task.request.retries)

        @app.task(bind=True, base=AsyncSessionTask, shared=False)
        async def ignored(task: AsyncSessionTask) -> None:
            self.sessions.append(task.session)
            raise Ignore()

        @app.task(base=AsyncSessionTask, shared=False)
        async def unbound(x: int) -> int:
            self.sessions.append(current_session())
            return x * 2

        @app.task(bind=True, base=AsyncSessionTask, shared=False)
        async def set_flag(task: AsyncSessionTask, value: str) -> str:
            before = flag.get()
            flag.set(value)
            return before

        self.add, self.fail, self.nested, self.retrying = add, fail, nested, retrying
        self.autoretrying, self.ignored, self.unbound, self.set_flag = (
            autoretrying,
            ignored,
            unbound,
            set_flag,
        )

    def assert_all_closed(self) -> None:
        """Every session of every run ended: no transaction, no connection checked out."""
        assert self.sessions
        assert not [s for s in self.sessions if s.in_transaction()]
        assert engine_of(self.add).sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert len(runs) == 0


@pytest.fixture
def tasks(app: Celery) -> Tasks:
    return Tasks(app)


def test_apply_runs_the_body_with_its_request(tasks: Tasks) -> None:
    result = tasks.add.apply(args=(2, 3), task_id="abc")
    assert result.get() == [5, "abc", [2, 3]]
    tasks.assert_all_closed()


def test_direct_call_without_before_start(tasks: Tasks) -> None:
    """Calling the task object runs the body without before_start
    (docs/internals.md#direct-call)."""
    assert tasks.add(4, 5)[0] == 9
    assert tasks.unbound(21) == 42
    tasks.assert_all_closed()


def test_task_always_eager_delay(app: Celery, tasks: Tasks) -> None:
    app.conf.task_always_eager = True
    assert tasks.add.delay(1, 1).get()[0] == 2
    tasks.assert_all_closed()


def test_eager_propagates_failure_still_ends_the_session(app: Celery, tasks: Tasks) -> None:
    """With task_eager_propagates Celery skips after_return; the session still ends
    (docs/internals.md#eager-propagates)."""
    app.conf.task_eager_propagates = True
    with pytest.raises(ValueError, match="failed on purpose"):
        tasks.fail.apply()
    tasks.assert_all_closed()


def test_failure_retry_ignore_end_the_session(tasks: Tasks) -> None:
    """RETRY and IGNORED skip after_return; task_postrun forgets the run
    (docs/internals.md#after-return-skipped)."""
    assert tasks.fail.apply().state == "FAILURE"
    assert tasks.retrying.apply().get() == 2
    assert tasks.ignored.apply().state == "IGNORED"
    with pytest.raises(KeyError):
        tasks.autoretrying.apply().get()
    # Two runs of `autoretrying` (one retry): autoretry_for sees the async body's exception.
    assert len(tasks.sessions) == 1 + 3 + 1 + 2
    tasks.assert_all_closed()


def test_nested_eager_call_inside_a_body(tasks: Tasks) -> None:
    """apply() and a direct call inside a body run on the same loop
    (docs/internals.md#nested-eager)."""
    result = tasks.nested.apply(task_id="outer")
    inner, direct, outer_id = result.get()
    assert inner[0] == 3
    assert inner[1] != "outer"
    assert direct == 7
    assert outer_id == "outer"
    tasks.assert_all_closed()


@pytest.mark.asyncio
async def test_apply_from_inside_a_running_event_loop(tasks: Tasks) -> None:
    """A pytest-asyncio test calls the task synchronously while its own loop runs."""
    assert tasks.add.apply(args=(1, 2)).get()[0] == 3
    assert tasks.add(2, 2)[0] == 4
    tasks.assert_all_closed()


def test_context_variables_do_not_leak_between_runs(tasks: Tasks) -> None:
    """Each run starts from a copy of the caller's context (docs/internals.md#context-per-run)."""
    assert tasks.set_flag.apply(args=("first",)).get() == "unset"
    assert tasks.set_flag.apply(args=("second",)).get() == "unset"
    token = flag.set("caller")
    try:
        assert tasks.set_flag.apply(args=("third",)).get() == "caller"
    finally:
        flag.reset(token)


def test_error_in_before_start_releases_the_session(app: Celery) -> None:
    class Failing(AsyncSessionTask):
        def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
            super().before_start(task_id, args, kwargs)
            raise RuntimeError("before_start failed")

    @app.task(bind=True, base=Failing, shared=False)
    async def guarded(task: AsyncSessionTask) -> None:
        raise AssertionError("never runs")

    result = guarded.apply()
    assert result.state == "FAILURE"
    assert "before_start failed" in str(result.result)
    assert len(runs) == 0


def test_sync_body_is_rejected(app: Celery) -> None:
    def sync_body(task: Task) -> None:
        return None

    with pytest.raises(TypeError, match=r"must be 'async def'\. Use a plain @app\.task"):
        app.task(bind=True, base=AsyncSessionTask, shared=False)(sync_body).name  # noqa: B018


def test_session_outside_a_run(tasks: Tasks) -> None:
    with pytest.raises(RuntimeError, match=r"\.session exists only during a run"):
        tasks.add.session  # noqa: B018
    with pytest.raises(RuntimeError, match=r"current_session\(\) was called outside a task run"):
        current_session()


def test_missing_database_setting_fails_the_run() -> None:
    app = make_app("")
    app.conf.async_session_url = None

    @app.task(bind=True, base=AsyncSessionTask, shared=False)
    async def orphan(task: AsyncSessionTask) -> None:
        return None

    result = orphan.apply()
    assert result.state == "FAILURE"
    assert "async_session_url" in str(result.result)
    assert "async_session_maker" in str(result.result)


def test_runs_with_the_same_task_id_are_kept_apart() -> None:
    """A retried or redelivered run can overlap the previous one with the same id
    (docs/internals.md#same-task-id)."""
    registry = Registry()
    first, second = Context(id="same"), Context(id="same")
    session_a, session_b = AsyncSession(), AsyncSession()
    registry.add(Run(None, first, lambda: session_a))
    registry.add(Run(None, second, lambda: session_b))
    assert len(registry) == 2
    found = registry.get(first)
    assert found is not None
    assert found.session is session_a
    registry.discard(second)
    assert registry.get(first) is not None
    assert registry.get(second) is None
    # Idempotent, and a missing entry is fine (docs/internals.md#hard-limit-in-parent).
    registry.discard(second)
    assert len(registry) == 1


def test_loop_thread_refuses_blocking_calls() -> None:
    """A blocking wait on the loop's own thread would deadlock: it raises instead."""

    async def inner() -> int:
        return 1

    async def on_loop() -> None:
        coro = inner()
        with pytest.raises(RuntimeError, match="on the event loop thread"):
            get_runtime().run(coro)

    get_runtime().run(on_loop())


def test_interrupted_wait_cancels_the_body_and_waits_for_its_cleanup() -> None:
    """A signal handler raising in the waiting thread (as prefork's soft time limit does with
    SIGUSR1) cancels the coroutine, whose cleanup ends before the raise
    (docs/internals.md#soft-limit-prefork, docs/internals.md#cancel-then-wait)."""
    events: list[str] = []

    async def body() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        finally:
            await asyncio.sleep(0.05)  # cleanup that awaits, like session.close()
            events.append("cleanup done")

    class Interrupt(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(Interrupt):
            get_runtime().run(body())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert events == ["cancelled", "cleanup done"]


def test_the_runtime_watches_its_loop_for_stalls(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    """Every runtime starts the loop-stall watchdog with its loop."""

    @app.task(bind=True, base=AsyncSessionTask, shared=False)
    async def blocks(task: AsyncSessionTask) -> None:
        time.sleep(1.6)  # noqa: ASYNC251  # the mistake the watchdog reports

    with caplog.at_level(logging.WARNING, logger="async_session_task"):
        blocks.apply(task_id="blocker")
    stalls = [r.getMessage() for r in caplog.records if "has not answered" in r.getMessage()]
    assert len(stalls) == 1, stalls
    assert "blocker" in stalls[0]
