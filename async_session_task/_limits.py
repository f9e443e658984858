"""A run's time limits where Celery does not enforce them, and how a cancelled run ends.

A run past its limit, or whose wait is interrupted (prefork's soft limit, ``gevent.Timeout``,
a killed greenlet), is cancelled at its current await and given :data:`CANCELLED_RUN_GRACE`
seconds to clean up (docs/internals.md#cancel-then-wait); then ``SoftTimeLimitExceeded`` /
``TimeLimitExceeded``, or the interruption, is raised, as Celery does on prefork.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from ._crossing import Crossing

T = TypeVar("T")
logger = logging.getLogger("async_session_task")

#: Seconds a run cancelled by a time limit or an interruption may take to finish its
#: cleanup before it is reported as still running.
CANCELLED_RUN_GRACE = 10.0


async def within_soft_limit(coro: Coroutine[Any, Any, T], seconds: float) -> T:
    """``coro``, cancelled at its await after ``seconds``: ``SoftTimeLimitExceeded``."""
    limit = asyncio.timeout(seconds)
    try:
        async with limit:
            return await coro
    except TimeoutError:
        if not limit.expired():
            raise  # the body's own TimeoutError
        raise SoftTimeLimitExceeded(seconds) from None


def catch_soft_limit(running: Callable[[], Crossing | None]) -> None:
    """Prefork child: turn the soft time limit into a cancellation of the running body.

    billiard's SIGUSR1 handler raises ``SoftTimeLimitExceeded`` wherever the main thread is;
    with the loop running there, that may be inside one of asyncio's callbacks, which logs
    and swallows it, or inside the selector, leaving the body pending
    (docs/internals.md#soft-limit-prefork). The body sees ``CancelledError`` at its current
    await instead, its cleanup runs, then Celery gets ``SoftTimeLimitExceeded``. Sync tasks
    of the same worker keep billiard's handler.
    """
    previous = signal.getsignal(signal.SIGUSR1)
    if not callable(previous):
        return

    def on_soft_limit(signum: int, frame: Any) -> None:
        crossing = running()
        if crossing is None or crossing.done:
            previous(signum, frame)
        else:
            crossing.cancel(SoftTimeLimitExceeded())

    signal.signal(signal.SIGUSR1, on_soft_limit)


def outcome(crossing: Crossing) -> Any:
    """The run's value; its exception, or why it was cancelled, raised."""
    reason = crossing.cancelled
    if isinstance(reason, TimeLimitExceeded):
        raise reason  # whatever the body did with its cancellation
    try:
        return crossing.result()
    except asyncio.CancelledError:
        if reason is not None:
            raise reason from None
        raise


def still_running(name: str) -> None:
    """Report a cancelled run that did not end within :data:`CANCELLED_RUN_GRACE`."""
    logger.warning(
        "%s: its cancelled body is still running %.0f s later (it ignores "
        "asyncio.CancelledError); its session stays open until it ends.",
        name,
        CANCELLED_RUN_GRACE,
    )
