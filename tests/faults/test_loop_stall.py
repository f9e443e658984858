"""A sync call in an async body blocks the loop: the watchdog says where, once per stall."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, group

from async_session_task import AsyncSessionTask
from async_session_task._registry import runs
from async_session_task._runtime import get_runtime
from async_session_task._watchdog import Watchdog
from tests.faults import app
from tests.faults.services import wait_for
from tests.helpers import StartFaultWorker

pytestmark = pytest.mark.timeout(120)

STALLED = "has not answered for"
ANSWERS = "answers again after"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as the runtime's does."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


async def blocking(seconds: float) -> None:
    time.sleep(seconds)  # noqa: ASYNC251  # the mistake under test


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def stall(
    loop: asyncio.AbstractEventLoop, seconds: float, caplog: pytest.LogCaptureFixture, done: int
) -> None:
    """Block ``loop`` for ``seconds``; wait until the watchdog has seen ``done`` stalls end."""
    asyncio.run_coroutine_threadsafe(blocking(seconds), loop).result(30)
    wait_for(lambda: len(messages(caplog, ANSWERS)) >= done, 30, "the end of the stall")


def test_one_warning_per_stall_with_the_stack(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    watchdog = Watchdog(loop, threshold=0.2).start()
    try:
        with caplog.at_level(logging.INFO, logger="async_session_task"):
            stall(loop, 1.5, caplog, done=1)
            stall(loop, 1.5, caplog, done=2)
    finally:
        watchdog.stop()
    warnings = messages(caplog, STALLED)
    assert len(warnings) == 2 == watchdog.stalls, warnings
    for warning in warnings:
        assert "0.2 s: code outside any task body blocks it" in warning
        assert "time.sleep(seconds)  # noqa: ASYNC251  # the mistake under test" in warning
        assert "in blocking" in warning


def test_threshold_is_configurable(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    watchdog = Watchdog(loop, threshold=30).start()
    try:
        with caplog.at_level(logging.INFO, logger="async_session_task"):
            asyncio.run_coroutine_threadsafe(blocking(1.0), loop).result(30)
    finally:
        watchdog.stop()
    assert messages(caplog, STALLED) == []
    assert watchdog.stalls == 0


def test_warning_names_the_task(caplog: pytest.LogCaptureFixture) -> None:
    celery = Celery(f"stall-{uuid.uuid4().hex[:8]}", set_as_current=False)
    celery.conf.async_session_url = "sqlite+aiosqlite://"

    @celery.task(bind=True, base=AsyncSessionTask, shared=False, name="stalls.in_process")
    async def stalls(self: AsyncSessionTask) -> str:
        time.sleep(1.5)  # noqa: ASYNC251  # the mistake under test
        return str(self.request.id)

    watchdog = Watchdog(get_runtime().loop, threshold=0.2, holder=runs.holding).start()
    try:
        with caplog.at_level(logging.INFO, logger="async_session_task"):
            result = stalls.apply()
            wait_for(lambda: messages(caplog, ANSWERS), 30, "the end of the stall")
    finally:
        watchdog.stop()
    assert result.get() == result.id
    (warning,) = [m for m in messages(caplog, STALLED) if "0.2 s" in m]
    assert f"task stalls.in_process[{result.id}] blocks it" in warning
    assert "time.sleep(1.5)  # noqa: ASYNC251  # the mistake under test" in warning


def test_loop_run_per_call_is_idle_between_calls(caplog: pytest.LogCaptureFixture) -> None:
    """Prefork children and solo run the loop per call: stalls in two calls, two warnings."""
    loop = asyncio.new_event_loop()
    watchdog = Watchdog(loop, threshold=0.2).start()
    try:
        with caplog.at_level(logging.INFO, logger="async_session_task"):
            for done in (1, 2):
                loop.run_until_complete(blocking(1.5))
                wait_for(lambda: len(messages(caplog, ANSWERS)) >= done, 30, "a stall's end")  # noqa: B023
    finally:
        watchdog.stop()
        loop.close()
    assert watchdog.stalls == 2
    assert len(messages(caplog, STALLED)) == 2


@pytest.mark.services
@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 1), ("threads", 4), ("gevent", 4)])
def test_real_worker_warns_once_per_stall(
    start_fault_worker: StartFaultWorker, pool: str, concurrency: int
) -> None:
    """Each blocked run gets one warning; the runs queued behind it wait, then succeed."""
    with start_fault_worker(
        pool=pool, concurrency=concurrency, env={"AST_STALL_THRESHOLD": "0.5"}
    ) as worker:
        stalled = []
        for _ in range(2):
            blocked = worker.send(app.stall, 2.0)
            others = group(app.where.s() for _ in range(8)).apply_async(queue=worker.worker.queue)
            blocked.get(timeout=60)
            assert len(others.get(timeout=60)) == 8
            stalled.append(blocked.id)
        assert worker.worker.stop() == 0
        log = worker.worker.log
    assert log.count(STALLED) == 2, log[-4000:]
    for task_id in stalled:
        assert f"task tests.faults.app.stall[{task_id}] blocks it" in log
    assert log.count("time.sleep(seconds)  # noqa: ASYNC251  # the mistake under test") == 2
